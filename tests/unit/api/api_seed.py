"""A small store seeded by hand through the SQLAlchemy models, with values the API tests check exactly.

Project "line-a" (classes good / scratch / spot, negative good), 12 images, and four rounds:
  R1 completed: 8 imported labels + 2 oracle labels pulled in R1; all gates but latency fail; malformed confusion matrix.
  R2 completed: annotators relabel image 5 (scratch -> spot), label image 11, and tie on image 12; all gates pass;
     one gate not applicable; confusion matrix, threshold 0.4, tiny ONNX model.
  R3 failed before finishing (no metrics).
  R4 running: a third annotator breaks image 12's tie (spot).
Project "empty-line": no rounds, no images.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image as PILImage

from api.sample_data import write_tiny_onnx_classifier
from api.settings import Settings
from store.db import create_db_engine, session_scope, upgrade_schema
from store.models import GateResult, Image, IngestBatch, LabelEvent, LabelIssue, Metric, Prediction, Project, Round, Selection

FULL_TOKEN = "full-secret-token"
READ_TOKEN = "read-secret-token"
WEBHOOK_SECRET = "hook-secret"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CLASSES = ["good", "scratch", "spot"]
IMAGE_COLORS = {"good": (128, 128, 128), "scratch": (220, 40, 40), "spot": (40, 200, 40)}


@dataclass(frozen=True)
class SeededStore:
    project_dir: Path
    url: str
    project_id: int
    empty_project_id: int
    round_ids: dict[int, int]  # round number -> id
    image_ids: list[int]  # image k (1-based) is image_ids[k - 1]
    model_path: Path


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _epoch(epoch: int, train_loss: float, train_accuracy: float, val_loss: float, val_accuracy: float) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy, "val_loss": val_loss, "val_accuracy": val_accuracy,
            "val_macro_f1": val_accuracy - 0.05, "seconds": 1.5}


def seed(session, project_dir: Path) -> SeededStore:  # noqa: ANN001
    project = Project(name="line-a", root_dir=str(project_dir), classes=CLASSES, negative_class="good", created_at=T0)
    empty = Project(name="empty-line", root_dir=str(project_dir / "empty"), classes=["ok", "bad"], negative_class="ok", created_at=T0)
    session.add_all([project, empty])
    session.flush()
    batch = IngestBatch(project_id=project.id, source=str(project_dir / "images"), layout="folders", created_at=T0, n_files=12, n_new_images=12)
    session.add(batch)
    session.flush()

    truth = ["good"] * 4 + ["scratch"] * 2 + ["spot"] * 2 + ["scratch", "spot", "good", "spot"]
    images = []
    (project_dir / "images").mkdir(parents=True)
    for k, label in enumerate(truth, start=1):
        data = png_bytes(IMAGE_COLORS[label], size=8 + k)  # size differs: every file has its own hash
        path = project_dir / "images" / f"img{k:02d}.png"
        path.write_bytes(data)
        images.append(Image(project_id=project.id, sha256=hashlib.sha256(data).hexdigest(), path=str(path), size_bytes=len(data),
                            width=8 + k, height=8 + k, split="test" if k in (1, 5) else ("train" if k <= 8 else "pool"),
                            ingest_batch_id=batch.id, created_at=T0))
    session.add_all(images)
    session.flush()
    ids = [image.id for image in images]

    def image(k: int) -> int:
        return ids[k - 1]

    for k in range(1, 9):
        session.add(LabelEvent(image_id=image(k), label=truth[k - 1], source="import", created_at=T0))

    model_path = write_tiny_onnx_classifier(project_dir / "models" / "round2.onnx", n_classes=3)
    r1 = Round(project_id=project.id, number=1, status="completed", started_at=T0 + timedelta(hours=1),
               finished_at=T0 + timedelta(hours=1, minutes=5), step_timings_s={"pull": 0.25, "train": 2.0},
               artifacts={"model_onnx": "models/round1.onnx"},
               details={"confusion_matrix": {"labels": ["good"], "matrix": [[1, 2]]}, "threshold": 0.5, "class_names": CLASSES})
    r2 = Round(project_id=project.id, number=2, status="completed", started_at=T0 + timedelta(hours=2),
               finished_at=T0 + timedelta(hours=2, minutes=5), step_timings_s={"pull": 0.5, "embed": 12.25, "train": 3.0},
               artifacts={"model_onnx": str(model_path), "confusion_matrix_png": str(project_dir / "cm.png")},
               details={"confusion_matrix": {"labels": CLASSES, "matrix": [[9, 1, 0], [0, 4, 1], [1, 0, 4]]}, "threshold": 0.4,
                        "class_names": CLASSES, "negative_class": "good",
                        "preprocessing": {"image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
                        "test_intervals": {"negative_fpr": {"value": 0.02, "low": 0.004, "high": 0.09, "settled": False}},
                        # 2 test images have a labeled near-copy in train: the gates without them are worse
                        "data_quality": {"near_duplicates": {"test_images_with_a_copy_outside_test": 2},
                                         "test_without_copies": {"n_images": 18, "n_excluded": 2, "macro_f1": 0.74, "defect_recall": 0.875,
                                                                 "negative_fpr": 0.05, "accuracy": 0.8}},
                        "training": {"strategy": "finetune", "n_fit": 14, "best_epoch": 2, "options": {"epochs": 3},
                                     "history": [_epoch(0, 0.9, 0.6, 1.0, 0.5), _epoch(1, 0.6, 0.75, 0.8, 0.65), _epoch(2, 0.4, 0.85, 0.7, 0.8),
                                                 _epoch(3, 0.3, 0.9, 0.75, 0.75)]},
                        "calibration": {"method": "temperature", "temperature": 1.7, "fitted_on": "validation", "n_images": 6,
                                        "ece_before": 0.12, "ece_after": 0.05, "nll_before": 0.7, "nll_after": 0.55, "objective": "nll"},
                        "label_quality": {"n_flagged": 2, "noise_rate_per_class": {"good": 0.05, "scratch": 0.2, "spot": None},
                                          "already_questioned": 1, "summary": "2 suspects"},
                        "threshold_source": "out_of_fold", "out_of_fold": {"n_folds": 5, "model": "finetune", "epochs": 2},
                        "threshold_choice": {"threshold": 0.41, "n_negatives": 48, "n_defects": 20, "margin_attainable": True, "source": "out_of_fold",
                                             "rule": "stratified", "n_picked_negatives": 12, "estimated_population_fpr": 0.021,
                                             "rule_threshold": 0.3, "rank_threshold": 0.45, "tail_threshold": 0.2, "allowed_false_positives": 1, "n_sampled_negatives_above": 1,
                                             "observed_fpr": 0.0208, "fpr_upper_bound": 0.0561},
                        "collapse_check": {"test_split": False, "every_image_predicted_as": None},
                        "estimated_metrics": {"macro_f1": 0.81, "defect_recall": 0.9, "negative_fpr": 0.021},
                        "pull": {"new_label_events": 10, "deleted": 0, "skipped": 1, "rejected": 1, "warnings": []},
                        "push": {"pushed": 12, "pending": 0}, "ties": {"n_images": 1, "asked": 1}})
    r3 = Round(project_id=project.id, number=3, status="failed", error="embedding failed: out of memory", started_at=T0 + timedelta(hours=3))
    r4 = Round(project_id=project.id, number=4, status="running", started_at=T0 + timedelta(hours=5))
    session.add_all([r1, r2, r3, r4])
    session.flush()

    session.add_all([
        LabelEvent(image_id=image(9), label="scratch", source="oracle", annotator="oracle", round_id=r1.id, created_at=T0 + timedelta(hours=1, minutes=1)),
        LabelEvent(image_id=image(10), label="spot", source="oracle", annotator="oracle", round_id=r1.id, created_at=T0 + timedelta(hours=1, minutes=1)),
        LabelEvent(image_id=image(11), label="good", source="annotator", annotator="ann1", round_id=r2.id, created_at=T0 + timedelta(hours=2, minutes=1)),
        LabelEvent(image_id=image(5), label="spot", source="annotator", annotator="ann1", round_id=r2.id, created_at=T0 + timedelta(hours=2, minutes=1)),
        LabelEvent(image_id=image(12), label="scratch", source="annotator", annotator="ann1", round_id=r2.id, created_at=T0 + timedelta(hours=2, minutes=2)),
        LabelEvent(image_id=image(12), label="spot", source="annotator", annotator="ann2", round_id=r2.id, created_at=T0 + timedelta(hours=2, minutes=2)),
        LabelEvent(image_id=image(12), label="spot", source="annotator", annotator="ann3", round_id=r4.id, created_at=T0 + timedelta(hours=5, minutes=1)),
    ])

    for round_, overall, per_class_f1 in (
        (r1, {"accuracy": 0.8, "macro_f1": 0.65, "defect_recall": 0.8, "negative_fpr": 0.05, "latency_ms": 12.0}, {"good": 0.8, "scratch": 0.6, "spot": 0.55}),
        (r2, {"accuracy": 0.85, "macro_f1": 0.78, "defect_recall": 0.9, "negative_fpr": 0.02, "latency_ms": 11.0}, {"good": 0.9, "scratch": 0.7, "spot": 0.74}),
    ):
        for name, value in overall.items():
            session.add(Metric(round_id=round_.id, name=name, value=value))
        for class_name, f1 in per_class_f1.items():
            session.add(Metric(round_id=round_.id, name="f1", class_name=class_name, value=f1))
            session.add(Metric(round_id=round_.id, name="recall", class_name=class_name, value=f1 + 0.05))
        for name, threshold, comparison in (("macro_f1", 0.70, ">="), ("defect_recall", 0.85, ">="), ("negative_fpr", 0.03, "<="), ("latency_ms", 30.0, "<=")):
            value = overall[name]
            session.add(GateResult(round_id=round_.id, name=name, value=value, threshold=threshold, comparison=comparison, applicable=True,
                                   passed=value >= threshold if comparison == ">=" else value <= threshold))
    session.add(GateResult(round_id=r2.id, name="calibration_ece", value=None, threshold=0.1, comparison="<=", applicable=False, passed=None))

    for round_ in (r1, r2):
        session.add(Prediction(round_id=round_.id, image_id=image(1), predicted_label="good", p_defect=0.1, probabilities={"good": 0.9, "scratch": 0.05, "spot": 0.05}))
    # R2's label issues: ranks 1-3 flagged, rank 4 not; one near-duplicate.
    session.add_all([
        LabelIssue(round_id=r2.id, image_id=image(6), kind="label_error", given_label="scratch", suggested_label="spot", score=0.05, flagged=True, rank=1),
        LabelIssue(round_id=r2.id, image_id=image(5), kind="label_error", given_label="scratch", suggested_label="spot", score=0.10, flagged=True, rank=2),
        LabelIssue(round_id=r2.id, image_id=image(3), kind="near_duplicate", given_label="good", suggested_label=None, score=0.20, flagged=True, rank=3,
                   related_image_id=image(2)),
        LabelIssue(round_id=r2.id, image_id=image(4), kind="label_error", given_label="good", suggested_label="scratch", score=0.70, flagged=False, rank=4),
        LabelIssue(round_id=r1.id, image_id=image(2), kind="outlier", given_label="good", suggested_label=None, score=0.3, flagged=True, rank=1),
    ])
    session.add_all([
        Selection(round_id=r1.id, image_id=image(11), rank=1, score=0.9, strategy="margin", reason="uncertain", predicted_label="scratch", p_defect=0.55, push_status="pushed", pushed_at=T0 + timedelta(hours=1, minutes=4)),
        Selection(round_id=r1.id, image_id=image(12), rank=2, score=0.8, strategy="margin", reason="rare_class", predicted_label="spot", p_defect=0.6, push_status="pushed", pushed_at=T0 + timedelta(hours=1, minutes=4)),
        Selection(round_id=r2.id, image_id=image(7), rank=1, score=0.7, strategy="margin", reason="suspected_label_error", predicted_label="good", p_defect=0.2, push_status="pending"),
    ])
    session.flush()
    return SeededStore(project_dir=project_dir, url="", project_id=project.id, empty_project_id=empty.id,
                       round_ids={1: r1.id, 2: r2.id, 3: r3.id, 4: r4.id}, image_ids=ids, model_path=model_path)


def make_settings(project_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(project_dir=project_dir, api_token=FULL_TOKEN, api_read_token=READ_TOKEN,
                                     labelstudio_webhook_secret=WEBHOOK_SECRET, max_upload_bytes=20_000, max_upload_files=4)
    values.update(overrides)
    return Settings(**values)


def create_seeded_store(project_dir: Path) -> SeededStore:
    url = f"sqlite:///{project_dir / 'loop.db'}"
    upgrade_schema(url)
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        store = seed(session, project_dir)
    engine.dispose()
    return SeededStore(**{**store.__dict__, "url": url})
