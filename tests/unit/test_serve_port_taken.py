"""`loop serve` on a port another program listens on: one line naming the address, before any URL or token."""
from __future__ import annotations

import socket
from pathlib import Path

from typer.testing import CliRunner

from loop.cli import app

runner = CliRunner()


def test_a_taken_port_is_refused_before_the_urls_and_tokens_are_printed(tmp_path: Path) -> None:
    # it printed the dashboard URL and this run's tokens, then uvicorn failed to bind (exit 3)
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--project", str(project), "--port", str(port)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in said and "give --port" in said, result.output
    assert "dashboard" not in said and "tokens for this run" not in said
