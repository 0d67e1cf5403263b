"""Options `loop round` is given are checked before the round starts, and an empty one is not loop.toml's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app
from tests.unit.manifests import init_good_scratch_project


@pytest.mark.parametrize(("option", "said"), [("--train", "unknown training strategy ''"), ("--annotator", "unknown annotator backend ''")])
def test_an_empty_option_is_refused_not_replaced_by_loop_toml(tmp_path: Path, option: str, said: str) -> None:
    # QA: `loop round --train ""` ran loop.toml's strategy as if no option had been given
    project = tmp_path / "p"
    init_good_scratch_project(project)
    result = CliRunner().invoke(app, ["round", "--project", str(project), option, ""])
    assert result.exit_code != 0 and said in " ".join(result.output.split()), result.output
    status = CliRunner().invoke(app, ["status", "--project", str(project), "--json"])
    assert json.loads(status.output)["rounds"] == []  # refused before a round was recorded


def test_a_round_that_could_not_write_its_files_stops_before_anything_is_recorded(tmp_path: Path) -> None:
    # QA: with artifacts/ read-only the round trained, failed writing its model minutes in, and its failure handler made
    # the folder again, raised, and left the round "running". (Root ignores file modes: a file in the folder's place
    # stands in for a folder this user cannot write.)
    project = tmp_path / "p"
    init_good_scratch_project(project)
    shutil.rmtree(project / "artifacts", ignore_errors=True)
    (project / "artifacts").write_text("not a folder")
    result = CliRunner().invoke(app, ["round", "--project", str(project)])
    assert result.exit_code == 2 and f"cannot write in {project / 'artifacts'}" in " ".join(result.output.split()), result.output
    assert json.loads(CliRunner().invoke(app, ["status", "--project", str(project), "--json"]).output)["rounds"] == []
