"""Baselines on tiny synthetic images: HOG+LBP+SVM and the same architecture trained from random init."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.backbones import create_backbone
from modeling.baselines import HandcraftedFeatureConfig, handcrafted_features, train_from_scratch, train_handcrafted_svm
from modeling.preprocessing import Preprocessing
from modeling.training import TrainingData

SIZE = 48
CLASSES = ["horizontal", "vertical"]


def _write(directory: Path, count: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    grid = np.arange(SIZE)
    for index in range(count):
        label = index % 2
        stripes = ((grid + rng.integers(0, 8)) % 8 < 4).astype(np.float64)
        pattern = np.tile(stripes[:, None], (1, SIZE)) if label == 0 else np.tile(stripes[None, :], (SIZE, 1))
        image = np.clip(pattern * 150 + 50 + rng.normal(0, 15, (SIZE, SIZE)), 0, 255).astype(np.uint8)
        path = directory / f"{index}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
        labels.append(label)
    return paths, np.array(labels)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return {name: _write(root / name, count, seed) for name, count, seed in (("train", 24, 0), ("validation", 8, 1), ("test", 20, 2))}


def test_handcrafted_features_are_fixed_length_and_finite(images):
    paths, _ = images["train"]
    config = HandcraftedFeatureConfig(image_size=64)
    features = handcrafted_features(paths[:3], config=config)
    assert features.shape[0] == 3 and features.shape[1] > 100
    assert np.isfinite(features).all()
    # Different images, different features.
    assert not np.allclose(features[0], features[1])


def test_svm_on_handcrafted_features_separates_an_easy_task(images):
    config = HandcraftedFeatureConfig(image_size=64)
    train_paths, train_labels = images["train"]
    test_paths, test_labels = images["test"]
    classifier = train_handcrafted_svm(
        class_names=CLASSES, train_features=handcrafted_features(train_paths, config=config), train_labels=train_labels, feature_config=config,
    )
    probabilities = classifier.predict_proba_paths(test_paths)
    assert probabilities.shape == (len(test_paths), 2)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)
    assert float((probabilities.argmax(1) == test_labels).mean()) >= 0.9
    with pytest.raises(ValueError, match="two classes"):
        train_handcrafted_svm(class_names=CLASSES, train_features=np.zeros((3, 4)), train_labels=np.zeros(3, dtype=int))


def test_from_scratch_uses_random_weights_and_trains_every_layer(images):
    pretrained = create_backbone("efficientnet_lite0")
    (train_paths, train_labels), (validation_paths, validation_labels) = images["train"], images["validation"]
    empty = np.zeros((0, pretrained.num_features), dtype=np.float32)
    data = TrainingData(
        CLASSES, train_paths, train_labels, empty, validation_paths, validation_labels, empty, pretrained,
        Preprocessing(SIZE, pretrained.mean, pretrained.std), seed=0, options={"threads": 1, "batch_size": 8},
    )
    classifier = train_from_scratch(data, epochs=2, patience=5)
    assert classifier.strategy == "scratch"
    assert len(classifier.history) >= 2
    tuned = classifier.backbone.model.state_dict()
    # Not the ImageNet weights: a random init that then trained.
    assert not torch.allclose(tuned["conv_stem.weight"], pretrained.model.state_dict()["conv_stem.weight"])
    # BatchNorm statistics train from scratch (they would be frozen when fine-tuning).
    assert not torch.allclose(tuned["bn1.running_mean"], torch.zeros_like(tuned["bn1.running_mean"]))
    probabilities = classifier.predict_proba_paths(images["test"][0])
    assert probabilities.shape == (20, 2) and np.isfinite(probabilities).all()
