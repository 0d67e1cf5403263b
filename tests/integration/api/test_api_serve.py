"""api.app.serve: a real server on 127.0.0.1 that prints its URLs; with no token configured it makes one per run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

from api_live import LiveServer, free_port, stop_server


def test_serve_prints_urls_and_generated_tokens(live_server: LiveServer, tmp_path) -> None:  # noqa: ANN001
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOOP_")}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", f"from api.app import serve; serve({str(live_server.project_dir)!r}, '127.0.0.1', {port}, log_level='warning')"],
            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        output = ""
        while time.monotonic() < deadline and "read-only:" not in output:
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)
            output = log_path.read_text()
        dashboard = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/dashboard\?token=(\S+))", output)
        full = re.search(r"full access: (\S+)", output)
        assert dashboard and full, output
        read_token = dashboard.group(2)
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(dashboard.group(1), timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/projects", headers={"Authorization": f"Bearer {read_token}"}).json()["total"] == 1
        assert httpx.get(f"http://127.0.0.1:{port}/projects").status_code == 401
        assert read_token != full.group(1)
    finally:
        stop_server(process)
