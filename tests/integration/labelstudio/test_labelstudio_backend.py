"""The Label Studio backend against a real server: push, annotate as real annotator users, pull, webhook, restart."""
from __future__ import annotations

import dataclasses
import json
import secrets
from contextlib import contextmanager
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from sqlalchemy import func, select

from labelstudio_harness import ANNOTATOR_A, ANNOTATOR_B, report_line
from labeling import create_backend
from labeling import labelstudio_backend
from labeling import labelstudio_client as lsc
from labeling import labelstudio_server as lss
from labeling.labelstudio_backend import LabelStudioBackend, record_webhook_event
from store.models import AnnotationTask, LabelEvent, Project, RejectedAnnotation, Round, Selection
from store.queries import current_labels

pytestmark = pytest.mark.labelstudio


def push(backend, store, tasks, round_number: int = 1, open_guesses=(), settled=()):  # noqa: ANN001
    with store.session() as session:
        project = session.get(Project, store.project_id)
        return backend.push(session=session, project=project, round_id=store.round_ids[round_number], batch=tasks, open_guesses=open_guesses,
                            settled=settled)


def pull(backend, store, round_number: int = 2):  # noqa: ANN001
    with store.session() as session:
        project = session.get(Project, store.project_id)
        return backend.pull(session=session, project=project, round_id=store.round_ids[round_number])


def task_ids_by_image(store) -> dict[int, int]:  # noqa: ANN001
    with store.session() as session:
        return {row.image_id: int(row.external_task_id) for row in session.scalars(select(AnnotationTask))}


def labels(store) -> dict[int, object]:  # noqa: ANN001
    with store.session() as session:
        return current_labels(session, store.project_id)


def ls_project_id(store) -> int:  # noqa: ANN001
    with store.session() as session:
        return int(session.scalars(select(AnnotationTask.external_project_id)).first())


def annotate(client, task_id: int, label: str, lead_time: float = 3.0) -> int:  # noqa: ANN001
    return client.annotations.create(id=task_id, result=lsc.choice_result(label), lead_time=lead_time).id


def test_backend_is_registered_and_reads_url_and_token_from_config_or_env(monkeypatch) -> None:
    class Annotator:
        labelstudio_url = "http://127.0.0.1:1"
        labelstudio_api_key = "from-toml"

    class Config:
        annotator = Annotator()
        class_descriptions = {"good": "fine"}

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    backend = create_backend("labelstudio", config=Config(), project_dir="/tmp")
    assert (backend.url, backend.api_key, backend.class_descriptions) == ("http://127.0.0.1:1", "from-toml", {"good": "fine"})
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "from-env")
    backend = create_backend("labelstudio", config=Config(), project_dir="/tmp")
    assert (backend.url, backend.api_key) == ("http://127.0.0.1:2", "from-env")


def test_push_creates_one_task_per_image_with_prediction_and_is_idempotent(labelstudio, store, backend) -> None:
    batch = [
        store.task(0, predicted="good", score=0.55),
        store.task(1, reason="suspected_label_error", predicted="spot", score=0.91, current_label="scratch"),
        store.task(4, predicted="scratch", score=0.5),
        store.task(5, reason="cold_start"),  # no model yet: no pre-annotation
    ]
    report = push(backend, store, batch + [batch[0]])  # a duplicate in the batch is still one task
    assert (report.pushed, report.already_present, report.pending, report.warnings) == (4, 0, 0, [])
    again = push(backend, store, batch)
    assert (again.pushed, again.already_present, again.pending, again.reopened, again.warnings) == (0, 4, 0, 0, [])  # nobody answered yet

    admin = labelstudio.admin()
    project_id = ls_project_id(store)
    tasks = {t.data["defect_loop_image_id"]: t for t in admin.tasks.list(project=project_id, fields="all")}
    assert sorted(tasks) == sorted(store.image_ids[k] for k in (0, 1, 4, 5))
    suspect = tasks[store.image_ids[1]]
    assert suspect.data["current_label"] == "scratch" and suspect.data["reason"] == "suspected_label_error"
    assert "Current label: scratch" in suspect.data["why"] and "Suggested label: spot (91%)" in suspect.data["why"]
    (prediction,) = suspect.predictions
    prediction = prediction.model_dump() if hasattr(prediction, "model_dump") else prediction
    assert prediction["model_version"] == "round-1" and prediction["score"] == pytest.approx(0.91)
    assert lsc.result_choices(prediction["result"]) == ["spot"]
    assert tasks[store.image_ids[5]].predictions == []
    # The image is served in place from its own folder, to a logged-in user only.
    served = httpx.get(labelstudio.url + suspect.data["image"], headers={"Authorization": f"Token {labelstudio.token}"})
    assert served.status_code == 200 and served.content == open(store.paths[1], "rb").read()

    # The store lost its mapping (a crash between import and commit): the tasks are adopted, not duplicated.
    with store.session() as session:
        for row in session.scalars(select(AnnotationTask)):
            session.delete(row)
    adopted = push(backend, store, batch)
    assert (adopted.pushed, adopted.already_present, adopted.pending_image_ids) == (0, 4, set())  # adopted tasks reached it
    assert len(list(admin.tasks.list(project=project_id))) == 4
    assert len(task_ids_by_image(store)) == 4


def test_a_tiff_or_16_bit_image_is_shown_to_annotators_as_a_png_of_what_the_model_sees(labelstudio, store, backend, monkeypatch) -> None:
    # no browser shows a TIFF (Label Studio's editor showed a broken image), and a 12-bit frame in 16 bits shows black
    import hashlib
    import io
    from pathlib import Path

    import numpy as np
    from PIL import Image as PILImage

    from store import session_scope
    from store.models import Image

    frame = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 16)  # 12 significant bits
    files = {7: Path(store.paths[7]).with_suffix(".tif"), 6: Path(store.paths[6]).with_name("frame16.png")}
    tasks = []
    with session_scope(store.engine) as session:
        for k, path in files.items():
            PILImage.fromarray(frame).save(path)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            row = session.get(Image, store.image_ids[k])
            row.path, row.sha256 = str(path), sha
            tasks.append(dataclasses.replace(store.task(k), image_path=str(path), sha256=sha))
    report = push(backend, store, [store.task(0), *tasks])
    assert (report.pushed, report.pending, report.warnings) == (3, 0, [])
    admin = labelstudio.admin()
    by_image = task_ids_by_image(store)
    for task in tasks:
        url = admin.tasks.get(id=str(by_image[task.image_id])).data["image"]
        assert f"label_studio_display/{task.sha256}-dec" in url and url.endswith(".png")  # a copy in the project's cache; answers go to the image
        shown = httpx.get(f"{labelstudio.url}{url}", headers={"Authorization": f"Token {labelstudio.token}"})
        assert shown.status_code == 200
        assert np.asarray(PILImage.open(io.BytesIO(shown.content))).max() >= 250  # scaled over 12 bits (4080 of 4095)
    assert admin.tasks.get(id=str(by_image[store.image_ids[0]])).data["image"].endswith("part00.png")  # an 8-bit PNG as it is

    # the copies cannot be made under the document root: the TIFF goes as it is, and the push says annotators cannot see it
    monkeypatch.setattr(LabelStudioBackend, "display_dir", lambda self, project: Path("/var/tmp/defect-loop-outside-the-root"))
    other = Path(store.paths[5]).with_suffix(".tiff")
    PILImage.fromarray(frame + 1).save(other)  # other bytes: another image
    with session_scope(store.engine) as session:
        row = session.get(Image, store.image_ids[5])
        row.path, row.sha256 = str(other), hashlib.sha256(other.read_bytes()).hexdigest()
    (warning,) = push(backend, store, [dataclasses.replace(store.task(5), image_path=str(other), sha256=row.sha256)]).warnings
    assert warning.startswith("1 images pushed are TIFF files or have 16-bit or float pixels") and str(other) in warning
    assert not Path("/var/tmp/defect-loop-outside-the-root").exists()


def test_a_suspected_label_error_answered_in_label_studio_is_asked_again_in_its_task(labelstudio, store, backend) -> None:
    push(backend, store, [store.task(4, predicted="scratch", score=0.7)])
    task_id = task_ids_by_image(store)[store.image_ids[4]]
    a, b = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.as_annotator(ANNOTATOR_B)
    answer_a = annotate(a, task_id, "scratch")
    pull(backend, store)
    assert labels(store)[store.image_ids[4]].label == "scratch"
    admin = labelstudio.admin()
    assert admin.tasks.get(id=str(task_id)).is_labeled is True

    # Round 2's cleanlab suspects the label: the answered task is reopened, not duplicated, and says why.
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.85, current_label="scratch", round_number=2)
    report = push(backend, store, [suspect], round_number=2)
    assert (report.pushed, report.already_present, report.reopened, report.pending, report.warnings) == (0, 1, 1, 0, [])
    reopened = admin.tasks.get(id=str(task_id))
    assert reopened.is_labeled is False and reopened.overlap == 2  # one more answer than it has: back in the label stream
    assert reopened.data["relabel_round"] == 2 and reopened.data["reason"] == "suspected_label_error"
    assert reopened.data["why"].startswith("Asked again: ") and "Current label: scratch" in reopened.data["why"]
    assert reopened.data["image"] and reopened.data["defect_loop_image_id"] == store.image_ids[4]  # the rest of the data is kept
    assert [lsc.result_choices(p.result if hasattr(p, "result") else p["result"]) for p in reopened.predictions] == [["scratch"], ["spot"]]
    assert len(list(admin.tasks.list(project=ls_project_id(store)))) == 1
    # the same push again (a retried round) asks nothing more
    assert push(backend, store, [suspect], round_number=2).reopened == 0
    assert len(admin.tasks.get(id=str(task_id)).predictions) == 2

    # Label Studio's label stream offers it to the annotator who has not answered it, not to the one who did.
    def next_task(email: str) -> int | None:
        response = httpx.get(f"{labelstudio.url}/api/projects/{ls_project_id(store)}/next",
                             headers={"Authorization": f"Token {labelstudio.annotator_tokens[email]}"})
        return response.json().get("id") if response.status_code == 200 else None
    assert next_task(ANNOTATOR_B) == task_id and next_task(ANNOTATOR_A) != task_id
    annotate(b, task_id, "spot")
    assert admin.tasks.get(id=str(task_id)).is_labeled is True
    second = pull(backend, store)
    assert labels(store)[store.image_ids[4]].status == "tie"  # two answers disagree: kept out of training until settled
    # each answer agreed with the guess shown when it was given: A with round 1's scratch, B with round 2's spot
    assert (second.details["agreement"]["answers_with_prediction"], second.details["agreement"]["prediction_agreement"]) == (2, 1.0)
    # the next round asks the tie for one more answer in the same task
    tie = push(backend, store, [store.task(4, reason="annotators_disagree", predicted="spot", score=0.8, round_number=2)], round_number=2)
    assert (tie.pushed, tie.reopened) == (0, 1)
    tie_task = admin.tasks.get(id=str(task_id))
    assert (tie_task.overlap, tie_task.is_labeled) == (3, False) and "answers given so far disagree" in tie_task.data["why"]
    assert tie_task.data["why"].endswith("Give your answer (if you answered this task already, check it).")  # its next annotator has none yet
    a.annotations.update(id=answer_a, result=lsc.choice_result("spot"))  # the first annotator, asked again, changes the answer
    pull(backend, store)
    assert labels(store)[store.image_ids[4]].label == "spot"
    # the question is settled by an edit, which Label Studio does not count as a new answer: the next push closes the
    # task the loop names as settled, or the stream would hand a settled question to a third annotator
    assert admin.tasks.get(id=str(task_id)).is_labeled is False
    report = push(backend, store, [], round_number=2, settled=[store.image_ids[4]])
    closed = admin.tasks.get(id=str(task_id))
    assert (report.closed, report.settled_done, closed.overlap, closed.is_labeled, "reopened_from_overlap" in closed.data) == (1, True, 2, True, False)
    assert report.unsettled_image_ids == set()
    assert closed.data["why"] == lsc.SETTLED_WHY  # not the question, on a settled task (QA)
    assert push(backend, store, [], round_number=2, settled=[store.image_ids[4]]).closed == 0  # closed once


