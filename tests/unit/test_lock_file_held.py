"""Whether a lock file's holder still runs: a pid reused by a later process (after a reboot) is not its holder."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from store.db import held_lock_file, lock_file_held


def test_a_pid_reused_by_a_later_process_is_not_the_holder(tmp_path: Path) -> None:
    # a round killed with -9 leaves "loop round running as pid N"; after a reboot N belongs to another process, and the
    # dead round read as still running (API, dashboard, loop status) for as long as that process lived
    lock = tmp_path / ".loop.lock"
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(f"loop round running as pid {later.pid}")
        assert lock_file_held(lock)  # written after the process started: it may be the holder
        past = time.time() - 3600
        os.utime(lock, (past, past))  # written an hour before that process started: a reused pid
        assert not lock_file_held(lock)
    finally:
        later.kill()
        later.wait()
    assert not lock_file_held(lock)  # gone altogether
    with held_lock_file(lock, holder="loop round"):
        assert lock_file_held(lock)  # this process, holding it now
    assert not lock_file_held(lock)  # released: emptied
