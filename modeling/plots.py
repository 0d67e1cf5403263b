"""PNG plots people would rather see than read: confusion matrix, gates over rounds, gates vs labels, training curves."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(figure, path: Path) -> Path:  # noqa: ANN001
    """Write the figure under a temporary name, then rename it: a full disk mid-write leaves no empty or half PNG under
    the real name (QA: a failed round kept a 0-byte gates_over_rounds.png). The figure is closed either way."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    try:
        figure.savefig(partial, dpi=110)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    return path


def plot_confusion_matrix(*, matrix: list[list[int]], labels: list[str], path: Path, title: str) -> Path:
    counts = np.asarray(matrix, dtype=float)
    row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.7 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", color="white" if row_share[i, j] > 0.5 else "black", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of true class")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_gates_over_rounds(*, rounds: list[int], gate_series: dict[str, list[float | None]], thresholds: dict[str, float | list[float | None]],
                           comparisons: dict[str, str], path: Path, labeled_counts: list[int] | None = None,
                           class_changes: dict[int, str] | None = None) -> Path:
    """One panel per gate: its value per round and its threshold line (shaded on the failing side). A threshold given
    per round that changed (the gate edited in loop.toml between rounds) is drawn as a step line at each round's value.
    class_changes: round number -> the classes it added and removed ("+fray -crack"), drawn as a dotted line before it."""
    names = [n for n in gate_series if any(v is not None for v in gate_series[n])]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [np.nan if v is None else v for v in gate_series[name]]
        ax.plot(rounds, values, marker="o", color="tab:blue")
        threshold = thresholds[name]
        per_round = [np.nan if t is None else t for t in threshold] if isinstance(threshold, list) else [threshold]
        distinct = sorted({t for t in per_round if not np.isnan(t)})
        if len(distinct) > 1:
            ax.plot(rounds, per_round, color="tab:red", linestyle="--", drawstyle="steps-mid", label=f"gate {comparisons[name]} (each round's)")
        else:
            ax.axhline(distinct[0], color="tab:red", linestyle="--", label=f"gate {comparisons[name]} {distinct[0]:g}")
            low, high = ax.get_ylim()
            if comparisons[name] == ">=":
                ax.axhspan(min(low, distinct[0]), distinct[0], color="tab:red", alpha=0.06)
            else:
                ax.axhspan(distinct[0], max(high, distinct[0]), color="tab:red", alpha=0.06)
        for number, change in (class_changes or {}).items():  # QA: a macro F1 series over 5, 6, then 5 classes read as one
            ax.axvline(number - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.annotate(change, xy=(number - 0.5, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=6,
                        color="dimgrey")
        ax.set_title(name)
        # a tick label per round, at most ~8 of them: "218 train+val" under each of 6 rounds ran into each other
        step = max(1, int(np.ceil(len(rounds) / 8)))
        shown = rounds[::step]
        ax.set_xticks(shown)
        if labeled_counts:
            ax.set_xlabel("round (labeled train + validation images)", fontsize=9)
            ax.set_xticklabels([f"{r}\n({n})" for r, n in list(zip(rounds, labeled_counts))[::step]], fontsize=8)
        else:
            ax.set_xlabel("round")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


GATE_TITLES = {"macro_f1": "macro F1 (>= gate)", "defect_recall": "defect recall (>= gate)", "negative_fpr": "FPR on the good class (<= gate)"}


SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def series_styles(count: int) -> list[dict[str, object]]:
    """Line styles for `count` series drawn on one axis, each drawn smaller and hollow over the earlier ones: two
    projects (or strategies) with equal values on a round showed only the last drawn's marker (review), now both."""
    sizes = np.linspace(11.0, 4.0, count) if count > 1 else [6.0]
    return [{"marker": SERIES_MARKERS[i % len(SERIES_MARKERS)], "markersize": float(sizes[i]),
             "fillstyle": "none" if i < count - 1 else "full", "linewidth": 1.4 if i == count - 1 else 1.0,
             "linestyle": ("-", "--", "-.", ":")[i % 4], "alpha": 0.9} for i in range(count)]


def plot_gate_panels(*, panels: dict[str, dict[str, tuple[list[int], list[float | None]]]], thresholds: dict[str, float | None],
                     path: Path, title: str) -> Path:
    """One panel per gate: a line per series (x = labels used), the gate's threshold dashed. None values (a gate
    that does not apply) are gaps."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (gate, series) in zip(axes[0], panels.items()):
        styles = series_styles(len(series))
        for (name, (xs, ys)), style in zip(series.items(), styles):
            ax.plot(xs, [np.nan if y is None else y for y in ys], label=name, **style)
        if thresholds.get(gate) is not None:
            ax.axhline(thresholds[gate], color="black", linestyle="--", label=f"gate {thresholds[gate]:g}")
        ax.set_title(GATE_TITLES.get(gate, gate), fontsize=10)
        ax.set_xlabel("labels used")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(histories: dict[str, list[dict[str, float]]], path: Path, title: str, *, best_epochs: dict[str, int] | None = None,
                         epoch_zero: str = "frozen backbone + probe head") -> Path:
    """Loss and accuracy per epoch, train and validation, one column per run (side by side); the epoch early stopping
    kept is marked. Train loss is the training objective (label smoothing, class weights); validation loss is plain
    cross-entropy. epoch_zero: what epoch 0 is (another project's transferred head instead of the probe)."""
    columns = len(histories)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 7), squeeze=False, sharey="row")
    for column, (name, history) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in history]
        for row_index, metric in enumerate(("loss", "accuracy")):
            axis = axes[row_index][column]
            axis.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label=f"train {metric}")
            axis.plot(epochs, [row[f"val_{metric}"] for row in history], "s-", label=f"validation {metric}")
            if metric == "accuracy" and any(row.get("val_macro_f1") is not None for row in history):
                # the figure early stopping reads (QA: the kept epoch was marked, the metric that chose it was not drawn)
                axis.plot(epochs, [row.get("val_macro_f1") for row in history], "^--", label="validation macro F1 (chooses the kept epoch)")
            if best_epochs and name in best_epochs:
                axis.axvline(best_epochs[name], color="grey", linestyle=":", label=f"kept: epoch {best_epochs[name]}")
            axis.set_xlabel(f"epoch (0 = {epoch_zero})")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylabel("accuracy, macro F1" if metric == "accuracy" else metric)
            axis.set_title(f"{name}: {metric}")
            axis.grid(alpha=0.3)
            axis.legend()
    figure.suptitle(title)
    # QA: train accuracy seemed to "drop" after epoch 0, and train loss sat above validation loss
    figure.text(0.5, 0.005, "train: the mean over each epoch's batches while learning (augmented when augmentation is on; loss with label "
                "smoothing and class weights); epoch 0 (the frozen backbone and its head, before fine-tuning) and validation: measured in "
                "evaluation mode, without augmentation",
                ha="center", va="bottom", fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(figure, path)
