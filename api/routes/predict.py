"""POST /predict: class probabilities and the defect decision of the latest completed round's ONNX model.

Writes nothing to the store; each prediction is logged.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from api.dependencies import STORE_ID_MAX, FullScope, SessionDep, SettingsDep, end_reads
from api.schemas import ErrorOut, ImagePredictionOut, PredictOut
from store import reports
from store.artifacts import artifact_file, artifact_places
from store.models import Project, Round
from store.queries import latest_completed_round

logger = logging.getLogger("defect_loop.api.predict")
router = APIRouter(tags=["predict"])
_model_lock = threading.Lock()
DEFAULT_THRESHOLD = 0.5


# Full-size decodes at once, over every request: each may hold a frame of max_upload_pixels (179 MP by default: ~780
# MB) until it is resized, and the server runs 40 requests at once (review: memory, not the CPU, ran out first)
FULL_SIZE_DECODES = threading.BoundedSemaphore(max(1, min(os.cpu_count() or 1, 4)))


class ImageRejected(ValueError):
    """An upload that is not a decodable image."""


class ImageTooLarge(ImageRejected):
    """An upload with more pixels than the server decodes."""


def decode_image(data: bytes, *, filename: str | None, bit_depth: int | None = None, image_size: int | None = None,
                 max_pixels: int | None = None) -> PILImage.Image:
    """The upload as the model's paths decode an image (modeling.preprocessing: EXIF orientation, 16-bit and float
    pixels scaled to 8 bits, by the camera's bits when set); resized to image_size x image_size at once when given, as
    image_to_array would, so a request holds one full-size image at a time, not all of them."""
    from modeling.png_check import png_rows_missing
    from modeling.preprocessing import DECODED_FORMATS, MIN_IMAGE_SIDE, to_rgb  # numpy and PIL only

    name = filename or "upload"
    if not data:
        raise ImageRejected(f"{name!r} is empty")
    try:
        with PILImage.open(io.BytesIO(data), formats=DECODED_FORMATS) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"{name!r} has {width}x{height} pixels; at most {max_pixels} are decoded (resize it first)")
            if min(width, height) < MIN_IMAGE_SIDE:
                raise ImageRejected(f"{name!r} is {width}x{height} pixels: too small to be a photo of a part (at least "
                                    f"{MIN_IMAGE_SIDE} a side; ingest quarantines such files)")
            missing = png_rows_missing(io.BytesIO(data)) if opened.format == "PNG" else None
            if missing:  # Pillow would decode it, the missing rows black (review: 92 bytes cost 4.5 s and 780 MB)
                raise ImageRejected(f"{name!r} is incomplete: {missing}")
            opened.load()  # decode fully now: a file cut short fails here, with its reason
            shown = to_rgb(opened, bit_depth=bit_depth)
            return shown if image_size is None else shown.resize((image_size, image_size), PILImage.BILINEAR)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(f"{name!r} is not an image PIL can read as {', '.join(DECODED_FORMATS)} (the formats ingest takes)") from None
    except PILImage.DecompressionBombError as exc:  # over PIL's own guard, whatever max_pixels says: ingest quarantines these too
        raise ImageTooLarge(f"{name!r} has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"{name!r} could not be decoded: {exc}") from None


def decide(
    probabilities: np.ndarray, *, class_names: list[str], negative_class: str | None, threshold: float | None
) -> list[tuple[str, float | None, bool | None]]:
    """(label, P(defect), is defect) per row: P(defect) = 1 - P(negative) >= threshold -> most probable defect class,
    else the negative class; without a negative class, the most probable class."""
    decisions: list[tuple[str, float | None, bool | None]] = []
    if negative_class is None or negative_class not in class_names:
        for row in probabilities:
            decisions.append((class_names[int(np.argmax(row))], None, None))
        return decisions
    negative = class_names.index(negative_class)
    defect_columns = [i for i in range(len(class_names)) if i != negative]
    cut = DEFAULT_THRESHOLD if threshold is None else threshold
    for row in probabilities:
        p_defect = float(1.0 - row[negative])
        if defect_columns and p_defect >= cut:
            best = max(defect_columns, key=lambda i: row[i])
            decisions.append((class_names[best], p_defect, True))
        else:
            decisions.append((negative_class, p_defect, False))
    return decisions


def _unusable(message: str) -> HTTPException:
    return HTTPException(503, detail=f"the latest completed round's model cannot be used: {message}")


def _model_path(round_: Round, project: Project, project_dir: Path, store_url: str) -> Path:
    raw = (round_.artifacts or {}).get("model_onnx")
    if not raw:
        raise HTTPException(409, detail=f"round {round_.number} recorded no ONNX model (artifacts.model_onnx)")
    where = {"round_number": round_.number, "recorded_root": project.root_dir, "project_dir": project_dir}
    path = artifact_file(str(raw), **where, store_url=store_url)
    if path is None:  # never a recorded place in a folder of another store: a moved project's old folder may hold another's
        raise _unusable(f"model file {Path(str(raw)).name!r} is missing from {artifact_places(str(raw), **where)[0].parent}")
    return path


def _preprocessing(details: dict[str, Any]) -> tuple[int, list[float], list[float], int | None]:
    """(image size, mean, std, the camera's bits or None) the round's model was made with."""
    from modeling.preprocessing import CAMERA_BIT_DEPTHS  # numpy and PIL only

    raw = details.get("preprocessing")
    try:
        image_size = int(raw["image_size"])
        mean = [float(v) for v in raw["mean"]]
        std = [float(v) for v in raw["std"]]
        bit_depth = raw.get("bit_depth")  # absent from rounds made before the setting
        bit_depth = None if bit_depth is None else int(bit_depth)
    except (TypeError, KeyError, ValueError, AttributeError):
        raise _unusable("details.preprocessing must be {image_size, mean[3], std[3], bit_depth}") from None
    if image_size <= 0 or len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std) or (bit_depth is not None and bit_depth not in CAMERA_BIT_DEPTHS):
        raise _unusable("details.preprocessing must be {image_size > 0, mean[3], std[3] > 0, bit_depth 8..16 or null}")
    return image_size, mean, std, bit_depth


def _classifier(request: Request, path: Path, image_size: int, mean: list[float], std: list[float], bit_depth: int | None) -> Any:
    """One loaded ONNX session per model file (reloaded when the file changes)."""
    try:
        from modeling.inference import OnnxClassifier  # the core's inference engine; imported only when predicting
    except ImportError as exc:
        raise HTTPException(503, detail=f"inference is not available in this install: {exc}") from None
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, image_size, tuple(mean), tuple(std), bit_depth)
    cache: dict[tuple, Any] = request.app.state.model_cache
    with _model_lock:
        if key not in cache:
            cache.clear()  # only the latest round's model is ever served
            try:
                cache[key] = OnnxClassifier(str(path), image_size=image_size, mean=mean, std=std, bit_depth=bit_depth)
            except Exception as exc:  # noqa: BLE001 - a broken file must be a clear 503, not a crash
                raise _unusable(f"loading {path.name!r} failed: {exc}") from None
        return cache[key]


@router.post(
    "/predict",
    response_model=PredictOut,
    responses={
        401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "no completed round with a model yet"},
        413: {"model": ErrorOut, "description": "too large or too many files"},
        422: {"model": ErrorOut, "description": "a file is not a decodable image (the reason is given), or the request is malformed"},
        503: {"model": ErrorOut, "description": "the round's model cannot be loaded"},
    },
    summary="Class probabilities and the defect decision for one or more uploaded images (full-access token)",
)
def predict(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _scope: FullScope,
    files: Annotated[list[UploadFile], File(min_length=1, description="one or more image files (multipart field `files`)")],
    project_id: Annotated[int | None, Query(ge=1, le=STORE_ID_MAX, description="default: the store's first project")] = None,
) -> PredictOut:
    if len(files) > settings.max_upload_files:
        raise HTTPException(413, detail=f"{len(files)} files sent; at most {settings.max_upload_files} per request")
    uploads: list[bytes] = []
    for upload in files:
        data = upload.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, detail=f"{upload.filename!r} is larger than the upload limit of {settings.max_upload_bytes} bytes")
        uploads.append(data)

    project = reports.get_project_or_none(session, project_id) if project_id is not None else reports.default_project(session)
    if project is None:
        raise HTTPException(404, detail="no such project in this store" if project_id is not None else "no project in this store yet")
    round_ = latest_completed_round(session, project.id)
    if round_ is None:
        raise HTTPException(409, detail="no completed round yet: run `loop round` first")
    details = round_.details or {}
    # served whatever its gates said (the newest model): the answer says so, for a caller that wants only passing ones
    applicable = [gate for gate in round_.gates if gate.applicable]
    failed_gates = [gate.name for gate in applicable if not gate.passed]
    unsettled_gates = reports.unsettled_gates_of(details, applicable)
    class_names = details.get("class_names") or list(project.classes or [])
    if not isinstance(class_names, list) or not class_names:
        raise _unusable("details.class_names is missing")
    class_names = [str(name) for name in class_names]
    image_size, mean, std, bit_depth = _preprocessing(details)
    end_reads(session)  # decoding and inference need the store no more
    images: list[PILImage.Image] = []
    for upload, data in zip(files, uploads):  # decoded as the round's model decoded its images (the camera's bits)
        try:
            with FULL_SIZE_DECODES:
                images.append(decode_image(data, filename=upload.filename, bit_depth=bit_depth, image_size=image_size,
                                           max_pixels=settings.max_upload_pixels))
        except ImageTooLarge as exc:
            raise HTTPException(413, detail=str(exc)) from None
        except ImageRejected as exc:
            raise HTTPException(422, detail=str(exc)) from None
    classifier = _classifier(request, _model_path(round_, project, settings.project_dir, settings.store_url), image_size, mean, std, bit_depth)
    try:
        probabilities = np.asarray(classifier.predict_proba(images), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise _unusable(f"inference failed: {exc}") from None
    if probabilities.shape != (len(images), len(class_names)):
        raise _unusable(f"model output has shape {probabilities.shape}, expected ({len(images)}, {len(class_names)})")
    negative_class = details.get("negative_class", project.negative_class)
    threshold = details.get("threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    decisions = decide(probabilities, class_names=class_names, negative_class=negative_class, threshold=threshold)
    predictions = []
    for upload, row, (label, p_defect, is_defect) in zip(files, probabilities, decisions):
        logger.info("predict project=%s round=%s file=%r label=%s p_defect=%s", project.id, round_.number, upload.filename, label,
                    "na" if p_defect is None else f"{p_defect:.4f}")
        predictions.append(ImagePredictionOut(
            filename=upload.filename,
            probabilities={name: float(p) for name, p in zip(class_names, row)},
            p_defect=p_defect,
            predicted_label=label,
            is_defect=is_defect,
        ))
    return PredictOut(
        project_id=project.id, round_id=round_.id, round_number=round_.number, threshold=threshold,
        all_gates_passed=not failed_gates if applicable else None, failed_gates=failed_gates, unsettled_gates=unsettled_gates,
        negative_class=negative_class if negative_class in class_names else None, class_names=class_names, predictions=predictions,
    )
