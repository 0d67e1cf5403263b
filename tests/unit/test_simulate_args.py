"""`loop simulate` refuses settings no run can use up front: one line, exit 2, nothing written to --out."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app
from loop.config import ConfigError
from loop.simulate import SeedDraw, SimulationSettings, _check_draw
from loop.synthetic_images import write_class_folders


def _simulate(source: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["simulate", str(source), "--out", str(out), "--seeds", "1", "--max-rounds", "1", "--image-size", "32", *args])


def _assert_refused(result, out: Path, *expected: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "errors.pydantic.dev" not in text and "validation error" not in text, result.output
    assert all(part in text for part in expected), result.output
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))  # no ground_truth.csv, runs/, seed-0/


@pytest.mark.parametrize(("args", "expected"), [
    (["--seeds", "0"], ["--seeds 0", "at least 1"]),
    (["--noise", "1.5"], ["--noise 1.5", "from 0 up to, not including, 1"]),
    (["--noise", "-0.5"], ["--noise -0.5", "from 0 up to"]),
    (["--max-rounds", "0"], ["--max-rounds 0", "at least 1"]),
    (["--budget", "-5"], ["--budget -5", "0 or more"]),
    (["--relabel-budget", "-1"], ["--relabel-budget -1", "0 or more"]),
    (["--seed-labels", "0"], ["--seed-labels 0", "at least 1"]),
    (["--image-size", "8"], ["--image-size 8", "32"]),
    (["--pooling", "max"], ["--pooling 'max'", "'avg' or 'multilayer'"]),
    (["--strategies", ","], ["--strategies names no strategy"]),
    (["--strategies", "random,default,random"], ["--strategies names 'random' more than once"]),
    # more than the pool: capped silently before, the report saying the number asked for (QA)
    (["--seed-labels", "500"], ["--seed-labels 500: seed 0's pool outside the test split holds", "give at most"]),
])
def test_impossible_settings_are_refused_before_anything_is_written(class_folders: Path, tmp_path: Path, args: list[str], expected: list[str]) -> None:
    out = tmp_path / "sim"
    _assert_refused(_simulate(class_folders, out, *args), out, *expected)


def test_a_source_of_one_class_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source, out = tmp_path / "parts", tmp_path / "sim"
    write_class_folders(source, per_class={"good": 12}, size=32, seed=1)
    _assert_refused(_simulate(source, out, "--negative-class", "good"), out, "holds one class ['good']", "at least two classes")


def test_a_class_the_test_split_would_not_hold_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # a fifth of 2 images rounds to none: macro F1 would fail every round, and each run would say only "never" (review)
    source, out = tmp_path / "parts", tmp_path / "sim"
    write_class_folders(source, per_class={"good": 30, "scratch": 10, "crack": 2}, size=32, seed=1)
    _assert_refused(_simulate(source, out, "--negative-class", "good", "--seed-labels", "10"), out,
                    "seed 0's test split holds no image of 'crack'", "macro F1 gate could never pass")


def test_seed_labels_of_one_class_without_a_negative_class_are_refused_before_anything_is_written(class_folders: Path, tmp_path: Path) -> None:
    # one seed label is one class: round 1 could not train, and there is no negative class for a cold start
    out = tmp_path / "sim"
    _assert_refused(_simulate(class_folders, out, "--seed-labels", "1"), out, "--seed-labels 1: seed 0's seed labels are all", "two classes")


def _draw(given: dict[str, str], pool: int = 10) -> SeedDraw:
    pool_paths = [f"p{i}.png" for i in range(pool)]
    return SeedDraw(seed=3, test_paths=["t0.png", "t1.png"], pool_paths=pool_paths, seed_paths=set(given), given=given, flipped=0)


def _check(settings: SimulationSettings, draw: SeedDraw) -> None:
    _check_draw(settings, draw, truth={"t0.png": "good", "t1.png": "scratch"}, classes=["good", "scratch"])


def test_good_seed_labels_only_start_as_a_cold_start_which_needs_a_budget(tmp_path: Path) -> None:
    settings = SimulationSettings(source=tmp_path, out=tmp_path / "sim", strategies=["random"], negative_class="good", seed_labels=2)
    _check(settings, _draw({"p0.png": "good", "p1.png": "good"}))  # a cold start: round 1 asks for a batch
    _check(settings, _draw({"p0.png": "good", "p1.png": "scratch"}))
    settings.budget = 0
    with pytest.raises(ConfigError, match=r"seed 3's seed labels are all \['good'\].*--budget >= 1"):
        _check(settings, _draw({"p0.png": "good", "p1.png": "good"}))
    settings.budget, settings.negative_class = 20, None
    with pytest.raises(ConfigError, match="two classes"):
        _check(settings, _draw({"p0.png": "good", "p1.png": "good"}))


def test_which_seed_labels_are_flipped_does_not_depend_on_the_processs_hash_seed(tmp_path: Path) -> None:
    # the noise walked a set of paths: which labels it flipped changed from one process to the next
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from loop.simulate import SimulationSettings, _draw_seed\n"
        "truth = {f'/parts/{c}/{i:03d}.png': c for c in ('good', 'scratch', 'spot') for i in range(40)}\n"
        "settings = SimulationSettings(source=Path('/parts'), out=Path('/out'), strategies=['random'], seed_labels=30, noise=0.3)\n"
        "draw = _draw_seed(settings, 0, truth, None, ['good', 'scratch', 'spot'])\n"
        "print(json.dumps(sorted(draw.given.items())))\n"
    )
    draws = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        draws.append(json.loads(done.stdout))
    assert draws[0] == draws[1]
    truth_of = {path: path.split("/")[2] for path, _ in draws[0]}
    assert sum(label != truth_of[path] for path, label in draws[0]) == 9  # exactly 30% of 30 (QA: each flipped at random gave 4 of 12, 1 of 12)


def test_the_report_of_a_simulation_without_a_negative_class_says_it_has_no_fpr(tmp_path: Path) -> None:
    # QA: simulation.md printed the FPR table's header with no row under it
    from loop.simulate import _write_markdown

    run = {"seed": 0, "labels_to_pass_gates": 30, "stopped_by": "gates_passed", "flipped_seed_labels": 0,
           "curve": [{"labels_used": 30, "negative_fpr_interval": None}]}
    summary = {"labels_to_pass_gates": 30, "labels_to_pass_gates_at_least": None, "labels_to_pass_gates_per_seed": [30], "seeds_passing": 1,
               "seeds_passing_unsettled": 0, "runs": [run], "fewer_labels_than_random": 1.0, "fewer_labels_than_random_at_least": None}
    for negative, expected, absent in ((None, "FPR gate: not measured, the simulation has no negative class", "| strategy | rounds | over the gate"),
                                       ("good", "| strategy | rounds | over the gate", "not measured")):
        settings = SimulationSettings(source=tmp_path, out=tmp_path, strategies=["random"], negative_class=negative, seeds=1)
        _write_markdown(settings, {"strategies": {"random": summary}})
        report = (tmp_path / "simulation.md").read_text()
        assert expected in report and absent not in report, report


def test_an_earlier_simulations_results_in_the_out_folder_go_before_a_new_run_starts(tmp_path: Path) -> None:
    # QA: a run interrupted in the same --out left the earlier report beside its own runs, and a run with fewer
    # seeds kept the earlier seed-2/ and runs/*-seed2 folders: a folder that looked complete and did not match itself
    from rich.console import Console

    from loop.simulate import _remove_earlier_results

    out = tmp_path / "out"
    (out / "runs" / "tiles").mkdir(parents=True)  # a project of the user's (review: `--out .` in a folder of projects)
    (out / "seed-images").mkdir()
    (out / "ground_truth.csv").write_text("the user's")
    _remove_earlier_results(out, console=Console(quiet=True))  # no simulation wrote here: nothing goes
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["ground_truth.csv", "runs", "runs/tiles", "seed-images"]
    for name in ("simulation.json", "simulation.md", "gates_vs_labels.png"):
        (out / name).write_text("earlier")
    for folder in ("seed-0", "seed-2", "runs/random-seed2", "cache/embeddings"):
        (out / folder).mkdir(parents=True)
    for folder in ("seed-0", "seed-2"):
        (out / folder / "pool.csv").write_text("path,label\n")
    _remove_earlier_results(out, console=Console(quiet=True))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["cache", "cache/embeddings", "runs", "runs/tiles", "seed-images"]
    (out / "ground_truth.csv").write_text("a run interrupted before its report")
    (out / "seed-1").mkdir()
    (out / "seed-1" / "pool.csv").write_text("path,label\n")
    _remove_earlier_results(out, console=Console(quiet=True))
    assert not (out / "ground_truth.csv").exists() and not (out / "seed-1").exists() and (out / "runs" / "tiles").is_dir()


def test_the_report_writes_label_counts_as_counts_and_a_seed_that_never_passed_in_words(tmp_path: Path) -> None:
    # QA: the per-seed column printed Python's [None, None], and a lower bound read ">= 40.0" in one run, ">= 16" in another
    from loop.simulate import _write_markdown

    run = {"seed": 0, "labels_to_pass_gates": None, "stopped_by": "max_rounds", "flipped_seed_labels": 0, "curve": []}
    never = {"labels_to_pass_gates": None, "labels_to_pass_gates_at_least": 40.0, "labels_to_pass_gates_per_seed": [None, None], "seeds_passing": 0,
             "seeds_passing_unsettled": 0, "runs": [run, {**run, "seed": 1}], "fewer_labels_than_random": None, "fewer_labels_than_random_at_least": None}
    passed = {**never, "labels_to_pass_gates": 42.5, "labels_to_pass_gates_at_least": None, "labels_to_pass_gates_per_seed": [40, 45], "seeds_passing": 2,
              "seeds_passing_unsettled": 1}
    settings = SimulationSettings(source=tmp_path, out=tmp_path, strategies=["random", "default"], negative_class=None, seeds=2)
    _write_markdown(settings, {"strategies": {"random": never, "default": passed}})
    report = (tmp_path / "simulation.md").read_text()
    assert "| random | >= 40 | never, never | 0/2 | 0 |" in report and "| default | 42.5 | 40, 45 | 2/2 | 1 |" in report, report
    # a seed passed on a gate its test split could not settle (QA: the headline hid it): said under the table
    assert "A pass on a gate the test split cannot settle" in report


def test_the_report_bounds_the_ratio_of_a_strategy_that_never_passed_where_random_did(tmp_path: Path) -> None:
    # review: the "x fewer than random" cell was empty; what random needed over what this one used without passing
    # bounds it from above
    from loop.simulate import _write_markdown

    run = {"seed": 0, "labels_to_pass_gates": None, "stopped_by": "max_rounds", "flipped_seed_labels": 0, "curve": []}
    passed = {"labels_to_pass_gates": 100, "labels_to_pass_gates_at_least": None, "labels_to_pass_gates_per_seed": [100], "seeds_passing": 1,
              "seeds_passing_unsettled": 0, "runs": [run], "fewer_labels_than_random": 1.0, "fewer_labels_than_random_at_least": None,
              "fewer_labels_than_random_at_most": None}
    never = {**passed, "labels_to_pass_gates": None, "labels_to_pass_gates_at_least": 200, "labels_to_pass_gates_per_seed": [None], "seeds_passing": 0,
             "fewer_labels_than_random": None, "fewer_labels_than_random_at_most": 0.5}
    settings = SimulationSettings(source=tmp_path, out=tmp_path, strategies=["random", "margin"], negative_class=None, seeds=1, relabel_budget=5)
    _write_markdown(settings, {"strategies": {"random": passed, "margin": never}})
    report = (tmp_path / "simulation.md").read_text()
    assert "| margin | >= 200 | never | 0/1 | 0 | <= 0.50 |" in report, report
    assert "the relabel answers (up to 5 a round, on images already counted) are not in them" in report


def test_byte_identical_files_are_one_image_to_draw_seed_labels_from(tmp_path: Path) -> None:
    # QA: a seed label drawn on the second of two byte-identical files was lost when ingest merged them (12 seed labels
    # asked, 11 used), and the pool size in messages counted both
    import shutil

    from loop.ingest import discover_source
    from loop.simulate import _one_path_per_image

    folders = write_class_folders(tmp_path / "parts", per_class={"good": 3, "scratch": 2}, size=32, seed=1)
    copy = tmp_path / "parts" / "scratch" / "copy.png"
    shutil.copy(folders["good"][0], copy)  # the same bytes under another class
    _layout, files, _notes = discover_source(tmp_path / "parts", unlabeled=False)
    truth = _one_path_per_image(files)
    assert len(files) == 6 and len(truth) == 5 and str(copy.resolve()) not in truth


def test_files_ingest_would_quarantine_are_left_out_before_seed_labels_are_drawn(tmp_path: Path) -> None:
    # QA: one of "32 seed labels" was a corrupt file; round 1 trained on 31, and the pool size counted it
    from rich.console import Console

    from loop.ingest import discover_source
    from loop.simulate import _one_path_per_image

    write_class_folders(tmp_path / "parts", per_class={"good": 3, "scratch": 2}, size=32, seed=1)
    corrupt = tmp_path / "parts" / "good" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    _layout, files, _notes = discover_source(tmp_path / "parts", unlabeled=False)
    console = Console(record=True, width=200)
    truth = _one_path_per_image(files, console=console)
    assert len(files) == 6 and len(truth) == 5 and str(corrupt.resolve()) not in truth
    said = " ".join(console.export_text().split())
    assert "left out 1 file ingest would quarantine" in said and "corrupt.png (cannot decode" in said, said
