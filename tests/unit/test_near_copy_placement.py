"""Where a round places near-copies of test images (the pixel check's groups are given here, so no model runs): a copy
joins the test split with its whole part, unless its group or part already straddles the split; then an unlabeled copy
is held back from selection and a labeled one is placed as usual. Selections not pushed yet for such images are
withdrawn."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from sqlalchemy import select
from typer.testing import CliRunner

from labeling import create_backend
from loop.cli import app
from loop.project import open_project
from loop.round import RoundOptions, RoundState, gather_labeled_pool, load_images, place_new_labels, push_batch
from manifests import init_good_scratch_project, write_manifest
from store import session_scope
from store.models import AnnotationTask, Image, LabelEvent, Round, Selection
from store.queries import get_project


def test_near_copies_of_test_images_join_test_with_their_part_or_are_held_back(tmp_path: Path, class_folders: Path) -> None:
    good = sorted((class_folders / "good").glob("*.png"))
    scratch = sorted((class_folders / "scratch").glob("*.png"))
    t1, t2, t3, t4, t5, b, c, c2, a, x, y, z, x2, d, e, f, g, h, k, m = good[:20]
    project_dir = tmp_path / "project"
    runner = CliRunner()
    init_good_scratch_project(project_dir)
    for rows, split in (([(t1, "good", ""), (t2, "good", ""), (t3, "good", ""), (t4, "good", ""), (t5, "good", ""), (scratch[0], "scratch", "")], "test"),
                        ([(b, "good", "R"), (c, "good", ""), (c2, "good", ""), (scratch[1], "scratch", "")], "train"),
                        # A comes first: before, the part's first photo decided, and A (no copy) took part Q to train
                        ([(a, "", "Q"), (x, "", "Q"), (y, "", "Q"), (z, "", "Q"), (x2, "", "R"), (d, "", ""), (e, "", ""), (f, "", ""), (g, "", ""),
                          (h, "", "S"), (k, "", "S"), (m, "", "")],
                         "auto")):
        manifest = write_manifest(tmp_path / f"{split}.csv", rows)
        result = runner.invoke(app, ["ingest", str(manifest), "--project", str(project_dir), "--split", split, "--quiet"])
        assert result.exit_code == 0, result.output
    ctx = open_project(project_dir)
    with session_scope(ctx.engine) as session:
        ids = {file: image_id for file, image_id in session.execute(select(Image.path, Image.id)).all()}
        names = "t1 t2 t3 t4 t5 b c c2 s1 a x y z x2 d e f g h k m".split()
        ids = {name: ids[str(file)] for name, file in zip(names, (t1, t2, t3, t4, t5, b, c, c2, scratch[1], a, x, y, z, x2, d, e, f, g, h, k, m))}
        before = dict(session.execute(select(Image.id, Image.split)).all())
        for name, label in (("a", "scratch"), ("e", "good")):  # answered by annotators since the last round
            session.add(LabelEvent(image_id=ids[name], label=label, source="annotator", annotator="ann", external_id=f"test:{name}"))
    assert [before[ids[n]] for n in ("t1", "t2", "t3", "t4", "t5")] == ["test"] * 5
    assert {before[ids[n]] for n in ("b", "c", "c2")} <= {"train", "validation"}  # `--split train`: never test
    assert {before[ids[n]] for n in ("a", "x", "y", "z", "x2", "d", "e", "f", "g", "h", "k", "m")} == {"pool"}

    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False), console=Console(quiet=True))
    load_images(state)
    position = {name: state.image_ids.index(image_id) for name, image_id in ids.items()}
    state.near_duplicates = SimpleNamespace(summary={"groups": [
        [position["t1"], position["x"]],  # X's part Q joins test: A (labeled now) and Y (unlabeled) with it
        [position["t2"], position["x2"]],  # X2's part R is in train: the copies straddle the split
        [position["t3"], position["c"], position["d"], position["e"]],  # C in train already: D held back, E placed as usual
        [position["t4"], position["f"]],  # a plain copy
        [position["t5"], position["c2"], position["z"]],  # straddles, but Z's part Q joins test: Z goes with it
        # decided in the same round (a fixed point), not the next: Y joined with its part Q, so its copy H joins, and
        # with H its part S (K); A joined with part Q, and its copy M also copies a training image: M is held back
        [position["y"], position["h"]],
        [position["a"], position["s1"], position["m"]],
    ]})
    place_new_labels(state)

    with session_scope(ctx.engine) as session:
        after = dict(session.execute(select(Image.id, Image.split)).all())
    split_of = {name: after[image_id] for name, image_id in ids.items()}
    assert [split_of[n] for n in ("a", "x", "y", "z", "f", "h", "k")] == ["test"] * 7
    assert [split_of[n] for n in ("x2", "d", "g", "m")] == ["pool"] * 4
    assert split_of["e"] in ("train", "validation")
    assert state.held_back == {position["x2"], position["d"], position["m"]}  # unlabeled pool only; G has no copy and stays selectable
    assert state.details["near_copies_of_test_joined_test"] == 7 and state.details["newly_placed_labels"] == 2
    assert sorted(state.details["joined_test_image_ids"]) == sorted(ids[n] for n in ("a", "x", "y", "z", "f", "h", "k"))
    gather_labeled_pool(state)
    counts = state.details["labeled_counts"]
    assert (counts["unlabeled"], counts["held_back"], counts["unlabeled_test"]) == (1, 3, 6)  # G; X2, D, M; X, Y, Z, F, H, K (A is labeled)
    assert [state.splits[position[n]] for n in ids] == [after[ids[n]] for n in ids]  # the round's arrays follow the store

    # selections of earlier rounds that never reached the annotators: withdrawn where the image joined test or is held back
    with session_scope(ctx.engine) as session:
        project = get_project(session)
        round_row = Round(project_id=project.id, number=1, status="running")
        session.add(round_row)
        session.flush()
        state.round_id = round_row.id
        for rank, name in enumerate(("y", "x2", "g", "x")):
            session.add(Selection(round_id=round_row.id, image_id=ids[name], rank=rank, score=0.5, strategy="margin", reason="uncertain",
                                  predicted_label="good", push_status="failed"))
        # X's task reached the annotators before its push failed: its answer will come, so it is not withdrawn
        session.add(AnnotationTask(backend="none", image_id=ids["x"], external_task_id="17"))
    state.backend = create_backend("none")
    push_batch(state)
    with session_scope(ctx.engine) as session:
        status = {image_id: push_status for image_id, push_status in session.execute(select(Selection.image_id, Selection.push_status)).all()}
    assert [status[ids[n]] for n in ("y", "x2", "g", "x")] == ["withdrawn", "withdrawn", "recorded", "recorded"]
    assert state.details["push"]["withdrawn"] == 2


def test_a_labeled_near_copy_joins_its_copies_training_split_and_copies_of_asked_images_are_not_offered(tmp_path: Path, class_folders: Path) -> None:
    # a QA run (JPEG re-saves of earlier images): 3 copies of training images were placed in validation by a draw of
    # their own, and 11 of 200 picks were copies of images already labeled (their embeddings under selection's cosine)
    from loop.round import _selectable_positions

    good = sorted((class_folders / "good").glob("*.png"))
    scratch = sorted((class_folders / "scratch").glob("*.png"))
    project_dir = tmp_path / "project"
    runner = CliRunner()
    init_good_scratch_project(project_dir, validation_fraction=0.5)  # both training splits, from 20 images
    trained = [(file, "good", "") for file in good[:16]] + [(file, "scratch", "") for file in scratch[:4]]
    tested = [(file, "good", "") for file in good[30:34]] + [(file, "scratch", "") for file in scratch[4:6]]
    # the copy of a training image and another photo of its part, after it (P) and before it (R): id order must not matter
    parts = {good[17]: "P", good[23]: "P", good[24]: "R", good[27]: "R"}  # both parts would draw validation alone
    for rows, split in ((tested, "test"), (trained, "train"), ([(file, "", parts.get(file, "")) for file in good[16:30]], "auto")):
        result = runner.invoke(app, ["ingest", str(write_manifest(tmp_path / f"{split}.csv", rows)), "--project", str(project_dir), "--split", split, "--quiet"])
        assert result.exit_code == 0, result.output
    ctx = open_project(project_dir)
    with session_scope(ctx.engine) as session:
        split_of_path = {path: (image_id, split) for path, image_id, split in session.execute(select(Image.path, Image.id, Image.split)).all()}
    in_validation = [file for file, _l, _p in trained if split_of_path[str(file)][1] == "validation"]
    in_train = [file for file, _l, _p in trained if split_of_path[str(file)][1] == "train"]
    assert in_validation and in_train
    pool = good[16:30]
    copy_of_validation, copy_of_train, asked, copy_of_asked, twin_a, twin_b, free, same_part, q_first, never_delivered, copy_of_undelivered, q_copy = pool[:12]
    with session_scope(ctx.engine) as session:
        for file in (copy_of_validation, copy_of_train, same_part, q_first, q_copy):  # answered since the last round
            session.add(LabelEvent(image_id=split_of_path[str(file)][0], label="good", source="annotator", annotator="ann", external_id=f"t:{file.name}"))
        project = get_project(session)
        earlier = Round(project_id=project.id, number=1, status="completed")
        session.add(earlier)
        session.flush()
        for rank, (file, status) in enumerate(((asked, "pending"), (never_delivered, "withdrawn"))):  # the first goes out with this push
            session.add(Selection(round_id=earlier.id, image_id=split_of_path[str(file)][0], rank=rank, score=0.5, strategy="margin",
                                  reason="uncertain", predicted_label="good", push_status=status))
    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False), console=Console(quiet=True))
    load_images(state)
    at = {file: state.image_ids.index(split_of_path[str(file)][0]) for file in (*pool, in_validation[0], *in_train[:2])}
    state.near_duplicates = SimpleNamespace(summary={"groups": [
        [at[in_validation[0]], at[copy_of_validation]], [at[in_train[0]], at[copy_of_train]], [at[in_train[1]], at[q_copy]],
        [at[asked], at[copy_of_asked]], [at[twin_a], at[twin_b]], [at[never_delivered], at[copy_of_undelivered]]]})
    place_new_labels(state)
    with session_scope(ctx.engine) as session:
        after = dict(session.execute(select(Image.id, Image.split)).all())
    assert after[split_of_path[str(copy_of_validation)][0]] == "validation" and after[split_of_path[str(copy_of_train)][0]] == "train"
    assert after[split_of_path[str(same_part)][0]] == "train"  # its part went with the copy: never on both sides
    assert after[split_of_path[str(q_first)][0]] == after[split_of_path[str(q_copy)][0]] == "train"  # the copy's split, first or not
    assert state.details["labels_placed_with_their_near_copies"] == 3
    gather_labeled_pool(state)
    offered = {state.image_ids[p] for p in _selectable_positions(state)}
    assert split_of_path[str(copy_of_asked)][0] not in offered  # its copy was asked in round 1
    assert (split_of_path[str(twin_a)][0] in offered) != (split_of_path[str(twin_b)][0] in offered)  # one of two never asked
    assert split_of_path[str(free)][0] in offered and state.details["near_copies_not_offered"] == 3
    # a withdrawn ask asked nothing: its group is one nobody was asked about, and one of the two is offered (its own
    # image too: a withdrawn ask waits for nothing, QA saw such images never picked again once their file came back)
    assert (split_of_path[str(never_delivered)][0] in offered) != (split_of_path[str(copy_of_undelivered)][0] in offered)
