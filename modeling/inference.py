"""Inference with the deployed artifact: one ONNX file, images in, class probabilities out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from modeling.onnx_session import open_session  # no torch: the API's /predict runs without it
from modeling.preprocessing import Preprocessing, image_to_array


class OnnxClassifier:
    def __init__(self, onnx_path: str | Path, *, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], threads: int = 2,
                 bit_depth: int | None = None):
        self.preprocessing = Preprocessing(int(image_size), tuple(mean), tuple(std), bit_depth)  # type: ignore[arg-type]
        self.session = open_session(Path(onnx_path), threads=threads)

    def predict_proba(self, images: list[Image.Image], *, batch_size: int = 32) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([image_to_array(image, self.preprocessing) for image in images[start : start + batch_size]])
            outputs.append(self.session.run(None, {"images": batch})[0])
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
