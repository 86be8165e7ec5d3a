"""Assertions and types shared by the API tests."""

from __future__ import annotations

from typing import Any

from httpx import Response

Sent = list[tuple[str, tuple[str, ...]]]  # what the `sent` fixture records: (task, args)


def assert_problem(response: Response, status: int, *fragments: str) -> dict[str, Any]:
    """The response is RFC 9457 problem+json with `status`, and mentions every fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == "about:blank" and body["status"] == status and body["title"]
    assert body["instance"] == response.request.url.path
    for fragment in fragments:
        assert fragment in body["detail"] or fragment in str(body.get("errors")), (fragment, body)
    return body
