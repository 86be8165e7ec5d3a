"""API keys are random, stored hashed, and checked in constant time."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db.models import ApiKey, utcnow
from store.keys import create_key, verify_key


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
    assert verify_key(db, key + "x") is None
    assert verify_key(db, key[:13]) is None
    assert verify_key(db, "tid_" + "A" * 8 + "_" + key[13:]) is None
    assert verify_key(db, "") is None


def test_revoked_key_fails(db: Session) -> None:
    key = create_key(db, owner="alice")
    db.scalars(select(ApiKey)).one().revoked_at = utcnow()
    assert verify_key(db, key) is None


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
    assert verify_key(db, key[:-1] + "x") is None
    stored = db.scalars(select(ApiKey)).one().key_hash
    assert [first for first, _ in compared] == [stored, stored]  # the secret never meets `==`
