"""Baselines that transfer learning has to beat, on the same split:
- "from scratch": the same architecture (efficientnet_lite0) from random init, every layer trained;
- an SVM on handcrafted features: HOG (edges and their orientation) + LBP histograms (micro-texture), the classic
  pre-deep-learning recipe for surface defects.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from modeling.backbones import create_backbone
from modeling.finetune import FinetuneConfig, FinetunedClassifier, backbone_stage_count, train_finetuned
from modeling.preprocessing import Preprocessing, to_rgb
from modeling.training import TrainingData

# ----------------------------------------------------------------------------------------------------------------
# From scratch


def train_from_scratch(data: TrainingData, **overrides: Any) -> FinetunedClassifier:
    """The `full` trainer on a randomly initialised copy of the same architecture: BatchNorm statistics train,
    the head starts random, learning rates are those of training from zero (1e-3), input-space augmentation on.

    data.preprocessing sets the resolution (a smaller one keeps this affordable on a CPU); data.backbone only
    gives the architecture's name."""
    random_backbone = create_backbone(data.backbone.name, weights="none")
    preprocessing = Preprocessing(data.preprocessing.image_size, random_backbone.mean, random_backbone.std)
    defaults = {
        "trainable_stages": backbone_stage_count(random_backbone.model), "train_stem": True, "layer_decay": 1.0,
        "backbone_lr": 1e-3, "head_lr": 1e-3, "head_init": "random", "batchnorm": "train", "mode": "augment",
        "augmentation": "geometric", "epochs": 30, "patience": 8, "weight_decay": 1e-4, "dropout": 0.2,
    }
    options = {**defaults, **data.options, **overrides}
    config = FinetuneConfig.from_options(options)
    scratch_data = replace(data, backbone=random_backbone, preprocessing=preprocessing, options=options)
    return train_finetuned(scratch_data, config, strategy="scratch")


# ----------------------------------------------------------------------------------------------------------------
# HOG + LBP + SVM


@dataclass(frozen=True)
class HandcraftedFeatureConfig:
    image_size: int = 128
    hog_orientations: int = 9
    hog_pixels_per_cell: int = 16
    hog_cells_per_block: int = 2
    lbp_scales: tuple[tuple[int, float], ...] = ((8, 1.0), (16, 2.0), (24, 3.0))  # (points, radius)


def _greyscale(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(to_rgb(image).convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def handcrafted_features_of_image(grey: np.ndarray, config: HandcraftedFeatureConfig = HandcraftedFeatureConfig()) -> np.ndarray:
    from skimage.feature import hog, local_binary_pattern  # scikit-image: only the baselines need it

    parts = [
        hog(
            grey, orientations=config.hog_orientations, pixels_per_cell=(config.hog_pixels_per_cell,) * 2,
            cells_per_block=(config.hog_cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True,
        )
    ]
    grey_u8 = (grey * 255).astype(np.uint8)
    for points, radius in config.lbp_scales:
        codes = local_binary_pattern(grey_u8, points, radius, method="uniform")
        histogram, _ = np.histogram(codes, bins=points + 2, range=(0, points + 2), density=True)
        parts.append(histogram)
    # Global intensity statistics: contrast and brightness separate some defect classes on their own.
    parts.append(np.array([grey.mean(), grey.std(), np.percentile(grey, 5), np.percentile(grey, 95)]))
    return np.concatenate(parts).astype(np.float32)


def handcrafted_features(paths: Sequence[str], *, config: HandcraftedFeatureConfig = HandcraftedFeatureConfig()) -> np.ndarray:
    """(n, d) HOG + multi-scale uniform LBP histograms + intensity statistics of greyscale images."""
    return np.stack([handcrafted_features_of_image(_greyscale(path, config.image_size), config) for path in paths])


@dataclass
class HandcraftedSvmClassifier:
    class_names: list[str]
    pipeline: Pipeline
    feature_config: HandcraftedFeatureConfig
    uses_frozen_embeddings: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        probabilities = np.zeros((len(features), len(self.class_names)))
        probabilities[:, self.pipeline.classes_] = self.pipeline.predict_proba(features)
        return probabilities

    def predict_proba_paths(self, paths: Sequence[str]) -> np.ndarray:
        return self.predict_proba_features(handcrafted_features(paths, config=self.feature_config))

    def predict_proba_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the SVM baseline works on handcrafted features, not backbone embeddings")

    def to_torch_module(self) -> Any:
        raise NotImplementedError("the SVM baseline is for comparison only and is not exported")


def train_handcrafted_svm(
    *, class_names: list[str], train_features: np.ndarray, train_labels: np.ndarray, seed: int = 0,
    regularization: float = 10.0, feature_config: HandcraftedFeatureConfig = HandcraftedFeatureConfig(),
) -> HandcraftedSvmClassifier:
    """RBF SVM, class-balanced, on standardised handcrafted features; Platt-scaled (sigmoid, cross-validated) probabilities."""
    labels = np.asarray(train_labels)
    if len(set(labels.tolist())) < 2:
        raise ValueError("the SVM baseline needs examples of at least two classes")
    counts = np.bincount(labels)
    pipeline = make_pipeline(
        StandardScaler(),
        CalibratedClassifierCV(
            SVC(C=regularization, kernel="rbf", gamma="scale", class_weight="balanced", random_state=seed),
            method="sigmoid", cv=max(2, min(5, int(counts[counts > 0].min()))), ensemble=False,
        ),
    )
    pipeline.fit(train_features, labels)
    return HandcraftedSvmClassifier(list(class_names), pipeline, feature_config)
