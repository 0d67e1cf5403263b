"""Which suspected label errors a round sends back for relabeling: not one asked before with the same label (waiting
or reviewed), but one whose earlier ask was withdrawn (nobody saw it), and not one asked by a round stopped after its
push (its label-issue rows never written)."""
from __future__ import annotations

import types
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine

import loop.round as round_module
from store.db import session_scope
from store.models import Base, Image, IngestBatch, LabelEvent, LabelIssue, Project, Round, Selection


@pytest.fixture
def store():  # noqa: ANN201
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with session_scope(engine) as session:
        project = Project(name="p", root_dir="/tmp", classes=["good", "scratch"], negative_class="good")
        session.add(project)
        session.flush()
        batch = IngestBatch(project_id=project.id, source="x", layout="folders")
        session.add(batch)
        session.flush()
        image = Image(project_id=project.id, sha256="a" * 64, path="/x.png", split="train", ingest_batch_id=batch.id)
        first, second = Round(project_id=project.id, number=1, status="completed"), Round(project_id=project.id, number=2, status="running")
        session.add_all([image, first, second])
        session.flush()
        ids = types.SimpleNamespace(project=project.id, image=image.id, first=first.id, second=second.id)
    yield engine, ids
    engine.dispose()


def _requests(engine, ids) -> tuple[list[int], dict]:  # noqa: ANN001
    state = types.SimpleNamespace(ctx=types.SimpleNamespace(engine=engine), round_id=ids.second, details={},
                                  label_issue_rows=[{"image_id": ids.image, "position": 0, "given_label": "good", "score": 0.01}])
    return [row["image_id"] for row in round_module._relabel_requests(state, 5)], state.details["label_quality"]


def _ask(session, ids, *, status: str, recorded: bool = True) -> None:  # noqa: ANN001
    if recorded:
        session.add(LabelIssue(round_id=ids.first, image_id=ids.image, kind="label_error", given_label="good", score=0.01, rank=0))
    session.add(Selection(round_id=ids.first, image_id=ids.image, rank=0, score=0.99, strategy="label_quality",
                          reason="suspected_label_error", push_status=status))


def test_an_ask_waiting_with_the_same_label_is_not_repeated(store) -> None:  # noqa: ANN001
    engine, ids = store
    with session_scope(engine) as session:
        _ask(session, ids, status="pushed")
    assert _requests(engine, ids) == ([], {"already_questioned": 1})


def test_a_withdrawn_ask_nobody_saw_is_asked_again(store) -> None:  # noqa: ANN001
    # review: its file quarantined before the push, back since: skipped every round, the label never questioned
    engine, ids = store
    with session_scope(engine) as session:
        _ask(session, ids, status="withdrawn")
    assert _requests(engine, ids) == ([ids.image], {"already_questioned": 0})


def test_an_ask_of_a_round_stopped_after_its_push_is_not_repeated_with_the_label_it_asked_about(store) -> None:  # noqa: ANN001
    # review: the label-issue rows are written when the round records itself; a round killed after its push left none,
    # and the next round asked the image again
    engine, ids = store
    with session_scope(engine) as session:
        session.get(Round, ids.first).status = "failed"
        session.add(LabelEvent(image_id=ids.image, label="good", source="import", round_id=None, created_at=datetime(2026, 1, 1, tzinfo=timezone.utc)))
        _ask(session, ids, status="pushed", recorded=False)
    assert _requests(engine, ids) == ([], {"already_questioned": 1})  # asked about "good", still "good": waiting or confirmed
    with session_scope(engine) as session:  # the label was "scratch" when round 1 asked: "good" since is a new question
        session.add(LabelEvent(image_id=ids.image, label="scratch", source="annotator", annotator="ann", round_id=ids.first))
    assert _requests(engine, ids) == ([ids.image], {"already_questioned": 0})
