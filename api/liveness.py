"""Whether a round the store records as running still has a process running it: `loop status`'s check, read-only.

A round killed outright (SIGKILL, power loss) stays "running" in the store until the next `loop round` records it as
interrupted. What tells is the lock every round holds: the project folder's .loop.lock and the store's own lock (a
file beside a SQLite store, an advisory lock on a PostgreSQL server), both released by the kernel or the server when
the process dies. Both are read without being taken: taking them even for a moment would make a round starting then
fail as busy.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from loop.project import project_lock_held
from store.db import store_lock_held
from store.reports import RoundSummary

_NEXT_ROUND = "the next `loop round` records it as interrupted"
NO_PROCESS_NOTE = f"no process holds the project: it was killed or the machine stopped; {_NEXT_ROUND}"
# a store whose lock cannot be read from here (neither SQLite nor PostgreSQL): only this machine's folder lock tells
NO_LOCAL_PROCESS_NOTE = f"no process on this machine holds the project folder: it was killed or the machine stopped; {_NEXT_ROUND}"
UNKNOWN_NOTE = "whether a process still runs it could not be checked: the store's lock could not be read"


class ProjectProcess:
    """The lock check of one request, made at most once and only when a round is recorded as running."""

    def __init__(self, project_dir: Path, engine: Engine) -> None:
        self.project_dir = project_dir
        self.engine = engine
        self._checked: tuple[bool | None, str | None] | None = None

    def check(self) -> tuple[bool | None, str | None]:
        """(alive, note for a running round): True when a round or an ingest holds the project folder's or the store's
        lock, False when neither is held, None when the store's lock could not be read."""
        if self._checked is None:
            try:
                store_held, readable = store_lock_held(self.engine), True
            except (OperationalError, InterfaceError):
                store_held, readable = None, False
            if store_held or project_lock_held(self.project_dir):
                self._checked = (True, None)
            elif not readable:
                self._checked = (None, UNKNOWN_NOTE)  # on a shared store the round may run from another folder or machine
            else:
                self._checked = (False, NO_LOCAL_PROCESS_NOTE if store_held is None else NO_PROCESS_NOTE)
        return self._checked

    def alive(self) -> bool | None:
        return self.check()[0]

    def mark(self, summary: RoundSummary) -> RoundSummary:
        """The summary with process_alive and its note when the round is recorded as running; others as they are."""
        if summary.status != "running":
            return summary
        alive, note = self.check()
        return dataclasses.replace(summary, process_alive=alive, status_note=note)
