"""Which of the loop's earlier guesses on a waiting Label Studio task are deleted when a round adds its own."""
from __future__ import annotations

from labeling.labelstudio_backend import _is_loop_model_version
from labeling.labelstudio_client import superseded_predictions


def guess(prediction_id: int, created_at: float | None, model_version: str = "round-1") -> dict:
    return {"id": prediction_id, "model_version": model_version, "created_at": created_at}


def stale(predictions: list[dict], answered_at: list[float | None] = ()) -> list[int]:  # noqa: ANN001
    return superseded_predictions(predictions, answered_at=list(answered_at), ours=_is_loop_model_version)


def test_a_waiting_task_keeps_the_guess_just_replaced_and_loses_older_ones() -> None:
    rounds = [guess(10 + n, float(n), f"round-{n}") for n in (1, 2, 3)]
    assert stale(rounds) == [11, 12]  # round 3's is what an open editor may show: kept until the next round
    assert stale(rounds[:1]) == []
    assert stale(list(reversed(rounds))) == [11, 12]  # by time, not by listing order


def test_guesses_answers_were_given_under_stay() -> None:
    rounds = [guess(10 + n, float(n * 10), f"round-{n}") for n in (1, 2, 3, 4)]
    # answered at 15 (under round 1's guess) and at 25 (under round 2's); round 4's is the newest listed
    assert stale(rounds, answered_at=[15.0, 25.0]) == [13]
    # another model's guess made after ours but before the answer stays, and so does ours before it (what was pre-selected)
    ml_backend = guess(99, 12.0, "line-3-model")
    assert stale([*rounds, ml_backend], answered_at=[15.0]) == [12, 13]


def test_another_models_guesses_and_unknown_times_are_never_deleted() -> None:
    assert stale([guess(1, 1.0, "line-3-model"), guess(2, 2.0, "line-3-model"), guess(3, 3.0)]) == []
    assert stale([guess(1, 1.0), guess(2, 2.0), guess(3, 3.0)], answered_at=[None]) == []  # an answer of unknown time keeps all
    assert not _is_loop_model_version("round-2b") and not _is_loop_model_version(None) and _is_loop_model_version("round-12")
