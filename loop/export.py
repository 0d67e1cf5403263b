"""`loop export`: the project's images with their labels and one round's predictions and findings, as a CSV or
JSON Lines file (store.export makes the records; this writes them, whole or not at all)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loop.config import ConfigError
from loop.project import ProjectContext

EXPORT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}  # by the file's ending


@dataclass
class ExportSummary:
    path: Path
    round_number: int | None
    threshold: float | None
    model_onnx: str | None
    n_images: int = 0
    labeled_by_class: Counter = field(default_factory=Counter)
    n_suspected_label_errors: int = 0
    files_not_as_ingested: Counter = field(default_factory=Counter)  # labeled images --labeled-only left out, by file_on_disk


def export_format(out: Path) -> str:
    try:
        return EXPORT_FORMATS[out.suffix.lower()]
    except KeyError:
        raise ConfigError(f"{out}: export writes {' or '.join(EXPORT_FORMATS)} files; name the file with one of those endings") from None


def export_project(ctx: ProjectContext, out: Path, *, round_number: int | None = None, labeled_only: bool = False,
                   overwrite: bool = False) -> ExportSummary:
    """Write the records to `out`. An existing file is kept unless overwrite (it may be the manifest the images came
    from); the file is written beside its place and moved there once complete, so a failure leaves no half file."""
    from store.db import session_scope
    from store.export import export_source, image_records, write_records
    from store.queries import get_project

    fmt = export_format(out)
    out = out.expanduser().absolute()
    if out.is_dir():
        raise ConfigError(f"{out} is a folder: give the file to write in it, e.g. {out / 'labels.csv'}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists (nothing was written): give --force to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} does not exist: create the folder first (nothing was written)")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    with session_scope(ctx.engine) as session:
        project = get_project(session)
        source = export_source(session, project, round_number=round_number, project_dir=ctx.root, store_url=ctx.database_url)
        summary = ExportSummary(out, source.round_number, source.threshold, source.model_onnx)
        try:
            with open(partial, "w", newline="", encoding="utf-8") as handle:
                records = image_records(session, project, source, labeled_only=labeled_only, left_out=summary.files_not_as_ingested)
                for record in write_records(handle, records, columns=source.columns(), fmt=fmt):
                    summary.n_images += 1
                    if record["label_status"] == "labeled":
                        summary.labeled_by_class[record["label"]] += 1
                    summary.n_suspected_label_errors += bool(record["suspected_label_error"])
                handle.flush()
                os.fsync(handle.fileno())  # on disk before it takes OUT's name: --force over a manifest must not leave it empty
            os.replace(partial, out)
        except OSError as error:  # named by OUT, not by the hidden file written beside it
            raise OSError(error.errno, f"could not write {out}: {error.strerror or error}") from None
        finally:
            partial.unlink(missing_ok=True)
    return summary

