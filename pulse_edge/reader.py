"""Read an ECG image with PULSE: preprocess, encode, splice into the prompt, generate.

The image is encoded and prefilled once; each question is then answered from the cached state
(the KV cache is cut back to the end of the image between questions), so a second question
costs only its own few tokens.
"""

from __future__ import annotations

import codecs
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pulse_edge.errors import InferenceError
from pulse_edge.llm import LanguageModel, Sampling
from pulse_edge.model import ModelFiles
from pulse_edge.native import release_freed_memory
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


def encode(llm: LanguageModel, text: str, *, bos: bool = False) -> list[int]:
    """One piece of the prompt as PULSE's slow ``LlamaTokenizer`` encodes it (``tokenizer(piece).input_ids``).

    The text of a control token (the end-of-turn ``</s>`` of a multi-turn prompt) becomes that token. The text
    starts with SentencePiece's dummy space; after a control token it gets one only in the tokenizer's legacy
    mode (``legacy=False`` encodes what follows ``</s>`` as it is).
    """
    special = llm.special_tokens()
    ids: list[int] = []
    start, first = 0, True
    if special:
        for match in re.finditer("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)), text):
            ids += llm.tokenize(text[start:match.start()], add_bos=bos and first, dummy_prefix=first or llm.legacy)
            ids.append(special[match.group()])
            start, first = match.end(), False
    return ids + llm.tokenize(text[start:], add_bos=bos and first, dummy_prefix=first or llm.legacy)


def split_prompt(llm: LanguageModel, prompt: str) -> tuple[list[int], list[int]]:
    """LLaVA's ``tokenizer_image_token``: each side of ``<image>`` encoded alone, BOS once at the start.

    Only the first ``<image>`` (the one the template puts before the first question) is the image.
    """
    before, _, after = prompt.partition(IMAGE_PLACEHOLDER)
    return encode(llm, before, bos=True), encode(llm, after)


def prompt_pieces(llm: LanguageModel, question: str, template: Template = LLAVA_V1) -> tuple[list[int], list[int], str]:
    """The token ids before and after the image for a single question, and the prompt."""
    prompt = render([(question, None)], template)
    return (*split_prompt(llm, prompt), prompt)


class Reader:
    """A loaded model (language model + vision encoder) that reads many images."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        threads: int | None = None,
        gpu_layers: int | None = None,
        kv_type: str = "auto",
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

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            release_freed_memory()
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
        image_end, image_prefill_s = self._prefill(prefix, rows, needed)
        answers = []
        for index, (question, suffix) in enumerate(zip(questions, suffixes, strict=True)):
            self.llm.truncate(image_end)
            emit = (lambda text, i=index: on_token(i, text)) if on_token else None
            answers.append(self._answer(question, suffix, generation, emit))
        return Reading(
            image=image_name,
            answers=answers,
            model=self.model_info(),
            generation=generation,
            plan=plan.to_dict(),
            image_tokens=len(rows),
            timings=_image_timings(vision_s, image_prefill_s, len(prefix) + len(rows)),
        )

    def model_info(self) -> dict[str, str]:
        """Which model answered, with its KV cache type: recorded with every reading."""
        return {"name": self.files.name, "quant": self.files.quant,
                "language_model_sha256": self.files.language_model_sha256, "mmproj_sha256": self.files.mmproj_sha256,
                "kv_cache": self.llm.kv_type}

    def _prefill(self, prefix: list[int], rows: np.ndarray, n_ctx: int) -> tuple[int, float]:
        """A context of ``n_ctx`` holding the prompt up to the end of the image: that position, and the seconds."""
        self.llm.ensure_context(n_ctx)
        start = time.perf_counter()
        self.llm.truncate(0)
        self.llm.feed_tokens(prefix)
        self.llm.feed_embeddings(rows)
        return self.llm.n_past, time.perf_counter() - start

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


def _image_timings(vision_s: float, prefill_s: float, positions: int) -> dict[str, float]:
    return {"vision_s": vision_s, "image_prefill_s": prefill_s, "image_prefill_tok_s": positions / max(prefill_s, 1e-9)}


class Conversation:
    """A multi-turn conversation about one image, with PULSE's multi-turn ``llava_v1`` prompt.

    The image is encoded and prefilled once, when the conversation starts. Each question renders the whole
    conversation as LLaVA does (earlier answers as their text, each closed by ``</s>``), encodes it the same
    way, and feeds only what the KV cache does not already hold; so every turn sees exactly the input LLaVA's
    own multi-turn loop would give the model, at the cost of its new tokens only.
    """

    def __init__(self, reader: Reader, image: Any, *, generation: Generation = Generation(), image_name: str = "") -> None:
        self.reader = reader
        self.generation = generation
        self.image_name = image_name
        self.turns: list[tuple[str, str]] = []
        llm = reader.llm
        prefix = split_prompt(llm, render([("", None)], reader.template))[0]
        rows, plan, vision_s = reader.image_rows(image)
        self.plan = plan.to_dict()
        self.image_tokens = len(rows)
        self.n_ctx = llm.n_ctx_train  # the whole window: the conversation grows into it
        if len(prefix) + len(rows) + 16 > self.n_ctx:
            raise InferenceError(f"This image needs {len(rows)} tokens: no room is left for a conversation in the "
                                 f"model's context of {self.n_ctx}.")
        self._image_end, prefill_s = reader._prefill(prefix, rows, self.n_ctx)
        self.timings = _image_timings(vision_s, prefill_s, len(prefix) + len(rows))
        self._cached: list[int] = []  # the token ids after the image that the KV cache holds

    def ask(self, question: str, on_token: TokenCallback | None = None) -> Answer:
        """Answer ``question`` given the conversation so far; the answer joins the conversation.

        An answer cut short by an exception (Ctrl-C's ``KeyboardInterrupt``, or one raised by ``on_token``) joins
        nothing: the conversation goes on as if the question had not been asked.
        """
        llm = self.reader.llm
        prompt = render([*self.turns, (question, None)], self.reader.template)
        ids = split_prompt(llm, prompt)[1]
        room = self.n_ctx - self._image_end - len(ids)
        if room < 1:
            raise InferenceError(f"The conversation has filled the model's context of {self.n_ctx} positions; "
                                 "start again with /reset (the image stays read).")
        # Reuse what the cache holds (at least the image); the last prompt token is always fed for its logits.
        keep = 0
        for cached, wanted in zip(self._cached, ids[:-1], strict=False):
            if cached != wanted:
                break
            keep += 1
        # Until the answer is complete only these are sure to be in the cache: the cut keeps them and feeding only
        # writes after them. Claimed before the cut, so that an interrupt anywhere below (Python raises it once a
        # llama.cpp call has returned, even after its cache was changed but before ``n_past`` was) leaves a claim
        # that holds; the next question then cuts the cache back to within it and feeds the rest again.
        self._cached = ids[:keep]
        llm.truncate(self._image_end + keep)
        generation = replace(self.generation, max_tokens=min(self.generation.max_tokens, room))
        answer = self.reader._answer(question, ids[keep:], generation, on_token)
        fed = answer.token_ids if answer.stopped == "eos" else answer.token_ids[:-1]  # the last one was not fed
        self._cached = ids + fed
        self.turns.append((question, answer.text))
        return answer

    def reset(self) -> None:
        """Forget the questions and answers; the image stays read (its cache is kept)."""
        self.turns = []

    def positions_left(self) -> int:
        return self.n_ctx - self.reader.llm.n_past


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
