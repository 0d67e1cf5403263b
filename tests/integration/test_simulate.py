"""`loop simulate` end to end on small synthetic class folders: real rounds, the oracle, both strategies in one run."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.project import open_project
from loop.synthetic_images import write_class_folders
from store import session_scope
from store.models import Round, Selection
from store.queries import current_labels


def test_simulate_runs_every_strategy_on_the_same_split_and_keeps_picked_good_parts_apart(tmp_path: Path) -> None:
    source = tmp_path / "parts"
    write_class_folders(source, per_class={"good": 120, "scratch": 25, "spot": 25, "patch": 15}, size=48, seed=3)
    out = tmp_path / "sim"
    result = CliRunner().invoke(app, [
        "simulate", str(source), "--out", str(out), "--negative-class", "good", "--strategies", "random,default",
        "--seed-labels", "40", "--budget", "20", "--seeds", "1", "--max-rounds", "3", "--all-rounds", "--image-size", "64",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    def no_infinity(constant: str) -> None:
        raise AssertionError(f"simulation.json is not strict JSON: {constant}")

    report = json.loads((out / "simulation.json").read_text(), parse_constant=no_infinity)
    assert list(report["strategies"]) == ["random", "default"] and report["classes"][0] == "good"
    for summary in report["strategies"].values():
        (run,) = summary["runs"]
        # Seed labels first, then one budget per round; the test split (37 images) is never counted.
        assert [p["labels_used"] for p in run["curve"]] == [40, 60, 80]
        assert all(0.0 <= p["macro_f1"] <= 1.0 for p in run["curve"])
        assert run["stopped_by"] == "max_rounds"  # --all-rounds, 3 rounds, pool left
        if summary["seeds_passing"] == 0:  # the median is "more than what was used", not infinity
            assert summary["labels_to_pass_gates"] is None and summary["labels_to_pass_gates_at_least"] == 80
        assert run["curve"][0]["gate_thresholds"]["negative_fpr"] == 0.03
    assert "did not exhaust the pool" in (out / "simulation.md").read_text()
    assert (out / "gates_vs_labels.png").read_bytes()[:4] == b"\x89PNG"
    assert "| default |" in (out / "simulation.md").read_text()

    for strategy in ("random", "default"):
        ctx = open_project(out / "runs" / f"{strategy}-seed0")
        with session_scope(ctx.engine) as session:
            last = session.scalars(select(Round).where(Round.number == 3)).one()
            labels = current_labels(session, last.project_id)
            picked = {s.image_id for s in session.scalars(select(Selection).where(Selection.round_id != last.id))}
            picked_good = sum(1 for image_id in picked if labels[image_id].label == "good")
        choice = last.details["threshold_choice"]
        if strategy == "random":  # a random sample stands for the pool: the plain rule on every labeled good part
            assert choice["rule"] == "all_negatives" and choice["n_picked_negatives"] == 0
        else:  # the good parts earlier `default` batches asked about are counted apart from the 40 seed labels
            assert picked_good >= 1  # by round 3 `default` has asked about good parts in this fixture
            assert choice["n_picked_negatives"] == picked_good and choice["n_sampled_negatives"] >= 20
            # the decision keeps the estimate under the gate but for one sampled good part it forgives, which the
            # estimate counts (a random sample's share is what it says of the unlabeled ones)
            assert choice["rule"] == "stratified" and 0.0 <= choice["estimated_population_fpr"] <= 0.03 + 1 / choice["n_sampled_negatives"]


def test_simulate_from_a_manifest_with_parts_keeps_each_part_on_one_side(tmp_path: Path) -> None:
    """Each part photographed twice (a CSV `part` column): the test split holds whole parts, and the rounds' folds
    and the good parts' anomaly scores are by part."""
    import csv

    folders = tmp_path / "parts"
    write_class_folders(folders, per_class={"good": 80, "scratch": 20, "spot": 20}, size=48, seed=4)
    manifest = tmp_path / "photos.csv"
    part_of = {}
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "part"])
        for class_dir in sorted(folders.iterdir()):
            for index, path in enumerate(sorted(class_dir.glob("*.png"))):
                part_of[str(path.resolve())] = f"{class_dir.name}-{index // 2}"
                writer.writerow([str(path), class_dir.name, part_of[str(path.resolve())]])
    out = tmp_path / "sim"
    result = CliRunner().invoke(app, [
        "simulate", str(manifest), "--out", str(out), "--negative-class", "good", "--strategies", "default",
        "--seed-labels", "40", "--budget", "10", "--seeds", "1", "--max-rounds", "2", "--all-rounds", "--image-size", "64",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    def parts_in(name: str) -> set[str]:
        with open(out / "seed-0" / name, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert all(row["part"] == part_of[row["path"]] for row in rows)
        return {row["part"] for row in rows}

    test_parts, pool_parts = parts_in("test.csv"), parts_in("pool.csv")
    assert test_parts and pool_parts and not test_parts & pool_parts
    ctx = open_project(out / "runs" / "default-seed0")
    with session_scope(ctx.engine) as session:
        last = session.scalars(select(Round).where(Round.number == 2)).one()
    assert last.details["out_of_fold"]["grouped_by_part"] is True
    assert last.details["anomaly"]["good_part_scores"] == "leave-one-part-out"
    # the test split's FPR and recall intervals count a part's two photos as one draw
    fpr = last.details["test_intervals"]["negative_fpr"]
    with open(out / "seed-0" / "test.csv", newline="") as handle:
        good_test = [row for row in csv.DictReader(handle) if row["label"] == "good"]
    assert fpr["n_images"] == len(good_test) and fpr["n_parts"] == len({row["part"] for row in good_test}) < fpr["n_images"]
    assert fpr["low"] <= fpr["value"] <= fpr["high"] and isinstance(fpr["settled"], bool)
    report = (out / "simulation.md").read_text()
    row = re.search(r"^\| default \| 2 \| (\d+) \| (\d+) / (\d+) \| (\d+) \| (\d+) \|$", report, re.M)  # the FPR-gate table
    assert row is not None, report
    over, settled_under, settled_over, cannot_tell, good_parts = map(int, row.groups())
    assert settled_under + settled_over + cannot_tell == 2 and over <= 2 and good_parts == fpr["n_parts"]


def test_simulate_never_offers_a_near_copy_of_a_test_image_for_a_training_label(tmp_path: Path) -> None:
    """Every photo saved twice (a re-save with a little sensor noise): the test split is drawn by file, so about a
    fifth of the pool are copies of test images. A simulation measures the product's loop, whose near-copy check keeps
    those out of training (review: the check was off in simulations, and a strategy could label the copies of the test
    images it got wrong)."""
    import numpy as np
    from PIL import Image as PILImage

    from store.models import Image

    source = tmp_path / "parts"
    rng = np.random.default_rng(0)
    twin: dict[str, str] = {}
    for kind, count in {"good": 50, "scratch": 20, "spot": 20}.items():
        (source / kind).mkdir(parents=True)
        for index in range(count):
            # a surface of its own (the synthetic parts are too alike for a pixel check: random pairs correlate at 0.98)
            surface = PILImage.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((64, 64), PILImage.BICUBIC)
            pixels = np.asarray(surface, dtype=np.int16)
            if kind == "scratch":
                pixels[30:33, 8:56] = 0
            elif kind == "spot":
                pixels[26:38, 26:38] = 255
            path = source / kind / f"{kind}_{index:03d}.png"
            PILImage.fromarray(pixels.astype(np.uint8)).save(path)
            copy = path.with_name(f"{path.stem}_again.png")
            PILImage.fromarray(np.clip(pixels + rng.integers(-2, 3, pixels.shape), 0, 255).astype(np.uint8)).save(copy)
            twin[str(path.resolve())], twin[str(copy.resolve())] = str(copy.resolve()), str(path.resolve())
    out = tmp_path / "sim"
    result = CliRunner().invoke(app, [
        "simulate", str(source), "--out", str(out), "--negative-class", "good", "--strategies", "random",
        "--seed-labels", "30", "--budget", "20", "--seeds", "1", "--max-rounds", "3", "--all-rounds", "--image-size", "64",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ctx = open_project(out / "runs" / "random-seed0")
    with session_scope(ctx.engine) as session:
        path_of = {image.id: str(Path(image.path).resolve()) for image in session.scalars(select(Image))}
        split_of = {path_of[image.id]: image.split for image in session.scalars(select(Image))}
        picked = [path_of[s.image_id] for s in session.scalars(select(Selection))]
    with open(out / "seed-0" / "test.csv", newline="") as handle:
        drawn_into_test = {str(Path(row["path"]).resolve()) for row in csv.DictReader(handle)}
    assert len(picked) >= 20  # three rounds of up to 20 (a near-copy of an image picked or labeled is not offered)
    # the draw split pairs (the premise), and no pick is the pool copy of a test image: such copies joined the test split
    assert sum(twin[path] not in drawn_into_test for path in drawn_into_test) >= 10
    assert not [path for path in picked if twin[path] in drawn_into_test], "a copy of a test image was offered for a training label"
    assert any(split_of[twin[path]] == "test" for path in drawn_into_test if twin[path] not in drawn_into_test)
