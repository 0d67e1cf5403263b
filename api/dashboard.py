"""The managers' dashboard: one HTML page with charts drawn as server-rendered SVG (no JavaScript, no build step).

Opened in a browser as /dashboard?token=<read token> (a page opened directly sends no Authorization header);
a Bearer header works as well. Every text that comes from the store is escaped.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse

from api.dependencies import STORE_ID_MAX, BrowserReadScope, ProjectProcessDep, SessionDep
from store import reports
from store.reports import AnnotatorActivity, ConfusionMatrix, GateSeries, LabelIssueRow, ProgressSeries, RoundAsks, RoundReport, RoundSummary, TrainingSummary

router = APIRouter(tags=["dashboard"])

# Colour-blind-friendly palette (Okabe-Ito), then greys.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#777777", "#BBBBBB")
SOURCE_COLORS = {"import": "#999999", "annotator": "#0072B2", "oracle": "#E69F00"}
PASS_COLOR, FAIL_COLOR, NA_COLOR = "#1a9850", "#d73027", "#999999"
ISSUE_QUEUE_ROWS = 25
ROUND_TABLE_ROWS = 15  # the newest; GET /projects/{id}/rounds pages through all
ERROR_SHOWN_CHARS = 240  # of a failed round's reason or a warning (the whole of it on hover)


@dataclass(frozen=True)
class Frame:
    """Plot area inside an SVG of width x height."""

    width: int = 380
    height: int = 210
    left: int = 54  # room for a tick label such as "0.0375" at 12 px
    right: int = 16
    top: int = 30
    bottom: int = 36

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits - 1, 1)}f}".rstrip("0").rstrip(".")


def _nice_max(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value:
            return candidate
    return 10 ** (exponent + 1)


def _count_axis_max(value: float) -> float:
    """The top of a count axis whose four grid steps are whole numbers (62.5 labels read as half a label)."""
    need = max(value, 1.0) / 4 if math.isfinite(value) else 0.25
    exponent = math.floor(math.log10(need))
    for power in (exponent, exponent + 1):
        for mantissa in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8):
            step = mantissa * 10.0**power
            if step >= need and step.is_integer():
                return 4 * step
    return 4 * 10.0 ** (exponent + 2)


def _y_range(values: Sequence[float | None], extra: Sequence[float | None] = ()) -> tuple[float, float]:
    seen = [v for v in (*values, *extra) if v is not None and math.isfinite(v)]
    if not seen:
        return 0.0, 1.0
    low, high = min(seen), max(seen)
    if low >= 0 and 0.5 <= high <= 1:
        return 0.0, 1.0
    # Small rates (an FPR near its 3% gate) and unbounded values (latency in ms) get a zoomed axis.
    return (min(0.0, low), _nice_max(high * 1.15))


def _x_positions(n: int, frame: Frame) -> list[float]:
    if n == 1:
        return [frame.left + frame.plot_width / 2]
    step = frame.plot_width / (n - 1)
    return [frame.left + i * step for i in range(n)]


def _y_of(value: float, y_low: float, y_high: float, frame: Frame) -> float:
    span = (y_high - y_low) or 1.0
    clamped = min(max(value, y_low), y_high)
    return frame.top + frame.plot_height * (1 - (clamped - y_low) / span)


def _axes(x_labels: Sequence[str], xs: Sequence[float], y_low: float, y_high: float, frame: Frame, x_title: str = "round") -> list[str]:
    parts = []
    for i in range(5):
        value = y_low + (y_high - y_low) * i / 4
        y = _y_of(value, y_low, y_high, frame)
        parts.append(f'<line class="grid" x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{frame.left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_fmt(value, 3))}</text>')
    # At most ~12 round labels under the axis; every point still has its own tooltip.
    every = max(1, math.ceil(len(x_labels) / 12))
    for i, (label, x) in enumerate(zip(x_labels, xs)):
        if i % every == 0 or i == len(x_labels) - 1:
            parts.append(f'<text class="tick xlabel" x="{x:.1f}" y="{frame.height - frame.bottom + 16}" text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<text class="axis-title" x="{frame.left + frame.plot_width / 2:.1f}" y="{frame.height - 4}" text-anchor="middle">{escape(x_title)}</text>')
    return parts


def _svg_open(chart_id: str, title: str, frame: Frame, rounds: Sequence[int]) -> str:
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {frame.width} {frame.height}" data-chart="{escape(chart_id)}" '
        f'data-rounds="{",".join(str(r) for r in rounds)}" aria-label="{escape(title)}">'
        f'<title>{escape(title)}</title>'
    )


def gate_chart(gate: GateSeries, round_numbers: Sequence[int], frame: Frame = Frame()) -> str:
    """A gate's value per round, each point green (pass) / red (fail) / grey (not applicable), with its threshold line.
    A threshold changed between rounds (loop.toml's gates) is drawn as each round's own step: the newest one across
    every round put rounds that passed at their own threshold on the failing side of the line (QA)."""
    known = [t for t in gate.thresholds if t is not None]
    changed = len(set(known)) > 1
    y_low, y_high = _y_range(gate.values, known or [gate.threshold])
    xs = _x_positions(len(round_numbers), frame)
    title = (f"{gate.name} ({gate.comparison} {_fmt(gate.threshold)})" if not changed
             else f"{gate.name} ({gate.comparison} each round's threshold, now {_fmt(gate.threshold)})")
    parts = [_svg_open(f"gate:{gate.name}", title, frame, round_numbers)]
    right = frame.width - frame.right
    if changed:  # one step per round, reaching halfway to its neighbours
        half = (xs[1] - xs[0]) / 2 if len(xs) > 1 else frame.plot_width / 2
        steps = [(max(frame.left, x - half), min(right, x + half), t) for x, t in zip(xs, gate.thresholds) if t is not None]
    else:
        steps = [(frame.left, right, gate.threshold)] if gate.threshold is not None else []
    steps = [(x1, x2, threshold, _y_of(threshold, y_low, y_high, frame)) for x1, x2, threshold in steps]
    for x1, x2, _threshold, y in steps:
        # Shade the failing side so a glance tells which way is good.
        fail_top, fail_bottom = (y, frame.top + frame.plot_height) if gate.comparison == ">=" else (frame.top, y)
        parts.append(f'<rect class="fail-zone" x="{x1:.1f}" y="{fail_top:.1f}" width="{x2 - x1:.1f}" height="{max(fail_bottom - fail_top, 0):.1f}"/>')
    parts += _axes([f"R{n}" for n in round_numbers], xs, y_low, y_high, frame)
    for x1, x2, threshold, y in steps:
        parts.append(f'<line class="threshold" x1="{x1:.1f}" x2="{x2:.1f}" y1="{y:.1f}" y2="{y:.1f}" data-value="{threshold:.6g}"/>')
    if gate.threshold is not None:
        y = _y_of(gate.threshold, y_low, y_high, frame)
        # The label sits on the failing side of its line, away from the (hopefully passing) points.
        label_y = y + 14 if gate.comparison == ">=" else y - 5
        label = "threshold" if not changed else "threshold now"
        parts.append(f'<text class="threshold-label" x="{right}" y="{label_y:.1f}" text-anchor="end">{label} {escape(gate.comparison)} {escape(_fmt(gate.threshold))}</text>')
    parts.append(_polyline(xs, gate.values, y_low, y_high, frame, "#333333"))
    for x, number, value, passed, applicable, threshold in zip(xs, round_numbers, gate.values, gate.passed, gate.applicable, gate.thresholds):
        if value is None:
            continue
        color = NA_COLOR if applicable is False or passed is None else (PASS_COLOR if passed else FAIL_COLOR)
        verdict = "not applicable" if applicable is False else ("pass" if passed else "fail" if passed is not None else "–")
        if changed and threshold is not None and applicable is not False and passed is not None:
            verdict += f" at {gate.comparison} {_fmt(threshold)}"
        y = _y_of(value, y_low, y_high, frame)
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{color}" data-round="{number}" data-value="{value:.6g}">'
            f'<title>round {number}: {escape(_fmt(value, 4))} ({escape(verdict)})</title></circle>'
        )
    parts.append(f'<text class="chart-title" x="{frame.left}" y="18">{escape(title)}</text></svg>')
    return "".join(parts)


def _polyline(xs: Sequence[float], values: Sequence[float | None], y_low: float, y_high: float, frame: Frame, color: str) -> str:
    """Line segments between consecutive known values (a round that recorded nothing leaves a gap)."""
    segments: list[list[str]] = [[]]
    for x, value in zip(xs, values):
        if value is None:
            segments.append([])
        else:
            segments[-1].append(f"{x:.1f},{_y_of(value, y_low, y_high, frame):.1f}")
    return "".join(
        f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>'
        for points in segments if len(points) > 1
    )


def multi_line_chart(chart_id: str, title: str, series: dict[str, list[float | None]], round_numbers: Sequence[int],
                     frame: Frame = Frame(width=560, height=250)) -> str:
    y_low, y_high = _y_range([v for values in series.values() for v in values])
    xs = _x_positions(len(round_numbers), frame)
    parts = [_svg_open(chart_id, title, frame, round_numbers)]
    parts += _axes([f"R{n}" for n in round_numbers], xs, y_low, y_high, frame)
    for index, (name, values) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        parts.append(_polyline(xs, values, y_low, y_high, frame, color))
        for x, number, value in zip(xs, round_numbers, values):
            if value is not None:
                parts.append(
                    f'<circle class="point" cx="{x:.1f}" cy="{_y_of(value, y_low, y_high, frame):.1f}" r="3.5" fill="{color}" '
                    f'data-series="{escape(name)}" data-round="{number}" data-value="{value:.6g}">'
                    f'<title>{escape(name)}, round {number}: {escape(_fmt(value, 4))}</title></circle>'
                )
    parts.append(f'<text class="chart-title" x="{frame.left}" y="18">{escape(title)}</text></svg>')
    return "".join(parts) + _legend({name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)})


def stacked_bar_chart(chart_id: str, title: str, stacks: dict[str, list[int]], round_numbers: Sequence[int],
                      colors: dict[str, str], frame: Frame = Frame(width=560, height=250)) -> str:
    totals = [sum(values[i] for values in stacks.values()) for i in range(len(round_numbers))]
    y_low, y_high = 0.0, _count_axis_max(max(totals, default=0) * 1.05)
    xs = _x_positions(len(round_numbers), frame) if len(round_numbers) > 1 else [frame.left + frame.plot_width / 2]
    slot = frame.plot_width / max(len(round_numbers), 1)
    bar_width = max(2.0, min(36.0, slot * 0.7))
    # Bars need room at the ends: spread their centres over the width minus one slot.
    if len(round_numbers) > 1:
        xs = [frame.left + slot / 2 + i * slot for i in range(len(round_numbers))]
    parts = [_svg_open(chart_id, title, frame, round_numbers)]
    parts += _axes([f"R{n}" for n in round_numbers], xs, y_low, y_high, frame)
    for i, (x, number) in enumerate(zip(xs, round_numbers)):
        base = 0.0
        for name, values in stacks.items():
            value = values[i]
            if value <= 0:
                continue
            y_top, y_bottom = _y_of(base + value, y_low, y_high, frame), _y_of(base, y_low, y_high, frame)
            parts.append(
                f'<rect class="bar" x="{x - bar_width / 2:.1f}" y="{y_top:.1f}" width="{bar_width:.1f}" height="{y_bottom - y_top:.1f}" '
                f'fill="{colors.get(name, "#555555")}" data-series="{escape(name)}" data-round="{number}" data-value="{value}">'
                f'<title>round {number}: {value} {escape(name)}</title></rect>'
            )
            base += value
        if len(round_numbers) <= 20:
            parts.append(f'<text class="bar-total" x="{x:.1f}" y="{_y_of(base, y_low, y_high, frame) - 4:.1f}" text-anchor="middle">{totals[i]}</text>')
    parts.append(f'<text class="chart-title" x="{frame.left}" y="18">{escape(title)}</text></svg>')
    return "".join(parts) + _legend({name: colors.get(name, "#555555") for name in stacks})


def epoch_chart(chart_id: str, title: str, training: TrainingSummary, metric: str, frame: Frame = Frame()) -> str:
    """metric ("loss" or "accuracy") per epoch, train solid and validation dashed, the epoch early stopping kept marked."""
    epochs = [row.epoch for row in training.history]
    series = {f"train {metric}": [getattr(row, f"train_{metric}") for row in training.history],
              f"validation {metric}": [getattr(row, f"val_{metric}") for row in training.history]}
    y_low, y_high = _y_range([v for values in series.values() for v in values])
    xs = _x_positions(len(epochs), frame)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {frame.width} {frame.height}" data-chart="{escape(chart_id)}" '
             f'data-epochs="{",".join(str(e) for e in epochs)}" aria-label="{escape(title)}"><title>{escape(title)}</title>']
    parts += _axes([str(e) for e in epochs], xs, y_low, y_high, frame, x_title="epoch (0: before unfreezing)")
    if training.best_epoch in epochs:
        x = xs[epochs.index(training.best_epoch)]
        parts.append(f'<line class="kept-epoch" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{frame.top + frame.plot_height}" data-epoch="{training.best_epoch}"/>'
                     # the label on the side of the line that has room (the kept epoch is often the last)
                     + (f'<text class="threshold-label" x="{x - 4:.1f}" y="{frame.top + frame.plot_height - 6:.1f}" text-anchor="end">kept</text>' if x > frame.left + frame.plot_width / 2
                        else f'<text class="threshold-label" x="{x + 4:.1f}" y="{frame.top + frame.plot_height - 6:.1f}">kept</text>'))
    for index, (name, values) in enumerate(series.items()):
        color = PALETTE[index]
        line = _polyline(xs, values, y_low, y_high, frame, color)
        parts.append(line.replace('stroke-width="2"', 'stroke-width="2" stroke-dasharray="5 3"') if index else line)
        for x, epoch, value in zip(xs, epochs, values):
            if value is not None and math.isfinite(value):
                parts.append(f'<circle class="point" cx="{x:.1f}" cy="{_y_of(value, y_low, y_high, frame):.1f}" r="3" fill="{color}" '
                             f'data-series="{escape(name)}" data-epoch="{epoch}" data-value="{value:.6g}">'
                             f'<title>{escape(name)}, epoch {epoch}: {escape(_fmt(value, 4))}</title></circle>')
    parts.append(f'<text class="chart-title" x="{frame.left}" y="18">{escape(title)}</text></svg>')
    return "".join(parts) + _legend({name: PALETTE[i] for i, name in enumerate(series)})


def training_section(report: RoundReport) -> str:
    """How the latest round's model was trained and calibrated, and how noisy its labels look: the round record, drawn."""
    number = report.summary.number
    if report.cold_start:
        return f'<h2>Training · round {number}</h2><p class="empty">Cold start, no model trained: {escape(report.cold_start)}</p>'
    training, parts = report.training, [f"<h2>Training · round {number}</h2>"]
    if report.collapsed:
        parts.append('<p class="collapsed"><b>Collapsed: the model gives one class to every test image, or to every image of the project. '
                     'Its macro F1 gate was set to 0.</b></p>')
    if training is None:
        parts.append('<p class="empty">This round recorded no training details.</p>')
    else:
        if not training.history:
            kept = " · a head on frozen embeddings: no epochs"
        elif not training.epochs_run:
            kept = " · no epoch after epoch 0 (the head on frozen features)"
        elif training.best_epoch is None:  # rounds before the kept epoch was recorded
            kept = f" · {training.epochs_run} epochs; the kept epoch was not recorded"
        else:
            kept = f" · kept epoch {training.best_epoch} of {training.epochs_run} (early stopping on validation macro F1)"
        parts.append(f'<p class="training-summary">strategy <b>{escape(training.strategy or "–")}</b> on {_fmt(training.n_fit, 0)} labeled images{kept}</p>')
        # what status --json and the API say of it, said here too (review)
        if training.early_stopping_note:
            parts.append(f'<p class="early-stopping-note">{escape(training.early_stopping_note[:1].upper() + training.early_stopping_note[1:])}.</p>')
        if training.options_not_used_by_head:
            parts.append(f'<p class="options-not-used">loop.toml options a head does not use: {escape(", ".join(training.options_not_used_by_head))} '
                         '(<code>--train finetune</code> or <code>full</code> do).</p>')
        if len(training.history) >= 2:
            parts.append(f'<div class="two"><div>{epoch_chart("training:loss", "Loss per epoch", training, "loss")}</div>'
                         f'<div>{epoch_chart("training:accuracy", "Accuracy per epoch", training, "accuracy")}</div></div>')
    if report.init_from is not None:
        init = report.init_from
        unused = "" if init.head_used else "; this round's network did not start from that head"
        seen = (f' <b class="verdict fail">{init.test_images_it_learned_from} labeled test images are images that model learned from: the test '
                'figures overstate the transfer.</b>') if init.test_images_it_learned_from else ""
        parts.append(f'<p class="init-from">Started from another project\'s model: {escape(init.source or init.checkpoint)}. '
                     f'{escape(init.head[:1].upper() + init.head[1:] + unused)}.{seen}</p>')
    calibration = report.calibration
    if calibration is not None and calibration.method == "temperature":
        add_one = (" (no image there misclassified: the fit keeps an add-one error estimate, so the NLL rises by design instead of the "
                   "temperature falling to zero)") if calibration.objective == "nll_add_one" else ""
        left_out = f"; {calibration.n_left_out} images of a class one fold alone held left out" if calibration.n_left_out else ""
        if (calibration.ece_after is not None and calibration.ece_before is not None and calibration.ece_after > calibration.ece_before
                and calibration.nll_after is not None and calibration.nll_before is not None and calibration.nll_after < calibration.nll_before
                and not add_one):  # QA: ECE 0.135 -> 0.241 shown without a word
            add_one = (" (the temperature minimises the log-likelihood, not the calibration error; over a few dozen images the binned "
                       "calibration error moves with a handful of them, so it can rise while the log-likelihood falls)")
        parts.append(f'<p class="calibration">Calibration: temperature {_fmt(calibration.temperature, 3)} fitted on {escape(calibration.fitted_on or "–")} '
                     f'({_fmt(calibration.n_images, 0)} images{left_out}): expected calibration error {_fmt(calibration.ece_before, 3)} → {_fmt(calibration.ece_after, 3)}, '
                     f'negative log-likelihood {_fmt(calibration.nll_before, 4)} → {_fmt(calibration.nll_after, 4)}{add_one}</p>')
    elif calibration is not None:
        parts.append(f'<p class="calibration">Calibration: none{": " + escape(calibration.reason) if calibration.reason else ""}</p>')
    choice = report.threshold_choice
    if choice is not None:
        where = {"validation": "validation images", "out_of_fold": "out-of-fold probabilities over every labeled non-test image"}.get(
            choice.source or "", escape(choice.source or "–"))
        if choice.source == "out_of_fold" and choice.out_of_fold_model:
            where += " (the head's)" if choice.out_of_fold_model == "head" else f" ({escape(choice.out_of_fold_model)}: one network per fold)"
        estimate = choice.estimated_metrics
        margin = "" if choice.margin_attainable is not False else " <b>Too few good parts for a safety margin under the FPR gate.</b>"
        over = (f" over every good part of the pool, labeled or not ({_fmt(choice.n_picked_negatives, 0)} of the labeled ones were picked by "
                "active learning, so they are weighed apart from the sampled ones)") if choice.fpr_estimated_over == "pool" else ""
        parts.append(f'<p class="threshold-choice">Threshold chosen on {where}: {_fmt(choice.n_negatives, 0)} good parts, {_fmt(choice.n_defects, 0)} defects. '
                     f'The loop\'s own estimate there: macro F1 {_fmt(estimate.get("macro_f1"), 3)}, defect recall {_fmt(estimate.get("defect_recall"), 3)}, '
                     f'FPR {_fmt(estimate.get("negative_fpr"), 3)}{over} (the gates above are the test split\'s).{margin}</p>')
    quality = report.label_quality
    if quality is not None and quality.noise_rate_per_class:
        rows = "".join(f'<tr data-class="{escape(name)}"><td>{escape(name)}</td><td>{"not estimated: under 20 labels" if rate is None else f"{rate:.1%}"}</td></tr>'
                       for name, rate in quality.noise_rate_per_class.items())
        asked = f"; {quality.already_questioned} not sent again (asked before with the same label)" if quality.already_questioned else ""
        weak = f' <b>Read with care: {escape(quality.weak_model_note)}.</b>' if quality.weak_model_note else ""
        parts.append(f'<p class="noise-summary">Estimated label noise per class (cleanlab, out-of-fold): {_fmt(quality.n_flagged, 0)} suspects flagged{asked}.{weak}</p>'
                     f'<table class="noise"><thead><tr><th>given class</th><th>P(true class differs)</th></tr></thead><tbody>{rows}</tbody></table>')
    return "".join(parts)


def _legend(colors: dict[str, str]) -> str:
    items = "".join(f'<span class="legend-item"><span class="swatch" style="background:{c}"></span>{escape(n)}</span>' for n, c in colors.items())
    return f'<div class="legend">{items}</div>'


def confusion_matrix_table(matrix: ConfusionMatrix, round_number: int) -> str:
    """Counts, each cell shaded by its share of the true class's row (the diagonal is recall)."""
    header = "".join(f'<th scope="col" class="pred">{escape(label)}</th>' for label in matrix.labels)
    rows = []
    for label, row in zip(matrix.labels, matrix.matrix):
        total = sum(row) or 1.0
        cells = []
        for j, count in enumerate(row):
            share = count / total
            is_diagonal = matrix.labels[j] == label
            hue = "0,114,178" if is_diagonal else "213,94,0"
            text_color = "#fff" if share > 0.55 else "#111"
            cells.append(
                f'<td class="cm-cell" style="background:rgba({hue},{0.08 + 0.92 * share:.2f});color:{text_color}" '
                f'title="true {escape(label)} → predicted {escape(matrix.labels[j])}: {_fmt(count)} ({share:.0%} of row)">{_fmt(count)}</td>'
            )
        rows.append(f'<tr><th scope="row">{escape(label)}</th>{"".join(cells)}</tr>')
    return (
        f'<table class="confusion" data-round="{round_number}"><caption>rows: true class · columns: predicted class</caption>'
        f'<thead><tr><th></th>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def issue_queue_table(issues: Sequence[LabelIssueRow], total: int, round_number: int, round_id: int, token_query: str) -> str:
    if not issues:
        return '<p class="empty">No flagged label issues.</p>'
    image_query = f"{token_query}&amp;view=display" if token_query else "?view=display"  # TIFF and 16-bit files as the model sees them
    rows = []
    for position, issue in enumerate(issues, start=1):  # the queue's order; stored ranks count from 0
        changed = issue.current_label is not None and issue.current_label != issue.given_label
        merged = not changed and issue.given_label == issue.suggested_label  # loop rename-class merged the two classes
        now = escape(issue.current_label or "unlabeled") + (" ✓ relabeled" if changed else " ✓ classes merged" if merged else "")
        rows.append(
            f'<tr class="issue" data-image-id="{issue.image_id}"><td>{position}</td>'
            f'<td><img class="thumb" loading="lazy" alt="image {issue.image_id}" src="/images/{issue.image_id}{image_query}"></td>'
            f'<td>{escape(issue.kind)}</td><td>{escape(issue.given_label or "–")}</td>'
            f'<td><b>{escape(issue.suggested_label or "–")}</b></td><td>{_fmt(issue.score, 3)}</td><td>{now}</td></tr>'
        )
    more = (f'<p class="more">Showing {len(issues)} of {total}; the rest: <code>GET /rounds/{round_id}/label-issues?kind=label_error&amp;offset={len(issues)}</code></p>'
            if total > len(issues) else "")
    return (
        f'<table class="issues" data-round="{round_number}"><thead><tr><th>#</th><th>image</th><th>kind</th><th>given</th>'
        f'<th>suggested</th><th>quality</th><th>label now</th></tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'
    )


def _thumbnail(image_id: int | None, token_query: str) -> str:
    """An image as the model sees it, with its id: "–" for none."""
    if image_id is None:
        return "–"
    image_query = f"{token_query}&amp;view=display" if token_query else "?view=display"
    return f'<img class="thumb" loading="lazy" alt="image {image_id}" src="/images/{image_id}{image_query}"> <span class="image-id">{image_id}</span>'


def _more_rows(shown: int, total: int, round_id: int, kind: str) -> str:
    return (f'<p class="more">Showing {shown} of {total}; the rest: <code>GET /rounds/{round_id}/label-issues?kind={kind}&amp;offset={shown}</code></p>'
            if total > shown else "")


def near_copies_table(issues: Sequence[LabelIssueRow], total: int, round_number: int, round_id: int, token_query: str) -> str:
    """Each image flagged as a near-copy beside the copy it was found with: a pair across the test split scores the model
    on an image it trained on (the README promised this card; the dashboard had only a count)."""
    if not issues:
        return '<p class="empty">No near-copies found.</p>'
    shown: set[frozenset[int | None]] = set()
    pairs = []
    for issue in issues:  # each pair once: both its images are flagged, each naming the other (QA: 22 rows for 11 pairs)
        pair = frozenset((issue.image_id, issue.related_image_id))
        if pair not in shown:
            shown.add(pair)
            pairs.append(issue)
    return _image_pair_table("near-copy", "near-copies", "data-copy-id", pairs, shown_of=len(issues), total=total, round_number=round_number,
                             round_id=round_id, token_query=token_query, kind="near_duplicate", second="its near-copy",
                             quality_title="1 minus the pixel correlation of the two: lower is a closer copy",
                             label_of=lambda issue: issue.given_label)


def outliers_table(issues: Sequence[LabelIssueRow], total: int, round_number: int, round_id: int, token_query: str) -> str:
    """Each image far from its nearest neighbours, beside the nearest one (QA: the round printed "outliers: 3" and no
    view but the API's label-issue query and the export showed which; one was a wrong test label)."""
    if not issues:
        return '<p class="empty">No outliers found.</p>'
    return _image_pair_table("outlier", "outliers", "data-nearest-id", issues, shown_of=len(issues), total=total, round_number=round_number,
                             round_id=round_id, token_query=token_query, kind="outlier", second="its nearest image",
                             quality_title="lower is farther from its neighbours than its class usually is",
                             label_of=lambda issue: issue.current_label or issue.given_label)


def _image_pair_table(row_class: str, table_class: str, related_attribute: str, issues: Sequence[LabelIssueRow], *, shown_of: int, total: int, round_number: int, round_id: int,
                      token_query: str, kind: str, second: str, quality_title: str, label_of: Callable[[LabelIssueRow], str | None]) -> str:
    """Flagged images, each beside the image it was found with (its copy, its nearest neighbour)."""
    rows = "".join(f'<tr class="{row_class}" data-image-id="{issue.image_id}" {related_attribute}="{issue.related_image_id or ""}"><td>{position}</td>'
                   f'<td>{_thumbnail(issue.image_id, token_query)}</td><td>{_thumbnail(issue.related_image_id, token_query)}</td>'
                   f'<td>{escape(label_of(issue) or "unlabeled")}</td><td>{_fmt(issue.score, 3)}</td></tr>' for position, issue in enumerate(issues, start=1))
    return (f'<table class="issues {table_class}" data-round="{round_number}"><thead><tr><th>#</th><th>image</th><th>{second}</th>'
            f'<th>label</th><th title="{quality_title}">quality</th></tr></thead><tbody>{rows}</tbody></table>'
            f'{_more_rows(shown_of, total, round_id, kind)}')


def _shown_status(summary: RoundSummary) -> str:
    """The round's status, as `loop status` shows it: "running?" when no process runs it any more (its note on hover)."""
    if summary.process_alive is False:
        return (f'{escape(summary.status)}? <span class="no-process" title="{escape(summary.status_note or "")}">no process holds the '
                'project: killed, or the machine stopped</span>')
    return escape(summary.status)


def _summary_cards(progress: ProgressSeries, latest: RoundReport | None, asks: dict[int, RoundAsks] | None = None) -> str:
    newest = progress.rounds[-1] if progress.rounds else None
    # the cards show the latest completed round; a newer one running (or failed) is said beside the count
    newer = (f' <span class="issue-round-note">(R{newest.number} {_shown_status(newest)})</span>'
             if newest is not None and latest is not None and newest.number > latest.summary.number else "")
    cards = [("rounds", str(len(progress.rounds)) + newer)]
    if latest is not None:
        summary = latest.summary
        gates = f"{summary.n_gates_passed}/{summary.n_gates}" if summary.n_gates else "–"
        verdict = "pass" if summary.all_gates_passed else ("fail" if summary.all_gates_passed is False else "na")
        cards += [
            ("latest round", f"R{summary.number} · {_shown_status(summary)}"),
            ("gates passed", f'<span class="verdict {verdict}">{gates}</span>' + (
                f' <span class="failed-gates">failed: {escape(", ".join(failed))}</span>'
                if (failed := [g.name for g in latest.gates if g.applicable and g.passed is False]) else "") + (
                f' <span class="issue-round-note unsettled-gates" title="the 90% interval on the test split straddles the gate">'
                f'({escape(", ".join(unsettled))}: the test split cannot tell)</span>' if (unsettled := [g.name for g in latest.gates if g.applicable and g.settled is False]) else "")),
            ("labeled images", str(latest.label_counts.total_labeled)),
            ("flagged label issues", str(latest.n_flagged_label_issues)),
            ("near-duplicates", ("not checked" if latest.n_near_duplicates is None else str(latest.n_near_duplicates))
             + (f' <span class="verdict fail" title="test images with a labeled near-copy outside the test split">'
                f'{latest.n_test_images_with_copy_outside} across test</span>' if latest.n_test_images_with_copy_outside else "")),
            ("outliers", "not checked" if latest.n_outliers is None else str(latest.n_outliers)),
            ("round time", f"{_fmt(summary.duration_s, 3)} s" if summary.duration_s is not None else "–"),
        ]
    waiting = sum(asked.waiting_to_be_pushed for asked in (asks or {}).values())
    if waiting:  # the annotation tool was down or refused them: annotators have not seen them (the next round pushes them)
        cards.append(("asks waiting to be pushed", f'<span class="verdict fail" title="the annotation tool was down or refused them; '
                                                    f'the next round pushes them again">{waiting}</span>'))
    return "".join(f'<div class="card"><div class="card-label">{label}</div><div class="card-value">{value}</div></div>' for label, value in cards)


def _cut(text: str) -> str:
    """A reason as a table cell shows it: the first ERROR_SHOWN_CHARS characters (the whole of it on hover)."""
    return text if len(text) <= ERROR_SHOWN_CHARS else text[:ERROR_SHOWN_CHARS - 1] + "…"


def rounds_table(progress: ProgressSeries, asks: dict[int, RoundAsks], warnings: dict[int, list[str]] | None = None,
                 between_rounds: dict[int, int] | None = None) -> str:
    """Every round, newest first: its status (a failed round's reason), gates, the labels it pulled and where its asks are
    now. QA: a failed round showed only as a count on the dashboard, its reason in `loop status` alone."""
    if not progress.rounds:
        return '<p class="empty">No round yet.</p>'
    rows = []
    shown = range(len(progress.rounds) - 1, max(len(progress.rounds) - ROUND_TABLE_ROWS, 0) - 1, -1)
    warnings = warnings or {}
    any_note = any(progress.rounds[index].error or warnings.get(progress.rounds[index].id) for index in shown)  # the column only when needed
    for index in shown:
        summary = progress.rounds[index]
        failed = [gate.name for gate in progress.gates if gate.applicable[index] and gate.passed[index] is False]
        gates = "–" if not summary.n_gates else (f'<span class="verdict {"pass" if summary.all_gates_passed else "fail"}">'
                                                 f'{summary.n_gates_passed}/{summary.n_gates}</span>'
                                                 + (f' <span class="failed-gates">{escape(", ".join(failed))}</span>' if failed else ""))
        pulled = str(sum(series[index] for series in progress.new_label_events_by_source.values()))
        if (between_rounds or {}).get(summary.id):  # a webhook's answers: taken in by this round, not pulled (QA: "0" beside them)
            pulled += (f' <span class="between-rounds" title="recorded outside a pull (a webhook, a rename) since the round before read '
                       f'the labels">+{between_rounds[summary.id]} between rounds</span>')
        asked = asks.get(summary.id)
        if asked is None:
            asks_text = "–"
        else:
            parts = [f"{asked.pushed} pushed" + (f", {asked.answered} answered" if asked.answered is not None else "")] if asked.pushed else []
            parts += [f"{asked.recorded} recorded (annotator none)"] if asked.recorded else []
            parts += [f'<span class="verdict fail">{asked.waiting_to_be_pushed} waiting to be pushed</span>'] if asked.waiting_to_be_pushed else []
            parts += [f"{asked.withdrawn} withdrawn"] if asked.withdrawn else []
            asks_text = f"{asked.selected}" + (f" ({', '.join(parts)})" if parts else "")
            if asked.held_back:  # annotators behind: the round picked fewer, and the reason is the manager's to act on
                asks_text += f' <span class="held-back" title="{escape(asked.held_back)}">{escape(_cut(asked.held_back))}</span>'
        note = ""
        if summary.error:
            note = f'<span class="round-error" title="{escape(summary.error)}">{escape(_cut(summary.error))}</span>'
        said = warnings.get(summary.id) or []
        if said:  # the pull's and push's own words: the annotation tool unreachable, answers refused
            more = f" (+{len(said) - 1} more)" if len(said) > 1 else ""
            note += (" " if note else "") + f'<span class="round-warning" title="{escape(chr(10).join(said))}">{escape(_cut(said[0]))}{more}</span>'
        status_class = {"failed": "verdict fail", "completed": ""}.get(summary.status, "running")
        started = summary.started_at.strftime("%Y-%m-%d %H:%M") if summary.started_at else "–"
        rows.append(f'<tr data-round="{summary.number}" data-status="{escape(summary.status)}"><td>R{summary.number}</td>'
                    f'<td class="{status_class}">{_shown_status(summary)}</td><td>{started}</td>'
                    f'<td>{_fmt(summary.duration_s, 3) + " s" if summary.duration_s is not None else "–"}</td><td>{gates}</td>'
                    f'<td>{pulled}</td><td>{asks_text}</td>{f"<td>{note}</td>" if any_note else ""}</tr>')
    older = len(progress.rounds) - ROUND_TABLE_ROWS
    more = (f'<p class="more">{older} older round{"s" if older != 1 else ""}: <code>GET /projects/{progress.project_id}/rounds</code></p>'
            if older > 0 else "")
    return ('<table class="rounds"><thead><tr><th>round</th><th>status</th><th>started (UTC)</th><th>time</th><th>gates passed</th>'
            '<th title="label events the round pulled from the annotation tool: answers, skips and deletions; + those a webhook took in '
            'between rounds (not pulled again)">label events pulled</th>'
            '<th title="images the round asked to be labeled, and where those asks are now">asked</th>'
            f'{"<th>why it failed, warnings</th>" if any_note else ""}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{more}')


def annotators_table(activity: Sequence[AnnotatorActivity]) -> str:
    """Per annotator: images answered, skips, the newest round's answers, agreement where another annotator answered too."""
    if not activity:
        return '<p class="empty">No annotator has answered yet (labels so far come from ingest).</p>'
    rows = []
    for row in activity:
        agreement = (f'{row.agreeing / row.shared:.0%} <span class="dim">({row.agreeing} of {row.shared})</span>' if row.shared else
                     '<span class="dim">no image shared</span>')
        lead = "–" if row.median_lead_time_s is None else f"{_fmt(row.median_lead_time_s, 3)} s"
        who = (escape(row.email) + f' <span class="dim">({escape(row.annotator)})</span>' if row.email else escape(row.annotator or "(unnamed)")) + (
            ' <span class="dim">(simulated)</span>' if row.source == "oracle" else "")
        rows.append(f'<tr data-annotator="{escape(row.annotator)}"><td>{who}</td><td>{row.answered}</td><td>{row.answered_for_latest_round}</td>'
                    f'<td>{row.skipped}</td><td>{agreement}</td><td>{row.in_ties}</td><td>{lead}</td></tr>')
    return ('<table class="annotators"><thead><tr><th>annotator</th><th title="images where an answer of theirs stands (a later skip leaves it standing, and counts as a skip too)">images answered</th>'
            '<th title="answers the newest completed round took in for the first time">for the newest round</th><th>skipped</th>'
            '<th title="where another annotator answered the same image: how often their answer is the label now">agreement with others</th>'
            '<th title="images whose annotators split evenly, kept out of training">in ties</th>'
            '<th title="median time from opening a task to submitting it (Label Studio)">median time</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _gate_table(latest: RoundReport) -> str:
    without = latest.test_metrics_without_copies  # some test images have a labeled near-copy outside the test split
    rows = []
    for gate in latest.gates:
        verdict = "na" if not gate.applicable else ("pass" if gate.passed else "fail")
        text = "n/a" if not gate.applicable else ("PASS" if gate.passed else "FAIL")
        interval = "–" if gate.interval_low is None else (
            f'{_fmt(gate.interval_low, 3)}–{_fmt(gate.interval_high, 3)}' + ("" if gate.settled else ' <span class="unsettled">cannot tell</span>'))
        without_cell = f'<td>{_fmt(without.get(gate.name), 4)}</td>' if without else ""
        if gate.name == "macro_f1" and latest.classes_missing_from_test:  # why it fails, as loop status says (QA)
            text += f' <span class="failed-gates">no test image of {escape(", ".join(latest.classes_missing_from_test))}</span>'
        rows.append(f'<tr><td>{escape(gate.name)}</td><td>{_fmt(gate.value, 4)}</td><td>{escape(gate.comparison)} {_fmt(gate.threshold, 4)}</td>'
                    f'<td class="verdict {verdict}">{text}</td><td class="interval">{interval}</td>{without_cell}</tr>')
    without_header = (f'<th title="on the {_fmt(without.get("n_images"), 0)} test images without a labeled near-copy outside the test split '
                      f'({_fmt(without.get("n_excluded"), 0)} have one: the value beside is optimistic)">without copied test images</th>') if without else ""
    return ('<table class="gates"><thead><tr><th>gate</th><th>value</th><th>needs</th><th></th><th title="90% interval on the test split, '
            f'photos of one part as one draw">90% interval</th>{without_header}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _coverage_html(latest: RoundReport) -> str:
    """Ingest batches unlike the labeled images (a new camera), and the gate metrics per batch of the test split."""
    parts = []
    for batch in latest.unfamiliar_batches or []:
        unlike = [f"{share:.0%} unlike the {what}" for what, share, flagged in (  # as loop status says it (_fmt kept "80.8%")
            ("training labels", batch.share_unlike_training_labels, batch.unlike_training_labels),
            ("labeled test images", batch.share_unlike_test_labels, batch.unlike_test_labels)) if flagged and share is not None]
        measured = (f"{batch.n_drawn_into_test} drawn into the test split this round, to be labeled" if batch.n_drawn_into_test else
                    f"{batch.n_unlabeled_test} of its test images wait for a label" if batch.n_unlabeled_test else
                    "the gates do not measure it" if batch.unlike_test_labels else f"{batch.n_labeled_test} labeled test images")
        parts.append(f'<p class="coverage"><span class="verdict fail">new images unlike the labeled ones</span> '
                     f'{escape(reports.ingest_batches_text(batch.ingest_batch_ids).removeprefix("ingest "))} '
                     f'({escape(str(batch.source))}, {batch.n_images} images): {escape(" and ".join(unlike))}; '
                     f'{batch.n_labeled_train_validation} training labels; {escape(measured)}</p>')
    changed = latest.test_labels_changed or {}
    if reports.test_split_changed(changed):  # the gates over rounds compare scores against other labels
        parts.append(f'<p class="coverage test-labels-changed"><span class="verdict fail">test labels changed</span> since round '
                     f'{changed.get("since_round")}: {changed.get("relabeled", 0)} labeled test images have another label, '
                     f'{changed.get("no_longer_labeled", 0)} none any more{reports.test_split_moves_text(changed)}{escape(reports.test_split_renames_text(changed))}. These gates score against different labels than the round '
                     'before: their change over rounds is partly the labels\'.</p>')
    for batch in latest.defects_unmeasured or []:  # the test split holds its good parts only (QA: a new camera's)
        parts.append(f'<p class="coverage defects-unmeasured"><span class="verdict fail">its defects not measured</span> '
                     f'{escape(reports.ingest_batches_text(batch.ingest_batch_ids).removeprefix("ingest "))} ({escape(str(batch.source))}): '
                     f'the model calls {batch.n_predicted_defect} of its unlabeled images defects, and the labeled test image nearest each '
                     'of them is a good part: the gates above do not measure defects like its own. Give the test split some of its '
                     'defects (<code>loop ingest --split test</code>).</p>')
    for batch in (latest.label_quality.suspect_batches if latest.label_quality else []):  # the gates score the model against its test labels
        unchecked = (f" Its {batch.n_labeled_test} labeled test images are not checked (the test split only reports), and the gates above "
                     "score the model against those labels." if batch.n_labeled_test else "")
        parts.append(f'<p class="coverage suspect-batch"><span class="verdict fail">labels suspect as a whole</span> '
                     f'{escape(reports.ingest_batches_text([batch.ingest_batch_id]))} ({escape(str(batch.source))}): {batch.n_flagged} of its {batch.n_judged} labeled training and '
                     f'validation images are suspected label errors ({"–" if batch.share_flagged is None else f"{batch.share_flagged:.0%}"}; '
                     f'{"–" if batch.share_flagged_elsewhere is None else f"{batch.share_flagged_elsewhere:.0%}"} in the other ingests): '
                     'classes swapped, a wrong manifest column?'
                     f'{escape(unchecked)}</p>')
    if latest.test_metrics_by_batch:
        rows = "".join(f'<tr><td title="{escape(str(row.source))}">{escape(reports.batch_ids_text(row.ingest_batch_ids))} · '
                       f'{escape(str(row.source).rstrip("/").rsplit("/", 1)[-1])}</td>'
                       f'<td>{row.n_images}{f" ({row.n_good} good, {row.n_defects} defects)" if row.n_good is not None and row.n_defects is not None else ""}{" (too few to be gated alone)" if row.too_few_images else ""}</td><td>{_fmt(row.macro_f1, 4)}</td><td>{_fmt(row.defect_recall, 4)}</td><td>{_fmt(row.negative_fpr, 4)}</td></tr>'
                       for row in latest.test_metrics_by_batch)
        parts.append('<table class="gates" id="gates-by-batch"><thead><tr><th>ingest batch</th><th>test images</th><th>macro_f1</th>'
                     f'<th>defect_recall</th><th>negative_fpr</th></tr></thead><tbody>{rows}</tbody></table>')
    return "".join(parts)


STYLE = """
*{box-sizing:border-box} body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d1d1f}
header{background:#1f2933;color:#fff;padding:12px 24px;display:flex;align-items:baseline;gap:16px}
header h1{font-size:20px;margin:0} header .sub{color:#cbd2d9} header a{color:#9fd3ff}
main{max-width:1400px;margin:0 auto;padding:16px 24px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08);padding:12px 16px;margin-bottom:16px}
section h2{font-size:16px;margin:0 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:16px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08);padding:10px 16px;min-width:150px}
.card-label{color:#52606d;font-size:12px;text-transform:uppercase;letter-spacing:.04em} .card-value{font-size:22px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:16px} @media (max-width:1100px){.two{grid-template-columns:1fr}}
svg.chart{width:100%;height:auto;display:block}
svg .grid{stroke:#e4e7eb} svg .tick{font-size:12px;fill:#52606d} svg .axis-title{font-size:11px;fill:#7b8794}
svg .chart-title{font-size:14px;font-weight:600;fill:#1f2933} svg .threshold{stroke:#d73027;stroke-dasharray:6 4;stroke-width:1.5}
svg .threshold-label{font-size:12px;fill:#d73027} svg .fail-zone{fill:#d73027;opacity:.06} svg .bar-total{font-size:10px;fill:#52606d}
.legend{display:flex;flex-wrap:wrap;gap:10px;font-size:12px;margin:4px 0 0 48px} .swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
table{border-collapse:collapse} th,td{padding:4px 8px;text-align:left;border-bottom:1px solid #eef0f2}
table.confusion td{text-align:center;min-width:48px;border:1px solid #fff} table.confusion caption{caption-side:bottom;color:#7b8794;font-size:12px;padding-top:4px}
table.issues img.thumb{width:56px;height:56px;object-fit:cover;border-radius:4px;background:#eee}
.unsettled{color:#b7791f;font-size:12px} .verdict.pass{color:#1a9850;font-weight:600} .verdict.fail{color:#d73027;font-weight:600} .verdict.na{color:#999}
svg .kept-epoch{stroke:#d73027;stroke-width:1.5;stroke-dasharray:2 3}
.empty,.more{color:#52606d} code{background:#f0f2f4;padding:1px 4px;border-radius:3px}
.no-process{color:#b7791f;font-size:13px;cursor:help} .dim{color:#7b8794;font-size:12px}
table.rounds td.running{color:#b7791f} .round-error{color:#7b341e;font-size:13px;cursor:help} .round-warning{color:#b7791f;font-size:13px;cursor:help} .held-back{color:#b7791f;font-size:13px;cursor:help} .failed-gates{color:#d73027;font-size:13px}
"""


def render_dashboard(progress: ProgressSeries, *, latest: RoundReport | None, confusion: tuple[int, ConfusionMatrix] | None,
                     issues: tuple[int, int, int, list[LabelIssueRow]] | None, token_query: str,
                     near_copies: tuple[int, int, int, list[LabelIssueRow]] | None = None,
                     outliers: tuple[int, int, int, list[LabelIssueRow]] | None = None, asks: dict[int, RoundAsks] | None = None,
                     annotators: Sequence[AnnotatorActivity] | None = None, round_warnings: dict[int, list[str]] | None = None,
                     between_rounds: dict[int, int] | None = None) -> str:
    """The whole page. issues, near_copies, outliers: (round id, round number, total flagged, first rows); asks: by round id."""
    numbers = [r.number for r in progress.rounds]
    if progress.gates:
        gates_html = "".join(f'<div class="gate">{gate_chart(gate, numbers)}</div>' for gate in progress.gates)
    else:
        gates_html = '<p class="empty">No gate recorded yet.</p>'
    labels_html = stacked_bar_chart(
        "labels-by-source", "Labeled images per round, by source of the label",
        {source: values for source, values in progress.labels_by_source.items() if any(values)} or progress.labels_by_source,
        numbers, SOURCE_COLORS,
    ) if numbers else '<p class="empty">No round yet.</p>'
    f1 = reports.per_class_f1(progress)
    f1_html = multi_line_chart("per-class-f1", "F1 per class (test split)", f1, numbers) if f1 else '<p class="empty">No per-class F1 recorded yet.</p>'
    if confusion is not None:
        cm_round, cm = confusion
        cm_html = f"<h2>Confusion matrix · round {cm_round}</h2>{confusion_matrix_table(cm, cm_round)}"
    else:
        cm_html = '<h2>Confusion matrix</h2><p class="empty">No confusion matrix recorded yet.</p>'
    if issues is not None:
        issue_round_id, issue_round, total, rows = issues
        # the newest round that recorded label errors: when that is not the latest round, say so (it recorded none)
        newer = (f' <span class="issue-round-note">(round {latest.summary.number}, the latest, recorded none)</span>'
                 if latest is not None and latest.summary.number > issue_round else "")
        issues_html = (f"<h2>Label-issue queue · round {issue_round} ({total} flagged){newer}</h2>"
                       + issue_queue_table(rows, total, issue_round, issue_round_id, token_query))
    else:
        issues_html = '<h2>Label-issue queue</h2><p class="empty">No label issues recorded yet.</p>'
    near_copies_html = ""
    if near_copies is not None:  # the latest completed round's, when it looked for them
        copies_round_id, copies_round, copies_total, copies = near_copies
        near_copies_html = (f'<section id="near-copies"><h2>Near-copies · round {copies_round} ({copies_total} image{"" if copies_total == 1 else "s"})</h2>'
                            f'{near_copies_table(copies, copies_total, copies_round, copies_round_id, token_query)}</section>')
    if outliers is not None:
        outliers_round_id, outliers_round, outliers_total, found = outliers
        near_copies_html += (f'<section id="outliers"><h2>Outliers · round {outliers_round} ({outliers_total} image{"" if outliers_total == 1 else "s"})</h2>'
                             f'{outliers_table(found, outliers_total, outliers_round, outliers_round_id, token_query)}</section>')
    training_html = f'<section id="training">{training_section(latest)}</section>' if latest is not None else ""
    latest_html = ""
    if latest is not None and latest.gates:
        latest_html = f'<section><h2>Gates of round {latest.summary.number}</h2>{_gate_table(latest)}{_coverage_html(latest)}</section>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>defect-loop · {escape(progress.project_name)}</title><style>{STYLE}</style></head>
<body><header><h1>defect-loop · {escape(progress.project_name)}</h1><span class="sub">project {progress.project_id} · managers' dashboard · <a id="export" href="/projects/{progress.project_id}/export{token_query}" download>images, labels and predictions (CSV)</a></span></header>
<main>
<div class="cards">{_summary_cards(progress, latest, asks)}</div>
<section id="gates"><h2>Gates over rounds</h2><div class="grid">{gates_html}</div></section>
<section id="rounds"><h2>Rounds</h2>{rounds_table(progress, asks or {}, round_warnings, between_rounds)}</section>
<section id="annotators"><h2>Annotators</h2>{annotators_table(annotators or [])}</section>
<div class="two">
<section id="labels">{labels_html}</section>
<section id="f1">{f1_html}</section>
</div>
<div class="two">
<section id="confusion">{cm_html}</section>
{latest_html}
</div>
{training_html}
<section id="issues">{issues_html}</section>{near_copies_html}
</main></body></html>"""


@router.get(
    "/dashboard",
    response_class=HTMLResponse,
    # Errors are JSON even on this HTML route: say so, or the spec would claim text/html for them.
    responses={status: {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
               for status, description in ((401, "missing or invalid token"), (404, "no such project"))},
    summary="The managers' dashboard (HTML); open /dashboard?token=<read token> in a browser",
)
def dashboard(
    session: SessionDep,
    process: ProjectProcessDep,
    _scope: BrowserReadScope,
    token: Annotated[str | None, Query(description="read or full token (a browser sends no Authorization header)")] = None,
    project_id: Annotated[int | None, Query(ge=1, le=STORE_ID_MAX, description="default: the store's first project")] = None,
) -> HTMLResponse:
    project = reports.get_project_or_none(session, project_id) if project_id is not None else reports.default_project(session)
    if project is None:
        raise HTTPException(404, detail="no such project in this store" if project_id is not None else "no project in this store yet; run `loop init`")
    progress = reports.progress_series(session, project_id=project.id)
    assert progress is not None
    progress = dataclasses.replace(progress, rounds=[process.mark(r) for r in progress.rounds])
    latest_round = next((r for r in reversed(progress.rounds) if r.status == "completed"), progress.rounds[-1] if progress.rounds else None)
    latest = reports.round_report(session, round_id=latest_round.id) if latest_round else None
    if latest is not None:
        latest = dataclasses.replace(latest, summary=process.mark(latest.summary))
    cm_round = reports.latest_round_with_confusion_matrix(session, project_id=project.id)
    confusion = (cm_round.number, reports.confusion_matrix_of(cm_round.details)) if cm_round else None
    issue_round = reports.latest_round_with_issues(session, project_id=project.id)
    issues = None
    if issue_round is not None:
        page = reports.label_issue_queue(session, round_id=issue_round.id, limit=ISSUE_QUEUE_ROWS, offset=0, kind="label_error")
        issues = (issue_round.id, issue_round.number, page.total, page.items)
    near_copies = None
    if latest is not None and latest.summary.status == "completed" and latest.n_near_duplicates is not None:
        page = reports.label_issue_queue(session, round_id=latest.summary.id, limit=ISSUE_QUEUE_ROWS, offset=0, kind="near_duplicate")
        # the count the near-duplicates card gives (the stored rows stop at the strongest MAX_DATA_ISSUE_ROWS)
        near_copies = (latest.summary.id, latest.summary.number, max(page.total, latest.n_near_duplicates or 0), page.items)
    outliers = None
    if latest is not None and latest.summary.status == "completed" and latest.n_outliers is not None:
        page = reports.label_issue_queue(session, round_id=latest.summary.id, limit=ISSUE_QUEUE_ROWS, offset=0, kind="outlier")
        outliers = (latest.summary.id, latest.summary.number, max(page.total, latest.n_outliers or 0), page.items)
    token_query = f"?{urlencode({'token': token})}" if token else ""
    shown_round_ids = [r.id for r in progress.rounds[-ROUND_TABLE_ROWS:]]  # the rounds table's rows
    return HTMLResponse(render_dashboard(progress, latest=latest, confusion=confusion, issues=issues, token_query=escape(token_query),
                                         near_copies=near_copies, outliers=outliers,
                                         asks=reports.asks_by_round(session, project_id=project.id,  # answers counted for the rows shown
                                                                    answered_for=shown_round_ids),
                                         annotators=reports.annotator_activity(session, project_id=project.id),
                                         round_warnings=reports.round_warnings(session, project_id=project.id,
                                                                               round_ids=shown_round_ids),
                                         between_rounds=reports.events_between_rounds(session, project_id=project.id, round_ids=shown_round_ids)),
                    headers=DASHBOARD_HEADERS)


# The page carries its token in every link (review: no header kept it out of caches and Referer headers). It has no
# script; styles are inline; images are the API's own.
DASHBOARD_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
}
