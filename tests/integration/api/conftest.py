"""A real uvicorn server over a sample store with six rounds, shared by the API integration tests."""
from __future__ import annotations

import pytest

from api.sample_data import create_sample_store
from api_live import SAMPLE_ROUNDS, LiveServer, free_port, start_server, stop_server, wait_until_healthy


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    project_dir = tmp_path_factory.mktemp("api_live")
    sample = create_sample_store(project_dir, n_rounds=SAMPLE_ROUNDS, n_images=120, name="bottle-line")
    port = free_port()
    log_path = project_dir / "server.log"
    process = start_server(project_dir, port, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, log_path)
        yield LiveServer(base_url=base_url, project_dir=project_dir, sample=sample)
    finally:
        stop_server(process)
