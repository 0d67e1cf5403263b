"""Running the `loop` command line from a benchmark, as a user would: the venv's own `loop`, no stdin, and a failure
stops the benchmark with the command's last output."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

LOOP = str(Path(sys.executable).with_name("loop"))


def run_loop(args: list[str]) -> tuple[float, str]:
    """(seconds, stdout) of `loop ARGS`; SystemExit when it fails."""
    started = time.perf_counter()
    result = subprocess.run([LOOP, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"loop {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


if __name__ == "__main__":  # (QA: run as a script, it printed nothing and exited 0 among the benchmarks)
    raise SystemExit("benchmarks/loop_cli.py holds functions the benchmark scripts share; it measures nothing itself: see README's Benchmarks")
