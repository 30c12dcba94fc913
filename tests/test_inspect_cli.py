"""``pulse-edge inspect`` from the outside: plan, prompt, and the saved embeddings equal LLaVA's."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np

from pulse_edge.questions import DEFAULT_QUESTION as QUESTION  # what inspect asks without --question
from tests import images, reference_llava
from tests.conftest import run_cli


def test_inspect_json_and_saved_embeddings_match_the_reference(converted_tiny, tiny_checkpoint: Path,  # type: ignore[no-untyped-def]
                                                               tiny_separate, tmp_path: Path) -> None:
    image_path = tmp_path / "ECG page é.png"
    page = images.dicom_page()
    page.save(image_path)
    npy = tmp_path / "rows.npy"
    result = run_cli("inspect", image_path, "--model", converted_tiny.folder, "--save-embeddings", npy, "--json")
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data["plan"]["original_size"] == [2200, 1700]
    assert data["plan"]["pinpoint"] == [672, 672]
    assert data["plan"]["grid"] == [2, 2]
    assert data["image_tokens"] == 5 * 576
    assert data["prompt"] == reference_llava.llava_prompt([(QUESTION, None)])
    rows = np.load(npy)
    expected = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], page, QUESTION).image_rows.numpy()
    assert rows.shape == expected.shape == (2880, 256)
    assert np.abs(rows - expected).max() <= 1e-4 * np.abs(expected).max()  # as in test_reader_parity
    assert stat.S_IMODE(npy.stat().st_mode) == 0o600  # embeddings of a patient's ECG: readable by the user only


def test_inspect_text_lists_the_tiles_and_refuses_to_overwrite(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image_path = tmp_path / "strip.png"
    images.synthetic(2400, 240).save(image_path)
    result = run_cli("inspect", image_path, "--model", converted_tiny.folder)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"image          {image_path} (2400 x 240)"
    assert lines[1] == "pinpoint       1008 x 336 (3 x 1 tiles of 336)"
    assert [line.split()[0] + line.split()[1] for line in lines if line.startswith("tile ")] == ["tile1", "tile2", "tile3"]
    assert "image tokens   2304 (flat)" in lines
    npy = tmp_path / "rows.npy"
    npy.write_bytes(b"keep me")
    again = run_cli("inspect", image_path, "--model", converted_tiny.folder, "--save-embeddings", npy)
    assert again.code == 1
    assert again.stderr.strip() == f"Error: {npy} already exists; pass --force to overwrite it."
    assert npy.read_bytes() == b"keep me"
