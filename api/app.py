"""The managers' API: `create_app(settings)` builds it; `serve(project_dir, host, port)` runs it with uvicorn.

Auth: `Authorization: Bearer <LOOP_API_TOKEN>` (full access) or `<LOOP_API_READ_TOKEN>` (read-only); the dashboard
and /images also take the token as `?token=`. /health is open. Label Studio's webhook uses its own secret header.
"""
from __future__ import annotations

import errno
import logging
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard
from api.caching import VersionedResponseCache
from api.docs import add_docs
from api.dependencies import HEAD_ONLY, full_token_needed, scope_of_token
from api.dependencies import Scope as AccessScope
from api.routes import health, images, predict, projects, rounds, webhooks
from api.settings import STORE_FILENAME, Settings
from store.db import create_db_engine, database_error_reason, shown_url, store_connection_lost, upgrade_schema

logger = logging.getLogger("defect_loop.api")


# Routes whose body is an upload: their token is checked before a byte of it is read (FastAPI reads and spools a
# multipart body to disk before any dependency runs, so a request without a token could fill the disk first)
FULL_TOKEN_BEFORE_BODY = frozenset({("POST", "/predict")})


WEBHOOK_MAX_BYTES = 5 * 1024 * 1024  # a Label Studio event: the task, its answer and the project's settings


class RequestSizeLimit:
    """Refuse a request whose body is larger than the upload limits allow: by its Content-Length before reading it,
    and while reading a body sent without one (chunked); uploads without a valid full-access token before reading."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.max_bytes = settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        # the webhook's JSON events are small: the upload limit (675 MB by default) let a body that size be parsed (review)
        max_bytes = WEBHOOK_MAX_BYTES if scope["path"].startswith("/webhooks/") else self.max_bytes
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            detail = f"request body larger than the limit of {max_bytes} bytes" if length.isdigit() else "invalid Content-Length"
            await JSONResponse(status_code=413 if length.isdigit() else 400, content={"detail": detail})(scope, receive, send)
            return
        if (scope["method"], scope["path"].rstrip("/") or "/") in FULL_TOKEN_BEFORE_BODY:
            refusal = self._refusal(headers.get(b"authorization", b"").decode("latin-1"))
            if refusal is not None:
                await JSONResponse(status_code=refusal.status_code, content={"detail": refusal.detail}, headers=refusal.headers)(scope, receive, send)
                return
        if scope["method"] in ("GET", "HEAD"):  # no route reads their body (a file response's listener reads it, after
            await self.app(scope, receive, send)  # its response began: a 413 then was a traceback and a reset)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:  # FastAPI turns an HTTPException raised while reading the body into its response
                raise HTTPException(413, detail=f"request body larger than the limit of {max_bytes} bytes")
            return message

        await self.app(scope, counted, send)

    def _refusal(self, authorization: str) -> HTTPException | None:
        scheme, _, token = authorization.partition(" ")
        try:
            granted = scope_of_token(token.strip() if scheme.lower() == "bearer" else None, self.settings)
        except HTTPException as refused:
            return refused
        return None if granted is AccessScope.full else full_token_needed()


class HeadAnsweredAsGet:
    """HEAD on any GET route (the dashboard, /rounds, /images: uptime probes and link checkers ask with HEAD) is
    answered as GET without the body: FastAPI routes answer HEAD with 405 unless a route declares it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.pathsend":  # a file sent by the server itself (an ASGI extension)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):  # the last chunk: the response ends with no body sent
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        # a route whose body is costly to make (an export) reads HEAD_ONLY and answers with its headers alone
        await self.app({**scope, "method": "GET", HEAD_ONLY: True}, receive, headers_only)


