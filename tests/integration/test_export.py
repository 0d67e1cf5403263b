"""`loop export`: every image with its split, current label and a completed round's decision, probabilities and
findings, as CSV or JSON Lines, checked against the store after a real round."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.project import open_project
from store import session_scope
from store.models import Image, LabelEvent, LabelIssue, Prediction, Round
from store.queries import current_labels

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args), catch_exceptions=False)


def read_csv(path: Path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as handle:
        return {int(row["image_id"]): row for row in csv.DictReader(handle)}


def test_export_writes_every_image_with_its_label_and_the_rounds_predictions_and_findings(tmp_path: Path, oracle_manifests) -> None:
    truth, manifest = oracle_manifests
    project = tmp_path / "project"
    assert invoke("init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good", "--annotator", "oracle",
                  "--oracle-manifest", str(truth), "--budget", "5", "--image-size", "96").exit_code == 0
    assert invoke("ingest", str(manifest), "--project", str(project), "--quiet").exit_code == 0
    ctx = open_project(project)

    # before any round: the images and labels, the model's columns empty, said so
    before = invoke("export", str(tmp_path / "before.csv"), "--project", str(project))
    assert before.exit_code == 0 and "no completed round yet" in " ".join(before.output.split()), before.output
    rows = read_csv(tmp_path / "before.csv")
    with session_scope(ctx.engine) as session:
        assert set(rows) == set(session.scalars(select(Image.id)))
    assert all(row["predicted_label"] == "" and row["p_good"] == "" and row["suspected_label_error"] == "" for row in rows.values())

    assert invoke("round", "--project", str(project), "--quiet").exit_code == 0
    with session_scope(ctx.engine) as session:
        images = session.scalars(select(Image).order_by(Image.id)).all()
        pool = [i for i in images if i.split == "pool"]
        tie, quarantined, replaced = pool[0].id, images[1].id, pool[1].id
        session.add_all([LabelEvent(image_id=tie, label="scratch", source="annotator", annotator="a"),
                         LabelEvent(image_id=tie, label="spot", source="annotator", annotator="b")])
        session.get(Image, quarantined).status = "quarantined"
        session.get(Image, replaced).status = "replaced"
        others = [i.id for i in images if i.id not in (tie, quarantined, replaced)]
        # a finding of each kind, as the round stores them (the synthetic set may have none of its own)
        round_id = session.scalars(select(Round.id)).one()
        session.add_all([LabelIssue(round_id=round_id, image_id=others[0], kind="near_duplicate", related_image_id=others[1], score=0.99, rank=0),
                         LabelIssue(round_id=round_id, image_id=others[2], kind="outlier", score=3.0, rank=0)])
    written = invoke("export", str(tmp_path / "all.csv"), "--project", str(project))
    assert written.exit_code == 0 and "predictions and findings of round 1" in " ".join(written.output.split()), written.output
    rows = read_csv(tmp_path / "all.csv")
    with session_scope(ctx.engine) as session:
        labels = current_labels(session, 1)
        predictions = {p.image_id: p for p in session.scalars(select(Prediction))}
        suspects = {i.image_id: i for i in session.scalars(select(LabelIssue).where(LabelIssue.kind == "label_error"))}
        paths = {i.id: i.path for i in session.scalars(select(Image))}
        kept = {i.id for i in session.scalars(select(Image).where(Image.status != "replaced"))}
    assert suspects  # the round flagged one here: its row must say so
    assert set(rows) == kept and replaced not in rows  # a replaced file is no longer the project's data
    assert rows[quarantined]["status"] == "quarantined"
    assert (rows[tie]["label"], rows[tie]["label_status"], rows[tie]["votes"]) == ("", "tie", "2")
    for image_id, row in rows.items():
        label = labels.get(image_id)
        assert row["label"] == (label.label or "" if label else "") and row["split"] and len(row["sha256"]) == 64
        prediction = predictions[image_id] if image_id in predictions else None
        assert row["predicted_label"] == (prediction.predicted_label if prediction else "")
        if prediction:  # every digit the store holds
            assert {name: float(row[f"p_{name}"]) for name in ("good", "scratch", "spot", "patch")} == prediction.probabilities
            assert float(row["p_defect"]) == prediction.p_defect
        assert (row["suspected_label_error"] == "True") == (image_id in suspects)
        if image_id in suspects:
            assert row["suggested_label"] == suspects[image_id].suggested_label and float(row["label_quality"]) == suspects[image_id].score
            assert row["suspected_label"] == suspects[image_id].given_label
        elif row["split"] == "test" or image_id not in predictions:
            assert row["suspected_label_error"] == ""  # not judged by the round: not "checked, not flagged"
        else:
            assert row["suspected_label_error"] == "False"
    assert rows[others[0]]["near_duplicate_of"] == paths[others[1]] and rows[others[2]]["outlier"] == "True"
    assert rows[others[3]]["outlier"] == "False"

    # an answer since the round changes the suspect's label: settled, and the row says what was suspected; a part name a
    # spreadsheet would run as a formula is written as text
    suspect = next(iter(suspects))
    changed_to = next(name for name in ("good", "scratch", "spot", "patch") if name != suspects[suspect].given_label)
    with session_scope(ctx.engine) as session:
        session.add(LabelEvent(image_id=suspect, label=changed_to, source="annotator", annotator="c"))
        session.get(Image, others[3]).part = '=HYPERLINK("http://x","part-7")'
    assert invoke("export", str(tmp_path / "later.csv"), "--project", str(project)).exit_code == 0
    later = read_csv(tmp_path / "later.csv")
    assert (later[suspect]["suspected_label_error"], later[suspect]["suspected_label"], later[suspect]["label"]) == (
        "False", suspects[suspect].given_label, changed_to)
    assert later[others[3]]["part"] == "'=HYPERLINK(\"http://x\",\"part-7\")"
    assert invoke("export", str(tmp_path / "later.jsonl"), "--project", str(project)).exit_code == 0
    raw = {r["image_id"]: r for r in map(json.loads, (tmp_path / "later.jsonl").read_text().splitlines())}
    assert raw[others[3]]["part"] == '=HYPERLINK("http://x","part-7")'  # JSON Lines: as stored

    # JSON Lines: the same records, typed; --labeled-only: labeled images only (no ties, nothing quarantined)
    assert invoke("export", str(tmp_path / "labeled.jsonl"), "--project", str(project), "--labeled-only").exit_code == 0
    records = [json.loads(line) for line in (tmp_path / "labeled.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in records} == {i for i in kept if i != quarantined and labels.get(i) and labels[i].status == "labeled"}
    assert all(r["p_good"] == float(rows[r["image_id"]]["p_good"]) for r in records)
    assert all(isinstance(r["suspected_label_error"], bool) == (r["split"] != "test") for r in records)  # typed; the test split not judged
    assert {r["split"] for r in records} >= {"test", "train"}  # the frozen test split's are kept, and say so

    # an existing file is never replaced without --force (it may be the manifest the images came from)
    kept_bytes = manifest.read_bytes()
    refused = invoke("export", str(manifest), "--project", str(project))
    assert refused.exit_code == 2 and "give --force" in refused.output and manifest.read_bytes() == kept_bytes
    assert invoke("export", str(tmp_path / "all.csv"), "--project", str(project), "--force", "--labeled-only").exit_code == 0
    assert len(read_csv(tmp_path / "all.csv")) == len(records)
    for args, message in (((str(tmp_path / "x.txt"),), ".csv or .jsonl"), ((str(tmp_path / "no" / "x.csv"),), "does not exist"),
                          ((str(tmp_path / "x.csv"), "--round", "2"), "has no round 2")):
        bad = invoke("export", *args, "--project", str(project))
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
    assert not list(tmp_path.glob(".*partial*")) and not (tmp_path / "x.csv").exists()


def test_an_export_between_rounds_says_which_files_changed_or_went_since_ingest(tmp_path: Path, oracle_manifests) -> None:
    # the round quarantines such files; an export taken before it gave them as ok, with the old content hash
    import os

    truth, manifest = oracle_manifests
    project = tmp_path / "project"
    assert invoke("init", str(project), "--classes", "good,scratch,spot,patch", "--negative-class", "good").exit_code == 0
    assert invoke("ingest", str(manifest), "--project", str(project), "--quiet").exit_code == 0
    with session_scope(open_project(project).engine) as session:
        labels = current_labels(session, session.scalars(select(Image.project_id)).first())
        changed, gone, touched = [image for image in session.scalars(select(Image).order_by(Image.id))
                                 if image.id in labels and labels[image.id].status == "labeled"][:3]
        changed, gone, touched = ((image.id, Path(image.path)) for image in (changed, gone, touched))
    changed[1].write_bytes(gone[1].read_bytes())  # another image's bytes
    gone[1].unlink()
    os.utime(touched[1], ns=(1, 1))  # same bytes, another time: still as ingested
    assert invoke("export", str(tmp_path / "all.csv"), "--project", str(project)).exit_code == 0
    rows = read_csv(tmp_path / "all.csv")
    assert (rows[changed[0]]["file_on_disk"], rows[gone[0]]["file_on_disk"], rows[touched[0]]["file_on_disk"]) == ("changed", "missing", "unchanged")
    assert {row["file_on_disk"] for k, row in rows.items() if k not in (changed[0], gone[0])} == {"unchanged"}
    training = invoke("export", str(tmp_path / "training.csv"), "--project", str(project), "--labeled-only")
    said = " ".join(training.output.split())
    assert "left out 2 labeled images whose file is not as ingested (1 changed, 1 missing)" in said, said
    kept = read_csv(tmp_path / "training.csv")
    assert changed[0] not in kept and gone[0] not in kept and touched[0] in kept
    # once a round quarantined it, a labeled image left out still counts (a review: the count fell to 0)
    with session_scope(open_project(project).engine) as session:
        session.get(Image, gone[0]).status = "quarantined"
    again = invoke("export", str(tmp_path / "training2.csv"), "--project", str(project), "--labeled-only")
    assert "left out 2 labeled images whose file is not as ingested (1 changed, 1 quarantined)" in " ".join(again.output.split()), again.output
