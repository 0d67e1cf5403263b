"""One store holds one project: a second `loop init` (or the demo) on a store that holds a project is refused,
since every command takes the store's first project and the second would act on the first's images and rounds."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.project import open_project
from store.db import session_scope
from store.models import Project, Round

runner = CliRunner()


def init(project_dir: Path, *extra: str):  # noqa: ANN201
    return runner.invoke(app, ["init", str(project_dir), "--classes", "good,dent", "--negative-class", "good", *extra])


def test_a_second_project_on_a_store_that_holds_one_is_refused_and_nothing_is_added(tmp_path: Path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    assert init(tmp_path / "line-a", "--database-url", shared).exit_code == 0
    second = init(tmp_path / "line-b", "--database-url", shared)
    assert second.exit_code == 2
    assert "already holds project 'line-a'" in " ".join(second.output.split())
    assert not (tmp_path / "line-b" / "loop.toml").exists()
    ctx = open_project(tmp_path / "line-a")
    with session_scope(ctx.engine) as session:
        assert [p.name for p in session.scalars(select(Project))] == ["line-a"]


def test_a_store_that_already_holds_two_projects_is_named_instead_of_used(tmp_path: Path) -> None:
    # made before init refused: every command would have acted on the first project alone
    assert init(tmp_path / "line-a").exit_code == 0
    ctx = open_project(tmp_path / "line-a")
    with session_scope(ctx.engine) as session:
        session.add(Project(name="line-b", root_dir=str(tmp_path / "line-b"), classes=["good", "dent"], negative_class="good"))
    result = runner.invoke(app, ["round", "--project", str(tmp_path / "line-a")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "holds 2 projects: 'line-a'" in message and "'line-b'" in message


def test_a_folder_pointed_at_another_projects_store_is_refused_and_nothing_is_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QA: LOOP_DATABASE_URL left set from another project put this folder's ingest and round into that project, with
    # this folder's loop.toml, and nothing said so
    team = f"sqlite:///{tmp_path / 'team.db'}"
    assert init(tmp_path / "line-a", "--database-url", team).exit_code == 0
    assert init(tmp_path / "line-b").exit_code == 0  # its own SQLite store
    monkeypatch.setenv("LOOP_DATABASE_URL", team)
    for command in (["ingest", str(tmp_path / "line-b")], ["round"], ["status"]):
        result = runner.invoke(app, [*command, "--project", str(tmp_path / "line-b")])
        message = " ".join(result.output.split())
        assert result.exit_code == 2, message
        assert "loop.toml of" in message and "names project 'line-b', but the store" in message and "(LOOP_DATABASE_URL) holds project 'line-a'" in message
    monkeypatch.delenv("LOOP_DATABASE_URL")
    with session_scope(open_project(tmp_path / "line-a").engine) as session:
        assert session.scalars(select(Project.name)).all() == ["line-a"] and session.scalars(select(Round)).all() == []
    assert runner.invoke(app, ["status", "--project", str(tmp_path / "line-b")]).exit_code == 0  # its own store again
    # a loop.toml a round would refuse still names its project: status and export do not read another's record (review)
    toml = (tmp_path / "line-b" / "loop.toml").read_text()
    assert 'strategy = "default"' in toml
    (tmp_path / "line-b" / "loop.toml").write_text(toml.replace('strategy = "default"', 'strategy = "nosuch"'))
    monkeypatch.setenv("LOOP_DATABASE_URL", team)
    broken = " ".join(runner.invoke(app, ["status", "--project", str(tmp_path / "line-b")]).output.split())
    assert "names project 'line-b', but the store" in broken and "line-a: 0 images" not in broken, broken
    # no name at all in loop.toml: the store's own folder must be this one (QA: another project's record was read and exported)
    (tmp_path / "line-b" / "loop.toml").write_text("\n".join(line for line in toml.splitlines() if not line.startswith("name = ")) + "\n")
    nameless = " ".join(runner.invoke(app, ["export", str(tmp_path / "x.csv"), "--project", str(tmp_path / "line-b")]).output.split())
    assert "names no project, but the store" in nameless and not (tmp_path / "x.csv").exists(), nameless


def test_the_environment_store_does_not_collect_loop_simulates_scratch_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.config import AnnotatorConfig, ProjectConfig
    from loop.project import create_project_store

    monkeypatch.setenv("LOOP_DATABASE_URL", f"sqlite:///{tmp_path / 'team.db'}")
    run = tmp_path / "run"
    run.mkdir()
    config = ProjectConfig(name="run", classes=["good", "dent"], negative_class="good", annotator=AnnotatorConfig(backend="none"))
    url = create_project_store(run, config, database_url=f"sqlite:///{run / 'loop.db'}")
    assert url.endswith("run/loop.db") and (run / "loop.db").is_file() and not (tmp_path / "team.db").exists()


def test_a_sqlite_store_shared_by_two_folders_has_one_writer_at_a_time(tmp_path: Path) -> None:
    # a copied loop.toml naming one SQLite file: each folder's lock guards that folder only, the store's lock both
    import shutil

    from loop.project import ProjectBusy, project_lock
    from store.models import Round

    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    assert init(tmp_path / "line-a", "--database-url", shared).exit_code == 0
    (tmp_path / "line-a-elsewhere").mkdir()
    shutil.copy(tmp_path / "line-a" / "loop.toml", tmp_path / "line-a-elsewhere" / "loop.toml")
    ctx = open_project(tmp_path / "line-a")
    with session_scope(ctx.engine) as session:
        session.add(Round(project_id=session.scalars(select(Project.id)).one(), number=1, status="running"))
    with project_lock(ctx.root, action="loop round", engine=ctx.engine):
        busy = runner.invoke(app, ["round", "--project", str(tmp_path / "line-a-elsewhere")])
        assert busy.exit_code == 2 and "from another project folder" in " ".join(busy.output.split())
        with pytest.raises(ProjectBusy):
            with project_lock(tmp_path / "line-a-elsewhere", action="loop ingest", engine=open_project(tmp_path / "line-a-elsewhere").engine):
                pass
        while_held = " ".join(runner.invoke(app, ["status", "--project", str(tmp_path / "line-a-elsewhere")]).output.split())
    assert "running?" not in while_held  # it runs, from the other folder
    after = " ".join(runner.invoke(app, ["status", "--project", str(tmp_path / "line-a-elsewhere")]).output.split())
    assert "no process holds this project folder or its store" in after


def test_two_inits_that_passed_the_free_store_check_at_the_same_moment_add_one_project(tmp_path: Path) -> None:
    # the check and the row were separate transactions: two `loop init` at once both saw an empty store
    from loop.config import ConfigError, ProjectConfig
    from loop.project import add_project_row, check_store_is_free

    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    configs = {name: ProjectConfig(name=name, classes=["good", "dent"], negative_class="good") for name in ("line-a", "line-b")}
    for name, config in configs.items():
        assert check_store_is_free(tmp_path / name, config, database_url=shared) == shared
    add_project_row(shared, tmp_path / "line-a", configs["line-a"])
    with pytest.raises(ConfigError, match="already holds project 'line-a'"):
        add_project_row(shared, tmp_path / "line-b", configs["line-b"])


def test_registering_the_webhook_is_refused_while_a_round_runs_since_it_could_retire_tasks_under_it(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # `loop labelstudio webhook` may retire a Label Studio project no longer the store's, rewriting label events and
    # tasks: with a round running it is refused before Label Studio is contacted (none runs here), not run beside it
    from loop.project import project_lock

    monkeypatch.setenv("LOOP_LABELSTUDIO_WEBHOOK_SECRET", "s" * 32)
    assert init(tmp_path / "line").exit_code == 0
    ctx = open_project(tmp_path / "line")
    with project_lock(ctx.root, action="loop round", engine=ctx.engine):
        busy = runner.invoke(app, ["labelstudio", "webhook", "--project", str(tmp_path / "line"), "--url", "http://127.0.0.1:9/webhooks/labelstudio"])
    said = " ".join(busy.output.split())
    assert busy.exit_code == 2 and "loop round running as pid" in said, said
