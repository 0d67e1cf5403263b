"""Benchmark: `loop init`, `loop ingest`, two `loop round`s and `loop status --json` on a real dataset, run through
the CLI exactly as a user would. Reports test-split metrics, cold vs warm round wall time and per-step timings.

    python benchmarks/loop_rounds.py --dataset ../shared/datasets/magnetic_tile --out benchmarks/results/magnetic_tile \
        --classes free,blowhole,break,crack,fray,uneven --negative-class free

Targets (issue "The loop, end to end"): macro F1 >= 0.90; cold round <= 180 s, warm round <= 60 s on 2 cores.
The baseline in the same run is the cold round itself: the warm/cold ratio shows what the embedding cache buys.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_cli import run_loop as run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--classes", required=True)
    parser.add_argument("--negative-class")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", default="head")
    parser.add_argument("--image-size", type=int, help="loop init --image-size (default: the project default)")
    parser.add_argument("--target-macro-f1", type=float, default=0.90)
    parser.add_argument("--cold-budget-s", type=float, default=180.0)
    parser.add_argument("--warm-budget-s", type=float, default=60.0)
    args = parser.parse_args()
    if not args.dataset.is_dir():
        raise SystemExit(f"dataset {args.dataset} not found (real datasets live in ../shared/datasets)")

    args.out.mkdir(parents=True, exist_ok=True)
    project = args.out / "project"
    shutil.rmtree(project, ignore_errors=True)
    timings: dict[str, float] = {}
    init_args = ["init", str(project), "--classes", args.classes, "--train", args.train]
    if args.negative_class:
        init_args += ["--negative-class", args.negative_class]
    if args.image_size:
        init_args += ["--image-size", str(args.image_size)]
    timings["init_s"], _ = run(init_args)
    timings["ingest_s"], ingest_output = run(["ingest", str(args.dataset.resolve()), "--project", str(project), "--quiet"])
    timings["round1_cold_s"], _ = run(["round", "--project", str(project), "--quiet"])
    timings["round2_warm_s"], _ = run(["round", "--project", str(project), "--quiet"])
    timings["status_s"], status_json = run(["status", "--project", str(project), "--json"])
    status = json.loads(status_json)
    rounds = status["rounds"]
    last = rounds[-1]
    result = {
        "dataset": str(args.dataset),
        "machine": {"cpu": last["latency"]["cpu"], "cores": os.cpu_count()},
        "train_strategy": args.train,
        "image_size": args.image_size or "project default",
        "images": status["images"],
        "labels": status["labels"]["by_class"],
        "quarantined": len(status["quarantined"]),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "warm_over_cold": round(timings["round2_warm_s"] / timings["round1_cold_s"], 3),
        "rounds": [{"number": r["number"], "metrics": r["metrics"], "gates": r["gates"], "threshold": r["threshold"],
                    "labeled_counts": r["labeled_counts"], "step_timings_s": r["step_timings_s"]} for r in rounds],
        "targets": {
            "macro_f1": {"target": args.target_macro_f1, "value": last["metrics"]["macro_f1"], "met": last["metrics"]["macro_f1"] >= args.target_macro_f1},
            "cold_round_s": {"target": args.cold_budget_s, "value": round(timings["round1_cold_s"], 1), "met": timings["round1_cold_s"] <= args.cold_budget_s},
            "warm_round_s": {"target": args.warm_budget_s, "value": round(timings["round2_warm_s"], 1), "met": timings["round2_warm_s"] <= args.warm_budget_s},
        },
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    lines = [f"# loop rounds on `{args.dataset.name}`", "", f"CPU: {result['machine']['cpu']} ({result['machine']['cores']} cores); training strategy `{args.train}`, image size {result['image_size']}", "",
             "| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {t['value']:.4g} | {'>=' if name == 'macro_f1' else '<='} {t['target']:g} | {'yes' if t['met'] else 'NO'} |")
    lines += ["", "| command | wall s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    lines += ["", f"warm / cold round time: {result['warm_over_cold']:.2f}", "", "## per round", ""]
    for r in result["rounds"]:
        m = r["metrics"]
        lines.append(f"round {r['number']}: macro F1 {m['macro_f1']:.4f}, accuracy {m['accuracy']:.4f}, defect recall {m.get('defect_recall')}, "
                     f"FPR {m.get('negative_fpr')}, ROC-AUC {m.get('roc_auc_defect')}, latency {m['latency_ms']:.2f} ms/image, threshold {r['threshold']}")
        lines.append("")
        lines.append("| step | s |")
        lines.append("|---|---|")
        lines += [f"| {k} | {v} |" for k, v in r["step_timings_s"].items()]
        lines.append("")
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
