"""Anyres preprocessing (pulse_edge.image) against LLaVA's own ``process_anyres_image`` + transformers' CLIP processor.

Tolerance: exact equality, bit for bit. Both sides make the same Pillow calls (``convert('RGB')``, BICUBIC
``resize``, crops of a black canvas) and the same float arithmetic per pixel: ``float32(float64(u8) * (1/255))``,
then ``(x - mean) / std`` in float32 with float32 mean/std, so there is no rounding freedom left.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pulse_edge.errors import ImageError, ModelError
from pulse_edge.image import ImageParams, fit_size, plan_tiles, preprocess, select_best_resolution, to_rgb
from tests import reference

try:
    MM = reference.llava_mm_utils()
except ModuleNotFoundError:
    pytest.skip("llava-torch is not installed (the reference preprocessing is LLaVA's own code)", allow_module_level=True)

SCANS = Path("/work/shared/data/ecg-real-scans")
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PARAMS = ImageParams(pinpoints=tuple((w, h) for w, h in PINPOINTS), tile=336, patch=14, mean=MEAN, std=STD)

SIZES = {
    "portrait": (1700, 2200),
    "landscape-12-lead": (2200, 1700),
    "single-lead-strip": (3000, 300),
    "tall-strip": (250, 2400),
    "small": (200, 150),
    "huge": (5000, 3500),
    "exact-672": (672, 672),
    "exact-336": (336, 336),
    "odd": (1001, 667),
}


def synthetic(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise over gradients and a grid: every resampling tap matters, nothing is flat."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx // 7 + yy // 5) % 2) * 200], -1)
    noise = rng.integers(0, 56, size=(h, w, 3))
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 3).astype(np.uint16))
    return rgb if mode == "RGB" else rgb.convert(mode)


def ours(image: Image.Image) -> np.ndarray:
    pixels, plan = PARAMS.prepare(image)
    assert pixels.dtype == np.float32 and pixels.shape == (plan.n_images, 3, 336, 336)
    return pixels


def theirs(image: Image.Image, tower: Path) -> np.ndarray:
    return reference.anyres_pixels(image, tower, PINPOINTS).numpy()


def assert_identical(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    if not np.array_equal(a, b):
        diff = np.abs(a - b)
        raise AssertionError(f"{int((diff > 0).sum())} of {a.size} values differ, max {diff.max():.3g}")


@pytest.mark.parametrize("name", list(SIZES))
def test_pixels_match_llava(name: str, tiny_separate: tuple[Path, Path]) -> None:
    image = synthetic(SIZES[name])
    assert_identical(ours(image), theirs(image, tiny_separate[1]))


@pytest.mark.parametrize("file", ["ecg00010.png", "ecg00015.png", "ecg00005.jpg", "ecg00053.png"])
def test_real_scans_match_llava(file: str, tiny_separate: tuple[Path, Path]) -> None:
    path = SCANS / file
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    with Image.open(path) as image:  # RGBA, palette, a large portrait phone photo, a 12-lead RGBA page
        assert_identical(ours(image), theirs(image, tiny_separate[1]))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "1", "CMYK", "I;16"])
def test_modes_convert_like_llava(mode: str, tiny_separate: tuple[Path, Path]) -> None:
    """Alpha dropped (not composited), palettes expanded, 16-bit clipped: whatever ``convert('RGB')`` does."""
    image = synthetic((900, 500), mode, seed=3)
    assert image.mode == mode
    assert_identical(ours(image), theirs(image, tiny_separate[1]))


def test_rgba_keeps_colour_under_transparent_pixels() -> None:
    """LLaVA does not flatten alpha: a fully transparent white-on-black image is the black one."""
    rgba = np.zeros((400, 500, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[100:200, 100:300, :3] = 255
    pixels = ours(Image.fromarray(rgba, "RGBA"))
    black = ours(Image.fromarray(rgba[..., :3].copy(), "RGB"))
    assert_identical(pixels, black)


def test_sixteen_bit_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pulse_edge.image"):
        to_rgb(synthetic((40, 30), "I;16"))
    assert "clips it to 8 bits" in caplog.text


def test_base_image_first_then_tiles_row_major(tiny_separate: tuple[Path, Path]) -> None:
    """A 672x672 image has no resizing in the tiles: tile k is the (k // 2, k % 2) quarter of the image."""
    image = synthetic((672, 672), seed=5)
    pixels = ours(image)
    table = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    red = (table[np.asarray(image)[..., 0]] - np.float32(MEAN[0])) / np.float32(STD[0])
    for k in range(4):
        r, c = divmod(k, 2)
        np.testing.assert_array_equal(pixels[1 + k, 0], red[r * 336:(r + 1) * 336, c * 336:(c + 1) * 336])


def _plan_sizes() -> list[tuple[int, int]]:
    rng = random.Random(7)
    sizes = [s for s in SIZES.values()] + [(1, 1), (1, 5000), (5000, 1), (335, 337), (673, 671), (1008, 336),
                                           (1009, 336), (336, 1008), (2721, 2967), (768, 420), (999, 403)]
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(300)]
    sizes += [(rng.randint(50, 3000), rng.randint(20, 400)) for _ in range(100)]  # strips
    return sizes


