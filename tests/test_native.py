"""pulse_edge.native's float16 widening (llama.cpp's vectorised loop) and the vision encoder's use of it."""

from __future__ import annotations

import mmap
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
    with pytest.raises(ValueError, match="C-contiguous"):
        native.widen_f16(ALL_F16[::2], out[0, ::2])


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


def test_encoder_gives_the_same_rows_with_either_conversion(converted_tiny,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.random.default_rng(7).standard_normal((2, 3, 336, 336), dtype=np.float32)
    encoder = VisionEncoder.from_gguf(_mmproj(converted_tiny))
    fast = encoder.encode(pixels)
    monkeypatch.setattr(native, "_ggml_fp16_to_fp32", lambda: None)
    np.testing.assert_array_equal(encoder.encode(pixels), fast)
