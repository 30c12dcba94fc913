"""Render a 12-lead ECG waveform as the printout PULSE was trained on.

Standard layout: a 3x4 grid of 2.5-second lead segments (I, II, III | aVR, aVL, aVF | V1-V3 | V4-V6)
and a 10-second lead II rhythm strip, 25 mm/s, 10 mm/mV, on millimetre paper with 5 mm major lines,
each row starting with a 1 mV calibration pulse. Letter landscape at 200 dpi (2200 x 1700 pixels). The text
(lead labels, the footer) is drawn with the project's stroke font (``strokefont``), never a Pillow font, so the
page has the same pixels under every Pillow version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pulse_edge.strokefont import draw_text

LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"
SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0
PAPER_MM = (279.4, 215.9)
DPI = 200
MINOR = (255, 192, 192)
MAJOR = (235, 110, 110)
TRACE = (0, 0, 0)
TEXT_UNIT_MM = 25.4 / 200  # the stroke font's grid unit: one pixel at 200 dpi, capitals 1 mm tall
FOOTER = f"{SPEED_MM_S:g} mm/s   {GAIN_MM_MV:g} mm/mV"

# DICOM / SCP-ECG lead names -> the short names used on printouts.
LEAD_NAMES = {
    "lead i": "I", "lead ii": "II", "lead iii": "III", "lead avr": "aVR", "lead avl": "aVL", "lead avf": "aVF",
    "lead v1": "V1", "lead v2": "V2", "lead v3": "V3", "lead v4": "V4", "lead v5": "V5", "lead v6": "V6",
}


@dataclass(frozen=True)
class Recording:
    """Leads in millivolts sampled at ``rate`` Hz."""

    leads: Mapping[str, np.ndarray]
    rate: float


def short_lead_name(meaning: str) -> str | None:
    text = meaning.lower().split("(")[0].strip()
    return LEAD_NAMES.get(text) or LEAD_NAMES.get(f"lead {text}")


def render(recording: Recording, *, dpi: int = DPI, seconds: float = 10.0) -> Image.Image:
    """Draw ``recording`` on ECG paper; missing leads are left blank."""
    px_mm = dpi / 25.4
    width, height = round(PAPER_MM[0] * px_mm), round(PAPER_MM[1] * px_mm)
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    for mm in range(int(PAPER_MM[0]) + 1):
        x = round(mm * px_mm)
        draw.line([(x, 0), (x, height)], fill=MAJOR if mm % 5 == 0 else MINOR, width=1)
    for mm in range(int(PAPER_MM[1]) + 1):
        y = round(mm * px_mm)
        draw.line([(0, y), (width, y)], fill=MAJOR if mm % 5 == 0 else MINOR, width=1)

    left_mm, cal_mm = 10.0, 5.0
    row_mm = (PAPER_MM[1] - 25.0) / 4
    segment_s = seconds / 4
    line = max(1, round(px_mm * 0.3))
    text_unit = TEXT_UNIT_MM * px_mm

    def trace(signal: np.ndarray, x0_mm: float, baseline_mm: float, duration_s: float) -> None:
        n = min(len(signal), int(round(duration_s * recording.rate)))
        if n < 2:
            return
        t = np.arange(n) / recording.rate
        xs = (x0_mm + t * SPEED_MM_S) * px_mm
        ys = (baseline_mm - signal[:n] * GAIN_MM_MV) * px_mm
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=TRACE, width=line)

    def calibration(x0_mm: float, baseline_mm: float) -> None:
        points_mm = [(x0_mm, baseline_mm), (x0_mm + 1, baseline_mm), (x0_mm + 1, baseline_mm - GAIN_MM_MV),
                     (x0_mm + 4, baseline_mm - GAIN_MM_MV), (x0_mm + 4, baseline_mm), (x0_mm + cal_mm, baseline_mm)]
        draw.line([(x * px_mm, y * px_mm) for x, y in points_mm], fill=TRACE, width=line)

    def label(text: str, x_mm: float, baseline_mm: float) -> None:
        draw_text(draw, ((x_mm + 1) * px_mm, (baseline_mm - 9) * px_mm), text, unit=text_unit, fill=TRACE)

    start_mm = left_mm + cal_mm
    for row, names in enumerate(LAYOUT):
        baseline = 15.0 + row_mm * (row + 0.6)
        calibration(left_mm, baseline)
        for col, name in enumerate(names):
            x0 = start_mm + col * segment_s * SPEED_MM_S
            label(name, x0, baseline)
            if name in recording.leads:
                offset = int(round(col * segment_s * recording.rate))
                trace(recording.leads[name][offset:], x0, baseline, segment_s)
    baseline = 15.0 + row_mm * 3.6
    calibration(left_mm, baseline)
    label(RHYTHM_LEAD, start_mm, baseline)
    if RHYTHM_LEAD in recording.leads:
        trace(recording.leads[RHYTHM_LEAD], start_mm, baseline, seconds)
    draw_text(draw, (left_mm * px_mm, (PAPER_MM[1] - 6) * px_mm), FOOTER, unit=text_unit, fill=TRACE)
    return page


def leads_from_arrays(names: Sequence[str], samples: np.ndarray, rate: float, unit_scale_to_mv: float) -> Recording:
    """Build a recording from a (samples, channels) array and each channel's DICOM lead name."""
    leads: dict[str, np.ndarray] = {}
    for index, meaning in enumerate(names):
        short = short_lead_name(meaning)
        if short is not None and short not in leads:
            leads[short] = samples[:, index].astype(np.float64) * unit_scale_to_mv
    return Recording(leads, rate)
