"""Probes: `/healthz` (the process answers) and `/readyz` (it can reach the database and the
broker, so a load balancer or the demo only sends traffic that can be served)."""

from __future__ import annotations

import logging
import os

import redis
from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import SettingsDep
from api.problems import Unavailable, responses
from api.schemas import Health
from store.db.session import get_engine
from store.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_SECONDS = 2.0


def _database_ok(settings: Settings) -> bool:
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("readiness: database unreachable: %s", exc)
        return False
    return True


def _broker_ok(settings: Settings) -> bool:
    """Redis answers a PING; a file-system transport's queue folder is writable. Other
    transports are not probed."""
    url = settings.broker_url
    if url.startswith("filesystem://"):
        folder = settings.broker_dir / "queue"
        return folder.is_dir() and os.access(folder, os.W_OK)
    if url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_SECONDS, socket_connect_timeout=PROBE_TIMEOUT_SECONDS
        )
        try:
            with client:
                client.ping()
        except redis.RedisError as exc:
            log.warning("readiness: broker unreachable: %s", exc)
            return False
    return True


@router.get("/healthz")
def read_health() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses=responses(503))
def read_readiness(*, settings: SettingsDep) -> Health:
    down = [
        name
        for name, ok in (("database", _database_ok), ("broker", _broker_ok))
        if not ok(settings)
    ]
    if down:
        raise Unavailable(f"not ready: {' and '.join(down)} unreachable")
    return Health(status="ok")
