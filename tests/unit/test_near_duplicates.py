"""Pixel-verified near-duplicates: shifted crops and re-exposed photos of one surface are found; look-alikes are not,
even when every image shares one registered shape (the MVTec case)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from modeling.image_detail import AlignedCorrelation, detail_thumbnails
from modeling.label_quality import find_near_duplicates, near_duplicate_work


def surface(rng: np.random.Generator, size: int = 260) -> np.ndarray:
    """A steel-like surface: fine grain over soft blotches, 0-255."""
    grain = gaussian_filter(rng.normal(size=(size, size)), 1.2)
    blotches = gaussian_filter(rng.normal(size=(size, size)), 12) * 6
    image = grain + blotches
    return 255 * (image - image.min()) / (image.max() - image.min())


def save(pixels: np.ndarray, path: Path) -> str:
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def neighbours_of(n: int, copies: dict[int, int], seed: int) -> np.ndarray:
    """Embeddings in which each copy sits next to its source among random others: candidates, not proof."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, 16))
    for copy, source in copies.items():
        embeddings[copy] = embeddings[source] + 0.05 * rng.normal(size=16)
    return embeddings.astype(np.float32)


def test_shifted_crops_and_reexposed_photos_are_found_and_nothing_else(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    surfaces = [surface(rng) for _ in range(30)]
    paths = [save(s[:200, :200], tmp_path / f"s{i}.png") for i, s in enumerate(surfaces)]
    # 30: an overlapping crop of surface 3 (shifted 30 px right, 20 down); 31: surface 7 under another exposure
    # (gamma and contrast); 32: surface 11 with sensor noise
    paths.append(save(surfaces[3][20:220, 30:230], tmp_path / "shifted.png"))
    paths.append(save(255 * (surfaces[7][:200, :200] / 255) ** 0.5 * 0.8 + 20, tmp_path / "exposure.png"))
    paths.append(save(surfaces[11][:200, :200] + rng.normal(scale=6, size=(200, 200)), tmp_path / "noisy.png"))
    copies = {30: 3, 31: 7, 32: 11}
    finding = find_near_duplicates(embeddings=neighbours_of(len(paths), copies, seed=1), thumbnails=detail_thumbnails(paths))
    assert np.flatnonzero(finding.is_issue).tolist() == [3, 7, 11, 30, 31, 32]
    assert [pair for pair, _ in finding.summary["pairs"]] == [(3, 30), (7, 31), (11, 32)]
    assert finding.summary["groups"] == [[3, 30], [7, 31], [11, 32]]
    assert finding.related[30] == 3 and finding.related[3] == 30
    assert finding.summary["method"] == "pixel_verified"
    assert finding.scores[[3, 7, 11]].max() < 0.5 < finding.scores[np.flatnonzero(~finding.is_issue)].min()


def test_a_registered_product_is_not_a_pile_of_duplicates_but_a_real_copy_still_is(tmp_path: Path) -> None:
    """Every photo shows the same fine rings (as every MVTec bottle does) with its own surface detail: the rings alone
    make any two photos correlate ~0.8 (MVTec bottle: 0.79 median), so a fixed correlation threshold would flag them
    all; only the photo of the same part taken again, shifted a few pixels, may be flagged."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:208, :208]
    radius = np.hypot(yy - 102, xx - 102)
    rings = 60 * np.sin(radius / 2.0) * (radius < 95)
    parts = [60 + rings + gaussian_filter(rng.normal(size=(208, 208)), 1.0) * 60 for _ in range(40)]
    paths = [save(part[:200, :200], tmp_path / f"p{i}.png") for i, part in enumerate(parts)]
    paths.append(save(parts[5][4:204, 3:203], tmp_path / "again.png"))  # part 5, photographed again
    embeddings = neighbours_of(len(paths), {40: 5}, seed=3)
    embeddings[:, :8] += 4.0  # all look alike to the backbone, too
    thumbnails = detail_thumbnails(paths)
    finding = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails)
    assert [pair for pair, _ in finding.summary["pairs"]] == [(5, 40)]
    assert AlignedCorrelation(thumbnails)(0, 1) > 0.7  # two different parts
    assert finding.summary["null_level"] > 0.7 and finding.summary["threshold"] > 0.75


def test_tiny_collections_and_mismatched_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    paths = [save(surface(rng)[:100, :100], tmp_path / f"t{i}.png") for i in range(3)]
    finding = find_near_duplicates(embeddings=neighbours_of(3, {}, seed=5), thumbnails=detail_thumbnails(paths))
    assert not finding.is_issue.any() and finding.summary["n_null_pairs"] == 0  # 3 images: every pair is a candidate
    assert near_duplicate_work(3) == 3 * 2 + 3
    try:
        find_near_duplicates(embeddings=neighbours_of(3, {}, seed=5), thumbnails=detail_thumbnails(paths[:2]))
    except ValueError as error:
        assert "2 thumbnails for 3 embeddings" in str(error)
    else:
        raise AssertionError("mismatched thumbnails must be refused")


def test_declared_parts_keep_shots_of_one_part_out_of_the_random_pairs(tmp_path: Path) -> None:
    """Ten shots of each of eight parts: most sibling pairs are not among an image's 5 nearest neighbours, so they land
    among the random pairs and lift the threshold onto the copies; declared parts keep them out."""
    rng = np.random.default_rng(6)
    paths, parts = [], []
    for part in range(8):
        whole = surface(rng, size=300)
        for shot in range(10):
            dy, dx = rng.integers(0, 60, size=2)
            paths.append(save(whole[dy:dy + 200, dx:dx + 200], tmp_path / f"part{part}-{shot}.png"))
            parts.append(f"part-{part}")
    embeddings = neighbours_of(len(paths), {}, seed=7)
    for index in range(len(paths)):
        embeddings[index] += 3.0 * np.eye(16)[int(parts[index].split("-")[1])]  # siblings look alike
    thumbnails = detail_thumbnails(paths)
    blind = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails)
    told = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails, known_groups=np.array(parts, dtype=object))
    assert blind.summary["n_null_pairs_above_threshold"] > 0 or blind.summary["threshold"] > told.summary["threshold"]
    assert told.summary["null_level"] < 0.3 < blind.summary["null_level"]
    assert told.is_issue.sum() > blind.is_issue.sum() and told.is_issue.mean() > 0.9


def test_pair_cache_answers_known_pairs_by_content_not_position(tmp_path: Path) -> None:
    """A round redoes only the pairs with new images: the cache is keyed by image hash, so an image that moves to
    another position (images added before it) is still known, and the groups are those of a run without the cache."""
    from modeling.image_detail import PairCorrelationCache

    rng = np.random.default_rng(0)
    surfaces = [surface(rng) for _ in range(30)]
    paths = [save(s[:200, :200], tmp_path / f"s{i}.png") for i, s in enumerate(surfaces)]
    paths.append(save(surfaces[3][20:220, 30:230], tmp_path / "shifted.png"))
    keys = [f"sha-{i}" for i in range(len(paths))]
    embeddings = neighbours_of(len(paths), {30: 3}, seed=1)
    thumbnails = detail_thumbnails(paths)
    cache_file = tmp_path / "cache" / "pairs.npz"
    cache = PairCorrelationCache(cache_file)
    first = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails, pair_cache=cache, image_keys=keys)
    plain = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails)
    assert first.summary["groups"] == plain.summary["groups"] == [[3, 30]]
    n_pairs = len(paths) * (len(paths) - 1) // 2  # few images: every pair is a candidate or a null pair
    assert cache.misses == n_pairs and first.summary["n_pairs_from_cache"] == 0
    cache_file.parent.mkdir()
    stale_version = cache_file.with_name("v0-detail-old.npz")  # the file of an earlier correlation version
    stale_version.write_bytes(b"x")
    killed_rounds_temp, running_rounds_temp = cache_file.with_name("pairs.77.tmp.npz"), cache_file.with_name("pairs.78.tmp.npz")
    for temp in (killed_rounds_temp, running_rounds_temp):
        temp.write_bytes(b"x")
    os.utime(killed_rounds_temp, (time.time() - 7200,) * 2)
    undeletable = cache_file.with_name("not-a-file.npz")
    undeletable.mkdir()  # unlink fails (as for another user's file): the save still succeeds
    assert cache.save() is True
    assert not stale_version.exists() and not killed_rounds_temp.exists() and running_rounds_temp.exists()
    undeletable.rmdir()
    running_rounds_temp.unlink()

    # next round: a new copy of surface 20, ingested first, so every known image moves one position on
    new_path = save(surfaces[20][10:210, 0:200], tmp_path / "new.png")
    reloaded = PairCorrelationCache(cache_file)
    assert len(reloaded) == n_pairs
    second = find_near_duplicates(embeddings=neighbours_of(len(paths) + 1, {21: 0, 31: 4}, seed=2), thumbnails=detail_thumbnails([new_path, *paths]),
                                  pair_cache=reloaded, image_keys=["sha-new", *keys])
    assert reloaded.misses == len(paths)  # the new image's pairs, nothing else
    assert second.summary["n_pairs_from_cache"] == n_pairs and second.summary["n_pairs_correlated"] == len(paths)
    assert second.summary["groups"] == [[0, 21], [4, 31]]  # new copy of surface 20; the old copy of surface 3

    # a cache file that cannot be read is started over, not half used: a torn write (power cut, no fsync), a flipped
    # byte, something else under its name
    good = cache_file.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for damaged in (b"", good[:10], good[: len(good) // 2], good[:-30], bytes(flipped), b"not an npz"):
        cache_file.write_bytes(damaged)
        assert len(PairCorrelationCache(cache_file)) == 0
    np.save(tmp_path / "plain.npy", np.zeros(3))
    cache_file.write_bytes((tmp_path / "plain.npy").read_bytes())
    assert len(PairCorrelationCache(cache_file)) == 0


def test_the_random_null_pairs_are_drawn_by_image_key_so_a_later_round_takes_them_from_the_cache(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # drawn by position, every null pair changed when one image was added before the others: NULL_PAIRS new
    # correlations each round (3000, ~3 s) however few images were new
    from modeling import label_quality
    from modeling.image_detail import DETAIL_SIZE, PairCorrelationCache

    monkeypatch.setattr(label_quality, "NULL_PAIRS", 300)  # 60 images: more pairs than the null needs, as in a real project
    rng = np.random.default_rng(0)
    thumbnails = rng.normal(size=(61, DETAIL_SIZE * DETAIL_SIZE)).astype(np.float32)
    embeddings = neighbours_of(61, {}, seed=1)
    keys = [f"sha-{i}" for i in range(61)]
    cache = PairCorrelationCache(tmp_path / "pairs.npz")
    first = find_near_duplicates(embeddings=embeddings[1:], thumbnails=thumbnails[1:], pair_cache=cache, image_keys=keys[1:])
    assert first.summary["n_null_pairs"] == 300
    misses = cache.misses
    second = find_near_duplicates(embeddings=embeddings, thumbnails=thumbnails, pair_cache=cache, image_keys=keys)  # one new, first
    assert second.summary["n_null_pairs"] == 300
    assert cache.misses - misses <= 40  # the new image's candidate pairs and the few null pairs that land next to it


def test_stable_random_pairs_draw_the_full_null_and_mostly_the_same_pairs_when_images_are_added() -> None:
    from modeling.label_quality import stable_random_pairs

    def by_key(keys, pairs):  # noqa: ANN001, ANN202
        return {tuple(sorted((keys[a], keys[b]))) for a, b in pairs}

    rng = np.random.default_rng(0)
    for n in (85, 5000):  # every pair ranked by its hash; the rank ring of large collections
        keys = [f"sha-{i}" for i in range(n)]
        keep = lambda a, b: (a + b) % 9 != 0  # noqa: E731  (candidates and shots of one part are left out)
        pairs = stable_random_pairs(keys, n_pairs=3000, seed=0, keep=keep)
        assert len(pairs) == 3000 and all(a < b and keep(a, b) for a, b in pairs)  # 85 images: 2407 before
        grown = keys + [f"new-{i}" for i in range(max(1, n // 100))]
        order = rng.permutation(len(grown))  # new images anywhere: positions mean nothing
        shuffled = [grown[i] for i in order]
        again = stable_random_pairs(shuffled, n_pairs=3000, seed=0, keep=lambda a, b: True)
        before = by_key(keys, stable_random_pairs(keys, n_pairs=3000, seed=0, keep=lambda a, b: True))
        assert len(before & by_key(shuffled, again)) >= 0.9 * 3000
