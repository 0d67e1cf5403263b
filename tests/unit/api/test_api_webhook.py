"""The Label Studio webhook: its own secret header, then labeling.labelstudio_backend.record_webhook_event.

The backend is replaced here by a stand-in with the same signature (the real one is tested with a real Label Studio):
these tests check the API's side: the secret, the project handed over, commit on success, rollback on ValueError.
"""
from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_seed import SeededStore, make_settings
from store.db import create_db_engine, session_scope
from store.models import LabelEvent

PAYLOAD = {"action": "ANNOTATION_CREATED", "annotation": {"id": 7, "result": []}, "task": {"id": 3}, "project": {"id": 1}}


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, writable_store: SeededStore) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    image_id = writable_store.image_ids[11]

    def record_webhook_event(*, session, project, payload):  # noqa: ANN001, ANN202
        calls.append({"project": project.name, "payload": payload})
        session.add(LabelEvent(image_id=image_id, label="spot", source="annotator", annotator="ls-user", external_id=f"ls:{payload['annotation']['id']}"))
        session.flush()
        if payload.get("action") not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"):
            raise ValueError(f"unsupported action {payload.get('action')!r}")
        return {"new_label_events": 1}

    stand_in = types.ModuleType("labeling.labelstudio_backend")
    stand_in.record_webhook_event = record_webhook_event
    monkeypatch.setitem(sys.modules, "labeling.labelstudio_backend", stand_in)
    return calls


@pytest.fixture
def hook_client(writable_store: SeededStore) -> TestClient:
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        yield client


def _events(store: SeededStore) -> int:
    engine = create_db_engine(store.url)
    with session_scope(engine) as session:
        count = session.query(LabelEvent).filter(LabelEvent.annotator == "ls-user").count()
    engine.dispose()
    return count


def test_missing_secret_is_401_wrong_is_403(hook_client: TestClient, recorded: list, writable_store: SeededStore) -> None:
    assert hook_client.post("/webhooks/labelstudio", json=PAYLOAD).status_code == 401
    response = hook_client.post("/webhooks/labelstudio", json=PAYLOAD, headers={"X-Loop-Webhook-Secret": "guess"})
    assert response.status_code == 403 and response.json() == {"detail": "wrong X-Loop-Webhook-Secret"}
    # The managers' tokens are not the webhook's secret.
    assert hook_client.post("/webhooks/labelstudio", json=PAYLOAD, headers={"Authorization": "Bearer full-secret-token"}).status_code == 401
    assert recorded == [] and _events(writable_store) == 0


def test_secret_checked_before_the_body(hook_client: TestClient, recorded: list) -> None:
    assert hook_client.post("/webhooks/labelstudio", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 401


def test_event_recorded_and_committed(hook_client: TestClient, recorded: list, writable_store: SeededStore) -> None:
    response = hook_client.post("/webhooks/labelstudio", json=PAYLOAD, headers={"X-Loop-Webhook-Secret": "hook-secret"})
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "recorded", "result": {"new_label_events": 1}}
    assert recorded == [{"project": "line-a", "payload": PAYLOAD}]
    assert _events(writable_store) == 1


def test_bad_payload_is_422_and_rolled_back(hook_client: TestClient, recorded: list, writable_store: SeededStore) -> None:
    response = hook_client.post("/webhooks/labelstudio", json={**PAYLOAD, "action": "PROJECT_DELETED"}, headers={"X-Loop-Webhook-Secret": "hook-secret"})
    assert response.status_code == 422 and "unsupported action" in response.json()["detail"]
    assert _events(writable_store) == 0
    not_an_object = hook_client.post("/webhooks/labelstudio", json=[1, 2], headers={"X-Loop-Webhook-Secret": "hook-secret"})
    assert not_an_object.status_code == 422 and "JSON object" in not_an_object.json()["detail"]
    not_json = hook_client.post("/webhooks/labelstudio", content=b"{oops", headers={"X-Loop-Webhook-Secret": "hook-secret", "Content-Type": "application/json"})
    assert not_json.status_code == 422 and "not valid JSON" in not_json.json()["detail"]
    assert len(recorded) == 1  # only the unsupported action reached the backend


