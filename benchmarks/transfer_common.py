"""What the transfer benchmarks share: the three real datasets, splits that keep exact duplicates together, one
fit -> calibrate -> threshold -> predict step through the training registry (the code `loop round` runs), metrics."""
from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loop.config import ModelConfig  # noqa: E402  (the round's defaults, e.g. the threshold confidence)
from modeling.backbones import Backbone, create_backbone  # noqa: E402
from modeling.calibration import fit_temperature, logits_from_probabilities, softmax_with_temperature  # noqa: E402
from modeling.finetune import frozen_embeddings, predict_proba_paths  # noqa: E402
from modeling.evaluation import final_predictions  # noqa: E402,F401  (the round's rule: threshold, then the top defect class)
from modeling.preprocessing import Preprocessing  # noqa: E402
from modeling.training import TrainingData, train_classifier  # noqa: E402

DATASETS_ROOT = (REPO / ".." / "shared" / "datasets").resolve()
MAX_FPR = 0.03

try:  # the core engineer's threshold rule, when present (same rule as the round)
    from modeling.evaluation import choose_defect_threshold as _choose_defect_threshold
except ImportError:  # pragma: no cover
    _choose_defect_threshold = None


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    paths: list[str]
    labels: np.ndarray
    negative_index: int | None  # the "good" class the FPR gate is about; None for NEU (all classes are defects)
    groups: np.ndarray  # content hash per image: exact duplicates share a group and never straddle a split
    origin: list[str] = field(default_factory=list)  # MVTec: "train" or "test" folder
    note: str = ""


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on, for its JSON and markdown: seconds from different CPUs do not compare."""
    import os

    from modeling.latency import cpu_model_name

    return {"cpu": cpu_model_name(), "cpus": os.cpu_count()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def require_datasets(root: Path = DATASETS_ROOT) -> Path:
    if not root.is_dir():
        raise SystemExit(f"datasets not found at {root}: these benchmarks need ../shared/datasets (neu, magnetic_tile, mvtec_bottle)")
    return root


def load_folder_dataset(name: str, *, root: Path = DATASETS_ROOT, negative: str | None = None) -> Dataset:
    folder = require_datasets(root) / name
    class_names = sorted(path.name for path in folder.iterdir() if path.is_dir())
    paths, labels = [], []
    for index, class_name in enumerate(class_names):
        for path in sorted((folder / class_name).iterdir()):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                paths.append(path)
                labels.append(index)
    return Dataset(
        name, class_names, [str(p) for p in paths], np.array(labels), class_names.index(negative) if negative else None,
        np.array([_sha256(p) for p in paths]),
    )


# How NEU is split: "near_duplicate" keeps pixel-verified near-copies together (shifted, overlapping crops of one steel
# surface: 684 of the 1800 images, in 250 groups, all within one class; benchmarks/split_leakage.py); "file" keeps only
# byte-identical files together, as every NEU figure before 2026-12-02 did.
NEU_GROUPS = "near_duplicate"


def near_duplicate_groups(paths: list[str]) -> np.ndarray:
    """A group id per image: connected groups of what `loop round` flags as near-duplicates (pixel-verified), others alone."""
    from modeling.embeddings import compute_embeddings
    from modeling.image_detail import detail_thumbnails
    from modeling.label_quality import find_near_duplicates

    embeddings = compute_embeddings(paths=paths, image_size=224, pooling="multilayer", progress=False)
    return group_ids(len(paths), find_near_duplicates(embeddings=embeddings, thumbnails=detail_thumbnails(paths)).summary["groups"])


def group_ids(n: int, groups: list[list[int]]) -> np.ndarray:
    """One id per position: a finding's groups (lists of positions) share their first member's, others their own."""
    ids = np.arange(n)
    for group in groups:
        ids[group] = group[0]
    return ids


def load_neu(root: Path = DATASETS_ROOT, *, group_by: str | None = None) -> Dataset:
    return _grouped(load_folder_dataset("neu", root=root), group_by or NEU_GROUPS, "near_duplicate", near_duplicate_groups,
                    "splits keep pixel-verified near-copies (overlapping crops of one surface) together",
                    "splits keep only byte-identical files together: overlapping crops of one surface may straddle them")


def _grouped(dataset: Dataset, group_by: str, physical: str, find_groups: Any, physical_note: str, file_note: str) -> Dataset:
    """Splits by `physical` groups (found by find_groups(paths), merged with byte-identical copies) or by `file`."""
    if group_by == physical:
        dataset.groups = _merge_groups(dataset.groups, find_groups(dataset.paths)).astype(str)
        dataset.note = physical_note
    elif group_by == "file":
        dataset.note = file_note
    else:
        raise ValueError(f"group_by must be {physical}|file, got {group_by!r}")
    return dataset


def exposure_series(paths: list[str], *, max_counter_gap: int = 300, min_correlation: float = 0.5) -> np.ndarray:
    """Magnetic tile photographs each physical tile under up to seven exposure settings: `exp{k}_num_{n}.jpg`, k the
    exposure, n a running counter, so a tile's shots are close in n and have distinct k (crops differ by a few pixels,
    so neither the name nor the size alone identifies the tile). In counter order, each image joins the open series
    (counter within `max_counter_gap`, its exposure not yet taken) whose 32 px equalised thumbnails correlate best with
    it, if that correlation is >= `min_correlation`; otherwise it starts a series. Returns a series id per image.
    Measured on the 1344 images: 232 series, 212 of them with exactly six shots (exp1-exp6)."""
    from PIL import Image, ImageOps

    def thumbnail(path: str) -> np.ndarray:
        with Image.open(path) as image:
            pixels = np.asarray(ImageOps.equalize(image.convert("L")).resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel()
        pixels -= pixels.mean()
        return pixels / max(float(np.linalg.norm(pixels)), 1e-12)

    pattern = re.compile(r"exp(\d+)_num_(\d+)")
    keys = []
    for index, path in enumerate(paths):
        match = pattern.search(Path(path).name)
        if match is None:
            raise ValueError(f"{path}: not a magnetic tile file name (exp<k>_num_<n>)")
        keys.append((int(match.group(2)), int(match.group(1)), index))
    thumbnails = np.stack([thumbnail(path) for path in paths])
    series_id = np.full(len(paths), -1)
    series: list[dict[str, Any]] = []
    for counter, exposure, index in sorted(keys):
        best, best_correlation = None, min_correlation
        for candidate in series:
            if counter - candidate["last"] > max_counter_gap or exposure in candidate["exposures"]:
                continue
            correlation = float(np.mean(thumbnails[candidate["members"]] @ thumbnails[index]))
            if correlation >= best_correlation:
                best, best_correlation = candidate, correlation
        if best is None:
            best = {"id": len(series), "members": [], "exposures": set()}
            series.append(best)
        best["members"].append(index)
        best["exposures"].add(exposure)
        best["last"] = counter
        series_id[index] = best["id"]
    return series_id


def _merge_groups(*labelings: np.ndarray) -> np.ndarray:
    """Connected components of "same value in any labeling": e.g. exact duplicates and a tile's exposures together."""
    n = len(labelings[0])
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for labeling in labelings:
        first: dict[Any, int] = {}
        for index, value in enumerate(labeling.tolist()):
            if value in first:
                parent[root(index)] = root(first[value])
            else:
                first[value] = index
    return np.array([root(i) for i in range(n)])


