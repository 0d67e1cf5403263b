"""Starting and stopping a real uvicorn server (its own process, 127.0.0.1, a free port) for the API integration tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from api.sample_data import SampleProject

FULL_TOKEN = "integration-full-token"
READ_TOKEN = "integration-read-token"
WEBHOOK_SECRET = "integration-hook-secret"
SAMPLE_ROUNDS = 6


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    project_dir: Path
    sample: SampleProject


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(project_dir: Path, port: int, log_path: Path, **settings: str) -> subprocess.Popen:
    """uvicorn over create_app; `settings` are more LOOP_* variables (max_upload_bytes="1000" sets LOOP_MAX_UPLOAD_BYTES)."""
    env = {**os.environ, "LOOP_PROJECT_DIR": str(project_dir), "LOOP_API_TOKEN": FULL_TOKEN, "LOOP_API_READ_TOKEN": READ_TOKEN,
           "LOOP_LABELSTUDIO_WEBHOOK_SECRET": WEBHOOK_SECRET, "OMP_NUM_THREADS": "1",
           **{f"LOOP_{name.upper()}": value for name, value in settings.items()}}
    env.pop("LOOP_DATABASE_URL", None)
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def wait_until_healthy(base_url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API server exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API server did not answer /health within {timeout_s} s:\n{log_path.read_text(errors='replace')}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