def test_an_annotator_who_saves_the_same_answer_again_confirms_it(labelstudio, store, backend) -> None:
    push(backend, store, [store.task(4, predicted="scratch", score=0.7)])
    task_id = task_ids_by_image(store)[store.image_ids[4]]
    a = labelstudio.as_annotator(ANNOTATOR_A)
    answer = annotate(a, task_id, "scratch")
    assert pull(backend, store).new_label_events == 1
    assert pull(backend, store).new_label_events == 0  # listed again, not saved again: nothing new

    # Round 2 asks about it; the only annotator finds the reopened task and saves the same label again.
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.85, current_label="scratch", round_number=2)
    assert push(backend, store, [suspect], round_number=2).reopened == 1
    assert pull(backend, store).new_label_events == 0  # reopening the task does not touch the answer
    a.annotations.update(id=answer, result=lsc.choice_result("scratch"))
    confirmed = pull(backend, store)
    assert (confirmed.new_label_events, confirmed.details["labelstudio"].get("confirmed")) == (1, 1)
    assert pull(backend, store).new_label_events == 0  # once
    # the loop has its answer: the next push closes the task, which does not touch the answer either
    assert push(backend, store, [], round_number=2, settled=[store.image_ids[4]]).closed == 1
    assert pull(backend, store).new_label_events == 0
    with store.session() as session:
        events = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(answer)).order_by(LabelEvent.id)).all()
        assert [(e.action, e.label) for e in events] == [("set", "scratch"), ("set", "scratch")]
        assert events[1].external_updated_at > events[0].external_updated_at
    assert labels(store)[store.image_ids[4]].label == "scratch"


def test_two_project_folders_of_the_same_name_never_share_a_label_studio_project(labelstudio, store, backend, make_store, tmp_path) -> None:
    push(backend, store, [store.task(k, predicted="scratch") for k in (4, 5)])
    # another folder, another store, the same project name: its image 4 has the same id, another picture
    (tmp_path / "other").mkdir()
    other = make_store(tmp_path / "other", store.project_name, size_offset=20)
    report = push(backend, other, [other.task(k, predicted="good") for k in (4, 5)])
    assert (report.pushed, report.already_present) == (2, 0)  # its own tasks, not the first store's (same ids, other images)
    assert ls_project_id(other) != ls_project_id(store)
    admin = labelstudio.admin()
    other_title, first_title = admin.projects.get(id=ls_project_id(other)).title, admin.projects.get(id=ls_project_id(store)).title
    assert other_title != first_title and other_title.startswith("defect-loop ") and other_title.endswith(")")  # "(key)"
    # an answer to the first store's task is the first store's label only
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_ids_by_image(store)[store.image_ids[4]], "spot")
    assert pull(backend, other).new_label_events == 0 and other.image_ids[4] not in labels(other)
    assert pull(backend, store).new_label_events == 1 and labels(store)[store.image_ids[4]].label == "spot"
    # and each store keeps finding its own project
    assert push(backend, other, [other.task(6, predicted="good")]).pushed == 1 and ls_project_id(other) != ls_project_id(store)


