"""Which unlabeled images to send to annotators next: acquisition strategies looked up by name.

One entry point, `select_batch(strategy=..., budget=...)`, takes plain arrays (frozen-backbone
embeddings, the current model's probabilities for every image, current labels with -1 for
unlabeled, and the candidate positions) and returns positions best first with a score and a
reason per pick. A new strategy is one function plus `@register_strategy("name")`.

Strategies:
- `random`   the baseline every benchmark compares against.
- `margin`   smallest gap between the top two class probabilities.
- `entropy`  highest normalised predictive entropy.
- `rare`     FAISS k-NN around labeled and predicted examples of scarce classes, weighted by scarcity,
             plus the predicted probability mass on scarce classes.
- `diverse`  k-center greedy (farthest first from everything labeled): no near-duplicates.
- `default`  gate-aware mix: uncertainty + rare-class score, re-weighted toward whichever quality
             gate the loop estimates is failing (defect recall -> likely-defect uncertain parts,
             macro F1 -> rare classes, false-positive rate -> good parts confused with defects),
             then a diversity filter over a shortlist. With good parts labeled but no defect yet
             (cold start) it ranks by k-NN distance to the known-good embeddings.

Sized for pools of ~1M images: scoring is vectorised over the probabilities, top-k uses
argpartition, k-NN searches run only for a few hundred queries, and diversity only looks at a
shortlist of a few hundred vectors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modeling.embedding_index import EmbeddingIndex, normalize_rows

__all__ = [
    "SelectionResult",
    "SelectionContext",
    "available_strategies",
    "register_strategy",
    "select_batch",
    "margin_uncertainty",
    "normalized_entropy",
    "class_scarcity_weights",
]

REASONS = (
    "uncertain",
    "rare_class",
    "diverse",
    "cold_start",
    "random",
    "likely_defect",
    "confused_good",
)
GATE_KEYS = ("macro_f1", "defect_recall", "negative_fpr")

# Default-strategy weights: uncertainty leads; a failing gate adds weight to its own component.
BASE_WEIGHTS = {"uncertain": 1.0, "rare_class": 0.5, "likely_defect": 0.0, "confused_good": 0.0}
FAILING_GATE_BOOST = 2.0
GATE_COMPONENT = {
    "defect_recall": "likely_defect",
    "macro_f1": "rare_class",
    "negative_fpr": "confused_good",
}

# k-NN work for the rare-class score stays bounded whatever the pool size.
RARE_MIN_WEIGHT = 0.2  # classes at least 5x more common than the rarest get no k-NN queries
RARE_LABELED_QUERIES_PER_CLASS = 8
RARE_PREDICTED_QUERIES_PER_CLASS = 4
RARE_NEIGHBORS = 64
# up to this many labeled images, near-duplicate checks use one exact matrix product
EXACT_LABELED_CHECK_MAX = 20_000

BOUNDARY_LOGIT_SCALE = 1.0
OTHER_SIDE_SHARE = 0.5
SHORTLIST_PER_PICK = 10
MIN_SHORTLIST = 200
# A shortlist the diversity filter empties before the budget is spent (many near-identical images ranked together) is
# widened 4x at a time up to this many candidates: its redundancy matrix is this size squared (8192: 268 MB)
MAX_SHORTLIST = 8192
# cosine at or above this = near-duplicate, never two in one batch nor a twin of a labeled image. Measured on
# magnetic tile (efficientnet_lite0): 87% of images have a neighbour >= 0.97 (same part, different defects), only
# 2% one >= 0.995; at 0.97 the filter starved batches (+1..+7 of 20 picks from ~260 labels on).
DUPLICATE_SIMILARITY = 0.995
REDUNDANCY_WEIGHT = 0.5
DIVERSE_POOL_SAMPLE = 20_000
DIVERSE_LABELED_SAMPLE = 2_000
COLD_START_NEIGHBORS = 5
# multiply-adds allowed for the cold-start distance scan; a larger pool is scanned on a sample
COLD_START_MAX_FLOPS = 2e10


@dataclass
class SelectionResult:
    indices: np.ndarray  # positions into the arrays passed in, best first, len <= budget
    # higher = more worth labeling, non-increasing along `indices`. margin/entropy/rare: the raw
    # score; diverse: cosine distance to the nearest labeled-or-picked image; default: the
    # shortlist-normalised combined score minus redundancy with earlier picks, at pick time.
    scores: np.ndarray
    reasons: list[str]  # per pick, one of REASONS
    summary: dict[str, Any]  # strategy name, weights used, gate focus, timings


@dataclass
class SelectionContext:
    """Validated inputs plus things several strategies need, computed once."""

    embeddings: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    candidates: np.ndarray
    class_names: list[str]
    negative_index: int | None
    gate_estimates: dict[str, bool | None]
    defect_threshold: float | None
    index: EmbeddingIndex | None
    rng: np.random.Generator
    # positions asked earlier and still waiting for an answer (in the annotators' queue): a batch treats them as
    # picked already, so it neither repeats one nor crowds the region they cover
    asked: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    timings_ms: dict[str, float] = field(default_factory=dict)
    _candidate_slot: np.ndarray | None = None
    _class_columns: np.ndarray | None = None
    _predicted: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return self.probabilities.shape[1]

    def class_columns(self) -> np.ndarray:
        """Candidates' probabilities as (n_classes, n_candidates), C-contiguous float32.

        Class-major layout: every per-class operation is then a contiguous pass over the pool,
        which is several times faster than row-wise reductions on (1M, 6).
        """
        if self._class_columns is None:
            self._class_columns = np.ascontiguousarray(self.probabilities[self.candidates].T)
        return self._class_columns

    def predicted_class(self) -> np.ndarray:
        """Most probable class per candidate."""
        if self._predicted is None:
            columns = self.class_columns()
            best = columns[0].copy()
            predicted = np.zeros(columns.shape[1], dtype=np.int64)
            for c in range(1, columns.shape[0]):
                better = columns[c] > best
                predicted[better] = c
                np.maximum(best, columns[c], out=best)
            self._predicted = predicted
        return self._predicted

    @property
    def labeled_positions(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    def known_mask(self) -> np.ndarray:
        """Over all positions: labeled, or asked and waiting for its answer."""
        known = self.labels >= 0
        known[self.asked] = True
        return known

    def asked_sample(self, limit: int) -> np.ndarray:
        """The waiting asks, at most `limit` of them (a random sample past that): redundancy is a matter of regions."""
        if len(self.asked) > limit:
            return np.sort(self.rng.choice(self.asked, limit, replace=False))
        return self.asked

    def class_counts(self) -> np.ndarray:
        labeled = self.labels[self.labels >= 0]
        return np.bincount(labeled, minlength=self.n_classes)

    def candidate_slot(self) -> np.ndarray:
        """Array over all positions: slot in `candidates`, or -1 for non-candidates."""
        if self._candidate_slot is None:
            slot = np.full(len(self.labels), -1, dtype=np.int64)
            slot[self.candidates] = np.arange(len(self.candidates))
            self._candidate_slot = slot
        return self._candidate_slot

    def unit_embeddings(self, positions: np.ndarray) -> np.ndarray:
        return normalize_rows(self.embeddings[positions])

    def get_index(self) -> EmbeddingIndex:
        if self.index is None:
            with self.timer("index_build"):
                self.index = EmbeddingIndex().build(
                    embeddings=self.embeddings, ids=np.arange(len(self.embeddings))
                )
        return self.index

    def timer(self, name: str) -> "_Timer":
        return _Timer(self.timings_ms, name)


class _Timer:
    def __init__(self, sink: dict[str, float], name: str) -> None:
        self.sink, self.name = sink, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = (time.perf_counter() - self.start) * 1000.0
        self.sink[self.name] = round(self.sink.get(self.name, 0.0) + elapsed, 3)


StrategyFn = Callable[[SelectionContext, int], SelectionResult]
_STRATEGIES: dict[str, StrategyFn] = {}


def register_strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: make `fn(context, budget) -> SelectionResult` available as `name`."""

    def decorator(fn: StrategyFn) -> StrategyFn:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = fn
        return fn

    return decorator


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


