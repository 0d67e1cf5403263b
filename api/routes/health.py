"""Liveness (open) and version (read scope)."""
from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.dependencies import ReadScope, SessionDep
from api.schemas import ErrorOut, HealthOut, VersionOut

API_VERSION = "1"

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}}, summary="Open: is the API up and its store reachable")
def health(session: SessionDep) -> HealthOut | JSONResponse:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any driver error means the store is unreachable
        return JSONResponse(status_code=503, content={"status": "degraded", "database": f"unreachable: {type(exc).__name__}"})
    return HealthOut(status="ok", database="ok")


@router.get("/version", response_model=VersionOut, responses={401: {"model": ErrorOut}})
def version(_scope: ReadScope, session: SessionDep) -> VersionOut:
    try:
        installed = metadata.version("defect-loop")
    except metadata.PackageNotFoundError:
        installed = "unknown"
    # the package version alone told two releases 5 schema upgrades apart for one (QA): the store's schema, and the
    # newest this release knows, say which release upgraded it
    from alembic.script import ScriptDirectory

    from store.db import alembic_config

    try:  # the store down: the release still answers (review: /version became a 500)
        store_schema = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:  # noqa: BLE001 - any driver error means the store is unreachable
        store_schema = None
    known = ScriptDirectory.from_config(alembic_config(str(session.get_bind().url))).get_current_head()
    return VersionOut(name="defect-loop", version=installed, api_version=API_VERSION, store_schema=store_schema, release_schema=known)