def test_reopening_survives_a_deleted_task_a_half_done_reopen_and_repeated_answers(labelstudio, store, backend) -> None:
    push(backend, store, [store.task(k, predicted="scratch", score=0.7) for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a, admin = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.admin()
    for k in (4, 5, 6):
        annotate(a, tasks[store.image_ids[k]], "scratch")
    annotate(a, tasks[store.image_ids[6]], "scratch")  # the same annotator answered image 6 twice
    pull(backend, store)
    admin.tasks.delete(id=str(tasks[store.image_ids[4]]))  # someone deleted image 4's task in Label Studio
    # image 5: an earlier reopen added round 2's prediction and then failed before marking the task
    admin.predictions.create(task=tasks[store.image_ids[5]], model_version="round-2", score=0.8, result=lsc.choice_result("spot"))

    suspects = [store.task(k, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2) for k in (4, 5, 6)]
    report = push(backend, store, suspects, round_number=2)
    assert (report.pushed, report.reopened, report.pending, report.warnings) == (1, 2, 0, [])  # image 4 asked in a new task
    renewed = task_ids_by_image(store)[store.image_ids[4]]
    assert renewed != tasks[store.image_ids[4]] and admin.tasks.get(id=str(renewed)).data["reason"] == "suspected_label_error"
    half_done = admin.tasks.get(id=str(tasks[store.image_ids[5]]))
    assert half_done.data["relabel_of"] == "scratch" and len(half_done.predictions) == 2  # completed, the prediction not added twice
    # A answered before round 2's guess existed: A was shown round 1's scratch only, which the agreement metric compares with
    (answer,) = [row for row in lsc.list_annotated_tasks(admin, project_id=ls_project_id(store)) if row["task_id"] == tasks[store.image_ids[5]]]
    assert answer["predicted"] == ["scratch"]
    twice = admin.tasks.get(id=str(tasks[store.image_ids[6]]))
    assert twice.overlap == 3 and twice.is_labeled is False  # two answers counted, so another annotator is still offered it
    response = httpx.get(f"{labelstudio.url}/api/projects/{ls_project_id(store)}/next",
                         headers={"Authorization": f"Token {labelstudio.annotator_tokens[ANNOTATOR_B]}"})
    assert response.status_code == 200 and response.json()["id"] in (tasks[store.image_ids[5]], tasks[store.image_ids[6]], renewed)
    # the next round retries nothing it already asked: the label questioned is the same
    again = push(backend, store, [store.task(k, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)
                                  for k in (5, 6)], round_number=2)
    assert (again.reopened, again.pending) == (0, 0)


def test_tasks_still_waiting_get_each_rounds_guess_so_annotators_keep_a_pre_selection(labelstudio, store, backend, monkeypatch) -> None:
    push(backend, store, [store.task(k, predicted="scratch", score=0.6) for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    annotate(labelstudio.as_annotator(ANNOTATOR_A), tasks[store.image_ids[4]], "scratch")
    guesses = [store.task(k, reason="open", predicted="spot", score=0.7, round_number=2) for k in (5, 6)]
    listings = []
    list_task_data = lsc.list_task_data

    def listing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        listed = list_task_data(*args, **kwargs)
        listings.append((kwargs, sorted(entry["task_id"] for entry in listed)))
        return listed

    with monkeypatch.context() as patch:
        patch.setattr(lsc, "list_task_data", listing)
        patch.setattr(lsc, "SELECTED_TASKS_PER_REQUEST", 1)  # the ids in two requests
        patch.setattr(labelstudio_backend, "BY_ID_LISTING_SHARE", 1.0)
        report = push(backend, store, [store.task(7, predicted="good", score=0.9, round_number=2)], round_number=2, open_guesses=guesses)
    assert (report.pushed, report.refreshed, report.pending, report.warnings) == (1, 2, 0, [])
    # the tasks with guesses are listed for the waiting tasks only (the whole project's: 3.6 s per 3000 tasks)
    waiting = sorted(tasks[store.image_ids[k]] for k in (5, 6))
    assert [(sorted(kwargs.get("task_ids") or []), listed) for kwargs, listed in listings if kwargs.get("with_predictions")] == [(waiting, waiting)]
    admin = labelstudio.admin()
    assert admin.projects.get(id=ls_project_id(store)).model_version == "round-2"
    # round 1's guess, just replaced, stays: an annotator may have the task open with it (Label Studio refuses a
    # submit whose guess was deleted); it goes when the next round replaces round 2's
    assert report.superseded_predictions_deleted == 0
    for k in (5, 6):
        versions = [(p.model_version, lsc.result_choices(p.result)) for p in admin.tasks.get(id=str(tasks[store.image_ids[k]])).predictions]
        assert sorted(versions) == [("round-1", ["scratch"]), ("round-2", ["spot"])]
        data = admin.tasks.get(id=str(tasks[store.image_ids[k]])).data  # the text beside the image says what is pre-selected now
        assert "Model's guess: spot." in data["why"] and data["predicted_label"] == "spot"
    # what Label Studio's label stream hands an annotator: an earlier round's task, with this round's guess pre-selected
    response = httpx.get(f"{labelstudio.url}/api/projects/{ls_project_id(store)}/next",
                         headers={"Authorization": f"Token {labelstudio.annotator_tokens[ANNOTATOR_B]}"})
    offered = response.json()
    assert offered["id"] == tasks[store.image_ids[5]]  # oldest first; image 4's task is answered
    assert [(p["model_version"], lsc.result_choices(p["result"])) for p in offered["predictions"]] == [("round-2", ["spot"])]

    # Round 3: image 6's task was deleted in Label Studio (its id may go to a new task): the others still get the guess,
    # and the store forgets the deleted task, so the image's next push asks in a new one
    admin.tasks.delete(id=str(tasks[store.image_ids[6]]))
    later = [store.task(k, reason="open", predicted="good", score=0.6, round_number=2) for k in (5, 6)]
    with monkeypatch.context() as patch:  # waiting tasks too many to name: the whole project is listed, same outcome
        patch.setattr(lsc, "SELECTED_TASKS_PER_REQUEST", 1)
        patch.setattr(labelstudio_backend, "BY_ID_LISTING_SHARE", 0.0)
        third = push(backend, store, [], round_number=2, open_guesses=later)
    assert (third.refreshed, third.warnings, third.gone_image_ids) == (1, [], {store.image_ids[6]})
    assert third.superseded_predictions_deleted == 1  # image 5's round-1 guess: a task waiting ten rounds lists two, not ten
    assert sorted(p.model_version for p in admin.tasks.get(id=str(tasks[store.image_ids[5]])).predictions) == ["round-2", "round-2"]
    assert store.image_ids[6] not in task_ids_by_image(store)
    again = push(backend, store, [store.task(6, predicted="good", score=0.6, round_number=2)], round_number=2)
    assert (again.pushed, again.already_present) == (1, 0) and task_ids_by_image(store)[store.image_ids[6]] != tasks[store.image_ids[6]]
    # the whole Label Studio project deleted: the next push makes a new one and forgets every task of the old; those
    # without an answer in the store are asked again (image 4's answer was never pulled: it went with the project),
    # image 7 in this push's new task
    # a webhook registered on it (`loop labelstudio webhook`) goes on to the new project (QA: answers there came only
    # with the next pull, and nothing said why)
    hook_url = "http://127.0.0.1:9/webhooks/labelstudio"
    lsc.create_webhook(admin, project_id=ls_project_id(store), url=hook_url, secret_header="X-Loop-Webhook-Secret", secret="s3cret")
    with store.session() as session:
        labelstudio_backend.remember_webhook(session.get(Project, store.project_id), ls_project_id(store), hook_url)
    monkeypatch.setenv("LOOP_LABELSTUDIO_WEBHOOK_SECRET", "s3cret")
    old_project = ls_project_id(store)
    admin.projects.delete(id=old_project)
    gone = push(backend, store, [store.task(7, predicted="good", round_number=2)], round_number=2,
                open_guesses=[store.task(k, reason="open", predicted="good", round_number=2) for k in (5, 6)])
    assert gone.pushed == 1 and gone.gone_image_ids == {store.image_ids[4], store.image_ids[5], store.image_ids[6]}
    assert set(task_ids_by_image(store)) == {store.image_ids[7]}
    new_project = ls_project_id(store)
    assert new_project != old_project and [hook.url for hook in admin.webhooks.list(project=str(new_project))] == [hook_url]
    assert any(f"is registered on project {new_project} now" in warning for warning in gone.warnings), gone.warnings


def test_a_webhook_label_studio_refuses_on_the_new_project_never_fails_the_push(labelstudio, store, backend, monkeypatch) -> None:
    # review: a refusal (a server whose settings refuse a loopback URL) turned every later push into "push failed"
    push(backend, store, [store.task(4, predicted="good")])
    with store.session() as session:
        labelstudio_backend.remember_webhook(session.get(Project, store.project_id), ls_project_id(store), "http://127.0.0.1:9/hook")
    monkeypatch.setenv("LOOP_LABELSTUDIO_WEBHOOK_SECRET", "s3cret")

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ApiError(status_code=400, body={"url": ["not allowed"]})

    monkeypatch.setattr(lsc, "create_webhook", refuse)
    labelstudio.admin().projects.delete(id=ls_project_id(store))
    report = push(backend, store, [store.task(5, predicted="good")])
    assert report.pushed == 1 and report.pending == 0, report
    assert any("could not be registered on project" in warning and "loop labelstudio webhook" in warning for warning in report.warnings), report.warnings


def test_a_question_on_a_label_refused_twice_is_reopened_twice(labelstudio, store, backend) -> None:
    # review: the reopening of a refused answer's question was marked by the label it questions alone, the same each time,
    # so the second refusal's reopening looked done already and the task stayed closed, the question with nobody to answer it
    import dataclasses

    with store.session() as session:  # rounds 3 and 4, to push as
        later = [Round(project_id=store.project_id, number=n, status="completed") for n in (3, 4)]
        session.add_all(later)
        session.flush()
        store.round_ids.update({r.number: r.id for r in later})
    push(backend, store, [store.task(0, reason="suspected_label_error", predicted="spot", current_label="good")])
    task_id = task_ids_by_image(store)[store.image_ids[0]]
    admin = labelstudio.admin()
    for round_number, who in ((3, ANNOTATOR_A), (4, ANNOTATOR_B)):
        annotate(labelstudio.as_annotator(who), task_id, "good")  # stands in for a refused answer: the task is done in Label Studio
        assert admin.tasks.get(id=str(task_id)).is_labeled is True
        asked = dataclasses.replace(store.task(0, reason="answer_rejected", predicted="spot", current_label="good", round_number=round_number),
                                    rejected_answer="'bogus'")
        report = push(backend, store, [asked], round_number=round_number)
        assert report.reopened == 1 and admin.tasks.get(id=str(task_id)).is_labeled is False, (round_number, report)


def test_a_replaced_guess_is_deleted_but_not_the_one_an_answer_was_given_under_nor_another_models(labelstudio, store, backend) -> None:
    with store.session() as session:  # rounds 3 to 5, to push as
        later = [Round(project_id=store.project_id, number=n, status="completed") for n in (3, 4, 5)]
        session.add_all(later)
        session.flush()
        store.round_ids.update({r.number: r.id for r in later})
    push(backend, store, [store.task(4, predicted="scratch", score=0.7)])
    task_id = task_ids_by_image(store)[store.image_ids[4]]
    admin = labelstudio.admin()
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_id, "scratch")  # A answers under round 1's guess
    pull(backend, store)
    # an ML backend connected to the project adds its own guess: the loop never deletes it
    admin.predictions.create(task=task_id, model_version="line-3-model", score=0.5, result=lsc.choice_result("good"))
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)
    assert push(backend, store, [suspect], round_number=2).reopened == 1  # round 2's guess added by the reopening
    # still waiting: each round adds its guess; the one it replaces stays (it may be open in an editor), the one before goes
    guess_of: dict[str, int] = {}  # model version -> prediction id, deleted ones included
    for round_number, guess, deleted in ((3, "good", 0), (4, "spot", 1), (5, "good", 1)):
        waiting = store.task(4, reason="open", predicted=guess, score=0.6, round_number=round_number)
        report = push(backend, store, [], round_number=round_number, open_guesses=[waiting])
        assert (report.refreshed, report.superseded_predictions_deleted, report.warnings) == (1, deleted, [])
        guess_of.update({p.model_version: p.id for p in admin.tasks.get(id=str(task_id)).predictions})
    kept = sorted((p.model_version, lsc.result_choices(p.result)) for p in admin.tasks.get(id=str(task_id)).predictions)
    assert kept == [("line-3-model", ["good"]), ("round-1", ["scratch"]), ("round-4", ["spot"]), ("round-5", ["good"])]
    # what A was shown is still what the agreement metric compares A's answer with
    (answer,) = [row for row in lsc.list_annotated_tasks(admin, project_id=ls_project_id(store)) if row["task_id"] == task_id]
    assert answer["predicted"] == ["scratch"]
    # B opened the task during round 4 and submits now: Label Studio refuses an answer whose guess was deleted (round 3's),
    # which is why the guess just replaced (round 4's) is kept
    b = labelstudio.as_annotator(ANNOTATOR_B)
    with pytest.raises(ApiError) as refused:
        b.annotations.create(id=task_id, result=lsc.choice_result("spot"), parent_prediction=guess_of["round-3"])
    assert refused.value.status_code == 400
    assert b.annotations.create(id=task_id, result=lsc.choice_result("spot"), parent_prediction=guess_of["round-4"]).id


def test_closing_a_reopened_task_keeps_the_overlap_it_had_before(labelstudio, store, backend) -> None:
    # A project that wants two answers per task: closing a reopened task must not cut it to the one answer it has.
    push(backend, store, [store.task(4, predicted="scratch", score=0.7)])
    task_id = task_ids_by_image(store)[store.image_ids[4]]
    admin = labelstudio.admin()
    admin.tasks.update(id=str(task_id), overlap=2)
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_id, "scratch")
    pull(backend, store)
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)
    assert push(backend, store, [suspect], round_number=2).reopened == 1
    assert admin.tasks.get(id=str(task_id)).overlap == 2  # one answer + 1, and the project's 2 anyway
    assert push(backend, store, [], round_number=2, settled=[store.image_ids[4]]).closed == 1
    closed = admin.tasks.get(id=str(task_id))
    assert (closed.overlap, closed.is_labeled) == (2, False)  # still wants its second answer
    assert "This project wants 2 answers per task: give yours." in closed.data["why"]  # not "nothing more to do" (review)


def test_a_reopened_task_with_a_skip_asks_for_exactly_one_more_answer(labelstudio, store, backend) -> None:
    # QA: a skip was counted as an answer, so a suspect's task with one answer and one skip wanted two more answers in
    # the project's (default) skip mode, and Label Studio sent a second annotator to a settled question
    push(backend, store, [store.task(4, predicted="scratch", score=0.7)])
    task_id = task_ids_by_image(store)[store.image_ids[4]]
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_id, "scratch")
    labelstudio.as_annotator(ANNOTATOR_B).annotations.create(id=task_id, result=[], was_cancelled=True, lead_time=1.0)
    pull(backend, store)
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)
    assert push(backend, store, [suspect], round_number=2).reopened == 1
    admin = labelstudio.admin()
    reopened = admin.tasks.get(id=str(task_id))
    assert (reopened.overlap, reopened.is_labeled) == (2, False)  # the one answer + 1: the skip is no answer here
    annotate(labelstudio.as_annotator(ANNOTATOR_B), task_id, "spot")
    assert admin.tasks.get(id=str(task_id)).is_labeled  # one more answer finished it


def test_a_project_that_counts_skips_reopens_a_task_with_a_skip_for_one_more_answer_too(labelstudio, store, backend) -> None:
    # skip_queue IGNORE_SKIPPED: Label Studio counts a skip against the overlap there, so the overlap counts it too
    push(backend, store, [store.task(4, predicted="scratch", score=0.7)])
    task_id = task_ids_by_image(store)[store.image_ids[4]]
    admin = labelstudio.admin()
    admin.projects.update(id=ls_project_id(store), skip_queue="IGNORE_SKIPPED")
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_id, "scratch")
    labelstudio.as_annotator(ANNOTATOR_B).annotations.create(id=task_id, result=[], was_cancelled=True, lead_time=1.0)
    pull(backend, store)
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)
    assert push(backend, store, [suspect], round_number=2).reopened == 1
    assert admin.tasks.get(id=str(task_id)).overlap == 3  # an answer and a skip counted, + 1


def test_push_names_each_image_it_could_not_hand_over(labelstudio, store, backend, monkeypatch) -> None:
    # One image Label Studio cannot serve (outside its document root) and one reopen that times out: those two wait
    # for the next round, the rest of the batch is in, and the report says which is which (the loop marks each image).
    push(backend, store, [store.task(4, predicted="scratch")])
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_ids_by_image(store)[store.image_ids[4]], "scratch")
    pull(backend, store)
    outside = dataclasses.replace(store.task(6, predicted="spot"), image_path="/outside-the-document-root/part06.png")
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)

    def reopen_times_out(client, **_):  # noqa: ANN001, ANN202
        raise httpx.ReadTimeout("timed out")

    monkeypatch.setattr(lsc, "reopen_task", reopen_times_out)
    report = push(backend, store, [store.task(0, predicted="good"), outside, store.task(7, predicted="good"), suspect], round_number=2)
    assert (report.pushed, report.pending) == (2, 2)
    assert report.pending_image_ids == {store.image_ids[6], store.image_ids[4]}
    assert any("document root" in w for w in report.warnings) and any("ask again" in w for w in report.warnings)
    monkeypatch.undo()
    retried = push(backend, store, [suspect], round_number=2)
    assert (retried.reopened, retried.pending, retried.pending_image_ids) == (1, 0, set())


