"""Fast in-memory replica of `loop simulate` on cached embeddings, for tuning acquisition strategies.

A `loop round` on the head strategy is, for selection purposes: out-of-fold probabilities of the labeled pool
(5-fold, the head as fold model) -> the head fitted on every labeled non-test image -> probabilities for every
image -> the defect threshold chosen on the out-of-fold scores -> metrics on the frozen test split -> the loop's
own gate estimates from the out-of-fold predictions -> `select_batch`. This script calls the same functions
(`out_of_fold_probabilities`, `head_fit_predict`, `fit_linear_head`, `choose_defect_threshold`,
`final_predictions`, `evaluate_predictions`, `select_batch`) with the same splits and seed labels as
`loop simulate` (same `assign_splits`, same seed draw), without the database, ONNX or oracle, so a whole curve
takes seconds instead of minutes and results transfer to the real command.

It needs the embedding cache a `loop simulate` run left behind (`--sim-dir`, default /tmp/bench/sim_mt): its
ground_truth.csv and cache/embeddings/<key>/ (modeling.embeddings.EmbeddingCache). Or, to try other features, a class-folder
dataset and an .npy of its embeddings in `benchmarks/feature_variants.py` order (class folders sorted, files sorted):

    python benchmarks/selection_tuning.py --dataset ../shared/datasets/magnetic_tile --embeddings /tmp/fv/variants/X.npy

    OMP_NUM_THREADS=1 python benchmarks/selection_tuning.py --strategies random,default --seeds 5    # seeds 0..4

The test split only reports (labels to pass the gates); nothing inside a run looks at it.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loop.ingest import assign_splits
from loop.round import selection_seed
from modeling.embeddings import EmbeddingCache
from modeling.evaluation import choose_defect_threshold, evaluate_predictions, final_predictions
from modeling.label_quality import out_of_fold_probabilities
from modeling.selection import select_batch
from modeling.training import fit_linear_head, head_fit_predict, softmax

GATES = {"macro_f1": (">=", 0.70), "defect_recall": (">=", 0.85), "negative_fpr": ("<=", 0.03)}


@dataclass
class Dataset:
    paths: list[str]
    labels: np.ndarray  # true class index per path
    classes: list[str]
    embeddings: np.ndarray
    truth: dict[str, str]


@dataclass
class Curve:
    strategy: str
    seed: int
    points: list[dict] = field(default_factory=list)
    labels_to_pass: int | None = None


def load_dataset(sim_dir: Path, negative_class: str) -> Dataset:
    with open(sim_dir / "ground_truth.csv") as handle:
        truth = {row["path"]: row["label"] for row in csv.DictReader(handle)}
    classes = sorted(set(truth.values()))
    classes.remove(negative_class)
    classes.insert(0, negative_class)
    (key_dir,) = [d for d in (sim_dir / "cache" / "embeddings").iterdir() if d.is_dir()]
    paths = sorted(truth)
    hashes = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    embeddings = EmbeddingCache(key_dir.parent, key_dir.name).get(hashes)
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[truth[p]] for p in paths], dtype=np.int64)
    return Dataset(paths, labels, classes, embeddings, truth)


def load_folder_dataset(root: Path, embeddings_file: Path, negative_class: str) -> Dataset:
    folder_order = [str(path) for name in sorted(d.name for d in root.iterdir() if d.is_dir())
                    for path in sorted((root / name).iterdir()) if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")]
    vectors = np.load(embeddings_file).astype(np.float32)
    if len(vectors) != len(folder_order):
        raise SystemExit(f"{embeddings_file} has {len(vectors)} rows for {len(folder_order)} images under {root}")
    truth = {path: Path(path).parent.name for path in folder_order}
    classes = sorted(set(truth.values()))
    classes.remove(negative_class)
    classes.insert(0, negative_class)
    row = {path: i for i, path in enumerate(folder_order)}
    paths = sorted(truth)
    class_index = {c: i for i, c in enumerate(classes)}
    return Dataset(paths, np.array([class_index[truth[p]] for p in paths], dtype=np.int64), classes,
                   vectors[[row[p] for p in paths]], truth)


def gates_pass(metrics: dict) -> bool:
    for name, (comparison, bound) in GATES.items():
        value = metrics.get(name)
        if value is None:
            continue
        if (comparison == ">=" and value < bound) or (comparison == "<=" and value > bound):
            return False
    return True


def run_curve(data: Dataset, *, strategy: str, seed: int, seed_labels: int = 40, budget: int = 20, max_labels: int = 600,
              negative_index: int = 0, max_fpr: float = 0.03, confidence: float = 0.75, stop_when_pass: bool = True,
              decision_rule: str = "pool", verbose: bool = False) -> Curve:
    # Same test split and seed labels as `loop simulate` for this seed.
    splits = assign_splits(data.truth, test_fraction=0.2, validation_fraction=0.0, seed=seed)
    test_paths = sorted(p for p, s in splits.items() if s == "test")
    pool_paths = sorted(p for p, s in splits.items() if s != "test")
    rng = np.random.default_rng(seed)
    seed_paths = set(rng.choice(pool_paths, size=min(seed_labels, len(pool_paths)), replace=False).tolist())
    position = {p: i for i, p in enumerate(data.paths)}
    order = np.array([position[p] for p in test_paths + pool_paths])  # images in ingest order: test first
    embeddings = data.embeddings[order]
    truth = data.labels[order]
    is_test = np.zeros(len(order), dtype=bool)
    is_test[: len(test_paths)] = True
    labels = np.full(len(order), -1, dtype=np.int64)
    for i, p in enumerate(test_paths + pool_paths):
        if p in seed_paths:
            labels[i] = truth[i]
    n_classes = len(data.classes)
    # Labeled because a non-random strategy chose it (the seed labels are a random sample): as `loop round` reads
    # it from the selections table.
    actively_picked = np.zeros(len(order), dtype=bool)
    curve = Curve(strategy, seed)
    round_number = 0
    while True:
        round_number += 1
        labeled = np.flatnonzero((labels >= 0) & ~is_test)
        oof = out_of_fold_probabilities(features=embeddings[labeled], labels=labels[labeled], n_folds=5, seed=seed,
                                        fit_predict=head_fit_predict(seed=seed), n_classes=n_classes)
        weight, bias = fit_linear_head(features=embeddings[labeled], labels=labels[labeled], n_classes=n_classes, seed=seed)
        probabilities = softmax(embeddings @ weight.T + bias)
        unlabeled_pool = np.flatnonzero((labels < 0) & ~is_test)
        # As in `loop round`: selection aims at the pool-aware estimate; the gates use the stratified rule unless asked.
        aim = choose_defect_threshold(p_defect=1.0 - oof[:, negative_index], is_defect=labels[labeled] != negative_index,
                                      max_fpr=max_fpr, confidence=confidence,
                                      unlabeled_p_defect=1.0 - probabilities[unlabeled_pool, negative_index] if len(unlabeled_pool) else None)
        choice = aim if decision_rule == "pool" else choose_defect_threshold(
            p_defect=1.0 - oof[:, negative_index], is_defect=labels[labeled] != negative_index, max_fpr=max_fpr, confidence=confidence,
            actively_picked=actively_picked[labeled] if decision_rule == "stratified" else None,
            n_unlabeled_negatives=float(probabilities[unlabeled_pool, negative_index].sum()))
        test = np.flatnonzero(is_test)
        predicted = final_predictions(probabilities=probabilities[test], negative_index=negative_index, threshold=choice.threshold)
        metrics = evaluate_predictions(y_true=truth[test], y_pred=predicted, probabilities=probabilities[test],
                                       class_names=data.classes, negative_index=negative_index)
        estimate = evaluate_predictions(
            y_true=labels[labeled], y_pred=final_predictions(probabilities=oof, negative_index=negative_index, threshold=choice.threshold),
            probabilities=oof, class_names=data.classes, negative_index=negative_index)
        if choice.estimated_population_fpr is not None:
            estimate["negative_fpr"] = choice.estimated_population_fpr
        estimated_gates = {
            "macro_f1": estimate["macro_f1"] >= GATES["macro_f1"][1],
            "defect_recall": None if estimate["defect_recall"] is None else estimate["defect_recall"] >= GATES["defect_recall"][1],
            "negative_fpr": None if estimate["negative_fpr"] is None else estimate["negative_fpr"] <= GATES["negative_fpr"][1],
        }
        passed = gates_pass(metrics)
        # Diagnostic only (never fed back): recall if the threshold had been set on the test split itself at the
        # FPR bound, separating "the model cannot" from "the threshold rule is too cautious".
        test_negative_scores = np.sort(1.0 - probabilities[test][truth[test] == negative_index, negative_index])[::-1]
        allowed = int(np.floor(max_fpr * len(test_negative_scores)))
        best_threshold = float(np.nextafter(test_negative_scores[allowed], np.inf))
        best = evaluate_predictions(y_true=truth[test], y_pred=final_predictions(probabilities=probabilities[test], negative_index=negative_index, threshold=best_threshold),
                                    probabilities=probabilities[test], class_names=data.classes, negative_index=negative_index)
        point = {"round": round_number, "labels": int(len(labeled)), "threshold": round(choice.threshold, 4),
                 **{k: round(metrics[k], 4) for k in GATES}, "pass": passed,
                 "test_best_threshold": {"threshold": round(best_threshold, 4), "macro_f1": round(best["macro_f1"], 4), "defect_recall": round(best["defect_recall"], 4)},
                 "est": {k: (None if estimate[k] is None else round(estimate[k], 3)) for k in GATES},
                 "counts": np.bincount(labels[labeled], minlength=n_classes).tolist()}
        curve.points.append(point)
        if verbose:
            print(f"  {strategy} seed {seed} r{round_number}: {point['labels']} labels thr {point['threshold']:.3f} "
                  f"F1 {point['macro_f1']:.3f} rec {point['defect_recall']:.3f} fpr {point['negative_fpr']:.3f} "
                  f"best-thr {point['test_best_threshold']} est {point['est']} counts {point['counts']} {'PASS' if passed else ''}", flush=True)
        if passed and curve.labels_to_pass is None:
            curve.labels_to_pass = point["labels"]
            if stop_when_pass:
                break
        candidates = np.flatnonzero((labels < 0) & ~is_test)
        if len(labeled) >= max_labels or len(candidates) == 0:
            break
        visible = labels.copy()
        visible[is_test] = -1
        result = select_batch(strategy=strategy, budget=min(budget, len(candidates)), embeddings=embeddings, probabilities=probabilities,
                              labels=visible, candidates=candidates, class_names=data.classes, negative_index=negative_index,
                              gate_estimates=estimated_gates, defect_threshold=aim.threshold, seed=selection_seed(seed, round_number))
        point["picked"] = int(len(result.indices))
        if len(result.indices) == 0:
            break
        labels[result.indices] = truth[result.indices]  # the oracle answers
        actively_picked[result.indices] = strategy != "random"
    return curve


def seed_list(text: str) -> list[int]:
    """`--seeds`: a count N means seeds 0..N-1, as `loop simulate --seeds N` does (it meant seed N alone, and a
    "--seeds 5" run compared one seed with the README's five); a comma list names seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count of seeds (5: seeds 0..4) or a comma list of seeds (3,7; one seed: 3,)") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a count of seeds (5: seeds 0..4) or a comma list of seeds (3,7; one seed: 3,)")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-dir", type=Path, default=Path("/tmp/bench/sim_mt"))
    parser.add_argument("--negative-class", default="free")
    parser.add_argument("--dataset", type=Path, default=None, help="class-folder dataset (with --embeddings)")
    parser.add_argument("--embeddings", type=Path, default=None, help=".npy of the dataset's embeddings, folder order")
    parser.add_argument("--decision-rule", choices=["cautious", "stratified", "pool"], default="stratified",
                        help="threshold for the gates: cautious (the blend rule on every labeled good part), stratified (what `loop "
                             "round` decides with: labeled good parts counted, unlabeled ones at the sampled ones' rate) or the pool-aware estimate")
    parser.add_argument("--threshold-fpr", type=float, default=0.03, help="FPR the threshold rule aims at (the gate stays 3%%)")
    parser.add_argument("--strategies", default="random,default")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("5"),
                        help="N: seeds 0..N-1, as `loop simulate --seeds N` (no seed picking); or a comma list of seeds: 3,7 (one seed: 3,)")
    parser.add_argument("--max-labels", type=int, default=600)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write every curve here")
    args = parser.parse_args(argv)
    data = (load_folder_dataset(args.dataset, args.embeddings, args.negative_class) if args.embeddings
            else load_dataset(args.sim_dir, args.negative_class))
    seeds = args.seeds
    results: dict[str, list[Curve]] = {}
    for strategy in args.strategies.split(","):
        started = time.perf_counter()
        curves = [run_curve(data, strategy=strategy, seed=s, max_labels=args.max_labels, verbose=args.verbose,
                            decision_rule=args.decision_rule, max_fpr=args.threshold_fpr) for s in seeds]
        results[strategy] = curves
        needed = [c.labels_to_pass for c in curves]
        median = statistics.median([n if n is not None else float("inf") for n in needed])
        points = [p for c in curves for p in c.points]
        over = sum(p["negative_fpr"] > GATES["negative_fpr"][1] for p in points)
        print(f"{strategy}: median {median} per seed {needed}; test FPR over the gate in {over}/{len(points)} rounds "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({s: [{"seed": c.seed, "labels_to_pass": c.labels_to_pass, "points": c.points} for c in cs]
                                         for s, cs in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
