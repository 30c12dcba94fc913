"""LLaVA-1.6 "anyres" preprocessing in numpy/PIL, bit for bit.

What LLaVA does to an image before its CLIP tower (``llava/mm_utils.py``, ``process_anyres_image``, with
transformers' PIL-backed ``CLIPImageProcessor``):

1. ``Image.open(...).convert('RGB')``: alpha is dropped (not composited), palettes expanded, and 16/32-bit
   integer images clipped to 0..255 by Pillow.
2. Pick a canvas among the grid pinpoints (``select_best_resolution``), resize the image to fit it keeping its
   aspect ratio (Pillow's default filter, BICUBIC for RGB) and paste it centred on black.
3. Cut the canvas into ``tile`` x ``tile`` crops, row-major; put the whole image squashed to ``tile`` x ``tile``
   in front of them.
4. Each piece through the CLIP processor: resize shortest edge and centre crop to ``tile`` (both identities for
   these pieces), ``float32(float64(u8) / 255)``, then ``(x - mean) / std`` in float32.

The planning half (:func:`plan_tiles`) is pure arithmetic, shared with the embedding merge, so token counts are
known before anything is encoded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pulse_edge.errors import ImageError, ModelError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

logger = logging.getLogger(__name__)

MERGE_TYPES = ("flat", "spatial_unpad")
# transformers' CLIP rescale factor, applied in float64 before the cast to float32, as transformers does.
RESCALE = 1 / 255
# Modes whose ``convert('RGB')`` saturates (Pillow clips 16/32-bit integers at 255) or zeroes (float) the image.
_LOSSY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class TilePlan:
    """Where every piece of an image comes from, and how many embeddings it becomes.

    Sizes are (width, height) like PIL's; boxes are PIL crop boxes (left, upper, right, lower) in the canvas.
    """

    original_size: tuple[int, int]
    pinpoint: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    grid: tuple[int, int]  # (cols, rows)
    tile: int
    patches_per_side: int
    # spatial_unpad: the rows/cols of the (rows*pps, cols*pps) feature map that survive LLaVA's unpad_image.
    unpad_rows: tuple[int, int]
    unpad_cols: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        """Canvas tiles, not counting the base image."""
        return len(self.boxes)

    @property
    def n_images(self) -> int:
        """Pieces through the CLIP tower: the base image and the tiles."""
        return 1 + len(self.boxes)

    @property
    def tokens_flat(self) -> int:
        return self.n_images * self.patches_per_side**2

    @property
    def tokens_spatial_unpad(self) -> int:
        rows = self.unpad_rows[1] - self.unpad_rows[0]
        cols = self.unpad_cols[1] - self.unpad_cols[0]
        return self.patches_per_side**2 + rows * (cols + 1)  # base + unpadded grid with one newline per row

    def tokens(self, merge_type: str) -> int:
        """Image embeddings the language model receives under ``merge_type``."""
        if merge_type == "flat":
            return self.tokens_flat
        if merge_type == "spatial_unpad":
            return self.tokens_spatial_unpad
        raise ModelError(f"patch merge type {merge_type!r} is not supported (known: {', '.join(MERGE_TYPES)}).")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(n_images=self.n_images, tokens_flat=self.tokens_flat,
                    tokens_spatial_unpad=self.tokens_spatial_unpad)
        return data


@dataclass(frozen=True)
class ImageParams:
    """What preprocessing needs from the mmproj: pinpoints, tile, CLIP mean/std, patch size, merge type."""

    pinpoints: tuple[tuple[int, int], ...]  # (width, height)
    tile: int
    patch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    merge_type: str = "flat"
    aspect_ratio: str = "anyres"

    def plan(self, size: tuple[int, int]) -> TilePlan:
        if self.aspect_ratio != "anyres":
            raise ModelError(f"image_aspect_ratio {self.aspect_ratio!r} is not supported (PULSE uses anyres).")
        return plan_tiles(size, self.pinpoints, self.tile, patch=self.patch)

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, TilePlan]:
        """RGB conversion, plan and pixels for one image: ``(pixels (n, 3, tile, tile), plan)``."""
        rgb = to_rgb(image)
        plan = self.plan(rgb.size)
        return preprocess(rgb, plan, self.mean, self.std), plan


def pairs(flat: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``[w0, h0, w1, h1, ...]`` (how GGUF stores pinpoints) -> ``((w0, h0), (w1, h1), ...)``."""
    if len(flat) % 2:
        raise ModelError(f"grid pinpoints {list(flat)} are not (width, height) pairs; convert the model again.")
    return tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA's choice of canvas: the most image pixels kept, then the least canvas wasted; first wins ties."""
    width, height = size
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for pw, ph in pinpoints:
        scale = min(pw / width, ph / height)
        # int() truncation and the min() against the original area are LLaVA's, kept for identical choices.
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pw, ph), effective, wasted
    if best is None:
        raise ModelError(f"no grid pinpoint fits a {width}x{height} image (pinpoints {list(pinpoints)}).")
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """LLaVA's ``resize_and_pad_image`` size: fit ``target`` keeping the aspect ratio (ceil, capped)."""
    width, height = size
    tw, th = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return tw, min(math.ceil(height * scale_w), th)
    return min(math.ceil(width * scale_h), tw), th


