"""The per-hash row cache (embeddings, patch features, detail thumbnails): append-only shards, memory-mapped reads,
merged past MAX_SHARDS, the earlier one-file layout still read, and a torn shard dropped rather than mixed up."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modeling.embeddings import EmbeddingCache


def rows_for(hashes: list[str], dim: int = 6) -> np.ndarray:
    """Rows that say which hash they belong to: a mix-up shows."""
    return np.array([[int(sha[1:])] * dim for sha in hashes], dtype=np.float16)


def test_put_appends_a_shard_and_get_reads_rows_in_any_order(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "key")
    first, second = [f"h{i}" for i in range(5)], [f"h{i}" for i in range(5, 9)]
    cache.put(first, rows_for(first))
    shard_files = sorted(cache.directory.glob("rows-*.npy"))
    before = shard_files[0].read_bytes()
    cache.put(second, rows_for(second))
    assert len(list(cache.directory.glob("rows-*.npy"))) == 2 and shard_files[0].read_bytes() == before  # never rewritten
    assert cache.missing(["h1", "h7", "h42"]) == ["h42"]
    asked = ["h7", "h0", "h8", "h3", "h3"]
    reopened = EmbeddingCache(tmp_path, "key")
    for source in (cache, reopened):
        got = source.get(asked)
        assert got.dtype == np.float16 and got.shape == (5, 6)
        assert got[:, 0].tolist() == [7, 0, 8, 3, 3]
        lazy = source.rows(asked)
        assert len(lazy) == 5 and [float(lazy[i][0]) for i in range(5)] == [7, 0, 8, 3, 3]
    with pytest.raises(KeyError):
        reopened.get(["h42"])
    with pytest.raises(ValueError, match="rows of shape"):
        reopened.put(["h50"], np.zeros((1, 7), dtype=np.float16))


def test_shards_are_merged_past_the_limit_and_the_old_layout_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "key"
    directory.mkdir()
    legacy = [f"h{i}" for i in range(3)]
    np.save(directory / "vectors.npy", rows_for(legacy))
    (directory / "sha256.json").write_text(json.dumps(legacy))
    monkeypatch.setattr(EmbeddingCache, "MAX_SHARDS", 3)
    cache = EmbeddingCache(tmp_path, "key")
    assert cache.get(["h2", "h0"])[:, 0].tolist() == [2, 0]
    for batch in range(3, 6):  # legacy + 3 new shards = 4 > 3: merged into one
        cache.put([f"h{batch}"], rows_for([f"h{batch}"]))
    assert len(list(directory.glob("rows-*.npy"))) == 1
    assert not (directory / "vectors.npy").exists() and not (directory / "sha256.json").exists()
    cache.put(["h6"], rows_for(["h6"]))
    every = [f"h{i}" for i in range(7)]
    assert EmbeddingCache(tmp_path, "key").get(every)[:, 0].tolist() == list(range(7))


def test_a_torn_shard_or_index_costs_a_recompute_never_wrong_rows(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "key")
    cache.put(["h1", "h2"], rows_for(["h1", "h2"]))
    cache.put(["h3", "h4"], rows_for(["h3", "h4"]))
    index = json.loads((cache.directory / "index.json").read_text())
    torn = cache.directory / index["shards"][1]["file"]
    torn.write_bytes(torn.read_bytes()[:-8])  # a shard cut short
    reopened = EmbeddingCache(tmp_path, "key")
    assert reopened.missing(["h1", "h2", "h3", "h4"]) == ["h3", "h4"]
    assert reopened.get(["h2", "h1"])[:, 0].tolist() == [2, 1]
    for damaged in (b"", b"\x93NUMPY"):  # an empty shard, a shard cut after its magic bytes
        torn.write_bytes(damaged)
        assert EmbeddingCache(tmp_path, "key").missing(["h1", "h3"]) == ["h3"]
    for index_text in ("{not json", "", '{"shards": [{"file": 3}]}', "[]"):
        (cache.directory / "index.json").write_text(index_text)
        assert len(EmbeddingCache(tmp_path, "key")) == 0
