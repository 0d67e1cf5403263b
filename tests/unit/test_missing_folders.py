"""A drive or share that is not mounted at round time makes whole folders of images go missing at once. Quarantining
them took their waiting tasks (and annotators' drafts) from Label Studio for a mount that came back the next day
(review): the round now stops and quarantines nothing when the missing files empty their folders."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.errors import RoundFailed
from loop.ingest import ingest_source
from loop.round import RoundOptions, RoundState, check_image_files
from store import session_scope
from store.models import Image, Round


def _statuses(ctx) -> Counter:  # noqa: ANN001
    with session_scope(ctx.engine) as session:
        return Counter(session.scalars(select(Image.status)))


def _check(ctx, **options) -> RoundState:  # noqa: ANN001, ANN003
    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False, **options), console=Console(quiet=True))
    check_image_files(state)
    return state


def test_a_round_stops_when_whole_folders_are_missing_and_quarantines_nothing(new_project, class_folders: Path, tmp_path: Path) -> None:
    ingest_source(new_project, class_folders, show_progress=False)  # good 40, scratch 12, spot 12, patch 6
    assert _statuses(new_project) == {"ok": 70}
    unmounted = tmp_path / "unmounted"
    shutil.move(class_folders / "good", unmounted)  # the folder is gone

    result = CliRunner().invoke(app, ["round", "--project", str(new_project.root), "--quiet"])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "40 images are missing with every image of their folder" in message and f"{class_folders / 'good'} (40, folder gone)" in message
    assert "nothing was quarantined" in message and "--quarantine-missing-folders" in message
    assert _statuses(new_project) == {"ok": 70}
    with session_scope(new_project.engine) as session:
        assert [(r.status, "40 images are missing" in (r.error or "")) for r in session.scalars(select(Round))] == [("failed", True)]
    status = " ".join(CliRunner().invoke(app, ["status", "--project", str(new_project.root)]).output.split())
    assert "round 1 failed: step check_image_files: RoundFailed: 40 images are missing" in status  # the table alone said "failed" (QA)

    (class_folders / "good").mkdir()  # an empty mount point: the same
    with pytest.raises(RoundFailed, match=r"good \(40\)\. An unmounted"):
        _check(new_project)
    assert _statuses(new_project) == {"ok": 70}

    # mounted again, a few files deleted by hand: quarantined as before, the folder still holds others
    (class_folders / "good").rmdir()
    shutil.move(unmounted, class_folders / "good")
    aside = tmp_path / "aside"
    aside.mkdir()
    deleted = sorted((class_folders / "scratch").glob("*.png"))[:3]
    for file in deleted:
        shutil.move(file, aside / file.name)
    assert _check(new_project).details["newly_quarantined"] == 3
    assert _statuses(new_project) == {"ok": 67, "quarantined": 3}
    # put back as they were: the next round takes them back, no ingest needed (QA: they stayed quarantined)
    shutil.copy2(aside / deleted[0].name, deleted[0])
    shutil.copy2(aside / deleted[1].name, deleted[1])
    deleted[2].write_bytes(b"not the image")  # other bytes at its path: still quarantined
    state = _check(new_project)
    assert (state.details["back_in_place"], state.details["newly_quarantined"]) == (2, 0)
    assert _statuses(new_project) == {"ok": 69, "quarantined": 1}
    # there with its size but unreadable (permissions after a remount): still quarantined, and the round goes on (a
    # review: the read's error failed every round)
    import loop.round as round_module

    shutil.copy2(aside / deleted[2].name, deleted[2])
    real_inspect = round_module.inspect_file

    def unreadable(path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if Path(path) == deleted[2]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_inspect(path, **kwargs)

    round_module.inspect_file = unreadable
    try:
        assert _check(new_project).details["back_in_place"] == 0
    finally:
        round_module.inspect_file = real_inspect
    assert _statuses(new_project) == {"ok": 69, "quarantined": 1}

    # a small folder emptied (6 images, under the 10 a stop needs): quarantined as before
    shutil.rmtree(class_folders / "patch")
    assert _check(new_project).details["newly_quarantined"] == 6

    # gone for good, and said so: quarantined
    shutil.rmtree(class_folders / "good")
    assert _check(new_project, quarantine_missing_folders=True).details["newly_quarantined"] == 40
    assert _statuses(new_project) == {"ok": 24, "quarantined": 46}  # the unreadable one read again since


def test_files_read_from_a_known_copy_quarantine_nothing_and_still_empty_their_folder(new_project, class_folders: Path, tmp_path: Path) -> None:
    ingest_source(new_project, class_folders, show_progress=False)
    mirror = tmp_path / "mirror"
    (mirror / "good").mkdir(parents=True)
    for file in sorted((class_folders / "good").glob("*.png"))[:3]:  # three of the 40 also ingested from a second place
        shutil.copy2(file, mirror / "good" / file.name)
    shutil.copytree(class_folders / "scratch", mirror / "scratch")  # all 12
    ingest_source(new_project, mirror, show_progress=False)
    shutil.rmtree(class_folders / "scratch")  # every image read from its copy: nothing to quarantine, nothing to stop for
    state = _check(new_project)
    assert (state.details["newly_quarantined"], state.details["read_from_copies"]) == (0, 12)
    for file in (class_folders / "good").glob("*.png"):  # the mount point stays, empty
        file.unlink()
    # a review: the three read from their copies kept the folder from counting as emptied, and 37 were quarantined
    with pytest.raises(RoundFailed, match=r"37 images are missing with every image of their folder"):
        _check(new_project)
    assert _statuses(new_project) == {"ok": 70}
    state = _check(new_project, quarantine_missing_folders=True)
    assert (state.details["newly_quarantined"], state.details["read_from_copies"]) == (37, 3)
