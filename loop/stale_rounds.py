"""Rounds a killed process left recorded as running, and the failure reasons a round could not store.

Light on imports on purpose: `loop round` records a killed round as failed right after it takes the project, before
torch and the rest load (QA: for ~10 s, `loop status` showed the killed round as alive, the new round holding the
project meanwhile)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from sqlalchemy import select

from loop.project import ProjectContext
from store import session_scope
from store.models import Round
from store.queries import get_project
from store.reports import as_utc


def failure_note(root: Path, round_id: int) -> Path:
    return root / f".round-{round_id}-failure.txt"


def keep_failure_reason(root: Path, round_row: tuple[int, int, str | None] | None, reason: str) -> None:
    """Best effort (the disk may be full): why a round (id, number, started_at) failed, for the next round to record.
    The number and start time go with it: another store, or a store made again, reuses round ids."""
    if round_row is None:
        return
    round_id, number, started_at = round_row
    try:
        failure_note(root, round_id).write_text(json.dumps({"number": number, "started_at": started_at, "reason": reason[:2000]}) + "\n")
    except OSError:
        pass


def kept_failure_reason(root: Path, stale: Round) -> str | None:
    """The reason kept for this very round (its number and start time match), else None. The note is removed by the
    caller once the round's new state is committed."""
    try:
        note = json.loads(failure_note(root, stale.id).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("number") != stale.number or note.get("started_at") != when(stale.started_at):
        return None
    return f"{note.get('reason')} (recorded by the next round: the store could not be written when it failed)"


def when(moment: datetime | None) -> str | None:
    # in UTC without a zone: SQLite hands it back without one (it is UTC), PostgreSQL in the session's zone
    return None if moment is None else as_utc(moment).replace(tzinfo=None).isoformat()


def record_stale_rounds(ctx: ProjectContext, *, console: Console) -> list[int]:
    """Rounds still recorded as running are recorded as failed, with the reason their process kept if any; the caller
    holds the project (`project_lock`), so no process runs them. Returns their numbers."""
    recorded_notes, numbers = [], []
    with session_scope(ctx.engine) as session:
        project = get_project(session)
        for stale in session.scalars(select(Round).where(Round.project_id == project.id, Round.status == "running").order_by(Round.number)):
            kept = kept_failure_reason(ctx.root, stale)
            stale.status, stale.error = "failed", kept or "interrupted (the process ended before the round finished)"
            if kept:
                recorded_notes.append(failure_note(ctx.root, stale.id))
            numbers.append(stale.number)
            # said: `loop status` gives only the newest failure's reason (QA: a killed round turned "failed" without a word)
            console.print(f"[yellow]note:[/] round {stale.number} was still recorded as running, and no process holds the project: "
                          f"recorded as failed: {escape(stale.error)}")
    for note in recorded_notes:  # the reasons kept for rounds just recorded as failed: in the store now
        note.unlink(missing_ok=True)
    return numbers
