"""The questions asked when the user asks none, worded as in PULSE's training and evaluation data."""

from __future__ import annotations

DEFAULT_QUESTION = "What are the main findings of this ECG?"
REPORT_QUESTION = "Please write a detailed report of this ECG."
