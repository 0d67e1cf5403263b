"""`loop status`: rounds with metrics and gates, label counts by class and source, quarantined files.
The JSON form is machine-readable and stable: keys are only ever added."""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from loop.project import ProjectContext, labels_left_out
from store import session_scope
from store.artifacts import artifact_shown
from store.models import Image, IngestBatch, Round
from store.queries import current_labels, get_project
from store.reports import (as_utc, calibration_of, class_set_changes, collapsed_of, data_issue_counts, defects_unmeasured_of, init_from_of, label_quality_of, metrics_by_batch_of,
                           threshold_of, training_of, unfamiliar_batches_of,
                           unsettled_gates_of)

STATUS_SCHEMA_VERSION = 1


def project_status(ctx: ProjectContext) -> dict:
    with session_scope(ctx.engine) as session:
        project = get_project(session)
        images = session.scalars(select(Image).where(Image.project_id == project.id).order_by(Image.id)).all()
        labels = current_labels(session, project.id)
        rounds = session.scalars(select(Round).where(Round.project_id == project.id).order_by(Round.number)).all()
        by_class: Counter[str] = Counter()
        by_source: Counter[str] = Counter()
        by_class_and_source: dict[str, Counter[str]] = defaultdict(Counter)
        by_split: Counter[str] = Counter()
        ties = 0
        for image in images:
            if image.status != "ok":
                continue
            by_split[image.split] += 1
            info = labels.get(image.id)
            if info is None or info.status == "unlabeled":
                continue
            if info.status == "tie":
                ties += 1
                continue
            by_class[info.label] += 1
            by_source[info.source] += 1
            by_class_and_source[info.label][info.source] += 1
        # loop.toml's classes (what the next round uses; the store's row follows at the next round or ingest; the row's
        # when loop.toml cannot be read), and any label outside them, so the counts add up to `labeled`
        named, negative = (ctx.config.classes, ctx.config.negative_class) if ctx.config is not None else (list(project.classes), project.negative_class)
        classes = [*named, *sorted(set(by_class) - set(named))]
        issues = data_issue_counts(session, rounds=list(rounds))
        class_changes = class_set_changes([(r.number, (r.details or {}).get("class_names")) for r in rounds], renames=project.class_renames)
        return {
            "schema_version": STATUS_SCHEMA_VERSION,
            # root_dir: the folder the store names (where the project was made); project_dir: the folder this command
            # was given (they differ once the project moved or was copied, or when folders share a store)
            "project": {"name": project.name, "root_dir": project.root_dir, "project_dir": str(ctx.root), "classes": named, "negative_class": negative,
                        # names stored answers give (any answer, as the round checks) that loop.toml's classes leave out:
                        # rounds and ingests refuse until they are put back or renamed
                        "classes_left_out": sorted(labels_left_out(session, project, named))},
            "images": {"total": len(images), "ok": sum(1 for i in images if i.status == "ok"), "by_split": dict(sorted(by_split.items()))},
            "labels": {
                "labeled": sum(by_class.values()),
                "unlabeled": sum(1 for i in images if i.status == "ok") - sum(by_class.values()) - ties,
                "ties_unresolved": ties,
                "by_class": {name: by_class.get(name, 0) for name in classes},
                "by_source": dict(sorted(by_source.items())),
                "by_class_and_source": {name: dict(sorted(by_class_and_source[name].items())) for name in classes},
            },
            "quarantined": [{"path": i.path, "reason": i.status_reason} for i in images if i.status == "quarantined"],
            # each ingest with its notes (e.g. coverage_lane: the lane a small ingest was first judged in)
            "ingest_batches": [{"id": b.id, "source": b.source, "layout": b.layout, "created_at": as_utc(b.created_at).isoformat() if b.created_at else None,
                                "n_files": b.n_files, "n_new_images": b.n_new_images, "notes": b.notes}
                               for b in session.scalars(select(IngestBatch).where(IngestBatch.project_id == project.id).order_by(IngestBatch.id))],
            "rounds": [_round_summary(r, project_dir=ctx.root, recorded_root=project.root_dir, store_url=ctx.database_url, data_issues=issues[r.id],
                                      classes_changed=class_changes.get(r.number)) for r in rounds],
        }


def metric_text(summary: dict, name: str) -> str:
    """A round's metric as the status table shows it. A collapsed round's macro F1 is what its gate used (0), not the
    score measured: a model giving every image one class still scores above 0 there, which read as a working model."""
    value = summary["metrics"].get(name)
    measured = "n/a" if value is None else f"{value:.4g}"
    gate = next((g for g in summary["gates"] if g["name"] == name), None)
    if name == "macro_f1" and summary.get("collapsed") and gate is not None and gate["value"] is not None:
        return f"{gate['value']:.4g} (collapsed; measured {measured})"
    return measured


def _utc_iso(moment: datetime | None) -> str | None:
    """ISO 8601 with its zone, as the API writes it: SQLite hands stored times back without one (they are UTC)."""
    return None if moment is None else as_utc(moment).isoformat()


