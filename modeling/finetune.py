"""Fine-tuning strategies: `finetune` (the last stages of the backbone + the head) and `full` (every layer, with
discriminative learning rates). Both register in the training registry and return a TrainedClassifier.

Why it is practical on 2 CPU cores: the frozen part of the network (stem + first stages) is run once per image
through ONNX Runtime and its feature maps are kept in memory (keyed by backbone, cut point, resolution and file),
so each epoch only runs the tail: the unfrozen stages forward and backward, and with multi-layer pooling the frozen
pooled stages in front of them forward only. That cache cannot coexist with input-space augmentation, so there are
two modes:
- mode="cached" (default for `finetune`): feature maps computed once; optional `cached_views` adds the feature
  maps of exact flips/turns of every training image (augmentation that a cache can hold).
- mode="augment": every epoch the training images are augmented (modeling.augmentation), pushed through the frozen
  part with ONNX Runtime, and the tail is trained on the result.
The head starts from the linear probe (the `head` strategy's logistic regression on the frozen features: "LP-FT"),
so epoch 0 of the history is "before unfreezing" and early stopping on validation macro F1 never returns a model
worse on validation than the probe.
"""
from __future__ import annotations

import copy
import hashlib
import math
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch import nn
from torch.nn import functional as F

from modeling.augmentation import build_augmentation, resolve_augmentation_names
from modeling.backbones import Backbone
from modeling.embeddings import EmbeddingExtractor, MultiLayerPooling, embedding_model_key, multilayer_pool
from modeling.onnx_export import export_onnx, open_session
from modeling.preprocessing import Preprocessing, load_image_array, to_rgb
from modeling.progress import progress_bar
from modeling.threads import torch_threads
from modeling.training import TrainingData, fit_linear_head, register_training_options, register_training_strategy, train_classifier

STEM_MODULES = ("conv_stem", "bn1")
HEAD_CONV_MODULES = ("conv_head", "bn2", "global_pool")


