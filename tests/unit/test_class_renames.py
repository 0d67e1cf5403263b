"""The store keeps every class `loop rename-class` renamed, so an answer given later under an old name means its new one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select

from alembic import command
from store import session_scope, upgrade_schema
from store.db import alembic_config
from store.models import Image, LabelEvent, Project
from store.queries import record_class_rename, rename_label, renamed_classes

from small_store import small_store


def _project(classes: list[str], renames: dict | None = None) -> Project:
    return Project(name="p", root_dir="/tmp", classes=classes, class_renames=renames)


def test_renames_resolve_chains_to_a_class_and_leave_out_names_that_are_classes_again() -> None:
    project = _project(["good", "scratch_line", "spot"])
    assert renamed_classes(project) == {}
    record_class_rename(project, "scratch", "scratch_mark")
    record_class_rename(project, "scratch_mark", "scratch_line")  # a -> b -> c: a means c
    assert renamed_classes(project) == {"scratch": "scratch_line", "scratch_mark": "scratch_line"}
    record_class_rename(project, "spot", "spot_stain")  # not a class now (loop.toml not synced yet): left out
    assert "spot" not in renamed_classes(project)
    project.classes = ["good", "scratch_line", "spot_stain"]
    assert renamed_classes(project)["spot"] == "spot_stain"
    record_class_rename(project, "spot_stain", "spot")  # renamed back: spot is a class again and means itself
    project.classes = ["good", "scratch_line", "spot"]
    assert renamed_classes(project) == {"scratch": "scratch_line", "scratch_mark": "scratch_line", "spot_stain": "spot"}
    assert project.class_renames == {"scratch": "scratch_line", "scratch_mark": "scratch_line", "spot_stain": "spot"}  # chains resolved as kept
    project.classes = ["good", "scratch", "scratch_line", "spot"]  # a name made a class again (loop.toml) is not mapped
    assert "scratch" not in renamed_classes(project)
    assert renamed_classes(_project(["good"], {"a": "b", "b": "a"})) == {}  # a loop with no class in it


def test_a_chain_through_a_name_made_a_class_again_maps_to_where_the_answers_went() -> None:
    # a -> b, b -> c, then loop.toml makes b a (new, different) class: the answers once a are c now, and a later answer
    # under a was taken as the new b (the chain was followed at read time, through b)
    project = _project(["good", "b"])
    record_class_rename(project, "a", "b")
    project.classes = ["good", "c"]
    record_class_rename(project, "b", "c")
    project.classes = ["good", "c", "b"]
    assert renamed_classes(project) == {"a": "c"}
    assert project.class_renames == {"a": "c", "b": "c"}  # kept resolved: a never goes through b
    # renamed back (a -> b, then b -> a): a is a class again, b means a
    back = _project(["good", "b"])
    record_class_rename(back, "a", "b")
    back.classes = ["good", "a"]
    record_class_rename(back, "b", "a")
    assert (back.class_renames, renamed_classes(back)) == ({"b": "a"}, {"b": "a"})


def test_rename_label_keeps_the_rename_in_the_project_row(tmp_path: Path) -> None:
    engine, project_id, (image_id,) = small_store(tmp_path)
    with session_scope(engine) as session:
        session.add(LabelEvent(image_id=image_id, label="scratch", source="annotator", annotator="a"))
    with session_scope(engine) as session:
        assert rename_label(session, project_id, "scratch", "scratch_line") == (1, 1)
        session.get(Project, project_id).classes = ["good", "scratch_line"]
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        assert project.class_renames == {"scratch": "scratch_line"}
        assert renamed_classes(project) == {"scratch": "scratch_line"}
    engine.dispose()


def test_the_class_renames_column_comes_and_goes_with_its_migration(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    upgrade_schema(url)
    engine = create_engine(url)
    assert "class_renames" in {c["name"] for c in inspect(engine).get_columns("projects")}
    engine.dispose()
    command.downgrade(alembic_config(url), "0004")
    engine = create_engine(url)
    assert "class_renames" not in {c["name"] for c in inspect(engine).get_columns("projects")}
    engine.dispose()
    command.upgrade(alembic_config(url), "head")


def test_a_typo_in_the_old_name_is_said_as_such_not_answered_with_merge_advice(new_project, class_folders: Path) -> None:  # noqa: ANN001
    # QA: `rename-class nonesuch scratch` said "'scratch' already labels images ... give --merge"; with --merge, only
    # then, that nothing says 'nonesuch'
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.ingest import ingest_source

    ingest_source(new_project, class_folders, show_progress=False)
    result = CliRunner().invoke(app, ["rename-class", "nonesuch", "scratch", "--project", str(new_project.root)])
    assert result.exit_code == 2 and "no stored answer says 'nonesuch'" in result.output and "--merge" not in result.output


def test_a_copied_projects_class_error_names_the_copy_in_its_rename_hint(tmp_path: Path, class_folders: Path) -> None:
    # QA: a project folder copied elsewhere, a class dropped from the copy's loop.toml: the hint named the original
    # folder (the store's root_dir), and following it would have renamed the original project's labels
    import shutil

    from typer.testing import CliRunner

    from loop.cli import app
    from loop.config import load_config, save_config

    original, copy = tmp_path / "line-a", tmp_path / "line-a-copy"
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(original), "--classes", "good,scratch,spot,patch", "--negative-class", "good"]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(class_folders), "--project", str(original), "--quiet"]).exit_code == 0
    shutil.copytree(original, copy)
    config = load_config(copy)
    config.classes = ["good", "scratch", "spot"]
    save_config(copy, config)
    result = runner.invoke(app, ["ingest", str(class_folders / "good"), "--unlabeled", "--project", str(copy), "--quiet"])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and f"loop rename-class patch NEW_NAME --project {copy}`" in said, said


def test_a_rename_renames_the_labels_label_issues_name_and_a_merge_into_the_suggested_class_answers_them(tmp_path: Path) -> None:
    # QA: renamed suspects read as relabeled (export: 11 suspects became 8; the dashboard showed "relabeled"), and the
    # next round asked again about images asked before, keyed on a label name the rename had changed
    from store.export import export_source, image_records
    from store.models import LabelIssue, Round

    engine, project_id, (first, second) = small_store(tmp_path, n_images=2, classes=("good", "scratch", "spot"))
    with session_scope(engine) as session:
        session.add_all([LabelEvent(image_id=first, label="scratch", source="import"), LabelEvent(image_id=second, label="spot", source="import")])
        round_ = Round(project_id=project_id, number=1, status="completed", details={"class_names": ["good", "scratch", "spot"]})
        session.add(round_)
        session.flush()
        session.add_all([LabelIssue(round_id=round_.id, image_id=first, kind="label_error", given_label="scratch", suggested_label="good", score=0.1, rank=0),
                         LabelIssue(round_id=round_.id, image_id=second, kind="label_error", given_label="spot", suggested_label="scratch", score=0.2, rank=1)])

    def suspects() -> dict[int, tuple]:
        with session_scope(engine) as session:
            project = session.get(Project, project_id)
            records = image_records(session, project, export_source(session, project))
            return {r["image_id"]: (r["suspected_label_error"], r["suspected_label"], r["suggested_label"]) for r in records}

    assert suspects() == {first: (True, "scratch", "good"), second: (True, "spot", "scratch")}
    with session_scope(engine) as session:
        rename_label(session, project_id, "scratch", "scratch_line")
        session.get(Project, project_id).classes = ["good", "scratch_line", "spot"]
    assert suspects() == {first: (True, "scratch_line", "good"), second: (True, "spot", "scratch_line")}  # still suspects
    with session_scope(engine) as session:  # spot merged into the class suggested for it: that answers the suspicion
        rename_label(session, project_id, "spot", "scratch_line")
        session.get(Project, project_id).classes = ["good", "scratch_line"]
    assert suspects() == {first: (True, "scratch_line", "good"), second: (False, "scratch_line", "scratch_line")}
    engine.dispose()


def test_two_classes_renamed_in_loop_toml_at_once_are_renamed_one_at_a_time_as_the_message_says(tmp_path: Path, class_folders: Path) -> None:
    # QA: with two classes renamed in loop.toml, each `loop rename-class` said to rename the other first
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.config import load_config, save_config

    project, runner = tmp_path / "line", CliRunner()
    assert runner.invoke(app, ["init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good"]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(class_folders), "--project", str(project), "--quiet"]).exit_code == 0
    config = load_config(project)
    config.classes = ["good", "scratch_line", "dot", "patch"]
    save_config(project, config)
    refused = runner.invoke(app, ["rename-class", "scratch", "scratch_line", "--project", str(project)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "classes are renamed one at a time. Put 'spot' back in loop.toml's classes for now" in said, said
    config.classes = ["good", "scratch_line", "dot", "patch", "spot"]  # as the message says
    save_config(project, config)
    assert runner.invoke(app, ["rename-class", "scratch", "scratch_line", "--project", str(project)]).exit_code == 0
    config.classes = ["good", "scratch_line", "dot", "patch"]
    save_config(project, config)
    assert runner.invoke(app, ["rename-class", "spot", "dot", "--project", str(project)]).exit_code == 0


def test_a_folder_of_a_class_renamed_away_is_ingested_under_its_new_name(tmp_path: Path, class_folders: Path) -> None:
    # QA: after merging spot into scratch, ingesting the spot/ folder again was refused ("unknown classes 'spot'"), and
    # the advice, add it to loop.toml, undid the merge for its images
    import numpy as np
    from sqlalchemy import select

    from loop.cli import app
    from loop.project import open_project
    from loop.synthetic_images import synthetic_image
    from store.models import Image
    from store.queries import current_labels

    project, runner, _config = ingested_with_classes(tmp_path, class_folders, ["good", "scratch", "patch"])
    assert runner.invoke(app, ["rename-class", "spot", "scratch", "--merge", "--project", str(project)]).exit_code == 0
    new_spot = class_folders / "spot" / "spot_new.png"
    synthetic_image("spot", rng=np.random.default_rng(4242), size=64).save(new_spot)
    result = runner.invoke(app, ["ingest", str(class_folders), "--project", str(project)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "taken under their new names: 'spot' -> 'scratch'" in said, result.output
    with session_scope(open_project(project).engine) as session:
        labels = current_labels(session, 1)
        new_id = session.scalar(select(Image.id).where(Image.path == str(new_spot)))
    assert labels[new_id].label == "scratch" and all(label.label != "spot" for label in labels.values())


def test_status_flags_a_class_loop_toml_left_out_that_answers_still_name(tmp_path: Path, class_folders: Path) -> None:
    # QA: `loop status` listed it like any other class while the next round and ingest refused
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.config import load_config, save_config

    project, runner = tmp_path / "line", CliRunner()
    assert runner.invoke(app, ["init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good"]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(class_folders), "--project", str(project), "--quiet"]).exit_code == 0
    from loop.project import open_project
    from store.queries import current_labels

    with session_scope(open_project(project).engine) as session:  # every patch answered scratch since: no current label says patch
        session.add_all([LabelEvent(image_id=image_id, label="scratch", source="annotator", annotator="a")
                         for image_id, label in current_labels(session, 1).items() if label.label == "patch"])
    config = load_config(project)
    config.classes = ["good", "scratch", "spot"]
    save_config(project, config)
    said = " ".join(runner.invoke(app, ["status", "--project", str(project)], env={"COLUMNS": "200"}).output.split())
    assert "stored answers name 'patch', which loop.toml's classes leave out" in said, said  # as the round, which refuses
    assert f"loop rename-class patch NEW_NAME --project {project}" in said and "scratch (not in loop.toml)" not in said
    status = runner.invoke(app, ["status", "--project", str(project), "--json"]).output
    assert json.loads(status)["project"]["classes_left_out"] == ["patch"]


def test_an_export_names_an_older_rounds_predictions_by_the_classes_renamed_since(tmp_path: Path) -> None:
    # QA: after `loop rename-class fray frayed`, the export's label said frayed while predicted_label still said fray and
    # p_frayed was empty: a spreadsheet comparing label with prediction counted them as errors; a merge adds up
    from store.export import export_source, image_records
    from store.models import Prediction, Round

    engine, project_id, (image_id,) = small_store(tmp_path, classes=("good", "scratch", "spot"))
    with session_scope(engine) as session:
        round_ = Round(project_id=project_id, number=1, status="completed", details={"class_names": ["good", "scratch", "spot"]})
        session.add(round_)
        session.flush()
        session.add(Prediction(round_id=round_.id, image_id=image_id, predicted_label="spot", p_defect=0.9,
                               probabilities={"good": 0.1, "scratch": 0.3, "spot": 0.6}))
        project = session.get(Project, project_id)
        project.classes, project.class_renames = ["good", "scratch"], {"spot": "scratch"}  # spot merged into scratch
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        source = export_source(session, project)
        (record,) = list(image_records(session, project, source))
    assert record["predicted_label"] == "scratch" and record["p_scratch"] == pytest.approx(0.9) and record["p_good"] == pytest.approx(0.1)
    assert "p_spot" not in record


def test_an_export_after_a_defect_class_merged_into_the_good_one_gives_p_defect_by_the_classes_now(tmp_path: Path) -> None:
    # QA: after `rename-class spot good --merge --flip-defect`, p_good held p_spot too while p_defect still counted spot as a
    # defect (0.89 beside p_good 0.69); a plain rename, and a merge of two defect classes, leave p_defect as stored
    from store.export import export_source, image_records
    from store.models import Prediction, Round

    engine, project_id, image_ids = small_store(tmp_path, n_images=2, classes=("good", "scratch", "spot"))
    with session_scope(engine) as session:
        round_ = Round(project_id=project_id, number=1, status="completed", details={"class_names": ["good", "scratch", "spot"]})
        session.add(round_)
        session.flush()
        session.add(Prediction(round_id=round_.id, image_id=image_ids[0], predicted_label="spot", p_defect=0.75,
                               probabilities={"good": 0.25, "scratch": 0.15, "spot": 0.6}))
        session.add(Prediction(round_id=round_.id, image_id=image_ids[1], predicted_label="scratch", p_defect=0.9,
                               probabilities={"good": 0.1, "scratch": 0.7, "spot": 0.2}))
        project = session.get(Project, project_id)
        project.classes, project.class_renames = ["good", "scratch"], {"spot": "good"}
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        first, second = image_records(session, project, export_source(session, project))
    assert (first["predicted_label"], first["p_good"], first["p_defect"]) == ("good", pytest.approx(0.85), pytest.approx(0.15))
    assert (second["predicted_label"], second["p_good"], second["p_defect"]) == ("scratch", pytest.approx(0.3), pytest.approx(0.7))
    with session_scope(engine) as session:  # a merge of two defect classes: p_defect as the round stored it
        project = session.get(Project, project_id)
        project.class_renames = {"spot": "scratch"}
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        first, second = image_records(session, project, export_source(session, project))
    assert (first["p_defect"], second["p_defect"]) == (0.75, 0.9)
    engine.dispose()


def test_a_rename_that_turns_defects_into_good_parts_or_back_needs_flip_defect(tmp_path: Path, class_folders: Path) -> None:
    # QA: `rename-class fray free --merge` made 18 defects, 4 of them in the frozen test split, good parts without a word

    from loop.cli import app
    from loop.config import save_config
    from loop.project import open_project
    from store.queries import current_labels

    project, runner, config = ingested_with_classes(tmp_path, class_folders, ["good", "scratch", "spot"])
    refused = runner.invoke(app, ["rename-class", "patch", "good", "--merge", "--project", str(project)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "'patch' labeled defects: renaming it to 'good' makes its 6 labeled images (1 in the frozen test split) good parts" in said, said
    assert "--flip-defect" in said
    with session_scope(open_project(project).engine) as session:
        assert sum(label.label == "patch" for label in current_labels(session, 1).values()) == 6  # nothing changed
        # review: images relabeled since were counted as changing sides; counted are those OLD labels now
        from store.models import LabelEvent
        relabeled = sorted(i for i, label in current_labels(session, 1).items() if label.label == "patch")[:4]
        session.add_all(LabelEvent(image_id=image_id, label="spot", source="annotator", action="set") for image_id in relabeled)
    said = " ".join(runner.invoke(app, ["rename-class", "patch", "good", "--merge", "--project", str(project)]).output.split())
    assert "makes its 2 labeled images" in said, said
    # another defect class is no flip
    assert runner.invoke(app, ["rename-class", "patch", "spot", "--merge", "--project", str(project)]).exit_code == 0
    # the negative class renamed as the negative class is no flip either; renamed into a defect class, it is
    config.classes, config.negative_class = ["ok", "scratch", "spot"], "ok"
    save_config(project, config)
    assert runner.invoke(app, ["rename-class", "good", "ok", "--project", str(project)]).exit_code == 0
    config.classes, config.negative_class = ["scratch", "spot", "good"], "good"  # 'ok', the store's negative class, left out
    save_config(project, config)
    flipped = runner.invoke(app, ["rename-class", "ok", "scratch", "--merge", "--project", str(project)])
    assert flipped.exit_code == 2 and "'ok' labeled good parts ('ok' was the negative class)" in " ".join(flipped.output.split())
    assert runner.invoke(app, ["rename-class", "ok", "scratch", "--merge", "--flip-defect", "--project", str(project)]).exit_code == 0


def ingested_with_classes(tmp_path: Path, class_folders: Path, classes: list[str]):  # noqa: ANN201
    """(project folder, CLI runner, its config): the class folders ingested under good, scratch, spot and patch, then
    loop.toml's classes set to `classes` (a class left out, to rename)."""
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.config import load_config, save_config

    project, runner = tmp_path / "line", CliRunner()
    assert runner.invoke(app, ["init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good"]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(class_folders), "--project", str(project), "--quiet"]).exit_code == 0
    config = load_config(project)
    config.classes = classes
    save_config(project, config)
    return project, runner, config


