"""Helpers for tests that place images by hand: a good/scratch project, and a CSV manifest `path,label,part` as
`loop ingest` reads it."""
from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config, save_config


def init_good_scratch_project(project_dir: Path, *, test_fraction: float | None = None, validation_fraction: float | None = None) -> None:
    """`loop init` with classes good (negative) and scratch; the split fractions given are written to its loop.toml."""
    assert CliRunner().invoke(app, ["init", str(project_dir), "--classes", "good,scratch", "--negative-class", "good"]).exit_code == 0
    if test_fraction is None and validation_fraction is None:
        return
    config = load_config(project_dir)
    if test_fraction is not None:
        config.split.test_fraction = test_fraction
    if validation_fraction is not None:
        config.split.validation_fraction = validation_fraction
    save_config(project_dir, config)


def write_manifest(path: Path, rows: list[tuple[Path, str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "part"])
        writer.writerows([(str(file), label, part) for file, label, part in rows])
    return path
