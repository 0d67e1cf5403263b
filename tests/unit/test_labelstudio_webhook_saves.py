"""Which Label Studio saves a webhook leaves alone: one older than the save the store recorded (a webhook arriving
after the pull that saw a newer save), any save of an answer deleted since or one from before its withdrawal, and one
defect-loop's own user made (`loop rename-class` rewriting answers)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from labeling.labelstudio_backend import _late_webhook, _older_save, _saved_by_the_loop, record_webhook_event
from store import session_scope
from store.models import AnnotationTask, LabelEvent, Project

from small_store import small_store

SAVED = datetime(2026, 12, 5, 22, 0, 0, 123456, tzinfo=timezone.utc)


def _event(saved_at: datetime | None, action: str = "set") -> LabelEvent:
    return LabelEvent(image_id=1, label="scratch" if action == "set" else None, source="annotator", action=action, annotator="ls-user-2",
                      external_id="7", external_updated_at=saved_at)


def test_only_a_save_more_than_a_millisecond_before_the_recorded_one_is_older() -> None:
    event = _event(SAVED)
    assert _older_save(event, SAVED - timedelta(seconds=30)) is True
    assert _older_save(event, SAVED - timedelta(microseconds=900)) is False  # the same save, to the millisecond
    assert _older_save(event, SAVED) is False and _older_save(event, SAVED + timedelta(seconds=1)) is False
    assert _older_save(_event(SAVED.replace(tzinfo=None)), SAVED - timedelta(seconds=30)) is True  # SQLite: no zone back
    assert _older_save(_event(SAVED, action="skip"), SAVED - timedelta(seconds=30)) is True  # a skip keeps its save too
    # nothing to compare: the old logic decides
    assert _older_save(_event(None), SAVED) is False and _older_save(_event(None, action="delete"), SAVED) is False
    assert _older_save(event, None) is False


def test_a_save_by_another_user_than_the_annotator_or_by_the_project_creator_is_the_loops() -> None:
    project = {"id": 7, "created_by": 1}  # Label Studio's project, made by defect-loop's token
    assert _saved_by_the_loop({"project": project}, {"updated_by": 1}, 3) is True  # a rename rewriting annotator 3's answer
    assert _saved_by_the_loop({"project": project}, {"updated_by": 1}, 1) is True  # the token's user, answering itself
    assert _saved_by_the_loop({"project": project}, {"updated_by": 3}, 3) is False  # the annotator's own save
    assert _saved_by_the_loop({"project": project}, {"updated_by": {"id": 3}}, {"id": 3}) is False
    assert _saved_by_the_loop({"project": project}, {"updated_by": "3"}, "3") is False  # ids as digits
    assert _saved_by_the_loop({"project": 7}, {"updated_by": 3}, 3) is False  # no creator named
    assert _saved_by_the_loop({"project": project}, {}, 3) is False  # no updated_by: nothing tells (recorded as before)
    assert _saved_by_the_loop({"project": project}, {"updated_by": True}, 3) is False


def test_after_a_deletion_a_webhook_save_counts_only_when_newer_than_a_withdrawal() -> None:
    deleted = _event(None, action="delete")  # deleted in Label Studio: it never reuses the id, nothing after it is live
    assert _late_webhook(deleted, SAVED) is True and _late_webhook(deleted, SAVED + timedelta(days=1)) is True
    assert _late_webhook(deleted, None) is True
    withdrawn = _event(SAVED, action="delete")  # changed into an answer we cannot use, saved at SAVED
    assert _late_webhook(withdrawn, SAVED - timedelta(seconds=5)) is True  # a save from before it, arriving late
    assert _late_webhook(withdrawn, SAVED + timedelta(microseconds=900)) is True  # the withdrawing save itself
    assert _late_webhook(_event(SAVED.replace(tzinfo=None), action="delete"), SAVED - timedelta(seconds=5)) is True  # SQLite: no zone back
    assert _late_webhook(withdrawn, SAVED + timedelta(seconds=5)) is False  # answered again since: recorded
    assert _late_webhook(withdrawn, None) is True  # no save time: the pull decides
    # an answer recorded: only a save older than the recorded one
    assert _late_webhook(_event(SAVED), SAVED - timedelta(seconds=5)) is True
    assert _late_webhook(_event(SAVED), SAVED + timedelta(seconds=5)) is False and _late_webhook(_event(None), SAVED) is False


def test_a_webhook_whose_task_shows_another_image_than_the_stores_task_of_that_id_is_refused(tmp_path: Path) -> None:
    """A server reinstalled at the same address gives the store's old task ids to new tasks: an answer there is not
    an answer about the store's image of that id."""
    engine, project_id, image_ids = small_store(tmp_path, n_images=2)
    with session_scope(engine) as session:
        project = session.get(Project, project_id)
        session.add(AnnotationTask(backend="labelstudio", image_id=image_ids[0], external_project_id="1", external_task_id="3"))
        session.flush()
        payload = {"action": "ANNOTATION_CREATED", "project": {"id": 1},
                   "annotation": {"id": 1, "completed_by": 2, "result": [{"type": "choices", "from_name": "label", "to_name": "image",
                                                                           "value": {"choices": ["scratch"]}}]}}
        with pytest.raises(ValueError, match="shows image"):
            record_webhook_event(session=session, project=project, payload={**payload, "task": {"id": 3, "data": {"defect_loop_image_id": image_ids[1]}}})
        result = record_webhook_event(session=session, project=project, payload={**payload, "task": {"id": 3, "data": {"defect_loop_image_id": image_ids[0]}}})
        assert result["recorded"] == 1
    engine.dispose()


