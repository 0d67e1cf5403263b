from pathlib import Path

import numpy as np

from loop.selection_index import load_or_update_index


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_index_is_persisted_grown_with_new_images_only_and_rebuilt_when_order_breaks(tmp_path: Path) -> None:
    vectors = unit_rows(30, 0)
    index, status = load_or_update_index(directory=tmp_path, image_ids=list(range(1, 21)), embeddings=vectors[:20])
    assert status == {"index": "built", "added": 20, "size": 20}
    index, status = load_or_update_index(directory=tmp_path, image_ids=list(range(1, 21)), embeddings=vectors[:20])
    assert status == {"index": "reused", "added": 0, "size": 20}
    index, status = load_or_update_index(directory=tmp_path, image_ids=list(range(1, 31)), embeddings=vectors)
    assert status == {"index": "reused", "added": 10, "size": 30}
    scores, ids = index.search(queries=vectors[25:26], k=1)
    assert ids[0, 0] == 25  # positions are the ids selection expects
    # Image 3 quarantined: positions shift, so the index is rebuilt rather than silently misaligned.
    kept = [i for i in range(1, 31) if i != 3]
    index, status = load_or_update_index(directory=tmp_path, image_ids=kept, embeddings=np.delete(vectors, 2, axis=0))
    assert status["index"] == "built" and len(index) == 29
    _, ids = index.search(queries=vectors[25:26], k=1)
    assert ids[0, 0] == 24
