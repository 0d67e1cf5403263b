import dataclasses

import numpy as np
import pytest
from scipy.stats import beta, norm

from modeling.evaluation import (
    MAX_GAP_MOVE,
    THRESHOLD_FLOOR,
    choose_defect_threshold,
    evaluate_gates,
    evaluate_predictions,
    final_predictions,
    fpr_upper_bound,
    normal_tail_fpr,
    rank_threshold,
    stratified_fpr_estimates,
    stratified_threshold,
)


def test_rank_rule_keeps_the_fpr_bound_under_the_gate_and_is_the_lowest_such_threshold() -> None:
    rng = np.random.default_rng(0)
    negatives = rng.beta(2, 8, 800)
    threshold, allowed, attainable = rank_threshold(negative_scores=negatives, max_fpr=0.03, confidence=0.9)
    assert attainable and allowed > 0
    assert int((negatives >= threshold).sum()) == allowed
    assert fpr_upper_bound(allowed, 800, 0.9) <= 0.03 < fpr_upper_bound(allowed + 1, 800, 0.9)
    assert allowed / 800 < 0.03  # a margin below the gate, not at it


def test_blend_of_rank_and_tail_with_many_negatives_stays_below_the_gate_with_high_recall() -> None:
    rng = np.random.default_rng(0)
    p_defect = np.concatenate([rng.beta(2, 8, 800), rng.beta(8, 2, 400)])
    is_defect = np.concatenate([np.zeros(800, bool), np.ones(400, bool)])
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    assert min(choice.rank_threshold, choice.tail_threshold) <= choice.threshold <= max(choice.rank_threshold, choice.tail_threshold)
    assert choice.observed_fpr < 0.03
    assert choice.observed_defect_recall > 0.9
    # Fresh draws from the same distributions (a "test split"): the FPR still holds.
    fresh = rng.beta(2, 8, 20000)
    assert (fresh >= choice.threshold).mean() < 0.03


def test_one_odd_good_part_does_not_drag_the_threshold_to_one() -> None:
    rng = np.random.default_rng(1)
    negatives = np.append(rng.beta(2, 12, 60), 0.999)  # 61 good parts, one scored like a defect
    defects = rng.beta(30, 1, 30)
    choice = choose_defect_threshold(p_defect=np.concatenate([negatives, defects]), is_defect=np.r_[np.zeros(61, bool), np.ones(30, bool)], max_fpr=0.03)
    rank_recall = (defects >= choice.rank_threshold).mean()
    assert choice.rank_threshold > 0.999 and rank_recall < 0.2  # the rank rule alone: above the odd one, recall gone
    assert choice.threshold < choice.rank_threshold and choice.observed_defect_recall > 0.5


def test_few_negatives_say_the_margin_is_not_attainable_and_allow_no_rank_false_positive() -> None:
    p_defect = np.array([0.1, 0.2, 0.3, 0.35, 0.9, 0.8, 0.32])
    is_defect = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    assert not choice.margin_attainable
    assert choice.allowed_false_positives == 0 and choice.tail_threshold is None  # too few for a tail fit
    assert 0.35 < choice.rule_threshold < 0.36  # just above the highest good part
    # then to the middle of the gap up to the next labeled score (0.8): the same decisions on these images
    middle = 1 / (1 + np.exp(-(np.log(0.35 / 0.65) + np.log(0.8 / 0.2)) / 2))
    assert choice.threshold == pytest.approx(middle) and choice.observed_defect_recall == pytest.approx(2 / 3) and choice.observed_fpr == 0


def test_a_threshold_between_separated_scores_sits_in_the_middle_of_the_gap_not_at_its_edge() -> None:
    """A head on separable embeddings: good parts at P(defect) 1e-9..1e-7, defects at 0.99+. The rules stop just above
    the highest good part, where another camera's good part is called a defect; the middle of the gap (in logits)
    makes the same decisions on these images and leaves room on both sides."""
    rng = np.random.default_rng(0)
    good = 10 ** rng.uniform(-9, -7, 300)
    defects = 1 - 10 ** rng.uniform(-6, -2, 100)
    p_defect, is_defect = np.concatenate([good, defects]), np.r_[np.zeros(300, bool), np.ones(100, bool)]
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    assert choice.rule_threshold < 1e-6  # the edge

    def logit(p: float) -> float:
        return float(np.log(p / (1 - p)))

    # up into the gap, at most MAX_GAP_MOVE logits (the gap's middle is further up here)
    assert (logit(good.max()) + logit(defects.min())) / 2 > logit(choice.rule_threshold) + MAX_GAP_MOVE
    assert logit(choice.threshold) == pytest.approx(logit(choice.rule_threshold) + MAX_GAP_MOVE)
    assert choice.observed_fpr == 0 and choice.observed_defect_recall == 1
    # a narrower gap: its middle
    narrow = choose_defect_threshold(p_defect=np.r_[good, np.full(100, 0.01)], is_defect=is_defect, max_fpr=0.03)
    assert logit(narrow.threshold) == pytest.approx((logit(good.max()) + logit(0.01)) / 2)


