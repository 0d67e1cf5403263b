"""Cosine k-NN search over frozen-backbone embeddings, with FAISS.

The pretrained backbone's embeddings do not change between rounds, so the index is built once and
then grown with new images only (`add` skips ids it already holds). Vectors are L2-normalised on
the way in, so inner product is cosine similarity.

Small pools use exact search (`IndexFlatIP` inside `IndexIDMap2`). Past `ivf_threshold` vectors the
index switches itself to an inverted-file index (`IndexIVFFlat`, nlist ~ 4*sqrt(n), trained on a
sample), where a query visits `nprobe` lists instead of every vector.

    index = EmbeddingIndex()
    index.build(embeddings=emb, ids=np.arange(len(emb)))
    scores, ids = index.search(queries=emb[:3], k=10)   # ids are -1 where fewer than k exist
    index.save(project_dir / "index")
    index = EmbeddingIndex.load(project_dir / "index")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np

__all__ = ["EmbeddingIndex", "normalize_rows"]

IVF_THRESHOLD_VECTORS = 100_000
# FAISS wants ~39 training points per centroid; more buys little and costs k-means time.
TRAIN_POINTS_PER_LIST = 40
MAX_TRAIN_POINTS = 160_000
KMEANS_ITERATIONS = 10

_INDEX_FILE = "index.faiss"
_IDS_FILE = "ids.npy"
_META_FILE = "meta.json"


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-length rows; all-zero rows stay zero instead of becoming NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array (n, dim), got shape {vectors.shape}")
    out = np.array(vectors, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class EmbeddingIndex:
    """Cosine-similarity index keyed by int64 ids (e.g. positions or image ids)."""

    def __init__(
        self,
        *,
        ivf_threshold: int = IVF_THRESHOLD_VECTORS,
        nlist: int | None = None,
        nprobe: int | None = None,
        seed: int = 0,
    ) -> None:
        """`nlist`/`nprobe` override the automatic IVF sizes (nlist ~ 4*sqrt(n), nprobe ~ nlist/128, at least 8)."""
        self.ivf_threshold = int(ivf_threshold)
        self._nlist_override = nlist
        self._nprobe_override = nprobe
        self.seed = int(seed)
        self._index: faiss.Index | None = None
        self._ids = np.empty(0, dtype=np.int64)
        self._dim: int | None = None
        self._kind = "empty"

    # ---- properties -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """Ids held, in the order they were added (a copy)."""
        return self._ids.copy()

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def kind(self) -> str:
        """'empty', 'flat' (exact) or 'ivf' (approximate)."""
        return self._kind

    @property
    def nprobe(self) -> int | None:
        if self._kind != "ivf":
            return None
        return int(faiss.extract_index_ivf(self._index).nprobe)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self._kind!r}, n={len(self)}, dim={self._dim})"

    # ---- building ---------------------------------------------------------------------------
    def build(self, *, embeddings: np.ndarray, ids: np.ndarray) -> "EmbeddingIndex":
        """Replace the contents with `embeddings` keyed by `ids` (unique)."""
        vectors, ids = self._check_input(embeddings, ids)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique")
        self._index = None
        self._ids = np.empty(0, dtype=np.int64)
        self._dim = vectors.shape[1]
        self._kind = "empty"
        self._create_for(vectors)
        self._add_vectors(vectors, ids)
        return self

    def add(self, *, embeddings: np.ndarray, ids: np.ndarray) -> int:
        """Add the rows whose id is not yet held; returns how many were added.

        Crossing `ivf_threshold` rebuilds the exact index as an IVF one (once).
        """
        vectors, ids = self._check_input(embeddings, ids)
        if self._index is None:
            # the first add is a build over the new rows (duplicates within the call dropped)
            ids_unique, first = np.unique(ids, return_index=True)
            order = np.sort(first)
            self.build(embeddings=vectors[order], ids=ids[order])
            return len(order)
        if vectors.shape[1] != self._dim:
            raise ValueError(f"embedding dim {vectors.shape[1]} != index dim {self._dim}")
        new_mask = ~np.isin(ids, self._ids)
        # an id repeated inside this call is added once
        _, first = np.unique(ids, return_index=True)
        keep_first = np.zeros(len(ids), dtype=bool)
        keep_first[first] = True
        new_mask &= keep_first
        if not new_mask.any():
            return 0
        vectors, ids = vectors[new_mask], ids[new_mask]
        if self._kind == "flat" and len(self) + len(ids) > self.ivf_threshold:
            all_vectors = np.concatenate([self._flat_vectors(), vectors])
            all_ids = np.concatenate([self._ids, ids])
            self.build(embeddings=all_vectors, ids=all_ids)
        else:
            self._add_vectors(vectors, ids)
        return int(len(ids))

    # ---- searching --------------------------------------------------------------------------
    def search(self, *, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first; scores are cosine similarities.

        Where fewer than k vectors are found the id is -1 and the score -inf.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if self._index is None:
            raise ValueError("the index is empty: call build() first")
        if queries.shape[1] != self._dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self._dim}")
        if len(queries) == 0:
            return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
        scores, ids = self._index.search(normalize_rows(queries), int(k))
        missing = ids < 0
        scores[missing] = -np.inf
        return scores, ids

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the index into directory `path` (created): the FAISS file, ids and metadata."""
        if self._index is None:
            raise ValueError("nothing to save: the index is empty")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(path / _INDEX_FILE))
        np.save(path / _IDS_FILE, self._ids)
        meta = {
            "format": 1,
            "kind": self._kind,
            "dim": self._dim,
            "n": len(self),
            "ivf_threshold": self.ivf_threshold,
            "nlist": self._nlist_override,
            "nprobe": self._nprobe_override,
            "seed": self.seed,
        }
        (path / _META_FILE).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingIndex":
        path = Path(path)
        meta_path = path / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no saved EmbeddingIndex at {path} (missing {_META_FILE})")
        meta = json.loads(meta_path.read_text())
        out = cls(
            ivf_threshold=meta["ivf_threshold"],
            nlist=meta.get("nlist"),
            nprobe=meta.get("nprobe"),
            seed=meta.get("seed", 0),
        )
        out._index = faiss.read_index(str(path / _INDEX_FILE))
        out._ids = np.load(path / _IDS_FILE).astype(np.int64, copy=False)
        out._dim = int(meta["dim"])
        out._kind = meta["kind"]
        if out._index.ntotal != len(out._ids):
            raise ValueError(
                f"corrupt index at {path}: {out._index.ntotal} vectors but {len(out._ids)} ids"
            )
        return out

    # ---- internals --------------------------------------------------------------------------
    @staticmethod
    def _check_input(embeddings: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.asarray(embeddings)
        if vectors.ndim != 2 or vectors.shape[1] == 0:
            raise ValueError(f"embeddings must be 2-d (n, dim), got shape {vectors.shape}")
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != len(vectors):
            raise ValueError(f"ids must be 1-d with one id per row: {ids.shape} vs {len(vectors)} rows")
        if len(ids) and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        # chunked so a 5 GB pool does not need a 1.3 GB boolean temporary
        for start in range(0, len(vectors), 65_536):
            if not np.isfinite(vectors[start : start + 65_536]).all():
                raise ValueError("embeddings contain NaN or inf")
        return vectors, ids.astype(np.int64, copy=False)

    def _create_for(self, vectors: np.ndarray) -> None:
        n, dim = vectors.shape
        if n <= self.ivf_threshold:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            self._kind = "flat"
            return
        nlist = self._nlist_override or max(1, int(round(4 * math.sqrt(n))))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = self.seed
        ivf.cp.max_points_per_centroid = MAX_TRAIN_POINTS // nlist + 1
        n_train = min(n, max(nlist * TRAIN_POINTS_PER_LIST, 10_000), MAX_TRAIN_POINTS)
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(n, size=n_train, replace=False))
        ivf.train(normalize_rows(vectors[sample]))
        ivf.nprobe = self._nprobe_override or max(8, nlist // 128)
        ivf.nprobe = min(ivf.nprobe, nlist)
        self._index = ivf
        self._kind = "ivf"

    def _add_vectors(self, vectors: np.ndarray, ids: np.ndarray, chunk_rows: int = 65_536) -> None:
        # normalise chunk by chunk so a 1M x 1280 pool needs no second full-size copy
        for start in range(0, len(vectors), chunk_rows):
            stop = start + chunk_rows
            self._index.add_with_ids(normalize_rows(vectors[start:stop]), ids[start:stop])
        self._ids = np.concatenate([self._ids, ids]) if len(self._ids) else ids.copy()

    def _flat_vectors(self) -> np.ndarray:
        """Stored (normalised) vectors of the exact index, in insertion order."""
        flat = faiss.downcast_index(self._index.index)
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * self._dim).reshape(
            flat.ntotal, self._dim
        ).copy()
