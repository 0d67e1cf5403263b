from pathlib import Path

import numpy as np

from loop.selection_index import INDEXED_KEYS, load_or_update_index


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def keys(numbers) -> list[str]:  # noqa: ANN001
    return [f"sha-{i}" for i in numbers]


def test_index_is_persisted_grown_with_new_images_only_and_rebuilt_when_order_breaks(tmp_path: Path) -> None:
    vectors = unit_rows(30, 0)
    index, status = load_or_update_index(directory=tmp_path, image_keys=keys(range(1, 21)), embeddings=vectors[:20])
    assert status == {"index": "built", "added": 20, "size": 20, "reason": "no saved index"}
    index, status = load_or_update_index(directory=tmp_path, image_keys=keys(range(1, 21)), embeddings=vectors[:20])
    assert status == {"index": "reused", "added": 0, "size": 20}
    index, status = load_or_update_index(directory=tmp_path, image_keys=keys(range(1, 31)), embeddings=vectors)
    assert status == {"index": "reused", "added": 10, "size": 30}
    scores, ids = index.search(queries=vectors[25:26], k=1)
    assert ids[0, 0] == 25  # positions are the ids selection expects
    # Image 3 quarantined: positions shift, so the index is rebuilt rather than silently misaligned.
    kept = [i for i in range(1, 31) if i != 3]
    index, status = load_or_update_index(directory=tmp_path, image_keys=keys(kept), embeddings=np.delete(vectors, 2, axis=0))
    assert status["index"] == "built" and len(index) == 29
    _, ids = index.search(queries=vectors[25:26], k=1)
    assert ids[0, 0] == 24


def test_another_image_set_under_the_same_name_never_reuses_the_index(tmp_path: Path) -> None:
    """A re-created project, or `loop simulate` on another source into the same --out, numbers its images 1, 2, ...
    again: an index matched by image id would answer with the old images' vectors."""
    old, new = unit_rows(10, 0), unit_rows(12, 1)
    load_or_update_index(directory=tmp_path, image_keys=keys(range(10)), embeddings=old)
    index, status = load_or_update_index(directory=tmp_path, image_keys=[f"other-{i}" for i in range(12)], embeddings=new)
    assert status["index"] == "built" and "other images" in status["reason"]
    _, ids = index.search(queries=new, k=1)
    assert ids[:, 0].tolist() == list(range(12))  # every image is its own nearest neighbour


def test_a_damaged_saved_index_is_rebuilt_not_a_failed_round(tmp_path: Path) -> None:
    vectors = unit_rows(10, 0)
    load_or_update_index(directory=tmp_path, image_keys=keys(range(10)), embeddings=vectors)
    saved = sorted(path for path in (tmp_path / "index").iterdir() if path.is_file())
    for path in saved:
        path.write_bytes(b"")
    index, status = load_or_update_index(directory=tmp_path, image_keys=keys(range(10)), embeddings=vectors)
    assert status["index"] == "built" and "could not be read" in status["reason"] and len(index) == 10
    # a key list longer than the index beside it (a crash between the two writes): rebuilt, not misread
    (tmp_path / INDEXED_KEYS).write_text('["sha-0", "sha-1", "sha-2", "sha-3", "sha-4", "sha-5", "sha-6", "sha-7", "sha-8", "sha-9", "sha-10"]')
    index, status = load_or_update_index(directory=tmp_path, image_keys=keys(range(12)), embeddings=unit_rows(12, 0))
    assert status["index"] == "built" and "does not match" in status["reason"] and len(index) == 12