# ----------------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option a fine-tuning strategy reads from TrainingData.options (unknown keys are ignored: the options
    dict is shared with other strategies)."""

    # Of the backbone's `blocks` stages, counted from the end; conv_head/bn2 always train. NEU 5-fold CV on an idle
    # 2-core machine: last 2 stages, 6 epochs -> 7 errors in 1800 (5 with tta="flips"), 76-95 s per fold; last stage
    # only -> 17-19 errors. (On a busy machine 2 stages cost ~3x more per epoch than 1 with avg pooling; multi-layer
    # pooling runs the last 4 stages forward every step whatever this is, up to 4.) Re-run 2026-12-01 on an Intel
    # Xeon with the later defaults: 9 errors (6 with flips), the same per fold before and after the loss fix. With the
    # tail pooling like the `head` strategy (multi-layer, the project default): 3 errors (1 with flips), 80-119 s per fold.
    trainable_stages: int = 2
    train_stem: bool = False  # True only for `full`
    epochs: int = 6  # at most: early stopping on validation macro F1 may stop sooner
    patience: int = 3
    # best: the epoch early stopping keeps (validation macro F1, else training loss); last: a fixed count of epochs
    # (the out-of-fold fold networks, which replay the deployed network's kept epoch and have no validation)
    keep_epoch: str = "best"
    schedule_epochs: int | None = None  # the cosine learning-rate decay is planned over this many epochs (None: epochs)
    batch_size: int = 32
    head_lr: float = 1e-3
    backbone_lr: float = 1e-4
    layer_decay: float = 1.0  # learning rate x layer_decay per stage further from the head (discriminative LRs)
    weight_decay: float = 1e-4
    mode: str = "cached"  # cached | augment
    augmentation: tuple[str, ...] = ()  # transform names (mode="augment")
    # Exact flips/turns whose frozen feature maps are cached per training image (mode="cached"): augmentation a cache
    # can hold. Without it the probe head already fits the training set and fine-tuning has little to learn.
    cached_views: tuple[str, ...] = ("identity", "hflip", "vflip", "rot180")
    tta: tuple[str, ...] = ("identity",)  # test-time augmentation: logits averaged over these exact views (exported too)
    balance: str = "weights"  # weights (class-weighted loss) | sampler (class-balanced sampling) | none
    loss: str = "cross_entropy"  # cross_entropy | focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.1  # keeps a training signal once the training set is separable
    dropout: float = 0.2
    head_init: str = "probe"  # probe (linear probe on frozen features) | random
    head_regularization: float = 0.1  # C of the probe's logistic regression (weaker probe: room for fine-tuning)
    batchnorm: str = "frozen"  # frozen (running stats kept, affine trained) | train
    image_size: int | None = None  # None: the preprocessing's size; else the network resizes its input to this
    channels_last: bool = True
    threads: int = 2
    verbose: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any], **defaults: Any) -> "FinetuneConfig":
        values = {**defaults}
        aliases = {"unfreeze_stages": "trainable_stages", "lr": "backbone_lr", "max_epochs": "epochs"}
        for key, value in options.items():
            key = aliases.get(key, key)
            if key in cls.__dataclass_fields__:
                values[key] = value
        if "augment" in options and "mode" not in options:  # augment=True/False: the switch a CLI flag gives
            values["mode"] = "augment" if options["augment"] else "cached"
        if options.get("augmentation") and values.get("mode", cls.mode) != "augment":
            # the cached mode trains on feature maps computed once: an augmentation list there would be ignored silently
            raise ValueError(f"augmentation {options['augmentation']!r} is applied only with mode = \"augment\" (input-space, every epoch); "
                             "set mode = \"augment\", or use cached_views for the cached mode's exact flips and turns")
        if values.get("mode", cls.mode) == "augment" and not values.get("augmentation"):
            values["augmentation"] = "geometric"
        values["augmentation"] = tuple(resolve_augmentation_names(values.get("augmentation") or None))
        views = values.get("cached_views", cls.cached_views)
        if isinstance(views, str):
            views = VIEW_PRESETS.get(views) or tuple(part.strip() for part in views.split(",") if part.strip())
        # identity first (its maps are the training maps the others are compared with), each view once
        values["cached_views"] = tuple(dict.fromkeys(("identity", *views))) if "identity" in views else tuple(views)
        tta = values.get("tta", cls.tta)
        if isinstance(tta, str):
            tta = VIEW_PRESETS.get(tta) or tuple(part.strip() for part in tta.split(",") if part.strip())
        values["tta"] = tuple(tta)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        problems = []
        if self.mode not in ("cached", "augment"):
            problems.append(f"mode must be 'cached' or 'augment', got {self.mode!r}")
        if self.balance not in ("weights", "sampler", "none"):
            problems.append(f"balance must be weights|sampler|none, got {self.balance!r}")
        if self.loss not in ("cross_entropy", "focal"):
            problems.append(f"loss must be cross_entropy|focal, got {self.loss!r}")
        if self.head_init not in ("probe", "random"):
            problems.append(f"head_init must be probe|random, got {self.head_init!r}")
        if self.batchnorm not in ("frozen", "train"):
            problems.append(f"batchnorm must be frozen|train, got {self.batchnorm!r}")
        unknown_views = [view for view in self.cached_views if view not in VIEWS]
        if unknown_views or "identity" not in self.cached_views:
            problems.append(f"cached_views must include 'identity' and come from {', '.join(VIEWS)}; got {list(self.cached_views)}")
        if not self.tta or any(view not in VIEWS for view in self.tta):
            problems.append(f"tta views must come from {', '.join(VIEWS)} (or a preset: {', '.join(VIEW_PRESETS)}); got {list(self.tta)}")
        if int(self.epochs) < 0 or int(self.batch_size) < 1 or int(self.patience) < 1:
            problems.append("epochs >= 0, batch_size >= 1 and patience >= 1 are required")
        if self.keep_epoch not in ("best", "last"):
            problems.append(f"keep_epoch must be best|last, got {self.keep_epoch!r}")
        if self.schedule_epochs is not None and int(self.schedule_epochs) < int(self.epochs):
            problems.append(f"schedule_epochs ({self.schedule_epochs}) must be at least epochs ({self.epochs})")
        if not (0 < float(self.head_lr) < 1 and 0 <= float(self.backbone_lr) < 1):
            problems.append(f"learning rates must be in (0, 1): head_lr={self.head_lr}, backbone_lr={self.backbone_lr}")
        if self.image_size is not None and not 32 <= int(self.image_size) <= 1024:
            problems.append(f"image_size must be in [32, 1024], got {self.image_size}")
        if problems:
            raise ValueError("invalid fine-tuning options: " + "; ".join(problems))


# Exact, label-preserving views whose frozen feature maps the cache can hold (square images: turns keep the size).
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "rot180": lambda x: torch.flip(x, dims=(-2, -1)),
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: torch.rot90(x, 1, dims=(-2, -1)).flip(dims=(-1,)),
}
VIEW_PRESETS: dict[str, tuple[str, ...]] = {
    "identity": ("identity",),
    "none": ("identity",),
    "flips": ("identity", "hflip", "vflip", "rot180"),
    "dihedral": tuple(VIEWS),
}


# ----------------------------------------------------------------------------------------------------------------
# The network: frozen prefix -> tail (trainable stages, and with multi-layer pooling the frozen pooled stages before
# them) -> L2-normalised pooled features -> linear head


class ResizeInput(nn.Module):
    """Bilinear resize to the training resolution (identity when the input already has it); exported to ONNX."""

    def __init__(self, size: int | None):
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is None or tuple(images.shape[-2:]) == (self.size, self.size):
            return images
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)


class FinetunedNetwork(nn.Module):
    """images (NCHW, normalised) -> logits. `prefix` is frozen; `head` and the tail's trainable modules train."""

    def __init__(self, prefix: nn.Module, tail: nn.Module, head: nn.Linear, *, dropout: float = 0.0, tta: Sequence[str] = ("identity",)):
        super().__init__()
        self.prefix = prefix
        self.tail = tail
        self.dropout = nn.Dropout(dropout)
        self.head = head
        self.tta = tuple(tta)

    def pooled_features(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tail(feature_maps), dim=1)

    def logits_from_feature_maps(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled_features(feature_maps)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = [self.logits_from_feature_maps(self.prefix(VIEWS[view](images))) for view in self.tta]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(dim=0)


class ProbabilityNetwork(nn.Module):
    """What is exported to ONNX: images -> calibrated class probabilities."""

    def __init__(self, network: FinetunedNetwork, temperature: float = 1.0):
        super().__init__()
        self.network = network
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(images) / self.temperature, dim=1)


def backbone_stage_count(model: nn.Module) -> int:
    return len(model.blocks)  # type: ignore[arg-type]


