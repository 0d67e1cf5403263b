"""Image augmentations for training, found by name and switchable one by one (torchvision transforms v2).

Every transform works on one float image tensor (C, H, W) with values in [0, 1], before normalisation, and keeps
its shape. `create_augmentation(name)` gives the transform always applied (what a test wants to see change);
`build_augmentation(names)` gives the training pipeline, each transform applied with its own probability.

Generic ones: hflip, vflip, rotate90 (quarter turns), rotation (a small angle, no quarter turn: for parts whose
orientation matters), resized_crop (zoom in), zoom (in or out; zooming out mirrors the image into the new border
rather than leaving it black), rescale (random downscale and back: a camera at another distance / resolution).
Factory-floor ones: brightness_contrast, color_temperature, specular_highlight, blur, occlusion.
Pixel rescaling to [0, 1] and the backbone's normalisation are not augmentations: they always happen.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

AugmentationFactory = Callable[[int], nn.Module]
_AUGMENTATIONS: dict[str, AugmentationFactory] = {}
_DEFAULT_PROBABILITY: dict[str, float] = {}


def register_augmentation(name: str, *, probability: float = 0.5) -> Callable[[AugmentationFactory], AugmentationFactory]:
    def decorator(factory: AugmentationFactory) -> AugmentationFactory:
        _AUGMENTATIONS[name] = factory
        _DEFAULT_PROBABILITY[name] = probability
        return factory

    return decorator


def available_augmentations() -> list[str]:
    return sorted(_AUGMENTATIONS)


# Presets: "geometric" suits textures and parts photographed in any orientation; "factory" adds the lighting,
# focus and occlusion changes of a production line.
AUGMENTATION_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "flips": ("hflip", "vflip"),
    "geometric": ("hflip", "vflip", "rotate90", "rotation", "resized_crop"),
    "factory": ("hflip", "vflip", "rotate90", "rotation", "resized_crop", "brightness_contrast", "color_temperature", "specular_highlight", "blur",
                "occlusion"),
    "all": ("hflip", "vflip", "rotate90", "rotation", "resized_crop", "zoom", "rescale", "brightness_contrast", "color_temperature",
            "specular_highlight", "blur", "occlusion"),
}


def resolve_augmentation_names(spec: str | Sequence[str] | None) -> list[str]:
    """A preset name, a comma-separated list, a list of names, or None/"none"/"" -> validated transform names."""
    if spec is None or spec is False:
        return []
    if spec is True:
        spec = "geometric"
    if isinstance(spec, str):
        if spec in AUGMENTATION_PRESETS:
            return list(AUGMENTATION_PRESETS[spec])
        spec = [part.strip() for part in spec.split(",") if part.strip()]
    names: list[str] = []
    for name in spec:
        if name in AUGMENTATION_PRESETS:
            names.extend(AUGMENTATION_PRESETS[name])
        elif name in _AUGMENTATIONS:
            names.append(name)
        else:
            raise ValueError(
                f"unknown augmentation {name!r}; available: {', '.join(available_augmentations())}; "
                f"presets: {', '.join(AUGMENTATION_PRESETS)}"
            )
    return list(dict.fromkeys(names))


def create_augmentation(name: str, *, image_size: int) -> nn.Module:
    """One transform by name, applied every time it is called."""
    if name not in _AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; available: {', '.join(available_augmentations())}")
    return _AUGMENTATIONS[name](image_size)


def build_augmentation(spec: str | Sequence[str] | None, *, image_size: int, probability: float | None = None) -> nn.Module:
    """The training pipeline: each named transform applied with its default probability (or `probability`)."""
    steps: list[nn.Module] = []
    for name in resolve_augmentation_names(spec):
        p = _DEFAULT_PROBABILITY[name] if probability is None else probability
        transform = create_augmentation(name, image_size=image_size)
        steps.append(transform if p >= 1.0 else v2.RandomApply([transform], p=p))
    return v2.Compose(steps) if steps else nn.Identity()


@register_augmentation("hflip", probability=0.5)
def _hflip(image_size: int) -> nn.Module:
    return v2.RandomHorizontalFlip(p=1.0)


@register_augmentation("vflip", probability=0.5)
def _vflip(image_size: int) -> nn.Module:
    return v2.RandomVerticalFlip(p=1.0)


class RandomQuarterTurn(nn.Module):
    """One, two or three quarter turns: exact, no border. Only for data without an up (textures, parts placed in any
    orientation); square images keep their shape, others are turned by two quarters only."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        square = image.shape[-1] == image.shape[-2]
        quarter_turns = int(torch.randint(1, 4, ()).item()) if square else 2
        return torch.rot90(image, quarter_turns, dims=(-2, -1))


