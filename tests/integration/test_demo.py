"""The README's first command, `loop demo`, end to end at a smaller size (the full default is checked by hand)."""
from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.project import open_project
from store import session_scope
from store.models import Round

runner = CliRunner()


def test_demo_runs_rounds_records_them_and_writes_plots(tmp_path: Path) -> None:
    project = tmp_path / "demo-project"
    result = runner.invoke(app, ["demo", "--project", str(project), "--images", "200", "--rounds", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "gates on the frozen test split" in output and "loop status --project" in output
    # the planted wrong labels that landed in the test split are counted there, and said (QA: they were the demo's
    # only test errors, and nothing pointed at them)
    import re

    planted = int(re.search(r"(\d+) of the given labels are wrong on purpose", output).group(1))
    in_test = re.search(r"(\d+) of the (\d+) wrong labels are in the frozen test split", output)
    assert in_test is not None and int(in_test.group(2)) == planted and 0 < int(in_test.group(1)) <= planted, output
    # moved as a whole, the demo's oracle and manifest still work (QA: both named the old folder)
    config = (project / "loop.toml").read_text()
    assert 'oracle_manifest = "data/ground_truth.csv"' in config and "images/" in (project / "data" / "labels.csv").read_text().splitlines()[1]
    status = runner.invoke(app, ["status", "--project", str(project), "--json"], catch_exceptions=False)
    report = json.loads(status.output)
    assert [r["number"] for r in report["rounds"]] == [1, 2]
    assert all(r["status"] == "completed" for r in report["rounds"])
    assert report["labels"]["by_source"]["oracle"] > 0  # round 2 pulled the oracle's answers to round 1's batch
    choice = report["rounds"][-1]["threshold_choice"]  # where the threshold came from, and the loop's own estimate there
    assert choice["source"] in ("validation", "out_of_fold") and choice["n_negatives"] > 0
    assert set(choice["estimated_metrics"]) == {"macro_f1", "defect_recall", "negative_fpr"}
    assert (project / "artifacts" / "gates_over_rounds.png").read_bytes()[:4] == b"\x89PNG"  # the latest
    # each round's record points to its own picture of the gates so far, not to one file every round overwrites
    with session_scope(open_project(project).engine) as session:
        pictures = [Path(r.artifacts["gates_png"]) for r in session.scalars(select(Round).order_by(Round.number))]
    assert len(set(pictures)) == len(pictures) and all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)
    assert pictures[-1].read_bytes() == (project / "artifacts" / "gates_over_rounds.png").read_bytes()
    # A second demo into the same folder is refused, not merged into the first.
    again = runner.invoke(app, ["demo", "--project", str(project), "--images", "200", "--rounds", "1"])
    assert again.exit_code != 0 and "is a project already" in " ".join(again.output.split())
