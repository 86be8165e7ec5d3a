"""The CLI's REST client against canned server answers (the service tests run it for real)."""

from __future__ import annotations

import httpx

from cli.client import Client

STREAM = (
    'id: 1\nevent: start\ndata: {"step": 0}\n\n'
    ": keep-alive\n\n"  # what the API sends while a job is quiet
    'id: 2\nevent: end\ndata: {"step": 4}\n\n'
)


def test_events_skip_the_keep_alive_comment() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["Last-Event-ID"] == "0"
        return httpx.Response(200, text=STREAM, headers={"Content-Type": "text/event-stream"})

    client = Client("http://tid.test", api_key="tid_key")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(answer))

    assert list(client.events("job")) == [("start", {"step": 0}), ("end", {"step": 4})]
