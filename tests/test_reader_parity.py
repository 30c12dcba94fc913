"""The engine end to end against LLaVA's own pipeline (transformers + llava-torch) on the tiny model.

For each image: the token ids and the image rows the language model receives equal the reference's,
the first-token logits match within a stated tolerance, and the greedy continuation is the same.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pulse_edge.model import resolve
from pulse_edge.reader import Generation, Reader
from tests import images, reference_llava

QUESTION = "What are the main findings of this ECG?"
IMAGES: dict[str, Callable[[], Image.Image]] = {
    "landscape-synthetic": lambda: images.synthetic(1000, 600),
    "portrait-synthetic": lambda: images.synthetic(500, 900, seed=1),
    "strip-synthetic": lambda: images.synthetic(2400, 240, seed=2),
    "small-synthetic": lambda: images.synthetic(200, 150, seed=3),
    "dicom-12-lead": images.dicom_page,
    "scan-ecg00001": lambda: images.scan("ecg00001.png"),
    "scan-ecg00010-rgba": lambda: images.scan("ecg00010.png"),
    "scan-ecg00008-photo": lambda: images.scan("ecg00008.jpg"),
}
# Image rows: numpy float32 CLIP against torch float32 CLIP, the same weights; only summation order
# and the erf approximation (< 1e-7) differ, so 1e-4 relative to the rows' largest value is generous.
ROWS_RTOL = 1e-4
# First-token logits with an f32 KV cache. F32: float32 on both sides over ~3,000 positions, measured ~5e-6
# (flash attention off); 1e-4 leaves a 20x margin. F16: ggml's f16 matmul rounds activations to f16 (2^-11).
LOGITS_ATOL = {"F32": 1e-4, "F16": 3e-2}


@pytest.fixture(scope="module")
def readers(converted_tiny, converted_separate):  # type: ignore[no-untyped-def]
    made = {
        ("flat", "F32"): Reader(resolve(converted_tiny.folder, "F32"), kv_type="f32", threads=2),
        ("flat", "F16"): Reader(resolve(converted_tiny.folder, "F16"), kv_type="f32", threads=2),
        ("spatial_unpad", "F32"): Reader(resolve(converted_separate.folder, "F32"), kv_type="f32", threads=2),
    }
    yield made
    for reader in made.values():
        reader.close()


def our_logits(reader: Reader, image: Image.Image, question: str) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    prepared = reader.prepare(image, question)
    llm = reader.llm
    llm.ensure_context(len(prepared.prefix_ids) + len(prepared.image_rows) + len(prepared.suffix_ids) + 32)
    llm.truncate(0)
    llm.feed_tokens(prepared.prefix_ids)
    llm.feed_embeddings(prepared.image_rows)
    llm.feed_tokens(prepared.suffix_ids)
    return llm.logits().astype(np.float64), prepared.prefix_ids, prepared.image_rows, prepared.suffix_ids


@pytest.mark.parametrize("name", list(IMAGES))
def test_inputs_logits_and_greedy_text_equal_llava(readers, tiny_checkpoint: Path, tiny_separate, name: str) -> None:  # type: ignore[no-untyped-def]
    image = IMAGES[name]()
    ref = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], image, QUESTION)
    reader = readers[("flat", "F32")]
    logits, prefix, rows, suffix = our_logits(reader, image, QUESTION)
    # 1. the same token ids on both sides of the image
    at = ref.ids.index(reference_llava.IMAGE_TOKEN_INDEX)
    assert (prefix, suffix) == (ref.ids[:at], ref.ids[at + 1:])
    # 2. the same image rows, in the same order
    expected_rows = ref.image_rows.numpy()
    assert rows.shape == expected_rows.shape
    assert np.abs(rows - expected_rows).max() <= ROWS_RTOL * np.abs(expected_rows).max()
    # 3. first-token logits
    expected = reference_llava.logits(tiny_checkpoint, ref.embeds).double().numpy()
    assert np.abs(logits - expected).max() <= LOGITS_ATOL["F32"]
    assert expected.std() > 0.1
    # 4. the greedy continuation, through the public read() path
    reading = reader.read(image, [QUESTION], generation=Generation(max_tokens=16))
    assert reading.answers[0].token_ids == reference_llava.greedy(tiny_checkpoint, ref.embeds, 16)
    assert reading.image_tokens == len(expected_rows)


@pytest.mark.parametrize("name", ["landscape-synthetic", "scan-ecg00001"])
def test_f16_model_matches_the_reference_within_f16_rounding(readers, tiny_checkpoint: Path, tiny_separate,  # type: ignore[no-untyped-def]
                                                             name: str) -> None:
    image = IMAGES[name]()
    ref = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], image, QUESTION)
    logits, *_ = our_logits(readers[("flat", "F16")], image, QUESTION)
    expected = reference_llava.logits(tiny_checkpoint, ref.embeds).double().numpy()
    assert np.abs(logits - expected).max() <= LOGITS_ATOL["F16"]
    assert int(logits.argmax()) == int(expected.argmax())


@pytest.mark.parametrize("name", ["landscape-synthetic", "strip-synthetic", "dicom-12-lead"])
def test_spatial_unpad_inputs_and_greedy_text_equal_llava(readers, tiny_separate, name: str) -> None:  # type: ignore[no-untyped-def]
    folder, tower = tiny_separate
    image = IMAGES[name]()
    ref = reference_llava.llava_inputs(folder, tower, image, QUESTION)
    reader = readers[("spatial_unpad", "F32")]
    logits, prefix, rows, suffix = our_logits(reader, image, QUESTION)
    assert rows.shape == tuple(ref.image_rows.shape)
    assert np.abs(rows - ref.image_rows.numpy()).max() <= ROWS_RTOL * float(ref.image_rows.abs().max())
    expected = reference_llava.logits(folder, ref.embeds).double().numpy()
    assert np.abs(logits - expected).max() <= LOGITS_ATOL["F32"]
    reading = reader.read(image, [QUESTION], generation=Generation(max_tokens=16))
    assert reading.answers[0].token_ids == reference_llava.greedy(folder, ref.embeds, 16)


def test_prompt_is_llavas_llava_v1_prompt_single_and_multi_turn() -> None:
    from pulse_edge.prompt import render

    turns: list[tuple[str, str | None]] = [("Is this normal?", None)]
    assert render(turns) == reference_llava.llava_prompt(turns)
    turns = [("Is this normal?", "No."), ("Why?", "ST elevation."), ("Where?", None)]
    assert render(turns) == reference_llava.llava_prompt(turns)


def test_a_second_question_reuses_the_image_and_answers_as_a_fresh_read(readers, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    reader = readers[("flat", "F32")]
    image = IMAGES["scan-ecg00010-rgba"]()
    calls: list[int] = []
    embed = reader.vision.embed
    monkeypatch.setattr(reader.vision, "embed", lambda img: calls.append(1) or embed(img))
    first, second = "What are the main findings of this ECG?", "Is there atrial fibrillation?"
    both = reader.read(image, [first, second], generation=Generation(max_tokens=16))
    assert len(calls) == 1  # one vision pass for two questions
    alone = reader.read(image, [second], generation=Generation(max_tokens=16))
    assert both.answers[1].token_ids == alone.answers[0].token_ids
    assert both.answers[1].text == alone.answers[0].text
    # the second question prefilled only its own tokens, not the ~2,900 of the image
    suffix = reader.prompt_pieces(second)[1]
    assert both.answers[1].prefill_tokens == len(suffix) < 40
    assert both.timings["image_prefill_s"] > 5 * both.answers[1].prefill_s


def test_context_too_small_names_the_numbers(readers) -> None:  # type: ignore[no-untyped-def]
    from pulse_edge.errors import InferenceError

    reader = readers[("flat", "F32")]
    with pytest.raises(InferenceError) as caught:
        reader.read(IMAGES["landscape-synthetic"](), [QUESTION], generation=Generation(max_tokens=4000))
    message = str(caught.value)
    assert message.startswith("This image needs 2880 tokens, the prompt ")
    assert "more than the model's context of 4096. Lower --max-tokens to " in message


def test_network_connections_are_refused() -> None:
    with pytest.raises(OSError, match="network access blocked in tests"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_a_model_given_as_its_two_gguf_files(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pulse_edge.errors import ModelError
    from pulse_edge.model import from_paths

    manifest = converted_tiny.manifest
    lm = converted_tiny.folder / manifest.language_model("Q8_0").path
    mmproj = converted_tiny.folder / manifest.mmproj().path
    files = from_paths(lm, mmproj)
    assert (files.language_model_sha256, files.mmproj_sha256) == (manifest.language_model("Q8_0").sha256,
                                                                   manifest.mmproj().sha256)
    reader = Reader(files, threads=2)
    try:
        reading = reader.read(IMAGES["small-synthetic"](), [QUESTION], generation=Generation(max_tokens=2))
    finally:
        reader.close()
    assert reading.model["language_model_sha256"] == files.language_model_sha256
    assert reading.answers[0].tokens == 2
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError, match="^" + re.escape(f"{missing}: no such file. Convert PULSE-7B")):
        from_paths(missing, mmproj)


# KV cache types against the reference (F32 model, so the cache is the only rounding): "f16" rounds cached keys
# and values to float16 (relative 2^-11), "q8_0" stores keys as 8-bit blocks of 32 with one float16 scale
# (relative error up to 1/254 of a block's largest |value|). Measured on the tiny model after ~2,900 image positions:
# f16 2.3e-4, q8_0 3.8e-3; the bounds leave ~9x and ~5x room, and stay far below a real defect (> 0.1, see above).
KV_ATOL = {"f16": 2e-3, "q8_0": 2e-2}


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_kv_cache_types_stay_within_their_rounding(converted_tiny, tiny_checkpoint: Path, tiny_separate,  # type: ignore[no-untyped-def]
                                                   kv_type: str) -> None:
    image = IMAGES["dicom-12-lead"]()
    ref = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], image, QUESTION)
    expected = reference_llava.logits(tiny_checkpoint, ref.embeds).double().numpy()
    reader = Reader(resolve(converted_tiny.folder, "F32"), kv_type=kv_type, threads=2)
    try:
        logits, *_ = our_logits(reader, image, QUESTION)
        reading = reader.read(image, [QUESTION], generation=Generation(max_tokens=16))
    finally:
        reader.close()
    assert np.abs(logits - expected).max() <= KV_ATOL[kv_type]
    assert reading.answers[0].token_ids == reference_llava.greedy(tiny_checkpoint, ref.embeds, 16)


def test_quantised_weights_round_far_more_than_8_bit_keys(converted_tiny, tiny_checkpoint: Path,  # type: ignore[no-untyped-def]
                                                          tiny_separate) -> None:
    """The premise of kv_type "auto": with Q8_0 weights (the finest quantisation; Q4_K_M rounds more) the
    logits move at least 3x more than 8-bit keys move them, so the keys are never the weakest link
    (measured: 0.13 against 0.0038, 35x)."""
    image = IMAGES["dicom-12-lead"]()
    ref = reference_llava.llava_inputs(tiny_checkpoint, tiny_separate[1], image, QUESTION)
    expected = reference_llava.logits(tiny_checkpoint, ref.embeds).double().numpy()
    errors = {}
    for quant, kv_type in (("Q8_0", "f32"), ("F32", "q8_0")):
        reader = Reader(resolve(converted_tiny.folder, quant), kv_type=kv_type, threads=2)
        try:
            errors[quant] = np.abs(our_logits(reader, image, QUESTION)[0] - expected).max()
        finally:
            reader.close()
    assert errors["Q8_0"] >= 3 * errors["F32"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's list of mapped files")
def test_on_a_cpu_the_mmproj_is_unmapped_after_each_image(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    """The encoder's float16 matrices are views of the mmproj's memory map: dropping the encoder must unmap it,
    or its pages would stay resident beside the language model."""
    files = resolve(converted_tiny.folder, "F16")

    def mapped() -> bool:
        return str(files.mmproj.resolve()) in Path("/proc/self/maps").read_text()

    reader = Reader(files, threads=2)
    try:
        reader.read(IMAGES["small-synthetic"](), [QUESTION], generation=Generation(max_tokens=2))
        assert not mapped()
        assert reader.vision is not None and mapped()  # the check sees a mapping when there is one
    finally:
        reader.close()


def test_on_a_cpu_the_vision_weights_and_the_kv_cache_are_never_held_together(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    files = resolve(converted_tiny.folder, "F32")
    image = IMAGES["small-synthetic"]()
    lean = Reader(files, threads=2)  # CPU build: keep_vision defaults to False
    kept = Reader(files, threads=2, keep_vision=True)
    try:
        assert not lean.keep_vision and lean._vision is None  # checked at load, then dropped
        held: list[bool] = []
        embed = type(lean.vision).embed

        def spy(self, img):  # type: ignore[no-untyped-def]
            held.append(lean.llm.ctx is not None)  # is a KV cache allocated while the encoder runs?
            return embed(self, img)

        lean.read(image, [QUESTION], generation=Generation(max_tokens=4))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(lean.vision), "embed", spy)
            second = lean.read(image, [QUESTION], generation=Generation(max_tokens=4))
        assert held == [False] and lean._vision is None
        assert kept.read(image, [QUESTION], generation=Generation(max_tokens=4)).answers[0].token_ids == \
            second.answers[0].token_ids
        assert kept._vision is not None
    finally:
        lean.close()
        kept.close()


def test_auto_kv_cache_follows_the_weights_in_the_file(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    """One rule, one source (the GGUF's general.file_type): the loaded model and batch --resume agree."""
    from pulse_edge.llm import LanguageModel, gguf_file_type, resolve_kv_type

    for quant, expected in (("F32", "f32"), ("F16", "f16"), ("Q8_0", "q8_0")):
        path = resolve(converted_tiny.folder, quant).language_model
        assert resolve_kv_type("auto", gguf_file_type(path)) == expected
        llm = LanguageModel(path, vocab_only=True)
        try:
            assert llm.kv_type == expected
        finally:
            llm.close()
    assert resolve_kv_type("f16", 0) == "f16"  # an explicit choice stands
