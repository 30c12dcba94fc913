"""The one door to llama.cpp: imports llama_cpp lazily and keeps its logging quiet.

llama.cpp writes its load and quantisation chatter straight to stderr; here it is routed to the
``pulse_edge.llama_cpp`` logger at DEBUG level, so nothing shows unless ``--verbose`` asks.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("pulse_edge.llama_cpp")
_callback: Any = None


def llama_cpp() -> ModuleType:
    """Import llama_cpp (heavy: loads the shared library) with its logs routed to ``log``."""
    global _callback
    import llama_cpp as module

    if _callback is None:

        @module.llama_log_callback
        def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s", text.decode("utf-8", "replace").rstrip("\n"))

        _callback = forward
        module.llama_log_set(_callback, ctypes.c_void_p(0))
    return module


def release_freed_memory() -> None:
    """Give memory freed by Python/numpy back to the OS now.

    glibc keeps freed heap memory for reuse: after a CLIP-L encode of 5 tiles and dropping the encoder, 0.5 GiB
    stayed in the process (measured), beside the language model's KV cache that comes next. ``malloc_trim``
    returns it. Elsewhere (macOS, Windows, musl) there is no such call and nothing is done.
    """
    import gc

    gc.collect()  # arrays held only by reference cycles are freed first
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


@lru_cache(maxsize=1)
def _ggml_cpu() -> ctypes.CDLL | None:
    """llama.cpp's CPU backend library from the installed llama_cpp package (not imported), or None.

    Only a build's single CPU library is taken, not one of several per-ISA variants, whose instructions this CPU
    might lack. The pinned llama-cpp-python (pyproject.toml) fixes the signatures used below; each function must
    also reproduce numpy's results on test values before it is used, else numpy does the work.
    """
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "lib"
    for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"):
        if (folder / name).is_file():
            try:
                lib = ctypes.CDLL(str(folder / name))
            except OSError:
                return None
            init = getattr(lib, "ggml_cpu_init", None)
            if init is not None:  # fills the tables that the scalar tails of its loops use
                init.restype, init.argtypes = None, []
                init()
            return lib
    return None


@lru_cache(maxsize=1)
def _ggml_fp16_to_fp32() -> Callable[[int, int, int], None] | None:
    """``void ggml_cpu_fp16_to_fp32(const ggml_fp16_t * x, float * y, int64_t n)`` (F16C, NEON), checked."""
    import numpy as np

    convert = getattr(_ggml_cpu(), "ggml_cpu_fp16_to_fp32", None)
    if convert is None:
        return None
    convert.restype, convert.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    # every finite float16 and both infinities, an odd count so that the scalar tail runs too
    probe = np.arange(0x7C01, dtype=np.uint16)
    probe = np.concatenate([probe, probe | 0x8000, probe[:3]]).view(np.float16)
    out = np.empty(probe.size, dtype=np.float32)
    convert(probe.ctypes.data, out.ctypes.data, probe.size)
    if not np.array_equal(out.view(np.uint32), probe.astype(np.float32).view(np.uint32)):
        log.debug("llama.cpp's float16 conversion differs from numpy's: not used")
        return None
    return convert  # type: ignore[no-any-return]


# ggml's vectorised expf is stated to be within 1.5 ulp of the true value, numpy's float32 exp within about 1: a
# result more than this many float32 ulps from numpy's means the function is not what we expect.
_EXP_ULPS = 4


@lru_cache(maxsize=1)
def _ggml_exp() -> Callable[[int, int, int, float], float] | None:
    """``double ggml_vec_soft_max_f32(int n, float * y, const float * x, float max)``: ``y = exp(x - max)``
    (the returned sum is not used), checked against numpy over the whole float32 range of exp."""
    import numpy as np

    function = getattr(_ggml_cpu(), "ggml_vec_soft_max_f32", None)
    if function is None:
        return None
    function.restype, function.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                            ctypes.c_float]
    probe = np.concatenate([np.linspace(-110, 95, 40_001, dtype=np.float32), [0.0, -0.0, -np.inf, np.inf],
                            [np.float32(-1e30), np.float32(1e30)]]).astype(np.float32)
    out = np.empty_like(probe)
    function(probe.size, out.ctypes.data, probe.ctypes.data, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf where both overflowed: equal, tested below
        expected = np.exp(probe)
        close = np.abs(out - expected) <= _EXP_ULPS * np.spacing(expected)
    tiny = np.finfo(np.float32).tiny  # below it (x < -87.3) both are subnormal or zero: nothing a sum sees
    if not ((out == expected) | close | ((out < tiny) & (expected < tiny))).all():
        log.debug("llama.cpp's exp differs from numpy's: not used")
        return None
    return function  # type: ignore[no-any-return]


def exp_(x: Any) -> None:
    """``x = exp(x)`` in place on a C-contiguous float32 array (overflow gives inf, underflow 0, as numpy's).

    llama.cpp's vectorised loop where it can be used (0.6 against numpy's 2.5 ns a value on an AVX2 CPU,
    measured), numpy's otherwise. Releases the GIL either way.
    """
    if not x.flags.c_contiguous or x.dtype.name != "float32":
        raise ValueError("exp_ needs a C-contiguous float32 array")
    function = _ggml_exp()
    if function is None or x.size >= 1 << 31:
        import numpy as np

        with np.errstate(over="ignore"):
            np.exp(x, out=x)
    else:
        function(x.size, x.ctypes.data, x.ctypes.data, 0.0)


def widen_f16(src: Any, out: Any) -> None:
    """``out[...] = src``: C-contiguous float16 -> float32 of the same shape, exactly.

    llama.cpp's loop where it can be used (about 5x numpy's ``astype`` on an AVX2 CPU, measured: 0.6 against
    3 ns per value), numpy's otherwise. Releases the GIL either way.
    """
    if (src.shape != out.shape or not (src.flags.c_contiguous and out.flags.c_contiguous)
            or (src.dtype.name, out.dtype.name) != ("float16", "float32")):
        raise ValueError("widen_f16 needs C-contiguous float16 and float32 arrays of one shape")
    convert = _ggml_fp16_to_fp32()
    if convert is None:
        out[...] = src
    else:
        convert(src.ctypes.data, out.ctypes.data, src.size)
