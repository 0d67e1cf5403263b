"""A new camera in an existing project: its images are named as unlike the labeled ones, a random sample of them is
drawn into the frozen test split and asked of the annotators without a guess, and once labeled the gates are given
per ingest batch."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageFilter
from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config, save_config
from loop.project import open_project
from loop.synthetic_images import write_class_folders
from store import session_scope
from store.models import Image, Round, Selection
from store.queries import current_labels
from store.reports import round_report

runner = CliRunner()
CLASSES = "good,scratch,spot,patch"


def invoke(*args: str) -> str:
    """The command's output as one line (rich wraps it at the terminal's width)."""
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _as_camera_b(source: Path, target: Path) -> None:
    """Another camera: brighter and flatter (gamma), a warm tint, softer focus, turned a quarter."""
    image = PILImage.open(source).convert("L")
    pixels = (np.asarray(image, dtype=np.float64) / 255) ** 0.45
    image = PILImage.fromarray((pixels * 255).astype(np.uint8)).rotate(90).filter(ImageFilter.GaussianBlur(1.2)).convert("RGB")
    red, green, blue = image.split()
    PILImage.merge("RGB", [red, green.point(lambda v: int(v * 0.85)), blue.point(lambda v: int(v * 0.6))]).save(target)


@pytest.fixture
def two_cameras(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(camera A's class folders, all labeled; camera B's images, a flat unlabeled folder; the oracle's truth of both)."""
    camera_a = tmp_path / "camera_a"
    files_a = write_class_folders(camera_a, per_class={"good": 60, "scratch": 16, "spot": 16, "patch": 12}, size=64, seed=3)
    raw_b = write_class_folders(tmp_path / "raw_b", per_class={"good": 36, "scratch": 10, "spot": 10, "patch": 4}, size=64, seed=4)
    camera_b = tmp_path / "camera_b"
    camera_b.mkdir()
    truth = tmp_path / "truth.csv"
    with open(truth, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for label, paths in files_a.items():
            writer.writerows([str(path), label] for path in paths)
        for label, paths in raw_b.items():
            for path in paths:
                target = camera_b / f"{label}_{path.stem}.png"
                _as_camera_b(path, target)
                writer.writerow([str(target), label])
    return camera_a, camera_b, truth


def test_a_new_cameras_batch_is_flagged_sampled_into_the_test_split_and_measured_apart(two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "5", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    invoke("ingest", str(camera_b), "--unlabeled", "--project", str(project), "--quiet")
    first = invoke("round", "--project", str(project))
    assert "unlike every training label" in first and "joined the frozen test split" in first
    engine = open_project(project).engine
    with session_scope(engine) as session:
        round_one = session.scalars(select(Round).where(Round.number == 1)).one()
        coverage = round_one.details["coverage"]
        batch_b = session.scalars(select(Image.ingest_batch_id).where(Image.path.like(f"{camera_b}%"))).first()
        images_b = {image.id: image for image in session.scalars(select(Image).where(Image.ingest_batch_id == batch_b))}
        selections = session.scalars(select(Selection).where(Selection.round_id == round_one.id)).all()
    (flagged,) = coverage["flagged_batches"]  # camera A, drawn like its labels, is not
    assert flagged["ingest_batch_id"] == batch_b and flagged["unlike_training_labels"]["flagged"] and flagged["unlike_test_labels"]["flagged"]
    drawn = set(coverage["test_sample_image_ids"])
    assert len(drawn) == flagged["n_drawn_into_test_now"] == round(0.2 * len(images_b))  # test_fraction of the batch
    assert drawn <= set(images_b) and all(images_b[i].split == "test" for i in drawn)
    samples = [s for s in selections if s.reason == "test_sample"]
    assert {s.image_id for s in samples} == drawn
    assert all(s.predicted_label is None for s in samples)  # a test label never starts from the model's guess
    assert not drawn & {s.image_id for s in selections if s.reason != "test_sample"}  # never also picked for training
    # half the budget of 5 is a random sample of the new batch: its good parts, called defects with confidence, are
    # never uncertain enough for the other strategies
    new_batch = [s for s in selections if s.reason == "new_batch"]
    assert len(new_batch) == 2 and {s.image_id for s in new_batch} <= set(images_b) and {s.strategy for s in new_batch} == {"random"}
    assert len([s for s in selections if s.reason not in ("new_batch", "test_sample")]) == 3

    second = invoke("round", "--project", str(project))  # the oracle answered: the samples are test labels now
    with session_scope(engine) as session:
        labels = current_labels(session, session.scalars(select(Image.project_id)).first())
        splits = {image.id: image.split for image in session.scalars(select(Image).where(Image.id.in_(sorted(drawn))))}
        round_two = session.scalars(select(Round).where(Round.number == 2)).one()
        report = round_report(session, round_id=round_two.id)
        again = session.scalars(select(Selection).where(Selection.round_id == round_two.id, Selection.reason == "test_sample")).all()
    assert set(splits.values()) == {"test"} and all(labels[i].status == "labeled" for i in drawn)
    assert not again  # drawn once: the batch holds its share of test images now
    by_batch = {row.ingest_batch_id: row for row in report.test_metrics_by_batch}
    assert by_batch[batch_b].n_images == len(drawn) and len(by_batch) == 2
    assert "gates by ingest batch" in second
    assert not any(row.unlike_test_labels for row in report.unfamiliar_batches)  # measured now


def test_no_sample_is_drawn_when_the_setting_is_zero_and_the_round_says_the_gates_do_not_measure_the_batch(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "5", "--image-size", "96")
    config = load_config(project)
    config.split.unmeasured_batch_test_sample = 0
    save_config(project, config)
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    invoke("ingest", str(camera_b), "--unlabeled", "--project", str(project), "--quiet")
    result = invoke("round", "--project", str(project))
    assert "the gates do not measure it" in result and "unmeasured_batch_test_sample` is 0" in result
    with session_scope(open_project(project).engine) as session:
        assert session.scalars(select(Image).where(Image.split == "test", Image.path.like(f"{camera_b}%"))).first() is None
        assert not session.scalars(select(Selection).where(Selection.reason == "test_sample")).all()
    status = invoke("status", "--project", str(project))
    assert "new images unlike the labeled ones (round 1)" in status


def test_a_test_sample_the_annotation_tool_could_not_take_is_pushed_next_round_without_a_guess_and_counts_against_no_budget(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labeling.base import PushReport
    from labeling.simulated import OracleAnnotator

    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "5", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    invoke("ingest", str(camera_b), "--unlabeled", "--project", str(project), "--quiet")
    pushed: list[list] = []
    monkeypatch.setattr(OracleAnnotator, "push", lambda self, *, session, project, round_id, batch, **_: (pushed.append(batch), PushReport(pending=len(batch)))[1])
    invoke("round", "--project", str(project), "--quiet")  # the tool is down: nothing delivered
    monkeypatch.setattr(OracleAnnotator, "push", lambda self, *, session, project, round_id, batch, **_: (pushed.append(batch), PushReport(pushed=len(batch)))[1])
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(open_project(project).engine) as session:
        samples = {s.image_id: s.push_status for s in session.scalars(select(Selection).where(Selection.reason == "test_sample"))}
        round_two = session.scalars(select(Round).where(Round.number == 2)).one()
    assert samples and set(samples.values()) == {"pushed"}  # retried, not withdrawn as "a selection that became a test image"
    retried = [task for task in pushed[1] if task.image_id in samples]
    assert len(retried) == len(samples) and all(task.predicted_label is None and not task.probabilities for task in retried)
    # the undelivered training picks count against round 2's budget; the test samples do not
    assert round_two.details["selection_budget"]["undelivered_from_earlier_rounds"] == 5