# How magnetic tile is split: "tile" keeps every exposure of one physical tile on one side of a split (the honest
# measure: a model must recognise a defect on a tile it has not seen); "file" keeps only byte-identical files together,
# as every figure before 2026-12-02 did, which lets a tile's other exposures sit in the training folds.
MAGNETIC_TILE_GROUPS = "tile"


def load_magnetic_tile(root: Path = DATASETS_ROOT, *, group_by: str | None = None) -> Dataset:
    return _grouped(load_folder_dataset("magnetic_tile", root=root, negative="free"), group_by or MAGNETIC_TILE_GROUPS, "tile", exposure_series,
                    "splits keep every exposure of a physical tile together (exposure series from file names + thumbnails)",
                    "splits keep only byte-identical files together: a tile's other exposures may be on the other side")


def load_mvtec_bottle(root: Path = DATASETS_ROOT) -> Dataset:
    """All 292 images pooled (train/good 209 + test: good 20, broken_large 20, broken_small 22, contamination 21),
    as a binary good/defect task: MVTec's train folder holds only good parts, so every split here is ours."""
    folder = require_datasets(root) / "mvtec_bottle"
    paths, labels, origin = [], [], []
    for split in ("train", "test"):
        for class_dir in sorted((folder / split).iterdir()):
            for path in sorted(class_dir.glob("*.png")):
                paths.append(path)
                labels.append(0 if class_dir.name == "good" else 1)
                origin.append(f"{split}/{class_dir.name}")
    return Dataset(
        "mvtec_bottle", ["good", "defect"], [str(p) for p in paths], np.array(labels), 0, np.array([_sha256(p) for p in paths]), origin,
        note="binary good vs defect; train/good (209) and test (20 good, 63 defect) pooled before splitting",
    )