def test_a_push_that_fails_half_way_leaves_only_what_did_not_get_there_pending(labelstudio, store, backend, monkeypatch) -> None:
    push(backend, store, [store.task(0, predicted="good"), store.task(4, predicted="scratch")])
    annotate(labelstudio.as_annotator(ANNOTATOR_A), task_ids_by_image(store)[store.image_ids[4]], "scratch")
    pull(backend, store)
    suspect = store.task(4, reason="suspected_label_error", predicted="spot", score=0.8, current_label="scratch", round_number=2)

    def import_times_out(client, **_):  # noqa: ANN001, ANN202
        raise httpx.ReadTimeout("timed out")

    monkeypatch.setattr(lsc, "import_tasks_with_predictions", import_times_out)
    report = push(backend, store, [store.task(0, predicted="good"), suspect, store.task(7, predicted="good")], round_number=2)
    assert (report.reopened, report.pending, report.pending_image_ids) == (1, 1, {store.image_ids[7]})  # the reopen got there
    assert any("push failed" in w for w in report.warnings)
    monkeypatch.undo()

    def down(client, **_):  # noqa: ANN001, ANN202
        raise lsc.LabelStudioUnavailable("Label Studio went down")

    monkeypatch.setattr(lsc, "list_task_data", down)  # after the already-present task, before the new one
    report = push(backend, store, [store.task(0, predicted="good"), store.task(6, predicted="spot")], round_number=2)
    assert report.pending_image_ids == {store.image_ids[6]}


def test_waiting_tasks_of_quarantined_images_are_taken_from_the_annotators_not_answered_ones(labelstudio, store, backend) -> None:
    # a QA run: a task whose file was deleted stayed open with a broken image; the answer given to it became the
    # image's label once its file was ingested again from a new place
    push(backend, store, [store.task(k, predicted="good") for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    annotate(a, tasks[store.image_ids[5]], "spot")  # answered since the pull: kept, the next pull records it
    unpushed = store.image_ids[7]
    with store.session() as session:
        project = session.get(Project, store.project_id)
        report = backend.push(session=session, project=project, round_id=store.round_ids[2], batch=[],
                              withdraw=[store.image_ids[4], store.image_ids[5], unpushed])
    # image 4: taken away; image 5: answered since the pull, its ask stays; image 7: no task, nothing to take away
    assert (report.withdrawn_tasks, report.withdrawn_image_ids, report.warnings) == (1, {store.image_ids[4], unpushed}, [])
    admin = labelstudio.admin()
    live = {t.id for t in admin.tasks.list(project=ls_project_id(store))}
    assert tasks[store.image_ids[4]] not in live and {tasks[store.image_ids[5]], tasks[store.image_ids[6]]} <= live
    assert set(task_ids_by_image(store)) == {store.image_ids[5], store.image_ids[6]}  # the store forgot the deleted task only
    assert labels(store).get(store.image_ids[4]) is None and pull(backend, store).new_label_events == 1  # image 5's answer

    closed = f"http://127.0.0.1:{lss.free_port()}"  # unreachable: nothing taken away, all named again next round
    down = LabelStudioBackend(url=closed, api_key=labelstudio.token, document_root=str(labelstudio.document_root))
    with store.session() as session:
        unreached = down.push(session=session, project=session.get(Project, store.project_id), round_id=store.round_ids[2], batch=[],
                              withdraw=[store.image_ids[6]])
    assert unreached.withdrawn_image_ids == set() and tasks[store.image_ids[6]] in {t.id for t in admin.tasks.list(project=ls_project_id(store))}
    # a skip alone is no answer: the skipped task would stay in someone's queue with a broken picture
    a.annotations.create(id=tasks[store.image_ids[6]], result=[], was_cancelled=True, lead_time=1.0)
    with store.session() as session:
        skipped = backend.push(session=session, project=session.get(Project, store.project_id), round_id=store.round_ids[2], batch=[],
                               withdraw=[store.image_ids[6]])
    assert (skipped.withdrawn_tasks, skipped.withdrawn_image_ids) == (1, {store.image_ids[6]})
    assert tasks[store.image_ids[6]] not in {t.id for t in admin.tasks.list(project=ls_project_id(store))}


def test_a_changed_document_root_relinks_every_task_answered_ones_too(labelstudio, store, backend) -> None:
    # QA: after Label Studio was restarted on another document root, waiting tasks were relinked when their file moved,
    # but an answered task kept its old link: a reviewer opening it saw a broken image
    from pathlib import Path

    push(backend, store, [store.task(k, predicted="good") for k in (4, 5)])
    tasks = task_ids_by_image(store)
    annotate(labelstudio.as_annotator(ANNOTATOR_A), tasks[store.image_ids[5]], "spot")
    assert pull(backend, store).new_label_events == 1
    new_root = Path(store.paths[0]).parents[2]  # the store's folder: it still holds every image
    moved = LabelStudioBackend(url=labelstudio.url, api_key=labelstudio.token, document_root=str(new_root))
    with store.session() as session:
        report = moved.push(session=session, project=session.get(Project, store.project_id), round_id=store.round_ids[2], batch=[])
    assert (report.relinked_tasks, report.warnings) == (2, [])
    shown = {task.id: task.data[lsc.IMAGE_NAME] for task in labelstudio.admin().tasks.list(project=ls_project_id(store))}
    for k in (4, 5):  # the answered one (5) too
        assert shown[tasks[store.image_ids[k]]] == lsc.local_files_url(store.paths[k], document_root=str(new_root))
    with store.session() as session:  # recorded: the next push with that root relinks nothing, and returns at once
        again = moved.push(session=session, project=session.get(Project, store.project_id), round_id=store.round_ids[2], batch=[])
        back = backend.push(session=session, project=session.get(Project, store.project_id), round_id=store.round_ids[2], batch=[])
    assert (again.relinked_tasks, back.relinked_tasks) == (0, 2)  # and back on the old root: relinked again


def test_push_and_pull_when_label_studio_is_unreachable_or_token_wrong(labelstudio, store, monkeypatch) -> None:
    closed = f"http://127.0.0.1:{lss.free_port()}"
    down = LabelStudioBackend(url=closed, api_key=labelstudio.token, document_root=str(labelstudio.document_root))
    report = push(down, store, [store.task(0, predicted="good"), store.task(1, predicted="spot")])
    assert report.pending == 2 and report.pushed == 0 and report.pending_image_ids == {store.image_ids[0], store.image_ids[1]}
    assert any("unreachable" in w and "next round" in w for w in report.warnings)
    # tasks the loop asked it to close were not reached: the round records it, and the next one names them again
    unreached = push(down, store, [], settled=[store.image_ids[3]])
    assert (unreached.settled_done, unreached.unsettled_image_ids) == (False, {store.image_ids[3]})
    assert push(down, store, []).settled_done is True
    pulled = pull(down, store)
    assert pulled.new_label_events == 0 and any("unreachable" in w for w in pulled.warnings)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(AnnotationTask)) == 0

    wrong = LabelStudioBackend(url=labelstudio.url, api_key="f" * 40, document_root=str(labelstudio.document_root))
    with pytest.raises(lsc.LabelStudioAuthError, match="LABEL_STUDIO_API_KEY"):
        push(wrong, store, [store.task(0)])
    with pytest.raises(lsc.LabelStudioAuthError, match="labelstudio_api_key"):
        pull(wrong, store)
    # the message names where the refused token came from: the environment wins over loop.toml
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "e" * 40)
    from_env = LabelStudioBackend(url=labelstudio.url, document_root=str(labelstudio.document_root))
    with pytest.raises(lsc.LabelStudioAuthError, match=r"the token used came from LABEL_STUDIO_API_KEY \(the environment wins over loop.toml\)"):
        pull(from_env, store)


