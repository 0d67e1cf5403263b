"""Decision threshold, final predictions, metrics and gates: plain arrays in, plain results out.

Every metric, macro F1 included, is computed on the final predictions: if P(defect) = 1 - P(negative class)
>= threshold, the most probable defect class, else the negative class.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.stats import beta, norm
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    max_fpr: float
    confidence: float
    n_negatives: int
    n_defects: int
    # The rank and tail thresholds are those of the blend rule on every labeled good part, whichever rule chose
    # `threshold`; so are `margin_attainable` and, except for the "pool" rule, `allowed_false_positives`.
    allowed_false_positives: int  # by the Clopper-Pearson rule
    rank_threshold: float  # the Clopper-Pearson (rank) threshold alone
    tail_threshold: float | None  # the robust parametric tail threshold alone
    observed_fpr: float  # of the final threshold, on the data it was chosen on
    fpr_upper_bound: float  # one-sided Clopper-Pearson bound at `confidence`, same data
    observed_defect_recall: float | None
    margin_attainable: bool  # False: too few negatives to keep the bound under max_fpr even with 0 false positives
    source: str = ""
    # Which rule chose `threshold`: all_negatives (the blend), stratified (labeled good parts picked by active
    # learning; see `stratified_threshold`, whose FPR estimate over all good parts of the pool is kept) or pool.
    rule: str = "all_negatives"
    n_sampled_negatives: int | None = None
    n_picked_negatives: int | None = None
    estimated_population_fpr: float | None = None
    # the rule's threshold before it was moved to the middle of the gap between the labeled scores around it
    # (`middle_of_the_gap`; the floor too): the decisions on the labeled images are the same at both
    rule_threshold: float | None = None
    # stratified rule: sampled good parts at or above the threshold. One is forgiven by the decision but counted by
    # the estimate, which then may read over the gate by that one part (1 / n_sampled of the unlabeled ones)
    n_sampled_negatives_above: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def fpr_upper_bound(false_positives: int, negatives: int, confidence: float) -> float:
    if negatives == 0:
        return 1.0
    if false_positives >= negatives:
        return 1.0
    return float(beta.ppf(confidence, false_positives + 1, negatives - false_positives))


def _logit(p: np.ndarray | float, *, floor: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), floor, 1 - floor)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def rank_threshold(*, negative_scores: np.ndarray, max_fpr: float, confidence: float) -> tuple[float, int, bool]:
    """(threshold, allowed false positives, attainable): the lowest threshold letting through the largest number k
    of negatives whose one-sided Clopper-Pearson bound on the FPR stays <= max_fpr."""
    ordered = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    n = len(ordered)
    if n == 0:
        return 0.5, 0, False
    attainable = fpr_upper_bound(0, n, confidence) <= max_fpr
    allowed = 0
    while attainable and allowed + 1 < n and fpr_upper_bound(allowed + 1, n, confidence) <= max_fpr:
        allowed += 1
    return _threshold_letting_through(ordered, allowed), allowed, attainable


def _threshold_letting_through(ordered: np.ndarray, k: int) -> float:
    """For negatives' scores sorted high to low: the threshold that lets exactly the k highest through."""
    if k == 0:
        return float(np.nextafter(ordered[0], np.inf))  # just above the highest-scoring good part
    if k >= len(ordered):
        return 0.0
    if ordered[k] == ordered[k - 1]:
        # a tie across the cut: the midpoint is the tied score, and "p >= threshold" would let both through (review:
        # 10 of 300 through where 9 were allowed); just above it lets through fewer than k, never more
        return float(np.nextafter(ordered[k - 1], np.inf))
    return float((ordered[k] + ordered[k - 1]) / 2)


def observed_fpr_threshold(*, negative_scores: np.ndarray, max_fpr: float, at_least_one: bool = False) -> float:
    """The lowest threshold at which the observed FPR of these negatives is <= max_fpr (no margin); with
    `at_least_one`, one good part may pass however few there are (one odd or mislabeled part)."""
    ordered = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(max_fpr * len(ordered) + 1e-9))
    return _threshold_letting_through(ordered, max(allowed, 1) if at_least_one else allowed)


