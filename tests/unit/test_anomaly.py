"""Patch-level anomaly scores: the coreset keeps rare patches, a single odd patch is found, good parts are scored
without their own patches, the blend learns to trust a score that separates, and the deployable network gives the
numbers the round stores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from modeling.anomaly import (
    BlendedClassifierNetwork,
    PatchAnomalyNetwork,
    PatchFeatureNetwork,
    anomaly_scores,
    blend_probabilities,
    build_memory_bank,
    compute_patch_features,
    fit_anomaly_blend,
    fit_patch_anomaly,
    greedy_coreset,
    score_good_parts,
)
from modeling.backbones import create_backbone
from modeling.onnx_export import export_onnx, open_session
from modeling.preprocessing import Preprocessing


def good_patch_features(n_images: int = 30, n_patches: int = 16, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_images, n_patches, dim)).astype(np.float32)


def test_coreset_keeps_the_one_far_patch_a_random_subsample_would_drop() -> None:
    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(size=(2000, 16)), np.full((1, 16), 25.0)]).astype(np.float32)
    chosen = greedy_coreset(points, size=20, seed=0)
    assert len(set(chosen.tolist())) == 20
    assert 2000 in chosen
    assert len(greedy_coreset(points[:10], size=20)) == 10  # fewer rows than asked: all of them


def test_one_odd_patch_makes_an_image_anomalous() -> None:
    goods = good_patch_features()
    bank = build_memory_bank(patch_features=goods, bank_size=200)
    new_goods = good_patch_features(n_images=10, seed=1)
    defect = good_patch_features(n_images=10, seed=2)
    defect[:, 3, :] += 6.0  # one patch of sixteen
    good_scores = anomaly_scores(patch_features=new_goods, memory_bank=bank)
    defect_scores = anomaly_scores(patch_features=defect, memory_bank=bank)
    assert defect_scores.min() > good_scores.max()


def test_good_parts_are_not_scored_against_their_own_patches() -> None:
    goods = good_patch_features()
    scored = score_good_parts(patch_features=goods, bank_size=10_000)  # the bank keeps every patch
    against_own = anomaly_scores(patch_features=goods, memory_bank=scored.memory_bank)
    assert np.allclose(against_own, 0.0, atol=1e-3)  # what an honest score must avoid
    new_goods = anomaly_scores(patch_features=good_patch_features(n_images=30, seed=3), memory_bank=scored.memory_bank)
    # Leave-one-out scores look like scores of unseen good parts, not like zeros.
    assert abs(np.median(scored.leave_one_out) - np.median(new_goods)) < 0.25 * np.median(new_goods)
    with pytest.raises(ValueError, match="at least 10"):
        score_good_parts(patch_features=goods[:5])


def test_a_good_part_is_not_scored_against_its_other_photos() -> None:
    goods = good_patch_features()
    twins = np.concatenate([goods, goods])  # every part photographed twice (identical exposures, the extreme case)
    groups = np.concatenate([np.arange(len(goods)), np.arange(len(goods))])
    alone = score_good_parts(patch_features=goods, bank_size=10_000)
    by_image = score_good_parts(patch_features=twins, bank_size=10_000)
    assert by_image.leave_one_out.max() < 0.01 * np.median(alone.leave_one_out)  # each photo finds its twin: a far too low threshold
    by_part = score_good_parts(patch_features=twins, bank_size=10_000, groups=groups)
    np.testing.assert_allclose(by_part.leave_one_out, np.concatenate([alone.leave_one_out, alone.leave_one_out]), rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match="one id per image"):
        score_good_parts(patch_features=twins, groups=groups[:-1])


def test_a_part_holding_the_whole_bank_falls_back_to_leaving_out_each_image() -> None:
    goods = good_patch_features(n_images=20)
    groups = np.array([0] * 19 + [1])  # one part dominates; a small bank may hold only its rows
    for bank_size in (8, 10_000):
        scored = score_good_parts(patch_features=goods, bank_size=bank_size, groups=groups)
        assert np.isfinite(scored.leave_one_out).all()
        # a full bank keeps the odd image's rows, so part 0 has something else to compare with
        assert scored.n_scored_by_image == 0 if bank_size == 10_000 else scored.n_scored_by_image in (0, 19)
    everything_one_part = score_good_parts(patch_features=goods, bank_size=10_000, groups=np.zeros(20))
    plain = score_good_parts(patch_features=goods, bank_size=10_000)
    np.testing.assert_allclose(everything_one_part.leave_one_out, plain.leave_one_out)
    assert everything_one_part.n_scored_by_image == 20 and plain.n_scored_by_image == 0


def test_blend_trusts_the_anomaly_score_when_the_classifier_is_blind() -> None:
    rng = np.random.default_rng(0)
    is_defect = np.r_[np.zeros(200, bool), np.ones(10, bool)]
    p_defect = rng.uniform(0.05, 0.95, size=210)  # no information
    anomaly = np.where(is_defect, rng.uniform(30, 40, size=210), rng.uniform(20, 26, size=210))
    blend = fit_anomaly_blend(p_defect=p_defect, anomaly_score=anomaly, is_defect=is_defect)
    assert blend.anomaly_weight > 5 * abs(blend.classifier_weight)
    probabilities = np.column_stack([1 - p_defect, p_defect * 0.25, p_defect * 0.75])
    blended = blend_probabilities(probabilities=probabilities, anomaly_score=anomaly, blend=blend, negative_index=0)
    np.testing.assert_allclose(blended.sum(axis=1), 1.0)
    np.testing.assert_allclose(blended[:, 2] / blended[:, 1], 3.0, rtol=1e-4)  # which defect stays the classifier's call
    assert roc_auc_score(is_defect, 1 - blended[:, 0]) == 1.0
    with pytest.raises(ValueError, match="labeled defects"):
        fit_anomaly_blend(p_defect=p_defect[:200], anomaly_score=anomaly[:200], is_defect=is_defect[:200])


def test_a_more_anomalous_part_never_gets_a_lower_p_defect() -> None:
    # QA: two of the first three defect labels were good parts, which score below the good parts' out-of-fold
    # scores: the fit gave the anomaly score a weight of -8.7, and the stored predictions turned every good part in
    # the bank (scoring ~0 against itself) into a defect
    rng = np.random.default_rng(0)
    is_defect = np.r_[np.zeros(117, bool), np.ones(3, bool)]
    p_defect = np.r_[rng.uniform(0.01, 0.2, 117), 0.3, 0.25, 0.6]
    anomaly = np.r_[rng.uniform(20, 26, 117), 14.0, 15.0, 27.0]
    blend = fit_anomaly_blend(p_defect=p_defect, anomaly_score=anomaly, is_defect=is_defect, regularization=100.0)
    assert blend.anomaly_weight >= 0 and blend.classifier_weight >= 0
    probabilities = np.column_stack([1 - p_defect, p_defect])
    in_the_bank = blend_probabilities(probabilities=probabilities[:117], anomaly_score=np.full(117, 1e-3), blend=blend, negative_index=0)
    out_of_fold = blend_probabilities(probabilities=probabilities[:117], anomaly_score=anomaly[:117], blend=blend, negative_index=0)
    assert np.all(in_the_bank[:, 1] <= out_of_fold[:, 1] + 1e-12)
    # both weights fitted negative: the classifier's P(defect) as it was
    both = fit_anomaly_blend(p_defect=np.r_[p_defect[:117], 1e-3, 2e-3, 1e-3], anomaly_score=np.r_[anomaly[:117], 1.0, 2.0, 1.5],
                             is_defect=is_defect, regularization=100.0)
    assert (both.classifier_weight, both.anomaly_weight, both.bias) == (1.0, 0.0, 0.0)


def write_parts(folder: Path, *, n_good: int, n_defect: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Brushed-metal-like good parts; a defect is the same surface with one short dark scratch."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for index in range(n_good + n_defect):
        base = 150 + rng.normal(0, 6, size=(96, 1)) + rng.normal(0, 3, size=(96, 96))
        image = Image.fromarray(np.clip(np.repeat(base[..., None], 3, axis=2), 0, 255).astype(np.uint8))
        is_defect = index >= n_good
        if is_defect:
            x, y = rng.integers(15, 70, size=2)
            ImageDraw.Draw(image).line([(int(x), int(y)), (int(x) + 14, int(y) + 10)], fill=(40, 40, 40), width=3)
        path = folder / f"{index:03d}.png"
        image.save(path)
        paths.append(str(path))
        labels.append(int(is_defect))
    return paths, np.array(labels)


@pytest.fixture(scope="module")
def pretrained():  # noqa: ANN201
    backbone = create_backbone("efficientnet_lite0")
    return backbone, Preprocessing(96, backbone.mean, backbone.std)


def test_real_backbone_patches_find_a_scratch_no_defect_label_needed(tmp_path: Path, pretrained) -> None:  # noqa: ANN001
    backbone, preprocessing = pretrained
    paths, labels = write_parts(tmp_path / "parts", n_good=24, n_defect=8)
    features = compute_patch_features(backbone=backbone, preprocessing=preprocessing, paths=paths, onnx_dir=tmp_path / "onnx", show_progress=False)
    assert features.shape[:2] == (32, 36) and features.dtype == np.float16  # 96 px -> a 6 x 6 grid
    train_goods, held_out = np.arange(16), np.arange(16, 32)
    bank = build_memory_bank(patch_features=features[train_goods], bank_size=400)
    scores = anomaly_scores(patch_features=features[held_out], memory_bank=bank)
    assert roc_auc_score(labels[held_out], scores) >= 0.95


@pytest.mark.parametrize("pooling", ["avg", "multilayer"])
def test_one_pass_gives_the_embeddings_and_patch_features_two_passes_give(tmp_path: Path, pooling: str) -> None:
    from modeling.anomaly import compute_embeddings_and_patch_features
    from modeling.embeddings import EmbeddingExtractor

    backbone = create_backbone("efficientnet_lite0", pooling=pooling)
    preprocessing = Preprocessing(96, backbone.mean, backbone.std)
    paths, _ = write_parts(tmp_path / "parts", n_good=30, n_defect=5, seed=2)
    embeddings = EmbeddingExtractor(backbone, preprocessing, onnx_dir=tmp_path / "onnx").embed(paths, show_progress=False)
    patches = compute_patch_features(backbone=backbone, preprocessing=preprocessing, paths=paths, onnx_dir=tmp_path / "onnx", show_progress=False)
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []
    compute_embeddings_and_patch_features(backbone=backbone, preprocessing=preprocessing, paths=paths, onnx_dir=tmp_path / "onnx",
                                          show_progress=False, keep=lambda start, vectors, rows: kept.append((start, vectors, rows)))
    assert [start for start, *_ in kept] == [0]
    _, vectors, rows = kept[0]
    assert vectors.shape == embeddings.shape and vectors.dtype == np.float32
    assert rows.shape == patches.shape and rows.dtype == np.float16
    np.testing.assert_allclose(vectors, embeddings, atol=1e-5)
    np.testing.assert_allclose(rows.astype(np.float32), patches.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_deployed_network_gives_the_stored_blended_probabilities(tmp_path: Path, pretrained) -> None:  # noqa: ANN001
    backbone, preprocessing = pretrained
    paths, labels = write_parts(tmp_path / "parts", n_good=20, n_defect=6, seed=1)
    features = compute_patch_features(backbone=backbone, preprocessing=preprocessing, paths=paths, onnx_dir=tmp_path / "onnx", show_progress=False)
    classifier_p_defect = np.where(labels == 1, 0.6, 0.3)
    fitted = fit_patch_anomaly(patch_features=features, is_defect=labels == 1, p_defect_out_of_fold=classifier_p_defect, bank_size=300)

    class FixedClassifier(torch.nn.Module):  # a stand-in head: the same probabilities for every image
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(images[:, :1, 0, 0]) * torch.tensor([0.7, 0.2, 0.1])  # traced with a dynamic batch

    network = BlendedClassifierNetwork(
        FixedClassifier(), PatchAnomalyNetwork(PatchFeatureNetwork(backbone.model, image_size=96), fitted.memory_bank), fitted.blend,
        negative_index=0, n_classes=3,
    )
    onnx_path = export_onnx(network, tmp_path / "blended.onnx", image_size=96, output_name="probabilities")
    from modeling.preprocessing import load_image_array

    images = np.stack([load_image_array(path, preprocessing) for path in paths[-8:]])
    deployed = open_session(onnx_path).run(None, {"images": images})[0]
    expected = blend_probabilities(probabilities=np.tile([0.7, 0.2, 0.1], (8, 1)), anomaly_score=fitted.scores(features[-8:]), blend=fitted.blend, negative_index=0)
    np.testing.assert_allclose(deployed, expected, atol=5e-3)  # float16 cache vs float32 graph
    # The head says P(good) = 0.7 for every image: only the anomaly score can put the 6 scratched parts below the 2 good ones.
    assert deployed[2:, 0].max() < deployed[:2, 0].min()


@pytest.mark.parametrize("image_size", [96, 100, 200])
def test_patch_features_export_at_any_image_size(tmp_path: Path, pretrained, image_size: int) -> None:  # noqa: ANN001
    # 100 and 200 px are not multiples of 16: the stride-8 map (13, 25) does not divide the patch grid (7, 13), and
    # the adaptive pooling used before could not be exported to ONNX at all (the anomaly step crashed).
    backbone, _ = pretrained
    network = PatchFeatureNetwork(backbone.model, image_size=image_size)
    images = torch.from_numpy(np.random.default_rng(image_size).normal(size=(3, 3, image_size, image_size)).astype(np.float32))
    with torch.no_grad():
        in_torch = network(images).numpy()
    grid = -(-image_size // 16)
    assert in_torch.shape == (3, grid * grid, 40 + 112)  # efficientnet_lite0 stages 2 and 4
    onnx_path = export_onnx(network, tmp_path / "patches.onnx", image_size=image_size, output_name="patches")
    np.testing.assert_allclose(open_session(onnx_path).run(None, {"images": images.numpy()})[0], in_torch, atol=1e-4)
    if image_size % 16 == 0:  # where the grid divides the map, the fixed-kernel pooling is the adaptive one it replaced
        x = backbone.model.bn1(backbone.model.conv_stem(images))
        maps = []
        with torch.no_grad():
            for index, block in enumerate(backbone.model.blocks[:5]):
                x = block(x)
                if index in (2, 4):
                    maps.append(torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1), grid))
        np.testing.assert_allclose(in_torch, torch.cat(maps, dim=1).flatten(2).transpose(1, 2).numpy(), atol=1e-6)


def test_sizing_the_patch_grid_leaves_a_training_model_untouched() -> None:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    PatchFeatureNetwork(model, image_size=200)  # a dry forward pass to size the grid, in train mode, would move them
    assert model.training
    moved = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])]
    assert not moved, moved[:3]


def test_the_coreset_and_the_head_fit_run_on_one_thread_and_give_the_threads_back(monkeypatch) -> None:  # noqa: ANN001
    # with another process busy on the second core, two threads made these chains of small operations 3x slower
    import torch

    from modeling import anomaly, training

    seen: list[int] = []
    argmax = torch.argmax
    monkeypatch.setattr(anomaly.torch, "argmax", lambda *args, **kwargs: seen.append(torch.get_num_threads()) or argmax(*args, **kwargs))
    step = torch.optim.LBFGS.step
    monkeypatch.setattr(torch.optim.LBFGS, "step", lambda self, closure: seen.append(-torch.get_num_threads()) or step(self, closure))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(0)
        anomaly.greedy_coreset(rng.normal(size=(300, 16)).astype(np.float32), size=20)
        training.fit_linear_head(features=rng.normal(size=(40, 8)), labels=np.arange(40) % 2, n_classes=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert set(seen) == {1, -1} and seen.count(-1) == 1


@pytest.mark.parametrize(("n_images", "bank_size"), [(30, 250), (30, 10_000), (12, 299)])
def test_the_fit_ticks_every_bank_pick_and_every_good_part_for_its_progress_bar(n_images: int, bank_size: int) -> None:
    # QA: the anomaly step ran 1-2 minutes without a word (8000 images); the bar counts what the step does
    ticked = []
    goods = good_patch_features(n_images=n_images)
    defects = good_patch_features(n_images=5, seed=2) + 3.0
    fit_patch_anomaly(patch_features=np.concatenate([goods, defects]), is_defect=np.arange(n_images + 5) >= n_images,
                      p_defect_out_of_fold=np.where(np.arange(n_images + 5) >= n_images, 0.8, 0.1), bank_size=bank_size, tick=ticked.append)
    assert sum(ticked) == min(bank_size, n_images * 16) + n_images
