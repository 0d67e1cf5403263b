"""Response bodies of the managers' API (what /docs shows)."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

ItemT = TypeVar("ItemT")


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorOut(Schema):
    detail: Any = Field(description="what went wrong: a message, or a list of validation errors")


class HealthOut(Schema):
    status: str
    database: str


class VersionOut(Schema):
    name: str
    version: str
    api_version: str
    store_schema: str | None = Field(None, description="the store's schema revision (Alembic)")
    release_schema: str | None = Field(None, description="the newest schema revision this release knows: the release that made the store "
                                                         "knows the store's")


class PageOut(Schema, Generic[ItemT]):
    total: int = Field(description="items in the whole list")
    limit: int
    offset: int
    items: list[ItemT]


class ProjectOut(Schema):
    id: int
    name: str
    classes: list[str]
    negative_class: str | None
    created_at: datetime
    n_images: int
    n_rounds: int
    latest_round_number: int | None


class RoundSummaryOut(Schema):
    id: int
    project_id: int
    number: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    n_gates: int = Field(description="applicable gates recorded")
    n_gates_passed: int
    all_gates_passed: bool | None = Field(description="null: no applicable gate recorded")
    process_alive: bool | None = Field(
        default=None, description="a running round only: whether a process (a `loop round`) holds the project's lock now; false: none "
                                  "does, the round was killed or the machine stopped, and the next `loop round` records it as "
                                  "interrupted; null: not running, or the lock could not be read")
    status_note: str | None = Field(default=None, description="a running round only: what process_alive means for it, in words")
    error: str | None = Field(default=None, description="a failed round: why, the step and its error (\"step train: MemoryError: ...\") or "
                                                        "\"interrupted ...\" (Ctrl-C, killed, the machine stopped); null otherwise")


class AnnotatorOut(Schema):
    annotator: str = Field(description="the annotator as the store records them: \"labelstudio:<user id>\" for Label Studio, \"oracle\" for the "
                                       "simulated annotator")
    email: str | None = Field(default=None, description="Label Studio's email (or username) of that user id, as the rounds' pulls listed "
                                                        "the server's users (the newest listing wins); null: never listed (the oracle)")
    source: str = Field(description="annotator (Label Studio) or oracle (the simulated annotator)")
    answered: int = Field(description="images where an answer of theirs gives a class and stands (not deleted; a later skip leaves it "
                                      "standing, as it leaves their vote)")
    skipped: int = Field(description="images whose newest event by them is a skip")
    answered_for_latest_round: int = Field(description="answers the newest completed round took in for the first time: saved after the "
                                                       "round before it read the labels and before it read them (pulled, or taken by "
                                                       "the webhook in between)")
    shared: int = Field(description="of the images they answered, those another annotator answered too")
    agreeing: int = Field(description="of `shared`, images whose label now is their answer: agreeing / shared is their agreement with "
                                      "the others (a lone answer is the label by definition and is not counted)")
    in_ties: int = Field(description="of `shared`, images whose annotators split evenly (kept out of training until one more answers)")
    median_lead_time_s: float | None = Field(description="median, over their standing answers, of the time from opening a task to "
                                                         "submitting it, as Label Studio records it; null: none recorded (the oracle, "
                                                         "answers without it)")


class GateOut(Schema):
    name: str
    value: float | None
    threshold: float
    comparison: str = Field(description='">=" or "<=": value compared with threshold')
    passed: bool | None
    applicable: bool
    interval_low: float | None = Field(default=None, description="90% interval of the value on the test split, photos of one part as one draw")
    interval_high: float | None = None
    settled: bool | None = Field(default=None, description="the interval lies on one side of the threshold: false = this test split cannot tell")


class ConfusionMatrixOut(Schema):
    labels: list[str] = Field(description="true classes (rows) and predicted classes (columns), in this order")
    matrix: list[list[float]]


class LabelCountsOut(Schema):
    by_source: dict[str, int] = Field(description="current labels by the source that decided them: import, annotator, oracle")
    by_class: dict[str, int]
    ties: int = Field(description="images whose annotators disagree evenly: kept out of training")
    total_labeled: int
    new_events_by_source: dict[str, int] = Field(description="label events this round's pull recorded. Answers the Label Studio webhook "
                                                 "recorded between rounds belong to no round: they show in by_source, not here")


class EpochOut(Schema):
    epoch: int = Field(description="0: the network before unfreezing (head on frozen features)")
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_macro_f1: float | None
    seconds: float | None


class TrainingOut(Schema):
    strategy: str | None = Field(description="head | finetune | full")
    n_fit: int | None = Field(description="labeled images the model learned from")
    best_epoch: int | None = Field(description="the epoch early stopping on validation macro F1 kept; null: no epochs (a head on embeddings) "
                                               "or a round recorded before the kept epoch was")
    epochs_run: int = Field(description="epochs after epoch 0")
    history: list[EpochOut] = Field(description="loss and accuracy per epoch, train and validation")
    options: dict[str, Any] = Field(default_factory=dict, description="the training options the round used (loop.toml [model.training] and "
                                                                      "what --init-from suggested; a head's own options only)")
    options_not_used_by_head: list[str] = Field(default_factory=list, description="options loop.toml set that a head round does not use")
    early_stopping_note: str | None = Field(default=None, description="why the kept epoch may mean little, e.g. validation holding one class")


class CalibrationOut(Schema):
    method: str | None = Field(description='"temperature" or "none"')
    temperature: float | None
    fitted_on: str | None = Field(description='"validation" or "out_of_fold": never the test split')
    n_images: int | None
    ece_before: float | None = Field(description="expected calibration error before temperature scaling, on the images it was fitted on")
    ece_after: float | None
    nll_before: float | None = Field(default=None, description="negative log-likelihood before temperature scaling, same images")
    nll_after: float | None = None
    objective: str | None = Field(default=None, description='"nll", or "nll_add_one" when no image there is misclassified: the fit then '
                                                            "keeps an add-one error estimate and the plain NLL after is higher by design")
    n_left_out: int | None = Field(default=None, description="out-of-fold images of a class a single fold held: not fitted on, not measured")
    reason: str | None = Field(description="why the model was left uncalibrated")


class ThresholdChoiceOut(Schema):
    source: str | None = Field(description='"validation" or "out_of_fold": where the decision threshold was chosen, never the test split')
    out_of_fold_model: str | None = Field(description='whose out-of-fold probabilities: "head", or the fine-tuning strategy trained once per fold')
    n_negatives: int | None = Field(description="labeled good parts the threshold was chosen on")
    n_defects: int | None
    margin_attainable: bool | None = Field(description="false: too few good parts to keep the FPR bound under the gate")
    estimated_metrics: dict[str, float | None] = Field(
        description="the loop's own estimate of macro F1, defect recall and FPR from the same non-test data: what steers selection")
    rule: str | None = Field(default=None, description='which rule chose it: "all_negatives", "stratified" (good parts picked by active '
                                                       'learning weighed apart from the sampled ones) or "pool"')
    n_picked_negatives: int | None = Field(default=None, description="labeled good parts active learning picked (the others were sampled)")
    fpr_estimated_over: str | None = Field(default=None, description='"pool": the FPR estimate is over every good part of the pool, labeled '
                                                                     'or not; "labeled": over the labeled good parts it was chosen on')
    rule_threshold: float | None = Field(default=None, description="the rule's threshold before the move toward the middle of the gap "
                                                                   "between the labeled scores around it (the decisions on them are the same)")
    rank_threshold: float | None = Field(default=None, description="the Clopper-Pearson (rank) rule's threshold alone")
    tail_threshold: float | None = Field(default=None, description="the robust normal-tail rule's threshold alone (blended with the rank rule's)")
    allowed_false_positives: int | None = Field(default=None, description="false positives among the labeled good parts the rank rule allows")
    observed_fpr: float | None = Field(default=None, description="the labeled good parts' FPR at the deployed threshold")
    fpr_upper_bound: float | None = Field(default=None, description="its one-sided Clopper-Pearson upper bound ([model] threshold_confidence)")
    estimated_population_fpr: float | None = Field(default=None, description='"stratified" rule: the FPR estimate over every good part of the pool')
    n_sampled_negatives_above: int | None = Field(default=None, description='"stratified" rule: good parts labeled at random (not picked) at '
                                                                            "or above the threshold; the rule forgives one, the estimate counts it")


class UnfamiliarBatchOut(Schema):
    ingest_batch_id: int
    source: str | None = Field(description="the folder or manifest the batch was ingested from")
    n_images: int
    share_unlike_training_labels: float | None = Field(
        description="share of the batch's images (up to 1024 checked) less like any training label than 95% of the training labels are like "
                    "another: about 0.05 for images like them")
    share_unlike_test_labels: float | None = Field(description="the same against the labeled test images")
    unlike_training_labels: bool | None = Field(description="true: the model was not taught images like most of these (share >= 0.3); null: not checked")
    unlike_test_labels: bool | None = Field(description="true: the gates do not measure images like these (share >= 0.3); null: not checked "
                                                        "(too few labeled test images to compare with)")
    n_labeled_train_validation: int
    n_labeled_test: int
    n_unlabeled_test: int = Field(description="drawn into the test split at random, waiting for their label")
    n_drawn_into_test: int = Field(description="drawn into the test split this round (at most [split] unmeasured_batch_test_sample)")
    n_selected_for_training: int | None = Field(description="picked for a training label this round")
    ingest_batch_ids: list[int] = Field(description="the ingest batches judged together: the batch alone, or small ingests (under 50 "
                                                    "images each, until 50 in all) of one lane (unlike the labels when first judged, or not), "
                                                    "named by the first")


class BatchTestMetricsOut(Schema):
    ingest_batch_id: int
    source: str | None
    n_images: int = Field(description="the batch's labeled test images")
    macro_f1: float | None
    defect_recall: float | None
    negative_fpr: float | None
    accuracy: float | None
    ingest_batch_ids: list[int] = Field(description="the batch alone, or the small ingests measured together with it")
    too_few_images: bool = Field(False, description="fewer labeled test images than a batch needs to be gated alone (10): shown, noisy")
    n_good: int | None = Field(None, description="of its labeled test images, good parts: what its FPR rests on (null: not recorded)")
    n_defects: int | None = Field(None, description="defects: what its defect recall rests on")


class SuspectBatchOut(Schema):
    ingest_batch_id: int
    source: str | None = Field(description="the folder or manifest the batch was ingested from")
    n_judged: int = Field(description="its labeled training and validation images")
    n_flagged: int = Field(description="of them, suspected label errors")
    share_flagged: float | None
    share_flagged_elsewhere: float | None = Field(description="the share among the other ingests' labeled training and validation images")
    n_labeled_test: int = Field(description="its labeled test images: the test split only reports, so nothing checks their labels, and the "
                                            "gates score the model against them")


class LabelQualityOut(Schema):
    n_flagged: int | None = Field(description="suspected label errors the round flagged")
    noise_rate_per_class: dict[str, float | None] = Field(
        description="estimated P(true label differs | given label) per class, from out-of-fold probabilities; null: fewer than 20 labels of that class")
    already_questioned: int | None = Field(description="flagged suspects not sent again: asked before with the same label")
    suspect_batches: list[SuspectBatchOut] = Field(
        default_factory=list, description="ingests whose labels are suspected far more often than the others' (25% or more, 3x the others, 5 "
                                          "images at least): wrong as a whole? (classes swapped, a wrong manifest column)")
    out_of_fold_balanced_accuracy: float | None = Field(default=None, description="how often the out-of-fold probabilities that judged the labels "
                                                                         "name the given label")
    weak_model_note: str | None = Field(default=None, description="set when that accuracy is under 85%: the suspects are then mostly "
                                                                  "the model's own errors and the noise rates overstate the noise")


class UnmeasuredDefectsBatchOut(Schema):
    ingest_batch_id: int
    source: str | None
    n_predicted_defect: int = Field(description="its unlabeled images outside the test split the model calls defects")
    ingest_batch_ids: list[int] = Field(description="the batch alone, or the small ingests judged together with it")


class InitFromOut(Schema):
    checkpoint: str = Field(description="the checkpoint the backbone (and head) started from: the project's own copy")
    source: str | None = Field(description="where loop init copied it from")
    head: str = Field(description="whether the other project's head was transferred, and why")
    head_used: bool = Field(description="true: this round's network started from that head")
    backbone: str | None = Field(None, description="the backbone transferred: which round of which project, fine-tuned or pretrained (null: "
                                                   "not recorded, rounds before it was)")
    test_images_it_learned_from: int | None = Field(None, description="labeled test images the source model (or one it started from) learned "
                                                                      "from, matched by content: its test figures overstate the transfer "
                                                                      "(null: the checkpoint predates the record)")


class ModelFilesDeletedOut(Schema):
    files: list[str] = Field(description="the round's model files deleted (model.pt, model.onnx); its record and predictions stay")
    at: str | None = Field(description="when (ISO 8601, UTC)")
    by: str | None = Field(description="loop prune, or loop round ([loop] keep_model_rounds)")
    folder: str | None = Field(description="the project folder whose files they were (a store shared by several folders)")


class RoundOut(RoundSummaryOut):
    error: str | None
    metrics: dict[str, float | None] = Field(description="overall metrics on the frozen test split")
    per_class: dict[str, dict[str, float | None]] = Field(description="class -> metric -> value")
    gates: list[GateOut]
    confusion_matrix: ConfusionMatrixOut | None
    threshold: float | None = Field(description="decision threshold on P(defect) = 1 - P(negative class)")
    class_names: list[str] | None
    step_timings_s: dict[str, float]
    artifact_names: list[str] = Field(description="the files the round wrote (model, plots), as recorded: `loop prune` records the model "
                                                  "files it deletes (model_files_deleted); a file deleted by hand is still named")
    label_counts: LabelCountsOut = Field(description="labels in the store when the round finished, quarantined and replaced images' labels "
                                                     "too (loop status --json's labeled_counts counts the images the round used)")
    n_label_issues: int = Field(description="suspected label errors (near-duplicates and outliers are counted apart)")
    n_flagged_label_issues: int
    n_selected: int
    n_near_duplicates: int | None = Field(description="images with a pixel-verified near-copy among the project's images; null: the round "
                                                       "did not check (a round made before the check, or a failed one)")
    n_outliers: int | None = Field(description="null: the round did not check")
    n_test_images_with_copy_outside: int | None = Field(
        description="test images with a labeled near-copy outside the frozen test split (train or validation): the test metrics are "
                    "optimistic for them; pool copies join the test split instead; null: not checked")
    test_metrics_without_copies: dict[str, int | float | None] | None = Field(
        default=None, description="n_images, n_excluded, macro_f1, defect_recall, negative_fpr and accuracy on the test images that have no "
                                  "labeled near-copy outside the test split: the figures to trust when some do; null: no test image has one")
    cold_start: str | None = Field(
        default=None, description="why the round trained no model (only good parts labeled): its batch was picked unlike the known-good parts")
    collapsed: bool | None = Field(default=None, description="true: the model gave every test image, or every image of the project, one "
                                                             "class (its macro F1 gate was set to 0); null: not checked")
    training: TrainingOut | None = Field(default=None, description="null: no model trained (a cold start, a failed round, or an older round)")
    calibration: CalibrationOut | None = None
    label_quality: LabelQualityOut | None = None
    threshold_choice: ThresholdChoiceOut | None = Field(default=None, description="null: no threshold (no negative class, a cold start)")
    init_from: InitFromOut | None = Field(default=None, description="where the model started (loop init --init-from); null: ImageNet weights")
    unfamiliar_batches: list[UnfamiliarBatchOut] | None = Field(
        default=None, description="ingest batches mostly unlike the training labels or the labeled test images (a new camera or product line); "
                                  "null: not checked (an older round)")
    test_metrics_by_batch: list[BatchTestMetricsOut] | None = Field(
        default=None, description="the gate metrics per ingest batch with at least 10 labeled test images, when more than one has; null otherwise")
    model_files_deleted: ModelFilesDeletedOut | None = Field(
        default=None, description="what loop prune (or keep_model_rounds) deleted of the round's files; null: it deleted none (a file deleted "
                                  "by hand is not recorded: /predict says when the model file is missing)")
    unmeasured_copies_regrouped: dict[str, int] | None = Field(
        default=None, description="labeled near-copies an ingest had drawn on both sides of the test split (or in train and validation), put "
                                  "on one side by this round before any round measured them: moved, into_test, out_of_test, "
                                  "between_train_and_validation; the test split's image count changes by into_test - out_of_test; null: none moved")
    classes_missing_from_test: list[str] | None = Field(default=None, description="classes with no labeled test image: macro F1 cannot score "
                                                                               "them and its gate fails until the test split has some; null: not recorded")
    test_labels_changed: dict[str, int] | None = Field(
        default=None, description="how the test split's labels changed since the previous completed round read them: since_round, relabeled "
                                  "(another class), newly_labeled, no_longer_labeled (a tie, an answer deleted), relabeled_by_rename (`loop rename-class` "
                                  "moved them to another class), joined_test_split and "
                                  "left_test_split (labeled images placed into it with their test copy, or quarantined out of it); a change "
                                  "of a gate over rounds is partly these labels'; null: not recorded (the first round, an older round)")
    pull: dict[str, Any] | None = Field(default=None, description="what the round's pull took in from the annotators: new_label_events, "
                                                                  "skipped, rejected, deleted, rejections and the annotation tool's own counts")
    push: dict[str, Any] | None = Field(default=None, description="what reached the annotators: pushed, pending (the tool down), asked "
                                                                  "again, waiting tasks given this round's guess, tasks closed")
    ties: dict[str, Any] | None = Field(default=None, description="images whose annotators disagree evenly (n_images, kept out of training) "
                                                                  "and how many were asked for one more answer (asked)")
    selection_budget: dict[str, int] | None = Field(
        default=None, description="how many new images the round could pick: budget_per_round, waiting_in_annotators_queue (earlier picks pushed "
                                  "and still unanswered), undelivered_from_earlier_rounds (waiting to be pushed while the annotation tool is "
                                  "down), queue_limit and budget (what it could pick); null: not recorded (an older round, a cold start's failure)")
    defects_unmeasured: list[UnmeasuredDefectsBatchOut] | None = Field(
        default=None, description="ingest batches whose unlabeled images the model calls defects while the labeled test image nearest each is a "
                                  "good part: the gates do not measure defects like theirs (a new camera's test set of good parts alone, say); "
                                  "null: none")


class LabelIssueOut(Schema):
    id: int
    round_id: int
    image_id: int
    kind: str
    given_label: str | None
    suggested_label: str | None
    score: float = Field(description="label quality: low = more suspect")
    flagged: bool
    rank: int
    current_label: str | None = Field(description="the image's label now (annotators may have fixed it since)")
    still_suspect: bool | None = Field(default=None, description="label_error: whether the suspicion holds now, the label being still the one "
                                                                  "suspected and not the suggested class (false once relabeled, or once "
                                                                  "`loop rename-class` merged the suspected class into the suggested one); "
                                                                  "null for the other kinds")
    image_url: str
    related_image_id: int | None = Field(default=None, description="near_duplicate: the copy; outlier: the nearest image")


class SelectionOut(Schema):
    id: int
    round_id: int
    image_id: int
    rank: int
    score: float
    strategy: str
    reason: str
    predicted_label: str | None = Field(description="the guess shown to annotators pre-selected: a defect class when P(defect) >= 0.5, else "
                                                    "the good class, or cleanlab's suggestion for a questioned label; not the deployed "
                                                    "decision at the FPR threshold (the export's predicted_label); null: no guess "
                                                    "(a test image, a tie, a cold start)")
    p_defect: float | None
    push_status: str
    pushed_at: datetime | None
    current_label: str | None = Field(description="the image's label now; null: not labeled yet")
    image_url: str
    answered: bool | None = Field(None, description="pushed: whether an annotator's answer that still stands came after this ask (a "
                                                    "deleted answer is none, a skip answers nothing); null: not pushed (recorded, pending, "
                                                    "withdrawn)")
    answered_at: datetime | None = Field(None, description="when the first such answer was recorded")


class GateSeriesOut(Schema):
    name: str
    comparison: str
    threshold: float | None = Field(description="latest threshold: the line on the chart")
    values: list[float | None]
    thresholds: list[float | None]
    passed: list[bool | None]
    applicable: list[bool | None]


class MetricSeriesOut(Schema):
    name: str
    class_name: str | None
    values: list[float | None]


class ProgressOut(Schema):
    """Series for charts: every list is aligned with `rounds` (null where a round recorded nothing)."""

    project_id: int
    project_name: str
    rounds: list[RoundSummaryOut]
    gates: list[GateSeriesOut]
    metrics: list[MetricSeriesOut]
    labels_by_source: dict[str, list[int]]
    ties: list[int]
    new_label_events_by_source: dict[str, list[int]] = Field(description="per round, the label events its pull recorded (webhook answers "
                                                             "belong to no round: see labels_by_source)")


class ImagePredictionOut(Schema):
    filename: str | None
    probabilities: dict[str, float]
    p_defect: float | None = Field(description="1 - P(negative class); null without a negative class")
    predicted_label: str
    is_defect: bool | None = Field(description="null without a negative class")


class PredictOut(Schema):
    project_id: int
    round_id: int
    round_number: int
    all_gates_passed: bool | None = Field(
        default=None, description="whether the round whose model answered passed its gates: /predict serves the newest completed round's "
                                  "model, passed or not; null: the round had no applicable gate")
    failed_gates: list[str] = Field(default_factory=list, description="the gates that round failed (by name)")
    unsettled_gates: list[str] = Field(default_factory=list, description="the gates whose 90% interval on that round's test split straddles "
                                                                         "their threshold: passed or failed, the test split is too small to tell")
    threshold: float | None
    negative_class: str | None
    class_names: list[str]
    predictions: list[ImagePredictionOut]


class WebhookOut(Schema):
    status: str
    result: Any = None