def test_retiring_a_project_asks_again_what_waited_there_a_reopened_ask_too_and_forgets_its_rejections(tmp_path: Path) -> None:
    """Image 0: answered, then its task reopened (a suspected label error) and still waiting; image 1: answered;
    image 2: never answered. All three tasks in a Label Studio project that is no longer the store's."""
    from labeling.labelstudio_backend import LabelStudioBackend
    from store.models import RejectedAnnotation, Round, Selection

    engine, project_id, image_ids = small_store(tmp_path, n_images=3)
    now = datetime.now(timezone.utc)
    with session_scope(engine) as session:
        round_ = Round(project_id=project_id, number=1, status="completed")
        session.add(round_)
        session.flush()
        for k, image_id in enumerate(image_ids):
            session.add(AnnotationTask(backend="labelstudio", image_id=image_id, external_project_id="1", external_task_id=str(k + 1)))
            session.add(Selection(round_id=round_.id, image_id=image_id, rank=k, score=1.0, strategy="margin", reason="uncertain",
                                  push_status="pushed", pushed_at=now - timedelta(hours=2)))
        for k in (0, 1):
            session.add(LabelEvent(image_id=image_ids[k], label="scratch", source="annotator", annotator="labelstudio:2", external_id=str(k + 1),
                                   created_at=now - timedelta(hours=1)))
        session.add(Selection(round_id=round_.id, image_id=image_ids[0], rank=9, score=1.0, strategy="label_quality", reason="suspected_label_error",
                              push_status="pushed", pushed_at=now))
        session.add(RejectedAnnotation(project_id=project_id, backend="labelstudio", external_id="7", reason="not a class", payload={"task_id": 3}))
        session.flush()
        gone: set[int] = set()
        warnings: list[str] = []
        LabelStudioBackend(url="http://127.0.0.1:1", api_key="x")._retire_project(session, session.get(Project, project_id), 1, warnings=warnings, gone=gone)
        assert gone == {image_ids[0], image_ids[2]} and warnings
        assert session.scalars(select(RejectedAnnotation)).one().payload["retired"] == "retired 1:"
        assert {e.external_id for e in session.scalars(select(LabelEvent))} == {"retired 1:1", "retired 1:2"}
    engine.dispose()
