"""API keys: `tid_<prefix>_<secret>`, stored as the prefix (to find the row) and sha256(secret).

Secrets are 32 random bytes, so a plain SHA-256 is enough (no password hashing needed), and the
comparison is constant-time. The prefix has a fixed length and may itself contain `_`, so keys
are split by position, not by separator. Every request reads its key's row (nothing is cached),
so a revocation or an expiry holds from the next request on.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.db.models import ApiKey, utcnow

SCHEME = "tid_"
PREFIX_CHARS = 8  # token_urlsafe(6) is exactly 8 characters
# for a caller without the secret: which of these it is stays unsaid
UNKNOWN = "invalid or revoked API key"


class InvalidKey(Exception):
    """The key authenticates nobody; the message says why (revoked or expired only to a caller
    who holds the secret)."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, owner: str, expires_at: datetime | None = None) -> str:
    """Store a new key for `owner` and return it: the only time the secret is visible."""
    prefix = secrets.token_urlsafe(PREFIX_CHARS * 3 // 4)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(owner=owner, prefix=prefix, key_hash=_digest(secret), expires_at=expires_at)
    session.add(key)
    session.flush()
    return f"{SCHEME}{prefix}_{secret}"


def verify_key(session: Session, key: str) -> str:
    """The owner of `key`; InvalidKey when it is malformed, unknown, revoked or expired."""
    head = len(SCHEME) + PREFIX_CHARS
    if not key.startswith(SCHEME) or len(key) <= head + 1 or key[head] != "_":
        raise InvalidKey(UNKNOWN)
    prefix, secret = key[len(SCHEME) : head], key[head + 1 :]
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or not hmac.compare_digest(row.key_hash, _digest(secret)):
        raise InvalidKey(UNKNOWN)
    if row.revoked_at is not None:
        raise InvalidKey(f"API key {row.id} was revoked at {row.revoked_at:%Y-%m-%d %H:%M} UTC")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise InvalidKey(f"API key {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC")
    return row.owner


def list_keys(session: Session, *, owner: str | None = None) -> list[ApiKey]:
    """Every key (or `owner`'s), oldest first."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    """Revoke the key `key_id` (a revoked key keeps its first revocation time); None when there
    is no such key."""
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return session.get(ApiKey, key_id, populate_existing=True)
