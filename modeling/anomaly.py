"""Patch-level anomaly scores: how far any small region of an image is from every region seen on labeled good parts.

A classifier needs examples of each defect; a factory rarely has them (MVTec's train folder holds only good parts).
Mid-level feature maps of the frozen backbone describe each patch of an image; the good parts' patches form a
memory bank (thinned by greedy k-center coreset selection, as in PatchCore); an image's anomaly score is the largest
distance of any of its patches to its nearest bank patch. A scratch a few pixels wide lights up one patch, which an
image-level embedding averages away.

Measured on MVTec AD bottle (efficientnet_lite0, 320 px, stages 2 + 4, 20x20 grid, 4000-patch bank from the 209
train/good images): ROC-AUC 1.0 on the 83 test images, the least anomalous defect 29.1 vs the most anomalous good
part 25.9. On magnetic tile it is weaker (free tiles vary, pooled out-of-fold AUC 0.94 at 224 px): so the score
is not a detector on its own but one input of a blend with the classifier (`fit_anomaly_blend`), which learns how
much to trust it from out-of-fold data of the project itself.

Everything here is functional: features in, arrays out; `loop.round` decides when to call it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import RepeatedStratifiedKFold
from threadpoolctl import threadpool_limits
from torch import nn

from modeling.threads import SMALL_OPS_THREADS, torch_threads

# Stages 2 (stride 8) and 4 (stride 16) of efficientnet_lite0's seven: local texture and part-level structure.
PATCH_STAGES = (2, 4)
PATCH_STRIDE = 16
DEFAULT_BANK_SIZE = 4000
# sklearn's C of the 2-feature logistic blend, picked from this grid by cross-validated log loss on the labeled
# non-test images unless given (few defect labels may want a sharper anomaly weight than C = 1 allows).
BLEND_REGULARIZATION_GRID = (0.1, 1.0, 10.0, 100.0)
MIN_GOOD_IMAGES = 10  # below this the good parts' own score spread (what the blend scales by) is guesswork


def patch_grid(image_size: int) -> int:
    """Patches per side: one per stride-16 cell."""
    return max(1, math.ceil(image_size / PATCH_STRIDE))


class PatchFeatureNetwork(nn.Module):
    """images (n, 3, H, W) -> patch features (n, grid * grid, d): the chosen stages, each averaged over a 3x3
    neighbourhood (a patch sees its surroundings) and pooled to one common grid, concatenated along channels."""

    def __init__(self, model: nn.Module, *, image_size: int, stages: tuple[int, ...] = PATCH_STAGES):
        super().__init__()
        for module in ("conv_stem", "bn1", "blocks"):
            if not hasattr(model, module):
                raise ValueError(f"patch anomaly scores need an EfficientNet/MobileNet-style model with {module!r}")
        if max(stages) >= len(model.blocks):
            raise ValueError(f"stages {stages} out of range: the model has {len(model.blocks)}")
        self.model = model
        self.stages = tuple(sorted(stages))
        self.grid = patch_grid(image_size)

    def _pooling_kernel(self, side: int) -> int:
        """Each stage's map is pooled to the grid by a fixed kernel (k = stride = ceil(side / grid), ceil mode), not
        by adaptive pooling: ONNX cannot export an adaptive pool whose output size does not divide its input, which
        the stride-8 map hits whenever image_size % 16 is 1 to 8 (200 px: 25 -> 13, 260 px: 33 -> 17). Where it
        divides, the two are the same pooling. The side is fixed at export (one input size), so k is a constant."""
        kernel = math.ceil(side / self.grid)
        if math.ceil(side / kernel) != self.grid:
            raise ValueError(f"a {side}x{side} feature map cannot be pooled to the {self.grid}x{self.grid} patch grid")
        return kernel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.bn1(self.model.conv_stem(images))
        stage_maps = []
        for index, block in enumerate(self.model.blocks):
            x = block(x)
            if index in self.stages:
                stage_maps.append(x)
            if index == self.stages[-1]:
                break
        return self.from_stage_maps(stage_maps)

    def from_stage_maps(self, stage_maps: list[torch.Tensor]) -> torch.Tensor:
        """The chosen stages' output maps (in stage order) -> patch features (n, grid * grid, d)."""
        maps = []
        for x in stage_maps:
            smoothed = nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
            kernel = self._pooling_kernel(int(smoothed.shape[-1]))
            maps.append(smoothed if kernel == 1 else nn.functional.avg_pool2d(smoothed, kernel, stride=kernel, ceil_mode=True))
        features = torch.cat(maps, dim=1)
        return features.flatten(2).transpose(1, 2)


