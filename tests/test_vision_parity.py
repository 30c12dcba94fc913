"""The numpy vision encoder (pulse_edge.vision) against HF CLIPVisionModel + LLaVA's projector and merge in torch.

Tolerance: both sides compute in float32 from the same weight values (the f16 mmproj holds the checkpoint's
bf16 values exactly; the f32 one trivially), so only summation order and the GELU/softmax/exp kernels differ:
max |diff| <= 2e-5 x max |reference| (observed ~1e-6; float32 epsilon is 1.2e-7, about a dozen
roundings accumulate over the few layers and the 256-wide projector).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pulse_edge.errors import ImageError, ModelError
from pulse_edge.vision import VisionEncoder, erf, gelu_, merge, quick_gelu_
from tests import reference
from tests.test_preprocess import PARAMS, PINPOINTS, synthetic

try:
    reference.llava_mm_utils()
except ModuleNotFoundError:
    pytest.skip("llava-torch is not installed (the reference merge is LLaVA's)", allow_module_level=True)

REL_TOL = 2e-5


def mmproj(converted) -> Path:  # type: ignore[no-untyped-def]
    return converted.folder / converted.manifest.mmproj().path


def rel_err(ours: np.ndarray, ref: torch.Tensor) -> float:
    theirs = ref.detach().numpy()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def flat_encoder(converted_tiny) -> VisionEncoder:  # type: ignore[no-untyped-def]
    return VisionEncoder.from_gguf(mmproj(converted_tiny))


@pytest.fixture(scope="module")
def unpad_encoder(converted_separate) -> VisionEncoder:  # type: ignore[no-untyped-def]
    return VisionEncoder.from_gguf(mmproj(converted_separate))


def test_encoder_reads_the_mmproj(flat_encoder: VisionEncoder, unpad_encoder: VisionEncoder) -> None:
    assert flat_encoder.params.merge_type == "flat" and unpad_encoder.params.merge_type == "spatial_unpad"
    for enc in (flat_encoder, unpad_encoder):
        c = enc.config
        assert (c.width, c.heads, c.ffn, c.blocks, c.patches, c.output_width) == (128, 2, 256, 3, 576, 256)
        assert enc.params.pinpoints == PARAMS.pinpoints and enc.params.tile == 336
        assert enc.image_newline is not None and enc.image_newline.shape == (256,)


@pytest.mark.parametrize("size", [(2200, 1700), (3000, 300), (200, 150)])
def test_flat_matches_reference(size: tuple[int, int], flat_encoder: VisionEncoder, tiny_checkpoint: Path,
                                tiny_separate: tuple[Path, Path]) -> None:
    """f16 mmproj (weights from inside the checkpoint) vs CLIPVisionModel on the tower folder, flat merge."""
    tower = tiny_separate[1]
    image = synthetic(size, seed=11)
    pixels = reference.anyres_pixels(image, tower, PINPOINTS)
    expected = reference.image_features(tiny_checkpoint, tower, pixels)
    rows, plan = flat_encoder.embed(image)
    features = flat_encoder.encode(pixels.numpy())
    assert rel_err(features, expected) <= REL_TOL
    merged = reference.merge_features(expected, size, PINPOINTS, 336, "flat")
    assert rows.shape == (plan.tokens_flat, 256) and rel_err(rows, merged) <= REL_TOL


@pytest.mark.parametrize("size", [(2200, 1700), (3000, 300), (250, 2400), (672, 672), (200, 150)])
def test_spatial_unpad_matches_reference(size: tuple[int, int], unpad_encoder: VisionEncoder,
                                         tiny_separate: tuple[Path, Path]) -> None:
    """f32 mmproj (tower from the separate folder) vs the reference, LLaVA-1.6's unpad + image_newline merge."""
    folder, tower = tiny_separate
    image = synthetic(size, seed=12)
    pixels = reference.anyres_pixels(image, tower, PINPOINTS)
    expected = reference.image_features(folder, tower, pixels)
    merged = reference.merge_features(expected, size, PINPOINTS, 336, "spatial_unpad",
                                      reference.image_newline(folder))
    rows, plan = unpad_encoder.embed(image)
    assert rows.shape == (plan.tokens_spatial_unpad, 256)
    assert rel_err(rows, merged) <= REL_TOL
    # The newline rows are the checkpoint's image_newline exactly, once per unpadded row.
    width = plan.unpad_cols[1] - plan.unpad_cols[0]
    newline_rows = rows[576:].reshape(-1, width + 1, 256)[:, -1]
    np.testing.assert_array_equal(newline_rows, np.broadcast_to(reference.image_newline(folder).numpy(),
                                                                newline_rows.shape))


