"""`loop.toml`: the project's configuration, validated with pydantic (a typo or a bad value is a clear error)."""
from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator, model_validator

CONFIG_FILE = "loop.toml"
INIT_CHECKPOINT = "models/init_from.pt"  # loop init --init-from: the copied checkpoint, relative to the project


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # loop.toml: `budget_per_round = true` or "7" is a mistake, not a 1 or a 7


class GatesConfig(Strict):
    macro_f1_min: float = Field(0.70, ge=0, le=1)
    defect_recall_min: float = Field(0.85, ge=0, le=1)
    negative_fpr_max: float = Field(0.03, ge=0, le=1)
    latency_ms_max: float = Field(30.0, gt=0)


# [model.training]: the types and bounds of every option the training strategies read (modeling.training registers
# their names; modeling.finetune.FinetuneConfig and its validate() are what a round applies). Checked when loop.toml is
# read, so a bad value fails there on one line naming the setting, never mid-round, and is never silently cast:
# integers are strict (epochs = 2.7 ran 2 epochs, epochs = true ran 1), booleans are not numbers.
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
# efficientnet_lite0/1/2 (and the other EfficientNet/MobileNet timm models fine-tuning supports) have 7 `blocks`
# stages. The real check, against the backbone actually built, is modeling.finetune.split_backbone
# ("trainable_stages must be in [0, N] for this backbone"); it stays for a backbone with fewer stages.
BACKBONE_STAGES = 7
TrainableStages = Annotated[int, Field(strict=True, ge=0, le=BACKBONE_STAGES)]
LearningRate = Annotated[float, Field(strict=True, gt=0, lt=1)]  # modeling.finetune requires (0, 1)
Fraction = Annotated[float, Field(strict=True, ge=0, lt=1)]
Views = StrictStr | list[StrictStr]  # a preset, a comma-separated string or a list of view names


class TrainingOptions(BaseModel):
    """Types and bounds of [model.training]. Unknown keys are reported by modeling.training.validate_training_options
    (which lists the known ones), and so are the values of its named choices (mode, balance, loss, ... with their own
    messages): this model only has to catch what that check lets through. The defaults are FinetuneConfig's (a test
    keeps them equal), for reading: a round uses [model.training] as written."""

    model_config = ConfigDict(extra="allow")

    trainable_stages: TrainableStages = 2
    unfreeze_stages: TrainableStages | None = None  # alias of trainable_stages
    train_stem: StrictBool = False
    epochs: NonNegativeInt = 6  # 0: the probe head on the frozen backbone, no fine-tuning epoch
    max_epochs: NonNegativeInt | None = None  # alias of epochs
    patience: PositiveInt = 3
    keep_epoch: StrictStr = "best"
    schedule_epochs: PositiveInt | None = None
    batch_size: PositiveInt = 32
    head_lr: LearningRate = 1e-3
    # 0 is allowed, as in modeling.finetune (the backbone's trainable stages then stay as they are)
    backbone_lr: float = Field(1e-4, strict=True, ge=0, lt=1)
    lr: Annotated[float, Field(strict=True, ge=0, lt=1)] | None = None  # alias of backbone_lr
    layer_decay: float = Field(1.0, strict=True, gt=0, le=1)  # x per stage further from the head: 0 would freeze them
    weight_decay: float = Field(1e-4, strict=True, ge=0)
    mode: StrictStr = "cached"
    augment: StrictBool | None = None  # true: mode = "augment"
    augmentation: StrictBool | Views = ()  # a preset, a comma-separated string or names; true: geometric
    cached_views: Views = ("identity", "hflip", "vflip", "rot180")
    tta: Views = ("identity",)
    balance: StrictStr = "weights"
    loss: StrictStr = "cross_entropy"
    focal_gamma: float = Field(2.0, strict=True, ge=0)
    label_smoothing: Fraction = 0.1
    dropout: Fraction = 0.2
    head_init: StrictStr = "probe"
    # a number > 0, checked by modeling.training (its message: "head_regularization must be a number > 0"); the
    # default differs by strategy (head 1.0, finetune's probe 0.1)
    head_regularization: Any = None
    batchnorm: StrictStr = "frozen"
    image_size: Annotated[int, Field(strict=True, ge=32, le=1024)] | None = None  # None: the preprocessing's size
    channels_last: StrictBool = True
    threads: PositiveInt = 2
    verbose: StrictBool = False


