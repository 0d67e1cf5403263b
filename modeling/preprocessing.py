"""Image decoding and the one preprocessing every model path uses (embedding, ONNX inference, /predict)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Bump when to_rgb decodes some file differently: every cache of what the models saw is keyed by it (2: EXIF orientation
# applied, 16-bit and float pixels scaled)
DECODE_VERSION = 2
# Bit depths a camera's frames use inside a 16- or 32-bit container (Mono10/12/14 often sit right-aligned in 16 bits)
STANDARD_BIT_DEPTHS = (8, 10, 12, 14, 16)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        values = asdict(self)
        return f"dec{DECODE_VERSION}-s{values['image_size']}-m{'_'.join(f'{m:g}' for m in self.mean)}-d{'_'.join(f'{s:g}' for s in self.std)}"


def pixel_depth(image: Image.Image) -> str | None:
    """How to_rgb brings an image of more than 8 bits a channel down to 8 (None: 8 bits or fewer, converted as is):
    "12 significant bits (0..4095)", "32-bit float in 0..1", "32-bit float, stretched over -3.2..7.5"."""
    return _to_uint8(image)[1] if _wide(image) else None


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB picture every path sees (embedding, training, thumbnails, the deployed model, /predict):
    - turned by its EXIF orientation, as browsers and Label Studio show the photo to annotators;
    - 16-bit and float pixels scaled to 8 bits over the range they use (PIL's convert clips them: a 12-bit camera's
      frames came out white, float frames in 0..1 black, and the model saw blank images). An integer image is
      scaled by the smallest standard bit depth that holds its largest value, so a 12-bit camera's frames share
      one scale; a float image in 0..1 by 255; anything else is stretched over its own range (pixel_depth says which);
    - greyscale, palette and CMYK images converted to RGB."""
    if image.getexif().get(0x0112, 1) != 1:  # Orientation: only then is a copy worth making
        image = ImageOps.exif_transpose(image)
    if _wide(image):
        image = Image.fromarray(_to_uint8(image)[0])
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide(image: Image.Image) -> bool:
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def _to_uint8(image: Image.Image) -> tuple[np.ndarray, str]:
    pixels = np.asarray(image)
    if pixels.dtype.kind == "f":
        pixels = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
        if low >= 0.0 and high <= 1.0:
            return np.round(pixels * 255.0).astype(np.uint8), "32-bit float in 0..1"
        how = f"32-bit float, stretched over {low:.3g}..{high:.3g}"
    else:
        pixels = pixels.astype(np.int64)
        low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
        bits = next((b for b in STANDARD_BIT_DEPTHS if low >= 0 and high < 2 ** b), None)
        if bits is not None:
            return np.round(pixels * (255.0 / (2 ** bits - 1))).astype(np.uint8), f"{bits} significant bits (0..{2 ** bits - 1})"
        how = f"integers stretched over {low}..{high}"
    span = high - low
    scaled = (pixels - low) * (255.0 / span) if span > 0 else np.zeros_like(pixels, dtype=np.float64)
    return np.round(scaled).astype(np.uint8), how


def image_to_array(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """PIL image -> float32 CHW normalised (decoded by to_rgb). Greyscale is replicated to 3 channels; the whole
    image is resized (no crop) because a defect may sit at the border."""
    size = preprocessing.image_size
    rgb = to_rgb(image).resize((size, size), Image.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(preprocessing.mean, dtype=np.float32)) / np.asarray(preprocessing.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_image_array(path: str | Path, preprocessing: Preprocessing) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_array(image, preprocessing)
