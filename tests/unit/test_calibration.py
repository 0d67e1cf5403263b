import numpy as np
import pytest

from modeling.calibration import (
    expected_calibration_error,
    fit_out_of_fold_temperature,
    fit_temperature,
    negative_log_likelihood,
    softmax_with_temperature,
)


@pytest.fixture
def overconfident_logits() -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right 80% of the time but says so with ~100% confidence."""
    rng = np.random.default_rng(0)
    n, classes = 600, 4
    labels = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < 0.8, labels, (labels + rng.integers(1, classes, n)) % classes)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), predicted] += 4.0
    return logits * 4.0, labels  # x4: far too sharp


def test_temperature_scaling_lowers_nll_on_overconfident_logits(overconfident_logits):
    logits, labels = overconfident_logits
    temperature = fit_temperature(logits=logits, labels=labels)
    assert temperature > 1.5  # overconfident -> soften
    before = negative_log_likelihood(logits=logits, labels=labels)
    after = negative_log_likelihood(logits=logits, labels=labels, temperature=temperature)
    assert after < 0.8 * before
    ece_before = expected_calibration_error(probabilities=softmax_with_temperature(logits, 1.0), labels=labels)
    ece_after = expected_calibration_error(probabilities=softmax_with_temperature(logits, temperature), labels=labels)
    assert ece_after < ece_before


def test_underconfident_logits_get_sharpened(overconfident_logits):
    logits, labels = overconfident_logits
    assert fit_temperature(logits=logits / 40.0, labels=labels) < 1.0


def test_probabilities_input_gives_the_same_temperature_as_logits(overconfident_logits):
    logits, labels = overconfident_logits
    from_logits = fit_temperature(logits=logits, labels=labels)
    from_probabilities = fit_temperature(probabilities=softmax_with_temperature(logits, 1.0), labels=labels)
    assert from_probabilities == pytest.approx(from_logits, rel=0.02)


def test_temperature_keeps_the_predicted_class(overconfident_logits):
    logits, labels = overconfident_logits
    temperature = fit_temperature(logits=logits, labels=labels)
    assert np.array_equal(softmax_with_temperature(logits, temperature).argmax(1), logits.argmax(1))


def test_degenerate_inputs_leave_the_model_alone_and_bad_inputs_are_refused():
    assert fit_temperature(logits=np.array([[2.0, 0.0]]), labels=np.array([0])) == 1.0
    assert fit_temperature(logits=np.array([[2.0, 0.0], [3.0, 0.0]]), labels=np.array([0, 0])) == 1.0
    with pytest.raises(ValueError, match="exactly one"):
        fit_temperature(labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="aligned"):
        fit_temperature(logits=np.zeros((3, 2)), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(logits=np.zeros((2, 2)), labels=np.array([0, 2]))


def test_a_validation_set_without_errors_gets_a_finite_temperature():
    # Every image right with a modest margin: the plain NLL keeps falling to the 0.05 bound; the add-one error
    # estimate stops it where the mean confidence is about (n+1)/(n+2).
    rng = np.random.default_rng(1)
    n, classes = 300, 6
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 0.3, (n, classes))
    logits[np.arange(n), labels] += 2.0
    plain = [negative_log_likelihood(logits=logits, labels=labels, temperature=t) for t in (0.3, 0.1, 0.05)]
    assert plain[0] > plain[1] > plain[2]  # what an unsmoothed fit would chase
    temperature = fit_temperature(logits=logits, labels=labels)
    assert 0.1 < temperature < 1.0
    confidence = softmax_with_temperature(logits, temperature).max(axis=1).mean()
    assert confidence == pytest.approx((n + 1) / (n + 2), abs=0.01)


def test_with_errors_present_the_temperature_never_makes_the_nll_worse():
    # Small validation splits with a few errors (the loop's usual case): the fitted temperature is the NLL's own
    # minimum, so calibration never reports a worse NLL than leaving the model alone.
    rng = np.random.default_rng(0)
    worse = 0
    for _ in range(300):
        labels = rng.integers(0, 2, 22)
        logits = rng.normal(0, 1, (22, 2))
        logits[np.arange(22), labels] += rng.uniform(1, 6)
        if (logits.argmax(1) == labels).all():
            continue
        temperature = fit_temperature(logits=logits, labels=labels)
        worse += negative_log_likelihood(logits=logits, labels=labels, temperature=temperature) > negative_log_likelihood(logits=logits, labels=labels) + 1e-9
    assert worse == 0


def test_an_exact_tie_at_the_top_is_not_an_error_that_sends_the_temperature_to_its_bound():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 21)
    logits = rng.normal(0, 0.3, (21, 2))
    logits[np.arange(21), labels] += 3.0
    labels[0], logits[0] = 1, [1.0, 1.0]  # the true class ties with the other one: argmax (class 0) reads it as an error
    nudged = logits.copy()
    nudged[0, labels[0]] += 1e-9
    assert fit_temperature(logits=logits, labels=labels) == pytest.approx(fit_temperature(logits=nudged, labels=labels), rel=1e-3)


def test_an_image_whose_class_no_fold_model_saw_does_not_drag_the_out_of_fold_temperature() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 100)
    predicted = np.where(rng.random(100) < 0.9, labels, (labels + 1) % 3)
    logits = rng.normal(0, 0.5, (100, 4))
    logits[np.arange(100), predicted] += 3.0
    logits[:, 3] = -30.0  # a fourth class with one labeled image: no fold model but its own saw it ...
    labels_with_singleton = np.append(labels, 3)
    with_singleton = np.vstack([logits, [[2.0, 1.0, 0.5, -30.0]]])  # ... and the one that predicts it never did
    plain = fit_temperature(labels=labels, logits=logits)
    dragged = fit_temperature(labels=labels_with_singleton, logits=with_singleton)
    assert dragged > 1.3 * plain  # what the plain fit does with that one row
    assert fit_out_of_fold_temperature(labels=labels_with_singleton, logits=with_singleton) == pytest.approx(plain, rel=1e-6)
    assert fit_out_of_fold_temperature(labels=labels, logits=logits) == pytest.approx(plain)  # nothing to leave out: the plain fit


def test_a_class_seen_in_one_fold_only_is_left_out_and_one_class_left_means_no_scaling() -> None:
    rng = np.random.default_rng(1)
    labels = np.concatenate([rng.integers(0, 2, 60), np.full(6, 2)])  # class 2: six photos of one part, all in fold 4
    folds = np.concatenate([np.arange(60) % 4, np.full(6, 4)])
    logits = rng.normal(0, 0.5, (66, 3))
    logits[np.arange(60), labels[:60]] += 3.0
    logits[:, 2] = -30.0  # no fold model but fold 4's saw class 2, and fold 4's never did
    logits[60:, 0] += 3.0
    plain = fit_temperature(labels=labels[:60], logits=logits[:60])
    assert fit_out_of_fold_temperature(labels=labels, logits=logits) > 5 * plain  # by image count alone the part is "seen"
    assert fit_out_of_fold_temperature(labels=labels, logits=logits, folds=folds) == pytest.approx(plain, rel=1e-6)
    # a binary project with one labeled defect: nothing left to contrast, so no scaling rather than a dragged one
    one_defect = np.append(np.zeros(30, dtype=int), 1)
    two_columns = np.vstack([np.tile([3.0, -30.0], (30, 1)), [[3.0, -30.0]]])
    assert fit_out_of_fold_temperature(labels=one_defect, logits=two_columns) == 1.0
    with pytest.raises(ValueError, match="one row each"):
        fit_out_of_fold_temperature(labels=labels[:5], logits=logits)
