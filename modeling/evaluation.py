"""Decision threshold, final predictions, metrics and gates: plain arrays in, plain results out.

Every metric, macro F1 included, is computed on the final predictions: if P(defect) = 1 - P(negative class)
>= threshold, the most probable defect class, else the negative class.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    max_fpr: float
    confidence: float
    n_negatives: int
    n_defects: int
    allowed_false_positives: int
    observed_fpr: float  # on the data the threshold was chosen on
    fpr_upper_bound: float  # one-sided Clopper-Pearson bound at `confidence`
    observed_defect_recall: float | None
    margin_attainable: bool  # False: too few negatives to keep the bound under max_fpr even with 0 false positives
    source: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def fpr_upper_bound(false_positives: int, negatives: int, confidence: float) -> float:
    if negatives == 0:
        return 1.0
    if false_positives >= negatives:
        return 1.0
    return float(beta.ppf(confidence, false_positives + 1, negatives - false_positives))


def choose_defect_threshold(*, p_defect: np.ndarray, is_defect: np.ndarray, max_fpr: float, confidence: float = 0.9, source: str = "") -> ThresholdChoice:
    """The lowest threshold (most defect recall) whose false-positive rate stays under max_fpr with a margin that
    fits the amount of data: the largest number of false positives k whose upper confidence bound on the FPR is
    still <= max_fpr. Few negatives -> few (or no) false positives allowed; many -> close to max_fpr."""
    p_defect = np.asarray(p_defect, dtype=np.float64)
    is_defect = np.asarray(is_defect, dtype=bool)
    negative_scores = np.sort(p_defect[~is_defect])[::-1]
    n_negatives, n_defects = len(negative_scores), int(is_defect.sum())
    allowed = 0
    while allowed + 1 < n_negatives and fpr_upper_bound(allowed + 1, n_negatives, confidence) <= max_fpr:
        allowed += 1
    attainable = fpr_upper_bound(0, n_negatives, confidence) <= max_fpr
    if not attainable:
        allowed = 0
    if n_negatives == 0:
        threshold = 0.5
    elif allowed == 0:
        threshold = float(np.nextafter(negative_scores[0], np.inf))  # just above the highest-scoring good part
    else:
        # Between the k-th and (k+1)-th highest negative scores: exactly k false positives here.
        threshold = float((negative_scores[allowed] + negative_scores[allowed - 1]) / 2)
    predicted_defect = p_defect >= threshold
    observed_fpr = float(predicted_defect[~is_defect].mean()) if n_negatives else 0.0
    recall = float(predicted_defect[is_defect].mean()) if n_defects else None
    return ThresholdChoice(
        threshold=threshold, max_fpr=max_fpr, confidence=confidence, n_negatives=n_negatives, n_defects=n_defects,
        allowed_false_positives=allowed, observed_fpr=observed_fpr,
        fpr_upper_bound=fpr_upper_bound(int(predicted_defect[~is_defect].sum()), n_negatives, confidence),
        observed_defect_recall=recall, margin_attainable=attainable, source=source,
    )


def final_predictions(*, probabilities: np.ndarray, negative_index: int | None, threshold: float | None) -> np.ndarray:
    """Class index per row: defect-vs-good by threshold first, then the most probable defect class."""
    probabilities = np.asarray(probabilities)
    if negative_index is None or threshold is None:
        return probabilities.argmax(axis=1)
    p_defect = 1.0 - probabilities[:, negative_index]
    defect_only = probabilities.copy()
    defect_only[:, negative_index] = -np.inf
    return np.where(p_defect >= threshold, defect_only.argmax(axis=1), negative_index)


def evaluate_predictions(*, y_true: np.ndarray, y_pred: np.ndarray, probabilities: np.ndarray, class_names: list[str], negative_index: int | None) -> dict:
    """Metrics of final predictions against true labels (test split only reports them)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    label_ids = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=label_ids, zero_division=0)
    present = [i for i in label_ids if support[i] > 0]
    metrics: dict = {
        "n_images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Macro over the classes present in the split: a class with no test image cannot be scored.
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if present else None,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {"labels": list(class_names), "matrix": confusion_matrix(y_true, y_pred, labels=label_ids).tolist()},
        "predicted_class_counts": {name: int((y_pred == i).sum()) for i, name in enumerate(class_names)},
    }
    # A collapsed model (one class for everything) must be loud, not a quiet line in a table.
    metrics["collapsed"] = bool(len(set(y_pred.tolist())) <= 1 and len(set(y_true.tolist())) > 1)
    if negative_index is None:
        metrics.update(defect_recall=None, negative_fpr=None, roc_auc_defect=None)
        return metrics
    true_defect = y_true != negative_index
    predicted_defect = y_pred != negative_index
    metrics["defect_recall"] = float(predicted_defect[true_defect].mean()) if true_defect.any() else None
    metrics["negative_fpr"] = float(predicted_defect[~true_defect].mean()) if (~true_defect).any() else None
    p_defect = 1.0 - np.asarray(probabilities)[:, negative_index]
    metrics["roc_auc_defect"] = float(roc_auc_score(true_defect, p_defect)) if 0 < true_defect.sum() < len(true_defect) else None
    return metrics


@dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    threshold: float
    comparison: str  # ">=" or "<="
    applicable: bool
    passed: bool | None  # None when not applicable

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(*, metrics: dict, latency_ms: float | None, macro_f1_min: float, defect_recall_min: float, negative_fpr_max: float, latency_ms_max: float) -> list[Gate]:
    def gate(name: str, value: float | None, threshold: float, comparison: str, applicable: bool = True) -> Gate:
        if not applicable or value is None:
            return Gate(name, value, threshold, comparison, False, None)
        passed = value >= threshold if comparison == ">=" else value <= threshold
        return Gate(name, float(value), threshold, comparison, True, bool(passed))

    has_negative = metrics.get("negative_fpr") is not None or metrics.get("defect_recall") is not None
    macro_f1 = 0.0 if metrics.get("collapsed") else metrics.get("macro_f1")
    gates = [
        gate("macro_f1", macro_f1, macro_f1_min, ">="),
        gate("defect_recall", metrics.get("defect_recall"), defect_recall_min, ">=", has_negative),
        gate("negative_fpr", metrics.get("negative_fpr"), negative_fpr_max, "<=", has_negative),
        gate("latency_ms", latency_ms, latency_ms_max, "<="),
    ]
    return gates


def all_gates_pass(gates: list[Gate]) -> bool:
    return all(g.passed for g in gates if g.applicable)
