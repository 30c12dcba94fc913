"""llama.cpp on the converted tiny model against the transformers reference on the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pulse_edge.native import llama_cpp
from pulse_edge.prompt import render
from tests import reference

PULSE_PROMPT = render([("What are the main findings of this ECG?", None)])
BATTERY = [
    "",
    " ",
    "hello",
    " leading space",
    "double  space",
    "trailing space ",
    "Sinus rhythm, PR 161 ms, QT/QTc 368/370 ms, RR 982 ms.",
    "ST elevation in V1–V4 (≥2 mm) with reciprocal depression in II, III, aVF.",
    "µV, café, Müller, 心电图, emoji 🫀",
    "line one\nline two\n\ttabbed",
    "12345 67.89 -0.5",
    "USER: <image>\nIs there atrial fibrillation? ASSISTANT:",
    "ASSISTANT: Normal ECG.</s>USER: And the axis? ASSISTANT:",
    "<s> literal markers </s> <unk>",
    *PULSE_PROMPT.split("<image>"),
    PULSE_PROMPT,
]


def load(path: Path, n_ctx: int = 512):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    llama_cpp()  # route llama.cpp's logs away from stderr
    # f32 KV cache: the default f16 cache alone costs ~1e-3 in the logits (PULSE.md).
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0,
                 seed=0)


@pytest.fixture(scope="module")
def models(converted_tiny):  # type: ignore[no-untyped-def]
    return {q: load(converted_tiny.folder / converted_tiny.manifest.language_model(q).path)
            for q in ("F32", "F16", "Q8_0")}


def llama_logits(model, ids: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    model.reset()
    model.eval(ids)
    return np.array(model.scores[len(ids) - 1], dtype=np.float64)


def llama_greedy(model, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    model.reset()
    out = list(ids)
    for _ in range(n):
        model.eval(out[model.n_tokens:])
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
    return out[len(ids):]


@pytest.mark.parametrize("text", BATTERY)
def test_tokenisation_equals_pulses_sentencepiece_tokenizer(models, tiny_checkpoint: Path, text: str) -> None:  # type: ignore[no-untyped-def]
    got = models["F16"].tokenize(text.encode("utf-8"), add_bos=True, special=False)
    assert got == reference.encode(tiny_checkpoint, text)


@pytest.mark.parametrize("text", BATTERY)
def test_tokenisation_equals_transformers_llama_tokenizer(models, tiny_checkpoint: Path, text: str) -> None:  # type: ignore[no-untyped-def]
    got = models["F16"].tokenize(text.encode("utf-8"), add_bos=True, special=False)
    expected = reference.tokenizer(tiny_checkpoint)(text, split_special_tokens=True).input_ids
    if text[:1].isspace() and text[:1] != "\n":
        # transformers 5's fast tokenizer folds a leading space into the dummy prefix; PULSE's slow
        # tokenizer (and SentencePiece, and llama.cpp) keep it as its own piece. Pin the known difference.
        assert got[1] == reference.encode(tiny_checkpoint, " ", bos=False)[0]  # the lone "▁" piece
        assert expected == [1, *got[2:]]
    else:
        assert got == expected


PROMPTS = [PULSE_PROMPT.replace("<image>\n", ""), "Sinus rhythm with first degree AV block", "QRS 88 ms"]
# F32: float32 everywhere; llama.cpp and torch differ only in summation order (~1e-6 relative on
# these 2-layer, 256-wide dot products), so 1e-4 absolute on logits of magnitude < 10 has a 100x margin.
F32_ATOL = 1e-4
# F16: the weights are all but exact (bf16 values fit f16 bar subnormals), but ggml's f16 matmul rounds the activations to
# f16 (2^-11 relative); over 2 layers that gives errors of a few 1e-3 on the logits: 2e-2 bounds it.
F16_ATOL = 2e-2


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("quant,atol", [("F32", F32_ATOL), ("F16", F16_ATOL)])
def test_next_token_logits_match_the_reference(models, tiny_checkpoint: Path, prompt: str, quant: str,  # type: ignore[no-untyped-def]
                                               atol: float) -> None:
    ids = reference.encode(tiny_checkpoint, prompt)
    expected = reference.next_token_logits(tiny_checkpoint, ids).double().numpy()
    got = llama_logits(models[quant], ids)
    assert np.abs(got - expected).max() <= atol
    assert int(got.argmax()) == int(expected.argmax())
    assert expected.std() > 0.1  # the reference is not degenerate: the check can fail


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_greedy_continuation_equals_the_reference(models, tiny_checkpoint: Path, quant: str) -> None:  # type: ignore[no-untyped-def]
    ids = reference.encode(tiny_checkpoint, PROMPTS[0])
    expected = reference.greedy(tiny_checkpoint, ids, 16)
    assert llama_greedy(models[quant], ids, 16) == expected
    assert len(set(expected)) > 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_q8_0_keeps_the_top_token(models, tiny_checkpoint: Path, prompt: str) -> None:  # type: ignore[no-untyped-def]
    ids = reference.encode(tiny_checkpoint, prompt)
    expected = reference.next_token_logits(tiny_checkpoint, ids).numpy()
    assert int(llama_logits(models["Q8_0"], ids).argmax()) == int(expected.argmax())


def test_llama_cpp_multimodal_loader_accepts_the_mmproj(models, converted_tiny, converted_separate) -> None:  # type: ignore[no-untyped-def]
    from llama_cpp import mtmd_cpp

    for result in (converted_tiny, converted_separate):
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = 1
        path = str(result.folder / result.manifest.mmproj().path).encode()
        ctx = mtmd_cpp.mtmd_init_from_file(path, models["F16"].model, params)
        assert ctx, path
        assert mtmd_cpp.mtmd_support_vision(ctx)
        mtmd_cpp.mtmd_free(ctx)