class MultiLayerTail(nn.Module):
    """The tail for multi-layer pooling: the pooled stages and the head conv, giving MultiLayerPooling's vector, so
    the fine-tuned network starts from the very features the `head` strategy trains on. Pooled stages in front of
    the trainable ones stay frozen but run every step: the cache holds the maps before the first pooled stage."""

    def __init__(self, stem: Sequence[nn.Module], stages: Sequence[nn.Module], *, pooled_from: int, conv_head: nn.Module, bn2: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList(stages)
        self.pooled_from = pooled_from
        self.conv_head = conv_head
        self.bn2 = bn2

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        x = self.stem(feature_maps)
        parts = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= self.pooled_from:
                parts.append(x)
        parts.append(self.bn2(self.conv_head(x)))
        return multilayer_pool(parts)


def split_backbone(model: nn.Module, *, trainable_stages: int, train_stem: bool = False, image_size: int | None = None,
                   pooled_stages: int = 0) -> tuple[nn.Sequential, nn.Module]:
    """(frozen prefix, tail) sharing the model's modules, for timm's EfficientNet/MobileNet family.

    trainable_stages counts `blocks` stages from the end (0: only conv_head/bn2 train); train_stem trains everything.
    pooled_stages: 0 = the tail ends in conv_head's global average; N = multi-layer pooling of the last N stages and
    conv_head (MultiLayerTail), and the tail starts at the first pooled stage even where that stage stays frozen."""
    missing = [name for name in (*STEM_MODULES, "blocks", *HEAD_CONV_MODULES) if not hasattr(model, name)]
    if missing:
        raise ValueError(f"fine-tuning needs a timm EfficientNet/MobileNet-style model; {type(model).__name__} lacks {missing}")
    stages = list(model.blocks)  # type: ignore[arg-type]
    if not 0 <= trainable_stages <= len(stages):
        raise ValueError(f"trainable_stages must be in [0, {len(stages)}] for this backbone, got {trainable_stages}")
    cut = 0 if train_stem else len(stages) - tail_stage_count(len(stages), trainable_stages=trainable_stages, pooled_stages=pooled_stages)
    stem = [getattr(model, name) for name in STEM_MODULES]
    prefix = nn.Sequential(ResizeInput(image_size), *([] if train_stem else stem), *stages[:cut])
    if pooled_stages:
        tail: nn.Module = MultiLayerTail(stem if train_stem else [], stages[cut:], pooled_from=max(0, len(stages) - pooled_stages - cut),
                                         conv_head=model.conv_head, bn2=model.bn2)
    else:
        tail = nn.Sequential(*(stem if train_stem else []), *stages[cut:], *[getattr(model, name) for name in HEAD_CONV_MODULES])
    return prefix, tail


def tail_stage_count(n_stages: int, *, trainable_stages: int, pooled_stages: int) -> int:
    """Stages in the tail (not counting the stem): the trainable ones, or all pooled ones if that is more."""
    return max(trainable_stages, min(pooled_stages, n_stages))


def trainable_modules(model: nn.Module, *, trainable_stages: int, train_stem: bool = False) -> list[nn.Module]:
    """What fine-tuning updates: the last trainable_stages stages and the head conv (and the stem with train_stem)."""
    stages = list(model.blocks)  # type: ignore[arg-type]
    if train_stem:
        return [getattr(model, name) for name in STEM_MODULES] + stages + [getattr(model, name) for name in HEAD_CONV_MODULES]
    return stages[len(stages) - trainable_stages:] + [getattr(model, name) for name in HEAD_CONV_MODULES]


def pooled_stage_count(backbone: Backbone) -> int:
    return MultiLayerPooling.N_STAGES if backbone.pooling == "multilayer" else 0


def _freeze_batchnorm_statistics(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


# ----------------------------------------------------------------------------------------------------------------
# Frozen-prefix feature maps: computed with ONNX Runtime, kept in memory across rounds, folds and strategies


class _MemoryCache:
    """Insertion-ordered, bounded by bytes: the oldest entries go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        return self._items.get(key)

    def put(self, key: tuple, value: np.ndarray) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


FEATURE_MAP_CACHE = _MemoryCache(max_bytes=3 << 30)
_PREFIX_SESSIONS: dict[str, Any] = {}
_ONNX_DIR: Path | None = None


def _file_key(path: str) -> tuple:
    stat = Path(path).stat()
    return (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def _is_trivial(prefix: nn.Sequential) -> bool:
    return all(isinstance(module, ResizeInput) for module in prefix)


class PrefixRunner:
    """Runs the frozen prefix on normalised images: ONNX Runtime when it has layers, torch for a bare resize."""

    def __init__(self, prefix: nn.Sequential, *, key: str, image_size: int, threads: int):
        self.prefix = prefix.eval()
        self.key = key
        self.session = None
        if not _is_trivial(prefix):
            session_key = f"{key}-s{image_size}"  # the export fixes height and width
            if session_key not in _PREFIX_SESSIONS:
                global _ONNX_DIR
                _ONNX_DIR = _ONNX_DIR or Path(tempfile.mkdtemp(prefix="defect-loop-prefix-"))
                digest = hashlib.sha256(session_key.encode()).hexdigest()[:16]
                path = export_onnx(prefix, _ONNX_DIR / f"prefix-{digest}.onnx", image_size=image_size, output_name="features")
                _PREFIX_SESSIONS[session_key] = open_session(path, threads=threads)
            self.session = _PREFIX_SESSIONS[session_key]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.session is not None:
            return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]
        with torch.no_grad():
            return self.prefix(torch.from_numpy(images)).numpy()


def _prefix_key(backbone: Backbone, *, trainable_stages: int, train_stem: bool, resize_to: int | None, pooled_stages: int = 0) -> str:
    n_stages = backbone_stage_count(backbone.model)
    cut_name = "all" if train_stem else f"last{tail_stage_count(n_stages, trainable_stages=trainable_stages, pooled_stages=pooled_stages)}"
    # The prefix's maps depend on the weights and where the prefix ends (multi-layer pooling can move that), nothing else.
    return f"{backbone.name}-{backbone.weights_id}-{cut_name}-r{resize_to or 'same'}"


def frozen_embeddings(backbone: Backbone, preprocessing: Preprocessing, paths: Sequence[str], *, trainable_stages: int = 2, threads: int = 2) -> np.ndarray:
    """The frozen backbone's L2-normalised pooled features (what the `head` strategy trains on), computed from the
    same cached prefix feature maps fine-tuning uses, so one pass of the frozen part serves both. Multi-layer pooling
    reads stages inside the frozen prefix: those embeddings come from the ONNX embedding network instead."""
    if backbone.pooling != "avg":
        return _cached_network_embeddings(backbone, preprocessing, list(paths))
    model = copy.deepcopy(backbone.model).eval()
    prefix, tail = split_backbone(model, trainable_stages=trainable_stages)
    key = _prefix_key(backbone, trainable_stages=trainable_stages, train_stem=False, resize_to=None)
    runner = PrefixRunner(prefix, key=key, image_size=preprocessing.image_size, threads=threads)
    maps = prefix_feature_maps(runner, list(paths), preprocessing)
    network = FinetunedNetwork(prefix, tail, nn.Linear(backbone.num_features, 1))
    with torch_threads(threads):
        return _pooled_features(network, maps, batch_size=64, channels_last=False).astype(np.float32)


def _cached_network_embeddings(backbone: Backbone, preprocessing: Preprocessing, paths: list[str]) -> np.ndarray:
    """Embeddings from the ONNX embedding network, kept in the same memory cache as the feature maps: cross-validation
    asks for the same images fold after fold."""
    extractor = _embedding_extractor(backbone, preprocessing)
    keys = [("embedding", extractor.model_key, *_file_key(path)) for path in paths]
    found = [FEATURE_MAP_CACHE.get(key) for key in keys]
    missing = [i for i, vector in enumerate(found) if vector is None]
    if missing:
        for i, vector in zip(missing, extractor.embed([paths[i] for i in missing], show_progress=False)):
            found[i] = vector
            FEATURE_MAP_CACHE.put(keys[i], vector)
    return np.stack(found).astype(np.float32) if found else np.zeros((0, 0), dtype=np.float32)


def _normalised_image(path: str, preprocessing: Preprocessing) -> np.ndarray:
    return load_image_array(path, preprocessing)


def _uint8_image(path: str, size: int, bit_depth: int | None = None) -> np.ndarray:
    key = ("uint8", size, bit_depth, *_file_key(path))
    cached = FEATURE_MAP_CACHE.get(key)
    if cached is None:
        with Image.open(path) as image:  # the same decode and resize as modeling.preprocessing, before normalisation
            cached = np.ascontiguousarray(np.asarray(to_rgb(image, bit_depth=bit_depth).resize((size, size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1))
        FEATURE_MAP_CACHE.put(key, cached)
    return cached


def prefix_feature_maps(runner: PrefixRunner, paths: Sequence[str], preprocessing: Preprocessing, *, view: str = "identity", batch_size: int = 32) -> np.ndarray:
    """(n, C, H, W) float32 frozen feature maps of the images (optionally of one exact view of them), cached."""
    keys = [(runner.key, preprocessing.key, view, *_file_key(path)) for path in paths]
    missing = [i for i, key in enumerate(keys) if FEATURE_MAP_CACHE.get(key) is None]
    transform = VIEWS[view]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        images = torch.from_numpy(np.stack([_normalised_image(paths[i], preprocessing) for i in chunk]))
        features = runner(transform(images).contiguous().numpy())
        for i, feature_map in zip(chunk, features):
            FEATURE_MAP_CACHE.put(keys[i], np.ascontiguousarray(feature_map))
    return np.stack([FEATURE_MAP_CACHE.get(key) for key in keys]) if keys else np.zeros((0,), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The trained classifier


@dataclass
class FinetunedClassifier:
    class_names: list[str]
    network: FinetunedNetwork
    backbone: Backbone  # the fine-tuned timm model (shares modules with `network`), for checkpoints and transfer
    preprocessing: Preprocessing
    strategy: str
    config: dict[str, Any]
    prefix_key: str
    temperature: float = 1.0
    # One row per epoch (0 = before any update): train_loss is the training objective (class weights, label
    # smoothing, focal), val_loss plain cross-entropy; val_macro_f1 drives early stopping.
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    validation_logits: np.ndarray | None = None  # of the kept (best) epoch: for fit_temperature
    timings: dict[str, float] = field(default_factory=dict)
    uses_frozen_embeddings: bool = False

    def predict_proba_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            f"the {self.strategy!r} model changed its backbone: frozen embeddings no longer describe it; "
            "use predict_proba_paths() or the exported ONNX model"
        )

    def to_torch_module(self) -> nn.Module:
        network = copy.deepcopy(self.network).eval().to(memory_format=torch.contiguous_format)
        return ProbabilityNetwork(network, self.temperature).eval()

    @property
    def head_weight(self) -> np.ndarray:
        return self.network.head.weight.detach().numpy().copy()

    @property
    def head_bias(self) -> np.ndarray:
        return self.network.head.bias.detach().numpy().copy()

    @property
    def head_features(self) -> str:
        """What the head's rows are on: the network's multi-layer pooled features, or conv_head's average."""
        return "multilayer" if isinstance(self.network.tail, MultiLayerTail) else "avg"

    def _runner(self) -> PrefixRunner:
        return PrefixRunner(self.network.prefix, key=self.prefix_key, image_size=self.preprocessing.image_size, threads=int(self.config.get("threads", 2)))

    def predict_logits_paths(self, paths: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Logits (test-time views averaged, as the exported network does) from cached frozen feature maps."""
        return _tta_logits(self.network, self._runner(), list(paths), self.preprocessing, batch_size=batch_size,
                           channels_last=bool(self.config.get("channels_last", True)))

    def predict_proba_paths(self, paths: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        logits = self.predict_logits_paths(paths, batch_size=batch_size)
        return _softmax(logits / self.temperature)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _as_input(feature_maps: np.ndarray, channels_last: bool) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(feature_maps))
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.dim() == 4 else tensor


def _tail_logits(network: FinetunedNetwork, feature_maps: np.ndarray, *, batch_size: int, channels_last: bool) -> np.ndarray:
    was_training = network.training
    network.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(feature_maps), batch_size):
            outputs.append(network.logits_from_feature_maps(_as_input(feature_maps[start : start + batch_size], channels_last)).numpy())
    network.train(was_training)
    n_classes = network.head.out_features
    return np.concatenate(outputs).astype(np.float64) if outputs else np.zeros((0, n_classes))


def _tta_logits(network: FinetunedNetwork, runner: PrefixRunner, paths: list[str], preprocessing: Preprocessing, *, batch_size: int, channels_last: bool) -> np.ndarray:
    total = None
    for view in network.tta:
        maps = prefix_feature_maps(runner, paths, preprocessing, view=view)
        logits = _tail_logits(network, maps, batch_size=batch_size, channels_last=channels_last)
        total = logits if total is None else total + logits
    return total / len(network.tta)


def _pooled_features(network: FinetunedNetwork, feature_maps: np.ndarray, *, batch_size: int, channels_last: bool) -> np.ndarray:
    network.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(feature_maps), batch_size):
            outputs.append(network.pooled_features(_as_input(feature_maps[start : start + batch_size], channels_last)).numpy())
    return np.concatenate(outputs)


def predict_proba_paths(classifier: Any, paths: Sequence[str], preprocessing: Preprocessing | None = None) -> np.ndarray:
    """Class probabilities for image files from any TrainedClassifier: fine-tuned ones through the cached frozen
    prefix + tail, frozen-embedding ones through the ONNX embedding network."""
    if hasattr(classifier, "predict_proba_paths"):
        return classifier.predict_proba_paths(list(paths))
    if getattr(classifier, "uses_frozen_embeddings", False):
        if preprocessing is None:
            raise ValueError("a frozen-embedding classifier needs the preprocessing its embeddings were computed with")
        extractor = _embedding_extractor(classifier.backbone, preprocessing)
        return classifier.predict_proba_from_embeddings(extractor.embed(list(paths), show_progress=False))
    raise TypeError(f"cannot predict from paths with {type(classifier).__name__}")


_EXTRACTORS: dict[str, Any] = {}


def _embedding_extractor(backbone: Backbone, preprocessing: Preprocessing) -> Any:
    key = embedding_model_key(backbone, preprocessing)
    if key not in _EXTRACTORS:
        global _ONNX_DIR
        _ONNX_DIR = _ONNX_DIR or Path(tempfile.mkdtemp(prefix="defect-loop-prefix-"))
        _EXTRACTORS[key] = EmbeddingExtractor(backbone, preprocessing, onnx_dir=_ONNX_DIR)
    return _EXTRACTORS[key]


# ----------------------------------------------------------------------------------------------------------------
# Training


class ClassWeightedCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy, each image weighted by the weight of its true class (mean over the weights).

    Not nn.CrossEntropyLoss(weight=..., label_smoothing=...): PyTorch weights the smoothing term of every class by
    that class's own weight, so with imbalanced weights (magnetic tile: fray ~7, free ~0.2) the smoothing term
    dominates and pulls every image toward the rare classes. Fine-tuning with it fell from 0.986 to 0.57 validation
    accuracy within one epoch on magnetic tile (backbone lr 1e-4; to 0.86 even at 1e-6)."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None)
        self.label_smoothing = label_smoothing

    def per_image(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.per_image(logits, labels)
        if self.weight is not None:
            weights = self.weight[labels]
            return (loss * weights).sum() / weights.sum().clamp(min=1e-12)
        return loss.mean()


class FocalLoss(ClassWeightedCrossEntropy):
    """Cross-entropy down-weighting easy examples by (1 - p_true)^gamma (Lin et al., 2017); class weights optional."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__(weight, label_smoothing)
        self.gamma = gamma

    def per_image(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p_true = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        return (1.0 - p_true).clamp(min=0.0) ** self.gamma * super().per_image(logits, labels)


def training_criterion(config: FinetuneConfig, labels: np.ndarray, n_classes: int) -> ClassWeightedCrossEntropy:
    """The training objective: class weights per `balance`, label smoothing, focal if asked."""
    weights = class_weights(labels, n_classes) if config.balance == "weights" else None
    weight_tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    if config.loss == "focal":
        return FocalLoss(config.focal_gamma, weight_tensor, config.label_smoothing)
    return ClassWeightedCrossEntropy(weight_tensor, config.label_smoothing)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (classes present x count): every present class weighs the same in the loss; absent classes get 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def balanced_sample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An epoch's indices (as many as images) drawn with replacement so that every class is equally likely."""
    counts = np.bincount(labels)
    probabilities = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=probabilities / probabilities.sum())


def _parameter_groups(model: nn.Module, head: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Head at head_lr; conv_head/bn2 at backbone_lr; stage i at backbone_lr x layer_decay^(distance from the end);
    the stem lowest. Only parameters that require grad are listed."""
    stages = list(model.blocks)  # type: ignore[arg-type]
    groups: list[dict] = [{"params": list(head.parameters()), "lr": config.head_lr, "weight_decay": config.weight_decay, "name": "head"}]
    groups.append({"params": [p for name in HEAD_CONV_MODULES for p in getattr(model, name).parameters()], "lr": config.backbone_lr, "name": "conv_head"})
    for index, stage in enumerate(stages):
        distance = len(stages) - index
        groups.append({"params": list(stage.parameters()), "lr": config.backbone_lr * config.layer_decay ** distance, "name": f"blocks.{index}"})
    groups.append({"params": [p for name in STEM_MODULES for p in getattr(model, name).parameters()], "lr": config.backbone_lr * config.layer_decay ** (len(stages) + 1), "name": "stem"})
    kept = []
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
        group.setdefault("weight_decay", config.weight_decay)
        if group["params"] and group["lr"] > 0:
            group["initial_lr"] = group["lr"]
            kept.append(group)
    return kept


@dataclass
class _EpochStats:
    loss: float
    accuracy: float


def _evaluate(network: FinetunedNetwork, feature_maps: np.ndarray, labels: np.ndarray, *, config: FinetuneConfig) -> tuple[dict[str, float], np.ndarray]:
    logits = _tail_logits(network, feature_maps, batch_size=64, channels_last=config.channels_last)
    if len(labels) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}, logits
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    predictions = logits.argmax(axis=1)
    present = sorted(set(labels.tolist()))
    return {
        "loss": loss,
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(f1_score(labels, predictions, labels=present, average="macro", zero_division=0)),
    }, logits


def train_finetuned(data: TrainingData, config: FinetuneConfig, *, strategy: str) -> FinetunedClassifier:
    """Shared trainer of `finetune`, `full` and the from-scratch baseline."""
    started = time.perf_counter()
    torch.manual_seed(data.seed)
    rng = np.random.default_rng(data.seed)
    with torch_threads(config.threads):
        return _train(data, config, strategy=strategy, rng=rng, started=started)


def _train(data: TrainingData, config: FinetuneConfig, *, strategy: str, rng: np.random.Generator, started: float) -> FinetunedClassifier:
    n_classes = len(data.class_names)
    train_labels = np.asarray(data.train_labels, dtype=np.int64)
    validation_labels = np.asarray(data.validation_labels, dtype=np.int64)
    if len(train_labels) != len(data.train_paths) or len(validation_labels) != len(data.validation_paths):
        raise ValueError("train/validation labels must align with their paths")
    if len(train_labels) and (train_labels.min() < 0 or train_labels.max() >= n_classes):
        raise ValueError(f"train labels must be class indices in [0, {n_classes})")

    # Never touch the caller's backbone: the loop keeps using it for frozen embeddings.
    model = copy.deepcopy(data.backbone.model).float()
    image_size = int(config.image_size or data.preprocessing.image_size)
    resize_to = image_size if image_size != data.preprocessing.image_size else None
    pooled_stages = pooled_stage_count(data.backbone)
    prefix, tail = split_backbone(model, trainable_stages=config.trainable_stages, train_stem=config.train_stem, image_size=resize_to,
                                  pooled_stages=pooled_stages)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = trainable_modules(model, trainable_stages=config.trainable_stages, train_stem=config.train_stem)
    for module in trained:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    trained_ids = {id(module) for module in trained}
    frozen_in_tail = [module for module in (tail.stages if isinstance(tail, MultiLayerTail) else []) if id(module) not in trained_ids]
    with torch.no_grad():  # the pooled width: conv_head's channels, or the multi-layer concatenation
        feature_width = int(tail.eval()(prefix.eval()(torch.zeros(1, 3, image_size, image_size))).flatten(1).shape[1])
    head = nn.Linear(feature_width, n_classes)
    network = FinetunedNetwork(prefix, tail, head, dropout=config.dropout, tta=config.tta)
    if config.channels_last:
        tail.to(memory_format=torch.channels_last)
    prefix_key = _prefix_key(data.backbone, trainable_stages=config.trainable_stages, train_stem=config.train_stem, resize_to=resize_to,
                             pooled_stages=pooled_stages)
    runner = PrefixRunner(prefix, key=prefix_key, image_size=data.preprocessing.image_size, threads=config.threads)

    # Frozen feature maps of the original images: validation always, training for the probe and cached mode.
    t0 = time.perf_counter()
    train_maps = prefix_feature_maps(runner, data.train_paths, data.preprocessing)
    validation_maps = prefix_feature_maps(runner, data.validation_paths, data.preprocessing)
    view_maps = [train_maps]
    view_names = list(config.cached_views) if config.mode == "cached" else ["identity"]
    for view in view_names[1:]:
        view_maps.append(prefix_feature_maps(runner, data.train_paths, data.preprocessing, view=view))
    feature_seconds = time.perf_counter() - t0

    head_record: dict[str, Any] = {}
    head_start = _initialise_head(network, data=data, train_maps=train_maps, train_labels=train_labels, validation_maps=validation_maps,
                                  validation_labels=validation_labels, config=config, rng=rng, record=head_record)
    train_metrics, train_logits = _evaluate(network, train_maps, train_labels, config=config)  # epoch 0, and the view check's baseline
    view_maps, view_check = _drop_views_that_change_the_answer(network, view_names, view_maps, train_labels, config=config,
                                                               head_is_trained=head_start != "random", identity_logits=train_logits)
    dropped = set(view_names) - set(view_check["kept"])
    network.tta = tuple(view for view in network.tta if view not in dropped) or ("identity",)  # nor averaged at test time
    view_check["tta"] = list(network.tta)

    criterion = training_criterion(config, train_labels, n_classes)

    groups = _parameter_groups(model, head, config)
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = max(1, math.ceil(len(train_labels) / config.batch_size))
    total_steps = max(1, steps_per_epoch * int(config.schedule_epochs or config.epochs))
    augment = build_augmentation(list(config.augmentation), image_size=data.preprocessing.image_size) if config.mode == "augment" else None
    mean = torch.tensor(data.preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data.preprocessing.std, dtype=torch.float32).view(3, 1, 1)

    def training_batch(indices: np.ndarray) -> torch.Tensor:
        if augment is None:
            views = rng.integers(0, len(view_maps), size=len(indices))
            maps = np.stack([view_maps[v][i] for v, i in zip(views, indices)])
        else:
            images = []
            for i in indices:
                image = torch.from_numpy(_uint8_image(data.train_paths[i], data.preprocessing.image_size, data.preprocessing.bit_depth)).float().div_(255.0)
                images.append((augment(image) - mean) / std)
            maps = runner(torch.stack(images).numpy())
        return _as_input(maps, config.channels_last)

    history: list[dict[str, float]] = []
    val_metrics, val_logits = _evaluate(network, validation_maps, validation_labels, config=config)
    if len(train_labels):  # epoch 0 on the same scale as the later epochs: the training objective, not plain CE
        with torch.no_grad():
            train_metrics["loss"] = float(criterion(torch.from_numpy(train_logits).float(), torch.from_numpy(train_labels)).item())
    history.append(_history_row(0, train_metrics["loss"], train_metrics["accuracy"], val_metrics, time.perf_counter() - started))
    _report(config, history[-1])
    best = _Best(epoch=0, score=_score(val_metrics, train_metrics), state=copy.deepcopy(network.state_dict()), logits=val_logits)
    if head_start == "random" and int(config.epochs) > 0:
        best.score = (-math.inf,)  # a random head is not a model worth keeping: any trained epoch beats it
    step = 0
    epochs_without_gain = 0
    for epoch in range(1, int(config.epochs) + 1):
        epoch_start = time.perf_counter()
        network.train()
        if config.batchnorm == "frozen":
            _freeze_batchnorm_statistics(network)
        for module in frozen_in_tail:  # frozen pooled stages run as at inference (BatchNorm statistics untouched)
            module.eval()
        order = balanced_sample(train_labels, rng) if config.balance == "sampler" else rng.permutation(len(train_labels))
        total_loss, correct, seen = 0.0, 0, 0
        for start in range(0, len(order), config.batch_size):
            indices = order[start : start + config.batch_size]
            if len(indices) < 2 and len(order) > 1:
                continue  # a batch of one gives BatchNorm (train mode) nothing to normalise over
            inputs = training_batch(indices)
            targets = torch.from_numpy(train_labels[indices])
            for group in optimizer.param_groups:  # cosine decay over the planned steps
                group["lr"] = group["initial_lr"] * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
            logits = network.logits_from_feature_maps(inputs)
            loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total_loss += float(loss.item()) * len(indices)
            correct += int((logits.argmax(dim=1) == targets).sum())
            seen += len(indices)
        val_metrics, val_logits = _evaluate(network, validation_maps, validation_labels, config=config)
        train_stats = _EpochStats(total_loss / max(seen, 1), correct / max(seen, 1))
        history.append(_history_row(epoch, train_stats.loss, train_stats.accuracy, val_metrics, time.perf_counter() - epoch_start))
        _report(config, history[-1])
        score = _score(val_metrics, {"loss": train_stats.loss, "accuracy": train_stats.accuracy})
        if score > best.score or config.keep_epoch == "last":
            best = _Best(epoch=epoch, score=score, state=copy.deepcopy(network.state_dict()), logits=val_logits)
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
            if epochs_without_gain >= config.patience:
                break
    network.load_state_dict(best.state)
    network.eval()
    if network.tta != ("identity",) and len(validation_labels):
        # Validation logits as deployment computes them (views averaged): what temperature and threshold see.
        best.logits = _tta_logits(network, runner, list(data.validation_paths), data.preprocessing, batch_size=64, channels_last=config.channels_last)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    tuned_backbone = Backbone(
        data.backbone.name, model, data.backbone.num_features, f"{strategy}-{_state_digest(model)}", data.backbone.mean, data.backbone.std,
        data.backbone.pooling,
    )
    config_dict = {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.__dict__.items()}
    config_dict["head_transferred"] = head_start == "transferred"
    config_dict["head_start"] = head_start  # replayed by the out-of-fold networks
    config_dict.update(head_record)
    config_dict["view_check"] = view_check
    return FinetunedClassifier(
        class_names=list(data.class_names), network=network, backbone=tuned_backbone, preprocessing=data.preprocessing,
        strategy=strategy, config=config_dict, prefix_key=prefix_key, history=history, best_epoch=best.epoch,
        validation_logits=best.logits if len(validation_labels) else None,
        timings={"feature_map_seconds": feature_seconds, "total_seconds": time.perf_counter() - started},
    )


# A cached view is kept only if the starting head classifies the flipped/turned training images almost as well as
# the originals, per class (balanced accuracy: a flip that misreads only the rare class must count). Magnetic tile
# (orientation carries information there): accuracy 0.998 on the originals, 0.80-0.87 on their flips; training on
# those views held training accuracy at 0.69-0.87 for 15 epochs and validation macro F1 at 0.73-0.87 (probe: 0.965),
# while identity-only training recovered to 0.956 by epoch 4. NEU keeps all four views (0.997). The identity score is
# in-sample for a probe, so the tolerance is loose, and a few extra misreads never drop a view on a small pool.
VIEW_BALANCED_ACCURACY_TOLERANCE = 0.05
VIEW_MIN_EXTRA_ERRORS = 3


def _drop_views_that_change_the_answer(network: FinetunedNetwork, view_names: list[str], view_maps: list[np.ndarray], labels: np.ndarray, *,
                                       config: FinetuneConfig, head_is_trained: bool, identity_logits: np.ndarray | None = None,
                                       ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(the maps of the kept views, a record: balanced accuracy and errors per view, kept views, test-time views)."""
    if len(view_names) == 1 or not head_is_trained or len(labels) == 0:
        return view_maps, {"kept": list(view_names), "balanced_accuracy": {}, "errors": {}}
    balanced, errors = {}, {}
    for name, maps in zip(view_names, view_maps):
        logits = identity_logits if name == "identity" and identity_logits is not None else _tail_logits(
            network, maps, batch_size=64, channels_last=config.channels_last)
        predictions = logits.argmax(axis=1)
        balanced[name] = float(balanced_accuracy_score(labels, predictions))
        errors[name] = int((predictions != labels).sum())
    kept = [name for name in view_names if name == "identity" or balanced[name] >= balanced["identity"] - VIEW_BALANCED_ACCURACY_TOLERANCE
            or errors[name] - errors["identity"] < VIEW_MIN_EXTRA_ERRORS]
    if config.verbose:
        print(f"cached views: balanced accuracy of the starting head {balanced}; kept {kept}", flush=True)
    return [maps for name, maps in zip(view_names, view_maps) if name in kept], {"kept": kept, "balanced_accuracy": balanced, "errors": errors}


@dataclass
class _Best:
    epoch: int
    score: tuple
    state: dict
    logits: np.ndarray


def _score(val_metrics: dict[str, float], train_metrics: dict[str, float]) -> tuple:
    """Higher is better: validation macro F1, then lower validation loss; without validation, the training loss."""
    if math.isnan(val_metrics["macro_f1"]):
        return (-train_metrics["loss"],)
    return (round(val_metrics["macro_f1"], 6), -val_metrics["loss"])


def _history_row(epoch: int, train_loss: float, train_accuracy: float, val_metrics: dict[str, float], seconds: float) -> dict[str, float]:
    return {
        "epoch": epoch, "train_loss": float(train_loss), "train_accuracy": float(train_accuracy),
        "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"], "val_macro_f1": val_metrics["macro_f1"],
        "seconds": float(seconds),
    }


def _report(config: FinetuneConfig, row: dict[str, float]) -> None:
    if config.verbose:
        print(
            f"epoch {row['epoch']:>2}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} macro F1 {row['val_macro_f1']:.4f} | {row['seconds']:.1f}s",
            flush=True,
        )


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


# A transferred head starts fine-tuning only when it beats the probe on this project's validation labels by this much
# macro F1: it never saw this project's labels, and kept on a tie (its lower validation loss breaks ties) it stayed
# the deployed model round after round, 5 of 60 of the project's own labels wrong (a QA run, NEU -> NEU at 96 px)
TRANSFERRED_HEAD_MIN_GAIN = 1e-6


def _initialise_head(network: FinetunedNetwork, *, data: TrainingData, train_maps: np.ndarray, train_labels: np.ndarray,
                     validation_maps: np.ndarray, validation_labels: np.ndarray, config: FinetuneConfig, rng: np.random.Generator,
                     record: dict[str, Any]) -> str:
    """Start the head: "transferred", "probe" or "random". A transferred head (another project's, same classes) is
    weighed against the probe fitted on this project's training labels, on its validation labels: it starts only if
    it classifies them better, else the probe does (without validation, the probe). An out-of-fold network replays the
    deployed one's choice (option head_start): its fold has no validation to weigh them on. `record` gets whether a
    transferred head fits this network (head_transfer_fits) and the two validation scores when weighed."""
    n_classes = len(data.class_names)
    head = network.head
    init_weight, init_bias = data.options.get("init_head_weight"), data.options.get("init_head_bias")
    # A transferred head (same classes) fits only if it was trained on the same features as this network's head
    # (multi-layer rows are wider than conv_head's average); otherwise the probe starts it.
    transferable = (init_weight is not None and init_bias is not None and np.shape(init_weight) == tuple(head.weight.shape)
                    and np.shape(init_bias) == tuple(head.bias.shape))
    replayed = data.options.get("head_start")
    if init_weight is not None:
        record["head_transfer_fits"] = bool(transferable)

    def set_head(weight: np.ndarray, bias: np.ndarray) -> None:
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float32)))
            head.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))

    if transferable and (replayed == "transferred" or config.head_init != "probe"):
        set_head(init_weight, init_bias)  # better than a random start in any case
        return "transferred"
    if config.head_init == "probe":
        features = _pooled_features(network, train_maps, batch_size=64, channels_last=config.channels_last)
        weight, bias = fit_linear_head(features=features, labels=train_labels, n_classes=n_classes, seed=data.seed, regularization=config.head_regularization)
        # A class absent from training keeps a very negative bias: never predicted, and no huge logits to train.
        probe = (weight, np.maximum(bias, -30.0))
        set_head(*probe)
        if not transferable or replayed == "probe" or len(validation_labels) == 0:
            return "probe"
        probe_f1 = _evaluate(network, validation_maps, validation_labels, config=config)[0]["macro_f1"]
        set_head(init_weight, init_bias)
        transferred_f1 = _evaluate(network, validation_maps, validation_labels, config=config)[0]["macro_f1"]
        record["head_weighed"] = {"probe_val_macro_f1": round(float(probe_f1), 6), "transferred_val_macro_f1": round(float(transferred_f1), 6)}
        if transferred_f1 > probe_f1 + TRANSFERRED_HEAD_MIN_GAIN:
            return "transferred"
        set_head(*probe)
        return "probe"
    # Unit-scale random head: on L2-normalised features this gives logits of order 1.
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    return "random"


