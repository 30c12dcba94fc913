"""The printout's text is drawn with the project's stroke font: the same pixels under every Pillow version."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pulse_edge import ecgplot, selftest, strokefont
from pulse_edge.strokefont import BASELINE, GLYPHS, X_HEIGHT, draw_text
from tests.images import dicom_page

BLACK = (0, 0, 0)


def ink(image: Image.Image) -> np.ndarray:
    """Where ``image`` has the trace colour (the printout's text and traces are drawn in it, the grid is not)."""
    return np.all(np.asarray(image.convert("RGB")) == BLACK, axis=-1)


def cropped(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def written(text: str, unit: float = 1) -> np.ndarray:
    """``text`` drawn alone on white, cropped to its ink."""
    image = Image.new("RGB", (round(12 * unit * (len(text) + 1)), round(12 * unit)), (255, 255, 255))
    draw_text(ImageDraw.Draw(image), (unit, unit), text, unit=unit, fill=BLACK)
    return cropped(ink(image))


def test_every_character_the_printout_draws_has_a_glyph() -> None:
    texts = [*(name for row in ecgplot.LAYOUT for name in row), ecgplot.RHYTHM_LEAD, *ecgplot.LEAD_NAMES.values(),
             ecgplot.FOOTER]
    assert [text for text in texts if strokefont.missing(text)] == []
    # Other speeds and gains (12.5 mm/s, 5 mm/mV) stay drawable.
    assert strokefont.missing("0123456789.-") == []


def test_a_character_without_a_glyph_is_refused_before_anything_is_drawn() -> None:
    image = Image.new("RGB", (60, 12), (255, 255, 255))
    with pytest.raises(ValueError) as info:
        draw_text(ImageDraw.Draw(image), (1, 1), "aVQ?Q", unit=1, fill=BLACK)
    assert str(info.value) == ("the printout's stroke font has no glyph for 'Q', '?' (in 'aVQ?Q'); add one to "
                               f"_GLYPHS in {strokefont.__file__}.")
    assert not ink(image).any()


@pytest.mark.parametrize("char", sorted(GLYPHS))
def test_each_glyph_lies_on_its_grid(char: str) -> None:
    for stroke in GLYPHS[char]:
        assert len(stroke) >= 2, stroke
        top = X_HEIGHT if char.islower() else 0
        assert all(x >= 0 and top <= y <= BASELINE for x, y in stroke), stroke


def test_every_glyph_draws_pixels_of_its_own() -> None:
    shapes = {char: written(char) for char in GLYPHS if char != " "}
    assert all(shape.any() for shape in shapes.values())
    keys = {char: (shape.shape, shape.tobytes()) for char, shape in shapes.items()}
    assert len(set(keys.values())) == len(keys)
    # Capitals and digits are 8 pixels (1 mm) tall at the printout's 200 dpi, as Pillow's default font drew them.
    assert {shape.shape[0] for char, shape in shapes.items() if char.isupper() or char.isdigit()} == {BASELINE + 1}


def test_the_footer_is_written_in_the_stroke_font_below_the_rhythm_strip() -> None:
    page = ecgplot.render(ecgplot.Recording({}, 500.0))  # no traces: only calibration pulses and text are black
    below = ink(page)[round(200 * ecgplot.DPI / 25.4):]  # the last 16 mm hold the footer alone
    assert np.array_equal(cropped(below), written(ecgplot.FOOTER))
    assert ecgplot.FOOTER == "25 mm/s   10 mm/mV"


def test_no_pillow_font_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page is the same when every way to a Pillow font raises: its pixels do not depend on Pillow's fonts."""
    expected = np.asarray(dicom_page())

    def no_font(*args: object, **kwargs: object) -> None:
        raise AssertionError("the printout used a Pillow font")

    monkeypatch.setattr(ImageFont, "load_default", no_font)
    monkeypatch.setattr(ImageFont, "truetype", no_font)
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", no_font)
    assert np.array_equal(np.asarray(dicom_page()), expected)


def test_the_page_has_the_pixels_the_selftest_pins() -> None:
    known = json.loads(selftest.EXPECTED_PATH.read_text(encoding="utf-8"))["page"]
    assert selftest.pixels_sha256(dicom_page()) == known["pixels_sha256"]
