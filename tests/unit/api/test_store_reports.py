"""store.reports directly: the per-round label rule and tolerance of odd rows the loop may leave."""
from __future__ import annotations

from datetime import timedelta

from api_seed import T0, SeededStore
from store import reports
from store.db import create_db_engine, session_scope
from store.models import LabelEvent, Round, Selection
from store.queries import current_labels


def test_current_counts_match_queries_current_labels(seeded_store: SeededStore) -> None:
    engine = create_db_engine(seeded_store.url)
    with session_scope(engine) as session:
        now = reports.current_label_counts(session, project_id=seeded_store.project_id)
        labels = current_labels(session, seeded_store.project_id)
        running = reports.round_report(session, round_id=seeded_store.round_ids[4]).label_counts
    engine.dispose()
    assert now.total_labeled == sum(1 for label in labels.values() if label.status == "labeled") == 12
    assert now.by_source == running.by_source == {"import": 7, "annotator": 3, "oracle": 2}


def test_event_order_is_by_time_not_insertion(writable_store: SeededStore) -> None:
    # An annotator answer written late but timestamped before R1 finished counts for R1.
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        session.add(LabelEvent(image_id=writable_store.image_ids[0], label="scratch", source="annotator", annotator="late",
                               created_at=T0 + timedelta(hours=1, minutes=2)))
    with session_scope(engine) as session:
        rounds = list(session.query(Round).order_by(Round.number))
        counts = reports.label_counts_by_round(session, project_id=writable_store.project_id, rounds=rounds)
    engine.dispose()
    assert counts[writable_store.round_ids[1]].by_source == {"import": 7, "annotator": 1, "oracle": 2}
    assert counts[writable_store.round_ids[1]].by_class == {"good": 3, "scratch": 4, "spot": 3}


def test_a_round_killed_after_its_pull_counts_the_labels_it_recorded_in_its_totals(writable_store: SeededStore) -> None:
    # R3 (failed, never finished) pulled two answers before it died: they were its new labels but not in its totals,
    # and the next round's totals held them while it said it recorded none
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        for k, label in ((1, "spot"), (2, "good")):
            session.add(LabelEvent(image_id=writable_store.image_ids[k], label=label, source="annotator", annotator="a",
                                   round_id=writable_store.round_ids[3], created_at=T0 + timedelta(hours=3, minutes=1)))
    with session_scope(engine) as session:
        rounds = list(session.query(Round).order_by(Round.number))
        counts = reports.label_counts_by_round(session, project_id=writable_store.project_id, rounds=rounds)
    engine.dispose()
    before, killed = counts[writable_store.round_ids[2]], counts[writable_store.round_ids[3]]
    assert killed.new_events_by_source["annotator"] == 2
    assert killed.by_source["annotator"] == before.by_source["annotator"] + 2  # was before's: its own answers left out


def test_confusion_matrix_of_tolerates_malformed_details() -> None:
    assert reports.confusion_matrix_of({}) is None
    assert reports.confusion_matrix_of({"confusion_matrix": "png"}) is None
    assert reports.confusion_matrix_of({"confusion_matrix": {"labels": ["a", "b"], "matrix": [[1, 2], [3]]}}) is None
    assert reports.confusion_matrix_of({"confusion_matrix": {"labels": ["a"], "matrix": [["x"]]}}) is None
    matrix = reports.confusion_matrix_of({"confusion_matrix": {"labels": ["a", "b"], "matrix": [[1, 2], [3, 4]]}})
    assert matrix == reports.ConfusionMatrix(labels=["a", "b"], matrix=[[1.0, 2.0], [3.0, 4.0]])


def test_per_class_f1_from_progress(seeded_store: SeededStore) -> None:
    engine = create_db_engine(seeded_store.url)
    with session_scope(engine) as session:
        progress = reports.progress_series(session, project_id=seeded_store.project_id)
        assert reports.progress_series(session, project_id=999) is None
    engine.dispose()
    assert reports.per_class_f1(progress) == {"good": [0.8, 0.9, None, None], "scratch": [0.6, 0.7, None, None], "spot": [0.55, 0.74, None, None]}
    # QA: after `loop rename-class fray frayed_edge` the chart drew fray and frayed_edge as two classes
    import dataclasses

    from store.reports import MetricSeries
    f1 = [MetricSeries(name="f1", class_name="fray", values=[0.5, 0.6, None]), MetricSeries(name="f1", class_name="frayed_edge", values=[None, None, 0.7]),
          MetricSeries(name="f1", class_name="crack", values=[0.4, 0.45, None]), MetricSeries(name="f1", class_name="break", values=[0.8, 0.85, 0.9]),
          MetricSeries(name="f1", class_name="spot", values=[0.3, None, None])]
    renamed = reports.per_class_f1(dataclasses.replace(progress, metrics=f1, class_renames={"fray": "frayed_edge", "crack": "break", "spot": "stain"}))
    assert renamed == {"frayed_edge": [0.5, 0.6, 0.7], "crack": [0.4, 0.45, None], "break": [0.8, 0.85, 0.9], "stain": [0.3, None, None]}


