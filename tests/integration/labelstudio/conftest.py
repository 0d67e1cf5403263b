"""A real Label Studio (the pinned server in its own venv) on a free loopback port, shared by these tests.

Missing server venv: skipped with the reason, unless DEFECT_LOOP_REQUIRE_LABELSTUDIO is set (CI sets it),
then a failure. Install it with `bash .ci/install_labelstudio.sh`.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio
from PIL import Image as PILImage

from labeling import labelstudio_server as lss
from labeling.base import TaskRequest
from labeling.labelstudio_backend import LabelStudioBackend
from store import create_db_engine, session_scope, upgrade_schema
from store.models import Image, IngestBatch, LabelEvent, Project, Round

from labelstudio_harness import ANNOTATOR_A, ANNOTATOR_B, CLASSES, COLORS, DESCRIPTIONS, REPORT_LINES, TIMINGS

_TIMINGS = TIMINGS


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    if not TIMINGS and not REPORT_LINES:
        return
    terminalreporter.section("Label Studio")
    for key, value in TIMINGS.items():
        terminalreporter.write_line(f"{key}: {value}")
    for line in REPORT_LINES:
        terminalreporter.write_line(line)


@dataclass
class LabelStudioInstance:
    """The running server plus what the tests need to act as its users."""

    server: lss.RunningServer
    document_root: Path
    annotator_tokens: dict[str, str] = field(default_factory=dict)
    restarts: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.token

    def admin(self) -> LabelStudio:
        return LabelStudio(base_url=self.url, api_key=self.token)

    def as_annotator(self, email: str) -> LabelStudio:
        return LabelStudio(base_url=self.url, api_key=self.annotator_tokens[email])

    def restart(self) -> float:
        """Stop (SIGTERM) and start again on the same port and data dir; returns the start time in seconds."""
        lss.stop_server(self.server)
        started = time.monotonic()
        self.server = lss.start_server(
            data_dir=self.server.data_dir, port=self.server.port, username=self.server.username,
            password=self.server.password, token=self.server.token, document_root=self.server.document_root,
        )  # fmt: skip
        self.restarts += 1
        elapsed = time.monotonic() - started
        _TIMINGS[f"restart {self.restarts} (existing data dir)"] = f"{elapsed:.1f} s"
        return elapsed


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory) -> LabelStudioInstance:
    venv = lss.default_venv_dir()
    if lss.installed_version(venv) != lss.LABEL_STUDIO_VERSION:
        reason = (
            f"Label Studio {lss.LABEL_STUDIO_VERSION} is not installed in {venv}: run `bash .ci/install_labelstudio.sh` "
            "(or set DEFECT_LOOP_LABELSTUDIO_VENV)"
        )
        if os.environ.get("DEFECT_LOOP_REQUIRE_LABELSTUDIO"):
            pytest.fail(reason + " [DEFECT_LOOP_REQUIRE_LABELSTUDIO is set]", pytrace=False)
        pytest.skip(reason)
    # Images live under pytest's base temp dir; it is the server's document root, so nothing else is served.
    document_root = tmp_path_factory.getbasetemp()
    data_dir = tmp_path_factory.mktemp("labelstudio-data")
    template = lss.default_template_path()
    started = time.monotonic()
    server = lss.start_server(
        data_dir=data_dir, port=lss.free_port(), document_root=str(document_root),
        template=template if template.exists() else None, timeout_s=300,
    )  # fmt: skip
    _TIMINGS["server start (" + ("pre-migrated template" if template.exists() else "fresh data dir, migrations") + ")"] = (
        f"{time.monotonic() - started:.1f} s"
    )
    instance = LabelStudioInstance(server=server, document_root=document_root)
    try:
        started = time.monotonic()
        for email in (ANNOTATOR_A, ANNOTATOR_B):
            token = secrets.token_hex(20)
            # "-" first on purpose: token_urlsafe gives that 1 time in 64, and add_user once failed CI on it
            lss.add_user(data_dir=data_dir, username=email, password="-" + secrets.token_urlsafe(12), token=token)
            instance.annotator_tokens[email] = token
        _TIMINGS["two annotator users added"] = f"{time.monotonic() - started:.1f} s"
        yield instance
    finally:
        lss.stop_server(instance.server)


@dataclass
class StoreWithImages:
    url: str
    engine: object
    project_id: int
    project_name: str
    round_ids: dict[int, int]  # round number -> id
    image_ids: list[int]
    paths: list[str]
    truth: list[str]

    def session(self):
        return session_scope(self.engine)

    def task(self, k: int, *, reason: str = "uncertain", predicted: str | None = None, score: float = 0.6,
             current_label: str | None = None, round_number: int = 1) -> TaskRequest:  # fmt: skip
        return TaskRequest(
            image_id=self.image_ids[k], image_path=self.paths[k], sha256=hashlib.sha256(Path(self.paths[k]).read_bytes()).hexdigest(),
            reason=reason, predicted_label=predicted, prediction_score=score, probabilities={predicted: score} if predicted else {},
            current_label=current_label, round_number=round_number,
        )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path, request: pytest.FixtureRequest) -> StoreWithImages:
    """A fresh store: one project (unique name: the Label Studio server is shared), 8 tiny PNGs in two folders,
    imported labels for the first four, rounds 1 and 2."""
    result = build_store(tmp_path, f"{request.node.name[:24]}-{uuid.uuid4().hex[:6]}")
    yield result
    result.engine.dispose()


@pytest.fixture
def make_store():  # noqa: ANN201
    """build_store, for a test that needs a second store (e.g. another folder with the same project name)."""
    made: list[StoreWithImages] = []

    def make(path: Path, name: str, *, size_offset: int = 0) -> StoreWithImages:
        made.append(build_store(path, name, size_offset=size_offset))
        return made[-1]

    yield make
    for store in made:
        store.engine.dispose()


def build_store(tmp_path: Path, name: str, *, size_offset: int = 0) -> StoreWithImages:
    """The `store` fixture's store in tmp_path; size_offset makes other images (another store with the same name)."""
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    upgrade_schema(url)
    engine = create_db_engine(url)
    truth = ["good", "scratch", "spot", "good", "scratch", "good", "spot", "good"]
    with session_scope(engine) as session:
        project = Project(name=name, root_dir=str(tmp_path), classes=CLASSES, negative_class="good")
        session.add(project)
        session.flush()
        batch = IngestBatch(project_id=project.id, source=str(tmp_path / "images"), layout="folders", n_files=len(truth))
        session.add(batch)
        session.flush()
        images, paths = [], []
        for k, label in enumerate(truth):
            folder = tmp_path / "images" / ("line-1" if k < 4 else "line-2")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"part{k:02d}.png"
            side = 8 + k + size_offset
            PILImage.new("RGB", (side, side), COLORS[label]).save(path)
            data = path.read_bytes()
            paths.append(str(path))
            images.append(Image(project_id=project.id, sha256=hashlib.sha256(data).hexdigest(), path=str(path), size_bytes=len(data),
                                width=side, height=side, split="pool", ingest_batch_id=batch.id))
        session.add_all(images)
        session.flush()
        for image, label in list(zip(images, truth))[:4]:
            session.add(LabelEvent(image_id=image.id, label=label, source="import"))
        rounds = [Round(project_id=project.id, number=n, status="completed" if n == 1 else "running") for n in (1, 2)]
        session.add_all(rounds)
        session.flush()
        return StoreWithImages(url=url, engine=engine, project_id=project.id, project_name=name,
                               round_ids={r.number: r.id for r in rounds}, image_ids=[i.id for i in images], paths=paths, truth=truth)


@pytest.fixture
def backend(labelstudio: LabelStudioInstance) -> LabelStudioBackend:
    return LabelStudioBackend(url=labelstudio.url, api_key=labelstudio.token, document_root=str(labelstudio.document_root),
                              class_descriptions=DESCRIPTIONS)
