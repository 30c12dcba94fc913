"""The questions PULSE is asked by default: worded as in its evaluation data, and safe to put in the prompt."""

from __future__ import annotations

import pytest

from pulse_edge.errors import PulseEdgeError
from pulse_edge.prompt import IMAGE_PLACEHOLDER
from pulse_edge.questions import DEFAULT_QUESTION, MULTIPLE_CHOICE_INSTRUCTION, PRESETS, REPORT_QUESTION, multiple_choice


def test_the_defaults_are_presets_and_none_holds_the_image_placeholder() -> None:
    assert PRESETS["interpretation"].question == DEFAULT_QUESTION
    assert PRESETS["report"].question == REPORT_QUESTION
    for name, preset in PRESETS.items():
        # The template puts the image before the question; a second placeholder would split the prompt wrongly.
        assert IMAGE_PLACEHOLDER not in preset.question, name
        assert preset.question == preset.question.strip() and preset.source, name


def test_multiple_choice_is_laid_out_as_in_ecgbench() -> None:
    text = multiple_choice(" What is the rhythm shown in this ECG? ", ["Sinus tachycardia", "Atrial fibrillation "])
    assert text.splitlines() == [MULTIPLE_CHOICE_INSTRUCTION, "What is the rhythm shown in this ECG?",
                                 "A. Sinus tachycardia", "B. Atrial fibrillation"]
    assert len(multiple_choice("Which class?", [str(i) for i in range(8)]).splitlines()) == 10
    for options in (["only one"], [str(i) for i in range(9)]):
        with pytest.raises(PulseEdgeError, match=f"needs 2 to 8 options, not {len(options)}"):
            multiple_choice("Which?", options)
