"""Fine-tuning strategies on tiny synthetic images (64 px): seconds each, real pretrained backbone."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.backbones import create_backbone
from modeling.finetune import (
    FEATURE_MAP_CACHE,
    ClassWeightedCrossEntropy,
    FocalLoss,
    _drop_views_that_change_the_answer,
    prefix_feature_maps,
    training_criterion,
    FinetuneConfig,
    balanced_sample,
    class_weights,
    finetuned_out_of_fold_probabilities,
    predict_proba_paths,
    split_backbone,
)
from modeling.onnx_export import export_onnx, open_session
from modeling.preprocessing import Preprocessing, load_image_array
from modeling.training import TrainingData, available_training_strategies, train_classifier

SIZE = 64


def _stripes(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Easy, label-determined patterns with random phase, period and noise."""
    period = int(rng.integers(6, 10))
    phase = int(rng.integers(0, period))
    grid = np.arange(SIZE)
    if kind == "horizontal":
        pattern = np.tile(((grid + phase) % period < period // 2)[:, None], (1, SIZE))
    elif kind == "vertical":
        pattern = np.tile(((grid + phase) % period < period // 2)[None, :], (SIZE, 1))
    else:  # a bright blob on a flat background
        pattern = np.zeros((SIZE, SIZE), dtype=bool)
        cy, cx = rng.integers(12, SIZE - 12, 2)
        yy, xx = np.ogrid[:SIZE, :SIZE]
        pattern = (yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(36, 100))
    image = pattern.astype(np.float64) * 140 + 60 + rng.normal(0, 12, (SIZE, SIZE))
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(directory: Path, kinds: list[str], counts: list[int], seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for label, (kind, count) in enumerate(zip(kinds, counts)):
        for index in range(count):
            path = directory / f"{kind}_{index}.png"
            Image.fromarray(_stripes(kind, rng)).save(path)
            paths.append(str(path))
            labels.append(label)
    return paths, np.array(labels)


KINDS = ["horizontal", "vertical", "blob"]


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def balanced_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": _write(root / "train", KINDS, [16, 16, 16], seed=0),
        "validation": _write(root / "validation", KINDS, [6, 6, 6], seed=1),
        "test": _write(root / "test", KINDS, [10, 10, 10], seed=2),
    }


def _data(backbone, images, **options) -> TrainingData:
    (train_paths, train_labels), (validation_paths, validation_labels) = images["train"], images["validation"]
    empty = np.zeros((0, backbone.num_features), dtype=np.float32)
    return TrainingData(
        class_names=KINDS, train_paths=train_paths, train_labels=train_labels, train_embeddings=empty,
        validation_paths=validation_paths, validation_labels=validation_labels, validation_embeddings=empty,
        backbone=backbone, preprocessing=Preprocessing(SIZE, backbone.mean, backbone.std), seed=0,
        options={"epochs": 3, "batch_size": 16, "threads": 1, "cached_views": "identity", "label_smoothing": 0.0, "head_regularization": 1.0, **options},
    )


def test_strategies_are_registered_by_name():
    assert {"head", "finetune", "full"} <= set(available_training_strategies())


def test_finetune_beats_chance_and_records_history(backbone, balanced_images):
    classifier = train_classifier(strategy="finetune", data=_data(backbone, balanced_images, head_init="random", head_lr=5e-3))
    test_paths, test_labels = balanced_images["test"]
    probabilities = predict_proba_paths(classifier, test_paths)
    assert probabilities.shape == (len(test_paths), 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((probabilities.argmax(1) == test_labels).mean())
    assert accuracy > 0.8, accuracy  # chance is 1/3
    assert classifier.uses_frozen_embeddings is False
    assert [row["epoch"] for row in classifier.history][:2] == [0, 1]
    for row in classifier.history:
        assert set(row) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "seconds"}
        assert 0.0 <= row["val_accuracy"] <= 1.0
    assert classifier.validation_logits.shape == (len(balanced_images["validation"][0]), 3)
    with pytest.raises(NotImplementedError):
        classifier.predict_proba_from_embeddings(np.zeros((1, backbone.num_features), dtype=np.float32))


def test_only_the_unfrozen_tail_and_head_change(backbone, balanced_images):
    original = copy.deepcopy(backbone.model.state_dict())
    classifier = train_classifier(
        strategy="finetune", data=_data(backbone, balanced_images, trainable_stages=1, head_init="random", epochs=2, patience=5),
    )
    # The caller's backbone is untouched (the loop keeps using it for frozen embeddings).
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    tuned = classifier.backbone.model.state_dict()
    frozen_prefixes = ("conv_stem", "bn1", *(f"blocks.{i}." for i in range(6)))
    trainable_prefixes = ("blocks.6.", "conv_head", "bn2")
    changed = {name for name, tensor in tuned.items() if tensor.dtype.is_floating_point and not torch.equal(tensor, original[name])}
    assert not {name for name in changed if name.startswith(frozen_prefixes)}
    # BatchNorm running statistics stay frozen by default; weights of the unfrozen stage move.
    assert not {name for name in changed if "running_" in name}
    assert any(name.startswith("blocks.6.") for name in changed)
    assert any(name.startswith("conv_head") for name in changed)
    assert all(name.startswith(trainable_prefixes) for name in changed)


@pytest.mark.parametrize("pooling", ["avg", "multilayer"])
def test_full_strategy_trains_the_stem_too(backbone, balanced_images, pooling):
    if pooling != backbone.pooling:
        backbone = create_backbone("efficientnet_lite0", pooling=pooling)
    original = copy.deepcopy(backbone.model.state_dict())
    classifier = train_classifier(strategy="full", data=_data(backbone, balanced_images, epochs=1, head_init="random", patience=5))
    tuned = classifier.backbone.model.state_dict()
    assert not torch.equal(tuned["conv_stem.weight"], original["conv_stem.weight"])
    assert classifier.config["mode"] == "augment" and classifier.config["augmentation"]
    # Discriminative learning rates: the stem moved less than the last stage, relative to its size.
    def relative_change(name: str) -> float:
        return float((tuned[name] - original[name]).norm() / original[name].norm())

    assert relative_change("conv_stem.weight") < relative_change("conv_head.weight")


def test_imbalanced_training_never_collapses_to_one_class(backbone, tmp_path):
    train = _write(tmp_path / "train", KINDS, [40, 5, 4], seed=10)
    validation = _write(tmp_path / "validation", KINDS, [10, 3, 3], seed=11)
    test_paths, test_labels = _write(tmp_path / "test", KINDS, [10, 10, 10], seed=12)
    for options in ({"balance": "weights"}, {"balance": "sampler", "loss": "focal"}):
        data = _data(backbone, {"train": train, "validation": validation}, head_init="random", head_lr=5e-3, **options)
        classifier = train_classifier(strategy="finetune", data=data)
        predictions = predict_proba_paths(classifier, test_paths).argmax(1)
        assert set(predictions.tolist()) == {0, 1, 2}, (options, np.bincount(predictions, minlength=3))
        minority_recall = float((predictions[test_labels > 0] == test_labels[test_labels > 0]).mean())
        assert minority_recall > 0.6, (options, minority_recall)


@pytest.mark.parametrize("pooling", ["avg", "multilayer"])
def test_exported_module_matches_the_classifier_through_onnx(backbone, balanced_images, tmp_path, pooling):
    if pooling != backbone.pooling:
        backbone = create_backbone("efficientnet_lite0", pooling=pooling)
    classifier = train_classifier(strategy="finetune", data=_data(backbone, balanced_images, epochs=1))
    classifier.temperature = 1.7
    test_paths, _ = balanced_images["test"]
    expected = classifier.predict_proba_paths(test_paths[:6])
    module = classifier.to_torch_module()
    images = np.stack([load_image_array(path, classifier.preprocessing) for path in test_paths[:6]])
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(images)).numpy(), expected, atol=1e-4)
    onnx_path = export_onnx(module, tmp_path / "model.onnx", image_size=SIZE, output_name="probabilities")
    onnx_output = open_session(onnx_path, threads=1).run(None, {"images": images})[0]
    np.testing.assert_allclose(onnx_output, expected, atol=1e-4)


def test_augment_mode_and_cached_views_train(backbone, balanced_images):
    test_paths, test_labels = balanced_images["test"]
    for options in ({"augment": True, "augmentation": "flips"}, {"cached_views": "flips"}):
        classifier = train_classifier(strategy="finetune", data=_data(backbone, balanced_images, epochs=2, **options))
        accuracy = float((predict_proba_paths(classifier, test_paths).argmax(1) == test_labels).mean())
        assert accuracy > 0.8, (options, accuracy)
    assert classifier.config["cached_views"] == ["identity", "hflip", "vflip", "rot180"]


def test_training_resolution_can_differ_from_the_preprocessing(backbone, balanced_images):
    classifier = train_classifier(strategy="finetune", data=_data(backbone, balanced_images, epochs=1, image_size=48))
    test_paths, _ = balanced_images["test"]
    images = np.stack([load_image_array(path, classifier.preprocessing) for path in test_paths[:4]])
    with torch.no_grad():
        from_module = classifier.to_torch_module()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(from_module, classifier.predict_proba_paths(test_paths[:4]), atol=1e-4)


def test_bad_options_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="mode must be"):
        FinetuneConfig.from_options({"mode": "sometimes"})
    with pytest.raises(ValueError, match="unknown augmentation"):
        FinetuneConfig.from_options({"augment": True, "augmentation": "sparkle"})
    with pytest.raises(ValueError, match="cached_views"):
        FinetuneConfig.from_options({"cached_views": "hflip"})
    config = FinetuneConfig.from_options({"unfreeze_stages": 3, "lr": 1e-5, "head_regularization": 0.5})
    assert (config.trainable_stages, config.backbone_lr, config.head_regularization) == (3, 1e-5, 0.5)


def test_split_backbone_rejects_impossible_cuts(backbone):
    model = copy.deepcopy(backbone.model)
    with pytest.raises(ValueError, match="trainable_stages"):
        split_backbone(model, trainable_stages=8)
    prefix, tail = split_backbone(model, trainable_stages=2)
    with torch.no_grad():
        images = torch.randn(2, 3, SIZE, SIZE)
        np.testing.assert_allclose(tail(prefix(images)).numpy(), model(images).numpy(), atol=1e-5)


def test_class_weights_and_balanced_sampling_equalise_classes():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    weights = class_weights(labels, 4)
    assert weights[3] == 0.0
    np.testing.assert_allclose(weights[:3] * np.bincount(labels, minlength=4)[:3], len(labels) / 3)
    drawn = np.concatenate([labels[balanced_sample(labels, np.random.default_rng(seed))] for seed in range(30)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.all(np.abs(shares - 1 / 3) < 0.05), shares


def test_label_smoothing_with_class_weights_keeps_pulling_toward_the_true_class():
    # Frequent class 0 (weight 0.2), rare class 1 (weight 7): a correct, not yet confident prediction of class 0 must
    # be pushed further toward class 0. nn.CrossEntropyLoss(weight, label_smoothing) weights the smoothing term by
    # the rare class's weight and pushes it toward class 1 instead (what made fine-tuning collapse on magnetic tile).
    weights = torch.tensor([0.2, 7.0])
    labels = torch.zeros(4, dtype=torch.long)
    for loss in (ClassWeightedCrossEntropy(weights, label_smoothing=0.1), FocalLoss(0.0, weights, label_smoothing=0.1)):
        logits = torch.tensor([[1.0, 0.0]] * 4, requires_grad=True)
        loss(logits, labels).backward()
        assert logits.grad[:, 0].lt(0).all() and logits.grad[:, 1].gt(0).all()
    pytorch_logits = torch.tensor([[1.0, 0.0]] * 4, requires_grad=True)
    torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)(pytorch_logits, labels).backward()
    assert pytorch_logits.grad[:, 0].gt(0).all()  # the behaviour the class exists to avoid
    # Without smoothing it is PyTorch's weighted cross-entropy; with equal weights, the plain mean.
    logits = torch.randn(6, 3)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    class_weight = torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(ClassWeightedCrossEntropy(class_weight)(logits, targets), torch.nn.functional.cross_entropy(logits, targets, weight=class_weight))
    torch.testing.assert_close(ClassWeightedCrossEntropy(torch.ones(3), 0.1)(logits, targets), torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1))


def test_feature_map_cache_is_bounded():
    assert FEATURE_MAP_CACHE.bytes <= FEATURE_MAP_CACHE.max_bytes


def test_frozen_embeddings_from_cached_feature_maps_match_the_embedding_network(backbone, balanced_images):
    from modeling.embeddings import EmbeddingNetwork
    from modeling.finetune import frozen_embeddings

    paths = balanced_images["test"][0][:5]
    preprocessing = Preprocessing(SIZE, backbone.mean, backbone.std)
    embeddings = frozen_embeddings(backbone, preprocessing, paths, threads=1)
    images = torch.from_numpy(np.stack([load_image_array(path, preprocessing) for path in paths]))
    with torch.no_grad():
        expected = EmbeddingNetwork(backbone.model.eval())(images).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-4)


