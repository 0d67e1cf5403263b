"""Near-copies that one ingest's per-file draws put on both sides of the test split are put on one side by the next
round, before any round measured them (a QA run: 6 of 30 JPEG re-saves of training images drawn into test). The pixel
check's groups are given here, so no model runs."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from sqlalchemy import func, select
from typer.testing import CliRunner

from loop.cli import app
from loop.project import open_project
from loop.round import RoundOptions, RoundState, load_images, place_new_labels, regroup_unmeasured_copies
from manifests import init_good_scratch_project, write_manifest
from store import session_scope
from store.models import Image, LabelEvent, Prediction, Round
from store.queries import get_project


def test_copies_drawn_apart_by_one_ingest_are_put_on_one_side_before_anything_measures_them(tmp_path: Path, class_folders: Path) -> None:
    good = sorted((class_folders / "good").glob("*.png"))
    scratch = sorted((class_folders / "scratch").glob("*.png"))
    project_dir = tmp_path / "project"
    runner = CliRunner()
    init_good_scratch_project(project_dir, test_fraction=0.4, validation_fraction=0.3)  # every split well filled from 40 images
    drawn = [(file, "good", "") for file in good[:30]] + [(file, "scratch", "") for file in scratch[:10]]
    explicit_test = [(file, "good", "") for file in good[30:33]]
    explicit_train = [(file, "good", "") for file in good[33:36]]
    with_part = [(good[36], "good", "P"), (good[37], "good", "")]
    # ingested unlabeled first (`auto`), then labeled by a --split test / --split train manifest: placed as asked, they
    # anchor their groups (a review: their first batch's mode made them look drawn)
    later_placed = [(good[38], "", ""), (good[39], "", "")]
    for name, rows, split in (("explicit_test", explicit_test, "test"), ("explicit_train", explicit_train, "train"), ("drawn", drawn, "auto"),
                              ("with_part", with_part, "auto"), ("later_placed", later_placed, "auto"),
                              ("later_test", [(good[38], "good", "")], "test"), ("later_train", [(good[39], "good", "")], "train")):
        result = runner.invoke(app, ["ingest", str(write_manifest(tmp_path / f"{name}.csv", rows)), "--project", str(project_dir), "--split", split, "--quiet"])
        assert result.exit_code == 0, result.output
    ctx = open_project(project_dir)
    with session_scope(ctx.engine) as session:
        rows = session.execute(select(Image.path, Image.id, Image.split).order_by(Image.id)).all()
        drawn_flags = dict(session.execute(select(Image.path, Image.split_drawn)).all())
    # what the round reads to know which splits were drawn: labeled at ingest, `auto`, no part
    assert [drawn_flags[str(file)] for file, _l, _p in drawn] == [True] * 40
    assert {drawn_flags[str(file)] for file in (*good[30:37], good[38], good[39])} == {None}
    assert drawn_flags[str(good[37])] is True
    image_id = {path: i for path, i, _s in rows}
    split_at_ingest = {i: s for _p, i, s in rows}
    in_split = {split: [image_id[str(file)] for file, _l, _p in drawn if split_at_ingest[image_id[str(file)]] == split]
                for split in ("test", "train", "validation")}
    assert all(len(ids) >= 4 for ids in in_split.values()), in_split
    test_ids, train_ids, validation_ids = (sorted(in_split[s]) for s in ("test", "train", "validation"))
    # a drawn test image ingested before a drawn training image, and one after another
    first_test, later_train = next((t, r) for t in test_ids for r in train_ids if t < r)
    first_train, later_test = next((r, t) for r in train_ids for t in test_ids if r < t and t != first_test and r != later_train)
    used = {first_test, later_train, first_train, later_test}
    spare_test = [t for t in test_ids if t not in used]
    spare_train = [r for r in train_ids if r not in used]
    measured_test, copy_of_measured = spare_test[0], spare_train[0]
    copy_of_explicit_train = spare_test[1]
    copy_of_explicit_test = validation_ids[0]
    assert len(spare_test) >= 5, spare_test
    straddling_copy = spare_test[2]
    placed_test_later, placed_train_later = image_id[str(good[38])], image_id[str(good[39])]
    test_copy_of_placed_test, validation_copy_of_placed_test, test_copy_of_placed_train = spare_test[3], validation_ids[3], spare_test[4]
    validation_first, train_after = validation_ids[1], next(r for r in spare_train[1:] if r > validation_ids[1])
    part_photo, copy_of_part_photo = image_id[str(good[36])], image_id[str(good[37])]
    anchor_train = [image_id[str(file)] for file, _l, _p in explicit_train]
    anchor_test = [image_id[str(file)] for file, _l, _p in explicit_test]
    with session_scope(ctx.engine) as session:  # round 1 measured one drawn test image (it has a prediction)
        project = get_project(session)
        earlier = Round(project_id=project.id, number=1, status="completed")
        session.add(earlier)
        session.flush()
        session.add(Prediction(round_id=earlier.id, image_id=measured_test, predicted_label="good", p_defect=0.1, probabilities={"good": 0.9, "scratch": 0.1}))
        part_split = session.get(Image, part_photo).split
    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False), console=Console(quiet=True))
    load_images(state)
    at = {i: p for p, i in enumerate(state.image_ids)}
    groups = [
        [first_test, later_train],  # no anchor: the first-ingested copy's draw decides -> test
        [first_train, later_test],  # -> train
        [anchor_train[0], copy_of_explicit_train],  # placed by --split train: the drawn test copy follows it
        [anchor_test[0], copy_of_explicit_test],  # placed by --split test: the drawn validation copy follows it
        [measured_test, copy_of_measured],  # a round measured the test image: the training copy joins test
        [anchor_test[1], anchor_train[1], straddling_copy],  # leaks already, anchored on both sides: the drawn test copy leaves test
        [validation_first, train_after],  # both training splits: the first copy's
        [part_photo, copy_of_part_photo],  # a part's photo is an anchor
        [placed_test_later, test_copy_of_placed_test, validation_copy_of_placed_test],  # placed by a later --split test: copies join it
        [test_copy_of_placed_train, placed_train_later],  # placed by --split train, after the drawn copy: never into test
    ]
    state.near_duplicates = SimpleNamespace(summary={"groups": [[at[i] for i in group] for group in groups]})
    with session_scope(ctx.engine) as session:
        running = Round(project_id=get_project(session).id, number=2, status="running")
        session.add(running)
        session.flush()
        state.round_id = running.id
    regroup_unmeasured_copies(state)
    with session_scope(ctx.engine) as session:
        after = dict(session.execute(select(Image.id, Image.split)).all())
    assert after[later_train] == "test" and after[first_test] == "test"
    assert after[later_test] == "train" and after[first_train] == "train"
    assert after[copy_of_explicit_train] == after[anchor_train[0]] != "test"
    assert after[copy_of_explicit_test] == "test"
    assert after[copy_of_measured] == "test" and after[measured_test] == "test"
    assert [after[i] for i in (anchor_test[1], anchor_train[1])] == [split_at_ingest[i] for i in (anchor_test[1], anchor_train[1])]
    assert after[straddling_copy] == after[anchor_train[1]] != "test"
    assert after[placed_test_later] == after[test_copy_of_placed_test] == after[validation_copy_of_placed_test] == "test"
    assert after[test_copy_of_placed_train] == after[placed_train_later] == split_at_ingest[placed_train_later] != "test"
    assert after[validation_first] == after[train_after] == "validation"
    assert after[part_photo] == part_split and after[copy_of_part_photo] == part_split
    moved = {later_train, later_test, copy_of_explicit_train, copy_of_explicit_test, copy_of_measured, train_after, straddling_copy, validation_copy_of_placed_test,
             test_copy_of_placed_train}
    if split_at_ingest[copy_of_part_photo] != part_split:
        moved.add(copy_of_part_photo)
    unmoved = set(after) - moved
    assert all(after[i] == split_at_ingest[i] for i in unmoved)
    record = state.details["unmeasured_copies_regrouped"]
    assert record["moved"] == len(moved) and sorted(record["image_ids"]) == sorted(moved)
    with session_scope(ctx.engine) as session:  # recorded with the moves: a round killed after this step still says what moved
        assert session.get(Round, state.round_id).details["unmeasured_copies_regrouped"] == record
    assert record["out_of_test"] == sum(split_at_ingest[i] == "test" for i in moved) >= 2
    assert record["into_test"] == sum(after[i] == "test" for i in moved) >= 3
    assert [state.splits[at[i]] for i in state.image_ids] == [after[i] for i in state.image_ids]  # the round's arrays follow the store

    # the next step sees the new splits: nothing it places lands beside a moved copy's old split
    place_new_labels(state)
    with session_scope(ctx.engine) as session:
        assert dict(session.execute(select(Image.id, Image.split)).all()) == after

    # images ingested before split_drawn was recorded (NULL) anchor their groups: nothing moves again
    with session_scope(ctx.engine) as session:
        for image in session.scalars(select(Image)):
            image.split_drawn = None
        session.get(Image, later_test).split = "test"  # apart again, as an older version left it
    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False), console=Console(quiet=True))
    load_images(state)
    state.near_duplicates = SimpleNamespace(summary={"groups": [[state.image_ids.index(first_train), state.image_ids.index(later_test)]]})
    regroup_unmeasured_copies(state)
    assert state.details["unmeasured_copies_regrouped"]["moved"] == 0


def test_images_labeled_by_a_later_manifest_wait_in_the_pool_for_the_rounds_near_copy_check(tmp_path: Path, class_folders: Path) -> None:
    # QA: re-saves of test images ingested --unlabeled, then labeled by a manifest, were placed in train at ingest, before
    # any pixel check, and leaked their test originals from then on
    good = sorted((class_folders / "good").glob("*.png"))
    project_dir = tmp_path / "project"
    runner = CliRunner()
    init_good_scratch_project(project_dir)
    held_out = write_manifest(tmp_path / "test.csv", [(file, "good", "") for file in good[:4]])
    unlabeled = write_manifest(tmp_path / "unlabeled.csv", [(file, "", "") for file in good[4:10]])
    labels = write_manifest(tmp_path / "labels.csv", [(file, "good", "") for file in good[4:10]])
    for manifest, flags in ((held_out, ["--split", "test"]), (unlabeled, []), (labels, [])):
        result = runner.invoke(app, ["ingest", str(manifest), "--project", str(project_dir), "--quiet", *flags])
        assert result.exit_code == 0, result.output
    assert "6 images already ingested unlabeled got their labels; they stay in the pool until the next round" in " ".join(result.output.split())
    ctx = open_project(project_dir)
    with session_scope(ctx.engine) as session:
        split_of = {path: (image_id, split) for path, image_id, split in session.execute(select(Image.path, Image.id, Image.split))}
    assert [split_of[str(file)][1] for file in good[4:10]] == ["pool"] * 6
    # still waiting, two listed again with the same labels by a held-out set and two by --split train: placed as asked,
    # with no second label event (a review: passed over as unchanged labels, then placed by the round for training)
    for name, files, split in (("held", good[8:9], "test"), ("kept", good[9:10], "train")):
        result = runner.invoke(app, ["ingest", str(write_manifest(tmp_path / f"{name}.csv", [(file, "good", "") for file in files])),
                                     "--project", str(project_dir), "--quiet", "--split", split])
        assert result.exit_code == 0, result.output
    with session_scope(ctx.engine) as session:
        placed = {path: split for path, split in session.execute(select(Image.path, Image.split))}
        events = session.scalar(select(func.count()).select_from(LabelEvent).where(LabelEvent.image_id.in_([split_of[str(f)][0] for f in good[8:10]])))
    assert (placed[str(good[8])], placed[str(good[9])] in ("train", "validation"), events) == ("test", True, 2)
    split_of = {path: (image_id, placed[path]) for path, (image_id, _split) in split_of.items()}
    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False), console=Console(quiet=True))
    load_images(state)
    at = {file: state.image_ids.index(split_of[str(file)][0]) for file in good[:10]}
    assert all(state.labels[at[file]] >= 0 for file in good[4:10])  # labeled, in the pool
    state.near_duplicates = SimpleNamespace(summary={"groups": [[at[good[0]], at[good[4]]], [at[good[1]], at[good[5]]]]})
    place_new_labels(state)
    with session_scope(ctx.engine) as session:
        after = dict(session.execute(select(Image.id, Image.split)).all())
    assert [after[split_of[str(file)][0]] for file in good[4:6]] == ["test", "test"]  # beside their test originals
    assert {after[split_of[str(file)][0]] for file in good[6:8]} <= {"train", "validation"}  # the others as labels are placed
    assert after[split_of[str(good[8])][0]] == "test"
