"""Embeddings from the frozen pretrained backbone, computed through ONNX Runtime (about 4x torch eager on a CPU)
and cached per image content hash, so a warm round computes only the images it has not seen."""
from __future__ import annotations

import json
import os
import uuid
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
    """sha256 -> a row (embedding, patch features, detail thumbnail), one directory per model key.

    Append-only: each `put` writes one new shard (`rows-<uuid>.npy`) and then the index (`index.json`: each shard's
    file and the sha256 of its rows), each atomically. Shards are memory-mapped: opening the cache reads the index
    only, and `get` copies just the rows asked for. Before, one vectors.npy was rewritten whole on every put and held
    in memory twice: ~3x the cache in RAM at once (100k images' patch features are 6 GB). Past MAX_SHARDS the shards
    are merged into one, so a project does not collect a file per round forever. A shard that cannot be read, or
    whose row count disagrees with the index, is dropped (its rows are computed again), never mixed up. The earlier
    layout (vectors.npy + sha256.json) is read as one shard."""

    MAX_SHARDS = 32
    INDEX = "index.json"

    def __init__(self, directory: Path, model_key: str):
        self.directory = directory / model_key
        self.directory.mkdir(parents=True, exist_ok=True)
        self._shards: list[tuple[str, list[str]]] = []  # (file name, sha256 of each row)
        self._arrays: list[np.ndarray] = []  # memory maps, one per shard
        self._rows: dict[str, tuple[int, int]] = {}  # sha256 -> (shard, row)
        index_path = self.directory / self.INDEX
        listed: list[tuple[str, list[str]]] = []
        try:
            if index_path.exists():
                listed = [(entry["file"], list(entry["sha256"])) for entry in json.loads(index_path.read_text())["shards"]]
            elif (self.directory / "sha256.json").exists() and (self.directory / "vectors.npy").exists():
                listed = [("vectors.npy", json.loads((self.directory / "sha256.json").read_text()))]
        except Exception:  # noqa: BLE001 - an unreadable index, whatever the damage: start over rather than guess
            listed = []
        for name, hashes in listed:
            try:
                array = np.load(self.directory / name, mmap_mode="r", allow_pickle=False)
                usable = array.ndim >= 1 and len(array) == len(hashes) and (not self._arrays or array.shape[1:] == self._arrays[0].shape[1:])
            except Exception:  # noqa: BLE001 - empty, truncated, not an .npy: recomputed, never half used
                continue
            if usable:  # else a torn or foreign shard
                self._add_shard(name, hashes, array)

    def _add_shard(self, name: str, hashes: list[str], array: np.ndarray) -> None:
        shard = len(self._shards)
        self._shards.append((name, hashes))
        self._arrays.append(array)
        for row, sha in enumerate(hashes):
            self._rows[sha] = (shard, row)

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, hashes: Sequence[str]) -> list[str]:
        return [sha for sha in hashes if sha not in self._rows]

    def get(self, hashes: Sequence[str]) -> np.ndarray:
        """The rows of these hashes, in this order, as one in-memory array (KeyError for a hash not cached)."""
        located = np.array([self._rows[sha] for sha in hashes], dtype=np.int64).reshape(-1, 2)
        if not self._arrays:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.empty((len(located), *self._arrays[0].shape[1:]), dtype=np.result_type(*(a.dtype for a in self._arrays)))
        for shard in np.unique(located[:, 0]):
            positions = np.flatnonzero(located[:, 0] == shard)
            rows = located[positions, 1]
            order = np.argsort(rows, kind="stable")  # ascending reads from the memory map
            for start in range(0, len(order), 4096):  # in blocks: a fancy index on a memory map copies what it reads
                block = order[start:start + 4096]
                out[positions[block]] = self._arrays[shard][rows[block]]
        return out

    def rows(self, hashes: Sequence[str]) -> CachedRows:
        """The rows of these hashes, read one at a time when indexed (for callers that visit rows, not all at once)."""
        return CachedRows([self._rows[sha] for sha in hashes], self._arrays)

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if not len(hashes):
            return
        vectors = np.asarray(vectors)
        if len(vectors) != len(hashes):
            raise ValueError(f"{len(vectors)} rows for {len(hashes)} hashes")
        if self._arrays and vectors.shape[1:] != self._arrays[0].shape[1:]:
            raise ValueError(f"rows of shape {vectors.shape[1:]} in a cache of {self._arrays[0].shape[1:]}")
        name = f"rows-{uuid.uuid4().hex}.npy"  # unique: two processes sharing a cache never write one shard
        partial = self.directory / f"{name}.partial.npy"
        np.save(partial, vectors)
        partial.replace(self.directory / name)
        self._add_shard(name, list(hashes), np.load(self.directory / name, mmap_mode="r", allow_pickle=False))
        if len(self._shards) > self.MAX_SHARDS:
            self._merge_shards()
        else:
            self._write_index()

    def _write_index(self) -> None:
        partial = self.directory / f"{self.INDEX}.{os.getpid()}.partial"
        partial.write_text(json.dumps({"shards": [{"file": name, "sha256": hashes} for name, hashes in self._shards]}))
        partial.replace(self.directory / self.INDEX)

    def _merge_shards(self) -> None:
        """All live rows into one new shard, written through a memory map (never the whole cache in memory)."""
        live = sorted(self._rows.items(), key=lambda item: item[1])
        hashes = [sha for sha, _ in live]
        name = f"rows-{uuid.uuid4().hex}.npy"
        partial = self.directory / f"{name}.partial.npy"
        merged = np.lib.format.open_memmap(partial, mode="w+", dtype=np.result_type(*(a.dtype for a in self._arrays)),
                                           shape=(len(hashes), *self._arrays[0].shape[1:]))
        for start in range(0, len(hashes), 4096):
            merged[start:start + 4096] = self.get(hashes[start:start + 4096])
        merged.flush()
        del merged
        partial.replace(self.directory / name)
        old = [shard_name for shard_name, _ in self._shards]
        self._shards, self._arrays, self._rows = [], [], {}
        self._add_shard(name, hashes, np.load(self.directory / name, mmap_mode="r", allow_pickle=False))
        self._write_index()
        for shard_name in old:  # after the index no longer names them (a reader's open memory map stays valid)
            (self.directory / shard_name).unlink(missing_ok=True)
        (self.directory / "sha256.json").unlink(missing_ok=True)


class CachedRows:
    """A sequence of cached rows backed by memory maps: len() and integer indexing, one row per read."""

    def __init__(self, located: list[tuple[int, int]], arrays: list[np.ndarray]):
        self._located = located
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self._located)

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = self._located[index]
        return np.asarray(self._arrays[shard][row])


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
