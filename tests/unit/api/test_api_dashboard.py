"""The dashboard page: charts carry the seeded rounds and values; store text is escaped."""
from __future__ import annotations

import re
from html import unescape
from types import SimpleNamespace

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api_seed import READ_TOKEN, SeededStore, make_settings
from store.db import create_db_engine, session_scope
from store.models import LabelIssue, Project


def _page(client: TestClient, query: str = "") -> str:
    response = client.get(f"/dashboard?token={READ_TOKEN}{query}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    return response.text


def test_gate_charts_show_each_round_and_threshold(client: TestClient) -> None:
    html = _page(client)
    assert "<script" not in html  # server-rendered SVG only
    for gate in ("macro_f1", "defect_recall", "negative_fpr", "latency_ms", "calibration_ece"):
        assert f'data-chart="gate:{gate}"' in html
    macro = re.search(r'<svg[^>]*data-chart="gate:macro_f1".*?</svg>', html, re.S).group(0)
    assert 'data-rounds="1,2,3,4"' in macro
    points = re.findall(r'<circle class="point"[^>]*data-round="(\d+)" data-value="([\d.]+)"', macro)
    assert points == [("1", "0.65"), ("2", "0.78")]
    assert 'class="threshold"' in macro and "threshold &gt;= 0.7" in macro
    fills = re.findall(r'<circle class="point"[^>]*fill="(#\w+)"', macro)
    assert fills == ["#d73027", "#1a9850"]  # R1 fails, R2 passes


def test_labels_by_source_f1_confusion_and_queue(client: TestClient, seeded_store: SeededStore) -> None:
    html = _page(client)
    bars = re.findall(r'<rect class="bar"[^>]*data-series="(\w+)" data-round="(\d+)" data-value="(\d+)"', html)
    assert ("import", "1", "8") in bars and ("oracle", "1", "2") in bars and ("annotator", "4", "3") in bars
    f1 = re.search(r'<svg[^>]*data-chart="per-class-f1".*?</svg>', html, re.S).group(0)
    assert set(re.findall(r'data-series="(\w+)"', f1)) == {"good", "scratch", "spot"}
    assert 'data-series="spot" data-round="2" data-value="0.74"' in f1
    confusion = re.search(r'<table class="confusion" data-round="2">.*?</table>', html, re.S).group(0)
    assert [int(v) for v in re.findall(r'>(\d+)</td>', confusion)] == [9, 1, 0, 0, 4, 1, 1, 0, 4]
    queue = re.search(r'<table class="issues" data-round="2">.*?</table>', html, re.S).group(0)
    # flagged label errors only: the round's near-duplicate is counted on its card, not queued for relabeling
    assert len(re.findall(r'<tr class="issue"', queue)) == 2
    assert "near_duplicate" not in queue
    assert re.search(r'near-duplicates</div><div class="card-value">1 <span class="verdict fail"[^>]*>2 across test</span><', html)
    assert f'src="/images/{seeded_store.image_ids[5]}?token={READ_TOKEN}&amp;view=display"' in queue  # TIFF and 16-bit files as the model sees them
    # the near-copy beside the copy it was found with (QA: the README promised this card; the dashboard had only the count)
    copies = re.search(r'<section id="near-copies"><h2>Near-copies · round 2 \(1 image\)</h2>.*?</section>', html, re.S).group(0)
    assert f'data-image-id="{seeded_store.image_ids[2]}" data-copy-id="{seeded_store.image_ids[1]}"' in copies
    assert f'src="/images/{seeded_store.image_ids[1]}?token={READ_TOKEN}&amp;view=display"' in copies
    # outliers of the latest round: its count on a card and a section (QA: "outliers: 3" was printed and shown nowhere)
    assert re.search(r'outliers</div><div class="card-value">0<', html)
    assert re.search(r'<section id="outliers"><h2>Outliers · round 2 \(0 images\)</h2><p class="empty">No outliers found.</p></section>', html)


def test_outliers_are_listed_beside_their_nearest_image() -> None:
    from api.dashboard import outliers_table
    from store.reports import LabelIssueRow

    rows = [LabelIssueRow(id=1, round_id=3, image_id=453, kind="outlier", given_label="good", suggested_label=None, score=0.12, flagged=True,
                          rank=0, current_label="good", related_image_id=17)]
    html = outliers_table(rows, 5, 3, 30, "?token=t")
    assert '<tr class="outlier" data-image-id="453" data-nearest-id="17">' in html and 'src="/images/17?token=t&amp;view=display"' in html
    assert "<td>good</td><td>0.12</td>" in html and "label-issues?kind=outlier&amp;offset=1" in html


def test_store_text_is_escaped(writable_store: SeededStore) -> None:
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        session.get(Project, writable_store.project_id).name = "<script>alert(1)</script>"
        session.query(LabelIssue).filter(LabelIssue.rank == 1).update({"suggested_label": "<img src=x onerror=alert(2)>"})
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        html = _page(client)
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html


def test_project_choice_and_empty_project(client: TestClient, seeded_store: SeededStore) -> None:
    html = _page(client, f"&project_id={seeded_store.empty_project_id}")
    assert "empty-line" in html and "No gate recorded yet." in html and "No label issues recorded yet." in html
    assert client.get(f"/dashboard?token={READ_TOKEN}&project_id=999").status_code == 404


def test_gate_table_shows_the_interval_and_when_the_test_split_cannot_tell(client: TestClient) -> None:
    html = _page(client)
    table = re.search(r'<table class="gates">.*?</table>', html, re.S).group(0)
    fpr_row = re.search(r"<tr><td>negative_fpr</td>.*?</tr>", table).group(0)
    assert '<td class="interval">0.004–0.09 <span class="unsettled">cannot tell</span></td>' in fpr_row
    assert '<td class="interval">–</td>' in re.search(r"<tr><td>macro_f1</td>.*?</tr>", table).group(0)
    # 2 test images have a labeled near-copy in train: the gates on the other 18 beside the recorded ones
    assert 'title="on the 18 test images without a labeled near-copy outside the test split (2 have one' in table
    assert fpr_row.endswith('cannot tell</span></td><td>0.05</td></tr>')
    assert re.search(r"<tr><td>defect_recall</td>.*?</tr>", table).group(0).endswith("<td>0.875</td></tr>")
    assert re.search(r"<tr><td>latency_ms</td>.*?</tr>", table).group(0).endswith("<td>–</td></tr>")  # not a test-split metric


def test_training_section_draws_the_latest_rounds_epochs_calibration_and_noise(client: TestClient) -> None:
    html = _page(client)
    section = re.search(r'<section id="training">.*?</section>', html, re.S).group(0)
    assert "Training · round 2" in section and "strategy <b>finetune</b> on 14 labeled images · kept epoch 2 of 3" in section
    loss = re.search(r'<svg[^>]*data-chart="training:loss".*?</svg>', section, re.S).group(0)
    assert 'data-epochs="0,1,2,3"' in loss
    points = re.findall(r'data-series="([\w ]+)" data-epoch="(\d)" data-value="([\d.]+)"', loss)
    assert [p for p in points if p[0] == "validation loss"] == [("validation loss", "0", "1"), ("validation loss", "1", "0.8"),
                                                             ("validation loss", "2", "0.7"), ("validation loss", "3", "0.75")]
    assert re.search(r'class="kept-epoch"[^>]*data-epoch="2"', loss)  # the kept epoch is marked, not the last one
    accuracy = re.search(r'<svg[^>]*data-chart="training:accuracy".*?</svg>', section, re.S).group(0)
    assert 'data-series="train accuracy" data-epoch="3" data-value="0.9"' in accuracy
    assert "temperature 1.7 fitted on validation (6 images): expected calibration error 0.12 → 0.05, negative log-likelihood 0.7 → 0.55</p>" in section
    assert 'class="collapsed"' not in section
    noise = dict(re.findall(r'<tr data-class="(\w+)"><td>\w+</td><td>([^<]+)</td>', section))
    assert noise == {"good": "5.0%", "scratch": "20.0%", "spot": "not estimated: under 20 labels"}
    assert "1 not sent again" in section
    choice = " ".join(re.search(r'<p class="threshold-choice">(.*?)</p>', section, re.S).group(1).split())
    assert choice.startswith("Threshold chosen on out-of-fold probabilities over every labeled non-test image (finetune: one network per fold): "
                             "48 good parts, 20 defects.")
    assert "macro F1 0.81, defect recall 0.9, FPR 0.021 over every good part of the pool, labeled or not (12 of the labeled ones" in choice
    assert "safety margin" not in choice


def test_training_section_says_what_the_history_shows() -> None:
    from api.dashboard import training_section
    from store.reports import calibration_of, training_of

    def line(training: dict) -> str:
        report = SimpleNamespace(summary=SimpleNamespace(number=7), cold_start=None, training=training_of({"training": training}),
                                 calibration=None, label_quality=None, threshold_choice=None, collapsed=None, init_from=None)
        return re.search(r'<p class="training-summary">(.*?)</p>', training_section(report)).group(1)

    collapsed = SimpleNamespace(summary=SimpleNamespace(number=7), cold_start=None, training=None, calibration=calibration_of(
        {"calibration": {"method": "temperature", "temperature": 1.5, "fitted_on": "out_of_fold", "n_images": 116, "n_left_out": 3,
                         "objective": "nll_add_one", "nll_before": 0.0032, "nll_after": 0.0132, "ece_before": 0.003, "ece_after": 0.012}}),
        label_quality=None, threshold_choice=None, collapsed=True, init_from=None)
    section = training_section(collapsed)
    assert "Collapsed: the model gives one class to every test image" in section
    assert "(116 images; 3 images of a class one fold alone held left out)" in section
    assert "negative log-likelihood 0.0032 → 0.0132 (no image there misclassified: the fit keeps an add-one error estimate" in section
    # a calibration error that rose while the log-likelihood fell is explained (QA: 0.135 -> 0.241 without a word)
    worse = SimpleNamespace(**{**vars(collapsed), "collapsed": None, "calibration": calibration_of(
        {"calibration": {"method": "temperature", "temperature": 1.3, "fitted_on": "validation", "n_images": 30, "objective": "nll",
                         "nll_before": 0.4, "nll_after": 0.3, "ece_before": 0.135, "ece_after": 0.241}})})
    assert "expected calibration error 0.135 → 0.241, negative log-likelihood 0.4 → 0.3 (the temperature minimises the log-likelihood" in training_section(worse)

    epochs = [{"epoch": i, "train_loss": 1.0 / (i + 1), "val_loss": 1.0} for i in range(4)]
    assert "a head on frozen embeddings" in line({"strategy": "head", "n_fit": 9, "history": []})
    assert "3 epochs; the kept epoch was not recorded" in line({"strategy": "finetune", "n_fit": 9, "history": epochs})  # older rounds
    assert "kept epoch 1 of 3" in line({"strategy": "finetune", "n_fit": 9, "history": epochs, "best_epoch": 1})
    assert "no epoch after epoch 0" in line({"strategy": "finetune", "n_fit": 9, "history": epochs[:1], "best_epoch": 0})

    from store.reports import init_from_of

    transferred = SimpleNamespace(**{**vars(collapsed), "collapsed": None, "init_from": init_from_of({"init_from": {
        "checkpoint": "/p/models/init_from.pt", "source": "/metal/artifacts/round-004/model.pt", "head_used": False,
        "head": "head not transferred: classes ['broken'] are not in the source model's ['crazing', 'scratches']", "test_images_it_learned_from": 21}})})
    shown = unescape(training_section(transferred))
    assert ("Started from another project's model: /metal/artifacts/round-004/model.pt. Head not transferred: classes ['broken'] are "
            "not in the source model's ['crazing', 'scratches']; this round's network did not start from that head.") in shown
    assert "21 labeled test images are images that model learned from: the test figures overstate the transfer." in shown
    # the training record's notes, as status --json and the API give them (review)
    noted = SimpleNamespace(**{**vars(collapsed), "collapsed": None, "training": training_of({"training": {
        "strategy": "full", "n_fit": 9, "history": epochs, "best_epoch": 0, "options_not_used_by_head": [],
        "early_stopping_note": "validation holds only 'good' images: the kept epoch was chosen by how few of them it got wrong"}})})
    assert "Validation holds only 'good' images: the kept epoch was chosen by how few of them it got wrong." in unescape(training_section(noted))


def test_the_issue_queue_says_when_the_latest_round_recorded_no_label_error(writable_store) -> None:  # noqa: ANN001
    from store.models import Round

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:  # round 4 completes, without label-quality findings
        session.scalars(select(Round).where(Round.number == 4)).one().status = "completed"
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        heading = re.search(r"<h2>Label-issue queue[^\n]*?</h2>", _page(client)).group(0)
    assert "round 2 (2 flagged)" in heading and "(round 4, the latest, recorded none)" in heading


def test_the_cards_say_a_newer_round_is_running(client: TestClient) -> None:
    # the seeded store's R4 is recorded as running and R3 failed: the cards show R2, the latest completed, and said
    # "rounds 4" beside it, with R4's state (no process holds the seeded project: test_api_round_process has one that does)
    html = client.get("/dashboard", headers={"Authorization": f"Bearer {READ_TOKEN}"}).text
    assert re.search(r'rounds</div><div class="card-value">4 <span class="issue-round-note">\(R4 running\? <span class="no-process"', html), html[:2000]
    assert re.search(r'latest round</div><div class="card-value">R2 · completed<', html)


def test_the_label_count_chart_has_whole_number_ticks() -> None:
    # a top of 250 put grid lines at 62.5 and 187.5 labels
    from api.dashboard import stacked_bar_chart

    for totals in ([3], [10, 62], [150, 237], [900, 1234]):
        svg = stacked_bar_chart("labels", "labels", {"oracle": totals}, list(range(1, len(totals) + 1)), {"oracle": "#000"})
        ticks = [unescape(t) for t in re.findall(r'<text class="tick" [^>]*>([^<]*)</text>', svg)]
        assert len(ticks) == 5 and all(float(t.replace(",", "")).is_integer() for t in ticks), ticks
        assert float(ticks[-1].replace(",", "")) >= max(totals)


def test_a_threshold_changed_between_rounds_is_drawn_per_round() -> None:
    # QA: macro_f1_min raised from 0.7 to 0.95 drew 0.95 across every round, and rounds that passed at 0.7 sat green in
    # the shaded failing zone under it
    from api.dashboard import gate_chart
    from store.reports import GateSeries

    gate = GateSeries(name="macro_f1", comparison=">=", threshold=0.95, values=[0.80, 0.94, 0.96], thresholds=[0.7, 0.7, 0.95],
                      passed=[True, True, True], applicable=[True, True, True])
    svg = gate_chart(gate, [1, 2, 3])
    assert [float(v) for v in re.findall(r'<line class="threshold"[^>]*data-value="([\d.]+)"', svg)] == [0.7, 0.7, 0.95]
    assert len(re.findall(r'<rect class="fail-zone"', svg)) == 3
    assert "round 2: 0.94 (pass at &gt;= 0.7)" in svg and "round 3: 0.96 (pass at &gt;= 0.95)" in svg
    assert "each round&#x27;s threshold, now 0.95" in svg or "each round's threshold, now 0.95" in svg
    steady = gate_chart(GateSeries(name="macro_f1", comparison=">=", threshold=0.7, values=[0.65, 0.78], thresholds=[0.7, 0.7],
                                   passed=[False, True], applicable=[True, True]), [1, 2])
    assert len(re.findall(r'<line class="threshold"', steady)) == 1 and "round 2: 0.78 (pass)" in steady


def test_the_dashboard_keeps_its_token_out_of_caches_referers_and_frames(client: TestClient) -> None:
    # review: the page puts its token in every link, and had no header to keep it from caches or other sites
    response = client.get("/dashboard?token=read-secret-token")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store" and response.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"] and response.headers["x-frame-options"] == "DENY"


