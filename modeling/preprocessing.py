"""Image decoding and the one preprocessing every model path uses (embedding, ONNX inference, /predict)."""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Bump when to_rgb decodes some file differently: every cache of what the models saw is keyed by it (2: EXIF orientation
# applied, 16-bit and float pixels scaled)
DECODE_VERSION = 2
# Scales for integer pixels above 255 (Mono10/12/14 frames often sit right-aligned in 16 bits). No 10: a 10-bit
# camera's frames take the 12-bit scale (4x darker, 256 levels kept) rather than splitting between 10 and 12
STANDARD_BIT_DEPTHS = (12, 14, 16)
# Smaller images are quarantined at ingest and refused by /predict: no photo of a part, and no model answer worth having
MIN_IMAGE_SIDE = 8
# The Pillow formats ingest and /predict open (loop.ingest.IMAGE_SUFFIXES' formats), whatever a file's name says: no
# other plugin reads a file (review: an EPS named .png would go to Ghostscript where it is installed; a GIF named .png
# was ingested while /predict refused it). An MPO (a camera's JPEG with a preview) opens as JPEG.
DECODED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# A camera's significant bits a project can fix ([model] bit_depth in loop.toml): every frame then gets that scale
CAMERA_BIT_DEPTHS = range(8, 17)


def decode_key(bit_depth: int | None = None) -> str:
    """The cache-key part for how files are decoded: "dec2", or "dec2-b12" for a project that fixed its camera's bits."""
    return f"dec{DECODE_VERSION}" if bit_depth is None else f"dec{DECODE_VERSION}-b{bit_depth}"


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bit_depth: int | None = None  # the camera's significant bits, when the project fixed them (to_rgb)

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "bit_depth": self.bit_depth}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        bit_depth = data.get("bit_depth")  # absent from models made before the setting: the per-frame rule
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]), None if bit_depth is None else int(bit_depth))  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        values = asdict(self)
        return f"{decode_key(self.bit_depth)}-s{values['image_size']}-m{'_'.join(f'{m:g}' for m in self.mean)}-d{'_'.join(f'{s:g}' for s in self.std)}"


_DECODE_MARK = re.compile(r"-dec(\d+)(?=[-.]|$)")  # "-dec2" as a name part of its own (not "...ddec7" in a weights hash)


def remove_caches_of_older_decoding(cache_root: Path) -> list[str]:
    """Delete the caches (one level below each folder of cache_root: a key's folder or file) that an older
    DECODE_VERSION made and the current one has replaced: the same key but for the decode mark ("...-s64-..." or
    "...-dec1-s64-..." beside "...-dec2-s64-..."). They can never be read again, and a large project's detail
    thumbnails alone take 3.2 GB per 100k images. Caches of other settings (an image size used before) are kept.
    The names removed, for the round's record."""
    import shutil

    removed = []
    try:
        kinds = sorted(p for p in Path(cache_root).iterdir() if p.is_dir())
    except OSError:  # no cache yet, or not readable: nothing to remove
        return removed
    for kind in kinds:
        try:
            entries = {entry.name: entry for entry in kind.iterdir()}
        except OSError:  # another user's folder, lost+found, removed meanwhile: never a reason to fail a round
            continue
        current = {_DECODE_MARK.sub("", name) for name in entries if _decode_version(name) == DECODE_VERSION}
        for name, entry in sorted(entries.items()):
            if _decode_version(name) < DECODE_VERSION and _DECODE_MARK.sub("", name) in current:
                try:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                except OSError:
                    continue  # another user's, or in use on a platform that refuses: kept, tried again next round
                removed.append(f"{kind.name}/{name}")
    return removed


def _decode_version(name: str) -> int:
    match = _DECODE_MARK.search(name)
    return int(match.group(1)) if match else 1


def pixel_depth(image: Image.Image, *, bit_depth: int | None = None) -> str | None:
    """How to_rgb brings an image of more than 8 bits a channel down to 8 (None: 8 bits or fewer, converted as is):
    "12 significant bits (0..4095)", "32-bit float in 0..1", "32-bit float, stretched over -3.2..7.5", and with a
    fixed bit_depth "12 significant bits (0..4095), as set" or "12 significant bits (0..4095), as set: values up to
    65535 clipped" (the setting is wrong for that file)."""
    return _to_uint8(image, convert=False, bit_depth=bit_depth)[1] if _wide(image) else None


