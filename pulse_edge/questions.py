"""The questions asked when the user asks none, worded as in PULSE's training and evaluation data.

PULSE answers best when it is asked the way it was taught and tested. Every wording below is copied from a
released ECGBench item (or the paper's example of one), with where it came from; none is made up. The
questions never contain ``<image>``: the prompt template puts the image before them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pulse_edge.errors import PulseEdgeError

# ECGBench "arena" (multi-turn, real-world scans): the opening question of the example item shown in the
# paper (arXiv 2410.19008, Figure 3). A general interpretation: rhythm, waveforms, intervals, other findings.
DEFAULT_QUESTION = ("Can you describe the features observed in this ECG, including the rhythm, waveforms, intervals, "
                    "and any other notable findings?")

# ECGBench "ptb-test-report" (the report task PULSE-7B scored 61.3 on): all 500 items ask exactly this
# (github AIMedLab/PULSE, evaluation/ptb_report_generation_test.json; also the paper's Figure 3).
REPORT_QUESTION = "Please write a clinical report based on this ECG image."

# ECGBench "g12-test-no-cot" (8-option multiple choice): the instruction every item starts with, then the
# question, then one "LETTER. option" line per option (huggingface.co/datasets/PULSE-ECG/ECGBench,
# g12-test-no-cot.json).
MULTIPLE_CHOICE_INSTRUCTION = ("Answer the following multiple choice question. The last line of your response should "
                               "be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of "
                               "options. Provide the correct option directly.")


@dataclass(frozen=True)
class Preset:
    """A question as PULSE saw it in ECGBench, and where that wording comes from."""

    question: str
    source: str


PRESETS: dict[str, Preset] = {
    "interpretation": Preset(DEFAULT_QUESTION, "ECGBench arena, example item (arXiv 2410.19008, Figure 3)"),
    "report": Preset(REPORT_QUESTION, "ECGBench ptb-test-report, every item (AIMedLab/PULSE "
                                      "evaluation/ptb_report_generation_test.json)"),
    # The stem of the MMMU-ECG example item (paper, Figure 3), asked here without its four options.
    "rhythm": Preset("What is the rhythm shown in this ECG?", "ECGBench mmmu-ecg, example item (arXiv 2410.19008, "
                                                               "Figure 3), without its options"),
    # CODE-15% words this question several ways; this is its first item's wording.
    "normal": Preset("Classify the ECG as normal or abnormal. Provide NORM or ABNORMAL as the output.",
                     "ECGBench code15-test, first item (PULSE-ECG/ECGBench code15-test.json)"),
    # CPSC 2018's nine classes, several may apply (out of domain for PULSE: it was not trained on CPSC).
    "classes": Preset(
        "You are provided with an ECG signal image. Please classify the ECG image into the following diagnostic "
        "statement classes:\nNORM(Normal ECG), AF(Atrial fibrillation), I-AVB(First-degree atrioventricular block), "
        "LBBB(Left bundle branch block), RBBB(Right bundle branch block), PAC(Premature atrial contraction), "
        "PVC(Premature ventricular contraction), STD(ST-segment depression), STE(ST-segment elevated)\n"
        "Directly output the class name and separate with a semicolon.",
        "ECGBench cpsc-test (PULSE-ECG/ECGBench cpsc-test.json)",
    ),
}

def with_presets(questions: Sequence[str], names: Sequence[str]) -> list[str]:
    """The user's own ``questions``, then the :data:`PRESETS` named by ``names`` (each once, in the order given)."""
    for name in names:
        if name not in PRESETS:
            raise PulseEdgeError(f"Unknown --ask {name!r}; choose from {', '.join(PRESETS)}.")
    return [*questions, *(PRESETS[name].question for name in dict.fromkeys(names))]


LETTERS = "ABCDEFGH"  # ECGBench's multiple-choice items have up to 8 options


def multiple_choice(question: str, options: Sequence[str]) -> str:
    """``question`` with lettered ``options``, laid out as ECGBench's multiple-choice items.

    PULSE then answers with the option's letter (``"C. ..."`` or ``"Answer: C"``).
    """
    if not 2 <= len(options) <= len(LETTERS):
        raise PulseEdgeError(f"A multiple-choice question needs 2 to {len(LETTERS)} options, not {len(options)}.")
    lines = [MULTIPLE_CHOICE_INSTRUCTION, question.strip()]
    lines += [f"{letter}. {option.strip()}" for letter, option in zip(LETTERS, options, strict=False)]
    return "\n".join(lines)
