"""Model checkpoints for domain transfer: save, find in a project directory, load backbone (+ head when classes match)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from modeling.backbones import create_backbone
from modeling.preprocessing import Preprocessing
from modeling.training import LinearHeadClassifier
from modeling.transfer import find_model_checkpoint, load_init_checkpoint, save_model_checkpoint


@pytest.fixture(scope="module")
def classifier():
    backbone = create_backbone("efficientnet_lite0")
    with torch.no_grad():  # a "fine-tuned" backbone: differs from ImageNet, so a reload must carry it
        backbone.model.conv_head.weight.mul_(1.01)
    weight = np.arange(3 * backbone.num_features, dtype=np.float32).reshape(3, -1) / 1000
    bias = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    return LinearHeadClassifier(["scratch", "inclusion", "patches"], weight, bias, backbone)


def test_checkpoint_is_a_backbone_weights_file_and_carries_the_head(classifier, tmp_path):
    path = save_model_checkpoint(classifier, tmp_path / "models" / "round-1" / "model.pt", image_size=224)
    init = load_init_checkpoint(path, class_names=["patches", "scratch"])
    assert init.backbone_weights_path == path and init.backbone_name == "efficientnet_lite0"
    reloaded = create_backbone(init.backbone_name, weights=str(init.backbone_weights_path))
    for name, tensor in classifier.backbone.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[name], tensor), name
    assert reloaded.mean == classifier.backbone.mean and reloaded.std == classifier.backbone.std
    # Head rows follow the new project's class order.
    np.testing.assert_array_equal(init.head_weight, classifier.weight[[2, 0]])
    np.testing.assert_array_equal(init.head_bias, classifier.bias[[2, 0]])
    assert set(init.training_options()) == {"init_head_weight", "init_head_bias"}


def test_new_classes_get_the_backbone_only(classifier, tmp_path):
    path = save_model_checkpoint(classifier, tmp_path / "model.pt")
    init = load_init_checkpoint(path, class_names=["good", "broken_large"])
    assert init.head_weight is None and init.head_bias is None and init.training_options() == {}
    assert "not in the source model" in init.head_reason


def test_a_good_class_named_otherwise_takes_the_source_good_class_row(classifier, tmp_path):
    # QA: a project whose good class is "free" could not take the head of one whose good class is "good" (or back)
    classifier = LinearHeadClassifier(["good", "scratch", "spot"], classifier.weight, classifier.bias, classifier.backbone)  # the fixture's, renamed
    path = save_model_checkpoint(classifier, tmp_path / "model.pt", negative_class="good")
    init = load_init_checkpoint(path, class_names=["spot", "free", "scratch"], negative_class="free")
    np.testing.assert_array_equal(init.head_weight, classifier.weight[[2, 0, 1]])
    assert "the good class 'free' takes the source's good class 'good'" in init.head_reason
    # a defect class of the new project is never mapped to the source's good class
    assert load_init_checkpoint(path, class_names=["free", "dent"], negative_class="free").head_weight is None
    # a checkpoint that does not record its good class: refused, and the reason says why
    older = save_model_checkpoint(classifier, tmp_path / "older.pt")
    refused = load_init_checkpoint(older, class_names=["free", "scratch", "spot"], negative_class="free")
    assert refused.head_weight is None and "the source checkpoint does not record its good class" in refused.head_reason


def test_a_project_directory_resolves_to_its_newest_checkpoint(classifier, tmp_path):
    older = save_model_checkpoint(classifier, tmp_path / "project" / "models" / "1" / "model.pt")
    (tmp_path / "project" / "notes.pt").write_bytes(b"not a checkpoint")
    newer = save_model_checkpoint(classifier, tmp_path / "project" / "models" / "2" / "model.pt")
    import os

    os.utime(older, (1, 1))
    assert find_model_checkpoint(tmp_path / "project") == newer


def test_a_head_on_other_pooled_features_is_not_transferred_and_the_reason_says_so(classifier, tmp_path):
    path = save_model_checkpoint(classifier, tmp_path / "model.pt")  # the fixture's backbone pools "avg"
    init = load_init_checkpoint(path, class_names=["patches", "scratch"], pooling="multilayer")
    assert init.head_weight is None and "reads 'avg' pooled features and this project's network 'multilayer'" in init.head_reason
    assert load_init_checkpoint(path, class_names=["patches", "scratch"], pooling="avg").head_weight is not None


def test_a_checkpoint_lacking_what_a_start_needs_is_refused_with_what_is_missing(classifier, tmp_path):
    path = save_model_checkpoint(classifier, tmp_path / "model.pt")
    checkpoint = torch.load(path, weights_only=True)
    without_classes = {key: value for key, value in checkpoint.items() if key != "class_names"}
    torch.save(without_classes, tmp_path / "no-classes.pt")
    with pytest.raises(ValueError, match="it has no class_names"):
        load_init_checkpoint(tmp_path / "no-classes.pt", class_names=["scratch"])
    torch.save({**checkpoint, "class_names": ["a", "b", "c", "d"]}, tmp_path / "short-head.pt")
    with pytest.raises(ValueError, match="one row per class"):
        load_init_checkpoint(tmp_path / "short-head.pt", class_names=["a"])


def test_missing_or_foreign_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_init_checkpoint(tmp_path / "nowhere", class_names=["a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no defect-loop model checkpoint"):
        load_init_checkpoint(tmp_path / "empty", class_names=["a"])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=r"not a defect-loop model checkpoint \(format [^)]*\)$"):
        load_init_checkpoint(foreign, class_names=["a"])
    truncated = tmp_path / "truncated.pt"  # QA: told the same as a foreign file; a copy cut short is a copy to make again
    truncated.write_bytes(foreign.read_bytes()[: len(foreign.read_bytes()) // 2])
    with pytest.raises(ValueError, match="a torch file that cannot be read, truncated or damaged .*copy it again"):
        load_init_checkpoint(truncated, class_names=["a"])


@pytest.mark.parametrize("pooling", ["avg", "multilayer"])
def test_a_finetuned_classifier_round_trips_too(tmp_path, pooling):
    from pathlib import Path

    from PIL import Image

    from modeling.finetune import train_finetuned, FinetuneConfig
    from modeling.training import TrainingData

    backbone = create_backbone("efficientnet_lite0", pooling=pooling)
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for index in range(12):
        image = (rng.random((48, 48)) * (60 if index % 2 else 255)).astype(np.uint8)
        path = Path(tmp_path) / f"{index}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
        labels.append(index % 2)
    empty = np.zeros((0, backbone.num_features), dtype=np.float32)
    data = TrainingData(["dark", "bright"], paths[:8], np.array(labels[:8]), empty, paths[8:], np.array(labels[8:]), empty,
                        backbone, Preprocessing(48, backbone.mean, backbone.std), options={"threads": 1})
    tuned = train_finetuned(data, FinetuneConfig(epochs=1, threads=1, trainable_stages=1), strategy="finetune")
    path = save_model_checkpoint(tuned, tmp_path / "tuned.pt")
    init = load_init_checkpoint(path, class_names=["bright", "dark"])
    np.testing.assert_array_equal(init.head_weight, tuned.head_weight[[1, 0]])
    reloaded = create_backbone("efficientnet_lite0", weights=str(path))
    assert torch.equal(reloaded.model.state_dict()["blocks.6.0.conv_pw.weight"], tuned.backbone.model.state_dict()["blocks.6.0.conv_pw.weight"])
    # The head's rows are on the network's own pooled features (3968-d multi-layer or 1280-d average), and a new
    # project pooling the same way starts from that head.
    assert torch.load(path, weights_only=True)["head_features"] == pooling
    # (the out-of-fold networks replay a deployed network that started from the transferred head)
    transferred = {"init_head_weight": init.head_weight[[1, 0]], "init_head_bias": init.head_bias[[1, 0]], "threads": 1, "head_start": "transferred"}
    again = train_finetuned(dataclasses.replace(data, options=transferred),
                            FinetuneConfig(epochs=0, threads=1, trainable_stages=1), strategy="finetune")
    assert again.config["head_transferred"] and again.config["head_transfer_fits"]
    np.testing.assert_allclose(again.head_weight, init.head_weight[[1, 0]], rtol=1e-6)


def test_a_transferred_head_starts_fine_tuning_only_if_it_classifies_this_projects_validation_labels_better_than_the_probe(tmp_path):
    # it never saw this project's labels: kept on a tie (its lower validation loss broke it) it stayed the deployed
    # model round after round, with 5 of 60 of the project's own labels wrong
    from pathlib import Path

    from PIL import Image

    from modeling.finetune import FinetuneConfig, train_finetuned
    from modeling.training import TrainingData

    backbone = create_backbone("efficientnet_lite0")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for index in range(12):
        path = Path(tmp_path) / f"{index}.png"
        Image.fromarray((rng.random((48, 48)) * (60 if index % 2 else 255)).astype(np.uint8)).save(path)
        paths.append(str(path))
        labels.append(index % 2)
    empty = np.zeros((0, backbone.num_features), dtype=np.float32)
    data = TrainingData(["dark", "bright"], paths[:8], np.array(labels[:8]), empty, paths[8:], np.array(labels[8:]), empty,
                        backbone, Preprocessing(48, backbone.mean, backbone.std), options={"threads": 1})
    config = FinetuneConfig(epochs=0, threads=1, trainable_stages=1)
    probe = train_finetuned(data, config, strategy="finetune")
    assert probe.config["head_start"] == "probe" and "head_weighed" not in probe.config

    def started_from(weight, bias, **extra):  # noqa: ANN001, ANN202
        return train_finetuned(dataclasses.replace(data, options={"init_head_weight": weight, "init_head_bias": bias, "threads": 1, **extra}),
                               config, strategy="finetune")

    # as good as the probe (it is the probe's own head): the probe, fitted on this project's labels, starts
    tie = started_from(probe.head_weight, probe.head_bias)
    assert tie.config["head_start"] == "probe" and not tie.config["head_transferred"]
    assert tie.config["head_weighed"]["transferred_val_macro_f1"] == tie.config["head_weighed"]["probe_val_macro_f1"]
    # worse (its rows swapped: dark read as bright): the probe starts
    wrong = started_from(probe.head_weight[[1, 0]], probe.head_bias[[1, 0]])
    assert wrong.config["head_start"] == "probe" and wrong.config["head_weighed"]["transferred_val_macro_f1"] < 0.5
    np.testing.assert_allclose(wrong.head_weight, probe.head_weight, rtol=1e-5, atol=1e-6)
    # better on validation than the probe: the transferred head starts (a probe regularised to nothing says one class)
    weak = FinetuneConfig(epochs=0, threads=1, trainable_stages=1, head_regularization=1e-9)
    better = train_finetuned(dataclasses.replace(data, options={"init_head_weight": probe.head_weight, "init_head_bias": probe.head_bias,
                                                                "threads": 1}), weak, strategy="finetune")
    assert better.config["head_start"] == "transferred" and better.config["head_transferred"]
    assert better.config["head_weighed"]["transferred_val_macro_f1"] > better.config["head_weighed"]["probe_val_macro_f1"]


def test_a_full_disk_while_saving_names_the_checkpoint_and_leaves_neither_half_file(classifier, tmp_path, monkeypatch):
    # torch.save straight to a full disk raised RuntimeError("... unexpected pos ...") naming neither the disk nor the file
    import errno
    import os

    path = tmp_path / "round-002" / "model.pt"
    save_model_checkpoint(classifier, path)
    before = path.read_bytes()

    def full(_descriptor):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device while writing the model checkpoint .*model\.pt") as raised:
        save_model_checkpoint(classifier, path)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_init_from_a_project_points_to_a_round_that_really_fine_tuned_its_backbone(tmp_path):
    # a finetune round that kept epoch 0 (the frozen backbone) was recommended as "fine-tuned": its backbone tensors
    # were the pretrained ones, bit for bit
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.init_source import resolve_init_source
    from loop.project import open_project
    from store.db import session_scope
    from store.models import Project, Round

    source = tmp_path / "metal"
    assert CliRunner().invoke(app, ["init", str(source), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    rounds = {1: ("finetune", 3), 2: ("finetune", 0), 3: ("head", None)}
    with session_scope(open_project(source).engine) as session:
        project_id = session.query(Project.id).scalar()
        for number, (strategy, best_epoch) in rounds.items():
            (source / "artifacts" / f"round-{number:03d}").mkdir(parents=True)
            (source / "artifacts" / f"round-{number:03d}" / "model.pt").write_bytes(b"x")
            session.add(Round(project_id=project_id, number=number, status="completed",
                              details={"training": {"strategy": strategy, "best_epoch": best_epoch}}))
    told = resolve_init_source(source).description
    assert told.startswith("round 3 (head)") and "round 1 (finetune) fine-tuned one" in told and "round 2" not in told
    with session_scope(open_project(source).engine) as session:  # the newest is the finetune round that kept epoch 0
        session.query(Round).filter(Round.number == 3).delete()
    told = resolve_init_source(source).description
    assert "round 2 (finetune)" in told and "kept epoch 0, the frozen backbone" in told and "round 1 (finetune) fine-tuned one" in told
    assert "its newest completed round" in told and "checkpoint file" not in told
    (source / "artifacts" / "round-002" / "model.pt").unlink()  # QA: the round used was still called the newest completed one
    told = resolve_init_source(source).description
    assert told.startswith("round 1 (finetune)") and "its newest completed round with a checkpoint file (round 2 has none here)" in told
    with session_scope(open_project(source).engine) as session:  # no round fine-tuned at all (QA: nothing said so)
        session.query(Round).filter(Round.number == 1).update({"details": {"training": {"strategy": "finetune", "best_epoch": 0}}})
    told = resolve_init_source(source).description
    assert "no round of that project fine-tuned its backbone (its fine-tuning kept epoch 0, the frozen backbone)" in told
    assert "starts from the pretrained backbone" in told


def test_a_round_refuses_a_backbone_in_loop_toml_other_than_the_one_its_init_checkpoint_holds(classifier, tmp_path):
    # loop init refuses --backbone against --init-from; loop.toml edited since was ignored: the round ran the
    # checkpoint's backbone and said nothing
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.config import load_config, save_config
    from loop.project import open_project
    from store.db import session_scope
    from store.models import Round

    checkpoint = save_model_checkpoint(classifier, tmp_path / "metal" / "model.pt", image_size=224)
    new_line = tmp_path / "new-line"
    assert CliRunner().invoke(app, ["init", str(new_line), "--classes", "patches,scratch", "--negative-class", "patches",
                                    "--init-from", str(checkpoint)]).exit_code == 0
    for field, value in (("backbone", "resnet18"), ("weights", "none")):
        config = load_config(new_line)
        setattr(config.model, field, value)
        save_config(new_line, config)
        refused = CliRunner().invoke(app, ["round", "--project", str(new_line)])
        said = " ".join(refused.output.split())
        assert refused.exit_code != 0 and "holds 'efficientnet_lite0'" in said and f"{field} = {value!r}" in said, said
        config.model.backbone, config.model.weights = "efficientnet_lite0", "default"
        save_config(new_line, config)
    with session_scope(open_project(new_line).engine) as session:
        assert session.query(Round).count() == 0  # refused before it started


def test_a_copied_project_starts_from_and_shows_only_its_own_round_files(tmp_path):
    # QA: a copy (or a moved project) whose model.pt was gone gave `loop init --init-from` the file at the path its store
    # recorded, in the folder it was copied from, which held another project's rounds by then; `loop status --json`
    # named the old folder's files too
    import json
    import shutil

    from typer.testing import CliRunner

    from loop.cli import app
    from loop.init_source import resolve_init_source
    from loop.project import open_project
    from store.db import session_scope
    from store.models import Project, Round

    original = tmp_path / "metal"
    assert CliRunner().invoke(app, ["init", str(original), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    with session_scope(open_project(original).engine) as session:
        project_id = session.query(Project.id).scalar()
        for number in (1, 2):
            folder = original / "artifacts" / f"round-{number:03d}"
            folder.mkdir(parents=True)
            (folder / "model.pt").write_bytes(b"x")
            session.add(Round(project_id=project_id, number=number, status="completed", details={"training": {"strategy": "head"}},
                              artifacts={"model_checkpoint": str(folder / "model.pt")}))
    copy = tmp_path / "metal-copy"
    shutil.copytree(original, copy)
    (copy / "artifacts" / "round-002" / "model.pt").unlink()
    source = resolve_init_source(copy)
    assert source.checkpoint == copy / "artifacts" / "round-001" / "model.pt"
    assert "round 1" in source.description and "round 2 has none here" in source.description
    shutil.rmtree(copy / "artifacts")
    with pytest.raises(FileNotFoundError, match=r"has 2 completed rounds that made a model, and none of those checkpoints is in .*metal-copy/artifacts any more"):
        resolve_init_source(copy)  # QA: it said "run a round there first" to a project of rounds whose files were deleted
    status = json.loads(CliRunner().invoke(app, ["status", "--project", str(copy), "--json"]).output)
    assert status["project"]["project_dir"] == str(copy) and status["project"]["root_dir"] == str(original)
    assert [r["artifacts"]["model_checkpoint"] for r in status["rounds"]] == [
        str(copy / "artifacts" / f"round-{n:03d}" / "model.pt") for n in (1, 2)]  # where they belong here (deleted), not the original's


def test_init_from_a_project_of_cold_starts_only_says_it_has_no_model_yet(tmp_path):
    # review: a project whose only completed round was a cold start (no model written) was told its checkpoints were
    # "deleted by hand, or the project moved"
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.init_source import resolve_init_source
    from loop.project import open_project
    from store.db import session_scope
    from store.models import Project, Round

    source = tmp_path / "cold"
    assert CliRunner().invoke(app, ["init", str(source), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    with session_scope(open_project(source).engine) as session:
        session.add(Round(project_id=session.query(Project.id).scalar(), number=1, status="completed", details={"cold_start": {"reason": "x"}},
                          artifacts={}))
    with pytest.raises(FileNotFoundError, match="has no completed round with a model checkpoint: run a round there first"):
        resolve_init_source(source)


def test_init_from_a_project_whose_newest_model_collapsed_says_so_and_names_one_that_did_not(tmp_path):
    # QA: --init-from took a round whose model gave every image one class (macro F1 gate 0) without a word
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.init_source import resolve_init_source
    from loop.project import open_project
    from store.db import session_scope
    from store.models import Project, Round

    source = tmp_path / "tiles"
    assert CliRunner().invoke(app, ["init", str(source), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    with session_scope(open_project(source).engine) as session:
        project_id = session.query(Project.id).scalar()
        for number, collapsed in ((1, False), (2, False), (3, True)):
            (source / "artifacts" / f"round-{number:03d}").mkdir(parents=True)
            (source / "artifacts" / f"round-{number:03d}" / "model.pt").write_bytes(b"x")
            session.add(Round(project_id=project_id, number=number, status="completed", details={
                "training": {"strategy": "finetune", "best_epoch": 2}, "collapse_check": {"test_split": collapsed, "every_image_predicted_as": None}}))
    told = resolve_init_source(source).description
    assert told.startswith("round 3 (finetune)") and "that round's model collapsed (one class for every image)" in told
    assert f"round 2 is the newest that did not, --init-from {source / 'artifacts' / 'round-002' / 'model.pt'} starts from it" in told
    with session_scope(open_project(source).engine) as session:  # review: the only fine-tuned round collapsed, the newest is a head round
        session.query(Round).filter(Round.number == 2).update({"details": {"training": {"strategy": "head"}}})
        session.query(Round).filter(Round.number == 1).update({"details": {"training": {"strategy": "finetune", "best_epoch": 2},
                                                                           "collapse_check": {"test_split": True}}})
        session.query(Round).filter(Round.number == 3).delete()
    told = resolve_init_source(source).description
    assert "the rounds that fine-tuned one (round 1) have a collapsed model" in told and "no round of that project fine-tuned" not in told
    with session_scope(open_project(source).engine) as session:
        session.query(Round).filter(Round.number == 2).delete()
    assert "no round of that project kept a model that did not" in resolve_init_source(source).description
