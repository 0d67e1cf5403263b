"""Image decoding and the one preprocessing every model path uses (embedding, ONNX inference, /predict)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image


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
        return f"s{values['image_size']}-m{'_'.join(f'{m:g}' for m in self.mean)}-d{'_'.join(f'{s:g}' for s in self.std)}"


def image_to_array(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """PIL image -> float32 CHW normalised. Greyscale is replicated to 3 channels; the whole image is resized
    (no crop) because a defect may sit at the border."""
    size = preprocessing.image_size
    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(preprocessing.mean, dtype=np.float32)) / np.asarray(preprocessing.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_image_array(path: str | Path, preprocessing: Preprocessing) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_array(image, preprocessing)