@register_augmentation("rotate90", probability=0.75)
def _rotate90(image_size: int) -> nn.Module:
    return RandomQuarterTurn()


class RandomRotation(nn.Module):
    """A small angle either way (at least 2 degrees, at most max_degrees), zoomed just enough that no empty corner
    appears (black corners would be a cue a model could learn). No quarter turns: that is `rotate90`."""

    def __init__(self, max_degrees: float = 15.0, min_degrees: float = 2.0):
        super().__init__()
        self.max_degrees, self.min_degrees = max_degrees, min_degrees

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        angle = float(torch.empty(()).uniform_(self.min_degrees, self.max_degrees)) * (1 if torch.rand(()) < 0.5 else -1)
        radians = math.radians(abs(angle))
        zoom = math.cos(radians) + math.sin(radians)
        return TF.affine(image, angle=angle, translate=[0, 0], scale=zoom, shear=[0.0, 0.0], interpolation=v2.InterpolationMode.BILINEAR)


@register_augmentation("rotation", probability=0.5)
def _rotation(image_size: int) -> nn.Module:
    return RandomRotation()


@register_augmentation("resized_crop", probability=0.5)
def _resized_crop(image_size: int) -> nn.Module:
    # Zoom in on at least 60% of the area: a defect near the border may be cut, so stay mild.
    return v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)


class RandomZoom(nn.Module):
    """Zoom in (a centred crop, resized up) or out (the image mirrored into a wider border, resized down) by a factor
    in [min_scale, max_scale]. Zooming out never leaves a black frame: a model could learn the frame as a cue."""

    def __init__(self, min_scale: float = 0.85, max_scale: float = 1.15):
        super().__init__()
        self.min_scale, self.max_scale = min_scale, max_scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        scale = float(torch.empty(()).uniform_(self.min_scale, self.max_scale))
        if abs(scale - 1.0) < 0.02:
            scale = 1.05  # never the identity
        if scale > 1.0:
            crop_h, crop_w = max(1, round(height / scale)), max(1, round(width / scale))
            zoomed = TF.center_crop(image, [crop_h, crop_w])
        else:
            pad_h, pad_w = round(height * (1 / scale - 1) / 2), round(width * (1 / scale - 1) / 2)
            pad_h, pad_w = min(pad_h, height - 1), min(pad_w, width - 1)  # reflection needs a border smaller than the image
            zoomed = torch.nn.functional.pad(image.unsqueeze(0), [pad_w, pad_w, pad_h, pad_h], mode="reflect").squeeze(0)
        return TF.resize(zoomed, [height, width], antialias=True).clamp(0.0, 1.0)


@register_augmentation("zoom", probability=0.3)
def _zoom(image_size: int) -> nn.Module:
    return RandomZoom()


class RandomRescale(nn.Module):
    """Down-sample to a random fraction of the size and back up: the blur and aliasing of a lower-resolution camera."""

    def __init__(self, min_fraction: float = 0.5, max_fraction: float = 0.85):
        super().__init__()
        self.min_fraction, self.max_fraction = min_fraction, max_fraction

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        fraction = float(torch.empty(()).uniform_(self.min_fraction, self.max_fraction))
        small = TF.resize(image, [max(8, int(height * fraction)), max(8, int(width * fraction))], antialias=True)
        return TF.resize(small, [height, width], antialias=True).clamp(0.0, 1.0)


