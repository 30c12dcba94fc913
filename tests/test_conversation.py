"""Multi-turn conversations about one image against LLaVA's own multi-turn prompt and tokenisation.

LLaVA's loop (``llava/serve/cli.py``) appends each answer's text to the conversation, renders the whole
``llava_v1`` prompt again and tokenises it with ``tokenizer_image_token``; the end-of-turn ``</s>`` is a
special token for PULSE's slow LlamaTokenizer, and with ``legacy=False`` the text after it gets no dummy space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pulse_edge.errors import InferenceError
from pulse_edge.llm import LanguageModel
from pulse_edge.model import resolve
from pulse_edge.prompt import render
from pulse_edge.reader import Conversation, Generation, Reader, split_prompt
from tests import images, reference, reference_llava

# Prompts whose answers and questions exercise the tokeniser's edges: a leading space, a newline, digits,
# non-ASCII text, a question that types the end-of-turn marker itself.
TURNS: list[list[tuple[str, str | None]]] = [
    [("What are the main findings of this ECG?", None)],
    [("Is the rhythm regular?", "Sinus rhythm, 72 bpm."), ("Is there ST elevation?", None)],
    [("Describe it.", " Normal axis.\nPR 160 ms"), ("Any block?", "No AV block; QTc 410 ms."),
     ("Résumé en français ?", None)],
    [("What does </s> mean here?", "It ends a turn."), ("Und jetzt?", None)],
]
LOGITS_ATOL = 1e-4  # F32 model, f32 KV cache: float32 on both sides (see test_reader_parity)


@pytest.fixture(scope="module")
def vocab(converted_tiny):  # type: ignore[no-untyped-def]
    llm = LanguageModel(resolve(converted_tiny.folder, "F32").language_model, vocab_only=True)
    yield llm
    llm.close()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("turns", TURNS, ids=[f"{len(t)}-turns" for t in TURNS])
def test_multi_turn_token_ids_equal_tokenizer_image_token(vocab: LanguageModel, tiny_checkpoint: Path,
                                                          turns: list[tuple[str, str | None]], legacy: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny checkpoint, like Vicuna's tokenizer_config.json, says legacy=False; legacy=True is the
    # transformers default for a config that does not say.
    assert vocab.legacy is False
    monkeypatch.setattr(vocab, "legacy", legacy)
    prompt = render(turns)
    assert prompt == reference_llava.llava_prompt(turns)
    before, after = split_prompt(vocab, prompt)
    expected = [reference.slow_llama_encode(tiny_checkpoint, piece, bos=index == 0, legacy=legacy)
                for index, piece in enumerate(prompt.split("<image>"))]
    assert (before, after) == (expected[0], expected[1])


def test_legacy_flag_changes_only_what_follows_a_special_token(vocab: LanguageModel,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The two modes must differ exactly after ``</s>`` (else the test above could not tell them apart)."""
    text = "\nIs it normal? ASSISTANT: Yes.</s>USER: Why? ASSISTANT:"
    modern = split_prompt(vocab, "<image>" + text)[1]
    monkeypatch.setattr(vocab, "legacy", True)
    legacy = split_prompt(vocab, "<image>" + text)[1]
    eos = modern.index(2)
    assert modern[:eos + 1] == legacy[:eos + 1]
    assert modern[eos + 1:] != legacy[eos + 1:]


@pytest.fixture(scope="module")
def reader(converted_tiny):  # type: ignore[no-untyped-def]
    made = Reader(resolve(converted_tiny.folder, "F32"), kv_type="f32", threads=2)
    yield made
    made.close()


def test_each_turn_gets_llavas_input_and_continuation(reader: Reader, tiny_checkpoint: Path, tiny_separate,  # type: ignore[no-untyped-def]
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image = images.dicom_page()
    questions = ["What are the main findings of this ECG?", "Is there atrial fibrillation?", "What is the heart rate?"]
    chat = Conversation(reader, image, generation=Generation(max_tokens=12))
    calls: list[int] = []
    monkeypatch.setattr(Reader, "image_rows", lambda *a, **k: calls.append(1))  # no second vision pass
    history: list[tuple[str, str]] = []
    for question in questions:
        answer = chat.ask(question)
        ref = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], image, question, history)
        # the cache holds LLaVA's input sequence after the image, then the answer
        after_image = ref.ids[ref.ids.index(reference_llava.IMAGE_TOKEN_INDEX) + 1:]
        assert chat._cached[:len(after_image)] == after_image
        assert chat._image_end + len(after_image) == len(ref.embeds)
        assert answer.token_ids == reference_llava.greedy(tiny_checkpoint, ref.embeds, 12)
        history.append((question, answer.text))
        # only what the cache lacked was fed: never the image again, nor the whole conversation
        assert answer.prefill_tokens < len(after_image) if len(history) > 1 else answer.prefill_tokens == len(after_image)
    assert chat.turns == history and not calls


