"""Where a round's recorded files (model.onnx, model.pt, plots) are in the project folder a command was given.

The store records each file's absolute path at the time the round wrote it. A project folder moved or copied
elsewhere keeps that record, and its old place may hold another project by now (QA: `/predict` served, and
`loop init --init-from` started from, another project's model that way). A round's files are the folder's own:
looked up there only, never at a recorded path outside it.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["artifact_file", "artifact_places", "artifact_shown"]


def artifact_places(recorded: str, *, round_number: int, recorded_root: str | Path | None, project_dir: Path) -> list[Path]:
    """The places in `project_dir` a recorded file can be, best first: its place relative to the folder the store
    names as the project's (`recorded_root`), the recorded path itself when it is in `project_dir`, then the loop's
    own layout, artifacts/round-NNN/<file name>. A recorded path elsewhere gives only its file's name."""
    stored = Path(recorded)
    places: list[Path] = []
    if not stored.is_absolute():
        places.append(project_dir / stored)
    else:
        if recorded_root is not None and stored.is_relative_to(Path(recorded_root)):
            places.append(project_dir / stored.relative_to(Path(recorded_root)))
        if stored.is_relative_to(project_dir):  # written in this folder (by a round run here since it was moved or copied)
            places.append(stored)
    layout = project_dir / "artifacts" / f"round-{round_number:03d}" / stored.name
    return list(dict.fromkeys([*places, layout]))


def artifact_file(recorded: str, *, round_number: int, recorded_root: str | Path | None, project_dir: Path) -> Path | None:
    """The recorded file as it is in `project_dir`, or None: not there (deleted, pruned, or not copied along)."""
    places = artifact_places(recorded, round_number=round_number, recorded_root=recorded_root, project_dir=project_dir)
    return next((place for place in places if place.is_file()), None)


def artifact_shown(recorded: str, *, round_number: int, recorded_root: str | Path | None, project_dir: Path) -> str:
    """The path to show for a recorded file: where it is in `project_dir`, else where it belongs there."""
    places = artifact_places(recorded, round_number=round_number, recorded_root=recorded_root, project_dir=project_dir)
    return str(next((place for place in places if place.is_file()), places[0]))
