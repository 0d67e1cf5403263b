"""Which frozen efficientnet_lite0 embedding separates magnetic tile defects best? Embed every image once per
forward configuration (input size x resize mode x flip view), pool every stage output several ways, cache it all as
.npy, then score each variant (a choice of size, stages, pooling and views) with the product's linear head
(modeling.training.fit_linear_head, class-weighted multinomial LR, default regularization).

    python benchmarks/feature_variants.py --out /tmp/fv [--variants base224,ml224_avgmax] [--cv-seeds 0,1,2]
        [--latency base224,ml384_avgmax] [--regularization 1.0] [--list]

Per variant:
1. 5-fold CV (StratifiedKFold, shuffle, seed 0), pooled out-of-fold:
   - the decision is the round's rule: P(defect) = 1 - P(free) >= threshold -> the most probable defect class, else
     free. The threshold is chosen INSIDE the training folds: out-of-fold scores of an inner 5-fold split of the
     training folds, read at <= 2% FPR on their free images. Scores are compared as logit(P(defect)) =
     logsumexp(defect logits) - free logit (the same order as P(defect), without float saturation near 1);
   - macro F1 over the 6 classes, defect recall, FPR (share of free images called a defect), ROC-AUC of P(defect);
   - diagnostic (not a deployable number): defect recall at <= 3% FPR with the threshold read off each held-out
     fold itself, averaged over folds: what the ranking allows if the threshold were perfect.
2. Label efficiency: a fixed 20% stratified test split (seed 0); from the other 80%, plain random labeled subsets
   of n = 60, 120, 240, 480 (seeds 0-4, no stratification; the same subsets for every variant) train the head;
   test ROC-AUC and diagnostic recall at <= 3% FPR (threshold read off the test split), plus macro F1 at that
   same threshold (diagnostic too).

Embeddings: each part (a stage output or conv_head, pooled avg / max / GeM p=3) is L2-normalised, views (flips)
are averaged per part and re-normalised, parts are concatenated and scaled to unit length overall.
Embed seconds are the measured torch-eager wall time (decode + resize + full forward, batch 32, 2 threads,
channels_last) of every forward pass a variant needs, taken when its cache was written; the machine load
(`uptime`) at that moment is stored with it.

Those embed seconds swing 3x with other jobs on the machine; --latency times the named (single-size, single-view)
variants as the product would run them: a module returning the embedding, torch eager and exported to ONNX Runtime
(modeling.onnx_export), best of 3 on a 32-image batch, its ONNX output checked against the cached embedding.
--cv-seeds 0,1,2 repeats the CV on other fold seeds (robustness table). Head fits run on 1 torch thread
(--eval-threads): a few-ms L-BFGS step on 2 threads of a busy 2-core machine spin-waited 10-40x longer.

Writes OUT/parts/*.npy (+ .json timings), OUT/variants/<name>.npy, OUT/onnx/*.onnx (with --latency),
OUT/feature_variants.json and OUT/feature_variants.md (feature_variants-C<c>.* with --regularization c != 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold, train_test_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modeling.backbones import create_backbone  # noqa: E402
from modeling.latency import cpu_model_name  # noqa: E402
from modeling.preprocessing import Preprocessing, image_to_array  # noqa: E402
from modeling.training import fit_linear_head  # noqa: E402

DATASET = (REPO / ".." / "shared" / "datasets" / "magnetic_tile").resolve()
NEGATIVE = "free"
STAGES = (2, 3, 4, 5, 6)  # timm efficientnet blocks[i]: 40, 80, 112, 192, 320 channels (strides 8, 16, 16, 32, 32)
PARTS = tuple(f"s{i}" for i in STAGES) + ("head",)  # head: conv_head + bn2 (+ReLU6), 1280 channels, what the product pools
POOLS = ("avg", "max", "gem")
VIEWS = ("id", "hflip", "vflip", "rot180")
TTA4 = VIEWS
INNER_MAX_FPR = 0.02
DIAGNOSTIC_FPR = 0.03
LABEL_SIZES = (60, 120, 240, 480)
LABEL_SEEDS = (0, 1, 2, 3, 4)


# ----------------------------------------------------------------------------------------------- data and images

def load_dataset(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    class_names = sorted(path.name for path in root.iterdir() if path.is_dir())
    paths, labels = [], []
    for index, name in enumerate(class_names):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"):
                paths.append(str(path))
                labels.append(index)
    return paths, np.array(labels), class_names


def _normalise(rgb: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_array(path: str, *, size: int, mode: str, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """mode "stretch": the product's preprocessing (whole image resized to size x size);
    "pad": aspect kept, longer side = size, centred on a size x size canvas of the image's mean grey;
    "aspect": aspect kept, about size*size pixels, each side a multiple of 32 (variable shape, no padding)."""
    with Image.open(path) as image:
        if mode == "stretch":
            return image_to_array(image, Preprocessing(size, tuple(mean), tuple(std)))  # type: ignore[arg-type]
        rgb = image.convert("RGB")
        width, height = rgb.size
        if mode == "pad":
            scale = size / max(width, height)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            fill = tuple(int(v) for v in np.asarray(rgb).reshape(-1, 3).mean(axis=0).round())
            canvas = Image.new("RGB", (size, size), fill)
            canvas.paste(rgb.resize((new_w, new_h), Image.BILINEAR), ((size - new_w) // 2, (size - new_h) // 2))
            return _normalise(canvas, mean, std)
        if mode == "aspect":
            ratio = height / width
            new_h = max(32, int(round(size * np.sqrt(ratio) / 32)) * 32)
            new_w = max(32, int(round(size / np.sqrt(ratio) / 32)) * 32)
            return _normalise(rgb.resize((new_w, new_h), Image.BILINEAR), mean, std)
        raise ValueError(f"unknown resize mode {mode!r}")


def apply_view(images: torch.Tensor, view: str) -> torch.Tensor:
    if view == "id":
        return images
    if view == "hflip":
        return torch.flip(images, dims=(3,))
    if view == "vflip":
        return torch.flip(images, dims=(2,))
    if view == "rot180":
        return torch.flip(images, dims=(2, 3))
    raise ValueError(f"unknown view {view!r}")


# ----------------------------------------------------------------------------------------------- forward + pooling

def part_layout(channels: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(part, pool) -> column slice in a config's parts matrix, as 'part/pool' keys."""
    layout, start = {}, 0
    for part in PARTS:
        for pool in POOLS:
            layout[f"{part}/{pool}"] = (start, start + channels[part])
            start += channels[part]
    return layout


