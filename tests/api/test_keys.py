"""API keys are random, stored hashed, checked in constant time, and stop working at once
when revoked or expired: `tid keys create/list/revoke`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import Result
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from support import assert_problem
from typer.testing import CliRunner

from cli.main import app
from store.db.models import ApiKey, utcnow
from store.db.session import session_scope
from store.keys import UNKNOWN, InvalidKey, create_key, list_keys, revoke_key, verify_key
from store.settings import Settings, get_settings


def test_create_key_stores_only_prefix_and_sha256(db: Session) -> None:
    key = create_key(db, owner="alice")
    db.commit()
    assert key.startswith("tid_") and len(key) > 40
    row = db.scalars(select(ApiKey)).one()
    prefix, secret = key[4:12], key[13:]
    assert (row.owner, row.prefix) == ("alice", prefix)
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in row.key_hash


def test_verify_key_returns_owner_and_rejects_bad_keys(db: Session) -> None:
    key = create_key(db, owner="alice")
    assert verify_key(db, key) == "alice"
    for bad in (key + "x", key[:13], "tid_" + "A" * 8 + "_" + key[13:], ""):
        with pytest.raises(InvalidKey, match=f"^{UNKNOWN}$"):
            verify_key(db, bad)


def test_revoked_key_fails(db: Session) -> None:
    key = create_key(db, owner="alice")
    row = db.scalars(select(ApiKey)).one()
    assert revoke_key(db, row.id) is row and row.revoked_at is not None
    with pytest.raises(InvalidKey, match=f"API key {row.id} was revoked at"):
        verify_key(db, key)
    first = row.revoked_at
    assert revoke_key(db, row.id) is row and row.revoked_at == first  # the first time stays
    assert revoke_key(db, "f" * 32) is None


def test_expired_key_fails(db: Session) -> None:
    later = create_key(db, owner="alice", expires_at=utcnow() + timedelta(minutes=1))
    past = create_key(db, owner="alice", expires_at=utcnow() - timedelta(seconds=1))
    assert verify_key(db, later) == "alice"
    with pytest.raises(InvalidKey, match="expired at"):
        verify_key(db, past)
    with pytest.raises(InvalidKey, match=f"^{UNKNOWN}$"):  # no secret: no reason
        verify_key(db, past[:-1] + ("x" if past[-1] != "x" else "y"))


def test_list_keys_is_oldest_first_and_per_owner(db: Session) -> None:
    for owner in ("alice", "bob", "alice"):
        create_key(db, owner=owner)
    assert [k.owner for k in list_keys(db)] == ["alice", "bob", "alice"]
    assert [k.owner for k in list_keys(db, owner="bob")] == ["bob"]


def test_verify_key_compares_digests_in_constant_time(
    db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = create_key(db, owner="alice")
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def compare_digest(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    assert verify_key(db, key) == "alice"
    with pytest.raises(InvalidKey):
        verify_key(db, key[:-1] + ("x" if key[-1] != "x" else "y"))
    stored = db.scalars(select(ApiKey)).one().key_hash
    assert [first for first, _ in compared] == [stored, stored]  # the secret never meets `==`


@pytest.fixture
def tid(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Result]]:
    """`tid ...` in this process, on the test's database."""
    monkeypatch.setenv("TID_DATA_ROOT", str(settings.data_root))
    monkeypatch.setenv("TID_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args), catch_exceptions=False)
    get_settings.cache_clear()


def test_tid_keys_create_list_revoke_without_showing_secrets(tid: Callable[..., Result]) -> None:
    before = utcnow()
    created = tid("keys", "create", "--owner", "alice", "--expires-in", "1.5")
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("tid_")
    assert tid("keys", "create", "--owner", "bob").exit_code == 0

    listed = tid("keys", "list")
    assert listed.exit_code == 0, listed.output
    header, alice, bob = listed.stdout.splitlines()
    assert header.split() == ["id", "prefix", "owner", "created", "expires", "revoked"]
    key_id, prefix, owner, *times = alice.split()
    assert (prefix, owner, times[-1]) == (key[4:12], "alice", "-")
    expires = datetime.strptime(" ".join(times[2:4]), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert abs(expires - (before + timedelta(days=1.5))) < timedelta(minutes=2)
    assert bob.split()[2] == "bob" and bob.split()[-2:] == ["-", "-"]  # never expires
    assert key[13:] not in listed.stdout  # no secret, no hash
    assert tid("keys", "list", "--owner", "bob").stdout.count("\n") == 2

    revoked = tid("keys", "revoke", key_id)
    assert revoked.exit_code == 0 and f"revoked {key_id} of alice" in revoked.stdout
    assert tid("keys", "list", "--owner", "alice").stdout.splitlines()[1].split()[-1] != "-"
    unknown = tid("keys", "revoke", "f" * 32)
    assert unknown.exit_code == 1 and "no API key" in unknown.output


def test_a_revoked_key_is_a_401_from_the_next_request_on(
    client: TestClient, other_headers: dict[str, str], tid: Callable[..., Result]
) -> None:
    key = tid("keys", "create", "--owner", "alice").stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    key_id = tid("keys", "list", "--owner", "alice").stdout.splitlines()[1].split()[0]
    assert tid("keys", "revoke", key_id).exit_code == 0
    response = client.get("/v1/jobs", headers=headers)
    assert_problem(response, 401, f"API key {key_id} was revoked at")
    assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers=other_headers).status_code == 200  # only that key


def test_a_key_is_a_401_from_the_moment_it_expires(
    client: TestClient, settings: Settings, db: Session
) -> None:
    with session_scope(settings.database_url) as session:
        key = create_key(session, owner="alice", expires_at=utcnow() + timedelta(days=1))
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    row = db.scalars(select(ApiKey)).one()
    row.expires_at = utcnow() - timedelta(seconds=1)  # a day later
    db.commit()
    assert_problem(client.get("/v1/jobs", headers=headers), 401, f"API key {row.id} expired at")
