"""EmbeddingIndex: exact cosine search, incremental adds, the automatic IVF switch, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from modeling.embedding_index import EmbeddingIndex, normalize_rows


@pytest.fixture
def clustered() -> np.ndarray:
    """600 vectors in 12 tight clusters, 24-d: neighbours are unambiguous."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 24))
    members = rng.integers(0, 12, size=600)
    return (centres[members] + 0.15 * rng.normal(size=(600, 24))).astype(np.float32)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = normalize_rows(queries) @ normalize_rows(vectors).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_exact_search_matches_brute_force_cosine(clustered: np.ndarray) -> None:
    index = EmbeddingIndex().build(embeddings=clustered, ids=np.arange(len(clustered)))
    assert index.kind == "flat" and len(index) == 600 and index.dim == 24
    scores, ids = index.search(queries=clustered[:20], k=5)
    assert ids.shape == scores.shape == (20, 5)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))  # itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    expected = brute_force(clustered, clustered[:20], 5)
    assert (ids == expected).mean() > 0.98  # ties in float32 may swap a pair
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_vector_length_does_not_matter(clustered: np.ndarray) -> None:
    index = EmbeddingIndex().build(embeddings=clustered * 7.5, ids=np.arange(len(clustered)))
    _, ids_scaled = index.search(queries=clustered[:10] * 0.01, k=3)
    _, ids_plain = EmbeddingIndex().build(embeddings=clustered, ids=np.arange(600)).search(
        queries=clustered[:10], k=3
    )
    np.testing.assert_array_equal(ids_scaled, ids_plain)


def test_arbitrary_ids_and_padding_when_k_exceeds_size() -> None:
    vectors = np.eye(3, dtype=np.float32)
    index = EmbeddingIndex().build(embeddings=vectors, ids=np.array([1000, 2000, 3000]))
    scores, ids = index.search(queries=vectors[1], k=5)
    assert ids[0, 0] == 2000
    assert list(ids[0, 3:]) == [-1, -1]
    assert np.all(np.isneginf(scores[0, 3:]))
    np.testing.assert_array_equal(index.ids, [1000, 2000, 3000])


def test_add_takes_only_new_ids(clustered: np.ndarray) -> None:
    index = EmbeddingIndex().build(embeddings=clustered[:400], ids=np.arange(400))
    added = index.add(embeddings=clustered[300:600], ids=np.arange(300, 600))
    assert added == 200 and len(index) == 600
    assert index.add(embeddings=clustered[:50], ids=np.arange(50)) == 0
    assert len(index) == 600
    np.testing.assert_array_equal(np.sort(index.ids), np.arange(600))
    _, ids = index.search(queries=clustered[590:600], k=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(590, 600))


def test_add_on_empty_index_builds_it(clustered: np.ndarray) -> None:
    index = EmbeddingIndex()
    assert index.add(embeddings=clustered[:10], ids=np.arange(10)) == 10
    assert len(index) == 10 and index.kind == "flat"


def test_ivf_chosen_past_threshold_with_good_recall(clustered: np.ndarray) -> None:
    index = EmbeddingIndex(ivf_threshold=500, nprobe=8).build(
        embeddings=clustered, ids=np.arange(len(clustered))
    )
    assert index.kind == "ivf"
    assert index.nprobe == 8
    _, ids = index.search(queries=clustered[:50], k=10)
    expected = brute_force(clustered, clustered[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)])
    assert recall >= 0.9


def test_growing_past_threshold_switches_to_ivf_and_keeps_everything(clustered: np.ndarray) -> None:
    index = EmbeddingIndex(ivf_threshold=500).build(embeddings=clustered[:450], ids=np.arange(450))
    assert index.kind == "flat"
    index.add(embeddings=clustered[450:], ids=np.arange(450, 600))
    assert index.kind == "ivf" and len(index) == 600
    np.testing.assert_array_equal(index.ids, np.arange(600))
    _, ids = index.search(queries=clustered[::60], k=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 600, 60))


@pytest.mark.parametrize("ivf_threshold", [10_000, 300])
def test_save_and_load_round_trip(tmp_path, clustered: np.ndarray, ivf_threshold: int) -> None:
    index = EmbeddingIndex(ivf_threshold=ivf_threshold).build(
        embeddings=clustered, ids=np.arange(len(clustered)) + 5
    )
    before = index.search(queries=clustered[:7], k=4)
    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.kind == index.kind and len(loaded) == len(index) and loaded.dim == 24
    np.testing.assert_array_equal(loaded.ids, index.ids)
    after = loaded.search(queries=clustered[:7], k=4)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    # still incremental after loading
    assert loaded.add(embeddings=clustered[:3], ids=np.array([5, 6, 10_000])) == 1


def test_load_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved EmbeddingIndex"):
        EmbeddingIndex.load(tmp_path / "nothing")


def test_bad_input_is_rejected(clustered: np.ndarray) -> None:
    index = EmbeddingIndex()
    with pytest.raises(ValueError, match="empty"):
        index.search(queries=clustered[:1], k=1)
    with pytest.raises(ValueError, match="one id per row"):
        index.build(embeddings=clustered, ids=np.arange(5))
    with pytest.raises(ValueError, match="unique"):
        index.build(embeddings=clustered[:2], ids=np.array([1, 1]))
    bad = clustered[:4].copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.build(embeddings=bad, ids=np.arange(4))
    index.build(embeddings=clustered, ids=np.arange(600))
    with pytest.raises(ValueError, match="dim"):
        index.search(queries=np.ones((1, 5), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="dim"):
        index.add(embeddings=np.ones((1, 5), dtype=np.float32), ids=np.array([9999]))
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries=clustered[:1], k=0)


def test_zero_vectors_do_not_produce_nan() -> None:
    vectors = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    index = EmbeddingIndex().build(embeddings=vectors, ids=np.arange(3))
    scores, ids = index.search(queries=vectors, k=3)
    assert np.isfinite(scores).all()