# ---- the entry point ------------------------------------------------------------------------
def select_batch(
    *,
    strategy: str,
    budget: int,
    embeddings: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    candidates: np.ndarray,
    class_names: list[str],
    negative_index: int | None,
    gate_estimates: dict[str, bool | None] | None = None,
    defect_threshold: float | None = None,
    index: EmbeddingIndex | None = None,
    seed: int | Sequence[int] = 0,
    asked: np.ndarray | None = None,
) -> SelectionResult:
    """Pick up to `budget` of `candidates` to label next, best first.

    `index` must hold `embeddings` with ids = positions; it is built here when None (slow for
    large pools: the loop should keep one). `gate_estimates` maps "macro_f1", "defect_recall",
    "negative_fpr" to the loop's own pass (True) / fail (False) / unknown (None) estimate from
    validation or out-of-fold predictions, never from the test split. `asked`: positions (not candidates) picked
    before and still waiting for an answer; the diversity filter and k-center greedy count them as picked already.
    """
    started = time.perf_counter()
    if strategy not in _STRATEGIES:
        raise ValueError(
            f"unknown selection strategy {strategy!r}; available: {', '.join(available_strategies())}"
        )
    ctx = _validated_context(
        budget=budget,
        embeddings=embeddings,
        probabilities=probabilities,
        labels=labels,
        candidates=candidates,
        class_names=class_names,
        negative_index=negative_index,
        gate_estimates=gate_estimates,
        defect_threshold=defect_threshold,
        index=index,
        seed=seed,
        asked=asked,
    )
    budget = min(int(budget), len(ctx.candidates))
    if budget == 0:
        result = SelectionResult(
            indices=np.empty(0, dtype=np.int64),
            scores=np.empty(0, dtype=np.float64),
            reasons=[],
            summary={},
        )
    else:
        result = _STRATEGIES[strategy](ctx, budget)
    result.summary = {
        "strategy": strategy,
        "budget": int(budget),
        "n_candidates": int(len(ctx.candidates)),
        "n_labeled": int((ctx.labels >= 0).sum()),
        "n_asked_waiting": int(len(ctx.asked)),
        **result.summary,
        "timings_ms": {**ctx.timings_ms, "total": round((time.perf_counter() - started) * 1000, 3)},
    }
    return result