def test_a_vote_for_a_defect_class_in_a_tie_changes_sides_too(tmp_path: Path, class_folders: Path) -> None:
    # review: with no image labeled OLD alone (every one a patch/spot tie), `patch -> good --merge` passed without
    # --flip-defect and the defect votes became good-part votes
    from loop.cli import app
    from loop.project import open_project
    from store.models import LabelEvent
    from store.queries import current_labels

    project, runner, _config = ingested_with_classes(tmp_path, class_folders, ["good", "scratch", "spot"])
    with session_scope(open_project(project).engine) as session:
        patch = sorted(i for i, label in current_labels(session, 1).items() if label.label == "patch")
        for image_id in patch:  # two annotators disagree: a tie, the import's label superseded
            session.add(LabelEvent(image_id=image_id, label="patch", source="annotator", action="set", annotator="a"))
            session.add(LabelEvent(image_id=image_id, label="spot", source="annotator", action="set", annotator="b"))
    with session_scope(open_project(project).engine) as session:
        assert {current_labels(session, 1)[i].status for i in patch} == {"tie"}
    refused = runner.invoke(app, ["rename-class", "patch", "good", "--merge", "--project", str(project)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and f"makes its 0 labeled images (0 in the frozen test split), and the votes for it in {len(patch)} tied images," in said, said


def test_the_oracle_answers_a_class_renamed_since_its_manifest_under_the_new_name(tmp_path: Path) -> None:
    # QA (stop 37): after `loop rename-class`, the oracle rejected every answer its manifest gave under the old name
    # ("not one of the classes: fix the manifest"), while Label Studio's answers under it count for the new class
    from labeling.simulated import OracleAnnotator
    from store.models import Round, Selection

    engine, project_id, image_ids = small_store(tmp_path, n_images=2, classes=("good", "scratch_line"))
    manifest = tmp_path / "truth.csv"
    manifest.write_text("path,label\n/x/0.png,scratch\n/x/1.png,good\n")
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        record_class_rename(project, "scratch", "scratch_line")
        round_ = Round(project_id=project_id, number=1, status="completed")
        session.add(round_)
        session.flush()
        session.add_all([Selection(round_id=round_.id, image_id=image_id, rank=rank, score=1.0, strategy="default", reason="uncertain", push_status="pushed")
                         for rank, image_id in enumerate(image_ids)])
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        report = OracleAnnotator(manifest=manifest, classes=project.classes).pull(session=session, project=project, round_id=None)
        assert (report.new_label_events, report.rejected, report.warnings) == (2, 0, [])
        assert sorted(session.scalars(select(LabelEvent.label))) == ["good", "scratch_line"]
    # with noise, a wrong answer is another class than the one the old name means now: never "scratch_line" for image 0
    noisy = OracleAnnotator(manifest=manifest, classes=["good", "scratch_line"], noise_rate=0.999)
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        image = session.get(Image, image_ids[0])
        assert noisy.answer(image, renames=renamed_classes(project)) == "good"
    engine.dispose()


def test_test_labels_a_rename_moved_since_the_last_round_are_counted(tmp_path: Path) -> None:
    # QA: `rename-class uneven free --merge --flip-defect` turned a test defect into a good part (the FPR denominator
    # went 3 -> 4) and the next round said "relabeled: 0": a rename rewrites the answers in place, no event is new
    from datetime import datetime, timezone

    from loop.round import _test_labels_changed
    from store.models import Round
    from store.queries import current_labels
    from store.reports import test_split_changed, test_split_renames_text

    engine, project_id, image_ids = small_store(tmp_path, n_images=3, classes=("free", "crack", "uneven"))
    with session_scope(engine) as session:
        for image_id, label in zip(image_ids, ["free", "uneven", "crack"]):
            session.add(LabelEvent(image_id=image_id, label=label, source="import", created_at=datetime(2026, 1, 1, tzinfo=timezone.utc)))
        session.add(Round(project_id=project_id, number=1, status="completed", details={
            "labels_read_at": "2026-01-02T00:00:00", "confusion_matrix": {"labels": ["free", "crack", "uneven"], "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}}))
    with session_scope(engine) as session:
        rename_label(session, project_id, "uneven", "free")
        session.get(Project, project_id).classes = ["free", "crack"]
    with session_scope(engine) as session:
        changed, moved = _test_labels_changed(session, project_id=project_id, test_ids=image_ids, labels=current_labels(session, project_id))
    engine.dispose()
    assert (changed["relabeled"], changed["relabeled_by_rename"], changed["renamed_test_labels"], moved) == (0, 1, {"uneven -> free": 1}, set())
    assert test_split_changed(changed) and test_split_renames_text(changed) == "; 1 by loop rename-class (uneven -> free: 1)"


def test_a_plain_rename_does_not_read_as_test_labels_changed() -> None:
    # review: fray -> frayed_edge (or the good class free -> good) scores the same labels under another name, yet read
    # as "test labels changed"; a merge, and a move between good and defect, do change them
    from loop.round import _test_labels_renamed

    matrix = {"labels": ["free", "crack", "fray", "uneven"], "matrix": [[3, 0, 0, 0], [0, 2, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]]}
    project = _project(["good", "crack", "frayed_edge"], {"free": "good", "fray": "frayed_edge", "uneven": "crack"})
    assert _test_labels_renamed(matrix, project) == {"uneven -> crack": 1}
    flipped = _project(["free", "fray", "uneven_surface"], {"crack": "free", "uneven": "uneven_surface"})  # a defect into the good class
    assert _test_labels_renamed(matrix, flipped) == {"crack -> free": 2}
    # two classes merged under a new name (review: fray and uneven into frayed_edge read as no change)
    together = _project(["free", "crack", "frayed_edge"], {"fray": "frayed_edge", "uneven": "frayed_edge"})
    assert _test_labels_renamed(matrix, together) == {"fray -> frayed_edge": 4, "uneven -> frayed_edge": 1}
