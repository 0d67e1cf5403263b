"""`loop simulate`: acquisition strategies compared in one run on a fully labeled folder.

The labels hide behind the oracle annotator. For every seed 0..N-1 (no seed picking) a stratified test split is
drawn and labeled by the oracle (the measuring stick only: no strategy sees it, it is not counted), and a random
seed set of the remaining images is labeled (with symmetric noise if asked). Every strategy then starts from the
same test split and seed labels, in its own project, and runs real `loop round`s until the quality gates (macro F1,
defect recall, FPR) pass on the test split or the pool is exhausted. `labels_to_pass_gates` counts the labels used
for training and validation, seed labels included.
"""
from __future__ import annotations

import collections
import csv
import json
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy import select

from loop.config import AnnotatorConfig, ConfigError, LoopConfig, ModelConfig, ProjectConfig, check_strategy_name, save_config
from loop.ingest import assign_splits, discover_source, ingest_source, inspect_file
from loop.project import create_project_store, default_store_url, open_project
from loop.round import RoundOptions, run_round
from modeling.plots import plot_gate_panels
from store import session_scope
from store.models import Image, LabelIssue, Round
from store.queries import current_labels
from store.reports import unsettled_gates_of

QUALITY_GATES = ("macro_f1", "defect_recall", "negative_fpr")


@dataclass
class SimulationSettings:
    source: Path
    out: Path
    strategies: list[str]
    negative_class: str | None = None
    seed_labels: int = 40
    budget: int = 20
    seeds: int = 5
    noise: float = 0.0
    relabel_budget: int = 0
    max_rounds: int = 60
    train: str = "head"
    image_size: int = 224
    pooling: str = "multilayer"  # of the frozen embeddings (loop.toml [model] pooling)
    stop_when_gates_pass: bool = True


@dataclass
class RunRecord:
    strategy: str
    seed: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    labels_to_pass_gates: int | None = None
    flipped_seed_labels: int = 0
    stopped_by: str = "max_rounds"  # gates_passed | pool_exhausted | no_budget | max_rounds (then "never passed" only means "not by then")


def _write_manifest(path: Path, rows: list[tuple[str, str]], parts: dict[str, str | None] | None = None) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if parts:
            writer.writerow(["path", "label", "part"])
            writer.writerows((image, label, parts.get(image) or "") for image, label in rows)
        else:
            writer.writerow(["path", "label"])
            writer.writerows(rows)
    return path


@dataclass
class SeedDraw:
    """One seed's test split and seed labels: drawn for every seed before anything is written, so a draw no round
    could start from is refused up front."""
    seed: int
    test_paths: list[str]
    pool_paths: list[str]
    seed_paths: set[str]
    given: dict[str, str]  # seed label per seed path, after the noise
    flipped: int


def _check_settings(settings: SimulationSettings) -> None:
    """Refuse numbers no simulation can use: they used to run to a normal-looking report (seeds 0..-1, all labels
    flipped) or fail after seed-0/ was written."""
    for option, value, ok, allowed in (
        ("--seeds", settings.seeds, settings.seeds >= 1, "at least 1"),
        # not 0: round 1 trains on the seed labels, and even a cold start needs labeled good parts
        ("--seed-labels", settings.seed_labels, settings.seed_labels >= 1, "at least 1 (round 1 trains on them)"),
        ("--budget", settings.budget, settings.budget >= 0, "0 or more"),  # 0: how far the seed labels alone get ("no_budget")
        ("--relabel-budget", settings.relabel_budget, settings.relabel_budget >= 0, "0 or more"),
        ("--max-rounds", settings.max_rounds, settings.max_rounds >= 1, "at least 1"),
        ("--noise", settings.noise, 0 <= settings.noise < 1, "from 0 up to, not including, 1 (the share of seed labels flipped, rounded to a whole number of labels)"),
    ):
        if not ok:
            raise ConfigError(f"{option} {value}: must be {allowed}")
    try:  # loop.toml's own limits (image size 32..1024, known pooling and training): one source of truth
        ModelConfig(train=settings.train, image_size=settings.image_size, pooling=settings.pooling)
    except ValidationError as error:
        options = {"image_size": "--image-size", "pooling": "--pooling"}
        raise ConfigError("; ".join(f"{options.get(str(e['loc'][0]), e['loc'][0])} {e['input']!r}: {e['msg']}" for e in error.errors())) from None
    if not settings.strategies:
        raise ConfigError("--strategies names no strategy: give at least one, e.g. random,default")
    repeated = sorted({name for name in settings.strategies if settings.strategies.count(name) > 1})
    if repeated:  # both runs would share runs/<strategy>-seed<n>/ and one report row
        raise ConfigError(f"--strategies names {', '.join(map(repr, repeated))} more than once: {','.join(settings.strategies)}")
    for name in settings.strategies:  # before any run: a typo in the last name used to fail after every other strategy's seed-0 run
        check_strategy_name(name)