class EmbeddingAndPatchNetwork(nn.Module):
    """images -> [embedding | patch features, flattened] (n, d + P * d_p): one pass of the backbone for both, where a
    first round needs both of every image (the second pass cost about 5 ms an image at 224 px in a round on this CPU:
    magnetic tile's two steps went from 64.7 to 60.3 s, medians of three). The patch stages' maps are read off the
    embedding network's own pass by forward hooks, which ONNX export traces like any op."""

    def __init__(self, embedding: nn.Module, patches: PatchFeatureNetwork):
        super().__init__()
        self.embedding = embedding
        self.patches = patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stage_maps: dict[int, torch.Tensor] = {}
        handles = [self.patches.model.blocks[index].register_forward_hook(
            lambda _module, _inputs, output, index=index: stage_maps.__setitem__(index, output)) for index in self.patches.stages]
        try:
            vectors = self.embedding(images)
        finally:
            for handle in handles:
                handle.remove()
        patches = self.patches.from_stage_maps([stage_maps[index] for index in self.patches.stages])
        return torch.cat([vectors, patches.flatten(1)], dim=1)


class PatchAnomalyNetwork(nn.Module):
    """images -> anomaly score (n,): the deployable form (exported to ONNX with the classifier)."""

    def __init__(self, features: PatchFeatureNetwork, memory_bank: np.ndarray):
        super().__init__()
        self.features = features
        bank = torch.from_numpy(np.ascontiguousarray(memory_bank, dtype=np.float32))
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.features(images)  # (n, P, d)
        squared = (patches * patches).sum(dim=2, keepdim=True) - 2.0 * patches @ self.bank.T + self.bank_sq
        nearest = squared.amin(dim=2).clamp_min(0.0).sqrt()  # (n, P)
        return nearest.amax(dim=1)


def greedy_coreset(patches: np.ndarray, *, size: int, seed: int = 0, projection_dim: int = 64,
                   tick: Callable[[int], None] | None = None) -> np.ndarray:
    """Indices of `size` rows chosen by greedy k-center (each pick the row farthest from those picked), on a random
    projection: the bank keeps rare good-part patches that a random subsample would drop, at a fraction of the size.
    `tick(n)`: n more of the `size` picks made (a progress bar; the picks cost O(rows) each: 37 s for 4000 picks from
    2700 good parts' 64 patches, QA)."""
    tick = tick or (lambda _n: None)
    if len(patches) <= size:
        tick(len(patches))
        return np.arange(len(patches))
    generator = torch.Generator().manual_seed(seed)
    points = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    if points.shape[1] > projection_dim:  # Johnson-Lindenstrauss: distances kept closely, far less memory traffic
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection
    squared_norms = (points * points).sum(dim=1)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(torch.randint(len(points), (1,), generator=generator))
    distance = squared_norms - 2.0 * (points @ points[chosen[0]]) + squared_norms[chosen[0]]
    with torch_threads(SMALL_OPS_THREADS):
        for slot in range(1, size):  # one matrix-vector product per pick: |p - c|^2 = |p|^2 - 2 p.c + |c|^2
            pick = int(torch.argmax(distance))
            chosen[slot] = pick
            torch.minimum(distance, squared_norms - 2.0 * (points @ points[pick]) + squared_norms[pick], out=distance)
            if slot % 100 == 99:
                tick(100)
    tick(size % 100)  # ticked 100 at slots 99, 199, ...: the rest
    return chosen


def build_memory_bank(*, patch_features: np.ndarray, bank_size: int = DEFAULT_BANK_SIZE, seed: int = 0) -> np.ndarray:
    """(n_images, P, d) patch features of good parts -> (<= bank_size, d) float32 memory bank."""
    return _memory_bank(patch_features, bank_size=bank_size, seed=seed)[0]