class ModelConfig(Strict):
    backbone: str = "efficientnet_lite0"
    weights: str = "default"  # default | none | path to a state dict
    image_size: int = Field(224, ge=32, le=1024)
    # The camera's significant bits for frames stored in 16 bits (e.g. 12 for a Mono12 camera): every such frame is
    # scaled by them. "auto" scales each frame by 12, 14 or 16 bits, the smallest that holds its largest value, and
    # keeps a frame with no value above 255 as it is, so one camera's very dark frames come out brighter than their
    # siblings (ingest warns of such a mix). A change takes effect at the next round (its caches are keyed by it).
    bit_depth: Literal["auto"] | int = "auto"
    # The frozen embedding (selection, the `head` strategy, label quality): "multilayer" pools the last four stages
    # and the head conv (average + max), "avg" only the last feature map. Multi-layer found more small defects on
    # magnetic tile at the same ONNX Runtime cost (benchmarks/feature_variants.py).
    pooling: Literal["avg", "multilayer"] = "multilayer"
    train: Literal["head", "finetune", "full"] = "head"
    # Domain transfer: the checkpoint the rounds start from. `loop init --init-from` copies the other project's
    # checkpoint into this project (models/init_from.pt, relative to the project) and keeps where it came from.
    init_from: str | None = None
    init_from_source: str | None = None
    init_from_backbone: str | None = None  # what `loop init` said of the backbone it copied (fine-tuned where, or pretrained)
    # auto: validation with >= 200 good parts, else out-of-fold (for `finetune`: a network fine-tuned per fold, on up
    # to 1000 labeled non-test images; `full` and the augment mode stay on validation unless "out_of_fold" is set)
    threshold_source: Literal["auto", "validation", "out_of_fold"] = "auto"
    threshold_confidence: float = Field(0.75, ge=0.5, lt=1)
    latency_threads: int = Field(2, ge=1, le=64)
    # Temperature scaling on data the model did not train on (validation, else out-of-fold): calibrated
    # probabilities for pre-annotations and selection; the threshold is chosen on the calibrated scores.
    calibration: Literal["temperature", "none"] = "temperature"
    # Patch-level anomaly score (modeling.anomaly): the labeled good parts' patches form a memory bank, and how far
    # an image's most unusual patch is from it is blended with the classifier's P(defect) (projects with a
    # negative class and >= 10 labeled good parts). Few defect labels (MVTec-style) is where it pays.
    anomaly: Literal["patch", "none"] = "patch"
    anomaly_bank_size: int = Field(4000, ge=100, le=100_000)
    # Options of the training strategies ([model.training] in loop.toml), e.g. epochs = 6, trainable_stages = 2,
    # mode = "augment", augmentation = "factory", tta = "flips", balance = "sampler", loss = "focal".
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("bit_depth", mode="before")
    @classmethod
    def _camera_bits(cls, value: Any) -> Any:
        # modeling.preprocessing.CAMERA_BIT_DEPTHS, not imported: every command reads loop.toml, most need no numpy
        if value == "auto" or (type(value) is int and 8 <= value <= 16):
            return value
        raise ValueError(f'must be "auto" or the camera\'s significant bits, a whole number from 8 to 16 (e.g. 12), not {value!r}')

    @property
    def camera_bit_depth(self) -> int | None:
        """bit_depth as modeling.preprocessing reads it: None for "auto"."""
        return None if self.bit_depth == "auto" else int(self.bit_depth)

    @field_validator("training")
    @classmethod
    def _known_training_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        if options:  # torch is imported only when options are set: `loop status` reads loop.toml too
            # types and bounds first (a ValidationError raised here is reported at model.training.<setting>), then
            # the strategies' own check: unknown keys, named choices, combinations
            TrainingOptions.model_validate(options)
            from modeling.training import validate_training_options

            validate_training_options(options)
        return options


class SplitConfig(Strict):
    test_fraction: float = Field(0.20, gt=0, lt=1)
    validation_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 0
    # an ingest batch mostly unlike every labeled test image (a new camera) gets test_fraction of its images drawn at
    # random into the test split, at most this many, and asked of the annotators: else the gates never measure it
    unmeasured_batch_test_sample: int = Field(200, ge=0)


BUILT_IN_STRATEGIES = frozenset({"default", "random", "margin", "entropy", "rare", "diverse"})  # modeling.selection's registry


def check_strategy_name(name: str) -> str:
    """`name` if it is a registered selection strategy, else a ValueError listing them: a typo fails when loop.toml or
    the command line is read, not after a round's training. Built-in names need no faiss import."""
    if name in BUILT_IN_STRATEGIES:
        return name
    from modeling.selection import available_strategies

    if name not in available_strategies():
        raise ValueError(f"unknown selection strategy {name!r}; available: {', '.join(available_strategies())}")
    return name


class LoopConfig(Strict):
    budget_per_round: int = Field(20, ge=0)
    # gate-aware: weighs uncertain, likely-defect, confused-good and rare-class candidates toward the gate the loop's
    # own (non-test) estimate says is failing, then a diversity filter; cold start by distance to known-good parts
    strategy: str = "default"
    relabel_budget: int = Field(0, ge=0)
    # most of the rounds' picks that may wait unanswered in the annotators' queue: a round picks fewer than
    # budget_per_round while earlier picks still wait (unset: budget_per_round, the queue is topped up to one batch;
    # below budget_per_round it caps every round's picks). At least 1: 0 would stop picking for good
    # (budget_per_round = 0 says that, if meant). The oracle answers at once: nothing of its waits
    queue_limit: int | None = Field(None, ge=1)
    seed: int = 0
    # near-duplicates (pixel-verified) and outliers every round: ~10 s for 2000 images, minutes past 50k
    data_issues: bool = True
    # after each `loop round`, delete the model files of rounds older than the newest N completed ones (0: keep all;
    # ~29 MB a round); the newest fine-tuned backbone's stays. `loop prune` does the same by hand
    keep_model_rounds: int = Field(0, ge=0)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        return check_strategy_name(name)


