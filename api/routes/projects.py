"""Projects, their rounds and the progress series behind the dashboard's charts."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import threading
from collections import Counter
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from api.dependencies import HEAD_ONLY, BrowserReadScope, Limit, Offset, ProjectProcessDep, ReadScope, ResponseCacheDep, RowId, SessionDep, end_reads
from api.schemas import AnnotatorOut, ErrorOut, PageOut, ProgressOut, ProjectOut, RoundSummaryOut
from store import export, reports

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
    project_id: RowId, session: SessionDep, process: ProjectProcessDep, _scope: ReadScope, limit: Limit = 50, offset: Offset = 0
) -> PageOut[RoundSummaryOut]:
    _require_project(session, project_id)
    page = reports.list_rounds(session, project_id=project_id, limit=limit, offset=offset)
    items = [RoundSummaryOut.model_validate(process.mark(r)) for r in page.items]
    return PageOut[RoundSummaryOut](total=page.total, limit=limit, offset=offset, items=items)


@router.get("/projects/{project_id}/annotators", response_model=list[AnnotatorOut], responses={404: {"model": ErrorOut}},
            summary="Per annotator: images answered, skipped, answers the newest completed round took in, agreement where others answered too")
def annotators(project_id: RowId, session: SessionDep, _scope: ReadScope) -> list[AnnotatorOut]:
    _require_project(session, project_id)
    return [AnnotatorOut.model_validate(row) for row in reports.annotator_activity(session, project_id=project_id)]


@router.get("/projects/{project_id}/progress", response_model=ProgressOut, responses={404: {"model": ErrorOut}})
def progress(project_id: RowId, session: SessionDep, cache: ResponseCacheDep, process: ProjectProcessDep, _scope: ReadScope) -> Response:
    # Dashboards poll this; with many rounds building it costs far more than checking whether anything changed.
    # A killed round changes no row: whether its process lives is part of the version.
    alive = process.alive() if reports.has_running_round(session, project_id=project_id) else None
    version = (reports.progress_fingerprint(session, project_id=project_id), alive)
    body = cache.get(("progress", project_id), version)
    if body is None:
        series = reports.progress_series(session, project_id=project_id)
        if series is None:
            raise HTTPException(404, detail=f"no project {project_id} in this store")
        series = dataclasses.replace(series, rounds=[process.mark(r) for r in series.rounds])
        body = ProgressOut.model_validate(series).model_dump_json().encode()
        cache.put(("progress", project_id), version, body)
    return Response(content=body, media_type="application/json")


EXPORT_MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson"}


class _ExportFileResponse(FileResponse):
    """An export written for this request: sent whole, then removed, however the sending ends. Each request writes
    its export anew (the store may have changed since), so a byte range of an earlier download would splice two
    different files: a Range header is ignored (no Accept-Ranges offered). A background task would not do: Starlette
    skips it when it answers a Range header itself (400/416) or the client goes away, leaving the file behind."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        if "accept-ranges" in self.headers:
            del self.headers["accept-ranges"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(key, value) for key, value in scope["headers"] if key.lower() not in (b"range", b"if-range")]}
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


LEFT_OUT_HEADER = "X-Left-Out"
LEFT_OUT_REASONS_HEADER = "X-Left-Out-Reasons"
_EXPORTING = threading.Lock()  # held while an export is written (sending it is not counted)


@router.get(
    "/projects/{project_id}/export",
    response_class=FileResponse,
    responses={
        200: {"content": {media: {} for media in EXPORT_MEDIA_TYPES.values()},
              "description": "one row per image: path, content hash, split, current label, and the round's decision, probabilities and findings"},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "the round asked for did not complete"},
        429: {"model": ErrorOut, "description": "another export is being written"},
    },
    summary="The images with labels and a round's predictions, as CSV or JSON Lines (?token= accepted, for a download link)",
)
def export_images(
    project_id: RowId, session: SessionDep, _scope: BrowserReadScope, request: Request,
    format: Annotated[Literal["csv", "jsonl"], Query(description="csv (a header row, empty cells for none) or jsonl (one JSON object per line)")] = "csv",  # noqa: A002
    round: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="a completed round's number (default: the latest completed)")] = None,  # noqa: A002
    labeled_only: Annotated[bool, Query(description="only readable images with a label (no ties): a training set. Labeled images whose file "
                                        "changed, went missing or cannot be read since ingest (or a round quarantined) are left out too: the X-Left-Out "
                                        "header counts them, X-Left-Out-Reasons by reason (changed=2, missing=1, quarantined=3)")] = False,
) -> FileResponse:
    project = reports.get_project_or_none(session, project_id)
    if project is None:
        raise HTTPException(404, detail=f"no project {project_id} in this store")
    try:
        source = export.export_source(session, project, round_number=round)
    except LookupError as error:
        raise HTTPException(409 if "not completed" in str(error) else 404, detail=str(error)) from None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", project.name) + (f"-round-{source.round_number}" if source.round_number else "") + f".{format}"
    if request.scope.get(HEAD_ONLY):  # a link checker's HEAD: the headers, without writing the export (review)
        return Response(media_type=EXPORT_MEDIA_TYPES[format], headers={"Content-Disposition": f'attachment; filename="{name}"'})
    # one at a time: 100k images take ~13 s of this server's time, and four at once slowed every dashboard poll to 14 s
    if not _EXPORTING.acquire(blocking=False):
        raise HTTPException(429, detail="another export is being written: try again when it is done", headers={"Retry-After": "15"})
    # written to a temporary file while the session is open (a streamed body would outlive it), sent, then removed
    handle = tempfile.NamedTemporaryFile("w", suffix=f".{format}", newline="", encoding="utf-8", delete=False)
    left_out: Counter = Counter()  # labeled images left out of a labeled_only export, by what their file is now
    try:
        with handle:
            for _ in export.write_records(handle, export.image_records(session, project, source, labeled_only=labeled_only, left_out=left_out),
                                          columns=source.columns(), fmt=format):
                pass
    except BaseException:
        os.unlink(handle.name)
        raise
    finally:
        _EXPORTING.release()
    end_reads(session)  # the file holds what was read: sending it (minutes to a slow client) needs no snapshot
    # the CLI prints what a labeled_only export left out; a download says it in headers (0 and empty: nothing)
    headers = {LEFT_OUT_HEADER: str(sum(left_out.values())),
               LEFT_OUT_REASONS_HEADER: ", ".join(f"{what}={n}" for what, n in sorted(left_out.items()))} if labeled_only else None
    return _ExportFileResponse(handle.name, media_type=EXPORT_MEDIA_TYPES[format], filename=name, headers=headers)