def _memory_bank(patch_features: np.ndarray, *, bank_size: int, seed: int,
                 tick: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    if len(patch_features) == 0:
        raise ValueError("a memory bank needs at least one good image")
    _, n_patches, dim = patch_features.shape
    patches = np.asarray(patch_features, dtype=np.float32).reshape(-1, dim)
    chosen = greedy_coreset(patches, size=bank_size, seed=seed, tick=tick)
    return np.ascontiguousarray(patches[chosen]), chosen // n_patches  # the bank, and which image each row came from


def anomaly_scores(*, patch_features: np.ndarray, memory_bank: np.ndarray, batch_images: int = 256) -> np.ndarray:
    """Largest nearest-bank-patch distance per image (exact search, FAISS)."""
    n_images, n_patches, dim = patch_features.shape
    index = faiss.IndexFlatL2(dim)
    index.add(np.ascontiguousarray(memory_bank, dtype=np.float32))
    scores = np.empty(n_images, dtype=np.float64)
    for start in range(0, n_images, batch_images):
        chunk = np.ascontiguousarray(patch_features[start : start + batch_images], dtype=np.float32).reshape(-1, dim)
        squared, _ = index.search(chunk, 1)
        scores[start : start + batch_images] = np.sqrt(np.maximum(squared[:, 0], 0.0)).reshape(-1, n_patches).max(axis=1)
    return scores


@dataclass(frozen=True)
class GoodPartScores:
    memory_bank: np.ndarray  # from every given good image: what new images are scored against
    leave_one_out: np.ndarray  # per given good image, scored against the bank without its own patches
    n_scored_by_image: int = 0  # with groups: images whose group holds the whole bank (only their own rows left out)


def score_good_parts(*, patch_features: np.ndarray, bank_size: int = DEFAULT_BANK_SIZE, seed: int = 0, batch_images: int = 32,
                     groups: np.ndarray | None = None, tick: Callable[[int], None] | None = None) -> GoodPartScores:
    """The deployment bank from all good images, and honest scores for those same images: a good image scored
    against a bank that holds its own patches scores ~0 and would make every threshold too low. Each is scored
    against the bank minus the rows taken from it (one coreset, not one per fold; the rows it gave up leave its
    region thinner than a bank built without it would, so the score errs high: a cautious threshold).
    With `groups` (one id per image, e.g. its physical part) the rows of every image of its group are left out too:
    another exposure of the same part is as good as its own patches. An image whose group owns every bank row (one
    part dominating the good images) leaves out only its own rows; `n_scored_by_image` counts those."""
    n_images = len(patch_features)
    if n_images < MIN_GOOD_IMAGES:
        raise ValueError(f"patch anomaly scores need at least {MIN_GOOD_IMAGES} labeled good images; have {n_images}")
    tick = tick or (lambda _n: None)  # bank_size for the bank's picks, then one per image scored
    bank, owner = _memory_bank(patch_features, bank_size=bank_size, seed=seed, tick=tick)
    bank_tensor = torch.from_numpy(bank)
    bank_squared = (bank_tensor * bank_tensor).sum(dim=1)
    image_owner = torch.from_numpy(owner)
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n_images:
            raise ValueError(f"groups must have one id per image: {len(groups)} vs {n_images}")
        _, group_index = np.unique(groups, return_inverse=True)
        owner = group_index[owner]  # a bank row belongs to its image's group
    else:
        group_index = np.arange(n_images)
    owner_tensor = torch.from_numpy(owner)
    query_owner = torch.from_numpy(np.asarray(group_index))
    scores = np.empty(n_images, dtype=np.float64)
    n_scored_by_image = 0
    with torch.inference_mode():
        for start in range(0, n_images, batch_images):
            queries = torch.from_numpy(np.asarray(patch_features[start : start + batch_images], dtype=np.float32))  # (c, P, d)
            squared = (queries * queries).sum(dim=2, keepdim=True) - 2.0 * queries @ bank_tensor.T + bank_squared  # (c, P, M)
            own = owner_tensor[None, :] == query_owner[start : start + len(queries), None]  # (c, M)
            whole_bank = own.all(dim=1)
            if whole_bank.any():  # nothing would be left to compare with: leave out the image's own rows only
                own[whole_bank] = image_owner[None, :] == torch.arange(start, start + len(queries))[whole_bank, None]
                n_scored_by_image += int(whole_bank.sum())
            squared.masked_fill_(own[:, None, :], float("inf"))
            scores[start : start + len(queries)] = squared.amin(dim=2).clamp_min(0.0).sqrt().amax(dim=1).double().numpy()
            tick(len(queries))
    return GoodPartScores(bank, scores, n_scored_by_image)


@dataclass(frozen=True)
class AnomalyBlend:
    """P(defect) = sigmoid(classifier_weight * logit(classifier P(defect)) + anomaly_weight * z + bias), where
    z = (log anomaly score - log_center) / log_scale, the scale taken from good parts' out-of-fold scores."""
    classifier_weight: float
    anomaly_weight: float
    bias: float
    regularization: float
    log_center: float
    log_scale: float
    n_images: int
    n_defects: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


_EPSILON = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPSILON, 1 - _EPSILON)
    return np.log(p) - np.log1p(-p)