def test_an_api_requests_reads_see_the_store_at_one_moment(writable_store: SeededStore, reads_see_one_moment) -> None:  # noqa: ANN001
    # pysqlite opens no transaction for a SELECT: each read saw the newest commit, and a dashboard polled while a round
    # finished showed its confusion matrix beside the previous round's gates
    before, during, after = reads_see_one_moment(writable_store.url, writable_store.project_id)
    assert (during, after) == (before, before + 1)


def test_a_cached_answer_is_never_older_than_the_store_version_it_is_kept_under(writable_store: SeededStore, monkeypatch) -> None:  # noqa: ANN001
    # a request's reads see one moment; the store's file version read after its first read could be newer (a round
    # committed in between): the older answer was cached under the newer version and served until the next write
    from fastapi.testclient import TestClient
    from sqlalchemy import func, select

    from api.app import create_app
    from api_seed import READ_TOKEN, make_settings

    writer = create_db_engine(writable_store.url)
    version_of = reports.sqlite_file_version
    committed: list[int] = []

    def a_round_commits_first(session):  # noqa: ANN001, ANN202
        if not committed:
            with session_scope(writer) as other:
                number = other.scalar(select(func.max(Round.number)).where(Round.project_id == writable_store.project_id))
                other.add(Round(project_id=writable_store.project_id, number=number + 1, status="failed"))
                committed.append(number + 1)
        return version_of(session)

    monkeypatch.setattr(reports, "sqlite_file_version", a_round_commits_first)
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        url = f"/projects/{writable_store.project_id}/progress"
        first, second = (client.get(url, headers=headers).json() for _ in range(2))
    writer.dispose()
    assert committed and committed[0] not in [r["number"] for r in first["rounds"]]  # read before the round committed
    assert second["rounds"][-1]["number"] == committed[0]


def test_a_batch_not_checked_against_the_test_labels_says_null_not_false() -> None:
    # QA: with too few test labels to compare with, the batch read `unlike_test_labels: false`, i.e. like the test images
    from store.reports import unfamiliar_batches_of

    row = {"ingest_batch_id": 2, "n_images": 45, "unlike_training_labels": {"flagged": True, "share_unfamiliar": 1.0}, "unlike_test_labels": None}
    (batch,) = unfamiliar_batches_of({"coverage": {"flagged_batches": [row]}})
    assert (batch.unlike_training_labels, batch.unlike_test_labels, batch.share_unlike_test_labels) == (True, None, None)
    (checked,) = unfamiliar_batches_of({"coverage": {"flagged_batches": [{**row, "unlike_test_labels": {"flagged": False, "share_unfamiliar": 0.1}}]}})
    assert checked.unlike_test_labels is False


