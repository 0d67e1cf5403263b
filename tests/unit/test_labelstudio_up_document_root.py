"""`loop labelstudio up` on a data dir started before: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (or --document-root)
wins over the document root the data dir had. A QA run restarted a server with the variable set, as the push's own
warning advises: the server kept "/", the loop built links under the new root, and every image answered 404."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labeling import labelstudio_server as lss
from loop.cli import app


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict]:
    """The servers `up` would start (no Label Studio process here: what is checked is which root it is given)."""
    started: list[dict] = []

    def start_server(**options):  # noqa: ANN003, ANN202
        started.append(options)
        return lss.RunningServer(url="http://127.0.0.1:18999", token="t" * 40, pid=1, data_dir=Path(options["data_dir"]),
                                 log_path=tmp_path / "log", password=options.get("password"),
                                 document_root=lss.resolve_document_root(options.get("document_root")))

    monkeypatch.setattr(lss, "install_server", lambda **_: None)
    monkeypatch.setattr(lss, "start_server", start_server)
    monkeypatch.setattr(lss, "running_server", lambda data_dir: None)
    return started


def _stopped_earlier(data_dir: Path, root: str) -> None:
    data_dir.mkdir(parents=True)
    lss.write_state(lss.RunningServer(url="http://127.0.0.1:18999", token="s" * 40, pid=1, data_dir=data_dir, log_path=data_dir / "log",
                                      password="pw", document_root=root))


def test_a_restart_takes_the_document_root_from_the_environment_or_the_option(launches, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    data_dir, images = tmp_path / "lsdata", tmp_path / "images"
    _stopped_earlier(data_dir, "/")
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(images))
    result = CliRunner().invoke(app, ["labelstudio", "up", "--data-dir", str(data_dir), "--port", "18999"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert launches[-1]["document_root"] == str(images) and launches[-1]["token"] == "s" * 40  # the token stays the data dir's
    assert f"images served from: {images}" in result.output

    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    lss.labelstudio_up(data_dir=data_dir)  # nothing asked: the data dir's own root
    assert launches[-1]["document_root"] == "/"
    project_dir = tmp_path / "project"
    assert CliRunner().invoke(app, ["init", str(project_dir), "--classes", "good,bad", "--negative-class", "good"]).exit_code == 0
    other = tmp_path / "other"
    result = CliRunner().invoke(app, ["labelstudio", "up", "--data-dir", str(data_dir), "--document-root", str(other), "--project", str(project_dir)])
    assert result.exit_code == 0, result.output
    assert launches[-1]["document_root"] == str(other)
    from loop.config import load_config

    assert load_config(project_dir).annotator.labelstudio_document_root == str(other)  # the loop's links match the server


def test_a_server_already_running_on_another_root_is_named(launches, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    data_dir = tmp_path / "lsdata"
    running = lss.RunningServer(url="http://127.0.0.1:18999", token="s" * 40, pid=1, data_dir=data_dir, log_path=tmp_path / "log", document_root="/")
    monkeypatch.setattr(lss, "running_server", lambda data_dir: dataclasses.replace(running))
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "images"))
    result = CliRunner().invoke(app, ["labelstudio", "up", "--data-dir", str(data_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and not launches
    assert "already running" in result.output and "runs with another document root" in " ".join(result.output.split())
