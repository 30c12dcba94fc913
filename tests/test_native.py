"""pulse_edge.native's float16 widening (llama.cpp's vectorised loop) and the vision encoder's use of it."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from pulse_edge import native
from pulse_edge.vision import VisionEncoder

# every float16 bit pattern but the NaNs (whose payload bits the conversions may treat differently), odd count
ALL_F16 = np.concatenate([np.arange(0x7C01, dtype=np.uint16), np.arange(0x8000, 0xFC01, dtype=np.uint16),
                          np.arange(5, dtype=np.uint16)]).view(np.float16)


def test_llama_cpp_conversion_is_found_and_exact() -> None:
    if native._ggml_fp16_to_fp32() is None:
        pytest.skip("this llama.cpp build has no single CPU library to take the conversion from")
    out = np.empty(ALL_F16.shape, dtype=np.float32)
    native.widen_f16(ALL_F16, out)
    np.testing.assert_array_equal(out.view(np.uint32), ALL_F16.astype(np.float32).view(np.uint32))


def test_numpy_fallback_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_ggml_fp16_to_fp32", lambda: None)
    out = np.empty((2, ALL_F16.size), dtype=np.float32)
    native.widen_f16(np.stack([ALL_F16, -ALL_F16]), out)
    np.testing.assert_array_equal(out, np.stack([ALL_F16, -ALL_F16]).astype(np.float32))
    with pytest.raises(ValueError, match="C-contiguous float16 and float32"):
        native.widen_f16(ALL_F16[::2], out[0, ::2])
    with pytest.raises(ValueError, match="C-contiguous float16 and float32"):
        native.widen_f16(ALL_F16.astype(np.float32), out[0])  # would be read as pairs of float16 values


def test_exp_is_numpys_within_its_stated_ulps_with_the_same_limits() -> None:
    x = np.concatenate([np.linspace(-120, 100, 300_001, dtype=np.float32), [0.0, -np.inf, np.inf]]).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = np.exp(x)
    ours = x.copy()
    native.exp_(ours)
    if native._ggml_exp() is None:
        pytest.skip("this llama.cpp build has no single CPU library to take exp from")
    check = (expected >= np.finfo(np.float32).tiny) & np.isfinite(expected)  # normal results
    assert (np.abs(ours[check] - expected[check]) <= native._EXP_ULPS * np.spacing(expected[check])).all()
    assert np.isposinf(ours[x > 89]).all() and (ours[x < -104] == 0).all()  # overflow to inf, underflow to 0
    assert ours[-3:].tolist() == [1.0, 0.0, np.inf]


def test_exp_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_ggml_exp", lambda: None)
    x = np.linspace(-100, 100, 1001, dtype=np.float32).reshape(7, 143)
    ours = x.copy()
    native.exp_(ours)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(ours, np.exp(x))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        native.exp_(x[:, ::2])


def _mmproj(converted) -> Path:  # type: ignore[no-untyped-def]
    return converted.folder / converted.manifest.mmproj().path


def test_float16_matrices_stay_in_the_memory_map(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    """Loading copies only the vectors: the matrices are views of the file, widened one at a time per use."""
    encoder = VisionEncoder.from_gguf(_mmproj(converted_tiny))
    matrices = [m for blk in encoder.blocks for m in (blk.q_w, blk.k_w, blk.v_w, blk.out_w, blk.up_w, blk.down_w)]
    for m in [*matrices, encoder.mm0[0], encoder.mm2[0]]:
        root = m
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        assert m.dtype == np.float16 and not m.flags.writeable and isinstance(root, mmap.mmap), (m.shape, root)
    assert encoder.blocks[0].ln1_w.flags.owndata and encoder.blocks[0].ln1_w.dtype == np.float32  # vectors: copies


def test_encoder_gives_the_same_rows_with_numpys_kernels(converted_tiny,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion is exact either way; the exps differ by rounding only (both within ~1 ulp of the truth),
    which moves the rows by a few float32 roundings: 1e-6 of their largest value (the parity tolerance
    against torch is 2e-5)."""
    pixels = np.random.default_rng(7).standard_normal((2, 3, 336, 336), dtype=np.float32)
    encoder = VisionEncoder.from_gguf(_mmproj(converted_tiny))
    fast = encoder.encode(pixels)
    monkeypatch.setattr(native, "_ggml_fp16_to_fp32", lambda: None)
    monkeypatch.setattr(native, "_ggml_exp", lambda: None)
    plain = encoder.encode(pixels)
    np.testing.assert_allclose(plain, fast, rtol=0, atol=1e-6 * float(np.abs(plain).max()))


def test_openblas_idle_threads_are_told_not_to_spin() -> None:
    """Set by ``import pulse_edge`` when numpy comes after it (as in the CLI); a user's own value is kept."""
    import subprocess
    import sys

    code = "import pulse_edge, numpy, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "4"
    run = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_THREAD_TIMEOUT": "20"},
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "20"