# ----------------------------------------------------------------------------------------------------------------
# Registered strategies


def _check_finetune_options(options: dict[str, Any]) -> None:
    FinetuneConfig.from_options(options)  # raises ValueError naming the bad values


register_training_options((*FinetuneConfig.__dataclass_fields__, "unfreeze_stages", "lr", "max_epochs", "augment"), _check_finetune_options)


@register_training_strategy("finetune")
def train_finetune(data: TrainingData) -> FinetunedClassifier:
    """The last stages of the backbone (default: 2 of efficientnet_lite0's 7, plus conv_head) at a low learning
    rate, the head at a higher one, on cached frozen feature maps."""
    return train_finetuned(data, FinetuneConfig.from_options(data.options), strategy="finetune")


@register_training_strategy("full")
def train_full(data: TrainingData) -> FinetunedClassifier:
    """Every layer trains, with learning rates that shrink towards the stem (discriminative learning rates),
    on augmented images."""
    defaults = {
        "trainable_stages": backbone_stage_count(data.backbone.model), "train_stem": True, "layer_decay": 0.7,
        "backbone_lr": 2e-4, "mode": "augment", "epochs": 8,
    }
    return train_finetuned(data, FinetuneConfig.from_options(data.options, **defaults), strategy="full")


# ----------------------------------------------------------------------------------------------------------------
# Out-of-fold probabilities of the fine-tuned network