def test_webhook_disabled_without_configured_secret(writable_store: SeededStore, recorded: list) -> None:
    with TestClient(create_app(make_settings(writable_store.project_dir, labelstudio_webhook_secret=None))) as client:
        response = client.post("/webhooks/labelstudio", json=PAYLOAD, headers={"X-Loop-Webhook-Secret": "anything"})
    assert response.status_code == 403 and "LOOP_LABELSTUDIO_WEBHOOK_SECRET" in response.json()["detail"]


def test_a_malformed_annotation_is_422_and_nothing_is_stored(writable_store: SeededStore) -> None:
    # the real recorder: shapes a webhook body may hold but Label Studio never sends were 500s (AttributeError,
    # TypeError) or stored as they came (an object as the annotator's name, an unreadable date)
    from store.models import AnnotationTask, RejectedAnnotation

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        session.add(AnnotationTask(backend="labelstudio", image_id=writable_store.image_ids[11], external_project_id="77", external_task_id="5"))
    engine.dispose()
    choice = {"type": "choices", "from_name": "label", "to_name": "image", "value": {"choices": ["spot"]}}
    good = {"action": "ANNOTATION_CREATED", "project": {"id": 77}, "task": {"id": 5},
            "annotation": {"id": 9, "result": [choice], "completed_by": 3, "updated_at": "2026-12-06T07:00:00Z"}}
    malformed = {
        "result: [1, 2]": {"result": [1, 2]},
        'choices: 5': {"result": [{**choice, "value": 5}]},
        'choices: [{"x": 1}]': {"result": [{**choice, "value": {"choices": [{"x": 1}]}}]},
        'completed_by: {"id": {...}}': {"completed_by": {"id": {"x": 1}}},
        "updated_at: not-a-date": {"updated_at": "not-a-date"},
    }
    deep = b"[" * 100_000 + b"]" * 100_000
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        headers = {"X-Loop-Webhook-Secret": "hook-secret"}
        for case, change in malformed.items():
            response = client.post("/webhooks/labelstudio", json={**good, "annotation": {**good["annotation"], **change}}, headers=headers)
            assert response.status_code == 422, (case, response.text)
        nested = client.post("/webhooks/labelstudio", content=deep, headers={**headers, "Content-Type": "application/json"})
        assert nested.status_code == 422 and "not valid JSON" in nested.json()["detail"]
        engine = create_db_engine(writable_store.url)
        with session_scope(engine) as session:
            assert session.query(LabelEvent).filter(LabelEvent.source == "annotator", LabelEvent.external_id.like("%9%")).count() == 0
            assert session.query(RejectedAnnotation).count() == 0
        other_control = {"type": "choices", "from_name": "quality", "value": {}}  # another control's: not read, not judged
        good["annotation"]["result"].append(other_control)
        response = client.post("/webhooks/labelstudio", json=good, headers=headers)  # the well-formed event is recorded
        assert response.status_code == 200 and response.json()["result"]["recorded"] == 1, response.text
        engine.dispose()


def test_a_webhook_body_larger_than_any_event_is_refused_unread(hook_client: TestClient, recorded: list) -> None:
    # review: the upload limit of /predict (675 MB by default) applied here too, and a body that size was parsed
    headers = {"X-Loop-Webhook-Secret": "hook-secret", "Content-Type": "application/json"}
    large = hook_client.post("/webhooks/labelstudio", content=b" " * (5 * 1024 * 1024 + 1), headers=headers)
    assert large.status_code == 413 and "limit of 5242880 bytes" in large.json()["detail"]
    assert recorded == []
    assert hook_client.post("/webhooks/labelstudio", json=PAYLOAD, headers={"X-Loop-Webhook-Secret": "hook-secret"}).status_code == 200
