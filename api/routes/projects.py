"""Projects, their rounds and the progress series behind the dashboard's charts."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from api.dependencies import Limit, Offset, ReadScope, ResponseCacheDep, RowId, SessionDep
from api.schemas import ErrorOut, PageOut, ProgressOut, ProjectOut, RoundSummaryOut
from store import reports

router = APIRouter(tags=["projects"], responses={401: {"model": ErrorOut}})


@router.get("/projects", response_model=PageOut[ProjectOut])
def list_projects(session: SessionDep, _scope: ReadScope, limit: Limit = 50, offset: Offset = 0) -> PageOut[ProjectOut]:
    page = reports.list_projects(session, limit=limit, offset=offset)
    return PageOut[ProjectOut](total=page.total, limit=limit, offset=offset, items=[ProjectOut.model_validate(p) for p in page.items])


def _require_project(session: SessionDep, project_id: int) -> None:
    if reports.get_project_or_none(session, project_id) is None:
        raise HTTPException(404, detail=f"no project {project_id} in this store")


@router.get("/projects/{project_id}/rounds", response_model=PageOut[RoundSummaryOut], responses={404: {"model": ErrorOut}})
def list_rounds(
    project_id: RowId, session: SessionDep, _scope: ReadScope, limit: Limit = 50, offset: Offset = 0
) -> PageOut[RoundSummaryOut]:
    _require_project(session, project_id)
    page = reports.list_rounds(session, project_id=project_id, limit=limit, offset=offset)
    return PageOut[RoundSummaryOut](total=page.total, limit=limit, offset=offset, items=[RoundSummaryOut.model_validate(r) for r in page.items])


@router.get("/projects/{project_id}/progress", response_model=ProgressOut, responses={404: {"model": ErrorOut}})
def progress(project_id: RowId, session: SessionDep, cache: ResponseCacheDep, _scope: ReadScope) -> Response:
    # Dashboards poll this; with many rounds building it costs far more than checking whether anything changed.
    version = reports.progress_fingerprint(session, project_id=project_id)
    body = cache.get(("progress", project_id), version)
    if body is None:
        series = reports.progress_series(session, project_id=project_id)
        if series is None:
            raise HTTPException(404, detail=f"no project {project_id} in this store")
        body = ProgressOut.model_validate(series).model_dump_json().encode()
        cache.put(("progress", project_id), version, body)
    return Response(content=body, media_type="application/json")
