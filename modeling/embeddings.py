"""Embeddings from the frozen pretrained backbone, computed through ONNX Runtime (about 4x torch eager on a CPU)
and cached per image content hash, so a warm round computes only the images it has not seen."""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling.backbones import Backbone, create_backbone
from modeling.onnx_export import export_onnx, open_session
from modeling.preprocessing import Preprocessing, load_image_array
from modeling.progress import progress_bar

SHARD_NAME = re.compile(r"rows-[0-9a-f]{32}\.npy")


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


KEEP_EVERY_IMAGES = 2048  # images embedded between two hand-overs to the cache (~25 s of work at 12 ms an image)


class EmbeddingExtractor:
    def __init__(self, backbone: Backbone, preprocessing: Preprocessing, *, onnx_dir: Path, threads: int = 2, batch_size: int = 32,
                 network: nn.Module | None = None, model_key: str | None = None):
        """network/model_key: another frozen per-image feature network (e.g. patch features) run the same way."""
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.model_key = model_key or embedding_model_key(backbone, preprocessing)
        onnx_path = onnx_dir / f"embed-{self.model_key}.onnx"
        if onnx_path.exists():
            try:
                self.session = open_session(onnx_path, threads=threads)
                return
            except Exception:  # noqa: BLE001 - a damaged cache file (ONNX Runtime's errors have no common type): made again
                onnx_path.unlink(missing_ok=True)
        network = network if network is not None else EmbeddingNetwork(backbone.model, pooling=backbone.pooling)
        export_onnx(network, onnx_path, image_size=preprocessing.image_size, output_name="embeddings")
        self.session = open_session(onnx_path, threads=threads)

    def _load_batch(self, paths: Sequence[str]) -> np.ndarray:
        return np.stack([load_image_array(path, self.preprocessing) for path in paths])

    def embed(self, paths: Sequence[str], *, description: str = "embedding images", show_progress: bool = True,
              keep: Callable[[int, np.ndarray], None] | None = None, collect: bool = True) -> np.ndarray | None:
        """(n, d) float32 for the paths. keep(start, rows): called with the rows of paths[start:start + len(rows)] as
        they are done, a few thousand images at a time and at the end, so a cache keeps them: a Ctrl-C after hours of
        embedding lost all of it. collect=False (with keep): rows are dropped once kept and None is returned; patch
        features of 100k images are 12 GB as float32."""
        batches = [list(paths[i : i + self.batch_size]) for i in range(0, len(paths), self.batch_size)]
        outputs: list[np.ndarray] = []
        # at most ~16 pieces per call: each is a cache shard, and many would make the cache merge them mid-run
        keep_every = max(KEEP_EVERY_IMAGES, math.ceil(len(paths) / 16))
        kept = 0  # outputs handed to keep so far
        kept_rows = done_rows = 0

        def hand_over() -> None:
            nonlocal kept, kept_rows
            if keep is not None and len(outputs) > kept:
                rows, start = np.concatenate(outputs[kept:]).astype(np.float32), kept_rows
                kept, kept_rows = len(outputs), done_rows  # first: a piece interrupted in keep is not handed over twice
                if not collect:
                    outputs[:kept] = [None] * kept
                keep(start, rows)

        # Decode the next batch while ONNX Runtime runs this one.
        try:
            with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(description, total=len(paths), enabled=show_progress) as advance:
                pending = pool.submit(self._load_batch, batches[0]) if batches else None
                for number, batch in enumerate(batches):
                    images = pending.result()  # type: ignore[union-attr]
                    pending = pool.submit(self._load_batch, batches[number + 1]) if number + 1 < len(batches) else None
                    outputs.append(self.session.run(None, {"images": images})[0])
                    done_rows += len(outputs[-1])
                    advance(len(batch))
                    if done_rows - kept_rows >= keep_every:
                        hand_over()
        except BaseException:  # interrupted or failed: what is done is still right, and kept
            try:
                hand_over()
            except Exception:  # noqa: BLE001 - the interruption or failure in flight is the one to report (a full cache disk hid a Ctrl-C)
                pass
            raise
        hand_over()
        if not collect and keep is not None:
            return None
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
    layout (vectors.npy + sha256.json) is read as one shard, and renamed to a shard on the first put.

    Processes may share a cache (simulations writing to one output directory, projects on one cache root): every
    change happens under an exclusive lock on `lock`, from the index as it is on disk then, never from this object's
    older view (a merge elsewhere would otherwise be overwritten by an index naming deleted shards); rows this object
    had that the disk no longer lists are written back, so a put never loses rows, unless the directory was emptied
    on purpose (its lock file is new). Files no index names are swept under the lock once an hour old. Opening takes a shared lock, and
    reads without one where locking is impossible (a read-only or lock-less mount): a row count checked against the
    index makes that cost a recompute at worst. A merge holds the lock while it writes; opening waits for it."""

    MAX_SHARDS = 32
    INDEX = "index.json"
    LOCK = "lock"
    LEGACY_ROWS, LEGACY_HASHES = "vectors.npy", "sha256.json"
    STRAY_AGE_S = 3600.0  # a file no index names is swept only this old: a writer without the lock may be writing it

    def __init__(self, directory: Path, model_key: str):
        self.directory = directory / model_key
        self.directory.mkdir(parents=True, exist_ok=True)
        self._shards: list[tuple[str, list[str]]] = []  # (file name, sha256 of each row)
        self._arrays: list[np.ndarray] = []  # memory maps, one per shard
        self._rows: dict[str, tuple[int, int]] = {}  # sha256 -> (shard, row)
        with self._locked(exclusive=False):
            self._load(self._listed_on_disk())
        self._lock_identity = _file_identity(self.directory / self.LOCK)

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[bool]:
        """Yields whether the lock is held. Read-write first (NFS emulates flock with POSIX locks, which need it)."""
        path, descriptor = self.directory / self.LOCK, -1
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                descriptor = os.open(path, flags, 0o666)  # group-shared caches: the umask decides
                break
            except OSError:
                continue
        try:
            held = False
            if descriptor >= 0:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                    held = True
                except OSError:  # a file system without flock (ENOSYS, ENOLCK)
                    pass
            yield held
        finally:
            if descriptor >= 0:
                os.close(descriptor)  # releases the lock

    def _listed_on_disk(self) -> list[tuple[str, list[str]]]:
        index_path = self.directory / self.INDEX
        try:
            if index_path.exists():
                return [(str(entry["file"]), [str(sha) for sha in entry["sha256"]])
                        for entry in json.loads(index_path.read_text())["shards"]]
            if (self.directory / self.LEGACY_HASHES).exists() and (self.directory / self.LEGACY_ROWS).exists():
                return [(self.LEGACY_ROWS, [str(sha) for sha in json.loads((self.directory / self.LEGACY_HASHES).read_text())])]
        except Exception:  # noqa: BLE001 - an unreadable index, whatever the damage: start over rather than guess
            pass
        return []

    def _load(self, listed: list[tuple[str, list[str]]]) -> None:
        """This object's view := `listed`, reusing the memory maps it already has. The lists are replaced, not
        emptied: a CachedRows handed out earlier keeps reading the shards it was given."""
        mapped = dict(zip((name for name, _ in self._shards), self._arrays))
        self._shards, self._arrays, self._rows = [], [], {}
        for name, hashes in listed:
            try:
                array = mapped[name] if name in mapped else np.load(self.directory / name, mmap_mode="r", allow_pickle=False)
                usable = (array.ndim >= 1 and len(array) == len(hashes) > 0  # an empty shard would set a wrong row shape
                          and (not self._arrays or array.shape[1:] == self._arrays[0].shape[1:]))
            except Exception:  # noqa: BLE001 - missing, empty, truncated, not an .npy: recomputed, never half used
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
        return _read_rows([self._rows[sha] for sha in hashes], self._arrays)

    def rows(self, hashes: Sequence[str]) -> CachedRows:
        """The rows of these hashes, read one at a time when indexed (for callers that visit rows, not all at once)."""
        return CachedRows([self._rows[sha] for sha in hashes], self._arrays)

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if not len(hashes):
            return
        vectors = np.asarray(vectors)
        if len(vectors) != len(hashes):
            raise ValueError(f"{len(vectors)} rows for {len(hashes)} hashes")
        with self._locked(exclusive=True) as held:
            earlier = (self._arrays, dict(self._rows))
            listed, taken_over = self._own_legacy_files(self._listed_on_disk())
            self._load(listed)  # what other processes wrote since we looked
            reference = self._arrays or earlier[0]
            if reference and vectors.shape[1:] != reference[0].shape[1:]:
                raise ValueError(f"rows of shape {vectors.shape[1:]} in a cache of {reference[0].shape[1:]}")
            lock_identity = _file_identity(self.directory / self.LOCK)
            if lock_identity == self._lock_identity:  # a new lock file: the directory was cleared on purpose
                self._write_back(*earlier)
            self._lock_identity = lock_identity
            name = self._write_shard(vectors)
            self._add_shard(name, list(hashes), np.load(self.directory / name, mmap_mode="r", allow_pickle=False))
            replaced = self._merge_shards() if len(self._shards) > self.MAX_SHARDS else []
            self._write_index()
            for old in [*replaced, *taken_over]:  # read by this put and no longer named: gone, lock or not
                (self.directory / old).unlink(missing_ok=True)
            if taken_over:
                (self.directory / self.LEGACY_HASHES).unlink(missing_ok=True)
            if held:
                self._remove_stray_files()

    def _write_back(self, arrays: list[np.ndarray], rows: dict[str, tuple[int, int]]) -> None:
        """Rows this object could read before the reload (`arrays`, `rows`: its earlier view) that the disk no longer
        lists (an index damaged or overwritten since we opened it), copied from those memory maps into a new shard."""
        lost = [sha for sha in rows if sha not in self._rows]
        if not lost or (self._arrays and arrays[0].shape[1:] != self._arrays[0].shape[1:]):
            return  # nothing lost, or a cache of other rows now: ours are not its rows
        name = self._write_rows(lost, rows, arrays)
        self._add_shard(name, lost, np.load(self.directory / name, mmap_mode="r", allow_pickle=False))

    def _own_legacy_files(self, listed: list[tuple[str, list[str]]]) -> tuple[list[tuple[str, list[str]]], list[str]]:
        """A shard under a name an older version may still rewrite (vectors.npy) gets a shard name of its own, by a
        hard link, or a copy where links are refused (FAT, some network mounts): an index naming vectors.npy would
        pair its hash list with whatever rows an old process put there later. Returns the listing and the old names."""
        owned, taken_over = [], []
        for name, hashes in listed:
            if not SHARD_NAME.fullmatch(name) and (self.directory / name).is_file():
                if not hashes:  # an empty legacy file: nothing to take over
                    taken_over.append(name)
                    continue
                new_name = f"rows-{uuid.uuid4().hex}.npy"
                try:
                    os.link(self.directory / name, self.directory / new_name)
                except OSError:
                    partial = self.directory / f"tmp-{uuid.uuid4().hex}.npy"
                    shutil.copyfile(self.directory / name, partial)
                    _fsync_file(partial)
                    partial.replace(self.directory / new_name)
                taken_over.append(name)
                name = new_name
            owned.append((name, hashes))
        return owned, taken_over

    def _write_shard(self, vectors: np.ndarray) -> str:
        name = f"rows-{uuid.uuid4().hex}.npy"  # unique: two processes sharing a cache never write one shard
        partial = self.directory / f"tmp-{uuid.uuid4().hex}.npy"
        with open(partial, "wb") as handle:
            np.save(handle, vectors)
        _fsync_file(partial)  # on disk before an index names it: a power cut leaves no named torn shard
        partial.replace(self.directory / name)
        return name

    def _write_index(self) -> None:
        partial = self.directory / f"tmp-{uuid.uuid4().hex}.json"
        with open(partial, "w") as handle:
            json.dump({"shards": [{"file": name, "sha256": hashes} for name, hashes in self._shards]}, handle)
        _fsync_file(partial)
        partial.replace(self.directory / self.INDEX)
        _fsync_file(self.directory)  # the rename reaches the disk before any shard it stopped naming is deleted

    def _remove_stray_files(self) -> None:
        """Files a killed process left (temporary files, a shard it wrote but never indexed), swept under the lock
        once STRAY_AGE_S old: a writer that could not take the lock (a read-only lock file on NFS, a process of the
        previous version) may still be writing a young one. A reader's open memory map survives the unlink."""
        listed = {name for name, _ in self._shards}
        now = time.time()
        for path in self.directory.iterdir():
            if path.name.startswith("tmp-") or path.name.endswith((".partial", ".partial.npy")) \
                    or (SHARD_NAME.fullmatch(path.name) and path.name not in listed) \
                    or path.name in (self.LEGACY_ROWS, self.LEGACY_HASHES):  # .partial: the previous version's temp files
                try:
                    if now - path.stat().st_mtime > self.STRAY_AGE_S:
                        path.unlink(missing_ok=True)
                except OSError:  # gone meanwhile, or not ours to delete: a sweep never fails a put
                    continue

    def _write_rows(self, hashes: list[str], rows: dict[str, tuple[int, int]], arrays: list[np.ndarray]) -> str:
        """These rows (located by `rows` in `arrays`) into one new shard, through a memory map (never all in memory)."""
        partial = self.directory / f"tmp-{uuid.uuid4().hex}.npy"
        written = np.lib.format.open_memmap(partial, mode="w+", dtype=np.result_type(*(a.dtype for a in arrays)),
                                            shape=(len(hashes), *arrays[0].shape[1:]))
        for start in range(0, len(hashes), 4096):
            written[start:start + 4096] = _read_rows([rows[sha] for sha in hashes[start:start + 4096]], arrays)
        written.flush()
        del written
        _fsync_file(partial)
        name = f"rows-{uuid.uuid4().hex}.npy"
        partial.replace(self.directory / name)
        return name

    def _merge_shards(self) -> list[str]:
        """All live rows into one new shard; returns the names of the shards it replaces (the caller writes the index)."""
        hashes = [sha for sha, _ in sorted(self._rows.items(), key=lambda item: item[1])]
        name = self._write_rows(hashes, self._rows, self._arrays)
        replaced = [shard_name for shard_name, _ in self._shards]
        self._shards, self._arrays, self._rows = [], [], {}  # new lists: earlier CachedRows keep the old maps
        self._add_shard(name, hashes, np.load(self.directory / name, mmap_mode="r", allow_pickle=False))
        return replaced


def _read_rows(located: list[tuple[int, int]], arrays: list[np.ndarray]) -> np.ndarray:
    """Rows at (shard, row) positions, in this order, as one in-memory array."""
    located_array = np.array(located, dtype=np.int64).reshape(-1, 2)
    if not arrays:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.empty((len(located_array), *arrays[0].shape[1:]), dtype=np.result_type(*(a.dtype for a in arrays)))
    for shard in np.unique(located_array[:, 0]):
        positions = np.flatnonzero(located_array[:, 0] == shard)
        rows = located_array[positions, 1]
        order = np.argsort(rows, kind="stable")  # ascending reads from the memory map
        for start in range(0, len(order), 4096):  # in blocks: a fancy index on a memory map copies what it reads
            block = order[start:start + 4096]
            out[positions[block]] = arrays[shard][rows[block]]
    return out


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():  # a file the kernel could not write must not be named by an index
            raise
        # a directory on a file system that cannot sync one: the rename is as durable as it gets there
    finally:
        os.close(descriptor)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """Which file this is: a file deleted and created again differs even where the inode number is reused."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


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
