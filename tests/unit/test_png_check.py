"""A PNG whose image data ends before its last row, followed by a proper end chunk: Pillow decodes it without a word,
the missing rows black. The check tells it from a complete PNG of every colour type, depth and interlacing."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modeling.png_check import expected_png_data_bytes, png_rows_missing
from tests.unit.png_files import png_with_data


@pytest.mark.parametrize(("width", "height", "bit_depth", "colour_type"), [(13, 7, 8, 2), (1, 1, 8, 0), (5, 3, 1, 0), (9, 17, 16, 6), (3, 2, 8, 3),
                                                                           (64, 40, 2, 0), (31, 33, 8, 4)])
@pytest.mark.parametrize("interlaced", [False, True])
def test_a_complete_png_passes_and_one_byte_short_is_named(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> None:
    needed = expected_png_data_bytes(width=width, height=height, bit_depth=bit_depth, colour_type=colour_type, interlaced=interlaced)
    complete = png_with_data(width=width, height=height, bit_depth=bit_depth, colour_type=colour_type, interlaced=interlaced,
                             data_bytes=needed, idat_pieces=3)
    with Image.open(io.BytesIO(complete)) as image:
        image.load()  # Pillow reads it as this size: the byte count is Pillow's too
        assert image.size == (width, height)
    assert png_rows_missing(io.BytesIO(complete)) is None
    short = png_with_data(width=width, height=height, bit_depth=bit_depth, colour_type=colour_type, interlaced=interlaced, data_bytes=needed - 1)
    assert f"{needed - 1} of the {needed} bytes" in png_rows_missing(io.BytesIO(short))


def test_a_png_missing_half_its_rows_is_taken_by_pillow_and_named_by_the_check() -> None:
    half = png_with_data(width=300, height=300, bit_depth=8, colour_type=0, interlaced=False, data_bytes=150 * 301)
    with Image.open(io.BytesIO(half)) as image:
        image.load()  # what the check is for: Pillow takes it, the missing rows black
        assert image.size == (300, 300)
    assert "45150 of the 90300 bytes a 300x300 PNG needs" in png_rows_missing(io.BytesIO(half))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "1", "P", "LA"])
def test_every_png_pillow_writes_is_complete(mode: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (37, 53, 4)).astype(np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65535, (37, 53)).astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert png_rows_missing(io.BytesIO(buffer.getvalue())) is None


def test_a_header_promising_millions_of_pixels_over_92_bytes_is_named_without_inflating_them() -> None:
    bomb = png_with_data(width=13370, height=13370, bit_depth=8, colour_type=0, interlaced=False, data_bytes=13371)
    assert len(bomb) < 120
    assert "ends early: 13371 of the 178770270 bytes a 13370x13370 PNG needs" in png_rows_missing(io.BytesIO(bomb))


def test_what_is_not_a_png_or_is_cut_short_is_left_to_pillow() -> None:
    assert png_rows_missing(io.BytesIO(b"GIF89a....")) is None
    complete = png_with_data(width=20, height=20, bit_depth=8, colour_type=0, interlaced=False, data_bytes=420)
    assert png_rows_missing(io.BytesIO(complete[:40])) is None  # Pillow says "truncated"
