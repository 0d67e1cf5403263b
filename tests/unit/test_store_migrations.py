"""A project made by an older defect-loop keeps working: opening it brings the schema to head, data intact."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from alembic import command
from loop.cli import app
from loop.project import open_project
from store.db import alembic_config


def test_opening_a_project_at_revision_0001_adds_the_part_column_and_keeps_rows(tmp_path: Path, class_folders: Path) -> None:
    project_dir = tmp_path / "old"
    classes = ",".join(sorted(d.name for d in class_folders.iterdir()))
    assert CliRunner().invoke(app, ["init", str(project_dir), "--classes", classes, "--negative-class", "good"]).exit_code == 0
    assert CliRunner().invoke(app, ["ingest", str(class_folders), "--project", str(project_dir)]).exit_code == 0
    url = f"sqlite:///{project_dir / 'loop.db'}"
    config = alembic_config(url)
    command.downgrade(config, "0001")  # as a project created before images.part existed
    engine = create_engine(url)
    assert "part" not in {c["name"] for c in inspect(engine).get_columns("images")}
    with engine.begin() as connection:
        assert connection.execute(text("select count(*) from projects")).scalar() == 1
        splits_before = dict(connection.execute(text("select sha256, split from images")).all())
    assert len(splits_before) == 70
    engine.dispose()

    ctx = open_project(project_dir)
    assert "part" in {c["name"] for c in inspect(ctx.engine).get_columns("images")}
    assert "related_image_id" in {c["name"] for c in inspect(ctx.engine).get_columns("label_issues")}
    with ctx.engine.begin() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() == "0007"
        assert connection.execute(text("select count(*) from projects")).scalar() == 1
        assert dict(connection.execute(text("select sha256, split from images")).all()) == splits_before
        assert connection.execute(text("select count(*) from images where part is not null")).scalar() == 0


def test_the_api_over_an_older_store_upgrades_it_instead_of_failing_on_images(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.app import create_app
    from api.settings import Settings

    project_dir = tmp_path / "old"
    assert CliRunner().invoke(app, ["init", str(project_dir), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    url = f"sqlite:///{project_dir / 'loop.db'}"
    config = alembic_config(url)
    command.downgrade(config, "0001")
    with TestClient(create_app(Settings(project_dir=project_dir, api_token=SecretStr("t" * 32)))) as client:
        response = client.get("/images/1", headers={"Authorization": "Bearer " + "t" * 32})
    assert response.status_code == 404  # looked up (no such image), not a 500 from a missing column


def test_the_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from store.models import Base

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    config = alembic_config(url)
    command.upgrade(config, "head")
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_commands_opening_a_new_store_at_the_same_moment_upgrade_it_once_without_errors(tmp_path: Path, upgrade_at_once) -> None:  # noqa: ANN001
    # two `loop init` on one database_url, or a round and `loop serve` after an upgrade of defect-loop: without the
    # schema lock each created the tables ("table alembic_version already exists") or stepped one revision twice
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert upgrade_at_once(url, 4) == ["ok"] * 4
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalars().all() == ["0007"]
    assert {"projects", "images", "rounds", "label_events"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def _connect_after(barrier, url: str, results) -> None:  # noqa: ANN001 - multiprocessing objects
    from store.db import create_db_engine

    engine = create_db_engine(url)
    barrier.wait()
    try:
        with engine.connect():
            results.put("ok")
    except Exception as error:  # noqa: BLE001 - the test shows what went wrong
        results.put(f"{type(error).__name__}: {str(error).splitlines()[0]}")
    finally:
        engine.dispose()


def test_processes_connecting_first_to_a_new_sqlite_store_at_one_moment_all_get_in(tmp_path: Path) -> None:
    # Switching a new file to WAL takes SQLite's write lock; a connection that holds its read lock meanwhile gets
    # "database is locked" at once, without its busy timeout (SQLite's deadlock rule). Before the retry this failed
    # in about 1 of 12 starts of 4 processes here, and once in CI as a failed `loop init` of a shared store.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failures = []
    for trial in range(60):
        url = f"sqlite:///{tmp_path / f'new{trial}.db'}"
        barrier, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_connect_after, args=(barrier, url, results)) for _ in range(4)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        failures += [outcome for outcome in outcomes if outcome != "ok"]
    assert failures == []


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _old_project(tmp_path: Path, class_folders: Path, revision: str = "0002", name: str = "old") -> Path:
    """A project whose store is at an older schema revision, as an older defect-loop left it."""
    project_dir = tmp_path / name
    classes = ",".join(sorted(d.name for d in class_folders.iterdir()))
    assert CliRunner().invoke(app, ["init", str(project_dir), "--classes", classes, "--negative-class", "good"]).exit_code == 0
    assert CliRunner().invoke(app, ["ingest", str(class_folders), "--project", str(project_dir), "--quiet"]).exit_code == 0
    command.downgrade(alembic_config(f"sqlite:///{project_dir / 'loop.db'}"), revision)
    return project_dir


def _revision(project_dir: Path, name: str = "loop.db") -> str:
    engine = create_engine(f"sqlite:///{project_dir / name}")
    with engine.begin() as connection:
        revision = connection.execute(text("select version_num from alembic_version")).scalar()
    engine.dispose()
    return revision


def test_an_older_store_is_copied_before_its_upgrade_and_the_upgrade_is_said(tmp_path: Path, class_folders: Path) -> None:
    # QA: `loop status` upgraded a teammate's store for good, silently, without a copy; their older release then crashed
    project_dir = _old_project(tmp_path, class_folders)
    result = CliRunner().invoke(app, ["status", "--project", str(project_dir), "--json"])
    assert result.exit_code == 0, result.output
    backup = project_dir / "loop.db.schema-0002.bak"
    said = " ".join(result.stderr.split())
    assert f"note: upgraded the store at sqlite:///{project_dir / 'loop.db'} from schema 0002 to {_head()}" in said, said
    assert "releases before it can no longer open it" in said and f"Its copy from before: {backup}" in said
    assert (_revision(project_dir), _revision(project_dir, backup.name)) == (_head(), "0002")
    assert sorted(p.name for p in project_dir.glob("*.bak*")) == [backup.name]  # no partial copy left beside it
    again = CliRunner().invoke(app, ["status", "--project", str(project_dir), "--json"])
    assert again.exit_code == 0 and "upgraded" not in again.stderr  # at head: nothing to say, nothing copied


def test_a_store_rolled_back_to_its_copy_and_written_since_is_copied_again_and_the_upgrade_said(tmp_path: Path, class_folders: Path) -> None:
    # QA: upgraded, rolled back to the copy, written by the older release, upgraded again: silent, and the only copy
    # was the stale one from the first upgrade
    import shutil

    upgraded = _old_project(tmp_path, class_folders)
    assert CliRunner().invoke(app, ["status", "--project", str(upgraded)]).exit_code == 0
    # the rollback, as the README says: every loop command stopped, the copy put in place without the upgraded store's
    # log (loop.db-wal would be replayed over it; review)
    project_dir = tmp_path / "rolled-back"
    shutil.copytree(upgraded, project_dir, ignore=shutil.ignore_patterns("loop.db", "loop.db-wal", "loop.db-shm"))
    first_copy = project_dir / "loop.db.schema-0002.bak"
    shutil.copyfile(first_copy, project_dir / "loop.db")
    engine = create_engine(f"sqlite:///{project_dir / 'loop.db'}")
    with engine.begin() as connection:  # the older release goes on writing
        connection.execute(text("update images set split = case when split = 'train' then 'validation' else 'train' end where id = (select min(id) from images)"))
    engine.dispose()
    result = CliRunner().invoke(app, ["status", "--project", str(project_dir)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and "releases before it can no longer open it" in said, said
    copies = sorted(project_dir.glob("loop.db.schema-0002.*bak"))
    assert len(copies) == 2 and first_copy in copies and f"Its copy from before: {copies[0] if copies[1] == first_copy else copies[1]}" in said
    assert [_revision(project_dir, copy.name) for copy in copies] == ["0002", "0002"]


def test_two_commands_upgrading_at_once_make_one_copy(tmp_path: Path, class_folders: Path) -> None:
    # review: the copy's staleness was read off file times, and another command's upgrade connection touches loop.db-wal
    # before it changes anything: a second copy and a second note
    from store.db import _copy_before_upgrade

    project_dir = _old_project(tmp_path, class_folders)
    store_file = project_dir / "loop.db"
    first = _copy_before_upgrade(f"sqlite:///{store_file}", store_file, {"0002"}, {_head()})
    assert first is not None and _copy_before_upgrade(f"sqlite:///{store_file}", store_file, {"0002"}, {_head()}) is None
    assert sorted(p.name for p in project_dir.glob("*.bak")) == [first.name]


def test_the_copy_before_an_upgrade_holds_the_store_when_its_folder_has_a_hash_in_its_name(tmp_path: Path, class_folders: Path) -> None:
    # review: the copy read "file:.../line#2/loop.db" as a URI; SQLite cut the path at '#' and copied an empty database
    project_dir = _old_project(tmp_path, class_folders, name="line#2 50%")
    assert CliRunner().invoke(app, ["status", "--project", str(project_dir)]).exit_code == 0
    backup = create_engine(f"sqlite:///{project_dir / 'loop.db.schema-0002.bak'}")
    with backup.begin() as connection:
        assert connection.execute(text("select count(*) from images")).scalar() == 70
    backup.dispose()
    assert not (tmp_path / "line").exists()


def test_an_older_store_is_not_upgraded_while_a_round_holds_its_project(tmp_path: Path, class_folders: Path) -> None:
    # QA: refused as busy, "nothing was changed", while the store had been upgraded under the running (older) round
    import os

    project_dir = _old_project(tmp_path, class_folders)
    (project_dir / ".loop.lock").write_text(f"loop round running as pid {os.getpid()}")
    result = CliRunner().invoke(app, ["round", "--project", str(project_dir), "--quiet"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"needs a schema upgrade (0002 to {_head()})" in said and "nothing was changed" in said, said
    assert _revision(project_dir) == "0002" and not list(project_dir.glob("*.bak"))


def test_a_store_from_a_newer_release_is_one_line_not_a_traceback(tmp_path: Path, class_folders: Path) -> None:
    project_dir = _old_project(tmp_path, class_folders, revision="head")
    engine = create_engine(f"sqlite:///{project_dir / 'loop.db'}")
    with engine.begin() as connection:
        connection.execute(text("update alembic_version set version_num = '0099'"))
    engine.dispose()
    result = CliRunner().invoke(app, ["status", "--project", str(project_dir)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said, said
    assert f"made or upgraded by a newer defect-loop (schema 0099; this release knows up to {_head()})" in said and "nothing was changed" in said


def test_a_command_that_finds_the_store_upgraded_meanwhile_copies_nothing(tmp_path: Path, class_folders: Path) -> None:
    # review: two commands read the old revision at once; the second copied after the first had upgraded, and its
    # "copy from before" held the new schema
    from store.db import _copy_before_upgrade

    project_dir = _old_project(tmp_path, class_folders, revision="head")  # upgraded by the other command already
    store_file = project_dir / "loop.db"
    assert _copy_before_upgrade(f"sqlite:///{store_file}", store_file, {"0002"}, {_head()}) is None
    assert not list(project_dir.glob("*.bak*")) and not list(project_dir.glob(".*partial*"))
