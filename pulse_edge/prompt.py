"""PULSE's conversation template (LLaVA's ``llava_v1``), kept as data.

LLaVA builds the prompt as ``system + " "`` followed by ``"USER: " + text + " "`` and
``"ASSISTANT: " + text + "</s>"`` for each finished turn (separator style TWO), and ends
with ``"ASSISTANT:"`` when the model is to answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pulse_edge.errors import PulseEdgeError

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Template:
    """A two-separator conversation template."""

    id: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str


LLAVA_V1 = Template(
    id="llava_v1",
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)

TEMPLATES = {LLAVA_V1.id: LLAVA_V1}


def check_questions(questions: Iterable[str]) -> None:
    """Refuse a question that holds ``<image>``: the template already puts the image before the first question.

    LLaVA would make a second ``<image>`` a second image slot (and fail, given one image); as text it would
    only read differently from what the user meant, so it is never meaningful in a question.
    """
    for question in questions:
        if IMAGE_PLACEHOLDER in question:
            shown = question if len(question) <= 60 else question[:57] + "..."
            raise PulseEdgeError(
                f"The question {shown!r} contains {IMAGE_PLACEHOLDER}, the image placeholder of PULSE's prompt; the "
                f"image already comes before the question, so remove {IMAGE_PLACEHOLDER} from the question."
            )


def render(turns: Sequence[tuple[str, str | None]], template: Template = LLAVA_V1) -> str:
    """Render ``(question, answer)`` turns; the last answer is ``None`` for the model to write.

    The first question carries the image: it is prefixed with ``<image>\\n`` as LLaVA does. Every question
    passes ``check_questions`` here, the one place questions enter a prompt.
    """
    check_questions(question for question, _ in turns)
    parts = [template.system + template.sep]
    user, assistant = template.roles
    for index, (question, answer) in enumerate(turns):
        text = f"{IMAGE_PLACEHOLDER}\n{question}" if index == 0 else question
        parts.append(f"{user}: {text}{template.sep}")
        if answer is None:
            parts.append(f"{assistant}:")
        else:
            parts.append(f"{assistant}: {answer}{template.sep2}")
    return "".join(parts)


def jinja_chat_template(template: Template = LLAVA_V1) -> str:
    """The same template as a Jinja string, stored in the GGUF for other llama.cpp tools.

    The image placeholder is the caller's business there; BOS is added by the tokenizer.
    """
    user, assistant = template.roles
    return (
        "{{ \"" + template.system + template.sep + "\" }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '" + user + ": ' + message['content'] + '" + template.sep + "' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '" + assistant + ": ' + message['content'] + '" + template.sep2 + "' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + assistant + ":' }}{% endif %}"
    )
