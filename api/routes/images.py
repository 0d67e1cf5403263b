"""Images, served only from the store's own rows: the path is looked up by id, never taken from the request."""
from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from api.dependencies import BrowserReadScope, RowId, SessionDep
from api.schemas import ErrorOut
from store.models import Image

router = APIRouter(tags=["images"])


@router.get(
    "/images/{image_id}",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "the image file, byte for byte"},
        401: {"model": ErrorOut},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "the file on disk no longer matches the store (moved or changed)"},
    },
    summary="An image of the store by id (?token= accepted, for <img> tags)",
)
def get_image(image_id: RowId, session: SessionDep, _scope: BrowserReadScope) -> Response:
    image = session.get(Image, image_id)
    if image is None:
        raise HTTPException(404, detail=f"no image {image_id} in this store")
    path = Path(image.path)
    try:
        data = path.read_bytes()
    except OSError:
        raise HTTPException(404, detail=f"image {image_id} is in the store but its file is missing") from None
    # A changed file is detected, never silently served as the image the store describes.
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise HTTPException(409, detail=f"image {image_id} changed on disk since ingest (content hash differs)")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not media_type.startswith("image/"):
        media_type = "application/octet-stream"
    return Response(content=data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})