DATASET_LOADERS = {"neu": load_neu, "magnetic_tile": load_magnetic_tile, "mvtec_bottle": load_mvtec_bottle}


def outer_folds(dataset: Dataset, *, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """5-fold stratified, seeded, duplicates kept in one fold."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(dataset.paths, dataset.labels, dataset.groups)]


def validation_split(dataset: Dataset, indices: np.ndarray, *, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) inside the given training indices: stratified, duplicates together."""
    n_splits = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    inner_train, inner_validation = next(splitter.split(indices, dataset.labels[indices], dataset.groups[indices]))
    return indices[inner_train], indices[inner_validation]


_BACKBONES: dict[tuple[str, str, str], Backbone] = {}
POOLING = "multilayer"  # as loop round's default: the head's features and what fine-tuning pools; --pooling sets it
BACKBONE = "efficientnet_lite0"  # as loop round's default [model] backbone; --backbone sets it


def pretrained_backbone(weights: str = "default") -> Backbone:
    if (BACKBONE, weights, POOLING) not in _BACKBONES:
        _BACKBONES[BACKBONE, weights, POOLING] = create_backbone(BACKBONE, weights=weights, pooling=POOLING)
    return _BACKBONES[BACKBONE, weights, POOLING]


def training_data(
    dataset: Dataset, train: np.ndarray, validation: np.ndarray, *, backbone: Backbone, image_size: int, options: dict[str, Any], seed: int = 0,
) -> TrainingData:
    preprocessing = Preprocessing(image_size, backbone.mean, backbone.std)
    paths = np.array(dataset.paths)
    threads = int(options.get("threads", 2))
    return TrainingData(
        class_names=list(dataset.class_names),
        train_paths=list(paths[train]), train_labels=dataset.labels[train],
        train_embeddings=frozen_embeddings(backbone, preprocessing, list(paths[train]), threads=threads),
        validation_paths=list(paths[validation]), validation_labels=dataset.labels[validation],
        validation_embeddings=frozen_embeddings(backbone, preprocessing, list(paths[validation]), threads=threads),
        backbone=backbone, preprocessing=preprocessing, seed=seed, options=dict(options),
    )


@dataclass
class ThresholdResult:
    threshold: float | None
    detail: dict[str, Any]


# The confidence of the FPR threshold rule: `loop round`'s default (loop.toml [model] threshold_confidence) unless a
# script sets another (transfer_cv.py --threshold-confidence). Earlier runs used 0.9, more cautious than the product.
THRESHOLD_CONFIDENCE = ModelConfig().threshold_confidence


def choose_threshold(*, p_defect: np.ndarray, is_defect: np.ndarray, max_fpr: float = MAX_FPR, confidence: float | None = None) -> ThresholdResult:
    """The round's rule (modeling.evaluation.choose_defect_threshold), applied to non-test data only."""
    if _choose_defect_threshold is not None:
        confidence = THRESHOLD_CONFIDENCE if confidence is None else confidence
        choice = _choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=max_fpr, confidence=confidence, source="validation")
        return ThresholdResult(choice.threshold, choice.as_dict())
    negatives = np.sort(p_defect[~is_defect])[::-1]  # pragma: no cover - fallback: plain empirical FPR
    allowed = int(np.floor(max_fpr * len(negatives)))
    threshold = float(np.nextafter(negatives[0], np.inf)) if allowed == 0 else float((negatives[allowed] + negatives[allowed - 1]) / 2)
    return ThresholdResult(threshold, {"allowed_false_positives": allowed, "n_negatives": len(negatives)})


@dataclass
class FitResult:
    probabilities: np.ndarray  # on the evaluated paths, calibrated
    threshold: ThresholdResult | None
    temperature: float
    history: list[dict[str, float]]
    train_seconds: float
    predict_seconds: float
    classifier: Any


def validation_logits(classifier: Any, data: TrainingData) -> np.ndarray:
    if getattr(classifier, "validation_logits", None) is not None:
        return np.asarray(classifier.validation_logits)
    if getattr(classifier, "uses_frozen_embeddings", False):
        return logits_from_probabilities(classifier.predict_proba_from_embeddings(data.validation_embeddings))
    return logits_from_probabilities(predict_proba_paths(classifier, data.validation_paths))


