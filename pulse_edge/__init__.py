"""pulse-edge: read ECG images offline with PULSE-7B through llama.cpp."""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"

# OpenBLAS's idle threads spin for 2**28 cycles (~0.1 s) after each matmul before they sleep, holding a core that
# the vision encoder's own worker threads need for the attention and norms between its big matmuls: measured on
# 2 cores, 17.4 -> 16.6 s for a 5-tile image (attention 3.2 -> 2.2 s), the matmuls' speed unchanged. OpenBLAS
# reads this once, when numpy loads it, so it only helps when pulse_edge is imported before numpy (as the CLI
# does); a value already set is kept.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
