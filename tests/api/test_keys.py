"""API keys are random, stored hashed, and checked in constant time."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey, utcnow
from api.keys import create_key, verify_key


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
