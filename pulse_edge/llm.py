"""The language model in llama.cpp, driven through its C API.

PULSE's input is text tokens with image embeddings spliced in, which llama.cpp's high-level
``Llama`` class cannot take. Here a context is fed batches of either tokens or embedding rows
(``llama_batch_init(n, n_embd, 1)``), the KV cache can be cut back to a position, and tokens are
sampled by llama.cpp's own sampler chain.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import InferenceError, ModelError
from pulse_edge.native import llama_cpp

log = logging.getLogger(__name__)

# KV-cache element types (ggml_type of keys, of values): f32 for exact parity, f16 is llama.cpp's default.
# "q8_0" quantises the keys only: llama.cpp quantises values only with flash attention, which is off (see
# ensure_context). It saves a quarter of the cache (0.47 GiB at 4,096 positions for a 7B).
KV_TYPES = {"f32": (0, 0), "f16": (1, 1), "q8_0": (8, 1)}
KV_AUTO = "auto"
# "auto": the KV cache as precise as the weights, at most f32, by GGUF general.file_type (llama_ftype ALL_F32,
# MOSTLY_F16, MOSTLY_BF16); quantised weights get 8-bit keys, whose rounding is far below the weights' own (measured
# on the tiny model after ~2,900 image positions: Q8_0 weights, the finest quantisation, move the first-token
# logits by 0.13, 8-bit keys by 0.004; tests/test_reader_parity.py) and which save 0.47 GiB for a 7B at 4,096
# positions.
AUTO_KV = {0: "f32", 1: "f16", 32: "f16"}
QUANTISED_KV = "q8_0"


def resolve_kv_type(kv_type: str, file_type: int) -> str:
    """``kv_type`` with "auto" resolved for weights of GGUF ``general.file_type`` ``file_type`` (-1: unknown).

    The one rule for both the loaded model and ``batch --resume``'s matching of earlier records.
    """
    if kv_type not in (*KV_TYPES, KV_AUTO):
        raise InferenceError(f"KV cache type {kv_type!r} is not one of {', '.join((KV_AUTO, *KV_TYPES))}.")
    return AUTO_KV.get(file_type, QUANTISED_KV) if kv_type == KV_AUTO else kv_type


def gguf_file_type(path: Path) -> int:
    """A GGUF's ``general.file_type`` from its header (-1 when the key is absent), without loading the model."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    return int(field.contents()) if field is not None else -1


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's arithmetic units, so llama.cpp gains nothing from them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cores, physical = set(), "0"
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    cores.add((physical, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Temperature 0 is greedy (PULSE's evaluation setting)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class LanguageModel:
    """One llama.cpp model and context on sequence 0."""

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        gpu_layers: int | None = None,
        kv_type: str = KV_AUTO,
        n_batch: int = 512,
        vocab_only: bool = False,
        flash_attn: bool = False,
        repack: bool = False,
    ) -> None:
        lib = llama_cpp()
        self._lib = lib
        self.path = path
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        offload = lib.llama_supports_gpu_offload()
        mparams.n_gpu_layers = (-1 if offload else 0) if gpu_layers is None else gpu_layers
        # llama.cpp's CPU "repack" buffers keep a second, re-laid-out copy of the weights: a 3.9 GB 7B Q4_K_M
        # loads to 6.7 GiB with them (memory-mapped or not) and 3.85 GiB without, and on the AVX2 machine we
        # measured prefill was faster without them (10.0 against 7.9 tok/s) at the same generation speed
        # (benchmarks/README.md). The file is memory-mapped: its pages stay reclaimable page cache.
        mparams.use_mmap = True
        mparams.use_extra_bufts = repack
        mparams.vocab_only = vocab_only
        # SentencePiece's dummy space is added by ``tokenize`` itself, not by llama.cpp: llama.cpp puts one at the
        # start of every text fragment, after special tokens too, where PULSE's tokenizer (legacy=False) puts none.
        overrides = (lib.llama_model_kv_override * 2)()
        overrides[0].tag = lib.LLAMA_KV_OVERRIDE_TYPE_BOOL
        overrides[0].key = b"tokenizer.ggml.add_space_prefix"
        overrides[0].value.val_bool = False
        mparams.kv_overrides = overrides
        self._kv_overrides = overrides  # kept alive with the model, in case llama.cpp reads them after loading
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ModelError(
                f"llama.cpp could not load {path}: the file is damaged or is not a llama GGUF; check the model with "
                f"'pulse-edge models verify {Path(path).parent}', then copy it again (or convert it again)."
            )
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)
        self.add_space_prefix = self.metadata("tokenizer.ggml.add_space_prefix", "true") == "true"
        # transformers' LlamaTokenizer defaults to legacy=True when tokenizer_config.json does not say
        self.legacy = self.metadata("pulse.tokenizer.legacy", "true") == "true"
        self.threads = threads or physical_cores()
        self.gpu_layers = int(mparams.n_gpu_layers)
        self.kv_type = resolve_kv_type(kv_type, int(self.metadata("general.file_type", "-1")))
        self.flash_attn = flash_attn
        self.n_batch = n_batch
        self.ctx: Any = None
        self.n_ctx = 0
        self.n_past = 0

    def ensure_context(self, n_ctx: int) -> None:
        """Have a context of at least ``n_ctx`` positions (a new, empty one when it must grow)."""
        if self.ctx is not None and self.n_ctx >= n_ctx:
            return
        lib = self._lib
        self.release_context()
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.type_k, cparams.type_v = KV_TYPES[self.kv_type]
        cparams.no_perf = True
        # llama.cpp's CPU flash attention (on by default) is wrong for a small batch after a long cached
        # prefix: a 30-token question after ~2,950 image positions moves the logits by ~0.4 (both f32 and
        # f16 caches; measured against transformers). Every question and every generated token is such a
        # batch, so it stays off.
        cparams.flash_attn_type = 1 if self.flash_attn else 0
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise InferenceError(
                f"llama.cpp could not create a {n_ctx}-token context for {self.path}: not enough memory? "
                "Lower --max-tokens."
            )
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.n_past = 0

    # The handle is cleared before the C call frees it: a Ctrl-C during that call raises KeyboardInterrupt as soon
    # as it returns, and a handle still set then would be freed a second time by close() (a crash, seen in a test).
    def release_context(self) -> None:
        """Free the context and its KV cache (the next ensure_context makes a new one)."""
        ctx, self.ctx = getattr(self, "ctx", None), None
        self.n_ctx = self.n_past = 0
        if ctx:
            self._lib.llama_free(ctx)

    def close(self) -> None:
        self.release_context()
        model, self.model = getattr(self, "model", None), None
        if model:
            self._lib.llama_model_free(model)

    def __del__(self) -> None:
        self.close()

    def metadata(self, key: str, default: str) -> str:
        """A GGUF metadata value as llama.cpp prints it (``default`` when the file lacks the key)."""
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else default

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool = False, dummy_prefix: bool = True) -> list[int]:
        """llama.cpp's SentencePiece tokenisation (BOS first when ``add_bos``).

        ``dummy_prefix``: start the text with SentencePiece's word-boundary space, as the tokenizer does at the
        start of a text when its model says so (``add_space_prefix``).
        """
        if dummy_prefix and self.add_space_prefix and text:
            text = " " + text
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (ctypes.c_int32 * size)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            raise InferenceError("llama.cpp could not tokenise the prompt.")
        return list(buf[:n])

    def special_tokens(self) -> dict[str, int]:
        """The text of each control or unknown token (``<s>``, ``</s>``, ``<unk>``) and its id: the tokens that
        transformers' tokenizer recognises inside a text rather than spelling them out."""
        if not hasattr(self, "_special"):
            lib, wanted = self._lib, self._lib.LLAMA_TOKEN_ATTR_CONTROL | self._lib.LLAMA_TOKEN_ATTR_UNKNOWN
            self._special = {lib.llama_vocab_get_text(self.vocab, t).decode("utf-8", "replace"): t
                             for t in range(self.n_vocab) if lib.llama_vocab_get_attr(self.vocab, t) & wanted}
        return self._special

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens give nothing)."""
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    # -- decoding -----------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise InferenceError(
                f"The input needs {self.n_past + n} positions but the context holds {self.n_ctx}; "
                "lower --max-tokens or ask a shorter question."
            )

    def _decode(self, batch: Any, what: str) -> None:
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise InferenceError(f"llama.cpp failed to decode {what} (status {status}).")

    def feed_tokens(self, tokens: Sequence[int]) -> None:
        """Append tokens at the current position; logits are kept for the last one."""
        self._check_room(len(tokens))
        lib = self._lib
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            batch = lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = start + i == len(tokens) - 1
                self._decode(batch, "the prompt")
            finally:
                lib.llama_batch_free(batch)
            self.n_past += len(chunk)

    def feed_embeddings(self, rows: np.ndarray, *, logits: bool = False) -> None:
        """Append input embeddings (one row per position), e.g. an image's projected features."""
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise InferenceError(
                f"Image embeddings have width {rows.shape[-1]}, the language model {self.n_embd}: "
                "the mmproj and the language model do not belong together."
            )
        self._check_room(len(rows))
        lib = self._lib
        data = np.ascontiguousarray(rows, dtype=np.float32)
        for start in range(0, len(data), self.n_batch):
            chunk = data[start:start + self.n_batch]
            n = len(chunk)
            batch = lib.llama_batch_init(n, self.n_embd, 1)
            try:
                batch.n_tokens = n
                ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for i in range(n):
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = logits and start + i == len(data) - 1
                self._decode(batch, "the image embeddings")
            finally:
                lib.llama_batch_free(batch)
            self.n_past += n

    def truncate(self, position: int) -> None:
        """Forget every cached position from ``position`` on (keeps the prefix exactly)."""
        mem = self._lib.llama_get_memory(self.ctx)
        if not self._lib.llama_memory_seq_rm(mem, 0, position, -1):
            raise InferenceError(f"llama.cpp could not cut its cache back to position {position}.")
        self.n_past = position

    def logits(self) -> np.ndarray:
        """Logits after the last fed token (a copy)."""
        pointer = self._lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    # -- sampling -----------------------------------------------------------------------------
    def sampler(self, sampling: Sampling) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if sampling.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if sampling.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(sampling.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(sampling.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(sampling.seed))
        return chain

    def sample(self, chain: Any) -> int:
        return int(self._lib.llama_sampler_sample(chain, self.ctx, -1))

    def free_sampler(self, chain: Any) -> None:
        self._lib.llama_sampler_free(chain)
