"""Test images: synthetic ones of many shapes, pydicom's real 12-lead ECG as a printout, real scans."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCANS = Path(os.environ.get("PULSE_EDGE_SCANS", Path(__file__).resolve().parents[2] / "shared" / "data"
                            / "ecg-real-scans"))


def synthetic(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic picture with structure at every scale (gradients, lines, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
    image = Image.fromarray(np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for i in range(12):
        draw.line([(0, i * height // 12), (width, (i * 7 % 12) * height // 12)], fill=(0, 0, 0), width=3)
    return image


def dicom_page() -> Image.Image:
    """pydicom's real 12-lead recording (waveform_ecg.dcm) as a standard 3x4 + rhythm printout."""
    import pydicom
    from pydicom.data import get_testdata_file

    from pulse_edge.ecgplot import leads_from_arrays, render

    dataset = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm", download=False))
    group = dataset.WaveformSequence[0]
    names = [channel.ChannelSourceSequence[0].CodeMeaning for channel in group.ChannelDefinitionSequence]
    recording = leads_from_arrays(names, dataset.waveform_array(0), float(group.SamplingFrequency), 1e-3)
    return render(recording)


def scan(name: str) -> Image.Image:
    path = SCANS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the shared real-scan folder must sit beside the repository "
                                "(or set PULSE_EDGE_SCANS)")
    with Image.open(path) as handle:
        handle.load()
        return handle.copy()
