"""The per-hash row cache (embeddings, patch features, detail thumbnails): append-only shards, memory-mapped reads,
merged past MAX_SHARDS, the earlier one-file layout still read, and a torn shard dropped rather than mixed up."""
from __future__ import annotations

import json
import os
import time
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


def test_two_caches_on_one_directory_never_lose_each_others_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each object's view is stale once the other writes: a put must start from the index on disk, or it writes an
    index without the other's shards (or naming shards a merge deleted)."""
    monkeypatch.setattr(EmbeddingCache, "MAX_SHARDS", 3)
    first, second = EmbeddingCache(tmp_path, "key"), EmbeddingCache(tmp_path, "key")
    for i in range(0, 12, 2):  # interleaved; merges happen in both
        first.put([f"h{i}"], rows_for([f"h{i}"]))
        second.put([f"h{i + 1}"], rows_for([f"h{i + 1}"]))
    every = [f"h{i}" for i in range(12)]
    reopened = EmbeddingCache(tmp_path, "key")
    assert reopened.missing(every) == [] and reopened.get(every)[:, 0].tolist() == list(range(12))
    listed = {entry["file"] for entry in json.loads((reopened.directory / "index.json").read_text())["shards"]}
    assert {path.name for path in reopened.directory.glob("rows-*.npy")} == listed  # merged shards are deleted


def _put_many(directory: str, start: int) -> None:
    cache = EmbeddingCache(Path(directory), "key")
    for i in range(start, 30, 2):
        cache.put([f"h{i}"], rows_for([f"h{i}"]))


