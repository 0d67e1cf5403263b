"""Which labels are probably wrong, which images are near-duplicates or outliers.

Flat functions with keyword-only arguments; every finding is a score, a flag and a summary
(the shape of cleanlab's Datalab):

- `out_of_fold_probabilities(features=, labels=)`  K-fold predictions for every labeled image, so
  no image is scored by a model that saw its own (possibly wrong) label.
- `find_label_issues(labels=, pred_probs=, class_names=, embeddings=)`  confident learning
  (cleanlab) on the out-of-fold probabilities blended with a k-NN label vote in embedding space;
  ranked suspects with a suggested label, and an estimated noise rate per class.
- `find_near_duplicates(embeddings=, thumbnails=)` (pixel-verified near-copies; cosine only without thumbnails),
  `find_outliers(embeddings=)`.

Why the k-NN vote: a linear model fit on noisy labels partly learns the noise, and confident
learning on its probabilities alone flags many clean-but-atypical images. Pretrained embeddings
put an image among images of its true class, so the labels of its neighbours are a second,
independent witness; where both disagree with the given label, the label is very likely wrong.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modeling.neighbor_graph import NeighborGraph, nearest_neighbors

if TYPE_CHECKING:
    from modeling.image_detail import PairCorrelationCache

__all__ = [
    "Finding",
    "LabelIssueReport",
    "find_label_issues",
    "find_near_duplicates",
    "find_outliers",
    "knn_label_distribution",
    "out_of_fold_probabilities",
]

# Tuned on synthetic Gaussian-cluster data with injected symmetric noise (tests/unit), not on
# any benchmark's answers.
DEFAULT_KNN_NEIGHBORS = 20
# "auto": the blend weight of the k-NN vote is the one whose blended probabilities best explain the
# given labels (lowest log-loss). An overfit model explains them badly out of fold, so the vote
# takes over (weight 0.9-1.0 on such data); a good model keeps about half.
KNN_WEIGHT_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
# cleanlab's per-class pruning: on synthetic data it kept precision of the default
# (prune_by_noise_rate) within ~0.02 and raised recall by 0.02-0.05.
FILTER_BY = "prune_by_class"
MIN_EXAMPLES_FOR_CONFIDENT_JOINT = 5  # a class with fewer labels takes no part in the confident joint
# A class with fewer labels gets no noise-rate estimate: one flag among 6 labels read "contamination 33.3%" on the
# dashboard where every label was right (QA); the outlier check leaves classes under 20 unjudged too.
MIN_EXAMPLES_FOR_NOISE_RATE = 20
# The default out-of-fold model picks its regularisation from this grid by out-of-fold log-loss
# against the given labels: the best value depends on embedding size and noise level (on
# synthetic 256-d data 0.01 won, on 1280-d 0.001; weakly regularised fits memorise the noise).
INVERSE_REGULARIZATION_GRID = (0.1, 0.01, 0.001, 0.0001)


@dataclass
class Finding:
    """One kind of issue over a set of images.

    scores: per image in [0, 1], lower = more likely an issue (cleanlab's convention).
    is_issue: per image flag. summary: counts and parameters. related: per image, the position of
    the image that explains the score (nearest other image), or None.
    """

    scores: np.ndarray
    is_issue: np.ndarray
    summary: dict[str, Any]
    related: np.ndarray | None = None


@dataclass
class LabelIssueReport:
    label_quality_score: np.ndarray  # (n,) in [0, 1], lower = more likely mislabeled
    is_label_issue: np.ndarray  # (n,) bool
    suggested_label: np.ndarray  # (n,) int: most likely true class (= given label when not flagged)
    ranked_issue_indices: np.ndarray  # flagged positions, most likely wrong first
    noise_rate_per_class: dict[str, float | None]  # P(true != c | given c); None = too few labels (under MIN_EXAMPLES_FOR_NOISE_RATE)
    summary: dict[str, Any] = field(default_factory=dict)


# ---- out-of-fold probabilities --------------------------------------------------------------
FitPredict = Callable[..., np.ndarray]


def logistic_regression_fit_predict(
    *,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    predict_features: np.ndarray,
    n_classes: int,
    inverse_regularization: float = 0.01,
) -> np.ndarray:
    """Class-weighted multinomial logistic regression on standardised features -> (n, n_classes).

    `inverse_regularization` is sklearn's C; small because the labels may be noisy and a
    high-dimensional embedding lets a weakly regularised model memorise the noise.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    model = LogisticRegression(
        C=inverse_regularization, class_weight="balanced", max_iter=2000, tol=1e-4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model.fit(scaler.transform(train_features), train_labels)
    present = model.predict_proba(scaler.transform(predict_features))
    out = np.zeros((len(predict_features), n_classes), dtype=np.float64)
    out[:, model.classes_] = present
    return out


def out_of_fold_probabilities(
    *,
    features: np.ndarray,
    labels: np.ndarray,
    n_folds: int = 5,
    seed: int = 0,
    fit_predict: FitPredict | None = None,
    n_classes: int | None = None,
    details: dict[str, Any] | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """(n, n_classes) probabilities where each row comes from a model that never saw that row.

    Stratified K-fold. `n_folds` is lowered to the smallest class count (at least 2) so every fold
    holds every class that can be split; a class with a single example still gets its column (it
    is predicted by a model that has not seen the class, which is the honest answer).
    `fit_predict(*, train_features, train_labels, predict_features, n_classes)` replaces the
    default: class-weighted logistic regression whose C is chosen from
    INVERSE_REGULARIZATION_GRID by out-of-fold log-loss on the given labels (no other labels are
    used). Pass a dict as `details` to receive the folds used (n_folds, and fold_of_row: the fold that predicted each
    row) and the chosen C.
    `groups` (one id per row, e.g. the physical part a photo shows): rows sharing an id are in the same fold
    (stratified group K-fold), so a photo is never predicted by a model trained on another photo of its part.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (n, dim) with one row per label: {features.shape} vs {labels.shape}")
    if labels.ndim != 1 or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError("labels must be a 1-d integer array")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be class indices >= 0 (pass only labeled rows)")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    n_classes = int(n_classes if n_classes is not None else (labels.max() + 1 if len(labels) else 0))
    if len(labels) and labels.max() >= n_classes:
        raise ValueError(f"label {labels.max()} out of range for n_classes={n_classes}")
    n = len(labels)
    counts = np.bincount(labels, minlength=n_classes)
    present = np.flatnonzero(counts)
    details = details if details is not None else {}
    if len(present) < 2 or n < 2 or counts.max() < 2:
        # nothing to contrast: every row gets the label frequencies (one image per class: no fold can hold out an
        # image and keep its class, and sklearn refused; review: the first labeled defect beside one good part)
        details.update(n_folds=0, note="fewer than two classes: label frequencies returned" if len(present) < 2 or n < 2
                       else "one labeled image per class: label frequencies returned")
        out = np.zeros((n, n_classes), dtype=np.float64)
        if n:
            out[:] = counts / counts.sum()
        return out
    splittable = counts[counts >= 2]
    folds = int(min(n_folds, splittable.min())) if len(splittable) else 2
    folds = max(2, min(folds, n))
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"groups must have one id per row: {len(groups)} vs {n}")
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            groups = None  # one group cannot be split: plain folds, and details["grouped"] says so
        else:
            folds = min(folds, n_groups)
    with warnings.catch_warnings():
        # "The least populated class has only 1 member": expected, handled in _cross_predict
        warnings.simplefilter("ignore", category=UserWarning)
        if groups is not None:
            splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n), labels, groups))
            splits = [(train, held) for train, held in splits if len(held)]
        else:
            splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n), labels))
    details["n_folds"] = len(splits)
    details["grouped"] = groups is not None
    fold_of_row = np.full(n, -1, dtype=np.int64)  # which fold's model predicted each row (a class seen in one fold only is unseen there)
    for fold, (_train, held) in enumerate(splits):
        fold_of_row[held] = fold
    details["fold_of_row"] = fold_of_row
    if fit_predict is not None:
        return _cross_predict(features, labels, n_classes, splits, fit_predict)
    losses: dict[float, float] = {}
    best, chosen = None, None
    for c_value in INVERSE_REGULARIZATION_GRID:
        fit = functools.partial(logistic_regression_fit_predict, inverse_regularization=c_value)
        probs = _cross_predict(features, labels, n_classes, splits, fit)
        losses[c_value] = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, None)).mean())
        if chosen is None or losses[c_value] < losses[chosen]:
            best, chosen = probs, c_value
    details.update(
        inverse_regularization=chosen,
        log_loss_by_inverse_regularization={str(k): round(v, 5) for k, v in losses.items()},
    )
    return best


def _cross_predict(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    fit_predict: FitPredict,
) -> np.ndarray:
    out = np.zeros((len(labels), n_classes), dtype=np.float64)
    for train, test in splits:
        train_labels = labels[train]
        if len(np.unique(train_labels)) < 2:
            out[test] = np.bincount(train_labels, minlength=n_classes) / len(train_labels)
            continue
        probs = np.asarray(
            fit_predict(
                train_features=features[train],
                train_labels=train_labels,
                predict_features=features[test],
                n_classes=n_classes,
            ),
            dtype=np.float64,
        )
        if probs.shape != (len(test), n_classes):
            raise ValueError(f"fit_predict returned shape {probs.shape}, expected {(len(test), n_classes)}")
        out[test] = probs
    row_sums = out.sum(axis=1, keepdims=True)
    np.divide(out, row_sums, out=out, where=row_sums > 0)
    return out


# ---- k-NN graph helpers ---------------------------------------------------------------------
def _nearest_neighbors(embeddings: np.ndarray, k: int, graph: NeighborGraph | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, positions), each (n, k): the k most similar OTHER rows, best first; read off `graph` (the caller's
    graph of these embeddings, e.g. kept between rounds) when given."""
    if graph is None:
        return nearest_neighbors(embeddings=embeddings, k=k).first(k)
    n = len(embeddings)
    if graph.positions.shape[0] != n or graph.positions.shape[1] < min(k, n - 1):
        raise ValueError(f"the neighbour graph holds {graph.positions.shape[1]} neighbours of {graph.positions.shape[0]} images; "
                         f"{min(k, n - 1)} of {n} needed")
    return graph.first(k)


def knn_label_distribution(
    *,
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    k: int = DEFAULT_KNN_NEIGHBORS,
    exclude: np.ndarray | None = None,
    graph: NeighborGraph | None = None,
) -> np.ndarray:
    """(n, n_classes): similarity-weighted vote of each image's k nearest neighbours' labels.

    The image's own label never votes. Rows in `exclude` (bool mask, e.g. current suspects) do not
    vote either. Laplace-smoothed so no class is exactly 0. `graph`: these embeddings' k-NN graph, when the caller
    keeps one (an exact search over every labeled image grows with their number squared).
    """
    labels = np.asarray(labels)
    sims, neighbors = _nearest_neighbors(np.asarray(embeddings, dtype=np.float32), k, graph)
    weights = np.clip(sims, 0.0, None).astype(np.float64) + 1e-6
    if exclude is not None:
        weights = weights * ~np.asarray(exclude, dtype=bool)[neighbors]
    votes = np.zeros((len(labels), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(labels)), neighbors.shape[1])
    np.add.at(votes, (rows, labels[neighbors].ravel()), weights.ravel())
    smoothing = 1.0 / n_classes
    totals = votes.sum(axis=1, keepdims=True)
    # the smoothing is one pseudo-vote spread over classes, scaled to the row's vote mass
    scale = np.where(totals > 0, totals / max(neighbors.shape[1], 1), 1.0)
    votes += smoothing * scale
    return votes / votes.sum(axis=1, keepdims=True)


# ---- label issues ---------------------------------------------------------------------------
# Below this out-of-fold balanced accuracy the suspects are mostly the model's own errors (QA, magnetic tile at 0.71: 42 of 126
# correct labels flagged, "noise" 0.23-0.52 for the good class), and the round says so beside them
WEAK_MODEL_ACCURACY = 0.85


def weak_model_note(out_of_fold_balanced_accuracy: float | None) -> str | None:
    """What to make of the suspects and noise rates when the model judging the labels is often wrong, else None."""
    if out_of_fold_balanced_accuracy is None or out_of_fold_balanced_accuracy >= WEAK_MODEL_ACCURACY:
        return None
    return (f"the out-of-fold model agrees with only {out_of_fold_balanced_accuracy:.0%} of the labels it judged, averaged over the classes (under {WEAK_MODEL_ACCURACY:.0%}): "
            "most suspects are likely its own errors, not wrong labels, and the noise rates per class overstate the noise")


def find_label_issues(
    *,
    labels: np.ndarray,
    pred_probs: np.ndarray,
    class_names: list[str],
    embeddings: np.ndarray | None = None,
    knn_neighbors: int = DEFAULT_KNN_NEIGHBORS,
    knn_weight: float | str = "auto",
    graph: NeighborGraph | None = None,
) -> LabelIssueReport:
    """Suspect labels among `labels` (n,), given out-of-fold `pred_probs` (n, n_classes).

    With `embeddings` (n, dim), a k-NN label vote is blended into the probabilities before
    confident learning, with weight `knn_weight` ("auto": chosen from KNN_WEIGHT_GRID by log-loss
    on the given labels); without, this is cleanlab's confident learning on `pred_probs`. Classes with fewer than MIN_EXAMPLES_FOR_CONFIDENT_JOINT labels
    still get scores and flags but no noise-rate estimate. `graph`: the embeddings' k-NN graph when kept by the caller.
    """
    import cleanlab.count
    import cleanlab.filter
    import cleanlab.rank

    labels = np.asarray(labels)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    n_classes = len(class_names)
    _check_labels_and_probs(labels, pred_probs, n_classes)
    n = len(labels)
    counts = np.bincount(labels, minlength=n_classes) if n else np.zeros(n_classes, dtype=int)
    if n == 0:
        return LabelIssueReport(
            label_quality_score=np.empty(0),
            is_label_issue=np.empty(0, dtype=bool),
            suggested_label=np.empty(0, dtype=np.int64),
            ranked_issue_indices=np.empty(0, dtype=np.int64),
            noise_rate_per_class={name: None for name in class_names},
            summary={"n": 0, "n_issues": 0, "method": "none"},
        )
    probs = _normalized(pred_probs)
    method = "confident_learning"
    chosen_weight: float | None = None
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise ValueError(f"embeddings must be ({n}, dim), got {embeddings.shape}")
        if knn_weight != "auto" and not 0.0 <= float(knn_weight) <= 1.0:
            raise ValueError(f"knn_weight must be 'auto' or in [0, 1], got {knn_weight!r}")
        if n > 2 and knn_weight != 0:
            knn = knn_label_distribution(
                embeddings=embeddings, labels=labels, n_classes=n_classes, k=knn_neighbors, graph=graph
            )
            grid = KNN_WEIGHT_GRID if knn_weight == "auto" else (float(knn_weight),)
            rows = np.arange(n)
            losses = [
                -np.log(np.clip((1 - w) * probs[rows, labels] + w * knn[rows, labels], 1e-12, None)).mean()
                for w in grid
            ]
            chosen_weight = float(grid[int(np.argmin(losses))])
            probs = (1.0 - chosen_weight) * probs + chosen_weight * knn
            method = "confident_learning+knn"

    present = counts > 0
    enough = counts >= MIN_EXAMPLES_FOR_CONFIDENT_JOINT
    notes: list[str] = []
    if present.sum() < 2:
        # one class only: nothing to confuse it with, so no label can be shown to be wrong
        is_issue = np.zeros(n, dtype=bool)
        quality = np.ones(n)
        confident_joint = None
        notes.append("fewer than two classes have labels: no label issues can be found")
    else:
        # cleanlab needs every column to be some label's class: work on present classes only
        present_classes = np.flatnonzero(present)
        remap = np.full(n_classes, -1)
        remap[present_classes] = np.arange(len(present_classes))
        sub_labels = remap[labels]
        sub_probs = _normalized(probs[:, present_classes])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            confident_joint_sub = cleanlab.count.compute_confident_joint(sub_labels, sub_probs)
            is_issue = cleanlab.filter.find_label_issues(
                sub_labels,
                sub_probs,
                filter_by=FILTER_BY,
                confident_joint=confident_joint_sub,
                n_jobs=1,
            )
            quality = cleanlab.rank.get_label_quality_scores(
                sub_labels, sub_probs, method="self_confidence"
            )
        confident_joint = np.zeros((n_classes, n_classes))
        confident_joint[np.ix_(present_classes, present_classes)] = confident_joint_sub
        small = [class_names[c] for c in np.flatnonzero(present & ~enough)]
        if small:
            notes.append(
                f"classes with < {MIN_EXAMPLES_FOR_CONFIDENT_JOINT} labels get no noise-rate estimate: "
                + ", ".join(small)
            )
    suggested = np.where(is_issue, probs.argmax(axis=1), labels).astype(np.int64)
    # a flagged label whose best alternative is its own class has no better suggestion: unflag
    is_issue = is_issue & (suggested != labels)
    suggested = np.where(is_issue, suggested, labels)
    flagged = np.flatnonzero(is_issue)
    ranked = flagged[np.argsort(quality[flagged], kind="stable")]
    noise_rate: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        if confident_joint is None or not enough[c] or counts[c] < MIN_EXAMPLES_FOR_NOISE_RATE or confident_joint[c].sum() == 0:
            noise_rate[name] = None
        else:
            noise_rate[name] = round(float(1.0 - confident_joint[c, c] / confident_joint[c].sum()), 4)
    summary = {
        "method": method,
        "n": int(n),
        # how often the probabilities judged by name the given label, averaged over the classes with enough labels to be
        # learned (a model calling every part good scores 90% plain accuracy where nine in ten are good; a class of two
        # labels not learned yet weighed as much as one of 500, review): with a weak model, most suspects are its errors
        "out_of_fold_balanced_accuracy": round(float(np.mean([(probs[labels == c].argmax(axis=1) == c).mean()
                                                              for c in np.flatnonzero(enough if enough.any() else present)])), 4),
        "n_issues": int(is_issue.sum()),
        "issue_rate": round(float(is_issue.mean()), 4),
        "issues_per_given_class": {
            class_names[c]: int((is_issue & (labels == c)).sum()) for c in range(n_classes)
        },
        "labels_per_class": {class_names[c]: int(counts[c]) for c in range(n_classes)},
        "knn_neighbors": knn_neighbors if method.endswith("knn") else None,
        "knn_weight": chosen_weight,
        "filter_by": FILTER_BY,
        "notes": notes,
    }
    return LabelIssueReport(
        label_quality_score=np.asarray(quality, dtype=np.float64),
        is_label_issue=is_issue,
        suggested_label=suggested,
        ranked_issue_indices=ranked.astype(np.int64),
        noise_rate_per_class=noise_rate,
        summary=summary,
    )


def _check_labels_and_probs(labels: np.ndarray, pred_probs: np.ndarray, n_classes: int) -> None:
    if labels.ndim != 1 or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError("labels must be a 1-d integer array")
    if pred_probs.shape != (len(labels), n_classes):
        raise ValueError(
            f"pred_probs must be (n, n_classes) = {(len(labels), n_classes)}, got {pred_probs.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must be class indices in [0, {n_classes}) (pass only labeled rows)")
    if not np.isfinite(pred_probs).all() or (pred_probs < 0).any():
        raise ValueError("pred_probs must be finite and non-negative")


def _normalized(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(probs, 0.0, None)
    sums = probs.sum(axis=1, keepdims=True)
    uniform = np.full_like(probs, 1.0 / probs.shape[1])
    return np.where(sums > 0, probs / np.where(sums > 0, sums, 1.0), uniform)


# ---- near-duplicates and outliers -----------------------------------------------------------
# Pixel-verified near-duplicates (with `thumbnails=`): a pair is flagged when its best-aligned detail correlation
# beats NULL_QUANTILE of random pairs of the same collection by NULL_MARGIN, and is at least MIN_DETAIL_CORRELATION.
# Measured on the real datasets (benchmarks/split_leakage.py): random-pair 99.9% quantiles 0.15 (NEU), 0.44
# (magnetic tile), 0.90 (MVTec bottle: one registered product, so every pair correlates); NEU's same-surface crops
# sit at 0.5-1.0, well apart from the rest, and are all within one class.
NEAR_DUPLICATE_NEIGHBORS = 5  # embedding neighbours checked on pixels per image
NULL_PAIRS = 3000
# Collections with at most this many times NULL_PAIRS pairs draw the null from every pair (~250 images: 66 ms)
SMALL_COLLECTION_PAIRS = 10
NULL_QUANTILE = 0.999
NULL_MARGIN = 0.05
MIN_DETAIL_CORRELATION = 0.5


def find_near_duplicates(
    *, embeddings: np.ndarray, threshold: float = 0.98, thumbnails: np.ndarray | None = None, k: int = NEAR_DUPLICATE_NEIGHBORS,
    known_groups: np.ndarray | None = None, seed: int = 0, advance: Callable[[int], None] | None = None,
    pair_cache: PairCorrelationCache | None = None, image_keys: Sequence[str] | None = None, graph: NeighborGraph | None = None,
) -> Finding:
    """Images that are near-copies of another image.

    Without `thumbnails`: cosine similarity of the embeddings >= `threshold`. That alone cannot tell a copy from a
    look-alike (a registered product, a uniform texture): every MVTec bottle photo has a neighbour >= 0.966.
    With `thumbnails` (rows of `modeling.image_detail.detail_thumbnails`, same order): each image's k nearest
    embedding neighbours are checked on pixels (`AlignedCorrelation`), and a pair is a near-duplicate when it is
    more alike than NULL_QUANTILE of NULL_PAIRS random pairs of this collection, by NULL_MARGIN (`threshold` is then
    unused). That finds shifted and overlapping crops of one surface and other photos of one part under another
    exposure, and not two parts that merely look alike. `known_groups` (e.g. declared parts, one id per image) keeps
    pairs within a group out of the random pairs, where shots of one part would raise the threshold onto real copies.
    `pair_cache` with `image_keys` (content hashes, same order) answers pairs correlated in an earlier call; the
    caller saves it. `graph` (modeling.neighbor_graph of these embeddings) saves computing the k-NN graph again.

    scores = 1 - the best similarity (cosine, or aligned correlation) to another image, clipped to [0, 1];
    related = that image. summary["groups"] lists connected groups (positions); summary["pairs"] lists every flagged
    pair as ((position, position), similarity); with thumbnails summary["threshold"] is the correlation used and
    summary["n_null_pairs_above_threshold"] how many random pairs reached it.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {embeddings.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    n = len(embeddings)
    if thumbnails is not None and len(thumbnails) != n:
        raise ValueError(f"{len(thumbnails)} thumbnails for {n} embeddings")
    if pair_cache is not None and (image_keys is None or len(image_keys) != n):
        raise ValueError("pair_cache needs image_keys, one per embedding")
    if n < 2:
        return Finding(
            scores=np.ones(n), is_issue=np.zeros(n, dtype=bool),
            summary={"n_issues": 0, "n_groups": 0, "method": "embedding_cosine" if thumbnails is None else "pixel_verified",
                     "threshold": threshold, "null_level": None, "n_null_pairs": 0, "n_null_pairs_above_threshold": 0,
                     "n_candidate_pairs": 0, "n_pairs_from_cache": 0, "n_pairs_correlated": 0, "groups": [], "pairs": []},
            related=np.full(n, -1, dtype=np.int64),
        )
    sims, neighbors = _nearest_neighbors(embeddings, 8 if thumbnails is None else k, graph)
    if thumbnails is None:
        best_sim = sims[:, 0].astype(np.float64)
        related = neighbors[:, 0].astype(np.int64)
        flagged_pairs = [(int(i), int(neighbors[i, j]), float(sims[i, j])) for i, j in zip(*np.nonzero(sims >= threshold))]
        summary: dict[str, Any] = {"method": "embedding_cosine", "threshold": threshold}
    else:
        best_sim, related, flagged_pairs, summary = _pixel_verified_pairs(neighbors, thumbnails, known_groups=known_groups, seed=seed, advance=advance,
                                                                          pair_cache=pair_cache, image_keys=image_keys)
    is_issue = np.zeros(n, dtype=bool)
    for a, b, _ in flagged_pairs:
        is_issue[a] = is_issue[b] = True
    groups = connected_groups(n, [(a, b) for a, b, _ in flagged_pairs])
    return Finding(
        scores=np.clip(1.0 - best_sim, 0.0, 1.0),
        is_issue=is_issue,
        summary={"n_issues": int(is_issue.sum()), "n_groups": len(groups), **summary, "groups": groups,
                 "pairs": sorted({(min(a, b), max(a, b)): round(c, 4) for a, b, c in flagged_pairs}.items())},
        related=related,
    )


def _pixel_verified_pairs(neighbors: np.ndarray, thumbnails: np.ndarray, *, known_groups: np.ndarray | None, seed: int,
                          advance: Callable[[int], None] | None, pair_cache: PairCorrelationCache | None = None,
                          image_keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, float]], dict[str, Any]]:
    from modeling.image_detail import AlignedCorrelation

    n = len(neighbors)
    correlate: Callable[[int, int], float] = AlignedCorrelation(thumbnails)
    hits_before = pair_cache.hits if pair_cache is not None else 0
    if pair_cache is not None:
        correlate = pair_cache.wrap(correlate, image_keys)
    candidates = sorted({(min(i, int(j)), max(i, int(j))) for i in range(n) for j in neighbors[i]})
    # the null: random pairs that are not candidates (with few images, every other pair)
    rng = np.random.default_rng(seed)
    candidate_set = set(candidates)
    group = np.asarray(known_groups, dtype=object) if known_groups is not None else None

    def unrelated(a: int, b: int) -> bool:
        return (a, b) not in candidate_set and (group is None or group[a] is None or group[a] != group[b])

    if n * (n - 1) // 2 - len(candidates) <= NULL_PAIRS:
        null_pairs = [(a, b) for a in range(n) for b in range(a + 1, n) if unrelated(a, b)]
    elif image_keys is not None:
        null_pairs = stable_random_pairs(image_keys, n_pairs=NULL_PAIRS, seed=seed, keep=unrelated)
    else:
        drawn = rng.integers(0, n, size=(3 * NULL_PAIRS, 2))
        null_pairs = sorted(pair for pair in {(int(min(a, b)), int(max(a, b))) for a, b in drawn if a != b} if unrelated(*pair))
        null_pairs = [null_pairs[i] for i in rng.permutation(len(null_pairs))[:NULL_PAIRS]]
    tick = advance or (lambda _n: None)
    null = _correlations(null_pairs, correlate, tick)
    null_level = float(np.quantile(null, NULL_QUANTILE)) if len(null) else MIN_DETAIL_CORRELATION
    threshold = max(null_level + NULL_MARGIN, MIN_DETAIL_CORRELATION)
    best = np.full(n, -1.0)
    related = np.full(n, -1, dtype=np.int64)
    flagged = []
    for (a, b), correlation in zip(candidates, _correlations(candidates, correlate, tick)):
        for this, other in ((a, b), (b, a)):
            if correlation > best[this]:
                best[this], related[this] = correlation, other
        if correlation >= threshold:
            flagged.append((a, b, float(correlation)))
    tick(max(near_duplicate_work(n, k=neighbors.shape[1]) - len(candidates) - len(null_pairs), 0))  # the bar's total was a bound
    summary = {"method": "pixel_verified", "threshold": round(threshold, 4), "null_quantile": NULL_QUANTILE,
               "null_level": round(null_level, 4), "n_null_pairs": len(null_pairs), "n_null_pairs_above_threshold": int((null >= threshold).sum()),
               "n_candidate_pairs": len(candidates)}
    # of the candidate and null pairs together (a later round takes most of both from the cache)
    summary["n_pairs_from_cache"] = pair_cache.hits - hits_before if pair_cache is not None else 0
    summary["n_pairs_correlated"] = len(candidates) + len(null_pairs) - summary["n_pairs_from_cache"]
    return best, related, flagged, summary


def stable_random_pairs(keys: Sequence[str], *, n_pairs: int, seed: int, keep: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """About n_pairs random pairs of positions (a < b) for which keep(a, b), drawn from the images' keys rather than
    their positions, so the next round, with a few images more, draws nearly the same pairs and a pair cache answers
    them (drawn by position, every pair changed with any new image: NULL_PAIRS correlations a round, ~3 s).
    Up to SMALL_COLLECTION_PAIRS pairs in all: every kept pair ranked by a hash of its two keys, the lowest n_pairs
    taken (uniform; a new image changes only the picks its own pairs displace). Larger: each image gets a rank from a
    hash of its key, and images in rank order pick, pass after pass, the image that follows a hash of (key, pass) on
    the rank ring, until n_pairs are drawn or a pass adds none (new images change only the picks next to them)."""
    import hashlib

    def rank(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}|{text}".encode(), digest_size=8).digest(), "big")

    n = len(keys)
    if n * (n - 1) // 2 <= SMALL_COLLECTION_PAIRS * n_pairs:
        kept = [(a, b) for a in range(n) for b in range(a + 1, n) if keep(a, b)]
        ranked = sorted(kept, key=lambda pair: rank("|".join(sorted((keys[pair[0]], keys[pair[1]])))))
        return sorted(ranked[:n_pairs])
    ranks = np.array([rank(key) for key in keys], dtype=np.uint64)
    ring = np.argsort(ranks, kind="stable")
    ring_ranks = ranks[ring]
    pairs: set[tuple[int, int]] = set()
    for attempt in range(64):  # passes, while they add pairs: a few picks are not kept (candidates, one part) or repeat
        before = len(pairs)
        for a in ring:
            if len(pairs) >= n_pairs:
                return sorted(pairs)
            target = np.uint64(rank(f"{keys[a]}|{attempt}"))
            b = int(ring[int(np.searchsorted(ring_ranks, target)) % n])
            if a != b and keep(min(a, b), max(a, b)):
                pairs.add((int(min(a, b)), int(max(a, b))))
        if len(pairs) == before:
            break
    return sorted(pairs)


def _correlations(pairs: list[tuple[int, int]], correlate: Callable[[int, int], float], tick: Callable[[int], None]) -> np.ndarray:
    values = np.empty(len(pairs))
    for row, (a, b) in enumerate(pairs):
        values[row] = correlate(a, b)
        if row % 256 == 255:
            tick(256)
    tick(len(pairs) % 256)
    return values


def near_duplicate_work(n_images: int, *, k: int = NEAR_DUPLICATE_NEIGHBORS) -> int:
    """Upper bound on the pair comparisons `find_near_duplicates(thumbnails=)` makes (for a progress bar's total)."""
    return n_images * min(k, max(n_images - 1, 0)) + min(NULL_PAIRS, n_images * (n_images - 1) // 2)


def connected_groups(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components with more than one member, each sorted, ordered by their first member."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in {v for edge in edges for v in edge}:
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


SMALL_GROUP_MARGIN = 1.5  # a predicted member of a class under min_group_size is an outlier past 1.5x its labeled ones' farthest


def find_outliers(
    *, embeddings: np.ndarray, k: int = 10, threshold_mads: float = 6.0, groups: np.ndarray | None = None, min_group_size: int = 20,
    graph: NeighborGraph | None = None, given: np.ndarray | None = None,
) -> Finding:
    """Images far from all others: mean cosine distance to their k nearest neighbours.

    Flagged when that distance exceeds median + `threshold_mads` x MAD (scaled to a standard deviation) of the
    images like it: `groups` (e.g. the class, given or predicted; -1 = none) sets whose distances a cutoff is read
    from, for groups of at least `min_group_size`; images of no group use the whole set's. Without groups a compact
    majority class (good parts) sets the cutoff, and every image of a more varied defect class reads as an outlier: on
    the demo all 51 cracks were flagged. Images of a smaller group whose group is given (`given`: a label, not a
    prediction; all of them without `given`) are not judged (summary "groups_not_judged"): too few to know their spread,
    and a rare class's images sit far from everything by being rare (the whole set's cutoff flagged all 4 of a rare
    class and 9 of 11 of another). A predicted member of a small group is judged by the whole set's cutoff, or past
    SMALL_GROUP_MARGIN times the farthest labeled member's distance when that is larger: a blank frame predicted as
    the rare class is still found, the rare class's other images are not. scores = exp(-distance / median of the set).
    `graph` (modeling.neighbor_graph of these embeddings) saves computing the k-NN graph again.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {embeddings.shape}")
    n = len(embeddings)
    if n < 3:
        return Finding(
            scores=np.ones(n), is_issue=np.zeros(n, dtype=bool),
            summary={"n_issues": 0, "k": k, "note": "too few images to call any an outlier"},
            related=np.full(n, -1, dtype=np.int64),
        )
    sims, neighbors = _nearest_neighbors(embeddings, k, graph)
    distance = (1.0 - sims.astype(np.float64)).mean(axis=1)

    def cutoff_of(values: np.ndarray) -> tuple[float, float]:
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median))) * 1.4826
        return median, median + threshold_mads * max(mad, 1e-12)

    median, overall_cutoff = cutoff_of(distance)
    cutoff = np.full(n, overall_cutoff)
    group_cutoffs: dict[str, float] = {}
    not_judged: dict[str, int] = {}
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must be one value per image ({n}), got shape {groups.shape}")
        for group in np.unique(groups):
            members = groups == group
            if group != -1 and members.sum() >= min_group_size:
                cutoff[members] = group_cutoffs.setdefault(str(group), round(cutoff_of(distance[members])[1], 6))
            elif group != -1:
                exempt = members if given is None else members & np.asarray(given, dtype=bool)
                cutoff[exempt] = np.inf
                if exempt.any():
                    not_judged[str(group)] = int(exempt.sum())
                    # a predicted member: an outlier only well beyond the labeled ones (a rare class's images sit far
                    # from everything; a blank frame sits farther still)
                    cutoff[members & ~exempt] = max(overall_cutoff, SMALL_GROUP_MARGIN * float(distance[exempt].max()))
    is_issue = distance > cutoff
    scores = np.exp(-distance / max(median, 1e-12))
    return Finding(
        scores=scores,
        is_issue=is_issue,
        summary={
            "n_issues": int(is_issue.sum()),
            "k": int(neighbors.shape[1]),
            "median_knn_distance": round(median, 6),
            "cutoff_knn_distance": round(overall_cutoff, 6),
            **({"cutoff_knn_distance_by_group": group_cutoffs, "groups_not_judged": not_judged} if groups is not None else {}),
        },
        related=neighbors[:, 0].astype(np.int64),
    )