def test_the_threshold_never_moves_down_the_gap_nor_next_to_1_for_saturated_defect_scores() -> None:
    rng = np.random.default_rng(2)
    good, defects = 10 ** rng.uniform(-6, -3, 200), np.ones(40)  # float32 P(good) under 2^-24: P(defect) 1.0
    p_defect, is_defect = np.r_[good, defects], np.r_[np.zeros(200, bool), np.ones(40, bool)]
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    # 0.99999966 without the cap (1.0 read as logit 36.7): a defect scored 0.999 was called good
    assert choice.rule_threshold < choice.threshold < 0.9
    for seed in range(50):  # the blend's logit average may stop high in a gap: the move never lowers it
        rng = np.random.default_rng(seed)
        p_defect = np.r_[rng.beta(1, 30, 120), rng.beta(5, 2, 20)]
        choice = choose_defect_threshold(p_defect=p_defect, is_defect=np.r_[np.zeros(120, bool), np.ones(20, bool)], max_fpr=0.03)
        assert choice.threshold >= choice.rule_threshold


def test_overlapping_scores_keep_the_rules_decisions_and_a_threshold_never_goes_below_what_float32_resolves() -> None:
    rng = np.random.default_rng(1)
    good, defects = rng.beta(2, 8, 400), rng.beta(8, 2, 100)
    p_defect, is_defect = np.concatenate([good, defects]), np.r_[np.zeros(400, bool), np.ones(100, bool)]
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    assert ((p_defect >= choice.threshold) == (p_defect >= choice.rule_threshold)).all()
    tiny = choose_defect_threshold(p_defect=np.r_[np.full(50, 1e-12), np.full(10, 2e-9)], is_defect=np.r_[np.zeros(50, bool), np.ones(10, bool)], max_fpr=0.03)
    assert tiny.threshold == THRESHOLD_FLOOR  # 1 - P(good) in float32 cannot tell 2e-9 from 0


def test_final_prediction_is_threshold_first_then_most_probable_defect() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    predictions = final_predictions(probabilities=probabilities, negative_index=0, threshold=0.4)
    # Row 1: P(defect) = 0.5 >= 0.4 -> the most probable defect class (2), though "good" is the argmax.
    assert predictions.tolist() == [0, 2, 2]
    assert final_predictions(probabilities=probabilities, negative_index=None, threshold=None).tolist() == [0, 0, 2]


def test_metrics_and_gates_on_final_predictions() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    probabilities = np.eye(3)[y_pred] * 0.8 + 0.2 / 3
    metrics = evaluate_predictions(y_true=y_true, y_pred=y_pred, probabilities=probabilities, class_names=["good", "a", "b"], negative_index=0)
    assert metrics["negative_fpr"] == pytest.approx(0.25)
    assert metrics["defect_recall"] == pytest.approx(1.0)  # a -> b is still a caught defect
    assert metrics["confusion_matrix"]["matrix"][1] == [0, 1, 1]
    gates = {g.name: g for g in evaluate_gates(metrics=metrics, latency_ms=12.0, macro_f1_min=0.7, defect_recall_min=0.85, negative_fpr_max=0.03, latency_ms_max=30)}
    assert gates["negative_fpr"].passed is False and gates["defect_recall"].passed is True and gates["latency_ms"].passed is True