def _one_path_per_image(files: list, *, console: Console | None = None) -> dict[str, str]:  # noqa: ANN001 - loop.ingest.SourceFile
    """path -> label, one path per distinct file content: byte-identical files are one image to the loop (ingest
    merges them), so a seed label drawn on the second copy was lost in the merge and the counts were off by one (QA).
    Files ingest would quarantine (undecodable, too small) are left out before anything is drawn (QA: one of "32 seed
    labels" was a corrupt file, and round 1 trained on 31)."""
    seen: set[str] = set()
    truth: dict[str, str] = {}
    left_out: list[str] = []
    for f in files:
        if not f.path.is_file():
            truth.setdefault(str(f.path.resolve()), f.label)
            continue
        check = inspect_file(f.path)
        if check.reason is not None:
            left_out.append(f"{f.path} ({check.reason})")
        elif check.sha256 not in seen:
            seen.add(check.sha256)
            truth[str(f.path.resolve())] = f.label
    if left_out and console is not None:
        console.print(f"left out {len(left_out)} file{'' if len(left_out) == 1 else 's'} ingest would quarantine: {escape('; '.join(left_out[:3]))}"
                      + (f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""))
    return truth


def _draw_seed(settings: SimulationSettings, seed: int, truth: dict[str, str], parts: dict[str, str] | None, classes: list[str]) -> SeedDraw:
    splits = assign_splits(truth, test_fraction=0.2, validation_fraction=0.0, seed=seed, parts=parts)
    test_paths = sorted(p for p, s in splits.items() if s == "test")
    pool_paths = sorted(p for p, s in splits.items() if s != "test")
    if settings.seed_labels > len(pool_paths):  # capped silently, the report recorded the number asked for (QA)
        raise ConfigError(f"--seed-labels {settings.seed_labels}: seed {seed}'s pool outside the test split holds {len(pool_paths)} images; "
                          f"give at most {len(pool_paths)}")
    rng = np.random.default_rng(seed)
    seed_paths = set(rng.choice(pool_paths, size=settings.seed_labels, replace=False).tolist())
    # exactly round(noise x seed labels) flipped, as label_noise_neu.py does (QA: each label flipped with probability
    # `noise` gave 4 of 12 and 1 of 12 for --noise 0.2); sorted: a set's order changed with Python's hash seed per process
    ordered = sorted(seed_paths)
    to_flip = set(rng.choice(len(ordered), size=int(round(settings.noise * len(ordered))), replace=False).tolist())
    given = {}
    for position, path in enumerate(ordered):
        label = truth[path]
        given[path] = str(rng.choice([c for c in classes if c != label])) if position in to_flip else label
    return SeedDraw(seed, test_paths, pool_paths, seed_paths, given, len(to_flip))


