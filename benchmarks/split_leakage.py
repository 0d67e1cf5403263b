"""Do near-copies of one physical part sit on both sides of a split? Checked on the real datasets with what a round
runs: `find_near_duplicates` on the round's embeddings (pretrained efficientnet_lite0, multilayer pooling, 224 px)
with pixel verification (`modeling.image_detail` thumbnails):

    python benchmarks/split_leakage.py --out DIR [--datasets neu,magnetic_tile,mvtec_bottle]

Per dataset:
- why cosine alone cannot tell: every image's most similar other image, and how many images have one at or above
  each cosine threshold;
- the pixel-verified near-duplicates: threshold (from random pairs), flagged pairs and images, pairs across classes,
  and the flagged pairs nearest the threshold as a PNG to look at (DIR/<dataset>_near_duplicates.png);
- on magnetic tile, where the physical tiles are known (transfer_common.exposure_series): the flagged pairs' precision
  (same tile) and the share of photos with a flagged photo of their own tile;
- a leak test: a linear probe on the same embeddings (StandardScaler + logistic regression, C=0.1, balanced), 5 folds
  for each of the fold seeds 0-4 (one fold assignment alone is too noisy to tell), split by file (byte-identical copies together, what the NEU and MVTec figures use), by near-duplicate
  group, and on magnetic tile by tile. If a by-file figure falls when near-duplicates are kept together, near-copies
  inflated it.

Writes DIR/split_leakage.json and DIR/split_leakage.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import transfer_common
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transfer_common import (
    DATASETS_ROOT,
    _merge_groups,
    exposure_series,
    group_ids,
    markdown_table,
)

from modeling.embeddings import compute_embeddings
from modeling.image_detail import detail_thumbnails
from modeling.label_quality import find_near_duplicates
from modeling.latency import cpu_model_name

THRESHOLDS = (0.90, 0.93, 0.95, 0.97, 0.98, 0.99)
N_PAIRS_SHOWN = 8


def nearest_other(similarity: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best similarity, index) per row over the columns not excluded (exclude: (n, n) bool)."""
    masked = np.where(exclude, -np.inf, similarity)
    best = masked.argmax(axis=1)
    return masked[np.arange(len(masked)), best], best


FOLD_SEEDS = (0, 1, 2, 3, 4)  # one fold assignment moves NEU's probe between 4 and 9 errors: the split's effect needs several