def to_rgb(image: Image.Image, *, bit_depth: int | None = None) -> Image.Image:
    """The 8-bit RGB picture every path sees (embedding, training, thumbnails, the deployed model, /predict):
    - turned by its EXIF orientation, as browsers and Label Studio show the photo to annotators;
    - 16-bit and float pixels scaled to 8 bits (PIL's convert clips them: a 12-bit camera's frames came out white,
      float frames in 0..1 black, and the model saw blank images). Integer pixels: kept as they are when none is
      above 255, else scaled by 12, 14 or 16 bits, the smallest that holds the largest value, so a 10- or 12-bit
      camera's frames share one scale, and a 14- or 16-bit camera's too unless a frame stays under a quarter of the
      range (it is then brightened: pixel_depth says which scale each image got, and ingest warns of a mix). Float
      pixels in 0..1: times 255; anything else is stretched over its own range;
      A project that fixes its camera's `bit_depth` (8..16) has every integer frame scaled by it instead, dark or
      not (values above it are clipped: pixel_depth says so);
    - greyscale, palette and CMYK images converted to RGB."""
    if image.getexif().get(0x0112, 1) != 1:  # Orientation: only then is a copy worth making
        image = ImageOps.exif_transpose(image)
    if _wide(image):
        image = Image.fromarray(_to_uint8(image, bit_depth=bit_depth)[0])
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide(image: Image.Image) -> bool:
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


@functools.lru_cache(maxsize=4)
def _scale_table(bits: int) -> np.ndarray:
    """uint16 value -> uint8 for a camera of `bits` bits: one lookup per pixel (a 12 MP frame: ~20 ms, no float copy)."""
    return np.clip(np.round(np.arange(2 ** 16) * (255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)


def _to_uint8(image: Image.Image, *, convert: bool = True, bit_depth: int | None = None) -> tuple[np.ndarray | None, str]:
    """(the 8-bit pixels, or None when not `convert`: pixel_depth asks only how; how they were scaled)."""
    pixels = np.asarray(image)
    if pixels.dtype.kind == "f":
        pixels = np.nan_to_num(pixels.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
        if low >= 0.0 and high <= 1.0:
            return (np.round(pixels * np.float32(255.0)).astype(np.uint8) if convert else None), "32-bit float in 0..1"
        how = f"32-bit float, stretched over {low:.3g}..{high:.3g}"
    else:
        low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
        if bit_depth is not None and low >= 0 and high < 2 ** 16:  # the camera's bits, as the project set them
            how = f"{bit_depth} significant bits (0..{2 ** bit_depth - 1}), as set"
            if high >= 2 ** bit_depth:
                how += f": values up to {high} clipped"
            return (_scale_table(bit_depth)[pixels.astype(np.uint16, copy=False)] if convert else None), how
        if low >= 0 and high <= 255:
            return (pixels.astype(np.uint8) if convert else None), "8 significant bits (0..255)"
        if low >= 0 and high < 2 ** 16:
            bits = next(b for b in STANDARD_BIT_DEPTHS if high < 2 ** b)
            how = f"{bits} significant bits (0..{2 ** bits - 1})"
            return (_scale_table(bits)[pixels.astype(np.uint16, copy=False)] if convert else None), how
        how = f"integers stretched over {low}..{high}"
    if not convert:
        return None, how
    span = high - low
    scaled = (pixels.astype(np.float32) - np.float32(low)) * np.float32(255.0 / span) if span > 0 else np.zeros(pixels.shape, dtype=np.float32)
    return np.round(scaled).astype(np.uint8), how


def image_to_array(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """PIL image -> float32 CHW normalised (decoded by to_rgb). Greyscale is replicated to 3 channels; the whole
    image is resized (no crop) because a defect may sit at the border."""
    size = preprocessing.image_size
    rgb = to_rgb(image, bit_depth=preprocessing.bit_depth).resize((size, size), Image.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(preprocessing.mean, dtype=np.float32)) / np.asarray(preprocessing.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_image_array(path: str | Path, preprocessing: Preprocessing) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_array(image, preprocessing)