def test_collapsed_model_fails_macro_f1_loudly_and_no_negative_class_is_not_applicable() -> None:
    y_true = np.array([0, 1, 2, 1])
    y_pred = np.zeros(4, int)
    metrics = evaluate_predictions(y_true=y_true, y_pred=y_pred, probabilities=np.eye(3)[y_pred], class_names=["a", "b", "c"], negative_index=None)
    assert metrics["collapsed"]
    gates = {g.name: g for g in evaluate_gates(metrics=metrics, latency_ms=5, macro_f1_min=0.7, defect_recall_min=0.85, negative_fpr_max=0.03, latency_ms_max=30)}
    assert gates["macro_f1"].value == 0.0 and gates["macro_f1"].passed is False
    assert not gates["defect_recall"].applicable and gates["defect_recall"].passed is None
    assert not gates["negative_fpr"].applicable


def _actively_labeled_pool(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A pool of 2000 good parts (P(defect) ~ Beta(2, 8)) and 400 defects (~ Beta(8, 2)): 40 good parts labeled
    at random, then 60 good parts and 60 defects picked by uncertainty, i.e. the good parts scored most like defects."""
    good = rng.beta(2, 8, 2000)
    defects = rng.beta(8, 2, 400)
    order = np.argsort(-good[40:]) + 40
    picked = good[order[:60]]  # active learning asks about the good parts nearest the boundary
    p_defect = np.concatenate([good[:40], picked, defects[:60]])
    is_defect = np.r_[np.zeros(100, bool), np.ones(60, bool)]
    actively_picked = np.r_[np.zeros(40, bool), np.ones(120, bool)]
    return p_defect, is_defect, actively_picked, good, defects


def test_good_parts_picked_by_active_learning_do_not_push_the_threshold_to_the_top() -> None:
    rng = np.random.default_rng(0)
    p_defect, is_defect, actively_picked, good, defects = _actively_labeled_pool(rng)
    cautious = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    stratified = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03, actively_picked=actively_picked,
                                         n_unlabeled_negatives=1900.0)
    assert cautious.rule == "all_negatives" and stratified.rule == "stratified"
    assert (stratified.n_sampled_negatives, stratified.n_picked_negatives) == (40, 60)
    # The pool's good parts (all 2000) and fresh ones from the line: the FPR stays under the gate, and far more
    # defects are caught than with the threshold fitted to the labeled good parts, most of them picked.
    pool_fpr = (good >= stratified.threshold).mean()
    assert pool_fpr < 0.03 and (rng.beta(2, 8, 20000) >= stratified.threshold).mean() < 0.03
    assert (defects >= stratified.threshold).mean() > (defects >= cautious.threshold).mean() + 0.2
    assert stratified.observed_fpr > 0.1
    # Its estimate of the pool's FPR is close to the truth, and not below it.
    assert pool_fpr - 0.002 <= stratified.estimated_population_fpr <= pool_fpr + 0.015
    # and it is the estimate at the threshold deployed, not where the rule stopped before the gap move
    negatives, picked = p_defect[~is_defect], actively_picked[~is_defect]
    at_final = stratified_fpr_estimates(sampled_negatives=negatives[~picked], picked_negatives=negatives[picked], n_unlabeled_negatives=1900.0,
                                        thresholds=np.array([stratified.threshold]))[0][0]
    assert stratified.estimated_population_fpr == pytest.approx(at_final)


def test_one_odd_sampled_good_part_does_not_drag_the_threshold_up_but_the_estimate_counts_it() -> None:
    rng = np.random.default_rng(3)
    sampled = np.append(rng.beta(2, 40, 28), 0.998)  # 29 imported good parts, one scored like a defect
    picked = rng.beta(3, 6, 150)
    threshold, estimated = stratified_threshold(sampled_negatives=sampled, picked_negatives=picked, n_unlabeled_negatives=500.0, max_fpr=0.03)
    assert threshold < 0.9  # a rule reading 1/29 = 3.4% off the sample as a hard limit would have to sit above 0.998
    false_positives = int((sampled >= threshold).sum() + (picked >= threshold).sum())
    assert false_positives <= 0.03 * 679
    # but one random good part in 29 above the threshold is what the sample says of the unlabeled ones: the round's
    # estimate says so, and warns that it breaks the gate, rather than report the normal fit's ~0
    assert estimated >= (false_positives + 500.0 / 29) / 679 > 0.03


def test_a_defect_like_minority_of_good_parts_under_a_saturated_bulk_is_not_estimated_away() -> None:
    # Review: the sampled good parts' scores as a head on separable embeddings gives them, 90% under 1e-7, with a
    # tenth scored up to 0.3. The normal fit's spread is the bulk's, and it put ~0 of the unlabeled good parts above
    # any threshold: threshold at the floor, 1.3% estimated, 10% of such parts through.
    rng = np.random.default_rng(0)
    def good_parts(n: int) -> np.ndarray:
        tail = rng.random(n) < 0.1
        return np.where(tail, 10 ** rng.uniform(-3, -0.5, n), 10 ** rng.uniform(-10, -7.5, n))
    sampled = np.concatenate([10 ** rng.uniform(-10, -7.5, 36), 10 ** rng.uniform(-3, -0.5, 4)])
    picked = 10 ** rng.uniform(-2, -0.3, 10)
    threshold, estimated = stratified_threshold(sampled_negatives=sampled, picked_negatives=picked, n_unlabeled_negatives=1000.0, max_fpr=0.03)
    share = (sampled >= threshold).mean()
    assert share <= 1 / 40  # two sampled parts above the threshold are a tail, not one odd part
    assert estimated >= (1000.0 * share + (picked >= threshold).sum()) / 1050
    line = good_parts(20000)  # fresh good parts from the same line
    assert (line >= threshold).mean() < 0.06  # 10% through before


def test_a_few_dozen_good_parts_let_through_at_most_one_of_them() -> None:
    # Review: below the ~90 good parts at which the rank rule allows a false positive, the blend averaged the highest
    # good part with a tail fit collapsed by a saturated bulk (~1e-7), and let 6-10% of these very parts through.
    rng = np.random.default_rng(0)
    for n_good in (30, 50, 70):
        good = np.where(np.arange(n_good) < round(0.07 * n_good), 10 ** rng.uniform(-3, -0.5, n_good), 10 ** rng.uniform(-10, -7.5, n_good))
        p_defect = np.concatenate([good, np.full(20, 0.995)])
        is_defect = np.r_[np.zeros(n_good, bool), np.ones(20, bool)]
        choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
        assert choice.allowed_false_positives == 0
        assert int((good >= choice.threshold).sum()) <= max(1, int(0.03 * n_good)), n_good
        assert choice.observed_defect_recall == 1.0


def test_a_tie_across_the_cut_lets_through_fewer_good_parts_never_more() -> None:
    # 300 good parts: the rank rule allows 6 through at 75%; the 6th and 7th highest tie (float32 scores do)
    negatives = np.concatenate([np.linspace(0.0, 0.2, 290), [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.45, 0.41, 0.3, 0.3]])
    threshold, allowed, _ = rank_threshold(negative_scores=negatives, max_fpr=0.03, confidence=0.75)
    assert allowed == 6
    assert int((negatives >= threshold).sum()) == 5  # before: 7, the midpoint of a tie being the tied score
    # the observed-FPR floor (9 of 300 at 3%) the same way
    tied = np.concatenate([np.linspace(0.0, 0.2, 290), np.linspace(0.9, 0.5, 8), [0.45, 0.45]])
    choice = choose_defect_threshold(p_defect=np.concatenate([tied, np.full(30, 0.99)]), is_defect=np.r_[np.zeros(300, bool), np.ones(30, bool)],
                                     max_fpr=0.03, confidence=0.75)
    assert choice.observed_fpr <= 0.03


def test_picked_good_parts_above_the_threshold_are_counted_against_the_fpr_budget() -> None:
    rng = np.random.default_rng(1)
    sampled = rng.beta(2, 30, 40)  # the random sample alone says the good parts sit near 0
    picked = np.linspace(0.5, 0.99, 80)  # but 80 known good parts score like defects: 80 / 1120 > 3% of the pool
    threshold, estimated = stratified_threshold(sampled_negatives=sampled, picked_negatives=picked, n_unlabeled_negatives=1000.0, max_fpr=0.03)
    from_sample_alone, _ = stratified_threshold(sampled_negatives=sampled, picked_negatives=np.array([]), n_unlabeled_negatives=1080.0, max_fpr=0.03)
    assert threshold > from_sample_alone
    assert int((picked >= threshold).sum()) <= 0.03 * 1120 and estimated <= 0.03


def test_too_few_sampled_good_parts_fall_back_to_every_labeled_good_part() -> None:
    rng = np.random.default_rng(2)
    p_defect, is_defect, actively_picked, _, _ = _actively_labeled_pool(rng)
    actively_picked[:25] = True  # only 15 good parts left that were not picked
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03, actively_picked=actively_picked, n_unlabeled_negatives=1900.0)
    plain = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03)
    assert choice.rule == "all_negatives" and choice.threshold == plain.threshold and choice.estimated_population_fpr is None


def _good_parts_with_a_shoulder(n: int) -> np.ndarray:
    """P(defect) of good parts whose logits are a tight normal bulk around -2.5 plus a shoulder of defect-like parts (27%
    spread evenly over -1.6..-0.4): the right skew a magnetic-tile simulation showed. Evenly spaced quantiles, so a
    small set is a faithful sample of a large one."""
    quantiles = (np.arange(n) + 0.5) / n  # the bulk's top (-1.48) overlaps the shoulder's start a little
    bulk = -2.5 + 0.3 * norm.ppf(quantiles / 0.73)
    shoulder = -1.6 + 1.2 * (quantiles - 0.73) / 0.27
    logits = np.where(quantiles < 0.73, bulk, shoulder)
    return 1.0 / (1.0 + np.exp(-logits))


def test_the_unlabeled_good_parts_tail_is_not_thinner_than_the_sample_shows() -> None:
    sampled = _good_parts_with_a_shoulder(30)
    # The MAD alone is set by the bulk and would put almost none of the good parts above the sample's 80th percentile.
    assert normal_tail_fpr(negative_scores=sampled, thresholds=np.array([np.quantile(sampled, 0.8)]))[0] >= 0.19
    population = _good_parts_with_a_shoulder(2000)
    threshold, estimated = stratified_threshold(sampled_negatives=sampled, picked_negatives=population[-20:], n_unlabeled_negatives=1950.0, max_fpr=0.03)
    assert (population >= threshold).mean() < 0.03 and estimated < 0.03
    assert threshold < 0.7  # above the good parts, not above everything


def test_the_stratified_rule_refuses_too_few_sampled_good_parts_and_scores_that_are_not_numbers() -> None:
    with pytest.raises(ValueError, match="sampled good parts"):
        stratified_threshold(sampled_negatives=np.full(19, 0.1), picked_negatives=np.array([0.5]), n_unlabeled_negatives=100.0, max_fpr=0.03)
    with pytest.raises(ValueError, match="finite"):
        stratified_threshold(sampled_negatives=np.r_[np.full(25, 0.1), np.nan], picked_negatives=np.array([0.5]), n_unlabeled_negatives=100.0, max_fpr=0.03)


def _sigmoid(z):  # noqa: ANN001, ANN202
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def test_threshold_never_fails_the_gate_on_its_own_good_parts_once_some_false_positives_are_allowed() -> None:
    """Honest (part-grouped) scores of good parts: a tight bulk and a heavy upper tail. The normal-tail half of the rule
    sees only the bulk and pulls the logit average into the tail; the guard lifts it to an observed 3%."""
    rng = np.random.default_rng(11)
    good = _sigmoid(np.concatenate([rng.normal(-4.0, 0.4, 280), rng.uniform(-1.0, 3.0, 20)]))
    defects = _sigmoid(rng.normal(2.0, 1.0, 100))
    p_defect = np.concatenate([good, defects])
    is_defect = np.r_[np.zeros(300, bool), np.ones(100, bool)]
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03, confidence=0.75)
    assert choice.allowed_false_positives >= 1
    unguarded = float(_sigmoid((np.log(choice.rank_threshold / (1 - choice.rank_threshold)) + np.log(choice.tail_threshold / (1 - choice.tail_threshold))) / 2))
    assert (good >= unguarded).mean() > 0.03  # what the rule used to return
    assert choice.observed_fpr <= 0.03 and choice.threshold > unguarded
    assert choice.threshold <= choice.rank_threshold  # still less cautious than the rank rule alone: recall kept

    few = choose_defect_threshold(p_defect=np.concatenate([good[::10], defects[:10]]), is_defect=np.r_[np.zeros(30, bool), np.ones(10, bool)],
                                  max_fpr=0.03, confidence=0.75)
    assert few.allowed_false_positives == 0  # 30 good parts: no guard; the rank/tail blend decides as before


def test_interval_by_part_widens_when_photos_of_one_part_agree() -> None:
    from modeling.evaluation import proportion_interval_by_part

    # magnetic tile's test split: 193 good photos of 33 tiles; 7 false positives on 3 tiles
    parts = np.repeat(np.arange(33), 6)[:193]
    hits = np.zeros(193, dtype=bool)
    hits[[0, 1, 2, 6, 7, 12, 13]] = True
    by_photo = proportion_interval_by_part(hits=hits)
    by_part = proportion_interval_by_part(hits=hits, parts=parts)
    assert by_photo["value"] == by_part["value"] == pytest.approx(7 / 193)
    assert by_photo["effective_n"] == 193 and by_photo["n_parts_with_hits"] == 7
    assert (by_part["n_parts"], by_part["n_parts_with_hits"]) == (33, 3)
    assert by_part["effective_n"] < 100 and by_part["high"] > by_photo["high"] + 0.02 and by_part["low"] < by_photo["low"]
    # plain Clopper-Pearson without parts: 7 of 193, two-sided 90%
    assert by_photo["low"] == pytest.approx(beta.ppf(0.05, 7, 187)) and by_photo["high"] == pytest.approx(beta.ppf(0.95, 8, 186))
    # no false positive at all: 33 tiles cannot show an FPR under 3%, 193 independent photos could
    clean = np.zeros(193, dtype=bool)
    assert proportion_interval_by_part(hits=clean, parts=parts)["high"] > 0.08 > 0.03 > proportion_interval_by_part(hits=clean)["high"]
    # the same hits spread over many parts carry more information than hits bunched in a few
    spread = np.zeros(193, dtype=bool)
    spread[[0, 6, 12, 18, 24, 30, 36]] = True
    assert proportion_interval_by_part(hits=spread, parts=parts)["effective_n"] > by_part["effective_n"]
    assert proportion_interval_by_part(hits=np.zeros(0, dtype=bool))["high"] is None


def test_interval_by_part_never_grows_surer_with_a_first_hit_and_handles_the_edges() -> None:
    from modeling.evaluation import proportion_interval_by_part

    parts = np.repeat(np.arange(33), 6)[:193]
    highs = []
    for n_hits in range(4):  # hits on one part after another: the upper bound may only rise
        hits = np.zeros(193, dtype=bool)
        hits[[6 * k for k in range(n_hits)]] = True
        highs.append(proportion_interval_by_part(hits=hits, parts=parts)["high"])
    assert highs == sorted(highs) and highs[1] > 0.03  # one flagged photo of 33 parts does not settle a 3% gate
    everything = proportion_interval_by_part(hits=np.ones(193, dtype=bool), parts=parts)
    assert everything["value"] == 1.0 and everything["high"] == 1.0 and everything["low"] == pytest.approx(0.05 ** (1 / 33))
    one_part = proportion_interval_by_part(hits=np.array([True, False, True]), parts=np.array(["a", "a", "a"]))
    assert one_part["effective_n"] == 1 and one_part["low"] < 0.2 and one_part["high"] > 0.9


def test_a_test_split_without_defects_fails_the_recall_gate_instead_of_skipping_it() -> None:
    """A project with a "no defect" class whose frozen test split holds only good parts (ingested with good labels
    only, MVTec-style): recall cannot be measured, so the gates must not pass."""
    y_true = np.zeros(6, int)
    metrics = evaluate_predictions(y_true=y_true, y_pred=y_true, probabilities=np.eye(2)[y_true], class_names=["good", "dent"], negative_index=0)
    assert metrics["defect_recall"] is None and metrics["negative_fpr"] == 0.0
    gates = {g.name: g for g in evaluate_gates(metrics=metrics, latency_ms=5, macro_f1_min=0.7, defect_recall_min=0.85, negative_fpr_max=0.03, latency_ms_max=30)}
    assert gates["defect_recall"].applicable and gates["defect_recall"].passed is False and gates["defect_recall"].value is None
    assert gates["negative_fpr"].passed is True


def test_a_test_split_missing_a_class_fails_the_macro_f1_gate_with_its_value_kept() -> None:
    """QA: a 3-class project whose test split held 4 crazing images only: macro F1 over the classes present was 1.0 and
    passed, for a model that had never seen the other two classes."""
    y_true = np.zeros(4, int)
    classes = ["crazing", "inclusion", "scratches"]
    metrics = evaluate_predictions(y_true=y_true, y_pred=y_true, probabilities=np.eye(3)[y_true], class_names=classes, negative_index=None)
    assert metrics["macro_f1"] == 1.0 and metrics["classes_missing"] == ["inclusion", "scratches"]
    gates = {g.name: g for g in evaluate_gates(metrics=metrics, latency_ms=5, macro_f1_min=0.7, defect_recall_min=0.85, negative_fpr_max=0.03, latency_ms_max=30)}
    assert (gates["macro_f1"].value, gates["macro_f1"].applicable, gates["macro_f1"].passed) == (1.0, True, False)
    every = np.array([0, 1, 2, 0])
    whole = evaluate_predictions(y_true=every, y_pred=every, probabilities=np.eye(3)[every], class_names=classes, negative_index=None)
    assert whole["classes_missing"] == []
    assert {g.name: g for g in evaluate_gates(metrics=whole, latency_ms=5, macro_f1_min=0.7, defect_recall_min=0.85, negative_fpr_max=0.03,
                                              latency_ms_max=30)}["macro_f1"].passed is True


def test_a_gate_is_settled_only_when_the_whole_interval_gives_one_verdict() -> None:
    from loop.round import gate_settled

    # recall passes at >= limit, FPR at <= limit: an interval reaching the limit from the failing side is not settled
    assert not gate_settled("defect_recall", low=0.652, high=1.0, limit=1.0)
    assert not gate_settled("negative_fpr", low=0.0, high=0.153, limit=0.0)
    assert gate_settled("defect_recall", low=0.9, high=1.0, limit=0.85) and gate_settled("defect_recall", low=0.5, high=0.84, limit=0.85)
    assert gate_settled("negative_fpr", low=0.0, high=0.03, limit=0.03) and gate_settled("negative_fpr", low=0.031, high=0.2, limit=0.03)
    assert not gate_settled("defect_recall", low=0.8, high=0.9, limit=0.85) and not gate_settled("negative_fpr", low=0.01, high=0.05, limit=0.03)


def test_a_class_without_test_images_has_no_recall_nor_f1_and_one_never_predicted_no_precision() -> None:
    # zero_division=0 stored F1 0 for classes absent from the test split: the dashboard's chart read it as a failure
    from modeling.evaluation import evaluate_predictions

    y_true, y_pred = np.array([0, 0, 0, 1]), np.array([0, 0, 2, 0])  # class 2 absent but predicted once; class 1 never predicted
    metrics = evaluate_predictions(y_true=y_true, y_pred=y_pred, probabilities=np.eye(3)[y_pred], class_names=["good", "scratch", "spot"], negative_index=0)
    assert metrics["per_class"]["spot"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert metrics["per_class"]["scratch"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["per_class"]["good"]["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_an_estimate_over_the_gate_by_the_one_forgiven_sampled_part_says_so() -> None:
    # review: "already breaks the 3% gate" read as a threshold chosen wrong where the estimate is over only by the one
    # sampled good part the rule declines to sit above
    rng = np.random.default_rng(3)
    sampled = np.append(rng.beta(2, 40, 28), 0.998)
    picked = rng.beta(3, 6, 150)
    p_defect = np.concatenate([sampled, picked, rng.beta(30, 2, 60)])
    is_defect = np.arange(len(p_defect)) >= len(sampled) + len(picked)
    actively_picked = (np.arange(len(p_defect)) >= len(sampled)) & ~is_defect
    choice = choose_defect_threshold(p_defect=p_defect, is_defect=is_defect, max_fpr=0.03, actively_picked=actively_picked,
                                     n_unlabeled_negatives=500.0)
    assert choice.rule == "stratified" and choice.n_sampled_negatives_above == 1
    assert choice.estimated_population_fpr > 0.03
    from loop.round import fpr_estimate_sentence
    sentence = fpr_estimate_sentence(choice, fpr_estimate=choice.estimated_population_fpr, fpr_max=0.03)
    assert "by one part" in sentence and "1/29" in sentence and "breaks" not in sentence
    # two sampled parts above are a tail: that estimate does break the gate
    two_above = dataclasses.replace(choice, n_sampled_negatives_above=2)
    assert "already breaks the 3% gate" in fpr_estimate_sentence(two_above, fpr_estimate=0.05, fpr_max=0.03)
    assert fpr_estimate_sentence(choice, fpr_estimate=0.02, fpr_max=0.03) == " The loop's own FPR estimate is 2.0%."
