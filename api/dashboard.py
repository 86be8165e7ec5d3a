"""The web dashboard at `/`: static files of this package (no CDN, no build step).

`index.html`, `app.js` and `app.css` are plain files; the one library, uPlot (MIT), is vendored
under `static/vendor/`. The page talks to the same REST API as everyone else, with the API key
the user pastes (kept in the tab's sessionStorage), so it needs no session machinery here.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# the page loads only its own files; uPlot styles its canvases from script
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'"


def install(app: FastAPI) -> None:
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
        )