def _check_draw(settings: SimulationSettings, draw: SeedDraw, *, truth: dict[str, str], classes: list[str]) -> None:
    """What loop round needs to start (loop.round.gather_labeled_pool), asked of the draw before any run."""
    if not draw.test_paths:
        raise ConfigError(f"{settings.source}: seed {draw.seed} draws an empty test split (too few images): give each class at least 3 images")
    in_test = {truth[path] for path in draw.test_paths}
    unmeasured = [name for name in classes if name not in in_test]
    if unmeasured:  # macro F1 fails every round then: each run would go on to --max-rounds and say only "never" (review)
        raise ConfigError(f"{settings.source}: seed {draw.seed}'s test split holds no image of {', '.join(map(repr, unmeasured))} (a fifth of "
                          "each class is drawn, by part where parts are given), so the macro F1 gate could never pass: give each class at "
                          "least 3 images (3 parts)")
    present = set(draw.given.values())
    if len(present) >= 2:
        return
    # only good parts labeled: round 1 is a cold start, which needs a batch to ask for
    cold_start = (settings.negative_class is not None and present == {settings.negative_class} and settings.budget >= 1
                  and len(draw.pool_paths) > len(draw.seed_paths))
    if not cold_start:
        also = f", or only {settings.negative_class!r} ones with --budget >= 1 (a cold start)" if settings.negative_class else ""
        raise ConfigError(f"--seed-labels {settings.seed_labels}: seed {draw.seed}'s seed labels are all {sorted(present)}; round 1 needs "
                          f"seed labels of two classes{also}: give more seed labels")


def simulate(settings: SimulationSettings, *, console: Console) -> dict[str, Any]:
    _check_settings(settings)
    # absolute: each run's project resolves relative paths (the oracle's ground truth) against its own directory
    settings.out = settings.out.expanduser().resolve()
    layout, files, _notes = discover_source(settings.source.expanduser().resolve(), unlabeled=False, needs_labels=True)
    truth = _one_path_per_image(files, console=console)
    # A CSV source may name each photo's physical part: the test split then holds whole parts, and so do the folds.
    parts = {str(f.path.resolve()): f.part for f in files if f.part} or None
    classes = sorted(set(truth.values()))
    if len(classes) < 2:
        raise ConfigError(f"{settings.source} holds one class {classes}: a simulation needs labeled images of at least two classes")
    if settings.negative_class:
        if settings.negative_class not in classes:
            raise ValueError(f"--negative-class {settings.negative_class!r} is not a class of {settings.source}: {classes}")
        classes.remove(settings.negative_class)
        classes.insert(0, settings.negative_class)
    draws = [_draw_seed(settings, seed, truth, parts, classes) for seed in range(settings.seeds)]
    for draw in draws:
        _check_draw(settings, draw, truth=truth, classes=classes)
    settings.out.mkdir(parents=True, exist_ok=True)
    _remove_earlier_results(settings.out, console=console)
    runs_dir = settings.out / "runs"
    ground_truth = _write_manifest(settings.out / "ground_truth.csv", sorted(truth.items()))
    shared_cache = settings.out / "cache"
    records: list[RunRecord] = []
    for draw in draws:
        seed, test_paths, pool_paths, seed_paths, given, flipped = draw.seed, draw.test_paths, draw.pool_paths, draw.seed_paths, draw.given, draw.flipped
        seed_dir = settings.out / f"seed-{seed}"
        seed_dir.mkdir(exist_ok=True)
        test_manifest = _write_manifest(seed_dir / "test.csv", [(p, truth[p]) for p in test_paths], parts)
        pool_manifest = _write_manifest(seed_dir / "pool.csv", [(p, given.get(p, "")) for p in pool_paths], parts)
        flipped_paths = {p for p in seed_paths if given[p] != truth[p]}
        for strategy in settings.strategies:
            console.print(f"[bold]seed {seed}[/] · strategy [bold]{strategy}[/] · {len(seed_paths)} seed labels ({flipped} flipped) · test split {len(test_paths)}")
            records.append(_run_one(settings, strategy=strategy, seed=seed, classes=classes, ground_truth=ground_truth, test_manifest=test_manifest,
                                    pool_manifest=pool_manifest, project_dir=runs_dir / f"{strategy}-seed{seed}", shared_cache=shared_cache,
                                    flipped_paths=flipped_paths, console=console))
    return _report(settings, records, classes, layout)


