"""The Label Studio annotator backend: push the round's batch as tasks with pre-annotations, pull every answer back.

Images are referenced in place (never copied): each task's image is `/data/local-files/?d=<path relative to
the server's LOCAL_FILES_DOCUMENT_ROOT>`, and the backend registers one local-files storage per image
directory, because Label Studio serves a file only inside the path of a storage of a project the logged-in
user may see. The document root must be an ancestor of every image (default "/", Label Studio's own
default; set LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT to the same value for the server and the loop to narrow it).

Answers become append-only label events (source "annotator", annotator "labelstudio:<user id>", external_id
the annotation id). Pull and the webhook share one recorder, so an answer seen by both is recorded once.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import mean
from typing import Any

import httpx
from label_studio_sdk.core.api_error import ApiError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labeling import labelstudio_client as lsc
from labeling.base import ASKED_AGAIN_REASONS, PullReport, PushReport, TaskRequest, register_backend
from store.models import AnnotationTask, Image, LabelEvent, Project, RejectedAnnotation, Round, Selection
from store.queries import class_but_for_case, current_labels, renamed_classes, requeue_newest_asks
from store.reports import as_utc

BACKEND_NAME = "labelstudio"
DEFAULT_DOCUMENT_ROOT = "/"
WEBHOOK_ACTIONS = lsc.WEBHOOK_ACTIONS
REASON_TEXT = {
    "uncertain": "the model is unsure about this image",
    "rare_class": "it may show a rare class",
    "diverse": "it is unlike the images labeled so far",
    "suspected_label_error": "its current label looks wrong",
    "annotators_disagree": "the answers given so far disagree: one more settles it",
    "answer_rejected": "the answer given is not one of this project's classes: choose one of them",
    "random": "random check",
    "cold_start": "it is least like the known-good parts (picked before any model existed)",
    "new_batch": "it comes from new images unlike every labeled one (a new camera or product?): a random pick among them",
    "test_sample": "drawn at random from new images unlike the test set, to measure the model on them: label what you see (no guess is shown)",
    # the selection's gate-aware components: which side of the threshold the model is on is in the guess that follows
    "likely_defect": "it is near the line between good and defect: the loop is missing defects, and this may be one",
    "confused_good": "it is near the line between good and defect: the loop raises false alarms, and this may be one",
}


# Pull details key (report.details["labelstudio"]): answers naming a class `loop rename-class` renamed away, recorded as
# its new name
RENAMED_ON_THE_WAY_IN = "renamed_on_the_way_in"
# An answer of a Label Studio project that is no longer the store's (a server reinstalled or replaced: its ids started
# over) keeps its label event; its answer id becomes "retired N:<id>", so a new answer given the same id on the new
# server is another answer, and the pull never reads the old one as deleted.
RETIRED_PREFIX = "retired "

# Predictions per import request when adding a round's guesses to waiting tasks: 20,000 took Label Studio 12 s,
# and the SDK's client times out at 30 s.
REFRESH_CHUNK = 2000
# Waiting tasks listed by id while they are fewer than this share of the project's (else the whole project, one listing)
BY_ID_LISTING_SHARE = 0.4


def annotator_name(user_id: Any) -> str:
    """One annotator identity for pull and webhook alike (the webhook payload carries only the user id)."""
    return f"labelstudio:{user_id}"


def why_text(task: TaskRequest, *, round_number: int | None) -> str:
    """What the annotator reads next to the image: why it was picked, the model's guess, the current label."""
    reason = REASON_TEXT.get(task.reason, task.reason)
    agrees = task.reason == "suspected_label_error" and task.predicted_label is not None and task.predicted_label == task.current_label
    if agrees:  # a later round no longer suspects it: the reason says so, not that it looks wrong now
        reason = "an earlier round found its current label doubtful"
    if task.reason == "answer_rejected" and task.rejected_answer:
        reason = f"the answer given ({task.rejected_answer}) is not one of this project's classes: choose one of them"
    parts = [f"Picked because {reason}."]
    if task.reason in ("suspected_label_error", "answer_rejected") and task.current_label is not None:  # a question on a label
        parts.append(f"Current label: {task.current_label}.")
    if task.predicted_label is not None:
        score = _prediction_score(task)
        # a questioned label is shown cleanlab's suggestion (out of fold), not the round's model's guess
        who = "Suggested label" if task.reason == "suspected_label_error" else "Model's guess"
        guess = f"{who}: {task.predicted_label}" + (f" ({_percent(score)})" if score is not None else "")
        if agrees:
            # a later round no longer suspects it: its out-of-fold guess is the label itself, no suggestion of another
            guess = f"The model now agrees with the current label ({task.predicted_label}" + (f", {_percent(score)}" if score is not None else "") + ")"
        negative = task.probabilities.get(task.negative_class) if task.negative_class is not None else None
        if negative is not None and task.decision_threshold is not None:
            p_defect, threshold = _distinct_digits(1.0 - negative, task.decision_threshold)
            if task.decided_label is not None and task.decided_label != task.predicted_label:
                # the most probable answer is pre-selected; the deployed model's threshold (set for the FPR gate) decides
                # otherwise (QA: "free" pre-selected at P(defect) 0.74 under a threshold of 0.93 invited rubber-stamping)
                guess += f"; P(defect) {p_defect}: the deployed model calls it {task.decided_label}, its defect threshold being {threshold}"
            else:  # the guess is the defect decision too: P(defect) against the threshold says how close it was
                guess += f"; P(defect) {p_defect} against the defect threshold {threshold}"
        elif task.decided_label is not None and task.decided_label != task.predicted_label:
            # a waiting task's text, rewritten without numbers (review: the refresh dropped what the deployed model calls it)
            guess += f"; the deployed model calls it {task.decided_label}"
        parts.append(guess + ".")
    if round_number is not None:
        parts.append(f"Round {round_number}.")
    return " ".join(parts)


def _percent(value: float) -> str:
    """A probability as a person reads it: never "0%" or "100%" for what is only nearly so."""
    if value < 0.005:
        return "<1%" if value > 0 else "0%"
    if value > 0.995:
        return ">99%" if value < 1 else "100%"
    return f"{value:.0%}"


