"""``python -m pulse_edge`` is the ``pulse-edge`` command."""

from __future__ import annotations

from pulse_edge.cli import main

main()