def test_annotator_activity_counts_answers_skips_ties_and_agreement_where_others_answered(writable_store: SeededStore) -> None:
    # seeded: ann1 answered images 11, 5 and 12 (scratch) at 2:01-2:02, ann2 image 12 (spot) at 2:02 and ann3 image 12
    # (spot) at 5:01: 12 is spot, 2 votes to 1; the oracle answered 9 and 10 at 1:01
    engine = create_db_engine(writable_store.url)
    image = dict(enumerate(writable_store.image_ids, start=1))
    r1, r2, r4 = writable_store.round_ids[1], writable_store.round_ids[2], writable_store.round_ids[4]
    with session_scope(engine) as session:
        for round_id, read_at in ((r1, T0 + timedelta(hours=1, minutes=5)), (r2, T0 + timedelta(hours=2, minutes=30))):
            row = session.get(Round, round_id)
            row.details = {**row.details, "labels_read_at": read_at.replace(tzinfo=None).isoformat()}
        row = session.get(Round, r2)  # the pull lists Label Studio's users
        row.details = {**row.details, "pull": {**row.details["pull"], "labelstudio": {"annotators": {"ann1": "ann1@example.com"}}}}
        session.add_all([
            # ann2 skips image 1 (never answered it), then answers image 2 against ann1's answer there: a tie
            LabelEvent(image_id=image[1], label=None, action="skip", source="annotator", annotator="ann2", round_id=r4, lead_time_s=3.0),
            LabelEvent(image_id=image[2], label="good", source="annotator", annotator="ann1", round_id=r4, lead_time_s=4.0),
            LabelEvent(image_id=image[2], label="spot", source="annotator", annotator="ann2", round_id=r4, lead_time_s=10.0),
            # ann1 skips image 2 when it is asked again: the skip is no vote, ann1's answer stands and the tie holds (review)
            LabelEvent(image_id=image[2], label=None, action="skip", source="annotator", annotator="ann1", round_id=r4),
            LabelEvent(image_id=image[3], label="scratch", source="annotator", annotator="ann2", round_id=r4, lead_time_s=20.0),
            # ann3 answers image 3 and deletes it: no answer of ann3's stands there
            LabelEvent(image_id=image[3], label="scratch", source="annotator", annotator="ann3", round_id=r4),
            LabelEvent(image_id=image[3], label=None, action="delete", source="annotator", annotator="ann3", round_id=r4),
        ])
    with session_scope(engine) as session:
        rows = {row.annotator: row for row in reports.annotator_activity(session, project_id=writable_store.project_id)}
        assert current_labels(session, writable_store.project_id)[image[2]].status == "tie"
    engine.dispose()
    ann1, ann2, ann3, oracle = rows["ann1"], rows["ann2"], rows["ann3"], rows["oracle"]
    assert (ann1.answered, ann1.skipped, ann1.shared, ann1.agreeing, ann1.in_ties) == (4, 1, 2, 0, 1)  # outvoted on 12, tied on 2
    assert (ann2.answered, ann2.skipped, ann2.shared, ann2.agreeing, ann2.in_ties) == (3, 1, 2, 1, 1)
    assert (ann3.answered, ann3.shared, ann3.agreeing) == (1, 1, 1)  # image 12; its deleted answer to 3 does not stand
    assert (oracle.answered, oracle.shared, oracle.source) == (2, 0, "oracle")
    # R2, the newest completed round, took in what was saved between R1's read (1:05) and its own (2:30)
    assert (ann1.answered_for_latest_round, ann2.answered_for_latest_round, ann3.answered_for_latest_round, oracle.answered_for_latest_round) == (3, 1, 0, 0)
    assert ann2.median_lead_time_s == 15.0 and ann1.median_lead_time_s == 4.0 and oracle.median_lead_time_s is None  # standing answers only
    assert (ann1.email, ann2.email) == ("ann1@example.com", None)
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:  # the round before recorded no read time (older release): unknown, 0, never all time
        row = session.get(Round, r1)
        row.details = {key: value for key, value in row.details.items() if key != "labels_read_at"}
    with session_scope(engine) as session:
        assert {row.answered_for_latest_round for row in reports.annotator_activity(session, project_id=writable_store.project_id)} == {0}
    engine.dispose()


def test_a_label_error_whose_class_was_merged_into_the_suggested_one_is_no_longer_suspect() -> None:
    # QA: after `rename-class uneven free --merge`, the queue held "given free, suggested free, flagged" with nothing
    # saying the merge answered it (the export did: suspected_label_error false)
    def issue(kind: str, given: str | None, suggested: str | None, now: str | None) -> reports.LabelIssueRow:
        return reports.LabelIssueRow(id=1, round_id=1, image_id=1, kind=kind, given_label=given, suggested_label=suggested, score=0.1,
                                     flagged=True, rank=0, current_label=now)
    assert issue("label_error", "scratch", "spot", "scratch").still_suspect is True
    assert issue("label_error", "scratch", "spot", "spot").still_suspect is False  # relabeled
    assert issue("label_error", "free", "free", "free").still_suspect is False  # merged into the suggested class
    assert issue("label_error", "scratch", "spot", None).still_suspect is False  # a tie or an answer deleted since
    assert issue("outlier", "good", None, "good").still_suspect is None


def test_asks_by_round_counts_the_answered_asks_as_the_selection_report_does(writable_store: SeededStore) -> None:
    # the rounds table's "answered" must agree with GET /rounds/{id}/selection's answered flags
    engine = create_db_engine(writable_store.url)
    r1 = writable_store.round_ids[1]
    with session_scope(engine) as session:  # R1 asked about image 1 too, and nobody answered it
        session.add(Selection(round_id=r1, image_id=writable_store.image_ids[0], rank=3, score=0.5, strategy="margin", reason="uncertain",
                              push_status="pushed", pushed_at=T0 + timedelta(hours=1, minutes=4)))
    with session_scope(engine) as session:
        asks = reports.asks_by_round(session, project_id=writable_store.project_id, answered_for=[r1])
        flags = [row.answered for row in reports.round_selection(session, round_id=r1, limit=50, offset=0).items]
    engine.dispose()
    assert asks[r1].answered == sum(flags) and asks[writable_store.round_ids[2]].answered is None
    assert (asks[r1].pushed, asks[r1].answered) == (3, 2)