def probe(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray, negative_index: int | None) -> dict[str, Any]:
    """Linear probe, 5 stratified group folds for each of FOLD_SEEDS: pooled held-out errors per fold seed, and the
    mean accuracy, macro F1 and (with a good class) ROC-AUC of P(defect) over the seeds."""
    runs = []
    for seed in FOLD_SEEDS:
        splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
        probabilities = np.zeros((len(labels), len(np.unique(labels))))
        for train, test in splitter.split(embeddings, labels, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
            model.fit(embeddings[train], labels[train])
            probabilities[test] = model.predict_proba(embeddings[test])
        predicted = probabilities.argmax(axis=1)
        run = {"errors": int((predicted != labels).sum()), "accuracy": float(accuracy_score(labels, predicted)),
               "macro_f1": float(f1_score(labels, predicted, average="macro"))}
        if negative_index is not None:
            run["roc_auc"] = float(roc_auc_score(labels != negative_index, 1.0 - probabilities[:, negative_index]))
        runs.append(run)
    result: dict[str, Any] = {"n_groups": len(np.unique(groups)), "errors_per_fold_seed": [run["errors"] for run in runs],
                              "errors": float(np.mean([run["errors"] for run in runs]))}
    for key in ("accuracy", "macro_f1", "roc_auc"):
        if key in runs[0]:
            result[key] = float(np.mean([run[key] for run in runs]))
    return result


def closest_pairs_png(paths: list[str], pairs: list[tuple[int, int, float]], labels: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(len(pairs), 2, figsize=(4.4, 2.2 * len(pairs)))
    axes = np.atleast_2d(axes)
    for row, (a, b, sim) in enumerate(pairs):
        for col, index in enumerate((a, b)):
            with Image.open(paths[index]) as image:
                axes[row, col].imshow(image.convert("L"), cmap="gray")
            axes[row, col].set_title(f"{Path(paths[index]).name} ({labels[index]})" + (f"  r {sim:.3f}" if col == 0 else ""), fontsize=6)
            axes[row, col].axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def check_dataset(name: str, root: Path, out: Path) -> dict[str, Any]:
    loaders = {"neu": lambda: transfer_common.load_neu(root, group_by="file"), "magnetic_tile": lambda: transfer_common.load_magnetic_tile(root, group_by="file"),
               "mvtec_bottle": lambda: transfer_common.load_mvtec_bottle(root)}
    dataset = loaders[name]()  # by file: this script finds the groups itself
    started = time.perf_counter()
    embeddings = compute_embeddings(paths=dataset.paths, image_size=224, pooling="multilayer")
    embed_seconds = time.perf_counter() - started
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = embeddings @ embeddings.T
    file_groups = np.unique(dataset.groups, return_inverse=True)[1]
    identical = file_groups[:, None] == file_groups[None, :]  # includes the diagonal
    best, _ = nearest_other(similarity, identical)
    started = time.perf_counter()
    thumbnails = detail_thumbnails(dataset.paths)
    thumbnail_seconds = time.perf_counter() - started
    started = time.perf_counter()
    finding = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails)
    find_seconds = time.perf_counter() - started
    pairs = np.array([[a, b, c] for (a, b), c in finding.summary["pairs"]]).reshape(-1, 3)
    a_index, b_index = pairs[:, 0].astype(int), pairs[:, 1].astype(int)
    near_groups = _merge_groups(file_groups, group_ids(len(file_groups), finding.summary["groups"]))
    result: dict[str, Any] = {
        "n_images": len(dataset.paths), "n_byte_identical_extra_copies": int(len(dataset.paths) - len(np.unique(file_groups))),
        "embedding_dim": int(embeddings.shape[1]), "embed_seconds": round(embed_seconds, 1),
        "cosine": {
            "nearest_other_quantiles": {q: float(np.quantile(best, float(q))) for q in ("0.05", "0.5", "0.95", "1.0")},
            "images_with_neighbor_at_or_above": {str(t): int((best >= t).sum()) for t in THRESHOLDS},
        },
        "near_duplicates": {
            **{key: finding.summary[key] for key in ("threshold", "null_level", "n_null_pairs", "n_candidate_pairs", "n_groups")},
            "n_pairs": len(pairs), "n_images": int(finding.is_issue.sum()),
            "largest_group": int(max((len(g) for g in finding.summary["groups"]), default=0)),
            "pairs_across_classes": int((dataset.labels[a_index] != dataset.labels[b_index]).sum()),
            "thumbnail_seconds": round(thumbnail_seconds, 1), "find_seconds": round(find_seconds, 1),
        },
        "probe": {"by_file": probe(embeddings, dataset.labels, file_groups, dataset.negative_index),
                  "by_near_duplicate_group": probe(embeddings, dataset.labels, near_groups, dataset.negative_index)},
    }
    if name == "magnetic_tile":
        tiles = _merge_groups(file_groups, exposure_series(dataset.paths))
        sizes = np.bincount(np.unique(tiles, return_inverse=True)[1])[np.unique(tiles, return_inverse=True)[1]]
        same = tiles[a_index] == tiles[b_index]
        with_sibling_flagged = np.zeros(len(tiles), dtype=bool)
        with_sibling_flagged[a_index[same]] = with_sibling_flagged[b_index[same]] = True
        result["tiles"] = {
            "n_tiles": len(np.unique(tiles)),
            "flagged_pairs_same_tile": int(same.sum()), "flagged_pairs_other_tile": int((~same).sum()),
            "photos_of_multi_photo_tiles_with_a_flagged_sibling": float(with_sibling_flagged[sizes > 1].mean()),
        }
        result["probe"]["by_tile"] = probe(embeddings, dataset.labels, tiles, dataset.negative_index)
    borderline = np.argsort(pairs[:, 2])[:N_PAIRS_SHOWN] if len(pairs) else []
    shown = [(int(pairs[i, 0]), int(pairs[i, 1]), float(pairs[i, 2])) for i in borderline]
    result["weakest_flagged_pairs"] = [{"a": dataset.paths[a].split("datasets/")[-1], "b": dataset.paths[b].split("datasets/")[-1], "correlation": c}
                                       for a, b, c in shown]
    if shown:
        labels = [dataset.class_names[label] for label in dataset.labels]
        closest_pairs_png(dataset.paths, shown, labels, out / f"{name}_near_duplicates.png",
                          f"{name}: the {len(shown)} flagged pairs nearest the threshold ({finding.summary['threshold']:.3f})")
    return result


def report(results: dict[str, Any]) -> str:
    lines = ["# Near-duplicates across splits", "",
             f"Machine: {results['machine']}. Embeddings: pretrained efficientnet_lite0, multilayer pooling, 224 px.", ""]
    for name, result in results["datasets"].items():
        cosine, near = result["cosine"], result["near_duplicates"]
        lines += [f"## {name}", "",
                  f"{result['n_images']} images ({result['n_byte_identical_extra_copies']} extra byte-identical copies).", "",
                  "Cosine alone: most similar other image, quantiles 5/50/95/100%: "
                  + " / ".join(f"{v:.3f}" for v in cosine["nearest_other_quantiles"].values())
                  + "; images with a neighbour at or above " + ", ".join(f"{t}: {n}" for t, n in cosine["images_with_neighbor_at_or_above"].items()) + ".", "",
                  (f"Pixel-verified: threshold {near['threshold']:.3f} (random pairs' 99.9% quantile {near['null_level']:.3f}, "
                   f"{near['n_null_pairs']} pairs); {near['n_pairs']} of {near['n_candidate_pairs']} candidate pairs flagged, "
                   f"{near['n_images']} images in {near['n_groups']} groups (largest {near['largest_group']}), "
                   f"{near['pairs_across_classes']} pairs across classes; thumbnails {near['thumbnail_seconds']} s, search {near['find_seconds']} s."), ""]
        if "tiles" in result:
            tiles = result["tiles"]
            lines += [(f"Tiles: {tiles['n_tiles']}. Flagged pairs on one tile / on two tiles: {tiles['flagged_pairs_same_tile']} / "
                       f"{tiles['flagged_pairs_other_tile']}; photos of multi-photo tiles with a flagged photo of their own tile: "
                       f"{tiles['photos_of_multi_photo_tiles_with_a_flagged_sibling']:.1%}."), ""]
        rows = [{"split": split, **values} for split, values in result["probe"].items()]
        for row in rows:
            row["per_seed"] = ", ".join(map(str, row["errors_per_fold_seed"]))
        columns = [("split", "split"), ("n_groups", "groups"), ("per_seed", "errors, fold seeds 0-4"), ("errors", "mean errors"),
                   ("accuracy", "accuracy"), ("macro_f1", "macro F1")]
        if any("roc_auc" in row for row in rows):
            columns.append(("roc_auc", "ROC-AUC"))
        lines += ["Linear probe, 5 folds for each fold seed (means over the seeds):", "", markdown_table(rows, columns), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", default="neu,magnetic_tile,mvtec_bottle")
    parser.add_argument("--root", type=Path, default=DATASETS_ROOT)
    args = parser.parse_args()
    root = transfer_common.require_datasets(args.root.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": cpu_model_name(), "thresholds": THRESHOLDS, "datasets": {}}
    for name in args.datasets.split(","):
        results["datasets"][name] = check_dataset(name, root, args.out)
        print(f"{name}: done", flush=True)
    (args.out / "split_leakage.json").write_text(json.dumps(results, indent=2))
    (args.out / "split_leakage.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
