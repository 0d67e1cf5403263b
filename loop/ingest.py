"""`loop ingest`: reference images in place (absolute path + content hash), detect the layout, quarantine what
does not decode, and split: the test split is frozen at the first ingest and only ever grows (a round may still put
near-copies this ingest drew on both sides of it on one side before any round measured them: loop.round.regroup_unmeasured_copies)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labeling.manifests import read_table
from loop.project import ProjectContext, sync_project_classes
from modeling.png_check import png_rows_missing
from modeling.preprocessing import DECODED_FORMATS, MIN_IMAGE_SIDE, pixel_depth
from modeling.progress import progress_bar
from store import session_scope
from store.export import FILE_UNCHANGED, file_on_disk
from store.models import Image, IngestBatch, LabelEvent, Selection
from store.queries import class_but_for_case, current_labels, get_project, resolve_label
from store.reports import as_utc

MAX_PART_LENGTH = 200  # store.models.Image.part
# loop round's reasons for an image whose file went away or changed: its bytes found at another path bring it back
MOVED_OR_CHANGED = ("file missing at ", "file changed on disk since ingest")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MVTEC_GOOD = "good"


class IngestError(ValueError):
    """The source cannot be ingested as asked; nothing was stored."""


@dataclass
class SourceFile:
    path: Path
    label: str | None
    part: str | None = None  # the manifest's `part` column: photos of one physical part share it


@dataclass
class IngestReport:
    layout: str
    n_files: int = 0
    n_new_images: int = 0
    n_duplicates: int = 0
    n_already_known: int = 0
    n_quarantined: int = 0  # new images that do not decode
    n_quarantined_copies: int = 0  # files with a quarantined image's bytes (its own file again, empty files, copies of a broken one)
    n_labels_changed: int = 0  # already-known images this ingest gives another label than their imported one
    n_labels_added: int = 0  # already-known unlabeled images this ingest labels
    split_counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _label_changes(session: Session, label_for_known: list[tuple[Image, str, str]], report: IngestReport) -> list[tuple[Image, str]]:
    """The labels given to already-known images (image, label, the file that gave it) that change something, one per
    image: the same label again (a folder ingested twice) records nothing; another one is recorded and reported, never
    applied quietly. Byte-identical files of one image with different labels keep its imported label when it is among
    them, else the first file's (as for new images), and say so. An annotator's answer still decides such an image's
    current label (store.queries.resolve_label): said too."""
    if not label_for_known:
        return []
    given: dict[int, list[tuple[str, str]]] = defaultdict(list)  # image id -> (label, file), in file order
    image_of: dict[int, Image] = {}
    for image, label, path in label_for_known:
        given[image.id].append((label, path))
        image_of[image.id] = image
    ids = list(given)
    events: dict[int, list[LabelEvent]] = defaultdict(list)
    for chunk in range(0, len(ids), 500):  # SQLite limits the variables of one statement
        for event in session.scalars(select(LabelEvent).where(LabelEvent.image_id.in_(ids[chunk:chunk + 500])).order_by(LabelEvent.id)):
            events[event.image_id].append(event)
    changes, changed_text, conflicts, decided_by_annotators = [], [], [], 0
    for image_id, labels in given.items():
        imports = [event for event in events[image_id] if event.source == "import"]
        before = (imports[-1].label if imports[-1].action == "set" else None) if imports else None
        distinct = list(dict.fromkeys(label for label, _ in labels))
        label, path = next(((label, path) for label, path in labels if label == before), labels[0])
        if len(distinct) > 1:
            conflicts.append(f"{', '.join(f'{p} ({l})' for l, p in labels)}: {label!r} kept")
        if label == before:
            continue
        changes.append((image_of[image_id], label))
        if before is None:
            report.n_labels_added += 1
        else:
            report.n_labels_changed += 1
            changed_text.append(f"{path} ({before} -> {label})")
        decided_by_annotators += resolve_label(events[image_id]).source in ("annotator", "oracle")
    def first_ten(items: list[str]) -> str:
        return "; ".join(items[:10]) + ("; ..." if len(items) > 10 else "")

    if changed_text:
        report.notes.append(f"{len(changed_text)} already-known images get another imported label: {first_ten(changed_text)}")
    if conflicts:
        report.notes.append(f"byte-identical files of {len(conflicts)} known images carry different labels: {first_ten(conflicts)}")
    if decided_by_annotators:
        report.notes.append(f"{decided_by_annotators} of the images labeled now have an annotator's answer, which stays their current label")
    return changes


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


# Left out without a word, like hidden files: what file managers and macOS's zip leave beside photos
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
SYSTEM_FOLDERS = {"__macosx"}


class SkippedFiles:
    """What discovery left out and why, for one note: silently dropped files made a short count look like a bug."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, path: Path) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(os.fsencode(path).decode("utf-8", "backslashreplace"))  # a Latin-1 byte shows as \xfc

    def note(self) -> str | None:
        if not self.counts:
            return None
        listed = "; ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.most_common())
        return f"skipped {sum(self.counts.values())} files: {listed}"


def _hidden_or_system(folder: Path) -> bool:
    return folder.name.startswith(".") or folder.name.lower() in SYSTEM_FOLDERS


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # a name in another encoding (e.g. Latin-1 from a Windows share): the store keeps text
        return False
    return True


