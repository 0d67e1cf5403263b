import csv
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.ingest import IngestError, assign_splits, ingest_source
from loop.synthetic_images import synthetic_image
from store import session_scope
from store.models import Image, LabelEvent

runner = CliRunner()


def images(ctx):  # noqa: ANN001, ANN201
    with session_scope(ctx.engine) as session:
        return session.scalars(select(Image).order_by(Image.id)).all()


def test_folders_as_classes_stratified_split_and_duplicates_merged(new_project, class_folders: Path) -> None:
    shutil.copy(class_folders / "spot" / "spot_0000.png", class_folders / "spot" / "spot_copy.png")  # byte-identical
    report = ingest_source(new_project, class_folders, show_progress=False)
    assert report.layout == "folders"
    assert report.n_files == 71 and report.n_new_images == 70 and report.n_duplicates == 1
    rows = images(new_project)
    merged = [r for r in rows if r.duplicate_paths]
    assert len(merged) == 1 and merged[0].duplicate_paths[0].endswith("spot_copy.png")
    # 20% of each class to test (stratified), 15% of the rest to validation.
    by = lambda cls, split: sum(1 for r in rows if f"/{cls}/" in r.path and r.split == split)  # noqa: E731
    assert by("good", "test") == 8 and by("scratch", "test") == 2 and by("patch", "test") == 1
    assert by("good", "validation") == 5
    assert all(r.path.startswith("/") for r in rows)  # referenced in place, absolute


def test_test_split_is_frozen_and_only_grows(new_project, class_folders: Path, tmp_path: Path) -> None:
    ingest_source(new_project, class_folders, show_progress=False)
    before = {r.sha256: r.split for r in images(new_project)}
    more = tmp_path / "more"
    (more / "good").mkdir(parents=True)
    import numpy as np

    rng = np.random.default_rng(42)
    for i in range(10):
        synthetic_image("good", rng=rng, size=64).save(more / "good" / f"extra_{i}.png")
    ingest_source(new_project, more, show_progress=False)
    after = {r.sha256: r.split for r in images(new_project)}
    assert all(after[sha] == split for sha, split in before.items())  # nothing re-drawn
    new_splits = [split for sha, split in after.items() if sha not in before]
    assert new_splits.count("test") == 2


def test_corrupt_and_truncated_files_are_quarantined_not_fatal(new_project, class_folders: Path) -> None:
    data = (class_folders / "good" / "good_0000.png").read_bytes()
    (class_folders / "good" / "truncated.png").write_bytes(data[: len(data) // 2])
    (class_folders / "good" / "garbage.png").write_bytes(b"not a png at all" * 20)
    report = ingest_source(new_project, class_folders, show_progress=False)
    assert report.n_quarantined == 2
    quarantined = {Path(r.path).name: r.status_reason for r in images(new_project) if r.status == "quarantined"}
    assert set(quarantined) == {"truncated.png", "garbage.png"}
    assert all("cannot decode" in reason for reason in quarantined.values())


def test_mvtec_layout_is_pooled_and_recorded(new_project, tmp_path: Path) -> None:
    import numpy as np

    root = tmp_path / "bottle"
    rng = np.random.default_rng(0)
    for folder, kind, count in [("train/good", "good", 12), ("test/good", "good", 3), ("test/scratch", "scratch", 5)]:
        (root / folder).mkdir(parents=True)
        for i in range(count):
            synthetic_image(kind, rng=rng, size=64).save(root / folder / f"{i:03d}.png")
    (root / "ground_truth" / "scratch").mkdir(parents=True)
    report = ingest_source(new_project, root, show_progress=False)
    assert report.layout == "mvtec"
    assert report.label_counts == {"good": 15, "scratch": 5}
    assert any("pooled" in note for note in report.notes)
    rows = images(new_project)
    assert sum(1 for r in rows if "/test/scratch/" in r.path and r.split == "test") == 1


def test_manifest_with_unlabeled_rows_goes_to_the_pool(new_project, class_folders: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    files = sorted(class_folders.rglob("*.png"))
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for i, path in enumerate(files):
            writer.writerow([str(path), path.parent.name if i % 2 == 0 else ""])
    ingest_source(new_project, manifest, show_progress=False)
    rows = images(new_project)
    assert sum(1 for r in rows if r.split == "pool") == len(files) // 2
    with session_scope(new_project.engine) as session:
        assert len(session.scalars(select(LabelEvent)).all()) == len(files) - len(files) // 2


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_class", "manifest_missing_file"])
def test_bad_sources_fail_clearly_and_store_nothing(new_project, class_folders: Path, tmp_path: Path, case: str) -> None:
    if case == "missing":
        source, message = tmp_path / "nope", "does not exist"
    elif case == "empty":
        source, message = tmp_path / "empty", "no image files"
        source.mkdir()
    elif case == "unknown_class":
        (class_folders / "dent").mkdir()
        shutil.copy(class_folders / "good" / "good_0001.png", class_folders / "dent" / "d.png")
        source, message = class_folders, "unknown classes .*'dent' \\(1 files\\)"
    else:
        source, message = tmp_path / "m.csv", "listed files do not exist: gone.png"
        source.write_text("path,label\ngone.png,good\n")
    with pytest.raises(IngestError, match=message):
        ingest_source(new_project, source, show_progress=False)
    assert images(new_project) == []
    result = runner.invoke(app, ["ingest", str(source), "--project", str(new_project.root)])
    assert result.exit_code == 2 and "error:" in result.output


def test_assign_splits_never_puts_a_singleton_class_in_test() -> None:
    splits = assign_splits({"a": "rare", **{f"g{i}": "good" for i in range(10)}}, test_fraction=0.2, validation_fraction=0.15, seed=0)
    assert splits["a"] == "train"
    assert sum(1 for k, v in splits.items() if v == "test") == 2
