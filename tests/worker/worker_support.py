"""Shared by the worker tests: a job spec that trains in seconds on a CPU, and readers."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from store.db.models import Job
from store.db.session import session_scope
from store.settings import Settings

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
    "dataset": {"builtin": "shapes", "num_train": 8, "num_val": 4, "image_size": 64},
    "schedule": {"epochs": 1, "batch_size": 4, "warmup_iters": 1, "log_every": 1},
    "resources": {"num_workers": 0, "device": "cpu"},
}

MakeJob = Callable[..., str]


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """TINY_SPEC with top-level blocks merged (dicts) or replaced (anything else)."""
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_SPEC.items()}
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def read_job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def queued_messages(settings: Settings) -> list[tuple[str, tuple[Any, ...]]]:
    """(task name, args) of every message waiting in the file-system broker's folder."""
    messages = []
    for path in sorted((settings.broker_dir / "queue").glob("*.msg")):
        message = json.loads(path.read_text())
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], tuple(args)))
    return messages
