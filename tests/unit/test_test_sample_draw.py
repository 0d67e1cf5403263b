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
        labels=np.full(len(rows), UNLABELED),
        near_duplicates=types.SimpleNamespace(summary={"groups": [[position[name] for name in group] for group in groups]}),
    ), position


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
