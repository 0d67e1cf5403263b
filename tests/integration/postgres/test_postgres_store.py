"""The store on a real PostgreSQL server, not only SQLite: migrations, rounds, status and the managers' API."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, inspect, select, text
from typer.testing import CliRunner

from alembic import command
from loop.cli import app
from loop.project import open_project
from store.db import alembic_config, session_scope
from store.models import (
    Base,
    GateResult,
    LabelEvent,
    Prediction,
    Project,
    Round,
    Selection,
)

pytestmark = pytest.mark.postgres
runner = CliRunner()
TOKEN = "p" * 32


def invoke(*args: str):  # noqa: ANN201
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def oracle_project(postgres, tmp_path: Path, oracle_manifests: tuple[Path, Path], *, image_size: int) -> tuple[str, Path]:  # noqa: ANN001
    """(store URL, folder) of a project on a new PostgreSQL database, the oracle answering, its images ingested."""
    url = postgres.new_database()
    truth, manifest = oracle_manifests
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good", "--annotator", "oracle",
           "--oracle-manifest", str(truth), "--budget", "5", "--image-size", str(image_size), "--database-url", url)
    invoke("ingest", str(manifest), "--project", str(project), "--quiet")
    return url, project


def test_the_migrations_build_exactly_the_models_schema_on_postgres_and_step_down_and_up(postgres) -> None:  # noqa: ANN001
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = postgres.new_database()
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    with engine.begin() as connection:  # a row that every step down and up must keep
        connection.execute(text("insert into projects (name, root_dir, classes, negative_class, created_at) "
                                "values ('kept', '/tmp/kept', '[\"good\", \"dent\"]', 'good', now())"))
    command.downgrade(alembic_config(url), "0001")
    assert "part" not in {c["name"] for c in inspect(engine).get_columns("images")}
    command.upgrade(alembic_config(url), "head")
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.execute(text("select name, classes from projects")).all() == [("kept", ["good", "dent"])]
    engine.dispose()


def test_commands_opening_a_new_postgres_store_at_the_same_moment_upgrade_it_once(postgres, upgrade_at_once) -> None:  # noqa: ANN001
    # two `loop init` on a never-migrated database: one created the tables, the others failed with a traceback
    # (UniqueViolation on pg_type); now they wait on an advisory lock and find the schema at head
    url = postgres.new_database()
    assert upgrade_at_once(url, 4) == ["ok"] * 4
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalars().all() == ["0007"]
    engine.dispose()


def test_an_older_postgres_store_is_not_upgraded_while_a_round_from_elsewhere_holds_it(postgres, capsys) -> None:  # noqa: ANN001
    # review: only this folder's lock file was looked at; a round from another folder or machine holds the store's
    # advisory lock, and an older release's round there could not open the store after
    from store.db import STORE_LOCK_KEYS, StoreUnavailable, upgrade_schema

    url = postgres.new_database()
    command.upgrade(alembic_config(url), "0002")
    holding = create_engine(url)
    holder = holding.connect()
    holder.execute(text("select pg_advisory_lock(:a, :b)"), {"a": STORE_LOCK_KEYS[0], "b": STORE_LOCK_KEYS[1]})
    holder.commit()
    try:
        with pytest.raises(StoreUnavailable, match=r"needs a schema upgrade \(0002 to .*a round or ingest holds the store's lock.*nothing was changed"):
            upgrade_schema(url)
    finally:
        holder.close()
        holding.dispose()  # the lock goes with its connection
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() == "0002"
    upgrade_schema(url)  # the round done: upgraded, and said (no file to copy)
    with engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() != "0002"
    engine.dispose()
    assert "note: upgraded the store at" in capsys.readouterr().err


def test_rounds_status_and_api_on_a_postgres_store(postgres, tmp_path: Path, oracle_manifests: tuple[Path, Path]) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    url, project = oracle_project(postgres, tmp_path, oracle_manifests, image_size=96)
    for _ in range(2):
        invoke("round", "--project", str(project), "--quiet")
    assert not (project / "loop.db").exists()  # everything went to PostgreSQL

    ctx = open_project(project)
    assert ctx.engine.dialect.name == "postgresql"
    with session_scope(ctx.engine) as session:
        rounds = session.scalars(select(Round).order_by(Round.number)).all()
        assert [(r.number, r.status) for r in rounds] == [(1, "completed"), (2, "completed")]
        assert {g.name for g in session.scalars(select(GateResult).where(GateResult.round_id == rounds[1].id))} == {
            "macro_f1", "defect_recall", "negative_fpr", "latency_ms"}
        selected_in_1 = set(session.scalars(select(Selection.image_id).where(Selection.round_id == rounds[0].id)))
        answered_in_2 = set(session.scalars(select(LabelEvent.image_id).where(LabelEvent.source == "oracle", LabelEvent.round_id == rounds[1].id)))
        assert len(selected_in_1) == 5 and selected_in_1 <= answered_in_2  # the oracle's answers to round 1's batch, pulled by round 2
        n_predictions = len(session.scalars(select(Prediction.id).where(Prediction.round_id == rounds[1].id)).all())
        details = rounds[1].details
    assert n_predictions > 0 and details["push"]["pushed"] == 5

    status = json.loads(invoke("status", "--project", str(project), "--json").output)
    assert [r["number"] for r in status["rounds"]] == [1, 2]

    with TestClient(create_app(Settings(project_dir=project, database_url=url, api_token=SecretStr(TOKEN)))) as client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        (listed_project,) = client.get("/projects", headers=headers).json()["items"]
        listed = client.get(f"/projects/{listed_project['id']}/rounds", headers=headers)
        assert listed.status_code == 200, listed.text
        assert sorted(r["number"] for r in listed.json()["items"]) == [1, 2]
        progress = client.get(f"/projects/{listed_project['id']}/progress", headers=headers)
        assert progress.status_code == 200, progress.text
        before = progress.json()
        assert [r["number"] for r in before["rounds"]] == [1, 2]
        # a round while the API runs: its answers are cached until the store changes, which on PostgreSQL it reads from
        # row counts and newest ids (there is no file version): round 3 and its oracle labels must show up
        invoke("round", "--project", str(project), "--quiet")
        after = client.get(f"/projects/{listed_project['id']}/progress", headers=headers).json()
        assert [r["number"] for r in after["rounds"]] == [1, 2, 3]
        assert after["labels_by_source"]["oracle"][2] == before["labels_by_source"]["oracle"][1] + 5  # round 2's batch, answered
        assert all(len(series["values"]) == 3 for series in after["gates"])
        latest = client.get(f"/rounds/{rounds[1].id}", headers=headers)
        assert latest.status_code == 200, latest.text
        assert {g["name"] for g in latest.json()["gates"]} == {"macro_f1", "defect_recall", "negative_fpr", "latency_ms"}
        issues = client.get(f"/rounds/{rounds[1].id}/label-issues", headers=headers)
        assert issues.status_code == 200, issues.text
        assert client.get("/dashboard", params={"token": TOKEN}).status_code == 200
        # JSON paths into the rounds' details (labels_read_at, pull warnings) read on PostgreSQL as on SQLite
        (oracle,) = client.get(f"/projects/{listed_project['id']}/annotators", headers=headers).json()
        assert (oracle["annotator"], oracle["answered"], oracle["answered_for_latest_round"]) == ("oracle", 10, 5)  # rounds 2 and 3 pulled the answers to 1 and 2; 3 took in 5
        # the largest id PostgreSQL's integer holds is a plain 404, one more a 422 (QA: the driver's overflow was a 500)
        assert client.get(f"/rounds/{2**31 - 1}", headers=headers).status_code == 404
        for path in (f"/rounds/{2**31}", f"/images/{2**31}", f"/projects/{2**31}/progress"):
            assert client.get(path, headers=headers).status_code == 422, path


def test_a_postgres_store_shared_by_two_folders_has_one_writer_at_a_time(postgres, tmp_path: Path) -> None:  # noqa: ANN001
    # Two folders (or machines) can point at one PostgreSQL store with the same loop.toml: each folder's lock file
    # guards that folder only, so the store itself is locked while a round or an ingest writes.
    import shutil

    from loop.project import project_lock

    url = postgres.new_database()
    first, second = tmp_path / "line-a", tmp_path / "line-a-elsewhere"
    invoke("init", str(first), "--classes", "good,dent", "--negative-class", "good", "--database-url", url)
    second.mkdir()
    shutil.copy(first / "loop.toml", second / "loop.toml")
    ctx = open_project(first)
    with session_scope(ctx.engine) as session:  # a round recorded as running (by the holder below, or killed)
        session.add(Round(project_id=session.scalars(select(Project.id)).one(), number=1, status="running"))
    with project_lock(first.resolve(), action="loop round", engine=ctx.engine):
        busy = runner.invoke(app, ["round", "--project", str(second)])
        assert busy.exit_code == 2 and "another loop round or ingest writes to it now" in " ".join(busy.output.split())
        while_held = " ".join(invoke("status", "--project", str(second)).output.split())
    assert "running?" not in while_held  # it really runs, from the other folder
    after = " ".join(invoke("status", "--project", str(second)).output.split())
    assert "round 1 is recorded as running, but no process holds this project folder or its store" in after
    with session_scope(ctx.engine) as session:
        assert session.scalars(select(Round.status)).all() == ["running"]  # the refused round changed nothing


def test_the_store_lock_is_per_database_and_a_dropped_lock_connection_does_not_fail_the_command(postgres) -> None:  # noqa: ANN001
    from sqlalchemy import text

    from store.db import (
        create_db_engine,
        exclusive_store_lock,
        store_lock_held,
        upgrade_schema,
    )

    first, second = postgres.new_database(), postgres.new_database()
    for url in (first, second):
        upgrade_schema(url)
    engine, other = create_db_engine(first), create_db_engine(second)
    try:
        with exclusive_store_lock(engine):
            assert store_lock_held(engine) is True
            assert store_lock_held(other) is False  # another project's database on the same server: not this store's lock
            with other.connect() as admin:  # the server drops the lock's connection (restart, idle timeout, a DBA)
                admin.execute(text("select pg_terminate_backend(pid) from pg_locks where locktype = 'advisory' and granted"))
            assert store_lock_held(other) is False
        assert store_lock_held(engine) is False  # gone with its connection; leaving the block raised nothing
    finally:
        engine.dispose()
        other.dispose()


def test_stores_in_two_schemas_of_one_database_have_a_lock_each(postgres) -> None:  # noqa: ANN001
    # QA: a round on the store in the public schema made an ingest on the store in schema teamb "busy", and teamb's
    # API called its killed round alive: the lock was one per database
    from sqlalchemy import text

    from store.db import create_db_engine, exclusive_store_lock, store_lock_held, upgrade_schema

    public = postgres.new_database()
    with create_db_engine(public).connect() as connection:
        connection.execute(text("create schema teamb"))
        connection.commit()
    teamb = f"{public}?options=-csearch_path%3Dteamb"
    for url in (public, teamb):
        upgrade_schema(url)
    engines = [create_db_engine(url) for url in (public, teamb)]
    try:
        with exclusive_store_lock(engines[0]):
            assert (store_lock_held(engines[0]), store_lock_held(engines[1])) == (True, False)
            with exclusive_store_lock(engines[1]):  # not busy
                assert store_lock_held(engines[1]) is True
        assert (store_lock_held(engines[0]), store_lock_held(engines[1])) == (False, False)
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("meanwhile", ["nothing", "lock-taken", "round-ran", "ingest-ran"])
def test_a_round_whose_store_lock_connection_was_dropped_takes_the_lock_again_or_stops(
        postgres, tmp_path: Path, oracle_manifests: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, meanwhile: str) -> None:  # noqa: ANN001
    # A server restart or an idle-session timeout drops the lock's connection mid-round, and the lock with it: another
    # folder could start a round meanwhile. Checked before each step: taken again when free, else the round stops.
    import loop.round as round_module
    from store.db import STORE_LOCK_KEYS, create_db_engine, store_lock_held

    url, project = oracle_project(postgres, tmp_path, oracle_manifests, image_size=64)
    other = create_db_engine(url)
    other_holder = other.connect()

    def embed_then_lose_the_lock(state) -> None:  # noqa: ANN001
        round_module.embed_images(state)
        other_holder.execute(text("select pg_terminate_backend(pid) from pg_locks where locktype = 'advisory' and granted "
                                  "and classid = :a and objid = :b"), {"a": STORE_LOCK_KEYS[0], "b": STORE_LOCK_KEYS[1]})
        if meanwhile == "lock-taken":  # another folder's round starts in the gap
            assert other_holder.execute(text("select pg_try_advisory_lock(:a, :b)"), {"a": STORE_LOCK_KEYS[0], "b": STORE_LOCK_KEYS[1]}).scalar()
        elif meanwhile == "round-ran":  # and ran to its end in the gap: at its start it marked this one interrupted
            other_holder.execute(text("update rounds set status = 'failed', error = 'interrupted'"))
        elif meanwhile == "ingest-ran":  # another folder's ingest took the lock and let it go in the gap
            other_holder.execute(text("insert into ingest_batches (project_id, source, layout, created_at, n_files, n_new_images, "
                                      "n_duplicates, n_quarantined, notes) select id, '/elsewhere', 'folders', now(), 0, 0, 0, 0, '{}' "
                                      "from projects"))
        other_holder.commit()

    steps = [embed_then_lose_the_lock if step is round_module.embed_images else step for step in round_module.ROUND_STEPS]
    monkeypatch.setattr(round_module, "ROUND_STEPS", steps)
    try:
        result = runner.invoke(app, ["round", "--project", str(project), "--quiet"])
        ctx = open_project(project)
        with session_scope(ctx.engine) as session:
            (round_row,) = session.scalars(select(Round)).all()
            status, error, details = round_row.status, round_row.error, round_row.details
        if meanwhile == "lock-taken":
            assert result.exit_code == 2, result.output
            assert "lost the lock on the store" in " ".join(result.output.split())
            assert status == "failed" and "step find_near_copies" in error and "another loop round or ingest holds it now" in error
        elif meanwhile == "round-ran":
            assert result.exit_code == 2, result.output
            assert status == "failed" and "another round started while this one had lost its lock" in error
        elif meanwhile == "ingest-ran":
            assert result.exit_code == 2, result.output
            assert status == "failed" and "an ingest ran while this round had lost its lock" in error
        else:
            assert result.exit_code == 0, result.output
            assert status == "completed" and details["store_lock_retaken_before"] == ["find_near_copies"]
            assert store_lock_held(ctx.engine) is False  # the lock taken again was released at the end
    finally:
        other_holder.close()
        other.dispose()


def test_an_api_requests_reads_see_the_postgres_store_at_one_moment(postgres, reads_see_one_moment) -> None:  # noqa: ANN001
    # read committed gave each SELECT the newest commit: a page could mix a round finishing with the one before
    from store.db import upgrade_schema

    url = postgres.new_database()
    upgrade_schema(url)
    engine = create_engine(url)
    with session_scope(engine) as session:
        project = Project(name="line", root_dir="/tmp/line", classes=["good", "dent"], negative_class="good")
        session.add(project)
        session.flush()
        project_id = project.id
    engine.dispose()
    before, during, after = reads_see_one_moment(url, project_id)
    assert (during, after) == (before, before + 1)


def test_a_postgres_server_that_stops_answering_gives_503_not_a_request_that_hangs(postgres, tmp_path: Path) -> None:  # noqa: ANN001
    # review: a server that stops answering (a host gone from the network; here its postmaster stopped) left /health
    # and every route waiting on TCP for minutes, where a refused connection gave 503 at once
    import os
    import signal
    import time

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    url = postgres.new_database()
    project = tmp_path / "project"
    invoke("init", str(project), "--classes", "good,dent", "--negative-class", "good", "--database-url", url)
    application = create_app(Settings(project_dir=project, database_url=url, api_token=SecretStr(TOKEN)))
    with TestClient(application) as client:
        assert client.get("/health").status_code == 200
        application.state.engine.dispose()  # the next request needs a new connection, which the postmaster makes
        os.kill(postgres.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            health = client.get("/health")
            projects = client.get("/projects", headers={"Authorization": f"Bearer {TOKEN}"})
            waited = time.monotonic() - started
        finally:
            os.kill(postgres.pid, signal.SIGCONT)
            # run as root, the server's parent is runuser, which stops itself when its child stops (job control)
            # and would hold the fixture's shutdown: it continues the server too
            parent = int(Path(f"/proc/{postgres.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != os.getpid():
                os.kill(parent, signal.SIGCONT)
        assert (health.status_code, projects.status_code) == (503, 503)
        assert waited < 30  # the connect timeout, twice; not TCP's minutes
        assert client.get("/health").status_code == 200  # back once it answers
