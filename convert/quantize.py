"""Quantise a F16/F32 llama GGUF with llama.cpp's own quantiser."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pulse_edge.errors import ConversionError
from pulse_edge.native import llama_cpp

# --quant name -> llama_ftype (llama.h). F32, F16 and BF16 are written straight from the checkpoint; the
# others are quantised from the F16 intermediate (bf16 values are exact in f16 except the subnormal ones,
# |x| < 6.1e-5, which move by less than 3e-8).
FTYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2}
WRITTEN_DIRECTLY = ("F32", "F16", "BF16")


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """Quantise ``src`` into ``dst`` as ``quant`` (one of ``FTYPES``)."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    status = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        free = _free_gib(dst.parent)
        raise ConversionError(
            f"llama.cpp could not quantise {src.name} to {quant} into {dst.parent} ({free:.1f} GiB free there); "
            "check the free space and run again with --verbose for llama.cpp's own message."
        )


def _free_gib(folder: Path) -> float:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize / 2**30