REPORT_FILES = ("simulation.json", "simulation.md", "gates_vs_labels.png", "ground_truth.csv")


def _remove_earlier_results(out: Path, *, console: Console) -> None:
    """An earlier simulation's results in `out` go before this one starts (its cache stays): an interrupted run, or
    one with fewer seeds, left them beside its own, a report that did not match its runs (QA). Only what a simulation
    writes, and only in a folder one wrote to (its report, or its ground truth with a seed's pool): `--out .` in a
    folder of projects (`runs/tiles`) or of images (`seed-images/`) loses nothing (review)."""
    seed_dirs = [path for path in sorted(out.glob("seed-*")) if path.is_dir() and re.fullmatch(r"seed-\d+", path.name) and (path / "pool.csv").is_file()]
    if not (out / "simulation.json").is_file() and not ((out / "ground_truth.csv").is_file() and seed_dirs):
        return
    runs = [path for path in sorted((out / "runs").glob("*-seed*")) if path.is_dir() and re.fullmatch(r".+-seed\d+", path.name)] if (out / "runs").is_dir() else []
    earlier = [out / name for name in REPORT_FILES if (out / name).is_file()] + seed_dirs + runs
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if (out / "runs").is_dir() and not any((out / "runs").iterdir()):
        (out / "runs").rmdir()
    console.print(f"the results of an earlier simulation in {out} were removed ({len(earlier)} files and folders; its cache is kept)")


