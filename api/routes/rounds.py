"""One round: its report, its label-issue queue and its selection."""
from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from api.dependencies import Limit, Offset, ProjectProcessDep, ReadScope, ResponseCacheDep, RowId, SessionDep
from api.schemas import ErrorOut, LabelIssueOut, PageOut, RoundOut, SelectionOut
from store import reports

router = APIRouter(tags=["rounds"], responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}})


def _require_round(session: SessionDep, round_id: int) -> None:
    if reports.get_round_or_none(session, round_id) is None:
        raise HTTPException(404, detail=f"no round {round_id} in this store")


@router.get("/rounds/{round_id}", response_model=RoundOut)
def get_round(round_id: RowId, session: SessionDep, cache: ResponseCacheDep, process: ProjectProcessDep, _scope: ReadScope) -> Response:
    status = reports.round_status(session, round_id)
    if status is None:
        raise HTTPException(404, detail=f"no round {round_id} in this store")
    # Cached only where a store version is nearly free to read (a SQLite file); elsewhere answered afresh. A killed
    # round changes no row: whether its process lives is part of the version.
    file_version = reports.sqlite_file_version(session)
    version = (file_version, process.alive() if status == "running" else None)
    body = cache.get(("round", round_id), version) if file_version is not None else None
    if body is None:
        report = reports.round_report(session, round_id=round_id)
        if report is None:
            raise HTTPException(404, detail=f"no round {round_id} in this store")
        # Shallow: pydantic reads the nested dataclasses by attribute (dataclasses.asdict would deep-copy them first).
        fields = {key: value for key, value in vars(report).items() if key != "summary"}
        body = RoundOut.model_validate({**vars(process.mark(report.summary)), **fields}, from_attributes=True).model_dump_json().encode()
        if file_version is not None:
            cache.put(("round", round_id), version, body)
    return Response(content=body, media_type="application/json")


@router.get("/rounds/{round_id}/label-issues", response_model=PageOut[LabelIssueOut])
def label_issues(
    round_id: RowId,
    session: SessionDep,
    _scope: ReadScope,
    limit: Limit = 50,
    offset: Offset = 0,
    flagged_only: Annotated[bool, Query(description="only the issues the round flagged")] = True,
    kind: Annotated[Literal["label_error", "near_duplicate", "outlier", "all"],
                    Query(description="label_error (the relabel queue) | near_duplicate | outlier | all")] = "label_error",
) -> PageOut[LabelIssueOut]:
    _require_round(session, round_id)
    page = reports.label_issue_queue(session, round_id=round_id, limit=limit, offset=offset, flagged_only=flagged_only,
                                     kind=None if kind == "all" else kind)
    items = [LabelIssueOut.model_validate({**asdict(row), "still_suspect": row.still_suspect, "image_url": f"/images/{row.image_id}"}) for row in page.items]
    return PageOut[LabelIssueOut](total=page.total, limit=limit, offset=offset, items=items)


@router.get("/rounds/{round_id}/selection", response_model=PageOut[SelectionOut])
def selection(round_id: RowId, session: SessionDep, _scope: ReadScope, limit: Limit = 50, offset: Offset = 0) -> PageOut[SelectionOut]:
    _require_round(session, round_id)
    page = reports.round_selection(session, round_id=round_id, limit=limit, offset=offset)
    items = [SelectionOut.model_validate({**asdict(row), "image_url": f"/images/{row.image_id}"}) for row in page.items]
    return PageOut[SelectionOut](total=page.total, limit=limit, offset=offset, items=items)
