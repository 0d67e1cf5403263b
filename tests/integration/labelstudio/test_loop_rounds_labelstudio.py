"""`loop round` with the Label Studio backend, end to end against the real server: round 1 pushes its batch with the
model's guesses, annotators answer in Label Studio (agreeing, correcting, an unknown label, a two-annotator tie),
round 2 pulls every answer into the store and trains on it."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from labelstudio_harness import ANNOTATOR_A, ANNOTATOR_B, report_line
from labeling import labelstudio_client as lsc
from loop.cli import app
from loop.project import open_project
from store import session_scope
from store.models import AnnotationTask, Image, LabelEvent, Prediction, RejectedAnnotation, Round, Selection
from store.queries import current_labels

pytestmark = pytest.mark.labelstudio
runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_two_loop_rounds_through_label_studio(tmp_path: Path, class_folders: Path, labelstudio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(labelstudio.document_root))
    files = sorted(class_folders.rglob("*.png"))
    truth = {str(p): p.parent.name for p in files}
    manifest = tmp_path / "labels.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for i, path in enumerate(files):
            writer.writerow([str(path), truth[str(path)] if i % 3 else ""])
    project = tmp_path / "ls-project"
    invoke("init", str(project), "--name", f"loop-e2e-{tmp_path.name}", "--classes", "good,scratch,spot,patch", "--negative-class", "good",
           "--annotator", "labelstudio", "--budget", "6", "--image-size", "96")
    invoke("ingest", str(manifest), "--project", str(project), "--quiet")

    invoke("round", "--project", str(project), "--quiet")
    ctx = open_project(project)
    with session_scope(ctx.engine) as session:
        tasks = {row.image_id: (int(row.external_task_id), int(row.external_project_id)) for row in session.scalars(select(AnnotationTask))}
        paths = {i.id: i.path for i in session.scalars(select(Image))}
        round_one = session.scalars(select(Round).where(Round.number == 1)).one()
        assert round_one.details["push"]["pushed"] == len(tasks) >= 6 and round_one.details["push"]["pending"] == 0
    ls_project = next(iter(tasks.values()))[1]
    admin = labelstudio.admin()
    listed = list(admin.tasks.list(project=ls_project, fields="all"))
    assert len(listed) == len(tasks)
    assert all(task.predictions for task in listed)  # the model's guess is pre-filled, model_version = round-1
    assert {p.model_version for t in listed for p in t.predictions} == {"round-1"}

    # Annotators answer in Label Studio, as people would through its API.
    annotator_a, annotator_b = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.as_annotator(ANNOTATOR_B)
    image_ids = sorted(tasks)
    unknown_image, tie_image, agreeing = image_ids[0], image_ids[1], image_ids[2:]
    for image_id in agreeing:
        annotator_a.annotations.create(id=tasks[image_id][0], result=lsc.choice_result(truth[paths[image_id]]), lead_time=2.5)
    annotator_a.annotations.create(id=tasks[unknown_image][0], result=lsc.choice_result("dent"), lead_time=1.0)
    annotator_a.annotations.create(id=tasks[tie_image][0], result=lsc.choice_result("scratch"), lead_time=1.0)
    annotator_b.annotations.create(id=tasks[tie_image][0], result=lsc.choice_result("spot"), lead_time=1.0)

    second = " ".join(invoke("round", "--project", str(project), "--quiet").output.split())
    # what the pull took in is said, with why an answer could not be used
    assert f"pulled from the annotators: {len(agreeing) + 2} new answers, 1 rejected" in second
    assert "rejected: answer" in second and "label 'dent' is not a class of project" in second
    assert json.loads(invoke("status", "--project", str(project), "--json").output)["rounds"][-1]["pull"]["rejected"] == 1
    # and `loop status` says it too, for the newest completed round (QA: only the round's own output did)
    status_text = " ".join(invoke("status", "--project", str(project)).output.split())
    assert f"round 2 pulled from the annotators: {len(agreeing) + 2} new answers, 1 rejected" in status_text
    with session_scope(ctx.engine) as session:
        labels = current_labels(session, round_one.project_id)
        for image_id in agreeing:
            assert (labels[image_id].label, labels[image_id].source) == (truth[paths[image_id]], "annotator")
        assert labels[tie_image].status == "tie"  # kept out of training, never guessed
        rejected = session.scalars(select(RejectedAnnotation)).all()
        assert len(rejected) == 1 and "dent" in rejected[0].reason
        round_two = session.scalars(select(Round).where(Round.number == 2)).one()
        events = session.scalars(select(LabelEvent).where(LabelEvent.source == "annotator")).all()
        assert len({e.external_id for e in events}) == len(agreeing) + 2  # agreeing + both tie answers
        assert all(e.lead_time_s for e in events)
        assert round_two.details["training"]["n_fit"] > round_one.details["training"]["n_fit"]
        assert round_two.details["label_counts_by_source"]["annotator"] == len(agreeing)
        # The model changed: its test-split probabilities moved.
        test_ids = [i.id for i in session.scalars(select(Image).where(Image.split == "test"))]
        def probs(round_id: int) -> dict:  # noqa: E306
            return {p.image_id: p.probabilities for p in session.scalars(select(Prediction).where(Prediction.round_id == round_id, Prediction.image_id.in_(test_ids)))}
        assert probs(round_one.id) != probs(round_two.id)
        metric_names = {m.name for m in round_two.metrics}
        assert "annotator_mean_agreement" in metric_names
        # round two's batch reached Label Studio too, pre-annotated by round two's model, which annotators now see
        push_two = round_two.details["push"]
        assert push_two["pushed"] >= 1 and push_two["pending"] == 0 and push_two["warnings"] == [], push_two
    assert admin.projects.get(id=ls_project).model_version == "round-2"
    assert "round-2" in {p.model_version for t in admin.tasks.list(project=ls_project, fields="all") for p in t.predictions}

    # The answer 'dent' (not a class) left image "unknown" without a label while Label Studio counted its task done: round
    # two asked again in that task, which is open again; annotator B answers it there.
    rejected_task = admin.tasks.get(id=str(tasks[unknown_image][0]))
    assert (rejected_task.overlap, rejected_task.is_labeled) == (2, False) and "the answer given ('dent') is not one of this project's classes" in rejected_task.data["why"]
    annotator_b.annotations.create(id=tasks[unknown_image][0], result=lsc.choice_result(truth[paths[unknown_image]]), lead_time=1.0)

    # Round three, nobody answered round two's tasks: they keep a pre-selection, now round three's guess; the tie from
    # round one waits for its third answer; the rejected answer's question is settled and its task closed again
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(ctx.engine) as session:
        round_three = session.scalars(select(Round).where(Round.number == 3)).one()
        round_two_ids = set(session.scalars(select(Selection.image_id).where(Selection.round_id == round_two.id, Selection.reason != "annotators_disagree")))
        push_three = round_three.details["push"]
        asked_tie = session.scalars(select(Selection.round_id).where(Selection.image_id == tie_image, Selection.reason == "annotators_disagree")).all()
    # (the rejected answer's image, answered again since, waits for nothing; the tie gets no guess: its annotators are
    # not anchored on a third class, QA)
    assert push_three["pending"] == 0 and push_three["warnings"] == [] and push_three["refreshed"] >= len(round_two_ids - {unknown_image}) >= 1, push_three
    assert admin.projects.get(id=ls_project).model_version == "round-3"
    waiting = [t for t in admin.tasks.list(project=ls_project, fields="all") if t.data["defect_loop_image_id"] in round_two_ids and not t.annotations]
    assert waiting and all("round-3" in {p.model_version for p in t.predictions} for t in waiting)
    assert asked_tie == [round_two.id]  # asked once, in round two, right after the answers that tied it
    with session_scope(ctx.engine) as session:
        asked_rejected = session.scalars(select(Selection.round_id).where(Selection.image_id == unknown_image, Selection.reason == "answer_rejected")).all()
        assert current_labels(session, round_one.project_id)[unknown_image].label == truth[paths[unknown_image]]
    assert asked_rejected == [round_two.id] and push_three["closed"] == 1
    rejected_task = admin.tasks.get(id=str(tasks[unknown_image][0]))
    assert rejected_task.is_labeled is True and "reopened_from_overlap" not in rejected_task.data
    tie_task = admin.tasks.get(id=str(tasks[tie_image][0]))
    assert tie_task.overlap == 3 and tie_task.is_labeled is False
    assert not {"round-2", "round-3"} & {p.model_version for p in tie_task.predictions}  # no guess since it tied
    report_line(f"loop rounds via Label Studio: {len(tasks)} tasks pushed, {len(agreeing) + 3} annotations made, "
                f"{len(agreeing) + 2} recorded as label events, 1 rejected (unknown class), 1 tie kept out")

    # "patch" renamed in loop.toml: `loop rename-class` renames its answers and guesses in Label Studio with the store's
    from loop.config import load_config, save_config

    config = load_config(project)
    config.classes = ["good", "scratch", "spot", "patches"]
    save_config(project, config)
    answered_patch = [i for i in [*agreeing, unknown_image] if truth[paths[i]] == "patch"]
    assert answered_patch
    renamed = " ".join(invoke("rename-class", "patch", "patches", "--project", str(project)).output.split())
    assert f"in Label Studio {len(answered_patch)} answers" in renamed, renamed
    answers = lsc.list_annotated_tasks(admin, project_id=ls_project)
    assert not any("patch" in x["choices"] or "patch" in x["predicted"] for x in answers)
    assert sum(x["choices"] == ["patches"] for x in answers) == len(answered_patch)
    assert 'value="patch"' not in admin.projects.get(id=ls_project).label_config
    status = json.loads(invoke("status", "--project", str(project), "--json").output)
    assert "patch" not in status["labels"]["by_class"] and status["labels"]["by_class"]["patches"] >= len(answered_patch)
    # the next pull finds nothing new: no renamed answer taken for a confirmation, 'dent' not rejected again
    from labeling import create_backend
    from store.queries import get_project

    with session_scope(ctx.engine) as session:
        after = create_backend("labelstudio", config=load_config(project), project_dir=project).pull(
            session=session, project=get_project(session), round_id=None)
    assert (after.new_label_events, after.rejected, after.details["labelstudio"].get("confirmed", 0)) == (0, 0, 0)

    # an editor left open during the rename submits the old name: the next round takes it as the new class, under its
    # annotator, counts it, and neither asks about the image again nor withdraws anything
    a = labelstudio.as_annotator(ANNOTATOR_A)
    open_task = next(t for t in admin.tasks.list(project=ls_project, fields="all") if not t.annotations)
    late = a.annotations.create(id=open_task.id, result=lsc.choice_result("patch"), lead_time=2.0).id
    invoke("round", "--project", str(project), "--quiet")
    with session_scope(ctx.engine) as session:
        last = session.scalars(select(Round).order_by(Round.number.desc())).first()
        pulled = last.details["pull"]
        assert (pulled["rejected"], pulled["deleted"], pulled["labelstudio"].get("withdrawn", 0)) == (0, 0, 0), pulled
        assert pulled["labelstudio"]["renamed_on_the_way_in"] == 1, pulled
        image_id = open_task.data["defect_loop_image_id"]
        event = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(late))).one()
        assert (event.label, event.action, event.annotator.startswith("labelstudio:")) == ("patches", "set", True)
        assert current_labels(session, last.project_id)[image_id].label == "patches"
        assert not session.scalars(select(Selection).where(Selection.image_id == image_id, Selection.reason == "answer_rejected")).all()
        assert not session.scalars(select(RejectedAnnotation).where(RejectedAnnotation.external_id == str(late))).all()
    assert admin.tasks.get(id=str(open_task.id)).data.get("reason") != "answer_rejected"

    # The Label Studio project deleted by hand: the next round's pull retires it and the same round's push asks the
    # images whose task waited there, in a new project (the push used to find it gone after the round had chosen its
    # asks, and they waited a round more)
    waiting_images = {t.data["defect_loop_image_id"] for t in admin.tasks.list(project=ls_project, fields="all") if not t.annotations}
    assert waiting_images
    admin.projects.delete(id=ls_project)
    said = " ".join(invoke("round", "--project", str(project), "--quiet").output.split())
    with session_scope(ctx.engine) as session:
        now_asked = {row.image_id: int(row.external_project_id) for row in session.scalars(select(AnnotationTask))}
        retired = session.scalars(select(Round).order_by(Round.number.desc())).first().details["pull"]
    assert waiting_images <= set(now_asked) and ls_project not in set(now_asked.values()), (waiting_images, now_asked)
    assert any(f"Label Studio project {ls_project} is gone" in warning for warning in retired["warnings"]), retired
    # (a task whose only answers were refused or skipped waits too: Label Studio lists it with an annotation)
    asked_again = int(re.search(r"and (\d+) images whose task waited for an answer are asked again in a new task", said).group(1))
    assert asked_again >= len(waiting_images) and int(re.search(r"selected for labeling: (\d+) pushed", said).group(1)) >= asked_again, said