def _run_one(settings: SimulationSettings, *, strategy: str, seed: int, classes: list[str], ground_truth: Path, test_manifest: Path, pool_manifest: Path,
             project_dir: Path, shared_cache: Path, flipped_paths: set[str], console: Console) -> RunRecord:
    shutil.rmtree(project_dir, ignore_errors=True)
    project_dir.mkdir(parents=True)
    config = ProjectConfig(
        name=project_dir.name, classes=classes, negative_class=settings.negative_class,
        model=ModelConfig(train=settings.train, image_size=settings.image_size, pooling=settings.pooling),
        # data_issues on, as in a project: its near-copy check keeps a pool copy of a test image out of training (review:
        # turned off here, a strategy could label the copies of the test images it got wrong and pass on them)
        loop=LoopConfig(budget_per_round=settings.budget, strategy=strategy, relabel_budget=settings.relabel_budget, seed=seed),
        annotator=AnnotatorConfig(backend="oracle", oracle_manifest=str(ground_truth)),
    )
    # each run its own scratch SQLite store, whatever LOOP_DATABASE_URL says: runs must not share one
    url = create_project_store(project_dir, config, database_url=default_store_url(project_dir))
    config.database_url = url  # the run's loop.toml names its own store (LOOP_DATABASE_URL still wins for loop status there)
    save_config(project_dir, config)
    ctx = open_project(project_dir, database_url=url)
    ingest_source(ctx, test_manifest, split="test", show_progress=False)
    ingest_source(ctx, pool_manifest, split="train", show_progress=False)
    record = RunRecord(strategy, seed, flipped_seed_labels=len(flipped_paths))
    options = RoundOptions(show_progress=False, measure_latency=False, write_artifacts=False, embedding_cache_dir=shared_cache)
    quiet = Console(quiet=True)
    for _ in range(settings.max_rounds):
        outcome = run_round(ctx, options, console=quiet)
        counts = outcome.details["labeled_counts"]
        gates = {g.name: g for g in outcome.gates}  # none in a cold start (only good parts among the seed labels): no model yet
        quality = [gates[name] for name in QUALITY_GATES if name in gates and gates[name].applicable]
        passed = bool(quality) and all(g.passed for g in quality)
        point = {
            "round": outcome.number, "labels_used": counts["train"] + counts["validation"], "unlabeled": counts["unlabeled"],
            **{name: gates[name].value if name in gates else None for name in QUALITY_GATES}, "accuracy": outcome.metrics.get("accuracy"),
            "quality_gates_pass": passed, "cold_start": bool(outcome.details.get("cold_start")),
            "seconds": round(outcome.timings_s.get("total", 0.0), 2),
            "gate_thresholds": {name: gates[name].threshold if name in gates else None for name in QUALITY_GATES},
            # gates the test split cannot settle (90% interval across the threshold): a pass there is partly luck (QA)
            "unsettled_gates": unsettled_gates_of(outcome.details, quality),
        }
        fpr_interval = outcome.details.get("test_intervals", {}).get("negative_fpr")
        if fpr_interval and fpr_interval.get("low") is not None:  # what the test split can resolve (parts count once)
            point.update(negative_fpr_interval=[round(fpr_interval["low"], 4), round(fpr_interval["high"], 4)],
                         negative_fpr_settled=fpr_interval["settled"], test_good_parts=fpr_interval["n_parts"], negative_fpr_max=gates["negative_fpr"].threshold)
        if flipped_paths:
            point.update(_label_issue_quality(ctx, outcome.round_id, flipped_paths))
        record.curve.append(point)
        shown = " · ".join(f"{name} {'n/a' if point[name] is None else f'{point[name]:.3f}'}" for name in QUALITY_GATES)
        console.print(f"  round {outcome.number}: {point['labels_used']} labels · {shown} · {'[green]gates pass[/]' if passed else 'gates fail'}")
        if passed and record.labels_to_pass_gates is None:
            record.labels_to_pass_gates = point["labels_used"]
            if settings.stop_when_gates_pass:
                record.stopped_by = "gates_passed"
                break
        if counts["unlabeled"] == 0 or settings.budget == 0 and settings.relabel_budget == 0:
            record.stopped_by = "pool_exhausted" if counts["unlabeled"] == 0 else "no_budget"
            break
    return record


def _label_issue_quality(ctx, round_id: int, flipped_paths: set[str]) -> dict[str, Any]:  # noqa: ANN001
    """Precision and recall of this round's suspects against the seed labels known to be wrong and still wrong."""
    with session_scope(ctx.engine) as session:
        labels = current_labels(session, session.get(Round, round_id).project_id)
        images = {i.id: i for i in session.scalars(select(Image))}
        still_wrong = {i.id for i in images.values() if i.path in flipped_paths and labels.get(i.id) and labels[i.id].source == "import"}
        flagged = {row.image_id for row in session.scalars(select(LabelIssue).where(LabelIssue.round_id == round_id, LabelIssue.kind == "label_error"))}
    hits = len(flagged & still_wrong)
    return {
        "wrong_labels_remaining": len(still_wrong), "suspects_flagged": len(flagged),
        "suspect_precision": hits / len(flagged) if flagged else None, "suspect_recall": hits / len(still_wrong) if still_wrong else None,
    }


