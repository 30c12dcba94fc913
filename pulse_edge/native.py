"""The one door to llama.cpp: imports llama_cpp lazily and keeps its logging quiet.

llama.cpp writes its load and quantisation chatter straight to stderr; here it is routed to the
``pulse_edge.llama_cpp`` logger at DEBUG level, so nothing shows unless ``--verbose`` asks.
"""

from __future__ import annotations

import ctypes
import logging
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
