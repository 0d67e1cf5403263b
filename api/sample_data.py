"""A synthetic store for the API's browser test, its latency benchmark and for trying the dashboard without a loop:
a project with N rounds (metrics, gates, per-class scores, confusion matrices, predictions, label issues, selections,
label events from three sources) written directly through the SQLAlchemy models, plus a tiny ONNX classifier.

    python -m api.sample_data DIR --rounds 8     # then: LOOP_PROJECT_DIR=DIR ... or serve(DIR)
"""
from __future__ import annotations

import argparse
import hashlib
import io
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from store.models import GateResult, Image, IngestBatch, LabelEvent, LabelIssue, Metric, Prediction, Project, Round, Selection

SAMPLE_CLASSES = ["good", "scratch", "spot", "crack"]
SAMPLE_NEGATIVE = "good"
SAMPLE_IMAGE_SIZE = 16
SAMPLE_MEAN = [0.5, 0.5, 0.5]
SAMPLE_STD = [0.5, 0.5, 0.5]
# Class colours of the sample images, matched by the tiny model's weights (red scratch, green spot, blue crack).
CLASS_COLORS = {"good": (128, 128, 128), "scratch": (220, 40, 40), "spot": (40, 200, 40), "crack": (40, 40, 220)}


@dataclass(frozen=True)
class SampleProject:
    project_id: int
    round_ids: list[int]
    image_ids: list[int]
    model_path: Path | None