def _report(settings: SimulationSettings, records: list[RunRecord], classes: list[str], layout: str) -> dict[str, Any]:
    per_strategy: dict[str, Any] = {}
    for strategy in settings.strategies:
        runs = [r for r in records if r.strategy == strategy]
        needed = [r.labels_to_pass_gates for r in runs]
        reached = [n for n in needed if n is not None]
        # A seed that never passed counts as "more than everything it used": the median stays honest, and when the
        # median seed did not pass it is reported as null with a lower bound (JSON has no infinity).
        median = statistics.median([n if n is not None else float("inf") for n in needed]) if needed else None
        used = [n if n is not None else (r.curve[-1]["labels_used"] if r.curve else 0) for n, r in zip(needed, runs)]
        per_strategy[strategy] = {
            "labels_to_pass_gates": median if median is not None and np.isfinite(median) else None,
            "labels_to_pass_gates_at_least": statistics.median(used) if median is not None and not np.isfinite(median) else None,
            "labels_to_pass_gates_per_seed": needed,
            "seeds_passing": len(reached),
            # seeds whose passing round had a gate the test split could not settle: the label count is partly luck
            "seeds_passing_unsettled": sum(bool(next((p for p in r.curve if p["quality_gates_pass"]), {}).get("unsettled_gates")) for r in runs),
            "runs": [{"seed": r.seed, "labels_to_pass_gates": r.labels_to_pass_gates, "stopped_by": r.stopped_by,
                      "flipped_seed_labels": r.flipped_seed_labels, "curve": r.curve} for r in runs],
        }
    baseline = per_strategy.get("random", {})
    for strategy, summary in per_strategy.items():
        value = summary["labels_to_pass_gates"]
        summary["fewer_labels_than_random"] = baseline["labels_to_pass_gates"] / value if value and baseline.get("labels_to_pass_gates") else None
        # random never passed: the ratio is at least (what random used without passing) / (what this one needed)
        summary["fewer_labels_than_random_at_least"] = (baseline["labels_to_pass_gates_at_least"] / value
                                                        if value and baseline.get("labels_to_pass_gates_at_least") else None)
        # this one never passed, random did: the ratio is at most (what random needed) / (what this one used without passing)
        at_least = summary["labels_to_pass_gates_at_least"]
        summary["fewer_labels_than_random_at_most"] = (baseline["labels_to_pass_gates"] / at_least
                                                       if at_least and baseline.get("labels_to_pass_gates") else None)
    result = {
        "source": str(settings.source), "layout": layout, "classes": classes, "negative_class": settings.negative_class,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items()},
        "strategies": per_strategy,
    }
    (settings.out / "simulation.json").write_text(json.dumps(result, indent=2, allow_nan=False, default=str))  # strict JSON
    _write_markdown(settings, result)
    _plot(settings, per_strategy)
    return result


