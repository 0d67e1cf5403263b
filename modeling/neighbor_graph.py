"""The k nearest neighbours of every image among a collection's images, kept between rounds.

Near-duplicates and outliers both read the k-NN graph of the pretrained embeddings. Computed from scratch it costs
O(n^2 d): 50k images of 1280-d, 24 s on 2 cores, and a round needed it twice. An image's embedding never changes (it
is keyed by content hash and embedding model), so with `NeighborGraphCache` a round computes only the rows of images
it has not seen, and for every other image its similarity to the new ones: O(new * n * d). The result is the same
graph (exact up to the order of equal similarities), except past `IVF_THRESHOLD_VECTORS` images, where rows computed
afresh come from the approximate IVF index as they always did.

- `nearest_neighbors(embeddings=, k=, keys=, cache=)` -> `NeighborGraph` (similarities, positions, how it was made).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modeling.embedding_index import EmbeddingIndex, normalize_rows

__all__ = ["GRAPH_NEIGHBORS", "NeighborGraph", "NeighborGraphCache", "nearest_neighbors"]

GRAPH_NEIGHBORS = 10  # what a round keeps: outliers read 10 neighbours, near-duplicates 5
EXACT_KNN_MAX_ROWS = 20_000  # up to here a search is one exact matrix product (chunked); past it, the FAISS index
ROW_BLOCK = 2048  # query rows per matrix product: 2048 x 50k float32 is 400 MB at most
# Past this share of rows to compute, merging saves little: the whole graph is computed and the cache rewritten.
RECOMPUTE_SHARE = 0.5


@dataclass
class NeighborGraph:
    """similarities and positions, each (n, k): the k most similar OTHER rows of each row, best first.
    status: rows, rows_from_cache, rows_computed, new_images (what the cache had not seen) and why it was not used."""

    similarities: np.ndarray
    positions: np.ndarray
    status: dict[str, Any] = field(default_factory=dict)

    def first(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of each row (fewer when the collection is smaller)."""
        return self.similarities[:, :k], self.positions[:, :k]


class NeighborGraphCache:
    """One collection's k-NN graph on disk (.npz): the images' content keys in row order, a fingerprint of each
    image's normalised embedding (an image whose embedding differs is a new image: another embedding model never
    reuses a row), and each row's neighbours as rows of that file with their similarities. A file that cannot be read is started over (it is a cache), never half used."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.keys: list[str] = []
        self.fingerprints = np.empty(0, dtype=np.uint64)
        self.neighbors = np.empty((0, 0), dtype=np.int32)
        self.similarities = np.empty((0, 0), dtype=np.float32)
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                keys, fingerprints, neighbors, similarities = (stored[name] for name in ("keys", "fingerprints", "neighbors", "similarities"))
            m = len(keys)
            if fingerprints.shape == (m,) and neighbors.ndim == 2 and neighbors.shape[0] == m and similarities.shape == neighbors.shape \
                    and int(neighbors.min(initial=0)) >= 0 and int(neighbors.max(initial=-1)) < m:
                self.keys = keys.astype(str).tolist()
                self.fingerprints = fingerprints.astype(np.uint64)
                self.neighbors = neighbors.astype(np.int32)
                self.similarities = similarities.astype(np.float32)
        except Exception:  # noqa: BLE001 - empty, truncated, bad CRC, not an npz: all mean "start over"
            self.keys = []

    @property
    def width(self) -> int:
        return int(self.neighbors.shape[1]) if self.neighbors.ndim == 2 else 0

    def save(self, *, keys: Sequence[str], fingerprints: np.ndarray, graph: NeighborGraph) -> bool:
        """Write this collection's graph (atomically: a torn write never replaces a good file). False when it could not
        be written (full disk, read-only cache): the round's results stand, the next one recomputes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.stem}.{os.getpid()}.tmp.npz")  # two rounds sharing a cache dir: no clash
        try:
            np.savez(partial, keys=np.asarray(list(keys), dtype="S"), fingerprints=np.asarray(fingerprints, dtype=np.uint64),
                     neighbors=graph.positions.astype(np.int32), similarities=graph.similarities.astype(np.float32))
            partial.replace(self.path)
        except OSError:
            partial.unlink(missing_ok=True)
            return False
        for other in self.path.parent.glob(f"{self.path.stem}.*.tmp.npz"):  # a killed round's temp file
            try:
                if time.time() - other.stat().st_mtime > 3600:
                    other.unlink(missing_ok=True)
            except OSError:
                continue
        return True


