"""The round's FAISS index over the pretrained embeddings, persisted per embedding model and grown incrementally.

Selection addresses images by position in the round's arrays (ok images ordered by id). New images get higher ids,
so they append; the saved index is reused as long as the images it holds (by content hash: the directory is per
embedding model, so a hash fixes the vector) are still the first positions in the same order, and only new images
are added. Anything else (a file quarantined, another image set under the same project name in a shared cache, an
unreadable index) rebuilds it once. Image ids alone would not do: a re-created project or another `loop simulate`
source numbers its images 1, 2, ... again, and the old index would answer with other images' vectors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from modeling.embedding_index import EmbeddingIndex

INDEXED_KEYS = "image_sha256.json"


def load_or_update_index(*, directory: Path, image_keys: list[str], embeddings: np.ndarray) -> tuple[EmbeddingIndex, dict]:
    index_dir, keys_path = directory / "index", directory / INDEXED_KEYS
    index, indexed_keys, reason = None, [], "no saved index"
    if keys_path.exists() and index_dir.exists():
        try:
            indexed_keys = json.loads(keys_path.read_text())
            if indexed_keys != image_keys[: len(indexed_keys)]:
                reason = "the saved index holds other images, or in another order"
            else:
                index = EmbeddingIndex.load(index_dir)
                if len(index) != len(indexed_keys) or index.dim != embeddings.shape[1]:
                    index, reason = None, "the saved index does not match its image list"
        except Exception as error:  # noqa: BLE001 - a cache: whatever the damage (torn write, foreign file), rebuild
            index, reason = None, f"the saved index could not be read ({type(error).__name__})"
    if index is None:
        index = EmbeddingIndex().build(embeddings=embeddings, ids=np.arange(len(image_keys)))
        status = {"index": "built", "added": len(image_keys), "reason": reason}
    else:
        new_positions = np.arange(len(indexed_keys), len(image_keys))
        added = index.add(embeddings=embeddings[new_positions], ids=new_positions) if len(new_positions) else 0
        status = {"index": "reused", "added": int(added)}
    if status["index"] == "built" or status["added"]:
        directory.mkdir(parents=True, exist_ok=True)
        keys_path.unlink(missing_ok=True)  # never a key list beside an index it does not describe, even after a crash
        index.save(index_dir)
        partial = directory / f"{INDEXED_KEYS}.{os.getpid()}.partial"
        partial.write_text(json.dumps(list(image_keys)))
        partial.replace(keys_path)
        (directory / "image_ids.json").unlink(missing_ok=True)  # the earlier, id-keyed list: never read again
    status["size"] = len(index)
    return index, status
