"""GET /projects/{id}/export against the hand-seeded store: every value is one the seed wrote (see api_seed.py)."""
from __future__ import annotations

import csv
import io
import json
import tempfile

from fastapi.testclient import TestClient

from api_seed import READ_TOKEN, SeededStore


def rows_of(text: str) -> dict[int, dict[str, str]]:
    return {int(row["image_id"]): row for row in csv.DictReader(io.StringIO(text))}


def test_export_is_the_latest_completed_rounds_predictions_and_findings_per_image(client: TestClient, read_headers, seeded_store: SeededStore,
                                                                                  tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the file is written before it is sent
    image = {k: seeded_store.image_ids[k - 1] for k in range(1, 13)}
    response = client.get(f"/projects/{seeded_store.project_id}/export", headers=read_headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    # R3 failed and R4 is running: R2 is the latest completed round
    assert 'filename="line-a-round-2.csv"' in response.headers["content-disposition"]
    rows = rows_of(response.text)
    assert set(rows) == set(image.values())
    # the ingest that brought each image, last (QA: the gates per batch could only be recomputed by guessing from paths)
    assert response.text.splitlines()[0].endswith(",file_on_disk,ingest_batch_id")
    assert {row["ingest_batch_id"] for row in rows.values()} == {"1"}  # the seed's one ingest
    first = rows[image[1]]
    assert (first["split"], first["label"], first["label_source"], first["predicted_label"]) == ("test", "good", "import", "good")
    assert (float(first["p_defect"]), float(first["p_good"]), float(first["p_scratch"])) == (0.1, 0.9, 0.05)
    assert rows[image[2]]["predicted_label"] == "" and rows[image[2]]["p_good"] == ""  # R2 predicted image 1 only
    # R2's flagged label errors, with the suggested label: image 6 still has the label suspected; image 5's was answered
    # since (spot), which settles it; rank 4 (not flagged, and not predicted by R2 in this seed) was not judged
    assert [(rows[image[k]]["suspected_label_error"], rows[image[k]]["suspected_label"], rows[image[k]]["suggested_label"]) for k in (6, 5, 4)] == [
        ("True", "scratch", "spot"), ("False", "scratch", "spot"), ("", "", "")]
    assert float(rows[image[6]]["label_quality"]) == 0.05
    assert rows[image[3]]["near_duplicate_of"].endswith("img02.png") and rows[image[1]]["outlier"] == "False"
    assert rows[image[2]]["outlier"] == ""  # not judged by R2 (no prediction, no finding)
    # the answer supersedes the import (image 5); three annotators, two agreeing (image 12)
    assert (rows[image[5]]["label"], rows[image[5]]["label_source"]) == ("spot", "annotator")
    assert (rows[image[12]]["label"], rows[image[12]]["votes"], round(float(rows[image[12]]["agreement"]), 3)) == ("spot", "3", 0.667)
    assert list(tmp_path.iterdir()) == []  # the file was removed once sent

    # an earlier round: its own findings; JSON Lines, by token in the query (a download link)
    earlier = client.get(f"/projects/{seeded_store.project_id}/export?round=1&format=jsonl&token={READ_TOKEN}")
    assert earlier.status_code == 200 and earlier.headers["content-type"].startswith("application/x-ndjson")
    records = {r["image_id"]: r for r in map(json.loads, earlier.text.splitlines())}
    assert records[image[2]]["outlier"] is True and records[image[6]]["suspected_label_error"] is None  # R1 judged image 6 not at all
    assert records[image[1]]["p_good"] == 0.9 and records[image[3]]["near_duplicate_of"] is None


def test_an_export_is_sent_whole_and_removed_whatever_range_a_client_asks(client: TestClient, read_headers, seeded_store: SeededStore,
                                                                          tmp_path, monkeypatch) -> None:  # noqa: ANN001
    # each export is written anew, so a range of an earlier download would splice two files; and Starlette answered a
    # bad or unsatisfiable Range itself (400/416) without the task that removed the file: a full copy left per request
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = f"/projects/{seeded_store.project_id}/export"
    whole = client.get(base, headers=read_headers)
    assert whole.status_code == 200 and "accept-ranges" not in whole.headers
    for asked in ("bytes=abc", "bytes=99999999-", "bytes=0-9", "bytes=0-1,5-9"):
        response = client.get(base, headers={**read_headers, "Range": asked})
        assert (response.status_code, response.text) == (200, whole.text), asked
    assert client.get(base + "?format=jsonl", headers={**read_headers, "Range": "bytes=abc"}).status_code == 200
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_what_it_cannot_give(client: TestClient, read_headers, seeded_store: SeededStore) -> None:  # noqa: ANN001
    base = f"/projects/{seeded_store.project_id}/export"
    assert client.get(base).status_code == 401
    failed = client.get(f"{base}?round=3", headers=read_headers)
    assert failed.status_code == 409 and "failed, not completed" in failed.json()["detail"]
    assert client.get(f"{base}?round=9", headers=read_headers).status_code == 404
    assert client.get(f"{base}?format=xml", headers=read_headers).status_code == 422
    assert client.get("/projects/999/export", headers=read_headers).status_code == 404
    # one export written at a time: four at once slowed every dashboard poll to 14 s
    from api.routes import projects

    with projects._EXPORTING:
        busy = client.get(base, headers=read_headers)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "15"
    assert client.get(base, headers=read_headers).status_code == 200  # released
    # a project with no rounds and no images: the header alone, its classes as the probability columns
    empty = client.get(f"/projects/{seeded_store.empty_project_id}/export", headers=read_headers)
    assert empty.status_code == 200 and empty.text.splitlines()[0].split(",")[16:18] == ["p_ok", "p_bad"] and len(empty.text.splitlines()) == 1


def test_the_dashboard_links_the_export_a_manager_can_follow(client: TestClient, seeded_store: SeededStore) -> None:
    import html
    import re

    page = client.get(f"/dashboard?token={READ_TOKEN}").text
    link = html.unescape(re.search(r'<a id="export" href="([^"]+)"', page).group(1))
    assert link == f"/projects/{seeded_store.project_id}/export?token={READ_TOKEN}"
    followed = client.get(link)  # a browser sends no Authorization header: the token in the link is what it has
    assert followed.status_code == 200 and len(rows_of(followed.text)) == 12


def test_a_labeled_only_download_says_how_many_labeled_images_it_left_out(writable_store: SeededStore, read_headers, tmp_path) -> None:  # noqa: ANN001
    # the CLI printed the count; a download said nothing, so a manager's training set silently lacked images
    import shutil
    from pathlib import Path

    from api.app import create_app
    from api_seed import make_settings
    from store.db import create_db_engine, session_scope
    from store.models import Image

    base = f"/projects/{writable_store.project_id}/export?labeled_only=true"
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        whole = client.get(base, headers=read_headers)
        assert whole.status_code == 200 and (whole.headers["x-left-out"], whole.headers["x-left-out-reasons"]) == ("0", "")
        kept = rows_of(whole.text)
        gone, changed = writable_store.image_ids[0], writable_store.image_ids[4]
        assert {gone, changed} <= set(kept)
        engine = create_db_engine(writable_store.url)  # the store's copy points at files of its own (the seed's are shared)
        with session_scope(engine) as session:
            session.get(Image, gone).path = str(tmp_path / "moved-away.png")
            row = session.get(Image, changed)
            copy = tmp_path / "changed.png"
            shutil.copy(row.path, copy)
            row.path = str(copy)
        engine.dispose()
        copy.write_bytes(Path(copy).read_bytes() + b"changed")
        after = client.get(base, headers=read_headers)
        assert after.status_code == 200
        assert (after.headers["x-left-out"], after.headers["x-left-out-reasons"]) == ("2", "changed=1, missing=1")
        assert set(rows_of(after.text)) == set(kept) - {gone, changed}
        engine = create_db_engine(writable_store.url)
        with session_scope(engine) as session:  # the next round quarantines the missing one: still counted
            session.get(Image, gone).status = "quarantined"
        engine.dispose()
        quarantined = client.get(base, headers=read_headers)
        assert (quarantined.headers["x-left-out"], quarantined.headers["x-left-out-reasons"]) == ("2", "changed=1, quarantined=1")
        assert "x-left-out" not in client.get(f"/projects/{writable_store.project_id}/export", headers=read_headers).headers  # all images


def test_a_fifo_in_an_images_place_is_unreadable_not_a_hung_export(writable_store: SeededStore, read_headers, tmp_path) -> None:  # noqa: ANN001
    # QA: `mkfifo` where an image was made the export wait forever on open(), and its lock then refused every later export
    import os
    import threading

    from api.app import create_app
    from api_seed import make_settings
    from store.db import create_db_engine, session_scope
    from store.export import file_on_disk
    from store.models import Image

    fifo = tmp_path / "part.png"
    os.mkfifo(fifo)
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        image = session.get(Image, writable_store.image_ids[0])
        image.path = str(fifo)
        answers: list[str] = []
        reader = threading.Thread(target=lambda: answers.append(file_on_disk(image)), daemon=True)  # a hang stays in this thread
        reader.start()
        reader.join(timeout=10)
        assert answers == ["unreadable"], "file_on_disk waited on a FIFO"
        folder = tmp_path / "a-folder.png"  # a folder in an image's place: missing, as the round says (not unreadable)
        folder.mkdir()
        image.path = str(folder)
        assert file_on_disk(image) == "missing"
        image.path = str(fifo)
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        base = f"/projects/{writable_store.project_id}/export"
        first = client.get(base + "?labeled_only=true", headers=read_headers)
        assert first.status_code == 200 and first.headers["x-left-out-reasons"] == "unreadable=1"
        assert client.get(base, headers=read_headers).status_code == 200  # no lock left behind
