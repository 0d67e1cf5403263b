"""A project directory: loop.toml, the store URL, where artifacts and caches live, and the round lock."""
from __future__ import annotations

import fcntl
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

from loop.config import ConfigError, ProjectConfig, config_path, load_config
from store import create_db_engine, upgrade_schema
from store.db import session_scope, shown_url
from store.queries import one_project_per_store


class ProjectBusy(RuntimeError):
    """Another `loop round` (or ingest) holds this project's lock."""


@dataclass
class ProjectContext:
    root: Path
    config: ProjectConfig
    engine: Engine

    @property
    def database_url(self) -> str:
        return database_url_for(self.root, self.config)

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    def round_dir(self, number: int) -> Path:
        path = self.artifacts_dir / f"round-{number:03d}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def database_url_for(root: Path, config: ProjectConfig) -> str:
    return os.environ.get("LOOP_DATABASE_URL") or config.database_url or f"sqlite:///{(root / 'loop.db').resolve()}"


def create_project_store(root: Path, config: ProjectConfig, *, database_url: str | None = None) -> str:
    """The store of a new project: schema to head and its project row; its URL. Refuses (ConfigError, no row added)
    a store that already holds a project: get_project takes the first, so a second project there would act on the
    first's images and rounds. database_url: this store whatever the environment says (loop simulate's scratch runs)."""
    from store.models import Project

    url = database_url or database_url_for(root, config)
    upgrade_schema(url)
    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            existing = session.scalars(select(Project).order_by(Project.id)).first()
            if existing is not None:
                raise ConfigError(f"the store at {shown_url(url)} already holds project {existing.name!r} (folder {existing.root_dir}): "
                                  "one store holds one project. Give this one its own database (another --database-url or "
                                  "LOOP_DATABASE_URL), or neither for SQLite in the project folder; no project was created")
            session.add(Project(name=config.name, root_dir=str(root), classes=config.classes, negative_class=config.negative_class))
    finally:
        engine.dispose()
    return url


def open_project(root: Path, *, database_url: str | None = None) -> ProjectContext:
    """database_url: this store whatever loop.toml and the environment say (loop simulate's scratch runs)."""
    root = root.expanduser().resolve()
    config = load_config(root)
    url = database_url or database_url_for(root, config)
    upgrade_schema(url)  # a project made by an older defect-loop gets the newer columns (a no-op when current)
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        one_project_per_store(session, store=shown_url(url))
    return ProjectContext(root, config, engine)


def open_project_store(root: Path) -> tuple[ProjectContext, str | None]:
    """The project for reading its record: open_project, or, when loop.toml is broken (a typo a round refuses), the
    store alone (its URL from the environment, the file's own database_url if it can be read, else the default
    SQLite file) with the config error to show. A folder that is not a project still fails."""
    try:
        return open_project(root), None
    except ConfigError as error:
        root = root.expanduser().resolve()
        path = config_path(root)
        if not path.is_file():
            raise
        try:
            configured = tomllib.loads(path.read_text()).get("database_url")
        except tomllib.TOMLDecodeError:
            raise error from None  # which store it names cannot be read: never guess one
        url = os.environ.get("LOOP_DATABASE_URL") or (configured if isinstance(configured, str) and configured else None)
        if url is None:
            default = root / "loop.db"
            if not default.is_file():
                raise error from None  # no store to read: do not create an empty one
            url = f"sqlite:///{default.resolve()}"
        upgrade_schema(url)
        return ProjectContext(root, None, create_db_engine(url)), str(error)  # type: ignore[arg-type]  # read-only use


def project_lock_held(root: Path) -> bool:
    """Whether a process holds the project's lock now (a round or an ingest running). Reads only: the file is not
    created or changed."""
    lock_path = root / ".loop.lock"
    if not lock_path.is_file():
        return False
    with open(lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextmanager
def project_lock(root: Path, *, action: str) -> Iterator[None]:
    """One writer at a time per project: a second `loop round` fails at once with who holds the lock."""
    lock_path = root / ".loop.lock"
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ProjectBusy(f"project {root} is busy: {holder}. Wait for it to finish (nothing was changed).") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{action} running as pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
