"""A round the store records as running while no process holds the project's lock (killed: SIGKILL, power loss) is
reported as such, as `loop status` does; and /predict finds the model of a moved project folder."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_seed import READ_TOKEN, SeededStore, make_settings, png_bytes
from loop.project import project_lock
from store.db import create_db_engine, exclusive_store_lock, session_scope
from store.models import Project, Round

REPO = Path(__file__).resolve().parents[3]

# what `loop round` holds while it runs (loop/cli.py): the folder's .loop.lock and the store's lock
HOLD_LOCKS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from loop.project import project_lock
    from store.db import create_db_engine
    with project_lock(Path(sys.argv[1]), action="loop round", engine=create_db_engine(sys.argv[2])):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def api(writable_store: SeededStore) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(writable_store.project_dir)), headers={"Authorization": f"Bearer {READ_TOKEN}"}) as client:
        yield client


def _round_4(api: TestClient, store: SeededStore) -> tuple[dict, dict, dict]:
    """R4 as /projects/{id}/rounds, /rounds/{id} and /projects/{id}/progress give it."""
    listed = api.get(f"/projects/{store.project_id}/rounds").json()["items"]
    detail = api.get(f"/rounds/{store.round_ids[4]}").json()
    progress = api.get(f"/projects/{store.project_id}/progress").json()["rounds"]
    return next(r for r in listed if r["number"] == 4), detail, next(r for r in progress if r["number"] == 4)


def test_a_killed_round_is_running_without_a_process(api: TestClient, writable_store: SeededStore) -> None:
    runner = subprocess.Popen([sys.executable, "-c", HOLD_LOCKS, str(writable_store.project_dir), writable_store.url],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout.readline().strip() == "held"
        for r4 in _round_4(api, writable_store):  # while its process runs: running, alive
            assert (r4["status"], r4["process_alive"], r4["status_note"]) == ("running", True, None)
    finally:
        runner.send_signal(signal.SIGKILL)  # as `kill -9`: the lock files still name its pid, nothing marks the round
        runner.wait()
    assert (writable_store.project_dir / ".loop.lock").read_text().strip() == f"loop round running as pid {runner.pid}"
    # the store did not change: answers cached while the process lived must not be served again
    for r4 in _round_4(api, writable_store):
        assert (r4["status"], r4["process_alive"]) == ("running", False)
        assert r4["status_note"] == ("no process holds the project: it was killed or the machine stopped; "
                                     "the next `loop round` records it as interrupted")
    listed = api.get(f"/projects/{writable_store.project_id}/rounds").json()["items"]
    assert [(r["number"], r["process_alive"], r["status_note"]) for r in listed if r["number"] != 4] == [(1, None, None), (2, None, None), (3, None, None)]
    engine = create_db_engine(writable_store.url)  # the API only reads: the round is still recorded as running
    with session_scope(engine) as session:
        assert session.get(Round, writable_store.round_ids[4]).status == "running"
    engine.dispose()


def test_the_store_lock_alone_means_alive(api: TestClient, writable_store: SeededStore) -> None:
    # a store shared through database_url: the round runs from another project folder, whose .loop.lock is not this one
    engine = create_db_engine(writable_store.url)
    try:
        with exclusive_store_lock(engine):
            for r4 in _round_4(api, writable_store):
                assert r4["process_alive"] is True
    finally:
        engine.dispose()
    for r4 in _round_4(api, writable_store):
        assert r4["process_alive"] is False


def test_the_dashboard_says_no_process_runs_the_round(api: TestClient, writable_store: SeededStore) -> None:
    with project_lock(writable_store.project_dir, action="loop round"):
        html = api.get("/dashboard").text
    assert re.search(r'rounds</div><div class="card-value">4 <span class="issue-round-note">\(R4 running\)</span><', html)
    html = api.get("/dashboard").text
    note = re.search(r'rounds</div><div class="card-value">4 <span class="issue-round-note">\(R4 running\? '
                     r'<span class="no-process" title="([^"]*)">no process holds the project: killed, or the machine stopped</span>\)', html)
    assert note is not None, html[:3000]
    assert "the next `loop round` records it as interrupted" in note.group(1)


def test_a_running_latest_round_card_says_no_process(writable_store: SeededStore) -> None:
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:  # no completed round: the "latest round" card shows the running one
        for round_ in session.query(Round).filter(Round.status == "completed"):
            round_.status = "failed"
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        html = client.get(f"/dashboard?token={READ_TOKEN}").text
    assert re.search(r'latest round</div><div class="card-value">R4 · running\? <span class="no-process"', html), html[:3000]


def test_predict_finds_the_model_in_a_moved_project_folder(writable_store: SeededStore, full_headers: dict[str, str], tmp_path: Path) -> None:
    # the store names the folder the round ran in, gone since `mv P P2`; P2 holds the file at the same place
    old = tmp_path / "P"
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        session.get(Project, writable_store.project_id).root_dir = str(old)
        round_ = session.get(Round, writable_store.round_ids[2])
        round_.artifacts = {**round_.artifacts, "model_onnx": str(old / "artifacts" / "round-002" / "model.onnx")}
    engine.dispose()
    moved = writable_store.project_dir / "artifacts" / "round-002" / "model.onnx"
    moved.parent.mkdir(parents=True)
    shutil.copy(writable_store.model_path, moved)
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        response = client.post("/predict", headers=full_headers, files=[("files", ("red.png", png_bytes((220, 40, 40)), "image/png"))])
        assert response.status_code == 200, response.text
        assert response.json()["round_number"] == 2 and response.json()["predictions"][0]["predicted_label"] == "scratch"
        # the old place holds another project's file by now (`mv P P-v1 && loop init P`): the served folder's is used
        (old / "artifacts" / "round-002").mkdir(parents=True)
        (old / "artifacts" / "round-002" / "model.onnx").write_bytes(b"another project's model")
        response = client.post("/predict", headers=full_headers, files=[("files", ("red.png", png_bytes((220, 40, 40)), "image/png"))])
        assert response.status_code == 200, response.text
        (old / "artifacts" / "round-002" / "model.onnx").unlink()
        moved.unlink()  # in neither place: still a 503 naming the file
        response = client.post("/predict", headers=full_headers, files=[("files", ("red.png", png_bytes((220, 40, 40)), "image/png"))])
    assert response.status_code == 503 and "'model.onnx' is missing" in response.json()["detail"]
