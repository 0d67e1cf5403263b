"""The k-NN graph near-duplicates and outliers read, at project scale: a first round, then the next round with 1% new
images, computed from scratch (the baseline, what every round did before) and from the graph the first round kept
(`modeling.neighbor_graph.NeighborGraphCache`), then a round with no new image.

    python benchmarks/neighbor_graph_scale.py --out DIR [--n 50000] [--dim 1280] [--new-share 0.01]

Random unit embeddings (the cost depends on n and the dimension only). Both ways must give the same graph. Writes
neighbor_graph_scale.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.latency import cpu_model_name  # noqa: E402
from modeling.neighbor_graph import GRAPH_NEIGHBORS, NeighborGraphCache, nearest_neighbors  # noqa: E402


def timed(**kwargs) -> tuple[float, object]:  # noqa: ANN003
    started = time.perf_counter()
    graph = nearest_neighbors(k=GRAPH_NEIGHBORS, **kwargs)
    return round(time.perf_counter() - started, 2), graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="images in the first round")
    parser.add_argument("--dim", type=int, default=1280, help="embedding dimension (efficientnet_lite0: 1280)")
    parser.add_argument("--new-share", type=float, default=0.01, help="new images in the second round, as a share of --n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.n < 20 or args.dim < 2 or not 0 < args.new_share <= 1:
        parser.error("--n >= 20, --dim >= 2, 0 < --new-share <= 1")

    rng = np.random.default_rng(args.seed)
    n_new = max(1, round(args.new_share * args.n))
    embeddings = rng.standard_normal((args.n + n_new, args.dim)).astype(np.float32)
    keys = [f"{i:064x}" for i in range(args.n + n_new)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.npz"
        first_s, first = timed(embeddings=embeddings[:args.n], keys=keys[:args.n], cache=NeighborGraphCache(path))
        cache_bytes = path.stat().st_size
        load_started = time.perf_counter()
        NeighborGraphCache(path)
        load_s = round(time.perf_counter() - load_started, 2)
        kept_s, kept = timed(embeddings=embeddings, keys=keys, cache=NeighborGraphCache(path))
        unchanged_s, unchanged = timed(embeddings=embeddings, keys=keys, cache=NeighborGraphCache(path))
    scratch_s, scratch = timed(embeddings=embeddings)
    same_graph = bool(np.array_equal(kept.positions, scratch.positions) and np.allclose(kept.similarities, scratch.similarities, atol=1e-5)
                      and np.array_equal(unchanged.positions, scratch.positions))
    rows = [
        ("first round (nothing kept)", args.n, first_s, first.status),
        ("next round, +{:.0%} images, from scratch (baseline)".format(args.new_share), args.n + n_new, scratch_s, scratch.status),
        ("next round, +{:.0%} images, kept graph".format(args.new_share), args.n + n_new, kept_s, kept.status),
        ("a round with no new image, kept graph", args.n + n_new, unchanged_s, unchanged.status),
    ]
    report = {
        "n_first_round": args.n, "n_second_round": args.n + n_new, "dim": args.dim, "k": GRAPH_NEIGHBORS, "seed": args.seed,
        "runs": [{"run": label, "images": images, "seconds": seconds, **{key: status.get(key) for key in ("rows_computed", "rows_from_cache")}}
                 for label, images, seconds, status in rows],
        "next_round_speedup": round(scratch_s / max(kept_s, 1e-9), 1),
        "same_graph_as_from_scratch": same_graph, "cache_file_bytes": cache_bytes, "cache_load_seconds": load_s,
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model_name(), "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neighbor_graph_scale.json").write_text(json.dumps(report, indent=2))
    table = "\n".join(f"| {r['run']} | {r['images']} | {r['seconds']} | {r['rows_computed']} | {r['rows_from_cache']} |" for r in report["runs"])
    markdown = f"""# The k-NN graph at scale

Command: `python benchmarks/neighbor_graph_scale.py --out {args.out} --n {args.n} --dim {args.dim} --new-share {args.new_share} --seed {args.seed}`
({report['machine']['cpus']} CPUs, {report['machine']['processor']}). Random {args.dim}-d embeddings, k = {GRAPH_NEIGHBORS}.

| run | images | seconds | rows computed | rows from the kept graph |
|---|---|---|---|---|
{table}

Next round: {report['next_round_speedup']}x faster with the kept graph; the same graph as from scratch: {'yes' if same_graph else 'NO'}.
Kept graph on disk: {cache_bytes / 1e6:.1f} MB, read in {load_s} s.
"""
    (args.out / "neighbor_graph_scale.md").write_text(markdown)
    print(markdown)
    return 0 if same_graph else 1


if __name__ == "__main__":
    raise SystemExit(main())
