"""Fine-detail thumbnails and their best-aligned correlation: do two photos show the same piece of surface?

Backbone embeddings say "looks alike", not "is the same": on MVTec bottle every photo's nearest other photo has
cosine >= 0.966 (a registered product in a jig), on NEU the median is 0.961 while a quarter of its images are
shifted, overlapping crops of another one. The pixels decide: a greyscale, equalised, 128 px thumbnail minus its
blur (sigma 2 px) keeps surface detail and drops shape and lighting, and phase correlation finds the shift that
best aligns two thumbnails; the Pearson correlation of the overlap at that shift is ~0.5-1 for the same surface
and ~0 for different surfaces of a texture (NEU), while two different bottles of one registered product still
reach 0.8-0.9 (which is why `find_near_duplicates` compares against random pairs of the same collection).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

DETAIL_SIZE = 128  # px, square
DETAIL_BLUR_SIGMA = 2.0  # px at DETAIL_SIZE: what is subtracted (shape, lighting) vs kept (surface detail)
MIN_OVERLAP = 0.5  # an alignment must overlap at least this share of the thumbnail
N_PEAKS = 3  # distinct phase-correlation peaks tried per pair: a periodic texture can put the true shift second
PEAK_EXCLUSION = 2  # px around a peak that belong to it (a sub-pixel shift spreads one peak over neighbours)


def detail_thumbnail(path: str | Path, *, bit_depth: int | None = None) -> np.ndarray:
    """(DETAIL_SIZE, DETAIL_SIZE) float32: equalised greyscale minus its Gaussian blur."""
    from PIL import Image, ImageOps
    from scipy.ndimage import gaussian_filter

    from modeling.preprocessing import to_rgb

    with Image.open(path) as image:
        pixels = np.asarray(ImageOps.equalize(to_rgb(image, bit_depth=bit_depth).convert("L")).resize((DETAIL_SIZE, DETAIL_SIZE), Image.BILINEAR), dtype=np.float32)
    return pixels - gaussian_filter(pixels, DETAIL_BLUR_SIGMA)


def detail_thumbnails(paths: Sequence[str | Path], *, advance: Callable[[int], None] | None = None, dtype: type = np.float32,
                      bit_depth: int | None = None) -> np.ndarray:
    """(n, DETAIL_SIZE * DETAIL_SIZE) rows, one per path (flattened so an embedding cache can hold them)."""
    rows = np.empty((len(paths), DETAIL_SIZE * DETAIL_SIZE), dtype=dtype)
    for row, path in enumerate(paths):
        rows[row] = detail_thumbnail(path, bit_depth=bit_depth).ravel()
        if advance is not None:
            advance(1)
    return rows


def _distinct_peaks(surface: np.ndarray) -> list[tuple[int, int]]:
    """The N_PEAKS highest points of a (circular) correlation surface, each at least PEAK_EXCLUSION + 1 px from the others."""
    surface = surface.copy()
    peaks = []
    for _ in range(N_PEAKS):
        dy, dx = (int(v) for v in np.unravel_index(int(np.argmax(surface)), surface.shape))
        peaks.append((dy, dx))
        rows = np.arange(dy - PEAK_EXCLUSION, dy + PEAK_EXCLUSION + 1) % surface.shape[0]
        cols = np.arange(dx - PEAK_EXCLUSION, dx + PEAK_EXCLUSION + 1) % surface.shape[1]
        surface[np.ix_(rows, cols)] = -np.inf
    return peaks


class AlignedCorrelation:
    """Best-aligned correlation between rows of a set of detail thumbnails. Rows are read as needed (float16 rows of a
    100k-image project are 3.2 GB; all their spectra at once would be 6.6 GB more), and the spectra of the most recently
    used SPECTRUM_CACHE rows are kept: pairs come grouped by their first image."""

    SPECTRUM_CACHE = 4096

    def __init__(self, thumbnails: np.ndarray):
        self.thumbnails = thumbnails
        self._spectra: OrderedDict[int, np.ndarray] = OrderedDict()

    def _image(self, index: int) -> np.ndarray:
        image = np.asarray(self.thumbnails[index], dtype=np.float32).reshape(DETAIL_SIZE, DETAIL_SIZE)
        return image - image.mean()

    def _spectrum(self, index: int) -> np.ndarray:
        spectrum = self._spectra.get(index)
        if spectrum is None:
            spectrum = self._spectra[index] = np.fft.rfft2(self._image(index))
            if len(self._spectra) > self.SPECTRUM_CACHE:
                self._spectra.popitem(last=False)
        else:
            self._spectra.move_to_end(index)
        return spectrum

    def __call__(self, a: int, b: int) -> float:
        """Pearson correlation of the overlap of thumbnails a and b at the best of N_PEAKS phase-correlation shifts
        (overlap >= MIN_OVERLAP); -1 when no shift qualifies."""
        cross = self._spectrum(a) * np.conj(self._spectrum(b))
        image_a, image_b = self._image(a), self._image(b)
        surface = np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-9), s=(DETAIL_SIZE, DETAIL_SIZE))
        best = -1.0
        for dy, dx in _distinct_peaks(surface):
            dy, dx = (dy - DETAIL_SIZE if dy > DETAIL_SIZE // 2 else dy), (dx - DETAIL_SIZE if dx > DETAIL_SIZE // 2 else dx)
            if (DETAIL_SIZE - abs(dy)) * (DETAIL_SIZE - abs(dx)) < MIN_OVERLAP * DETAIL_SIZE * DETAIL_SIZE:
                continue
            patch_a = image_a[max(dy, 0): DETAIL_SIZE + min(dy, 0), max(dx, 0): DETAIL_SIZE + min(dx, 0)].ravel()
            patch_b = image_b[max(-dy, 0): DETAIL_SIZE + min(-dy, 0), max(-dx, 0): DETAIL_SIZE + min(-dx, 0)].ravel()
            patch_a, patch_b = patch_a - patch_a.mean(), patch_b - patch_b.mean()
            denominator = float(np.linalg.norm(patch_a) * np.linalg.norm(patch_b))
            if denominator > 0:
                best = max(best, float(patch_a @ patch_b) / denominator)
        return best


CORRELATION_CODE_VERSION = 2  # 2: images decoded by modeling.preprocessing.to_rgb; bump when detail_thumbnail or AlignedCorrelation change in a way the constants don't show


def correlation_version(*, bit_depth: int | None = None) -> str:
    """What an aligned correlation depends on besides the two images: a cache key part (with the camera's bits when a
    project fixed them: the thumbnails are decoded by them)."""
    return (f"v{CORRELATION_CODE_VERSION}-detail-{DETAIL_SIZE}px-sigma{DETAIL_BLUR_SIGMA:g}-overlap{MIN_OVERLAP:g}"
            f"-peaks{N_PEAKS}-exclusion{PEAK_EXCLUSION}" + ("" if bit_depth is None else f"-b{bit_depth}"))


class PairCorrelationCache:
    """Aligned correlations of image pairs by the images' content keys (sha256), kept in one .npz between rounds, so a
    round correlates only pairs it has not seen: those with a new image, a changed neighbour, or a random null pair.
    Without it a 100k-image project correlates ~250k candidate pairs every round (~1 ms each on 2 cores: ~4 min).

    On disk: the distinct keys, two int32 columns of key rows and a float32 column of correlations (a 100k-image
    project: ~10 MB). `save` keeps the pairs this round asked for, so pairs of removed images and old random null pairs
    do not pile up, and removes the files of earlier correlation versions beside it. A file that cannot be read is started over (it is a cache), never half used."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self._values: dict[tuple[str, str], float] = {}
        self._asked: set[tuple[str, str]] = set()
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as stored:
                    keys, first, second, values = (stored[name] for name in ("keys", "first", "second", "correlation"))
                keys = keys.astype(str).tolist()
                if len(first) == len(second) == len(values):
                    self._values = {(keys[a], keys[b]): float(v) for a, b, v in zip(first.tolist(), second.tolist(), values.tolist())}
            except Exception:  # noqa: BLE001 - empty, truncated, bad CRC, not an npz: all mean "start over"
                self._values = {}

    def __len__(self) -> int:
        return len(self._values)

    def wrap(self, correlate: Callable[[int, int], float], keys: Sequence[str]) -> Callable[[int, int], float]:
        """correlate(a, b) on positions, answered from the cache where the pair of keys is known. A miss is computed
        in key order, so a pair's value does not depend on which positions its images hold this round."""

        def cached(a: int, b: int) -> float:
            if keys[a] > keys[b]:
                a, b = b, a
            pair = (keys[a], keys[b])
            value = self._values.get(pair)
            if value is None:
                value = self._values[pair] = float(np.float32(correlate(a, b)))  # as stored: the same value next round
                self.misses += 1
            else:
                self.hits += 1
            self._asked.add(pair)
            return value

        return cached

    def save(self) -> bool:
        """Write the pairs asked for since loading, when that changes the file (atomically: a torn write never
        replaces a good file). Nothing asked (a round with under two images) leaves the file alone. False when the
        file could not be written (full disk, read-only cache): the round's results stand, the next one recomputes."""
        if not self._asked or (not self.misses and len(self._asked) == len(self._values)):
            return True
        pairs = [(pair, self._values[pair]) for pair in self._asked]
        keys = sorted({key for pair, _ in pairs for key in pair})
        row = {key: i for i, key in enumerate(keys)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.stem}.{os.getpid()}.tmp.npz")  # two rounds sharing a cache dir: no clash
        try:
            np.savez(partial, keys=np.asarray(keys, dtype="S"),
                     first=np.fromiter((row[a] for (a, _), _v in pairs), dtype=np.int32, count=len(pairs)),
                     second=np.fromiter((row[b] for (_, b), _v in pairs), dtype=np.int32, count=len(pairs)),
                     correlation=np.fromiter((v for _, v in pairs), dtype=np.float32, count=len(pairs)))
            partial.replace(self.path)
        except OSError:
            partial.unlink(missing_ok=True)
            return False
        for other in self.path.parent.glob("*.npz"):  # earlier correlation versions' files, and a killed round's temp file
            try:
                if other != self.path and (".tmp." not in other.name or time.time() - other.stat().st_mtime > 3600):
                    other.unlink(missing_ok=True)
            except OSError:  # not ours to delete: the cache is saved, the round goes on
                continue
        return True
