"""RFC 9457 problem details: the one shape every 4xx/5xx of the API has.

Routes raise the domain exceptions below (or let FastAPI raise validation and routing errors);
the handlers installed by `install` render all of them as `application/problem+json`, so no
route needs its own try/except. Routes list the problems they can answer with through
`responses`, so the OpenAPI schema says what a client will really get.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from store.db.session import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_DETAIL_ERRORS = 5  # the `errors` list has them all; `detail` stays one readable line


class ProblemError(Exception):
    """A domain error with its HTTP status; subclasses name the kind of failure."""

    status = 500

    def __init__(
        self,
        detail: str,
        *,
        loc: Sequence[str | int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.loc = loc  # where in the request the problem is, for `errors`
        self.headers = dict(headers or {})


class BadRequest(ProblemError):
    status = 400


class Unauthorized(ProblemError):
    status = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ProblemError):
    status = 404


class Conflict(ProblemError):
    status = 409


class PayloadTooLarge(ProblemError):
    status = 413


class RangeNotSatisfiable(ProblemError):
    status = 416

    def __init__(self, detail: str, *, size: int) -> None:
        super().__init__(detail, headers={"Content-Range": f"bytes */{size}"})


class Unprocessable(ProblemError):
    status = 422


class TooManyRequests(ProblemError):
    status = 429

    def __init__(self, detail: str, *, retry_after: int | None) -> None:
        """`retry_after` None: waiting frees nothing (a full storage quota), so no Retry-After."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        super().__init__(detail, headers=headers)


class Unavailable(ProblemError):
    status = 503


def _no_null_default(schema: JsonDict) -> None:
    """Optional keys are left out, never sent as null (`exclude_none`), so the schema documents
    neither null (SkipJsonSchema) nor a null default: generated clients type them `T | Unset`."""
    del schema["default"]


_ABSENT = Field(default=None, json_schema_extra=_no_null_default)  # with `T | SkipJsonSchema[None]`


class ProblemFieldError(BaseModel):
    """Where in the request one error is (`loc`: ["body", "student", ...]), so a client can
    point at the field; a named model, because generated clients drop free-form objects."""

    loc: list[str | int]
    msg: str
    type: str | SkipJsonSchema[None] = _ABSENT  # pydantic's error type; absent on domain errors


class Problem(BaseModel):
    """The body of every error response (RFC 9457), as the OpenAPI schema documents it."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[ProblemFieldError] | SkipJsonSchema[None] = _ABSENT  # 422s, domain errors


_COMPONENTS = "#/components/schemas/"


def _component_schemas() -> dict[str, Any]:
    """`Problem` and its `errors` item as OpenAPI components: responses `$ref` the one schema, so
    a client generator makes one `Problem` model (inlined, it named a model per operation and
    dropped the responses whose names clashed)."""
    schema = Problem.model_json_schema(ref_template=f"{_COMPONENTS}{{model}}")
    return {**schema.pop("$defs"), "Problem": schema}


_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": f"{_COMPONENTS}Problem"}}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
    416: {"Content-Range": {"schema": {"type": "string"}}},
    429: {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "seconds"}},
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the problems a route can answer with (all problem+json)."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": _PROBLEM_CONTENT,
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def problem_response(
    *,
    status: int,
    detail: str,
    instance: str,
    errors: list[ProblemFieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A problem+json response; `type` is about:blank, so `title` is the HTTP status phrase."""
    problem = Problem(
        type="about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    errors = [ProblemFieldError(loc=list(exc.loc), msg=exc.detail)] if exc.loc is not None else None
    return problem_response(
        status=exc.status,
        detail=exc.detail,
        instance=request.url.path,
        errors=errors,
        headers=exc.headers,
    )


def _allowed_methods(request: Request) -> str:
    """Every method served at the request's path: Starlette's 405 names only the first route's,
    and `GET /v1/jobs` and `POST /v1/jobs` are two routes."""
    return ", ".join(
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Routing and framework errors (unknown route 404, 405, 413 from the body limit, a body
    FastAPI cannot parse...)."""
    assert isinstance(exc, StarletteHTTPException)
    detail, headers = str(exc.detail), dict(exc.headers or {})
    if isinstance(exc.__cause__, RecursionError):  # json.loads gave up: not our failure
        detail = "JSON body nested too deeply"
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem_response(
        status=exc.status_code, detail=detail, instance=request.url.path, headers=headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with every pydantic error's location and message (malformed JSON included)."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        ProblemFieldError(loc=list(e["loc"]), msg=e["msg"], type=e["type"]) for e in exc.errors()
    ]
    lines = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:MAX_DETAIL_ERRORS]]
    more = len(errors) - len(lines)
    detail = "; ".join(lines) + (f" (and {more} more)" if more > 0 else "")
    return problem_response(status=422, detail=detail, instance=request.url.path, errors=errors)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database is down or restarting: a retryable 503, not a 500 that looks like a bug."""
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        status=503,
        detail="the database is unavailable; retry shortly",
        instance=request.url.path,
        headers={"Retry-After": "5"},
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug or an outage: log the traceback, tell the client only that it failed."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        status=500, detail="internal server error (logged)", instance=request.url.path
    )


def _document_problems(app: FastAPI) -> None:
    """Add the schemas that `responses` refers to: FastAPI lists only the models of routes."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # cached by FastAPI, so the components are added to the one it serves
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_component_schemas())
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


def install(app: FastAPI) -> None:
    _document_problems(app)
    app.add_exception_handler(ProblemError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for transient in TRANSIENT_ERRORS:
        app.add_exception_handler(transient, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected_error)
