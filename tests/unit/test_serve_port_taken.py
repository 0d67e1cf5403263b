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


def test_a_port_out_of_range_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    # QA: --port 70000 ended in OverflowError from bind(); --port 0 printed URLs with :0, never the port it bound
    project = tmp_path / "project"
    assert runner.invoke(app, ["init", str(project), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    for port in ("70000", "-5", "0"):
        result = runner.invoke(app, ["serve", "--project", str(project), "--port", port])
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "Invalid value for '--port'" in said and ("65535" in said or "greater than or equal to 1" in said), result.output


def test_a_bad_setting_in_the_environment_is_one_line_naming_the_variable(new_project, monkeypatch) -> None:  # noqa: ANN001
    # QA: LOOP_MAX_UPLOAD_PIXELS=abc gave pydantic's multi-line block naming the field max_upload_pixels
    from typer.testing import CliRunner

    from loop.cli import app

    monkeypatch.setenv("LOOP_MAX_UPLOAD_PIXELS", "abc")
    result = CliRunner().invoke(app, ["serve", "--project", str(new_project.root), "--port", "1"])
    assert result.exit_code == 2
    assert result.output.startswith("error: LOOP_MAX_UPLOAD_PIXELS='abc': Input should be a valid integer") and "max_upload_pixels" not in result.output


def test_the_same_value_for_both_tokens_is_refused_without_echoing_it(new_project, monkeypatch) -> None:  # noqa: ANN001
    # QA: accepted, so the read-only token in the dashboard URL people share gave full access (/predict)
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # were it taken, the test would not serve for good
    monkeypatch.setenv("LOOP_API_TOKEN", "same-value-4711")
    monkeypatch.setenv("LOOP_API_READ_TOKEN", "same-value-4711")
    result = runner.invoke(app, ["serve", "--project", str(new_project.root), "--port", "65000"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "LOOP_API_READ_TOKEN: the read-only token equals LOOP_API_TOKEN" in said, said
    assert "same-value-4711" not in said


def test_serving_on_every_interface_prints_urls_a_browser_can_open_and_says_it_listens_everywhere(new_project, monkeypatch) -> None:  # noqa: ANN001
    # QA: the printed URLs said http://0.0.0.0:P, which no browser opens, and nothing said the API listened on every interface
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = runner.invoke(app, ["serve", "--project", str(new_project.root), "--host", "0.0.0.0", "--port", str(port)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert f"dashboard: http://{socket.gethostname()}:{port}/dashboard?token=" in said and "0.0.0.0" not in said
    assert "listening on every network interface, over plain HTTP" in said
    assert "only LOOP_API_TOKEN is set" not in said  # tokens made for the run: a read-only one among them
    monkeypatch.setenv("LOOP_API_TOKEN", "only-the-full-one")
    full_only = " ".join(runner.invoke(app, ["serve", "--project", str(new_project.root), "--host", "0.0.0.0", "--port", str(port)]).output.split())
    assert "only LOOP_API_TOKEN is set, so the dashboard URL below carries the full-access token" in full_only  # QA
    # on loopback too: the URL gets shared through a tunnel or a screenshot (QA, a newcomer: no word on the terminal)
    local_full_only = " ".join(runner.invoke(app, ["serve", "--project", str(new_project.root), "--port", str(port)]).output.split())
    assert "only LOOP_API_TOKEN is set, so the dashboard URL below carries the full-access token" in local_full_only
    monkeypatch.delenv("LOOP_API_TOKEN")
    local = runner.invoke(app, ["serve", "--project", str(new_project.root), "--port", str(port)])
    assert "listening on" not in local.output and f"http://127.0.0.1:{port}/dashboard" in local.output