def test_annotators_answers_become_label_events_with_consensus_and_rejections(labelstudio, store, backend) -> None:
    # Images 0-3 have imported labels (good, scratch, spot, good); 4-7 have none.
    predicted = {0: "good", 1: "scratch", 2: "good", 3: "good", 4: "scratch", 5: "spot", 6: "spot"}
    push(backend, store, [store.task(k, predicted=label) for k, label in predicted.items()])
    tasks = task_ids_by_image(store)
    task = {k: tasks[store.image_ids[k]] for k in predicted}
    a, b = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.as_annotator(ANNOTATOR_B)
    annotate(a, task[0], "good")  # agrees with model and import
    annotate(a, task[1], "scratch")  # agrees
    corrected = annotate(a, task[2], "spot", lead_time=7.25)  # corrects the model; confirms the import
    annotate(a, task[3], "spot")  # overrides the imported "good": an answer supersedes the import
    unknown = annotate(a, task[4], "dent")  # not a class of the project
    a.annotations.create(id=task[5], result=[], was_cancelled=True, lead_time=1.0)  # skipped
    annotate(a, task[6], "spot")  # two annotators disagree on image 6: a tie
    annotate(b, task[6], "scratch")

    report = pull(backend, store)
    assert (report.new_label_events, report.skipped, report.rejected, report.deleted) == (6, 1, 1, 0)
    current = labels(store)
    ids = store.image_ids
    assert {k: current[ids[k]].label for k in (0, 1, 2, 3)} == {0: "good", 1: "scratch", 2: "spot", 3: "spot"}
    assert current[ids[3]].source == "annotator"
    assert current[ids[6]].status == "tie" and current[ids[6]].label is None  # kept out of training, never guessed
    assert all(current.get(ids[k]) is None or current[ids[k]].status == "unlabeled" for k in (4, 5))  # rejected, skipped
    with store.session() as session:
        (rejected,) = session.scalars(select(RejectedAnnotation)).all()
        assert rejected.external_id == str(unknown) and "'dent' is not a class" in rejected.reason
        event = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(corrected))).one()
        assert event.lead_time_s == pytest.approx(7.25) and event.round_id == store.round_ids[2]
        users = {u.email: u.id for u in labelstudio.admin().users.list()}
        assert event.annotator == f"labelstudio:{users[ANNOTATOR_A]}"
        skip = session.scalars(select(LabelEvent).where(LabelEvent.action == "skip")).one()
        assert skip.image_id == ids[5] and skip.label is None
    agreement = report.details["agreement"]
    assert agreement["ties"] == 1 and agreement["tie_image_ids"] == [ids[6]] and agreement["images_multi_annotated"] == 1
    assert agreement["mean_agreement"] == 0.5
    assert agreement["answers_with_prediction"] == 6 and agreement["prediction_agreement"] == pytest.approx(3 / 6)
    assert report.details["labelstudio"]["annotators"][f"labelstudio:{users[ANNOTATOR_B]}"] == ANNOTATOR_B

    # Pulling again records nothing new: every answer is in the store once.
    again = pull(backend, store)
    assert (again.new_label_events, again.skipped, again.rejected, again.deleted) == (0, 0, 0, 0)

    # The annotator corrects an answer, deletes another, and a third annotator breaks the tie.
    a.annotations.update(id=corrected, result=lsc.choice_result("scratch"))
    answered_0 = next(x["annotation_id"] for x in lsc.list_annotated_tasks(a, project_id=ls_project_id(store)) if x["task_id"] == task[0])
    a.annotations.delete(id=answered_0)
    b.annotations.update(id=next(x["annotation_id"] for x in lsc.list_annotated_tasks(b, project_id=ls_project_id(store))
                                 if x["task_id"] == task[6] and x["choices"] == ["scratch"]), result=lsc.choice_result("spot"))
    changed = pull(backend, store)
    assert (changed.new_label_events, changed.deleted) == (2, 1)
    # both new answers are answers changed in place, and said so (QA: counted as new answers alone)
    assert changed.details["labelstudio"].get("changed") == 2 and not changed.details["labelstudio"].get("recorded")
    current = labels(store)
    assert current[ids[2]].label == "scratch"
    assert current[ids[0]].label == "good" and current[ids[0]].source == "import"  # the import stands again
    assert current[ids[6]].label == "spot" and current[ids[6]].agreement == 1.0
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(LabelEvent).where(LabelEvent.action == "delete")) == 1


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict, dict]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_webhook_payloads_from_label_studio_are_recorded_at_once_and_pull_adds_nothing(labelstudio, store, backend) -> None:
    push(backend, store, [store.task(k, predicted="good") for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    project_id = ls_project_id(store)
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        admin = labelstudio.admin()
        hook = lsc.create_webhook(admin, project_id=project_id, url=f"http://127.0.0.1:{receiver.server_port}/webhooks/labelstudio",
                                  secret_header="X-Loop-Webhook-Secret", secret="hook-secret")
        assert lsc.create_webhook(admin, project_id=project_id, url=f"http://127.0.0.1:{receiver.server_port}/webhooks/labelstudio",
                                  secret_header="X-Loop-Webhook-Secret", secret="hook-secret") == hook
        a = labelstudio.as_annotator(ANNOTATOR_A)
        first = annotate(a, tasks[store.image_ids[4]], "scratch")
        a.annotations.update(id=first, result=lsc.choice_result("spot"))
        annotate(a, tasks[store.image_ids[5]], "dent")
        annotate(a, tasks[store.image_ids[6]], "good")
        a.annotations.delete(id=first)
        deadline = time.monotonic() + 10
        while len(_Receiver.received) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        receiver.shutdown()
    payloads = [payload for _headers, payload in _Receiver.received]
    assert [p["action"] for p in payloads] == ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_CREATED", "ANNOTATION_CREATED", "ANNOTATIONS_DELETED"]
    assert all(headers.get("X-Loop-Webhook-Secret") == "hook-secret" for headers, _ in _Receiver.received)

    results = []
    for payload in payloads:
        with store.session() as session:
            results.append(record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payload))
    # 'dent' is no class: left to the next pull (a class being renamed names its new name before the store has it)
    assert [(r["recorded"], r["rejected"], r["deleted"]) for r in results] == [(1, 0, 0), (1, 0, 0), (0, 0, 0), (1, 0, 0), (0, 0, 1)]
    assert list(results[2]["outcomes"].values()) == ["deferred"]
    current = labels(store)
    assert current[store.image_ids[6]].label == "good" and store.image_ids[4] not in {i for i, l in current.items() if l.label}
    # The same payload again (Label Studio does not retry, but a proxy might) changes nothing.
    with store.session() as session:
        repeat = record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payloads[3])
    assert (repeat["recorded"], repeat["outcomes"]) == (0, {str(payloads[3]["annotation"]["id"]): "unchanged"})
    # The round's pull finds everything recorded already, and rejects 'dent'.
    report = pull(backend, store)
    assert (report.new_label_events, report.deleted, report.rejected, report.skipped) == (0, 0, 1, 0)

    with store.session() as session:
        project = session.get(Project, store.project_id)
        for bad, reason in [
            ({"annotation": {}}, "no 'action'"),
            ({"action": "PROJECT_CREATED", "project": {"id": project_id}}, "not recorded"),
            ({"action": "ANNOTATION_CREATED", "project": {"id": 999999}, "annotation": {"id": 1}, "task": {"id": 1}}, "not one defect-loop pushed"),
            ({"action": "ANNOTATION_CREATED", "project": {"id": project_id}, "task": {"id": 1}}, "needs an 'annotation'"),
            ({"action": "ANNOTATION_UPDATED", "project": {"id": project_id}, "annotation": {"id": "x"}, "task": {"id": 1}}, "not an integer"),
            ({"action": "ANNOTATIONS_DELETED", "project": {"id": project_id}}, "non-empty 'annotations'"),
        ]:
            with pytest.raises(ValueError, match=reason):
                record_webhook_event(session=session, project=project, payload=bad)


def test_restart_between_push_and_pull_loses_nothing(labelstudio, store, backend) -> None:
    batch = [store.task(k, predicted="good") for k in range(8)]
    pushed = push(backend, store, batch).pushed
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    answers = {k: ("spot" if k % 2 else "good") for k in range(8)}
    for k, label in answers.items():
        annotate(a, tasks[store.image_ids[k]], label)

    restart_s = labelstudio.restart()

    fresh = LabelStudioBackend(url=labelstudio.url, api_key=labelstudio.token, document_root=str(labelstudio.document_root))
    report = pull(fresh, store)
    again = push(fresh, store, batch)
    current = labels(store)
    lost = sum(1 for k, label in answers.items() if current.get(store.image_ids[k]) is None or current[store.image_ids[k]].label != label)
    tasks_after = len(list(labelstudio.admin().tasks.list(project=ls_project_id(store))))
    line = (f"restart test: tasks pushed {pushed}, tasks in Label Studio after restart {tasks_after}, "
            f"annotations pulled {report.new_label_events}, lost {lost} (restart took {restart_s:.1f} s)")
    report_line(line)
    print(line)
    assert (pushed, tasks_after, report.new_label_events, lost) == (8, 8, 8, 0)
    assert (again.pushed, again.already_present) == (0, 8)


def test_a_waiting_task_shows_its_image_from_where_the_file_moved(labelstudio, store, backend) -> None:
    # a folder moved and ingested again (or an image read from a known copy): the waiting task kept the old path, and
    # its annotator saw a broken image
    import dataclasses
    import shutil
    from pathlib import Path

    push(backend, store, [store.task(5, predicted="scratch", score=0.6)])
    task_id = task_ids_by_image(store)[store.image_ids[5]]
    guess = store.task(5, reason="open", predicted="spot", score=0.7, round_number=2)
    old = Path(store.paths[5])
    moved = old.parent.parent / "archive" / old.name
    moved.parent.mkdir()
    shutil.move(old, moved)
    admin = labelstudio.admin()
    assert httpx.get(f"{labelstudio.url}{admin.tasks.get(id=str(task_id)).data['image']}",
                     headers={"Authorization": f"Token {labelstudio.token}"}).status_code == 404
    report = push(backend, store, [], round_number=2, open_guesses=[dataclasses.replace(guess, image_path=str(moved))])
    assert (report.refreshed, report.warnings) == (1, [])
    data = admin.tasks.get(id=str(task_id)).data
    assert data["image"].endswith(f"archive/{old.name}") and data["defect_loop_image_id"] == store.image_ids[5]
    shown = httpx.get(f"{labelstudio.url}{data['image']}", headers={"Authorization": f"Token {labelstudio.token}"})
    assert shown.status_code == 200 and shown.content == moved.read_bytes()



def rename_class(backend, store, old: str, new: str, classes: list[str], *, warnings: list[str] | None = None):  # noqa: ANN001, ANN201
    """What `loop rename-class` does once its checks passed: the answers Label Studio got since the last pull into the
    store; Label Studio's rewrite, writing nothing to the store; then the store's answers, the record of the answers
    Label Studio rewrote, the classes; then Label Studio's choices (its warnings into `warnings`, else none expected)."""
    from store.queries import rename_label

    with store.session() as session:
        backend.record_answers_before_rename(session=session, project=session.get(Project, store.project_id), old=old, new=new)
    with store.session() as session:
        renamed = backend.rename_class(session=session, project=session.get(Project, store.project_id), old=old, new=new)
    with store.session() as session:
        project = session.get(Project, store.project_id)
        rename_label(session, project.id, old, new)
        backend.record_class_rename(session=session, project=project, renamed=renamed)
        project.classes = classes
    with store.session() as session:
        shown = backend.show_classes(session=session, project=session.get(Project, store.project_id))
    if warnings is None:
        assert shown == []
    else:
        warnings.extend(shown)
    return renamed


def test_a_class_renamed_in_loop_toml_is_renamed_in_label_studio_and_the_next_pull_finds_nothing_new(labelstudio, store, backend) -> None:
    # Label Studio kept the answers under the old name: the next pull read them again as a class the project no longer
    # has (and `loop rename-class` refused such a class)
    push(backend, store, [store.task(k, predicted="scratch", score=0.6) for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a, b = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.as_annotator(ANNOTATOR_B)
    renamed_answer = annotate(a, tasks[store.image_ids[4]], "scratch")
    annotate(b, tasks[store.image_ids[4]], "scratch")
    kept_answer = annotate(a, tasks[store.image_ids[5]], "spot")
    assert pull(backend, store).new_label_events == 3
    unpulled = annotate(b, tasks[store.image_ids[6]], "scratch")  # given after the last pull: renamed there too
    # round 2 questions image 5's label in its task: the question names the class asked about
    push(backend, store, [store.task(5, reason="suspected_label_error", predicted="scratch", score=0.8, current_label="spot", round_number=2)],
         round_number=2)
    admin = labelstudio.admin()
    users = {u.email: u.id for u in admin.users.list()}

    renamed = rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    # the tasks' texts name the guess: "Model's guess: scratch", and image 5's question "Suggested label: scratch"
    assert (renamed.answers, renamed.predictions, renamed.tasks, renamed.projects_gone) == (3, 4, 3, [])
    assert "Suggested label: scratch_line" in admin.tasks.get(id=str(tasks[store.image_ids[5]])).data["why"]
    answers = {x["annotation_id"]: x for x in lsc.list_annotated_tasks(admin, project_id=ls_project_id(store))}
    assert {answers[renamed_answer]["choices"][0], answers[unpulled]["choices"][0], answers[kept_answer]["choices"][0]} == {"scratch_line", "spot"}
    assert answers[renamed_answer]["completed_by"] == users[ANNOTATOR_A] and answers[unpulled]["completed_by"] == users[ANNOTATOR_B]
    assert all("scratch" not in x["predicted"] for x in answers.values())  # the guesses annotators were shown, renamed
    config = admin.projects.get(id=ls_project_id(store)).label_config
    assert 'value="scratch_line"' in config and 'value="scratch"' not in config

    # the next pull: the renamed answers are known (not saved again by their annotators); the one not pulled before was
    # taken in before the rewrite, then renamed with the rest
    report = pull(backend, store)
    assert (report.new_label_events, report.rejected, report.details["labelstudio"].get("confirmed", 0)) == (0, 0, 0)
    current = labels(store)
    assert [current[store.image_ids[k]].label for k in (4, 5, 6)] == ["scratch_line", "spot", "scratch_line"]
    assert pull(backend, store).new_label_events == 0

    # the question of a reopened task names the class it asks about: renamed with it
    renamed = rename_class(backend, store, "spot", "spot_stain", ["good", "scratch_line", "spot_stain"])
    assert (renamed.answers, renamed.tasks) == (1, 1)
    data = admin.tasks.get(id=str(tasks[store.image_ids[5]])).data
    assert (data["current_label"], data["relabel_of"]) == ("spot_stain", "spot_stain")
    assert "Current label: spot_stain." in data["why"] and "spot." not in data["why"]  # what the annotator reads (QA: the old name stayed)
    assert pull(backend, store).new_label_events == 0
    again = rename_class(backend, store, "spot", "spot_stain", ["good", "scratch_line", "spot_stain"])  # nothing left to rename
    assert (again.answers, again.predictions, again.tasks) == (0, 0, 0)


def test_a_class_rename_keeps_a_confirmation_not_pulled_yet_and_finishes_after_a_failure_without_inventing_one(
        labelstudio, store, backend, monkeypatch) -> None:  # noqa: ANN001
    push(backend, store, [store.task(k, predicted="scratch") for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    answers = {k: annotate(a, tasks[store.image_ids[k]], "scratch") for k in (4, 5, 6)}
    assert pull(backend, store).new_label_events == 3
    time.sleep(0.01)
    a.annotations.update(id=answers[4], result=lsc.choice_result("scratch"))  # saved again, not pulled yet: a confirmation

    # Label Studio fails on image 6's answer: the store is left as it was
    from label_studio_sdk.annotations.client import AnnotationsClient

    real_update = AnnotationsClient.update

    def failing(self, id, **kwargs):  # noqa: A002, ANN001, ANN003, ANN202
        if id == answers[6]:
            raise httpx.ConnectError("connection refused")
        return real_update(self, id, **kwargs)

    monkeypatch.setattr(AnnotationsClient, "update", failing)
    with pytest.raises(lsc.LabelStudioError, match="run the same command again"):
        rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    assert {labels(store)[store.image_ids[k]].label for k in (4, 5, 6)} == {"scratch"}  # the store's answers as they were
    with store.session() as session:  # the confirmation was taken in before the rewrite could hide it
        confirmed = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(answers[4])).order_by(LabelEvent.id)).all()
    assert [e.label for e in confirmed] == ["scratch", "scratch"]
    monkeypatch.setattr(AnnotationsClient, "update", real_update)

    # run again: it finishes; the answers rewritten the first time are not taken for their annotators' saves
    renamed = rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    assert renamed.answers == 1 and set(renamed.saved) == set(answers.values())
    report = pull(backend, store)
    assert (report.new_label_events, report.details["labelstudio"].get("confirmed", 0), report.rejected) == (0, 0, 0)
    with store.session() as session:
        confirmed = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(answers[4])).order_by(LabelEvent.id)).all()
    assert [e.label for e in confirmed] == ["scratch_line", "scratch_line"]
    assert {labels(store)[store.image_ids[k]].label for k in (4, 5, 6)} == {"scratch_line"}