def _validated_context(
    *,
    budget: int,
    embeddings: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    candidates: np.ndarray,
    class_names: list[str],
    negative_index: int | None,
    gate_estimates: dict[str, bool | None] | None,
    defect_threshold: float | None,
    index: EmbeddingIndex | None,
    seed: int | Sequence[int],
    asked: np.ndarray | None = None,
) -> SelectionContext:
    if int(budget) < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {embeddings.shape}")
    n = embeddings.shape[0]
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 2 or probabilities.shape[0] != n:
        raise ValueError(f"probabilities must be ({n}, n_classes), got shape {probabilities.shape}")
    if probabilities.shape[1] != len(class_names):
        raise ValueError(
            f"probabilities have {probabilities.shape[1]} columns but {len(class_names)} class names"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or inf")
    labels = np.asarray(labels)
    if labels.shape != (n,) or (n and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be ({n},) integers (-1 = unlabeled), got {labels.shape} {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if n and (labels.min() < -1 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must be -1 or a class index in [0, {len(class_names)})")
    candidates = np.asarray(candidates)
    if candidates.ndim != 1 or (len(candidates) and not np.issubdtype(candidates.dtype, np.integer)):
        raise ValueError("candidates must be a 1-d array of integer positions")
    candidates = candidates.astype(np.int64, copy=False)
    if len(candidates):
        if candidates.min() < 0 or candidates.max() >= n:
            raise ValueError(f"candidate positions must be in [0, {n})")
        seen = np.zeros(n, dtype=bool)
        seen[candidates] = True
        if int(seen.sum()) != len(candidates):
            raise ValueError("candidates contain repeated positions")
    if negative_index is not None and not 0 <= int(negative_index) < len(class_names):
        raise ValueError(f"negative_index {negative_index} is not a class index")
    gates = dict(gate_estimates or {})
    unknown = set(gates) - set(GATE_KEYS)
    if unknown:
        raise ValueError(f"unknown gate keys {sorted(unknown)}; expected {list(GATE_KEYS)}")
    # a rank threshold may sit one float step above 1.0 (above every score): tolerated, anything else is an error
    if defect_threshold is not None and not (np.isfinite(defect_threshold) and -1e-9 <= float(defect_threshold) <= 1.0 + 1e-9):
        raise ValueError(f"defect_threshold must be a probability in [0, 1], got {defect_threshold}")
    if index is not None and index.dim not in (None, embeddings.shape[1]):
        raise ValueError(f"index dim {index.dim} != embedding dim {embeddings.shape[1]}")
    asked = np.unique(np.asarray(asked if asked is not None else [], dtype=np.int64))
    if len(asked) and (asked.min() < 0 or asked.max() >= n):
        raise ValueError(f"asked positions must be in [0, {n})")
    return SelectionContext(
        embeddings=embeddings,
        probabilities=np.clip(probabilities, 0.0, 1.0),
        labels=labels,
        candidates=candidates,
        class_names=list(class_names),
        negative_index=None if negative_index is None else int(negative_index),
        gate_estimates=gates,
        defect_threshold=None if defect_threshold is None else float(np.clip(defect_threshold, 0.0, 1.0)),
        index=index,
        rng=np.random.default_rng(seed),
        asked=asked,
    )


# ---- scores (vectorised, reusable) ---------------------------------------------------------
def margin_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """1 - (p_top1 - p_top2) per row of (n, n_classes), in [0, 1]; 1 = the top two classes tie."""
    return _margin_from_columns(np.ascontiguousarray(np.asarray(probabilities, np.float32).T))


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Predictive entropy of each row of (n, n_classes) divided by log(n_classes), in [0, 1]."""
    return _entropy_from_columns(np.ascontiguousarray(np.asarray(probabilities, np.float32).T))


def _margin_from_columns(columns: np.ndarray) -> np.ndarray:
    # running top-2 over the class rows: one contiguous pass per class, no per-row sort
    if columns.shape[0] < 2:
        return np.zeros(columns.shape[1], dtype=np.float32)
    first = np.maximum(columns[0], columns[1])
    second = np.minimum(columns[0], columns[1])
    for row in columns[2:]:
        np.maximum(second, np.minimum(first, row), out=second)
        np.maximum(first, row, out=first)
    return 1.0 - (first - second)


def _entropy_from_columns(columns: np.ndarray) -> np.ndarray:
    n_classes = columns.shape[0]
    if n_classes < 2:
        return np.zeros(columns.shape[1], dtype=np.float32)
    total = np.zeros(columns.shape[1], dtype=np.float32)
    for row in columns:
        p = np.clip(row, 1e-12, 1.0)
        total -= p * np.log(p)
    return total / np.float32(np.log(n_classes))


def class_scarcity_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class weight in (0, 1]: 1 for the class with fewest labels, (min+1)/(count+1) otherwise."""
    labeled = labels[labels >= 0]
    counts = np.bincount(labeled, minlength=n_classes).astype(np.float64)
    return (counts.min() + 1.0) / (counts + 1.0)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (ties: lower index first)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < len(scores):
        # argpartition picks among scores tied at the k-th place by its own internals: the tied ones are taken in
        # index order instead (review: 185 of 200 draws with tied scores differed from the order documented)
        kth = np.partition(-scores, k - 1)[k - 1]
        above = np.flatnonzero(-scores < kth)
        part = np.concatenate([above, np.flatnonzero(-scores == kth)[:k - len(above)]])
    else:
        part = np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    return part[order]


def _robust_scale(values: np.ndarray, rng: np.random.Generator, sample: int = 8192) -> np.ndarray:
    """Linear rescale so the pool's median maps to 0 and its 99.9th percentile to 1.

    Puts components with very different scales (a margin that is ~0 almost everywhere, a k-NN
    proximity that is 0 for most of the pool) on one footing at the top end, which is the only
    part a batch is drawn from. Order within a component is kept; quantiles come from a sample,
    so a 1M pool costs one pass (a full rank transform would cost a sort per component).
    """
    if len(values) == 0:
        return values.astype(np.float32)
    reference = values if len(values) <= sample else values[rng.integers(0, len(values), sample)]
    middle, high = np.quantile(reference, [0.5, 0.999])
    if high <= middle:
        high = float(values.max())
    if high <= middle:
        return np.zeros(len(values), dtype=np.float32)
    return ((values - middle) / (high - middle)).astype(np.float32)


def _rare_class_scores(ctx: SelectionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Per candidate in [0, 1]: scarcity-weighted predicted mass on scarce classes, averaged with
    scarcity-weighted cosine proximity to labeled / confidently predicted scarce-class examples."""
    weights = class_scarcity_weights(ctx.labels, ctx.n_classes)
    columns = ctx.class_columns()
    with ctx.timer("rare_prob"):
        prob_score = weights.astype(np.float32) @ columns
    target_classes = [c for c in range(ctx.n_classes) if weights[c] >= RARE_MIN_WEIGHT]
    query_positions: list[np.ndarray] = []
    query_weights: list[np.ndarray] = []
    with ctx.timer("rare_queries"):
        predicted = ctx.predicted_class()
        for c in target_classes:
            labeled_c = np.flatnonzero(ctx.labels == c)
            if len(labeled_c) > RARE_LABELED_QUERIES_PER_CLASS:
                labeled_c = ctx.rng.choice(labeled_c, RARE_LABELED_QUERIES_PER_CLASS, replace=False)
            confidence_c = np.where(predicted == c, columns[c], -1.0)
            best = _top_k(confidence_c, RARE_PREDICTED_QUERIES_PER_CLASS)
            predicted_c = ctx.candidates[best[confidence_c[best] >= 0]]
            positions = np.concatenate([labeled_c, predicted_c]).astype(np.int64)
            query_positions.append(positions)
            query_weights.append(np.full(len(positions), weights[c], dtype=np.float32))
    knn_score = np.zeros(len(ctx.candidates), dtype=np.float32)
    n_queries = int(sum(len(q) for q in query_positions))
    if n_queries:
        index = ctx.get_index()
        positions = np.concatenate(query_positions)
        qweights = np.concatenate(query_weights)
        with ctx.timer("rare_knn_search"):
            k = min(RARE_NEIGHBORS, len(index))
            sims, ids = index.search(queries=ctx.embeddings[positions], k=k)
        with ctx.timer("rare_knn_scatter"):
            valid = (ids >= 0) & (ids < len(ctx.labels))
            slots = np.full(ids.shape, -1, dtype=np.int64)
            slots[valid] = ctx.candidate_slot()[ids[valid]]
            hit = slots >= 0
            values = (np.clip(sims, 0.0, 1.0) * qweights[:, None])[hit]
            np.maximum.at(knn_score, slots[hit], values)
    info = {
        "class_weights": {ctx.class_names[c]: round(float(weights[c]), 4) for c in range(ctx.n_classes)},
        "rare_target_classes": [ctx.class_names[c] for c in target_classes],
        "rare_knn_queries": n_queries,
    }
    return 0.5 * prob_score + 0.5 * knn_score, info


def _threshold_boundary_scores(ctx: SelectionContext, p_good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(likely_defect, confused_good) per candidate, from P(defect) against the loop's decision threshold.

    The final prediction is "defect if P(defect) >= threshold", so the images whose label would move the
    defect-vs-good decision are those whose P(defect) sits near the threshold in logit space (the head's
    probabilities are steep; distances in probability vanish near 0 and 1). likely_defect favours the side the
    model calls good (a defect there is a missed defect: recall); confused_good the side it calls defect (a
    good part there is a false positive: FPR). Without a threshold, 0.5.
    """
    threshold = 0.5 if ctx.defect_threshold is None else ctx.defect_threshold
    p_defect = np.clip(1.0 - p_good.astype(np.float64), 1e-7, 1 - 1e-7)
    t = min(max(threshold, 1e-7), 1 - 1e-7)
    distance = np.log(p_defect / (1 - p_defect)) - np.log(t / (1 - t))
    closeness = 1.0 / (1.0 + np.abs(distance) / BOUNDARY_LOGIT_SCALE)
    below = distance < 0
    likely_defect = np.where(below, closeness, OTHER_SIDE_SHARE * closeness)
    confused_good = np.where(below, OTHER_SIDE_SHARE * closeness, closeness)
    return likely_defect.astype(np.float32), confused_good.astype(np.float32)


def _pick_from_ranking(ctx: SelectionContext, scores: np.ndarray, budget: int, *, slots_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The diversity filter over the best-scored candidates (scores: one per entry of slots_of, else per candidate
    slot): (picked slots, gains, shortlist size). Widened while it empties before the budget is spent: 300
    near-identical images ranked first left a batch of 1 of 20 with 1000 distinct candidates never looked at."""
    # capped as the widening is (review: a budget of 2000 shortlisted 20000 images, several 20000^2 arrays)
    size = min(max(SHORTLIST_PER_PICK * budget, MIN_SHORTLIST), max(MAX_SHORTLIST, budget))
    while True:
        local = _top_k(scores, size)
        shortlist = local if slots_of is None else slots_of[local]
        widest = size >= min(len(scores), max(MAX_SHORTLIST, budget))
        # near-copies of labeled images are taken only when no wider shortlist could offer anything else (review: a
        # first shortlist of 200 twins of labeled images filled the batch, 2000 distinct candidates below it)
        slots, gains = _diversity_filter(ctx, shortlist, scores[local], budget, labeled_copies_if_nothing_else=widest)
        if len(slots) >= budget or widest:
            return slots, gains, int(len(shortlist))
        size = min(size * 4, len(scores), max(MAX_SHORTLIST, budget))


def _diversity_filter(
    ctx: SelectionContext,
    shortlist: np.ndarray,
    scores: np.ndarray,
    budget: int,
    *,
    drop_labeled_duplicates: bool = True,
    labeled_copies_if_nothing_else: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy pick from a ranked shortlist (candidate slots): gain = score - redundancy with what
    is already picked; near-duplicates of a pick (or of a labeled image) are never taken.

    Returns (picked slots, gain at pick time); gains never increase along the batch.
    """
    if len(shortlist) == 0:
        return shortlist, np.empty(0)
    positions = ctx.candidates[shortlist]
    vectors = ctx.unit_embeddings(positions)
    span = float(scores.max() - scores.min())
    norm_scores = (scores - scores.min()) / span if span > 0 else np.ones(len(scores))
    gains_base = norm_scores.astype(np.float64)
    blocked = np.zeros(len(shortlist), dtype=bool)
    known_mask = ctx.known_mask()  # labeled, or waiting in the annotators' queue: a twin of either says nothing new
    known = np.flatnonzero(known_mask)
    if drop_labeled_duplicates and len(known):
        with ctx.timer("diversity_labeled_check"):
            if len(known) <= EXACT_LABELED_CHECK_MAX:
                nearest_known = (vectors @ ctx.unit_embeddings(known).T).max(axis=1)
                blocked |= nearest_known >= DUPLICATE_SIMILARITY
            else:
                index = ctx.get_index()
                sims, ids = index.search(queries=vectors, k=min(4, len(index)))
                valid = (ids >= 0) & (ids < len(ctx.labels))
                is_known = np.zeros(ids.shape, dtype=bool)
                is_known[valid] = known_mask[ids[valid]]
                blocked |= ((sims >= DUPLICATE_SIMILARITY) & is_known).any(axis=1)
        if blocked.all() and labeled_copies_if_nothing_else:  # every option is a duplicate of something known: fall back to score
            blocked[:] = False
    # Similarity above the shortlist's typical level counts as redundancy; embeddings of real
    # images are rarely near 0 cosine apart, so a fixed zero point would penalise everything.
    with ctx.timer("diversity_filter"):
        gram = vectors @ vectors.T
        off_diag = gram[~np.eye(len(gram), dtype=bool)]
        typical = float(np.median(off_diag)) if off_diag.size else 0.0
        scale = max(1.0 - typical, 1e-6)
        closeness_to_picked = np.zeros(len(shortlist))
        asked = ctx.asked_sample(DIVERSE_LABELED_SAMPLE)
        if len(asked):  # the asks still waiting count as picked: a top-up batch does not crowd where they are
            nearest_asked = (vectors @ ctx.unit_embeddings(asked).T).max(axis=1)
            closeness_to_picked = np.clip((nearest_asked - typical) / scale, 0.0, 1.0).astype(np.float64)
        picked: list[int] = []
        gains: list[float] = []
        available = ~blocked
        for _ in range(min(budget, int(available.sum()))):
            gain = gains_base - REDUNDANCY_WEIGHT * closeness_to_picked
            gain[~available] = -np.inf
            best = int(np.argmax(gain))
            if not np.isfinite(gain[best]):
                break
            picked.append(best)
            gains.append(float(gain[best]))
            available[best] = False
            sims_to_best = gram[best]
            available &= sims_to_best < DUPLICATE_SIMILARITY
            closeness = np.clip((sims_to_best - typical) / scale, 0.0, 1.0)
            np.maximum(closeness_to_picked, closeness, out=closeness_to_picked)
    return shortlist[np.asarray(picked, dtype=np.int64)], np.asarray(gains)


def _k_center_greedy(ctx: SelectionContext, pool_slots: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first traversal over candidate slots, starting from everything labeled or asked and waiting.

    Returns (picked slots, cosine distance to the nearest labeled-, asked- or picked point at pick time).
    """
    vectors = ctx.unit_embeddings(ctx.candidates[pool_slots])
    labeled = ctx.labeled_positions
    if len(labeled) > DIVERSE_LABELED_SAMPLE:
        labeled = ctx.rng.choice(labeled, DIVERSE_LABELED_SAMPLE, replace=False)
    labeled = np.union1d(labeled, ctx.asked_sample(DIVERSE_LABELED_SAMPLE))
    if len(labeled):
        labeled_vectors = ctx.unit_embeddings(np.sort(labeled))
        min_distance = np.maximum(1.0 - (vectors @ labeled_vectors.T).max(axis=1), 0.0)
    else:
        # nothing labeled: start from the most typical candidate, then go farthest-first
        centre = vectors.mean(axis=0)
        first = int(np.argmax(vectors @ centre))
        min_distance = np.full(len(vectors), np.finfo(np.float64).max)
        min_distance[first] = np.inf  # above every other (review: the reverse started from candidate 0)
    picked: list[int] = []
    distances: list[float] = []
    for _ in range(min(budget, len(vectors))):
        best = int(np.argmax(min_distance))
        if min_distance[best] < 0:
            break
        picked.append(best)
        distances.append(float(min(min_distance[best], 2.0)))
        np.minimum(min_distance, np.maximum(1.0 - vectors @ vectors[best], 0.0), out=min_distance)
        min_distance[best] = -1.0
    return pool_slots[np.asarray(picked, dtype=np.int64)], np.asarray(distances)


def _is_cold_start(ctx: SelectionContext) -> bool:
    """Good parts labeled, no defect labeled yet (e.g. MVTec: train/ holds only good parts)."""
    if ctx.negative_index is None:
        return False
    counts = ctx.class_counts()
    return counts[ctx.negative_index] > 0 and counts.sum() == counts[ctx.negative_index]


def _result(ctx: SelectionContext, slots: np.ndarray, scores: np.ndarray, reasons: list[str], **summary: Any) -> SelectionResult:
    return SelectionResult(
        indices=ctx.candidates[slots].astype(np.int64),
        scores=np.asarray(scores, dtype=np.float64),
        reasons=list(reasons),
        summary=summary,
    )


# ---- strategies -----------------------------------------------------------------------------
@register_strategy("random")
def random_strategy(ctx: SelectionContext, budget: int) -> SelectionResult:
    slots = ctx.rng.choice(len(ctx.candidates), size=budget, replace=False)
    scores = np.linspace(1.0, 0.0, num=budget, endpoint=False)
    return _result(ctx, slots, scores, ["random"] * budget)


@register_strategy("margin")
def margin_strategy(ctx: SelectionContext, budget: int) -> SelectionResult:
    with ctx.timer("scoring"):
        scores = _margin_from_columns(ctx.class_columns())
        slots = _top_k(scores, budget)
    return _result(ctx, slots, scores[slots], ["uncertain"] * len(slots))


@register_strategy("entropy")
def entropy_strategy(ctx: SelectionContext, budget: int) -> SelectionResult:
    with ctx.timer("scoring"):
        scores = _entropy_from_columns(ctx.class_columns())
        slots = _top_k(scores, budget)
    return _result(ctx, slots, scores[slots], ["uncertain"] * len(slots))


@register_strategy("rare")
def rare_strategy(ctx: SelectionContext, budget: int) -> SelectionResult:
    scores, info = _rare_class_scores(ctx)
    slots = _top_k(scores, budget)
    return _result(ctx, slots, scores[slots], ["rare_class"] * len(slots), **info)


@register_strategy("diverse")
def diverse_strategy(ctx: SelectionContext, budget: int) -> SelectionResult:
    pool = np.arange(len(ctx.candidates))
    if len(pool) > DIVERSE_POOL_SAMPLE:
        pool = np.sort(ctx.rng.choice(pool, DIVERSE_POOL_SAMPLE, replace=False))
    with ctx.timer("k_center"):
        slots, distances = _k_center_greedy(ctx, pool, budget)
    return _result(ctx, slots, distances, ["diverse"] * len(slots), pool_size=int(len(pool)))


def _cold_start(ctx: SelectionContext, budget: int) -> SelectionResult:
    """Rank by mean cosine distance to the nearest known-good embeddings (far = maybe a defect)."""
    good = np.flatnonzero(ctx.labels == ctx.negative_index)
    k = min(COLD_START_NEIGHBORS, len(good))
    dim = ctx.embeddings.shape[1]
    pool = np.arange(len(ctx.candidates))
    max_pool = max(10_000, int(COLD_START_MAX_FLOPS / max(1, len(good) * dim)))
    if len(pool) > max_pool:
        pool = np.sort(ctx.rng.choice(pool, max_pool, replace=False))
    with ctx.timer("cold_start_distances"):
        good_vectors = ctx.unit_embeddings(good)
        distance = np.empty(len(pool), dtype=np.float32)
        chunk = 65_536
        for start in range(0, len(pool), chunk):
            part = pool[start : start + chunk]
            sims = ctx.unit_embeddings(ctx.candidates[part]) @ good_vectors.T
            top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
            distance[start : start + len(part)] = 1.0 - top.mean(axis=1)
    slots, gains, shortlist_size = _pick_from_ranking(ctx, distance, budget, slots_of=pool)
    return _result(
        ctx,
        slots,
        gains,
        ["cold_start"] * len(slots),
        cold_start=True,
        n_known_good=int(len(good)),
        scanned=int(len(pool)),
        gate_focus=[],
        weights={},
        shortlist_size=shortlist_size,
    )


@register_strategy("default")
def default_strategy(ctx: SelectionContext, budget: int) -> SelectionResult:
    if _is_cold_start(ctx):
        return _cold_start(ctx, budget)
    if not (ctx.labels >= 0).any():
        # nothing labeled at all: the model knows nothing, spread the batch over the pool
        result = diverse_strategy(ctx, budget)
        result.reasons = ["cold_start"] * len(result.indices)
        result.summary.update(cold_start=True, gate_focus=[], weights={})
        return result

    weights = dict(BASE_WEIGHTS)
    gate_focus: list[str] = []
    for gate, component in GATE_COMPONENT.items():
        if ctx.gate_estimates.get(gate) is False:
            if component in ("likely_defect", "confused_good") and ctx.negative_index is None:
                continue  # no good class: these gates do not apply
            weights[component] += FAILING_GATE_BOOST
            gate_focus.append(gate)

    columns = ctx.class_columns()
    components: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    with ctx.timer("scoring"):
        components["uncertain"] = _margin_from_columns(columns)
        if ctx.negative_index is not None:
            likely_defect, confused_good = _threshold_boundary_scores(ctx, columns[ctx.negative_index])
            if weights["likely_defect"] > 0:
                components["likely_defect"] = likely_defect
            if weights["confused_good"] > 0:
                components["confused_good"] = confused_good
    if weights["rare_class"] > 0:
        components["rare_class"], info = _rare_class_scores(ctx)
    used = {name: w for name, w in weights.items() if w > 0 and name in components}
    total_weight = sum(used.values())
    with ctx.timer("combine"):
        combined = np.zeros(len(ctx.candidates), dtype=np.float32)
        for name, w in used.items():
            components[name] = _robust_scale(components[name], ctx.rng)
            combined += (w / total_weight) * components[name]
    slots, gains, shortlist_size = _pick_from_ranking(ctx, combined, budget)
    names = list(used)
    contributions = np.stack([used[name] * components[name][slots] for name in names], axis=1)
    reasons = [names[i] for i in contributions.argmax(axis=1)] if len(slots) else []
    return _result(
        ctx,
        slots,
        gains,
        reasons,
        cold_start=False,
        gate_estimates={k: ctx.gate_estimates.get(k) for k in GATE_KEYS},
        gate_focus=gate_focus,
        weights={k: round(v / total_weight, 4) for k, v in used.items()},
        shortlist_size=shortlist_size,
        **info,
    )
