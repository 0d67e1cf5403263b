"""`loop prune` deletes the model files the loop no longer reads and keeps the ones it does: the newest rounds' (the
newest is what /predict deploys) and the newest fine-tuned backbone's (`loop init --init-from` reads it)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app
from loop.init_source import resolve_init_source
from loop.prune import prune_model_files
from store import session_scope
from store.models import Round
from store.queries import get_project

runner = CliRunner()

# number: (status, training strategy, kept epoch)
HISTORY = {
    1: ("completed", "finetune", 3),  # the newest round with a fine-tuned backbone
    2: ("completed", "head", 0),
    3: ("failed", "finetune", 2),  # failed: never read, whatever it trained
    4: ("completed", "head", 0),
    5: ("completed", "finetune", 0),  # kept epoch 0: its backbone is the pretrained one
    6: ("completed", "head", 0),
    7: ("running", "head", 0),  # a killed round's row: left alone
}
MODEL_BYTES = {"model.pt": 3000, "model.onnx": 5000}


def _record_history(ctx) -> dict[int, Path]:  # noqa: ANN001
    folders = {}
    with session_scope(ctx.engine) as session:
        project_id = get_project(session).id
        for number, (status, strategy, best_epoch) in HISTORY.items():
            folder = ctx.artifacts_dir / f"round-{number:03d}"
            folder.mkdir(parents=True)
            for name, size in MODEL_BYTES.items():
                (folder / name).write_bytes(b"m" * size)
            (folder / "confusion_matrix.png").write_bytes(b"png")
            folders[number] = folder
            session.add(Round(project_id=project_id, number=number, status=status,
                              details={"training": {"strategy": strategy, "best_epoch": best_epoch}, "threshold": 0.5},
                              artifacts={"model_checkpoint": str(folder / "model.pt"), "model_onnx": str(folder / "model.onnx"),
                                         "confusion_matrix_png": str(folder / "confusion_matrix.png")}))
    return folders


def _models_left(folders: dict[int, Path]) -> dict[int, list[str]]:
    return {n: sorted(p.name for p in folder.glob("model.*")) for n, folder in folders.items()}


def test_prune_keeps_the_newest_rounds_and_the_newest_fine_tuned_backbone(new_project) -> None:  # noqa: ANN001
    folders = _record_history(new_project)
    summary = prune_model_files(new_project, keep_rounds=2)
    both = ["model.onnx", "model.pt"]
    # round 1 keeps the checkpoint init-from reads, not its deployable ONNX copy
    assert _models_left(folders) == {1: ["model.pt"], 2: [], 3: [], 4: [], 5: both, 6: both, 7: both}
    assert summary.kept_newest == [5, 6] and summary.kept_fine_tuned == 1
    assert sorted(summary.deleted) == [1, 2, 3, 4] and summary.freed_bytes == 3 * sum(MODEL_BYTES.values()) + MODEL_BYTES["model.onnx"]
    assert all((folder / "confusion_matrix.png").is_file() for folder in folders.values())  # the plots are the record
    with session_scope(new_project.engine) as session:
        rows = {r.number: r for r in session.query(Round)}
        for number in (2, 3, 4):  # nothing points at a deleted file; the record says what went, when and by what
            assert set(rows[number].artifacts) == {"confusion_matrix_png"}
            assert rows[number].details["model_files_deleted"]["files"] == both
            assert rows[number].details["model_files_deleted"]["by"] == "loop prune"
            assert rows[number].details["model_files_deleted"]["folder"] == str(new_project.root)  # a shared store: whose files
            assert rows[number].details["threshold"] == 0.5
        assert "model_files_deleted" not in rows[6].details and "model_onnx" in rows[6].artifacts
    # what `loop init --init-from` reads is still there: the newest round, and it points to round 1's backbone
    source = resolve_init_source(new_project.root)
    assert source.checkpoint == folders[6] / "model.pt" and str(folders[1] / "model.pt") in source.description
    # a pruned round's own folder: said as pruned, with the project folder to pass instead (QA: "train a round in that
    # project first", to a project of seven rounds)
    with pytest.raises(FileNotFoundError, match=r"that round's model files are gone .*loop prune.* --init-from .*, to start from its newest"):
        resolve_init_source(folders[3])

    again = prune_model_files(new_project, keep_rounds=1)  # round 5 goes now; round 1 still stays
    assert sorted(again.deleted) == [5] and again.kept_newest == [6] and again.kept_fine_tuned == 1


def test_prune_dry_run_deletes_nothing_and_says_what_it_would(new_project) -> None:  # noqa: ANN001
    folders = _record_history(new_project)
    before = _models_left(folders)
    result = runner.invoke(app, ["prune", "--project", str(new_project.root), "--keep-rounds", "1", "--dry-run"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "would delete 9 model files of rounds 1-5 (0.0 MB)" in text and "round 1's model.pt, the newest fine-tuned backbone" in text
    assert _models_left(folders) == before
    with session_scope(new_project.engine) as session:
        assert not any("model_files_deleted" in (r.details or {}) for r in session.query(Round))


def test_prune_refuses_to_delete_the_deployed_model(new_project) -> None:  # noqa: ANN001
    folders = _record_history(new_project)
    result = runner.invoke(app, ["prune", "--project", str(new_project.root), "--keep-rounds", "0"])
    assert result.exit_code == 2 and "keep at least the newest round's model" in result.output
    assert all(names for names in _models_left(folders).values())


def test_prune_reads_the_setting_and_export_names_the_deleted_model(new_project, tmp_path: Path) -> None:  # noqa: ANN001
    folders = _record_history(new_project)
    config = new_project.root / "loop.toml"
    config.write_text(config.read_text().replace("keep_model_rounds = 0", "keep_model_rounds = 2"))
    assert "keep_model_rounds = 2" in config.read_text()
    result = runner.invoke(app, ["prune", "--project", str(new_project.root)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert _models_left(folders)[4] == [] and _models_left(folders)[5] == ["model.onnx", "model.pt"]  # the setting, 2, not the default 3
    exported = runner.invoke(app, ["export", str(tmp_path / "r2.csv"), "--project", str(new_project.root), "--round", "2"],
                             env={"COLUMNS": "250"})
    assert exported.exit_code == 0, exported.output
    assert "its model: model.onnx deleted by loop prune at" in " ".join(exported.output.split())
    (folders[6] / "model.onnx").unlink()  # by hand: the record still names it (QA: export named it as if it were there)
    exported = runner.invoke(app, ["export", str(tmp_path / "r6.csv"), "--project", str(new_project.root), "--round", "6"],
                             env={"COLUMNS": "250"})
    assert f"its model: {folders[6] / 'model.onnx'} (not there any more" in " ".join(exported.output.split()), exported.output
    exported = runner.invoke(app, ["export", str(tmp_path / "r5.csv"), "--project", str(new_project.root), "--round", "5"],
                             env={"COLUMNS": "250"})
    assert f"its model: {folders[5] / 'model.onnx'})" in " ".join(exported.output.split())


def test_a_project_never_pruned_keeps_every_model(new_project) -> None:  # noqa: ANN001
    # the default setting is 0 (keep all): `loop round` deletes nothing unless asked
    assert new_project.config.loop.keep_model_rounds == 0
    with pytest.raises(ValueError, match="keep at least"):
        prune_model_files(new_project, keep_rounds=0)


def test_prune_says_what_it_deleted_before_a_file_it_could_not(new_project, monkeypatch) -> None:  # noqa: ANN001
    # a QA run: a file it may not delete (chattr +i) gave only the error, though earlier rounds' files were gone
    folders = _record_history(new_project)
    real_unlink = Path.unlink

    def unlink(path: Path, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if path == folders[4] / "model.onnx":
            raise PermissionError(1, "Operation not permitted")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    result = runner.invoke(app, ["prune", "--project", str(new_project.root), "--keep-rounds", "1"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "deleted 6 model files of rounds 1-4" in text and f"Stopped: could not delete {folders[4] / 'model.onnx'}: Operation not permitted" in text
    assert _models_left(folders)[4] == ["model.onnx"] and _models_left(folders)[5] == ["model.onnx", "model.pt"]
    with session_scope(new_project.engine) as session:
        assert session.query(Round).filter_by(number=4).one().details["model_files_deleted"]["files"] == ["model.pt"]  # what went, recorded


def test_prune_leaves_links_out_of_the_project_alone_and_clears_half_written_files(new_project, tmp_path: Path) -> None:  # noqa: ANN001
    folders = _record_history(new_project)
    elsewhere = tmp_path / "another-project-round"
    folders[2].rename(elsewhere)
    folders[2].symlink_to(elsewhere)  # a round folder linked to another project's: its files are not ours
    (folders[6] / ".model.123-abcd1234.tmp.onnx").write_bytes(b"t" * 100)  # a round killed while exporting
    (folders[5] / "model.pt.tmp").write_bytes(b"t" * 50)
    summary = prune_model_files(new_project, keep_rounds=2)
    assert sorted(p.name for p in elsewhere.glob("model.*")) == ["model.onnx", "model.pt"]
    assert str(folders[2]) in summary.skipped_outside and 2 not in summary.deleted
    assert summary.temporary_files == 2 and not list(folders[6].glob(".model.*")) and not (folders[5] / "model.pt.tmp").exists()
    assert (folders[6] / "model.onnx").is_file()  # the newest round's own files stay


def test_the_fine_tuned_backbone_kept_is_the_newest_still_on_disk(new_project) -> None:  # noqa: ANN001
    # a QA run: the record alone chose the round to keep, though its checkpoint was deleted by hand, and the older
    # fine-tuned backbone still on disk would have gone
    folders = _record_history(new_project)
    with session_scope(new_project.engine) as session:  # round 4 fine-tuned too, the newest to: its checkpoint then goes by hand
        row = session.query(Round).filter_by(number=4).one()
        row.details = {**row.details, "training": {"strategy": "full", "best_epoch": 2}}
    assert prune_model_files(new_project, keep_rounds=1, dry_run=True).kept_fine_tuned == 4
    (folders[4] / "model.pt").unlink()
    summary = prune_model_files(new_project, keep_rounds=1, dry_run=True)
    assert summary.kept_fine_tuned == 1 and summary.deleted[1] == ["model.onnx"]  # round 1's checkpoint stays, its ONNX copy goes


def test_status_json_says_which_model_files_went(new_project) -> None:  # noqa: ANN001
    import json

    _record_history(new_project)
    prune_model_files(new_project, keep_rounds=2)
    result = runner.invoke(app, ["status", "--project", str(new_project.root), "--json"])
    rounds = {r["number"]: r for r in json.loads(result.output)["rounds"]}
    assert rounds[2]["model_files_deleted"]["files"] == ["model.onnx", "model.pt"] and rounds[6]["model_files_deleted"] is None


def test_pruning_does_not_load_torch() -> None:
    # QA: `loop prune` peaked at 699 MB to delete files: loop.init_source imported torch for one pure function
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    loaded = subprocess.run([sys.executable, "-c", "import sys, loop.prune, loop.init_source; print('torch' in sys.modules)"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"
