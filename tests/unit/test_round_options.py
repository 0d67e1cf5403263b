"""Options `loop round` is given are checked before the round starts, and an empty one is not loop.toml's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app
from tests.unit.manifests import init_good_scratch_project


@pytest.mark.parametrize(("option", "said"), [("--train", "unknown training strategy ''"), ("--annotator", "unknown annotator backend ''")])
def test_an_empty_option_is_refused_not_replaced_by_loop_toml(tmp_path: Path, option: str, said: str) -> None:
    # QA: `loop round --train ""` ran loop.toml's strategy as if no option had been given
    project = tmp_path / "p"
    init_good_scratch_project(project)
    result = CliRunner().invoke(app, ["round", "--project", str(project), option, ""])
    assert result.exit_code != 0 and said in " ".join(result.output.split()), result.output
    status = CliRunner().invoke(app, ["status", "--project", str(project), "--json"])
    assert json.loads(status.output)["rounds"] == []  # refused before a round was recorded


def test_a_round_that_could_not_write_its_files_stops_before_anything_is_recorded(tmp_path: Path) -> None:
    # QA: with artifacts/ read-only the round trained, failed writing its model minutes in, and its failure handler made
    # the folder again, raised, and left the round "running". (Root ignores file modes: a file in the folder's place
    # stands in for a folder this user cannot write.)
    project = tmp_path / "p"
    init_good_scratch_project(project)
    shutil.rmtree(project / "artifacts", ignore_errors=True)
    (project / "artifacts").write_text("not a folder")
    result = CliRunner().invoke(app, ["round", "--project", str(project)])
    assert result.exit_code == 2 and f"cannot write in {project / 'artifacts'}" in " ".join(result.output.split()), result.output
    assert json.loads(CliRunner().invoke(app, ["status", "--project", str(project), "--json"]).output)["rounds"] == []


def test_a_threshold_configured_on_validation_with_no_good_part_there_is_chosen_out_of_fold() -> None:
    # QA: `threshold_source = "validation"` on a small project whose validation split was empty ended the round in
    # sklearn's "Found empty input array"
    from types import SimpleNamespace

    import numpy as np
    from rich.console import Console

    from loop.round import threshold_source

    def state(splits: list[str], labels: list[int]) -> SimpleNamespace:
        splits_, labels_ = np.array(splits), np.array(labels)
        config = SimpleNamespace(model=SimpleNamespace(threshold_source="validation", train="head", training={}), negative_index=0, negative_class="good")
        return SimpleNamespace(config=config, labels=labels_, details={}, console=Console(quiet=True), options=SimpleNamespace(train_strategy=None),
                               positions=lambda split, labeled: np.flatnonzero((splits_ == split) & ((labels_ >= 0) == labeled)))

    empty = state(["train", "train", "test"], [0, 1, 0])
    assert threshold_source(empty) == "out_of_fold" and "no labeled negative" in empty.details["threshold_source_fallback"]
    only_defects = state(["train", "validation", "validation"], [0, 1, 1])
    assert threshold_source(only_defects) == "out_of_fold"
    assert threshold_source(state(["train", "validation", "validation"], [0, 0, 1])) == "validation"  # as configured


def test_an_ingest_whose_labels_are_suspects_far_more_often_than_the_rest_is_named(tmp_path: Path) -> None:
    # QA: a batch with swapped classes put 4 images into the frozen test split and 7 suspects among the rest; nothing
    # linked them to the batch
    from types import SimpleNamespace

    import numpy as np

    from loop.round import _suspect_batches
    from store import session_scope
    from store.models import IngestBatch
    from tests.unit.small_store import small_store

    engine, project_id, _ = small_store(tmp_path)
    with session_scope(engine) as session:
        swapped = IngestBatch(project_id=project_id, source="/data/swap.csv", layout="manifest")
        session.add(swapped)
        session.flush()
        swapped_id = swapped.id
    # batch 1: 40 labeled images, 2 suspects; the swapped batch: 12 judged, 7 suspects, and 4 labeled test images
    batches = np.array([1] * 40 + [swapped_id] * 12)
    flagged = np.zeros(52, dtype=bool)
    flagged[[3, 20]] = True
    flagged[40:47] = True
    state = SimpleNamespace(ctx=SimpleNamespace(engine=engine), ingest_batches=np.array([*batches, swapped_id, swapped_id, swapped_id, swapped_id, 1]),
                            labels=np.array([0] * 56 + [-1]), splits=np.array(["train"] * 52 + ["test"] * 5))
    (row,) = _suspect_batches(state, batches=batches, flagged=flagged)
    assert (row["ingest_batch_id"], row["n_judged"], row["n_flagged"], row["n_labeled_test"], row["source"]) == (swapped_id, 12, 7, 4, "/data/swap.csv")
    assert row["share_flagged_elsewhere"] == 2 / 40
    flagged[40:47] = False
    flagged[40:44] = True  # 4 suspects: too few to say the batch is wrong as a whole
    assert _suspect_batches(state, batches=batches, flagged=flagged) == []
    # review: one ingest alone has nothing to be compared with (its 25% of suspects read "0% in the other ingests")
    alone = np.zeros(40, dtype=bool)
    alone[:10] = True
    assert _suspect_batches(state, batches=np.array([1] * 40), flagged=alone) == []
    engine.dispose()


def test_a_batch_whose_predicted_defects_have_only_good_test_parts_nearest_is_said_unmeasured_for_defects() -> None:
    # QA: a new camera's good-only `--split test` set made its batch look measured: no sample was drawn and its
    # defect recall was never measured, without a word
    from types import SimpleNamespace

    import numpy as np

    from loop.round import _defects_the_test_split_does_not_measure

    # positions 0-3: test images, good (0, 1) and dent (2, 3); 4-9: camera B, called dents, nearest test image 0 or 1;
    # 10-15: camera A, called dents, nearest test image 2 or 3 (defects like theirs are in the test split)
    probabilities = np.array([[0.9, 0.1]] * 2 + [[0.1, 0.9]] * 14)
    state = SimpleNamespace(config=SimpleNamespace(negative_index=0, gates=SimpleNamespace(negative_fpr_max=0.03)), probabilities=probabilities,
                            threshold=SimpleNamespace(threshold=0.5),
                            labels=np.array([0, 0, 1, 1] + [-1] * 12), splits=np.array(["test"] * 4 + ["pool"] * 12))
    nearest = np.array([-1, -1, -1, -1] + [0, 1] * 3 + [2, 3, 2, 3, 2, 0])
    groups = np.array([1] * 4 + [2] * 6 + [1] * 6)
    assert _defects_the_test_split_does_not_measure(state, nearest_test=nearest, groups=groups) == [{"ingest_batch_id": 2, "n_predicted_defect": 6}]
    state.threshold = SimpleNamespace(threshold=0.95)  # the model calls none of them defects: nothing to say
    assert _defects_the_test_split_does_not_measure(state, nearest_test=nearest, groups=groups) == []
    # review: a batch of 300 good parts, 6 of them false positives (2%, under the 3% gate): no defect to measure
    good_only = SimpleNamespace(**{**vars(state), "threshold": SimpleNamespace(threshold=0.5),
                                   "probabilities": np.array([[0.9, 0.1]] * 2 + [[0.1, 0.9]] * 2 + [[0.1, 0.9]] * 6 + [[0.9, 0.1]] * 294),
                                   "labels": np.array([0, 0, 1, 1] + [-1] * 300), "splits": np.array(["test"] * 4 + ["pool"] * 300)})
    assert _defects_the_test_split_does_not_measure(good_only, nearest_test=np.array([-1] * 4 + [0] * 300), groups=np.array([1] * 4 + [2] * 300)) == []