def test_plan_matches_llava_arithmetic() -> None:
    """Canvas, paste box, grid and spatial_unpad token count against LLaVA's own functions, on 400+ sizes."""
    import torch

    from tests.reference import merge_features

    for size in _plan_sizes():
        plan = plan_tiles(size, PARAMS.pinpoints, 336)
        assert plan.pinpoint == tuple(MM.select_best_resolution(size, PINPOINTS)), size
        assert plan.pinpoint == select_best_resolution(size, PARAMS.pinpoints)
        assert plan.grid == tuple(MM.get_anyres_image_grid_shape(size, PINPOINTS, 336)), size
        assert plan.n_tiles == plan.grid[0] * plan.grid[1]
        assert plan.boxes[0] == (0, 0, 336, 336) and plan.boxes[-1][2:] == plan.pinpoint
        assert plan.tokens_flat == plan.n_images * 576
        features = torch.zeros(plan.n_images, 576, 1)
        merged = merge_features(features, size, PINPOINTS, 336, "spatial_unpad", torch.zeros(1))
        assert plan.tokens_spatial_unpad == merged.shape[0], size
        assert plan.tokens("spatial_unpad") == merged.shape[0] and plan.tokens("flat") == plan.tokens_flat


@pytest.mark.parametrize("size", [(2200, 1700), (3000, 300), (200, 150), (5000, 3500), (1001, 667), (1, 5000)])
def test_paste_box_matches_resize_and_pad(size: tuple[int, int]) -> None:
    """Where LLaVA's ``resize_and_pad_image`` pastes a white image is the plan's offset and resized size."""
    plan = plan_tiles(size, PARAMS.pinpoints, 336)
    padded = MM.resize_and_pad_image(Image.new("RGB", size, (255, 255, 255)), plan.pinpoint)
    left, top, right, bottom = padded.getbbox()
    assert (left, top) == plan.offset
    assert (right - left, bottom - top) == plan.resized_size == fit_size(size, plan.pinpoint)


def test_landscape_page_is_five_pieces() -> None:
    """PULSE.md: a typical landscape 12-lead page picks 672x672 and gives 5 x 576 = 2880 embeddings (flat)."""
    plan = plan_tiles((2200, 1700), PARAMS.pinpoints, 336)
    assert (plan.pinpoint, plan.grid, plan.n_images, plan.tokens_flat) == ((672, 672), (2, 2), 5, 2880)
    assert plan.resized_size == (672, 520) and plan.offset == (0, 76)
    assert plan.to_dict()["tokens_flat"] == 2880


def test_unpad_transcription_matches_llava() -> None:
    """reference.unpad_image (used by the merge reference) against LLaVA's own, when its model code imports."""
    import torch

    try:
        from llava.model.llava_arch import unpad_image
    except Exception:  # noqa: BLE001 - LLaVA's model code may not import against this transformers
        pytest.skip("llava.model.llava_arch does not import here")
    for size in _plan_sizes()[:150]:
        plan = plan_tiles(size, PARAMS.pinpoints, 336)
        grid = torch.zeros(1, plan.grid[1] * 24, plan.grid[0] * 24)
        assert unpad_image(grid, size).shape == reference.unpad_image(grid, size).shape, size


def test_errors_say_what_to_do() -> None:
    with pytest.raises(ImageError, match="at least one pixel"):
        plan_tiles((0, 10), PARAMS.pinpoints, 336)
    with pytest.raises(ModelError, match="not multiples of the 336px tile"):
        plan_tiles((100, 100), ((300, 600),), 336)
    plan = plan_tiles((100, 100), PARAMS.pinpoints, 336)
    with pytest.raises(ImageError, match="plan it again"):
        preprocess(synthetic((120, 100)), plan, MEAN, STD)
