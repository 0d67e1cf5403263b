"""Procedural inspection images for the embedded demo and the tests: textured metal-like surfaces, a "good"
majority and several defect types (scratch, spot, crack, and a rare patch), written in the real on-disk layout."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from loop.config import path_beside

DEFAULT_CLASS_SHARES = {"good": 0.60, "scratch": 0.13, "spot": 0.12, "crack": 0.10, "patch": 0.05}


def surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed-metal texture: fine noise smeared along one direction, uneven lighting, a grey level per part."""
    noise = rng.normal(0, 1, (size, size + 16))
    kernel = np.ones(16) / 16
    brushed = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid")[:size], 1, noise)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    lighting = 0.12 * np.cos(angle) * xx + 0.12 * np.sin(angle) * yy
    base = rng.uniform(0.45, 0.6)
    image = base + lighting + 0.06 * brushed + rng.normal(0, 0.015, (size, size))
    return np.clip(image, 0, 1)


def _draw(image: np.ndarray, draw_fn, *, blur: float = 0.8) -> np.ndarray:  # noqa: ANN001
    mask = Image.new("L", image.shape[::-1], 0)
    draw_fn(ImageDraw.Draw(mask))
    mask_array = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255.0
    return mask_array


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    if kind == "scratch":  # a long thin bright straight line
        x0, y0 = rng.uniform(0.05, 0.4, 2) * size
        x1, y1 = rng.uniform(0.6, 0.95, 2) * size
        mask = _draw(image, lambda d: d.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(1, 3))), blur=0.6)
        return np.clip(image + 0.35 * mask, 0, 1)
    if kind == "spot":  # a round dark blob
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.05, 0.11) * size
        mask = _draw(image, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255), blur=r / 3)
        return np.clip(image - 0.35 * mask, 0, 1)
    if kind == "crack":  # a jagged dark polyline
        points = [tuple(rng.uniform(0.1, 0.3, 2) * size)]
        direction = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 10))):
            direction += rng.normal(0, 0.7)
            step = rng.uniform(0.06, 0.12) * size
            x, y = points[-1]
            points.append((float(np.clip(x + step * np.cos(direction), 0, size)), float(np.clip(y + step * np.sin(direction), 0, size))))
        mask = _draw(image, lambda d: d.line(points, fill=255, width=2), blur=0.5)
        return np.clip(image - 0.4 * mask, 0, 1)
    if kind == "patch":  # a rectangle of different, rougher texture (the rare class)
        w, h = rng.uniform(0.25, 0.4, 2) * size
        x0, y0 = rng.uniform(0.1, 0.5, 2) * size
        mask = _draw(image, lambda d: d.rectangle([x0, y0, x0 + w, y0 + h], fill=255), blur=1.5)
        rough = rng.normal(0, 0.12, image.shape)
        return np.clip(image * (1 - mask) + (image + 0.12 + rough) * mask, 0, 1)
    if kind == "good":
        return image
    raise ValueError(f"unknown synthetic defect kind {kind!r}")


def synthetic_image(kind: str, *, rng: np.random.Generator, size: int = 128) -> Image.Image:
    return Image.fromarray((add_defect(surface(rng, size), kind, rng) * 255).astype(np.uint8), mode="L")


@dataclass
class SyntheticDataset:
    root: Path
    image_paths: list[Path]
    true_labels: list[str]
    ground_truth_csv: Path  # every image's true class: what the oracle answers from
    corrupt_paths: list[Path]

    @property
    def classes(self) -> list[str]:
        return list(DEFAULT_CLASS_SHARES)


def write_class_folders(root: Path, *, per_class: dict[str, int], size: int = 96, seed: int = 0) -> dict[str, list[Path]]:
    """<root>/<class>/<n>.png: the folders-as-classes layout, for tests."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for kind, count in per_class.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        written[kind] = []
        for index in range(count):
            path = root / kind / f"{kind}_{index:04d}.png"
            synthetic_image(kind, rng=rng, size=size).save(path)
            written[kind].append(path)
    return written


def write_synthetic_dataset(root: Path, *, n_images: int = 480, size: int = 128, seed: int = 0, n_corrupt: int = 3) -> SyntheticDataset:
    """Flat folder of images + ground_truth.csv, plus a few corrupt files (truncated PNG, not-an-image)."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    kinds = list(DEFAULT_CLASS_SHARES)
    counts = {k: max(3, int(round(share * n_images))) for k, share in DEFAULT_CLASS_SHARES.items()}
    labels = [k for k in kinds for _ in range(counts[k])]
    rng.shuffle(labels)
    paths = []
    for index, kind in enumerate(labels):
        path = images_dir / f"part_{index:05d}.png"
        synthetic_image(kind, rng=rng, size=size).save(path)
        paths.append(path)
    corrupt = []
    for index in range(n_corrupt):
        path = images_dir / f"corrupt_{index}.png"
        if index % 2 == 0:
            data = paths[index].read_bytes()
            path.write_bytes(data[: len(data) // 3])  # truncated mid-stream
        else:
            path.write_bytes(b"this is not an image\n" * 10)
        corrupt.append(path)
    ground_truth = root / "ground_truth.csv"
    with open(ground_truth, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((str(p.relative_to(root)), label) for p, label in zip(paths, labels))
    return SyntheticDataset(root, paths, labels, ground_truth, corrupt)


def write_partial_manifest(dataset: SyntheticDataset, *, path: Path, labeled_fraction: float, label_noise: float, seed: int = 0) -> tuple[Path, list[int]]:
    """A manifest labeling a stratified share of the images, with a share of those labels wrong (returned), the
    rest left unlabeled for the loop to select from; corrupt files are listed too, as they would be."""
    rng = np.random.default_rng(seed + 1)
    classes = dataset.classes
    rows, wrong = [], []
    for index, (image_path, label) in enumerate(zip(dataset.image_paths, dataset.true_labels)):
        given: str = ""
        if rng.random() < labeled_fraction:
            given = label
            if rng.random() < label_noise:
                given = str(rng.choice([c for c in classes if c != label]))
                wrong.append(index)
        rows.append((path_beside(image_path, path.parent), given))
    rows += [(path_beside(p, path.parent), "good") for p in dataset.corrupt_paths]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path, wrong

