"""The project's images as records to take elsewhere: one per image with its file, split, current label (the rule of
`queries.resolve_label`), and what one completed round said about it (the deployed model's decision and
probabilities, a suspected label error, a near-duplicate, an outlier). Read-only, like `store.reports`.

`loop export` writes them as CSV or JSON Lines; an engineer trains another model on the labeled rows, audits the
suspects, or joins the predictions to other data by path or content hash.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.artifacts import artifact_shown
from store.models import Image, LabelIssue, Prediction, Project, Round
from store.queries import current_labels, renamed_classes

# the fixed columns, in order; one "p_<class>" column per class of the project follows "p_defect"
RECORD_COLUMNS = (
    "image_id", "path", "sha256", "split", "status", "status_reason", "part", "width", "height",
    "label", "label_status", "label_source", "votes", "agreement",
    "predicted_label", "p_defect",
)
ISSUE_COLUMNS = ("suspected_label_error", "suspected_label", "suggested_label", "label_quality", "near_duplicate_of", "outlier")
# last: what the file at `path` holds now (file_on_disk), so the columns before keep their places; then the ingest that
# brought the image (QA had to guess batches from the paths; the gates per batch group small ingests: their ingest_batch_ids)
FILE_COLUMNS = ("file_on_disk", "ingest_batch_id")
FILE_UNCHANGED = "unchanged"
# a cell a spreadsheet would run as a formula (a manifest's part "=HYPERLINK(...)"): written with a leading quote in CSV
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
EXPORT_FORMATS = ("csv", "jsonl")


@dataclass(frozen=True)
class ExportSource:
    """The round whose predictions and findings the records carry (None: no completed round yet)."""
    round_number: int | None
    threshold: float | None
    model_onnx: str | None
    classes: list[str]

    def columns(self) -> list[str]:
        return [*RECORD_COLUMNS, *(f"p_{name}" for name in self.classes), *ISSUE_COLUMNS, *FILE_COLUMNS]


def export_source(session: Session, project: Project, *, round_number: int | None = None, project_dir: Path | None = None,
                  store_url: str | None = None) -> ExportSource:
    """The latest completed round, or round `round_number` (LookupError unless it exists and completed: a failed or
    running round's predictions are partial or none). Its model file is named as it is in `project_dir` when given."""
    query = select(Round).where(Round.project_id == project.id, Round.status == "completed")
    if round_number is not None:
        chosen = session.scalars(select(Round).where(Round.project_id == project.id, Round.number == round_number)).first()
        if chosen is None:
            raise LookupError(f"project {project.name!r} has no round {round_number}")
        if chosen.status != "completed":
            raise LookupError(f"round {round_number} is {chosen.status}, not completed: its predictions are partial or none")
    else:
        chosen = session.scalars(query.order_by(Round.number.desc())).first()
    if chosen is None:
        return ExportSource(None, None, None, list(project.classes or []))
    details = chosen.details or {}
    threshold = details.get("threshold")
    # the classes the round's model knew: its probabilities are named by them (loop.toml may have changed since)
    classes = [str(c) for c in details.get("class_names") or project.classes or []]
    renames = renamed_classes(project)  # under their names now, a merge once (image_records adds their probabilities up)
    classes = list(dict.fromkeys(renames.get(name, name) for name in classes))
    model = (chosen.artifacts or {}).get("model_onnx")
    if model is not None and project_dir is not None:  # the recorded path names the folder the round ran in (moved or copied since?)
        model = artifact_shown(str(model), round_number=chosen.number, recorded_root=project.root_dir, project_dir=project_dir, store_url=store_url)
    deleted = details.get("model_files_deleted") or {}
    if model is None and "model.onnx" in (deleted.get("files") or []):  # said, not "none deployed": it was, and is gone
        model = f"model.onnx deleted by {deleted.get('by')} at {deleted.get('at')}"
    elif model is not None and project_dir is not None and not Path(model).is_file():  # QA: named as if it were there
        model = f"{model} (not there any more: deleted by hand, or the project moved without it)"
    return ExportSource(chosen.number, float(threshold) if isinstance(threshold, (int, float)) else None, model, classes)


def file_on_disk(image: Image) -> str:
    """What the file at the image's path holds now, against what the store recorded: "unchanged" (its size and time
    as recorded, or its bytes' hash), "changed", "missing" or "unreadable". The next round quarantines a changed or
    missing file; an export taken before it must not hand it out as the labeled image."""
    path = Path(image.path)
    try:
        stat = path.stat()
        if S_ISDIR(stat.st_mode):  # a folder in its place: gone, as the round says
            return "missing"
        if not S_ISREG(stat.st_mode):  # a FIFO or a device in its place: open() would wait forever (QA: the export hung, holding its lock)
            return "unreadable"
        if (stat.st_size, stat.st_mtime_ns) == (image.size_bytes, image.mtime_ns):
            return FILE_UNCHANGED
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "unreadable"
    return FILE_UNCHANGED if digest.hexdigest() == image.sha256 else "changed"


def image_records(session: Session, project: Project, source: ExportSource, *, labeled_only: bool = False,
                  left_out: Counter | None = None) -> Iterator[dict[str, Any]]:
    """One dict per image of the project (keys: source.columns()), by image id. Images replaced by a new file at their
    path are left out (they are no longer the project's data); quarantined ones are kept with their status.
    labeled_only: readable images with a label (no ties, nothing quarantined, the file as ingested: file_on_disk),
    the frozen test split included (its `split` says so: keep it out of training); `left_out` counts the labeled
    ones left out because their file changed or went since ingest (by file_on_disk, or "quarantined" once a round
    found it). The round's findings: suspected_label_error is None for images the round did not judge (ingested
    since; label errors: the test split), and True only while the label is still the one it suspected
    (suspected_label); outlier is None for images ingested since."""
    labels = current_labels(session, project.id)
    round_id = None
    if source.round_number is not None:
        round_id = session.scalar(select(Round.id).where(Round.project_id == project.id, Round.number == source.round_number))
    predictions: dict[int, tuple[str, float | None, dict]] = {}
    issues: dict[int, dict[str, Any]] = defaultdict(dict)
    checked_outliers = False
    if round_id is not None:
        # plain rows, not ORM objects: 100k predictions as objects were most of the export's memory
        # a class renamed since (loop rename-class) under its name now: its label and suspects are (QA: predicted_label
        # "fray" beside label "frayed" counted as an error, p_frayed empty); a merge adds its probabilities up
        renames = renamed_classes(project)

        def renamed(probabilities: dict | None) -> dict:
            merged: dict[str, float] = {}
            for name, value in (probabilities or {}).items():
                new_name = renames.get(name, name)
                merged[new_name] = merged.get(new_name, 0.0) + value if isinstance(value, (int, float)) else value
            return merged

        negative = project.negative_class

        def p_defect_now(p_defect: float | None, probabilities: dict) -> float | None:
            # QA: after `rename-class uneven free --flip-defect`, p_free held p_uneven too while P(defect) still counted
            # it as a defect (0.89 beside p_free 0.69): P(defect) is what the classes now call defects. The round stored
            # 1 - p_negative, so a plain rename (or a merge of two defect classes) changes nothing here.
            good = probabilities.get(negative) if negative else None
            if p_defect is None or not isinstance(good, (int, float)) or abs((1.0 - p_defect) - good) <= 1e-6:
                return p_defect
            return max(0.0, 1.0 - float(good))

        predictions = {}
        for image_id, label, p_defect, probabilities in session.execute(
                select(Prediction.image_id, Prediction.predicted_label, Prediction.p_defect, Prediction.probabilities).where(Prediction.round_id == round_id)):
            if renames:
                probabilities = renamed(probabilities)
                p_defect = p_defect_now(p_defect, probabilities)
            predictions[image_id] = (renames.get(label, label), p_defect, probabilities)
        paths = dict(session.execute(select(Image.id, Image.path).where(Image.project_id == project.id)).all())
        for issue in session.scalars(select(LabelIssue).where(LabelIssue.round_id == round_id, LabelIssue.flagged.is_(True))):
            found = issues[issue.image_id]
            if issue.kind == "label_error":
                found.update(suspected_label=issue.given_label, suggested_label=issue.suggested_label, label_quality=issue.score)
            elif issue.kind == "near_duplicate":
                found["near_duplicate_of"] = paths.get(issue.related_image_id)
            elif issue.kind == "outlier":
                found["outlier"] = True
        # rounds made before outliers were looked for have no data-quality record: not checked, not "no outlier" (QA)
        checked_outliers = (isinstance((session.get(Round, round_id).details or {}).get("data_quality"), dict)
                            or any(found.get("outlier") for found in issues.values()))
    query = select(Image).where(Image.project_id == project.id, Image.status != "replaced").order_by(Image.id)
    for image in session.scalars(query.execution_options(yield_per=2000)):
        label = labels.get(image.id)
        if labeled_only and (image.status != "ok" or label is None or label.status != "labeled"):
            if left_out is not None and image.status == "quarantined" and label is not None and label.status == "labeled":
                left_out["quarantined"] += 1  # a round found its file changed, missing or unreadable (a review: not counted)
            continue
        on_disk = file_on_disk(image)
        if labeled_only and on_disk != FILE_UNCHANGED:
            if left_out is not None:
                left_out[on_disk] += 1
            continue
        prediction = predictions.get(image.id)
        probabilities = (prediction[2] or {}) if prediction is not None else {}
        found = issues.get(image.id, {})
        # judged by the round: images it predicted or flagged (not those ingested since); label errors outside the test split
        in_round = prediction is not None or bool(found)
        current = label.label if label is not None else None
        if found.get("suspected_label") is not None:  # the suspicion holds while the label is still the one suspected (and
            # not the one suggested: a class merged into the suggested one since answers it)
            suspected: bool | None = found["suspected_label"] == current and found.get("suggested_label") != current
        else:
            suspected = False if in_round and image.split != "test" else None
        yield {
            "image_id": image.id, "path": image.path, "sha256": image.sha256, "split": image.split, "status": image.status,
            "status_reason": image.status_reason, "part": image.part, "width": image.width, "height": image.height,
            "label": label.label if label is not None else None,
            "label_status": label.status if label is not None else "unlabeled",
            "label_source": label.source if label is not None else None,
            "votes": label.n_votes if label is not None else 0,
            "agreement": label.agreement if label is not None else None,
            "predicted_label": prediction[0] if prediction is not None else None,
            "p_defect": prediction[1] if prediction is not None else None,
            **{f"p_{name}": probabilities.get(name) for name in source.classes},
            "suspected_label_error": suspected,
            "suspected_label": found.get("suspected_label"),
            "suggested_label": found.get("suggested_label"),
            "label_quality": found.get("label_quality"),
            "near_duplicate_of": found.get("near_duplicate_of"),
            "outlier": bool(found.get("outlier", False)) if in_round and checked_outliers else None,
            "file_on_disk": on_disk,
            "ingest_batch_id": image.ingest_batch_id,
        }


def write_records(handle: TextIO, records: Iterable[dict[str, Any]], *, columns: list[str], fmt: str) -> Iterator[dict[str, Any]]:
    """Write each record to `handle` as a CSV row (a header first; empty for none, every digit of a float, a text a
    spreadsheet would run as a formula after a quote) or a JSON line (null for none, text as it is), yielding it once
    written (for counting)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: {' or '.join(EXPORT_FORMATS)}")
    writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    for record in records:
        if writer is not None:
            writer.writerow({key: _csv_value(value) for key, value in record.items()})
        else:
            handle.write(json.dumps({key: _json_value(value) for key, value in record.items()}, ensure_ascii=False) + "\n")
        yield record


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return repr(value) if isinstance(value, float) else value


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