def _images_below(folder: Path, skipped: SkippedFiles, *, walked: Sequence[Path] = ()) -> list[Path]:
    """Image files under folder, linked folders followed (each real folder once: a link loop ends). Hidden files and
    folders (.thumbnails/, .DS_Store, macOS's ._ copies) and system files are left out; so is, counted in skipped
    with the reason, anything else that cannot be an image here."""
    found, seen_folders = [], set()
    roots = [os.path.realpath(root) + os.sep for root in (folder, *walked)]  # the folders this ingest walks anyway

    def walked_anyway(link: str) -> bool:
        """A link into a walked folder ("latest -> run_0001", "scratch/latest -> ../good"), unless through a hidden or
        system folder that walk leaves out, or to a folder holding walked ones ("testlink -> ../../test", "up -> .."):
        following it would ingest those images again, under this folder's class."""
        target = os.path.realpath(link) + os.sep
        for root in roots:
            if root.startswith(target):
                return True
            if target.startswith(root):
                parts = os.path.relpath(target, root).split(os.sep)
                return not any(part.startswith(".") or part.lower() in SYSTEM_FOLDERS for part in parts if part != ".")
        return False

    for current, folders, files in os.walk(folder, followlinks=True):
        identity = os.stat(current)
        if (identity.st_dev, identity.st_ino) in seen_folders:
            folders[:] = []
            continue
        seen_folders.add((identity.st_dev, identity.st_ino))
        # a link to a folder walked anyway is not followed: the images keep their real path (which a camera's next run
        # does not re-point) and their own folder's class; a link elsewhere (outside the source, a hidden staging folder) is
        folders[:] = sorted(d for d in folders if not d.startswith(".") and d.lower() not in SYSTEM_FOLDERS
                            and not (os.path.islink(os.path.join(current, d)) and walked_anyway(os.path.join(current, d))))
        for name in sorted(files):
            path = Path(current) / name
            if name.startswith(".") or name.lower() in SYSTEM_FILES:
                continue
            if not path.exists():
                skipped.add("broken links", path)
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.add(f"not an image type ({path.suffix.lower() or 'no extension'})", path)
            elif not _utf8(path):
                skipped.add("names not in UTF-8 (rename them)", path)
            else:
                found.append(path)
    return sorted(found)


def discover_source(source: Path, *, unlabeled: bool, needs_labels: bool = False) -> tuple[str, list[SourceFile], list[str]]:
    """(layout, files with labels, notes). Layouts: manifest (CSV path,label), mvtec, folders, unlabeled.
    needs_labels: the caller has no unlabeled ingest to suggest (`loop simulate`)."""
    if not source.exists():
        raise IngestError(f"{source} does not exist")
    if not _utf8(source):
        raise IngestError(f"the path {os.fsencode(source).decode('utf-8', 'backslashreplace')} is not in UTF-8 (a name from another "
                          "system's encoding): rename that folder; nothing was stored")
    if source.is_file():
        if source.suffix.lower() not in MANIFEST_SUFFIXES:  # Excel saves its UTF-16 "Unicode Text" as .txt (QA)
            raise IngestError(f"{source} is a file but not a manifest (path,label[,part] in a .csv, .tsv or .txt file)")
        return "manifest", _read_manifest(source, unlabeled=unlabeled), []
    skipped = SkippedFiles()
    if unlabeled:
        layout, files, notes = "unlabeled", [SourceFile(p, None) for p in _images_below(source, skipped)], []
    elif (source / "train" / MVTEC_GOOD).is_dir() and (source / "test").is_dir():
        class_dirs = [source / "train" / MVTEC_GOOD, *sorted(d for d in (source / "test").iterdir() if d.is_dir() and not _hidden_or_system(d))]
        files = [SourceFile(p, MVTEC_GOOD if d == class_dirs[0] else d.name.strip()) for d in class_dirs for p in _images_below(d, skipped, walked=class_dirs)]
        notes = ["MVTec AD layout: its train/ folder holds only good parts, so train/ and test/ are pooled and "
                 "defect-loop draws its own stratified split (ground_truth/ masks are not used)"]
        layout = "mvtec"
    else:
        class_dirs = sorted(d for d in source.iterdir() if d.is_dir() and not _hidden_or_system(d))
        # a folder's name is its class as a manifest's label is: without surrounding spaces (QA: "free " was refused)
        files = [SourceFile(p, d.name.strip()) for d in class_dirs for p in _images_below(d, skipped, walked=class_dirs)]
        loose = [p for p in source.iterdir() if is_image_file(p)]
        if loose and files:
            raise IngestError(f"{source} mixes class folders with {len(loose)} loose images; move them into a class folder or "
                              + ("leave them out: loop simulate needs labels" if needs_labels else "ingest with --unlabeled"))
        if loose:  # (QA: simulate was told "ingest it with --unlabeled", an option it does not have)
            raise IngestError(f"{source} holds images but no class folders: "
                              + ("loop simulate needs labels: give class folders or" if needs_labels else "ingest it with --unlabeled, or give")
                              + " a CSV manifest (path,label)")
        layout, notes = "folders", []
    skipped_note = skipped.note()
    if skipped_note:
        notes.append(skipped_note)
        if not files:
            raise IngestError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {source}: {skipped_note}")
    return layout, _nonempty(files, source), notes


def _nonempty(files: list[SourceFile], source: Path) -> list[SourceFile]:
    if not files:
        raise IngestError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {source}")
    return files


MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt")