def pool_all(feature: torch.Tensor) -> list[torch.Tensor]:
    flat = feature.flatten(2)
    gem = flat.clamp(min=1e-6).pow(3).mean(dim=2).pow(1.0 / 3.0)  # GeM p=3 (clamped: stage outputs are signed)
    return [flat.mean(dim=2), flat.amax(dim=2), gem]


def forward_parts(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled parts (B, total) in PARTS x POOLS order, head average pool) for a timm EfficientNet."""
    x = model.bn1(model.conv_stem(images))
    captured = {}
    for index, block in enumerate(model.blocks):
        x = block(x)
        if index in STAGES:
            captured[f"s{index}"] = x
    captured["head"] = model.bn2(model.conv_head(x))
    pooled = [tensor for part in PARTS for tensor in pool_all(captured[part])]
    return torch.cat(pooled, dim=1), captured["head"].mean(dim=(2, 3))


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:  # pragma: no cover
        return "?"


def embed_config(paths: list[str], *, backbone, size: int, mode: str, view: str, batch_size: int = 32) -> tuple[np.ndarray, float]:
    model = backbone.model
    mean, std = backbone.mean, backbone.std
    started = time.perf_counter()
    if mode == "aspect":  # variable shapes: batch images of one shape together
        arrays = [load_array(p, size=size, mode=mode, mean=mean, std=std) for p in paths]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault(array.shape, []).append(index)
        batches = [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]
        load = lambda batch: np.stack([arrays[i] for i in batch])  # noqa: E731
    else:
        indices = list(range(len(paths)))
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        load = lambda batch: np.stack([load_array(paths[i], size=size, mode=mode, mean=mean, std=std) for i in batch])  # noqa: E731
    rows: dict[int, np.ndarray] = {}
    checked = False
    with torch.inference_mode():
        for batch in batches:
            images = apply_view(torch.from_numpy(load(batch)), view).contiguous(memory_format=torch.channels_last)
            pooled, head_avg = forward_parts(model, images)
            if not checked:  # the manual forward is the model's own: its head average pool is the product embedding
                reference = model(images)
                if not torch.allclose(reference, head_avg, atol=1e-4, rtol=1e-4):
                    raise RuntimeError("manual stage forward does not reproduce the backbone's pooled output")
                checked = True
            for row, index in zip(pooled.numpy(), batch):
                rows[index] = row
    seconds = time.perf_counter() - started
    return np.stack([rows[i] for i in range(len(paths))]).astype(np.float32), seconds


# ----------------------------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Component:
    size: int
    parts: tuple[str, ...]
    pools: tuple[str, ...]
    mode: str = "stretch"
    views: tuple[str, ...] = ("id",)

    def config(self) -> str:
        return f"{self.mode}{self.size}"


@dataclass(frozen=True)
class Variant:
    name: str
    note: str
    components: tuple[Component, ...]
    default: bool = True  # in --variants all; the others (costly passes) only by name


ML = ("s3", "s4", "s5", "s6", "head")
AM = ("avg", "max")


def _v(name: str, note: str, *components: Component, default: bool = True) -> Variant:
    return Variant(name, note, tuple(components), default)


VARIANTS = [
    # (a) the product today
    _v("base224", "(a) product: conv_head avg, 224 stretch", Component(224, ("head",), ("avg",))),
    # (b) input size
    _v("base320", "(b) conv_head avg, 320", Component(320, ("head",), ("avg",))),
    _v("base384", "(b) conv_head avg, 384", Component(384, ("head",), ("avg",))),
    # (c) multi-layer pooling, each part L2-normalised
    _v("ml224_avg", "(c) s3-s6+head avg, 224", Component(224, ML, ("avg",))),
    _v("ml224_max", "(c) s3-s6+head max, 224", Component(224, ML, ("max",))),
    _v("ml224_gem", "(c) s3-s6+head GeM3, 224", Component(224, ML, ("gem",))),
    _v("ml224_avgmax", "(c) s3-s6+head avg+max, 224", Component(224, ML, AM)),
    _v("ml224_avgmax_s2", "(c) s2-s6+head avg+max, 224", Component(224, ("s2",) + ML, AM)),
    _v("head224_avgmax", "(c) head only avg+max, 224", Component(224, ("head",), AM)),
    _v("ml320_avgmax", "(b+c) s3-s6+head avg+max, 320", Component(320, ML, AM)),
    _v("ml384_avgmax", "(b+c) s3-s6+head avg+max, 384", Component(384, ML, AM)),
    _v("ml384_gem", "(b+c) s3-s6+head GeM3, 384", Component(384, ML, ("gem",))),
    _v("ml384_avg", "(b+c) s3-s6+head avg, 384", Component(384, ML, ("avg",))),
    _v("ml384_max", "(b+c) s3-s6+head max, 384", Component(384, ML, ("max",))),
    _v("base448", "(b) conv_head avg, 448", Component(448, ("head",), ("avg",))),
    _v("ml448_avgmax", "(b+c) s3-s6+head avg+max, 448", Component(448, ML, AM)),
    # (d) flip/rot test-time augmentation
    _v("base224_tta", "(d) product + TTA4", Component(224, ("head",), ("avg",), views=TTA4)),
    _v("ml224_avgmax_tta", "(c+d) s3-s6+head avg+max, 224, TTA4", Component(224, ML, AM, views=TTA4)),
    _v("ml320_avgmax_tta", "(b+c+d) s3-s6+head avg+max, 320, TTA4", Component(320, ML, AM, views=TTA4), default=False),
    # (e) aspect-preserving inputs; mid-level parts from a larger input only
    _v("pad224", "(e) head avg, 224 letterbox (aspect kept, mean-grey pad)", Component(224, ("head",), ("avg",), mode="pad")),
    _v("aspect224", "(e) head avg, ~224^2 px aspect kept (no pad)", Component(224, ("head",), ("avg",), mode="aspect")),
    _v("aspect224_ml_avgmax", "(c+e) s3-s6+head avg+max, ~224^2 aspect kept", Component(224, ML, AM, mode="aspect")),
    _v("aspect320_ml_avgmax", "(b+c+e) s3-s6+head avg+max, ~320^2 aspect kept", Component(320, ML, AM, mode="aspect"), default=False),
    _v("mix384mid_224head", "(e) s3-s4 avg+max from 384 + s5-s6+head avg+max from 224",
       Component(384, ("s3", "s4"), AM), Component(224, ("s5", "s6", "head"), AM)),
    _v("aspect384_ml_avgmax", "(b+c+e) s3-s6+head avg+max, ~384^2 aspect kept", Component(384, ML, AM, mode="aspect"), default=False),
    _v("ml384_avgmax_tta", "(b+c+d) s3-s6+head avg+max, 384, TTA4", Component(384, ML, AM, views=TTA4), default=False),
]
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


def _l2(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


class PartStore:
    """Pooled parts per (config, view), computed once and cached as .npy."""

    def __init__(self, out: Path, paths: list[str], backbone):
        self.directory = out / "parts"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths = paths
        self.backbone = backbone
        self._loaded: dict[tuple[str, str], np.ndarray] = {}
        self.timings: dict[str, dict] = {}
        channels = {"s2": 40, "s3": 80, "s4": 112, "s5": 192, "s6": 320, "head": backbone.num_features}
        self.layout = part_layout(channels)

    def get(self, mode: str, size: int, view: str) -> np.ndarray:
        key = (f"{mode}{size}", view)
        if key in self._loaded:
            return self._loaded[key]
        stem = self.directory / f"{mode}{size}-{view}"
        meta_path, array_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
        if array_path.exists() and meta_path.exists():
            array, meta = np.load(array_path), json.loads(meta_path.read_text())
            if len(array) != len(self.paths) or meta.get("paths_hash") != _paths_hash(self.paths):
                raise SystemExit(f"{array_path} was made for other images: remove {self.directory}")
        else:
            load_before = load_average()
            print(f"  embedding {mode}{size}/{view} ...", flush=True)
            array, seconds = embed_config(self.paths, backbone=self.backbone, size=size, mode=mode, view=view)
            meta = {"seconds": seconds, "ms_per_image": 1000 * seconds / len(self.paths), "n_images": len(self.paths),
                    "load_before": load_before, "load_after": load_average(), "torch_threads": torch.get_num_threads(),
                    "paths_hash": _paths_hash(self.paths)}
            np.save(stem.with_suffix(".tmp.npy"), array)
            stem.with_suffix(".tmp.npy").replace(array_path)
            meta_path.write_text(json.dumps(meta, indent=1))
            print(f"    {seconds:.1f} s ({meta['ms_per_image']:.1f} ms/image), load {meta['load_after']}", flush=True)
        self._loaded[key] = array
        self.timings[f"{mode}{size}-{view}"] = meta
        return array

    def embedding(self, variant: Variant) -> tuple[np.ndarray, float]:
        blocks, passes = [], {}
        for component in variant.components:
            views = [self.get(component.mode, component.size, view) for view in component.views]
            for view in component.views:
                passes[f"{component.config()}-{view}"] = self.timings[f"{component.config()}-{view}"]["seconds"]
            for part in component.parts:
                for pool in component.pools:
                    start, stop = self.layout[f"{part}/{pool}"]
                    blocks.append(_l2(np.mean([_l2(v[:, start:stop]) for v in views], axis=0)))
        embedding = np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))
        return embedding.astype(np.float32), float(sum(passes.values()))


def _paths_hash(paths: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- latency

class MultiLayerEmbedding(torch.nn.Module):
    """images -> one stretch-mode, single-view variant's embedding, as a module that exports to ONNX: what the
    product's EmbeddingNetwork would become (each part L2-normalised, concatenated, unit length overall)."""

    def __init__(self, model: torch.nn.Module, parts: tuple[str, ...], pools: tuple[str, ...]):
        super().__init__()
        self.model, self.parts, self.pools = model, parts, pools

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.bn1(self.model.conv_stem(images))
        captured = {}
        last = max(STAGES)
        for index, block in enumerate(self.model.blocks):
            x = block(x)
            captured[f"s{index}"] = x
            if index == last:
                break
        captured["head"] = self.model.bn2(self.model.conv_head(x))
        blocks = []
        for part in self.parts:
            pooled = dict(zip(POOLS, pool_all(captured[part])))
            blocks += [torch.nn.functional.normalize(pooled[pool], dim=1) for pool in self.pools]
        return torch.cat(blocks, dim=1) / float(np.sqrt(len(blocks)))


