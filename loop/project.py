"""A project directory: loop.toml, the store URL, where artifacts and caches live, and the round lock."""
from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select

from loop.config import ConfigError, ProjectConfig, config_path, load_config
from store import create_db_engine, upgrade_schema
from store.db import (
    LockFileBusy,
    StoreBusy,
    exclusive_store_lock,
    held_lock_file,
    hold_schema_lock,
    lock_file_held,
    session_scope,
    shown_url,
    store_url_for,
)
from store.queries import one_project_per_store

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from store.models import Project


class ProjectBusy(RuntimeError):
    """Another `loop round` (or ingest) holds this project's lock."""


@dataclass
class ProjectContext:
    root: Path
    config: ProjectConfig
    engine: Engine

    @property
    def database_url(self) -> str:
        if self.config is None:  # opened for reading with a loop.toml a round would refuse (open_project_store): its engine's store
            return self.engine.url.render_as_string(hide_password=False)
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


def default_store_url(root: Path) -> str:
    """A project folder's own SQLite store, loop.db."""
    return store_url_for(root, None, use_env=False)


def database_url_for(root: Path, config: ProjectConfig) -> str:
    return store_url_for(root, config.database_url)


def check_store_is_free(root: Path, config: ProjectConfig, *, database_url: str | None = None) -> str:
    """The URL of a new project's store, once it is known to hold no project yet (ConfigError otherwise): get_project
    takes a store's first project, so a second one there would act on the first's images and rounds. Brings the
    schema to head."""
    from store.models import Project

    url = database_url or database_url_for(root, config)
    upgrade_schema(url)
    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            _refuse_a_taken_store(session.scalars(select(Project).order_by(Project.id)).first(), url=url, root=root)
    finally:
        engine.dispose()
    return url


def _refuse_a_taken_store(existing: Project | None, *, url: str, root: Path) -> None:
    if existing is None:
        return
    if url == default_store_url(root):  # this folder's own store, its loop.toml gone
        raise ConfigError(f"{root / 'loop.db'} already holds project {existing.name!r} (made in {existing.root_dir}) without a "
                          "loop.toml beside it: restore that loop.toml to go on with it, or move loop.db away to start afresh; "
                          "no project was created")
    raise ConfigError(f"the store at {shown_url(url)} already holds project {existing.name!r} (folder {existing.root_dir}): "
                      "one store holds one project. Give this one its own database (another --database-url or "
                      "LOOP_DATABASE_URL), or neither for SQLite in the project folder; no project was created")


def create_project_store(root: Path, config: ProjectConfig, *, database_url: str | None = None) -> str:
    """The store of a new project, checked by check_store_is_free, with its project row; its URL.
    database_url: this store whatever the environment says (loop simulate's scratch runs)."""
    url = check_store_is_free(root, config, database_url=database_url)
    add_project_row(url, root, config)
    return url


def add_project_row(url: str, root: Path, config: ProjectConfig) -> None:
    """The project's row in a store check_store_is_free passed, checked again in the same transaction, under the lock
    another `loop init` on the store takes too: both may have passed that check at the same moment."""
    from store.models import Project

    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            hold_schema_lock(session.connection())
            _refuse_a_taken_store(session.scalars(select(Project).order_by(Project.id)).first(), url=url, root=root)
            session.add(Project(name=config.name, root_dir=str(root), classes=config.classes, negative_class=config.negative_class))
    finally:
        engine.dispose()


def remove_project_row(url: str) -> None:
    """Undo create_project_store when the rest of making the project failed: a store holding a project without its
    loop.toml would refuse the next try."""
    from sqlalchemy import delete

    from store.models import Project

    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            session.execute(delete(Project))
    finally:
        engine.dispose()


class StoreOfAnotherProject(ConfigError):
    """The store loop.toml or LOOP_DATABASE_URL names holds another project: no command reads or writes it from here."""


