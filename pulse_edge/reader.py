"""Read an ECG image with PULSE: preprocess, encode, splice into the prompt, generate.

The image is encoded and prefilled once; each question is then answered from the cached state
(the KV cache is cut back to the end of the image between questions), so a second question
costs only its own few tokens.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pulse_edge.errors import InferenceError
from pulse_edge.llm import LanguageModel, Sampling
from pulse_edge.model import ModelFiles
from pulse_edge.prompt import IMAGE_PLACEHOLDER, LLAVA_V1, Template, render

if TYPE_CHECKING:
    from pulse_edge.vision import VisionEncoder

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024  # PULSE's evaluation setting
DISCLAIMER = "Research model output, not a medical device: a clinician must over-read every ECG."

TokenCallback = Callable[[str], None]


@dataclass(frozen=True)
class Generation:
    """Every parameter that shaped an answer (recorded with it)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    tokens: int
    token_ids: list[int]
    stopped: str  # "eos" or "max_tokens"
    prefill_tokens: int
    prefill_s: float
    generation_s: float
    time_to_first_token_s: float


@dataclass(frozen=True)
class Prepared:
    """What the language model receives for one question: tokens, image rows, tokens."""

    prefix_ids: list[int]
    image_rows: np.ndarray
    suffix_ids: list[int]
    prompt: str


@dataclass
class Reading:
    """The result of reading one image."""

    image: str
    answers: list[Answer]
    model: dict[str, str]
    generation: Generation
    plan: dict[str, Any]
    image_tokens: int
    timings: dict[str, float]
    disclaimer: str = DISCLAIMER
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_pieces(llm: LanguageModel, question: str, template: Template = LLAVA_V1) -> tuple[list[int], list[int], str]:
    """LLaVA's ``tokenizer_image_token``: each side of ``<image>`` tokenised alone, BOS once at the start."""
    prompt = render([(question, None)], template)
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return llm.tokenize(before, add_bos=True), llm.tokenize(after, add_bos=False), prompt