def test_test_time_views_are_averaged_the_same_way_in_the_export(backbone, balanced_images, tmp_path):
    classifier = train_classifier(strategy="finetune", data=_data(backbone, balanced_images, epochs=1, tta="flips"))
    assert classifier.network.tta == ("identity", "hflip", "vflip", "rot180")
    test_paths, _ = balanced_images["test"]
    expected = classifier.predict_proba_paths(test_paths[:4])
    images = np.stack([load_image_array(path, classifier.preprocessing) for path in test_paths[:4]])
    onnx_path = export_onnx(classifier.to_torch_module(), tmp_path / "tta.onnx", image_size=SIZE, output_name="probabilities")
    np.testing.assert_allclose(open_session(onnx_path, threads=1).run(None, {"images": images})[0], expected, atol=1e-4)
    # The views matter: a single view gives other numbers.
    classifier.network.tta = ("identity",)
    assert not np.allclose(classifier.predict_proba_paths(test_paths[:4]), expected, atol=1e-6)


def _ramps(directory: Path, counts: tuple[int, int], seed: int) -> tuple[list[str], np.ndarray]:
    """Class 0 brightens left to right, class 1 right to left: a horizontal flip turns one class into the other,
    a vertical flip changes nothing."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    ramp = np.tile(np.linspace(40, 220, SIZE)[None, :], (SIZE, 1))
    for label in (0, 1):
        for index in range(counts[label]):
            image = (ramp if label == 0 else ramp[:, ::-1]) + rng.normal(0, 10, (SIZE, SIZE))
            path = directory / f"ramp{label}_{index}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
            paths.append(str(path))
            labels.append(label)
    return paths, np.array(labels)


def _ramp_data(backbone, tmp_path, counts: tuple[int, int], **options) -> TrainingData:
    train_paths, train_labels = _ramps(tmp_path / "train", counts, seed=0)
    validation_paths, validation_labels = _ramps(tmp_path / "validation", (4, 4), seed=1)
    empty = np.zeros((0, backbone.num_features), dtype=np.float32)
    return TrainingData(
        class_names=["rising", "falling"], train_paths=train_paths, train_labels=train_labels, train_embeddings=empty,
        validation_paths=validation_paths, validation_labels=validation_labels, validation_embeddings=empty,
        backbone=backbone, preprocessing=Preprocessing(SIZE, backbone.mean, backbone.std), seed=0,
        options={"epochs": 1, "batch_size": 8, "threads": 1, "head_regularization": 1.0, **options},
    )


def test_cached_views_that_change_the_label_are_dropped(backbone, tmp_path):
    data = _ramp_data(backbone, tmp_path, (12, 12), cached_views="vflip,hflip,identity,rot180", tta="flips", label_smoothing=0.0)
    classifier = train_classifier(strategy="finetune", data=data)
    check = classifier.config["view_check"]
    assert check["balanced_accuracy"]["identity"] == 1.0
    assert check["balanced_accuracy"]["hflip"] < 0.5 and check["balanced_accuracy"]["rot180"] < 0.5  # the flip swaps the classes
    assert check["kept"] == ["identity", "vflip"]  # identity first whatever the order given
    assert classifier.network.tta == ("identity", "vflip") == tuple(check["tta"])  # not averaged at test time either
    # What training draws its batches from: the maps of the kept views only.
    runner = classifier._runner()
    names = ["identity", "hflip", "vflip", "rot180"]
    maps = [prefix_feature_maps(runner, data.train_paths, data.preprocessing, view=name) for name in names]
    kept_maps, _ = _drop_views_that_change_the_answer(classifier.network, names, maps, data.train_labels,
                                                      config=FinetuneConfig.from_options({}), head_is_trained=True)
    assert len(kept_maps) == 2 and kept_maps[0] is maps[0] and kept_maps[1] is maps[2]


def test_the_default_training_objective_keeps_pulling_the_frequent_class_toward_itself():
    labels = np.array([0] * 40 + [1] * 4)  # class weights 0.55 / 5.5; default label smoothing 0.1
    for options in ({}, {"loss": "focal"}):
        criterion = training_criterion(FinetuneConfig.from_options(options), labels, 2)
        logits = torch.tensor([[1.0, 0.0]] * 4, requires_grad=True)
        criterion(logits, torch.zeros(4, dtype=torch.long)).backward()
        assert logits.grad[:, 0].lt(0).all(), options


def test_multilayer_finetuning_starts_from_the_head_strategys_features_and_trains_only_the_tail(balanced_images):
    from modeling.embeddings import EmbeddingNetwork
    from modeling.finetune import MultiLayerTail, _pooled_features, prefix_feature_maps

    multilayer = create_backbone("efficientnet_lite0", pooling="multilayer")
    original = copy.deepcopy(multilayer.model.state_dict())
    classifier = train_classifier(strategy="finetune", data=_data(multilayer, balanced_images, trainable_stages=1, epochs=0))
    network = classifier.network
    assert isinstance(network.tail, MultiLayerTail) and classifier.head_features == "multilayer"
    # Before any update the network's pooled features are the frozen multi-layer embeddings the `head` strategy uses.
    paths = balanced_images["test"][0][:4]
    maps = prefix_feature_maps(classifier._runner(), paths, classifier.preprocessing)
    pooled = _pooled_features(network, maps, batch_size=8, channels_last=False)
    images = torch.from_numpy(np.stack([load_image_array(path, classifier.preprocessing) for path in paths]))
    with torch.no_grad():
        expected = EmbeddingNetwork(copy.deepcopy(multilayer.model).eval(), pooling="multilayer")(images).numpy()
    assert pooled.shape == expected.shape and expected.shape[1] > multilayer.num_features
    np.testing.assert_allclose(pooled, expected, atol=1e-4)

    # Trained: the pooled stage in front of the trainable one runs in the tail but never changes.
    tuned = train_classifier(strategy="finetune", data=_data(multilayer, balanced_images, trainable_stages=1, head_init="random", epochs=2, patience=5))
    changed = {name for name, tensor in tuned.backbone.model.state_dict().items()
               if tensor.dtype.is_floating_point and not torch.equal(tensor, original[name])}
    assert any(name.startswith("blocks.6.") for name in changed)
    assert all(name.startswith(("blocks.6.", "conv_head", "bn2")) for name in changed), sorted(changed)[:5]
    assert len(tuned.network.tail.stages) == 4  # stages 3-6 pooled, only 6 trained

    # Even when BatchNorm statistics train, the frozen pooled stages keep theirs.
    with_statistics = train_classifier(strategy="finetune", data=_data(multilayer, balanced_images, trainable_stages=1, batchnorm="train", head_init="random", epochs=1, patience=5))
    moved = {name for name, tensor in with_statistics.backbone.model.state_dict().items()
             if "running_" in name and not torch.equal(tensor, original[name])}
    assert any(name.startswith("blocks.6.") for name in moved)
    assert not {name for name in moved if not name.startswith(("blocks.6.", "bn2"))}, sorted(moved)[:5]


def test_out_of_fold_networks_never_predict_an_image_they_trained_on(backbone, balanced_images, monkeypatch):
    import modeling.finetune as finetune

    paths, labels = balanced_images["train"]
    groups = np.array([f"part{i // 2}" for i in range(len(paths))])  # two photos per part: never on both sides
    trained, predicted = [], []
    real_train, real_predict = finetune.train_classifier, finetune.predict_proba_paths

    def recording_train(*, strategy, data):
        classifier = real_train(strategy=strategy, data=data)
        trained.append({"paths": set(data.train_paths), "epochs": data.options["epochs"], "validation": len(data.validation_paths), "strategy": strategy,
                        "kept": classifier.best_epoch, "schedule": data.options["schedule_epochs"]})
        return classifier

    def recording_predict(classifier, fold_paths, preprocessing=None):
        predicted.append(list(fold_paths))
        return real_predict(classifier, fold_paths, preprocessing)

    monkeypatch.setattr(finetune, "train_classifier", recording_train)
    monkeypatch.setattr(finetune, "predict_proba_paths", recording_predict)
    details = {}
    probabilities = finetuned_out_of_fold_probabilities(
        data=_data(backbone, balanced_images, max_epochs=9), strategy="finetune", epochs=2, schedule_epochs=6,
        groups=groups, n_folds=3, details=details, show_progress=False,
    )
    assert probabilities.shape == (len(paths), 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert details["n_folds"] == details["models_trained"] == len(trained) == len(predicted) == 3
    assert sorted(p for fold in predicted for p in fold) == sorted(paths)  # every image predicted exactly once
    group_of = dict(zip(paths, groups))
    for fold, held in zip(trained, predicted):
        assert not fold["paths"] & set(held)
        assert not {group_of[p] for p in fold["paths"]} & {group_of[p] for p in held}
        # the deployed network's kept epoch on its own schedule, replayed and kept (no validation to pick another)
        assert (fold["epochs"], fold["kept"], fold["schedule"], fold["validation"], fold["strategy"]) == (2, 2, 6, 0, "finetune")
    assert float((probabilities.argmax(axis=1) == labels).mean()) > 0.8  # chance is 1/3


def test_a_fixed_count_of_epochs_keeps_the_last_one_and_follows_the_planned_schedule(backbone, balanced_images):
    # Without validation, "best" is judged on training loss, where epoch 0 (eval mode, no dropout, no views) can look
    # better than a trained epoch; the fold networks replay a count of epochs and must keep the last.
    rng = np.random.default_rng(3)
    paths, labels = balanced_images["train"]
    noisy = np.where(rng.random(len(labels)) < 0.3, (labels + 1) % 3, labels)
    images = {"train": (paths, noisy), "validation": ([], np.zeros(0, dtype=np.int64))}
    kept = train_classifier(strategy="finetune", data=_data(backbone, images, epochs=2, keep_epoch="last", schedule_epochs=6))
    assert kept.best_epoch == 2 and len(kept.history) == 3
    with pytest.raises(ValueError, match="schedule_epochs"):
        FinetuneConfig.from_options({"epochs": 4, "schedule_epochs": 2})
    with pytest.raises(ValueError, match="keep_epoch"):
        FinetuneConfig.from_options({"keep_epoch": "middle"})
