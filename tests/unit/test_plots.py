"""What the training curves show: the figure early stopping reads, and what the train figures are."""
from __future__ import annotations

from pathlib import Path

import pytest

from modeling import plots


def test_training_curves_draw_the_validation_macro_f1_that_chooses_the_kept_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QA: the kept epoch was marked, the metric that chose it was not drawn; train accuracy seemed to "drop" after
    # epoch 0 (measured without augmentation) and nothing said why
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "train_accuracy": 0.9 - 0.1 * (e == 1), "val_loss": 0.5, "val_accuracy": 0.8,
                "val_macro_f1": 0.6 + 0.1 * e, "seconds": 1.0} for e in range(3)]
    path = plots.plot_training_curves({"finetune": history}, tmp_path / "curves.png", "round 1", best_epochs={"finetune": 2})
    assert path.is_file() and path.stat().st_size > 0
    (figure,) = figures
    loss_axis, accuracy_axis = figure.axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in accuracy_axis.get_lines()}
    assert drawn["validation macro F1 (chooses the kept epoch)"] == pytest.approx([0.6, 0.7, 0.8])
    assert "validation macro F1 (chooses the kept epoch)" not in {line.get_label() for line in loss_axis.get_lines()}
    assert any("without augmentation" in text.get_text() for text in figure.texts)


def test_series_with_equal_values_keep_every_marker_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # review: two compared projects with the same values on a round showed only the last drawn's marker
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    same = ([40, 60, 80], [0.5, 0.7, 0.9])
    plots.plot_gate_panels(panels={"macro_f1": {"a": same, "b": same, "c": same}}, thresholds={"macro_f1": 0.7},
                           path=tmp_path / "gates.png", title="t")
    (figure,) = figures
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    drawn = [lines[name] for name in ("a", "b", "c")]
    assert len({line.get_marker() for line in drawn}) == 3
    sizes = [line.get_markersize() for line in drawn]
    # each later series is drawn smaller, and every one but the last hollow, so an earlier one shows around it
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    assert [line.get_fillstyle() for line in drawn] == ["none", "none", "full"]


def test_a_plot_that_cannot_be_written_whole_leaves_no_file(tmp_path, monkeypatch):  # noqa: ANN001
    # QA: a round failing on a full disk left a 0-byte gates_over_rounds.png beside the next round's plots
    import errno

    from matplotlib.figure import Figure

    from modeling import plots

    def half_then_full(self, target, **_kwargs):  # noqa: ANN001, ANN202
        Path(target).write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    path = tmp_path / "confusion_matrix.png"
    with pytest.raises(OSError, match="No space"):
        plots.plot_confusion_matrix(matrix=[[1, 0], [0, 1]], labels=["good", "dent"], path=path, title="t")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert plots.plot_confusion_matrix(matrix=[[1, 0], [0, 1]], labels=["good", "dent"], path=path, title="t") == path
    assert path.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["confusion_matrix.png"]