def _check_store(url: str) -> None:
    """A missing SQLite file would be created empty by the driver: say where the store was expected instead."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url:
        path = Path(url[len(prefix):].split("?", 1)[0])
        if not path.is_file():
            raise FileNotFoundError(f"no store at {path}: run `loop init` in that project directory, or set LOOP_DATABASE_URL")


async def _store_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """The store went away (server stopped, network): 503, not a 500 and a traceback per request; the next request
    after it is back is answered as usual. Other database errors (a bug, a schema problem) stay 500s, logged in full.
    The reason goes to the log only: the driver's words name hosts and users."""
    if not store_connection_lost(exc):
        return await _unhandled(request, exc)
    reason = database_error_reason(exc)
    logger.warning("store unreachable on %s %s: %s", request.method, request.url.path, reason)
    return JSONResponse(status_code=503, content={"detail": "store unreachable: try again shortly"}, headers={"Retry-After": "5"})


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": "internal server error (logged)"})


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over one store (settings.store_url: LOOP_DATABASE_URL, else <project dir>/loop.db)."""
    settings = settings or Settings()
    url = settings.store_url
    _check_store(url)
    if ":memory:" not in url:
        upgrade_schema(url)  # a store made by an older defect-loop gets the newer columns (a no-op when current)
    engine = create_db_engine(url, create_missing_file=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="defect-loop API",
        summary="Rounds, gates, labels and predictions of a defect-loop project",
        description=(
            "Send `Authorization: Bearer <token>`: LOOP_API_TOKEN (full access) or LOOP_API_READ_TOKEN (read-only). "
            "Open the dashboard in a browser as `/dashboard?token=<token>`. `/health` is open."
        ),
        version="1",
        lifespan=lifespan,
        docs_url=None,  # api.docs serves them without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = sessionmaker(engine, expire_on_commit=False)
    app.state.model_cache = {}
    app.state.response_cache = VersionedResponseCache(max_entries=1024)
    app.add_middleware(RequestSizeLimit, settings=settings)
    app.add_middleware(HeadAnsweredAsGet)  # outermost: the size limit and the routes see a GET
    app.add_exception_handler(OperationalError, _store_unreachable)
    app.add_exception_handler(InterfaceError, _store_unreachable)
    app.add_exception_handler(Exception, _unhandled)
    for module in (health, projects, rounds, images, predict, webhooks, dashboard):
        app.include_router(module.router)
    add_docs(app)
    return app


def serve(project_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, settings: Settings | None = None,
          log_level: str = "info") -> None:
    """Serve a project's store; prints the dashboard URL. With no token configured, makes one for this run and prints it."""
    import uvicorn

    base = settings or Settings()
    overrides: dict[str, Any] = {"project_dir": Path(project_dir)}
    if base.api_token is None and base.api_read_token is None:
        overrides["api_token"] = SecretStr(secrets.token_urlsafe(24))
        overrides["api_read_token"] = SecretStr(secrets.token_urlsafe(24))
    effective = base.model_copy(update=overrides)
    listener = listening_socket(host, port)  # first: a port in use printed the URLs and tokens, then failed
    app = create_app(effective)
    _log_to_stderr()
    # a wildcard address is no place a browser can open: the URLs name this machine, and say it listens everywhere (QA)
    everywhere = host in ("0.0.0.0", "::", "")
    shown_host = socket.gethostname() if everywhere else f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}"
    if everywhere or host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {'every network interface' if everywhere else host}, over plain HTTP: whoever reaches this machine can "
              "send requests (a token is still required), and tokens cross the network unencrypted; put a TLS proxy in front for "
              "use beyond a trusted network", file=sys.stderr)
    if effective.api_read_token is None:  # the URL below gets shared (a tunnel, a screenshot); it carries full access then (QA)
        print("note: only LOOP_API_TOKEN is set, so the dashboard URL below carries the full-access token (/predict): set "
              "LOOP_API_READ_TOKEN too and share that one", file=sys.stderr)
    read_token = (effective.api_read_token or effective.api_token).get_secret_value()
    print(f"defect-loop API on {url}  (store: {shown_url(effective.store_url)})")
    print(f"  dashboard: {url}/dashboard?token={read_token}")
    print(f"  API docs:  {url}/docs  (or {url}/redoc)")
    if "api_token" in overrides:
        print("  tokens for this run (set LOOP_API_TOKEN / LOOP_API_READ_TOKEN to choose your own):")
        print(f"    full access: {effective.api_token.get_secret_value()}")
        print(f"    read-only:   {effective.api_read_token.get_secret_value()}")
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[listener])


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to serve on; OSError naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: a port left in TIME_WAIT is free
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        taken = error.errno == errno.EADDRINUSE  # not an address this machine lacks, a name it cannot resolve, a port below 1024
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}"
                                   + (" (another `loop serve`, or another program, has it): give --port" if taken else "")) from None
    return listener


def _log_to_stderr() -> None:
    """The API's own records (each /predict answer, each webhook, the store going away) at INFO on stderr: uvicorn runs
    at `warning` and configures only its own loggers, so they went nowhere. A handler set up by the host is kept."""
    api_logger = logging.getLogger("defect_loop")
    if not api_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        api_logger.addHandler(handler)
        api_logger.setLevel(logging.INFO)


__all__ = ["create_app", "serve", "Settings", "STORE_FILENAME"]