def test_webhooks_sent_while_a_class_is_renamed_withdraw_nothing_and_a_deleted_project_is_passed_over(labelstudio, store, backend,
                                                                                                      make_store, tmp_path) -> None:  # noqa: ANN001
    # each rewrite makes Label Studio send ANNOTATION_UPDATED naming the new class before the store has it: recorded as
    # an answer outside the classes, it was rejected and withdrew the answer, leaving the image unlabeled
    push(backend, store, [store.task(k, predicted="scratch") for k in (4, 5)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    for k in (4, 5):
        annotate(a, tasks[store.image_ids[k]], "scratch")
    assert pull(backend, store).new_label_events == 2
    with _webhooks_to_a_receiver(labelstudio, store):
        with store.session() as session:
            renamed = backend.rename_class(session=session, project=session.get(Project, store.project_id), old="scratch", new="scratch_line")
        deadline = time.monotonic() + 10
        while len(_Receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    updates = [payload for _headers, payload in _Receiver.received if payload["action"] == "ANNOTATION_UPDATED"]
    assert len(updates) == 2
    for payload in updates:  # as the API records them, before the store's side of the rename
        with store.session() as session:
            outcome = record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payload)
        assert (outcome["recorded"], outcome["rejected"], list(outcome["outcomes"].values())) == (0, 0, ["deferred"])
    assert {labels(store)[store.image_ids[k]].label for k in (4, 5)} == {"scratch"}
    with store.session() as session:
        project = session.get(Project, store.project_id)
        from store.queries import rename_label

        rename_label(session, project.id, "scratch", "scratch_line")
        backend.record_class_rename(session=session, project=project, renamed=renamed)
        project.classes = ["good", "scratch_line", "spot"]
    report = pull(backend, store)
    assert (report.new_label_events, report.rejected, report.deleted) == (0, 0, 0)
    assert {labels(store)[store.image_ids[k]].label for k in (4, 5)} == {"scratch_line"}

    # the Label Studio project deleted there (with its tasks): nothing to rename in it, and no failure that running
    # the command again could never get past
    deleted = ls_project_id(store)
    labelstudio.admin().projects.delete(id=deleted)
    shown: list[str] = []
    gone = rename_class(backend, store, "spot", "spot_stain", ["good", "scratch_line", "spot_stain"], warnings=shown)
    assert (gone.answers, gone.projects_gone) == (0, [deleted])
    # showing the new choices found the project gone and retired its tasks: said, not done silently
    assert len(shown) == 1 and "no longer the one this store pushed to" in shown[0] and "its 2 tasks" in shown[0]


def _raw(client, path: str, method: str = "GET", json: dict | None = None):  # noqa: ANN001, ANN202
    """A request the SDK has no method for (drafts), through its HTTP client, as that client's user."""
    response = client._client_wrapper.httpx_client.request(path, method=method, json=json)
    response.raise_for_status()
    return response.json()


def _drafts(client, task_id: int) -> list[dict]:  # noqa: ANN001
    return _raw(client, f"api/tasks/{task_id}/drafts")


def test_a_class_rename_rewrites_every_annotators_drafts_so_a_draft_submitted_after_it_is_no_rejected_answer(labelstudio, store, backend) -> None:
    # drafts (an answer saved but not submitted, or an edit to a submitted answer) kept the old name: submitted after
    # the rename, each became an answer naming a class the project no longer has, rejected at the next pull
    push(backend, store, [store.task(k, predicted="spot") for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a, b = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.as_annotator(ANNOTATOR_B)
    edited = annotate(a, tasks[store.image_ids[5]], "spot")
    assert pull(backend, store).new_label_events == 1
    draft_a = _raw(a, f"api/tasks/{tasks[store.image_ids[4]]}/drafts", "POST", json={"result": lsc.choice_result("scratch"), "lead_time": 4.0})
    draft_b = _raw(b, f"api/tasks/{tasks[store.image_ids[4]]}/drafts", "POST", json={"result": lsc.choice_result("scratch"), "lead_time": 5.0})
    draft_edit = _raw(a, f"api/tasks/{tasks[store.image_ids[5]]}/annotations/{edited}/drafts", "POST",
                              json={"result": lsc.choice_result("scratch"), "lead_time": 6.0})
    draft_kept = _raw(b, f"api/tasks/{tasks[store.image_ids[6]]}/drafts", "POST", json={"result": lsc.choice_result("spot"), "lead_time": 7.0})

    renamed = rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    admin = labelstudio.admin()
    drafts = {d["id"]: d for k in (4, 5, 6) for d in _drafts(admin, tasks[store.image_ids[k]])}
    assert {d: (drafts[d]["user"], lsc.result_choices(drafts[d]["result"]), drafts[d]["lead_time"])
            for d in (draft_a["id"], draft_b["id"], draft_edit["id"], draft_kept["id"])} == {
        draft_a["id"]: (ANNOTATOR_A, ["scratch_line"], 4.0), draft_b["id"]: (ANNOTATOR_B, ["scratch_line"], 5.0),  # their user (shown by email)
        draft_edit["id"]: (ANNOTATOR_A, ["scratch_line"], 6.0), draft_kept["id"]: (ANNOTATOR_B, ["spot"], 7.0)}
    assert drafts[draft_edit["id"]]["annotation"] == edited  # still the draft of an edit to that answer
    assert (renamed.drafts, renamed.answers) == (3, 0)
    assert rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"]).drafts == 0  # nothing left

    # the drafts submitted as the editor does: answers naming the new class, each under its annotator
    mine = _drafts(a, tasks[store.image_ids[4]])[0]
    _raw(a, f"api/tasks/{tasks[store.image_ids[4]]}/annotations/", "POST",
                 json={"result": mine["result"], "lead_time": 5.0, "draft_id": mine["id"]})
    _raw(a, f"api/annotations/{edited}/", "PATCH", json={"result": drafts[draft_edit["id"]]["result"], "draft_id": draft_edit["id"]})
    report = pull(backend, store)
    assert (report.new_label_events, report.rejected, report.deleted) == (2, 0, 0)
    assert [labels(store)[store.image_ids[k]].label for k in (4, 5)] == ["scratch_line", "scratch_line"]


def test_an_answer_naming_a_class_renamed_away_is_taken_as_its_new_name_by_the_pull_a_webhook_defers_it_to(labelstudio, store, backend) -> None:
    # an editor open during the rename autosaves (and submits) the old name: the pull rejected the answer, asked again
    # and withdrew the annotator's earlier answer
    push(backend, store, [store.task(k, predicted="spot") for k in (4, 5, 6, 7)])
    tasks = task_ids_by_image(store)
    a, b = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.as_annotator(ANNOTATOR_B)
    changed = annotate(a, tasks[store.image_ids[5]], "spot")
    kept = annotate(a, tasks[store.image_ids[6]], "scratch")
    assert pull(backend, store).new_label_events == 2
    renamed = rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    assert renamed.answers == 1
    assert pull(backend, store).new_label_events == 0

    fresh = annotate(a, tasks[store.image_ids[4]], "scratch")  # a new answer
    time.sleep(0.01)
    a.annotations.update(id=changed, result=lsc.choice_result("scratch"))  # an answer changed to the old name
    a.annotations.update(id=kept, result=lsc.choice_result("scratch"))  # the renamed answer saved again: a confirmation
    report = pull(backend, store)
    details = report.details["labelstudio"]
    assert (report.new_label_events, report.rejected, report.deleted, details.get("withdrawn", 0)) == (3, 0, 0, 0)
    current = labels(store)
    assert [current[store.image_ids[k]].label for k in (4, 5, 6)] == ["scratch_line"] * 3
    assert (details["renamed_on_the_way_in"], details.get("recorded"), details.get("changed"), details.get("confirmed")) == (3, 1, 1, 1)
    with store.session() as session:
        events = {e.external_id: e for e in session.scalars(select(LabelEvent).where(LabelEvent.external_id.in_([str(fresh), str(changed)])))}
        assert events[str(fresh)].annotator == events[str(changed)].annotator == labelstudio_backend.annotator_name(
            next(u.id for u in labelstudio.admin().users.list() if u.email == ANNOTATOR_A))
        assert session.scalar(select(func.count()).select_from(RejectedAnnotation)) == 0
    again = pull(backend, store)
    assert (again.new_label_events, again.details["labelstudio"]["renamed_on_the_way_in"]) == (0, 0)

    # a webhook naming the old name is deferred to the next pull (one sent during a rename could name a class the
    # store is about to have: test_webhooks_sent_during_a_rename_back_record_no_answer_nobody_gave), which takes it as
    # the new class
    answer = annotate(b, tasks[store.image_ids[7]], "scratch")
    saved = labelstudio.admin().annotations.get(id=answer)
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": ls_project_id(store)}, "task": {"id": tasks[store.image_ids[7]]},
               "annotation": {"id": answer, "result": lsc.choice_result("scratch"), "completed_by": saved.completed_by,
                              "was_cancelled": False, "lead_time": 3.0, "created_at": str(saved.created_at), "updated_at": str(saved.updated_at)}}
    with store.session() as session:
        outcome = record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payload)
    assert (outcome["recorded"], outcome["rejected"], list(outcome["outcomes"].values())) == (0, 0, ["deferred"])
    later = pull(backend, store)
    assert (later.new_label_events, later.rejected, later.details["labelstudio"]["renamed_on_the_way_in"]) == (1, 0, 1)
    assert labels(store)[store.image_ids[7]].label == "scratch_line"
    assert pull(backend, store).new_label_events == 0


def test_webhooks_sent_during_a_rename_back_record_no_answer_nobody_gave(labelstudio, store, backend) -> None:
    # scratch -> scratch_line, then back: Label Studio's rewrite sends ANNOTATION_UPDATED naming scratch while the store
    # still has scratch_line and remembers scratch -> scratch_line; the webhook took it as scratch_line, saved later
    # (by the rewrite): a "confirmation" of each answer that its annotator never gave
    push(backend, store, [store.task(k, predicted="scratch") for k in (4, 5)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    answers = [annotate(a, tasks[store.image_ids[k]], "scratch") for k in (4, 5)]
    assert pull(backend, store).new_label_events == 2
    rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    assert pull(backend, store).new_label_events == 0
    with _webhooks_to_a_receiver(labelstudio, store):
        # `loop rename-class scratch_line scratch`: Label Studio's side first, the store's after
        with store.session() as session:
            backend.record_answers_before_rename(session=session, project=session.get(Project, store.project_id), old="scratch_line", new="scratch")
        with store.session() as session:
            renamed = backend.rename_class(session=session, project=session.get(Project, store.project_id), old="scratch_line", new="scratch")
        deadline = time.monotonic() + 10
        while len(_Receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert renamed.answers == 2
    updates = [payload for _headers, payload in _Receiver.received if payload["action"] == "ANNOTATION_UPDATED"]
    assert len(updates) == 2
    for payload in updates:  # as the API records them, before the store's side of the rename back
        with store.session() as session:
            outcome = record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payload)
        assert (outcome["recorded"], outcome["rejected"], list(outcome["outcomes"].values())) == (0, 0, ["deferred"])
    with store.session() as session:
        from store.queries import rename_label

        project = session.get(Project, store.project_id)
        rename_label(session, project.id, "scratch_line", "scratch")
        backend.record_class_rename(session=session, project=project, renamed=renamed)
        project.classes = ["good", "scratch", "spot"]
    report = pull(backend, store)
    assert (report.new_label_events, report.rejected, report.details["labelstudio"].get("confirmed", 0)) == (0, 0, 0)
    with store.session() as session:
        events = session.scalars(select(LabelEvent).where(LabelEvent.external_id.in_([str(x) for x in answers])).order_by(LabelEvent.id)).all()
    assert [(e.action, e.label) for e in events] == [("set", "scratch")] * 2  # each answer once, as its annotator gave it
    assert {labels(store)[store.image_ids[k]].label for k in (4, 5)} == {"scratch"}


def test_an_answer_taken_as_a_renamed_class_stays_it_when_its_old_name_is_made_a_class_again(labelstudio, store, backend) -> None:
    # the answer taken as scratch_line on the way in still says scratch in Label Studio: once loop.toml makes scratch
    # a class again, the next pull read the untouched answer as scratch and recorded a change its annotator never made
    push(backend, store, [store.task(k, predicted="spot") for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    changed = annotate(a, tasks[store.image_ids[5]], "spot")
    kept = annotate(a, tasks[store.image_ids[6]], "spot")
    assert pull(backend, store).new_label_events == 2
    rename_class(backend, store, "scratch", "scratch_line", ["good", "scratch_line", "spot"])
    late = annotate(a, tasks[store.image_ids[4]], "scratch")  # an editor left open during the rename
    report = pull(backend, store)
    assert (report.new_label_events, report.details["labelstudio"]["renamed_on_the_way_in"]) == (1, 1)
    assert labels(store)[store.image_ids[4]].label == "scratch_line"

    with store.session() as session:  # loop.toml names scratch again: a class of its own, not the one renamed
        project = session.get(Project, store.project_id)
        project.classes = ["good", "scratch", "scratch_line", "spot"]
    with store.session() as session:
        assert backend.show_classes(session=session, project=session.get(Project, store.project_id)) == []
    report = pull(backend, store)
    assert (report.new_label_events, report.rejected, report.details["labelstudio"].get("confirmed", 0)) == (0, 0, 0)
    assert labels(store)[store.image_ids[4]].label == "scratch_line"

    # saved again by their annotator: an answer changed in place is recorded, one saved unchanged is confirmed, and
    # the late answer chosen again as scratch now means the class scratch
    time.sleep(0.01)
    a.annotations.update(id=changed, result=lsc.choice_result("good"))
    a.annotations.update(id=kept, result=lsc.choice_result("spot"))
    a.annotations.update(id=late, result=lsc.choice_result("scratch"))
    report = pull(backend, store)
    details = report.details["labelstudio"]
    assert (report.new_label_events, details.get("recorded", 0), details.get("changed"), details.get("confirmed"), details["renamed_on_the_way_in"]) == (3, 0, 2, 1, 0)
    assert [labels(store)[store.image_ids[k]].label for k in (4, 5, 6)] == ["scratch", "good", "spot"]
    with store.session() as session:
        events = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(late)).order_by(LabelEvent.id)).all()
    assert [e.label for e in events] == ["scratch_line", "scratch"]
    assert pull(backend, store).new_label_events == 0


@contextmanager
def _webhooks_to_a_receiver(labelstudio, store):  # noqa: ANN001, ANN202
    """Label Studio sends the project's webhooks to a receiver on loopback while the block runs (_wait_for_webhooks
    reads them); the receiver stops after."""
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        lsc.create_webhook(labelstudio.admin(), project_id=ls_project_id(store), url=f"http://127.0.0.1:{receiver.server_port}/hook",
                           secret_header="X-Loop-Webhook-Secret", secret="s")
        yield
    finally:
        receiver.shutdown()


def _wait_for_webhooks(n: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while len(_Receiver.received) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return [payload for _headers, payload in _Receiver.received]


def _record_webhook(store, payload: dict) -> str:  # noqa: ANN001
    with store.session() as session:
        outcome = record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payload)
    return outcome["outcomes"][str(payload["annotation"]["id"])]


def test_webhooks_sent_during_a_merge_are_left_to_the_pull_not_taken_as_annotators_changing_their_answers(labelstudio, store, backend) -> None:
    # `loop rename-class scratch spot --merge`: each rewrite makes Label Studio send ANNOTATION_UPDATED naming spot, a
    # class the store has, so the webhook recorded it at once as its annotator changing scratch to spot: a fresh answer
    # nobody gave, and asks still open read it as answered
    push(backend, store, [store.task(k, predicted="scratch") for k in (4, 5, 6)])
    tasks = task_ids_by_image(store)
    a, admin = labelstudio.as_annotator(ANNOTATOR_A), labelstudio.admin()
    merged = annotate(a, tasks[store.image_ids[4]], "scratch")
    own = annotate(admin, tasks[store.image_ids[5]], "scratch")  # the token's user annotates too: its own answer, rewritten
    changed = annotate(a, tasks[store.image_ids[6]], "spot")
    assert pull(backend, store).new_label_events == 3
    with _webhooks_to_a_receiver(labelstudio, store):
        with store.session() as session:
            backend.record_answers_before_rename(session=session, project=session.get(Project, store.project_id), old="scratch", new="spot")
        with store.session() as session:
            renamed = backend.rename_class(session=session, project=session.get(Project, store.project_id), old="scratch", new="spot")
        a.annotations.update(id=changed, result=lsc.choice_result("good"))  # its annotator changes an answer meanwhile
        payloads = _wait_for_webhooks(3)
    assert renamed.answers == 2
    assert [p["action"] for p in payloads] == ["ANNOTATION_UPDATED"] * 3
    # as the API records them, before the store's side of the rename
    outcomes = {p["annotation"]["id"]: _record_webhook(store, p) for p in payloads}
    assert outcomes == {merged: "deferred", own: "deferred", changed: "changed"}  # the annotator's own change: at once
    assert [labels(store)[store.image_ids[k]].label for k in (4, 5, 6)] == ["scratch", "scratch", "good"]
    with store.session() as session:
        from store.queries import rename_label

        project = session.get(Project, store.project_id)
        rename_label(session, project.id, "scratch", "spot")
        backend.record_class_rename(session=session, project=project, renamed=renamed)
        project.classes = ["good", "spot"]
    report = pull(backend, store)
    assert (report.new_label_events, report.rejected, report.details["labelstudio"].get("confirmed", 0)) == (0, 0, 0)
    with store.session() as session:
        events = session.scalars(select(LabelEvent).where(LabelEvent.external_id.in_([str(merged), str(own)])).order_by(LabelEvent.id)).all()
    assert [(e.action, e.label) for e in events] == [("set", "spot")] * 2  # each answer once, as its annotator gave it
    assert [labels(store)[store.image_ids[k]].label for k in (4, 5, 6)] == ["spot", "spot", "good"]


def test_a_late_webhook_of_an_older_save_takes_back_no_newer_answer_the_pull_recorded(labelstudio, store, backend) -> None:
    # the pull recorded an answer's second save (scratch), then the webhook of its first save (good) came in and was
    # recorded as a change: the image read good until the next pull put scratch back
    push(backend, store, [store.task(k, predicted="good") for k in (4, 5)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    with _webhooks_to_a_receiver(labelstudio, store):
        answer = annotate(a, tasks[store.image_ids[4]], "good")
        skipped = annotate(a, tasks[store.image_ids[5]], "spot")
        time.sleep(0.01)
        a.annotations.update(id=answer, result=lsc.choice_result("scratch"))
        a.annotations.update(id=skipped, result=[], was_cancelled=True)  # answered, then skipped
        late = _wait_for_webhooks(4)
        report = pull(backend, store)  # the newer saves, before the webhooks are read
        assert (report.new_label_events, report.skipped) == (1, 1)
        # the webhooks, read after the pull: the first saves are older than the ones recorded, the second ones the same
        assert [(p["action"], _record_webhook(store, p)) for p in late] == [
            ("ANNOTATION_CREATED", "unchanged"), ("ANNOTATION_CREATED", "unchanged"), ("ANNOTATION_UPDATED", "unchanged"), ("ANNOTATION_UPDATED", "unchanged")]
        assert labels(store)[store.image_ids[4]].label == "scratch"
        assert store.image_ids[5] not in {i for i, label in labels(store).items() if label.label}
        assert pull(backend, store).new_label_events == 0

        # newer saves still count: the answer changed in place is recorded (as changed), saved again unchanged it is confirmed
        time.sleep(0.01)
        a.annotations.update(id=answer, result=lsc.choice_result("spot"))
        time.sleep(0.01)
        a.annotations.update(id=answer, result=lsc.choice_result("spot"))
        newer = _wait_for_webhooks(6)[4:]
    assert [_record_webhook(store, p) for p in newer] == ["changed", "confirmed"]
    assert labels(store)[store.image_ids[4]].label == "spot"
    assert pull(backend, store).new_label_events == 0


def test_a_late_webhook_of_a_save_made_before_the_answer_was_deleted_or_withdrawn_brings_nothing_back(labelstudio, store, backend) -> None:
    # delete rows carried no save time, so a late ANNOTATION_UPDATED of a save made before the answer was deleted in
    # Label Studio (or withdrawn: changed into an empty answer) was recorded again and its label came back
    push(backend, store, [store.task(k, predicted="good") for k in (4, 5)])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    with _webhooks_to_a_receiver(labelstudio, store):
        deleted = annotate(a, tasks[store.image_ids[4]], "scratch")
        withdrawn = annotate(a, tasks[store.image_ids[5]], "scratch")
        time.sleep(0.01)
        a.annotations.update(id=deleted, result=lsc.choice_result("spot"))  # its webhook is held back
        a.annotations.update(id=withdrawn, result=lsc.choice_result("good"))  # held back too
        time.sleep(0.01)
        a.annotations.delete(id=deleted)
        a.annotations.update(id=withdrawn, result=[])  # the answer emptied: rejected, the answer recorded before withdrawn
        payloads = _wait_for_webhooks(6)
        first, late = payloads[:2], payloads[2:4]
        assert [p["action"] for p in payloads] == ["ANNOTATION_CREATED"] * 2 + ["ANNOTATION_UPDATED"] * 2 + ["ANNOTATIONS_DELETED", "ANNOTATION_UPDATED"]
        assert [_record_webhook(store, p) for p in first] == ["recorded", "recorded"]
        with store.session() as session:
            outcome = record_webhook_event(session=session, project=session.get(Project, store.project_id), payload=payloads[4])
        assert outcome["outcomes"] == {str(deleted): "deleted"}
        assert _record_webhook(store, payloads[5]) == "rejected"
        assert not {store.image_ids[4], store.image_ids[5]} & {i for i, label in labels(store).items() if label.label}
        # the held-back saves arrive now: older than the deletion and the withdrawal, they bring no label back
        assert [_record_webhook(store, p) for p in late] == ["unchanged", "unchanged"]
        assert not {store.image_ids[4], store.image_ids[5]} & {i for i, label in labels(store).items() if label.label}
        assert pull(backend, store).new_label_events == 0

        # a save after the withdrawal is the annotator answering again: recorded at once
        time.sleep(0.01)
        a.annotations.update(id=withdrawn, result=lsc.choice_result("spot"))
        again = _wait_for_webhooks(7)[6]
    assert _record_webhook(store, again) == "recorded"
    assert labels(store)[store.image_ids[5]].label == "spot"
    assert pull(backend, store).new_label_events == 0


def test_the_pull_records_a_changed_answer_even_when_label_studio_saved_it_at_an_earlier_time(labelstudio, store, backend) -> None:
    # the rule that a save older than the one recorded is nothing (for late webhooks) applied to the pull too, which
    # reads what Label Studio holds now: after Label Studio's clock stepped back a real change was "unchanged" on every pull
    push(backend, store, [store.task(4, predicted="good")])
    tasks = task_ids_by_image(store)
    a = labelstudio.as_annotator(ANNOTATOR_A)
    answer = annotate(a, tasks[store.image_ids[4]], "scratch")
    assert pull(backend, store).new_label_events == 1
    with store.session() as session:  # as if Label Studio's clock was ahead when it saved the answer pulled
        event = session.scalars(select(LabelEvent).where(LabelEvent.external_id == str(answer))).one()
        event.external_updated_at = event.external_updated_at + timedelta(hours=1)
    a.annotations.update(id=answer, result=lsc.choice_result("spot"))
    assert pull(backend, store).new_label_events == 1
    assert labels(store)[store.image_ids[4]].label == "spot"
    assert pull(backend, store).new_label_events == 0  # the same save once recorded: nothing new


class _Servers:
    """Label Studio servers started one after another at one address, each from a fresh data dir (ids from 1), with
    the same admin token and one annotator."""

    def __init__(self, tmp_path) -> None:  # noqa: ANN001
        if lss.installed_version(lss.default_venv_dir()) != lss.LABEL_STUDIO_VERSION:
            pytest.skip("Label Studio is not installed: run `bash .ci/install_labelstudio.sh`")
        self.tmp_path, self.template = tmp_path, lss.default_template_path()
        self.port, self.token, self.annotator_token = lss.free_port(), secrets.token_hex(20), secrets.token_hex(20)

    def start(self, name: str):  # noqa: ANN201
        server = lss.start_server(data_dir=self.tmp_path / name, port=self.port, token=self.token, document_root=str(self.tmp_path),
                                  template=self.template if self.template.exists() else None, timeout_s=300)
        lss.add_user(data_dir=self.tmp_path / name, username=ANNOTATOR_A, password="-" + secrets.token_urlsafe(12), token=self.annotator_token)
        return server

    def backend(self, server) -> LabelStudioBackend:  # noqa: ANN001
        return LabelStudioBackend(url=server.url, api_key=self.token, document_root=str(self.tmp_path))

    def answer(self, server, store, tasks: dict[int, int], images) -> None:  # noqa: ANN001
        annotator = LabelStudio(base_url=server.url, api_key=self.annotator_token)
        for k in images:
            annotate(annotator, tasks[store.image_ids[k]], store.truth[k])


def test_a_server_replaced_at_the_same_address_loses_no_label_and_puts_no_answer_on_another_image(tmp_path, store) -> None:
    """Label Studio reinstalled (a fresh data dir) at the same address: project, task and answer ids start over at 1,
    so the new project, its tasks and its answers take the ids of the store's old ones. Before, the old answers not
    listed any more were recorded as deleted, and new answers were stored on the images of the old tasks of those ids."""
    servers = _Servers(tmp_path)
    first = servers.start("first")
    try:
        backend = servers.backend(first)
        push(backend, store, [store.task(k, predicted="good") for k in range(4, 8)])
        with store.session() as session:  # as a round records its asks: what the pull that retires the project asks again
            session.add_all(Selection(round_id=store.round_ids[1], image_id=store.image_ids[k], rank=k, score=0.5, strategy="margin", reason="uncertain",
                                      predicted_label="good", push_status="pushed", pushed_at=datetime(2026, 1, 1, tzinfo=timezone.utc)) for k in range(4, 8))
        servers.answer(first, store, task_ids_by_image(store), range(4, 6))  # image 7's task waits
        skipper = LabelStudio(base_url=first.url, api_key=servers.annotator_token)  # image 6's only answer is a skip: it waits too
        skipper.annotations.create(id=task_ids_by_image(store)[store.image_ids[6]], result=[], was_cancelled=True, lead_time=1.0)
        first_pull = pull(backend, store)
        assert (first_pull.new_label_events, first_pull.skipped) == (2, 1)
    finally:
        lss.stop_server(first)
    before = {store.image_ids[k]: (labels(store)[store.image_ids[k]].label, "annotator") for k in range(4, 6)}  # the first server's answers
    second = servers.start("second")
    try:
        backend = servers.backend(second)
        gone = pull(backend, store)
        pushed = push(backend, store, [store.task(k, predicted="good") for k in (0, 1, 2)])
        tasks = task_ids_by_image(store)
        assert sorted(tasks.values()) == [1, 2, 3] and ls_project_id(store) == 1  # the old ids, in a new project
        servers.answer(second, store, tasks, range(0, 3))
        after = pull(backend, store)
    finally:
        lss.stop_server(second)
    current = labels(store)
    assert after.new_label_events == 3 and after.deleted == 0 and after.rejected == 0
    assert {k: current[store.image_ids[k]].label for k in range(0, 6)} == {k: store.truth[k] for k in range(0, 6)}
    assert all(before[image_id] == (current[image_id].label, current[image_id].source) for image_id in before)  # none lost or moved
    assert gone.deleted == 0 and any("is gone" in warning for warning in gone.warnings)
    # the pull retires it: the round that pulled asks the images whose task waited in its own push (the push found it
    # gone, after the round had chosen its asks, so they waited a round more)
    assert pushed.gone_image_ids == set()
    # one line, not two: what became of its tasks and answers (QA)
    (said,) = [warning for warning in gone.warnings if "is gone" in warning]
    assert "the store forgets its 4 tasks there; the answers recorded from it stay labels (2 images)" in said, gone.warnings
    assert not any("no longer the one this store pushed to" in warning for warning in gone.warnings)
    with store.session() as session:  # their tasks waited: asked again (QA: a skipped image counted as answered, and no later round asked it again)
        asks = dict(session.execute(select(Selection.image_id, Selection.push_status).where(Selection.round_id == store.round_ids[1])).all())
    assert asks == {store.image_ids[4]: "pushed", store.image_ids[5]: "pushed", store.image_ids[6]: "pending", store.image_ids[7]: "pending"}
    with store.session() as session:
        retired = session.get(Project, store.project_id).labelstudio_projects["retired"]
        old_voters = {event.annotator for event in session.scalars(select(LabelEvent).where(LabelEvent.image_id.in_(list(before))))}
    assert len(retired) == 1 and retired[0]["tasks"] == 4 and retired[0]["answered_images"] == 2
    assert all(voter.startswith("retired 1:labelstudio:") for voter in old_voters)  # the new server's user 1 is someone else


def test_a_project_made_by_hand_under_the_stores_old_id_gives_the_store_none_of_its_answers(tmp_path, store) -> None:
    """A fresh server where someone first made a project of their own (id 1, the store's old id, its tasks answered):
    neither the pull nor `loop rename-class`'s reading of the answers before its rewrite takes them as the store's."""
    servers = _Servers(tmp_path)
    first = servers.start("first")
    try:
        push(servers.backend(first), store, [store.task(k, predicted="good") for k in range(4, 7)])
        servers.answer(first, store, task_ids_by_image(store), range(4, 7))
        assert pull(servers.backend(first), store).new_label_events == 3
    finally:
        lss.stop_server(first)
    before = {image_id: label.label for image_id, label in labels(store).items()}
    second = servers.start("second")
    try:
        admin = LabelStudio(base_url=second.url, api_key=servers.token)
        own = admin.projects.create(title="someone's own", label_config=lsc.label_config_for(["good", "scratch", "spot"]))
        assert own.id == 1
        tasks = [admin.tasks.create(project=own.id, data={"image": f"/data/local-files/?d=x{k}.png", "why": ""}).id for k in range(3)]
        for task_id in tasks:
            admin.annotations.create(id=task_id, result=lsc.choice_result("spot"))
        backend = servers.backend(second)
        with store.session() as session:
            taken = backend.record_answers_before_rename(session=session, project=session.get(Project, store.project_id), old="spot", new="stain")
        report = pull(backend, store)
    finally:
        lss.stop_server(second)
    assert taken == 0 and report.new_label_events == 0 and report.deleted == 0
    assert {image_id: label.label for image_id, label in labels(store).items()} == before
    assert any("not the one this store pushed to" in warning for warning in report.warnings)
