"""Read-only queries for the managers' API and dashboard: rounds with metrics and gates, progress series,
label counts by source per round, the label-issue queue and the selection. Nothing here writes.

Label counts of a round are the current labels (the rule of `queries.resolve_label`: annotator consensus
supersedes imports, ties kept out) of the label events that were in the store when the round finished
(a running round: all events so far; a failed round without a finish time: those before it started).
"""
from __future__ import annotations

import math
import statistics
import threading
import weakref
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, load_only, selectinload

from store.models import GateResult, Image, LabelEvent, LabelIssue, Metric, Project, Round, Selection
from store.queries import ANNOTATOR_SOURCES, CurrentLabel, current_labels, renamed_classes, resolve_label, standing_answer_times

LABEL_SOURCES = ("import", "annotator", "oracle")
F1_METRIC_NAMES = ("f1", "f1_score")


@dataclass(frozen=True)
class Page:
    total: int
    items: list[Any]


@dataclass(frozen=True)
class ProjectSummary:
    id: int
    name: str
    classes: list[str]
    negative_class: str | None
    created_at: datetime
    n_images: int
    n_rounds: int
    latest_round_number: int | None


@dataclass(frozen=True)
class RoundSummary:
    id: int
    project_id: int
    number: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    n_gates: int
    n_gates_passed: int
    all_gates_passed: bool | None  # None: no applicable gate recorded
    # A running round only, filled in by the API (the store cannot tell): whether a process still holds the project's
    # lock; False: it was killed and nothing marked it yet. None: not running, or not checked.
    process_alive: bool | None = None
    status_note: str | None = None
    error: str | None = None  # a failed round: why (the step and the exception, or "interrupted ...")


@dataclass(frozen=True)
class LabelCounts:
    by_source: dict[str, int]  # current labels by the source that decided them
    by_class: dict[str, int]
    ties: int  # annotators disagree evenly: kept out of training
    total_labeled: int
    new_events_by_source: dict[str, int]  # label events recorded by this round (LabelEvent.round_id)


@dataclass(frozen=True)
class GateRow:
    name: str
    value: float | None
    threshold: float
    comparison: str
    passed: bool | None
    applicable: bool
    # 90% interval of the value on the test split, photos of one part counted as one draw (FPR and defect recall);
    # settled: the interval lies on one side of the threshold. None: not recorded (other gates, older rounds).
    interval_low: float | None = None
    interval_high: float | None = None
    settled: bool | None = None


@dataclass(frozen=True)
class ConfusionMatrix:
    labels: list[str]
    matrix: list[list[float]]


@dataclass(frozen=True)
class EpochRow:
    """One epoch of fine-tuning; epoch 0 is the network before unfreezing (the head on frozen features)."""

    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_macro_f1: float | None
    seconds: float | None


@dataclass(frozen=True)
class TrainingSummary:
    strategy: str | None
    n_fit: int | None  # labeled images the model learned from
    best_epoch: int | None  # the epoch early stopping kept; None: no epochs (a head on embeddings)
    epochs_run: int  # epochs after epoch 0
    history: list[EpochRow]
    # what the round trained with (augmentation, balance, loss, ...; a head's own options only), what a head left
    # out, and why the kept epoch may mean little (QA: these were only in the store's rounds.details)
    options: dict[str, Any] = field(default_factory=dict)
    options_not_used_by_head: list[str] = field(default_factory=list)
    early_stopping_note: str | None = None


@dataclass(frozen=True)
class CalibrationSummary:
    method: str | None  # "temperature" or "none"
    temperature: float | None
    fitted_on: str | None  # "validation" or "out_of_fold"
    n_images: int | None
    ece_before: float | None
    ece_after: float | None
    reason: str | None  # why a model was left uncalibrated
    nll_before: float | None = None
    nll_after: float | None = None
    # "nll" or "nll_add_one" (no misclassified image where it was fitted: the plain NLL after is higher by design)
    objective: str | None = None
    n_left_out: int | None = None  # out-of-fold images of a class one fold alone held: not fitted on, not measured


@dataclass(frozen=True)
class ThresholdSummary:
    source: str | None  # "validation" or "out_of_fold": never the test split
    out_of_fold_model: str | None  # whose out-of-fold probabilities: "head", or the fine-tuning strategy trained per fold
    n_negatives: int | None  # labeled good parts it was chosen on
    n_defects: int | None
    margin_attainable: bool | None  # False: too few good parts to keep the FPR bound under the gate
    # the loop's own estimate of the gate metrics from the same non-test data (steers selection; the test split reports)
    estimated_metrics: dict[str, float | None]
    # which rule chose it: all_negatives, stratified (good parts picked by active learning weighed apart) or pool
    rule: str | None = None
    n_picked_negatives: int | None = None  # labeled good parts active learning picked (the rest were sampled)
    # "pool": the FPR estimate is over every good part of the pool, labeled or not (stratified); "labeled": the labeled ones
    fpr_estimated_over: str | None = None
    # how the rule got there (QA: the README named rule_threshold, which only the store held): the rule's threshold before
    # the move to the middle of the gap, the Clopper-Pearson (rank) and normal-tail thresholds it blends, the false
    # positives the rank rule allows, and at the deployed threshold the labeled good parts' FPR and its upper bound
    rule_threshold: float | None = None
    rank_threshold: float | None = None
    tail_threshold: float | None = None
    allowed_false_positives: int | None = None
    observed_fpr: float | None = None
    fpr_upper_bound: float | None = None
    estimated_population_fpr: float | None = None
    # stratified rule: sampled good parts above the threshold; the rule forgives one, its estimate counts it
    n_sampled_negatives_above: int | None = None


@dataclass(frozen=True)
class SuspectBatch:
    """An ingest whose labeled training and validation images are suspected label errors far more often than the
    other ingests' (25% or more, 3x theirs, 5 images at least): its labels may be wrong as a whole."""
    ingest_batch_id: int
    source: str | None
    n_judged: int  # its labeled training and validation images
    n_flagged: int
    share_flagged: float | None
    share_flagged_elsewhere: float | None  # in the other ingests
    n_labeled_test: int  # its labeled test images: the test split only reports, nothing checks them


@dataclass(frozen=True)
class LabelQualitySummary:
    n_flagged: int | None  # suspected label errors the round flagged
    noise_rate_per_class: dict[str, float | None]  # P(true label != c | given c); None: too few labels of c
    already_questioned: int | None  # flagged suspects not sent again: asked before with the same label
    suspect_batches: list[SuspectBatch] = field(default_factory=list)
    out_of_fold_balanced_accuracy: float | None = None  # how often the probabilities that judged the labels name them
    weak_model_note: str | None = None  # set when that is low: the suspects are mostly the model's own errors


@dataclass(frozen=True)
class UnmeasuredDefectsBatch:
    """An ingest (or small ingests judged together) whose unlabeled images the model calls defects while the labeled
    test image nearest each of them is a good part: the gates do not measure defects like its own."""
    ingest_batch_id: int
    source: str | None
    n_predicted_defect: int
    ingest_batch_ids: list[int]


@dataclass(frozen=True)
class UnfamiliarBatch:
    """An ingest batch mostly unlike the training labels or the labeled test images (a new camera or product line), or
    small ingests in a row judged together (named by the first)."""
    ingest_batch_id: int
    source: str | None
    n_images: int
    share_unlike_training_labels: float | None  # of the images checked; about 5% for images like the labeled ones
    share_unlike_test_labels: float | None
    unlike_training_labels: bool | None  # the model was not taught images like most of these (None: not checked)
    unlike_test_labels: bool | None  # the gates do not measure them (None: not checked, e.g. too few test labels to compare with)
    n_labeled_train_validation: int
    n_labeled_test: int
    n_unlabeled_test: int  # drawn into the test split, waiting for their label
    n_drawn_into_test: int  # this round
    n_selected_for_training: int | None
    ingest_batch_ids: list[int]  # the batch alone, or the small ingests judged with it


@dataclass(frozen=True)
class BatchTestMetrics:
    """The gate metrics on one ingest batch's labeled test images (or those of small ingests judged together)."""
    ingest_batch_id: int
    source: str | None
    n_images: int
    macro_f1: float | None
    defect_recall: float | None
    negative_fpr: float | None
    accuracy: float | None
    ingest_batch_ids: list[int]
    too_few_images: bool = False  # fewer labeled test images than a batch needs to be gated alone (10): noisy figures
    n_good: int | None = None  # of them, good parts (what its FPR rests on) and defects (its recall); None: not recorded
    n_defects: int | None = None


