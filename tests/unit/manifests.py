"""A CSV manifest `path,label,part` as `loop ingest` reads it, for tests that place images by hand."""
from __future__ import annotations

import csv
from pathlib import Path


def write_manifest(path: Path, rows: list[tuple[Path, str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "part"])
        writer.writerows([(str(file), label, part) for file, label, part in rows])
    return path
