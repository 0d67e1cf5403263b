"""Hints that name a fix the user can apply (QA: some named an option the command does not have, or said the opposite
of what the next command does)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from loop.cli import app


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(path)
    return path


def test_simulate_on_loose_images_asks_for_labels_not_for_an_option_it_lacks(tmp_path: Path) -> None:
    for index in range(3):
        _png(tmp_path / "loose" / f"{index}.png", 40 * index)
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "loose"), "--negative-class", "good", "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "loop simulate needs labels: give class folders or a CSV manifest" in said and "--unlabeled" not in said, said
    _png(tmp_path / "loose" / "good" / "a.png", 200)  # class folders beside the loose images (review: still "--unlabeled")
    mixed = " ".join(CliRunner().invoke(app, ["simulate", str(tmp_path / "loose"), "--negative-class", "good", "--out", str(tmp_path / "out")]).output.split())
    assert "leave them out: loop simulate needs labels" in mixed and "--unlabeled" not in mixed, mixed


def test_a_first_ingest_too_small_to_draw_a_test_split_says_what_draws_it(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(tmp_path / "p"), "--classes", "good,dent", "--negative-class", "good"]).exit_code == 0
    manifest = tmp_path / "few.csv"
    manifest.write_text("path,label\n" + "".join(f"{_png(tmp_path / 'img' / f'{i}.png', 30 * i)},{'good' if i else 'dent'}\n" for i in range(2)))
    said = " ".join(runner.invoke(app, ["ingest", str(manifest), "--project", str(tmp_path / "p")]).output.split())
    assert "the test split is still empty" in said and "frozen now: 0 images" not in said, said