def nearest_neighbors(*, embeddings: np.ndarray, k: int, keys: Sequence[str] | None = None, cache: NeighborGraphCache | None = None) -> NeighborGraph:
    """The k most similar other rows of every row (cosine), best first. With `keys` (content hashes, one per row,
    distinct) and `cache`, rows the cache holds are reused and the cache is rewritten when anything changed."""
    vectors = normalize_rows(np.asarray(embeddings, dtype=np.float32))
    n = len(vectors)
    k = min(int(k), n - 1)
    if k <= 0:
        return NeighborGraph(np.empty((n, 0), dtype=np.float32), np.empty((n, 0), dtype=np.int64), {"rows": n, "rows_from_cache": 0, "rows_computed": 0})
    if cache is None or keys is None:
        sims, ids = _search(vectors, np.arange(n), k)
        return NeighborGraph(sims, ids, {"rows": n, "rows_from_cache": 0, "rows_computed": n})
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} embeddings")
    if len(set(keys)) != n:
        raise ValueError("keys must be distinct: one content hash per image")
    fingerprints = _fingerprints(vectors)
    graph = _from_cache(vectors, k, keys=keys, fingerprints=fingerprints, cache=cache)
    if graph.status["rows_computed"] or list(keys) != cache.keys or cache.width != k:
        graph.status["saved"] = cache.save(keys=keys, fingerprints=fingerprints, graph=graph)
    return graph


def _from_cache(vectors: np.ndarray, k: int, *, keys: Sequence[str], fingerprints: np.ndarray, cache: NeighborGraphCache) -> NeighborGraph:
    n = len(vectors)
    row_of = {key: row for row, key in enumerate(cache.keys)}
    cached_row = np.array([row_of.get(key, -1) for key in keys], dtype=np.int64)
    # an image the cache knows by key but with another embedding is a new image
    known = cached_row >= 0
    known[known] = cache.fingerprints[cached_row[known]] == fingerprints[known]
    cached_row[~known] = -1
    new_images = np.flatnonzero(~known)
    reason = None
    if cache.width < k:
        reason = "no cached graph" if not cache.keys else f"the cached graph holds {cache.width} neighbours, {k} asked"
    if reason is None:
        # a cached row is this round's row, merged with the new images, while every neighbour it lists is still here
        # (a removed one leaves its k-th neighbour unknown)
        position_of_row = np.full(len(cache.keys), -1, dtype=np.int64)
        position_of_row[cached_row[known]] = np.flatnonzero(known)
        listed_positions = position_of_row[cache.neighbors[cached_row[known]][:, :k]]
        intact = (listed_positions >= 0).all(axis=1)
        reusable = np.flatnonzero(known)[intact]
        if n - len(reusable) > RECOMPUTE_SHARE * n:
            reason = f"{n - len(reusable)} of {n} rows to compute"
    if reason is not None:
        sims, ids = _search(vectors, np.arange(n), k)
        return NeighborGraph(sims, ids, {"rows": n, "rows_from_cache": 0, "rows_computed": n, "new_images": int(len(new_images)), "recomputed": reason})

    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    fresh = np.setdiff1d(np.arange(n), reusable)
    if len(fresh):
        sims[fresh], ids[fresh] = _search(vectors, fresh, k)
    cached_sims = cache.similarities[cached_row[reusable]][:, :k]
    cached_ids = listed_positions[intact]
    for start in range(0, len(reusable), ROW_BLOCK):
        rows = reusable[start:start + ROW_BLOCK]
        block_sims = cached_sims[start:start + ROW_BLOCK]
        block_ids = cached_ids[start:start + ROW_BLOCK]
        if len(new_images):  # the only images a cached row has not been compared with
            block_sims = np.concatenate([block_sims, vectors[rows] @ vectors[new_images].T], axis=1)
            block_ids = np.concatenate([block_ids, np.broadcast_to(new_images, (len(rows), len(new_images)))], axis=1)
        sims[rows], ids[rows] = _top(block_sims, block_ids, k)
    status = {"rows": n, "rows_from_cache": int(len(reusable)), "rows_computed": int(len(fresh)), "new_images": int(len(new_images))}
    return NeighborGraph(sims, ids, status)


def _search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar other rows of vectors[queries], best first."""
    n = len(vectors)
    if n > EXACT_KNN_MAX_ROWS:
        index = EmbeddingIndex().build(embeddings=vectors, ids=np.arange(n))
        sims, ids = index.search(queries=vectors[queries], k=k + 1)
        # drop self wherever it appears (exact duplicates may rank before it), keep k others
        not_self = ids != queries[:, None]
        keep = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    sims_out = np.empty((len(queries), k), dtype=np.float32)
    ids_out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), ROW_BLOCK):
        rows = queries[start:start + ROW_BLOCK]
        block = vectors[rows] @ vectors.T
        block[np.arange(len(rows)), rows] = -np.inf  # never your own neighbour
        sims_out[start:start + len(rows)], ids_out[start:start + len(rows)] = _top(block, np.broadcast_to(np.arange(n), block.shape), k)
    return sims_out, ids_out


def _top(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest similarities and their ids, best first."""
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    part_sims = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-part_sims, axis=1, kind="stable")
    chosen = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(sims, chosen, axis=1).astype(np.float32), np.take_along_axis(np.asarray(ids), chosen, axis=1).astype(np.int64)


def _fingerprints(vectors: np.ndarray) -> np.ndarray:
    """An 8-byte digest of each normalised row: equal rows, equal digests."""
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") for row in rows], dtype=np.uint64)