def _count(value: float) -> str:
    """A label count as the table shows it: 40, not 40.0 (a median of an even number of seeds is a float), 42.5 when halfway."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _write_markdown(settings: SimulationSettings, result: dict[str, Any]) -> None:
    lines = [f"# loop simulate on `{settings.source}`", "",
             f"seed labels {settings.seed_labels}, +{settings.budget} per round, seeds 0..{settings.seeds - 1}, noise {settings.noise}, "
             f"relabel budget {settings.relabel_budget}; quality gates: {', '.join(QUALITY_GATES)} on the test split (not counted).", "",
             "| strategy | labels to pass gates (median) | per seed | seeds passing | of them, a gate the test split cannot settle | x fewer than random | runs stopped by |",
             "|---|---|---|---|---|---|---|"]
    for name, s in result["strategies"].items():
        ratio, at_least = s["fewer_labels_than_random"], s["fewer_labels_than_random_at_least"]
        at_most = s.get("fewer_labels_than_random_at_most")
        ratio_text = (f"{ratio:.2f}" if ratio is not None else f">= {at_least:.2f}" if at_least is not None
                      else f"<= {at_most:.2f}" if at_most is not None
                      # an empty cell read as a missing figure (QA): say why there is none
                      else "baseline" if name == "random" else "unknown: neither passed" if "random" in result["strategies"] else "no random run")
        median_text = (_count(s["labels_to_pass_gates"]) if s["labels_to_pass_gates"] is not None
                       else f">= {_count(s['labels_to_pass_gates_at_least'])}" if s["labels_to_pass_gates_at_least"] is not None else "no runs")
        per_seed = ", ".join("never" if n is None else _count(n) for n in s["labels_to_pass_gates_per_seed"])  # QA: Python's [None, None]
        stops = ", ".join(f"{reason} {count}" for reason, count in sorted(collections.Counter(run["stopped_by"] for run in s["runs"]).items()))
        lines.append(f"| {name} | {median_text} | {per_seed} | {s['seeds_passing']}/{settings.seeds} | {s.get('seeds_passing_unsettled', 0)} | {ratio_text} | {stops} |")
    if any(s.get("seeds_passing_unsettled") for s in result["strategies"].values()):
        lines += ["", "A pass on a gate the test split cannot settle (its 90% interval, a part's photos as one draw, holds both verdicts) "
                      "is partly the test split's luck: such a label count may be too low, as a larger test split could fail the gate there."]
    if settings.relabel_budget:  # annotation work all the same, and how much of it depends on the strategy (review)
        lines += ["", f"Label counts are the training and validation images labeled; the relabel answers (up to {settings.relabel_budget} a round, "
                      "on images already counted) are not in them."]
    if any(run["stopped_by"] == "max_rounds" for s in result["strategies"].values() for run in s["runs"]):
        lines += ["", f"Runs stopped by `--max-rounds {settings.max_rounds}` did not exhaust the pool: \"never passed\" means not by then."]
    if settings.negative_class is None:  # no "no defect" class: no FPR to tabulate (QA: an empty table under its header)
        lines += ["", "FPR gate: not measured, the simulation has no negative class (`--negative-class`)."]
        (settings.out / "simulation.md").write_text("\n".join(lines) + "\n")
        return
    lines += ["", "FPR gate per round, on the test split (90% interval, a part's photos as one draw):", "",
              "| strategy | rounds | over the gate | settled: under / over | cannot tell | good parts in the test split |", "|---|---|---|---|---|---|"]
    for name, s in result["strategies"].items():
        points = [p for run in s["runs"] for p in run["curve"] if p.get("negative_fpr_interval")]
        if not points:
            continue
        over = sum(p["negative_fpr"] > p["negative_fpr_max"] for p in points)
        under_settled = sum(p["negative_fpr_settled"] and p["negative_fpr_interval"][1] <= p["negative_fpr_max"] for p in points)
        over_settled = sum(p["negative_fpr_settled"] and p["negative_fpr_interval"][0] >= p["negative_fpr_max"] for p in points)
        parts = sorted({p["test_good_parts"] for p in points})
        lines.append(f"| {name} | {len(points)} | {over} | {under_settled} / {over_settled} | {len(points) - under_settled - over_settled} | "
                     f"{', '.join(map(str, parts))} |")
    (settings.out / "simulation.md").write_text("\n".join(lines) + "\n")


def _plot(settings: SimulationSettings, per_strategy: dict[str, Any]) -> None:
    """One panel per quality gate (macro F1, defect recall, FPR on the good class), its threshold as a line."""
    # without a negative class only macro F1 is measured (QA: two empty panels with meaningless axes)
    gates = QUALITY_GATES if settings.negative_class else tuple(gate for gate in QUALITY_GATES if gate == "macro_f1")
    panels: dict[str, dict[str, tuple[list[int], list[float | None]]]] = {name: {} for name in gates}
    thresholds: dict[str, float | None] = dict.fromkeys(gates)
    for strategy, summary in per_strategy.items():
        for run in summary["runs"]:
            for gate in gates:
                panels[gate][f"{strategy} seed {run['seed']}"] = ([p["labels_used"] for p in run["curve"]], [p[gate] for p in run["curve"]])
                for point in run["curve"]:
                    if (point.get("gate_thresholds") or {}).get(gate) is not None:  # a cold-start round has none
                        thresholds[gate] = point["gate_thresholds"][gate]
    plot_gate_panels(panels=panels, thresholds=thresholds, path=settings.out / "gates_vs_labels.png",
                     title="quality gates on the test split vs labels used (train + validation), per strategy and seed")