def _read_manifest(manifest: Path, *, unlabeled: bool) -> list[SourceFile]:
    try:
        names, rows = read_table(manifest)
    except ValueError as error:  # not UTF-8 or UTF-16 text
        raise IngestError(f"{error}. Nothing was stored.") from None
    if "path" not in names:
        raise IngestError(f"{manifest}: the first line must be a header with a 'path' column (and optionally 'label', 'part')")
    overfull = [line for line, row in enumerate(rows, start=2) if row.get(None)]  # csv's key for cells beyond the header's
    if overfull:  # a value holding the delimiter, unquoted: its rest was dropped (QA: "crazing;minor" read as crazing)
        raise IngestError(f"{manifest}: {len(overfull)} lines have more cells than the header (line {', '.join(map(str, overfull[:5]))}"
                          f"{', ...' if len(overfull) > 5 else ''}): quote a value that holds the delimiter. Nothing was stored.")
    files, missing, conflicting = [], [], []
    first_line: dict[Path, tuple[int, str | None, str | None]] = {}  # path -> (line, label, part) where it was first listed
    for line_number, row in enumerate(rows, start=2):
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise IngestError(f"{manifest}:{line_number}: empty path")
        path = Path(raw_path) if Path(raw_path).is_absolute() else manifest.parent / raw_path
        if not path.is_file():
            missing.append(f"{raw_path} (line {line_number})")
            continue
        # "../data/x.png" is stored without its "..": else moving the manifest's folder made the image missing (QA)
        normal = Path(os.path.normpath(path))
        if normal != path and normal.is_file() and os.path.samefile(normal, path):
            path = normal
        label = None if unlabeled else ((row.get("label") or "").strip() or None)
        part = (row.get("part") or "").strip() or None
        if part is not None and len(part) > MAX_PART_LENGTH:
            raise IngestError(f"{manifest}:{line_number}: part id longer than {MAX_PART_LENGTH} characters")
        key = path.resolve()
        if key in first_line:  # one file listed twice: the same row again is harmless, another label or part is a typo
            earlier, earlier_label, earlier_part = first_line[key]
            if (earlier_label, earlier_part) != (label, part):
                conflicting.append(f"{raw_path} (line {earlier}: {earlier_label or 'no label'}{f', part {earlier_part}' if earlier_part else ''}; "
                                   f"line {line_number}: {label or 'no label'}{f', part {part}' if part else ''})")
            continue
        first_line[key] = (line_number, label, part)
        files.append(SourceFile(path, label, part))
    if missing:
        raise IngestError(f"{manifest}: {len(missing)} listed files do not exist: {_listed(missing)}")
    if conflicting:  # line order would decide silently (QA: the first label won, reported as byte-identical files)
        raise IngestError(f"{manifest}: {len(conflicting)} files are listed twice with different labels or parts: {_listed(conflicting)}. "
                          "Keep one line each. Nothing was stored.")
    return _nonempty(files, manifest)


def _first_test_draw(session: Session, project, label_for_known: list, *, splits: dict[str, str], split: str, batch_id: int,  # noqa: ANN001
                     fractions, placed_parts: dict[str, str]) -> set[int]:  # noqa: ANN001
    """Images ingested unlabeled that get their labels now, in a project whose test split is empty: the test split is
    drawn from them as a labeled ingest draws it (QA: labels given after an unlabeled ingest all waited for training,
    and every round stopped on an empty test split). Never an image a round asked about (its answer began from the
    model's guess), nor a photo of a part placed already. Ids drawn into test."""
    if split != "auto" or "test" in splits.values() or session.scalar(select(func.count()).select_from(Image).where(
            Image.project_id == project.id, Image.split == "test")):
        return set()
    waiting = {image.sha256: (image, label) for image, label in label_for_known if image.split == "pool" and image.part not in placed_parts}
    ids = sorted(image.id for image, _ in waiting.values())
    asked = {image_id for start in range(0, len(ids), 500)  # a bounded IN list per statement
             for image_id in session.scalars(select(Selection.image_id).where(Selection.image_id.in_(ids[start:start + 500])))}
    waiting = {sha: pair for sha, pair in waiting.items() if pair[0].id not in asked}
    drawn = assign_splits({sha: label for sha, (_, label) in waiting.items()}, test_fraction=fractions.test_fraction, validation_fraction=0.0,
                          seed=fractions.seed + batch_id, parts={sha: image.part for sha, (image, _) in waiting.items()})
    return {waiting[sha][0].id for sha, placed in drawn.items() if placed == "test"}


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class FileCheck(NamedTuple):
    sha256: str
    size_bytes: int
    mtime_ns: int
    width: int | None  # as shown: EXIF orientation applied
    height: int | None
    reason: str | None  # why it is quarantined; None: it decodes
    pixel_depth: str | None = None  # how more than 8 bits a channel are brought to 8 (modeling.preprocessing.pixel_depth)
    n_frames: int = 1  # pages of a TIFF, frames of an animation: the first is used