def predict_paths(classifier: Any, paths: list[str], data: TrainingData) -> np.ndarray:
    """Calibrated probabilities of image files; frozen-embedding heads read the same cached embeddings they trained on."""
    if getattr(classifier, "uses_frozen_embeddings", False):
        embeddings = frozen_embeddings(classifier.backbone, data.preprocessing, paths, threads=int(data.options.get("threads", 2)))
        return classifier.predict_proba_from_embeddings(embeddings).astype(np.float64)
    return predict_proba_paths(classifier, paths, data.preprocessing)


def fit_calibrate_predict(
    dataset: Dataset, train: np.ndarray, validation: np.ndarray, evaluate: np.ndarray, *, strategy: str, options: dict[str, Any],
    image_size: int, seed: int = 0, backbone: Backbone | None = None, confidence: float | None = None,
) -> FitResult:
    """Train with the registry, fit the temperature and the FPR threshold on validation, predict `evaluate`."""
    backbone = backbone or pretrained_backbone()
    data = training_data(dataset, train, validation, backbone=backbone, image_size=image_size, options=options, seed=seed)
    started = time.perf_counter()
    classifier = train_classifier(strategy=strategy, data=data)
    train_seconds = time.perf_counter() - started
    logits = validation_logits(classifier, data)
    temperature = fit_temperature(logits=logits, labels=data.validation_labels)
    classifier.temperature = temperature
    threshold = None
    if dataset.negative_index is not None:
        # The threshold is read off probabilities computed exactly as the held-out ones are (same numeric path:
        # p_defect near 0 is at the resolution of that path, and a threshold must be on the same scale).
        calibrated = predict_paths(classifier, data.validation_paths, data)
        threshold = choose_threshold(p_defect=1.0 - calibrated[:, dataset.negative_index], is_defect=data.validation_labels != dataset.negative_index,
                                     confidence=confidence)
    started = time.perf_counter()
    probabilities = predict_paths(classifier, list(np.array(dataset.paths)[evaluate]), data)
    predict_seconds = time.perf_counter() - started
    return FitResult(probabilities, threshold, temperature, list(classifier.history), train_seconds, predict_seconds, classifier)


