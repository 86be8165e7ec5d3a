"""Typed dependencies for the routes: settings, a database session per request, the caller,
and the ownership rule every lookup of a resource goes through.

Routes take these and never open sessions or read the Authorization header themselves.
The settings are the app's own (`create_app(settings)` keeps them on `app.state`): a
`dependency_overrides` entry would do the same, but FastAPI re-inspects an override's signature
on every request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.problems import NotFound, Unauthorized
from store.db.owned import Owned, find_owned
from store.db.session import session_scope
from store.keys import InvalidKey, verify_key
from store.settings import Settings


async def app_settings(request: Request) -> Settings:
    """`async`: it only reads memory, so it runs on the event loop instead of costing each
    request a hop to the thread pool, as a sync dependency does."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request, committed when the route returns without error."""
    with session_scope(settings.database_url) as session:
        yield session


# scope="function": commit before the response is sent, so a client that got a 2xx can
# read what it wrote (and a failed commit is an error response, not a silent loss).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="API key: `tid keys create --owner NAME`")


def get_current_owner(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    try:
        return verify_key(session, credentials.credentials)
    except InvalidKey as exc:
        raise Unauthorized(str(exc)) from exc


CurrentOwner = Annotated[str, Depends(get_current_owner)]

# A resource id in the URL (ours are 32 hex characters): anything else is a 422, not a lookup,
# so no NUL byte or megabyte-long string ever reaches the database driver.
IdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


def get_owned(session: Session, table: type[Owned], row_id: str, *, owner: str) -> Owned:
    """Like `find_owned`, for a resource named in the URL: 404 (never 403) when not the caller's."""
    row = find_owned(session, table, row_id, owner=owner)
    if row is None:
        raise NotFound(f"{table.__name__.lower()} {row_id} not found")
    return row


def list_owned(session: Session, table: type[Owned], *, owner: str) -> list[Owned]:
    """Every row of `owner`'s, newest first (the lists that are short enough not to page)."""
    query = select(table).where(table.owner == owner).order_by(table.created_at.desc())
    return list(session.scalars(query))