@dataclass(frozen=True)
class RoundReport:
    summary: RoundSummary
    error: str | None
    metrics: dict[str, float | None]
    per_class: dict[str, dict[str, float | None]]  # class -> metric name -> value
    gates: list[GateRow]
    confusion_matrix: ConfusionMatrix | None
    threshold: float | None
    class_names: list[str] | None
    step_timings_s: dict[str, float]
    artifact_names: list[str]
    label_counts: LabelCounts
    n_label_issues: int  # label errors (the relabel queue); near-duplicates and outliers are counted apart
    n_flagged_label_issues: int
    n_selected: int
    n_near_duplicates: int | None = 0  # images with a pixel-verified near-copy; None: the round did not check
    n_outliers: int | None = 0
    # test images with a near-copy outside the frozen test split (the test metrics are optimistic for them); None: not checked
    n_test_images_with_copy_outside: int | None = None
    # the gate metrics on the test images without such a copy (n_images, n_excluded, macro_f1, defect_recall, negative_fpr, accuracy)
    test_metrics_without_copies: dict[str, int | float | None] | None = None
    cold_start: str | None = None  # why the round trained nothing (only good parts labeled); None: not a cold start
    # the model gave every test image, or every image of the project, one class (its macro F1 gate was set to 0);
    # None: not checked (no model, an older round)
    collapsed: bool | None = None
    training: TrainingSummary | None = None
    calibration: CalibrationSummary | None = None
    label_quality: LabelQualitySummary | None = None
    threshold_choice: ThresholdSummary | None = None
    init_from: InitFromSummary | None = None
    unfamiliar_batches: list[UnfamiliarBatch] | None = None  # None: not checked (an older round)
    test_metrics_by_batch: list[BatchTestMetrics] | None = None  # None: the labeled test images come from one ingest batch
    model_files_deleted: ModelFilesDeleted | None = None  # None: prune deleted none of them (a file deleted by hand is not recorded)
    # near-copies an ingest drew on both sides of the test split, put on one side before any round measured them:
    # moved, into_test, out_of_test, between_train_and_validation; None: nothing moved (or an older round)
    unmeasured_copies_regrouped: dict[str, int] | None = None
    defects_unmeasured: list[UnmeasuredDefectsBatch] | None = None  # None: none named (or an older round)
    # since the previous completed round read them: relabeled, newly_labeled, no_longer_labeled, joined_test_split,
    # left_test_split (None: not recorded)
    test_labels_changed: dict[str, int] | None = None
    # classes of the round with no labeled test image: its macro F1 cannot score them and fails (None: not recorded)
    classes_missing_from_test: list[str] | None = None
    # what the annotators did and were asked, as `loop status --json` has them (QA: the API had none of it)
    pull: dict[str, Any] | None = None
    push: dict[str, Any] | None = None
    ties: dict[str, Any] | None = None
    # how many new images the round could pick: its budget less the earlier picks still waiting (None: not recorded)
    selection_budget: dict[str, int] | None = None


@dataclass(frozen=True)
class ModelFilesDeleted:
    """loop prune (or [loop] keep_model_rounds) deleted the round's model files: which, when, by what, in which folder."""
    files: list[str]
    at: str | None
    by: str | None
    folder: str | None


def model_files_deleted_of(details: dict[str, Any] | None) -> ModelFilesDeleted | None:
    raw = (details or {}).get("model_files_deleted")
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        return None
    return ModelFilesDeleted(files=[str(f) for f in raw["files"]], at=_str_or_none(raw.get("at")), by=_str_or_none(raw.get("by")),
                             folder=_str_or_none(raw.get("folder")))


@dataclass(frozen=True)
class InitFromSummary:
    """Where the project's model started (loop init --init-from): the checkpoint, where it was copied from, and what
    became of the other project's head."""
    checkpoint: str
    source: str | None
    head: str  # transferred or not, and why
    head_used: bool  # the round's network started from it
    backbone: str | None = None  # which backbone: the source project's round, fine-tuned or pretrained (None: rounds before it was recorded)
    test_images_it_learned_from: int | None = None  # labeled test images the source model learned from (None: not recorded)


@dataclass(frozen=True)
class GateSeries:
    name: str
    comparison: str
    threshold: float | None  # the latest recorded threshold, drawn as the chart's line
    values: list[float | None]
    thresholds: list[float | None]
    passed: list[bool | None]
    applicable: list[bool | None]


@dataclass(frozen=True)
class MetricSeries:
    name: str
    class_name: str | None
    values: list[float | None]


@dataclass(frozen=True)
class ProgressSeries:
    project_id: int
    project_name: str
    rounds: list[RoundSummary]
    gates: list[GateSeries]
    metrics: list[MetricSeries]  # overall (class_name None) and per class, aligned with rounds
    labels_by_source: dict[str, list[int]]
    ties: list[int]
    new_label_events_by_source: dict[str, list[int]]
    class_renames: dict[str, str] = field(default_factory=dict)  # old class name -> its name now (queries.renamed_classes)


@dataclass(frozen=True)
class LabelIssueRow:
    id: int
    round_id: int
    image_id: int
    kind: str
    given_label: str | None
    suggested_label: str | None
    score: float
    flagged: bool
    rank: int
    current_label: str | None
    related_image_id: int | None = None  # near_duplicate: the copy; outlier: the nearest image

    @property
    def still_suspect(self) -> bool | None:
        """A label error: whether the suspicion still holds, the label being the one suspected and not the suggested class
        (relabeled since, or the suspected class merged into the suggested one by `loop rename-class`: answered, as the
        export says; QA: a merge left items reading "given free, suggested free" with nothing saying so). None: another kind."""
        if self.kind != "label_error":
            return None
        return self.current_label == self.given_label and self.given_label != self.suggested_label


@dataclass(frozen=True)
class SelectionRow:
    id: int
    round_id: int
    image_id: int
    rank: int
    score: float
    strategy: str
    reason: str
    predicted_label: str | None
    p_defect: float | None
    push_status: str
    pushed_at: datetime | None
    current_label: str | None
    # pushed: whether an annotator's answer (still standing: a deleted one is none) came after the ask; None: not
    # pushed (recorded, pending, withdrawn). QA: a relabel question looked the same before and after its answer
    answered: bool | None = None
    answered_at: datetime | None = None


class _LabelTally:
    """Current label per image, updated one event at a time, with running counts: each round's counts come from
    one pass over the project's events, not one pass per round."""

    def __init__(self, current: dict[int, CurrentLabel] | None = None) -> None:
        self.events_by_image: dict[int, list[Any]] = defaultdict(list)
        self.current: dict[int, CurrentLabel] = {}
        self.by_source: Counter[str] = Counter({source: 0 for source in LABEL_SOURCES})
        self.by_class: Counter[str] = Counter()
        self.ties = 0
        for image_id, label in (current or {}).items():
            self._set(image_id, label)

    def _count(self, label: CurrentLabel, sign: int) -> None:
        if label.status == "labeled" and label.label is not None:
            self.by_source[label.source or "import"] += sign
            self.by_class[label.label] += sign
        elif label.status == "tie":
            self.ties += sign

    def _set(self, image_id: int, label: CurrentLabel) -> None:
        previous = self.current.get(image_id)
        if previous is not None:
            self._count(previous, -1)
        self.current[image_id] = label
        self._count(label, +1)

    def add(self, event: Any) -> None:
        events = self.events_by_image[event.image_id]
        events.append(event)
        self._set(event.image_id, resolve_label(events))

    def counts(self) -> tuple[dict[str, int], dict[str, int], int]:
        by_class = {name: count for name, count in sorted(self.by_class.items()) if count > 0}
        return dict(self.by_source), by_class, self.ties


GATE_METRICS = (("macro_f1", "macro F1"), ("defect_recall", "defect recall"), ("negative_fpr", "FPR"))


def gate_values_text(values: dict[str, Any]) -> str:
    """'macro F1 0.950, defect recall 1.000, FPR 0.020' of a dict holding those metrics (n/a for a missing one)."""
    return ", ".join(f"{label} {'n/a' if values.get(name) is None else format(values[name], '.3f')}" for name, label in GATE_METRICS)


def batch_ids_text(batch_ids: Sequence[int]) -> str:
    """'7', or '7-9, 12' of batches 7, 8, 9 and 12."""
    runs: list[list[int]] = []
    for batch_id in sorted(int(b) for b in batch_ids):
        if runs and batch_id == runs[-1][-1] + 1:
            runs[-1].append(batch_id)
        else:
            runs.append([batch_id])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def ingest_batches_text(batch_ids: Sequence[int]) -> str:
    """'ingest batch 7', or for small ingests judged together 'ingest batches 7-9, 12 (4 small ingests judged together)'."""
    if len(batch_ids) == 1:
        return f"ingest batch {batch_ids_text(batch_ids)}"
    return f"ingest batches {batch_ids_text(batch_ids)} ({len(batch_ids)} small ingests judged together)"


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; the store writes UTC, so naive means UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def round_label_cutoff(round_: Round, *, last_own_event: datetime | None = None) -> datetime | None:
    """The moment whose labels a round's counts show; None: every event so far. A round that ended without finishing
    (killed, and marked failed by the next round) shows its start, or its own newest label event when it recorded any:
    its pull committed them, and its counts of new labels name them, so its totals hold them too."""
    if round_.finished_at is not None:
        return as_utc(round_.finished_at)
    if round_.status == "running":
        return None
    return max((moment for moment in (as_utc(round_.started_at), last_own_event) if moment is not None), default=None)


