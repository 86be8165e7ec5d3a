"""The HTML pages: the dashboard at `/` and the API reference at `/docs`, static files of this
package (no CDN, no build step), so the service works offline and no third-party script ever
runs on the origin that holds the API keys.

`index.html`, `app.js` and `app.css` are plain files; the libraries, uPlot (MIT) and Swagger UI
(Apache-2.0), are vendored under `static/vendor/`. The dashboard talks to the same REST API as
everyone else, with the API key the user pastes (kept in the tab's sessionStorage), so it needs
no session machinery here. Every HTML response, whichever route or mount made it, gets the one
policy `CSP`: scripts only from files of this origin, never inline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
CSP = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data: blob:",  # Swagger UI's icons are data: URIs
        "style-src 'self' 'unsafe-inline'",  # uPlot and Swagger UI style elements from script
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",  # no page of ours inside another site's frame (clickjacking)
    )
)


class ContentSecurityPolicy:
    """Sets `CSP` on every text/html response: one place, so no page can be served without it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = CSP
            await send(message)

        await self.app(scope, receive, send_with_policy)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """The pages and their files; `create_app` turns FastAPI's own /docs (Swagger UI from a
    CDN, initialised by an inline script) and /redoc off."""
    app.add_middleware(ContentSecurityPolicy)
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return _page("index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        """Swagger UI for /openapi.json, set up by `docs.js`."""
        return _page("docs.html")
