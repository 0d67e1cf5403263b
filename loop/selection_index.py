"""The round's FAISS index over the pretrained embeddings, persisted per embedding model and grown incrementally.

Selection addresses images by position in the round's arrays (ok images ordered by id). New images get higher ids,
so they append; the saved index is reused as long as the images it holds are still the first positions in the
same order, and only new images are added. Anything else (a file quarantined, say) rebuilds it once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modeling.embedding_index import EmbeddingIndex


def load_or_update_index(*, directory: Path, image_ids: list[int], embeddings: np.ndarray) -> tuple[EmbeddingIndex, dict]:
    index_dir, ids_path = directory / "index", directory / "image_ids.json"
    index, indexed_ids = None, []
    if ids_path.exists() and index_dir.exists():
        indexed_ids = json.loads(ids_path.read_text())
        if indexed_ids == image_ids[: len(indexed_ids)]:
            index = EmbeddingIndex.load(index_dir)
    if index is None:
        index = EmbeddingIndex().build(embeddings=embeddings, ids=np.arange(len(image_ids)))
        status = {"index": "built", "added": len(image_ids)}
    else:
        new_positions = np.arange(len(indexed_ids), len(image_ids))
        added = index.add(embeddings=embeddings[new_positions], ids=new_positions) if len(new_positions) else 0
        status = {"index": "reused", "added": int(added)}
    if status["index"] == "built" or status["added"]:
        directory.mkdir(parents=True, exist_ok=True)
        index.save(index_dir)
        ids_path.write_text(json.dumps(image_ids))
    status["size"] = len(index)
    return index, status
