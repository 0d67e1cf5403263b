"""labeling.labelstudio_server: `loop labelstudio up` finds a running server; busy ports are never silently swapped."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from labeling import labelstudio_server as lss

pytestmark = pytest.mark.labelstudio


def _busy_port_with_a_free_successor() -> socket.socket:
    """A listening socket on some port P whose P+1 is free right now: Label Studio is to move there. Any ephemeral
    port will not do; a CI run failed once because P+1 belonged to another connection."""
    for _ in range(100):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        try:
            with socket.socket() as successor:
                successor.bind(("127.0.0.1", taken.getsockname()[1] + 1))
        except OSError:
            taken.close()
            continue
        taken.listen()
        return taken
    raise RuntimeError("no port P with P+1 free in 100 tries")


def test_labelstudio_up_returns_the_server_already_running_for_the_data_dir(labelstudio) -> None:
    server = lss.labelstudio_up(data_dir=labelstudio.server.data_dir, port=labelstudio.server.port + 7)
    assert server.already_running
    assert (server.url, server.pid, server.token) == (labelstudio.url, labelstudio.server.pid, labelstudio.token)
    assert lss.health_ok(server.url) and lss.installed_version() == lss.LABEL_STUDIO_VERSION
    state = (labelstudio.server.data_dir / lss.STATE_FILE_NAME)
    assert oct(state.stat().st_mode & 0o777) == "0o600"  # it holds the admin token


def test_start_refuses_a_busy_port_and_detects_label_studio_moving_silently(labelstudio, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(lss.LabelStudioServerError, match=f"port {labelstudio.server.port} .* already in use"):
        lss.start_server(data_dir=tmp_path / "busy", port=labelstudio.server.port)
    assert not (tmp_path / "busy" / lss.LOG_FILE_NAME).exists()  # refused before anything started

    # Past our own check (a race), Label Studio itself would move to PORT+1 without a word: caught from its log.
    with _busy_port_with_a_free_successor() as taken:
        port = taken.getsockname()[1]
        monkeypatch.setattr(lss, "port_is_free", lambda *_args, **_kwargs: True)
        template = lss.default_template_path()
        with pytest.raises(lss.LabelStudioServerError, match=rf"port {port} was taken, so Label Studio silently moved to {port + 1}"):
            lss.start_server(data_dir=tmp_path / "moved", port=port, template=template if template.exists() else None)
    log = (tmp_path / "moved" / lss.LOG_FILE_NAME).read_text()
    assert f"Starting development server at http://127.0.0.1:{port + 1}/" in log
    assert list(lss._CHILDREN) == [labelstudio.server.pid]  # the moved server was stopped (by its pid)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port + 1)) != 0
