"""Image files as factories write them: 16-bit and float pixels, EXIF orientation, several pages, and the files a
folder holds besides photos (broken links, hidden folders, names in another encoding, empty copies, pixel bombs)."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from typer.testing import CliRunner

from loop.cli import app
from loop.ingest import ingest_source
from loop.synthetic_images import synthetic_image
from modeling.image_detail import detail_thumbnail
from modeling.preprocessing import Preprocessing, load_image_array, pixel_depth, to_rgb
from store import session_scope
from store.models import Image

runner = CliRunner()
PREPROCESSING = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def picture(seed: int = 3) -> np.ndarray:
    """An 8-bit greyscale part photo with a defect, as uint8, over the full range (a highlight at 255)."""
    pixels = np.array(synthetic_image("scratch", rng=np.random.default_rng(seed), size=64))
    pixels[0, 0] = 255
    return pixels


@pytest.mark.parametrize("kind", ["12-bit in 16", "16-bit", "float 0..1", "float stretched"])
def test_wide_pixels_reach_every_model_path_as_the_8_bit_picture(tmp_path: Path, kind: str) -> None:
    # PIL's convert clipped them: a 12-bit camera's frames came out white and float frames black, so the model saw
    # blank images and collapsed
    eight = picture()
    if kind == "12-bit in 16":
        wide, expected = PILImage.fromarray((eight.astype(np.int64) * 4095 // 255).astype(np.uint16)), "12 significant bits (0..4095)"
    elif kind == "16-bit":
        wide, expected = PILImage.fromarray(eight.astype(np.uint16) * 257), "16 significant bits (0..65535)"
    elif kind == "float 0..1":
        wide, expected = PILImage.fromarray(eight.astype(np.float32) / 255), "32-bit float in 0..1"
    else:  # e.g. a depth or intensity map in its own units: stretched over its own range
        stretched = eight.astype(np.float32)
        stretched = (stretched - stretched.min()) / (stretched.max() - stretched.min())
        eight = np.round(stretched * 255).astype(np.uint8)
        wide, expected = PILImage.fromarray(stretched * 40.0 - 7.0), "32-bit float, stretched over -7..33"
    path = tmp_path / ("wide.tif" if wide.mode == "F" else "wide.png")
    wide.save(path)
    PILImage.fromarray(eight).save(tmp_path / "eight.png")
    with PILImage.open(path) as opened:
        assert pixel_depth(opened) == expected
        assert np.abs(np.asarray(to_rgb(opened), dtype=int) - np.asarray(PILImage.fromarray(eight).convert("RGB"), dtype=int)).max() <= 1
    assert np.abs(load_image_array(path, PREPROCESSING) - load_image_array(tmp_path / "eight.png", PREPROCESSING)).max() <= 2 / 255 / 0.5 + 1e-6
    assert np.abs(detail_thumbnail(path) - detail_thumbnail(tmp_path / "eight.png")).max() < 3


def test_exif_orientation_is_applied_as_annotators_see_the_photo(tmp_path: Path) -> None:
    upright = PILImage.fromarray(picture()[:, :40]).convert("RGB")  # 40 wide, 64 high
    stored = upright.transpose(PILImage.Transpose.ROTATE_90)  # as the camera wrote it: 64 wide, 40 high
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "turn 90° clockwise to show"
    stored.save(tmp_path / "tagged.jpg", exif=exif, quality=100)
    upright.save(tmp_path / "upright.jpg", quality=100)
    with PILImage.open(tmp_path / "tagged.jpg") as tagged, PILImage.open(tmp_path / "upright.jpg") as plain:
        assert to_rgb(tagged).size == (40, 64)
        assert np.abs(np.asarray(to_rgb(tagged), dtype=int) - np.asarray(to_rgb(plain), dtype=int)).mean() < 3
    assert np.abs(load_image_array(tmp_path / "tagged.jpg", PREPROCESSING) - load_image_array(tmp_path / "upright.jpg", PREPROCESSING)).mean() < 0.05


def test_predict_decodes_an_upload_as_the_model_paths_do(tmp_path: Path) -> None:
    from api.routes.predict import decode_image

    buffer = io.BytesIO()
    PILImage.fromarray((picture().astype(np.uint16) * 16)).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), filename="frame.png")
    assert decoded.mode == "RGB" and np.asarray(decoded).max() > 200  # clipped before: every pixel 255
    # resized at once (one full-size image in memory at a time), to exactly what image_to_array makes of the file
    from modeling.preprocessing import image_to_array

    for bit_depth in (None, 16):
        small = decode_image(buffer.getvalue(), filename="frame.png", image_size=48, bit_depth=bit_depth)
        with PILImage.open(io.BytesIO(buffer.getvalue())) as full:
            wanted = image_to_array(full, Preprocessing(48, (0.5,) * 3, (0.5,) * 3, bit_depth))
        assert small.size == (48, 48) and np.array_equal(image_to_array(small, Preprocessing(48, (0.5,) * 3, (0.5,) * 3, bit_depth)), wanted)


def rows(ctx) -> list[Image]:  # noqa: ANN001
    with session_scope(ctx.engine) as session:
        return session.scalars(select(Image).order_by(Image.id)).all()


def test_what_a_folder_holds_besides_photos_is_left_out_and_counted(new_project, class_folders: Path, tmp_path: Path) -> None:
    spot = class_folders / "spot"
    (spot / ".thumbnails").mkdir()
    shutil.copy(class_folders / "scratch" / "scratch_0000.png", spot / ".thumbnails" / "scratch_0000.png")  # a viewer's cache
    (spot / "Thumbs.db").write_bytes(b"\0" * 64)
    PILImage.open(spot / "spot_0000.png").save(spot / "animated.gif")
    (spot / "notes.txt").write_text("shift 2")
    os.symlink(tmp_path / "nowhere.png", spot / "dangling.png")
    latin1 = os.fsencode(spot) + b"/Pr\xfcfteil.png"  # a Windows share's Latin-1 name: not text the store can keep
    shutil.copy(spot / "spot_0001.png", latin1)
    extra = tmp_path / "camera2"
    extra.mkdir()
    synthetic_image("spot", rng=np.random.default_rng(77), size=64).save(extra / "linked.png")
    os.symlink(extra, spot / "camera2")  # a linked folder is followed
    os.symlink(spot, extra / "back")  # and a link loop ends

    report = ingest_source(new_project, class_folders, show_progress=False)
    assert report.n_files == report.n_new_images == 71  # 70 + the linked folder's one, once
    (skipped,) = [note for note in report.notes if note.startswith("skipped")]
    assert skipped.startswith("skipped 4 files:")
    for reason in ("1 not an image type (.gif)", "1 not an image type (.txt)", "1 broken links", "1 names not in UTF-8 (rename them)"):
        assert reason in skipped
    assert "spot/Pr\\xfcfteil.png" in skipped
    stored = [Path(r.path) for r in rows(new_project)]
    assert not any(".thumbnails" in p.parts for p in stored)  # it held a scratch photo under spot/
    assert any(p.name == "linked.png" for p in stored)


def test_broken_files_and_their_copies_are_all_quarantined_and_a_pixel_bomb_is_one_of_them(
        new_project, class_folders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)  # PIL's guard, scaled down: 64 px photos pass, 200 px is a bomb
    for name in ("empty1.png", "empty2.png", "empty3.jpg"):
        (class_folders / "good" / name).write_bytes(b"")
    PILImage.new("L", (200, 200)).save(class_folders / "spot" / "bomb.png")
    result = runner.invoke(app, ["ingest", str(class_folders), "--project", str(new_project.root)])
    assert result.exit_code == 0, result.output  # a traceback before, and nothing ingested
    assert "74 files (folders layout): 70 new images, 0 byte-identical duplicates merged, 0 already known, 4 quarantined" in " ".join(result.output.split())
    quarantined = {Path(r.path).name: r.status_reason for r in rows(new_project) if r.status == "quarantined"}
    assert set(quarantined) == {"empty1.png", "bomb.png"} and quarantined["bomb.png"].startswith("too many pixels to decode safely")
    again = ingest_source(new_project, class_folders, show_progress=False)
    assert (again.n_already_known, again.n_quarantined, again.n_quarantined_copies) == (70, 0, 4)  # said again, each of them
    reasons = {Path(path).name: reason for path, reason in again.quarantined}
    assert sorted(reasons) == ["bomb.png", "empty1.png", "empty2.png", "empty3.jpg"]
    assert reasons["bomb.png"] == quarantined["bomb.png"] and reasons["empty3.jpg"].startswith(f"the same bytes as {class_folders}/good/empty1.png")


def test_a_16_bit_folder_and_a_multipage_tiff_are_noted(new_project, tmp_path: Path) -> None:
    source = tmp_path / "line3"
    for kind in ("good", "scratch"):
        (source / kind).mkdir(parents=True)
        for i in range(4):
            pixels = np.asarray(synthetic_image(kind, rng=np.random.default_rng(i), size=64)).astype(np.uint16) * 16
            PILImage.fromarray(pixels).save(source / kind / f"{kind}_{i}.png")
    first, second = (PILImage.fromarray(picture(s)) for s in (1, 2))
    first.save(source / "good" / "stack.tif", save_all=True, append_images=[second])
    report = ingest_source(new_project, source, show_progress=False)
    assert report.n_new_images == 9 and report.n_quarantined == 0
    assert any("8 images are stored with more than 8 bits a channel" in note and "8 with 12 significant bits (0..4095)" in note for note in report.notes)
    assert any("1 files hold several pages or frames; only the first is used" in note and "stack.tif (2)" in note for note in report.notes)


def test_images_quarantined_as_missing_are_found_again_in_a_moved_folder(new_project, class_folders: Path, tmp_path: Path) -> None:
    ingest_source(new_project, class_folders, show_progress=False)
    moved = tmp_path / "archive" / "parts"
    moved.parent.mkdir()
    shutil.move(class_folders, moved)
    with session_scope(new_project.engine) as session:  # what loop round's file check records for a missing file
        for image in session.scalars(select(Image)):
            image.status, image.status_reason = "quarantined", f"file missing at {image.path} (moved or deleted since ingest)"
    report = ingest_source(new_project, moved, show_progress=False)
    assert report.n_new_images == 0 and report.n_already_known == 70
    assert any(note.startswith("70 images quarantined as moved or changed were found again") for note in report.notes)
    assert {r.status for r in rows(new_project)} == {"ok"}
    assert all(r.path.startswith(str(moved)) for r in rows(new_project))


def test_one_cameras_frames_share_one_scale_however_bright(tmp_path: Path) -> None:
    # scaled by each frame's own largest value, a dark frame of a 12-bit camera came out 4x brighter than a bright one
    def decoded(value: int, brightest: int) -> int:
        frame = np.full((16, 16), value, dtype=np.uint16)
        frame[0, 0] = brightest
        return int(np.asarray(to_rgb(PILImage.fromarray(frame)))[8, 8, 0])

    assert decoded(800, 4000) == decoded(800, 1000) == decoded(800, 300) == 50  # 12 bits: 800 / 4095 * 255
    assert decoded(200, 1000) == 12  # a 10-bit camera's frames take the 12-bit scale too
    assert decoded(200, 250) == 200  # nothing above 255: as it is, as PIL gave it


def test_links_to_folders_inside_the_source_and_hidden_or_badly_named_folders(new_project, class_folders: Path, tmp_path: Path) -> None:
    # "latest -> run_0001", as camera software makes them: the images keep their real path (the link moves on)
    run = class_folders / "good" / "run_0001"
    run.mkdir()
    for image in sorted((class_folders / "good").glob("good_000*.png")):
        image.rename(run / image.name)
    os.symlink(run, class_folders / "good" / "latest")  # sorts before run_0001
    os.symlink(class_folders / "spot", class_folders / "scratch" / "also_spot")  # another class's folder: walked once, as spot
    staging = class_folders / ".staging" / "batch2"  # a hidden folder is never walked as a class: a link into it is followed
    staging.mkdir(parents=True)
    synthetic_image("good", rng=np.random.default_rng(501), size=64).save(staging / "staged.png")
    os.symlink(staging, class_folders / "good" / "batch2")
    inner = class_folders / "good" / ".incoming"  # the same inside a class folder: its walk leaves hidden folders out
    inner.mkdir()
    synthetic_image("good", rng=np.random.default_rng(504), size=64).save(inner / "incoming.png")
    os.symlink(inner, class_folders / "good" / "batch3")
    os.symlink(class_folders, class_folders / "spot" / "up")  # a folder holding the class folders: every image again, as spot
    report = ingest_source(new_project, class_folders, show_progress=False)
    assert report.n_new_images == 72 and report.n_duplicates == 0 and not any("different labels" in note for note in report.notes)
    assert sum(r.path.endswith(("/good/batch2/staged.png", "/good/batch3/incoming.png")) for r in rows(new_project)) == 2
    assert not any("/latest/" in r.path for r in rows(new_project)) and sum("/run_0001/" in r.path for r in rows(new_project)) == 10

    # a class folder that is itself a link out of the source: its own "latest" link is still not followed
    camera = tmp_path / "camera_good"
    (camera / "run_0002").mkdir(parents=True)
    synthetic_image("good", rng=np.random.default_rng(502), size=64).save(camera / "run_0002" / "g2.png")
    os.symlink(camera / "run_0002", camera / "latest")
    linked_source = tmp_path / "linked_source"
    (linked_source / "scratch").mkdir(parents=True)
    synthetic_image("scratch", rng=np.random.default_rng(503), size=64).save(linked_source / "scratch" / "s.png")
    os.symlink(camera, linked_source / "good")
    from loop.ingest import discover_source as discover

    assert sorted(os.path.relpath(f.path, linked_source) for f in discover(linked_source, unlabeled=False)[1]) == [
        "good/run_0002/g2.png", "scratch/s.png"]

    mvtec = tmp_path / "bottle"
    for folder in ("train/good", "test/good", "test/broken", "test/.thumbnails"):
        (mvtec / folder).mkdir(parents=True)
    for i, folder in enumerate(("train/good", "test/good", "test/broken", "test/.thumbnails")):
        synthetic_image("spot", rng=np.random.default_rng(100 + i), size=64).save(mvtec / folder / f"{i}.png")
    from loop.ingest import IngestError, discover_source

    layout, files, _ = discover_source(mvtec, unlabeled=False)  # '.thumbnails' was an unknown class
    assert layout == "mvtec" and sorted(f.label for f in files) == ["broken", "good", "good"]
    latin1 = os.fsencode(tmp_path) + b"/Pr\xfcfung"
    os.makedirs(latin1 + b"/good")
    shutil.copy(class_folders / "spot" / "spot_0000.png", latin1 + b"/good/a.png")
    with pytest.raises(IngestError, match=r"Pr\\xfcfung is not in UTF-8 .* rename that folder"):
        discover_source(Path(os.fsdecode(latin1)), unlabeled=False)


def test_a_restored_image_keeps_its_new_path_once(new_project, class_folders: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra" / "good"
    extra.mkdir(parents=True)
    shutil.copy(class_folders / "good" / "good_0000.png", extra / "copy.png")
    ingest_source(new_project, class_folders, show_progress=False)
    ingest_source(new_project, extra.parent, show_progress=False)  # the copy: a duplicate path of image good_0000
    with session_scope(new_project.engine) as session:
        image = session.scalars(select(Image).where(Image.path.endswith("good_0000.png"))).one()
        assert image.duplicate_paths == [str(extra / "copy.png")]
        image.status, image.status_reason = "quarantined", f"file missing at {image.path} (moved or deleted since ingest)"
    ingest_source(new_project, extra.parent, show_progress=False)
    (restored,) = [r for r in rows(new_project) if r.path == str(extra / "copy.png")]
    assert restored.status == "ok" and restored.duplicate_paths == []


def test_caches_of_an_older_decoding_are_removed_once_the_current_ones_exist(tmp_path: Path) -> None:
    from modeling.preprocessing import DECODE_VERSION, remove_caches_of_older_decoding

    current, older = f"dec{DECODE_VERSION}", f"dec{DECODE_VERSION - 1}"
    names = {
        "embeddings": [f"lite0-multilayer-{current}-s64-m0.5", "lite0-multilayer-s64-m0.5",  # before any decode mark
                       f"lite0-multilayer-{older}-s64-m0.5", "lite0-multilayer-s224-m0.5"],  # another image size: kept
        "detail_thumbnails": [f"detail-128px-sigma2-{current}", "detail-128px-sigma2"],
        "onnx": [f"embed-lite0-{current}-s64.onnx", "embed-lite0-s64.onnx", "embed-other-s64.onnx"],  # no current twin: kept
        "patch_features": [f"resnet-file-0a1bddec7-{current}-s64", "resnet-file-0a1bddec7-s64"],  # 'ddec7' is a weights hash, not a mark
    }
    for kind, entries in names.items():
        for name in entries:
            path = tmp_path / kind / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".onnx"):
                path.write_bytes(b"model")
            else:
                path.mkdir()
                (path / "rows.npy").write_bytes(b"rows")
    removed = remove_caches_of_older_decoding(tmp_path)
    assert sorted(removed) == sorted(["embeddings/lite0-multilayer-s64-m0.5", f"embeddings/lite0-multilayer-{older}-s64-m0.5",
                                      "detail_thumbnails/detail-128px-sigma2", "onnx/embed-lite0-s64.onnx", "patch_features/resnet-file-0a1bddec7-s64"])
    left = {f"{kind}/{p.name}" for kind in names for p in (tmp_path / kind).iterdir()}
    assert left == {f"embeddings/lite0-multilayer-{current}-s64-m0.5", "embeddings/lite0-multilayer-s224-m0.5",
                    f"detail_thumbnails/detail-128px-sigma2-{current}", f"onnx/embed-lite0-{current}-s64.onnx", "onnx/embed-other-s64.onnx",
                    f"patch_features/resnet-file-0a1bddec7-{current}-s64"}
    assert remove_caches_of_older_decoding(tmp_path / "missing") == []


def test_a_camera_bit_depth_set_for_the_project_gives_every_frame_its_scale(new_project, tmp_path: Path) -> None:
    # "auto" keeps a 12-bit camera's very dark frame (nothing above 255) as it is: 16x brighter than its siblings
    dark = np.full((16, 16), 200, dtype=np.uint16)
    bright = dark.copy()
    bright[0, 0] = 4000
    for frame in (dark, bright):
        assert int(np.asarray(to_rgb(PILImage.fromarray(frame), bit_depth=12))[8, 8, 0]) == 12  # 200 / 4095 * 255
    assert int(np.asarray(to_rgb(PILImage.fromarray(dark)))[8, 8, 0]) == 200
    assert pixel_depth(PILImage.fromarray(dark), bit_depth=12) == "12 significant bits (0..4095), as set"
    too_wide = dark.copy()
    too_wide[0, 0] = 60000
    assert pixel_depth(PILImage.fromarray(too_wide), bit_depth=12) == "12 significant bits (0..4095), as set: values up to 60000 clipped"
    # 8-bit files are not touched by the setting
    eight_bit = PILImage.fromarray(picture())
    assert np.array_equal(np.asarray(to_rgb(eight_bit, bit_depth=12)), np.asarray(to_rgb(eight_bit)))

    # the model paths read it from the preprocessing, whose cache key changes with it
    set_12 = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 12)
    assert set_12.key != PREPROCESSING.key and "-b12-" in set_12.key and Preprocessing.from_dict(set_12.as_dict()) == set_12
    assert Preprocessing.from_dict({"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}) == PREPROCESSING  # a model made before
    PILImage.fromarray(dark).save(tmp_path / "dark.png")
    assert np.allclose(load_image_array(tmp_path / "dark.png", set_12), (12 / 255 - 0.5) / 0.5)

    # ingest describes the set scale, names frames the setting clips, and no longer calls one camera's frames a mix
    source = tmp_path / "mono12"
    (source / "good").mkdir(parents=True)
    PILImage.fromarray(dark).save(source / "good" / "dark.png")
    PILImage.fromarray(bright).save(source / "good" / "bright.png")
    PILImage.fromarray(too_wide).save(source / "good" / "other_camera.png")
    text = (new_project.root / "loop.toml").read_text()
    (new_project.root / "loop.toml").write_text(text.replace('bit_depth = "auto"', "bit_depth = 12"))
    from loop.project import open_project

    report = ingest_source(open_project(new_project.root), source, show_progress=False)
    assert any("3 with 12 significant bits (0..4095), as set" in note for note in report.notes), report.notes
    assert any(note.startswith("1 images hold values above the 12 bits loop.toml sets") and "other_camera.png (up to 60000)" in note
               for note in report.notes), report.notes
    assert not any("different scales" in note for note in report.notes)


def test_label_studio_display_copies_follow_the_cameras_bits(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from labeling.labelstudio_backend import LabelStudioBackend
    from loop.config import ModelConfig

    frame = np.full((16, 16), 200, dtype=np.uint16)  # a 12-bit camera's dark frame
    frame[0, 0] = 4095
    PILImage.fromarray(frame).save(tmp_path / "frame16.png")
    task = SimpleNamespace(image_path=str(tmp_path / "frame16.png"), sha256="ab" * 32)
    shown = {}
    for bits in ("auto", 16):
        backend = LabelStudioBackend(config=SimpleNamespace(model=ModelConfig(bit_depth=bits)), project_dir=tmp_path, document_root=str(tmp_path))
        unshowable: list[str] = []
        path = backend._shown_image(task, project=SimpleNamespace(root_dir=str(tmp_path)), unshowable=unshowable)
        assert not unshowable and Path(path).parent == tmp_path / "cache" / "label_studio_display"
        shown[bits] = (Path(path).name, np.asarray(PILImage.open(path))[8, 8, 0])
    from modeling.preprocessing import DECODE_VERSION

    sha = "ab" * 32
    assert shown["auto"] == (f"{sha}-dec{DECODE_VERSION}.png", 12) and shown[16] == (f"{sha}-dec{DECODE_VERSION}-b16.png", 1)  # 200/65535*255


def ingested_from_two_places(ctx, class_folders: Path, tmp_path: Path) -> Path:  # noqa: ANN001
    """class_folders ingested, then a byte-identical copy of it (the images' duplicate_paths); the copy's folder."""
    ingest_source(ctx, class_folders, show_progress=False)
    backup = tmp_path / "backup"
    shutil.copytree(class_folders, backup)
    assert ingest_source(ctx, backup, show_progress=False).n_already_known == 70
    return backup


def checked_files(ctx) -> dict:  # noqa: ANN001
    """What the round's file check records (details)."""
    from rich.console import Console

    from loop.round import RoundOptions, RoundState, check_image_files

    state = RoundState(ctx=ctx, options=RoundOptions(show_progress=False), console=Console(quiet=True))
    check_image_files(state)
    return state.details


def test_a_round_reads_an_image_from_a_known_byte_identical_copy_when_its_file_goes(new_project, class_folders: Path, tmp_path: Path) -> None:
    # ingested from two places, the images were all quarantined as missing when the first folder went, copies or not
    backup = ingested_from_two_places(new_project, class_folders, tmp_path)
    shutil.move(class_folders, tmp_path / "gone")
    (backup / "good" / "good_0000.png").write_bytes(b"not the same bytes")  # this copy changed: no way back for it
    details = checked_files(new_project)
    assert (details["read_from_copies"], details["newly_quarantined"]) == (69, 1)
    by_status = {r.status for r in rows(new_project) if r.path.startswith(str(backup))}
    assert by_status == {"ok"} and sum(r.status == "quarantined" for r in rows(new_project)) == 1
    assert all(r.duplicate_paths == [] for r in rows(new_project) if r.status == "ok")


def test_an_image_quarantined_as_missing_before_comes_back_from_a_known_copy(new_project, class_folders: Path, tmp_path: Path) -> None:
    backup = ingested_from_two_places(new_project, class_folders, tmp_path)
    with session_scope(new_project.engine) as session:  # as a round before copies were read would have left them
        for image in session.scalars(select(Image)):
            image.status, image.status_reason = "quarantined", f"file missing at {image.path} (moved or deleted since ingest)"
    shutil.move(class_folders, tmp_path / "gone")
    details = checked_files(new_project)
    assert (details["read_from_copies"], details["newly_quarantined"]) == (70, 0)
    assert {r.status for r in rows(new_project)} == {"ok"} and all(r.path.startswith(str(backup)) for r in rows(new_project))