class Reader:
    """A loaded model (language model + vision encoder) that reads many images."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        threads: int | None = None,
        gpu_layers: int | None = None,
        kv_type: str = "f16",
        template: Template = LLAVA_V1,
        keep_vision: bool | None = None,
    ) -> None:
        """``keep_vision``: keep the vision encoder's weights loaded between images. By default they are kept
        only when the language model runs on a GPU. On a CPU the encoder's weights (0.66 GiB for CLIP-L) and
        the language model's KV cache (2 GiB at 4,096 positions for a 7B) are never needed at the same time,
        so each image frees the cache, encodes, frees the encoder, then makes the cache again: the peak is
        the larger of the two stages, not their sum, for about a second of reloading per image.
        """
        self.files = files
        self.template = template
        self.llm = LanguageModel(files.language_model, threads=threads, gpu_layers=gpu_layers, kv_type=kv_type)
        self.keep_vision = self.llm.gpu_layers != 0 if keep_vision is None else keep_vision
        self._vision: VisionEncoder | None = None
        encoder = self.vision  # loaded now so that a bad or foreign mmproj fails before any image
        if encoder.output_width != self.llm.n_embd:
            raise InferenceError(
                f"{files.mmproj} projects to width {encoder.output_width} but {files.language_model} expects "
                f"{self.llm.n_embd}: the mmproj belongs to another model."
            )
        if not self.keep_vision:
            self._vision = None

    @property
    def vision(self) -> VisionEncoder:
        """The vision encoder, loaded from the mmproj when it is not held."""
        if self._vision is None:
            from pulse_edge.vision import VisionEncoder

            self._vision = VisionEncoder.from_gguf(self.files.mmproj)
        return self._vision

    def close(self) -> None:
        self.llm.close()

    # -- inputs -------------------------------------------------------------------------------
    def prompt_pieces(self, question: str) -> tuple[list[int], list[int], str]:
        """The token ids before and after the image, and the prompt (see ``prompt_pieces``)."""
        return prompt_pieces(self.llm, question, self.template)

    def image_rows(self, image: Any) -> tuple[np.ndarray, Any, float]:
        """Preprocess and encode an image: its embedding rows, tile plan and the seconds it took."""
        start = time.perf_counter()
        if not self.keep_vision:
            self.llm.release_context()  # the cache of the previous image is not needed any more
        rows, plan = self.vision.embed(image)
        if not self.keep_vision:
            self._vision = None
        return rows, plan, time.perf_counter() - start

    def prepare(self, image: Any, question: str) -> Prepared:
        prefix, suffix, prompt = self.prompt_pieces(question)
        rows, _, _ = self.image_rows(image)
        return Prepared(prefix, rows, suffix, prompt)

    # -- reading ------------------------------------------------------------------------------
    def read(
        self,
        image: Any,
        questions: Sequence[str],
        *,
        generation: Generation = Generation(),
        image_name: str = "",
        on_token: Callable[[int, str], None] | None = None,
    ) -> Reading:
        """Answer every question about ``image``, encoding and prefilling the image once."""
        if not questions:
            raise InferenceError("No question to answer.")
        pieces = [self.prompt_pieces(q) for q in questions]
        prefix = pieces[0][0]  # the system prompt and "USER: ": the same for every question
        suffixes = [suffix for _, suffix, _ in pieces]
        rows, plan, vision_s = self.image_rows(image)
        needed = len(prefix) + len(rows) + max(map(len, suffixes)) + generation.max_tokens
        if needed > self.llm.n_ctx_train:
            raise InferenceError(
                f"This image needs {len(rows)} tokens, the prompt {len(prefix) + max(map(len, suffixes))} and the "
                f"answer budget {generation.max_tokens}: {needed} in all, more than the model's context of "
                f"{self.llm.n_ctx_train}. Lower --max-tokens to {max(self.llm.n_ctx_train - needed + generation.max_tokens, 0)} "
                "or less."
            )
        self.llm.ensure_context(needed)
        start = time.perf_counter()
        self.llm.truncate(0)
        self.llm.feed_tokens(prefix)
        self.llm.feed_embeddings(rows)
        image_end = self.llm.n_past
        image_prefill_s = time.perf_counter() - start
        answers = []
        for index, (question, suffix) in enumerate(zip(questions, suffixes, strict=True)):
            self.llm.truncate(image_end)
            emit = (lambda text, i=index: on_token(i, text)) if on_token else None
            answers.append(self._answer(question, suffix, generation, emit))
        return Reading(
            image=image_name,
            answers=answers,
            model={"name": self.files.name, "quant": self.files.quant,
                   "language_model_sha256": self.files.language_model_sha256,
                   "mmproj_sha256": self.files.mmproj_sha256},
            generation=generation,
            plan=plan.to_dict(),
            image_tokens=len(rows),
            timings={"vision_s": vision_s, "image_prefill_s": image_prefill_s,
                     "image_prefill_tok_s": (len(prefix) + len(rows)) / max(image_prefill_s, 1e-9)},
        )

    def _answer(self, question: str, suffix: list[int], generation: Generation,
                emit: TokenCallback | None) -> Answer:
        start = time.perf_counter()
        self.llm.feed_tokens(suffix)
        prefill_s = time.perf_counter() - start
        sampling = Sampling(generation.temperature, generation.top_p, generation.seed)
        chain = self.llm.sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        ids: list[int] = []
        stopped, count, first = "max_tokens", 0, 0.0
        gen_start = time.perf_counter()
        try:
            while count < generation.max_tokens:
                token = self.llm.sample(chain)
                if not first:
                    first = time.perf_counter() - start
                if self.llm.is_end(token):
                    stopped = "eos"
                    break
                count += 1
                ids.append(token)
                text = decoder.decode(self.llm.piece(token))
                if not parts:
                    text = text.lstrip()  # SentencePiece's word-start marker on the first piece
                if text:
                    parts.append(text)
                    if emit:
                        emit(text)
                if count < generation.max_tokens:
                    self.llm.feed_tokens([token])
        finally:
            self.llm.free_sampler(chain)
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
        return Answer(question=question, text="".join(parts).strip(), tokens=count, token_ids=ids, stopped=stopped,
                      prefill_tokens=len(suffix),
                      prefill_s=prefill_s, generation_s=time.perf_counter() - gen_start,
                      time_to_first_token_s=first)


@dataclass(frozen=True)
class Inspection:
    """What the language model would receive for ``question`` about an image, without running it."""

    plan: dict[str, Any]
    merge_type: str
    image_tokens: int
    prompt: str
    prefix_tokens: int
    suffix_tokens: int
    embeddings: np.ndarray


def inspect(files: ModelFiles, image: Any, question: str, template: Template = LLAVA_V1) -> Inspection:
    """Plan, prompt and image embeddings for one image (the language model's vocabulary only is loaded)."""
    from pulse_edge.vision import VisionEncoder

    vision = VisionEncoder.from_gguf(files.mmproj)
    rows, plan = vision.embed(image)
    llm = LanguageModel(files.language_model, vocab_only=True)
    try:
        prefix, suffix, prompt = prompt_pieces(llm, question, template)
    finally:
        llm.close()
    return Inspection(plan=plan.to_dict(), merge_type=vision.params.merge_type, image_tokens=len(rows), prompt=prompt,
                      prefix_tokens=len(prefix), suffix_tokens=len(suffix), embeddings=rows)
