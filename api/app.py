"""The FastAPI application, built by a factory: `uvicorn --factory api.app:create_app`.

Start-up refuses an un-migrated database (the schema is Alembic's job, `tid db upgrade`), so a
deployment fails at once and says why instead of erroring on the first request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard, metrics, problems
from api.routes import datasets, health, jobs, models
from store.db.migrate import check_migrated
from store.queue import make_celery
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields


class BodyLimit:
    """413 problem for request bodies over the limit: `max_json_bytes` for everything but
    multipart uploads, whose file is capped at `max_upload_bytes`. A declared Content-Length is
    refused before reading; a chunked body as soon as it crosses the limit."""

    def __init__(self, app: ASGIApp, *, max_json_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if headers.get("content-type", "").lower().startswith("multipart/"):
            limit = self.max_upload_bytes + MULTIPART_OVERHEAD
            detail = f"upload larger than {self.max_upload_bytes} bytes"
        else:
            limit, detail = self.max_json_bytes, f"body larger than {self.max_json_bytes} bytes"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = problems.problem_response(status=413, detail=detail, instance=scope["path"])
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise StarletteHTTPException(413, detail)  # rendered by the problem handler
            return message

        await self.app(scope, limited_receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment); routes see the same settings."""
    resolved = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        check_migrated(resolved.database_url)
        if resolved.broker_url.startswith("filesystem://"):
            make_celery(resolved)  # creates the transport's folders, which /readyz checks
        log.info("API ready: database %s", resolved.database_url.split("@")[-1])
        yield

    # /docs is the dashboard module's (vendored Swagger UI); nothing uses /redoc
    app = FastAPI(
        title="TID service",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = resolved
    problems.install(app)
    app.add_middleware(
        BodyLimit,
        max_json_bytes=resolved.max_json_bytes,
        max_upload_bytes=resolved.max_upload_bytes,
    )
    for module in (health, jobs, datasets, models):
        app.include_router(module.router)
    metrics.install(app, resolved)
    dashboard.install(app)
    return app
