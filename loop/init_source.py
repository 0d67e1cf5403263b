"""Which checkpoint `loop init --init-from PATH` starts a project from, said in words: a checkpoint file as given; a
defect-loop project folder's newest completed round (read from its store, so a failed round's checkpoint, which a
folder scan would take when it is the newest file, is never picked); any other folder's newest checkpoint file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from loop.config import config_path, load_config
from loop.project import default_store_url
from store.artifacts import artifact_file
from store.db import StoreUnavailable, create_db_engine, database_error_reason, session_scope, shown_url
from store.models import Project, Round
from store.reports import collapsed_of

FINE_TUNED = ("finetune", "full")


@dataclass(frozen=True)
class InitSource:
    checkpoint: Path
    description: str  # e.g. "round 4 (finetune) of project 'tiles'", printed by loop init


def resolve_init_source(path: Path) -> InitSource:
    path = path.expanduser().resolve()
    if path.is_dir() and config_path(path).is_file():
        return _project_checkpoint(path)
    try:
        from modeling.transfer import find_model_checkpoint  # torch: loaded only to read a checkpoint (QA: `loop prune` took 700 MB for it)

        checkpoint = find_model_checkpoint(path)
    except FileNotFoundError:
        project = next((folder for folder in path.parents[:3] if config_path(folder).is_file()), None) if path.is_dir() else None
        if project is None:
            raise
        # QA: a pruned round's folder was answered "train a round in that project first" (it had four)
        raise FileNotFoundError(f"no model checkpoint under {path}: that round's model files are gone (`loop prune` deletes older "
                                f"rounds' model.pt and model.onnx). Pass the project folder, --init-from {project}, to start from its "
                                "newest round that has one") from None
    return InitSource(checkpoint, "a checkpoint file" if path.is_file() else f"the newest checkpoint file under {path}")


def _source_store_url(root: Path, database_url: str | None) -> str:
    """The other project's own store: what its loop.toml names, else its loop.db. Not LOOP_DATABASE_URL, which names
    the store of the project being made (one store holds one project)."""
    if database_url:
        return database_url
    path = root / "loop.db"
    if not path.is_file():  # the driver would create an empty one in the other project's folder
        raise FileNotFoundError(f"project {root} has no store (no loop.db, and its loop.toml names no database_url): "
                                "pass a checkpoint file to --init-from (e.g. artifacts/round-NNN/model.pt there)")
    return default_store_url(root)


def _project_checkpoint(root: Path) -> InitSource:
    config = load_config(root)
    url = _source_store_url(root, config.database_url)
    engine = create_db_engine(url)  # read only: the other project's schema is left as it is
    try:
        with session_scope(engine) as session:
            made = session.execute(select(Project.name, Project.root_dir).order_by(Project.id)).first()
            name, recorded_root = (made[0] or config.name, made[1]) if made is not None else (config.name, None)
            rounds = session.execute(select(Round.number, Round.details, Round.artifacts).where(Round.status == "completed")
                                     .order_by(Round.number.desc())).all()
    except SQLAlchemyError as error:
        reason = database_error_reason(error)
        raise StoreUnavailable(f"cannot read the rounds of project {root} from its store at {shown_url(url)}: {reason}; pass a "
                               "checkpoint file to --init-from instead (e.g. artifacts/round-NNN/model.pt there)") from None
    finally:
        engine.dispose()
    with_model = []
    for number, details, artifacts in rounds:
        recorded = (artifacts or {}).get("model_checkpoint")
        # this folder's own file (a copied or moved project's record names its first folder, which may hold another
        # project's by now), or one in another folder of the same store
        checkpoint = artifact_file(str(recorded) if recorded else None, round_number=number, recorded_root=recorded_root, project_dir=root,
                                   store_url=url, use_env=False)
        if checkpoint is not None:
            strategy = str(((details or {}).get("training") or {}).get("strategy") or "head")
            with_model.append((number, strategy, checkpoint, backbone_fine_tuned(details), bool(collapsed_of(details))))
    recorded = [number for number, _details, artifacts in rounds if (artifacts or {}).get("model_checkpoint")]  # a cold start wrote none (review)
    if not with_model and recorded:  # QA: "run a round there first" to a project of several rounds whose files were deleted
        raise FileNotFoundError(f"project {root} has {len(recorded)} completed round{'s' if len(recorded) != 1 else ''} that made a model, and none of those "
                                f"checkpoints is in {root / 'artifacts'} any more (deleted by hand, or the project moved without it): "
                                "run a round there, or pass a checkpoint file to --init-from")
    if not with_model:
        raise FileNotFoundError(f"project {root} has no completed round with a model checkpoint: run a round there first, "
                                "or pass a checkpoint file to --init-from")
    number, strategy, checkpoint, tuned, collapsed = with_model[0]
    newest = "its newest completed round" if number == rounds[0][0] else \
        f"its newest completed round with a checkpoint file (round {rounds[0][0]} has none here)"  # QA: called the newest when it was not
    description = f"round {number} ({strategy}) of project {name!r}, {newest}"
    if collapsed:  # QA: a round whose model gave every image one class (macro F1 gate 0) was taken without a word
        sound = next(((n, c) for n, _s, c, _t, fell in with_model if not fell), None)
        description += ("; that round's model collapsed (one class for every image): " + (
            f"round {sound[0]} is the newest that did not, --init-from {sound[1]} starts from it" if sound else "no round of that project kept a model that did not"))
    if not tuned:
        earlier = next(((n, s, c) for n, s, c, t, fell in with_model if t and not fell), None)  # never a collapsed one (review)
        if earlier is not None:  # a head round keeps the backbone it started from: the fine-tuning of an earlier round is not in it
            kept_frozen = " (its fine-tuning kept epoch 0, the frozen backbone)" if strategy in FINE_TUNED else ""
            description += (f"; its backbone is not fine-tuned{kept_frozen}, round {earlier[0]} ({earlier[1]}) fine-tuned one: "
                            f"--init-from {earlier[2]} starts from that instead")
        elif any(t for _n, _s, _c, t, _fell in with_model):  # review: every fine-tuned round collapsed, which is not "none fine-tuned"
            fell = [str(n) for n, _s, _c, t, _fell in with_model if t]
            description += (f"; its backbone is not fine-tuned, and the rounds that fine-tuned one (round {', '.join(fell)}) have a "
                            "collapsed model: this starts from the pretrained backbone")
        else:  # QA: nothing said the transfer carries no backbone of that project's own
            kept_frozen = "its fine-tuning kept epoch 0, the frozen backbone" if strategy in FINE_TUNED else "it trained a head only"
            description += (f"; no round of that project fine-tuned its backbone ({kept_frozen}): this starts from the pretrained "
                            "backbone, and that project's head only if its classes are this project's")
    return InitSource(checkpoint, description)


def backbone_fine_tuned(details: dict | None) -> bool:
    """Whether a round's model has a backbone of its own: trained by `finetune` or `full` past epoch 0 (epoch 0 of
    fine-tuning is the frozen backbone: a round that kept it changed no backbone weight)."""
    training = (details or {}).get("training") or {}
    return str(training.get("strategy") or "head") in FINE_TUNED and int(training.get("best_epoch") or 0) > 0
