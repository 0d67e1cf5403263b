"""Typed dependencies: settings, a read-only DB session, the project's lock check, and the two token scopes (read, full)."""
from __future__ import annotations

import enum
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, sessionmaker

from api.caching import VersionedResponseCache
from api.liveness import ProjectProcess
from api.settings import Settings
from store import reports

# set in the scope of a HEAD request answered as GET (api.app.HeadAnsweredAsGet): a route whose body is costly to
# make (an export) answers with its headers alone
HEAD_ONLY = "defect_loop.head_only"


class Scope(str, enum.Enum):
    read = "read"
    full = "full"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _read_one_moment(session: Session, _transaction, connection: Connection) -> None:  # noqa: ANN001
    """The request's reads all see the store at one moment: a round committing meanwhile showed a page its new
    confusion matrix beside the previous round's gates. SQLite: a transaction of our own (pysqlite opens none for a
    SELECT, so each saw the newest commit), its snapshot taken at the first read; PostgreSQL: repeatable read."""
    if connection.dialect.name == "sqlite":
        reports.pin_sqlite_file_version(session)  # before the snapshot: a cached answer is never older than its version
        connection.exec_driver_sql("BEGIN")
    elif connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def end_reads(session: Session) -> None:
    """Ends the request's read transaction once the route has read what it needs, before slow work that needs the
    store no more (sending an export, running the model): an open SQLite snapshot keeps the write-ahead log from
    being checkpointed past it while a round writes. Committing a transaction that wrote nothing writes nothing, and
    keeps what was loaded readable (the factory's expire_on_commit=False)."""
    session.commit()


def get_session(request: Request) -> Iterator[Session]:
    """A session that never writes (end_reads commits a transaction that wrote nothing), its reads seeing one moment
    of the store (_read_one_moment)."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    event.listen(session, "after_begin", _read_one_moment)
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_response_cache(request: Request) -> VersionedResponseCache:
    return request.app.state.response_cache


ResponseCacheDep = Annotated[VersionedResponseCache, Depends(get_response_cache)]


def get_project_process(request: Request) -> ProjectProcess:
    """One per request: the lock is read at most once, and only if a round is recorded as running."""
    return ProjectProcess(request.app.state.settings.project_dir, request.app.state.engine)


ProjectProcessDep = Annotated[ProjectProcess, Depends(get_project_process)]

_bearer = HTTPBearer(auto_error=False, description="LOOP_API_TOKEN (full access) or LOOP_API_READ_TOKEN (read-only)")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"})


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def scope_of_token(token: str | None, settings: Settings, *, how: str = "send `Authorization: Bearer <token>`") -> Scope:
    """The scope a token grants; 401 when it grants none (`how`: how this endpoint takes a token)."""
    if settings.api_token is None and settings.api_read_token is None:
        raise _unauthorized("this server has no API token configured: set LOOP_API_TOKEN and/or LOOP_API_READ_TOKEN")
    if not token:
        raise _unauthorized(f"missing token: {how}")
    if settings.api_token is not None and _same(token, settings.api_token.get_secret_value()):
        return Scope.full
    if settings.api_read_token is not None and _same(token, settings.api_read_token.get_secret_value()):
        return Scope.read
    raise _unauthorized("invalid token")


def bearer_scope(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Scope:
    return scope_of_token(credentials.credentials if credentials else None, settings)


def browser_scope(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[str | None, Query(description="the read (or full) token, for pages and images opened in a browser")] = None,
) -> Scope:
    """A browser opening /dashboard (or an <img> in it) sends no Authorization header: accept ?token= as well."""
    return scope_of_token(credentials.credentials if credentials else token, settings,
                          how="open the page with `?token=<read token>` (as `loop serve` prints it), or send `Authorization: Bearer <token>`")


def full_token_needed() -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail="this endpoint needs the full-access token (LOOP_API_TOKEN); the read-only token was sent")


def require_full(scope: Annotated[Scope, Depends(bearer_scope)]) -> Scope:
    if scope is not Scope.full:
        raise full_token_needed()
    return scope


ReadScope = Annotated[Scope, Depends(bearer_scope)]
BrowserReadScope = Annotated[Scope, Depends(browser_scope)]
FullScope = Annotated[Scope, Depends(require_full)]

Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")]
# Store ids are PostgreSQL integers (32-bit): a larger number is a 422, never the driver's overflow (QA: a 500 on
# PostgreSQL above 2**31 - 1, where SQLite answered 404)
STORE_ID_MAX = 2**31 - 1
RowId = Annotated[int, Path(ge=1, le=STORE_ID_MAX, description="store id")]
