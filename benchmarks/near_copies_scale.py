"""The round's near-copy check at project scale: a first round, then the next round with 1% new images, with and
without the pair cache that carries correlations between rounds (`modeling.image_detail.PairCorrelationCache`).

    python benchmarks/near_copies_scale.py --out DIR [--n 8000] [--new-share 0.01] [--copy-share 0.02]

No images on disk: each synthetic image is a crop of a random texture, and its detail thumbnail is made as
`detail_thumbnail` makes it (minus the histogram equalisation, a no-op on this noise), straight from the array. A
share of the images is a shifted, overlapping crop of another image's texture (a planted near-copy), and its
embedding sits near the original's, as a backbone's would; every other embedding is random. The second round adds
`--new-share` new images, a fifth of them copies of old ones, and is run twice on the same inputs: with the cache
file the first round saved, and without any cache (the baseline). Both must find the same groups. Reports seconds,
pairs correlated and taken from the cache, and the planted copies found. Writes near_copies_scale.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.image_detail import DETAIL_BLUR_SIGMA, DETAIL_SIZE, PairCorrelationCache  # noqa: E402
from modeling.label_quality import find_near_duplicates  # noqa: E402
from modeling.latency import cpu_model_name  # noqa: E402

TEXTURE_SIZE = DETAIL_SIZE + 32  # room for a copy shifted by up to 32 px (overlap >= 0.56 of the thumbnail)
EMBEDDING_DIM = 64


class SyntheticCollection:
    """Images as (texture id, crop offset); a copy shares its original's texture at another offset."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.textures: list[int] = []  # texture seed per image
        self.offsets: list[tuple[int, int]] = []
        self.embeddings: list[np.ndarray] = []
        self.copy_of: list[int] = []  # -1, or the image this one is a planted copy of

    def add(self, n: int, copy_share: float) -> None:
        for _ in range(n):
            existing = len(self.textures)
            if existing and self.rng.random() < copy_share:
                original = int(self.rng.integers(existing))
                self.textures.append(self.textures[original])
                self.embeddings.append(_unit(self.embeddings[original] + 0.05 * self.rng.standard_normal(EMBEDDING_DIM)))
                self.copy_of.append(original)
            else:
                self.textures.append(int(self.rng.integers(2**31)))
                self.embeddings.append(_unit(self.rng.standard_normal(EMBEDDING_DIM)))
                self.copy_of.append(-1)
            self.offsets.append((int(self.rng.integers(0, 33)), int(self.rng.integers(0, 33))))

    def thumbnails(self) -> np.ndarray:
        rows = np.empty((len(self.textures), DETAIL_SIZE * DETAIL_SIZE), dtype=np.float16)  # as the round caches them
        for i, (texture, (dy, dx)) in enumerate(zip(self.textures, self.offsets)):
            surface = gaussian_filter(np.random.default_rng(texture).standard_normal((TEXTURE_SIZE, TEXTURE_SIZE)), 1.0)
            pixels = (surface[dy:dy + DETAIL_SIZE, dx:dx + DETAIL_SIZE] * 60 + 128).astype(np.float32)
            rows[i] = (pixels - gaussian_filter(pixels, DETAIL_BLUR_SIGMA)).ravel()
        return rows

    def keys(self) -> list[str]:
        return [f"image-{i}" for i in range(len(self.textures))]

    def planted_pairs(self) -> set[tuple[int, int]]:
        return {(original, i) for i, original in enumerate(self.copy_of) if original >= 0}


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def check(collection: SyntheticCollection, thumbnails: np.ndarray, pair_cache: PairCorrelationCache | None) -> dict:
    started = time.perf_counter()
    finding = find_near_duplicates(embeddings=np.stack(collection.embeddings), thumbnails=thumbnails, pair_cache=pair_cache,
                                   image_keys=collection.keys() if pair_cache is not None else None)
    seconds = time.perf_counter() - started
    found = {pair for pair, _ in finding.summary["pairs"]}
    planted = collection.planted_pairs()
    # a pair of two copies of one original is a true pair too: compare by texture
    same_texture = {pair for pair in found if collection.textures[pair[0]] == collection.textures[pair[1]]}
    return {
        "images": len(collection.textures),
        "seconds": round(seconds, 2),
        "pairs_correlated": None if pair_cache is None else pair_cache.misses,
        "pairs_from_cache": finding.summary.get("n_pairs_from_cache", 0),
        "candidate_pairs": finding.summary.get("n_candidate_pairs"),
        "threshold": finding.summary.get("threshold"),
        "planted_copies": len(planted),
        "planted_copies_found": len(planted & found),
        "pairs_flagged": len(found),
        "pairs_flagged_not_same_texture": len(found - same_texture),
        "groups": finding.summary["groups"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8000, help="images in the first round")
    parser.add_argument("--new-share", type=float, default=0.01, help="new images in the second round, as a share of --n")
    parser.add_argument("--copy-share", type=float, default=0.02, help="planted near-copies among the first round's images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.n < 10 or not 0 < args.new_share <= 1 or not 0 <= args.copy_share < 1:
        parser.error("--n >= 10, 0 < --new-share <= 1, 0 <= --copy-share < 1")

    collection = SyntheticCollection(args.seed)
    collection.add(args.n, args.copy_share)
    started = time.perf_counter()
    thumbnails = collection.thumbnails()
    thumbnail_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        cache_file = Path(tmp) / "pairs.npz"
        first_cache = PairCorrelationCache(cache_file)
        first = check(collection, thumbnails, first_cache)
        first_cache.save()
        cache_bytes = cache_file.stat().st_size

        collection.add(max(1, round(args.new_share * args.n)), 0.2)
        thumbnails = collection.thumbnails()
        warm = check(collection, thumbnails, PairCorrelationCache(cache_file))
    cold = check(collection, thumbnails, None)
    same_groups = warm.pop("groups") == cold.pop("groups")
    first.pop("groups")

    report = {
        "n_first_round": args.n, "n_second_round": warm["images"], "copy_share": args.copy_share, "seed": args.seed,
        "thumbnail_seconds": round(thumbnail_s, 1), "cache_file_bytes": cache_bytes,
        "first_round": first, "second_round_with_cache": warm, "second_round_without_cache": cold,
        "second_round_speedup": round(cold["seconds"] / max(warm["seconds"], 1e-9), 1),
        "same_groups_with_and_without_cache": same_groups,
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model_name(), "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "near_copies_scale.json").write_text(json.dumps(report, indent=2))
    rows = [("first round (cold)", first), ("second round, pair cache", warm), ("second round, no cache (baseline)", cold)]
    table = "\n".join(
        f"| {label} | {r['images']} | {r['seconds']} | {'-' if r['pairs_correlated'] is None else r['pairs_correlated']} | "
        f"{r['pairs_from_cache']} | {r['planted_copies_found']} of {r['planted_copies']} | {r['pairs_flagged_not_same_texture']} |"
        for label, r in rows
    )
    markdown = f"""# Near-copy check at scale

Command: `python benchmarks/near_copies_scale.py --out {args.out} --n {args.n} --new-share {args.new_share} --copy-share {args.copy_share} --seed {args.seed}`
({report['machine']['cpus']} CPUs, {report['machine']['processor']}). Synthetic thumbnails ({thumbnail_s:.0f} s to make), random embeddings with planted copies.

| run | images | seconds | pairs correlated | pairs from cache | planted copies found | flagged pairs of different textures |
|---|---|---|---|---|---|---|
{table}

Second round: {report['second_round_speedup']}x faster with the cache; same groups with and without it: {'yes' if same_groups else 'NO'}.
Cache file after the first round: {cache_bytes / 1e6:.1f} MB.
"""
    (args.out / "near_copies_scale.md").write_text(markdown)
    print(markdown)
    return 0 if same_groups else 1


if __name__ == "__main__":
    raise SystemExit(main())