def _robust_logit_normal(scores: np.ndarray, *, upper_quantile: float | None = None) -> tuple[float, float]:
    """(median, MAD-based standard deviation) of the scores' logits; with `upper_quantile`, the spread is at least
    the one that puts that quantile where a normal would ((quantile - median) / z)."""
    z = _logit(scores)
    median = float(np.median(z))
    spread = max(float(np.median(np.abs(z - median))) * 1.4826, 1e-3)
    if upper_quantile is not None:
        spread = max(spread, (float(np.quantile(z, upper_quantile)) - median) / float(norm.ppf(upper_quantile)))
    return median, spread


def tail_threshold(*, negative_scores: np.ndarray, target_fpr: float) -> float | None:
    """The (1 - target_fpr) quantile of a normal fitted robustly (median, MAD) to the logits of the negatives'
    scores: one odd good part (or a mislabeled one) cannot drag it to 1 the way it drags a rank threshold."""
    if len(negative_scores) < 5:
        return None
    median, spread = _robust_logit_normal(negative_scores)
    return float(_sigmoid(median + float(norm.ppf(1 - target_fpr)) * spread))


def pool_rank_threshold(*, negative_scores: np.ndarray, unlabeled_p_defect: np.ndarray, max_fpr: float, confidence: float) -> tuple[float, int, float]:
    """(threshold, allowed false positives, estimated negatives) for a labeled set chosen by active learning.

    Active selection labels the good parts the model is unsure about, so the labeled good parts' scores overstate
    the false-positive rate of the good parts on the line, and a rule fitted to them alone sets the threshold far
    too high. The good parts left unlabeled are counted too, in expectation from the current model: the number of
    good parts is #labeled good + sum over unlabeled images of P(good), and an unlabeled image above the threshold
    adds its P(good) to the false positives. The Clopper-Pearson margin of `rank_threshold` is kept, with that
    expected number of good parts as n."""
    labeled = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    unlabeled = np.asarray(unlabeled_p_defect, dtype=np.float64)
    order = np.argsort(-unlabeled)
    unlabeled_sorted, unlabeled_good = unlabeled[order], 1.0 - unlabeled[order]
    n_effective = float(len(labeled) + unlabeled_good.sum())
    n_whole = max(int(np.floor(n_effective)), 1)
    allowed = 0
    while allowed + 1 < n_whole and fpr_upper_bound(allowed + 1, n_whole, confidence) <= max_fpr:
        allowed += 1
    # candidate thresholds: every score, high to low; expected false positives at "score >= t"
    candidates = np.unique(np.concatenate([labeled, unlabeled_sorted]))[::-1]
    labeled_above = np.searchsorted(-labeled, -candidates, side="right")
    unlabeled_cumulative = np.concatenate([[0.0], np.cumsum(unlabeled_good)])
    unlabeled_above = unlabeled_cumulative[np.searchsorted(-unlabeled_sorted, -candidates, side="right")]
    expected_fp = labeled_above + unlabeled_above
    ok = np.flatnonzero(expected_fp <= allowed)
    if len(labeled) == 0 or len(ok) == 0 or ok[-1] + 1 >= len(candidates):
        threshold = float(np.nextafter(labeled[0], np.inf)) if len(labeled) else 0.5
        return threshold, allowed, n_effective
    last = ok[-1]  # lowest threshold that keeps the expected false positives within the allowance
    return float((candidates[last] + candidates[last + 1]) / 2), allowed, n_effective


# Below this many sampled (not actively picked) good parts the stratified rule has too little to stand on and the
# threshold is chosen on every labeled good part, the cautious way.
MIN_SAMPLED_NEGATIVES = 20