def test_two_processes_putting_at_once_keep_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    monkeypatch.setattr(EmbeddingCache, "MAX_SHARDS", 4)  # forked children inherit it: several merges each
    context = multiprocessing.get_context("fork")  # no torch work in the children: fork is safe and quick
    workers = [context.Process(target=_put_many, args=(str(tmp_path), start)) for start in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    every = [f"h{i}" for i in range(30)]
    assert EmbeddingCache(tmp_path, "key").get(every)[:, 0].tolist() == list(range(30))


def test_the_old_layout_gets_a_shard_name_on_the_first_put(tmp_path: Path) -> None:
    """An index naming vectors.npy would pair its hashes with whatever an older version writes there later."""
    directory = tmp_path / "key"
    directory.mkdir()
    legacy = ["h0", "h1", "h2"]
    np.save(directory / "vectors.npy", rows_for(legacy))
    (directory / "sha256.json").write_text(json.dumps(legacy))
    cache = EmbeddingCache(tmp_path, "key")
    cache.put(["h3"], rows_for(["h3"]))
    listed = [entry["file"] for entry in json.loads((directory / "index.json").read_text())["shards"]]
    assert all(name.startswith("rows-") for name in listed) and len(listed) == 2
    assert not (directory / "vectors.npy").exists() and not (directory / "sha256.json").exists()
    np.save(directory / "vectors.npy", rows_for(["h7", "h8", "h9"]))  # an old process writes its layout again
    (directory / "sha256.json").write_text(json.dumps(["h7", "h8", "h9"]))
    assert EmbeddingCache(tmp_path, "key").get(["h2", "h0", "h3"])[:, 0].tolist() == [2, 0, 3]
    # an index the previous version wrote, naming vectors.npy: renamed on the next put too
    (directory / "index.json").write_text(json.dumps({"shards": [{"file": "vectors.npy", "sha256": ["h7", "h8", "h9"]}]}))
    EmbeddingCache(tmp_path, "key").put(["h4"], rows_for(["h4"]))
    assert "vectors.npy" not in (directory / "index.json").read_text()
    assert EmbeddingCache(tmp_path, "key").get(["h9", "h4", "h7"])[:, 0].tolist() == [9, 4, 7]


def test_edge_cases_of_shards_and_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "key"
    directory.mkdir()
    np.save(directory / "vectors.npy", np.zeros((0, 0), dtype=np.float16))  # an empty legacy file: no row shape
    (directory / "sha256.json").write_text("[]")
    cache = EmbeddingCache(tmp_path, "key")
    cache.put(["h1", "h2"], rows_for(["h1", "h2"]))  # would raise "rows of shape" if the empty file set the shape
    assert cache.get([]).shape == (0, 6)
    lazy = cache.rows(["h2", "h1"])
    monkeypatch.setattr(EmbeddingCache, "MAX_SHARDS", 1)
    cache.put(["h3"], rows_for(["h3"]))  # merged: the shard under `lazy` is deleted, its memory map still reads
    assert len(list(directory.glob("rows-*.npy"))) == 1
    assert [float(lazy[i][0]) for i in range(2)] == [2, 1]
    # a valid shard whose row count disagrees with the index: dropped, not read with the wrong hashes
    (directory / "index.json").write_text(json.dumps({"shards": [
        {"file": next(directory.glob("rows-*.npy")).name, "sha256": ["h1", "h2"]}]}))
    assert len(EmbeddingCache(tmp_path, "key")) == 0
    # files a killed process left: a shard no index names, temporary files, the previous version's temp names; swept
    # once an hour old, while a young one may be another writer's (one that could not take the lock) and stays
    orphans = [directory / f"rows-{'a' * 32}.npy", directory / "tmp-1.npy", directory / "index.json.77.partial",
               directory / f"rows-{'b' * 32}.npy.partial.npy"]
    in_flight = [directory / f"rows-{'d' * 32}.npy", directory / "tmp-2.npy"]
    for stray in orphans + in_flight:
        stray.write_bytes(b"x")
    for orphan in orphans:
        os.utime(orphan, (time.time() - 2 * EmbeddingCache.STRAY_AGE_S,) * 2)
    EmbeddingCache(tmp_path, "key").put(["h5"], rows_for(["h5"]))
    assert not any(orphan.exists() for orphan in orphans) and all(young.exists() for young in in_flight)


def test_a_put_never_loses_rows_the_object_could_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The round's pattern is missing -> put -> get(all): a put that reloads from disk must keep every row it had."""
    directory = tmp_path / "key"
    directory.mkdir()
    np.save(directory / "vectors.npy", rows_for(["h0", "h1", "h2"]))
    (directory / "sha256.json").write_text(json.dumps(["h0", "h1", "h2"]))

    def no_hard_links(*_args: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("modeling.embeddings.os.link", no_hard_links)  # FAT, some network mounts: copied instead
    cache = EmbeddingCache(tmp_path, "key")
    cache.put(["h3"], rows_for(["h3"]))
    assert cache.get(["h0", "h1", "h2", "h3"])[:, 0].tolist() == [0, 1, 2, 3]
    assert EmbeddingCache(tmp_path, "key").get(["h2", "h3"])[:, 0].tolist() == [2, 3]
    # the index overwritten behind this object's back (another tool, a restore): the rows it had are written back
    (directory / "index.json").write_text(json.dumps({"shards": []}))
    cache.put(["h4"], rows_for(["h4"]))
    every = [f"h{i}" for i in range(5)]
    assert cache.get(every)[:, 0].tolist() == list(range(5))
    assert EmbeddingCache(tmp_path, "key").get(every)[:, 0].tolist() == list(range(5))


def test_rows_handed_out_stay_right_when_another_writer_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EmbeddingCache, "MAX_SHARDS", 2)
    reader, writer = EmbeddingCache(tmp_path, "key"), EmbeddingCache(tmp_path, "key")
    reader.put(["h0", "h1"], rows_for(["h0", "h1"]))
    reader.put(["h2"], rows_for(["h2"]))
    lazy = reader.rows(["h1", "h0", "h2"])
    writer.put(["h3"], rows_for(["h3"]))  # 3 shards > 2: merged in the other object, in a new row order
    writer.put(["h4"], rows_for(["h4"]))
    reader.put(["h5"], rows_for(["h5"]))  # the reader reloads the merged view
    assert [float(lazy[i][0]) for i in range(3)] == [1, 0, 2]
    assert reader.rows(["h4", "h1"])[0][0] == 4 and reader.get(["h5", "h3"])[:, 0].tolist() == [5, 3]


def test_without_flock_the_cache_still_reads_and_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount without flock (NFSv3 without a lock manager, some FUSE): no lock, so no file is deleted either."""
    import errno

    def no_flock(*_args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("modeling.embeddings.fcntl.flock", no_flock)
    monkeypatch.setattr(EmbeddingCache, "MAX_SHARDS", 2)
    cache = EmbeddingCache(tmp_path, "key")
    stray = cache.directory / f"rows-{'c' * 32}.npy"  # could be another writer's shard not yet in the index
    stray.write_bytes(b"x")
    os.utime(stray, (time.time() - 2 * EmbeddingCache.STRAY_AGE_S,) * 2)
    for i in range(1, 8):  # merges: the shards a merge replaced are deleted even without the lock
        cache.put([f"h{i}"], rows_for([f"h{i}"]))
    assert EmbeddingCache(tmp_path, "key").get(["h2", "h1", "h7"])[:, 0].tolist() == [2, 1, 7] and stray.exists()
    listed = {entry["file"] for entry in json.loads((cache.directory / "index.json").read_text())["shards"]}
    assert {path.name for path in cache.directory.glob("rows-*.npy")} - listed == {stray.name}


def test_a_cache_cleared_on_purpose_is_not_written_back(tmp_path: Path) -> None:
    """Emptying a cache directory (the network changed, not its key) while a round runs: the round's put must not
    restore the old rows from its memory maps, as it does when only the index was lost."""
    cache = EmbeddingCache(tmp_path, "key")
    cache.put(["h1", "h2"], rows_for(["h1", "h2"]))
    for path in cache.directory.iterdir():
        path.unlink()
    cache.put(["h3"], rows_for(["h3"]))
    reopened = EmbeddingCache(tmp_path, "key")
    assert reopened.missing(["h1", "h2", "h3"]) == ["h1", "h2"] and reopened.get(["h3"])[:, 0].tolist() == [3]
