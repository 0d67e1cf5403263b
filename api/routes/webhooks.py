"""Label Studio's webhook: checked against its own shared secret, then recorded as label events at once."""
from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder

from api.dependencies import STORE_ID_MAX, SettingsDep
from api.schemas import ErrorOut, WebhookOut
from store import reports
from store.db import session_scope

logger = logging.getLogger("defect_loop.api.webhooks")
router = APIRouter(tags=["webhooks"])
SECRET_HEADER = "X-Loop-Webhook-Secret"
# What Label Studio sends (documentation only: the Label Studio backend validates the payload and says why it refuses one).
WEBHOOK_PAYLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["action", "project"],
    "properties": {
        "action": {"type": "string", "enum": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]},
        "project": {"type": "object", "description": "the Label Studio project (its id)"},
        "task": {"type": "object"},
        "annotation": {"type": "object", "description": "ANNOTATION_CREATED / ANNOTATION_UPDATED"},
        "annotations": {"type": "array", "items": {"type": "object"}, "description": "ANNOTATIONS_DELETED"},
    },
    "additionalProperties": True,
}


def require_webhook_secret(
    settings: SettingsDep,
    secret: Annotated[str | None, Header(alias=SECRET_HEADER, description="LOOP_LABELSTUDIO_WEBHOOK_SECRET")] = None,
) -> None:
    # A dependency, so a request without the secret is refused before its body is even validated.
    if not secret:
        raise HTTPException(401, detail=f"missing {SECRET_HEADER} header")
    expected = settings.labelstudio_webhook_secret
    if expected is None:
        raise HTTPException(403, detail="the Label Studio webhook is disabled: LOOP_LABELSTUDIO_WEBHOOK_SECRET is not set")
    if not hmac.compare_digest(secret.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, detail=f"wrong {SECRET_HEADER}")


@router.post(
    "/webhooks/labelstudio",
    response_model=WebhookOut,
    dependencies=[Depends(require_webhook_secret)],
    responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
               422: {"model": ErrorOut, "description": "the payload is not a Label Studio annotation event we can record"},
               503: {"model": ErrorOut}},
    summary="Label Studio ANNOTATION_CREATED / UPDATED / DELETED events (shared-secret header, not the API tokens)",
    # The body is parsed by hand, after the secret check: FastAPI would validate a declared body before any dependency.
    openapi_extra={"requestBody": {"required": True, "description": "Label Studio's webhook payload: action, annotation, project, task",
                                   "content": {"application/json": {"schema": WEBHOOK_PAYLOAD_SCHEMA}}}},
)
async def labelstudio_webhook(
    request: Request,
    project_id: Annotated[int | None, Query(ge=1, le=STORE_ID_MAX, description="default: the store's first project")] = None,
) -> WebhookOut:
    try:
        payload = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise HTTPException(422, detail="the body is not valid JSON (or nested too deeply)") from None
    if not isinstance(payload, dict):
        raise HTTPException(422, detail="the body must be a JSON object (Label Studio's webhook payload)")
    return await run_in_threadpool(_record, request, payload, project_id)


def _record(request: Request, payload: dict[str, Any], project_id: int | None) -> WebhookOut:
    try:
        from labeling.labelstudio_backend import record_webhook_event  # the Label Studio backend's parser and recorder
    except ImportError as exc:
        raise HTTPException(503, detail=f"the Label Studio backend is not available in this install: {exc}") from None
    with session_scope(request.app.state.engine) as session:
        project = reports.get_project_or_none(session, project_id) if project_id is not None else reports.default_project(session)
        if project is None:
            raise HTTPException(404, detail="no such project in this store" if project_id is not None else "no project in this store yet")
        try:
            result = record_webhook_event(session=session, project=project, payload=payload)
        except ValueError as exc:
            # session_scope rolls back: a rejected payload leaves the store as it was.
            raise HTTPException(422, detail=f"payload rejected: {exc}") from None
    logger.info("labelstudio webhook action=%s recorded", payload.get("action"))
    try:
        encoded = jsonable_encoder(result)
    except (TypeError, ValueError):
        encoded = str(result)
    return WebhookOut(status="recorded", result=encoded)