def _distinct_digits(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with as many significant digits as it takes to show which side of the threshold the value is on
    (0.4962 against 0.5 is "0.496 against 0.5", never "0.5 against 0.5"), at least two, at most six."""
    for digits in range(2, 7):
        shown_value, shown_threshold = f"{value:.{digits}g}", f"{threshold:.{digits}g}"
        if shown_value != shown_threshold or value == threshold:
            return shown_value, shown_threshold
    return shown_value, shown_threshold


def _asked_again(text: str, reason: str | None = None) -> str:
    """The text of a reopened task: why it is asked again, and what to do. A tie or a refused answer wants a new
    answer, which its next annotator has not given yet (QA: they read "check the answer given here")."""
    if reason in ("annotators_disagree", "answer_rejected"):
        return f"Asked again: {text} Give your answer (if you answered this task already, check it)."
    return f"Asked again: {text} Check the answer given here and change it if it is wrong."


def _is_loop_model_version(model_version: str | None) -> bool:
    """A prediction this loop made (model_version f"round-{n}", set in push), not an ML backend's."""
    return bool(model_version) and re.fullmatch(r"round-\d+", str(model_version)) is not None


def _prediction_score(task: TaskRequest) -> float | None:
    if task.prediction_score is not None:
        return float(task.prediction_score)
    if task.predicted_label is not None and task.predicted_label in task.probabilities:
        return float(task.probabilities[task.predicted_label])
    return None


@dataclass
class ClassRenamed:
    """What LabelStudioBackend.rename_class did: answers, guesses, reopened tasks' questions and annotators' drafts
    rewritten, the answers last saved by us with their save times (lsc.ChoiceRenamed.saved) and the Label Studio
    projects found deleted."""
    answers: int = 0
    predictions: int = 0
    tasks: int = 0
    drafts: int = 0  # unsubmitted answers (or edits to one) choosing the old class, of any annotator
    saved: dict[int, tuple[str | None, str | None]] = field(default_factory=dict)
    projects_gone: list[int] = field(default_factory=list)


@register_backend(BACKEND_NAME)
class LabelStudioBackend:
    """create_backend("labelstudio", config=<loop.toml ProjectConfig>, project_dir=...) or with url/api_key.

    URL and token: the arguments, else env LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, else loop.toml
    [annotator] labelstudio_url / labelstudio_api_key. Document root: the argument, else env
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, else "/".
    """

    name = BACKEND_NAME
    queued_for_people = True  # a task waits in the annotators' queue until answered or skipped

    def __init__(
        self,
        *,
        config: Any = None,
        project_dir: str | Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        document_root: str | None = None,
        class_descriptions: Mapping[str, str] | None = None,
        project_title: str | None = None,
        timeout_s: float = 30.0,
    ):
        annotator = getattr(config, "annotator", None)
        self.url = url or os.environ.get("LABEL_STUDIO_URL") or getattr(annotator, "labelstudio_url", None)
        self.api_key = api_key or os.environ.get("LABEL_STUDIO_API_KEY") or getattr(annotator, "labelstudio_api_key", None)
        # where the token came from: a refused token names it (the environment wins over loop.toml)
        self.api_key_source = ("the backend's arguments" if api_key else "LABEL_STUDIO_API_KEY (the environment wins over loop.toml)"
                               if os.environ.get("LABEL_STUDIO_API_KEY") else "loop.toml [annotator] labelstudio_api_key")
        self.document_root = os.path.abspath(
            document_root
            or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
            or getattr(annotator, "labelstudio_document_root", None)
            or DEFAULT_DOCUMENT_ROOT
        )
        # the camera's bits loop.toml fixes ([model] bit_depth): display copies show what the model sees
        self.bit_depth = getattr(getattr(config, "model", None), "camera_bit_depth", None)
        self.class_descriptions = dict(class_descriptions if class_descriptions is not None else getattr(config, "class_descriptions", None) or {})
        self.project_title = project_title
        self.project_dir = Path(project_dir) if project_dir is not None else None
        self.timeout_s = timeout_s
        self._client = None

    # ------------------------------------------------------------------------------------------------ helpers

    def client(self):
        """The connected SDK client (token checked once). Raises LabelStudioUnavailable / LabelStudioAuthError."""
        if self._client is None:
            try:
                self._client = lsc.connect(self.url, self.api_key, timeout_s=self.timeout_s)
            except lsc.LabelStudioAuthError as error:
                if self.api_key:
                    raise lsc.LabelStudioAuthError(f"{error}; the token used came from {self.api_key_source}") from error
                raise
        return self._client

    def title_for(self, project: Project) -> str:
        return self.project_title or lsc.project_title_for(project.name)

    def ensure_project(self, project: Project, *, session: Session, model_version: str | None = None, report: PushReport | None = None,
                       carry_webhook: bool = True) -> int:
        """This project's Label Studio project: where its tasks already are, else one that carries its key (see
        lsc.ensure_project: a project folder of the same name elsewhere never shares it).

        Every Label Studio project the store's tasks are in is looked at first: one deleted there, or whose id now
        names another project (the server reinstalled or replaced: ids start over), is no longer the store's, and its
        tasks are retired (_retire_project) before a new project can take its id."""
        client = self.client()
        for ls_project_id in self._task_projects(session, project):
            if self._identity(client, project, ls_project_id) != "ours":
                self._retire_project(session, project, ls_project_id, warnings=report.warnings if report is not None else None,
                                     gone=report.gone_image_ids if report is not None else None)
        known = session.scalars(
            select(AnnotationTask.external_project_id).join(Image, Image.id == AnnotationTask.image_id)
            .where(AnnotationTask.backend == self.name, Image.project_id == project.id).order_by(AnnotationTask.id.desc()).limit(1)
        ).first()
        ls_project_id = lsc.ensure_project(
            client, title=self.title_for(project), classes=list(project.classes), descriptions=self.class_descriptions,
            model_version=model_version, key=project_key(project), known_project_id=int(known) if known is not None else None,
        )  # fmt: skip
        if str(ls_project_id) not in _known_projects(project):
            _remember_project(project, ls_project_id, _created_at(client.projects.get(id=ls_project_id)))
        if carry_webhook:
            self._carry_webhook(client, project, ls_project_id, report)
        return ls_project_id

    def _carry_webhook(self, client, project: Project, ls_project_id: int, report: PushReport | None) -> None:  # noqa: ANN001
        """The webhook `loop labelstudio webhook` registered on a project since retired goes on to the project that
        replaced it, with LOOP_LABELSTUDIO_WEBHOOK_SECRET set; else the round says how to register it (QA: answers in the
        new project reached the store only at the next pull, and nothing said why)."""
        if "webhook_url" in _known_projects(project).get(str(ls_project_id), {}):
            return
        url = next((r.get("webhook_url") for r in reversed(_known_retirements(project)) if r.get("webhook_url")), None)
        if url is None:
            return
        secret = os.environ.get("LOOP_LABELSTUDIO_WEBHOOK_SECRET")
        if not secret:
            if report is not None:
                report.warnings.append(f"the webhook registered on a Label Studio project since retired ({url}) does not follow to project "
                                       f"{ls_project_id}: run `loop labelstudio webhook --project {self.project_dir} --url {url}` with "
                                       "LOOP_LABELSTUDIO_WEBHOOK_SECRET set (answers reach the store at each round's pull meanwhile)")
            return
        try:
            lsc.create_webhook(client, project_id=ls_project_id, url=url, secret_header="X-Loop-Webhook-Secret", secret=secret)
        except (httpx.HTTPError, ApiError) as error:  # never the push's failure (review: every push failed after a refusal)
            if report is not None:
                report.warnings.append(f"the webhook registered on a Label Studio project since retired ({url}) could not be registered on "
                                       f"project {ls_project_id} ({_describe(error)}): run `loop labelstudio webhook --project {self.project_dir} "
                                       f"--url {url}` (answers reach the store at each round's pull meanwhile)")
            return
        remember_webhook(project, ls_project_id, url)
        if report is not None:
            report.warnings.append(f"the webhook to {url}, registered on a Label Studio project since retired, is registered on project {ls_project_id} now")

    def _identity(self, client, project: Project, ls_project_id: int, *, remember: bool = True) -> str:  # noqa: ANN001
        """"ours", "gone" (deleted in Label Studio) or "other": the id names another project than the one the store
        pushed to, told by the creation time Label Studio gave it (recorded at the store's first contact), or, for a
        store that recorded none yet, by another store's key in its description. "ours" records that time."""
        try:
            found = client.projects.get(id=ls_project_id)
        except ApiError as error:
            if error.status_code == 404:
                return "gone"
            raise
        created = _created_at(found)
        recorded = _known_projects(project).get(str(ls_project_id), {}).get("created_at")
        if recorded is not None and created is not None:
            # within a second: another Label Studio or SDK version may give the same time at another precision
            return "ours" if abs((lsc.as_utc(created) - lsc.as_utc(recorded)).total_seconds()) <= 1.0 else "other"
        description = found.description or ""
        if lsc.PROJECT_KEY_PREFIX in description and f"{lsc.PROJECT_KEY_PREFIX}{project_key(project)}" not in description:
            return "other"
        if remember:  # an older store's first contact since it keeps the time
            _remember_project(project, ls_project_id, created)
        return "ours"

    def _retire_project(self, session: Session, project: Project, ls_project_id: int, *, warnings: list[str] | None,
                        gone: set[int] | None = None) -> None:
        """The store forgets its tasks in a Label Studio project that is no longer its own (deleted there, or its id
        given to another project by a new server). The answers recorded from it stay labels, under a retired answer
        id (RETIRED_PREFIX); an image whose task there waited for an answer is asked again in a new task: named in
        `gone` (a push's report.gone_image_ids, which the round asks again), else its newest ask is pending again now."""
        rows = session.scalars(select(AnnotationTask).join(Image, Image.id == AnnotationTask.image_id).where(
            AnnotationTask.backend == self.name, Image.project_id == project.id, AnnotationTask.external_project_id == str(ls_project_id))).all()
        image_ids = {row.image_id for row in rows}
        retired = _known_retirements(project)
        tag = f"{RETIRED_PREFIX}{len(retired) + 1}:"
        latest: dict[str, LabelEvent] = {}
        ids = sorted(image_ids)
        for start in range(0, len(ids), 500):
            for event in session.scalars(select(LabelEvent).where(
                    LabelEvent.source == "annotator", LabelEvent.image_id.in_(ids[start:start + 500]), LabelEvent.external_id.is_not(None))
                    .order_by(LabelEvent.id)):
                if not event.external_id.startswith(RETIRED_PREFIX):
                    latest[event.external_id] = event
                    # the new server numbers its users from 1 too: its user 1 is another annotator, another vote
                    event.external_id, event.annotator = f"{tag}{event.external_id}", f"{tag}{event.annotator}"
        answered_at: dict[int, datetime] = {}  # image -> its newest live answer (a deleted answer's task waits again;
        for event in latest.values():            # a skip is no answer: its image was never asked again (QA))
            if event.action == "set":
                when = as_utc(event.created_at) or datetime.now(timezone.utc)  # not flushed yet: made just now
                answered_at[event.image_id] = max(when, answered_at.get(event.image_id, when))
        asked_at: dict[int, datetime] = {}  # image -> its newest ask that reached Label Studio (a reopened task, a tie's)
        for start in range(0, len(ids), 500):
            for image_id, pushed_at in session.execute(select(Selection.image_id, Selection.pushed_at).join(Round, Round.id == Selection.round_id).where(
                    Round.project_id == project.id, Selection.image_id.in_(ids[start:start + 500]), Selection.push_status == "pushed",
                    Selection.pushed_at.is_not(None))):
                asked_at[image_id] = max(as_utc(pushed_at), asked_at.get(image_id, as_utc(pushed_at)))
        answered = {image_id for image_id, when in answered_at.items() if image_id not in asked_at or asked_at[image_id] <= when}
        task_ids = {row.external_task_id for row in rows}
        for rejection in session.scalars(select(RejectedAnnotation).where(RejectedAnnotation.project_id == project.id, RejectedAnnotation.backend == self.name)):
            payload = rejection.payload if isinstance(rejection.payload, dict) else {}
            if str(payload.get("task_id")) in task_ids and not payload.get("retired"):  # task ids start over too
                rejection.payload = {**payload, "retired": tag}
        for row in rows:
            session.delete(row)
        session.flush()
        waiting = image_ids - answered
        if gone is not None:
            gone |= waiting
        requeued = len(waiting) if gone is not None else requeue_newest_asks(session, project.id, waiting)
        entry = _known_projects(project).get(str(ls_project_id), {})
        projects = {key: value for key, value in _known_projects(project).items() if key != str(ls_project_id)}
        project.labelstudio_projects = {"projects": projects, "retired": [*retired, {
            "label_studio_project": ls_project_id, "created_at": entry.get("created_at"), "retired_at": datetime.now(timezone.utc).isoformat(),
            "tasks": len(rows), "answered_images": len(answered_at), "asked_again": requeued, "tag": tag,
            **({"webhook_url": entry["webhook_url"]} if entry.get("webhook_url") else {})}]}
        if warnings is not None and rows:
            warnings.append(
                f"Label Studio project {ls_project_id} is no longer the one this store pushed to (deleted there, or the server was reinstalled "
                f"or replaced and the id names another project now): the store forgets its {len(rows)} tasks there; the answers recorded "
                f"from it stay labels ({len(answered_at)} images), and {requeued} images whose task waited for an answer are asked again in a new task")

    # ------------------------------------------------------------------------------------------------ push

    def push(self, *, session: Session, project: Project, round_id: int, batch: list[TaskRequest],
             open_guesses: Sequence[TaskRequest] = (), settled: Sequence[int] = (), withdraw: Sequence[int] = ()) -> PushReport:
        """One task per image with the model's guess pre-selected; idempotent through annotation_tasks.

        Label Studio unreachable (or refusing a request): nothing raised, PushReport.pending says how many
        images wait for the next round, with a warning.
        """
        report = PushReport(settled_done=not settled)  # done once _close_settled ran through
        unique: dict[int, TaskRequest] = {}
        for task in batch:
            unique.setdefault(task.image_id, task)
        report.unsettled_image_ids = set(settled) - set(unique)  # until _close_settled says which it could not close
        to_withdraw = set(withdraw) - set(unique)
        if not unique and not open_guesses and not settled and not to_withdraw and not self._document_root_changed(project):
            return report
        round_number = _round_number(session, round_id, batch)
        model_version = f"round-{round_number}" if round_number is not None else None
        reached: set[int] = set()  # images of the batch whose task is in Label Studio as asked (filled as it goes)
        try:
            client = self.client()
            ls_project_id = self.ensure_project(project, session=session, model_version=model_version, report=report)
            report.gone_image_ids -= set(unique)  # a retired task's image in this batch is asked in a new task now
            self._relink_after_root_change(client, report, session=session, project=project, ls_project_id=ls_project_id)
            predictions_sent = self._push_tasks(
                client, report, session=session, project=project, ls_project_id=ls_project_id, tasks=list(unique.values()),
                round_number=round_number, model_version=model_version, reached=reached,
            )  # fmt: skip
            # Label Studio pre-selects only predictions of the project's model version: once it moves to this round's,
            # a task pushed earlier and still unanswered would show no guess at all unless it gets this round's too
            guesses = [g for g in open_guesses if g.image_id not in unique]
            listed: dict[int, dict[str, Any]] = {}
            refreshed: set[int] = set()
            try:
                if guesses:  # the tasks still there and still showing the image are touched; listed by id when they are few
                    waiting = set(self._tasks_of(session, ls_project_id=ls_project_id, image_ids={g.image_id for g in guesses}).values())
                    n_tasks = session.scalar(select(func.count()).select_from(AnnotationTask).where(
                        AnnotationTask.backend == self.name, AnnotationTask.external_project_id == str(ls_project_id)))
                    # 3000 tasks: 2.2 s whole, 0.16 s for 50 by id, 0.8 s for 500 (200 ids a request): by id in one request,
                    # or while they are under ~40% of the project's tasks
                    by_id = len(waiting) <= max(lsc.SELECTED_TASKS_PER_REQUEST, BY_ID_LISTING_SHARE * (n_tasks or 0))
                    chosen = waiting if by_id else None
                    listed = {entry["task_id"]: entry for entry in lsc.list_task_data(client, project_id=ls_project_id, with_predictions=True,
                                                                                       task_ids=chosen)}
                    live = {task_id: entry["data"] for task_id, entry in listed.items()}
                    self._forget_deleted_tasks(client, session, report, ls_project_id=ls_project_id, live=live, image_ids={g.image_id for g in guesses})
                    refreshed = self._refresh_open_tasks(client, report, session=session, project=project, ls_project_id=ls_project_id,
                                                         live=live, guesses=guesses, model_version=model_version)
            except (httpx.HTTPError, ApiError) as error:  # the batch itself is in; its tasks show this round's guesses anyway
                report.warnings.append(f"could not add this round's guesses to the tasks still waiting for an answer ({_describe(error)}); "
                                       "those without one show an earlier round's guess, or none, until a later round adds it")
            if (predictions_sent or report.refreshed) and model_version:
                lsc.show_predictions_of(client, project_id=ls_project_id, model_version=model_version)
            # only once this round's guesses are the ones shown: deleting earlier ones first would leave tasks without one
            self._delete_superseded_predictions(client, report, listed=listed, refreshed=refreshed)
            self._close_settled(client, report, session=session, ls_project_id=ls_project_id, image_ids=[i for i in settled if i not in unique])
            self._withdraw_tasks(client, report, session=session, ls_project_id=ls_project_id, image_ids=to_withdraw)
        except (lsc.LabelStudioAuthError, lsc.LabelStudioConfigError):
            raise  # a wrong or missing setting: retrying next round would not help
        except lsc.LabelStudioUnavailable as error:
            report.warnings.append(f"{error}; {_left_pending(len(set(unique) - reached))}")
        except (httpx.HTTPError, ApiError, lsc.LabelStudioError) as error:
            report.warnings.append(f"Label Studio push failed ({_describe(error)}); {_left_pending(len(set(unique) - reached))}")
        # per image: the loop marks each of these pending (retried next round) and every other one pushed
        report.pending_image_ids = set(unique) - reached
        report.pending = len(report.pending_image_ids)
        return report

    def _push_tasks(
        self,
        client,
        report: PushReport,
        *,
        session: Session,
        project: Project,
        ls_project_id: int,
        tasks: list[TaskRequest],
        round_number: int | None,
        model_version: str | None,
        reached: set[int],
    ) -> bool:
        """Fills report (pushed, already_present, reopened, warnings) and `reached` (the images whose task is in Label
        Studio as asked, as each gets there, so a failure half-way leaves the rest pending). True when a prediction was sent."""
        warnings = report.warnings
        mapped = {
            row.image_id: row
            for row in session.scalars(
                select(AnnotationTask).where(AnnotationTask.backend == self.name, AnnotationTask.image_id.in_([t.image_id for t in tasks]))
            )
        }
        already_present = 0
        to_reopen: list[tuple[TaskRequest, AnnotationTask]] = []
        to_push: list[TaskRequest] = []
        for task in tasks:
            row = mapped.get(task.image_id)
            if row is not None and row.external_project_id == str(ls_project_id):
                already_present += 1
                if task.reason in ASKED_AGAIN_REASONS:
                    to_reopen.append((task, row))
                else:
                    reached.add(task.image_id)
            else:  # never pushed, or pushed to a Label Studio project that is gone
                to_push.append(task)
        not_reopened: list[str] = []
        predictions_sent = False
        skips_count = self._skips_count(client, ls_project_id) if to_reopen else False
        for task, row in to_reopen:
            # one task per image: a suspect labeled here is asked again in its own task (see lsc.reopen_task)
            once = ({"reason": task.reason, "relabel_of": task.current_label} if task.current_label is not None and task.reason != "answer_rejected"
                    # a refused answer's question is asked again once per refusal: the round makes it a new reopening (review:
                    # with the label alone the second refusal's reopening looked done, and the question stayed closed)
                    else {"reason": task.reason, "relabel_round": round_number,
                          **({"relabel_of": task.current_label} if task.current_label is not None else {})})
            prediction = self._prediction(task, project=project, model_version=model_version)
            try:
                if lsc.reopen_task(client, task_id=int(row.external_task_id), once=once, skips_count=skips_count,
                                   data_updates=self._relabel_data(task, round_number=round_number), prediction=prediction):
                    report.reopened += 1
                    predictions_sent = predictions_sent or prediction is not None
                reached.add(task.image_id)  # reopened now, or earlier (its marker is there), or never answered: asked
            except ApiError as error:
                if error.status_code == 404:  # deleted in Label Studio: a new task asks instead
                    already_present -= 1
                    to_push.append(task)
                    continue
                not_reopened.append(f"image {task.image_id} (task {row.external_task_id}: {_describe(error)})")
            except httpx.HTTPError as error:
                not_reopened.append(f"image {task.image_id} (task {row.external_task_id}: {_describe(error)})")
        if not_reopened:
            # pending: not in `reached`, so retried next round (a reopened task is not reopened twice)
            warnings.append(f"could not ask again about {len(not_reopened)} suspected label errors in Label Studio: {'; '.join(not_reopened[:5])}"
                            f"{'; ...' if len(not_reopened) > 5 else ''}; retried next round")
        report.already_present = already_present
        if not to_push:
            return predictions_sent

        # A crash between import and commit would leave tasks in Label Studio that the store does not know:
        # adopt them by the image kept in each task's data instead of importing a duplicate. Only this store's task of
        # this very image: its key (a task pushed before keys were kept has none) and the image's content hash.
        key = project_key(project)
        in_label_studio = {
            (data.get("defect_loop_project"), data.get("defect_loop_image_id"), data.get("sha256")): entry["task_id"]
            for entry in lsc.list_task_data(client, project_id=ls_project_id)
            for data in [entry["data"]] if data.get("defect_loop_key") in (key, None)
        }
        new_tasks: list[tuple[TaskRequest, dict[str, Any]]] = []
        storage_dirs: dict[str, bool] = {}
        unshowable: list[str] = []  # TIFF or wide images shown as they are: no display copy under the document root
        for task in to_push:
            adopted = in_label_studio.get((project.name, task.image_id, task.sha256))
            if adopted is not None:
                self._map(session, mapped, task.image_id, ls_project_id, adopted)
                already_present += 1
                reached.add(task.image_id)
                continue
            path = self._shown_image(task, project=project, unshowable=unshowable)
            try:
                image_url = lsc.local_files_url(path, document_root=self.document_root)
            except ValueError:
                warnings.append(
                    f"image {path} is outside Label Studio's document root {self.document_root}: set "
                    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (server and loop) to a folder that contains it"
                )
                continue
            directory = os.path.dirname(path)
            if directory not in storage_dirs:
                try:
                    lsc.ensure_local_storage(client, project_id=ls_project_id, path=directory)
                    storage_dirs[directory] = True
                except ApiError as error:
                    storage_dirs[directory] = False
                    warnings.append(f"Label Studio refused a local-files storage for {directory}: {_describe(error)}")
            if not storage_dirs[directory]:
                continue
            new_tasks.append((task, self._task_payload(task, project=project, image_url=image_url, round_number=round_number, model_version=model_version)))

        task_ids = lsc.import_tasks_with_predictions(client, project_id=ls_project_id, tasks=[payload for _, payload in new_tasks])
        if unshowable:  # the loop reads them; the annotator's browser cannot, or not as the model sees them
            warnings.append(f"{len(unshowable)} images pushed are TIFF files or have 16-bit or float pixels (e.g. {unshowable[0]}), which "
                            "browsers, and so Label Studio's editor, show broken or dark, and their PNG copies could not be made in "
                            f"{self.display_dir(project)} under Label Studio's document root {self.document_root}")
        for (task, _payload), task_id in zip(new_tasks, task_ids):
            self._map(session, mapped, task.image_id, ls_project_id, task_id)
            reached.add(task.image_id)
        session.flush()
        report.pushed, report.already_present = len(task_ids), already_present
        return predictions_sent or any("predictions" in payload for _, payload in new_tasks)

    def display_dir(self, project: Project) -> Path:
        """Where PNG copies of images a browser cannot show as the model sees them are kept: the project folder's
        cache (the folder this command runs on; the store's root_dir is where the project was made)."""
        return (self.project_dir or Path(project.root_dir)) / "cache" / "label_studio_display"

    def _shown_image(self, task: TaskRequest, *, project: Project, unshowable: list[str]) -> str:
        """The file annotators are shown: the image itself, or for a TIFF (no browser shows one) or 16-bit or float
        pixels (shown dark, or not at all) a PNG of what the model sees (modeling.preprocessing.to_rgb), made once per
        content hash in display_dir, which must lie under Label Studio's document root (else the image itself, listed
        in `unshowable`)."""
        from PIL import Image as PILImage

        from modeling.preprocessing import decode_key, pixel_depth, to_rgb

        path = os.path.abspath(task.image_path)
        tiff = os.path.splitext(path)[1].lower() in (".tif", ".tiff")
        try:
            with PILImage.open(path) as image:
                if not tiff and pixel_depth(image) is None:
                    return path
                shown = self.display_dir(project) / f"{task.sha256}-{decode_key(self.bit_depth)}.png"  # another decoding: another copy
                lsc.local_files_url(str(shown), document_root=self.document_root)  # ValueError: not under the root
                if not shown.is_file():
                    shown.parent.mkdir(parents=True, exist_ok=True)
                    partial = shown.with_suffix(f".{os.getpid()}.tmp")
                    try:
                        to_rgb(image, bit_depth=self.bit_depth).save(partial, format="PNG")
                        os.replace(partial, shown)
                    finally:
                        partial.unlink(missing_ok=True)
                return str(shown)
        except Exception:  # noqa: BLE001 - a copy is a courtesy: unreadable, damaged (SyntaxError), a pixel bomb, no room
            unshowable.append(path)
            return path

    def _tasks_of(self, session: Session, *, ls_project_id: int, image_ids: set[int]) -> dict[int, int]:
        """image id -> its task in this Label Studio project, as the store maps them."""
        return {row.image_id: int(row.external_task_id) for row in session.scalars(select(AnnotationTask).where(
            AnnotationTask.backend == self.name, AnnotationTask.external_project_id == str(ls_project_id))) if row.image_id in image_ids}

    def _tasks_showing(self, session: Session, *, ls_project_id: int, live: Mapping[int, Mapping[str, Any]], image_ids: set[int]) -> dict[int, int]:
        """_tasks_of, only tasks still there and still showing that image (a task deleted there fails a request naming
        it, and its id may have been given to another image's task since)."""
        return {image_id: task_id for image_id, task_id in self._tasks_of(session, ls_project_id=ls_project_id, image_ids=image_ids).items()
                if (live.get(task_id) or {}).get("defect_loop_image_id") == image_id}

    def _forget_deleted_tasks(self, client, session: Session, report: PushReport, *, ls_project_id: int,  # noqa: ANN001
                              live: Mapping[int, Mapping[str, Any]], image_ids: set[int]) -> None:
        """Tasks still waiting for an answer that were deleted in Label Studio (or whose id now shows another image),
        or whose whole Label Studio project was deleted: the store forgets them (report.gone_image_ids), so the
        image's next push makes a new task instead of counting a task nobody can see as asked."""
        gone: list[AnnotationTask] = []
        elsewhere: dict[str, list[AnnotationTask]] = defaultdict(list)  # tasks in an earlier Label Studio project of this store
        for row in session.scalars(select(AnnotationTask).where(AnnotationTask.backend == self.name)):
            if row.image_id not in image_ids:
                continue
            if row.external_project_id != str(ls_project_id):
                elsewhere[row.external_project_id].append(row)
            elif (live.get(int(row.external_task_id)) or {}).get("defect_loop_image_id") != row.image_id:
                gone.append(row)
        for other_project, rows in elsewhere.items():
            try:
                client.projects.get(id=int(other_project))
            except ApiError as error:
                if error.status_code == 404:  # deleted with all its tasks
                    gone += rows
        for row in gone:
            session.delete(row)
        session.flush()
        report.gone_image_ids |= {row.image_id for row in gone}

    def _refresh_open_tasks(self, client, report: PushReport, *, session: Session, project: Project, ls_project_id: int,
                            live: Mapping[int, Mapping[str, Any]], guesses: Sequence[TaskRequest], model_version: str | None) -> set[int]:
        """This round's guess added to every task that waits for an answer, in requests of REFRESH_CHUNK (report.refreshed
        counts them), and the text beside the image rewritten where the guess it names changed, the image itself where
        its file moved (a folder ingested again from its new place, or read from a copy: the task showed a broken image).
        The ids of the tasks that got it."""
        refreshed: set[int] = set()
        if not guesses or not model_version:
            return refreshed
        task_of = self._tasks_showing(session, ls_project_id=ls_project_id, live=live, image_ids={g.image_id for g in guesses})
        predictions, texts = [], []
        storage_dirs: dict[str, bool] = {}
        stranded: list[str] = []  # moved where Label Studio cannot show them
        for guess in guesses:
            task_id = task_of.get(guess.image_id)
            prediction = self._prediction(guess, project=project, model_version=model_version)
            if prediction is None or task_id is None:
                continue
            predictions.append({"task": task_id, **prediction})
            data = live[task_id]
            fields = {**self._guess_data(guess, data=data), **self._moved_image(client, guess, data=data, project=project, ls_project_id=ls_project_id,
                                                                                  storage_dirs=storage_dirs, stranded=stranded)}
            if any(data.get(key) != value for key, value in fields.items()):
                texts.append((task_id, {**data, **fields}))
        for start in range(0, len(predictions), REFRESH_CHUNK):
            lsc.import_predictions(client, project_id=ls_project_id, predictions=predictions[start:start + REFRESH_CHUNK])
            report.refreshed += len(predictions[start:start + REFRESH_CHUNK])
            refreshed |= {p["task"] for p in predictions[start:start + REFRESH_CHUNK]}
        failed = []
        for task_id, data in texts:  # the old "Model's guess: ..." would contradict what is pre-selected now
            try:
                client.tasks.update(id=str(task_id), data=data)
            except (httpx.HTTPError, ApiError):
                failed.append(task_id)
        if stranded:
            report.warnings.append(f"{len(stranded)} images of waiting tasks moved where Label Studio cannot show them (e.g. {stranded[0]}: "
                                   f"outside its document root {self.document_root}, or a local-files storage it refused): their "
                                   "annotators see a broken image; set LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT to a folder that contains them")
        if failed:
            report.warnings.append(f"could not rewrite the text of {len(failed)} waiting tasks to this round's guess (tasks "
                                   f"{', '.join(map(str, failed[:10]))}): it names an earlier guess until a later round rewrites it")
        return refreshed

    @staticmethod
    def _delete_superseded_predictions(client, report: PushReport, *, listed: Mapping[int, Mapping[str, Any]], refreshed: set[int]) -> None:  # noqa: ANN001
        """A task that waits several rounds got one guess per round: those replaced a round ago or longer are deleted
        (report.superseded_predictions_deleted), not the one just replaced (it may be open in an annotator's editor) nor
        those earlier answers were given under. Only the loop's own (model version round-N), and only on tasks whose
        newer guess is in: a failure leaves a guess too many, never none."""
        stale = []
        for task_id in sorted(refreshed & set(listed)):
            entry = listed[task_id]
            if not any(_is_loop_model_version(p.get("model_version")) for p in entry["predictions"]):
                continue
            # a reopened task's answers: one more request each, only for those (the listing has no answer times)
            try:
                answered_at = lsc.answer_times(client, task_id=task_id) if entry["n_answers"] else []
            except (httpx.HTTPError, ApiError):
                continue  # its guesses stay: one too many, tried again next round
            stale += lsc.superseded_predictions(entry["predictions"], answered_at=answered_at, ours=_is_loop_model_version)
        deleted, failed = lsc.delete_predictions(client, prediction_ids=stale)
        report.superseded_predictions_deleted += deleted
        if failed:
            report.warnings.append(f"could not delete {len(failed)} earlier guesses of tasks still waiting for an answer (predictions "
                                   f"{', '.join(map(str, failed[:10]))}): they stay listed under the task, the current guess is pre-selected anyway")

    def _close_settled(self, client, report: PushReport, *, session: Session, ls_project_id: int, image_ids: Sequence[int]) -> None:
        """Reopened tasks whose question the loop now has its answer to are closed again (lsc.close_reopened_task; a task
        that was not reopened is left as it is). One request or two per image: the loop names only newly answered ones."""
        if not image_ids:
            report.settled_done, report.unsettled_image_ids = True, set()
            return
        failed, unsettled = [], set()
        tasks = self._tasks_of(session, ls_project_id=ls_project_id, image_ids=set(image_ids))
        skips_count = self._skips_count(client, ls_project_id) if tasks else False
        for image_id, task_id in tasks.items():
            try:
                report.closed += int(lsc.close_reopened_task(client, task_id=task_id, image_id=image_id, skips_count=skips_count))
            except ApiError as error:
                if error.status_code != 404:  # a task deleted in Label Studio has nothing to close
                    failed.append(task_id)
                    unsettled.add(image_id)
            except httpx.HTTPError:
                failed.append(task_id)
                unsettled.add(image_id)
        report.settled_done, report.unsettled_image_ids = not failed, unsettled
        if failed:
            report.warnings.append(f"could not close {len(failed)} reopened tasks whose question is answered (tasks {', '.join(map(str, failed[:10]))}); "
                                   "retried next round")

    @staticmethod
    def _skips_count(client, ls_project_id: int) -> bool:  # noqa: ANN001
        """Whether the project counts skips against a task's overlap; unreadable now: Label Studio's default (it does not)."""
        try:
            return lsc.skips_count_against_overlap(client, project_id=ls_project_id)
        except (ApiError, httpx.HTTPError):
            return False

    def _withdraw_tasks(self, client, report: PushReport, *, session: Session, ls_project_id: int, image_ids: set[int]) -> None:  # noqa: ANN001
        """The waiting tasks of `image_ids` (images whose file was quarantined) deleted, unless an answer came in since
        the pull (the next pull records it; the image stays out of training while quarantined); a skip is no answer.
        The store forgets each task taken away, as one deleted in Label Studio: the image, should its file come back, is
        asked in a new task if selected again. Images without a task in this project have nothing to take away.
        report.withdrawn_image_ids: those no annotator can answer now."""
        if not image_ids:
            return
        tasks = self._tasks_of(session, ls_project_id=ls_project_id, image_ids=image_ids)
        report.withdrawn_image_ids |= image_ids - set(tasks)
        failed: set[int] = set()
        for image_id, task_id in tasks.items():
            try:
                outcome = lsc.withdraw_unanswered_task(client, task_id=task_id, image_id=image_id)
            except (httpx.HTTPError, ApiError):
                failed.add(image_id)
                continue
            if outcome == "answered":  # its ask stays: the pull records the answer
                continue
            report.withdrawn_tasks += int(outcome == "deleted")
            report.withdrawn_image_ids.add(image_id)
            for row in session.scalars(select(AnnotationTask).where(AnnotationTask.backend == self.name, AnnotationTask.image_id == image_id,
                                                                    AnnotationTask.external_task_id == str(task_id))):
                session.delete(row)
        session.flush()
        if failed:
            report.warnings.append(f"could not take {len(failed)} waiting tasks of quarantined images from the annotators: they show a broken or "
                                   "changed picture until a later round takes them away")

    def _document_root_changed(self, project: Project) -> bool:
        """Label Studio serves images from another folder than the one the store's tasks were linked for."""
        return any(info.get("document_root") not in (None, self.document_root) for info in _known_projects(project).values())

    def _relink_after_root_change(self, client, report: PushReport, *, session: Session, project: Project, ls_project_id: int) -> None:  # noqa: ANN001
        """Every task's image link rewritten, answered tasks too, when the document root differs from the one the store
        recorded for this Label Studio project: a link is the path relative to the root, and a reviewer opening an
        answered task saw a broken image (QA; waiting tasks were relinked by _refresh_open_tasks only when their file
        moved). The root is recorded once every task is linked; a failure leaves it to the next push."""
        recorded = _known_projects(project).get(str(ls_project_id), {}).get("document_root")
        if recorded == self.document_root:
            return
        if recorded is not None:
            # (task, its image id) for the tasks that name one of the loop's images
            listed = [(entry, int(raw_id)) for entry in lsc.list_task_data(client, project_id=ls_project_id)
                      if str(raw_id := entry["data"].get("defect_loop_image_id", "")).isdigit()]
            ids = sorted({image_id for _entry, image_id in listed})
            images: dict[int, Image] = {}
            for start in range(0, len(ids), 500):  # a bounded IN list per statement
                images.update({image.id: image for image in session.scalars(select(Image).where(Image.id.in_(ids[start:start + 500])))})
            storage_dirs: dict[str, bool] = {}
            stranded: list[str] = []
            failed: list[int] = []
            for entry, image_id in listed:
                image = images.get(image_id)
                if image is None or image.project_id != project.id:
                    continue
                shown = TaskRequest(image_id=image.id, image_path=image.path, sha256=image.sha256, reason=str(entry["data"].get("reason") or ""))
                fields = self._moved_image(client, shown, data=entry["data"], project=project, ls_project_id=ls_project_id,
                                           storage_dirs=storage_dirs, stranded=stranded, root_changed=True)
                if not fields:
                    continue
                try:
                    client.tasks.update(id=str(entry["task_id"]), data={**entry["data"], **fields})
                    report.relinked_tasks += 1
                except (httpx.HTTPError, ApiError):
                    failed.append(entry["task_id"])
            if stranded:
                report.warnings.append(f"{len(stranded)} images of tasks are outside Label Studio's new document root {self.document_root} "
                                       f"(e.g. {stranded[0]}): their tasks show a broken image")
            if failed:
                report.warnings.append(f"Label Studio's document root changed from {recorded} to {self.document_root}, and {len(failed)} tasks "
                                       f"could not be linked to it (tasks {', '.join(map(str, failed[:10]))}): the next push tries again")
                return
        _remember_document_root(project, ls_project_id, self.document_root)

    def _moved_image(self, client, guess: TaskRequest, *, data: Mapping[str, Any], project: Project, ls_project_id: int,  # noqa: ANN001
                     storage_dirs: dict[str, bool], stranded: list[str], root_changed: bool = False) -> dict[str, Any]:
        """The image fields of a waiting task whose file is elsewhere now, or {}: unchanged, or not showable from there
        (named in `stranded`). Cheap for the unchanged (every waiting task, every round): a display copy is named by the
        content hash, so a task showing one never needs another; a task showing the file's own path is compared as is.
        root_changed: the document root moved, so every link is computed afresh (a display copy's too)."""
        current = str(data.get(lsc.IMAGE_NAME) or "")
        if f"label_studio_display/{guess.sha256}" in current and not root_changed:
            return {}
        try:
            if current == lsc.local_files_url(os.path.abspath(guess.image_path), document_root=self.document_root):
                return {}
        except ValueError:
            pass
        path = self._shown_image(guess, project=project, unshowable=[])
        try:
            url = lsc.local_files_url(path, document_root=self.document_root)
        except ValueError:
            stranded.append(path)
            return {}
        if current == url:
            return {}
        directory = os.path.dirname(path)
        if directory not in storage_dirs:
            try:
                lsc.ensure_local_storage(client, project_id=ls_project_id, path=directory)
                storage_dirs[directory] = True
            except ApiError:
                storage_dirs[directory] = False
        if not storage_dirs[directory]:
            stranded.append(path)
            return {}
        return {lsc.IMAGE_NAME: url, "file_name": os.path.basename(guess.image_path)}

    @staticmethod
    def _guess_data(guess: TaskRequest, *, data: Mapping[str, Any]) -> dict[str, Any]:
        """A waiting task's text and guess field for this round's guess; why it was picked stays as pushed. No round and no
        score in the text: the task is rewritten only when the guess it names changes."""
        # without the score too: it moves a point or two every round, and each change costs a request per task
        shown = replace(guess, reason=str(data.get("reason") or guess.reason), current_label=data.get("current_label"), prediction_score=None,
                        probabilities={})
        text = why_text(shown, round_number=None)
        if data.get("relabel_round") is not None or data.get("relabel_of") is not None:
            text = _asked_again(text, shown.reason)
        return {lsc.WHY_NAME: text, "predicted_label": guess.predicted_label, "prediction_score": None}  # the first push's score would contradict

    def _map(self, session: Session, mapped: dict[int, AnnotationTask], image_id: int, ls_project_id: int, task_id: int) -> None:
        row = mapped.get(image_id)
        if row is None:
            row = AnnotationTask(backend=self.name, image_id=image_id)
            session.add(row)
            mapped[image_id] = row
        row.external_project_id = str(ls_project_id)
        row.external_task_id = str(task_id)

    def _task_payload(
        self, task: TaskRequest, *, project: Project, image_url: str, round_number: int | None, model_version: str | None
    ) -> dict[str, Any]:
        data = {
            lsc.IMAGE_NAME: image_url,
            lsc.WHY_NAME: why_text(task, round_number=round_number),
            "defect_loop_project": project.name,
            "defect_loop_key": project_key(project),
            "defect_loop_image_id": task.image_id,
            "sha256": task.sha256,
            "file_name": os.path.basename(task.image_path),
            "reason": task.reason,
            "current_label": task.current_label,
            "predicted_label": task.predicted_label,
            "prediction_score": _prediction_score(task),
            "round": round_number,
        }
        payload: dict[str, Any] = {"data": data}
        prediction = self._prediction(task, project=project, model_version=model_version)
        if prediction is not None:
            payload["predictions"] = [prediction]
        return payload

    @staticmethod
    def _prediction(task: TaskRequest, *, project: Project, model_version: str | None) -> dict[str, Any] | None:
        """The model's guess as a pre-annotation; None without a model (cold start) or for a label the project lacks."""
        if task.predicted_label is None or task.predicted_label not in project.classes:
            return None
        prediction: dict[str, Any] = {"result": lsc.choice_result(task.predicted_label)}
        if model_version:
            prediction["model_version"] = model_version
        score = _prediction_score(task)
        if score is not None:
            prediction["score"] = score
        return prediction

    @staticmethod
    def _relabel_data(task: TaskRequest, *, round_number: int | None) -> dict[str, Any]:
        """What an answered task's data becomes when its label is questioned: the annotator reads why."""
        return {
            lsc.WHY_NAME: _asked_again(why_text(task, round_number=round_number), task.reason),
            "reason": task.reason, "current_label": task.current_label, "predicted_label": task.predicted_label,
            "prediction_score": _prediction_score(task), "relabel_round": round_number,
        }

    # ------------------------------------------------------------------------------------------------ pull

    def pull(self, *, session: Session, project: Project, round_id: int | None) -> PullReport:
        """Every answer in Label Studio since the last pull -> label events; deletions and skips too.

        Unreachable: a warning, nothing recorded (the next pull catches up). A refused token raises
        LabelStudioAuthError, naming the setting.
        """
        report = PullReport()
        recorder = AnnotationRecorder(session=session, project=project, backend=self.name, round_id=round_id, report=report)
        try:
            client = self.client()  # even with nothing pushed yet: a wrong token fails the round's first step
        except lsc.LabelStudioUnavailable as error:
            report.warnings.append(f"{error}; its answers are pulled at the next round")
            return report
        if not recorder.task_to_image:
            report.details["labelstudio"] = {"tasks": 0}
            return report
        try:
            emails = lsc.user_emails(client)
        except (httpx.HTTPError, ApiError):
            emails = {}
        listed_projects: list[str] = []
        predicted_by_annotation: dict[str, list[str]] = {}
        seen: set[str] = set()
        for ls_project_id in sorted(recorder.ls_projects):
            try:
                identity = self._identity(client, project, int(ls_project_id))
                rows = lsc.list_annotated_tasks(client, project_id=int(ls_project_id)) if identity == "ours" else []
            except (httpx.HTTPError, ApiError) as error:
                report.warnings.append(f"could not list answers of Label Studio project {ls_project_id} ({_describe(error)}); retried next pull")
                continue
            if identity == "gone":  # retired now, not at the push: its waiting asks go out in this round's push (they
                # waited a round more when the push found it gone, after the round had chosen what to ask)
                said = len(report.warnings)
                self._retire_project(session, project, int(ls_project_id), warnings=report.warnings)
                if len(report.warnings) > said:  # the retirement's own line says what became of its tasks (QA: two lines)
                    report.warnings[said] = f"Label Studio project {ls_project_id} is gone (deleted there, or another server answers at {self.url}): " + \
                        report.warnings[said].split("): ", 1)[-1]
                else:
                    report.warnings.append(f"Label Studio project {ls_project_id} is gone (deleted there, or another server answers at "
                                           f"{self.url}): the answers recorded from it stay labels")
                recorder.drop_retired()
                continue
            # an id the store knows may name another project now (a server reinstalled or replaced: its ids started
            # over), or show other images in its tasks (an older store that never recorded the project's creation
            # time): its answers are not this store's, and what it lacks is no deletion
            shows_other_images = _shows_other_images(recorder, ls_project_id, rows)
            if identity == "other" or shows_other_images:
                why = (f"its tasks {', '.join(map(str, shows_other_images[:5]))} show other images than the store's tasks of those ids" if shows_other_images
                       else "another project has its id now")
                report.warnings.append(f"Label Studio project {ls_project_id} is not the one this store pushed to ({why}: the server at {self.url} was "
                                       "reinstalled or replaced?): none of its answers is read; the next push moves on to a project of the store's own")
                self._retire_project(session, project, int(ls_project_id), warnings=report.warnings)
                recorder.drop_retired()
                continue
            listed_projects.append(ls_project_id)
            for row in sorted(rows, key=lambda r: (r["task_id"], r["updated_at"] or "", r["annotation_id"])):
                seen.add(str(row["annotation_id"]))
                predicted_by_annotation[str(row["annotation_id"])] = row.get("predicted") or []
                recorder.record_annotation(row, ls_project_id=ls_project_id)
        # Whatever we recorded as live but Label Studio no longer has was deleted there.
        for external_id in recorder.live_external_ids(ls_projects=listed_projects):
            if external_id not in seen:
                recorder.record_delete(external_id, why="no longer in Label Studio")
        report.details["labelstudio"] = {
            "tasks": len(recorder.task_to_image),
            "annotations_listed": len(seen),
            "annotators": {annotator_name(uid): email for uid, email in sorted(emails.items())},
            **recorder.counts,
            # answers naming a class renamed away (submitted drafts saved before the rename): taken as its new name
            RENAMED_ON_THE_WAY_IN: recorder.counts.get(RENAMED_ON_THE_WAY_IN, 0),
        }
        report.details["agreement"] = agreement_summary(
            session, project_id=project.id, image_ids=set(recorder.task_to_image.values()),
            answers=recorder.live_answers(), predicted=predicted_by_annotation,
        )  # fmt: skip
        return report

    # ------------------------------------------------------------------------------------------------ classes

    def record_answers_before_rename(self, *, session: Session, project: Project, old: str, new: str) -> int:
        """Before rename_class rewrites Label Studio's answers, the ones saved since the last pull go into the store as
        they are (a changed answer, or the same one saved again: a confirmation), or the rewrite would hide them. Not
        the answers an earlier, failed rename already rewrote (now `new`, saved by this token's user, recorded as
        `old`): those are the rename's, not their annotators'. Run in its own transaction, committed before the
        rewrite. How many answers were recorded; raises like rename_class, before anything is changed."""
        client, own_user_id = self._renaming_client()
        recorder = AnnotationRecorder(session=session, project=project, backend=self.name, round_id=None)
        for ls_project_id in self._task_projects(session, project):
            try:
                if self._identity(client, project, ls_project_id, remember=False) != "ours":  # not the store's: the next round retires it
                    continue
                rows = lsc.list_annotated_tasks(client, project_id=ls_project_id)
                if _shows_other_images(recorder, str(ls_project_id), rows):
                    continue
            except ApiError as error:
                if error.status_code == 404:  # deleted there: rename_class passes it over
                    continue
                raise lsc.LabelStudioError(f"could not list Label Studio's answers ({_describe(error)}); nothing was renamed") from error
            except httpx.HTTPError as error:
                raise lsc.LabelStudioError(f"could not list Label Studio's answers ({_describe(error)}); nothing was renamed") from error
            for row in rows:
                previous = recorder.latest.get(str(row["annotation_id"]))
                rewritten_before = (own_user_id is not None and row.get("updated_by") == own_user_id and row["choices"] == [new]
                                    and previous is not None and previous.label == old)
                if not rewritten_before:
                    recorder.record_annotation(row, ls_project_id=str(ls_project_id))
        return recorder.report.new_label_events

    def rename_class(self, *, session: Session, project: Project, old: str, new: str) -> ClassRenamed:
        """A class renamed in loop.toml, in Label Studio: every answer, guess, reopened task's question and annotator's
        draft in the Label Studio projects holding this project's tasks names `new` instead of `old` (lsc.rename_choice).
        A draft saved with `old` after this (an editor left open) becomes an answer the pull takes as `new`
        (store.queries.renamed_classes). Writes nothing to the store: record_class_rename does, once the store's own
        answers are renamed, so a failure here leaves the store as it was (running it again finishes the rest). A project deleted in Label Studio is passed over.

        Raises a LabelStudioError: before anything is changed (not configured, unreachable, token refused), or when
        Label Studio failed part-way."""
        client, own_user_id = self._renaming_client()
        renamed = ClassRenamed()
        for ls_project_id in self._task_projects(session, project):
            try:
                if self._identity(client, project, ls_project_id, remember=False) == "other":  # its id names another project now
                    renamed.projects_gone.append(ls_project_id)
                    continue
                done = lsc.rename_choice(client, project_id=ls_project_id, old=old, new=new, own_user_id=own_user_id)
            except ApiError as error:
                if error.status_code == 404:  # deleted there with its tasks: nothing left to rename
                    renamed.projects_gone.append(ls_project_id)
                    continue
                raise self._rename_failed(error, old=old, new=new, ls_project_id=ls_project_id) from error
            except httpx.HTTPError as error:
                raise self._rename_failed(error, old=old, new=new, ls_project_id=ls_project_id) from error
            renamed.saved.update(done.saved)
            renamed.answers += done.answers
            renamed.predictions += done.predictions
            renamed.tasks += done.tasks
            renamed.drafts += done.drafts
        return renamed

    def _renaming_client(self) -> tuple[Any, int | None]:
        """The client and its token's user id, or a LabelStudioError saying nothing was renamed."""
        try:
            client = self.client()
            return client, lsc.own_user_id(client)
        except lsc.LabelStudioError as error:  # not configured, unreachable, token refused
            raise type(error)(f"{error}; nothing was renamed") from error
        except (httpx.HTTPError, ApiError) as error:
            raise lsc.LabelStudioError(f"Label Studio did not say who its token is ({_describe(error)}); nothing was renamed") from error

    @staticmethod
    def _rename_failed(error: BaseException, *, old: str, new: str, ls_project_id: int) -> lsc.LabelStudioError:
        return lsc.LabelStudioError(f"Label Studio failed while renaming {old!r} to {new!r} in its project {ls_project_id} ({_describe(error)}); "
                                    "nothing in the store was renamed, and what Label Studio renamed already stays renamed: run the same "
                                    "command again to finish")

    def _task_projects(self, session: Session, project: Project) -> list[int]:
        """The Label Studio projects the store's tasks are in."""
        return sorted({int(p) for p in session.scalars(
            select(AnnotationTask.external_project_id).join(Image, Image.id == AnnotationTask.image_id)
            .where(AnnotationTask.backend == self.name, Image.project_id == project.id, AnnotationTask.external_project_id.is_not(None)).distinct())})

    def record_class_rename(self, *, session: Session, project: Project, renamed: ClassRenamed) -> None:
        """After rename_class and the store's own rename: each answer Label Studio now holds as saved by us gets that save
        time in the store's record of it, so the next pull takes it as known, not as its annotator saving the answer
        again (a confirmation). Not when Label Studio held a save the store had not pulled before ours: the next pull
        then still compares the answer with the record (a confirmation, or a changed answer, is kept)."""
        latest = AnnotationRecorder(session=session, project=project, backend=self.name, round_id=None).latest  # per answer id
        for answer_id, (before, after) in renamed.saved.items():
            event = latest.get(str(answer_id))
            if event is None:
                continue
            before, after = lsc.as_utc(before), lsc.as_utc(after)
            recorded = lsc.as_utc(event.external_updated_at)
            unpulled = before is not None and (recorded is None or before - recorded > timedelta(milliseconds=1))
            if after is not None and not unpulled:
                event.external_updated_at = after

    def project_for_tasks(self, *, session: Session, project: Project, report: PushReport | None = None,
                          carry_webhook: bool = True) -> tuple[int, list[str]]:
        """ensure_project outside a push (`loop labelstudio webhook`, `loop rename-class`): the Label Studio project id
        and the warnings of the way there (also in `report`, kept when a later request fails). A project found no
        longer the store's is retired as the pull does it, said, and the images whose task there waited are asked again
        at the next round (no push follows here)."""
        report = report if report is not None else PushReport()
        try:
            ls_project_id = self.ensure_project(project, session=session, report=report, carry_webhook=carry_webhook)
        finally:  # a retirement done before a failed request is committed with the caller's session: its asks too
            if report.gone_image_ids:
                requeue_newest_asks(session, project.id, report.gone_image_ids)
                report.gone_image_ids = set()
        return ls_project_id, list(report.warnings)

    def show_classes(self, *, session: Session, project: Project) -> list[str]:
        """The project's classes (project.classes) as the choices annotators see, in the Label Studio project its tasks
        are in (none is made for a project that has no task there yet). Returns warnings: why the choices were kept
        (the next round's push tries again), and a project found no longer the store's (project_for_tasks)."""
        if not self._task_projects(session, project):
            return []
        report = PushReport()
        try:
            return self.project_for_tasks(session=session, project=project, report=report)[1]
        except (httpx.HTTPError, ApiError, lsc.LabelStudioError) as error:
            return [*report.warnings, f"Label Studio kept its choices ({_describe(error)}); the next round's push tries again"]


# ---------------------------------------------------------------------------------------------------------
# recording answers (shared by pull and the webhook)


class AnnotationRecorder:
    """Turns Label Studio annotations into append-only label events, each answer once.

    Known state = the latest event per annotation id (external_id) on the images that have a Label Studio
    task. The save already recorded (same updated_at) -> nothing, whatever it names; the same answer saved again ->
    "confirmed"; changed -> a new event; gone -> action "delete"; skipped -> "skip";
    not a known class (or not one of our tasks) -> a RejectedAnnotation row with the reason.

    A webhook (webhook=True) may arrive late, after the pull recorded a newer state: a save older than the one recorded
    is nothing, and so is any save of an answer deleted in Label Studio (it never reuses an answer id), or one not newer
    than the save that withdrew it (an answer changed into something we cannot use). The pull reads Label Studio's
    current answers: what it lists is recorded whatever its save time (a clock stepped back must not hide a change).
    """

    def __init__(self, *, session: Session, project: Project, backend: str, round_id: int | None, report: PullReport | None = None,
                 map_renamed: bool = True, webhook: bool = False):
        self.session = session
        self.webhook = webhook
        self.project = project
        self.backend = backend
        self.round_id = round_id
        self.report = report if report is not None else PullReport()
        self.counts: dict[str, int] = defaultdict(int)
        # a class renamed away -> the class it means now. Not for a webhook (map_renamed=False): one sent while `loop
        # rename-class` rewrites Label Studio (a rename back: b -> a after a -> b) names a class the store is about to
        # have, and mapping it would record an answer nobody gave; the pull, under the project lock, never sees a rename
        # half done
        self.renamed = renamed_classes(project) if map_renamed else {}
        rows = session.execute(
            select(AnnotationTask.external_project_id, AnnotationTask.external_task_id, AnnotationTask.image_id)
            .join(Image, Image.id == AnnotationTask.image_id)
            .where(AnnotationTask.backend == backend, Image.project_id == project.id)
        ).all()
        self.task_to_image: dict[tuple[str, str], int] = {(str(p), str(t)): image_id for p, t, image_id in rows}
        self.ls_projects: set[str] = {str(p) for p, _t, _i in rows}
        self.project_of_image: dict[int, str] = {image_id: str(p) for p, _t, image_id in rows}
        self.latest: dict[str, LabelEvent] = {}
        image_ids = list(self.project_of_image)
        for start in range(0, len(image_ids), 500):
            for event in session.scalars(
                select(LabelEvent)
                .where(LabelEvent.source == "annotator", LabelEvent.image_id.in_(image_ids[start : start + 500]), LabelEvent.external_id.is_not(None))
                .order_by(LabelEvent.id)
            ):
                self.latest[event.external_id] = event
        # one rejection per saved version of an answer: the reason names the classes of the day, and a class renamed or
        # added since must not reject the same version again
        self._rejected: set[tuple[str, str | None]] = {
            (row.external_id or row.reason, (row.payload or {}).get("updated_at"))
            for row in session.scalars(
                select(RejectedAnnotation).where(RejectedAnnotation.project_id == project.id, RejectedAnnotation.backend == backend)
            )
        }

    def drop_retired(self) -> None:
        """Forget answers whose id was retired since this recorder read them (_retire_project renamed them in the
        store): a new answer given the same id is another answer."""
        for external_id in [key for key, event in self.latest.items() if event.external_id != key]:
            del self.latest[external_id]

    def live_external_ids(self, *, ls_projects: Iterable[str]) -> list[str]:
        wanted = set(ls_projects)
        return [
            external_id
            for external_id, event in self.latest.items()
            if event.action != "delete" and self.project_of_image.get(event.image_id) in wanted and not external_id.startswith(RETIRED_PREFIX)
        ]

    def live_answers(self) -> dict[str, LabelEvent]:
        return {external_id: event for external_id, event in self.latest.items() if event.action == "set"}

    def _append(self, *, image_id: int, external_id: str, action: str, label: str | None, annotator: str, lead_time_s: float | None,
                saved_at: datetime | None = None) -> LabelEvent:
        event = LabelEvent(
            image_id=image_id, label=label, source="annotator", action=action, annotator=annotator,
            external_id=external_id, lead_time_s=lead_time_s, round_id=self.round_id, external_updated_at=saved_at,
        )  # fmt: skip
        self.session.add(event)
        self.latest[external_id] = event
        return event

    def _reject(self, annotation: Mapping[str, Any], reason: str) -> bool:
        external_id = str(annotation.get("annotation_id")) if annotation.get("annotation_id") is not None else None
        key = (external_id or reason, annotation.get("updated_at"))
        if key in self._rejected:
            return False
        self._rejected.add(key)
        rejections = self.report.details.setdefault("rejections", [])
        if len(rejections) < 20:  # the reasons a person reads (loop round, status); every one is a RejectedAnnotation row
            rejections.append(f"answer {external_id} (task {annotation.get('task_id')}): {reason}")
        self.session.add(
            RejectedAnnotation(project_id=self.project.id, backend=self.backend, external_id=external_id, reason=reason, payload=_json_safe(dict(annotation)))
        )
        self.report.rejected += 1
        self.counts["rejected"] += 1
        # An answer changed into something we cannot use withdraws the answer recorded before; the withdrawal keeps the
        # rejected save's time, so a late webhook of a save from before it does not bring the answer back (a delete in
        # Label Studio has none: nothing after it is a live answer)
        previous = self.latest.get(external_id) if external_id else None
        saved_at = lsc.as_utc(annotation.get("updated_at"))
        if previous is not None and previous.action == "set":
            self._append(image_id=previous.image_id, external_id=external_id, action="delete", label=None, annotator=previous.annotator, lead_time_s=None,
                         saved_at=saved_at)
            self.counts["withdrawn"] += 1
        elif previous is not None and previous.action == "delete" and previous.external_updated_at is not None and saved_at is not None \
                and saved_at > as_utc(previous.external_updated_at):
            previous.external_updated_at = saved_at  # withdrawn, and saved unusable again since: the latest save it knows
        return True

    def record_annotation(self, annotation: Mapping[str, Any], *, ls_project_id: str) -> str:
        """One annotation (a list_annotated_tasks row) -> "recorded" | "skip" | "unchanged" | "rejected"."""
        external_id = str(annotation["annotation_id"])
        image_id = self.task_to_image.get((str(ls_project_id), str(annotation["task_id"])))
        if image_id is None:
            self._reject(annotation, f"Label Studio task {annotation['task_id']} of project {ls_project_id} was not pushed by defect-loop")
            return "rejected"
        annotator = annotator_name(annotation.get("completed_by"))
        lead_time = annotation.get("lead_time")
        lead_time = float(lead_time) if isinstance(lead_time, (int, float)) else None
        previous = self.latest.get(external_id)
        saved_at = lsc.as_utc(annotation.get("updated_at"))
        if self.webhook and previous is not None and _late_webhook(previous, saved_at):
            # a save before the one recorded (a webhook Label Studio sent before the pull that recorded a later save, and
            # that arrived after it), or before the answer was deleted or withdrawn: what it says was replaced since,
            # whatever it names, a skip too; recording it would take back the newer answer (bring back a deleted one)
            # until the next pull. Only a webhook: the pull reads what Label Studio holds now
            return "unchanged"
        if annotation.get("was_cancelled"):
            if previous is not None and previous.action == "skip":
                return "unchanged"
            # with its save time, so a late webhook of the answer saved before the skip does not take the skip back
            self._append(image_id=image_id, external_id=external_id, action="skip", label=None, annotator=annotator, lead_time_s=lead_time,
                         saved_at=saved_at)
            self.report.skipped += 1
            self.counts["skipped"] += 1
            return "skip"
        choices = list(annotation.get("choices") or [])
        classes = list(self.project.classes)
        # a class renamed away means its new name (a draft saved before `loop rename-class`, submitted after): the
        # annotator's answer, recorded under them, not a rejection that would ask again and withdraw their answer
        renamed_on_the_way_in = len(set(choices)) == 1 and choices[0] not in classes and choices[0] in self.renamed
        if renamed_on_the_way_in:
            choices = [self.renamed[choices[0]]]
        if not choices:
            reason = "no class chosen (empty result)"
        elif len(set(choices)) > 1:
            reason = f"several classes chosen {choices}: one class per image expected"
        elif choices[0] not in classes:
            same_but_case = class_but_for_case(choices[0], classes)  # QA: 'Crack' for crack
            reason = (f"label {choices[0]!r} is not a class of project {self.project.name!r} (classes: {', '.join(classes)}"
                      + (f"; {same_but_case!r}?" if same_but_case else "") + ")")
        else:
            reason = ""
        if reason:
            return "rejected" if self._reject(annotation, reason) else "unchanged"
        label = choices[0]
        if previous is not None and previous.action == "set" and _same_save(previous, saved_at):
            # the save of this answer already recorded: nothing new, whatever label it names now. An answer taken as its
            # new name on the way in still names the old one in Label Studio, and loop.toml may make that a class again
            return "unchanged"
        # an answer changed in place (the same answer id, another class): counted apart from new answers (QA: "17 new
        # answers" held 2 annotators' corrections, and nothing said so)
        outcome = "changed" if previous is not None and previous.action == "set" and previous.label != label else "recorded"
        if previous is not None and previous.action == "set" and previous.label == label and previous.annotator == annotator:
            if not _saved_again(previous, saved_at):
                return "unchanged"
            # The same answer saved again after it was recorded: the annotator looked at the image again and kept the
            # label. On a task reopened to ask about that label, it is the answer (confirmed), not nothing; with only
            # one annotator, nobody else will ever give one.
            outcome = "confirmed"
        self._append(image_id=image_id, external_id=external_id, action="set", label=label, annotator=annotator, lead_time_s=lead_time,
                     saved_at=saved_at)
        self.report.new_label_events += 1
        self.counts[outcome] += 1
        if renamed_on_the_way_in:
            self.counts[RENAMED_ON_THE_WAY_IN] += 1
        return outcome

    def record_delete(self, external_id: str, *, why: str = "") -> str:
        """An annotation deleted in Label Studio -> action "delete" (once); "unknown" if we never recorded it."""
        previous = self.latest.get(str(external_id))
        if previous is None:
            return "unknown"
        if previous.action == "delete":
            return "unchanged"
        # no save time: a deletion is final for a late webhook (_late_webhook), whenever the save it carries was made
        self._append(image_id=previous.image_id, external_id=str(external_id), action="delete", label=None, annotator=previous.annotator, lead_time_s=None)
        self.report.deleted += 1
        self.counts["deleted"] += 1
        # The same annotator may still have another live answer on this image: it is their vote again.
        for other_id, event in list(self.latest.items()):
            if other_id != str(external_id) and event.image_id == previous.image_id and event.annotator == previous.annotator and event.action == "set":
                self._append(image_id=event.image_id, external_id=other_id, action="set", label=event.label, annotator=event.annotator, lead_time_s=None,
                             saved_at=event.external_updated_at)
                break
        return "deleted"


def agreement_summary(
    session: Session,
    *,
    project_id: int,
    image_ids: set[int],
    answers: Mapping[str, LabelEvent] | None = None,
    predicted: Mapping[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Annotator agreement over the images with a Label Studio task, from the store's current labels.

    agreement = share of an image's annotators who chose its majority label; ties are kept out of training.
    prediction_agreement = share of live answers equal to the model's pre-annotation.
    """
    labels = {image_id: label for image_id, label in current_labels(session, project_id).items() if image_id in image_ids}
    answered = {i: l for i, l in labels.items() if l.source in ("annotator", "oracle") or l.status == "tie"}
    multi = {i: l for i, l in answered.items() if l.n_votes >= 2}
    ties = sorted(i for i, l in answered.items() if l.status == "tie")
    summary: dict[str, Any] = {
        "images_answered": len(answered),
        "images_multi_annotated": len(multi),
        "ties": len(ties),
        "tie_image_ids": ties,
        "mean_agreement": round(mean(l.agreement for l in multi.values()), 4) if multi else None,
        "unanimous_share": round(sum(1 for l in multi.values() if l.agreement == 1.0) / len(multi), 4) if multi else None,
    }
    if answers is not None and predicted is not None:
        compared = [(event.label, predicted[eid]) for eid, event in answers.items() if predicted.get(eid)]
        agree = sum(1 for label, guesses in compared if label in guesses)
        summary["answers_with_prediction"] = len(compared)
        summary["prediction_agreement"] = round(agree / len(compared), 4) if compared else None
    return summary


# ---------------------------------------------------------------------------------------------------------
# webhook


def record_webhook_event(*, session: Session, project: Project, payload: dict) -> dict:
    """Record a Label Studio webhook (ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_DELETED) at once.

    Raises ValueError with the reason when the payload is not such an event, or comes from a Label Studio
    project defect-loop never pushed to (nothing is stored then). An answer naming a label that is not a class is
    deferred to the next pull (outcome "deferred"), which rejects it if it still is none, or takes it as the new name of
    a class `loop rename-class` renamed away: a webhook sent during a rename (a rename back: b -> a after a -> b) names
    a class the store does not have yet, and the pull runs under the project lock, never seeing a rename half done.
    So is an answer last saved by defect-loop's own Label Studio user (_saved_by_the_loop): `loop rename-class`
    rewriting it (a merge names a class the store has: taken at once, the rewrite read as its annotator changing the
    answer); the pull knows the save time the store recorded for each rewrite. Label Studio sends each webhook once:
    `loop round` pulls anyway.
    """
    if not isinstance(payload, Mapping):
        raise ValueError("the payload must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise ValueError("the payload has no 'action'")
    if action not in WEBHOOK_ACTIONS:
        raise ValueError(f"action {action!r} is not recorded; expected one of {', '.join(WEBHOOK_ACTIONS)}")
    ls_project_id = _id_of(payload.get("project"), "project")
    recorder = AnnotationRecorder(session=session, project=project, backend=BACKEND_NAME, round_id=None, map_renamed=False, webhook=True)
    if str(ls_project_id) not in recorder.ls_projects:
        raise ValueError(f"Label Studio project {ls_project_id} is not one defect-loop pushed tasks to for project {project.name!r}")
    result: dict[str, Any] = {"action": action, "label_studio_project": ls_project_id, "outcomes": {}}
    if action == "ANNOTATIONS_DELETED":
        annotations = payload.get("annotations")
        if not isinstance(annotations, list) or not annotations:
            raise ValueError("ANNOTATIONS_DELETED needs a non-empty 'annotations' list")
        for item in annotations:
            annotation_id = _id_of(item, "annotations[]")
            result["outcomes"][str(annotation_id)] = recorder.record_delete(str(annotation_id), why="webhook")
    else:
        annotation = payload.get("annotation")
        if not isinstance(annotation, Mapping):
            raise ValueError(f"{action} needs an 'annotation' object")
        annotation_id = _id_of(annotation, "annotation")
        task = payload.get("task")
        task_id = _id_of(task, "task") if task is not None else _id_of(annotation.get("task"), "annotation.task")
        shown = ((task.get("data") or {}) if isinstance(task, Mapping) and isinstance(task.get("data"), Mapping) else {}).get("defect_loop_image_id")
        mapped = recorder.task_to_image.get((str(ls_project_id), str(task_id)))
        if isinstance(task, Mapping) and isinstance(task.get("data"), Mapping) and mapped is not None and str(shown) != str(mapped):
            # a server reinstalled or replaced gives old ids to new tasks: the next pull retires the store's old project
            raise ValueError(f"Label Studio task {task_id} of project {ls_project_id} shows image {shown}, not the image {mapped} the store pushed in "
                             "a task of that id: not this store's project (a server reinstalled or replaced?); nothing recorded")
        result_items = annotation.get("result", [])
        _check_result(result_items)
        completed_by = annotation.get("completed_by")
        if isinstance(completed_by, Mapping):
            completed_by = completed_by.get("id")
        if completed_by is not None and (isinstance(completed_by, bool) or not isinstance(completed_by, (int, str))):
            raise ValueError("annotation.completed_by must be a user id or an object with one")
        for name in ("created_at", "updated_at"):
            if annotation.get(name) is not None and lsc.as_utc(annotation.get(name)) is None:
                raise ValueError(f"annotation.{name} is not a date and time: {str(annotation.get(name))[:40]!r}")
        row = {
            "task_id": task_id,
            "annotation_id": annotation_id,
            "completed_by": completed_by,
            "lead_time": annotation.get("lead_time"),
            "choices": lsc.result_choices(result_items),
            "result": result_items,
            "was_cancelled": bool(annotation.get("was_cancelled")),
            "created_at": annotation.get("created_at"),
            "updated_at": annotation.get("updated_at"),
        }
        choices = set(row["choices"])
        if _saved_by_the_loop(payload, annotation, completed_by):
            # `loop rename-class` rewriting the answer (merging into a class the store has, or any rename): not its
            # annotator's answer. The pull, under the project lock, finds it recorded with the rewrite's save time once
            # the store's side of the rename is done (or, if the rename failed there, reads it against the store then)
            result["outcomes"][str(annotation_id)] = "deferred"
        elif not row["was_cancelled"] and len(choices) == 1 and not choices <= set(project.classes or []):
            # a class the store does not have (yet): while `loop rename-class` rewrites Label Studio's answers, each arrives
            # naming the new class before the store has it, and rejecting it would withdraw the answer; mapping a name
            # renamed away (a rename back names the class the store is about to have) would record an answer nobody gave.
            # The next pull judges it against the classes and renames then (and rejects it if it still is none).
            result["outcomes"][str(annotation_id)] = "deferred"
        else:
            result["outcomes"][str(annotation_id)] = recorder.record_annotation(row, ls_project_id=str(ls_project_id))
    session.flush()
    result.update(
        recorded=recorder.report.new_label_events, skipped=recorder.report.skipped,
        deleted=recorder.report.deleted, rejected=recorder.report.rejected,
    )  # fmt: skip
    return result


def _user_of(value: Any) -> int | None:
    """A user id as a webhook names it (an id, its digits, or an object with one); None when it names none."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def _saved_by_the_loop(payload: Mapping[str, Any], annotation: Mapping[str, Any], completed_by: Any) -> bool:
    """Whether a webhook's answer was last saved by defect-loop's own Label Studio user (its token's): `loop
    rename-class` rewrites answers through the API, and Label Studio then names that user as the answer's updated_by
    while completed_by stays its annotator. The webhook does not know the token: its user is taken as any user saving
    another's answer (an admin editing it in Label Studio too: the pull records that as well), and as the user who
    created the Label Studio project (defect-loop did, with its token) even when saving an answer of their own (a
    token's user who annotates). A payload naming no updated_by (older Label Studio versions) tells nothing: False."""
    updated_by = _user_of(annotation.get("updated_by"))
    if updated_by is None:
        return False
    project = payload.get("project")
    creator = _user_of(project.get("created_by")) if isinstance(project, Mapping) else None
    return updated_by != _user_of(completed_by) or updated_by == creator


def _check_result(items: Any) -> None:
    """An annotation's result as Label Studio writes it: a list of objects, our Choices control's value an object whose
    `choices` is a list of names (a webhook's body is not trusted to be; other controls are not read)."""
    if not isinstance(items, list):
        raise ValueError("annotation.result must be a list")
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError("annotation.result must be a list of objects")
        if item.get("type") == "choices" and item.get("from_name", lsc.CHOICES_NAME) == lsc.CHOICES_NAME:
            value = item.get("value")
            choices = value.get("choices") if isinstance(value, Mapping) else None
            if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
                raise ValueError("a choices result needs value.choices, a list of names")


def _shows_other_images(recorder: AnnotationRecorder, ls_project_id: str, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Listed tasks whose data shows another image than the store's task of that id (a project that is not the
    store's, under an id the store knows)."""
    return [row["task_id"] for row in rows if (ls_project_id, str(row["task_id"])) in recorder.task_to_image
            and str((row.get("task_data") or {}).get("defect_loop_image_id")) != str(recorder.task_to_image[(ls_project_id, str(row["task_id"]))])]


def _known_projects(project: Project) -> dict[str, dict[str, Any]]:
    """Label Studio project id -> what the store recorded of it (its creation time there)."""
    raw = project.labelstudio_projects if isinstance(project.labelstudio_projects, dict) else {}
    return dict(raw.get("projects") or {})


def _known_retirements(project: Project) -> list[dict[str, Any]]:
    raw = project.labelstudio_projects if isinstance(project.labelstudio_projects, dict) else {}
    return list(raw.get("retired") or [])


def _remember_project(project: Project, ls_project_id: int, created_at: str | None) -> None:
    if created_at is None:
        return
    known = _known_projects(project)
    project.labelstudio_projects = {"projects": {**known, str(ls_project_id): {**known.get(str(ls_project_id), {}), "created_at": created_at}},
                                    "retired": _known_retirements(project)}


def remember_webhook(project: Project, ls_project_id: int, url: str) -> None:
    """The webhook URL registered on a Label Studio project of the store's: carried to the project that replaces it."""
    known = _known_projects(project)
    project.labelstudio_projects = {**(project.labelstudio_projects if isinstance(project.labelstudio_projects, dict) else {}),
                                    "projects": {**known, str(ls_project_id): {**known.get(str(ls_project_id), {}), "webhook_url": url}},
                                    "retired": _known_retirements(project)}


def _remember_document_root(project: Project, ls_project_id: int, document_root: str) -> None:
    """The folder Label Studio served images from when this project's task links were made (relinked when it changes)."""
    known = _known_projects(project)
    project.labelstudio_projects = {"projects": {**known, str(ls_project_id): {**known.get(str(ls_project_id), {}), "document_root": document_root}},
                                    "retired": _known_retirements(project)}


def _created_at(ls_project: Any) -> str | None:
    """A Label Studio project's creation time as one string (the SDK gives a datetime or an ISO string)."""
    when = lsc.as_utc(getattr(ls_project, "created_at", None))
    return when.isoformat() if when is not None else None


def project_key(project: Project) -> str:
    """What tells this defect-loop project from another of the same name (another folder, another store): its name
    and the moment its store created it. Stable when the folder moves or the store is copied (the same project)."""
    created = as_utc(project.created_at)  # SQLite hands it back without a zone, Postgres with one
    stamp = created.strftime("%Y-%m-%dT%H:%M:%S.%f") if created is not None else ""
    return hashlib.sha256(f"{project.name}\n{stamp}".encode()).hexdigest()[:16]


def _same_save(previous: LabelEvent, saved_at: datetime | None) -> bool:
    """Whether `saved_at` is the Label Studio save `previous` recorded (its updated_at, to the millisecond)."""
    recorded = as_utc(previous.external_updated_at)
    return saved_at is not None and recorded is not None and abs(saved_at - recorded) <= timedelta(milliseconds=1)


def _older_save(previous: LabelEvent, saved_at: datetime | None) -> bool:
    """Whether `saved_at` is a Label Studio save from before the one `previous` recorded (more than a millisecond
    earlier). A row without a save time (recorded before the store kept it; a delete) tells nothing: False."""
    recorded = as_utc(previous.external_updated_at)
    return saved_at is not None and recorded is not None and recorded - saved_at > timedelta(milliseconds=1)


def _late_webhook(previous: LabelEvent, saved_at: datetime | None) -> bool:
    """Whether a webhook's save of an answer is older than what the store recorded of it last: a save older than the one
    `previous` recorded (_older_save); any save when `previous` is a deletion in Label Studio (no save time: Label Studio
    never reuses an answer id, and a row recorded before withdrawals kept one is left to the pull too); when it is a
    withdrawal (an answer changed into something we cannot use), any save not newer than the rejected one."""
    if previous.action != "delete":
        return _older_save(previous, saved_at)
    recorded = as_utc(previous.external_updated_at)
    return recorded is None or saved_at is None or saved_at - recorded <= timedelta(milliseconds=1)


def _saved_again(previous: LabelEvent, saved_at: datetime | None) -> bool:
    """Whether Label Studio saved the answer `previous` records again since (its updated_at moved on). A row recorded
    before the store kept that time gets it now: it can only tell the next save."""
    if saved_at is None:
        return False
    if previous.external_updated_at is None:
        previous.external_updated_at = saved_at
        return False
    # later only: a webhook that arrives after the pull that already saw a newer save is not a new one
    return saved_at - as_utc(previous.external_updated_at) > timedelta(milliseconds=1)


def _id_of(value: Any, what: str) -> int:
    raw = value.get("id") if isinstance(value, Mapping) else value
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"'{what}' has no id")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"'{what}' id {raw!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------------------


def _left_pending(count: int) -> str:
    """What a push stopped by Label Studio leaves for the next round (QA: "0 images stay pending" for an empty batch)."""
    return (f"{count} images stay pending and are pushed at the next round" if count
            else "this round's batch had nothing left to push; the rest of the push is retried at the next round")


def _round_number(session: Session, round_id: int | None, batch: list[TaskRequest]) -> int | None:
    if round_id is not None:
        found = session.get(Round, round_id)
        if found is not None:
            return found.number
    numbers = [t.round_number for t in batch if t.round_number is not None]
    return max(numbers) if numbers else None


def _describe(error: BaseException) -> str:
    if isinstance(error, ApiError):
        return f"HTTP {error.status_code}: {lsc._detail(error)}"
    return str(error) or type(error).__name__


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