def _unpad(size: tuple[int, int], rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """LLaVA's ``unpad_image`` on a (rows, cols) feature map, as row and column slices."""
    width, height = size
    if width / height > cols / rows:
        new_height = int(height * (cols / width))
        pad = (rows - new_height) // 2
        return (pad, rows - pad), (0, cols)
    new_width = int(width * (rows / height))
    pad = (cols - new_width) // 2
    return (0, rows), (pad, cols - pad)


def plan_tiles(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile: int, *, patch: int = 14) -> TilePlan:
    """Plan LLaVA's anyres pieces for an image of ``size`` (width, height).

    ``pinpoints`` are (width, height) canvases, each a multiple of ``tile`` (LLaVA's spatial merge reshapes the
    tiles into a grid of ``pinpoint // tile``); ``patch`` is the CLIP patch size.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image is {width}x{height} pixels; it needs at least one pixel each way.")
    if tile <= 0 or patch <= 0 or tile % patch:
        raise ModelError(f"tile size {tile} is not a multiple of the patch size {patch}; convert the model again.")
    bad = [p for p in pinpoints if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if bad:
        raise ModelError(f"grid pinpoints {bad} are not multiples of the {tile}px tile; convert the model again.")
    pinpoint = select_best_resolution(size, pinpoints)
    resized = fit_size(size, pinpoint)
    offset = ((pinpoint[0] - resized[0]) // 2, (pinpoint[1] - resized[1]) // 2)
    cols, rows = pinpoint[0] // tile, pinpoint[1] // tile
    boxes = tuple((x, y, x + tile, y + tile) for y in range(0, pinpoint[1], tile) for x in range(0, pinpoint[0], tile))
    pps = tile // patch
    unpad_rows, unpad_cols = _unpad(size, rows * pps, cols * pps)
    return TilePlan(original_size=(width, height), pinpoint=pinpoint, resized_size=resized, offset=offset, boxes=boxes,
                    grid=(cols, rows), tile=tile, patches_per_side=pps, unpad_rows=unpad_rows, unpad_cols=unpad_cols)


def to_rgb(image: Image.Image) -> Image.Image:
    """LLaVA's ``.convert('RGB')``: alpha dropped as is (no compositing on white), palettes expanded.

    Pillow clips 16/32-bit integer images at 255 and maps float images to black; LLaVA saw the same, so it is
    kept, with a warning: a caller who wants otherwise rescales the image before it gets here.
    """
    if image.mode in _LOSSY_MODES:
        logger.warning("image mode %s: converting to RGB the way LLaVA does clips it to 8 bits (values above 255 "
                       "turn white, float images black); rescale it to 8 bits first to keep its contrast.", image.mode)
    return image if image.mode == "RGB" else image.convert("RGB")


def _lookup(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) table of every u8 value through rescale and normalise, with transformers' exact arithmetic."""
    import numpy as np

    if len(mean) != 3 or len(std) != 3:
        raise ModelError(f"image mean {list(mean)} / std {list(std)} need 3 values each (RGB); convert the model again.")
    scaled = (np.arange(256, dtype=np.float64) * RESCALE).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return (scaled[None, :] - m) / s


def preprocess(image: Image.Image, plan: TilePlan, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Pixels for the CLIP tower: ``(1 + n_tiles, 3, tile, tile)`` float32, base image first, tiles row-major.

    ``image`` must be the (RGB-converted) image ``plan`` was made for.
    """
    import numpy as np
    from PIL import Image

    rgb = to_rgb(image)
    if rgb.size != plan.original_size:
        raise ImageError(f"the image is {rgb.size[0]}x{rgb.size[1]} but the tile plan is for "
                         f"{plan.original_size[0]}x{plan.original_size[1]}; plan it again.")
    tile = plan.tile
    # LLaVA calls resize() without a filter: Pillow's default for RGB is BICUBIC (NEAREST only for 1 and P).
    base = np.asarray(rgb.resize((tile, tile), Image.Resampling.BICUBIC))
    canvas = np.zeros((plan.pinpoint[1], plan.pinpoint[0], 3), dtype=np.uint8)  # black, like Image.new('RGB', ...)
    x, y = plan.offset
    w, h = plan.resized_size
    canvas[y:y + h, x:x + w] = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC))

    table = _lookup(mean, std)
    out = np.empty((plan.n_images, 3, tile, tile), dtype=np.float32)
    pieces = [base] + [canvas[top:bottom, left:right] for left, top, right, bottom in plan.boxes]
    for i, piece in enumerate(pieces):
        for c in range(3):
            np.take(table[c], piece[:, :, c], out=out[i, c])
    return out
