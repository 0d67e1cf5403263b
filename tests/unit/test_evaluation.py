import numpy as np
import pytest

from modeling.evaluation import choose_defect_threshold, evaluate_gates, evaluate_predictions, final_predictions, fpr_upper_bound, rank_threshold


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
    assert 0.35 < choice.threshold < 0.36


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