def _round_summary(round_row: Round, *, project_dir: Path, recorded_root: str, store_url: str, data_issues: dict[str, int | None],
                   classes_changed: dict[str, list[str]] | None) -> dict:
    details = round_row.details or {}
    training, calibration, quality = training_of(details), calibration_of(details), label_quality_of(details)
    return {
        "number": round_row.number,
        "status": round_row.status,
        "error": round_row.error,
        "started_at": _utc_iso(round_row.started_at),
        "finished_at": _utc_iso(round_row.finished_at),
        "train_strategy": training.strategy if training else None,
        "cold_start": bool(details.get("cold_start")),  # only good parts labeled: no model, no gates that round
        # what a manager asks after the gates: kept epoch, calibration, how noisy the labels look, what the loop did about it
        # (read as the API reads them, the per-epoch history too; drawn in training_curves.png)
        "training": {"n_fit": training.n_fit if training else None, "best_epoch": training.best_epoch if training else None,
                     "epochs_run": training.epochs_run if training else 0,
                     "history": [dataclasses.asdict(epoch) for epoch in training.history] if training else [],
                     "options": training.options if training else {}, "options_not_used_by_head": training.options_not_used_by_head if training else [],
                     "early_stopping_note": training.early_stopping_note if training else None},
        # loop init --init-from: the checkpoint, where it came from, and whether the other project's head was used
        "init_from": dataclasses.asdict(init) if (init := init_from_of(details)) is not None else None,
        "calibration": {key: getattr(calibration, key, None) for key in ("method", "temperature", "fitted_on", "n_images", "n_left_out", "objective",
                                                                          "nll_before", "nll_after", "ece_before", "ece_after", "reason")},
        "collapsed": collapsed_of(details),  # one class for every test image or every image: the macro F1 gate was set to 0
        "label_quality": {**{key: getattr(quality, key, None) for key in ("n_flagged", "noise_rate_per_class", "already_questioned",
                                                                           "out_of_fold_balanced_accuracy", "weak_model_note")},
                          # ingests whose labels are suspects far more often than the rest's (wrong as a whole?)
                          "suspect_batches": [dataclasses.asdict(row) for row in quality.suspect_batches] if quality else None},  # [] as the API
        # images the near-copy and outlier checks flagged (None: not checked), as the round printed them (QA: outliers
        # were printed once and shown nowhere after)
        "data_issues": data_issues,
        # the classes added and removed since the round before (macro F1 then averages over another set; null: none)
        "classes_changed": classes_changed,
        "labeled_counts": details.get("labeled_counts"),
        # what reached the annotators: pushed, pending, answered tasks asked again, waiting tasks given this round's guess
        "push": details.get("push"),
        # what the round's pull took in: new answers, skips, rejections (with their reasons) and deletions
        "pull": details.get("pull"),
        # how many new images the round could pick: its budget less the picks still waiting in the annotators' queue
        "selection_budget": details.get("selection_budget"),
        # images embedded now or read from the cache, and how many got their patch features in the same pass
        "embeddings": details.get("embeddings"),
        "ties": details.get("ties"),  # images whose annotators disagree evenly, and how many went back for one more answer
        "rejected_answers": details.get("rejected_answers"),  # images whose only answer was not a class, and how many were asked again
        "threshold": details.get("threshold"),
        # ingest batches unlike the training labels or the test split (a new camera), and the gates per batch of the test split
        "unfamiliar_batches": [dataclasses.asdict(batch) for batch in unfamiliar_batches_of(details) or []] if "coverage" in details else None,
        "test_metrics_by_batch": [dataclasses.asdict(row) for row in metrics_by_batch_of(details) or []] or None,
        # batches whose predicted defects have only good parts as their nearest labeled test images: defects like
        # theirs are not measured by the gates
        "defects_unmeasured": [dataclasses.asdict(row) for row in defects_unmeasured_of(details) or []] or None,
        # where it was chosen (never the test split) and the loop's own gate estimate there
        "threshold_choice": dataclasses.asdict(choice) if (choice := threshold_of(details)) is not None else None,
        "metrics": {m.name: m.value for m in round_row.metrics if m.class_name is None},
        "per_class": details.get("per_class"),
        "classes_missing_from_test": details.get("classes_missing_from_test"),  # none of their images in the test split: macro F1 fails
        "gates": [{"name": g.name, "value": g.value, "threshold": g.threshold, "comparison": g.comparison, "applicable": g.applicable, "passed": g.passed} for g in round_row.gates],
        # a verdict of a completed round only: one that failed in record_round had it in its details, gates rolled back (QA: "all pass")
        "all_gates_pass": details.get("all_gates_pass") if round_row.status == "completed" else None,
        # gates whose 90% interval on the test split straddles the threshold: their pass or fail is the split's luck
        "unsettled_gates": unsettled_gates_of(details, round_row.gates),
        "test_intervals": details.get("test_intervals"),
        # test labels changed since the round before read them: the gates over rounds score against other labels
        "test_labels_changed": details.get("test_labels_changed"),
        "latency": details.get("latency"),
        "step_timings_s": round_row.step_timings_s,
        # as they are in this folder: the recorded paths name the folder the round ran in, which a move or a copy left
        "artifacts": {name: artifact_shown(str(path), round_number=round_row.number, recorded_root=recorded_root, project_dir=project_dir,
                                           store_url=store_url)
                      for name, path in (round_row.artifacts or {}).items()},
        "model_files_deleted": details.get("model_files_deleted"),  # by loop prune or keep_model_rounds: which, when, by what
        # the round's own records the README cites by name: the new-batch check, the near-copy findings beside the
        # test split, the kept k-NN graph's reuse
        "coverage": details.get("coverage"),
        "data_quality": details.get("data_quality"),
        "neighbor_graph": details.get("neighbor_graph"),
        # near-copies one ingest drew on both sides of the test split, put on one side before any round measured them
        "unmeasured_copies_regrouped": details.get("unmeasured_copies_regrouped"),
    }
