"""A small REST client (httpx) for the CLI, the demo and the end-to-end tests.

Talks HTTP only; reads `TID_URL` and `TID_API_KEY` when not given. Errors come back as
`ApiError` carrying the server's problem+json detail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

FINAL = ("succeeded", "failed", "cancelled")
RECONNECT_SECONDS = 2.0


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
            errors = "; ".join(
                f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}"
                for e in body.get("errors") or []
            )
            detail = body.get("detail") or errors or body.get("title") or response.text
        except ValueError:
            detail = response.text
        super().__init__(f"{response.status_code} {detail}")
        self.status_code = response.status_code


class Client:
    def __init__(
        self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0
    ) -> None:
        self.url = (url or os.environ.get("TID_URL") or "http://127.0.0.1:8000").rstrip("/")
        key = api_key or os.environ.get("TID_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise ApiError(response)
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._check(self.http.request(method, path, **kwargs)).json()

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def metrics(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics")

    def jobs(self, *, state: str | None = None, limit: int = 20) -> Any:
        params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        return self.request("GET", "/v1/jobs", params=params)

    def logs(self, job_id: str, *, tail: int = 200) -> str:
        response = self._check(self.http.get(f"/v1/jobs/{job_id}/logs", params={"tail": tail}))
        return response.text

    def cancel(self, job_id: str) -> Any:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, data) of the job's events from its SSE stream, until the job is final and
        every event is sent. A dropped connection is resumed after the last event seen."""
        while True:
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers={"Last-Event-ID": str(after)},
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise ApiError(source.response)
                    for event in source.iter_sse():
                        # httpx-sse dispatches the server's keep-alive comment as an event
                        # with no data (it keeps the last id); the SSE spec dispatches none
                        if not event.data:
                            continue
                        after = int(event.id)
                        yield event.event, event.json()
                return  # the server ends the stream once the job is final
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout):
                time.sleep(RECONNECT_SECONDS)

    def create_dataset(self, body: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/datasets", json=body)

    def dataset(self, dataset_id: str) -> Any:
        return self.request("GET", f"/v1/datasets/{dataset_id}")

    def upload(self, path: str, file: Path, form: dict[str, str]) -> Any:
        """POST `file` as multipart to `path` (/v1/models, /v1/datasets/upload) with `form`."""
        with file.open("rb") as f:
            files = {"file": (file.name, f, "application/octet-stream")}
            return self.request("POST", path, data=form, files=files)

    def wait(
        self,
        fetch: Callable[[], Any],
        *,
        done: Callable[[Any], bool],
        on_poll: Callable[[Any], None] | None = None,
        interval: float = 1.0,
        timeout: float = 3600.0,
    ) -> Any:
        """Poll `fetch` until `done(result)`; `on_poll` sees each result (progress output)."""
        deadline = time.monotonic() + timeout
        while True:
            current = fetch()
            if on_poll:
                on_poll(current)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up after {timeout:.0f} s: {current}")
            time.sleep(interval)

    def wait_job(self, job_id: str, **kwargs: Any) -> Any:
        return self.wait(lambda: self.job(job_id), done=lambda j: j["state"] in FINAL, **kwargs)

    def download(self, job_id: str, name: str, out: Path) -> str:
        """Stream an artifact to `out`; returns its ETag (the sha256)."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            tmp = out.with_name(out.name + ".part")
            with tmp.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
            tmp.replace(out)
            etag: str = response.headers.get("etag", "")
            return etag.strip('"')
