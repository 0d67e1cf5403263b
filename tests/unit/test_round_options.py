"""Options `loop round` is given are checked before the round starts, and an empty one is not loop.toml's."""
from __future__ import annotations

import json
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
