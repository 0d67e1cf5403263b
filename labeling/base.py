"""The one small interface every annotator backend implements, and the registry that finds one by name."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import Session

from store.models import Project


# Reasons that ask about an image that has answers already: a backend asks again (Label Studio: in the image's task).
ASKED_AGAIN_REASONS = ("suspected_label_error", "annotators_disagree", "answer_rejected")


@dataclass(frozen=True)
class TaskRequest:
    """One image the loop wants labeled, with the model's guess and why it was picked."""

    image_id: int
    image_path: str
    sha256: str
    reason: str  # uncertain | rare_class | diverse | random | cold_start, or one of ASKED_AGAIN_REASONS
    predicted_label: str | None = None
    prediction_score: float | None = None  # model confidence in predicted_label, 0..1
    probabilities: dict[str, float] = field(default_factory=dict)
    current_label: str | None = None  # shown for suspected label errors
    round_number: int | None = None
    # the model's defect decision: P(defect) = 1 - P(negative_class) against this threshold (None: no negative class,
    # or a guess that is not the round's decision, e.g. cleanlab's suggestion for a questioned label)
    negative_class: str | None = None
    decision_threshold: float | None = None
    # the deployed model's decision at that threshold, when the guess pre-selected (the most probable answer) differs
    decided_label: str | None = None
    rejected_answer: str | None = None  # an answer_rejected ask: the answer that could not be used, quoted to the annotator


@dataclass
class PullReport:
    new_label_events: int = 0
    deleted: int = 0
    skipped: int = 0
    rejected: int = 0
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. annotator agreement


@dataclass
class PushReport:
    pushed: int = 0
    already_present: int = 0
    pending: int = 0  # could not be pushed now (backend down): retried next round
    reopened: int = 0  # answered tasks asked again: suspected label errors of images labeled in the backend
    refreshed: int = 0  # tasks still waiting for an answer that got this round's guess
    superseded_predictions_deleted: int = 0  # earlier rounds' guesses on those tasks, replaced by this round's
    closed: int = 0  # reopened tasks closed again: the loop has the answer to their question
    settled_done: bool = True  # False: some task of `settled` may still be open (not reached, or a close failed): asked again next round
    # which images of `settled` those are; a backend that names none with settled_done False has them all named again
    unsettled_image_ids: set[int] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    # which images of the batch `pending` are (last: a backend building the report by position keeps working); a
    # backend that names none of the batch with pending > 0 has its whole batch retried
    pending_image_ids: set[int] = field(default_factory=set)
    # images whose task, still waiting for an answer, was deleted in the annotation tool: the backend forgot the task,
    # and the loop asks again in a new one at the next round
    gone_image_ids: set[int] = field(default_factory=set)
    # of `withdraw`: those no annotator can answer any more (the task deleted, gone already, or never made); the loop
    # marks their asks withdrawn. The others (the tool down, a request failed, an answer given since the pull) keep
    # their asks, and the loop names them again next round unless an answer came
    withdrawn_image_ids: set[int] = field(default_factory=set)
    withdrawn_tasks: int = 0  # waiting tasks taken from the annotators (deleted: their file is gone or changed)
    # tasks, answered ones too, whose image link was rewritten because the tool serves images from another folder now
    relinked_tasks: int = 0


class AnnotatorBackend(Protocol):
    name: str
    # whether asks wait in people's queue until answered (Label Studio): the rounds' picks still waiting there count
    # against the next round's budget ([loop] queue_limit). A backend without it is taken to queue for people.
    queued_for_people: bool

    def pull(self, *, session: Session, project: Project, round_id: int | None) -> PullReport:
        """Turn every answer given since the last pull into label events (append-only)."""

    def push(self, *, session: Session, project: Project, round_id: int, batch: list[TaskRequest],
             open_guesses: Sequence[TaskRequest] = (), settled: Sequence[int] = (), withdraw: Sequence[int] = ()) -> PushReport:
        """Hand the batch to annotators; idempotent (pushing the same image twice never duplicates a task).
        open_guesses: this round's guesses for images pushed earlier and still unanswered, so what annotators see
        pre-selected is the current model's (a backend without pre-annotations ignores them). settled: images asked
        again earlier whose answer the loop now has (a backend that reopened their task closes it). withdraw: images
        pushed earlier, never answered, whose file was quarantined since (missing, changed): their task is taken from
        the annotators, who would see a broken image or another picture (PushReport.withdrawn_image_ids)."""


BackendFactory = Callable[..., AnnotatorBackend]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    def decorator(factory: BackendFactory) -> BackendFactory:
        _BACKENDS[name] = factory
        return factory

    return decorator


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(name: str, **options: Any) -> AnnotatorBackend:
    """create_backend("oracle", manifest=..., noise_rate=0.1): like timm's create_model, by name."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown annotator backend {name!r}; available: {', '.join(available_backends())}")
    return _BACKENDS[name](**options)
