"""A round's recorded files are found in the project folder given, or in another folder of the same store, never in a
folder of another store (a moved or copied project's old place may hold another project by now)."""
from __future__ import annotations

from pathlib import Path

import pytest

from store.artifacts import artifact_file, artifact_shown


def _folder(root: Path, *, database_url: str | None = None, model: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "loop.toml").write_text('name = "p"\nclasses = ["good", "dent"]\n' + (f'database_url = "{database_url}"\n' if database_url else ""))
    if model:
        (root / "artifacts" / "round-001").mkdir(parents=True)
        (root / "artifacts" / "round-001" / "model.onnx").write_bytes(b"onnx")
    return root


def test_a_file_a_round_wrote_in_another_folder_of_the_same_store_is_found_and_one_of_another_store_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOP_DATABASE_URL", raising=False)
    served = _folder(tmp_path / "a", model=False)
    store_url = f"sqlite:///{served / 'loop.db'}"
    sharing = _folder(tmp_path / "b", database_url=store_url)  # a second folder of the same store: its round wrote here
    other = _folder(tmp_path / "c")  # a folder with its own store (the old place of a moved project, reused)
    where = {"round_number": 1, "recorded_root": served, "project_dir": served, "store_url": store_url}
    in_sharing, in_other = str(sharing / "artifacts" / "round-001" / "model.onnx"), str(other / "artifacts" / "round-001" / "model.onnx")
    assert artifact_file(in_sharing, **where) == Path(in_sharing)
    assert artifact_file(in_other, **where) is None
    assert artifact_shown(in_other, **where) == str(served / "artifacts" / "round-001" / "model.onnx")  # where it belongs here
    # the folder's own copy comes first
    (served / "artifacts" / "round-001").mkdir(parents=True)
    (served / "artifacts" / "round-001" / "model.onnx").write_bytes(b"own")
    assert artifact_file(in_sharing, **where) == served / "artifacts" / "round-001" / "model.onnx"
    monkeypatch.setenv("LOOP_DATABASE_URL", store_url)  # every folder's commands use the store the environment names
    assert artifact_file(in_other, **{**where, "project_dir": tmp_path / "d"}) == Path(in_other)
    assert artifact_file(in_other, **{**where, "project_dir": tmp_path / "d"}, use_env=False) is None


def test_a_round_that_recorded_no_checkpoint_is_looked_up_only_in_its_own_round_folder(tmp_path: Path) -> None:
    # review: a missing record was looked up as the relative path "model.pt", so a stray <project>/model.pt was taken
    project = _folder(tmp_path / "p", model=False)
    (project / "model.pt").write_bytes(b"stray")
    assert artifact_file(None, round_number=3, recorded_root=project, project_dir=project) is None
    (project / "artifacts" / "round-003").mkdir(parents=True)
    (project / "artifacts" / "round-003" / "model.pt").write_bytes(b"pt")
    assert artifact_file(None, round_number=3, recorded_root=project, project_dir=project) == project / "artifacts" / "round-003" / "model.pt"
