"""Fixtures of the API unit tests: one hand-seeded store (see api_seed.py) shared by the read-only tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_seed import FULL_TOKEN, READ_TOKEN, SeededStore, create_seeded_store, make_settings


@pytest.fixture(scope="session")
def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> SeededStore:
    return create_seeded_store(tmp_path_factory.mktemp("api_store"))


@pytest.fixture(scope="session")
def client(seeded_store: SeededStore) -> TestClient:
    with TestClient(create_app(make_settings(seeded_store.project_dir))) as test_client:
        yield test_client


@pytest.fixture
def writable_store(seeded_store: SeededStore, tmp_path: Path) -> SeededStore:
    """A private copy of the seeded store for tests that write (the image files stay shared, read-only)."""
    shutil.copy(seeded_store.project_dir / "loop.db", tmp_path / "loop.db")
    shutil.copytree(seeded_store.project_dir / "models", tmp_path / "models")  # a copied project's model is its own copy
    return SeededStore(**{**seeded_store.__dict__, "project_dir": tmp_path, "url": f"sqlite:///{tmp_path / 'loop.db'}"})


@pytest.fixture
def read_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture
def full_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {FULL_TOKEN}"}
