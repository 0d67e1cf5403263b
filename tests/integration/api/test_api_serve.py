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


def test_a_chunked_upload_is_capped_while_read_and_the_connection_serves_on(live_server: LiveServer) -> None:
    # without Content-Length, the size check on the headers passed any body: it is now counted as uvicorn hands it over
    # message by message, so a body over the cap (1 file of 100 KB: 165,536 bytes) is a 413 before the end of it
    from api_live import FULL_TOKEN, start_server, wait_until_healthy

    port = free_port()
    log_path = live_server.project_dir / "capped.log"
    process = start_server(live_server.project_dir, port, log_path, max_upload_bytes="100000", max_upload_files="1")
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, log_path)

        def multipart(n_chunks: int):  # noqa: ANN202 - a well-formed multipart body, sent in 32 KB chunks one by one
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
            for _ in range(n_chunks):
                time.sleep(0.02)  # each its own message at the server: no single one is over the cap, only their sum
                yield b"\0" * 32768
            yield b"\r\n--b--\r\n"

        with httpx.Client(base_url=base_url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {FULL_TOKEN}", "Content-Type": "multipart/form-data; boundary=b"}
            capped = client.post("/predict", content=multipart(64), headers=headers)
            assert capped.status_code == 413 and "request body larger than the limit of 165536 bytes" in capped.json()["detail"]
            assert client.get("/health").status_code == 200
            small = client.post("/predict", content=multipart(1), headers=headers)  # under the cap: read to its end
            assert small.status_code == 422 and "big.png" in small.json()["detail"], small.text
        assert "Traceback" not in log_path.read_text()
    finally:
        stop_server(process)
