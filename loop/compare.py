"""Projects side by side: each round's gates against the labels it used. The question a manager asks after
`loop init --init-from`: did starting from the old product line's model reach the gates with fewer labels than the
same data from ImageNet weights? Also two lines, two cameras, two settings of one line.

The gates of two projects compare directly only when their labeled test images are the same photos with the same
labels; the report says how many they share, and does not hide a difference."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loop.project import ProjectContext
from loop.status import project_status
from modeling.plots import plot_gate_panels
from store import session_scope
from store.db import same_store as same_store_url
from store.models import Image
from store.queries import current_labels, get_project

QUALITY_GATES = ("macro_f1", "defect_recall", "negative_fpr")
ALL_GATES = (*QUALITY_GATES, "latency_ms")


@dataclass(frozen=True)
class ComparedRound:
    number: int
    labels_used: int  # labeled training and validation images the round learned and chose its threshold from
    gates: dict[str, float | None]  # as the gate scored it (a collapsed round's macro F1 is 0); None: not applicable
    all_gates_pass: bool
    # macro F1, defect recall and FPR, as loop simulate counts them: latency is the machine's, not the labels' (review)
    quality_gates_pass: bool
    train_strategy: str | None
    # gates whose 90% interval on the test split straddles their threshold: a pass there is partly luck (QA: compare
    # said "all pass" where status and the dashboard said the test split cannot tell)
    unsettled_gates: list[str]
    gate_thresholds: dict[str, float]  # this round's (loop.toml may change them between rounds)


@dataclass(frozen=True)
class ComparedProject:
    name: str  # as shown: the folder's name (its path where two folders share a name)
    project_dir: str
    started_from: str  # another project's model (loop init --init-from), ImageNet weights, or the checkpoint loop.toml names
    rounds: list[ComparedRound]
    labels_to_pass_gates: int | None  # labels used by the first round that passed the quality gates; None: none has
    round_passing: int | None
    n_labeled_test: int
    gate_thresholds: dict[str, float | None]  # the latest round's
    # rounds not compared: failed, running or interrupted, and cold starts (no model, no gates); said, not dropped
    rounds_left_out: dict[str, int]
    passing_round_unsettled: list[str]  # the gates the passing round's test split could not settle


def compared_project(ctx: ProjectContext, *, name: str) -> tuple[ComparedProject, dict[str, str]]:
    """One project's completed rounds with gates (the others counted in rounds_left_out) and its labeled test images
    as sha256 -> label."""
    status = project_status(ctx)
    rounds, thresholds, left_out = [], {}, Counter()
    for row in status["rounds"]:
        if row["status"] != "completed" or row.get("cold_start") or not row["gates"]:
            left_out["cold start" if row.get("cold_start") else row["status"] if row["status"] != "completed" else "no gates"] += 1
            continue
        counts = row.get("labeled_counts") or {}
        gates = {g["name"]: (g["value"] if g["applicable"] else None) for g in row["gates"]}
        thresholds.update({g["name"]: g["threshold"] for g in row["gates"] if g["applicable"]})
        quality = {g["name"]: g for g in row["gates"] if g["name"] in QUALITY_GATES and g["applicable"]}
        rounds.append(ComparedRound(number=row["number"], labels_used=int(counts.get("train", 0)) + int(counts.get("validation", 0)),
                                    gates={gate: gates.get(gate) for gate in ALL_GATES}, all_gates_pass=bool(row.get("all_gates_pass")),
                                    quality_gates_pass=bool(quality) and all(g["passed"] for g in quality.values()),
                                    train_strategy=row.get("train_strategy"), unsettled_gates=list(row.get("unsettled_gates") or []),
                                    gate_thresholds={g["name"]: g["threshold"] for g in row["gates"] if g["applicable"]}))
    passing = next((r for r in rounds if r.quality_gates_pass), None)
    started_from = _started_from(ctx, status)
    with session_scope(ctx.engine) as session:
        project_id = get_project(session).id
        labels = current_labels(session, project_id)
        # a photo with its label: the same photos labeled otherwise do not measure the same thing (review)
        test = {sha: labels[image_id].label for image_id, sha in session.execute(select(Image.id, Image.sha256).where(
            Image.project_id == project_id, Image.split == "test", Image.status == "ok"))
            if image_id in labels and labels[image_id].status == "labeled"}
    return ComparedProject(name=name, project_dir=str(ctx.root), started_from=started_from, rounds=rounds,
                           labels_to_pass_gates=passing.labels_used if passing else None, round_passing=passing.number if passing else None,
                           n_labeled_test=len(test), gate_thresholds=thresholds, rounds_left_out=dict(sorted(left_out.items())),
                           passing_round_unsettled=passing.unsettled_gates if passing else []), test


def _started_from(ctx: ProjectContext, status: dict[str, Any]) -> str:
    """Another project's model (loop init --init-from: loop.toml says so before any round records it), a checkpoint
    of the user's ([model] weights), ImageNet weights, or none (random init). Review: only rounds were read, so a
    project made with --init-from and no completed round yet read "ImageNet weights"."""
    init = next((row["init_from"] for row in reversed(status["rounds"]) if row.get("init_from")), None)
    model = ctx.config.model if ctx.config is not None else None
    if init is None and model is not None and model.init_from:
        init = {"source": model.init_from_source, "checkpoint": model.init_from, "backbone": model.init_from_backbone}
    if init is not None:
        return f"another project's model: {init.get('source') or init.get('checkpoint')}" + (f" ({init['backbone']})" if init.get("backbone") else "")
    if model is None:
        return "unknown (loop.toml does not read)"
    return {"default": "ImageNet weights", "none": "random weights (no pretraining)"}.get(model.weights, f"the checkpoint {model.weights}")


def compare_projects(contexts: list[ProjectContext], *, out: Path) -> dict[str, Any]:
    """compare.json, compare.md and gates_vs_labels.png in `out`; returns what compare.json holds."""
    roots = [ctx.root for ctx in contexts]
    names = [root.name if [r.name for r in roots].count(root.name) == 1 else str(root) for root in roots]
    projects, test_sets = [], []
    for ctx, name in zip(contexts, names):
        project, test = compared_project(ctx, name=name)
        projects.append(project)
        test_sets.append(test)
    urls = [ctx.database_url for ctx in contexts]
    same_store = sorted({names[i] for i in range(len(urls)) for j in range(len(urls))  # one project seen from two folders (QA),
                         if i != j and same_store_url(urls[i], urls[j])})           # its URL however written (review)
    shared, same_names = labeled_alike(test_sets)
    same_test = bool(shared) and all(set(test) == shared for test in test_sets)
    every_round = [r.gate_thresholds for p in projects for r in p.rounds]  # between projects, or rounds of one (QA); a gate
    # that did not apply in a round (no latency measured) is no change (review)
    thresholds_differ = any(a[gate] != b[gate] for a in every_round for b in every_round for gate in set(a) & set(b))
    report = {
        "projects": [asdict(p) for p in projects],
        "labeled_test_images_shared": len(shared),
        "same_labeled_test_images": same_test,
        # a class one project calls otherwise ("fray" there, "frayed_edge" here after `loop rename-class`, or "free" and
        # "good"): per project after the first, its name -> the first project's, where they differ
        "class_names_matched": {names[k]: mapping for k, mapping in enumerate(same_names, start=1) if mapping},
        "gate_thresholds_differ": thresholds_differ,
        "folders_sharing_a_store": same_store,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    thresholds = next((p.gate_thresholds for p in projects if p.rounds), {})
    plot_gate_panels(panels={gate: {p.name: ([r.labels_used for r in p.rounds], [r.gates[gate] for r in p.rounds]) for p in projects}
                             for gate in QUALITY_GATES},
                     thresholds={gate: thresholds.get(gate) for gate in QUALITY_GATES}, path=out / "gates_vs_labels.png",
                     title="quality gates on each project's test split vs labels used (train + validation), per round")
    (out / "compare.md").write_text(comparison_markdown(report))
    return report


def labeled_alike(test_sets: list[dict[str, str]]) -> tuple[set[str], list[dict[str, str]]]:
    """The photos (sha256) every project has labeled in its test split with the same class, and for each project after
    the first the names of its classes that are another name of the first project's (other name -> first's name).
    Classes correspond by the photos: a pair of names that are each other's most frequent label on the shared photos
    is one class, whatever it is called (QA: after `loop rename-class fray frayed_edge` one project, compare called
    the same labels different). A class merged in one project corresponds to one of the other's only: the photos of
    the rest are labeled otherwise."""
    if not test_sets:
        return set(), []
    first = test_sets[0]
    alike = set(first)
    renamed: list[dict[str, str]] = []
    for other in test_sets[1:]:
        pairs = Counter((first[sha], other[sha]) for sha in first.keys() & other.keys())
        best_of_first: dict[str, str] = {}
        best_of_other: dict[str, str] = {}
        # most photos first; on a tie the same name, then by name: the same way every time
        for (mine, theirs), _n in sorted(pairs.items(), key=lambda item: (-item[1], item[0][0] != item[0][1], item[0])):
            best_of_first.setdefault(mine, theirs)
            best_of_other.setdefault(theirs, mine)
        to_other = {mine: theirs for mine, theirs in best_of_first.items() if best_of_other[theirs] == mine}
        renamed.append({theirs: mine for mine, theirs in to_other.items() if theirs != mine})
        alike = {sha for sha in alike if sha in other and to_other.get(first[sha]) == other[sha]}
    return alike, renamed


def test_split_note(report: dict[str, Any]) -> str:
    """Whether the gates compare directly: the same labeled test photos, or how many the projects share."""
    counts = ", ".join(f"{p['name']} {p['n_labeled_test']}" for p in report["projects"])
    first = report["projects"][0]["name"] if report["projects"] else ""
    matched = "; ".join(f"{name}'s {theirs} is {first}'s {first_name}" for name, mapping in (report.get("class_names_matched") or {}).items()
                        for theirs, first_name in mapping.items())
    matched = f" (classes named otherwise, matched by their photos: {matched})" if matched else ""
    if report["same_labeled_test_images"]:
        return (f"The projects' labeled test images are the same {report['labeled_test_images_shared']} photos with the same labels{matched}: "
                "their gates compare directly.")
    shared = report["labeled_test_images_shared"]
    return (f"The projects' labeled test images differ (labeled test images: {counts}; {shared} {'photo' if shared == 1 else 'photos'} with "
            f"the same label in all of them{matched}): each gate is measured on its own project's test split, so a difference between projects is "
            "partly a difference between test splits.")


def comparison_markdown(report: dict[str, Any]) -> str:
    lines = ["# Projects compared", "", test_split_note(report), ""]
    if report["folders_sharing_a_store"]:
        lines += [f"{', '.join(report['folders_sharing_a_store'])} share one store: they are folders of one project, not projects to compare.", ""]
    if report["gate_thresholds_differ"]:
        lines += ["The gates' thresholds (loop.toml) differ between the projects or their rounds: each round's pass or fail is by its "
                  "own thresholds; the plot's dashed lines are the first project's latest.", ""]
    lines += ["Labels to pass: the labeled training and validation images of the first round that passed the quality gates (macro F1, "
              "defect recall, FPR), as `loop simulate` counts them; latency is the machine's, in each round's row.", "",
              "| project | started from | rounds | labels to pass the quality gates | round |", "|---|---|---|---|---|"]
    for p in report["projects"]:
        unsettled = f" (the test split cannot settle {', '.join(p['passing_round_unsettled'])})" if p["passing_round_unsettled"] else ""
        left_out = f" (+ {', '.join(f'{n} {why}' for why, n in p['rounds_left_out'].items())}, not compared)" if p["rounds_left_out"] else ""
        lines.append(f"| {p['name']} | {p['started_from']} | {len(p['rounds'])}{left_out} | "
                     f"{p['labels_to_pass_gates'] if p['labels_to_pass_gates'] is not None else 'not yet'}{unsettled} | {p['round_passing'] or '-'} |")
    lines.append("")
    if any(p["passing_round_unsettled"] for p in report["projects"]):
        lines += ["A pass on a gate the test split cannot settle (its 90% interval holds both verdicts) is partly the test split's luck.", ""]
    for p in report["projects"]:
        lines += [f"## {p['name']}", "", "| round | trained | labels used | macro F1 | defect recall | FPR | latency ms | quality gates | all gates "
                  "| the test split cannot settle |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['number']} | {r['train_strategy'] or '-'} | {r['labels_used']} | "
                  + " | ".join("n/a" if r["gates"][gate] is None else f"{r['gates'][gate]:.4g}" for gate in ALL_GATES)
                  + f" | {'pass' if r['quality_gates_pass'] else 'fail'} | {'pass' if r['all_gates_pass'] else 'fail'} | "
                  f"{', '.join(r['unsettled_gates']) or '-'} |" for r in p["rounds"]]
        if not p["rounds"]:
            lines.append("| no completed round with gates yet | | | | | | | | | |")
        lines.append("")
    return "\n".join(lines)
