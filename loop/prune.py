"""`loop prune`: delete the model files of rounds the loop no longer reads, so a project's disk stops growing by
~29 MB a round (efficientnet_lite0: model.pt and model.onnx). Kept, whatever the setting: the newest `keep_rounds`
completed rounds (the newest is what `/predict` deploys), and the model.pt of the newest round whose backbone was
fine-tuned, if still on disk (a later `head` round keeps the backbone it started from: `loop init --init-from`
names that round's model.pt). Half-written model files killed rounds left go too. Plots stay (they are small and
are the rounds' record); the store keeps every round's record and predictions and says which files were deleted,
when, by what and from which folder. Only files inside this project's own `artifacts/round-NNN/` are deleted, never
a path a copied project's record names elsewhere, nor a round folder linked out of artifacts/."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from loop.init_source import backbone_fine_tuned
from loop.project import ProjectContext
from store.db import session_scope
from store.models import Round
from store.queries import get_project

MODEL_FILES = ("model.pt", "model.onnx")
# the artifact keys that name them in a round's record: removed with the file, so nothing points at a deleted model
MODEL_ARTIFACT_KEYS = {"model.pt": "model_checkpoint", "model.onnx": "model_onnx"}


@dataclass
class PruneSummary:
    deleted: dict[int, list[str]] = field(default_factory=dict)  # round number -> file names deleted (or to delete)
    freed_bytes: int = 0
    kept_newest: list[int] = field(default_factory=list)
    kept_fine_tuned: int | None = None  # the newest fine-tuned round whose model.pt is kept, older than the newest ones
    temporary_files: int = 0  # half-written model files a killed round left (deleted with the rest)
    skipped_outside: list[str] = field(default_factory=list)  # round folders or files that lead out of artifacts/ (links)
    dry_run: bool = False
    error: str | None = None  # the deletion that failed and stopped the command (what went before it is recorded)


# half-written files (modeling.onnx_export writes .model.<pid>-<hex>.tmp.onnx, save_model_checkpoint model.pt.tmp): a
# round killed while writing leaves them, and nothing reads them
TEMPORARY_PATTERNS = (".model.*.tmp.onnx", "model.pt.tmp")


def prune_model_files(ctx: ProjectContext, *, keep_rounds: int, dry_run: bool = False, by: str = "loop prune") -> PruneSummary:
    """Delete model.pt / model.onnx of every round but the kept ones (see the module's doc), and the half-written
    model files killed rounds left. The caller holds the project lock, so no round writes its files meanwhile. A round
    that failed or was interrupted is never read: its files go too. Each deletion is recorded in the round's
    details["model_files_deleted"]. An OSError stops it: summary.error says which, what went before is recorded."""
    if keep_rounds < 1:
        raise ValueError("keep at least the newest round's model: it is the one /predict deploys (--keep-rounds 1 or more)")
    summary = PruneSummary(dry_run=dry_run)
    with session_scope(ctx.engine) as session:  # the plan, read at once
        project = get_project(session)
        rounds = session.execute(select(Round.id, Round.number, Round.status, Round.details).where(Round.project_id == project.id)
                                 .order_by(Round.number.desc())).all()
    base = ctx.artifacts_dir.resolve()  # a linked artifacts/ (moved to a bigger disk) is this project's; a linked round folder is not
    completed = [r for r in rounds if r.status == "completed"]
    summary.kept_newest = sorted(r.number for r in completed[:keep_rounds])
    # the newest fine-tuned backbone still on disk (a record alone keeps nothing: its file may be gone already)
    fine_tuned = next((r.number for r in completed if backbone_fine_tuned(r.details) and _own_file(base, r.number, "model.pt") is not None), None)
    if fine_tuned is not None and fine_tuned not in summary.kept_newest:
        summary.kept_fine_tuned = fine_tuned
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for round_id, number, status, _details in sorted(rounds, key=lambda r: r.number):
        if number in summary.kept_newest or status == "running":  # a running row: killed; the next round marks it interrupted
            kept_names = set(MODEL_FILES)
        elif number == fine_tuned:
            kept_names = {"model.pt"}  # init-from reads the checkpoint; the deployable ONNX copy of it is not needed
        else:
            kept_names = set()
        folder = base / f"round-{number:03d}"
        if folder.is_symlink() or (folder.exists() and not folder.resolve().is_relative_to(base)):
            summary.skipped_outside.append(str(folder))
            continue
        present = [path for name in MODEL_FILES if name not in kept_names and (path := _own_file(base, number, name)) is not None]
        leftovers = [path for pattern in TEMPORARY_PATTERNS for path in folder.glob(pattern) if path.is_file() or path.is_symlink()]
        deleted: list[str] = []
        for path in [*present, *leftovers]:
            size = 0 if path.is_symlink() else path.stat().st_size  # a link frees nothing of its target
            if not dry_run:
                try:
                    path.unlink()
                except OSError as error:  # stops here; what went before it is recorded below
                    summary.error = f"could not delete {path}: {error.strerror or error}"
                    break
            if path in leftovers:
                summary.temporary_files += 1
            else:
                deleted.append(path.name)
            summary.freed_bytes += size
        if deleted:
            summary.deleted[number] = deleted
            if not dry_run:
                with session_scope(ctx.engine) as session:
                    _record_deletion(session.get(Round, round_id), deleted, by=by, when=when, folder=str(ctx.root))
        if summary.error:
            break
    return summary


def _own_file(base: Path, number: int, name: str) -> Path | None:
    """The round's file in this project's artifacts/, or None: missing, not a file, or a folder link leading elsewhere."""
    path = base / f"round-{number:03d}" / name
    if not (path.is_file() or path.is_symlink()) or path.is_dir():
        return None
    return path if path.parent.resolve().is_relative_to(base) else None


def _record_deletion(round_row: Round, names: list[str], *, by: str, when: str, folder: str) -> None:
    artifacts = dict(round_row.artifacts or {})
    for name in names:
        artifacts.pop(MODEL_ARTIFACT_KEYS[name], None)
    round_row.artifacts = artifacts
    details = dict(round_row.details or {})
    record = dict(details.get("model_files_deleted") or {})
    record["files"] = sorted(set(record.get("files") or []) | set(names))
    record.update(at=when, by=by, folder=folder)  # a store shared by several folders: which one's files went
    details["model_files_deleted"] = record
    round_row.details = details


def describe(summary: PruneSummary) -> str:
    verb = "would delete" if summary.dry_run else "deleted"
    kept = f"kept the models of the newest {_count(len(summary.kept_newest), 'completed round')} ({_ranges(summary.kept_newest) or 'none yet'})"
    if summary.kept_fine_tuned is not None:
        kept += (f" and round {summary.kept_fine_tuned}'s model.pt, the newest fine-tuned backbone (`loop init --init-from` names it; "
                 "pass it as the checkpoint to start from it)")
    parts = []
    if summary.deleted:
        n_files = sum(len(names) for names in summary.deleted.values())
        parts.append(f"{verb} {_count(n_files, 'model file')} of rounds {_ranges(sorted(summary.deleted))}")
    if summary.temporary_files:
        parts.append(f"{'would delete' if summary.dry_run else 'deleted'} {_count(summary.temporary_files, 'half-written model file')} killed "
                     "rounds left")
    text = (" and ".join(parts) + f" ({summary.freed_bytes / 1e6:.1f} MB); {kept}. Their records, predictions and plots stay") if parts \
        else f"nothing to delete: {kept}"
    if summary.skipped_outside:
        text += (f". Left alone: {', '.join(summary.skipped_outside[:3])}{' ...' if len(summary.skipped_outside) > 3 else ''}, a link out of "
                 "the project's artifacts/ folder")
    if summary.error:
        text += f". Stopped: {summary.error}"
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
