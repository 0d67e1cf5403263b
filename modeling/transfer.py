"""Domain transfer: a project's model saved as one checkpoint, and read back as the starting point of another
project (`loop init ... --init-from OTHER_PROJECT_DIR_OR_CHECKPOINT`): the backbone always, the head too when the
new project's classes are all among the old one's (rows reordered to the new class order).

The checkpoint is a torch file whose "state_dict" entry is exactly what `create_backbone(name, weights=PATH)` reads
(normalisation included), so the checkpoint itself is the backbone weights file: nothing is copied.
"""
from __future__ import annotations

import io
import os

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "defect-loop-model/1"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class InitFrom:
    backbone_weights_path: Path  # pass as create_backbone(backbone_name, weights=str(path))
    head_weight: np.ndarray | None  # (classes, features) on L2-normalised pooled features, rows in class_names order
    head_bias: np.ndarray | None
    backbone_name: str
    source_class_names: list[str]
    head_reason: str  # why the head was or was not transferred, for the CLI to print
    image_size: int | None = None  # the resolution the source model was trained at (None: not recorded)
    # fingerprints (`image_fingerprints`) of the labeled non-test images the source model and the ones it started
    # from learned from or were tuned on; None: a checkpoint written before they were recorded
    learned_from: np.ndarray | None = None

    def training_options(self) -> dict[str, Any]:
        """Options for TrainingData.options: the fine-tuning strategies start their head from these."""
        if self.head_weight is None or self.head_bias is None:
            return {}
        return {"init_head_weight": self.head_weight, "init_head_bias": self.head_bias}


def _head_arrays(classifier: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(classifier, "head_weight") and hasattr(classifier, "head_bias"):
        return np.asarray(classifier.head_weight, dtype=np.float32), np.asarray(classifier.head_bias, dtype=np.float32)
    if hasattr(classifier, "weight") and hasattr(classifier, "bias"):  # training.LinearHeadClassifier
        return np.asarray(classifier.weight, dtype=np.float32), np.asarray(classifier.bias, dtype=np.float32)
    raise TypeError(f"{type(classifier).__name__} has no linear head to save")


def image_fingerprints(sha256_hex: list[str]) -> np.ndarray:
    """The first 60 bits of each image's content hash, as int64: enough to tell images apart in a checkpoint (a
    100k-image project: 800 kB), whatever folder they were ingested from."""
    return np.array(sorted({int(value[:15], 16) for value in sha256_hex}), dtype=np.int64)


def save_model_checkpoint(classifier: Any, path: str | Path, *, image_size: int | None = None, learned_from: np.ndarray | None = None,
                          negative_class: str | None = None) -> Path:
    """Write a classifier (any strategy with a backbone and a linear head on L2-normalised features) to path.
    `learned_from`: the fingerprints of the images it learned from (a project started from it checks its test split
    against them); `negative_class`: its good class, which a project whose good class has another name maps to."""
    path = Path(path)
    backbone = classifier.backbone
    weight, bias = _head_arrays(classifier)
    state = {name: tensor.detach().clone() for name, tensor in backbone.model.state_dict().items()}
    state["__defect_loop_mean__"] = torch.tensor(backbone.mean)
    state["__defect_loop_std__"] = torch.tensor(backbone.std)
    preprocessing = getattr(classifier, "preprocessing", None)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "backbone_name": backbone.name,
        "state_dict": state,
        "class_names": list(classifier.class_names),
        "head_weight": torch.from_numpy(weight),
        "head_bias": torch.from_numpy(bias),
        "temperature": float(getattr(classifier, "temperature", 1.0)),
        "strategy": str(getattr(classifier, "strategy", "head")),
        # What the head's rows are on: "avg"/"multilayer" frozen embeddings (`head`), or the fine-tuned network's own
        # pooled features (the same two kinds).
        "head_features": str(getattr(classifier, "head_features", getattr(backbone, "pooling", "avg"))),
        "image_size": int(image_size or (preprocessing.image_size if preprocessing is not None else 0)),
    }
    if negative_class is not None:
        checkpoint["negative_class"] = str(negative_class)
    if learned_from is not None:
        checkpoint["learned_from"] = torch.from_numpy(np.asarray(learned_from, dtype=np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # serialised in memory, then written with Python's own I/O: torch.save straight to a full disk raised a RuntimeError
    # ("unexpected pos ...") that named neither the disk nor the file
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)  # atomic: a reader never sees half a checkpoint
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"{error.strerror or error} while writing the model checkpoint {path}") from error
    return path


def _checkpoint_problems(checkpoint: dict[str, Any]) -> str:
    """What a checkpoint of the right format lacks to start a project from ("" when nothing)."""
    missing = [key for key in ("backbone_name", "state_dict", "class_names", "head_weight", "head_bias") if key not in checkpoint]
    if missing:
        return f"it has no {', '.join(missing)}"
    weight, bias, classes = checkpoint["head_weight"], checkpoint["head_bias"], checkpoint["class_names"]
    if not isinstance(classes, (list, tuple)) or not classes:
        return "its class_names are not a list of names"
    if getattr(weight, "ndim", 0) != 2 or getattr(bias, "ndim", 0) != 1 or weight.shape[0] != len(classes) or bias.shape[0] != len(classes):
        return (f"its head ({tuple(getattr(weight, 'shape', ()))} weights, {tuple(getattr(bias, 'shape', ()))} biases) does not have "
                f"one row per class ({len(classes)} names)")
    return ""


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    return _checkpoint_or_why_not(path)[0]


