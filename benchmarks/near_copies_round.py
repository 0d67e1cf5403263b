"""What the round's near-copy check does on magnetic tile ingested WITHOUT parts (as a user who did not declare the
six exposures of a tile would), against the true tiles:

    python benchmarks/near_copies_round.py --out DIR [--rounds 2] [--labeled-fraction 0.4]

A seeded share of the files is labeled at ingest (split by file: a tile's exposures land on both sides), the rest is
the pool, answered by the oracle. After each `loop round` (head strategy, the project's defaults otherwise) it reads
the store and reports: pool images that joined the test split and how many of them are truly on a test image's tile,
pool images held back, selected images on a test tile (leaks the check missed), labeled test images with a labeled
photo of their tile in train/validation (truth) against those the round flagged, and the gates with and without the
flagged test images. Writes DIR/near_copies_round.json and DIR/near_copies_round.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import transfer_common
from transfer_common import DATASETS_ROOT, exposure_series, load_folder_dataset, markdown_table
from sqlalchemy import select

from loop.project import open_project
from store import session_scope
from store.models import GateResult, Image, LabelEvent, Round, Selection


def write_manifests(out: Path, *, labeled_fraction: float, seed: int, n_tiles: int) -> tuple[Path, Path, dict[str, int]]:
    dataset = load_folder_dataset("magnetic_tile", root=transfer_common.require_datasets(DATASETS_ROOT), negative="free")
    tiles = exposure_series(dataset.paths)
    rng = random.Random(seed)
    kept_tiles = set(rng.sample(sorted(set(tiles.tolist())), n_tiles)) if n_tiles else set(tiles.tolist())  # a smoke run: fewer tiles
    manifest, truth = out / "manifest.csv", out / "truth.csv"
    with open(manifest, "w", newline="") as m, open(truth, "w", newline="") as t:
        manifest_writer, truth_writer = csv.writer(m), csv.writer(t)
        manifest_writer.writerow(["path", "label"])
        truth_writer.writerow(["path", "label"])
        for path, label, tile in zip(dataset.paths, dataset.labels, tiles):
            if tile not in kept_tiles:
                continue
            name = dataset.class_names[label]
            manifest_writer.writerow([path, name if rng.random() < labeled_fraction else ""])
            truth_writer.writerow([path, name])
    return manifest, truth, {str(path): int(tile) for path, tile in zip(dataset.paths, tiles)}


def loop_cli(*args: str) -> None:
    command = [sys.executable, "-m", "loop.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode not in (0, 3):  # 3: the round finished and a gate failed
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def measure(project: Path, tile_of: dict[str, int], number: int) -> dict:
    ctx = open_project(project)
    with session_scope(ctx.engine) as session:
        round_row = session.scalars(select(Round).where(Round.number == number)).one()
        gates = {g.name: g.value for g in session.scalars(select(GateResult).where(GateResult.round_id == round_row.id))}
        images = {i: (tile_of[p], s) for i, p, s in session.execute(select(Image.id, Image.path, Image.split)).all()}
        labeled = set(session.scalars(select(LabelEvent.image_id)))
        selected = set(session.scalars(select(Selection.image_id)))
        details = round_row.details
    near = details["data_quality"]["near_duplicates"]
    members = defaultdict(list)
    for image_id, (tile, _split) in images.items():
        members[tile].append(image_id)
    labeled_test = [i for i, (_t, s) in images.items() if s == "test" and i in labeled]
    labeled_test_tiles = {images[i][0] for i in labeled_test}
    joined = details.get("joined_test_image_ids", [])
    true_leaks = [i for i in labeled_test if any(images[j][1] in ("train", "validation") and j in labeled for j in members[images[i][0]] if j != i)]
    without = details["data_quality"].get("test_without_copies") or {}
    regrouped = details.get("unmeasured_copies_regrouped") or {}
    return {
        "round": number, "labeled_test_images": len(labeled_test),
        # labeled copies the ingest drew apart, put on one side before anything measured them (loop.round.regroup_unmeasured_copies)
        "labeled_regrouped": regrouped.get("moved", 0), "regrouped_out_of_test": regrouped.get("out_of_test", 0),
        "regrouped_into_test": regrouped.get("into_test", 0),
        "pool_images_joined_test": details.get("near_copies_of_test_joined_test", 0),
        "joined_on_a_test_tile": sum(images[i][0] in labeled_test_tiles for i in joined),
        "pool_images_held_back": near.get("pool_images_held_back_from_labeling"),
        "selected_so_far": len(selected), "selected_on_a_test_tile": sum(images[i][0] in labeled_test_tiles for i in selected),
        "pool_left_on_a_test_tile": sum(1 for t, s in images.values() if s == "pool" and t in labeled_test_tiles),
        "test_images_leaking_truth": len(true_leaks), "test_images_leaking_flagged": near.get("test_images_with_a_copy_outside_test"),
        "macro_f1": gates.get("macro_f1"), "defect_recall": gates.get("defect_recall"), "negative_fpr": gates.get("negative_fpr"),
        "without_copies_n": without.get("n_images"), "without_copies_macro_f1": without.get("macro_f1"),
        "without_copies_defect_recall": without.get("defect_recall"), "without_copies_negative_fpr": without.get("negative_fpr"),
        "near_copy_seconds": round((round_row.step_timings_s or {}).get("find_near_copies", 0.0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--labeled-fraction", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiles", type=int, default=0, help="only this many tiles, drawn at random (0: all 232): a smoke run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest, truth, tile_of = write_manifests(args.out, labeled_fraction=args.labeled_fraction, seed=args.seed, n_tiles=args.tiles)
    project = args.out / "project"
    if project.exists():
        raise SystemExit(f"{project} exists: use a new --out")
    loop_cli("init", str(project), "--classes", "free,blowhole,break,crack,fray,uneven", "--negative-class", "free",
             "--annotator", "oracle", "--oracle-manifest", str(truth), "--budget", "20", "--train", "head")
    loop_cli("ingest", str(manifest), "--project", str(project), "--quiet")
    rows = []
    for number in range(1, args.rounds + 1):
        started = time.perf_counter()
        loop_cli("round", "--project", str(project), "--quiet")
        rows.append({**measure(project, tile_of, number), "round_seconds": round(time.perf_counter() - started)})
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/near_copies_round.py " + " ".join(sys.argv[1:])
    machine = transfer_common.machine()  # round seconds are this machine's
    (args.out / "near_copies_round.json").write_text(json.dumps({"command": command, "machine": machine, "rounds": rows}, indent=2))
    (args.out / "near_copies_round.md").write_text("\n".join([
        "# Near-copies in a round: magnetic tile ingested without parts", "", f"Command: `{command}`", "",
        f"Machine: {machine['cpu']} ({machine['cpus']} CPUs).", "",
        f"{args.labeled_fraction:.0%} of the files labeled at ingest (split by file), the oracle answers the rest. "
        "'On a test tile' = on the tile of a labeled test image (the truth, from the file names).", "",
        markdown_table(rows, [(key, key.replace("_", " ")) for key in rows[0]]), ""]))


if __name__ == "__main__":
    main()