def _project_label_events(session: Session, project_id: int) -> list[Any]:
    # Plain rows, not ORM objects: the dashboard reads every event of the project on each request.
    query = (
        select(LabelEvent.id, LabelEvent.image_id, LabelEvent.label, LabelEvent.source, LabelEvent.action,
               LabelEvent.annotator, LabelEvent.round_id, LabelEvent.created_at)
        .join(Image, Image.id == LabelEvent.image_id)
        .where(Image.project_id == project_id)
    )
    # Time order, the id breaking ties. The database sorts (SQLite keeps UTC timestamps as ISO text, which sorts as time).
    return list(session.execute(query.order_by(LabelEvent.created_at, LabelEvent.id)))


def _events_by_round(events: Iterable[Any]) -> dict[int, dict[str, int]]:
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for event in events:
        if event.round_id is not None:
            counts[event.round_id][event.source] += 1
    return {round_id: {source: counter.get(source, 0) for source in LABEL_SOURCES} | dict(counter) for round_id, counter in counts.items()}


# session.info key: the file version read just before a read transaction's snapshot (pin_sqlite_file_version)
PINNED_FILE_VERSION = "defect_loop_sqlite_file_version"


def pin_sqlite_file_version(session: Session) -> None:
    """Called as a session begins a read transaction that sees one moment (the API's requests), before its first read:
    sqlite_file_version then answers what the file was then. Read later, a version could be newer than the snapshot
    the reads see, and a cache would keep their older answer under it until the next write."""
    session.info[PINNED_FILE_VERSION] = _sqlite_file_version_now(session)


def sqlite_file_version(session: Session) -> tuple[Any, ...] | None:
    """(size, mtime) of a SQLite store's database file and its write-ahead log: every commit changes one of them.
    A stat is ~1000x cheaper than the aggregate queries that tell the same for other databases; None there. The
    version pinned when the session's reads began, if any (pin_sqlite_file_version): never newer than what they see."""
    if PINNED_FILE_VERSION in session.info:
        return session.info[PINNED_FILE_VERSION]
    return _sqlite_file_version_now(session)


def _sqlite_file_version_now(session: Session) -> tuple[Any, ...] | None:
    url = session.get_bind().url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" or url.database.startswith("file:"):
        return None
    database = Path(url.database)
    version: list[Any] = []
    for path in (database, database.with_name(database.name + "-wal")):
        try:
            stat = path.stat()
            version += [stat.st_size, stat.st_mtime_ns]
        except FileNotFoundError:
            version += [None, None]
    return tuple(version)


class _LabelTimeline:
    """A project's label events in time order, and the label counts at each moment asked for so far."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.times = [as_utc(event.created_at) for event in events]
        self.new_events_by_round = _events_by_round(events)
        self.last_event_at_by_round: dict[int, datetime] = {}  # in time order: the last one written wins
        for event, when in zip(events, self.times):
            if event.round_id is not None and when is not None:
                self.last_event_at_by_round[event.round_id] = when
        self._counts_at: dict[datetime, tuple[dict[str, int], dict[str, int], int]] = {}
        self._lock = threading.Lock()

    def counts_at(self, cutoffs: Iterable[datetime]) -> dict[datetime, tuple[dict[str, int], dict[str, int], int]]:
        cutoffs = set(cutoffs)
        with self._lock:
            missing = sorted(cutoffs - self._counts_at.keys())
            if missing:
                tally = _LabelTally()
                position = 0
                for cutoff in missing:  # one pass over the events for all the moments not seen yet
                    while position < len(self.events) and self.times[position] <= cutoff:
                        tally.add(self.events[position])
                        position += 1
                    self._counts_at[cutoff] = tally.counts()
            return {cutoff: self._counts_at[cutoff] for cutoff in cutoffs}


# Label events are append-only, so (how many, newest id) identifies a project's event log: a timeline is reused
# until an event is added. Keyed by engine (weakly: a disposed app's store is forgotten) and project.
_TIMELINES: weakref.WeakKeyDictionary[Any, dict[int, tuple[tuple[int, int | None], _LabelTimeline]]] = weakref.WeakKeyDictionary()
_TIMELINES_LOCK = threading.Lock()


def _label_timeline(session: Session, project_id: int) -> _LabelTimeline:
    fingerprint = sqlite_file_version(session) or tuple(session.execute(
        select(func.count(LabelEvent.id), func.max(LabelEvent.id)).join(Image, Image.id == LabelEvent.image_id).where(Image.project_id == project_id)
    ).one())
    engine = session.get_bind()
    with _TIMELINES_LOCK:
        cached = _TIMELINES.get(engine, {}).get(project_id)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    timeline = _LabelTimeline(_project_label_events(session, project_id))
    with _TIMELINES_LOCK:
        _TIMELINES.setdefault(engine, {})[project_id] = (fingerprint, timeline)
    return timeline


FAR_FUTURE = datetime.max.replace(tzinfo=timezone.utc)


def label_counts_by_round(session: Session, *, project_id: int, rounds: Sequence[Round]) -> dict[int, LabelCounts]:
    """round id -> label counts (the labels in the store when each round finished), from one pass over the events."""
    timeline = _label_timeline(session, project_id)
    cutoffs = {round_.id: round_label_cutoff(round_, last_own_event=timeline.last_event_at_by_round.get(round_.id)) or FAR_FUTURE
               for round_ in rounds}
    counts = timeline.counts_at(cutoffs.values())
    result: dict[int, LabelCounts] = {}
    for round_ in rounds:
        by_source, by_class, ties = counts[cutoffs[round_.id]]
        result[round_.id] = LabelCounts(
            by_source=dict(by_source),
            by_class=dict(by_class),
            ties=ties,
            total_labeled=sum(by_source.values()),
            new_events_by_source=dict(timeline.new_events_by_round.get(round_.id, {source: 0 for source in LABEL_SOURCES})),
        )
    return result


def current_label_counts(session: Session, *, project_id: int) -> LabelCounts:
    """The project's labels now (queries.current_labels), by source and class."""
    tally = _LabelTally(current=current_labels(session, project_id))
    by_source, by_class, ties = tally.counts()
    return LabelCounts(by_source=by_source, by_class=by_class, ties=ties, total_labeled=sum(by_source.values()),
                       new_events_by_source={})


def _duration_s(round_: Round) -> float | None:
    if round_.finished_at is None:
        return None
    return round((as_utc(round_.finished_at) - as_utc(round_.started_at)).total_seconds(), 3)


def _summary(round_: Round, gates: Sequence[Any] | None = None) -> RoundSummary:
    applicable = [gate for gate in (round_.gates if gates is None else gates) if gate.applicable]
    passed = [gate for gate in applicable if gate.passed]
    return RoundSummary(
        id=round_.id,
        project_id=round_.project_id,
        number=round_.number,
        status=round_.status,
        started_at=as_utc(round_.started_at),
        finished_at=as_utc(round_.finished_at),
        duration_s=_duration_s(round_),
        n_gates=len(applicable),
        n_gates_passed=len(passed),
        all_gates_passed=(len(passed) == len(applicable)) if applicable else None,
        error=round_.error,
    )


def get_project_or_none(session: Session, project_id: int) -> Project | None:
    return session.get(Project, project_id)


def default_project(session: Session) -> Project | None:
    return session.scalars(select(Project).order_by(Project.id)).first()


def list_projects(session: Session, *, limit: int, offset: int) -> Page:
    total = session.scalar(select(func.count(Project.id))) or 0
    projects = list(session.scalars(select(Project).order_by(Project.id).limit(limit).offset(offset)))
    ids = [project.id for project in projects]
    n_images = dict(session.execute(
        select(Image.project_id, func.count(Image.id)).where(Image.project_id.in_(ids)).group_by(Image.project_id)
    ).all())
    round_stats = {row[0]: (row[1], row[2]) for row in session.execute(
        select(Round.project_id, func.count(Round.id), func.max(Round.number)).where(Round.project_id.in_(ids)).group_by(Round.project_id)
    )}
    items = [
        ProjectSummary(
            id=project.id,
            name=project.name,
            classes=[str(name) for name in project.classes or []],
            negative_class=project.negative_class,
            created_at=as_utc(project.created_at),
            n_images=n_images.get(project.id, 0),
            n_rounds=round_stats.get(project.id, (0, None))[0],
            latest_round_number=round_stats.get(project.id, (0, None))[1],
        )
        for project in projects
    ]
    return Page(total=total, items=items)


# What a round summary needs; leaves the JSON columns (details can be large) unread.
_SUMMARY_COLUMNS = load_only(Round.id, Round.project_id, Round.number, Round.status, Round.started_at, Round.finished_at, Round.error)


