"""The transfer benchmarks check every argument before any dataset is read or model built: a bad one exits with
status 2 and one `error: ...` line naming it (before, `--datasets bogus` was a KeyError traceback and
`--strategy bogus` failed after 39 s of loading and embedding). Nothing here reads a dataset or builds a model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import transfer_common  # noqa: E402
import transfer_cv  # noqa: E402
import transfer_experiments  # noqa: E402


@pytest.fixture(autouse=True)
def no_datasets_no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("argument checking read a dataset or built a model")

    for name in list(transfer_common.DATASET_LOADERS):
        monkeypatch.setitem(transfer_common.DATASET_LOADERS, name, refuse)
    for module in (transfer_common, transfer_experiments):
        for attribute in ("create_backbone", "pretrained_backbone", "load_neu", "load_mvtec_bottle"):
            if hasattr(module, attribute):
                monkeypatch.setattr(module, attribute, refuse)
    monkeypatch.setattr(transfer_common, "load_folder_dataset", refuse)
    monkeypatch.setattr(transfer_common, "require_datasets", refuse)


def error_line(parse, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(argv)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "error: " in lines[-1], lines
    return lines[-1]


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--datasets", "bogus"], "'bogus'"),
        (["--datasets", "neu,neu"], "neu,neu"),
        (["--set", "epochs"], "'epochs'"),
        (["--set", "=3"], "'=3'"),
        (["--strategy", "bogus"], "'bogus'"),
        (["--set", "epoch=3"], "epoch"),
        (["--set", "epochs=-1"], "epochs=-1"),
        (["--set", "epochs=2.7"], "epochs=2.7"),
        (["--set", "epochs=true"], "epochs=true"),
        (["--set", "trainable_stages=99"], "trainable_stages=99"),
        (["--set", "head_lr=0"], "head_lr=0"),
        (["--set", "image_size=8"], "image_size=8"),
        (["--set", 'mode="sideways"'], "mode"),
        (["--folds", "5"], "'5'"),
        (["--folds", "-1"], "'-1'"),
        (["--folds", "1.5"], "'1.5'"),
        (["--folds", "0,0"], "'0,0'"),
        (["--seeds", "-1"], "'-1'"),
        (["--seeds", "a"], "'a'"),
        (["--fold-seed", "-3"], "-3"),
        (["--set-for", "nosuch:epochs=2"], "'nosuch:epochs=2'"),
        (["--set-for", "epochs=2"], "'epochs=2'"),
        (["--set-for", "neu:epochs"], "'neu:epochs'"),
        (["--set-for", "neu:epochs=-2"], "neu:epochs=-2"),
        (["--datasets", "neu", "--set-for", "mvtec_bottle:epochs=2"], "'mvtec_bottle:epochs=2'"),  # would be ignored
        (["--backbone", "nosuchnet"], "'nosuchnet'"),
        (["--tta", "bogus"], "'bogus'"),
        (["--threshold-confidence", "2"], "--threshold-confidence 2"),
        (["--pooling", "max"], "'max'"),
    ],
)
def test_transfer_cv_refuses_a_bad_argument_up_front(arguments: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(transfer_cv.parse_args, ["--out", str(tmp_path / "out"), *arguments], capsys)
    assert named in line, line


def test_transfer_cv_refuses_an_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert "is a file" in error_line(transfer_cv.parse_args, ["--out", str(tmp_path / "file")], capsys)


def test_transfer_cv_valid_arguments_pass_and_resolve_the_options(tmp_path: Path) -> None:
    args = transfer_cv.parse_args([
        "--out", str(tmp_path / "out"), "--datasets", "neu,mvtec_fewshot", "--strategy", "finetune", "--folds", "1", "--seeds", "0,3",
        "--set", "epochs=4", "--set", 'tta="flips"', "--set-for", "mvtec_fewshot:image_size=384", "--set-for", "neu:trainable_stages=3",
        "--tta", "flips", "--backbone", "efficientnet_lite0", "--threshold-confidence", "0.9", "--anomaly", "patch",
    ])
    assert not (tmp_path / "out").exists()  # parsing creates nothing
    assert args.datasets == ["neu", "mvtec_fewshot"] and args.folds == [1] and args.seeds == [0, 3]  # --folds picks fold indices
    assert args.tta_views == ("identity", "hflip", "vflip", "rot180")
    assert args.options_by_dataset["neu"] == ({"threads": 2, "epochs": 4, "tta": "flips", "trainable_stages": 3}, 224)
    assert args.options_by_dataset["mvtec_fewshot"] == ({"threads": 2, "epochs": 4, "tta": "flips"}, 384)


def test_transfer_cv_quick_keeps_one_fold_and_seed_and_three_epochs_unless_set(tmp_path: Path) -> None:
    args = transfer_cv.parse_args(["--out", str(tmp_path), "--quick", "--folds", "2,3", "--set-for", "mvtec_bottle:epochs=5"])
    assert args.folds == [2] and args.seeds == [0]
    assert args.options_by_dataset["neu"][0]["epochs"] == 3 and args.options_by_dataset["mvtec_bottle"][0]["epochs"] == 5


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--epochs", "2.7"], "'2.7'"),
        (["--scratch-size", "8"], "--scratch-size 8"),
        (["--scratch-epochs", "0"], "--scratch-epochs 0"),
        (["--augment-epochs", "-1"], "--augment-epochs -1"),
        (["--quick", "--epochs", "3"], "--epochs"),
        (["--quick", "--scratch-size", "64"], "--scratch-size"),
    ],
)
def test_transfer_experiments_refuses_a_bad_argument_up_front(arguments: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(transfer_experiments.parse_args, ["--out", str(tmp_path / "out"), *arguments], capsys)
    assert named in line, line


def test_transfer_experiments_quick_is_described_as_what_it_runs(tmp_path: Path) -> None:
    args = transfer_experiments.parse_args(["--out", str(tmp_path), "--quick"])
    assert (args.epochs, args.scratch_size, args.scratch_epochs) == (2, 48, 2)
    assert transfer_experiments.QUICK_FRACTION == 0.25
    help_text = " ".join(transfer_experiments.build_parser().format_help().split())
    assert "450 of its 1800 images" in help_text and "145 of its 292, 320 px" in help_text and "at most 2 epochs" in help_text
    # the counts the help gives are what subsample keeps of NEU (6 classes x 300) and MVTec bottle (229 good, 63 defect)
    import numpy as np

    def kept(counts: list[int], fraction: float) -> int:
        labels = np.repeat(np.arange(len(counts)), counts)
        fake = transfer_common.Dataset("fake", [str(c) for c in range(len(counts))], [str(i) for i in range(len(labels))], labels, None,
                                       np.arange(len(labels)).astype(str))
        return len(transfer_experiments.subsample(fake, fraction).paths)

    assert kept([300] * 6, transfer_experiments.QUICK_FRACTION) == 450
    assert kept([229, 63], max(transfer_experiments.QUICK_FRACTION, 0.5)) == 145
    args = transfer_experiments.parse_args(["--out", str(tmp_path), "--epochs", "3"])
    assert (args.epochs, args.scratch_size, args.scratch_epochs) == (3, 96, 8)


def test_a_subsampled_or_partial_run_says_so_in_its_report(tmp_path: Path) -> None:
    # --quick's reports read as the figures: "5-fold" over one fold, NEU's full-set counts beside a 25% subsample,
    # and a threshold of 6.1e-06 printed as 0.0000
    row = {"fold": 0, "n_test": 59, "errors": 1, "accuracy": 0.98, "macro_f1": 0.97, "roc_auc": 0.99, "defect_recall": 1.0, "fpr": 0.02,
           "threshold": 6.1e-06, "temperature": 1.0, "best_epoch": 0, "train_seconds": 3.0}
    pooled = {"n_images": 59, "errors": 1, "accuracy": 0.98, "per_class_f1": {"good": 0.98, "defect": 0.97}, "confusion_matrix": [[45, 1], [0, 13]]}
    transfer_cv.write_report(tmp_path, {"mvtec_bottle": {"strategy": "head", "image_size": 224, "folds": [row], "pooled": pooled}}, "cmd")
    report = (tmp_path / "transfer_cv.md").read_text()
    assert "folds 0 of a 5-fold stratified cross-validation (NOT the full 5-fold figure)" in report and "6.1e-06" in report

    results = {"command": "cmd", "neu_split": {"train": 270, "validation": 60, "test": 90, "subsampled": 0.25},
               "mvtec_split": {"train": 90, "validation": 20, "test": 36, "test_defects": 8, "note": "all 292 images pooled", "subsampled": 0.5},
               "T1": [], "T2": [], "T3": [], "baselines_neu": [], "baselines_mvtec": [], "T4": {"head_transfer": "new", "metal": [], "bottle": []}}
    transfer_experiments.write_markdown(tmp_path, results)
    assert ("A smoke run, not the figures: subsampled to NEU 25% of its images (per class) and MVTec bottle 50% of its images (per class)"
            in (tmp_path / "transfer_experiments.md").read_text())
    results["neu_split"]["subsampled"] = results["mvtec_split"]["subsampled"] = 1.0
    transfer_experiments.write_markdown(tmp_path, results)
    assert "smoke run" not in (tmp_path / "transfer_experiments.md").read_text()
