"""PULSE's prompt as data, and the one check every question passes: no ``<image>`` of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pulse_edge.errors import PulseEdgeError
from pulse_edge.prompt import IMAGE_PLACEHOLDER, check_questions, render
from pulse_edge.questions import PRESETS
from tests import images
from tests.conftest import run_cli


def placeholder_error(question: str) -> str:
    return (f"Error: The question {question!r} contains <image>, the image placeholder of PULSE's prompt; the image "
            "already comes before the question, so remove <image> from the question.\n")


def test_a_question_holding_the_image_placeholder_is_refused_wherever_it_is() -> None:
    assert render([("What is shown?", None)]).count(IMAGE_PLACEHOLDER) == 1
    check_questions([preset.question for preset in PRESETS.values()])
    for turns in ([("Is <image> normal?", None)], [("Hi?", "Hello."), ("And <image>?", None)],
                  [("Hi <image>", "Hello."), ("And?", None)]):
        with pytest.raises(PulseEdgeError, match=r"remove <image> from the question\.$"):
            render(turns)
    long = "Describe " + "this ECG " * 20 + "<image>"
    with pytest.raises(PulseEdgeError, match=re.escape(f"The question {long[:57] + '...'!r} contains <image>")):
        check_questions(["Fine?", long])


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "ecg.png"
    images.synthetic(400, 300).save(path)
    return path


def test_read_refuses_it_before_loading_a_model(png: Path) -> None:
    # no model is installed: the question is checked first
    result = run_cli("read", png, "-q", "Is this normal?", "-q", "What does <image> show?")
    assert (result.code, result.stdout, result.stderr) == (1, "", placeholder_error("What does <image> show?"))


def test_batch_refuses_it_once_before_reading_any_page(converted_tiny, png: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.jsonl"
    result = run_cli("batch", png, png, "--out", out, "--model", converted_tiny.folder, "-q", "<image>\nNormal?")
    assert (result.code, result.stdout, result.stderr) == (1, "", placeholder_error("<image>\nNormal?"))
    assert not out.exists()


def test_inspect_refuses_it_before_encoding_the_image(png: Path) -> None:
    # no model is installed: the question is checked first
    result = run_cli("inspect", png, "-q", "Where is the <image>?")
    assert (result.code, result.stdout, result.stderr) == (1, "", placeholder_error("Where is the <image>?"))