def trains_on_cached_maps(*, strategy: str, options: dict[str, Any]) -> bool:
    """True when `strategy` with these options trains only the tail on cached frozen feature maps (`finetune` in its
    cached mode): cheap enough to train one model per fold. `full` and the augment mode run the images through the
    network every epoch."""
    return strategy == "finetune" and FinetuneConfig.from_options(options).mode == "cached"


def finetuned_out_of_fold_probabilities(
    *,
    data: TrainingData,
    strategy: str,
    epochs: int,
    schedule_epochs: int | None = None,
    groups: np.ndarray | None = None,
    n_folds: int = 5,
    details: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """(n, n_classes) probabilities for `data`'s training images, each row from a network fine-tuned (`strategy`, with
    `data`'s backbone, preprocessing, options and seed) on the other folds only: what a decision threshold can be
    chosen on when validation is too small to pin down a false-positive rate. A fold has no validation to stop on, so
    each fold network replays the deployed one: `epochs` epochs (its kept epoch) on a learning-rate schedule planned
    over `schedule_epochs` (its planned epochs), keeping the last. Folds as in
    modeling.label_quality.out_of_fold_probabilities (stratified, `groups` kept together); the frozen part's feature
    maps are cached per file, so the folds cost only their tail training."""
    from modeling.label_quality import out_of_fold_probabilities

    labels = np.asarray(data.train_labels, dtype=np.int64)
    fixed = {key: value for key, value in data.options.items()
             if key not in ("epochs", "max_epochs", "patience", "show_progress", "keep_epoch", "schedule_epochs")}
    options = {**fixed, "epochs": int(epochs), "patience": int(epochs) + 1, "keep_epoch": "last",
               "schedule_epochs": max(int(epochs), int(schedule_epochs or epochs))}
    has_embeddings = len(data.train_embeddings) == len(labels)
    details = details if details is not None else {}
    started, trained = time.perf_counter(), [0]
    with progress_bar("fine-tuning one network per out-of-fold fold", total=n_folds, enabled=show_progress) as advance:

        def fit_predict(*, train_features: np.ndarray, train_labels: np.ndarray, predict_features: np.ndarray, n_classes: int) -> np.ndarray:
            train, held = train_features[:, 0].astype(int), predict_features[:, 0].astype(int)
            fold = replace(
                data, train_paths=[data.train_paths[i] for i in train], train_labels=labels[train],
                train_embeddings=data.train_embeddings[train] if has_embeddings else data.train_embeddings[:0],
                validation_paths=[], validation_labels=labels[:0], validation_embeddings=data.validation_embeddings[:0], options=options,
            )
            classifier = train_classifier(strategy=strategy, data=fold)
            trained[0] += 1
            advance(1)
            return predict_proba_paths(classifier, [data.train_paths[i] for i in held], data.preprocessing)

        probabilities = out_of_fold_probabilities(
            features=np.arange(len(labels)).reshape(-1, 1), labels=labels, n_folds=n_folds, seed=data.seed, fit_predict=fit_predict,
            n_classes=len(data.class_names), groups=groups, details=details,
        )
        advance(n_folds - trained[0])  # fewer folds than asked (a class with fewer images): the bar still ends full
    details.update(model=strategy, epochs=int(epochs), schedule_epochs=options["schedule_epochs"], models_trained=trained[0],
                   seconds=round(time.perf_counter() - started, 1))
    return probabilities
