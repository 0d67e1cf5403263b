"""Read endpoints against the hand-seeded store: every number here is one the seed wrote (see api_seed.py)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_seed import READ_TOKEN, SeededStore, make_settings
from store.db import create_db_engine, session_scope


@pytest.fixture
def get(client: TestClient, read_headers: dict[str, str]):  # noqa: ANN201
    def _get(path: str, expected_status: int = 200) -> dict:
        response = client.get(path, headers=read_headers)
        assert response.status_code == expected_status, response.text
        return response.json()

    return _get


def test_projects_paginated(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    page = get("/projects")
    assert page["total"] == 2 and page["limit"] == 50 and page["offset"] == 0
    first = page["items"][0]
    assert first["name"] == "line-a" and first["classes"] == ["good", "scratch", "spot"] and first["negative_class"] == "good"
    assert first["n_images"] == 12 and first["n_rounds"] == 4 and first["latest_round_number"] == 4
    second = get("/projects?limit=1&offset=1")
    assert second["total"] == 2 and [p["name"] for p in second["items"]] == ["empty-line"]
    assert second["items"][0]["n_rounds"] == 0 and second["items"][0]["latest_round_number"] is None
    assert get("/projects?limit=5&offset=2")["items"] == []


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "offset=-1", "limit=abc"])
def test_bad_pagination_is_422(get, query: str) -> None:  # noqa: ANN001
    body = get(f"/projects?{query}", expected_status=422)
    assert isinstance(body["detail"], list) and body["detail"][0]["loc"][0] == "query"


def test_rounds_of_project_in_number_order(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    page = get(f"/projects/{seeded_store.project_id}/rounds")
    assert page["total"] == 4
    assert [(r["number"], r["status"]) for r in page["items"]] == [(1, "completed"), (2, "completed"), (3, "failed"), (4, "running")]
    r1, r2, r3, _ = page["items"]
    assert (r1["n_gates"], r1["n_gates_passed"], r1["all_gates_passed"]) == (4, 1, False)
    assert (r2["n_gates"], r2["n_gates_passed"], r2["all_gates_passed"]) == (4, 4, True)  # the n/a gate does not count
    assert r3["all_gates_passed"] is None and r3["finished_at"] is None and r3["duration_s"] is None
    assert r3["error"] == "embedding failed: out of memory" and r1["error"] is None  # why, beside the status (a manager's list)
    assert r1["duration_s"] == 300.0 and r1["started_at"] == "2026-01-01T01:00:00Z"
    assert [r["number"] for r in get(f"/projects/{seeded_store.project_id}/rounds?limit=2&offset=2")["items"]] == [3, 4]
    assert get(f"/projects/{seeded_store.empty_project_id}/rounds") == {"total": 0, "limit": 50, "offset": 0, "items": []}


def test_annotators_of_a_project(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    # seeded: ann1 answered 11, 5 and 12 (scratch); ann2 (R2) and ann3 (R4) answered 12 spot, which is its label now
    rows = get(f"/projects/{seeded_store.project_id}/annotators")
    assert [(r["annotator"], r["source"], r["answered"], r["shared"], r["agreeing"], r["email"]) for r in rows] == [
        ("ann1", "annotator", 3, 1, 0, None), ("oracle", "oracle", 2, 0, 0, None), ("ann2", "annotator", 1, 1, 1, None), ("ann3", "annotator", 1, 1, 1, None)]
    assert {r["answered_for_latest_round"] for r in rows} == {0}  # the seeded rounds record no labels_read_at
    assert get(f"/projects/{seeded_store.empty_project_id}/annotators") == []
    assert get("/projects/999/annotators", expected_status=404) == {"detail": "no project 999 in this store"}


def test_unknown_ids_are_404_with_reason(get) -> None:  # noqa: ANN001
    assert get("/projects/999/rounds", expected_status=404) == {"detail": "no project 999 in this store"}
    assert get("/projects/999/progress", expected_status=404)["detail"] == "no project 999 in this store"
    for path in ("/rounds/999", "/rounds/999/label-issues", "/rounds/999/selection"):
        assert get(path, expected_status=404) == {"detail": "no round 999 in this store"}
    # Ids beyond the store's 32-bit ids never reach the database driver (QA: a 500 on PostgreSQL)
    for path in (f"/rounds/{2**31}", f"/images/{2**31}", f"/projects/{2**31}/rounds", f"/rounds/{2**64}", f"/dashboard?project_id={2**31}"):
        assert "less than or equal to 2147483647" in str(get(path, expected_status=422)), path
    get(f"/rounds/{2**31 - 1}", expected_status=404)
    get("/rounds/0", expected_status=422)


def test_round_report(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    body = get(f"/rounds/{seeded_store.round_ids[2]}")
    assert body["number"] == 2 and body["status"] == "completed" and body["error"] is None
    assert body["metrics"] == {"accuracy": 0.85, "macro_f1": 0.78, "defect_recall": 0.9, "negative_fpr": 0.02, "latency_ms": 11.0}
    assert body["per_class"]["scratch"] == {"f1": 0.7, "recall": pytest.approx(0.75)}
    assert set(body["per_class"]) == {"good", "scratch", "spot"}
    gates = {g["name"]: g for g in body["gates"]}
    assert gates["negative_fpr"] == {"name": "negative_fpr", "value": 0.02, "threshold": 0.03, "comparison": "<=", "passed": True, "applicable": True,
                                     "interval_low": 0.004, "interval_high": 0.09, "settled": False}  # passed, but this test split cannot tell
    assert (gates["macro_f1"]["interval_low"], gates["macro_f1"]["settled"]) == (None, None)  # no interval recorded for it
    assert gates["calibration_ece"] == {"name": "calibration_ece", "value": None, "threshold": 0.1, "comparison": "<=", "passed": None, "applicable": False,
                                        "interval_low": None, "interval_high": None, "settled": None}
    assert body["confusion_matrix"] == {"labels": ["good", "scratch", "spot"], "matrix": [[9, 1, 0], [0, 4, 1], [1, 0, 4]]}
    assert body["threshold"] == 0.4 and body["class_names"] == ["good", "scratch", "spot"]
    assert body["step_timings_s"] == {"pull": 0.5, "embed": 12.25, "train": 3.0}
    assert body["artifact_names"] == ["confusion_matrix_png", "model_onnx"]  # names only: no server paths leak
    # label errors only (3 rows, 2 flagged); the round's near-duplicate is counted apart
    assert (body["n_label_issues"], body["n_flagged_label_issues"], body["n_selected"]) == (3, 2, 1)
    assert (body["n_near_duplicates"], body["n_outliers"], body["n_test_images_with_copy_outside"]) == (1, 0, 2)
    assert body["test_metrics_without_copies"] == {"n_images": 18, "n_excluded": 2, "macro_f1": 0.74, "defect_recall": 0.875, "negative_fpr": 0.05,
                                                   "accuracy": 0.8}
    assert [type(body["test_metrics_without_copies"][key]) for key in ("n_images", "n_excluded")] == [int, int]  # counts, not 18.0
    assert get(f"/rounds/{seeded_store.round_ids[1]}")["test_metrics_without_copies"] is None  # not checked, or no test image copied


def test_round_report_training_calibration_and_label_noise(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    body = get(f"/rounds/{seeded_store.round_ids[2]}")
    training = body["training"]
    assert (training["strategy"], training["n_fit"], training["best_epoch"], training["epochs_run"]) == ("finetune", 14, 2, 3)
    assert [row["epoch"] for row in training["history"]] == [0, 1, 2, 3]
    # what it trained with, shown rather than left in the store (QA); the same in `loop status --json`
    assert (training["options"], training["options_not_used_by_head"], training["early_stopping_note"]) == ({"epochs": 3}, [], None)
    assert training["history"][2] == {"epoch": 2, "train_loss": 0.4, "train_accuracy": 0.85, "val_loss": 0.7, "val_accuracy": 0.8,
                                      "val_macro_f1": pytest.approx(0.75), "seconds": 1.5}
    assert body["calibration"] == {"method": "temperature", "temperature": 1.7, "fitted_on": "validation", "n_images": 6,
                                   "ece_before": 0.12, "ece_after": 0.05, "reason": None, "nll_before": 0.7, "nll_after": 0.55,
                                   "objective": "nll", "n_left_out": None}
    assert body["collapsed"] is False
    assert body["label_quality"] == {"n_flagged": 2, "noise_rate_per_class": {"good": 0.05, "scratch": 0.2, "spot": None}, "already_questioned": 1,
                                     "suspect_batches": [], "out_of_fold_balanced_accuracy": None, "weak_model_note": None}
    assert body["cold_start"] is None
    assert body["threshold_choice"] == {"source": "out_of_fold", "out_of_fold_model": "finetune", "n_negatives": 48, "n_defects": 20,
                                        "margin_attainable": True, "estimated_metrics": {"macro_f1": 0.81, "defect_recall": 0.9, "negative_fpr": 0.021},
                                        "rule": "stratified", "n_picked_negatives": 12, "fpr_estimated_over": "pool",
                                        # how the rule got there (the README names rule_threshold: only the store held it)
                                        "rule_threshold": 0.3, "rank_threshold": 0.45, "tail_threshold": 0.2, "allowed_false_positives": 1,
                                        "observed_fpr": 0.0208, "fpr_upper_bound": 0.0561, "estimated_population_fpr": 0.021,
                                        "n_sampled_negatives_above": 1}
    # QA (Label Studio): what the annotators did was in status --json only
    assert (body["pull"]["new_label_events"], body["pull"]["skipped"], body["push"]["pushed"], body["ties"]) == (10, 1, 12, {"n_images": 1, "asked": 1})
    first = get(f"/rounds/{seeded_store.round_ids[1]}")  # recorded before these existed: absent, not an error
    assert (first["training"], first["calibration"], first["label_quality"], first["cold_start"], first["threshold_choice"], first["collapsed"]) == (None,) * 6


def test_training_details_that_are_malformed_read_as_absent() -> None:
    from store.reports import calibration_of, cold_start_of, label_quality_of, training_of

    assert training_of({"training": "oops"}) is None and calibration_of({"calibration": [1]}) is None
    odd = training_of({"training": {"strategy": 3, "n_fit": "many", "history": [{"epoch": 0, "train_loss": "x"}, "junk", {"no": "epoch"}]}})
    assert (odd.strategy, odd.n_fit, odd.epochs_run, odd.history[0].train_loss) == (None, None, 0, None)
    assert (odd.options, odd.options_not_used_by_head, odd.early_stopping_note) == ({}, [], None)
    head = training_of({"training": {"strategy": "head", "options": {"head_regularization": 1.0}, "options_not_used_by_head": ["loss"],
                                     "early_stopping_note": "validation holds only 'good' images"}})
    assert (head.options, head.options_not_used_by_head, head.early_stopping_note) == ({"head_regularization": 1.0}, ["loss"],
                                                                                       "validation holds only 'good' images")
    assert label_quality_of({"label_quality": {"noise_rate_per_class": [0.1]}}).noise_rate_per_class == {}
    huge = training_of({"training": {"history": [{"epoch": 0, "train_loss": 10**400, "val_loss": float("inf"), "train_accuracy": float("nan")}]}})
    assert (huge.history[0].train_loss, huge.history[0].val_loss, huge.history[0].train_accuracy) == (None, None, None)
    assert cold_start_of({"cold_start": {"reason": "only good parts"}}) == "only good parts" and cold_start_of({}) is None
    from store.reports import collapsed_of

    assert collapsed_of({"collapse_check": {"test_split": False, "every_image_predicted_as": "good"}}) is True  # the test split could not show it
    assert collapsed_of({"collapse_check": {"test_split": True}}) is True and collapsed_of({"collapse_check": "x"}) is None
    from store.reports import threshold_of

    assert threshold_of({"threshold_choice": "x"}) is None
    odd = threshold_of({"threshold_choice": {"n_negatives": "many", "margin_attainable": "yes"}, "threshold_source": "out_of_fold", "estimated_metrics": [1]})
    assert (odd.n_negatives, odd.margin_attainable, odd.out_of_fold_model, odd.estimated_metrics) == (None, None, None, {})
    # a round before the out-of-fold model was recorded: the head's (the only one then)
    assert threshold_of({"threshold_choice": {}, "threshold_source": "out_of_fold", "out_of_fold": {"n_folds": 5}}).out_of_fold_model == "head"


def test_round_label_counts_by_source(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    r1 = get(f"/rounds/{seeded_store.round_ids[1]}")["label_counts"]
    assert r1 == {"by_source": {"import": 8, "annotator": 0, "oracle": 2}, "by_class": {"good": 4, "scratch": 3, "spot": 3},
                  "ties": 0, "total_labeled": 10, "new_events_by_source": {"import": 0, "annotator": 0, "oracle": 2}}
    r2 = get(f"/rounds/{seeded_store.round_ids[2]}")["label_counts"]
    # Image 5's annotator answer supersedes its import; image 12 is a tie, kept out.
    assert r2["by_source"] == {"import": 7, "annotator": 2, "oracle": 2}
    assert r2["by_class"] == {"good": 5, "scratch": 2, "spot": 4}
    assert (r2["ties"], r2["total_labeled"]) == (1, 11)
    assert r2["new_events_by_source"] == {"import": 0, "annotator": 4, "oracle": 0}
    r3 = get(f"/rounds/{seeded_store.round_ids[3]}")  # failed, never finished: labels as it started
    assert r3["label_counts"]["by_source"] == r2["by_source"] and r3["label_counts"]["ties"] == 1
    assert r3["error"] == "embedding failed: out of memory" and r3["metrics"] == {} and r3["confusion_matrix"] is None
    r4 = get(f"/rounds/{seeded_store.round_ids[4]}")["label_counts"]  # running: every label so far
    assert r4["by_source"] == {"import": 7, "annotator": 3, "oracle": 2} and r4["ties"] == 0


def test_malformed_confusion_matrix_reads_as_absent(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    body = get(f"/rounds/{seeded_store.round_ids[1]}")
    assert body["confusion_matrix"] is None
    assert body["threshold"] == 0.5


def test_label_issue_queue(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    rid = seeded_store.round_ids[2]
    page = get(f"/rounds/{rid}/label-issues")  # the relabel queue: flagged label errors only, by default
    assert page["total"] == 2
    assert [(i["rank"], i["kind"]) for i in page["items"]] == [(1, "label_error"), (2, "label_error")]
    assert [i["kind"] for i in get(f"/rounds/{rid}/label-issues?kind=all")["items"]] == ["label_error", "label_error", "near_duplicate"]
    first, second = page["items"][0], page["items"][1]
    assert first["image_id"] == seeded_store.image_ids[5] and first["kind"] == "label_error"
    assert (first["given_label"], first["suggested_label"], first["score"]) == ("scratch", "spot", 0.05)
    assert first["image_url"] == f"/images/{seeded_store.image_ids[5]}"
    assert first["current_label"] == "scratch"
    assert second["current_label"] == "spot"  # image 5 was relabeled by an annotator since
    assert (first["still_suspect"], second["still_suspect"]) == (True, False)
    everything = get(f"/rounds/{rid}/label-issues?flagged_only=false&kind=all")
    assert everything["total"] == 4 and everything["items"][-1]["flagged"] is False
    near_duplicates = get(f"/rounds/{rid}/label-issues?kind=near_duplicate")["items"]
    assert [i["rank"] for i in near_duplicates] == [3]
    assert near_duplicates[0]["related_image_id"] == seeded_store.image_ids[1]  # the copy, to look at side by side
    assert near_duplicates[0]["still_suspect"] is None
    assert [i["rank"] for i in get(f"/rounds/{rid}/label-issues?limit=1&offset=1")["items"]] == [2]
    # a kind that does not exist is a mistake in the request, not an empty queue
    assert "near_duplicate" in str(get(f"/rounds/{rid}/label-issues?kind=bogus", expected_status=422)["detail"])


def test_selection(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    page = get(f"/rounds/{seeded_store.round_ids[1]}/selection")
    assert page["total"] == 2
    first, second = page["items"]
    assert (first["rank"], first["reason"], first["push_status"], first["predicted_label"]) == (1, "uncertain", "pushed", "scratch")
    assert first["image_id"] == seeded_store.image_ids[10] and first["current_label"] == "good"
    assert second["current_label"] == "spot"  # image 12: the third annotator broke the tie
    assert first["pushed_at"] == "2026-01-01T01:04:00Z"
    pending = get(f"/rounds/{seeded_store.round_ids[2]}/selection")["items"][0]
    assert pending["push_status"] == "pending" and pending["pushed_at"] is None
    # whether each ask was answered (QA: an asked image looked the same in the API before and after its answer)
    assert (first["answered"], first["answered_at"], second["answered"]) == (True, "2026-01-01T02:01:00Z", True)
    assert (pending["answered"], pending["answered_at"]) == (None, None)


def test_an_ask_answered_before_it_or_whose_answer_was_deleted_is_not_answered(writable_store: SeededStore) -> None:
    from datetime import timedelta

    from api_seed import T0
    from store.models import LabelEvent, Selection

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:  # image 9: the oracle answered at 1:01, before round 1 asked again at 1:04
        session.add(Selection(round_id=writable_store.round_ids[1], image_id=writable_store.image_ids[8], rank=3, score=0.5, strategy="margin",
                              reason="suspected_label_error", predicted_label="spot", push_status="pushed", pushed_at=T0 + timedelta(hours=1, minutes=4)))
        # an annotator answered after the ask, then deleted the answer in the annotation tool
        session.add_all([LabelEvent(image_id=writable_store.image_ids[8], label="spot", source="annotator", annotator="ann1", external_id="a-9",
                                    created_at=T0 + timedelta(hours=3)),
                         LabelEvent(image_id=writable_store.image_ids[8], label=None, action="delete", source="annotator", annotator="ann1",
                                    external_id="a-9", created_at=T0 + timedelta(hours=4))])
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        items = client.get(f"/rounds/{writable_store.round_ids[1]}/selection", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()["items"]
    asked = next(item for item in items if item["image_id"] == writable_store.image_ids[8])
    assert (asked["answered"], asked["answered_at"]) == (False, None)


def test_a_tie_ended_by_a_deletion_is_answered_and_a_renamed_guess_reads_its_new_name(writable_store: SeededStore) -> None:
    # review: the round counts a deleted answer as ending a tie; the API showed its ask unanswered forever. And a guess
    # named by a class renamed since read the old name beside current_label's new one
    from datetime import timedelta

    from api_seed import T0
    from store.models import LabelEvent, Project, Selection

    engine = create_db_engine(writable_store.url)
    image = writable_store.image_ids[7]
    with session_scope(engine) as session:
        session.add_all([LabelEvent(image_id=image, label="scratch", source="annotator", annotator="a", external_id="t-1", created_at=T0 + timedelta(hours=3)),
                         LabelEvent(image_id=image, label="spot", source="annotator", annotator="b", external_id="t-2", created_at=T0 + timedelta(hours=3)),
                         Selection(round_id=writable_store.round_ids[1], image_id=image, rank=4, score=0.5, strategy="label_quality",
                                   reason="annotators_disagree", predicted_label="spot", push_status="pushed", pushed_at=T0 + timedelta(hours=3, minutes=30)),
                         LabelEvent(image_id=image, label=None, action="delete", source="annotator", annotator="b", external_id="t-2",
                                    created_at=T0 + timedelta(hours=4))])
        project = session.get(Project, writable_store.project_id)
        project.classes, project.class_renames = [c if c != "spot" else "stain" for c in project.classes], {"spot": "stain"}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        items = client.get(f"/rounds/{writable_store.round_ids[1]}/selection", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()["items"]
    tie = next(item for item in items if item["image_id"] == image)
    assert (tie["answered"], tie["answered_at"]) == (True, "2026-01-01T04:00:00Z")
    assert tie["predicted_label"] == "stain"


def test_progress_series_aligned_with_rounds(get, seeded_store: SeededStore) -> None:  # noqa: ANN001
    body = get(f"/projects/{seeded_store.project_id}/progress")
    assert body["project_name"] == "line-a"
    assert [r["number"] for r in body["rounds"]] == [1, 2, 3, 4]
    gates = {g["name"]: g for g in body["gates"]}
    assert gates["macro_f1"]["values"] == [0.65, 0.78, None, None]
    assert gates["macro_f1"]["passed"] == [False, True, None, None]
    assert gates["macro_f1"]["threshold"] == 0.7 and gates["macro_f1"]["comparison"] == ">="
    assert gates["calibration_ece"]["applicable"] == [None, False, None, None]
    metrics = {(m["name"], m["class_name"]): m["values"] for m in body["metrics"]}
    assert metrics[("f1", "spot")] == [0.55, 0.74, None, None]
    assert metrics[("accuracy", None)] == [0.8, 0.85, None, None]
    assert body["labels_by_source"] == {"import": [8, 7, 7, 7], "annotator": [0, 2, 2, 3], "oracle": [2, 2, 2, 2]}
    assert body["ties"] == [0, 1, 1, 0]
    assert body["new_label_events_by_source"]["annotator"] == [0, 4, 0, 1]
    empty = get(f"/projects/{seeded_store.empty_project_id}/progress")
    assert empty["rounds"] == [] and empty["gates"] == [] and empty["labels_by_source"] == {"import": [], "annotator": [], "oracle": []}


def test_version(get) -> None:  # noqa: ANN001
    body = get("/version")
    assert body["name"] == "defect-loop" and body["version"] == "0.1.0" and body["api_version"] == "1"
    # which release's schema the store has, and the newest this one knows (QA: two releases 5 upgrades apart looked alike)
    from alembic.script import ScriptDirectory

    from store.db import alembic_config

    assert body["store_schema"] == body["release_schema"] == ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_openapi_docs_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/projects", "/projects/{project_id}/rounds", "/rounds/{round_id}", "/rounds/{round_id}/label-issues",
                 "/rounds/{round_id}/selection", "/projects/{project_id}/progress", "/projects/{project_id}/annotators", "/projects/{project_id}/export", "/predict",
                 "/webhooks/labelstudio", "/health", "/version"):
        assert path in spec["paths"], path
    for page_path, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        page = client.get(page_path)
        assert page.status_code == 200 and "cdn" not in page.text.lower() and "googleapis" not in page.text  # blank offline
        for asset in assets:
            assert f"/docs/assets/{asset}" in page.text
            served = client.get(f"/docs/assets/{asset}")
            assert served.status_code == 200 and len(served.content) > 10_000
    assert client.get("/favicon.ico").headers["content-type"] == "image/png"


def test_reads_never_write(client: TestClient, read_headers: dict[str, str], seeded_store: SeededStore) -> None:
    db = seeded_store.project_dir / "loop.db"
    before = db.read_bytes()
    for path in ("/projects", f"/rounds/{seeded_store.round_ids[2]}", f"/projects/{seeded_store.project_id}/progress", "/dashboard",
                 f"/projects/{seeded_store.project_id}/export"):
        assert client.get(path, headers=read_headers).status_code == 200
    assert db.read_bytes() == before


def test_cached_reads_follow_every_change_to_the_store(writable_store: SeededStore, read_headers: dict[str, str]) -> None:
    from datetime import timedelta

    from api.app import create_app
    from api_seed import T0, make_settings
    from store.db import create_db_engine, session_scope
    from store.models import GateResult, LabelEvent, Metric, Round

    engine = create_db_engine(writable_store.url)
    r4 = writable_store.round_ids[4]
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        def progress() -> dict:
            response = client.get(f"/projects/{writable_store.project_id}/progress", headers=read_headers)
            assert response.status_code == 200
            return response.json()

        assert progress()["labels_by_source"]["annotator"] == [0, 2, 2, 3]
        assert progress() == progress()  # served again from the cache: the same answer
        with session_scope(engine) as session:
            session.add(LabelEvent(image_id=writable_store.image_ids[0], label="spot", source="annotator", annotator="ann9", round_id=r4,
                                   created_at=T0 + timedelta(hours=5, minutes=2)))
        assert progress()["labels_by_source"]["annotator"] == [0, 2, 2, 4]
        with session_scope(engine) as session:
            session.get(Round, r4).status = "failed"
        assert progress()["rounds"][3]["status"] == "failed"
        assert client.get(f"/rounds/{r4}", headers=read_headers).json()["metrics"] == {}
        with session_scope(engine) as session:
            session.add(Metric(round_id=r4, name="macro_f1", value=0.5))
        assert {(m["name"], m["class_name"]): m["values"] for m in progress()["metrics"]}[("macro_f1", None)] == [0.65, 0.78, None, 0.5]
        assert client.get(f"/rounds/{r4}", headers=read_headers).json()["metrics"] == {"macro_f1": 0.5}
        with session_scope(engine) as session:
            session.add(GateResult(round_id=r4, name="macro_f1", value=0.5, threshold=0.7, comparison=">=", applicable=True, passed=False))
        assert {g["name"]: g for g in progress()["gates"]}["macro_f1"]["passed"] == [False, True, None, False]
    engine.dispose()


def test_a_round_says_which_of_its_model_files_were_deleted(writable_store, read_headers) -> None:  # noqa: ANN001
    # a QA run: after loop prune, a round's model keys were gone from its record with no trace of when or by what
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api_seed import make_settings
    from store.db import create_db_engine, session_scope
    from store.models import Round

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        row = session.get(Round, writable_store.round_ids[1])
        row.details = {**(row.details or {}), "model_files_deleted": {"files": ["model.onnx", "model.pt"], "at": "2026-12-06T21:00:00+00:00",
                                                                      "by": "loop prune", "folder": "/data/line-a"}}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        pruned = client.get(f"/rounds/{writable_store.round_ids[1]}", headers=read_headers).json()
        kept = client.get(f"/rounds/{writable_store.round_ids[2]}", headers=read_headers).json()
    assert pruned["model_files_deleted"] == {"files": ["model.onnx", "model.pt"], "at": "2026-12-06T21:00:00+00:00", "by": "loop prune",
                                             "folder": "/data/line-a"}
    assert kept["model_files_deleted"] is None


def test_a_round_says_how_many_unmeasured_copies_it_moved_across_the_test_split(writable_store, read_headers) -> None:  # noqa: ANN001
    # the test split's image count changes when a round regroups copies an ingest drew apart: a manager reads why here
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api_seed import make_settings
    from store.db import create_db_engine, session_scope
    from store.models import Round

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        row = session.get(Round, writable_store.round_ids[1])
        row.details = {**(row.details or {}), "unmeasured_copies_regrouped": {"moved": 5, "into_test": 3, "out_of_test": 1,
                                                                              "between_train_and_validation": 1, "image_ids": [1, 2, 3, 4, 5]}}
        other = session.get(Round, writable_store.round_ids[2])
        other.details = {**(other.details or {}), "unmeasured_copies_regrouped": {"moved": 0, "into_test": 0, "out_of_test": 0,
                                                                                  "between_train_and_validation": 0, "image_ids": []}}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        moved = client.get(f"/rounds/{writable_store.round_ids[1]}", headers=read_headers).json()
        none_moved = client.get(f"/rounds/{writable_store.round_ids[2]}", headers=read_headers).json()
    assert moved["unmeasured_copies_regrouped"] == {"moved": 5, "into_test": 3, "out_of_test": 1, "between_train_and_validation": 1}
    assert none_moved["unmeasured_copies_regrouped"] is None