def _checkpoint_or_why_not(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint, "") or (None, why not: "" for another kind of file; a torch file, one begun as torch.save writes
    them (a zip archive), that cannot be read is said as truncated or damaged (QA: both were told the same))."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the reason is what is shown
        try:
            with open(path, "rb") as handle:
                torch_file = handle.read(4) == b"PK\x03\x04"
        except OSError:
            torch_file = False
        return None, (f": it is a torch file that cannot be read, truncated or damaged ({type(error).__name__}: {str(error)[:120]}); copy it again"
                      if torch_file else "")
    if isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT:
        return checkpoint, ""
    return None, ""


def find_model_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest checkpoint anywhere under a project directory."""
    path = Path(path).expanduser()
    if path.is_file():
        checkpoint, why_not = _checkpoint_or_why_not(path)
        if checkpoint is None:
            raise ValueError(f"{path} is not a defect-loop model checkpoint (format {CHECKPOINT_FORMAT}){why_not}")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--init-from {path}: no such file or directory")
    candidates = sorted(
        (file for file in path.rglob("*") if file.suffix in CHECKPOINT_SUFFIXES and file.is_file()),
        key=lambda file: file.stat().st_mtime_ns, reverse=True,
    )
    for candidate in candidates:
        if _read_checkpoint(candidate) is not None:
            return candidate
    raise FileNotFoundError(
        f"no defect-loop model checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}, format {CHECKPOINT_FORMAT}) under {path}: "
        "train a round in that project first, or pass the checkpoint file itself"
    )


def checkpoint_backbone_name(path: str | Path) -> str:
    """The timm name of the backbone a checkpoint file holds (ValueError: not a defect-loop model checkpoint)."""
    checkpoint = _read_checkpoint(Path(path))
    if checkpoint is None or not isinstance(checkpoint.get("backbone_name"), str):
        raise ValueError(f"{path} is not a defect-loop model checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint["backbone_name"]


def load_init_checkpoint(path: str | Path, *, class_names: list[str], pooling: str | None = None, negative_class: str | None = None) -> InitFrom:
    """Where a new project starts from: the other project's backbone, and its head if every class is known there and
    it read the same kind of pooled features (`pooling`, when given) as this project's network will. This project's
    good class (`negative_class`) is the source's good class whatever either is named ("good" here, "free" there), when
    the checkpoint records it (QA: the head was refused for the good class's name alone)."""
    checkpoint_path = find_model_checkpoint(path)
    checkpoint = _read_checkpoint(checkpoint_path)
    assert checkpoint is not None
    problems = _checkpoint_problems(checkpoint)
    if problems:
        raise ValueError(f"{checkpoint_path} is not a usable defect-loop model checkpoint: {problems}")
    source_classes = [str(name) for name in checkpoint["class_names"]]
    weight = checkpoint["head_weight"].numpy()
    bias = checkpoint["head_bias"].numpy()
    source_negative = checkpoint.get("negative_class") if isinstance(checkpoint.get("negative_class"), str) else None
    # this project's class -> the source's row: its good class to the source's good class when their names differ
    same_as = ({negative_class: source_negative} if negative_class and source_negative and negative_class != source_negative
               and negative_class not in source_classes and source_negative not in class_names else {})
    missing = [name for name in class_names if same_as.get(name, name) not in source_classes]
    head_features = str(checkpoint.get("head_features") or "")
    if not class_names or missing:
        reason = f"head not transferred: classes {missing or '(none given)'} are not in the source model's {source_classes}"
        if missing == [negative_class] and source_negative is None:
            reason += (f" (if only the good class's name differs: the source checkpoint does not record its good class; checkpoints "
                       f"made since 2026-12-07 do, and {negative_class!r} then takes its row)")
        head_weight = head_bias = None
    elif pooling is not None and head_features and head_features != pooling:
        reason = (f"head not transferred: the source model's head reads {head_features!r} pooled features and this project's "
                  f"network {pooling!r} (pooling in loop.toml [model])")
        head_weight = head_bias = None
    else:
        rows = [source_classes.index(same_as.get(name, name)) for name in class_names]
        head_weight, head_bias = weight[rows].copy(), bias[rows].copy()
        reason = "head transferred: every class is in the source model" + ("" if len(rows) == len(source_classes) else f" (subset of {len(source_classes)})")
        if same_as:
            reason += f"; the good class {negative_class!r} takes the source's good class {source_negative!r}"
    return InitFrom(
        backbone_weights_path=checkpoint_path, head_weight=head_weight, head_bias=head_bias,
        backbone_name=str(checkpoint["backbone_name"]), source_class_names=source_classes, head_reason=reason,
        image_size=int(checkpoint.get("image_size") or 0) or None,
        learned_from=checkpoint["learned_from"].numpy() if isinstance(checkpoint.get("learned_from"), torch.Tensor) else None,
    )