@dataclass(frozen=True)
class RoundAsks:
    """What a round asked the annotators, by where each ask is now."""
    selected: int  # images the round picked to be labeled (its own batch; older asks it pushed again are their round's)
    pushed: int  # reached the annotation tool
    waiting_to_be_pushed: int  # pending: the tool was down or refused them; the next round pushes them again
    recorded: int  # the annotator is `none`: recorded for people to label elsewhere
    withdrawn: int  # taken back before an answer came (answered meanwhile, file quarantined, moved into the test split)
    answered: int | None = None  # of the pushed ones, those answered since (ask_answer_times); None: not counted
    # why the round picked fewer than its budget: earlier picks still waited (selection_budget_text); None: it did not
    held_back: str | None = None


def asks_by_round(session: Session, *, project_id: int, answered_for: Sequence[int] = ()) -> dict[int, RoundAsks]:
    """Round id -> its asks by push status, in one grouped query (the dashboard's rounds table); for the rounds in
    `answered_for` (ids) also how many of its pushed asks have been answered."""
    counts: dict[int, dict[str, int]] = {}
    for round_id, push_status, n in session.execute(
            select(Selection.round_id, Selection.push_status, func.count(Selection.id)).join(Round, Round.id == Selection.round_id)
            .where(Round.project_id == project_id).group_by(Selection.round_id, Selection.push_status)):
        counts.setdefault(round_id, {})[push_status] = n
    answered: dict[int, int] = {}
    if answered_for:
        rounds = {round_id: _read_time(read_at) for round_id, read_at in session.execute(  # not the whole details
            select(Round.id, Round.details["labels_read_at"].as_string()).where(Round.project_id == project_id, Round.id.in_(list(answered_for))))}
        asks = list(session.scalars(select(Selection).where(Selection.round_id.in_(list(rounds)), Selection.push_status == "pushed")))
        by_ask = {row.id: row.round_id for row in asks}
        answered = dict.fromkeys(rounds, 0)
        for selection_id in ask_answer_times(session, asks, rounds):
            answered[by_ask[selection_id]] += 1
    held_back = {round_id: selection_budget_text(budget) for round_id, budget in session.execute(  # not the whole details
        select(Round.id, Round.details["selection_budget"]).where(Round.project_id == project_id))}
    # (a round that picked nothing because the queue was full has no ask, and its row says why)
    return {round_id: RoundAsks(selected=sum(by.values()), pushed=by.get("pushed", 0),
                                waiting_to_be_pushed=by.get("pending", 0) + by.get("failed", 0), recorded=by.get("recorded", 0),
                                withdrawn=by.get("withdrawn", 0), answered=answered.get(round_id), held_back=held_back.get(round_id))
            for round_id, by in [*counts.items(), *((r, {}) for r, text in held_back.items() if text and r not in counts)]}


def selection_budget_text(budget: Any) -> str | None:
    """A round's selection_budget record as words, when earlier picks still waiting made it pick fewer than its budget
    ("could pick 1 of its budget of 6 new images: of those picked earlier, 4 waited for an answer in the annotators'
    queue; the queue holds at most 5 (queue_limit)"); None when it could pick its whole budget, nothing waited, or it
    did not record it (older rounds)."""
    if not isinstance(budget, dict) or not isinstance(budget.get("budget"), int) or not isinstance(budget.get("budget_per_round"), int):
        return None
    allowed, full = budget["budget"], budget["budget_per_round"]
    in_queue, undelivered = budget.get("waiting_in_annotators_queue") or 0, budget.get("undelivered_from_earlier_rounds") or 0
    if allowed >= full or not (in_queue or undelivered):  # a queue_limit under the budget, nothing waiting: the setting, not the annotators
        return None
    waiting = [f"{in_queue} waited for an answer in the annotators' queue"] if in_queue else []
    waiting += [f"{undelivered} waited to reach them (the annotation tool was down)"] if undelivered else []
    return (f"could pick {allowed} of its budget of {full} new images: of those picked earlier, {' and '.join(waiting)}; "
            f"the queue holds at most {budget.get('queue_limit', full)} (queue_limit)")


@dataclass(frozen=True)
class AnnotatorActivity:
    """One annotator's answers over the project's images (each image counted once, by their answer that stands)."""
    annotator: str  # as the store records them: "labelstudio:<user id>" for Label Studio, "oracle"
    source: str  # annotator (Label Studio) | oracle (simulated)
    answered: int  # images where an answer of theirs gives a class and stands (not deleted; a later skip leaves it standing)
    skipped: int  # images whose newest event by them is a skip
    # answers the newest completed round took in for the first time: saved after the round before it read the labels
    # and before it read them (pulled then, or taken by the webhook in between)
    answered_for_latest_round: int
    # images another annotator answered too: the share where theirs is the image's label now measures agreement;
    # a single annotator's answer is the label by definition and says nothing about them
    shared: int
    agreeing: int  # of `shared`, their answer is the label now
    in_ties: int  # of `shared`, the annotators split evenly: kept out of training until one more answers
    median_lead_time_s: float | None  # of their standing answers: Label Studio's time from opening a task to submitting it
    email: str | None = None  # Label Studio's email (or username) for the user id, as the newest pull listed it


def annotator_activity(session: Session, *, project_id: int) -> list[AnnotatorActivity]:
    """Per annotator (and the oracle): how many images they answered and how often their answer agrees with the
    label where another annotator answered too, counted as store.queries.resolve_label decides labels (a skip is
    no vote and leaves an earlier answer standing; an imported label never outvotes an annotator, so only annotator
    answers are read). Most answered first."""
    reads = [_read_time(read_at) for (read_at,) in session.execute(
        select(Round.details["labels_read_at"].as_string()).where(Round.project_id == project_id, Round.status == "completed")
        .order_by(Round.number.desc()).limit(2))]
    # (the round before's read, the newest's]: the first round takes everything before its read; a round before it
    # that recorded no read time (made before 2026-12-05) leaves the window unknown, counted 0 rather than all time (review)
    window = None
    if reads and reads[0] is not None and (len(reads) == 1 or reads[1] is not None):
        window = (reads[1] if len(reads) > 1 else None, reads[0])
    emails: dict[str, str] = {}
    for (listed,) in session.execute(select(Round.details["pull"]["labelstudio"]["annotators"]).where(Round.project_id == project_id)
                                     .order_by(Round.number)):
        if isinstance(listed, dict):
            emails.update({str(key): str(value) for key, value in listed.items()})
    events_by_image: dict[int, list[Any]] = defaultdict(list)
    for event in session.execute(select(LabelEvent.image_id, LabelEvent.label, LabelEvent.source, LabelEvent.action, LabelEvent.annotator,
                                        LabelEvent.lead_time_s, LabelEvent.created_at).join(Image, Image.id == LabelEvent.image_id)
                                 .where(Image.project_id == project_id, LabelEvent.source.in_(ANNOTATOR_SOURCES)).order_by(LabelEvent.id)):
        events_by_image[event.image_id].append(event)
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(key: tuple[str, str]) -> dict[str, Any]:
        return rows.setdefault(key, {"answered": 0, "skipped": 0, "latest": 0, "shared": 0, "agreeing": 0, "ties": 0, "lead": []})

    for events in events_by_image.values():
        standing: dict[tuple[str, str], Any] = {}  # newest set or delete: what resolve_label counts
        newest: dict[tuple[str, str], Any] = {}  # newest event of any kind, a skip too
        for event in events:
            key = (event.annotator or "", event.source)
            newest[key] = event
            if event.action != "skip":
                standing[key] = event
            if (window is not None and event.action == "set" and event.created_at is not None
                    and (window[0] is None or as_utc(event.created_at) > window[0]) and as_utc(event.created_at) <= window[1]):
                row(key)["latest"] += 1
        answers = {key: event for key, event in standing.items() if event.action == "set" and event.label is not None}
        current = resolve_label(events) if len(answers) > 1 else None
        for key, event in newest.items():
            row(key)["skipped"] += int(event.action == "skip")
        for key, event in answers.items():
            counts = row(key)
            counts["answered"] += 1
            if event.lead_time_s is not None:
                counts["lead"].append(float(event.lead_time_s))
            if current is not None:
                counts["shared"] += 1
                counts["agreeing"] += int(current.status == "labeled" and current.label == event.label)
                counts["ties"] += int(current.status == "tie")
    activity = [AnnotatorActivity(annotator=name, source=source, answered=c["answered"], skipped=c["skipped"], answered_for_latest_round=c["latest"],
                                  shared=c["shared"], agreeing=c["agreeing"], in_ties=c["ties"],
                                  median_lead_time_s=float(statistics.median(c["lead"])) if c["lead"] else None, email=emails.get(name))
                for (name, source), c in rows.items()]
    return sorted(activity, key=lambda a: (-a.answered, a.annotator, a.source))