def inspect_file(path: Path, *, bit_depth: int | None = None) -> FileCheck:
    data = path.read_bytes()
    stat = path.stat()
    sha = hashlib.sha256(data).hexdigest()
    try:
        with PILImage.open(path, formats=DECODED_FORMATS) as image:
            if image.format == "PNG" and (missing := png_rows_missing(io.BytesIO(data))):  # Pillow would fill them with black
                return FileCheck(sha, stat.st_size, stat.st_mtime_ns, None, None, f"cannot decode: {missing}")
            image.load()  # decodes every pixel: a truncated file fails here, not in the middle of a round
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned a quarter by its EXIF orientation
                width, height = height, width
            depth, n_frames = pixel_depth(image, bit_depth=bit_depth), int(getattr(image, "n_frames", 1))
    except PILImage.DecompressionBombError as error:  # neither OSError nor ValueError
        return FileCheck(sha, stat.st_size, stat.st_mtime_ns, None, None, f"too many pixels to decode safely: {error}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return FileCheck(sha, stat.st_size, stat.st_mtime_ns, None, None, f"cannot decode: {type(error).__name__}: {error}")
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        return FileCheck(sha, stat.st_size, stat.st_mtime_ns, width, height, f"too small ({width}x{height})")
    return FileCheck(sha, stat.st_size, stat.st_mtime_ns, width, height, None, depth, n_frames)


# A file's status change time (ctime) must be this much older than its ingest for the stored check to stand: a file
# server's clock may run a little behind this machine's
CTIME_MARGIN_NS = 2_000_000_000


def _stored_file_checks(session: Session, project_id: int) -> dict[str, tuple[FileCheck, int]]:
    """By path: the checks of the project's decodable images as stored at their ingest, with the ingest's time (ns)."""
    rows = session.execute(select(Image.path, Image.sha256, Image.size_bytes, Image.mtime_ns, Image.width, Image.height, IngestBatch.created_at)
                           .join(IngestBatch, IngestBatch.id == Image.ingest_batch_id)
                           .where(Image.project_id == project_id, Image.status == "ok"))
    return {path: (FileCheck(sha, size, mtime_ns, width, height, None), int(as_utc(ingested).timestamp() * 1e9))
            for path, sha, size, mtime_ns, width, height, ingested in rows if size is not None and mtime_ns is not None and ingested is not None}


def _unchanged_check(path: Path, as_stored: dict[str, tuple[FileCheck, int]]) -> FileCheck | None:
    """A known image's stored check when its file has the size and modification time it had at ingest and its inode
    has not changed since (ctime, which no copy or unpacking can set back: same-size BMPs with restored whole-second
    times are common, review), else None: read, hashed and decoded again. QA: ingesting a known folder of 4000 images
    again took 5.9 s against 6.2 s the first time, every file decoded anew."""
    known = as_stored.get(str(path))
    if known is None:
        return None
    check, ingested_ns = known
    try:
        stat = path.stat()
    except OSError:
        return None  # inspect_file says what is wrong
    unchanged = (stat.st_size, stat.st_mtime_ns) == (check.size_bytes, check.mtime_ns) and stat.st_ctime_ns < ingested_ns - CTIME_MARGIN_NS
    return check if unchanged else None


def assign_splits(labels_by_key: dict[str, str], *, test_fraction: float, validation_fraction: float, seed: int,
                  parts: dict[str, str | None] | None = None) -> dict[str, str]:
    """Stratified per class: round(test_fraction * n) to test, then round(validation_fraction * rest) to validation.
    A class with a single image goes to train (it cannot be both learned and measured).

    With `parts` (key -> part id, None = its own part) the units drawn are parts, not images: every image of a part
    lands in one split, or the test split would measure how well the model recognises a part it was trained on (on
    magnetic tile, six exposures per tile: macro F1 0.96 split by image, 0.61 by tile). A part is stratified under
    its rarest label (a tile with one defective exposure counts as that defect); counts are then parts, not images."""
    parts = parts or {}
    members: dict[str, list[str]] = defaultdict(list)
    for key in sorted(labels_by_key):
        members[parts.get(key) or f"\0{key}"].append(key)  # \0: an unnamed image never collides with a named part
    frequency = Counter(labels_by_key.values())
    by_class: dict[str, list[str]] = defaultdict(list)
    for unit, keys in sorted(members.items(), key=lambda item: item[1][0]):  # ordered by first key: no parts = the old order
        by_class[min((labels_by_key[k] for k in keys), key=lambda label: (frequency[label], label))].append(unit)
    rng = np.random.default_rng(seed)
    splits: dict[str, str] = {}
    for label in sorted(by_class):
        units = by_class[label]
        order = [units[i] for i in rng.permutation(len(units))]
        n_test = int(round(test_fraction * len(order))) if len(order) >= 2 else 0
        rest = order[n_test:]
        n_validation = int(round(validation_fraction * len(rest))) if len(rest) >= 3 else 0
        for index, unit in enumerate(order):
            for key in members[unit]:
                splits[key] = "test" if index < n_test else ("validation" if index < n_test + n_validation else "train")
    return splits


def split_for_new_label(sha256: str, *, validation_fraction: float, seed: int, part: str | None = None, part_split: str | None = None) -> str:
    """Images labeled after ingest (by annotators) join train or validation, never test: a stable draw by hash (by
    part id when the image has one, so a part's images share a split). An image whose part already has images in a
    split (`part_split`) joins them: a part is never on both sides."""
    if part_split in ("test", "validation", "train"):
        return part_split
    key = sha256 if part is None else f"part:{part}"
    draw = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if draw < validation_fraction else "train"


def place_labeled_image(image: Image, *, placed_parts: dict[str, str], validation_fraction: float, seed: int) -> None:
    """A pool image labeled now joins train or validation: its part's split when the part is placed (test too), else a
    stable draw. `placed_parts` (part -> split, from `part_splits`) learns the placement, so its next photo follows."""
    image.split = split_for_new_label(image.sha256, validation_fraction=validation_fraction, seed=seed, part=image.part,
                                      part_split=placed_parts.get(image.part or ""))
    if image.part:
        placed_parts.setdefault(image.part, image.split)


def _listed(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def part_splits(session: Session, project_id: int) -> dict[str, str]:
    """part id -> the split its placed images are in (test wins over the others: what a part joins from now on)."""
    found: dict[str, str] = {}
    rows = session.execute(select(Image.part, Image.split).where(Image.project_id == project_id, Image.part.is_not(None), Image.split != "pool"))
    for part, split in rows:
        if found.get(part) != "test":
            found[part] = split
    return found


SPLIT_MODES = ("auto", "test", "train")


def _hold_out_test_parts(session: Session, project_id: int, test_parts: set[str]) -> None:
    """Every photo of a test part is test, labeled or not (an unlabeled one is never offered for training labels);
    refused, with nothing stored, if a photo of such a part already sits in train or validation (parts given to
    photos that were placed by photo before, e.g. an older project's manifest ingested again with a part column)."""
    if not test_parts:
        return
    rows = session.scalars(select(Image).where(Image.project_id == project_id, Image.part.in_(sorted(test_parts)), Image.status == "ok")).all()
    straddling = sorted({image.part for image in rows if image.split in ("train", "validation")})
    if straddling:
        raise IngestError(f"parts {_listed([repr(p) for p in straddling])} would have photos both in the test split and in train/validation (this project's splits were "
                          "drawn before these photos had parts). Start a new project from the manifest with its part column. Nothing was stored.")
    for image in rows:
        if image.split == "pool":
            image.split = "test"


def _check_part_conflicts(split: str, new_labels: dict[str, str], part_of: dict[str, str | None], known_part_splits: dict[str, str]) -> None:
    """--split test/train must not put a part on both sides of the test split; refused before anything is stored."""
    if split == "auto":
        return
    wanted_test = split == "test"
    clashes = sorted({part for sha in new_labels if (part := part_of[sha]) in known_part_splits and (known_part_splits[part] == "test") != wanted_test})
    if clashes:
        side = "training/validation" if wanted_test else "test"
        raise IngestError(f"parts {_listed([repr(p) for p in clashes])} already have images in the {side} split: with --split {split} they would be on both sides "
                          "of the test split. Ingest them with --split auto (they join their part), or give them other part ids. Nothing was stored.")


def ingest_source(ctx: ProjectContext, source: Path, *, unlabeled: bool = False, split: str = "auto", show_progress: bool = True) -> IngestReport:
    """split: "auto" draws test/validation/train per class; "test" adds every labeled image to the test split (a
    held-out set you labeled yourself); "train" keeps every image out of the test split (train/validation)."""
    if split not in SPLIT_MODES:
        raise IngestError(f"unknown split mode {split!r}; use one of {', '.join(SPLIT_MODES)}")
    source = source.expanduser().resolve()
    layout, files, notes = discover_source(source, unlabeled=unlabeled)
    classes = set(ctx.config.classes)
    negative = ctx.config.negative_class
    if layout == "mvtec" and MVTEC_GOOD not in classes and negative:
        # MVTec's good/ folders are the parts without a defect: the project's negative class, whatever its name (QA: "add
        # 'good' to loop.toml" made good parts a defect class, scored as such by every gate)
        files = [dataclasses.replace(f, label=negative) if f.label == MVTEC_GOOD else f for f in files]
        notes = [*notes, f"its good/ folders are labeled {negative!r}, the project's negative class"]
    with session_scope(ctx.engine) as session:  # a class renamed away (`loop rename-class`) means its new name here too
        renames = {old: new for old, new in (get_project(session).class_renames or {}).items() if old not in classes and new in classes}
    renamed = Counter(f.label for f in files if f.label in renames)
    if renamed:  # QA: the folder a merged class came from was refused, and "add it to loop.toml" undid the merge for its images
        files = [dataclasses.replace(f, label=renames[f.label]) if f.label in renames else f for f in files]
        notes = [*notes, "labels of classes renamed by `loop rename-class` are taken under their new names: "
                 + ", ".join(f"{old!r} -> {renames[old]!r} ({n} files)" for old, n in sorted(renamed.items()))]
    unknown = Counter(f.label for f in files if f.label is not None and f.label not in classes)
    if unknown:
        listed = ", ".join(f"{label!r} ({count} files{f'; {meant!r}?' if (meant := class_but_for_case(label, classes)) else ''})"
                           for label, count in sorted(unknown.items()))
        raise IngestError(f"unknown classes in {source}: {listed}. The project's classes are {sorted(classes)}; "
                          "add them to loop.toml `classes`, fix the labels, or, for a class renamed in loop.toml, `loop rename-class OLD NEW` "
                          "first. Nothing was stored.")
    report = IngestReport(layout=layout, n_files=len(files), notes=list(notes))
    bit_depth = ctx.config.model.camera_bit_depth
    inspected: list[tuple[SourceFile, FileCheck]] = []
    with session_scope(ctx.engine) as session:
        as_stored = _stored_file_checks(session, get_project(session).id)
    with progress_bar(f"checking {len(files)} files", total=len(files), enabled=show_progress) as advance:
        for file in files:
            inspected.append((file, _unchanged_check(file.path, as_stored) or inspect_file(file.path, bit_depth=bit_depth)))
            advance(1)

    with session_scope(ctx.engine) as session:
        project = get_project(session)
        if sync_project_classes(session, project, ctx.config, project_dir=ctx.root):  # ConfigError: a class left out still labels images
            report.notes.append(f"the project's classes are now loop.toml's: {', '.join(ctx.config.classes)} (negative: {ctx.config.negative_class})")
        known = {img.sha256: img for img in session.scalars(select(Image).where(Image.project_id == project.id))}
        first_ingest = not session.scalar(select(func.count()).select_from(Image).where(Image.project_id == project.id, Image.split == "test"))
        batch = IngestBatch(project_id=project.id, source=str(source), layout=layout, notes={})
        session.add(batch)
        session.flush()

        new_images: dict[str, Image] = {}
        new_labels: dict[str, str] = {}
        label_for_known: list[tuple[Image, str, str]] = []
        depths: Counter[str] = Counter()
        clipped: list[str] = []  # frames with values above the camera's bits loop.toml sets
        multi_frame: list[str] = []
        found_again: list[str] = []
        moved_here: list[str] = []  # known images whose file went or changed, found at this ingest's path
        listed_unlabeled: list[int] = []  # known images listed without a label: a stored label is kept, and said so
        for file, (sha, size, mtime_ns, width, height, reason, depth, n_frames) in inspected:
            existing = known.get(sha) or new_images.get(sha)
            if existing is not None and existing.status == "quarantined" and reason is None and sha in known \
                    and (existing.status_reason or "").startswith(MOVED_OR_CHANGED):
                # its very bytes, found again at another path (a moved folder): back in the pool with its labels
                found_again.append(f"{existing.path} -> {file.path}" if str(file.path) != existing.path else f"{existing.path} (back in place)")
                existing.path, existing.status, existing.status_reason = str(file.path), "ok", None
                existing.duplicate_paths = [other for other in existing.duplicate_paths if other != str(file.path)]
                existing.size_bytes, existing.mtime_ns = size, mtime_ns
            if existing is not None and existing.status == "ok" and sha in known and str(file.path) != existing.path \
                    and reason is None and file_on_disk(existing) != FILE_UNCHANGED:
                # its bytes at a new path while its own file went or changed (a moved folder ingested again): read from
                # here at once (QA: until the next round, export and the API's /images found the file missing)
                moved_here.append(f"{existing.path} -> {file.path}")
                existing.duplicate_paths = [other for other in existing.duplicate_paths if other != str(file.path)]
                existing.path, existing.size_bytes, existing.mtime_ns = str(file.path), size, mtime_ns
            if existing is not None and str(file.path) != existing.path and os.path.normpath(existing.path) == str(file.path) \
                    and _same_file(existing.path, file.path):
                existing.path = str(file.path)  # stored with its "..", by a release before that was dropped (review): not a copy of itself
            if existing is not None:
                if str(file.path) != existing.path and str(file.path) not in existing.duplicate_paths:
                    existing.duplicate_paths = [*existing.duplicate_paths, str(file.path)]
                if existing.status == "quarantined":  # the same broken bytes (e.g. empty files): broken too, and said so
                    report.n_quarantined_copies += 1
                    copy_of = "" if str(file.path) == existing.path else f"the same bytes as {existing.path}: "
                    report.quarantined.append((str(file.path), f"{copy_of}{existing.status_reason}"))
                    continue
                if file.part and existing.part is None:
                    existing.part = file.part  # e.g. an older project's photos, ingested again with a part column
                elif file.part and existing.part != file.part:
                    report.notes.append(f"{file.path} is byte-identical to {existing.path}, already of part {existing.part!r}; "
                                        f"it stays in that part, not {file.part!r}")
                if sha in new_images:
                    report.n_duplicates += 1
                    if file.label and sha in new_labels and new_labels[sha] != file.label:
                        report.notes.append(f"byte-identical files with different labels: {existing.path} ({new_labels[sha]}) and {file.path} ({file.label}); the first label is kept")
                else:
                    report.n_already_known += 1
                    if file.label and existing.status == "ok":
                        label_for_known.append((existing, file.label, str(file.path)))
                    elif file.label is None and existing.id is not None:  # a manifest's empty label, or --unlabeled
                        listed_unlabeled.append(existing.id)
                continue
            image = Image(
                project_id=project.id, sha256=sha, path=str(file.path), duplicate_paths=[], size_bytes=size, mtime_ns=mtime_ns,
                width=width, height=height, status="ok" if reason is None else "quarantined", status_reason=reason,
                split="pool", ingest_batch_id=batch.id, part=file.part,
            )
            new_images[sha] = image
            if depth is not None:
                how, _, above = depth.partition(": values up to ")
                depths[how] += 1
                if above:
                    clipped.append(f"{file.path} (up to {above.removesuffix(' clipped')})")
            if n_frames > 1:
                multi_frame.append(f"{file.path} ({n_frames})")
            if reason is not None:
                report.n_quarantined += 1
                report.quarantined.append((str(file.path), reason))
            elif file.label is not None:
                new_labels[sha] = file.label

        if depths:
            report.notes.append(f"{sum(depths.values())} images are stored with more than 8 bits a channel; every model path (and the "
                                "thumbnails) sees them brought to 8 bits: " + "; ".join(f"{n} with {how}" for how, n in depths.most_common()))
            if clipped:
                report.notes.append(f"{len(clipped)} images hold values above the {bit_depth} bits loop.toml sets for the camera "
                                    f"([model] bit_depth): they are clipped to white, so the setting is likely wrong for them: "
                                    f"{_listed(clipped)}")
            elif len(depths) > 1 and bit_depth is None:
                report.notes.append("these images got different scales (each image's by its own largest value): if they come from one "
                                    "camera, the darker frames look brighter to the model than their siblings; set the camera's bits "
                                    "in loop.toml ([model] bit_depth = 12, say) before the next round, or convert them to one scale")
        if multi_frame:
            report.notes.append(f"{len(multi_frame)} files hold several pages or frames; only the first is used: {_listed(multi_frame)}")
        if listed_unlabeled and not unlabeled:  # a manifest's empty labels (--unlabeled says nothing of labels)
            still_labeled = {image_id for image_id, info in current_labels(session, project.id).items()
                             if info.status != "unlabeled"} & set(listed_unlabeled)
            if still_labeled:
                report.notes.append(f"{len(still_labeled)} known images are listed without a label and keep their stored labels (an "
                                    "empty label never removes one; to correct a label, list the right one)")
        if moved_here:
            report.notes.append(f"{len(moved_here)} known images whose file went missing or changed since ingest are read from here now "
                                f"(the same content), with their labels and split: {_listed(moved_here)}")
        if found_again:
            report.notes.append(f"{len(found_again)} images quarantined as moved or changed were found again, with the same "
                                f"content, and are back with their labels: {_listed(found_again)}")
        session.flush()  # parts just given to stored photos count as placed below
        # a held-out set (--split test) listing images labeled for training before: they stay there, and are named
        trained_known = list(dict.fromkeys(image.path for image, _label, _path in label_for_known if split == "test" and image.split in ("train", "validation")))
        listed_in_pool = {image.id: (image, label) for image, label, _path in label_for_known if image.split == "pool"}
        label_for_known = _label_changes(session, label_for_known, report)
        # pool images listed with the label they carry already (an --split auto manifest labeled them; they wait for a
        # round to place them): --split test/train places them as asked, with no second label event (a review: they
        # were passed over, and the round put a held-out set's images in training)
        relabeled = {image.id for image, _label in label_for_known}
        unchanged_in_pool = {image_id for image_id in listed_in_pool if image_id not in relabeled} if split != "auto" else set()
        label_for_known = [*label_for_known, *(listed_in_pool[image_id] for image_id in sorted(unchanged_in_pool))]
        known_part_splits = part_splits(session, project.id)
        fractions = ctx.config.split
        part_of = {sha: image.part for sha, image in new_images.items()}
        # Stored photos labeled now follow the same part rules; with --split train they must not join a test part.
        placing_known = [(image, label) for image, label in label_for_known if image.split == "pool"]
        known_labeled = {image.sha256: label for image, label in placing_known} if split == "train" else {}
        _check_part_conflicts(split, {**new_labels, **known_labeled}, {**part_of, **{image.sha256: image.part for image, _ in placing_known}},
                              known_part_splits)
        drawn_alone: set[str] = set()  # split by a random draw of their own: a round may regroup them with their near-copies
        if split == "test":
            splits = {sha: "test" for sha in new_labels}
        elif split == "train":
            splits = {sha: split_for_new_label(sha, validation_fraction=fractions.validation_fraction, seed=fractions.seed, part=part_of[sha],
                                               part_split=known_part_splits.get(part_of[sha] or "")) for sha in new_labels}
        else:
            # A part already placed by an earlier ingest keeps its split; new parts are drawn together.
            joining = {sha: known_part_splits[part_of[sha]] for sha in new_labels if part_of[sha] in known_part_splits}
            drawn = {sha: label for sha, label in new_labels.items() if sha not in joining}
            splits = {**joining, **assign_splits(drawn, test_fraction=fractions.test_fraction, validation_fraction=fractions.validation_fraction,
                                                 seed=fractions.seed + batch.id, parts={sha: part_of[sha] for sha in drawn})}
            drawn_alone = {sha for sha in drawn if not part_of[sha]}
        placed_parts = dict(known_part_splits)  # part -> split, this ingest's placements included (test wins)
        for sha, placed in splits.items():
            if part_of[sha] and placed_parts.get(part_of[sha]) != "test":
                placed_parts[part_of[sha]] = placed
        # images some round asked annotators about, and their parts: an answer would beat a held-out label
        # (store.queries.resolve_label), and a part joining test takes every pool photo of it along (_hold_out_test_parts),
        # an asked photo's answer, begun from the model's guess, then a test label (reviews)
        asked_rows = session.execute(select(Selection.image_id, Image.part).join(Image, Image.id == Selection.image_id).where(
            Image.project_id == project.id, Selection.push_status == "pushed")).all() if split == "test" else []
        asked, asked_parts = {image_id for image_id, _ in asked_rows}, {part for _, part in asked_rows if part is not None}
        if split == "test":
            # a held-out set ingested unlabeled (or a manifest's empty labels): held out too, never offered for a training
            # label (QA: they went to the pool, and selection asked for them); while no labeled test image is like them,
            # the round asks for a sample of their labels without a guess. A photo of a part in train/validation stays
            # in the pool, named.
            unlabeled_new = [sha for sha, image in new_images.items() if sha not in new_labels and image.status == "ok"]
            # nor a part with a photo annotators were asked about (asked_parts)
            kept_in_pool = [sha for sha in unlabeled_new if part_of[sha] and (placed_parts.get(part_of[sha], "test") != "test"
                                                                              or part_of[sha] in asked_parts)]
            for sha in unlabeled_new:
                if sha not in kept_in_pool:
                    splits[sha] = "test"
                    if part_of[sha]:
                        placed_parts[part_of[sha]] = "test"
            if len(unlabeled_new) > len(kept_in_pool):
                report.notes.append(f"{len(unlabeled_new) - len(kept_in_pool)} unlabeled images join the test split (--split test): never offered "
                                    "for training labels; they measure the gates once labeled: ingest a manifest with their labels (--split test), "
                                    "or the rounds ask annotators for a sample of them, without the model's guess, while no labeled test "
                                    "image is like them)")
            if kept_in_pool:
                report.notes.append(f"{len(kept_in_pool)} unlabeled images stay in the pool, not test: their part's photos are in train/validation, "
                                    "or annotators were asked about one: "
                                    f"{_listed([str(new_images[sha].path) for sha in kept_in_pool])}")
        for sha, image in new_images.items():
            if sha in splits:
                image.split = splits[sha]
                image.split_drawn = sha in drawn_alone or None
            session.add(image)
        session.flush()
        for sha, label in new_labels.items():
            session.add(LabelEvent(image_id=new_images[sha].id, label=label, source="import", annotator=f"ingest:{batch.id}"))
        held_out_known = waiting_for_round = 0
        drawn_test = _first_test_draw(session, project, label_for_known, splits=splits, split=split, batch_id=batch.id, fractions=fractions,
                                      placed_parts=known_part_splits)
        for image, label in label_for_known:
            if image.split == "pool" and split == "test" and (image.id in asked or (image.part is not None and image.part in asked_parts)):
                place_labeled_image(image, placed_parts=placed_parts, validation_fraction=fractions.validation_fraction, seed=fractions.seed)
                trained_known.append(f"{image.path} (waiting for an annotator's answer)" if image.id in asked
                                     else f"{image.path} (part {image.part!r}: annotators were asked about a photo of it)")
            elif image.split == "pool" and split == "test" and placed_parts.get(image.part or "") in (None, "test"):
                image.split = "test"  # a held-out set you labeled: an unlabeled pool image (never trained on) joins it too
                held_out_known += 1
                if image.part:
                    placed_parts[image.part] = "test"
            elif image.split == "pool" and split == "auto" and image.id in drawn_test:
                image.split = "test"
                if image.part:
                    placed_parts[image.part] = "test"
            elif image.split == "pool" and split == "auto":
                # labeled now, it stays in the pool for the next round to place as it places annotators' labels, after its
                # near-copy check: a copy of a test image joins test (QA: placed here, re-saves of test images went to train)
                waiting_for_round += 1
            elif image.split == "pool":  # --split train, or a --split test photo of a part in training: joins train/validation
                place_labeled_image(image, placed_parts=placed_parts, validation_fraction=fractions.validation_fraction, seed=fractions.seed)
                if split == "test":  # its part's photos were labeled for training
                    trained_known.append(f"{image.path} (part {image.part!r})")
            if image.id not in unchanged_in_pool:
                session.add(LabelEvent(image_id=image.id, label=label, source="import", annotator=f"ingest:{batch.id}"))
        if split == "test" and listed_unlabeled:
            # known pool images listed without a label: a held-out set holds them too, as it holds its new unlabeled
            # images (QA: they stayed in the pool without a word, and a round could ask for them as training labels)
            unlabeled_now = set(listed_unlabeled) - {image_id for image_id, info in current_labels(session, project.id).items()
                                                     if info.status != "unlabeled"}
            joined, kept = 0, []
            for image in session.scalars(select(Image).where(Image.id.in_(sorted(unlabeled_now)), Image.split == "pool")):
                if (image.id in asked or placed_parts.get(image.part or "") not in (None, "test")
                        or (image.part is not None and image.part in asked_parts)):
                    kept.append(image.path)
                    continue
                image.split = "test"
                joined += 1
                if image.part:
                    placed_parts[image.part] = "test"
            if joined:
                report.notes.append(f"{joined} images already ingested unlabeled join the test split (never offered for training labels; "
                                    "they count once labeled)")
            if kept:
                report.notes.append(f"{len(kept)} images already ingested unlabeled stay in the pool, not test: annotators were asked about "
                                    f"them, or their part's photos are in train/validation: {_listed(kept)}")
        if held_out_known:
            report.notes.append(f"{held_out_known} images already ingested unlabeled (never trained on) join the test split with their labels")
        if drawn_test:
            report.notes.append(f"the test split was empty: {len(drawn_test)} of the images ingested unlabeled before and labeled now were drawn "
                                f"into it ({fractions.test_fraction:.0%} of each class, as a labeled ingest draws it)")
        if waiting_for_round:
            report.notes.append(f"{waiting_for_round} images already ingested unlabeled got their labels; they stay in the pool until the next "
                                "round places them in train/validation, or in test beside a near-copy or part photo there, as it places "
                                "annotators' labels")
        if trained_known:
            report.notes.append(f"{len(trained_known)} listed images stay in or join train/validation with these labels, not test: they (or "
                                f"their part's photos) were labeled for training before, or annotators were asked about them (their answer "
                                f"would replace yours), and a test image must be neither: {_listed(trained_known)}")
        session.flush()
        _hold_out_test_parts(session, project.id, {part for part, placed in placed_parts.items() if placed == "test"})
        # A quarantined file fixed (or changed) and ingested again is a new image; its quarantine is over, not pending.
        readable_now = {image.path: image for image in new_images.values() if image.status == "ok"}
        paths, overwritten = list(readable_now), []
        for chunk in range(0, len(paths), 500):  # SQLite limits the variables of one statement
            for stale in session.scalars(select(Image).where(Image.project_id == project.id, Image.status.in_(("quarantined", "ok")),
                                                             Image.path.in_(paths[chunk:chunk + 500]))):
                if stale.id == readable_now[stale.path].id:
                    continue
                if stale.status == "ok":  # the file was overwritten: the round reads the old image from a copy, or quarantines it
                    overwritten.append(stale.path)
                    continue
                stale.status = "replaced"
                stale.status_reason = f"replaced by image {readable_now[stale.path].id}: ingested again with new content ({stale.status_reason})"
                report.notes.append(f"{stale.path} was quarantined ({stale.status_reason.split(': ', 1)[1]}); it reads now and is a new image")
        if overwritten:
            report.notes.append(f"{len(overwritten)} known images' files now hold other content, ingested as new images: {_listed(overwritten)}. "
                                "The old images keep their labels; the next round reads them from a byte-identical copy the store knows, "
                                "or quarantines them")

        report.n_new_images = len(new_images)
        report.split_counts = dict(Counter(img.split for img in new_images.values() if img.status == "ok"))
        report.label_counts = dict(Counter(new_labels.values()))
        if first_ingest and new_labels:
            drawn = report.split_counts.get('test', 0)
            # QA: "frozen now: 0 images" while the next labeled ingest drew 3, and the next round refused an empty test split
            report.notes.append(f"test split frozen now: {drawn} images; later ingests only add to it" if drawn else
                                "the test split is still empty (too few labeled images to draw from): the next ingest of labels draws "
                                "it, or give it images with `--split test`; a round refuses an empty test split")
        batch.n_files, batch.n_new_images, batch.n_duplicates, batch.n_quarantined = report.n_files, report.n_new_images, report.n_duplicates, report.n_quarantined
        batch.notes = {"notes": report.notes, "split_counts": report.split_counts, "label_counts": report.label_counts, "already_known": report.n_already_known}
    return report