def measure_latency(paths: list[str], backbone, variants: list[Variant], out: Path, store: "PartStore", threads: int) -> list[dict]:
    """Per stretch-mode, single-view, single-component variant: best-of-3 ms/image of a 32-image batch forward,
    torch eager (channels_last) and ONNX Runtime (the product's embedding path), preprocessing excluded; the ONNX
    output is checked against the cached embedding."""
    from modeling.onnx_export import export_onnx, open_session

    rows = []
    sample = list(range(0, len(paths), len(paths) // 32))[:32]
    for variant in variants:
        if len(variant.components) != 1:
            continue
        component = variant.components[0]
        if component.mode != "stretch" or component.views != ("id",):
            continue
        size = component.size
        images = np.stack([load_array(paths[i], size=size, mode="stretch", mean=backbone.mean, std=backbone.std) for i in sample])
        module = MultiLayerEmbedding(backbone.model, component.parts, component.pools).eval()
        tensor = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            module(tensor)
            eager = []
            for _ in range(3):
                started = time.perf_counter()
                module(tensor)
                eager.append(time.perf_counter() - started)
        onnx_path = out / "onnx" / f"{variant.name}.onnx"
        export_onnx(module, onnx_path, image_size=size, output_name="embeddings")
        session = open_session(onnx_path, threads=threads)
        onnx_out = session.run(None, {"images": images})[0]
        timed = []
        for _ in range(3):
            started = time.perf_counter()
            session.run(None, {"images": images})
            timed.append(time.perf_counter() - started)
        cached, _seconds = store.embedding(variant)
        deviation = float(np.abs(onnx_out - cached[sample]).max())
        rows.append({"name": variant.name, "size": size, "dim": int(onnx_out.shape[1]),
                     "torch_ms_per_image": 1000 * min(eager) / len(sample), "onnx_ms_per_image": 1000 * min(timed) / len(sample),
                     "onnx_vs_cache_max_abs": deviation, "load": load_average()})
        print(f"  latency {variant.name}: torch {rows[-1]['torch_ms_per_image']:.1f} ms/img, onnx {rows[-1]['onnx_ms_per_image']:.1f} "
              f"ms/img (max |onnx - cache| {deviation:.1e}), load {rows[-1]['load']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- evaluation

def head_logits(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, regularization: float) -> np.ndarray:
    weight, bias = fit_linear_head(features=train_x, labels=train_y, n_classes=n_classes, seed=0, regularization=regularization)
    return test_x.astype(np.float64) @ weight.T.astype(np.float64) + bias.astype(np.float64)


def defect_score(logits: np.ndarray, negative: int) -> np.ndarray:
    """logit(P(defect)) with P(defect) = 1 - P(negative): same order as P(defect), no saturation."""
    others = np.delete(logits, negative, axis=1)
    top = others.max(axis=1, keepdims=True)
    return (top[:, 0] + np.log(np.exp(others - top).sum(axis=1))) - logits[:, negative]


def threshold_at_fpr(negative_scores: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold (score >= t is a defect) letting through at most floor(max_fpr * n) negatives."""
    ordered = np.sort(negative_scores)[::-1]
    allowed = int(np.floor(max_fpr * len(ordered)))
    if allowed == 0:
        return float(np.nextafter(ordered[0], np.inf))
    if allowed >= len(ordered):
        return -np.inf
    return float((ordered[allowed] + ordered[allowed - 1]) / 2)


def decide(logits: np.ndarray, scores: np.ndarray, threshold: float, negative: int) -> np.ndarray:
    defect_only = logits.copy()
    defect_only[:, negative] = -np.inf
    return np.where(scores >= threshold, defect_only.argmax(axis=1), negative)


def recall_at_fpr(scores: np.ndarray, is_defect: np.ndarray, max_fpr: float) -> tuple[float, float]:
    threshold = threshold_at_fpr(scores[~is_defect], max_fpr)
    return float((scores[is_defect] >= threshold).mean()), threshold


def cross_validate(x: np.ndarray, y: np.ndarray, negative: int, n_classes: int, regularization: float, seed: int = 0) -> dict:
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    predictions = np.full(len(y), -1)
    scores = np.zeros(len(y))
    fold_auc, fold_diag, thresholds = [], [], []
    for train, test in folds.split(x, y):
        inner_scores = np.zeros(len(train))
        for inner_train, inner_test in StratifiedKFold(n_splits=5, shuffle=True, random_state=seed).split(x[train], y[train]):
            logits = head_logits(x[train][inner_train], y[train][inner_train], x[train][inner_test], n_classes, regularization)
            inner_scores[inner_test] = defect_score(logits, negative)
        threshold = threshold_at_fpr(inner_scores[y[train] == negative], INNER_MAX_FPR)
        logits = head_logits(x[train], y[train], x[test], n_classes, regularization)
        scores[test] = defect_score(logits, negative)
        predictions[test] = decide(logits, scores[test], threshold, negative)
        is_defect = y[test] != negative
        fold_auc.append(roc_auc_score(is_defect, scores[test]))
        fold_diag.append(recall_at_fpr(scores[test], is_defect, DIAGNOSTIC_FPR)[0])
        thresholds.append(threshold)
    is_defect = y != negative
    called = predictions != negative
    per_class = f1_score(y, predictions, labels=list(range(n_classes)), average=None, zero_division=0)
    return {
        "macro_f1": float(per_class.mean()), "per_class_f1": per_class.tolist(),
        "defect_recall": float(called[is_defect].mean()), "fpr": float(called[~is_defect].mean()),
        "missed_defects": int((~called[is_defect]).sum()), "false_positives": int(called[~is_defect].sum()),
        "auc": float(roc_auc_score(is_defect, scores)), "fold_auc_mean": float(np.mean(fold_auc)),
        "diag_recall_at_3fpr": float(np.mean(fold_diag)), "diag_recall_at_3fpr_folds": [float(v) for v in fold_diag],
        "inner_thresholds_logit": thresholds, "errors": int((predictions != y).sum()),
    }


def label_splits(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], np.ndarray]]:
    indices = np.arange(len(y))
    pool, test = train_test_split(indices, test_size=0.2, stratify=y, random_state=0)
    subsets = {}
    for n in LABEL_SIZES:
        for seed in LABEL_SEEDS:
            subsets[(n, seed)] = np.random.default_rng(seed * 1000 + n).choice(pool, size=n, replace=False)
    return pool, test, subsets


def label_efficiency(x: np.ndarray, y: np.ndarray, negative: int, n_classes: int, regularization: float, splits) -> dict:
    _pool, test, subsets = splits
    is_defect = y[test] != negative
    result: dict[str, dict] = {}
    for n in LABEL_SIZES:
        aucs, recalls, f1s = [], [], []
        for seed in LABEL_SEEDS:
            labeled = subsets[(n, seed)]
            logits = head_logits(x[labeled], y[labeled], x[test], n_classes, regularization)
            scores = defect_score(logits, negative)
            aucs.append(roc_auc_score(is_defect, scores))
            recall, threshold = recall_at_fpr(scores, is_defect, DIAGNOSTIC_FPR)
            recalls.append(recall)
            f1s.append(f1_score(y[test], decide(logits, scores, threshold, negative), labels=list(range(n_classes)), average="macro", zero_division=0))
        result[str(n)] = {"auc_mean": float(np.mean(aucs)), "auc_min": float(np.min(aucs)),
                          "diag_recall_at_3fpr_mean": float(np.mean(recalls)), "diag_recall_at_3fpr_min": float(np.min(recalls)),
                          "diag_macro_f1_mean": float(np.mean(f1s)),
                          "auc": [float(v) for v in aucs], "diag_recall_at_3fpr": [float(v) for v in recalls]}
    return result


# ----------------------------------------------------------------------------------------------- report

def markdown(results: list[dict], header: str) -> str:
    columns = ["variant", "dim", "embed s", "ms/img", "CV macro F1", "recall", "FPR", "AUC", "diag rec@3%",
               "n120 AUC", "n120 rec@3%", "n120 F1*", "n60 rec@3%", "n480 rec@3%"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cv, le = r["cv"], r["label_efficiency"]
        lines.append("| " + " | ".join([
            r["name"], str(r["dim"]), f"{r['embed_seconds']:.0f}", f"{r['ms_per_image']:.1f}",
            f"{cv['macro_f1']:.4f}", f"{cv['defect_recall']:.4f}", f"{cv['fpr']:.4f}", f"{cv['auc']:.4f}",
            f"{cv['diag_recall_at_3fpr']:.4f}", f"{le['120']['auc_mean']:.4f}", f"{le['120']['diag_recall_at_3fpr_mean']:.4f}",
            f"{le['120']['diag_macro_f1_mean']:.4f}", f"{le['60']['diag_recall_at_3fpr_mean']:.4f}",
            f"{le['480']['diag_recall_at_3fpr_mean']:.4f}",
        ]) + " |")
    if any(r.get("cv_other_seeds") for r in results):
        seeds = ["0"] + [str(s) for s in results[0]["cv_other_seeds"]]
        lines += ["", f"CV robustness over fold seeds {', '.join(seeds)}: mean (min-max)", "",
                  "| variant | macro F1 | recall | FPR | AUC | diag rec@3% |", "|---|---|---|---|---|---|"]
        for r in results:
            runs = [r["cv"]] + list(r["cv_other_seeds"].values())
            cells = []
            for key in ("macro_f1", "defect_recall", "fpr", "auc", "diag_recall_at_3fpr"):
                values = [run[key] for run in runs]
                cells.append(f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Notes: " + "; ".join(f"{r['name']}: {r['note']}" for r in results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATASET)
    parser.add_argument("--variants", default="all", help="comma-separated names, or 'all' (the default set, see --list)")
    parser.add_argument("--regularization", type=float, default=1.0, help="fit_linear_head's C (product default 1.0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the backbone")
    parser.add_argument("--eval-threads", type=int, default=1,
                        help="torch threads for the head fits (small L-BFGS problems: on a busy 2-core machine 2 threads "
                             "spin-wait each other and ran 10-40x slower than 1)")
    parser.add_argument("--latency", default="", help="comma-separated variant names to time (torch + ONNX Runtime, best of 3)")
    parser.add_argument("--cv-seeds", default="0", help="CV fold seeds; the tables show seed 0, more seeds add a robustness table")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for variant in VARIANTS:
            print(f"{variant.name:24s} {variant.note}{'' if variant.default else '  [only by name]'}")
        return
    names = [v.name for v in VARIANTS if v.default] if args.variants == "all" else [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [name for name in names if name not in VARIANTS_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; --list shows them")
    cv_seeds = [int(v) for v in args.cv_seeds.split(",")]
    if cv_seeds[0] != 0:
        raise SystemExit("--cv-seeds must start with 0 (the main table's folds)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    paths, y, class_names = load_dataset(args.data)
    negative = class_names.index(NEGATIVE)
    print(f"{len(paths)} images, classes {dict(zip(class_names, np.bincount(y).tolist()))}; load {load_average()}", flush=True)
    backbone = create_backbone("efficientnet_lite0")
    backbone.model.eval().to(memory_format=torch.channels_last)
    store = PartStore(args.out, paths, backbone)
    (args.out / "variants").mkdir(parents=True, exist_ok=True)
    splits = label_splits(y)
    results = []
    for name in names:
        variant = VARIANTS_BY_NAME[name]
        print(f"{name}: {variant.note}", flush=True)
        x, seconds = store.embedding(variant)
        tmp = args.out / "variants" / f"{name}.tmp.npy"
        np.save(tmp, x)
        tmp.replace(args.out / "variants" / f"{name}.npy")  # atomic: another reader never sees half a file
        eval_started = time.perf_counter()
        torch.set_num_threads(args.eval_threads)
        cv = cross_validate(x, y, negative, len(class_names), args.regularization)
        le = label_efficiency(x, y, negative, len(class_names), args.regularization, splits)
        other_seeds = {seed: cross_validate(x, y, negative, len(class_names), args.regularization, seed) for seed in cv_seeds[1:]}
        result = {"name": name, "note": variant.note, "dim": int(x.shape[1]), "embed_seconds": seconds,
                  "ms_per_image": 1000 * seconds / len(paths), "eval_seconds": time.perf_counter() - eval_started,
                  "cv": cv, "label_efficiency": le, "cv_other_seeds": other_seeds}
        torch.set_num_threads(args.threads)
        results.append(result)
        print(f"  dim {x.shape[1]}, embed {seconds:.0f} s | CV F1 {cv['macro_f1']:.4f} recall {cv['defect_recall']:.4f} "
              f"FPR {cv['fpr']:.4f} AUC {cv['auc']:.4f} diag@3% {cv['diag_recall_at_3fpr']:.4f} | n120 AUC "
              f"{le['120']['auc_mean']:.4f} rec@3% {le['120']['diag_recall_at_3fpr_mean']:.4f} | eval {result['eval_seconds']:.0f} s", flush=True)
    latency = []
    if args.latency:
        latency = measure_latency(paths, backbone, [VARIANTS_BY_NAME[n.strip()] for n in args.latency.split(",") if n.strip()],
                                  args.out, store, args.threads)
    total = time.perf_counter() - started
    command = "python benchmarks/feature_variants.py " + " ".join(sys.argv[1:])
    header = (f"# Frozen feature variants on magnetic tile ({len(paths)} images)\n\n`{command}`\n\n"
              f"Head: fit_linear_head, regularization {args.regularization}; torch {torch.__version__}, {args.threads} threads; "
              f"total {total:.0f} s this run (embeddings reused from cache are not re-timed); load at end {load_average()}.\n"
              f"CV: 5-fold StratifiedKFold seed 0, threshold from nested OOF at <= {INNER_MAX_FPR:.0%} FPR; diag = threshold read off "
              f"the held-out data at <= {DIAGNOSTIC_FPR:.0%} FPR. n120 columns: mean over 5 random labeled subsets, test = 20% split; "
              f"F1* = macro F1 at the diagnostic threshold.")
    stem = "feature_variants" if args.regularization == 1.0 else f"feature_variants-C{args.regularization:g}"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"command": command, "machine": {"cpu": cpu_model_name(), "cpus": os.cpu_count()},  # its seconds are this machine's
         "class_names": class_names, "timings": store.timings, "results": results, "latency": latency, "total_seconds": total}, indent=1))
    report = markdown(results, header)
    if latency:
        report += "\n\n| latency (32-image batch, best of 3, preprocessing excluded) | size | dim | torch eager ms/img | ONNX Runtime ms/img | max abs ONNX - cache | load |\n|---|---|---|---|---|---|---|\n"
        report += "\n".join(f"| {r['name']} | {r['size']} | {r['dim']} | {r['torch_ms_per_image']:.1f} | {r['onnx_ms_per_image']:.1f} | "
                             f"{r['onnx_vs_cache_max_abs']:.1e} | {r['load']} |" for r in latency)
    (args.out / f"{stem}.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