def events_between_rounds(session: Session, *, project_id: int, round_ids: Sequence[int]) -> dict[int, int]:
    """Round id -> annotators' label events (answers, skips, deletions) recorded outside any round's pull (a webhook, or
    `loop rename-class` saving answers before it rewrites them) between the round before's label read and this one's:
    the round took them in without pulling them. Rounds that recorded no read time are left out (their window goes
    to the next round that did)."""
    wanted = set(round_ids)
    if not wanted:
        return {}
    timeline = _label_timeline(session, project_id)
    times = sorted(when for event, when in zip(timeline.events, timeline.times)
                   if event.round_id is None and event.source == "annotator" and when is not None)
    found: dict[int, int] = {}
    previous: datetime | None = None
    for round_id, read_at in session.execute(select(Round.id, Round.details["labels_read_at"].as_string())
                                             .where(Round.project_id == project_id).order_by(Round.number)):
        read = _read_time(read_at)
        if read is None:
            continue
        if round_id in wanted:
            taken = bisect_right(times, read) - (bisect_right(times, previous) if previous is not None else 0)
            if taken:
                found[round_id] = taken
        previous = read
    return found


def round_warnings(session: Session, *, project_id: int, round_ids: Sequence[int]) -> dict[int, list[str]]:
    """Round id -> the warnings its pull and push recorded (Label Studio unreachable, answers refused, images it could
    not take), read from the JSON by path, not the whole details (QA: a round whose pull failed read "0 labels pulled"
    on the dashboard with nothing saying why)."""
    found: dict[int, list[str]] = {}
    if not round_ids:
        return found
    for round_id, pulled, pushed in session.execute(select(Round.id, Round.details["pull"]["warnings"], Round.details["push"]["warnings"]).where(
            Round.project_id == project_id, Round.id.in_(list(round_ids)))):
        said = [str(text) for texts in (pulled, pushed) if isinstance(texts, list) for text in texts]
        if said:
            found[round_id] = said
    return found


def list_rounds(session: Session, *, project_id: int, limit: int, offset: int) -> Page:
    total = session.scalar(select(func.count(Round.id)).where(Round.project_id == project_id)) or 0
    rounds = session.scalars(
        select(Round).where(Round.project_id == project_id).options(_SUMMARY_COLUMNS, selectinload(Round.gates))
        .order_by(Round.number).limit(limit).offset(offset)
    )
    return Page(total=total, items=[_summary(round_) for round_ in rounds])