def write_tiny_onnx_classifier(path: Path, *, n_classes: int = 4) -> Path:
    """images [N,3,H,W] float32 -> mean colour -> linear -> softmax "probabilities" [N, n_classes].

    Class 0 wins on grey, class k (1..3) on a strong red / green / blue: a model whose answers a test can predict.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, n_classes), dtype=np.float32)
    bias = np.zeros(n_classes, dtype=np.float32)
    bias[0] = 2.0
    for k in range(1, n_classes):
        channel = (k - 1) % 3
        weights[:, k] = -2.0
        weights[channel, k] = 4.0
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("Gemm", ["features", "weights", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny_colour_classifier",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def sample_png(color: tuple[int, int, int], *, seed: int, size: int = 24) -> bytes:
    """A small noisy swatch of one colour, PNG-encoded (unique bytes per seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 21, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _confusion(rng: random.Random, n_classes: int, quality: float, per_class: int = 20) -> list[list[int]]:
    matrix = []
    for i in range(n_classes):
        correct = int(round(per_class * quality))
        row = [0] * n_classes
        row[i] = correct
        for _ in range(per_class - correct):
            row[rng.choice([j for j in range(n_classes) if j != i])] += 1
        matrix.append(row)
    return matrix


def _training_details(rng: random.Random, quality: float, *, n_fit: int, epochs: int = 6) -> dict:
    """A fine-tuning history shaped like a real one (validation loss turns up after its best epoch), calibration and label noise."""
    history, best = [], 0
    for epoch in range(epochs + 1):
        progress = 1 - 0.55 ** epoch
        val_loss = 0.9 - 0.5 * progress + 0.04 * max(0, epoch - 4) + rng.uniform(-0.01, 0.01)
        history.append({"epoch": epoch, "train_loss": 0.95 - 0.75 * progress, "train_accuracy": 0.6 + 0.38 * progress,
                        "val_loss": val_loss, "val_accuracy": quality * (0.75 + 0.25 * progress), "val_macro_f1": quality * (0.72 + 0.25 * progress) - 0.01 * max(0, epoch - 4),
                        "seconds": 14.0 + rng.uniform(0, 2)})
        best = epoch if history[epoch]["val_macro_f1"] >= history[best]["val_macro_f1"] + 0.005 else best
    return {
        "training": {"strategy": "finetune", "n_fit": n_fit, "best_epoch": best, "history": history},
        "calibration": {"method": "temperature", "temperature": round(rng.uniform(1.2, 1.8), 3), "fitted_on": "validation", "n_images": 16,
                        "ece_before": round(rng.uniform(0.08, 0.14), 3), "ece_after": round(rng.uniform(0.02, 0.05), 3)},
        "label_quality": {"n_flagged": 5, "already_questioned": 1,
                          "noise_rate_per_class": {name: round(rng.uniform(0.0, 0.12), 3) for name in SAMPLE_CLASSES}},
        "threshold_source": "validation",
        "threshold_choice": {"threshold": round(rng.uniform(0.3, 0.6), 3), "n_negatives": 3 * n_fit // 5, "n_defects": n_fit // 5, "margin_attainable": True,
                             "source": "validation"},
        "estimated_metrics": {"macro_f1": round(quality * 0.95, 3), "defect_recall": round(min(1.0, quality * 1.02), 3), "negative_fpr": round(rng.uniform(0.01, 0.03), 3)},
    }


def seed_sample_project(
    session: Session,
    *,
    image_dir: Path,
    name: str = "sample",
    n_rounds: int = 5,
    n_images: int = 80,
    labels_per_round: int = 6,
    issues_per_round: int = 6,
    selection_per_round: int = 8,
    model_path: Path | None = None,
    seed: int = 0,
) -> SampleProject:
    """Write the sample project; the caller's session commits. Rounds 1..n are completed; quality rises with rounds."""
    rng = random.Random(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    t0 = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    project = Project(name=name, root_dir=str(image_dir.parent), classes=list(SAMPLE_CLASSES), negative_class=SAMPLE_NEGATIVE, created_at=t0)
    session.add(project)
    session.flush()
    batch = IngestBatch(project_id=project.id, source=str(image_dir), layout="folders", created_at=t0, n_files=n_images, n_new_images=n_images)
    session.add(batch)
    session.flush()

    images: list[Image] = []
    truth: dict[int, str] = {}
    for index in range(n_images):
        label = SAMPLE_CLASSES[0] if index % 2 == 0 else SAMPLE_CLASSES[1 + (index // 2) % (len(SAMPLE_CLASSES) - 1)]
        data = sample_png(CLASS_COLORS.get(label, (0, 0, 0)), seed=seed * 100_000 + index)
        path = image_dir / f"{label}_{index:05d}.png"
        path.write_bytes(data)
        split = "test" if index % 5 == 0 else ("validation" if index % 5 == 1 else ("train" if index < n_images // 2 else "pool"))
        image = Image(project_id=project.id, sha256=hashlib.sha256(data).hexdigest(), path=str(path), size_bytes=len(data),
                      width=24, height=24, split=split, ingest_batch_id=batch.id, created_at=t0)
        images.append(image)
    session.add_all(images)
    session.flush()
    for image in images:
        truth[image.id] = Path(image.path).name.split("_")[0]

    # Imports: every non-pool image, labeled at ingest.
    session.add_all(
        LabelEvent(image_id=image.id, label=truth[image.id], source="import", created_at=t0 + timedelta(seconds=1))
        for image in images if image.split != "pool"
    )
    pool = [image for image in images if image.split == "pool"]
    if model_path is not None and not model_path.exists():
        write_tiny_onnx_classifier(model_path, n_classes=len(SAMPLE_CLASSES))

    rounds: list[Round] = []
    for number in range(1, n_rounds + 1):
        started = t0 + timedelta(hours=number)
        quality = min(0.97, 0.55 + 0.45 * (1 - 0.7 ** number))
        round_ = Round(
            project_id=project.id, number=number, status="completed", started_at=started, finished_at=started + timedelta(minutes=3, seconds=number),
            config_snapshot={"budget_images": labels_per_round},
            step_timings_s={"pull_labels": 0.2, "embed": round(30.0 / number + 2, 3), "train": 4.5, "evaluate": 1.2, "label_quality": 0.8, "select": 0.3},
            artifacts={"model_onnx": str(model_path)} if model_path is not None else {},
            details={
                "class_names": list(SAMPLE_CLASSES), "negative_class": SAMPLE_NEGATIVE, "threshold": 0.5,
                "preprocessing": {"image_size": SAMPLE_IMAGE_SIZE, "mean": SAMPLE_MEAN, "std": SAMPLE_STD},
                "confusion_matrix": {"labels": list(SAMPLE_CLASSES), "matrix": _confusion(rng, len(SAMPLE_CLASSES), quality)},
                **_training_details(rng, quality, n_fit=len(images) // 2 + number * labels_per_round),
            },
        )
        session.add(round_)
        session.flush()
        rounds.append(round_)
        # Labels pulled during this round: annotators and the oracle answer the previous round's selection.
        answered = pool[(number - 1) * labels_per_round: number * labels_per_round]
        for k, image in enumerate(answered):
            source = "oracle" if k % 2 == 0 else "annotator"
            session.add(LabelEvent(image_id=image.id, label=truth[image.id], source=source, annotator=source if source == "oracle" else f"annotator{k % 3}",
                                   round_id=round_.id, created_at=started + timedelta(seconds=10 + k)))
        macro_f1 = quality - 0.05 + rng.uniform(-0.02, 0.02)
        overall = {"accuracy": quality, "macro_f1": macro_f1, "defect_recall": min(0.99, quality + 0.02), "negative_fpr": max(0.005, 0.12 * 0.6 ** number),
                   "roc_auc_defect": min(0.999, quality + 0.03), "latency_ms": 8.0 + rng.uniform(0, 1)}
        for metric_name, value in overall.items():
            session.add(Metric(round_id=round_.id, name=metric_name, value=value))
        for position, class_name in enumerate(SAMPLE_CLASSES):
            f1 = max(0.0, min(1.0, quality - 0.1 * (position == 3) + rng.uniform(-0.03, 0.03)))
            for metric_name, value in (("precision", f1 + 0.01), ("recall", f1 - 0.01), ("f1", f1), ("support", 20.0)):
                session.add(Metric(round_id=round_.id, name=metric_name, class_name=class_name, value=min(value, 1.0) if metric_name != "support" else value))
        for gate_name, value, threshold, comparison in (
            ("macro_f1", macro_f1, 0.70, ">="), ("defect_recall", overall["defect_recall"], 0.85, ">="),
            ("negative_fpr", overall["negative_fpr"], 0.03, "<="), ("latency_ms", overall["latency_ms"], 30.0, "<="),
        ):
            passed = value >= threshold if comparison == ">=" else value <= threshold
            session.add(GateResult(round_id=round_.id, name=gate_name, value=value, threshold=threshold, comparison=comparison, applicable=True, passed=passed))
        for image in images:
            if image.split != "test":
                continue
            p_good = rng.uniform(0.05, 0.95)
            rest = (1 - p_good) / (len(SAMPLE_CLASSES) - 1)
            probabilities = {c: (p_good if c == SAMPLE_NEGATIVE else rest) for c in SAMPLE_CLASSES}
            session.add(Prediction(round_id=round_.id, image_id=image.id, predicted_label=SAMPLE_NEGATIVE if p_good > 0.5 else SAMPLE_CLASSES[1],
                                   p_defect=1 - p_good, probabilities=probabilities))
        suspects = rng.sample([image for image in images if image.split in ("train", "validation")], k=min(issues_per_round, n_images // 5))
        for rank, image in enumerate(suspects, start=1):
            other = rng.choice([c for c in SAMPLE_CLASSES if c != truth[image.id]])
            session.add(LabelIssue(round_id=round_.id, image_id=image.id, kind="label_error", given_label=truth[image.id], suggested_label=other,
                                   score=round(0.02 * rank, 4), flagged=rank <= max(1, issues_per_round - 1), rank=rank))
        upcoming = pool[number * labels_per_round: number * labels_per_round + selection_per_round]
        for rank, image in enumerate(upcoming, start=1):
            session.add(Selection(round_id=round_.id, image_id=image.id, rank=rank, score=round(1.0 - 0.05 * rank, 4), strategy="margin",
                                  reason="uncertain" if rank % 3 else "diverse", predicted_label=rng.choice(SAMPLE_CLASSES), p_defect=rng.uniform(0, 1),
                                  push_status="pushed", pushed_at=started + timedelta(minutes=3)))
    session.flush()
    return SampleProject(project_id=project.id, round_ids=[r.id for r in rounds], image_ids=[i.id for i in images], model_path=model_path)


def create_sample_store(project_dir: Path, *, n_rounds: int = 5, n_images: int = 80, name: str = "sample") -> SampleProject:
    """A fresh <project_dir>/loop.db (Alembic schema) holding one sample project."""
    from store.db import create_db_engine, session_scope, upgrade_schema

    project_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(project_dir / 'loop.db').resolve()}"
    upgrade_schema(url)
    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            sample = seed_sample_project(session, image_dir=project_dir / "images", name=name, n_rounds=n_rounds, n_images=n_images,
                                         model_path=project_dir / "models" / "tiny.onnx")
    finally:
        engine.dispose()
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=80)
    args = parser.parse_args()
    if (args.project_dir / "loop.db").exists():
        parser.error(f"{args.project_dir / 'loop.db'} exists; pick an empty directory")
    sample = create_sample_store(args.project_dir, n_rounds=args.rounds, n_images=args.images)
    print(f"sample project {sample.project_id} with {len(sample.round_ids)} rounds in {args.project_dir / 'loop.db'}")


if __name__ == "__main__":
    main()
