"""The HTML pages (the dashboard, the API reference at /docs): only files of this origin, and
one Content-Security-Policy on every one of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from browser import CHROMIUM, CHROMIUM_ARGS
from fastapi.testclient import TestClient
from prerequisites import missing
from starlette.routing import Route
from support import Sent

from api.app import create_app
from api.dashboard import CSP, STATIC
from store.settings import Settings


class _Resources(HTMLParser):
    """What a page loads (scripts, styles, icons, images), and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script":
            self._in_script = "src" not in found
        url = found.get("src") or (found.get("href") if tag == "link" else None)
        if url:
            self.urls.append(url)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def _resources(html: str) -> _Resources:
    parser = _Resources()
    parser.feed(html)
    return parser


def _html_pages(client: TestClient) -> dict[str, str | None]:
    """Every path that answers GET with HTML, and its CSP header: the routes without path
    parameters, and each HTML file of the static folder."""
    paths = [
        route.path
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, Route) and "GET" in (route.methods or ()) and "{" not in route.path
    ]
    paths += [f"/ui/{page.relative_to(STATIC)}" for page in STATIC.rglob("*.html")]
    pages = {}
    for path in paths:
        response = client.get(path)
        if response.headers.get("content-type", "").startswith("text/html"):
            assert response.status_code == 200, path
            pages[path] = response.headers.get("content-security-policy")
    return pages


def test_every_html_page_has_the_one_policy(client: TestClient) -> None:
    pages = _html_pages(client)
    assert {"/", "/docs", "/ui/index.html", "/ui/docs.html"} <= pages.keys()
    assert pages == dict.fromkeys(pages, CSP)
    # scripts fall back to default-src: files of this origin, nothing inline, no eval
    assert CSP.startswith("default-src 'self';") and "script-src" not in CSP
    assert "content-security-policy" not in client.get("/openapi.json").headers


def test_fastapis_cdn_pages_are_off(client: TestClient) -> None:
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_a_page_loads_only_files_of_its_own_origin(client: TestClient, path: str) -> None:
    page = _resources(client.get(path).text)
    assert page.urls and not page.inline_scripts
    for url in page.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, url  # same origin: a path only
        assert client.get(url).status_code == 200, url


def test_swagger_ui_is_vendored_with_its_license() -> None:
    vendored = STATIC / "vendor" / "swagger-ui"
    assert "Apache License" in (vendored / "LICENSE").read_text()
    assert (vendored / "VERSION").read_text().startswith("swagger-ui-dist 5.")
    assert "SwaggerUIBundle" in (vendored / "swagger-ui-bundle.js").read_text()


@pytest.fixture
def live_url(settings: Settings, sent: Sent) -> Iterator[str]:
    """The app served by uvicorn on a free port, in a thread of this process."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_pages_render_offline_under_the_policy(live_url: str, tmp_path: Path) -> None:
    """Swagger UI draws the operations, and the dashboard its login, with every other origin
    cut off, and the policy blocks nothing they need."""
    from playwright.sync_api import Route as BrowserRoute
    from playwright.sync_api import expect, sync_playwright

    if CHROMIUM is None:
        missing("Debian's chromium is not installed")
    elsewhere: list[str] = []
    problems: list[str] = []

    def only_this_origin(route: BrowserRoute) -> None:
        if route.request.url.startswith(live_url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.route("**/*", only_this_origin)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(live_url + "/docs")
        expect(page.locator(".opblock-summary-path[data-path='/v1/jobs']").first).to_be_visible()
        expect(page.locator(".opblock")).not_to_have_count(0)
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        page.goto(live_url + "/")
        expect(page.locator("#api-key")).to_be_visible()
        browser.close()
    assert not elsewhere
    assert not problems  # a script or style the policy refused shows up here
