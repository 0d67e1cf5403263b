"""The benchmarks' split helpers: a physical tile's exposures must be found as one group, or cross-validation
measures how well a model recognises a tile it has already seen under another light."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from transfer_common import _merge_groups, exposure_series  # noqa: E402


def write_exposures(folder: Path, *, tile_seed: int, counters: list[int], size: tuple[int, int]) -> list[str]:
    """One tile's texture under several exposures: brightness and contrast change, a crop shifts by a pixel or two."""
    rng = np.random.default_rng(tile_seed)
    texture = rng.normal(size=(size[1] + 4, size[0] + 4)).cumsum(axis=0)  # streaks, like a ground surface
    paths = []
    for exposure, counter in enumerate(counters, start=1):
        shift = exposure % 3
        crop = texture[shift : shift + size[1], shift : shift + size[0]]
        gain, offset = 0.5 + 0.15 * exposure, 10 * exposure
        pixels = np.clip(128 + gain * (crop - crop.mean()) * 40 / (crop.std() + 1e-9) + offset, 0, 255).astype(np.uint8)
        path = folder / f"exp{exposure}_num_{counter}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_exposure_series_separates_interleaved_tiles(tmp_path: Path) -> None:
    # Two tiles photographed in overlapping counter ranges (as magnetic tile's 797..972 and 855..1012), a third later.
    first = write_exposures(tmp_path, tile_seed=1, counters=[100, 130, 160, 190], size=(120, 90))
    second = write_exposures(tmp_path, tile_seed=2, counters=[110, 140, 170, 200], size=(118, 92))
    third = write_exposures(tmp_path, tile_seed=3, counters=[900, 920, 950], size=(80, 80))
    paths = first + second + third
    order = np.random.default_rng(0).permutation(len(paths))  # input order must not matter
    series = exposure_series([paths[i] for i in order])
    by_path = dict(zip([paths[i] for i in order], series.tolist()))
    assert len({by_path[p] for p in first}) == 1
    assert len({by_path[p] for p in second}) == 1
    assert len({by_path[p] for p in third}) == 1
    assert len(set(series.tolist())) == 3


def test_exposure_series_refuses_names_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "part_7.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    with pytest.raises(ValueError, match="exp<k>_num_<n>"):
        exposure_series([str(path)])


def test_merge_groups_joins_any_shared_value() -> None:
    by_hash = np.array(["a", "b", "c", "c", "d"])  # images 2 and 3 are byte-identical
    by_tile = np.array([0, 0, 1, 2, 2])  # 0-1 one tile, 3-4 another
    merged = _merge_groups(by_hash, by_tile)
    assert merged[0] == merged[1]
    assert merged[2] == merged[3] == merged[4]
    assert merged[0] != merged[2]
