"""The k-NN graph kept between rounds: whatever changed in the collection (new images, removed ones, another order,
an embedding that changed under its key, a damaged file), the graph equals one computed from scratch, and only the
rows that must be are computed again."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modeling import neighbor_graph
from modeling.label_quality import find_near_duplicates, find_outliers
from modeling.neighbor_graph import NeighborGraphCache, nearest_neighbors

K = 6


def _collection(n: int, seed: int = 0, dim: int = 32) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), [f"{seed}-{i:05d}" for i in range(n)]


def _brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def _assert_same_graph(graph, vectors: np.ndarray) -> None:
    sims, ids = _brute_force(vectors, K)
    np.testing.assert_array_equal(graph.positions, ids)  # random vectors: no equal similarities to order
    np.testing.assert_allclose(graph.similarities, sims, atol=1e-5)


def test_without_a_cache_it_is_the_brute_force_graph() -> None:
    vectors, _ = _collection(500)
    _assert_same_graph(nearest_neighbors(embeddings=vectors, k=K), vectors)
    tiny = nearest_neighbors(embeddings=vectors[:3], k=K)  # fewer images than k + 1: every other image
    assert tiny.positions.shape == (3, 2)


def test_a_later_round_computes_only_new_rows_and_gets_the_same_graph(tmp_path: Path) -> None:
    vectors, keys = _collection(400)
    path = tmp_path / "graph.npz"
    first = nearest_neighbors(embeddings=vectors[:380], k=K, keys=keys[:380], cache=NeighborGraphCache(path))
    assert (first.status["rows_computed"], first.status["rows_from_cache"], first.status["saved"]) == (380, 0, True)
    _assert_same_graph(first, vectors[:380])

    # 20 new images, and the collection comes in another order
    order = np.random.default_rng(1).permutation(400)
    second = nearest_neighbors(embeddings=vectors[order], k=K, keys=[keys[i] for i in order], cache=NeighborGraphCache(path))
    assert (second.status["rows_computed"], second.status["rows_from_cache"], second.status["new_images"]) == (20, 380, 20)
    _assert_same_graph(second, vectors[order])

    # nothing new: nothing computed, the file is left as it is
    before = path.stat().st_mtime_ns
    third = nearest_neighbors(embeddings=vectors[order], k=K, keys=[keys[i] for i in order], cache=NeighborGraphCache(path))
    assert (third.status["rows_computed"], "saved" in third.status, path.stat().st_mtime_ns) == (0, False, before)
    _assert_same_graph(third, vectors[order])


def test_removed_images_and_changed_embeddings_recompute_the_rows_they_touch(tmp_path: Path) -> None:
    vectors, keys = _collection(300, seed=2)
    path = tmp_path / "graph.npz"
    full = nearest_neighbors(embeddings=vectors, k=K, keys=keys, cache=NeighborGraphCache(path))
    # remove three images: every row that listed one of them must be computed again, the rest come from the cache
    removed = {5, 17, 250}
    listed_removed = {i for i in range(300) if i not in removed and removed & set(full.positions[i].tolist())}
    assert listed_removed  # the test means something
    kept = [i for i in range(300) if i not in removed]
    after_removal = nearest_neighbors(embeddings=vectors[kept], k=K, keys=[keys[i] for i in kept], cache=NeighborGraphCache(path))
    assert after_removal.status["rows_computed"] == len(listed_removed) and after_removal.status["new_images"] == 0
    _assert_same_graph(after_removal, vectors[kept])

    # one image's embedding changed under the same key (another embedding model writing the same cache): a new image
    changed = vectors[kept].copy()
    changed[0] = np.random.default_rng(3).standard_normal(changed.shape[1])
    again = nearest_neighbors(embeddings=changed, k=K, keys=[keys[i] for i in kept], cache=NeighborGraphCache(path))
    assert again.status["new_images"] == 1
    _assert_same_graph(again, changed)


def test_a_damaged_or_narrower_cache_is_computed_again(tmp_path: Path) -> None:
    vectors, keys = _collection(200, seed=4)
    path = tmp_path / "graph.npz"
    path.write_bytes(b"not an npz")
    graph = nearest_neighbors(embeddings=vectors, k=K, keys=keys, cache=NeighborGraphCache(path))
    assert graph.status["rows_computed"] == 200 and graph.status["recomputed"] == "no cached graph"
    _assert_same_graph(graph, vectors)
    wider = nearest_neighbors(embeddings=vectors, k=K + 2, keys=keys, cache=NeighborGraphCache(path))
    assert wider.status["rows_computed"] == 200 and "holds 6 neighbours, 8 asked" in wider.status["recomputed"]
    with pytest.raises(ValueError, match="distinct"):
        nearest_neighbors(embeddings=vectors[:2], k=K, keys=["same", "same"], cache=NeighborGraphCache(path))


def test_past_the_exact_search_new_rows_come_from_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neighbor_graph, "EXACT_KNN_MAX_ROWS", 100)  # the FAISS path (a flat index at this size: exact)
    vectors, keys = _collection(260, seed=5)
    path = tmp_path / "graph.npz"
    nearest_neighbors(embeddings=vectors[:250], k=K, keys=keys[:250], cache=NeighborGraphCache(path))
    graph = nearest_neighbors(embeddings=vectors, k=K, keys=keys, cache=NeighborGraphCache(path))
    assert graph.status["rows_computed"] == 10
    _assert_same_graph(graph, vectors)


def test_findings_read_the_graph_they_are_given() -> None:
    vectors, _ = _collection(120, seed=6)
    graph = nearest_neighbors(embeddings=vectors, k=10)
    assert find_outliers(embeddings=vectors, graph=graph).summary == find_outliers(embeddings=vectors).summary
    near, computed = find_near_duplicates(embeddings=vectors, threshold=0.5, graph=graph), find_near_duplicates(embeddings=vectors, threshold=0.5)
    assert near.summary == computed.summary
    np.testing.assert_array_equal(near.scores, computed.scores)  # each image's best similarity and neighbour, read off the graph
    np.testing.assert_array_equal(near.related, computed.related)
    with pytest.raises(ValueError, match="neighbour graph holds"):
        find_outliers(embeddings=vectors[:50], graph=graph)
