"""Shared fixtures: small synthetic datasets written in the real on-disk layouts, and fresh projects."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from loop.synthetic_images import write_class_folders

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

# Tests must not fight over 2 cores with oversubscribed BLAS pools.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (it lives in ../shared/datasets beside the repo, never in it)")
    return path


@pytest.fixture
def real_dataset():
    """real_dataset("neu") -> path, or the test is skipped with the reason."""
    return shared_dataset


@pytest.fixture
def oracle_manifests(class_folders: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(truth.csv: every class_folders image's class, for the oracle; labels.csv: the same with every fourth label
    left empty, to ingest)."""
    files = sorted(class_folders.rglob("*.png"))
    truth, manifest = tmp_path / "truth.csv", tmp_path / "labels.csv"
    with open(truth, "w", newline="") as t, open(manifest, "w", newline="") as m:
        tw, mw = csv.writer(t), csv.writer(m)
        tw.writerow(["path", "label"])
        mw.writerow(["path", "label"])
        for i, path in enumerate(files):
            tw.writerow([str(path), path.parent.name])
            mw.writerow([str(path), path.parent.name if i % 4 != 0 else ""])
    return truth, manifest


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """<tmp>/parts/<class>/*.png with a good majority and a rare defect class."""
    root = tmp_path / "parts"
    write_class_folders(root, per_class={"good": 40, "scratch": 12, "spot": 12, "patch": 6}, size=64, seed=1)
    return root


@pytest.fixture
def new_project(tmp_path: Path):
    """A fresh initialised project (loop init through the CLI's code path), classes of the class_folders fixture."""
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.project import open_project

    project_dir = tmp_path / "project"
    result = CliRunner().invoke(app, ["init", str(project_dir), "--classes", "good,scratch,spot,patch", "--negative-class", "good"])
    assert result.exit_code == 0, result.output
    return open_project(project_dir)


def _upgrade_after(barrier, url: str, results) -> None:  # noqa: ANN001 - multiprocessing objects
    from store.db import upgrade_schema

    barrier.wait()
    try:
        upgrade_schema(url)
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - the test shows what went wrong
        results.put(f"{type(error).__name__}: {str(error).splitlines()[0]}")


@pytest.fixture
def upgrade_at_once():
    """upgrade_at_once(url, n) -> what each of n processes got from upgrade_schema(url) when all started at one moment
    ("ok", or the error): commands opening one store at the same time (forked: the test's modules are loaded)."""
    import multiprocessing

    def run(url: str, n: int) -> list[str]:
        context = multiprocessing.get_context("fork")
        barrier, results = context.Barrier(n), context.Queue()
        processes = [context.Process(target=_upgrade_after, args=(barrier, url, results)) for _ in range(n)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        return sorted(outcomes)

    return run


@pytest.fixture
def reads_see_one_moment():
    """reads_see_one_moment(url, project_id) -> (rounds counted by an API request's session before, after another
    connection committed a round meanwhile, by a request started after it): the API's reads must see one moment."""

    def check(url: str, project_id: int) -> tuple[int, int, int]:
        from types import SimpleNamespace

        from sqlalchemy import func, select
        from sqlalchemy.orm import sessionmaker

        from api.dependencies import get_session
        from store.db import create_db_engine, session_scope
        from store.models import Round

        engine = create_db_engine(url)
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(session_factory=sessionmaker(engine))))
        try:
            counted = []
            sessions = get_session(request)
            session = next(sessions)
            counted.append(session.scalar(select(func.count(Round.id))))
            with session_scope(engine) as writer:  # a round finishing while the request reads
                number = writer.scalar(select(func.max(Round.number)).where(Round.project_id == project_id)) or 0
                writer.add(Round(project_id=project_id, number=number + 1, status="completed"))
            counted.append(session.scalar(select(func.count(Round.id))))
            sessions.close()
            later = get_session(request)
            counted.append(next(later).scalar(select(func.count(Round.id))))
            later.close()
            return counted[0], counted[1], counted[2]
        finally:
            engine.dispose()

    return check