def metrics(y_true: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray, *, class_names: list[str], negative_index: int | None) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, ROC-AUC (defect vs good when there is a good class, else macro
    one-vs-rest), and for a good class: defect recall and FPR of the final (thresholded) predictions."""
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, predictions, labels=labels, zero_division=0)
    present = support > 0
    result: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "errors": int((predictions != y_true).sum()),
        "accuracy": float((predictions == y_true).mean()),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class_f1": {name: float(f1[i]) for i, name in enumerate(class_names) if present[i]},
        "confusion_matrix": np.array(
            [[int(((y_true == t) & (predictions == p)).sum()) for p in labels] for t in labels]
        ).tolist(),
        "predicted_classes": int(len(set(predictions.tolist()))),
    }
    if negative_index is not None:
        is_defect = y_true != negative_index
        p_defect = 1.0 - probabilities[:, negative_index]
        predicted_defect = predictions != negative_index
        result["roc_auc"] = float(roc_auc_score(is_defect, p_defect)) if 0 < is_defect.sum() < len(is_defect) else None
        result["defect_recall"] = float(predicted_defect[is_defect].mean()) if is_defect.any() else None
        result["fpr"] = float(predicted_defect[~is_defect].mean()) if (~is_defect).any() else None
        result["false_positives"] = int(predicted_defect[~is_defect].sum())
        result["missed_defects"] = int((~predicted_defect[is_defect]).sum())
    else:
        present_labels = [i for i in labels if present[i]]
        scores = probabilities[:, present_labels] / probabilities[:, present_labels].sum(axis=1, keepdims=True)
        result["roc_auc"] = float(roc_auc_score(y_true, scores, multi_class="ovr", labels=present_labels)) if len(present_labels) > 2 else None
    return result


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header). Floats in [0, 1] as 4 decimals (below 0.001: 2 significant digits)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value != 0 and abs(value) < 1e-3:  # a threshold of 6.1e-06 read as "0.0000"
                return f"{value:.2g}"
            return f"{value:.4f}" if abs(value) <= 1.0 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


_PATCH_FEATURES: dict[tuple[str, str, int], np.ndarray] = {}


def anomaly_blend(
    dataset: Dataset, labeled: np.ndarray, evaluate: np.ndarray, fit: FitResult, *, image_size: int, seed: int = 0, confidence: float | None = None,
) -> tuple[np.ndarray, ThresholdResult, dict[str, Any]]:
    """The round's `score_anomalies` + out-of-fold threshold on one split: the head's out-of-fold P(defect) over the
    labeled images (5 folds, temperature-scaled), the good parts' patch memory bank with leave-one-out scores, the
    blend fitted on those, the threshold chosen on the blended out-of-fold scores; `fit`'s calibrated probabilities
    of `evaluate` blended with their anomaly scores. Returns (probabilities of evaluate, threshold, details)."""
    from modeling.anomaly import blend_probabilities, compute_patch_features, fit_patch_anomaly
    from modeling.label_quality import out_of_fold_probabilities
    from modeling.training import head_fit_predict

    backbone = pretrained_backbone()
    preprocessing = Preprocessing(image_size, backbone.mean, backbone.std)
    key = (dataset.name, backbone.cache_key, image_size)  # BACKBONE may change between calls in one process
    if key not in _PATCH_FEATURES:
        import tempfile

        with tempfile.TemporaryDirectory() as onnx_dir:
            _PATCH_FEATURES[key] = compute_patch_features(backbone=backbone, preprocessing=preprocessing, paths=dataset.paths, onnx_dir=Path(onnx_dir))
    features = _PATCH_FEATURES[key]
    labeled = np.sort(labeled)
    paths = np.array(dataset.paths)
    embeddings = frozen_embeddings(backbone, preprocessing, list(paths[labeled]), threads=2)
    negative = dataset.negative_index
    # As the round with parts: a tile's exposures share a fold and leave the bank together (no shared group: the
    # round's plain folds, so figures of datasets without parts are unchanged).
    groups = dataset.groups[labeled] if len(np.unique(dataset.groups[labeled])) < len(labeled) else None
    oof = out_of_fold_probabilities(features=embeddings, labels=dataset.labels[labeled], n_folds=5, seed=seed,
                                    fit_predict=head_fit_predict(seed=seed), n_classes=len(dataset.class_names), groups=groups)
    oof_logits = logits_from_probabilities(oof)
    oof_temperature = fit_temperature(logits=oof_logits, labels=dataset.labels[labeled])
    oof = softmax_with_temperature(oof_logits, oof_temperature)
    classifier_probabilities = fit.probabilities
    if getattr(fit.classifier, "uses_frozen_embeddings", False):
        # As the round does with an out-of-fold threshold: the head learns from every labeled image (validation too)
        # and takes the out-of-fold temperature, so the blend sees held-out scores on the scale it was fitted on.
        head = head_fit_predict(seed=seed)(train_features=embeddings, train_labels=dataset.labels[labeled], n_classes=len(dataset.class_names),
                                           predict_features=frozen_embeddings(backbone, preprocessing, list(paths[evaluate]), threads=2))
        classifier_probabilities = softmax_with_temperature(logits_from_probabilities(head), oof_temperature)
    is_defect = dataset.labels[labeled] != negative
    started = time.perf_counter()
    fitted = fit_patch_anomaly(patch_features=features[labeled], is_defect=is_defect, p_defect_out_of_fold=1.0 - oof[:, negative], seed=seed,
                               groups=groups)
    blended_oof = blend_probabilities(probabilities=oof, anomaly_score=fitted.labeled_scores, blend=fitted.blend, negative_index=negative)
    threshold = choose_threshold(p_defect=1.0 - blended_oof[:, negative], is_defect=is_defect, confidence=confidence)
    evaluate_scores = fitted.scores(features[evaluate])
    probabilities = blend_probabilities(probabilities=classifier_probabilities, anomaly_score=evaluate_scores, blend=fitted.blend, negative_index=negative)
    evaluate_defect = dataset.labels[evaluate] != negative
    details = {"blend": fitted.blend.as_dict(), "out_of_fold_temperature": oof_temperature, "memory_bank_patches": int(len(fitted.memory_bank)),
               "anomaly_seconds": time.perf_counter() - started,
               "held_out_anomaly_auc": float(roc_auc_score(evaluate_defect, evaluate_scores)) if 0 < evaluate_defect.sum() < len(evaluate) else None,
               # The labeled images' blended out-of-fold probabilities the threshold was read off: another threshold
               # rule can be studied on them later without retraining.
               "labeled_out_of_fold": {"indices": labeled.tolist(), "probabilities": np.round(blended_oof, 6).tolist()}}
    return probabilities, threshold, details


if __name__ == "__main__":  # (QA: run as a script, it printed nothing and exited 0 among the benchmarks)
    raise SystemExit("benchmarks/transfer_common.py holds functions the benchmark scripts share; it measures nothing itself: see README's Benchmarks")
