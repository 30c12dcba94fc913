"""The printout's own small stroke font: each glyph a few polylines on a grid, drawn with ``ImageDraw.line``.

Pillow's default font is not ours to pin: it was a bitmap font before Pillow 10.1 and a FreeType font after, so
text drawn with it made the same ECG differ pixel by pixel between installations (and the selftest pins those
pixels). One-pixel lines between integer points are drawn the same by every Pillow.

The grid: x from 0 (left) rightwards, y from 0 (cap height) down to ``BASELINE``; lowercase letters start at
``X_HEIGHT``. ``ecgplot`` draws one unit as one pixel of its 200 dpi page, so the capitals are 8 pixels (1 mm)
tall, the size Pillow's default font drew them. A glyph is as wide as its strokes, plus ``GAP`` before the next.
"""

from __future__ import annotations

from PIL import ImageDraw

BASELINE = 7
X_HEIGHT = 2
GAP = 1  # units between one glyph's rightmost stroke and the next glyph
SPACE = 3  # units a space advances

Point = tuple[int, int]
Stroke = tuple[Point, ...]

# Each glyph: polylines separated by "|", each a list of x,y grid points. Written for this project.
_GLYPHS = {
    " ": "",
    ".": "0,6 1,6 1,7 0,7 0,6",
    "-": "0,4 3,4",
    "/": "0,7 3,0",
    "0": "1,0 3,0 4,1 4,6 3,7 1,7 0,6 0,1 1,0",
    "1": "0,1 1,0 1,7 | 0,7 2,7",
    "2": "0,1 1,0 3,0 4,1 4,2 0,6 0,7 4,7",
    "3": "0,1 1,0 3,0 4,1 4,2 3,3 1,3 | 3,3 4,4 4,6 3,7 1,7 0,6",
    "4": "3,7 3,0 0,4 0,5 4,5",
    "5": "4,0 0,0 0,3 3,3 4,4 4,6 3,7 1,7 0,6",
    "6": "3,0 2,0 0,2 0,6 1,7 3,7 4,6 4,4 3,3 0,3",
    "7": "0,0 4,0 4,1 1,4 1,7",
    "8": "1,0 3,0 4,1 4,2 3,3 1,3 0,4 0,6 1,7 3,7 4,6 4,4 3,3 | 1,3 0,2 0,1 1,0",
    "9": "1,7 2,7 4,5 4,1 3,0 1,0 0,1 0,3 1,4 4,4",
    "F": "4,0 0,0 0,7 | 0,3 3,3",
    "I": "0,0 2,0 | 1,0 1,7 | 0,7 2,7",
    "L": "0,0 0,7 4,7",
    "R": "0,7 0,0 3,0 4,1 4,2 3,3 0,3 | 2,3 4,7",
    "V": "0,0 0,3 2,7 4,3 4,0",
    "a": "1,2 3,2 4,3 4,7 1,7 0,6 0,5 1,4 4,4",
    "m": "0,2 0,7 | 0,3 1,2 2,2 3,3 3,7 | 3,3 4,2 5,2 6,3 6,7",
    "s": "4,2 1,2 0,3 1,4 3,5 4,6 3,7 0,7",
}


def _parse(spec: str) -> tuple[Stroke, ...]:
    strokes = []
    for part in filter(None, (p.strip() for p in spec.split("|"))):
        points = tuple((int(x), int(y)) for x, y in (pair.split(",") for pair in part.split()))
        strokes.append(points)
    return tuple(strokes)


GLYPHS: dict[str, tuple[Stroke, ...]] = {char: _parse(spec) for char, spec in _GLYPHS.items()}


def advance(char: str) -> int:
    """Units from ``char``'s left edge to the next character's."""
    strokes = GLYPHS[char]
    if not strokes:
        return SPACE
    return max(x for stroke in strokes for x, _ in stroke) + 1 + GAP


def missing(text: str) -> list[str]:
    """The characters of ``text`` the font has no glyph for, in order of first appearance."""
    return list(dict.fromkeys(char for char in text if char not in GLYPHS))


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, *, unit: float,
              fill: tuple[int, int, int]) -> None:
    """Draw ``text`` with its top left (the capitals' top) at ``xy`` pixels, one grid unit ``unit`` pixels wide.

    Raises ``ValueError`` for a character the font has no glyph for (before drawing anything).
    """
    absent = missing(text)
    if absent:
        raise ValueError(f"the printout's stroke font has no glyph for {', '.join(map(repr, absent))} (in {text!r}); "
                         f"add one to _GLYPHS in {__file__}.")
    width = max(1, round(unit))
    x0, y0 = xy
    cursor = 0
    for char in text:
        for stroke in GLYPHS[char]:
            # Integer pixel points: the same line on every Pillow, at any dpi.
            points = [(round(x0 + (cursor + x) * unit), round(y0 + y * unit)) for x, y in stroke]
            draw.line(points, fill=fill, width=width)
        cursor += advance(char)
