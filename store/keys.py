"""API keys: `tid_<prefix>_<secret>`, stored as the prefix (to find the row) and sha256(secret).

Secrets are 32 random bytes, so a plain SHA-256 is enough (no password hashing needed), and the
comparison is constant-time. The prefix has a fixed length and may itself contain `_`, so keys
are split by position, not by separator.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db.models import ApiKey

SCHEME = "tid_"
PREFIX_CHARS = 8  # token_urlsafe(6) is exactly 8 characters


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, owner: str) -> str:
    """Store a new key for `owner` and return it: the only time the secret is visible."""
    prefix = secrets.token_urlsafe(PREFIX_CHARS * 3 // 4)
    secret = secrets.token_urlsafe(32)
    session.add(ApiKey(owner=owner, prefix=prefix, key_hash=_digest(secret)))
    session.flush()
    return f"{SCHEME}{prefix}_{secret}"


def verify_key(session: Session, key: str) -> str | None:
    """The owner of `key`, or None when it is malformed, unknown or revoked."""
    head = len(SCHEME) + PREFIX_CHARS
    if not key.startswith(SCHEME) or len(key) <= head + 1 or key[head] != "_":
        return None
    prefix, secret = key[len(SCHEME) : head], key[head + 1 :]
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None:
        return None
    return row.owner if hmac.compare_digest(row.key_hash, _digest(secret)) else None