def fit_anomaly_blend(*, p_defect: np.ndarray, anomaly_score: np.ndarray, is_defect: np.ndarray, regularization: float | None = None) -> AnomalyBlend:
    """Logistic regression on (classifier logit, standardised log anomaly score), fitted on out-of-fold data: with a
    handful of defect labels the anomaly score carries the decision; with many, the classifier does."""
    is_defect = np.asarray(is_defect, dtype=bool)
    if is_defect.all() or not is_defect.any():
        raise ValueError("the anomaly blend needs labeled defects and labeled good parts")
    log_score = np.log(np.maximum(np.asarray(anomaly_score, dtype=np.float64), _EPSILON))
    good = log_score[~is_defect]
    center = float(np.median(good))
    scale = float(max(np.percentile(good, 90) - np.percentile(good, 10), 1e-3))
    features = np.column_stack([_logit(p_defect), (log_score - center) / scale])
    targets = is_defect.astype(int)
    # two features: BLAS threads only fight over the cores. 900 images beside two busy processes: 1.3-4.6 s with the
    # default threads, 0.45-0.54 s with one (0.35 s either way on an idle machine; a QA run saw 0.7-9.2 s under load)
    with threadpool_limits(limits=1):
        if regularization is None:  # chosen by cross-validated log loss on these (non-test) images
            folds = int(min(5, is_defect.sum(), (~is_defect).sum()))
            regularization = _cross_validated_regularization(features, targets, folds=folds) if folds >= 2 else 1.0
        weights, bias = _non_negative_fit(features, targets, regularization=regularization)
    return AnomalyBlend(weights[0], weights[1], bias, regularization, center, scale, int(len(is_defect)), int(is_defect.sum()))


def _non_negative_fit(features: np.ndarray, targets: np.ndarray, *, regularization: float) -> tuple[list[float], float]:
    """(weights, bias) of the logistic regression, with no weight below 0: a more defect-like classifier score or a
    more anomalous part never lowers P(defect). A feature whose weight comes out negative is dropped and the other
    refitted alone; if that one is negative too, the classifier's P(defect) passes through unchanged. (QA: two good
    parts mislabeled among three first defect labels gave the anomaly score a weight of -8.7, and every labeled good
    part in the memory bank, scoring ~0, became a defect at P(defect) 1.0.)"""
    model = LogisticRegression(C=regularization, max_iter=1000).fit(features, targets)
    weights = [float(w) for w in model.coef_[0]]
    if min(weights) >= 0:
        return weights, float(model.intercept_[0])
    kept = int(np.argmax(weights))
    model = LogisticRegression(C=regularization, max_iter=1000).fit(features[:, [kept]], targets)
    if model.coef_[0, 0] < 0:
        return [1.0, 0.0], 0.0
    weights = [0.0, 0.0]
    weights[kept] = float(model.coef_[0, 0])
    return weights, float(model.intercept_[0])


