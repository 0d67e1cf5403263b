"""Write magnetic tile as a CSV manifest `path,label,part`, the part being the physical tile (its six exposures), so
that `loop ingest` and `loop simulate` keep a tile's photos on one side of every split:

    python benchmarks/magnetic_tile_parts.py --out tiles.csv
    loop simulate tiles.csv --negative-class free --strategies random,default --out DIR ...

Tiles are found by transfer_common.exposure_series (file-name counter + exposure index + thumbnail correlation).
"""
from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import transfer_common
from transfer_common import DATASETS_ROOT, exposure_series, load_folder_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=DATASETS_ROOT)
    args = parser.parse_args()
    dataset = load_folder_dataset("magnetic_tile", root=transfer_common.require_datasets(args.root.resolve()), negative="free")
    series = exposure_series(dataset.paths)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "part"])
        for path, label, tile in zip(dataset.paths, dataset.labels, series):
            writer.writerow([path, dataset.class_names[label], f"tile-{tile:04d}"])
    sizes = Counter(Counter(series.tolist()).values())
    mixed = sum(1 for tile in set(series.tolist()) if len({int(dataset.labels[i]) for i in range(len(series)) if series[i] == tile}) > 1)
    print(f"{args.out}: {len(dataset.paths)} images, {len(set(series.tolist()))} tiles (photos per tile: {dict(sorted(sizes.items()))}); "
          f"{mixed} tiles carry more than one label")


if __name__ == "__main__":
    main()
