"""Embeddings from the frozen pretrained backbone, computed through ONNX Runtime (about 4x torch eager on a CPU)
and cached per image content hash, so a warm round computes only the images it has not seen."""
from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling.backbones import Backbone, create_backbone
from modeling.onnx_export import export_onnx, open_session
from modeling.preprocessing import Preprocessing, load_image_array
from modeling.progress import progress_bar


class L2Normalize(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(features, dim=1)


class MultiLayerPooling(nn.Module):
    """Average- and max-pooled feature maps of the last four stages and the head conv, each part unit length.

    Small defects (a crack across a few pixels of a tile) light up mid-level feature maps that the final global
    average washes out. Magnetic tile, 5-fold CV, frozen features + linear head at 224 px: ROC-AUC 0.9907 -> 0.9945,
    defect recall at FPR <= 2% 0.969 -> 0.982, at the same ONNX Runtime cost (benchmarks/feature_variants.py)."""

    N_STAGES = 4  # the last four of timm's `blocks` (efficientnet_lite0: stages 3-6 of 0-6)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.stages = tuple(range(max(0, len(model.blocks) - self.N_STAGES), len(model.blocks)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.bn1(self.model.conv_stem(images))
        parts = []
        for index, block in enumerate(self.model.blocks):
            x = block(x)
            if index in self.stages:
                parts.append(x)
        parts.append(self.model.bn2(self.model.conv_head(x)))
        return multilayer_pool(parts)


def multilayer_pool(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """Each map's average and max over space, each unit length, concatenated (MultiLayerPooling's vector; the
    fine-tuned multi-layer tail gives the same)."""
    pooled = []
    for feature_map in feature_maps:
        pooled.append(nn.functional.normalize(feature_map.mean(dim=(2, 3)), dim=1))
        pooled.append(nn.functional.normalize(feature_map.amax(dim=(2, 3)), dim=1))
    return torch.cat(pooled, dim=1)


class EmbeddingNetwork(nn.Module):
    """Backbone -> pooled features -> unit length (cosine geometry for FAISS and a well-scaled head)."""

    def __init__(self, backbone: nn.Module, *, pooling: str = "avg"):
        super().__init__()
        self.backbone = backbone if pooling == "avg" else MultiLayerPooling(backbone)
        self.normalize = L2Normalize()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.backbone(images))


def embedding_model_key(backbone: Backbone, preprocessing: Preprocessing) -> str:
    return f"{backbone.cache_key}-{preprocessing.key}"


class EmbeddingExtractor:
    def __init__(self, backbone: Backbone, preprocessing: Preprocessing, *, onnx_dir: Path, threads: int = 2, batch_size: int = 32,
                 network: nn.Module | None = None, model_key: str | None = None):
        """network/model_key: another frozen per-image feature network (e.g. patch features) run the same way."""
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.model_key = model_key or embedding_model_key(backbone, preprocessing)
        onnx_path = onnx_dir / f"embed-{self.model_key}.onnx"
        if not onnx_path.exists():
            network = network if network is not None else EmbeddingNetwork(backbone.model, pooling=backbone.pooling)
            export_onnx(network, onnx_path, image_size=preprocessing.image_size, output_name="embeddings")
        self.session = open_session(onnx_path, threads=threads)

    def _load_batch(self, paths: Sequence[str]) -> np.ndarray:
        return np.stack([load_image_array(path, self.preprocessing) for path in paths])

    def embed(self, paths: Sequence[str], *, description: str = "embedding images", show_progress: bool = True) -> np.ndarray:
        batches = [list(paths[i : i + self.batch_size]) for i in range(0, len(paths), self.batch_size)]
        outputs: list[np.ndarray] = []
        # Decode the next batch while ONNX Runtime runs this one.
        with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(description, total=len(paths), enabled=show_progress) as advance:
            pending = pool.submit(self._load_batch, batches[0]) if batches else None
            for number, batch in enumerate(batches):
                images = pending.result()  # type: ignore[union-attr]
                pending = pool.submit(self._load_batch, batches[number + 1]) if number + 1 < len(batches) else None
                outputs.append(self.session.run(None, {"images": images})[0])
                advance(len(batch))
        if not outputs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32)


class EmbeddingCache:
    """sha256 -> embedding, one file pair per model key (backbone + weights hash + preprocessing)."""

    def __init__(self, directory: Path, model_key: str):
        self.directory = directory / model_key
        self.directory.mkdir(parents=True, exist_ok=True)
        self._vectors_path = self.directory / "vectors.npy"
        self._index_path = self.directory / "sha256.json"
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        if self._vectors_path.exists() and self._index_path.exists():
            hashes = json.loads(self._index_path.read_text())
            vectors = np.load(self._vectors_path)
            if len(hashes) == len(vectors):  # else a torn write: start over rather than mix rows up
                self._rows = {sha: row for row, sha in enumerate(hashes)}
                self._vectors = vectors

    def missing(self, hashes: Sequence[str]) -> list[str]:
        return [sha for sha in hashes if sha not in self._rows]

    def get(self, hashes: Sequence[str]) -> np.ndarray:
        return self._vectors[[self._rows[sha] for sha in hashes]]

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if not len(hashes):
            return
        start = len(self._rows)
        self._vectors = vectors.copy() if start == 0 else np.concatenate([self._vectors, vectors])
        for offset, sha in enumerate(hashes):
            self._rows[sha] = start + offset
        ordered = sorted(self._rows, key=self._rows.__getitem__)
        np.save(self.directory / "vectors.tmp.npy", self._vectors)
        (self.directory / "sha256.tmp.json").write_text(json.dumps(ordered))
        (self.directory / "vectors.tmp.npy").replace(self._vectors_path)
        (self.directory / "sha256.tmp.json").replace(self._index_path)


def compute_embeddings(
    *, paths: Sequence[str], backbone: str = "efficientnet_lite0", weights: str = "default", image_size: int = 224,
    pooling: str = "multilayer", progress: bool = True, onnx_dir: Path | None = None,
) -> np.ndarray:
    """L2-normalised float32 embeddings (n, d) of images on disk, with no cache: for notebooks and benchmarks."""
    import tempfile

    loaded = create_backbone(backbone, weights=weights, pooling=pooling)
    preprocessing = Preprocessing(image_size, loaded.mean, loaded.std)
    with tempfile.TemporaryDirectory() as tmp:
        extractor = EmbeddingExtractor(loaded, preprocessing, onnx_dir=onnx_dir or Path(tmp))
        return extractor.embed(list(paths), show_progress=progress)