def test_the_rounds_table_says_why_a_round_failed_its_gates_and_where_its_asks_are(client: TestClient) -> None:
    # QA: a failed round was a count on the dashboard ("rounds 4"), its reason only in `loop status`; asks the annotation
    # tool never took (it was down) were nowhere
    html = _page(client)
    table = re.search(r'<table class="rounds">.*?</table>', html, re.S).group(0)
    rows = re.findall(r'<tr data-round="(\d+)" data-status="(\w+)">(.*?)</tr>', table, re.S)
    assert [(number, status) for number, status, _ in rows] == [("4", "running"), ("3", "failed"), ("2", "completed"), ("1", "completed")]
    cells = {number: [unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
             for number, _, row in rows}
    assert cells["3"][-1] == "embedding failed: out of memory" and cells["2"][-1] == ""
    assert cells["1"][4] == "1/4 macro_f1, defect_recall, negative_fpr" and cells["2"][4] == "4/4"
    assert cells["1"][5] == "2" and cells["2"][5] == "4"  # labels pulled: R1's 2 oracle answers, R2's 4 annotator answers
    assert cells["1"][6] == "2 (2 pushed, 2 answered)" and cells["2"][6] == "1 (1 waiting to be pushed)"  # R2's annotators answered both
    card = re.search(r'asks waiting to be pushed</div><div class="card-value">(.*?)</div>', html, re.S)
    assert card is not None and re.sub(r"<[^>]+>", "", card.group(1)) == "1"


def test_the_rounds_table_shows_the_newest_rounds_and_points_to_the_rest() -> None:
    from api.dashboard import ROUND_TABLE_ROWS, rounds_table
    from store.reports import ProgressSeries, RoundSummary

    n = ROUND_TABLE_ROWS + 3
    summaries = [RoundSummary(id=k, project_id=1, number=k, status="completed", started_at=None, finished_at=None, duration_s=None,
                              n_gates=0, n_gates_passed=0, all_gates_passed=None) for k in range(1, n + 1)]
    html = rounds_table(ProgressSeries(project_id=1, project_name="p", rounds=summaries, gates=[], metrics=[],
                                       labels_by_source={"oracle": [0] * n}, ties=[0] * n, new_label_events_by_source={"oracle": [1] * n}), {})
    assert re.findall(r'data-round="(\d+)"', html) == [str(k) for k in range(n, 3, -1)]
    assert "3 older rounds: <code>GET /projects/1/rounds</code>" in html
    assert "why it failed" not in html  # no round shown failed: no empty column


def test_the_annotators_table_gives_each_annotators_answers_and_agreement(client: TestClient) -> None:
    html = _page(client)
    table = re.search(r'<table class="annotators">.*?</table>', html, re.S).group(0)
    rows = {name: [unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for name, row in re.findall(r'<tr data-annotator="([^"]*)">(.*?)</tr>', table, re.S)}
    assert list(rows) == ["ann1", "oracle", "ann2", "ann3"]
    assert rows["ann1"][1:6] == ["3", "0", "0", "0% (0 of 1)", "0"]  # outvoted on image 12
    assert rows["ann3"][1:5] == ["1", "0", "0", "100% (1 of 1)"] and rows["oracle"][0] == "oracle (simulated)"
    assert rows["oracle"][4] == "no image shared"


def test_a_class_without_test_images_is_named_beside_macro_f1_in_the_api_and_the_dashboard(writable_store: SeededStore) -> None:
    # QA: loop status said "no test image of scratch" beside the failed macro F1; GET /rounds/{id} and the dashboard did not
    from store.models import Round

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        round_ = session.get(Round, writable_store.round_ids[2])
        round_.details = {**round_.details, "classes_missing_from_test": ["spot"]}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        html = _page(client)
        body = client.get(f"/rounds/{writable_store.round_ids[2]}", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()
    assert body["classes_missing_from_test"] == ["spot"]
    row = re.search(r"<tr><td>macro_f1</td>.*?</tr>", html, re.S).group(0)
    assert "no test image of spot" in row


def test_the_annotators_table_shows_label_studio_emails_beside_user_ids() -> None:
    # review: "labelstudio:3" alone names nobody a team lead knows
    from api.dashboard import annotators_table
    from store.reports import AnnotatorActivity

    html = annotators_table([AnnotatorActivity(annotator="labelstudio:3", source="annotator", answered=5, skipped=0, answered_for_latest_round=2,
                                               shared=0, agreeing=0, in_ties=0, median_lead_time_s=7.5, email="<ann1@example.com>")])
    cells = [unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)]
    assert cells[0] == "<ann1@example.com> (labelstudio:3)" and cells[-1] == "7.5 s" and "&lt;ann1@example.com&gt;" in html


def test_a_round_held_back_by_a_full_annotators_queue_says_so_in_the_api_and_the_rounds_table(writable_store: SeededStore) -> None:
    # QA: a round that picked 0 of its 6 (the annotators had not answered) showed "–" and no reason; the API had no record
    from store.models import Round

    held_back = {"budget_per_round": 6, "undelivered_from_earlier_rounds": 2, "waiting_in_annotators_queue": 4, "queue_limit": 6, "budget": 0}
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        newest = max(writable_store.round_ids)
        for round_id in writable_store.round_ids:
            round_ = session.get(Round, round_id)
            round_.details = {**(round_.details or {}), "selection_budget": held_back if round_id == newest else {**held_back, "budget": 6}}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        html = _page(client)
        body = client.get(f"/rounds/{newest}", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()
    assert body["selection_budget"] == held_back
    table = re.search(r'<table class="rounds">.*?</table>', html, re.S).group(0)
    cells = {number: unescape(re.sub(r"<[^>]+>", "", row)) for number, row in re.findall(r'<tr data-round="(\d+)"[^>]*>(.*?)</tr>', table, re.S)}
    newest_number = max(cells, key=int)
    assert "could pick 0 of its budget of 6" in cells[newest_number]
    assert sum("could pick" in text for text in cells.values()) == 1  # a round that could pick its whole budget says nothing
    assert ("could pick 0 of its budget of 6 new images: of those picked earlier, 4 waited for an answer in the annotators' queue and 2 "
            "waited to reach them (the annotation tool was down); the queue holds at most 6 (queue_limit)") in unescape(table)


def test_the_rounds_table_counts_answers_a_webhook_took_in_between_rounds(writable_store: SeededStore) -> None:
    # answers Label Studio's webhook recorded between rounds have no round: the next round took them in, yet its row
    # read only what its pull found
    from datetime import datetime, timedelta, timezone

    from store.models import Image, LabelEvent, Round

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        for number, round_id in enumerate(writable_store.round_ids, start=1):
            round_ = session.get(Round, round_id)
            if number != 3:  # the failed round 3 never read the labels: its window goes to round 4
                round_.details = {**(round_.details or {}), "labels_read_at": (t0 + timedelta(hours=number, minutes=1)).isoformat()}
        image_id = session.scalars(select(Image.id).order_by(Image.id)).first()
        for minutes in (70, 90, 200, 230):  # after R1's read: 2 before R2's, then 2 before R4's (R3 read nothing)
            session.add(LabelEvent(image_id=image_id, label="spot", source="annotator", annotator="ann9", round_id=None,
                                   created_at=t0 + timedelta(minutes=minutes)))
        session.add(LabelEvent(image_id=image_id, label="good", source="import", created_at=t0 + timedelta(minutes=80)))  # not an answer
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        html = _page(client)
    table = re.search(r'<table class="rounds">.*?</table>', html, re.S).group(0)
    cells = {number: [unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
             for number, row in re.findall(r'<tr data-round="(\d+)"[^>]*>(.*?)</tr>', table, re.S)}
    assert cells["1"][5] == "2" and cells["2"][5] == "4 +2 between rounds" and cells["4"][5].endswith("+2 between rounds")
    assert "between rounds" not in cells["3"][5]


def test_the_rounds_table_gives_a_rounds_pull_and_push_warnings(writable_store: SeededStore) -> None:
    # QA: with Label Studio down, the round read "0 labels pulled" on the dashboard and nothing said why
    from store.models import Round

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        round_ = session.get(Round, writable_store.round_ids[1])
        round_.details = {**(round_.details or {}), "pull": {"new_label_events": 0, "warnings": [
            "Label Studio at http://127.0.0.1:8080 is unreachable: its answers are pulled at the next round", "second <b>"]}}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        html = _page(client)
    row = re.search(r'<tr data-round="1".*?</tr>', html, re.S).group(0)
    note = unescape(re.sub(r"<[^>]+>", "", re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[-1])).strip()
    assert note == "Label Studio at http://127.0.0.1:8080 is unreachable: its answers are pulled at the next round (+1 more)"
    assert "second &lt;b&gt;" in row and "why it failed, warnings" in html