def confusion_matrix_of(details: dict[str, Any]) -> ConfusionMatrix | None:
    """Round.details["confusion_matrix"] = {"labels": [...], "matrix": [[...]]}; anything malformed reads as absent."""
    raw = (details or {}).get("confusion_matrix")
    if not isinstance(raw, dict):
        return None
    labels, matrix = raw.get("labels"), raw.get("matrix")
    if not isinstance(labels, list) or not isinstance(matrix, list) or len(matrix) != len(labels):
        return None
    try:
        rows = [[float(cell) for cell in row] for row in matrix]
    except (TypeError, ValueError):
        return None
    if any(len(row) != len(labels) for row in rows):
        return None
    return ConfusionMatrix(labels=[str(label) for label in labels], matrix=rows)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def training_of(details: dict[str, Any] | None) -> TrainingSummary | None:
    """Round.details["training"]: strategy, images fitted, the kept epoch and the per-epoch history; malformed rows are skipped."""
    raw = (details or {}).get("training")
    if not isinstance(raw, dict):
        return None
    history = []
    for row in raw.get("history") or []:
        if isinstance(row, dict) and _int_or_none(row.get("epoch")) is not None:
            history.append(EpochRow(epoch=_int_or_none(row["epoch"]), **{key: _finite_or_none(row.get(key)) for key in (
                "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "seconds")}))
    options = raw.get("options") if isinstance(raw.get("options"), dict) else {}
    not_used = raw.get("options_not_used_by_head") if isinstance(raw.get("options_not_used_by_head"), list) else []
    return TrainingSummary(strategy=_str_or_none(raw.get("strategy")), n_fit=_int_or_none(raw.get("n_fit")),
                           best_epoch=_int_or_none(raw.get("best_epoch")), epochs_run=max(0, len(history) - 1), history=history,
                           options={str(key): value for key, value in options.items()}, options_not_used_by_head=[str(key) for key in not_used],
                           early_stopping_note=_str_or_none(raw.get("early_stopping_note")))


def calibration_of(details: dict[str, Any] | None) -> CalibrationSummary | None:
    raw = (details or {}).get("calibration")
    if not isinstance(raw, dict):
        return None
    return CalibrationSummary(
        method=_str_or_none(raw.get("method")), temperature=_finite_or_none(raw.get("temperature")), fitted_on=_str_or_none(raw.get("fitted_on")),
        n_images=_int_or_none(raw.get("n_images")), ece_before=_finite_or_none(raw.get("ece_before")), ece_after=_finite_or_none(raw.get("ece_after")),
        reason=_str_or_none(raw.get("reason")), nll_before=_finite_or_none(raw.get("nll_before")), nll_after=_finite_or_none(raw.get("nll_after")),
        objective=_str_or_none(raw.get("objective")), n_left_out=_int_or_none(raw.get("n_left_out")))


def threshold_of(details: dict[str, Any] | None) -> ThresholdSummary | None:
    details = details or {}
    raw = details.get("threshold_choice")
    if not isinstance(raw, dict):
        return None
    source = _str_or_none(details.get("threshold_source")) or _str_or_none(raw.get("source"))
    out_of_fold = details.get("out_of_fold") if isinstance(details.get("out_of_fold"), dict) else {}
    estimated = details.get("estimated_metrics") if isinstance(details.get("estimated_metrics"), dict) else {}
    return ThresholdSummary(
        source=source, out_of_fold_model=_str_or_none(out_of_fold.get("model") or ("head" if out_of_fold else None)) if source == "out_of_fold" else None,
        n_negatives=_int_or_none(raw.get("n_negatives")), n_defects=_int_or_none(raw.get("n_defects")),
        margin_attainable=raw.get("margin_attainable") if isinstance(raw.get("margin_attainable"), bool) else None,
        estimated_metrics={str(name): _finite_or_none(value) for name, value in estimated.items()},
        rule=_str_or_none(raw.get("rule")), n_picked_negatives=_int_or_none(raw.get("n_picked_negatives")),
        fpr_estimated_over="pool" if _finite_or_none(raw.get("estimated_population_fpr")) is not None else ("labeled" if estimated else None),
        allowed_false_positives=_int_or_none(raw.get("allowed_false_positives")),
        n_sampled_negatives_above=_int_or_none(raw.get("n_sampled_negatives_above")),
        **{key: _finite_or_none(raw.get(key)) for key in ("rule_threshold", "rank_threshold", "tail_threshold", "observed_fpr", "fpr_upper_bound",
                                                          "estimated_population_fpr")})


def label_quality_of(details: dict[str, Any] | None) -> LabelQualitySummary | None:
    raw = (details or {}).get("label_quality")
    if not isinstance(raw, dict):
        return None
    rates = raw.get("noise_rate_per_class")
    return LabelQualitySummary(
        n_flagged=_int_or_none(raw.get("n_flagged")),
        noise_rate_per_class={str(name): _finite_or_none(rate) for name, rate in rates.items()} if isinstance(rates, dict) else {},
        already_questioned=_int_or_none(raw.get("already_questioned")),
        out_of_fold_balanced_accuracy=_finite_or_none(raw.get("out_of_fold_balanced_accuracy")), weak_model_note=_str_or_none(raw.get("weak_model_note")),
        suspect_batches=[SuspectBatch(ingest_batch_id=int(row["ingest_batch_id"]), source=_str_or_none(row.get("source")),
                                      n_judged=_int_or_none(row.get("n_judged")) or 0, n_flagged=_int_or_none(row.get("n_flagged")) or 0,
                                      share_flagged=_finite_or_none(row.get("share_flagged")),
                                      share_flagged_elsewhere=_finite_or_none(row.get("share_flagged_elsewhere")),
                                      n_labeled_test=_int_or_none(row.get("n_labeled_test")) or 0)
                         for row in raw.get("suspect_batches") or [] if isinstance(row, dict) and _int_or_none(row.get("ingest_batch_id")) is not None])


def defects_unmeasured_of(details: dict[str, Any] | None) -> list[UnmeasuredDefectsBatch] | None:
    """The round's batches whose predicted defects only good test parts stand nearest to; None: none named (or an
    older round, before the check)."""
    raw = (details or {}).get("coverage")
    rows = raw.get("defects_unmeasured") if isinstance(raw, dict) else None
    if not isinstance(rows, list):
        return None
    return [UnmeasuredDefectsBatch(ingest_batch_id=int(row["ingest_batch_id"]), source=_str_or_none(row.get("source")),
                                   n_predicted_defect=_int_or_none(row.get("n_predicted_defect")) or 0, ingest_batch_ids=_batch_ids(row))
            for row in rows if isinstance(row, dict) and _int_or_none(row.get("ingest_batch_id")) is not None] or None


def init_from_of(details: dict[str, Any] | None) -> InitFromSummary | None:
    raw = (details or {}).get("init_from")
    if not isinstance(raw, dict) or not raw.get("checkpoint"):
        return None
    return InitFromSummary(checkpoint=str(raw["checkpoint"]), source=str(raw["source"]) if raw.get("source") else None,
                           head=str(raw.get("head") or ""), head_used=bool(raw.get("head_used")),
                           backbone=str(raw["backbone"]) if raw.get("backbone") else None,
                           test_images_it_learned_from=_int_or_none(raw.get("test_images_it_learned_from")))


def unfamiliar_batches_of(details: dict[str, Any] | None) -> list[UnfamiliarBatch] | None:
    raw = (details or {}).get("coverage")
    if not isinstance(raw, dict):
        return None
    batches = []
    for row in raw.get("flagged_batches") or []:
        if not isinstance(row, dict) or _int_or_none(row.get("ingest_batch_id")) is None:
            continue
        training = row.get("unlike_training_labels") if isinstance(row.get("unlike_training_labels"), dict) else {}
        test = row.get("unlike_test_labels") if isinstance(row.get("unlike_test_labels"), dict) else {}
        batches.append(UnfamiliarBatch(
            ingest_batch_id=int(row["ingest_batch_id"]), source=_str_or_none(row.get("source")), n_images=_int_or_none(row.get("n_images")) or 0,
            share_unlike_training_labels=_finite_or_none(training.get("share_unfamiliar")), share_unlike_test_labels=_finite_or_none(test.get("share_unfamiliar")),
            # None where the check did not run (QA: "false" said the batch was like the test images when too few were there to tell)
            unlike_training_labels=bool(training.get("flagged")) if training else None, unlike_test_labels=bool(test.get("flagged")) if test else None,
            n_labeled_train_validation=_int_or_none(row.get("n_labeled_train_validation")) or 0, n_labeled_test=_int_or_none(row.get("n_labeled_test")) or 0,
            n_unlabeled_test=_int_or_none(row.get("n_unlabeled_test")) or 0, n_drawn_into_test=_int_or_none(row.get("n_drawn_into_test_now")) or 0,
            n_selected_for_training=_int_or_none(row.get("n_selected_for_training_now")), ingest_batch_ids=_batch_ids(row)))
    return batches


def _batch_ids(row: dict[str, Any]) -> list[int]:
    """A coverage row's ingest batches: the small ingests judged together, or (rounds before that) the batch alone."""
    listed = row.get("ingest_batch_ids")
    ids = [_int_or_none(b) for b in listed] if isinstance(listed, list) else []
    return [b for b in ids if b is not None] or [int(row["ingest_batch_id"])]


def metrics_by_batch_of(details: dict[str, Any] | None) -> list[BatchTestMetrics] | None:
    raw = ((details or {}).get("coverage") or {}).get("test_by_batch") if isinstance((details or {}).get("coverage"), dict) else None
    if not isinstance(raw, list) or not raw:
        return None
    return [BatchTestMetrics(ingest_batch_id=int(row["ingest_batch_id"]), source=_str_or_none(row.get("source")), n_images=_int_or_none(row.get("n_images")) or 0,
                             ingest_batch_ids=_batch_ids(row), too_few_images=bool(row.get("too_few_images")),
                             n_good=_int_or_none(row.get("n_good")), n_defects=_int_or_none(row.get("n_defects")),
                             **{key: _finite_or_none(row.get(key)) for key in ("macro_f1", "defect_recall", "negative_fpr", "accuracy")})
            for row in raw if isinstance(row, dict) and _int_or_none(row.get("ingest_batch_id")) is not None]


def collapsed_of(details: dict[str, Any] | None) -> bool | None:
    raw = (details or {}).get("collapse_check")
    if not isinstance(raw, dict):
        return None
    return bool(raw.get("test_split")) or raw.get("every_image_predicted_as") is not None


def cold_start_of(details: dict[str, Any] | None) -> str | None:
    raw = (details or {}).get("cold_start")
    if not raw:
        return None
    return str(raw.get("reason") or "cold start") if isinstance(raw, dict) else "cold start"


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _finite_or_none(value: Any) -> float | None:
    number = _float_or_none(value)
    return number if number is not None and math.isfinite(number) else None


def _timings(raw: dict[str, Any] | None) -> dict[str, float]:
    timings: dict[str, float] = {}
    for step, seconds in (raw or {}).items():
        value = _float_or_none(seconds)
        if value is not None:
            timings[str(step)] = value
    return timings


def round_report(session: Session, *, round_id: int) -> RoundReport | None:
    round_ = session.get(Round, round_id)
    if round_ is None:
        return None
    # Plain rows rather than the ORM relationships: this is the API's busiest read.
    metric_rows = session.execute(
        select(Metric.name, Metric.class_name, Metric.value).where(Metric.round_id == round_id).order_by(Metric.id)
    ).all()
    gate_rows = session.execute(
        select(GateResult.name, GateResult.value, GateResult.threshold, GateResult.comparison, GateResult.passed, GateResult.applicable)
        .where(GateResult.round_id == round_id).order_by(GateResult.id)
    ).all()
    metrics: dict[str, float | None] = {}
    per_class: dict[str, dict[str, float | None]] = defaultdict(dict)
    for name, class_name, value in metric_rows:
        if class_name is None:
            metrics[name] = value
        else:
            per_class[class_name][name] = value
    details = round_.details or {}
    class_names = details.get("class_names")
    of_round = LabelIssue.round_id == round_id
    n_issues, n_flagged, n_selected = session.execute(select(
        select(func.count(LabelIssue.id)).where(of_round, LabelIssue.kind == "label_error").scalar_subquery(),
        select(func.count(LabelIssue.id)).where(of_round, LabelIssue.kind == "label_error", LabelIssue.flagged.is_(True)).scalar_subquery(),
        select(func.count(Selection.id)).where(Selection.round_id == round_id).scalar_subquery(),
    )).one()
    found = data_issue_counts(session, rounds=[round_])[round_.id]
    near = (details.get("data_quality") or {}).get("near_duplicates") or {}
    across = near.get("test_images_with_a_copy_outside_test")
    counts = label_counts_by_round(session, project_id=round_.project_id, rounds=[round_])[round_.id]
    return RoundReport(
        summary=_summary(round_, gate_rows),
        error=round_.error,
        metrics=metrics,
        per_class=dict(per_class),
        gates=[
            GateRow(name=g.name, value=g.value, threshold=g.threshold, comparison=g.comparison, passed=g.passed, applicable=g.applicable,
                    **_interval_of(details, g.name))
            for g in gate_rows
        ],
        confusion_matrix=confusion_matrix_of(details),
        threshold=_float_or_none(details.get("threshold")),
        class_names=[str(name) for name in class_names] if isinstance(class_names, list) else None,
        step_timings_s=_timings(round_.step_timings_s),
        artifact_names=sorted((round_.artifacts or {}).keys()),
        label_counts=counts,
        n_label_issues=n_issues or 0,
        n_flagged_label_issues=n_flagged or 0,
        n_selected=n_selected,
        # None where the round never looked (rounds before the check, a failed round): 0 read as "no copies" (QA); the
        # details' full counts where recorded (the stored rows are the strongest few hundred)
        n_near_duplicates=found["near_duplicates"],
        n_outliers=found["outliers"],
        n_test_images_with_copy_outside=across if isinstance(across, int) else None,
        test_metrics_without_copies=_metrics_without_copies(details),
        cold_start=cold_start_of(details),
        collapsed=collapsed_of(details),
        training=training_of(details),
        calibration=calibration_of(details),
        label_quality=label_quality_of(details),
        threshold_choice=threshold_of(details),
        init_from=init_from_of(details),
        model_files_deleted=model_files_deleted_of(details),
        unmeasured_copies_regrouped=_regrouped_of(details),
        unfamiliar_batches=unfamiliar_batches_of(details),
        test_metrics_by_batch=metrics_by_batch_of(details),
        defects_unmeasured=defects_unmeasured_of(details),
        test_labels_changed=_test_labels_changed_of(details),
        pull=details.get("pull") if isinstance(details.get("pull"), dict) else None,
        push=details.get("push") if isinstance(details.get("push"), dict) else None,
        ties=details.get("ties") if isinstance(details.get("ties"), dict) else None,
        selection_budget=details.get("selection_budget") if isinstance(details.get("selection_budget"), dict) else None,
        classes_missing_from_test=([str(name) for name in details["classes_missing_from_test"]]
                                   if isinstance(details.get("classes_missing_from_test"), list) else None),
    )


def test_split_changed(changed: dict[str, Any] | None) -> bool:
    """Whether a round's test_labels_changed record says its gates score other test labels or images than the round
    before's: relabeled, no longer labeled, or labeled images that joined or left the test split."""
    return any((changed or {}).get(key) for key in ("relabeled", "no_longer_labeled", "joined_test_split", "left_test_split", "relabeled_by_rename"))


def test_split_renames_text(changed: dict[str, Any]) -> str:
    """"; 2 by loop rename-class (uneven -> free: 1, crack -> break: 1)" when a rename moved test labels, else ""."""
    n = changed.get("relabeled_by_rename") or 0
    if not n:
        return ""
    renamed = changed.get("renamed_test_labels")
    which = f" ({', '.join(f'{pair}: {count}' for pair, count in renamed.items())})" if isinstance(renamed, dict) and renamed else ""
    return f"; {n} by loop rename-class{which}"


def test_split_moves_text(changed: dict[str, Any]) -> str:
    """", N labeled images joined the test split and M left it" when any did, else "" (status and the dashboard)."""
    joined, left = changed.get("joined_test_split") or 0, changed.get("left_test_split") or 0
    return f", {joined} labeled images joined the test split and {left} left it" if joined or left else ""


def _test_labels_changed_of(details: dict) -> dict[str, int] | None:
    raw = details.get("test_labels_changed")
    if not isinstance(raw, dict):
        return None
    return {key: int(raw[key]) for key in ("since_round", "relabeled", "newly_labeled", "no_longer_labeled", "joined_test_split", "left_test_split",
                                           "relabeled_by_rename") if isinstance(raw.get(key), int)}


def data_issue_counts(session: Session, *, rounds: list[Round]) -> dict[int, dict[str, int | None]]:
    """Per round: images its near-copy and outlier checks found, for `round_report` (the API's and the dashboard's
    figure) and `loop status` alike (review: status read only the record, and said null where the API gave the stored
    rows of a round recorded before the count was)."""
    stored: dict[int, dict[str, int]] = defaultdict(dict)
    for round_id, kind, count in session.execute(
            select(LabelIssue.round_id, LabelIssue.kind, func.count(LabelIssue.id))
            .where(LabelIssue.round_id.in_([r.id for r in rounds]), LabelIssue.kind.in_(("near_duplicate", "outlier")))
            .group_by(LabelIssue.round_id, LabelIssue.kind)):
        stored[round_id][kind] = count
    return {r.id: {"near_duplicates": _found_count(r.details or {}, "near_duplicates", stored[r.id].get("near_duplicate")),
                   "outliers": _found_count(r.details or {}, "outliers", stored[r.id].get("outlier"))} for r in rounds}


def class_set_changes(class_sets: list[tuple[int, list[str] | None]], *, renames: dict[str, str] | None = None) -> dict[int, dict[str, Any]]:
    """By round number: the classes added and removed since the round before it ((number, class names) in round order;
    a round without its class names recorded is skipped), and of the removed ones those `loop rename-class` renamed or
    merged ("renamed": old -> its class now; `renames`: the project's class_renames). Macro F1 averages over the classes,
    so a series across such a change compares different things (QA: 5, then 6, then 5 classes, the series read as one;
    then a merge read as a class dropped)."""
    changes: dict[int, dict[str, Any]] = {}
    previous: list[str] | None = None
    for number, names in class_sets:
        if not isinstance(names, list):
            continue
        if previous is not None and set(names) != set(previous):
            removed = [n for n in previous if n not in names]
            change: dict[str, Any] = {"added": [n for n in names if n not in previous], "removed": removed}
            # a rename the store resolved through a chain (a -> b -> c is kept as a: c, b: c) names a class this round may
            # not have had: one into a class of the round is said as it is; one whose end is also an added class's end is
            # said as a rename into that class (review: "+b -a (merged into c)" for the round of b, then "+b -a")
            moved = {}
            for old in removed:
                end = (renames or {}).get(old)
                if end in names:
                    moved[old] = end
                elif end is not None:
                    into = next((name for name in change["added"] if (renames or {}).get(name) == end), None)
                    if into is not None:
                        moved[old] = into
            if moved:
                change["renamed"] = moved
            changes[number] = change
        previous = [str(n) for n in names]
    return changes


def class_change_text(change: dict[str, Any]) -> str:
    """"+scratch -crack (merged into break) fray renamed frayed_edge": a class renamed alone into a class the round before
    did not have is renamed; into one it had, or with another into one new class, merged."""
    renamed = change.get("renamed") or {}
    added = [name for name in change["added"] if name not in renamed.values()]
    into_count = Counter(renamed.values())  # two classes renamed into one new class: a merge, not two renames (review)
    removed = [f"-{name}" if name not in renamed else
               f"{name} renamed {renamed[name]}" if renamed[name] in change["added"] and into_count[renamed[name]] == 1 else
               f"-{name} (merged into {renamed[name]}{', new' if renamed[name] in change['added'] else ''})"
               for name in change["removed"]]
    return " ".join([*(f"+{name}" for name in added), *removed])


def _found_count(details: dict, kind: str, stored_rows: int | None) -> int | None:
    """Images a round's data-quality step found (near_duplicates, outliers): its recorded count, else its stored rows;
    None when the round has no data-quality record (it never checked)."""
    quality = details.get("data_quality")
    if not isinstance(quality, dict):
        return stored_rows or None  # findings stored without the record: it looked
    recorded = (quality.get(kind) or {}).get("n_issues") if isinstance(quality.get(kind), dict) else None
    return recorded if isinstance(recorded, int) else (stored_rows or 0)


def _regrouped_of(details: dict) -> dict[str, int] | None:
    raw = details.get("unmeasured_copies_regrouped")
    if not isinstance(raw, dict) or not isinstance(raw.get("moved"), int) or not raw["moved"]:
        return None
    return {key: int(raw[key]) for key in ("moved", "into_test", "out_of_test", "between_train_and_validation") if isinstance(raw.get(key), int)}


def _metrics_without_copies(details: dict) -> dict[str, int | float | None] | None:
    without = (details.get("data_quality") or {}).get("test_without_copies")
    if not isinstance(without, dict):
        return None
    counts = {key: int(without[key]) if isinstance(without.get(key), (int, float)) else None for key in ("n_images", "n_excluded")}
    return counts | {key: _float_or_none(without.get(key)) for key in ("macro_f1", "defect_recall", "negative_fpr", "accuracy")}


def unsettled_gates_of(details: dict[str, Any] | None, gates: Sequence[Any]) -> list[str]:
    """The applicable gates (rows with name and applicable) whose 90% interval on the test split straddles their
    threshold: a pass or fail there is the test split's luck, not the model's (QA: 8 good test parts, FPR interval
    [0, 0.31], read "all pass" in status, the dashboard's card and /predict)."""
    intervals = (details or {}).get("test_intervals") or {}
    return [gate.name for gate in gates if gate.applicable and isinstance(intervals.get(gate.name), dict)
            and isinstance(intervals[gate.name].get("low"), (int, float)) and intervals[gate.name].get("settled") is False]


def _interval_of(details: dict, gate_name: str) -> dict[str, Any]:
    interval = (details.get("test_intervals") or {}).get(gate_name)
    if not isinstance(interval, dict) or not isinstance(interval.get("low"), (int, float)):
        return {}
    return {"interval_low": float(interval["low"]), "interval_high": float(interval["high"]), "settled": bool(interval.get("settled"))}


def progress_series(session: Session, *, project_id: int) -> ProgressSeries | None:
    """Every round of the project in number order, with gates, metrics and label counts as aligned series."""
    project = session.get(Project, project_id)
    if project is None:
        return None
    rounds = list(session.scalars(
        select(Round).where(Round.project_id == project_id).options(_SUMMARY_COLUMNS, selectinload(Round.gates)).order_by(Round.number)
    ))
    position = {round_.id: index for index, round_ in enumerate(rounds)}
    n = len(rounds)

    gate_values: dict[str, dict[str, list[Any]]] = {}
    gate_comparison: dict[str, str] = {}
    for index, round_ in enumerate(rounds):
        for gate in sorted(round_.gates, key=lambda g: g.id):
            series = gate_values.setdefault(gate.name, {key: [None] * n for key in ("values", "thresholds", "passed", "applicable")})
            series["values"][index] = gate.value
            series["thresholds"][index] = gate.threshold
            series["passed"][index] = gate.passed
            series["applicable"][index] = gate.applicable
            gate_comparison[gate.name] = gate.comparison
    gates = [
        GateSeries(
            name=name,
            comparison=gate_comparison[name],
            threshold=next((t for t in reversed(series["thresholds"]) if t is not None), None),
            **series,
        )
        for name, series in gate_values.items()
    ]

    metric_values: dict[tuple[str, str | None], list[float | None]] = {}
    if rounds:
        rows = session.execute(
            select(Metric.round_id, Metric.name, Metric.class_name, Metric.value)
            .where(Metric.round_id.in_(list(position))).order_by(Metric.id)
        )
        for round_id, name, class_name, value in rows:
            metric_values.setdefault((name, class_name), [None] * n)[position[round_id]] = value
    metrics = [
        MetricSeries(name=name, class_name=class_name, values=values)
        for (name, class_name), values in sorted(metric_values.items(), key=lambda item: (item[0][1] is not None, item[0][1] or "", item[0][0]))
    ]

    counts = label_counts_by_round(session, project_id=project_id, rounds=rounds)
    sources = list(LABEL_SOURCES) + sorted({s for c in counts.values() for s in c.by_source} - set(LABEL_SOURCES))
    return ProgressSeries(
        project_id=project.id,
        project_name=project.name,
        rounds=[_summary(round_) for round_ in rounds],
        gates=gates,
        metrics=metrics,
        labels_by_source={source: [counts[r.id].by_source.get(source, 0) for r in rounds] for source in sources},
        ties=[counts[r.id].ties for r in rounds],
        new_label_events_by_source={source: [counts[r.id].new_events_by_source.get(source, 0) for r in rounds] for source in sources},
        class_renames=renamed_classes(project),
    )


def progress_fingerprint(session: Session, *, project_id: int) -> tuple[Any, ...]:
    """Changes whenever progress_series would. A SQLite file store: its file version. Otherwise: rounds start or
    change status, and their metrics, gates and label events are only ever added, so counts and newest ids do."""
    file_version = sqlite_file_version(session)
    if file_version is not None:
        return ("sqlite-file", project_id, *file_version)
    rounds = session.execute(
        select(func.count(Round.id), func.max(Round.id), func.count(Round.id).filter(Round.status == "completed"),
               func.count(Round.id).filter(Round.status == "failed"), func.count(Round.finished_at), func.max(Round.finished_at))
        .where(Round.project_id == project_id)
    ).one()
    round_ids = select(Round.id).where(Round.project_id == project_id).scalar_subquery()
    metrics = session.execute(select(func.count(Metric.id), func.max(Metric.id)).where(Metric.round_id.in_(round_ids))).one()
    gates = session.execute(select(func.count(GateResult.id), func.max(GateResult.id)).where(GateResult.round_id.in_(round_ids))).one()
    events = session.execute(
        select(func.count(LabelEvent.id), func.max(LabelEvent.id)).join(Image, Image.id == LabelEvent.image_id).where(Image.project_id == project_id)
    ).one()
    project_exists = session.get(Project, project_id) is not None
    return (project_exists, *rounds, *metrics, *gates, *events)


def per_class_f1(progress: ProgressSeries) -> dict[str, list[float | None]]:
    """class -> F1 per round, from the per-class metric series. A class `loop rename-class` renamed continues under its
    name now where no round scored both names (QA: fray and frayed_edge drew two lines for one class); a class merged
    into one the same rounds scored keeps its own line (its F1 is not the merged class's)."""
    found: dict[str, list[float | None]] = {}
    for name in F1_METRIC_NAMES:
        for series in progress.metrics:
            if series.class_name is not None and series.name.lower() == name and series.class_name not in found:
                found[series.class_name] = series.values
    for old, new in progress.class_renames.items():
        if old in found and new not in found:
            found[new] = found.pop(old)
        elif old in found and all(a is None or b is None for a, b in zip(found[old], found[new])):
            found[new] = [b if b is not None else a for a, b in zip(found.pop(old), found[new])]
    return found


def round_status(session: Session, round_id: int) -> str | None:
    """A round's status alone (None: no such round): cheap enough to ask before a cached report."""
    return session.scalar(select(Round.status).where(Round.id == round_id))


def has_running_round(session: Session, *, project_id: int) -> bool:
    return session.scalar(select(Round.id).where(Round.project_id == project_id, Round.status == "running").limit(1)) is not None


def get_round_or_none(session: Session, round_id: int) -> Round | None:
    return session.get(Round, round_id)


def _current_label_of(session: Session, project_id: int, image_ids: Iterable[int]) -> dict[int, str | None]:
    wanted = set(image_ids)
    if not wanted:
        return {}
    events: dict[int, list[LabelEvent]] = defaultdict(list)
    for event in session.scalars(select(LabelEvent).where(LabelEvent.image_id.in_(wanted)).order_by(LabelEvent.id)):
        events[event.image_id].append(event)
    return {image_id: resolve_label(events[image_id]).label for image_id in wanted}


def label_issue_queue(
    session: Session, *, round_id: int, limit: int, offset: int, flagged_only: bool = True, kind: str | None = None
) -> Page:
    """The round's suspected label issues, most suspect (lowest rank) first, with each image's label now."""
    conditions = [LabelIssue.round_id == round_id]
    if flagged_only:
        conditions.append(LabelIssue.flagged.is_(True))
    if kind is not None:
        conditions.append(LabelIssue.kind == kind)
    total = session.scalar(select(func.count(LabelIssue.id)).where(*conditions)) or 0
    issues = list(session.scalars(
        select(LabelIssue).where(*conditions).order_by(LabelIssue.rank, LabelIssue.id).limit(limit).offset(offset)
    ))
    round_ = session.get(Round, round_id)
    now = _current_label_of(session, round_.project_id, (issue.image_id for issue in issues)) if round_ else {}
    items = [
        LabelIssueRow(
            id=issue.id, round_id=issue.round_id, image_id=issue.image_id, kind=issue.kind, given_label=issue.given_label,
            suggested_label=issue.suggested_label, score=issue.score, flagged=issue.flagged, rank=issue.rank,
            current_label=now.get(issue.image_id), related_image_id=issue.related_image_id,
        )
        for issue in issues
    ]
    return Page(total=total, items=items)


def _read_time(read_at: Any) -> datetime | None:
    """A round's details.labels_read_at (ISO text, UTC) as an aware time; None when not recorded."""
    return as_utc(datetime.fromisoformat(read_at)) if isinstance(read_at, str) else None


def ask_answer_times(session: Session, asks: Sequence[Selection], asked_from: dict[int, datetime | None]) -> dict[int, datetime]:
    """Selection id -> when the first answer that still stands came after the ask, for pushed asks that have one.
    The ask stands from when its round read the labels (`asked_from`, by round id: an answer pulled at its start came
    before it), else from its push; a tie's ask is answered by any change to its answers, one deleted too, as the round
    counts it (review)."""
    pushed = [row for row in asks if row.push_status == "pushed"]
    answers = standing_answer_times(session, sorted({row.image_id for row in pushed}))
    changes = standing_answer_times(session, sorted({row.image_id for row in pushed if row.reason == "annotators_disagree"}), deletions_count=True)
    found = {}
    for row in pushed:
        since = asked_from.get(row.round_id) or as_utc(row.pushed_at)
        times = changes if row.reason == "annotators_disagree" else answers
        later = [as_utc(when) for when in times.get(row.image_id, []) if since is None or as_utc(when) > since]
        if later:
            found[row.id] = min(later)
    return found


def round_selection(session: Session, *, round_id: int, limit: int, offset: int) -> Page:
    """The images the round picked for labeling, in rank order, with each image's label now (None: still unlabeled)."""
    total = session.scalar(select(func.count(Selection.id)).where(Selection.round_id == round_id)) or 0
    rows = list(session.scalars(
        select(Selection).where(Selection.round_id == round_id).order_by(Selection.rank, Selection.id).limit(limit).offset(offset)
    ))
    round_ = session.get(Round, round_id)
    now = _current_label_of(session, round_.project_id, (row.image_id for row in rows)) if round_ else {}
    answered = ask_answer_times(session, rows, {round_id: _read_time((round_.details or {}).get("labels_read_at")) if round_ else None})
    renames = renamed_classes(session.get(Project, round_.project_id)) if round_ else {}  # the guess by its class's name now
    items = []
    for row in rows:
        answered_at = answered.get(row.id)
        items.append(SelectionRow(
            id=row.id, round_id=row.round_id, image_id=row.image_id, rank=row.rank, score=row.score, strategy=row.strategy,
            reason=row.reason, predicted_label=renames.get(row.predicted_label, row.predicted_label), p_defect=row.p_defect,
            push_status=row.push_status, pushed_at=as_utc(row.pushed_at), current_label=now.get(row.image_id),
            answered=(answered_at is not None) if row.push_status == "pushed" else None, answered_at=answered_at,
        ))
    return Page(total=total, items=items)


def latest_round_with_issues(session: Session, *, project_id: int) -> Round | None:
    """The newest round that recorded label errors: the queue the dashboard shows."""
    return session.scalars(
        select(Round).where(Round.project_id == project_id, Round.id.in_(select(LabelIssue.round_id).where(LabelIssue.kind == "label_error")))
        .order_by(Round.number.desc())
    ).first()


def latest_round_with_confusion_matrix(session: Session, *, project_id: int) -> Round | None:
    for round_ in session.scalars(
        select(Round).where(Round.project_id == project_id, Round.status == "completed").order_by(Round.number.desc())
    ):
        if confusion_matrix_of(round_.details or {}) is not None:
            return round_
    return None