# The upper-tail scale: the spread that puts this quantile of the good parts' logits where a normal would.
UPPER_TAIL_QUANTILE = 0.8


def normal_tail_fpr(*, negative_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of good parts scoring >= each threshold under a normal fitted to the logits: the median, and the larger
    of the MAD's spread and the upper-tail spread ((80th percentile - median) / z_0.8).

    The good parts' logits are right-skewed: a minority of good parts look like defects. The MAD is set by the bulk
    and understated that tail in a magnetic-tile simulation (seed 0, 60 labels: estimated 1.8%, actual 20% of the
    unlabeled good parts above the threshold); the 80th percentile of ~30 sampled parts is still robust to one odd
    part. The blend rule's `tail_threshold` keeps the MAD alone: replayed on that simulation's first rounds (29 good
    parts, none picked) the upper-tail spread changed nothing (pool FPR over 3% in 4 of 5 seeds either way)."""
    median, spread = _robust_logit_normal(negative_scores, upper_quantile=UPPER_TAIL_QUANTILE)
    return norm.sf((_logit(thresholds) - median) / spread)


# The unlabeled good parts' rate is a normal fit to ~30 sampled scores: it is inflated this much in the decision,
# the margin `tail_threshold` takes by aiming at a third of the gate.
TAIL_MARGIN = 3.0


def stratified_threshold(*, sampled_negatives: np.ndarray, picked_negatives: np.ndarray, n_unlabeled_negatives: float,
                         max_fpr: float) -> tuple[float, float]:
    """(threshold, estimated FPR over the pool's good parts) when some labeled good parts were picked by active learning.

    Uncertainty-driven selection labels the good parts that look most like defects, so their scores overstate the
    FPR of the good parts on the line, and a threshold fitted to them sits far too high (on magnetic tile the test
    FPR stayed at 0-0.005 while defect recall sat mostly at 0.27-0.46 from 120 to 300 labels). The pool's good parts are three groups: the picked ones
    and the sampled ones (imports, random picks), whose false positives are counted one by one from their
    out-of-fold scores, and the unlabeled ones, whose rate comes from a normal fit to the sampled scores
    (`normal_tail_fpr`: median, and a spread that follows the upper tail; the sampled parts are a random sample of
    all good parts, so this overstates the unlabeled ones' rate: the defect-like ones were picked).
    No part is counted twice. The unlabeled rate is never under the sampled parts' own share above the threshold
    (a normal fit misses a defect-like minority of good parts), though the decision forgives one odd sampled part.
    The threshold is the lowest at which the estimate, with the unlabeled rate inflated by TAIL_MARGIN, is <=
    max_fpr; the estimate returned is the plain one."""
    sampled = np.asarray(sampled_negatives, dtype=np.float64)
    if len(sampled) < MIN_SAMPLED_NEGATIVES:
        raise ValueError(f"the stratified threshold needs >= {MIN_SAMPLED_NEGATIVES} sampled good parts; got {len(sampled)}")
    picked = np.asarray(picked_negatives, dtype=np.float64)
    if not (np.isfinite(sampled).all() and np.isfinite(picked).all()):
        raise ValueError("good-part scores must be finite numbers (a NaN would silently make every part 'good')")
    labeled = np.sort(np.concatenate([sampled, picked]))
    # The estimate only falls as the threshold rises: a fine grid in logit space plus every labeled score (where
    # the count steps) finds the lowest threshold that meets it.
    grid = _sigmoid(np.linspace(-12.0, 12.0, 2401))
    candidates = np.unique(np.concatenate([grid, np.nextafter(labeled, np.inf)]))
    estimate, decision = stratified_fpr_estimates(sampled_negatives=sampled, picked_negatives=picked,
                                                  n_unlabeled_negatives=n_unlabeled_negatives, thresholds=candidates)
    meets = np.flatnonzero(decision <= max_fpr)
    best = int(meets[0]) if len(meets) else len(candidates) - 1
    return float(candidates[best]), float(estimate[best])


def stratified_fpr_estimates(*, sampled_negatives: np.ndarray, picked_negatives: np.ndarray, n_unlabeled_negatives: float,
                             thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, decision value) of the FPR over all good parts of the pool at each threshold, as
    `stratified_threshold` reads them: labeled good parts one by one, unlabeled ones at the normal-tail rate (times
    TAIL_MARGIN in the decision value), or at the sampled parts' own share above the threshold where that is more."""
    sampled = np.asarray(sampled_negatives, dtype=np.float64)
    labeled = np.sort(np.concatenate([sampled, np.asarray(picked_negatives, dtype=np.float64)]))
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n_unlabeled = max(float(n_unlabeled_negatives), 0.0)
    n_total = len(labeled) + n_unlabeled
    labeled_false_positives = len(labeled) - np.searchsorted(labeled, thresholds, side="left")
    unlabeled_rate = normal_tail_fpr(negative_scores=sampled, thresholds=thresholds)
    # Never under the share of the sampled parts themselves at or above the threshold: they are a random sample of
    # the good parts. A saturated bulk with a defect-like minority (scores 1e-10..1e-7 and 10% up to 0.3) gives the
    # normal fit the bulk's spread, ~0 above any threshold (review: estimated 1.1-1.9% where 4.4-10.8% of such good
    # parts passed, synthetic draws). The share is not inflated (the defect-like good parts were the ones picked, so
    # the unlabeled ones' rate is below it), and the decision forgives a single sampled part, as the blend rule
    # does: one odd or mislabeled part must not drag the threshold above it; two are a tail. The estimate counts it.
    sampled_above = len(sampled) - np.searchsorted(np.sort(sampled), thresholds, side="left")
    sampled_share = sampled_above / max(len(sampled), 1)
    decision_rate = np.maximum(np.minimum(TAIL_MARGIN * unlabeled_rate, 1.0), np.where(sampled_above <= 1, 0.0, sampled_share))
    decision = (labeled_false_positives + n_unlabeled * decision_rate) / n_total
    return (labeled_false_positives + n_unlabeled * np.maximum(unlabeled_rate, sampled_share)) / n_total, decision


# The deployed model gives float32 probabilities, and P(defect) = 1 - P(good) comes in steps of 6e-8 near 0: a
# threshold below this would decide by rounding (the QA saw the deployed model and the stored decisions disagree on 7
# of 202 images at a threshold of 1.3e-7).
THRESHOLD_FLOOR = 1e-5
FLOAT32_STEP = 2.0 ** -24  # float32 tells 1 - p from 1 no finer: a score of 1.0 may be any logit above 16.6
MAX_GAP_MOVE = 6.0  # logits (x400 in odds): how far up the gap a threshold moves at most


def middle_of_the_gap(threshold: float, scores: np.ndarray) -> float:
    """Up to the middle, in logit space, of the gap between the labeled scores just below and at or above
    `threshold`, at most MAX_GAP_MOVE logits up; never down.

    Every threshold in that gap makes the same decisions on the labeled images; the rank rule picks its lowest
    point, just above the highest good part that must pass, which is right where a good part seen through another
    camera, or under other light, is called a defect. When good and defect scores are far apart (P(defect) 1e-9..1e-7
    for good parts, 0.99 and above for defects, as a head on separable embeddings gives) the threshold moves up into
    the gap; the cap keeps a saturated defect score (1.0: any logit past 16.6) from pulling it next to 1, where a
    defect scored 0.999 would pass. Where the scores overlap, the gap, and the move, are small."""
    scores = np.asarray(scores, dtype=np.float64)
    below, above = scores[scores < threshold], scores[scores >= threshold]
    if not len(below) or not len(above):
        return threshold
    low, high = float(below.max()), float(above.min())
    # scores as float32 tells them apart: 1e-9 and 1e-12 alike, 1.0 read as 1 - 2^-24
    low_logit, high_logit, at = (float(_logit(value, floor=FLOAT32_STEP)) for value in (low, high, threshold))
    middle = float(_sigmoid(min((low_logit + high_logit) / 2, at + MAX_GAP_MOVE)))
    return middle if threshold < middle <= high else threshold


def choose_defect_threshold(*, p_defect: np.ndarray, is_defect: np.ndarray, max_fpr: float, confidence: float = 0.75, source: str = "",
                            unlabeled_p_defect: np.ndarray | None = None, actively_picked: np.ndarray | None = None,
                            n_unlabeled_negatives: float = 0.0) -> ThresholdChoice:
    """The defect-vs-good threshold for the FPR gate, with a margin that fits the amount of data.

    Two estimates, averaged in logit space: a rank rule (allow only as many false positives as keep a one-sided
    Clopper-Pearson bound on the FPR under max_fpr) and a robust parametric tail (normal fit to the negatives'
    logits, median/MAD, at max_fpr / 3). With few negatives the rank rule alone sits at the single highest good
    part and wrecks recall; the tail alone has heavy-tail risk. Measured on magnetic tile (random 120-800 labels,
    5 draws each, out-of-fold scores): the blend kept test FPR <= 3.2% in every draw, with 1.5x the rank rule's
    defect recall at 120-200 labels and the same recall from 400 on. The threshold is never below the point where
    the labeled good parts' own observed FPR exceeds max_fpr, except that one of them may always pass (a heavy upper
    tail, as honest part-grouped scores have, pulls the tail estimate and the average down).

    `actively_picked` (per row: labeled because an active-learning strategy chose it, not as a random sample) with
    `n_unlabeled_negatives` (the expected number of good parts among the unlabeled non-test images) switches to
    `stratified_threshold` when some labeled good parts were picked and at least MIN_SAMPLED_NEGATIVES were not.
    Measured with `loop simulate` on magnetic tile (seeds 0-4, anomaly blend on): `default` passed the gates with 280
    labels (260-300) instead of 340 (seeds 0-1, blend rule alone); test FPR went over 3% in 4 of its 59 rounds after
    the first (worst 7.4%). With the MAD spread alone (no upper-tail spread) the same run took 260 labels (220-320)
    but went over in 6 of 56 rounds, worst 15% (estimated 1.8% there). The count of rounds over 3% is within
    run-to-run noise (the MAD rule gave 8/54 in an earlier run of the same command; the test split has ~190 good
    parts); the worst case halving is the clear gain, 20 labels of the median the cost.

    With `unlabeled_p_defect` (the current model's P(defect) for the unlabeled non-test images) the threshold is
    `pool_rank_threshold` instead. It is less cautious, so the loop uses it only to aim selection, never for the
    decision: on magnetic tile (benchmarks/selection_tuning.py, seeds 0-4) it let test FPR exceed 3% in 57 of 112
    random-label rounds and 25 of 72 `default` rounds, against 9/120 and 5/110 for the blend above.
    """
    p_defect = np.asarray(p_defect, dtype=np.float64)
    is_defect = np.asarray(is_defect, dtype=bool)
    negatives = p_defect[~is_defect]
    n_negatives, n_defects = len(negatives), int(is_defect.sum())
    by_rank, allowed, attainable = rank_threshold(negative_scores=negatives, max_fpr=max_fpr, confidence=confidence)
    by_tail = tail_threshold(negative_scores=negatives, target_fpr=max_fpr / 3)
    threshold = by_rank if by_tail is None else float(_sigmoid((float(_logit(by_rank)) + float(_logit(by_tail))) / 2))
    if by_tail is not None:
        # Never below the point where the labeled good parts themselves already fail the gate: a heavy upper tail
        # (honest, part-grouped scores) puts the normal-tail estimate low, and the logit average with it. Magnetic
        # tile split by tile: the average had an observed FPR of 3.2-4.4% in all 5 folds. With fewer good parts than
        # make one false positive 3% (34), one may still pass: the blend exists so that one odd part does not drag
        # the threshold to 1. (Review: this floor applied only from ~90 good parts, where the rank rule allows a
        # false positive; below, a bulk of saturated scores collapsed the tail fit to ~1e-7 and the average let
        # 6-10% of the very good parts it was chosen on through, in 84-92% of synthetic draws of 30-70 parts.)
        threshold = max(threshold, observed_fpr_threshold(negative_scores=negatives, max_fpr=max_fpr, at_least_one=True))
    rule, n_sampled, n_picked, population_fpr = "all_negatives", None, None, None
    if actively_picked is not None:
        picked_rows = np.asarray(actively_picked, dtype=bool)
        picked_negative = picked_rows[~is_defect]
        n_sampled, n_picked = int((~picked_negative).sum()), int(picked_negative.sum())
        if n_picked and n_sampled >= MIN_SAMPLED_NEGATIVES:
            threshold, population_fpr = stratified_threshold(
                sampled_negatives=negatives[~picked_negative], picked_negatives=negatives[picked_negative],
                n_unlabeled_negatives=n_unlabeled_negatives, max_fpr=max_fpr)
            rule = "stratified"
    rule_threshold = threshold
    threshold = max(middle_of_the_gap(threshold, p_defect), THRESHOLD_FLOOR)
    if rule == "stratified" and threshold != rule_threshold:  # the estimate at the threshold the round deploys
        population_fpr = float(stratified_fpr_estimates(
            sampled_negatives=negatives[~picked_negative], picked_negatives=negatives[picked_negative],
            n_unlabeled_negatives=n_unlabeled_negatives, thresholds=np.array([threshold]))[0][0])
    if unlabeled_p_defect is not None and len(unlabeled_p_defect) and n_negatives:
        by_pool, allowed, _n_effective = pool_rank_threshold(negative_scores=negatives, unlabeled_p_defect=unlabeled_p_defect,
                                                             max_fpr=max_fpr, confidence=confidence)
        threshold, rule = by_pool, "pool"
    predicted_defect = p_defect >= threshold
    false_positives = int(predicted_defect[~is_defect].sum())
    sampled_above = int((negatives[~picked_negative] >= threshold).sum()) if rule == "stratified" else None
    return ThresholdChoice(
        threshold=threshold, max_fpr=max_fpr, confidence=confidence, n_negatives=n_negatives, n_defects=n_defects,
        allowed_false_positives=allowed, rank_threshold=by_rank, tail_threshold=by_tail,
        observed_fpr=false_positives / n_negatives if n_negatives else 0.0,
        fpr_upper_bound=fpr_upper_bound(false_positives, n_negatives, confidence),
        observed_defect_recall=float(predicted_defect[is_defect].mean()) if n_defects else None,
        margin_attainable=attainable, source=source, rule=rule, n_sampled_negatives=n_sampled, n_picked_negatives=n_picked,
        estimated_population_fpr=population_fpr, rule_threshold=rule_threshold, n_sampled_negatives_above=sampled_above,
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
        # undefined is None, not 0: a class with no test image has no recall nor F1 (a chart of zeros read as a failure),
        # one never predicted has no precision
        "per_class": {
            name: {"precision": float(precision[i]) if (y_pred == i).any() else None,
                   "recall": float(recall[i]) if support[i] else None,
                   "f1": float(f1[i]) if support[i] else None, "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {"labels": list(class_names), "matrix": confusion_matrix(y_true, y_pred, labels=label_ids).tolist()},
        "predicted_class_counts": {name: int((y_pred == i).sum()) for i, name in enumerate(class_names)},
        # classes the split holds no image of: its macro F1 cannot speak for them (the macro F1 gate fails, evaluate_gates)
        "classes_missing": [name for i, name in enumerate(class_names) if not support[i]],
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


# Parts with a hit (and with a miss) needed before their spread sets the effective sample size.
MIN_PARTS_FOR_SPREAD = 5


def proportion_interval_by_part(*, hits: np.ndarray, parts: np.ndarray | None = None, confidence: float = 0.90) -> dict:
    """A share of images (defect recall, FPR) with a two-sided interval that knows photos of one part are not
    independent: one flagged good tile of magnetic tile is six photos, 3.1% of a test split of 32 good tiles.

    Clopper-Pearson on an effective sample size n_eff = p(1-p) / Var(p), Var from the spread of hits between parts
    (the ratio estimator's linearisation), kept within [number of parts, number of images]. While fewer than
    MIN_PARTS_FOR_SPREAD parts carry a hit (or a miss) the spread says next to nothing, and n_eff is the number of
    parts (as if a part's photos always agreed, the cautious end): otherwise one false positive would look more
    certain than none. Without parts every image is its own part and this is plain Clopper-Pearson."""
    hits = np.asarray(hits, dtype=bool)
    n = len(hits)
    part_ids = np.arange(n) if parts is None else np.unique(np.asarray(parts, dtype=object).astype(str), return_inverse=True)[1]
    m = int(part_ids.max()) + 1 if n else 0
    result = {"value": float(hits.mean()) if n else None, "n_images": n, "n_parts": m, "n_hits": int(hits.sum()),
              "n_parts_with_hits": int(len(np.unique(part_ids[hits]))) if n else 0, "confidence": confidence}
    if n == 0:
        return {**result, "low": None, "high": None, "effective_n": 0.0}
    share = float(hits.mean())
    photos_per_part = np.bincount(part_ids, minlength=m)
    hits_per_part = np.bincount(part_ids, weights=hits.astype(float), minlength=m)
    variance = m / max(m - 1, 1) * float(np.sum((hits_per_part - share * photos_per_part) ** 2)) / n ** 2
    parts_with_hits = int(np.count_nonzero(hits_per_part))
    parts_with_misses = int(np.count_nonzero(hits_per_part < photos_per_part))
    if m == n:
        effective_n = float(n)  # one image per part: independent draws
    elif min(parts_with_hits, parts_with_misses) >= MIN_PARTS_FOR_SPREAD and variance > 0:
        effective_n = float(np.clip(share * (1 - share) / variance, m, n))
    else:
        effective_n = float(m)
    successes = share * effective_n
    tail = (1 - confidence) / 2
    low = 0.0 if successes <= 0 else float(beta.ppf(tail, successes, effective_n - successes + 1))
    high = 1.0 if successes >= effective_n else float(beta.ppf(1 - tail, successes + 1, effective_n - successes))
    return {**result, "low": low, "high": high, "effective_n": round(effective_n, 2)}


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

    def defect_gate(name: str, threshold: float, comparison: str) -> Gate:
        # a project with a "no defect" class whose test split lacks defects (or good parts) cannot measure this gate:
        # it fails rather than drops out, or a test split of good parts only would pass every gate without one defect
        if has_negative and metrics.get(name) is None:
            return Gate(name, None, threshold, comparison, True, False)
        return gate(name, metrics.get(name), threshold, comparison, has_negative)

    # macro F1 over the classes the test split holds: with a class missing, a model that cannot tell it from the others
    # passed (QA: 4 crazing test images, F1 1.0, for a 3-class project whose other classes had no test image). It fails,
    # its value kept, as the defect gates fail on a test split without defects
    f1_gate = gate("macro_f1", macro_f1, macro_f1_min, ">=")
    if metrics.get("classes_missing") and f1_gate.applicable:
        f1_gate = replace(f1_gate, passed=False)
    gates = [
        f1_gate,
        defect_gate("defect_recall", defect_recall_min, ">="),
        defect_gate("negative_fpr", negative_fpr_max, "<="),
        gate("latency_ms", latency_ms, latency_ms_max, "<="),
    ]
    return gates


def all_gates_pass(gates: list[Gate]) -> bool:
    return all(g.passed for g in gates if g.applicable)
