"""Where a round's recorded files (model.onnx, model.pt, plots) are, seen from the project folder a command was given.

The store records each file's absolute path at the time the round wrote it. A project folder moved or copied
elsewhere keeps that record, and its old place may hold another project by now (QA: `/predict` served, and
`loop init --init-from` started from, another project's model that way). So a round's file is looked up in the
folder given; a recorded place outside it is used only when the folder there is a project folder of the same store
(several folders or machines may share one store: a round run in one of them wrote its files there).
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from store.db import same_store, store_url_for

__all__ = ["artifact_file", "artifact_places", "artifact_shown"]


def _folder_of_same_store(folder: Path, store_url: str, *, use_env: bool) -> bool:
    """Whether `folder` is a project folder whose commands use the store at `store_url` (its loop.toml read as the
    loop reads it: LOOP_DATABASE_URL when `use_env`, else its database_url, else its loop.db)."""
    try:
        configured = tomllib.loads((folder / "loop.toml").read_text(encoding="utf-8")).get("database_url")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return same_store(store_url_for(folder, configured if isinstance(configured, str) else None, use_env=use_env), store_url)


def artifact_places(recorded: str | None, *, round_number: int, recorded_root: str | Path | None, project_dir: Path) -> list[Path]:
    """The places in `project_dir` a recorded file can be, best first: its place relative to the folder the store names
    as the project's (`recorded_root`), the recorded path itself when it is in `project_dir`, the loop's own layout
    (artifacts/round-NNN/<file name>). None recorded: the layout's place of `model.pt`, nothing else."""
    if not recorded:
        return [project_dir / "artifacts" / f"round-{round_number:03d}" / "model.pt"]
    stored = Path(recorded)
    places: list[Path] = []
    if not stored.is_absolute():
        places.append(project_dir / stored)
    else:
        if recorded_root is not None and stored.is_relative_to(Path(recorded_root)):
            places.append(project_dir / stored.relative_to(Path(recorded_root)))
        if stored.is_relative_to(project_dir):  # written in this folder (by a round run here since it was moved or copied)
            places.append(stored)
    places.append(project_dir / "artifacts" / f"round-{round_number:03d}" / stored.name)
    return list(dict.fromkeys(places))


def _in_another_folder_of_the_store(recorded: str | None, *, project_dir: Path, store_url: str | None, use_env: bool) -> Path | None:
    """The recorded path, when it is a round's file in another project folder of the store at `store_url`. Read only
    once the folder given has no copy: it reads that folder's loop.toml."""
    stored = Path(recorded) if recorded else None
    if store_url is None or stored is None or not stored.is_absolute() or len(stored.parents) <= 2 or stored.parents[1].name != "artifacts" \
            or stored.parents[2] == project_dir or not stored.is_file():
        return None
    return stored if _folder_of_same_store(stored.parents[2], store_url, use_env=use_env) else None


def artifact_file(recorded: str | None, *, round_number: int, recorded_root: str | Path | None, project_dir: Path,
                  store_url: str | None = None, use_env: bool = True) -> Path | None:
    """The recorded file where it is: in `project_dir` (artifact_places), else in another project folder of the store at
    `store_url`; None: in none of them (deleted, pruned, not copied along)."""
    places = artifact_places(recorded, round_number=round_number, recorded_root=recorded_root, project_dir=project_dir)
    return next((place for place in places if place.is_file()), None) \
        or _in_another_folder_of_the_store(recorded, project_dir=project_dir, store_url=store_url, use_env=use_env)


def artifact_shown(recorded: str, *, round_number: int, recorded_root: str | Path | None, project_dir: Path,
                   store_url: str | None = None) -> str:
    """The path to show for a recorded file: where it is, else where it belongs in `project_dir`."""
    found = artifact_file(recorded, round_number=round_number, recorded_root=recorded_root, project_dir=project_dir, store_url=store_url)
    return str(found or artifact_places(recorded, round_number=round_number, recorded_root=recorded_root, project_dir=project_dir)[0])
