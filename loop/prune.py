"""`loop prune`: delete the model files of rounds the loop no longer reads, so a project's disk stops growing by
~29 MB a round (efficientnet_lite0: model.pt and model.onnx). Kept, whatever the setting: the newest `keep_rounds`
completed rounds (the newest is what `/predict` deploys), and the newest round whose backbone was fine-tuned (a
later `head` round keeps the backbone it started from, so `loop init --init-from` reads that round's model.pt).
Plots stay (they are small and are the rounds' record); the store keeps every round's record and predictions and
says which files were deleted, when and by what. Only files inside this project's own `artifacts/round-NNN/` are
deleted, never a path a copied project's record names elsewhere."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

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
    kept_fine_tuned: int | None = None  # the newest fine-tuned round, kept although older than the newest ones
    dry_run: bool = False


def prune_model_files(ctx: ProjectContext, *, keep_rounds: int, dry_run: bool = False, by: str = "loop prune") -> PruneSummary:
    """Delete model.pt / model.onnx of every round but the kept ones (see the module's doc). The caller holds the
    project lock, so no round is writing its files meanwhile. A round that failed or was interrupted is never read:
    its files go too. Each deletion is recorded in the round's details["model_files_deleted"]."""
    if keep_rounds < 1:
        raise ValueError("keep at least the newest round's model: it is the one /predict deploys (--keep-rounds 1 or more)")
    summary = PruneSummary(dry_run=dry_run)
    with session_scope(ctx.engine) as session:  # the plan, read at once
        project = get_project(session)
        rounds = session.execute(select(Round.id, Round.number, Round.status, Round.details).where(Round.project_id == project.id)
                                 .order_by(Round.number.desc())).all()
    completed = [r for r in rounds if r.status == "completed"]
    summary.kept_newest = sorted(r.number for r in completed[:keep_rounds])
    fine_tuned = next((r.number for r in completed if backbone_fine_tuned(r.details)), None)
    if fine_tuned is not None and fine_tuned not in summary.kept_newest:
        summary.kept_fine_tuned = fine_tuned
    kept = set(summary.kept_newest) | ({fine_tuned} if fine_tuned is not None else set())
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for round_id, number, status, _details in sorted(rounds, key=lambda r: r.number):
        if number in kept or status == "running":  # a running row: killed; the next round marks it interrupted
            continue
        folder = ctx.artifacts_dir / f"round-{number:03d}"
        present = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
        if not present:
            continue
        deleted: list[str] = []
        try:
            for path in present:
                size = path.stat().st_size
                if not dry_run:
                    path.unlink()
                deleted.append(path.name)
                summary.freed_bytes += size
        finally:  # a file that cannot be deleted stops the command; what went before it is recorded
            if deleted:
                summary.deleted[number] = deleted
                if not dry_run:
                    with session_scope(ctx.engine) as session:
                        _record_deletion(session.get(Round, round_id), deleted, by=by, when=when)
    return summary


def _record_deletion(round_row: Round, names: list[str], *, by: str, when: str) -> None:
    artifacts = dict(round_row.artifacts or {})
    for name in names:
        artifacts.pop(MODEL_ARTIFACT_KEYS[name], None)
    round_row.artifacts = artifacts
    details = dict(round_row.details or {})
    record = dict(details.get("model_files_deleted") or {})
    record["files"] = sorted(set(record.get("files") or []) | set(names))
    record.update(at=when, by=by)
    details["model_files_deleted"] = record
    round_row.details = details


def describe(summary: PruneSummary) -> str:
    verb = "would delete" if summary.dry_run else "deleted"
    kept = f"kept the newest {len(summary.kept_newest)} completed round(s) ({_ranges(summary.kept_newest) or 'none yet'})"
    if summary.kept_fine_tuned is not None:
        kept += f" and round {summary.kept_fine_tuned}, the newest with a fine-tuned backbone (`loop init --init-from` reads it)"
    if not summary.deleted:
        return f"nothing to delete: {kept}"
    n_files = sum(len(names) for names in summary.deleted.values())
    return (f"{verb} {n_files} model files of rounds {_ranges(sorted(summary.deleted))} ({summary.freed_bytes / 1e6:.1f} MB); {kept}. "
            "Their records, predictions and plots stay")


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
