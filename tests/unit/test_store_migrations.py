"""A project made by an older defect-loop keeps working: opening it brings the schema to head, data intact."""
from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from alembic import command
from loop.cli import app
from loop.project import open_project
from store.db import ALEMBIC_DIR


def test_opening_a_project_at_revision_0001_adds_the_part_column_and_keeps_rows(tmp_path: Path) -> None:
    project_dir = tmp_path / "old"
    assert CliRunner().invoke(app, ["init", str(project_dir), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    url = f"sqlite:///{project_dir / 'loop.db'}"
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.downgrade(config, "0001")  # as a project created before images.part existed
    engine = create_engine(url)
    assert "part" not in {c["name"] for c in inspect(engine).get_columns("images")}
    with engine.begin() as connection:
        assert connection.execute(text("select count(*) from projects")).scalar() == 1
    engine.dispose()

    ctx = open_project(project_dir)
    assert "part" in {c["name"] for c in inspect(ctx.engine).get_columns("images")}
    with ctx.engine.begin() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() == "0002"
        assert connection.execute(text("select count(*) from projects")).scalar() == 1