def open_project(root: Path, *, database_url: str | None = None) -> ProjectContext:
    """database_url: this store whatever loop.toml and the environment say (loop simulate's scratch runs)."""
    root = root.expanduser().resolve()
    config = load_config(root)
    url = database_url or database_url_for(root, config)
    default = root / "loop.db"
    if url == default_store_url(root) and not default.is_file():  # the driver would make an empty store and say "no project"
        raise ConfigError(f"the store of project {root} is missing: no loop.db there, and loop.toml names no database_url. If the project "
                          "was made with LOOP_DATABASE_URL set, set it again (or put database_url in loop.toml); nothing was changed")
    upgrade_schema(url, lock_files=(root / ".loop.lock",))  # a project made by an older defect-loop gets the newer columns (a no-op when current)
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        one_project_per_store(session, store=shown_url(url))
        _refuse_another_projects_store(session, engine, root=root, name=config.name, url=url, given=database_url is not None)
    return ProjectContext(root, config, engine)


def _refuse_another_projects_store(session: "Session", engine: Engine, *, root: Path, name: object, url: str, given: bool = False) -> None:
    """StoreOfAnotherProject when the store holds a project of another name than loop.toml's (QA: LOOP_DATABASE_URL left
    set put a folder's ingest and round into another project, with this folder's loop.toml, and nothing said so).
    Folders sharing a store share loop.toml, name included; the name is the store's from `loop init` on."""
    from store.models import Project

    stored = session.execute(select(Project.name, Project.root_dir)).first()
    if stored is None or (stored[0] == name if isinstance(name, str) else stored[1] == str(root)):
        return  # without a name (a broken loop.toml), the store's own folder is this one (QA: another project's record was read)
    engine.dispose()
    named_by = ("the store given" if given else "LOOP_DATABASE_URL" if os.environ.get("LOOP_DATABASE_URL")
                else "this folder's loop.db" if url == default_store_url(root) else "loop.toml's database_url")
    fix = ("Unset LOOP_DATABASE_URL" if named_by == "LOOP_DATABASE_URL" else "Fix database_url in loop.toml" if named_by == "loop.toml's database_url"
           else "Point this folder at its own store")
    names = f"names project {name!r}" if isinstance(name, str) else "names no project"
    raise StoreOfAnotherProject(f"loop.toml of {root} {names}, but the store at {shown_url(url)} ({named_by}) holds project "
                                f"{stored[0]!r} (made in {stored[1]}): not this folder's store. {fix}; if it is the same project, put "
                                f"name = {stored[0]!r} back in loop.toml (a project keeps the name `loop init` gave it). Nothing was changed")


def open_project_store(root: Path) -> tuple[ProjectContext, str | None]:
    """The project for reading its record: open_project, or, when loop.toml is broken (a typo a round refuses), the
    store alone (its URL from the environment, the file's own database_url if it can be read, else the default
    SQLite file) with the config error to show. A folder that is not a project still fails."""
    try:
        return open_project(root), None
    except StoreOfAnotherProject:
        raise
    except ConfigError as error:
        root = root.expanduser().resolve()
        path = config_path(root)
        if not path.is_file():
            raise
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            raise error from None  # which store it names cannot be read: never guess one
        configured = raw.get("database_url")
        url = os.environ.get("LOOP_DATABASE_URL") or (configured if isinstance(configured, str) and configured else None)
        if url is None:
            default = root / "loop.db"
            if not default.is_file():
                raise error from None  # no store to read: do not create an empty one
            url = default_store_url(root)
        upgrade_schema(url, lock_files=(root / ".loop.lock",))
        engine = create_db_engine(url)
        # another project's store is no record of this folder's, broken loop.toml or not (review); without a name, read
        with session_scope(engine) as session:
            _refuse_another_projects_store(session, engine, root=root, name=raw.get("name"), url=url)
        return ProjectContext(root, None, engine), str(error)  # type: ignore[arg-type]  # read-only use


def project_lock_held(root: Path) -> bool:
    """Whether a live process on this machine holds the project folder's lock (a round or an ingest running)."""
    return lock_file_held(root / ".loop.lock")