BUILT_IN_BACKENDS = frozenset({"none", "oracle", "labelstudio"})  # labeling's registry


def check_backend_name(name: str) -> str:
    """`name` if it is a registered annotator backend, else a ValueError listing them: a typo fails when loop.toml is
    read (QA: `backend = "cvat"` passed status and ingest and failed only at the round). Built-in names import nothing."""
    if name in BUILT_IN_BACKENDS:
        return name
    from labeling import available_backends

    if name not in available_backends():
        raise ValueError(f"unknown annotator backend {name!r}; available: {', '.join(available_backends())}")
    return name


class AnnotatorConfig(Strict):
    backend: str = "none"  # none | oracle | labelstudio
    oracle_manifest: str | None = None  # CSV path,label: ground truth the simulated annotator answers from
    oracle_noise: float = Field(0.0, ge=0, le=1)
    labelstudio_url: str | None = None  # or env LABEL_STUDIO_URL
    labelstudio_api_key: str | None = None  # or env LABEL_STUDIO_API_KEY
    labelstudio_document_root: str | None = None  # or env LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; default "/"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        return check_backend_name(name)

    @model_validator(mode="after")
    def _oracle_needs_manifest(self) -> "AnnotatorConfig":
        if self.backend == "oracle" and not self.oracle_manifest:
            raise ValueError("annotator.backend = 'oracle' needs annotator.oracle_manifest (a CSV path,label)")
        return self


class ProjectConfig(Strict):
    name: str
    classes: list[str] = Field(min_length=2)
    negative_class: str | None = None
    class_descriptions: dict[str, str] = Field(default_factory=dict)
    database_url: str | None = None  # default: sqlite:///<project dir>/loop.db; env LOOP_DATABASE_URL wins
    gates: GatesConfig = Field(default_factory=GatesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    annotator: AnnotatorConfig = Field(default_factory=AnnotatorConfig)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str]) -> list[str]:
        cleaned = [c.strip() for c in classes]
        if any(not c for c in cleaned):
            raise ValueError("class names must not be empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"duplicate class names in {cleaned}")
        by_case = Counter(c.casefold() for c in cleaned)
        if max(by_case.values(), default=0) > 1:  # QA: "crack" and "Crack" were two classes: two choices for annotators, one folder on
            clashing = [c for c in cleaned if by_case[c.casefold()] > 1]  # a case-insensitive disk
            raise ValueError(f"class names that differ only in case: {clashing}; keep one")
        return cleaned

    @field_validator("negative_class")
    @classmethod
    def _stripped_negative(cls, negative: str | None) -> str | None:
        return None if negative is None else negative.strip()  # as the classes are (QA: " free" was no class)

    @model_validator(mode="after")
    def _negative_is_a_class(self) -> "ProjectConfig":
        if self.negative_class is not None and self.negative_class not in self.classes:
            raise ValueError(f"negative_class {self.negative_class!r} is not one of the classes {self.classes}")
        unknown = set(self.class_descriptions) - set(self.classes)
        if unknown:
            raise ValueError(f"class_descriptions names unknown classes: {sorted(unknown)}")
        return self

    @property
    def negative_index(self) -> int | None:
        return None if self.negative_class is None else self.classes.index(self.negative_class)


class ConfigError(ValueError):
    """loop.toml is missing, unreadable or invalid; the message says which key and why."""


def path_beside(path: Path, folder: Path) -> str:
    """`path` relative to `folder` when it lies inside it, else absolute: a project folder (with loop.toml's oracle
    manifest) or a manifest's folder (with its images) can then move as a whole (QA: a moved demo named the old place)."""
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def config_path(project_dir: Path) -> Path:
    return project_dir / CONFIG_FILE


def load_config(project_dir: Path) -> ProjectConfig:
    path = config_path(project_dir)
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {project_dir} a defect-loop project? Create one with `loop init {project_dir} --classes ...`")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {validation_problems(error)}") from error


def validation_problems(error: ValidationError) -> str:
    """A pydantic error as one line: each setting that failed and why (no pydantic URLs, no input dumps)."""
    # a validator's own message comes as "Value error, <message>": the message is what was said
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors())


def save_config(project_dir: Path, config: ProjectConfig) -> Path:
    path = config_path(project_dir)
    path.write_text(tomli_w.dumps(config.model_dump(mode="json", exclude_none=True)))
    return path
