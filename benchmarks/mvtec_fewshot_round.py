"""MVTec AD bottle few-shot through `loop round` itself (the CLI, the store, the deployed decision rule).

Per seed (the same draws as transfer_cv.py's few-shot): the 209 train/good images and 10 random defect images are
labeled (by a manifest, with their real defect type); the other 53 defects and the 20 test/good images are ingested
unlabeled, so no step of the round sees their labels. `loop round` draws its own frozen test split from the labeled
images, trains, blends the patch anomaly score in and picks the threshold on non-test data. The held-out images are
then scored from the predictions the round stored: ROC-AUC of P(defect), and defect recall and FPR of the stored
predicted labels (the round's threshold).

    python benchmarks/mvtec_fewshot_round.py --out DIR [--seeds 0,1,2,3,4] [--image-size 320] [--train head|finetune|full]

Target (issue 5): ROC-AUC >= 0.998 and defect recall >= 0.98 at FPR <= 3%. Writes DIR/result.json and DIR/result.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_cli import run_loop  # noqa: E402
import transfer_common  # noqa: E402
from transfer_common import load_mvtec_bottle  # noqa: E402

CLASSES = "good,broken_large,broken_small,contamination"


def run(args: list[str]) -> float:
    return run_loop(args)[0]


def one_seed(seed: int, *, out: Path, image_size: int, train: str = "head") -> dict:
    dataset = load_mvtec_bottle()
    origin = np.array(dataset.origin)
    defects = np.flatnonzero(dataset.labels == 1)
    labeled_defects = np.random.default_rng(seed).choice(defects, size=10, replace=False)  # as transfer_cv.run_fewshot
    labeled = set(np.flatnonzero(origin == "train/good").tolist()) | set(labeled_defects.tolist())
    seed_dir = out / f"seed-{seed}"
    shutil.rmtree(seed_dir, ignore_errors=True)
    seed_dir.mkdir(parents=True)
    manifest = seed_dir / "labels.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for index, path in enumerate(dataset.paths):
            writer.writerow([str(Path(path).resolve()), origin[index].split("/")[1] if index in labeled else ""])
    project = seed_dir / "project"
    run(["init", str(project), "--classes", CLASSES, "--negative-class", "good", "--image-size", str(image_size)])
    run(["ingest", str(manifest), "--project", str(project), "--quiet"])
    round_seconds = run(["round", "--project", str(project), "--quiet", "--train", train])
    with sqlite3.connect(project / "loop.db") as db:
        round_id, details = db.execute("select id, details from rounds order by number desc limit 1").fetchone()
        rows = db.execute(
            "select images.path, predictions.p_defect, predictions.predicted_label from predictions join images on images.id = predictions.image_id "
            "where predictions.round_id = ?", (round_id,)).fetchall()
    details = json.loads(details)
    stored = {str(Path(path).resolve()): (p_defect, predicted) for path, p_defect, predicted in rows}
    held_out = [index for index in range(len(dataset.paths)) if index not in labeled]
    is_defect = dataset.labels[held_out] == 1
    p_defect = np.array([stored[str(Path(dataset.paths[i]).resolve())][0] for i in held_out])
    flagged = np.array([stored[str(Path(dataset.paths[i]).resolve())][1] != "good" for i in held_out])
    return {
        "seed": seed, "n_held_out": len(held_out), "n_held_out_defects": int(is_defect.sum()), "round_seconds": round(round_seconds, 1),
        "roc_auc": float(roc_auc_score(is_defect, p_defect)), "defect_recall": float(flagged[is_defect].mean()),
        "fpr": float(flagged[~is_defect].mean()), "false_positives": int(flagged[~is_defect].sum()), "missed_defects": int((~flagged[is_defect]).sum()),
        "threshold": details.get("threshold"), "threshold_source": details.get("threshold_source"), "out_of_fold": details.get("out_of_fold"),
        "best_epoch": (details.get("training") or {}).get("best_epoch"),
        "anomaly": details.get("anomaly"), "labeled_counts": details.get("labeled_counts"),
        "latency_ms": None if (details.get("latency") or {}).get("ms_per_image") is None else round(details["latency"]["ms_per_image"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--train", default="head", choices=["head", "finetune", "full"], help="loop round --train (default: head, the project default)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(one_seed(seed, out=args.out, image_size=args.image_size, train=args.train))
        row = rows[-1]
        print(f"seed {seed}: AUC {row['roc_auc']:.4f} recall {row['defect_recall']:.4f} FPR {row['fpr']:.4f} "
              f"({row['false_positives']} FP of {row['n_held_out'] - row['n_held_out_defects']}) round {row['round_seconds']} s", flush=True)
    command = "python benchmarks/mvtec_fewshot_round.py " + " ".join(sys.argv[1:])
    machine = transfer_common.machine()  # round seconds and latency are this machine's
    (args.out / "result.json").write_text(json.dumps({"command": command, "machine": machine, "seeds": rows}, indent=2))
    lines = [f"# MVTec bottle few-shot through `loop round --train {args.train}` ({args.image_size} px)", "", f"Command: `{command}`", "",
             f"Machine: {machine['cpu']} ({machine['cpus']} CPUs).", "",
             "| seed | held out (defects) | ROC-AUC | defect recall | FPR | FP | missed | threshold | source | round s | latency ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['n_held_out']} ({r['n_held_out_defects']}) | {r['roc_auc']:.4f} | {r['defect_recall']:.4f} | {r['fpr']:.4f} | "
              f"{r['false_positives']} | {r['missed_defects']} | {r['threshold']:.4g} | {r['threshold_source']} | {r['round_seconds']} | {r['latency_ms']} |" for r in rows]
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