def _cross_validated_regularization(features: np.ndarray, targets: np.ndarray, *, folds: int) -> float:
    """The grid's C with the lowest held-out log loss over 5 repeats of stratified K-fold (few defects: one split is noise)."""
    splits = list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=5, random_state=0).split(features, targets))
    losses = []
    for regularization in BLEND_REGULARIZATION_GRID:
        total = 0.0
        for train, held in splits:
            model = LogisticRegression(C=regularization, max_iter=1000).fit(features[train], targets[train])
            total += log_loss(targets[held], model.predict_proba(features[held])[:, 1], labels=[0, 1]) * len(held)
        losses.append(total)
    return float(BLEND_REGULARIZATION_GRID[int(np.argmin(losses))])


def _blend(probabilities: torch.Tensor, score: torch.Tensor, blend: AnomalyBlend, defect_mask: torch.Tensor) -> torch.Tensor:
    """The blend's arithmetic, once: for the stored probabilities (float64) and inside the deployed ONNX graph."""
    p_defect = (1.0 - (probabilities * (1.0 - defect_mask)).sum(dim=1)).clamp(_EPSILON, 1 - _EPSILON)
    z = (torch.log(score.clamp_min(_EPSILON)) - blend.log_center) / blend.log_scale
    blended_defect = torch.sigmoid(blend.classifier_weight * torch.log(p_defect / (1 - p_defect)) + blend.anomaly_weight * z + blend.bias)
    shares = (probabilities + _EPSILON) * defect_mask
    shares = shares / shares.sum(dim=1, keepdim=True)
    return (1.0 - defect_mask) * (1.0 - blended_defect)[:, None] + shares * blended_defect[:, None]


