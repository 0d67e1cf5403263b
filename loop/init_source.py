"""Which checkpoint `loop init --init-from PATH` starts a project from, said in words: a checkpoint file as given; a
defect-loop project folder's newest completed round (read from its store, so a failed round's checkpoint, which a
folder scan would take when it is the newest file, is never picked); any other folder's newest checkpoint file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from loop.config import config_path, load_config
from loop.project import database_url_for
from modeling.transfer import find_model_checkpoint
from store.db import create_db_engine, session_scope
from store.models import Project, Round

FINE_TUNED = ("finetune", "full")


@dataclass(frozen=True)
class InitSource:
    checkpoint: Path
    description: str  # e.g. "round 4 (finetune) of project 'tiles'", printed by loop init


def resolve_init_source(path: Path) -> InitSource:
    path = path.expanduser().resolve()
    if path.is_dir() and config_path(path).is_file():
        return _project_checkpoint(path)
    checkpoint = find_model_checkpoint(path)
    return InitSource(checkpoint, "a checkpoint file" if path.is_file() else f"the newest checkpoint file under {path}")


def _project_checkpoint(root: Path) -> InitSource:
    config = load_config(root)
    engine = create_db_engine(database_url_for(root, config))  # read only: the other project's schema is left as it is
    try:
        with session_scope(engine) as session:
            name = session.scalars(select(Project.name).order_by(Project.id)).first() or config.name
            rounds = session.execute(select(Round.number, Round.details, Round.artifacts).where(Round.status == "completed")
                                     .order_by(Round.number.desc())).all()
    finally:
        engine.dispose()
    with_model = []
    for number, details, artifacts in rounds:
        checkpoint = _checkpoint_file(root, number, (artifacts or {}).get("model_checkpoint"))
        if checkpoint is not None:
            with_model.append((number, str(((details or {}).get("training") or {}).get("strategy") or "head"), checkpoint))
    if not with_model:
        raise FileNotFoundError(f"project {root} has no completed round with a model checkpoint: run a round there first, "
                                "or pass a checkpoint file to --init-from")
    number, strategy, checkpoint = with_model[0]
    description = f"round {number} ({strategy}) of project {name!r}, its newest completed round"
    if strategy not in FINE_TUNED:
        tuned = next(((n, s, c) for n, s, c in with_model if s in FINE_TUNED), None)
        if tuned is not None:  # a head round keeps the backbone it started from: the fine-tuning of an earlier round is not in it
            description += (f"; its backbone is not fine-tuned, round {tuned[0]} ({tuned[1]}) fine-tuned one: "
                            f"--init-from {tuned[2]} starts from that instead")
    return InitSource(checkpoint, description)


def _checkpoint_file(root: Path, number: int, recorded: str | None) -> Path | None:
    """The round's checkpoint where it was written, or in this folder's artifacts (the project was moved since)."""
    for candidate in (Path(recorded) if recorded else None, root / "artifacts" / f"round-{number:03d}" / "model.pt"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None
