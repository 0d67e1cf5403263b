"""End to end on real photographs from ../shared/datasets (skipped with a reason when the folder is absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_magnetic_tile_round_regroups_the_tiles_copies_and_records_its_gates(tmp_path: Path, real_dataset) -> None:
    """Ingested without parts, a tile's exposures are drawn into test and training alike. Round 1, before anything is
    measured, puts the pixel-verified copies on one side: 0.88+ macro F1 on the leaky split fell to about 0.70 (463
    images moved when measured on 2026-12-07), what a test split without the copies says."""
    dataset = real_dataset("magnetic_tile")
    project = tmp_path / "tiles"
    invoke("init", str(project), "--classes", "free,blowhole,break,crack,fray,uneven", "--negative-class", "free")
    invoke("ingest", str(dataset), "--project", str(project), "--quiet")
    invoke("round", "--project", str(project), "--quiet")
    status = json.loads(invoke("status", "--project", str(project), "--json").output)
    assert status["images"]["ok"] == 1344 and status["labels"]["by_class"]["fray"] == 32
    round_one = status["rounds"][0]
    regrouped = round_one["unmeasured_copies_regrouped"]
    assert regrouped["moved"] >= 100  # a tile's exposures: many pixel-verified copies across the ingest's draw
    # round(20%) of every class at ingest (190+23+17+11+6+21), then what the regrouping moved in and out
    assert status["images"]["by_split"]["test"] == 268 + regrouped["into_test"] - regrouped["out_of_test"]
    assert round_one["data_quality"]["near_duplicates"]["test_images_with_a_copy_outside_test"] == 0
    assert round_one["classes_missing_from_test"] == []
    gates = {g["name"]: g for g in round_one["gates"]}
    assert 0.6 <= gates["macro_f1"]["value"] < 0.88, gates  # honest now: the leaky split gave 0.88 and more
    assert gates["negative_fpr"]["value"] <= 0.05 and round_one["metrics"]["roc_auc_defect"] >= 0.85
    assert round_one["latency"]["runtime"] == "onnxruntime"


def test_neu_duplicates_never_straddle_a_split_and_gates_without_a_negative_class_are_not_applicable(tmp_path: Path, real_dataset) -> None:
    dataset = real_dataset("neu")
    project = tmp_path / "neu"
    invoke("init", str(project), "--classes", "crazing,inclusion,patches,pitted_surface,rolled-in_scale,scratches")
    result = invoke("ingest", str(dataset), "--project", str(project), "--quiet")
    assert "1 byte-identical duplicates merged" in " ".join(result.output.split())  # Pa_101.png and Pa_105.png
    invoke("round", "--project", str(project), "--quiet")
    status = json.loads(invoke("status", "--project", str(project), "--json").output)
    assert status["images"]["ok"] == 1799
    gates = {g["name"]: g for g in status["rounds"][0]["gates"]}
    assert not gates["defect_recall"]["applicable"] and not gates["negative_fpr"]["applicable"]
    assert gates["macro_f1"]["value"] >= 0.97


def test_mvtec_bottle_is_pooled_and_split_by_us(tmp_path: Path, real_dataset) -> None:
    dataset = real_dataset("mvtec_bottle")
    project = tmp_path / "bottle"
    invoke("init", str(project), "--classes", "good,broken_large,broken_small,contamination", "--negative-class", "good")
    result = invoke("ingest", str(dataset), "--project", str(project), "--quiet")
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "pooled" in output and "292 new images" in output