@register_augmentation("rescale", probability=0.3)
def _rescale(image_size: int) -> nn.Module:
    return RandomRescale()


class BrightnessContrast(nn.Module):
    def __init__(self, brightness: float = 0.25, contrast: float = 0.25):
        super().__init__()
        self.brightness, self.contrast = brightness, contrast

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        brightness = 1.0 + float(torch.empty(()).uniform_(-self.brightness, self.brightness))
        contrast = 1.0 + float(torch.empty(()).uniform_(-self.contrast, self.contrast))
        # Never the identity: a draw of exactly 1.0 for both is nudged, so the transform always does something.
        if abs(brightness - 1.0) < 0.02 and abs(contrast - 1.0) < 0.02:
            brightness = 1.05
        image = TF.adjust_brightness(image, brightness)
        return TF.adjust_contrast(image, contrast).clamp(0.0, 1.0)


@register_augmentation("brightness_contrast", probability=0.5)
def _brightness_contrast(image_size: int) -> nn.Module:
    return BrightnessContrast()


class ColorTemperatureShift(nn.Module):
    """Warmer or cooler light: red and blue gains move in opposite directions (greyscale images gain a tint)."""

    def __init__(self, max_shift: float = 0.12):
        super().__init__()
        self.max_shift = max_shift

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] != 3:
            return image
        shift = float(torch.empty(()).uniform_(0.3, 1.0)) * self.max_shift * (1 if torch.rand(()) < 0.5 else -1)
        gains = torch.tensor([1.0 + shift, 1.0, 1.0 - shift], dtype=image.dtype).view(3, 1, 1)
        return (image * gains).clamp(0.0, 1.0)


@register_augmentation("color_temperature", probability=0.3)
def _color_temperature(image_size: int) -> nn.Module:
    return ColorTemperatureShift()


class SpecularHighlight(nn.Module):
    """A soft elliptical glare spot added at a random place: reflections off metal, glass or glossy plastic."""

    def __init__(self, max_intensity: float = 0.6, radius_fraction: tuple[float, float] = (0.05, 0.2)):
        super().__init__()
        self.max_intensity, self.radius_fraction = max_intensity, radius_fraction

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        cy, cx = float(torch.rand(())) * height, float(torch.rand(())) * width
        ry = float(torch.empty(()).uniform_(*self.radius_fraction)) * height
        rx = float(torch.empty(()).uniform_(*self.radius_fraction)) * width
        intensity = float(torch.empty(()).uniform_(0.3, 1.0)) * self.max_intensity
        ys = torch.arange(height, dtype=image.dtype).view(-1, 1)
        xs = torch.arange(width, dtype=image.dtype).view(1, -1)
        spot = torch.exp(-(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2))
        return (image + intensity * spot).clamp(0.0, 1.0)


@register_augmentation("specular_highlight", probability=0.2)
def _specular_highlight(image_size: int) -> nn.Module:
    return SpecularHighlight()


@register_augmentation("blur", probability=0.2)
def _blur(image_size: int) -> nn.Module:
    # Out-of-focus or motion-smeared parts; the kernel grows with the image.
    kernel = max(3, int(image_size * 0.03) | 1)
    return v2.GaussianBlur(kernel_size=kernel, sigma=(0.6, 1.6))


class PartialOcclusion(nn.Module):
    """A small grey rectangle (a clamp, a finger, dust on the lens) over at most 6% of the image. Small on purpose:
    a large patch could hide the defect and turn a defect image into a mislabeled good one."""

    def __init__(self, max_area: float = 0.06):
        super().__init__()
        self.erase = v2.RandomErasing(p=1.0, scale=(0.01, max_area), ratio=(0.3, 3.3), value=0.5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.erase(image)


@register_augmentation("occlusion", probability=0.2)
def _occlusion(image_size: int) -> nn.Module:
    return PartialOcclusion()