def test_first_turn_logits_and_second_turn_logits_match_llava(reader: Reader, tiny_checkpoint: Path, tiny_separate) -> None:  # type: ignore[no-untyped-def]
    image = images.synthetic(1000, 600)
    chat = Conversation(reader, image, generation=Generation(max_tokens=6))
    first = chat.ask("Is the rhythm regular?")
    logits = reader.llm.logits().astype(np.float64)  # after the answer: the last position fed
    history = [("Is the rhythm regular?", first.text)]
    chat.ask("Why?")
    # the second turn's prompt, fed in full by LLaVA, equals ours (ids and positions): compare the logits
    # at its last prompt token by re-feeding it exactly as the conversation did
    ref = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], image, "Why?", history)
    expected = reference_llava.logits(tiny_checkpoint, ref.embeds).double().numpy()
    prefix_and_image = chat._image_end
    ids = split_prompt(reader.llm, render([*history, ("Why?", None)]))[1]
    assert prefix_and_image + len(ids) == len(ref.embeds)
    reader.llm.truncate(prefix_and_image)
    reader.llm.feed_tokens(ids)
    assert np.abs(reader.llm.logits().astype(np.float64) - expected).max() <= LOGITS_ATOL
    assert logits.std() > 0.1


def test_reset_forgets_the_turns_but_not_the_image(reader: Reader) -> None:
    image = images.synthetic(500, 900, seed=1)
    chat = Conversation(reader, image, generation=Generation(max_tokens=8))
    fresh = chat.ask("Is there atrial fibrillation?")
    chat.ask("Why?")
    chat.reset()
    assert chat.turns == []
    again = chat.ask("Is there atrial fibrillation?")
    assert again.token_ids == fresh.token_ids


def test_a_full_context_says_what_to_do(reader: Reader) -> None:
    chat = Conversation(reader, images.synthetic(2400, 240, seed=2), generation=Generation(max_tokens=8))
    with pytest.raises(InferenceError, match=r"^The conversation has filled the model's context of 4096 positions; "
                                             r"start again with /reset \(the image stays read\)\.$"):
        chat.ask("why " * 2000)


# -- interrupted answers ---------------------------------------------------------------------------
# Ctrl-C raises KeyboardInterrupt in Python code only: between bytecodes, so after a llama.cpp call has returned
# (its cache already changed) and before the Python after it has run. Each case raises it at one such point.
def _interrupt(where: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Make the next ``ask`` raise KeyboardInterrupt at ``where``; the ``ask`` keywords that need."""
    if where.startswith("token "):
        count = [0]

        def on_token(text: str) -> None:
            count[0] += 1
            if count[0] == int(where.split()[1]):
                raise KeyboardInterrupt

        return {"on_token": on_token}
    if where == "cut":  # the cache was cut, n_past was not updated
        def truncate(self: LanguageModel, position: int) -> None:
            self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), 0, position, -1)
            raise KeyboardInterrupt

        monkeypatch.setattr(LanguageModel, "truncate", truncate)
        return {}
    decode, calls, at = LanguageModel._decode, [0], {"prefill": 1, "generation": 3}[where]

    def interrupted(self: LanguageModel, batch: object, what: str) -> None:  # decoded, n_past not updated
        decode(self, batch, what)
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(LanguageModel, "_decode", interrupted)
    return {}


INTERRUPTED = "Is there atrial fibrillation?"


@pytest.fixture(scope="module")
def uninterrupted(reader: Reader) -> list[tuple[list[int], np.ndarray, str]]:
    """A fresh conversation's two answers (token ids, the logits after them, text): what the interrupted must give."""
    chat = Conversation(reader, images.synthetic(800, 500, seed=3), generation=Generation(max_tokens=10))
    answers = []
    for question in ("Is the rhythm regular?", "Why?"):
        answer = chat.ask(question)
        answers.append((answer.token_ids, reader.llm.logits(), answer.text))
    return answers


@pytest.mark.parametrize("where", ["token 1", "token 4", "prefill", "generation", "cut"])
def test_an_interrupted_answer_leaves_no_trace(reader: Reader, uninterrupted: list[tuple[list[int], np.ndarray, str]],
                                               where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (first_ids, first_logits, first_text), (second_ids, second_logits, _) = uninterrupted
    chat = Conversation(reader, images.synthetic(800, 500, seed=3), generation=Generation(max_tokens=10))
    assert chat.ask("Is the rhythm regular?").token_ids == first_ids
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        chat.ask(INTERRUPTED, **_interrupt(where, patch))  # type: ignore[arg-type]
    assert chat.turns == [("Is the rhythm regular?", first_text)]
    # as if the interrupted question had not been asked: the same answer from the same input
    assert chat.ask("Why?").token_ids == second_ids
    assert np.abs(reader.llm.logits() - second_logits).max() <= LOGITS_ATOL
    ids = split_prompt(reader.llm, render([("Is the rhythm regular?", first_text), ("Why?", None)]))[1]
    assert chat._cached[:len(ids)] == ids
    # After a reset the cache still holds the old conversation's start: the interrupted question overwrites it
    # in place, and the cache must not be taken for the old conversation afterwards.
    chat.reset()
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        chat.ask(INTERRUPTED, **_interrupt(where, patch))  # type: ignore[arg-type]
    assert chat.turns == []
    assert chat.ask("Is the rhythm regular?").token_ids == first_ids
    assert np.abs(reader.llm.logits() - first_logits).max() <= LOGITS_ATOL
