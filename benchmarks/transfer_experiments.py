"""The transfer-learning experiments an engineer shows a manager, on ../shared/datasets, through the training
registry (the code `loop round` runs):

- T1 frozen backbone + linear head on NEU;
- T2 fine-tuning with vs without input-space augmentation: training curves side by side, seconds per epoch;
- T3 before vs after unfreezing the last layers (2 of 7 stages + conv_head) at backbone LR 1e-5 (and 1e-4);
- T4 the NEU model (metal) transferred to MVTec bottle vs ImageNet init, metrics metal vs bottle;
- baselines on the same splits: efficientnet_lite0 from random init ("from scratch") and an RBF SVM on HOG+LBP.

    python benchmarks/transfer_experiments.py --out DIR [--quick]

Splits: NEU: fold 0 of StratifiedGroupKFold(5, shuffle, seed 0) is the 20% test split (360 images); inside the
other 80%, 20% is validation (early stopping, temperature). MVTec bottle (320 px): its train folder holds only good parts,
so all 292 images are pooled as good vs defect and split the same way (fold 0: 59 test images, 13 defects); the
FPR <= 3% threshold comes from validation only. Writes PNG curves, transfer_experiments.md and .json into DIR.
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
from pydantic import ValidationError  # noqa: E402

import transfer_common  # noqa: E402
from transfer_common import (  # noqa: E402
    Dataset,
    final_predictions,
    fit_calibrate_predict,
    load_mvtec_bottle,
    load_neu,
    markdown_table,
    metrics,
    outer_folds,
    pretrained_backbone,
    training_data,
    validation_split,
)

from modeling.backbones import create_backbone  # noqa: E402
from modeling.baselines import HandcraftedFeatureConfig, handcrafted_features, train_from_scratch, train_handcrafted_svm  # noqa: E402
from loop.config import ModelConfig, validation_problems  # noqa: E402
from modeling.calibration import fit_temperature  # noqa: E402
from modeling.finetune import FinetuneConfig  # noqa: E402
from modeling.plots import plot_training_curves  # noqa: E402
from modeling.transfer import load_init_checkpoint, save_model_checkpoint  # noqa: E402

METRIC_COLUMNS = [
    ("model", "model"), ("accuracy", "accuracy"), ("macro_precision", "precision (macro)"), ("macro_recall", "recall (macro)"),
    ("macro_f1", "F1 (macro)"), ("roc_auc", "ROC-AUC"), ("errors", "errors"), ("train_seconds", "train s"),
]
BINARY_COLUMNS = METRIC_COLUMNS[:-1] + [("defect_recall", "defect recall"), ("fpr", "FPR"), ("train_seconds", "train s")]


def subsample(dataset: Dataset, fraction: float, seed: int = 0) -> Dataset:
    if fraction >= 1.0:
        return dataset
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(dataset.labels == c), max(6, int(fraction * (dataset.labels == c).sum())), replace=False)
        for c in np.unique(dataset.labels)
    ]))
    return Dataset(dataset.name, dataset.class_names, [dataset.paths[i] for i in keep], dataset.labels[keep], dataset.negative_index,
                   dataset.groups[keep], [dataset.origin[i] for i in keep] if dataset.origin else [], dataset.note)


def split(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train_all, test = outer_folds(dataset, n_splits=5, seed=0)[0]
    train, validation = validation_split(dataset, train_all, fraction=0.2, seed=0)
    return train, validation, test


def evaluate_fit(name: str, dataset: Dataset, test: np.ndarray, result: Any) -> dict[str, Any]:
    threshold = result.threshold.threshold if result.threshold else None
    predictions = final_predictions(probabilities=result.probabilities, negative_index=dataset.negative_index, threshold=threshold)
    row = {"model": name, "train_seconds": result.train_seconds, "temperature": result.temperature, "threshold": threshold,
           **metrics(dataset.labels[test], result.probabilities, predictions, class_names=dataset.class_names, negative_index=dataset.negative_index)}
    return row


def svm_baseline(dataset: Dataset, train: np.ndarray, test: np.ndarray, *, config: HandcraftedFeatureConfig) -> dict[str, Any]:
    paths = np.array(dataset.paths)
    started = time.perf_counter()
    classifier = train_handcrafted_svm(class_names=dataset.class_names, train_features=handcrafted_features(list(paths[train]), config=config),
                                       train_labels=dataset.labels[train], feature_config=config)
    seconds = time.perf_counter() - started
    probabilities = classifier.predict_proba_paths(list(paths[test]))
    predictions = probabilities.argmax(1)
    return {"model": "SVM on HOG+LBP", "train_seconds": seconds,
            **metrics(dataset.labels[test], probabilities, predictions, class_names=dataset.class_names, negative_index=dataset.negative_index)}


def scratch_baseline(dataset: Dataset, train: np.ndarray, validation: np.ndarray, test: np.ndarray, *, image_size: int, epochs: int) -> tuple[dict[str, Any], list]:
    backbone = pretrained_backbone()
    data = training_data(dataset, train, validation, backbone=backbone, image_size=image_size, options={"threads": 2, "epochs": epochs, "patience": epochs})
    started = time.perf_counter()
    classifier = train_from_scratch(data)
    seconds = time.perf_counter() - started
    classifier.temperature = fit_temperature(logits=classifier.validation_logits, labels=data.validation_labels)
    probabilities = classifier.predict_proba_paths(list(np.array(dataset.paths)[test]))
    predictions = probabilities.argmax(1)
    row = {"model": f"from scratch ({image_size} px, {epochs} epochs max)", "train_seconds": seconds,
           **metrics(dataset.labels[test], probabilities, predictions, class_names=dataset.class_names, negative_index=dataset.negative_index)}
    return row, classifier.history


QUICK_FRACTION = 0.25  # of NEU; MVTec bottle keeps max(this, 0.5) of its images (subsample: per class, at least 6)
QUICK_EPOCHS, QUICK_SCRATCH = 2, (48, 2)  # fine-tuning epochs; the from-scratch baseline's px and epochs (bottle: 128 px, 4)
QUICK_HELP = (
    "a smoke run, still ~14 trainings: 25%% of NEU (450 of its 1800 images, 224 px) and 50%% of MVTec bottle (145 of its 292, "
    "320 px); every fine-tuning run at most 2 epochs (the augmented one too). NEU: T1 head, T2 three finetune runs, T3 two "
    "(one of 0 epochs), HOG+LBP SVM, from scratch at 48 px for 2 epochs; bottle: head and finetune from ImageNet and from the "
    "NEU model (4 runs), SVM, from scratch at 128 px for 4 epochs (--skip-scratch drops both scratch runs). "
    "Sets --epochs, --scratch-size and --scratch-epochs itself, so they cannot be given with it"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"max epochs of every fine-tuning run, >= 1 (default: the strategy's own, {FinetuneConfig.epochs} for finetune)")
    parser.add_argument("--scratch-size", type=int, default=None, help="image size of the from-scratch baseline on NEU (default 96; bottle: at least 128)")
    parser.add_argument("--scratch-epochs", type=int, default=None, help="max epochs of the from-scratch baseline on NEU (default 8; bottle: twice as many)")
    parser.add_argument("--skip-scratch", action="store_true")
    parser.add_argument("--augment-epochs", type=int, default=2, help="max epochs of the input-space augmentation run in T2 (capped by --epochs, or by 4 without it)")
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, checked before any dataset is read or model built (exit 2, one `error: ...` line); the bounds
    are loop.toml's ModelConfig ones (image_size, [model.training] epochs and patience). Fills in the quick or default
    epochs and scratch settings."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} is a file, not a folder")
    if args.quick:
        given = [flag for flag, value in (("--epochs", args.epochs), ("--scratch-size", args.scratch_size), ("--scratch-epochs", args.scratch_epochs)) if value is not None]
        if given:
            parser.error(f"--quick sets {', '.join(given)} itself (epochs {QUICK_EPOCHS}, scratch {QUICK_SCRATCH[0]} px for {QUICK_SCRATCH[1]} epochs): drop {' '.join(given)}")
        args.epochs = QUICK_EPOCHS
        args.scratch_size, args.scratch_epochs = QUICK_SCRATCH
    else:
        args.scratch_size = 96 if args.scratch_size is None else args.scratch_size
        args.scratch_epochs = 8 if args.scratch_epochs is None else args.scratch_epochs
    for flag, value in (("--epochs", args.epochs), ("--scratch-epochs", args.scratch_epochs), ("--augment-epochs", args.augment_epochs)):
        if value is not None and value < 1:  # 0 epochs is T3's "before" row; the runs this sets need at least one
            parser.error(f"{flag} {value}: must be >= 1")
    checks = [("--scratch-size", args.scratch_size, {"image_size": args.scratch_size}),
              ("--scratch-epochs", args.scratch_epochs, {"training": {"epochs": args.scratch_epochs, "patience": args.scratch_epochs}})]
    if args.epochs is not None:
        checks.append(("--epochs", args.epochs, {"training": {"epochs": args.epochs}}))
    for flag, value, fields in checks:
        try:
            ModelConfig(**fields)
        except ValidationError as error:
            parser.error(f"{flag} {value}: {validation_problems(error)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs
    scratch_size, scratch_epochs = args.scratch_size, args.scratch_epochs
    fraction = QUICK_FRACTION if args.quick else 1.0
    results: dict[str, Any] = {"command": "python benchmarks/transfer_experiments.py " + " ".join(os.sys.argv[1:] if argv is None else argv),
                               "machine": transfer_common.machine()}  # its seconds per epoch are this machine's
    log_lines: list[str] = []

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        log_lines.append(line)
        (out / "transfer_experiments.log").write_text("\n".join(log_lines) + "\n")

    neu = subsample(load_neu(), fraction)
    train, validation, test = split(neu)
    results["neu_split"] = {"train": len(train), "validation": len(validation), "test": len(test), "subsampled": fraction}
    log(f"NEU split: train {len(train)}, validation {len(validation)}, test {len(test)}")
    base: dict[str, Any] = {"threads": 2} if epochs is None else {"threads": 2, "epochs": epochs}

    # T1: frozen backbone + head.
    t1 = fit_calibrate_predict(neu, train, validation, test, strategy="head", options=base, image_size=224)
    results["T1"] = [evaluate_fit("frozen backbone + linear head", neu, test, t1)]
    log(f"T1 head: acc {results['T1'][0]['accuracy']:.4f}")

    # T2: with vs without input-space augmentation (cached feature maps vs augmented images every epoch).
    # Default finetune: last 2 stages + conv_head at 1e-4, cached feature maps of 4 exact views (flips, half turn).
    t2_plain = fit_calibrate_predict(neu, train, validation, test, strategy="finetune", options={**base, "cached_views": "identity"}, image_size=224)
    # Input-space augmentation pays the frozen part every epoch (measured ~4.5x the cached epoch): fewer epochs.
    t2_aug = fit_calibrate_predict(neu, train, validation, test, strategy="finetune",
                                   options={**base, "mode": "augment", "augmentation": "geometric", "epochs": min(epochs or 4, args.augment_epochs)}, image_size=224)
    t2_views = fit_calibrate_predict(neu, train, validation, test, strategy="finetune", options={**base}, image_size=224)
    results["T2"] = [
        {**evaluate_fit("finetune, no augmentation (cached feature maps)", neu, test, t2_plain), "seconds_per_epoch": _per_epoch(t2_plain.history)},
        {**evaluate_fit(f"finetune, input-space augmentation (geometric, every epoch; {min(epochs or 4, args.augment_epochs)} epochs max)", neu, test, t2_aug), "seconds_per_epoch": _per_epoch(t2_aug.history)},
        {**evaluate_fit("finetune default: cached flips + half turn (4 exact views)", neu, test, t2_views), "seconds_per_epoch": _per_epoch(t2_views.history)},
    ]
    plot_training_curves({"no augmentation": t2_plain.history, "input-space augmentation": t2_aug.history, "cached exact views (default)": t2_views.history},
                out / "t2_augmentation_curves.png", "NEU fine-tuning (finetune defaults, backbone LR 1e-4): without vs with augmentation")
    save(out, results)
    log("T2 " + ", ".join(f"{r['model']}: acc {r['accuracy']:.4f} ({r['seconds_per_epoch']:.1f} s/epoch)" for r in results["T2"]))

    # T3: before vs after unfreezing the last layers at 1e-5 (epoch 0 is the frozen backbone with the probe head).
    t3_low = fit_calibrate_predict(neu, train, validation, test, strategy="finetune", options={**base, "trainable_stages": 2, "backbone_lr": 1e-5}, image_size=224)
    before = fit_calibrate_predict(neu, train, validation, test, strategy="finetune", options={**base, "epochs": 0}, image_size=224)
    results["T3"] = [
        evaluate_fit("before: frozen backbone + probe head (epoch 0)", neu, test, before),
        {**evaluate_fit("after: last 2 stages + conv_head unfrozen, backbone LR 1e-5", neu, test, t3_low), "seconds_per_epoch": _per_epoch(t3_low.history)},
        {**evaluate_fit("after: finetune default (last 2 stages + conv_head, backbone LR 1e-4)", neu, test, t2_views), "seconds_per_epoch": _per_epoch(t2_views.history)},
    ]
    plot_training_curves({"last 2 stages, LR 1e-5": t3_low.history, "default, LR 1e-4": t2_views.history}, out / "t3_unfreeze_curves.png",
                "NEU: unfreezing the last layers (epoch 0 = frozen backbone)")
    save(out, results)
    log("T3 " + ", ".join(f"{r['model']}: acc {r['accuracy']:.4f}" for r in results["T3"]))

    # Baselines on the same NEU split.
    results["baselines_neu"] = [svm_baseline(neu, np.concatenate([train, validation]), test, config=HandcraftedFeatureConfig())]
    if not args.skip_scratch:
        row, scratch_history = scratch_baseline(neu, train, validation, test, image_size=scratch_size, epochs=scratch_epochs)
        results["baselines_neu"].append(row)
        plot_training_curves({"from scratch": scratch_history}, out / "baseline_scratch_neu_curves.png", "NEU: efficientnet_lite0 from random init")
    save(out, results)
    log("baselines NEU " + ", ".join(f"{r['model']}: acc {r['accuracy']:.4f}" for r in results["baselines_neu"]))

    # T4: NEU model -> MVTec bottle (backbone transferred; classes differ, so the head is new).
    checkpoint = save_model_checkpoint(t2_views.classifier, out / "neu_finetune_model.pt", image_size=224)
    bottle = subsample(load_mvtec_bottle(), max(fraction, 0.5))
    b_train, b_validation, b_test = split(bottle)
    results["mvtec_split"] = {"train": len(b_train), "validation": len(b_validation), "test": len(b_test),
                              "test_defects": int((bottle.labels[b_test] == 1).sum()), "note": bottle.note, "subsampled": max(fraction, 0.5) if fraction < 1 else 1.0}
    init = load_init_checkpoint(checkpoint, class_names=bottle.class_names)
    # The same pooling as the ImageNet rows (pretrained_backbone) and as `loop init --init-from` (loop.toml [model] pooling).
    neu_backbone = create_backbone(init.backbone_name, weights=str(init.backbone_weights_path), pooling=transfer_common.POOLING)
    rows, histories = [], {}
    for init_name, backbone in (("ImageNet", pretrained_backbone()), ("NEU fine-tuned", neu_backbone)):
        for strategy in ("head", "finetune"):
            fit = fit_calibrate_predict(bottle, b_train, b_validation, b_test, strategy=strategy, options={**base, **init.training_options()},
                                        image_size=320, backbone=backbone)
            rows.append(evaluate_fit(f"{init_name} init, {strategy}", bottle, b_test, fit))
            if strategy == "finetune":
                histories[f"{init_name} init"] = fit.history
    results["T4"] = {"head_transfer": init.head_reason, "bottle": rows,
                     "metal": [evaluate_fit("NEU fine-tuned (source model)", neu, test, t2_views)]}
    plot_training_curves(histories, out / "t4_transfer_curves.png", "MVTec bottle fine-tuning: ImageNet init vs NEU-transferred backbone")
    results["baselines_mvtec"] = [svm_baseline(bottle, np.concatenate([b_train, b_validation]), b_test, config=HandcraftedFeatureConfig())]
    if not args.skip_scratch:
        row, _ = scratch_baseline(bottle, b_train, b_validation, b_test, image_size=max(scratch_size, 128), epochs=max(scratch_epochs, 2) * 2)
        results["baselines_mvtec"].append(row)
    log("T4 " + ", ".join(f"{r['model']}: AUC {r['roc_auc']}" for r in rows))

    (out / "transfer_experiments.json").write_text(json.dumps(results, indent=2, default=float))
    write_markdown(out, results)
    log(f"wrote {out / 'transfer_experiments.md'}")


def save(out: Path, results: dict[str, Any]) -> None:
    """After every experiment: a late failure never loses the earlier ones."""
    (out / "transfer_experiments.json").write_text(json.dumps(results, indent=2, default=float))


def _per_epoch(history: list[dict[str, float]]) -> float:
    trained = [row["seconds"] for row in history if row["epoch"] > 0]
    return float(np.mean(trained)) if trained else 0.0


def write_markdown(out: Path, results: dict[str, Any]) -> None:
    split_neu, split_mvtec = results["neu_split"], results["mvtec_split"]
    # --quick runs on a share of each dataset: said first, the counts the dataset notes quote are of the whole set
    subsampled = [f"{name} {share:.0%} of its images (per class)" for name, share in (("NEU", split_neu.get("subsampled", 1.0)),
                                                                                       ("MVTec bottle", split_mvtec.get("subsampled", 1.0))) if share < 1]
    lines = [
        "# Transfer learning experiments", "", f"Command: `{results['command']}`", "",
        *([f"Machine: {results['machine']['cpu']} ({results['machine']['cpus']} CPUs).", ""] if results.get("machine") else []),
        *([f"**A smoke run, not the figures: subsampled to {' and '.join(subsampled)}; the splits below are of that subsample.**", ""]
          if subsampled else []),
        f"NEU split: fold 0 of StratifiedGroupKFold(5, shuffle=True, random_state=0) is the test split ({split_neu['test']} images); "
        f"the rest is {split_neu['train']} train + {split_neu['validation']} validation (early stopping, temperature).",
        f"MVTec bottle split: {split_mvtec['note']}; fold 0 of the same splitter: {split_mvtec['train']} train, "
        f"{split_mvtec['validation']} validation, {split_mvtec['test']} test ({split_mvtec['test_defects']} defects). "
        "The FPR <= 3% threshold is chosen on validation only.", "",
        "## T1: frozen backbone + linear head (NEU)", "", markdown_table(results["T1"], METRIC_COLUMNS), "",
        "## T2: with vs without augmentation (NEU)", "", "![curves](t2_augmentation_curves.png)", "",
        markdown_table(results["T2"], METRIC_COLUMNS + [("seconds_per_epoch", "s/epoch")]), "",
        "## T3: before vs after unfreezing the last layers (NEU)", "", "![curves](t3_unfreeze_curves.png)", "",
        markdown_table(results["T3"], METRIC_COLUMNS + [("seconds_per_epoch", "s/epoch")]), "",
        "## Baselines on the NEU split", "", markdown_table(results["T1"] + results["T3"][1:] + results["baselines_neu"], METRIC_COLUMNS), "",
        "## T4: NEU (metal) model transferred to MVTec bottle", "", f"Head: {results['T4']['head_transfer']}.", "",
        "![curves](t4_transfer_curves.png)", "", "Metal (source, NEU test split):", "", markdown_table(results["T4"]["metal"], METRIC_COLUMNS), "",
        "Bottle (target, good vs defect; ROC-AUC of P(defect)):", "", markdown_table(results["T4"]["bottle"] + results["baselines_mvtec"], BINARY_COLUMNS), "",
    ]
    (out / "transfer_experiments.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
