"""pulse-edge: read ECG images offline with PULSE-7B through llama.cpp."""

from __future__ import annotations

__version__ = "0.1.0"