def _defect_mask(n_classes: int, negative_index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    mask = torch.ones(n_classes, dtype=dtype)
    mask[negative_index] = 0.0
    return mask


def blend_probabilities(*, probabilities: np.ndarray, anomaly_score: np.ndarray, blend: AnomalyBlend, negative_index: int) -> np.ndarray:
    """Class probabilities with P(defect) from the blend: the good class gets 1 - P(defect), the defect classes share
    P(defect) in the classifier's proportions (which defect it is stays the classifier's call)."""
    probabilities = torch.from_numpy(np.asarray(probabilities, dtype=np.float64))
    score = torch.from_numpy(np.asarray(anomaly_score, dtype=np.float64))
    return _blend(probabilities, score, blend, _defect_mask(probabilities.shape[1], negative_index, torch.float64)).numpy()


class BlendedClassifierNetwork(nn.Module):
    """images -> class probabilities: the classifier and the patch anomaly score, blended as in `blend_probabilities`
    (one ONNX graph, so the latency gate times what is deployed)."""

    def __init__(self, classifier: nn.Module, anomaly: PatchAnomalyNetwork, blend: AnomalyBlend, *, negative_index: int, n_classes: int):
        super().__init__()
        self.classifier = classifier
        self.anomaly = anomaly
        self.blend = blend
        self.register_buffer("defect_mask", _defect_mask(n_classes, negative_index))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _blend(self.classifier(images), self.anomaly(images), self.blend, self.defect_mask)


def patch_features_key(backbone, preprocessing, *, stages: tuple[int, ...] = PATCH_STAGES) -> str:  # noqa: ANN001
    return f"{backbone.name}-{backbone.weights_id}-patches-{'-'.join(map(str, stages))}-{preprocessing.key}"


def compute_patch_features(*, backbone, preprocessing, paths: list[str], onnx_dir, threads: int = 2, show_progress: bool = True,  # noqa: ANN001
                           stages: tuple[int, ...] = PATCH_STAGES, keep=None, collect: bool = True) -> np.ndarray | None:  # noqa: ANN001
    """(n, P, d) float16 patch features through ONNX Runtime (float16 halves the cache; distances barely move).
    keep(start, rows): the rows as they are done (EmbeddingExtractor.embed), in float16 too; collect=False: only
    kept, None returned (a cache filling needs no copy of everything in memory)."""
    from modeling.embeddings import EmbeddingExtractor

    network = PatchFeatureNetwork(backbone.model, image_size=preprocessing.image_size, stages=stages)
    extractor = EmbeddingExtractor(backbone, preprocessing, onnx_dir=onnx_dir, threads=threads, network=network,
                                   model_key=patch_features_key(backbone, preprocessing, stages=stages))
    features = extractor.embed(list(paths), description=f"patch features of {len(paths)} images", show_progress=show_progress,
                               keep=None if keep is None else (lambda start, rows: keep(start, rows.astype(np.float16))), collect=collect)
    return None if features is None else features.astype(np.float16)


def compute_embeddings_and_patch_features(*, backbone, preprocessing, paths: list[str], onnx_dir, keep: Callable[[int, np.ndarray, np.ndarray], None],  # noqa: ANN001
                                          threads: int = 2, show_progress: bool = True, stages: tuple[int, ...] = PATCH_STAGES) -> None:
    """Embeddings (as EmbeddingExtractor gives them) and patch features (as compute_patch_features, float16) of the
    same images in one backbone pass, handed to keep(start, embeddings (k, d), patch features (k, P, d_p)) as they
    are done (EmbeddingExtractor.embed): what the caches of both take."""
    from modeling.embeddings import EmbeddingExtractor, EmbeddingNetwork, embedding_model_key

    patches = PatchFeatureNetwork(backbone.model, image_size=preprocessing.image_size, stages=stages)
    network = EmbeddingAndPatchNetwork(EmbeddingNetwork(backbone.model, pooling=backbone.pooling), patches).eval()
    with torch.no_grad():  # the widths, from one small pass: the two parts share one output row
        probe = network.patches(torch.zeros(1, 3, preprocessing.image_size, preprocessing.image_size))
    n_patches, patch_dim = int(probe.shape[1]), int(probe.shape[2])
    extractor = EmbeddingExtractor(backbone, preprocessing, onnx_dir=onnx_dir, threads=threads, network=network,
                                   model_key=f"{embedding_model_key(backbone, preprocessing)}+{patch_features_key(backbone, preprocessing, stages=stages)}")

    def split(start: int, rows: np.ndarray) -> None:
        width = n_patches * patch_dim
        keep(start, np.ascontiguousarray(rows[:, :-width], dtype=np.float32),
             rows[:, -width:].astype(np.float16).reshape(len(rows), n_patches, patch_dim))

    extractor.embed(list(paths), description=f"embedding and patch features of {len(paths)} new images", show_progress=show_progress, keep=split,
                    collect=False)


@dataclass(frozen=True)
class PatchAnomalyModel:
    memory_bank: np.ndarray  # (M, d): from every labeled good image given
    blend: AnomalyBlend
    labeled_scores: np.ndarray  # anomaly score per labeled image given, out-of-fold for the good ones
    good_scored_by_image: int = 0  # good images left out by image although groups were given (see score_good_parts)

    def scores(self, patch_features: np.ndarray) -> np.ndarray:
        return anomaly_scores(patch_features=patch_features, memory_bank=self.memory_bank)


def fit_patch_anomaly(*, patch_features: np.ndarray, is_defect: np.ndarray, p_defect_out_of_fold: np.ndarray,
                      bank_size: int = DEFAULT_BANK_SIZE, seed: int = 0, blend_regularization: float | None = None,
                      groups: np.ndarray | None = None, tick: Callable[[int], None] | None = None) -> PatchAnomalyModel:
    """On the labeled non-test images: the good parts' memory bank, every labeled image's honest anomaly score (good
    parts out-of-fold, by group when `groups` names each image's physical part; defects against the whole bank) and
    the blend with the classifier's out-of-fold P(defect)."""
    is_defect = np.asarray(is_defect, dtype=bool)
    good = np.flatnonzero(~is_defect)
    good_scores = score_good_parts(patch_features=patch_features[good], bank_size=bank_size, seed=seed,
                                   groups=None if groups is None else np.asarray(groups)[good], tick=tick)
    labeled_scores = np.empty(len(is_defect), dtype=np.float64)
    labeled_scores[good] = good_scores.leave_one_out
    if is_defect.any():
        labeled_scores[is_defect] = anomaly_scores(patch_features=patch_features[is_defect], memory_bank=good_scores.memory_bank)
    blend = fit_anomaly_blend(p_defect=p_defect_out_of_fold, anomaly_score=labeled_scores, is_defect=is_defect, regularization=blend_regularization)
    return PatchAnomalyModel(good_scores.memory_bank, blend, labeled_scores, good_scores.n_scored_by_image)
