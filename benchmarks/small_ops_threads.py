"""Threads for chains of small torch operations: the anomaly bank's greedy coreset and the linear head's LBFGS fit,
on torch's default thread count (the baseline: the machine's cores, 2 here) and on one
(modeling.threads.SMALL_OPS_THREADS), on an idle machine and with another process busy on one core (what a round
meets beside a test run or an inspection service).

    python benchmarks/small_ops_threads.py --out DIR [--patches 27500] [--bank 4000] [--head-rows 256,1024,4096]

Random inputs of the real shapes (the cost depends on the shapes only). Best of --repeats. Writes
small_ops_threads.json and .md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.anomaly import greedy_coreset  # noqa: E402
from modeling.latency import cpu_model_name  # noqa: E402
from modeling.threads import torch_threads  # noqa: E402
from modeling.training import fit_linear_head  # noqa: E402


def _busy() -> None:
    while True:
        pass


def best_of(repeats: int, work) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return round(min(times), 3)


def measure(threads: int, *, patches: np.ndarray, bank: int, heads: dict[int, tuple[np.ndarray, np.ndarray]], repeats: int) -> dict[str, float]:
    """Seconds for each piece of work with torch on `threads` threads throughout (the code's own choice overridden)."""
    import modeling.anomaly
    import modeling.training

    saved = {module: module.torch_threads for module in (modeling.anomaly, modeling.training)}
    for module in saved:  # the code's own torch_threads(SMALL_OPS_THREADS) made to keep `threads`
        module.torch_threads = lambda _n: torch_threads(threads)
    try:
        with torch_threads(threads):
            result = {f"coreset {len(patches)} -> {bank}": best_of(repeats, lambda: greedy_coreset(patches, size=bank))}
            for rows, (features, labels) in heads.items():
                result[f"head fit {rows} x {features.shape[1]}"] = best_of(repeats, lambda: fit_linear_head(features=features, labels=labels, n_classes=5))
    finally:
        for module, original in saved.items():
            module.torch_threads = original
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=27_500, help="good-part patches the coreset picks from")
    parser.add_argument("--dim", type=int, default=160, help="patch feature dimension")
    parser.add_argument("--bank", type=int, default=4000, help="memory bank size (loop.toml anomaly_bank_size)")
    parser.add_argument("--head-rows", default="256,1024,4096", help="labeled images of the head fits, comma-separated")
    parser.add_argument("--features", type=int, default=1280, help="embedding dimension of the head fits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        head_rows = [int(v) for v in args.head_rows.split(",") if v.strip()]
    except ValueError:
        parser.error("--head-rows: whole numbers, comma-separated")
    if args.patches < 2 or not 1 <= args.bank or args.dim < 2 or args.features < 2 or args.repeats < 1 or not head_rows or min(head_rows) < 10:
        parser.error("--patches >= 2, --bank >= 1, --dim and --features >= 2, --repeats >= 1, --head-rows each >= 10")

    rng = np.random.default_rng(0)
    patches = rng.standard_normal((args.patches, args.dim)).astype(np.float32)
    heads = {rows: (rng.standard_normal((rows, args.features)).astype(np.float32), rng.integers(0, 5, rows)) for rows in head_rows}
    default = torch.get_num_threads()
    baseline, one = f"{default} threads", "1 thread"
    results: dict[str, dict[str, dict[str, float]]] = {}
    load_before = os.getloadavg()[0]
    # "idle" only when the machine was: other work running beside it made the label a claim nobody checked (QA)
    quiet = "idle" if load_before < 0.5 else f"as found (1-minute load average {load_before:.1f})"
    for machine in (quiet, "one core busy"):
        busy = None
        if machine == "one core busy":
            busy = multiprocessing.get_context("spawn").Process(target=_busy, daemon=True)
            busy.start()
            time.sleep(0.5)
        try:
            results[machine] = {label: measure(threads, patches=patches, bank=args.bank, heads=heads, repeats=args.repeats)
                                for label, threads in ((baseline, default), (one, 1))}
        finally:
            if busy is not None:
                busy.terminate()
                busy.join(timeout=10)
    ratios = {machine: {work: round(by_threads[baseline][work] / max(by_threads[one][work], 1e-9), 2)
                        for work in by_threads[baseline]} for machine, by_threads in results.items()}
    report = {
        "cpu": cpu_model_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "baseline_threads": default, "seconds": results, "baseline_over_one_thread": ratios, "load_average_1m_before": round(load_before, 2),
        "note": f"baseline: torch's default, {default} threads here; ratios > 1 mean one thread is faster",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_ops_threads.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Threads for small torch operations ({report['cpu']}, {report['cpu_count']} CPUs)", "",
             f"| machine | work | {baseline} (s) | {one} (s) | {baseline} / {one} |", "|---|---|---|---|---|"]
    for machine, by_threads in results.items():
        for work, seconds in by_threads[baseline].items():
            lines.append(f"| {machine} | {work} | {seconds} | {by_threads[one][work]} | {ratios[machine][work]} |")
    (args.out / "small_ops_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
