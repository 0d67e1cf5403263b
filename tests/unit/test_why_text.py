"""What an annotator reads beside the image: why it was picked and the model's guess, in words, with percentages a
person can trust (never "0%" for a guess the loop acts on) and the defect decision it comes from."""
from __future__ import annotations

from labeling.base import TaskRequest
from labeling.labelstudio_backend import why_text


def _task(**fields) -> TaskRequest:  # noqa: ANN003
    return TaskRequest(image_id=1, image_path="/x.png", sha256="0" * 64, **fields)


def test_every_reason_the_selection_gives_reads_as_words() -> None:
    from labeling.labelstudio_backend import REASON_TEXT
    from modeling.selection import REASONS

    for reason in REASONS:  # no internal code such as "confused_good" shown as the reason
        assert reason in REASON_TEXT, reason
        assert why_text(_task(reason=reason), round_number=3) == f"Picked because {REASON_TEXT[reason]}. Round 3."


def test_the_guess_says_how_close_the_defect_decision_was() -> None:
    # a tiny threshold: "good" at >99% is still unsure, and a defect class at <1% is the loop's decision
    good = _task(reason="uncertain", predicted_label="good", prediction_score=0.99999, probabilities={"good": 0.99999, "spot": 0.00001},
                 negative_class="good", decision_threshold=0.00002)
    assert "Model's guess: good (>99%); P(defect) 1e-05 against the defect threshold 2e-05." in why_text(good, round_number=1)
    spot = _task(reason="confused_good", predicted_label="spot", prediction_score=0.00004, probabilities={"good": 0.99995, "spot": 0.00004,
                 "scratch": 0.00001}, negative_class="good", decision_threshold=0.00002)
    text = why_text(spot, round_number=1)
    assert "Model's guess: spot (<1%); P(defect) 5e-05 against the defect threshold 2e-05." in text and "false alarms" in text
    # close to the threshold: enough digits to show the side, "0.4962 against 0.5", not "0.5 against 0.5"
    close = _task(reason="uncertain", predicted_label="good", prediction_score=0.5038, probabilities={"good": 0.5038, "spot": 0.4962},
                  negative_class="good", decision_threshold=0.5)
    assert "P(defect) 0.496 against the defect threshold 0.5." in why_text(close, round_number=1)
    # QA: the most probable answer is pre-selected; where the deployed model's threshold (set for the FPR gate) decides
    # otherwise, the text says so ("free" had been pre-selected at P(defect) 0.74 under a threshold of 0.93)
    likely_crack = _task(reason="uncertain", predicted_label="crack", prediction_score=0.4, probabilities={"free": 0.26, "crack": 0.4, "blowhole": 0.34},
                         negative_class="free", decision_threshold=0.93, decided_label="free")
    assert "Model's guess: crack (40%); P(defect) 0.74: the deployed model calls it free, its defect threshold being 0.93." in why_text(likely_crack, round_number=1)
    # a waiting task's text, refreshed without numbers, still says so (review: the refresh dropped it)
    from labeling.labelstudio_backend import LabelStudioBackend
    refreshed = LabelStudioBackend._guess_data(likely_crack, data={"reason": "uncertain"})["why"]
    assert refreshed.endswith("Model's guess: crack; the deployed model calls it free."), refreshed
    # without a decision (no negative class, or a guess that is not the round's decision): the guess alone
    assert "Model's guess: spot (40%). Round 1." in why_text(_task(reason="uncertain", predicted_label="spot", prediction_score=0.4), round_number=1)
    # a questioned label is shown cleanlab's suggestion, named as such
    suspect = _task(reason="suspected_label_error", predicted_label="spot", prediction_score=0.91, current_label="scratch")
    assert "Current label: scratch. Suggested label: spot (91%)." in why_text(suspect, round_number=2)
    # a later round no longer suspects it (its guess is the label itself): no "Suggested label" naming the current one
    cleared = _task(reason="suspected_label_error", predicted_label="scratch", current_label="scratch")
    text = why_text(cleared, round_number=None)
    assert "Suggested label" not in text and "Current label: scratch. The model now agrees with the current label (scratch)." in text
    assert text.startswith("Picked because an earlier round found its current label doubtful.") and "looks wrong" not in text


def test_an_answer_that_could_not_be_used_is_quoted_back() -> None:
    rejected = _task(reason="answer_rejected", rejected_answer="'dent'")
    assert why_text(rejected, round_number=4).startswith("Picked because the answer given ('dent') is not one of this project's classes")
