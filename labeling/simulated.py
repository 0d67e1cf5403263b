"""Annotator backends that need no people: `none` (labels come only from ingest) and `oracle` (answers from a
ground-truth manifest, optionally with injected noise: the simulated annotator of the demo and the benchmarks)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from labeling.base import PullReport, PushReport, TaskRequest, register_backend
from labeling.manifests import read_table
from store.models import Image, LabelEvent, Project, Round, Selection
from store.queries import renamed_classes


@register_backend("none")
class NoAnnotator:
    """Labels come only from `loop ingest`; the selected batch is recorded for people to label elsewhere."""

    name = "none"

    def pull(self, *, session: Session, project: Project, round_id: int | None) -> PullReport:
        return PullReport()

    def push(self, *, session: Session, project: Project, round_id: int, batch: list[TaskRequest],
             open_guesses: Sequence[TaskRequest] = (), settled: Sequence[int] = ()) -> PushReport:
        return PushReport(warnings=["annotator backend 'none': the batch is recorded in the store only"] if batch else [])


def read_ground_truth(manifest: Path) -> dict[str, str]:
    """Resolved path -> label, from a CSV with columns path,label (paths relative to the CSV's folder)."""
    if not manifest.is_file():
        raise FileNotFoundError(f"oracle manifest {manifest} does not exist")
    names, rows = read_table(manifest)  # a spreadsheet's CSV, read as ingest reads it
    if "path" not in names or "label" not in names:  # without labels every ask went unanswered, one warning each (QA)
        raise ValueError(f"oracle manifest {manifest}: the first line must be a header with 'path' and 'label' columns")
    truth: dict[str, str] = {}
    for row in rows:
        path = Path((row.get("path") or "").strip())
        path = path if path.is_absolute() else manifest.parent / path
        if (row.get("label") or "").strip():
            truth[str(path.resolve())] = row["label"].strip()
    return truth


@register_backend("oracle")
class OracleAnnotator:
    """Answers every pushed task from the ground truth at the next pull; with noise_rate > 0 a seeded share of
    answers is a uniformly drawn wrong class (symmetric noise), the same answer for the same image every time."""

    name = "oracle"
    queued_for_people = False  # answers every ask it can at the next pull; one it cannot (no ground truth) waits for nobody

    def __init__(self, *, manifest: str | Path, classes: list[str], noise_rate: float = 0.0, seed: int = 0):
        self.truth = read_ground_truth(Path(manifest).expanduser().resolve())
        self.classes = list(classes)
        self.noise_rate = noise_rate
        self.seed = seed

    def answer(self, image: Image, *, renames: dict[str, str] | None = None) -> str | None:
        """The manifest's class for the image, under its name now (`renames`: old name -> new, store.queries.renamed_classes),
        or with the injected noise a wrong class of the project's; None when the manifest does not name the image."""
        for path in [image.path, *image.duplicate_paths]:
            label = self.truth.get(str(Path(path).resolve()))
            if label is not None:
                break
        else:
            return None
        label = (renames or {}).get(label, label)  # mapped before the noise: a wrong answer is never the right class's new name
        draw = int(hashlib.sha256(f"{self.seed}:{image.sha256}".encode()).hexdigest()[:12], 16) / float(1 << 48)
        if draw < self.noise_rate:
            others = [c for c in self.classes if c != label]
            return others[int(draw / self.noise_rate * len(others)) % len(others)]
        return label

    def pull(self, *, session: Session, project: Project, round_id: int | None) -> PullReport:
        answered = set(session.scalars(select(LabelEvent.external_id).where(LabelEvent.source == "oracle")))
        pending = session.execute(
            select(Selection, Image)
            .join(Round, Round.id == Selection.round_id)
            .join(Image, Image.id == Selection.image_id)
            .where(Round.project_id == project.id, Selection.push_status == "pushed")
            .order_by(Selection.id)
        ).all()
        report = PullReport()
        renames = renamed_classes(project)  # a manifest written before `loop rename-class` names the old class: it means the new one
        for selection, image in pending:
            external_id = f"selection:{selection.id}"
            if external_id in answered:
                continue
            label = self.answer(image, renames=renames)
            if label is None:
                report.warnings.append(f"oracle has no ground truth for {image.path}")
                continue
            if label not in project.classes:  # as Label Studio's answers: an unknown class is never a label
                report.rejected += 1
                report.warnings.append(f"oracle's ground truth says {label!r} for {image.path}, not one of the classes "
                                       f"{', '.join(project.classes)}: not recorded (fix the manifest)")
                continue
            session.add(LabelEvent(image_id=image.id, label=label, source="oracle", annotator="oracle", external_id=external_id, round_id=round_id))
            report.new_label_events += 1
        return report

    def push(self, *, session: Session, project: Project, round_id: int, batch: list[TaskRequest],
             open_guesses: Sequence[TaskRequest] = (), settled: Sequence[int] = (), withdraw: Sequence[int] = ()) -> PushReport:
        # it answers at the next pull whatever is asked: an ask withdrawn (its file quarantined) is simply not answered
        return PushReport(pushed=len(batch), withdrawn_image_ids=set(withdraw))
