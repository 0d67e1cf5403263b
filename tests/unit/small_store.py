"""A store with one project and a few pool images, for tests of the store's queries and recorders."""
from __future__ import annotations

from pathlib import Path

from store import create_db_engine, session_scope, upgrade_schema
from store.models import Image, IngestBatch, Project


def small_store(tmp_path: Path, *, n_images: int = 1, classes: tuple[str, ...] = ("good", "scratch")):  # noqa: ANN201
    """(engine, project id, image ids): a migrated SQLite store in tmp_path, one project of `classes` ("good" the
    negative class), `n_images` pool images of one ingest batch."""
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    upgrade_schema(url)
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        project = Project(name="p", root_dir=str(tmp_path), classes=list(classes), negative_class="good")
        session.add(project)
        session.flush()
        batch = IngestBatch(project_id=project.id, source="x", layout="folders")
        session.add(batch)
        session.flush()
        images = [Image(project_id=project.id, sha256=f"{k:064d}", path=f"/x/{k}.png", split="pool", ingest_batch_id=batch.id) for k in range(n_images)]
        session.add_all(images)
        session.flush()
        return engine, project.id, [image.id for image in images]
