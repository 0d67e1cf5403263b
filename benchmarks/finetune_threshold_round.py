"""Where a fine-tuned network's defect threshold is chosen, through `loop round --train finetune` itself.

With few labels, validation holds a few dozen good parts: a threshold read off them at a 3% false-positive rate
overshoots on new parts. The alternative the loop picks automatically (threshold_source = "auto") is out-of-fold
probabilities of networks fine-tuned per fold over every labeled non-test image. Both run here on the same labels:

Per seed, a random share of magnetic tile's physical tiles (all exposures of a tile together, `part` in the
manifest) is labeled; every other image is ingested unlabeled, so no step of the round sees its label. One project
per variant (loop.toml [model] threshold_source = "validation" | "auto"), the same seed, the same split. The
unlabeled images are then scored from the predictions the round stored: FPR on their good parts ("free", several
hundred: a precise rate) and defect recall on their defects, beside what the round itself estimated.

    python benchmarks/finetune_threshold_round.py --out DIR [--seeds 0,1,2,3,4] [--label-fraction 0.3] [--tiles N --epochs E]

Writes DIR/result.json and DIR/result.md.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_cli import run_loop  # noqa: E402
import transfer_common  # noqa: E402
from transfer_common import load_magnetic_tile, require_datasets  # noqa: E402

VARIANTS = ("validation", "auto")


def run(args: list[str]) -> float:
    return run_loop(args)[0]


def write_manifest(path: Path, dataset, labeled: set[int]) -> None:  # noqa: ANN001
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "part"])
        for index, image in enumerate(dataset.paths):
            label = dataset.class_names[dataset.labels[index]] if index in labeled else ""
            writer.writerow([str(Path(image).resolve()), label, f"tile-{dataset.groups[index]}"])


def one_run(dataset, labeled: set[int], *, variant: str, directory: Path, epochs: int | None) -> dict:  # noqa: ANN001
    from loop.config import load_config, save_config

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    manifest = directory / "labels.csv"
    write_manifest(manifest, dataset, labeled)
    project = directory / "project"
    run(["init", str(project), "--classes", ",".join(dataset.class_names), "--negative-class", dataset.class_names[dataset.negative_index]])
    config = load_config(project)
    config.model.threshold_source = variant
    if epochs is not None:
        config.model.training = {**config.model.training, "epochs": epochs}
    save_config(project, config)
    run(["ingest", str(manifest), "--project", str(project), "--quiet"])
    seconds = run(["round", "--project", str(project), "--quiet", "--train", "finetune"])
    with sqlite3.connect(project / "loop.db") as db:
        round_id, details = db.execute("select id, details from rounds order by number desc limit 1").fetchone()
        rows = db.execute("select images.path, predictions.predicted_label from predictions join images on images.id = predictions.image_id "
                          "where predictions.round_id = ?", (round_id,)).fetchall()
        test = dict(db.execute("select name, value from metrics where round_id = ? and class_name is null", (round_id,)).fetchall())
    details = json.loads(details)
    predicted = {str(Path(path).resolve()): label for path, label in rows}
    negative = dataset.class_names[dataset.negative_index]
    unlabeled = [i for i in range(len(dataset.paths)) if i not in labeled]
    is_defect = dataset.labels[unlabeled] != dataset.negative_index
    flagged = np.array([predicted[str(Path(dataset.paths[i]).resolve())] != negative for i in unlabeled])
    choice = details.get("threshold_choice") or {}
    return {
        "variant": variant, "threshold_source": details.get("threshold_source"), "threshold": details.get("threshold"),
        "n_threshold_negatives": choice.get("n_negatives"), "out_of_fold": details.get("out_of_fold"),
        "calibration_fitted_on": (details.get("calibration") or {}).get("fitted_on"),
        "unlabeled_fpr": float(flagged[~is_defect].mean()), "unlabeled_false_positives": int(flagged[~is_defect].sum()),
        "unlabeled_good": int((~is_defect).sum()), "unlabeled_defect_recall": float(flagged[is_defect].mean()),
        "unlabeled_defects": int(is_defect.sum()),
        "estimated_fpr": (details.get("estimated_metrics") or {}).get("negative_fpr"), "test_split_fpr": test.get("negative_fpr"),
        "test_split_defect_recall": test.get("defect_recall"), "round_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--label-fraction", type=float, default=0.3, help="share of the physical tiles labeled")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs at most (default: the project default)")
    parser.add_argument("--tiles", type=int, help="only this many physical tiles, drawn with seed 0 (a smoke run; default: all)")
    args = parser.parse_args()
    require_datasets()
    dataset = load_magnetic_tile()
    if args.tiles:
        kept = set(np.random.default_rng(0).choice(np.unique(dataset.groups), size=args.tiles, replace=False).tolist())
        rows = [i for i, tile in enumerate(dataset.groups) if tile in kept]
        dataset = dataclasses.replace(dataset, paths=[dataset.paths[i] for i in rows], labels=dataset.labels[rows], groups=dataset.groups[rows], origin=[])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    tiles = np.unique(dataset.groups)
    for seed in (int(s) for s in args.seeds.split(",")):
        chosen = set(np.random.default_rng(seed).choice(tiles, size=int(round(args.label_fraction * len(tiles))), replace=False).tolist())
        labeled = {i for i, tile in enumerate(dataset.groups) if tile in chosen}
        for variant in VARIANTS:
            row = {"seed": seed, "n_labeled": len(labeled), **one_run(dataset, labeled, variant=variant, directory=args.out / f"seed-{seed}-{variant}",
                                                                       epochs=args.epochs)}
            rows.append(row)
            print(f"seed {seed} {variant}: source {row['threshold_source']} ({row['n_threshold_negatives']} good parts), unlabeled FPR "
                  f"{row['unlabeled_fpr']:.4f} ({row['unlabeled_false_positives']} of {row['unlabeled_good']}), recall {row['unlabeled_defect_recall']:.4f}, "
                  f"estimated FPR {row['estimated_fpr']}, round {row['round_seconds']} s", flush=True)
    command = "python benchmarks/finetune_threshold_round.py " + " ".join(sys.argv[1:])
    summary = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {"median_unlabeled_fpr": float(np.median([r["unlabeled_fpr"] for r in mine])),
                            "max_unlabeled_fpr": float(max(r["unlabeled_fpr"] for r in mine)),
                            "median_unlabeled_defect_recall": float(np.median([r["unlabeled_defect_recall"] for r in mine])),
                            "median_round_seconds": float(np.median([r["round_seconds"] for r in mine]))}
    machine = transfer_common.machine()  # round seconds are this machine's
    (args.out / "result.json").write_text(json.dumps({"command": command, "machine": machine, "summary": summary, "runs": rows}, indent=2))
    lines = ["# Fine-tuned network: threshold on validation vs on out-of-fold fine-tuned networks (magnetic tile)", "",
             f"Machine: {machine['cpu']} ({machine['cpus']} CPUs).", "",
             f"Command: `{command}`", "",
             "| seed | labeled | variant | source (good parts) | unlabeled FPR (FP / good) | unlabeled defect recall | estimated FPR | test-split FPR | round s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['n_labeled']} | {r['variant']} | {r['threshold_source']} ({r['n_threshold_negatives']}) | {r['unlabeled_fpr']:.4f} "
              f"({r['unlabeled_false_positives']} / {r['unlabeled_good']}) | {r['unlabeled_defect_recall']:.4f} | "
              f"{'' if r['estimated_fpr'] is None else format(r['estimated_fpr'], '.4f')} | "
              f"{'' if r['test_split_fpr'] is None else format(r['test_split_fpr'], '.4f')} | {r['round_seconds']} |" for r in rows]
    lines += ["", "| variant | median unlabeled FPR | max unlabeled FPR | median defect recall | median round s |", "|---|---|---|---|---|"]
    lines += [f"| {v} | {s['median_unlabeled_fpr']:.4f} | {s['max_unlabeled_fpr']:.4f} | {s['median_unlabeled_defect_recall']:.4f} | {s['median_round_seconds']} |"
              for v, s in summary.items()]
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