@contextmanager
def project_lock(root: Path, *, action: str, engine: Engine | None = None) -> Iterator[None]:
    """One writer at a time per project: a second `loop round` fails at once with who holds the lock. With the
    project's engine, its store too (store.db.exclusive_store_lock): a PostgreSQL store shared by other folders or
    machines."""
    with _folder_lock(root, action=action):
        if engine is None:
            yield
            return
        try:
            with exclusive_store_lock(engine):
                yield
        except StoreBusy as error:
            raise ProjectBusy(str(error)) from None


@contextmanager
def _folder_lock(root: Path, *, action: str) -> Iterator[None]:
    with ExitStack() as stack:
        try:
            stack.enter_context(held_lock_file(root / ".loop.lock", holder=action))
        except LockFileBusy as busy:
            raise ProjectBusy(f"project {root} is busy: {busy}. Wait for it to finish (nothing was changed).") from None
        yield


def labels_left_out(session: "Session", project: "Project", classes: list[str]) -> set[str]:
    """The labels stored answers give that are not among `classes` (what sync_project_classes would refuse)."""
    return {label for label, *_ in _answers_outside(session, project, classes)}


def _answers_outside(session: "Session", project: "Project", classes: list[str]) -> list:
    """(label, image id, split, status) of every answer naming a label outside `classes`; images replaced by a new
    file do not count (they never come back)."""
    from store.models import Image, LabelEvent

    return session.execute(
        select(LabelEvent.label, LabelEvent.image_id, Image.split, Image.status).join(Image, Image.id == LabelEvent.image_id)
        .where(Image.project_id == project.id, Image.status != "replaced", LabelEvent.action == "set", LabelEvent.label.is_not(None),
               LabelEvent.label.not_in(classes))
    ).all()


def sync_project_classes(session: "Session", project: "Project", config: ProjectConfig, *, project_dir: Path | None = None) -> dict | None:
    """loop.toml's classes and negative class into the store's project row, which the API, `loop status` and Label
    Studio's choices read, once no stored answer names a class outside them: a class renamed or removed in loop.toml
    silently turned its labels, frozen test images included, into unlabeled ones. Every answer counts, not only the
    current label (a tie, or a deleted answer, can make an older one current again); images replaced by a new file
    do not (they never come back). ConfigError then, nothing changed. {"before", "after"} when the row changed.
    project_dir: the folder the command was given, which the error's `rename-class` hint names (the store's root_dir
    names the folder it was made in: a copied project's hint renamed the original's labels, QA)."""
    from collections import Counter

    from store.queries import current_labels

    named = _answers_outside(session, project, config.classes)
    if named:
        current = current_labels(session, project.id)
        images: dict[str, dict[int, tuple[str, str]]] = {}
        for label, image_id, split, status in named:
            images.setdefault(label, {})[image_id] = (split, status)
        described = []
        for label, by_image in sorted(images.items()):
            now = sum(1 for image_id in by_image if current.get(image_id) is not None and current[image_id].label == label)
            counts = Counter(split for split, _ in by_image.values())
            quarantined = sum(1 for _, status in by_image.values() if status != "ok")
            described.append(f"{label!r} ({len(by_image)} images, {now} of them labeled so now, {counts['test']} in the frozen test split"
                             + (f", {quarantined} quarantined" if quarantined else "") + ")")
        first = sorted(images)[0]
        raise ConfigError(f"loop.toml's classes leave out {', '.join(described)}, which stored answers name: those answers would name no class "
                          f"of the project. Nothing was changed. Put the class back in loop.toml, or move its answers to a class of loop.toml "
                          f"with `loop rename-class {first} NEW_NAME --project {project_dir or project.root_dir}`")
    if list(project.classes or []) == config.classes and project.negative_class == config.negative_class:
        return None
    before = {"classes": list(project.classes or []), "negative_class": project.negative_class}
    project.classes, project.negative_class = list(config.classes), config.negative_class
    return {"before": before, "after": {"classes": list(config.classes), "negative_class": config.negative_class}}
