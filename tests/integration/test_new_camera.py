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
    files_a = write_class_folders(camera_a, per_class={"good": 100, "scratch": 25, "spot": 25, "patch": 15}, size=64, seed=3)
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
    _ingest_two_cameras(project, camera_a, camera_b, truth)
    first = invoke("round", "--project", str(project))
    assert "unlike every training label" in first and "go to the annotators without a guess as test images" in first
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


def test_a_new_cameras_few_test_labels_are_shown_per_batch_marked_too_few_not_hidden(two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # QA: a new camera's 9 test labels (a sample capped below the 10 a batch needs to be gated alone) were shown
    # nowhere: its recall of 0.5 hid behind the whole split's 0.875, "pass"
    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    _ingest_two_cameras(project, camera_a, camera_b, truth)
    config = load_config(project)
    config.split.unmeasured_batch_test_sample = 6
    save_config(project, config)
    invoke("round", "--project", str(project))
    second = " ".join(invoke("round", "--project", str(project)).split())  # the oracle answered: 6 test labels of camera B
    with session_scope(open_project(project).engine) as session:
        batch_b = session.scalars(select(Image.ingest_batch_id).where(Image.path.like(f"{camera_b}%"))).first()
        report = round_report(session, round_id=session.scalars(select(Round.id).where(Round.number == 2)).one())
    by_batch = {row.ingest_batch_id: row for row in report.test_metrics_by_batch or []}
    assert by_batch[batch_b].n_images == 6 and by_batch[batch_b].too_few_images and by_batch[batch_b].defect_recall is not None
    assert not any(row.too_few_images for batch, row in by_batch.items() if batch != batch_b)
    row = by_batch[batch_b]  # what its FPR and recall rest on, said beside them (QA: an FPR of 0.5 on 2 good parts read as any other)
    assert row.n_good is not None and row.n_good + row.n_defects == 6
    assert f"6 images: {row.n_good} good, {row.n_defects} defects, too few to be gated alone" in second


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


def test_a_new_camera_arriving_a_few_images_an_ingest_is_named_drawn_from_and_measured_as_one_group(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Camera B's 60 images in daily ingests of 8: alone, no ingest can show the 10 unlike images a flag needs; judged
    with the small ingests beside it (MIN_GROUP_IMAGES), the first seven (56 images) are one group."""
    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "6", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    files_b = sorted(camera_b.iterdir())
    for day in range(-(-len(files_b) // 8)):
        _ingest_a_day(project, tmp_path / f"camera_b_day{day}", files_b[day * 8:(day + 1) * 8])
    first = invoke("round", "--project", str(project))
    assert "ingest batches 2-8 (7 small ingests judged together)" in first and "unlike every training label" in first
    engine = open_project(project).engine
    with session_scope(engine) as session:
        coverage = session.scalars(select(Round).where(Round.number == 1)).one().details["coverage"]
        batch_of = {image.id: image.ingest_batch_id for image in session.scalars(select(Image))}
        selections = session.scalars(select(Selection)).all()
    (flagged,) = coverage["flagged_batches"]
    assert flagged["ingest_batch_id"] == 2 and flagged["ingest_batch_ids"] == list(range(2, 9)) and flagged["n_images"] == 56
    drawn = set(coverage["test_sample_image_ids"])
    # the group's share, and the newest ingest's (batch 9, 4 images: a group of its own lane, drawn from as it grows)
    assert len([i for i in drawn if batch_of[i] in range(2, 9)]) == round(0.2 * 56) and len(drawn) == round(0.2 * 56) + round(0.2 * 4)
    assert {s.image_id for s in selections if s.reason == "test_sample"} == drawn
    new_batch = [s for s in selections if s.reason == "new_batch"]  # half the budget, from any of the group's ingests
    assert len(new_batch) == 3 and {batch_of[s.image_id] for s in new_batch} <= set(range(2, 9))
    assert coverage["unlike_training_batch_ids"] == list(range(2, 9))

    second = invoke("round", "--project", str(project))  # the oracle labeled the sample: the gates are given for the group
    with session_scope(engine) as session:
        report = round_report(session, round_id=session.scalars(select(Round.id).where(Round.number == 2)).one())
    by_batch = {row.ingest_batch_id: row for row in report.test_metrics_by_batch}
    assert by_batch[2].ingest_batch_ids == list(range(2, 9)) and by_batch[2].n_images == round(0.2 * 56)
    assert "gates by ingest batch on the test split" in second and "batches 2-8 (7 small ingests judged together)" in second
    status = invoke("status", "--project", str(project))
    assert "batches 2-8" in status


def test_a_small_labeled_ingest_is_judged_alone_and_a_quarantined_file_moves_no_group_boundary(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A labeled test set of camera A (20 images) between the first ingest and camera B's days of 10 would fill camera
    B's first group with test labels like the others (no draw, the gates of "camera B" measuring camera A); it is
    what the others are judged against and stands alone. A file of camera B's third day goes missing before the
    round: groups are sized by what each ingest added, so the first group is still days 1-5."""
    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "4", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    write_class_folders(tmp_path / "camera_a_test", per_class={"good": 12, "scratch": 4, "spot": 4}, size=64, seed=5)
    invoke("ingest", str(tmp_path / "camera_a_test"), "--split", "test", "--project", str(project), "--quiet")
    files_b = sorted(camera_b.iterdir())
    for day in range(-(-len(files_b) // 10)):
        _ingest_a_day(project, tmp_path / f"camera_b_day{day}", files_b[day * 10:(day + 1) * 10])
    next(iter(sorted((tmp_path / "camera_b_day2").iterdir()))).unlink()
    first = invoke("round", "--project", str(project))
    assert "quarantined" in first
    with session_scope(open_project(project).engine) as session:
        coverage = session.scalars(select(Round).where(Round.number == 1)).one().details["coverage"]
    by_first = {row["ingest_batch_id"]: row for row in coverage["flagged_batches"]}
    assert 2 not in by_first and by_first[3]["ingest_batch_ids"] == [3, 4, 5, 6, 7] and by_first[3]["n_images"] == 49
    assert by_first[3]["n_drawn_into_test_now"] == round(0.2 * 49)  # none of camera A's test labels fill its share


def test_a_new_cameras_days_between_the_old_cameras_make_groups_of_their_own_whose_test_sample_grows_with_them(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Camera A's days of 10 and camera B's days of 8, one after the other. Judged in one run of small ingests, each
    group was half camera A (named by camera A's folder, its test sample and new_batch picks half camera A's); each
    small ingest now keeps the lane it was first judged in. Camera B's group is flagged while open (two days): its
    first sample makes it look measured, yet as its days come in the sample grows to its share."""
    camera_a, camera_b, truth = two_cameras
    more_a = write_class_folders(tmp_path / "more_a", per_class={"good": 40, "scratch": 10, "spot": 10, "patch": 10}, size=64, seed=6)
    with open(truth, "a", newline="") as handle:
        csv.writer(handle).writerows([str(path), label] for label, paths in more_a.items() for path in paths)
    rng = np.random.default_rng(0)  # each day a mix of classes, as a line makes them
    files_a, files_b = [list(rng.permutation(sorted(files))) for files in (sum(more_a.values(), []), camera_b.iterdir())]
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "4", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")

    def ingest_day(day: int) -> None:
        for camera, files, per_day in (("a", files_a, 10), ("b", files_b, 8)):
            _ingest_a_day(project, tmp_path / f"camera_{camera}_day{day}", files[day * per_day:(day + 1) * per_day])

    for day in (0, 1):
        ingest_day(day)  # batches 2 (A), 3 (B), 4 (A), 5 (B)
    invoke("round", "--project", str(project), "--quiet")
    engine = open_project(project).engine
    with session_scope(engine) as session:
        batch_of = {image.id: image.ingest_batch_id for image in session.scalars(select(Image))}
        coverage = session.scalars(select(Round).where(Round.number == 1)).one().details["coverage"]
    (flagged,) = coverage["flagged_batches"]
    assert flagged["ingest_batch_ids"] == [3, 5] and "camera_b_day0" in flagged["source"] and "camera_b_day1" in flagged["source"]
    first_sample = set(coverage["test_sample_image_ids"])
    assert len(first_sample) == round(0.2 * 16) and {batch_of[i] for i in first_sample} <= {3, 5}
    for day in range(2, 7):
        ingest_day(day)  # camera B's later days: those still unlike the labels when first judged join its group
    _ingest_a_day(project, tmp_path / "camera_b_day7", files_b[56:])  # batch 16: the next group, its nearest test images in the first's
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(engine) as session:
        batch_of = {image.id: image.ingest_batch_id for image in session.scalars(select(Image))}
        coverage = session.scalars(select(Round).where(Round.number == 2)).one().details["coverage"]
        samples = session.scalars(select(Selection).where(Selection.reason == "test_sample")).all()
        new_batch = session.scalars(select(Selection).where(Selection.reason == "new_batch")).all()
    b_days, a_days = {3, 5, 7, 9, 11, 13, 15, 16}, {2, 4, 6, 8, 10, 12, 14}
    assert {batch_of[s.image_id] for s in samples} <= b_days and not {batch_of[s.image_id] for s in new_batch} & a_days
    group = next(row for row in coverage["test_sample_groups"] if row["ingest_batch_id"] == 3)
    # every day of camera B: the later ones, judged once its first days taught the model, by their nearest labels
    assert group["ingest_batch_ids"] == sorted(b_days - {16}) and group["n_images"] == 56
    assert len([s for s in samples if batch_of[s.image_id] in group["ingest_batch_ids"]]) == group["n_test_target"] == round(0.2 * group["n_images"])
    (next_group,) = [row for row in coverage["test_sample_groups"] if row["ingest_batch_id"] == 16]
    assert next_group["n_drawn_now"] == round(0.2 * 4) == len([s for s in samples if batch_of[s.image_id] == 16])


def test_a_new_camera_measured_by_a_test_set_of_its_own_gets_no_sample_of_its_days(two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The round's advice followed: 36 labeled camera B images ingested with --split test. Camera B's days, unlike the
    training labels, are taught (the budget's share), not sampled into test again: their nearest test images are
    that set's."""
    camera_a, camera_b, truth = two_cameras
    label_of = dict(csv.reader(open(truth)))
    files_b = list(np.random.default_rng(0).permutation(sorted(camera_b.iterdir())))  # every class in the test set and in the days
    test_set = tmp_path / "camera_b_test.csv"
    with open(test_set, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label"], *([str(path), label_of[str(path)]] for path in files_b[:36])])
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "4", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    invoke("ingest", str(test_set), "--split", "test", "--project", str(project), "--quiet")
    for day in range(3):
        _ingest_a_day(project, tmp_path / f"camera_b_day{day}", files_b[36 + day * 8:36 + (day + 1) * 8])
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(open_project(project).engine) as session:
        coverage = session.scalars(select(Round).where(Round.number == 1)).one().details["coverage"]
        reasons = [s.reason for s in session.scalars(select(Selection))]
    assert {3, 4, 5} <= set(coverage["unlike_training_batch_ids"]) and reasons.count("new_batch") == 2
    assert "test_sample" not in reasons and not coverage["test_sample_groups"]


def test_a_test_sample_the_annotation_tool_could_not_take_is_pushed_next_round_without_a_guess_and_counts_against_no_budget(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labeling.base import PushReport
    from labeling.simulated import OracleAnnotator

    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    _ingest_two_cameras(project, camera_a, camera_b, truth)
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


def _ingest_a_day(project: Path, folder: Path, files: list[Path]) -> None:
    """One day's images, ingested unlabeled from a folder of their own (links to the files)."""
    folder.mkdir()
    for path in files:
        (folder / path.name).symlink_to(path)
    invoke("ingest", str(folder), "--unlabeled", "--project", str(project), "--quiet")


def _ingest_two_cameras(project: Path, camera_a: Path, camera_b: Path, truth: Path, *, budget: str = "5") -> None:
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", budget, "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    invoke("ingest", str(camera_b), "--unlabeled", "--project", str(project), "--quiet")


def test_an_image_already_asked_for_a_training_label_is_never_drawn_into_the_test_split(two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Its task shows the model's guess: its answer must not become a test label."""
    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    _ingest_two_cameras(project, camera_a, camera_b, truth, budget="20")
    truth.write_text("".join(line for line in truth.read_text().splitlines(keepends=True) if str(camera_b) not in line))  # B unanswered
    config = load_config(project)
    config.split.unmeasured_batch_test_sample = 0
    save_config(project, config)
    invoke("round", "--project", str(project), "--quiet")  # camera B's training picks go out, and wait
    config.split.unmeasured_batch_test_sample = 200
    save_config(project, config)
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(open_project(project).engine) as session:
        asked_in_round_one = {s.image_id for s in session.scalars(select(Selection).join(Round).where(Round.number == 1))}
        drawn = {s.image_id for s in session.scalars(select(Selection).join(Round).where(Round.number == 2, Selection.reason == "test_sample"))}
        test_b = {i.id for i in session.scalars(select(Image).where(Image.split == "test", Image.path.like(f"{camera_b}%")))}
    assert drawn and asked_in_round_one & {i for i in test_b} == set() and not drawn & asked_in_round_one


def test_a_part_is_drawn_with_its_photos_from_every_batch_and_none_is_left_to_be_picked_for_training(
        two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    camera_a, camera_b, truth = two_cameras
    more_b = tmp_path / "camera_b_again"  # other photos of the same 60 parts, ingested later
    more_b.mkdir()
    raw = write_class_folders(tmp_path / "raw_b_again", per_class={"good": 36, "scratch": 10, "spot": 10, "patch": 4}, size=64, seed=9)
    with open(truth, "a", newline="") as handle:
        writer = csv.writer(handle)
        for label, paths in raw.items():
            for path in paths:
                target = more_b / f"{label}_{path.stem}.png"
                _as_camera_b(path, target)
                writer.writerow([str(target), label])
    manifests = []
    for name, folder in (("first.csv", camera_b), ("second.csv", more_b)):
        manifests.append(tmp_path / name)
        with open(manifests[-1], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "part"])
            writer.writerows([str(path), "", f"part{i}"] for i, path in enumerate(sorted(folder.iterdir())))
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "40", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    for manifest in manifests:
        invoke("ingest", str(manifest), "--unlabeled", "--project", str(project), "--quiet")
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(open_project(project).engine) as session:
        round_one = session.scalars(select(Round).where(Round.number == 1)).one()
        photos = session.scalars(select(Image).where(Image.part.is_not(None))).all()
        picked = {s.image_id for s in session.scalars(select(Selection).where(Selection.round_id == round_one.id, Selection.reason != "test_sample"))}
        drawn = {s.image_id for s in session.scalars(select(Selection).where(Selection.round_id == round_one.id, Selection.reason == "test_sample"))}
    splits_of: dict[str, set[str]] = {}
    for photo in photos:
        splits_of.setdefault(photo.part, set()).add(photo.split)
    test_parts = {part for part, splits in splits_of.items() if "test" in splits}
    assert drawn and test_parts and all(splits_of[part] == {"test"} for part in test_parts)  # whole parts
    assert not {photo.id for photo in photos if photo.part in test_parts} & picked  # none picked for a training label
    assert {photo.id for photo in photos if photo.part in test_parts} == drawn  # every photo of a drawn part is asked


def test_a_draw_of_a_round_that_fails_later_is_asked_by_the_next_round(two_cameras: tuple[Path, Path, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import loop.round as round_module

    camera_a, camera_b, truth = two_cameras
    project = tmp_path / "project"
    _ingest_two_cameras(project, camera_a, camera_b, truth)

    def broken(state):  # noqa: ANN001, ANN202
        raise RuntimeError("the machine went down between the draw and the push")

    monkeypatch.setattr(round_module, "ROUND_STEPS", [broken if step is round_module.select_next_batch else step for step in round_module.ROUND_STEPS])
    assert runner.invoke(app, ["round", "--project", str(project), "--quiet"]).exit_code != 0
    monkeypatch.undo()
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(open_project(project).engine) as session:
        samples = session.scalars(select(Selection).where(Selection.reason == "test_sample")).all()
        in_test = {i.id for i in session.scalars(select(Image).where(Image.split == "test", Image.path.like(f"{camera_b}%")))}
    assert samples and {s.image_id for s in samples} == in_test  # drawn in the failed round, asked in the next
    assert {s.push_status for s in samples} == {"pushed"}


def test_an_image_whose_near_copy_is_a_training_label_is_never_drawn(two_cameras: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """30 of camera B's photos were labeled for training (`--split train`); the batch ingested after holds copies of
    them (one pixel changed) and of the others: only the others may be drawn, or the test split measures copies."""
    camera_a, camera_b, truth = two_cameras
    labels = {row["path"]: row["label"] for row in csv.DictReader(open(truth))}
    files = sorted(camera_b.iterdir())
    trained, copies = tmp_path / "b_trained", tmp_path / "b_copies"
    copies.mkdir()
    for path in files[:30]:
        (trained / labels[str(path)]).mkdir(parents=True, exist_ok=True)
        (trained / labels[str(path)] / path.name).write_bytes(path.read_bytes())
    with open(truth, "a", newline="") as handle:
        writer = csv.writer(handle)
        for path in files:
            pixels = np.asarray(PILImage.open(path)).astype(np.uint8).copy()
            pixels[0, 0, 0] ^= 1
            PILImage.fromarray(pixels).save(copies / f"copy_{path.name}")
            writer.writerow([str(copies / f"copy_{path.name}"), labels[str(path)]])
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "5", "--image-size", "96")
    invoke("ingest", str(camera_a), "--project", str(project), "--quiet")
    invoke("ingest", str(trained), "--split", "train", "--project", str(project), "--quiet")
    invoke("ingest", str(copies), "--unlabeled", "--project", str(project), "--quiet")
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(open_project(project).engine) as session:
        round_one = session.scalars(select(Round).where(Round.number == 1)).one()
        drawn = [session.get(Image, image_id).path for image_id in round_one.details["coverage"]["test_sample_image_ids"]]
        copies_of_training = round_one.details["data_quality"]["near_duplicates"]["n_issues"]
    assert drawn and copies_of_training  # the copies were found, and the batch still drew
    assert not {Path(path).name.removeprefix("copy_") for path in drawn} & {path.name for path in files[:30]}


def test_a_draw_never_reaches_through_a_copy_to_a_part_photo_already_asked_with_a_guess(tmp_path: Path) -> None:
    """Camera B's parts b<i>; a later batch holds a copy of each (one pixel changed) as part c<i>, with another photo
    of c<i> already asked for a training label (its task showed a guess). Drawing b<i> brings its copy, the copy brings
    its part: the whole linked set is drawn or none of it, so no part is left half in test."""
    files_a = write_class_folders(tmp_path / "camera_a", per_class={"good": 100, "scratch": 25, "spot": 25, "patch": 15}, size=64, seed=3)
    raw_b = write_class_folders(tmp_path / "raw_b", per_class={"good": 30, "scratch": 6, "spot": 6}, size=64, seed=4)
    raw_s = write_class_folders(tmp_path / "raw_s", per_class={"good": 30, "scratch": 6, "spot": 6}, size=64, seed=8)
    truth, b_dir, c_dir = tmp_path / "truth.csv", tmp_path / "b", tmp_path / "c"
    b_dir.mkdir()
    c_dir.mkdir()
    truth_rows = [[str(p), label] for label, paths in files_a.items() for p in paths]
    b_rows, c_rows = [], []
    for i, ((label, path), (other_label, other)) in enumerate(zip(((lb, p) for lb, ps in raw_b.items() for p in ps),
                                                                   ((lb, p) for lb, ps in raw_s.items() for p in ps))):
        photo, copy, sibling = b_dir / f"{label}_{i}.png", c_dir / f"copy_{label}_{i}.png", c_dir / f"sib_{other_label}_{i}.png"
        _as_camera_b(path, photo)
        pixels = np.asarray(PILImage.open(photo)).copy()
        pixels[0, 0, 0] ^= 1
        PILImage.fromarray(pixels).save(copy)
        _as_camera_b(other, sibling)
        b_rows.append([str(photo), "", f"b{i}"])
        c_rows += [[str(copy), "", f"c{i}"], [str(sibling), "", f"c{i}"]]
        truth_rows += [[str(photo), label], [str(copy), label], [str(sibling), other_label]]
    for name, rows in (("truth.csv", [["path", "label"], *truth_rows]), ("b.csv", [["path", "label", "part"], *b_rows]),
                       ("c.csv", [["path", "label", "part"], *c_rows])):
        with open(tmp_path / name, "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", CLASSES, "--negative-class", "good", "--annotator", "oracle", "--oracle-manifest", str(truth),
           "--budget", "5", "--image-size", "96")
    invoke("ingest", str(tmp_path / "camera_a"), "--project", str(project), "--quiet")
    invoke("ingest", str(tmp_path / "b.csv"), "--unlabeled", "--project", str(project), "--quiet")
    invoke("ingest", str(tmp_path / "c.csv"), "--unlabeled", "--project", str(project), "--quiet")
    config = load_config(project)
    config.split.unmeasured_batch_test_sample = 0
    save_config(project, config)
    invoke("round", "--project", str(project), "--quiet")
    engine = open_project(project).engine
    with session_scope(engine) as session:  # every sibling waits for a training label, its task showing a guess
        round_one = session.scalars(select(Round).where(Round.number == 1)).one()
        asked = set(session.scalars(select(Selection.image_id)))
        siblings = [i for i in session.scalars(select(Image).where(Image.path.like(f"{c_dir}/sib_%"))) if i.id not in asked]
        for rank, image in enumerate(siblings):
            session.add(Selection(round_id=round_one.id, image_id=image.id, rank=100 + rank, score=0.5, strategy="margin", reason="uncertain",
                                  predicted_label="good", p_defect=0.1, push_status="pending"))
    config.split.unmeasured_batch_test_sample = 200
    save_config(project, config)
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(engine) as session:
        photos = session.scalars(select(Image).where(Image.part.is_not(None))).all()
        sibling_ids = {image.id for image in session.scalars(select(Image).where(Image.path.like(f"{c_dir}/sib_%")))}
        round_two = session.scalars(select(Round).where(Round.number == 2)).one()
    splits_of: dict[str, set[str]] = {}
    for photo in photos:
        splits_of.setdefault(photo.part, set()).add(photo.split)
    assert round_two.details["data_quality"]["near_duplicates"]["n_groups"]  # the copies were found
    assert not [part for part, splits in splits_of.items() if {"test", "pool"} <= splits]  # no part half in test
    assert not {photo.id for photo in photos if photo.split == "test"} & sibling_ids  # nothing asked with a guess drawn
