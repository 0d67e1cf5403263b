"""A round that fails while the store cannot be written either (a full disk, a lost server): the round's own error is
what the user sees, and its reason reaches the store through the next round instead of "the process ended"."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from loop import round as round_module
from loop import stale_rounds
from loop.cli import app
from loop.project import open_project
from store import session_scope
from store.models import Round

runner = CliRunner()


class Stop(Exception):
    pass


def store_full_after_the_first_transaction(real_scope):  # noqa: ANN001, ANN201
    """run_round's session_scope: the first transaction (the round's row) goes through, every later one fails."""
    calls = {"n": 0}

    def scope(engine):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] > 1:
            raise OperationalError("UPDATE rounds", {}, Exception("database or disk is full"))
        return real_scope(engine)

    return scope


def test_a_failure_the_store_cannot_record_is_shown_as_itself_and_recorded_by_the_next_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0

    def disk_full(state) -> None:  # noqa: ANN001
        state.round_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "model.pt.tmp", "confusion_matrix.png"):
            (state.round_dir / name).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(project / "artifacts" / "round-001" / "model.onnx"))

    real_scope = round_module.session_scope
    monkeypatch.setattr(round_module, "ROUND_STEPS", [disk_full])
    monkeypatch.setattr(round_module, "_confirm_store_is_ours", lambda state, step_name: None)
    monkeypatch.setattr(round_module, "session_scope", store_full_after_the_first_transaction(real_scope))
    failed = runner.invoke(app, ["round", "--project", str(project), "--quiet"])
    output = " ".join(failed.output.split())
    # the round's error, one line, exit 2; not the store's error raised while recording it
    assert failed.exit_code == 2 and "No space left on device" in output and "model.onnx" in output, output
    assert "round 1 stopped in step disk_full" in output
    assert "Traceback" not in failed.output and "could not be recorded in the store" in output
    # the failed round's model files went (nothing uses them; they filled a disk already full); its plots stay
    assert sorted(p.name for p in (project / "artifacts" / "round-001").iterdir()) == ["confusion_matrix.png"]

    monkeypatch.setattr(round_module, "session_scope", real_scope)
    (note,) = project.glob(".round-*-failure.txt")

    # the next round's first transaction fails too (the store is still in trouble): the note stays for the one after
    def store_still_gone(engine):  # noqa: ANN001, ANN202
        raise OperationalError("UPDATE rounds", {}, Exception("server closed the connection"))

    monkeypatch.setattr(stale_rounds, "session_scope", store_still_gone)
    with pytest.raises(OperationalError):
        round_module.run_round(open_project(project))
    assert note.exists()
    monkeypatch.setattr(stale_rounds, "session_scope", real_scope)

    def stop(state) -> None:  # noqa: ANN001
        raise Stop

    monkeypatch.setattr(round_module, "ROUND_STEPS", [stop])
    with pytest.raises(Stop):
        round_module.run_round(open_project(project))
    with session_scope(open_project(project).engine) as session:
        first = session.scalars(select(Round).where(Round.number == 1)).one()
        assert first.status == "failed" and "step disk_full: OSError: [Errno 28] No space left on device" in first.error
        assert "recorded by the next round" in first.error
    assert not list(project.glob(".round-*-failure.txt"))  # taken in once

    # a note for another round of that id (another store, or this one made again) is not taken for this one
    with session_scope(open_project(project).engine) as session:
        second = session.scalars(select(Round).where(Round.number == 2)).one()
        second.status, second.error = "running", None
        second_id = second.id
    (project / f".round-{second_id}-failure.txt").write_text('{"number": 7, "started_at": "2020-01-01T00:00:00", "reason": "not this one"}')
    with pytest.raises(Stop):
        round_module.run_round(open_project(project))
    with session_scope(open_project(project).engine) as session:
        assert session.get(Round, second_id).error == "interrupted (the process ended before the round finished)"


def test_a_ctrl_c_says_what_it_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a second Ctrl-C 0.01 s after the first cut short the recording of the round: the CLI said "nothing was
    # recorded" while the round stood in the store as running, with its pulled labels
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0

    def interrupted(*, record: str | None):  # noqa: ANN202
        def run(ctx, options=None, *, console=None):  # noqa: ANN001, ANN202
            if record is not None:
                with session_scope(ctx.engine) as session:
                    session.add(Round(project_id=1, number=1, status=record, error="interrupted (Ctrl-C) during step train_model"
                                      if record == "failed" else None))
            raise KeyboardInterrupt
        return run

    for record, said in ((None, "before the round started: nothing was recorded"),
                         ("running", "round 1 is left as running; the next `loop round` records it as interrupted")):
        monkeypatch.setattr(round_module, "run_round", interrupted(record=record))
        result = runner.invoke(app, ["round", "--project", str(project), "--quiet"])
        assert result.exit_code == 130 and said in " ".join(result.output.split()), result.output
    with session_scope(open_project(project).engine) as session:
        session.execute(Round.__table__.delete())
    monkeypatch.setattr(round_module, "run_round", interrupted(record="failed"))
    result = runner.invoke(app, ["round", "--project", str(project), "--quiet"])
    assert "round 1 is recorded as failed" in " ".join(result.output.split())
    with session_scope(open_project(project).engine) as session:
        session.execute(Round.__table__.delete())
    monkeypatch.setattr(round_module, "run_round", interrupted(record="completed"))  # came as the finished round let go
    assert "round 1 had completed" in " ".join(runner.invoke(app, ["round", "--project", str(project), "--quiet"]).output.split())


def test_a_damaged_store_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    store = project / "loop.db"
    data = store.read_bytes()
    store.write_bytes(data[:100] + b"\0" * (len(data) - 100))  # the header kept, the pages gone
    for command in (["status"], ["round", "--quiet"]):
        result = runner.invoke(app, [*command, "--project", str(project)])
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "the store's database file is damaged" in said and "Traceback" not in result.output, result.output


def test_a_ctrl_c_during_ingest_says_nothing_was_stored(tmp_path: Path, class_folders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good"]).exit_code == 0
    from loop import ingest

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest, "inspect_file", interrupted)  # while the files are read, before anything is stored
    result = runner.invoke(app, ["ingest", str(class_folders), "--project", str(project), "--quiet"])
    assert result.exit_code == 130 and "nothing of this ingest was stored" in " ".join(result.output.split()), result.output
    from store.models import Image

    with session_scope(open_project(project).engine) as session:
        assert session.scalars(select(Image)).first() is None


def test_a_failure_after_the_round_was_recorded_completed_leaves_it_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the timings are written after record_round committed "completed": a failure there marked the round failed and
    # deleted the model files of a round the store called completed (/predict then answered 503)
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    real_scope = round_module.session_scope

    def record(state) -> None:  # noqa: ANN001
        state.round_dir.mkdir(parents=True, exist_ok=True)
        (state.round_dir / "model.onnx").write_bytes(b"x" * 1000)
        with real_scope(state.ctx.engine) as session:
            session.get(Round, state.round_id).status = "completed"

    monkeypatch.setattr(round_module, "ROUND_STEPS", [])
    monkeypatch.setattr(round_module, "record_round", record)
    monkeypatch.setattr(round_module, "_confirm_store_is_ours", lambda state, step_name: None)
    monkeypatch.setattr(round_module, "session_scope", store_full_after_the_first_transaction(real_scope))
    with pytest.raises(OperationalError):
        round_module.run_round(open_project(project))
    with session_scope(open_project(project).engine) as session:
        assert session.scalars(select(Round)).one().status == "completed"
    assert (project / "artifacts" / "round-001" / "model.onnx").is_file() and not list(project.glob(".round-*-failure.txt"))


def test_a_killed_round_is_recorded_as_failed_before_the_next_round_loads_its_libraries(new_project, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # QA: for the ~10 s the next `loop round` spent importing torch & co., holding the project, `loop status` showed
    # the SIGKILLed round as alive
    import sys
    import types

    from store.queries import get_project

    with session_scope(new_project.engine) as session:
        session.add(Round(project_id=get_project(session).id, number=1, status="running"))
    # the round module "still loading": its import fails here, after the project was taken
    monkeypatch.setitem(sys.modules, "loop.round", types.ModuleType("loop.round"))
    result = runner.invoke(app, ["round", "--project", str(new_project.root)])
    assert result.exit_code != 0
    with session_scope(new_project.engine) as session:
        killed = session.scalars(select(Round).where(Round.number == 1)).one()
        assert (killed.status, killed.error) == ("failed", "interrupted (the process ended before the round finished)")
    assert "round 1 was still recorded as running" in " ".join(result.output.split())


def test_a_round_that_fails_in_its_recording_has_no_gate_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QA: a round that failed on a full disk in record_round, after it set all_gates_pass, showed in `loop status` as
    # "failed ... all pass" with no gate recorded (they were rolled back)
    import json

    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0

    def record(state) -> None:  # noqa: ANN001
        state.details.update(all_gates_pass=True, per_class={"good": {"f1": 0.9}}, classes_missing_from_test=["dent"], class_names=["good", "dent"],
                             test_intervals={"negative_fpr": {"value": 0.01}}, training={"strategy": "head"})
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(round_module, "ROUND_STEPS", [])
    monkeypatch.setattr(round_module, "record_round", record)
    monkeypatch.setattr(round_module, "_confirm_store_is_ours", lambda state, step_name: None)
    with pytest.raises(OSError):
        round_module.run_round(open_project(project))
    report = json.loads(runner.invoke(app, ["status", "--project", str(project), "--json"]).output)
    (failed,) = report["rounds"]
    assert (failed["status"], failed["all_gates_pass"]) == ("failed", None)
    with session_scope(open_project(project).engine) as session:
        details = session.scalars(select(Round)).one().details
        assert not {"all_gates_pass", "per_class", "classes_missing_from_test", "test_intervals"} & set(details)
        assert details["class_names"] == ["good", "dent"] and details["training"] == {"strategy": "head"}  # how it trained stays
    table = " ".join(runner.invoke(app, ["status", "--project", str(project)], env={"COLUMNS": "200"}).output.split())
    assert "all pass" not in table


def test_a_round_whose_store_disk_fills_names_its_round_and_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # review: the one line for a full disk under the store dropped what a full disk under the round's files says
    import sqlite3

    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0

    def store_full(state) -> None:  # noqa: ANN001
        raise OperationalError("INSERT INTO predictions", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(round_module, "ROUND_STEPS", [store_full])
    monkeypatch.setattr(round_module, "_confirm_store_is_ours", lambda state, step_name: None)
    failed = runner.invoke(app, ["round", "--project", str(project), "--quiet"])
    output = " ".join(failed.output.split())
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    assert "round 1 stopped in step store_full: the store's disk is full (database or disk is full)" in output, output
    assert "The round is recorded as failed" in output