def test_real_scan_end_to_end(flat_encoder: VisionEncoder, tiny_checkpoint: Path,
                              tiny_separate: tuple[Path, Path]) -> None:
    path = Path("/work/shared/data/ecg-real-scans/ecg00010.png")
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    with Image.open(path) as image:
        pixels = reference.anyres_pixels(image, tiny_separate[1], PINPOINTS)
        expected = reference.image_features(tiny_checkpoint, tiny_separate[1], pixels)
        rows, _ = flat_encoder.embed(image)
    assert rel_err(rows, expected.flatten(0, 1)) <= REL_TOL


def test_merge_layouts() -> None:
    """Row order of both merges on labelled features (piece, patch row, patch col) against LLaVA's torch code."""
    from pulse_edge.image import plan_tiles

    for size in [(2200, 1700), (3000, 300), (250, 2400), (900, 1000), (1000, 333)]:
        plan = plan_tiles(size, PARAMS.pinpoints, 336)
        n = plan.n_images
        labels = np.arange(n * 576 * 3, dtype=np.float32).reshape(n, 576, 3)
        newline = np.array([-1.0, -2.0, -3.0], dtype=np.float32)
        for kind in ("flat", "spatial_unpad"):
            expected = reference.merge_features(torch.from_numpy(labels), size, PINPOINTS, 336, kind,
                                                torch.from_numpy(newline))
            np.testing.assert_array_equal(merge(labels, plan, kind, newline), expected.numpy())


def test_erf_and_gelu_are_accurate() -> None:
    x = np.concatenate([np.linspace(-8, 8, 200_001), [0.0, -0.0, 1e-30, 5.999, 6.0, 6.001, 1e4, -1e4]])
    expected = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x) - expected).max() < 1e-9
    x32 = np.linspace(-12, 12, 100_001, dtype=np.float32)
    ours = gelu_(x32.copy())
    theirs = torch.nn.functional.gelu(torch.from_numpy(x32)).numpy()
    assert ours.dtype == np.float32
    # within an ulp or so of PyTorch's float32 erf GELU
    assert np.abs(ours - theirs).max() <= 2 * np.spacing(np.abs(theirs).max())
    quick = quick_gelu_(x32.copy())
    xt = torch.from_numpy(x32)
    np.testing.assert_allclose(quick, (xt * torch.sigmoid(1.702 * xt)).numpy(), rtol=1e-6, atol=1e-7)


def test_float32_throughout(flat_encoder: VisionEncoder) -> None:
    pixels = np.zeros((2, 3, 336, 336), dtype=np.float32)
    out = flat_encoder.encode(pixels)
    assert out.dtype == np.float32 and out.shape == (2, 576, 256) and np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], out[1])  # pieces do not see each other


def test_threads_do_not_change_the_result(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    """Worker threads split rows and (piece, head) items; every item is computed the same way alone."""
    from pulse_edge.vision import _openblas_threads

    pixels = np.random.default_rng(4).standard_normal((3, 3, 336, 336), dtype=np.float32)
    one = VisionEncoder.from_gguf(mmproj(converted_tiny), threads=1).encode(pixels)
    blas = _openblas_threads()
    before = blas[0]() if blas else None
    three = VisionEncoder.from_gguf(mmproj(converted_tiny), threads=3).encode(pixels)
    np.testing.assert_allclose(three, one, rtol=0, atol=1e-5 * float(np.abs(one).max()))
    if blas:
        assert blas[0]() == before  # BLAS gets its thread count back


def test_errors(flat_encoder: VisionEncoder, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="preprocess the image first"):
        flat_encoder.encode(np.zeros((1, 3, 224, 224), dtype=np.float32))
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read it as GGUF"):
        VisionEncoder.from_gguf(bad)
