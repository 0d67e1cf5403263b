"""Images, served only from the store's own rows: the path is looked up by id, never taken from the request."""
from __future__ import annotations

import hashlib
import io
import mimetypes
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api.dependencies import BrowserReadScope, RowId, SessionDep
from api.schemas import ErrorOut
from modeling.preprocessing import CAMERA_BIT_DEPTHS, decode_key
from store.models import Image
from store.queries import latest_completed_round

router = APIRouter(tags=["images"])


@router.get(
    "/images/{image_id}",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "the image file, byte for byte (view=display: a PNG where browsers could not show it as the model sees it)"},
        401: {"model": ErrorOut},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "the file on disk no longer matches the store (moved or changed)"},
    },
    summary="An image of the store by id (?token= accepted, for <img> tags)",
)
def get_image(image_id: RowId, session: SessionDep, _scope: BrowserReadScope, request: Request,
              view: Annotated[Literal["file", "display"], Query(
                  description="file: the bytes as stored; display: a PNG of what the model sees when a browser could not show "
                              "the file as that (TIFF, 16-bit or float pixels), else the file")] = "file") -> Response:
    image = session.get(Image, image_id)
    if image is None:
        raise HTTPException(404, detail=f"no image {image_id} in this store")
    path = Path(image.path)
    try:
        if not path.is_file():  # a FIFO or device put in its place would block the worker for ever
            raise OSError
        data = path.read_bytes()
    except OSError:
        raise HTTPException(404, detail=f"image {image_id} is in the store but its file is missing") from None
    # A changed file is detected, never silently served as the image the store describes.
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise HTTPException(409, detail=f"image {image_id} changed on disk since ingest (content hash differs)")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not media_type.startswith("image/"):
        media_type = "application/octet-stream"
    bit_depth = _camera_bits(session, image.project_id) if view == "display" else None
    # the content hash names the bytes; the display view also depends on the decoding (its version and the camera's bits)
    etag = f'"{image.sha256}"' if view == "file" else f'"{image.sha256}-{decode_key(bit_depth)}"'
    headers = {"Cache-Control": "private, max-age=300", "ETag": etag}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)  # the dashboard's thumbnails, shown again: nothing re-sent
    if view == "display":
        shown = _for_browsers(data, bit_depth=bit_depth)
        if shown is not None:
            data, media_type = shown, "image/png"
    return Response(content=data, media_type=media_type, headers=headers)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match holds `*` or a list of entity tags, weak (W/) ones compared as strong: one must be this one exactly
    (a substring test matched `xx"<sha>"xx`, QA)."""
    tags = [tag.strip() for tag in (if_none_match or "").split(",")]
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


# view=display answers at most this many pixels a side (the dashboard shows thumbnails) and converts at most this many
# pixels (a 9000x9000 float TIFF took 1 GB and 5 s a request): beyond, the file as it is
DISPLAY_SIDE = 1024
DISPLAY_MAX_PIXELS = 40_000_000


def _camera_bits(session: Session, project_id: int) -> int | None:
    """The camera's bits the project's latest model decoded its images with (None: the per-frame rule, or no round yet)."""
    round_ = latest_completed_round(session, project_id)
    preprocessing = (round_.details or {}).get("preprocessing") if round_ is not None else None
    bit_depth = preprocessing.get("bit_depth") if isinstance(preprocessing, dict) else None
    return bit_depth if type(bit_depth) is int and bit_depth in CAMERA_BIT_DEPTHS else None


def _for_browsers(data: bytes, *, bit_depth: int | None = None) -> bytes | None:
    """A PNG of the picture the model sees (modeling.preprocessing.to_rgb), at most DISPLAY_SIDE a side, when browsers
    would show the file otherwise or not at all: TIFF (no browser shows it), 16-bit and float pixels (shown dark, or
    not). None: the file shows as is (browsers apply the EXIF orientation themselves), or is too large to convert."""
    from PIL import Image as PILImage

    from modeling.preprocessing import pixel_depth, to_rgb

    try:
        with PILImage.open(io.BytesIO(data)) as image:
            if image.width * image.height > DISPLAY_MAX_PIXELS:
                return None
            if image.format != "TIFF" and pixel_depth(image) is None:
                return None
            shown = to_rgb(image, bit_depth=bit_depth)
            shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
            buffer = io.BytesIO()
            shown.save(buffer, format="PNG")
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 - damaged (OSError, SyntaxError), a pixel bomb: the file as it is, the browser says what it can
        return None
