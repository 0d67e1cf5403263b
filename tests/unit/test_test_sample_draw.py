"""The new-camera draw into the frozen test split (loop.round._draw_test_samples), on a real store and a hand-built
round state: what it may take, how much it asks, and what it leaves."""
from __future__ import annotations

import csv
import types
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select
from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config
from loop.project import open_project
from loop.round import UNLABELED, _draw_test_samples
from store import session_scope
from store.models import Image, Round, Selection
from store.queries import get_project


def _project(root: Path, batches: list[list[tuple[str, str | None]]]) -> Path:
    """A project of random-noise images, one unlabeled ingest per batch of (name, part)."""
    rng = np.random.default_rng(0)
    project = root / "project"
    result = CliRunner().invoke(app, ["init", str(project), "--classes", "good,scratch", "--negative-class", "good", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    for number, rows in enumerate(batches):
        folder = root / f"batch{number}"
        folder.mkdir()
        with open(root / f"batch{number}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "part"])
            for name, part in rows:
                PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{name}.png")
                writer.writerow([str(folder / f"{name}.png"), "", part or ""])
        result = CliRunner().invoke(app, ["ingest", str(root / f"batch{number}.csv"), "--unlabeled", "--project", str(project), "--quiet"])
        assert result.exit_code == 0, result.output
    return project


def _state(project: Path, *, groups: list[list[str]] = (), limit: int = 200):  # noqa: ANN202
    """What the round knows when it draws: every ok image in id order, nobody labeled, the near-copy groups by name."""
    ctx = open_project(project)
    with session_scope(ctx.engine) as session:
        project_row = get_project(session)
        images = session.scalars(select(Image).where(Image.project_id == project_row.id, Image.status == "ok").order_by(Image.id)).all()
        round_row = Round(project_id=project_row.id, number=1)
        session.add(round_row)
        session.flush()
        rows = [(i.id, i.part, i.split, i.ingest_batch_id, Path(i.path).stem) for i in images]
        round_id = round_row.id
    config = load_config(project)
    config.split.unmeasured_batch_test_sample = limit
    position = {row[4]: p for p, row in enumerate(rows)}
    return types.SimpleNamespace(
        ctx=ctx, config=config, round_id=round_id, details={"coverage": {}}, held_back=set(), label_info={},
        image_ids=[r[0] for r in rows], parts=[r[1] for r in rows], names=[r[4] for r in rows],
        splits=np.array([r[2] for r in rows], dtype=object), ingest_batches=np.array([r[3] for r in rows]),
        coverage_groups=np.array([r[3] for r in rows]),  # each batch drawn from alone, as check_coverage does for large ones
        labels=np.full(len(rows), UNLABELED),
        near_duplicates=types.SimpleNamespace(summary={"groups": [[position[name] for name in group] for group in groups]}),
    ), position


def _test_images_asked_for_training(root: Path, *, push_status: str) -> Path:
    """10 images (a share of 2); img0 and img1 joined the test split while a failed round's training ask of each, with
    the model's guess, was never pushed (`push_status`: pending, or withdrawn since)."""
    project = _project(root, [[(f"img{i}", None) for i in range(10)]])
    with session_scope(open_project(project).engine) as session:
        failed = Round(project_id=get_project(session).id, number=7, status="failed")
        session.add(failed)
        session.flush()
        for image in session.scalars(select(Image)):
            if Path(image.path).stem in ("img0", "img1"):
                image.split = "test"
                session.add(Selection(round_id=failed.id, image_id=image.id, rank=0, score=0.5, strategy="margin", reason="uncertain",
                                      predicted_label="good", p_defect=0.1, push_status=push_status))
    return project


def _asked(state) -> list[int]:  # noqa: ANN001
    with session_scope(state.ctx.engine) as session:
        return list(session.scalars(select(Selection.image_id).where(Selection.round_id == state.round_id, Selection.reason == "test_sample")))


def test_a_set_reaching_far_beyond_the_batch_through_copies_is_not_drawn(tmp_path: Path) -> None:
    """Half of a batch's 20 images each have 20 near-copies in an older batch: drawing one asks 21 images for a share of 4."""
    project = _project(tmp_path, [[(f"old{i}", None) for i in range(200)],
                                  [(f"copied{i}", None) for i in range(10)] + [(f"alone{i}", None) for i in range(10)]])
    groups = [[f"copied{k}"] + [f"old{20 * k + j}" for j in range(20)] for k in range(10)]
    state, position = _state(project, groups=groups, limit=10)
    batch = int(state.ingest_batches[position["copied0"]])
    drawn = _draw_test_samples(state, [batch])
    assert len(drawn[batch]) == 4 and all(state.names[p].startswith("alone") for p in drawn[batch])
    assert len(_asked(state)) == 4  # not 21 for each copied image drawn


def test_a_batchs_test_images_nobody_asked_about_are_asked_and_count_toward_its_share(tmp_path: Path) -> None:
    """Later photos of parts already in test join test at ingest, unasked: they fill the batch's share only once asked."""
    project = _project(tmp_path, [[(f"first{i}", f"p{i}") for i in range(10)], [(f"later{i}", f"p{i}") for i in range(10)] + [(f"new{i}", None) for i in range(10)]])
    with session_scope(open_project(project).engine) as session:
        for image in session.scalars(select(Image).where(Image.part.in_(["p0", "p1"]))):
            image.split = "test"  # two parts drawn earlier (the first photos' asks are not this round's concern)
    state, position = _state(project)
    batch = int(state.ingest_batches[position["later0"]])
    drawn = _draw_test_samples(state, [batch])
    asked = {state.names[state.image_ids.index(i)] for i in _asked(state)}
    assert {"later0", "later1"} <= {state.names[p] for p in drawn[batch]} <= asked  # the unasked test photos of this batch, asked
    assert len(drawn[batch]) == 4  # the share: 20% of its 20 images, those two counted
    assert not {"first0", "first1"} & asked  # another batch's test photos are that batch's business


def test_a_batchs_unasked_test_images_beyond_its_share_are_asked_at_random_not_in_folder_order(tmp_path: Path) -> None:
    """A folder of 100 unlabeled test images (ingested with --split test), 50 of one class folder then 50 of another:
    a share of 20 asked in id order would all come from the first folder."""
    project = _project(tmp_path, [[(f"first_folder{i:02d}", None) for i in range(50)] + [(f"second_folder{i:02d}", None) for i in range(50)]])
    with session_scope(open_project(project).engine) as session:
        for image in session.scalars(select(Image)):
            image.split = "test"
    state, position = _state(project)
    batch = int(state.ingest_batches[position["first_folder00"]])
    drawn = _draw_test_samples(state, [batch])
    names = [state.names[p] for p in drawn[batch]]
    assert len(names) == 20 and sorted(_asked(state)) == sorted(state.image_ids[p] for p in drawn[batch])
    assert 5 <= sum(name.startswith("second_folder") for name in names) <= 15  # about half, as drawn at random


def test_a_part_with_a_quarantined_photo_in_the_pool_is_not_drawn(tmp_path: Path) -> None:
    project = _project(tmp_path, [[("a1", "p1"), ("a2", "p2"), ("b1", "p1")] + [(f"x{i}", None) for i in range(7)]])
    with session_scope(open_project(project).engine) as session:
        photo = session.scalars(select(Image).where(Image.path.like("%/b1.png"))).one()
        photo.status, photo.status_reason = "quarantined", "missing"
    state, position = _state(project)
    state.config.split.test_fraction = 0.99  # every set that may go, goes
    batch = int(state.ingest_batches[position["a1"]])
    drawn = _draw_test_samples(state, [batch])
    assert {state.names[p] for p in drawn[batch]} == {"a2", *(f"x{i}" for i in range(7))}  # p1's quarantined photo could not follow it
    with session_scope(open_project(project).engine) as session:
        assert session.scalar(select(func.count()).select_from(Image).where(Image.part == "p1", Image.split == "test")) == 0


def test_an_unasked_test_image_whose_copy_is_a_training_label_is_not_asked(tmp_path: Path) -> None:
    """Its label would be a test label with a copy in training: it stays unlabeled, and the share is drawn elsewhere."""
    project = _project(tmp_path, [[("trained", None)] + [(f"o{i}", None) for i in range(9)], [("t0", None)] + [(f"new{i}", None) for i in range(9)]])
    with session_scope(open_project(project).engine) as session:
        for image in session.scalars(select(Image)):
            image.split = {"trained": "train", "t0": "test"}.get(Path(image.path).stem, image.split)
    state, position = _state(project, groups=[["t0", "trained"]])
    state.labels[position["trained"]] = 0
    batch = int(state.ingest_batches[position["t0"]])
    drawn = _draw_test_samples(state, [batch])
    asked = {state.names[state.image_ids.index(i)] for i in _asked(state)}
    assert "t0" not in asked and len(drawn[batch]) == 2 and asked == {state.names[p] for p in drawn[batch]}


def test_a_test_image_whose_only_ask_was_withdrawn_is_asked_again_for_the_test_split(tmp_path: Path) -> None:
    """A training ask left pending by a failed round, withdrawn once its image joined test: nobody can see it."""
    project = _test_images_asked_for_training(tmp_path, push_status="withdrawn")
    state, position = _state(project)
    batch = int(state.ingest_batches[position["img0"]])
    drawn = _draw_test_samples(state, [batch])
    assert {state.names[p] for p in drawn[batch]} == {"img0", "img1"} and len(_asked(state)) == 2


def test_the_asks_of_a_batch_stay_within_its_share_and_the_overshoot_whatever_other_batches_its_sets_reach(tmp_path: Path) -> None:
    """Each of 20 images has 5 copies in an older batch: every set asks 6 images for 1 of the batch's own."""
    project = _project(tmp_path, [[(f"old{i}", None) for i in range(100)], [(f"b{i}", None) for i in range(20)]])
    state, position = _state(project, groups=[[f"b{k}"] + [f"old{5 * k + j}" for j in range(5)] for k in range(20)])
    state.config.split.test_fraction = 0.5  # a share of 10
    _draw_test_samples(state, [int(state.ingest_batches[position["b0"]])])
    assert len(_asked(state)) <= 10 + 5  # 60 before: 10 sets of 6


def test_an_image_two_batches_draw_in_one_round_is_asked_once(tmp_path: Path) -> None:
    project = _project(tmp_path, [[(f"a{i}", None) for i in range(10)], [(f"b{i}", None) for i in range(10)]])
    state, position = _state(project, groups=[["a0", "b0"]])
    state.config.split.test_fraction = 0.99
    _draw_test_samples(state, [int(state.ingest_batches[position["a0"]]), int(state.ingest_batches[position["b0"]])])
    asked = _asked(state)
    assert len(asked) == len(set(asked)) == state.details["coverage"]["n_asked_for_test"]


def test_a_test_sample_is_pushed_in_its_round_though_an_older_training_ask_of_its_image_is_withdrawn(tmp_path: Path) -> None:
    """push_batch withdraws by ask, not by image: the pending training ask goes, the test sample of the same image stays."""
    from rich.console import Console

    from labeling.base import PushReport
    from loop.round import push_batch

    class Recorder:
        name = "recorder"
        pushed: list[int] = []

        def push(self, *, session, project, round_id, batch):  # noqa: ANN001, ANN201
            Recorder.pushed = [task.image_id for task in batch]
            return PushReport(pushed=len(batch))

    project = _test_images_asked_for_training(tmp_path, push_status="pending")
    state, position = _state(project)
    batch = int(state.ingest_batches[position["img0"]])
    assert {state.names[p] for p in _draw_test_samples(state, [batch])[batch]} == {"img0", "img1"}
    state.backend, state.batch, state.batch_meta, state.console, state.number = Recorder(), [], [], Console(), 1
    state.position_of = {image_id: p for p, image_id in enumerate(state.image_ids)}
    push_batch(state)
    assert sorted(state.names[state.image_ids.index(i)] for i in Recorder.pushed) == ["img0", "img1"]
    with session_scope(state.ctx.engine) as session:
        statuses = {(s.reason, s.push_status) for s in session.scalars(select(Selection))}
    assert statuses == {("uncertain", "withdrawn"), ("test_sample", "pushed")}


def test_an_ingests_lane_is_kept_once_decided_unlike_by_kin_of_any_batch_and_like_only_when_both_checks_judged(tmp_path: Path) -> None:
    """Batch 1: a large batch of the new camera (60 images); batches 2-4: small days. Day 2's nearest labeled images
    are mostly batch 1's (kin of a large unlike batch: unlike); so are day 3's, though only one check could judge it
    ("unlike" is decided at once); day 4 was judged by both checks and is like. A lane kept in the notes is not
    decided again."""
    from collections import Counter

    from loop.round import COVERAGE_LANE_NOTE, _judging_groups
    from store.models import IngestBatch

    project = _project(tmp_path, [[(f"big{i}", None) for i in range(60)]] + [[(f"day{d}_{i}", None) for i in range(8)] for d in (2, 3, 4)])
    state, _ = _state(project)
    judge = dict(judged_by_both={1, 2, 4}, unlike={1},
                 nearest_batches={2: Counter({1: 6, 4: 2}), 3: Counter({1: 8}), 4: Counter({4: 7, 1: 1})})
    group_of, lanes, small = _judging_groups(state, **judge)
    assert lanes == {1: "unlike", 2: "unlike", 3: "unlike", 4: "like"} and small == {2, 3, 4}
    assert group_of[2] == group_of[3] == 2 and group_of[4] == 4  # groups of one lane
    with session_scope(state.ctx.engine) as session:
        notes = {b.id: (b.notes or {}).get(COVERAGE_LANE_NOTE) for b in session.scalars(select(IngestBatch))}
    assert notes == {1: "unlike", 2: "unlike", 3: "unlike", 4: "like"}
    # kept: judged again otherwise, the same days now read the other way
    assert _judging_groups(state, judged_by_both={1, 2, 3, 4}, unlike=set(), nearest_batches={})[1] == lanes
    # one check alone never fixes "like": a day judged by one check, unlike nothing, kin of nothing, has no lane yet
    fresh = _project(tmp_path / "fresh", [[(f"day{i}", None) for i in range(8)]])
    fresh_state, _ = _state(fresh)
    assert _judging_groups(fresh_state, judged_by_both=set(), unlike=set(), nearest_batches={1: Counter({1: 2})})[1] == {}
