"""Synthetic PULSE-7B checkpoints: the exact file layout of PULSE-ECG/PULSE-7B, filled with random weights.

``python -m convert.synthetic --shape tiny|7b OUT [--vision-tower-separate DIR] [--merge flat|spatial_unpad]
[--seed N] [--tokenizer FILE] [--force]`` writes ``config.json``, three bf16 safetensors shards with their index,
a real SentencePiece ``tokenizer.model`` (BPE, byte fallback, LLaMA's trainer settings) trained on a generated
ECG-report corpus (or the given ``--tokenizer`` file, which needs no ``sentencepiece``), and the
tokenizer/generation configs. With ``--vision-tower-separate DIR`` the CLIP tower
is left out of the checkpoint and written to DIR in the layout of ``openai/clip-vit-large-patch14-336``
instead, with the same random values, and ``mm_vision_tower`` points at DIR.

Every tensor draws from its own generator seeded by (seed, tensor name), so values do not depend on shard
layout or on which variant is written, and the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
from collections import deque
from collections.abc import Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from convert.safetensors import DTYPES, SafetensorsWriter, TensorSpec, bf16_bits_to_f32, f32_to_bf16_bits
from convert.tokenizer import read_vocabulary
from pulse_edge.errors import ConversionError

logger = logging.getLogger(__name__)

# The shapes. "7b" is PULSE-7B (Vicuna-7B + CLIP ViT-L/14-336); "tiny" keeps the real tile geometry
# (336 px, patch 14, 577 positions) and head size 64 but shrinks widths and depths. Every LLaMA weight row
# (last dimension) is a multiple of 256 so llama.cpp can quantise the tiny model to K-quants too.
# The vocabulary is whatever the trained tokenizer has: "vocab" is the target handed to SentencePiece.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "llm": {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
        },
        "vocab": 512,
        "vision": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 64,
        },
        # CLIP's text tower, only written into a separate tower folder (the converter ignores it).
        "clip_text": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "vocab_size": 1000,
            "projection_dim": 64,
        },
        # Scales of the random values: larger than a trained model's so the tiny one answers non-trivially;
        # head_gain widens the gaps between logits so greedy decoding survives quantisation noise.
        "init": {"embed_std": 1.0, "norm_noise": 0.1, "bias_std": 0.05, "linear_gain": 1.0, "head_gain": 3.0,
                 "distribution": "normal"},
        # Generated tokenizer corpus: ECG sentences, and pseudo-words to fill a large vocabulary.
        "corpus": {"ecg_sentences": 4000, "pseudo_words": 0, "pseudo_sentences": 0},
    },
    "7b": {
        "llm": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
        },
        "vocab": 32000,
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "clip_text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
            "projection_dim": 768,
        },
        # Uniform values (same spread) draw ~3x faster than normals: 7 billion of them take ~1 minute less.
        "init": {"embed_std": 0.02, "norm_noise": 0.02, "bias_std": 0.02, "linear_gain": 1.0, "head_gain": 1.0,
                 "distribution": "uniform"},
        "corpus": {"ecg_sentences": 20000, "pseudo_words": 60000, "pseudo_sentences": 150000},
    },
}

# For tests only: the tiny shape with a language model twice as wide (head size still 64), so that an mmproj
# converted from one of them projects to the wrong width for the other.
SHAPES["tiny-wide"] = {**SHAPES["tiny"], "llm": {**SHAPES["tiny"]["llm"], "hidden_size": 512,
                                                   "num_attention_heads": 8, "num_key_value_heads": 8}}

MERGE_TYPES = ("flat", "spatial_unpad")
SHARD_COUNT = 3
CLIP_TOWER_NAME = "openai/clip-vit-large-patch14-336"
VISION_PREFIX = "model.vision_tower.vision_tower."  # + "vision_model.…" inside the LLaVA checkpoint
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TRANSFORMERS_VERSION = "4.37.2"  # llava-torch 1.2.2 pins transformers 4.37.2
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Files this generator owns in OUT / DIR: the only ones --force removes.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
TOWER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")

# Tensor tables: (name, shape as dimension names, how to fill it). Names follow PyTorch's state-dict order.
LLAMA_LAYER = (
    ("self_attn.q_proj.weight", ("hidden", "hidden"), "linear"),
    ("self_attn.k_proj.weight", ("kv", "hidden"), "linear"),
    ("self_attn.v_proj.weight", ("kv", "hidden"), "linear"),
    ("self_attn.o_proj.weight", ("hidden", "hidden"), "linear"),
    ("mlp.gate_proj.weight", ("ffn", "hidden"), "linear"),
    ("mlp.up_proj.weight", ("ffn", "hidden"), "linear"),
    ("mlp.down_proj.weight", ("hidden", "ffn"), "linear"),
    ("input_layernorm.weight", ("hidden",), "norm"),
    ("post_attention_layernorm.weight", ("hidden",), "norm"),
)
# HF's CLIPAttention declares k, v, q, out in that order.
CLIP_LAYER = (
    ("self_attn.k_proj.weight", ("width", "width"), "linear"),
    ("self_attn.k_proj.bias", ("width",), "bias"),
    ("self_attn.v_proj.weight", ("width", "width"), "linear"),
    ("self_attn.v_proj.bias", ("width",), "bias"),
    ("self_attn.q_proj.weight", ("width", "width"), "linear"),
    ("self_attn.q_proj.bias", ("width",), "bias"),
    ("self_attn.out_proj.weight", ("width", "width"), "linear"),
    ("self_attn.out_proj.bias", ("width",), "bias"),
    ("layer_norm1.weight", ("width",), "norm"),
    ("layer_norm1.bias", ("width",), "bias"),
    ("mlp.fc1.weight", ("mlp", "width"), "linear"),
    ("mlp.fc1.bias", ("mlp",), "bias"),
    ("mlp.fc2.weight", ("width", "mlp"), "linear"),
    ("mlp.fc2.bias", ("width",), "bias"),
    ("layer_norm2.weight", ("width",), "norm"),
    ("layer_norm2.bias", ("width",), "bias"),
)
CLIP_VISION_HEAD = (
    ("vision_model.embeddings.class_embedding", ("width",), "embed"),
    ("vision_model.embeddings.patch_embedding.weight", ("width", "channels", "patch", "patch"), "linear"),
    ("vision_model.embeddings.position_embedding.weight", ("positions", "width"), "embed"),
    ("vision_model.pre_layrnorm.weight", ("width",), "norm"),  # sic: HF's spelling
    ("vision_model.pre_layrnorm.bias", ("width",), "bias"),
)
CLIP_VISION_TAIL = (
    ("vision_model.post_layernorm.weight", ("width",), "norm"),
    ("vision_model.post_layernorm.bias", ("width",), "bias"),
)
CLIP_TEXT_HEAD = (
    ("text_model.embeddings.token_embedding.weight", ("vocab", "width"), "embed"),
    ("text_model.embeddings.position_embedding.weight", ("positions", "width"), "embed"),
)
CLIP_TEXT_TAIL = (
    ("text_model.final_layer_norm.weight", ("width",), "norm"),
    ("text_model.final_layer_norm.bias", ("width",), "bias"),
)
PROJECTOR = (
    ("model.mm_projector.0.weight", ("hidden", "mm_hidden"), "linear"),
    ("model.mm_projector.0.bias", ("hidden",), "bias"),
    ("model.mm_projector.2.weight", ("hidden", "hidden"), "linear"),
    ("model.mm_projector.2.bias", ("hidden",), "bias"),
)

# LLaMA's SentencePiece trainer settings (as stored in its tokenizer.model's trainer_spec).
SPM_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.99995,
    "byte_fallback": True,
    "split_digits": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "max_sentencepiece_length": 16,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "unk_surface": " \u2047 ",
    "hard_vocab_limit": True,
    "num_threads": 1,  # one thread: training is then deterministic
    "input_sentence_size": 0,  # use every sentence, no sampling
    "shuffle_input_sentence": False,
}
TOKENIZER_SEED = 7  # the corpus depends on the shape only, so every seed of a shape shares one tokenizer

CHUNK_ELEMENTS = 1 << 23  # values generated per step: bounds memory for the 7b shape


class _Tensor(NamedTuple):
    name: str  # name in the file being written
    shape: tuple[int, ...]
    init: str  # "linear" | "head" | "embed" | "norm" | "bias": see _scale_and_offset
    key: str  # seeds the values: the same tensor gets the same values in every variant


def _resolve(table: Sequence[tuple[str, tuple[str, ...], str]], dims: Mapping[str, int], prefix: str, key_prefix: str
             ) -> list[_Tensor]:
    return [
        _Tensor(prefix + name, tuple(dims[d] for d in shape), init, key_prefix + name) for name, shape, init in table
    ]


def _clip_tensors(cfg: Mapping[str, int], tower: str, head: Sequence[Any], tail: Sequence[Any],
                  extra_dims: Mapping[str, int], prefix: str) -> list[_Tensor]:
    """A CLIP tower's tensors (``tower`` is "vision_model" or "text_model"), named ``prefix + tower + ...``."""
    dims = {"width": cfg["hidden_size"], "mlp": cfg["intermediate_size"], **extra_dims}
    out = _resolve(head, dims, prefix, "")
    for i in range(cfg["num_hidden_layers"]):
        out += _resolve(CLIP_LAYER, dims, f"{prefix}{tower}.encoder.layers.{i}.", f"{tower}.encoder.layers.{i}.")
    out += _resolve(tail, dims, prefix, "")
    return out


def _vision_tensors(shape: Mapping[str, Any], prefix: str) -> list[_Tensor]:
    vision = shape["vision"]
    grid = vision["image_size"] // vision["patch_size"]
    extra = {"channels": 3, "patch": vision["patch_size"], "positions": grid * grid + 1}
    return _clip_tensors(vision, "vision_model", CLIP_VISION_HEAD, CLIP_VISION_TAIL, extra, prefix)


def checkpoint_tensors(shape: Mapping[str, Any], vocab_size: int, *, with_vision: bool) -> list[_Tensor]:
    """Every tensor of the LLaVA checkpoint in state-dict order (``image_newline`` is a parameter of the model
    itself, so it comes first; then the LLaMA modules, the vision tower, the projector, and ``lm_head``)."""
    llm = shape["llm"]
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    dims = {
        "hidden": llm["hidden_size"],
        "ffn": llm["intermediate_size"],
        "kv": llm["num_key_value_heads"] * head_dim,
        "vocab": vocab_size,
        "mm_hidden": shape["vision"]["hidden_size"],
    }
    tensors = _resolve(
        (("model.image_newline", ("hidden",), "embed"), ("model.embed_tokens.weight", ("vocab", "hidden"), "embed")),
        dims, "", "",
    )
    for i in range(llm["num_hidden_layers"]):
        tensors += _resolve(LLAMA_LAYER, dims, f"model.layers.{i}.", f"model.layers.{i}.")
    tensors += _resolve((("model.norm.weight", ("hidden",), "norm"),), dims, "", "")
    if with_vision:
        tensors += _vision_tensors(shape, VISION_PREFIX)
    tensors += _resolve(PROJECTOR, dims, "", "")
    tensors += _resolve((("lm_head.weight", ("vocab", "hidden"), "head"),), dims, "", "")
    return tensors


def tower_tensors(shape: Mapping[str, Any]) -> list[_Tensor]:
    """The random tensors of a separate CLIPModel folder: text tower, vision tower, the two projections."""
    text = shape["clip_text"]
    text_extra = {"vocab": text["vocab_size"], "positions": text["max_position_embeddings"]}
    proj = {"proj": shape["vision"]["projection_dim"], "vwidth": shape["vision"]["hidden_size"],
            "twidth": text["hidden_size"]}
    return (
        _clip_tensors(text, "text_model", CLIP_TEXT_HEAD, CLIP_TEXT_TAIL, text_extra, "")
        + _vision_tensors(shape, "")
        + _resolve(
            (
                ("visual_projection.weight", ("proj", "vwidth"), "linear"),
                ("text_projection.weight", ("proj", "twidth"), "linear"),
            ),
            proj, "", "",
        )
    )


def _rng(seed: int, key: str, chunk: int) -> np.random.Generator:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([seed, chunk, *words])


def _scale_and_offset(tensor: _Tensor, init: Mapping[str, Any]) -> tuple[float, float]:
    """Standard deviation and mean of a tensor's values: fan-in scaled matrices, norms around 1."""
    fan_in = math.prod(tensor.shape[1:])
    kinds = {
        "linear": (init["linear_gain"] / math.sqrt(fan_in), 0.0),
        "head": (init["head_gain"] / math.sqrt(fan_in), 0.0),
        "embed": (init["embed_std"], 0.0),
        "norm": (init["norm_noise"], 1.0),
        "bias": (init["bias_std"], 0.0),
    }
    return kinds[tensor.init]


def _chunk_count(tensor: _Tensor) -> int:
    return -(-math.prod(tensor.shape) // CHUNK_ELEMENTS)


def _chunk(tensor: _Tensor, index: int, seed: int, init: Mapping[str, Any]) -> np.ndarray:
    """Chunk ``index`` of a tensor's flattened values, as bf16 bit patterns (uint16).

    Each chunk has its own generator, seeded by (seed, chunk index, tensor key), so chunks can be made in
    parallel and a tensor gets the same values wherever it is written.
    """
    total = math.prod(tensor.shape)
    n = min(CHUNK_ELEMENTS, total - index * CHUNK_ELEMENTS)
    rng = _rng(seed, tensor.key, index)
    std, mean = _scale_and_offset(tensor, init)
    if init["distribution"] == "uniform":
        # Uniform on [-sqrt(3) std, sqrt(3) std] has the same spread and draws ~3x faster than normals.
        values = rng.random(n, dtype=np.float32)
        values -= np.float32(0.5)
        values *= np.float32(2 * math.sqrt(3) * std)
    else:
        values = rng.standard_normal(n, dtype=np.float32)
        values *= np.float32(std)
    if mean:
        values += np.float32(mean)
    return f32_to_bf16_bits(values)


def _chunks(tensors: Sequence[_Tensor], seed: int, init: Mapping[str, Any]
            ) -> Generator[tuple[str, np.ndarray], None, None]:
    """(tensor name, bf16 chunk) for every tensor in order, made ahead by a few worker threads
    (numpy releases the GIL while drawing and rounding); at most 2 chunks per worker wait in memory."""
    jobs = [(t, i) for t in tensors for i in range(_chunk_count(t))]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[str, Future[np.ndarray]]] = deque()
        for tensor, index in jobs:
            pending.append((tensor.name, pool.submit(_chunk, tensor, index, seed, init)))
            if len(pending) > 2 * workers:
                name, future = pending.popleft()
                yield name, future.result()
        while pending:
            name, future = pending.popleft()
            yield name, future.result()


def _shard_of(tensors: Sequence[_Tensor], count: int) -> list[int]:
    """Split tensors, in order, into ``count`` runs of roughly equal bytes (by each tensor's midpoint)."""
    sizes = [math.prod(t.shape) for t in tensors]
    total = sum(sizes)
    shards, start = [], 0
    for size in sizes:
        shards.append(min(count - 1, (2 * start + size) * count // (2 * total)))
        start += size
    if len(set(shards)) != count:
        raise ValueError(f"cannot split {len(tensors)} tensors into {count} non-empty shards")
    return shards


# --- tokenizer ------------------------------------------------------------------------------------------

_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_RHYTHMS = (
    "sinus rhythm", "normal sinus rhythm", "sinus bradycardia", "sinus tachycardia", "sinus arrhythmia",
    "atrial fibrillation", "atrial flutter", "junctional rhythm", "ectopic atrial rhythm", "paced rhythm",
    "supraventricular tachycardia", "ventricular tachycardia", "second-degree AV block (Mobitz I)",
    "third-degree AV block", "Wolff–Parkinson–White pattern",
)
_FINDINGS = (
    "first-degree AV block", "right bundle branch block", "left bundle branch block", "incomplete right bundle "
    "branch block", "left anterior fascicular block", "left posterior fascicular block", "left ventricular "
    "hypertrophy", "right ventricular hypertrophy", "left atrial enlargement", "premature ventricular "
    "contractions", "premature atrial contractions", "ST elevation", "ST depression", "T wave inversion",
    "pathological Q waves", "poor R wave progression", "low QRS voltage", "prolonged QT interval",
    "inferior myocardial infarction", "anterior myocardial infarction", "anteroseptal infarct, age undetermined",
    "nonspecific ST-T changes", "early repolarization", "Brugada pattern", "left axis deviation",
    "right axis deviation", "ventricular pre-excitation", "electrode misplacement", "baseline wander",
)
_LABELS = ("NORM", "MI", "STTC", "CD", "HYP", "1dAVb", "RBBB", "LBBB", "SB", "ST", "AF", "I-AVB", "PAC", "PVC",
           "STD", "STE")
_WORDS = (
    "the", "of", "and", "with", "is", "no", "in", "a", "an", "this", "patient", "evidence", "consistent",
    "suggestive", "possible", "probable", "compared", "previous", "tracing", "recording", "interpretation",
    "rate", "rhythm", "axis", "interval", "duration", "amplitude", "morphology", "leads", "lead", "wave",
    "complex", "segment", "normal", "abnormal", "borderline", "otherwise", "unchanged", "significant",
    "findings", "diagnosis", "clinical", "correlation", "recommended", "years", "old", "male", "female",
    "electrocardiogram", "electrocardiographic", "image", "scan", "paper", "speed", "gain", "calibration",
)
_ACCENTED = ("Müller", "réseau", "électrocardiogramme", "Größe", "über", "Einthoven", "naïve", "São Paulo",
             "café", "Schöne", "Frühgeburt", "cœur", "Señora", "Zürich")
_QUESTIONS = (
    "What is the rhythm shown in this ECG?",
    "Describe the findings of this electrocardiogram.",
    "Please generate a report for this ECG image.",
    "Which of the following diagnoses is most likely? Options: {o}",
    "Does this ECG show {f}? Answer yes or no.",
    "What is the heart rate in beats per minute?",
    "Is there evidence of {f} in lead {l}?",
    "Classify this ECG into the categories NORM, MI, STTC, CD and HYP.",
    "What abnormality is present in leads {l}, {l2} and {l3}?",
    "Measure the PR interval, QRS duration and QTc.",
)


def _ecg_sentence(rnd: random.Random) -> str:
    """One sentence of ECG-report language, questions, or a whole llava_v1 prompt."""
    lead, lead2, lead3 = (rnd.choice(_LEADS) for _ in range(3))
    finding, rhythm = rnd.choice(_FINDINGS), rnd.choice(_RHYTHMS)
    kind = rnd.randrange(10)
    if kind == 0:
        question = rnd.choice(_QUESTIONS).format(
            f=finding, l=lead, l2=lead2, l3=lead3,
            o=" ".join(f"{c}. {rnd.choice(_FINDINGS).capitalize()}" for c in "ABCDEFGH"[: rnd.choice((4, 8))]),
        )
        return f"{SYSTEM_PROMPT} USER: <image> {question} ASSISTANT:"
    if kind == 1:
        return (f"PR {rnd.randint(100, 260)} ms, QRS {rnd.randint(60, 180)} ms, QT {rnd.randint(300, 520)} ms, "
                f"QTc {rnd.randint(340, 540)} ms, RR {rnd.randint(400, 1500)} ms, HR {rnd.randint(35, 180)} bpm.")
    if kind == 2:
        return (f"{rhythm.capitalize()} at {rnd.randint(40, 160)} bpm with {finding}; "
                f"axis {rnd.randint(-90, 180):+d}°, P wave {rnd.randint(50, 300)} µV in lead {lead}.")
    if kind == 3:
        return (f"ST {rnd.choice(('elevation', 'depression'))} of {rnd.randint(1, 40) / 10:.1f} mm "
                f"({rnd.randint(50, 400)} µV) in leads {lead}, {lead2} and {lead3}; "
                f"{rnd.randint(10, 99)}% confidence.")
    if kind == 4:
        return " ".join(rnd.choice(_LABELS) for _ in range(rnd.randint(1, 5))) + f" (n={rnd.randint(1, 2100)})"
    if kind == 5:
        return (f"The {rnd.choice(_WORDS)} {rnd.choice(_WORDS)} is {rnd.choice(('normal', 'abnormal', 'borderline'))}; "
                f"{rnd.choice(_ACCENTED)} recorded at 25 mm/s, 10 mm/mV, {rnd.choice(('±', '≥', '≤', '→'))} "
                f"{rnd.randint(0, 9)}.{rnd.randint(0, 99):02d} mV.")
    if kind == 6:
        return f"{rnd.choice(_QUESTIONS).format(f=finding, l=lead, l2=lead2, l3=lead3, o='A, B, C, D')} Answer: " \
               f"{rnd.choice('ABCDEFGH')}. {finding.capitalize()}.</s>"
    words = [rnd.choice(_WORDS) for _ in range(rnd.randint(6, 16))]
    words.insert(rnd.randrange(len(words)), finding)
    words.insert(rnd.randrange(len(words)), rhythm)
    sentence = " ".join(words).capitalize()
    return sentence + rnd.choice((".", "!", "?", ";", " -", " [sic]", " \"quoted\"", " 'see above'."))


_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "z",
           "br", "cr", "dr", "fl", "gr", "pl", "pr", "sl", "st", "str", "tr", "th", "sh", "ch", "ph", "sc")
_NUCLEI = ("a", "e", "i", "o", "u", "y", "ae", "ai", "au", "ea", "ee", "ie", "io", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "t", "x", "nd", "st", "rt", "ng", "ck", "ph")


def _pseudo_word(rnd: random.Random) -> str:
    word = "".join(rnd.choice(_ONSETS) + rnd.choice(_NUCLEI) + rnd.choice(_CODAS) for _ in range(rnd.randint(1, 4)))
    return word.capitalize() if rnd.random() < 0.1 else word


def tokenizer_corpus(corpus: Mapping[str, int]) -> Iterator[str]:
    """The training sentences for a shape's tokenizer: deterministic, ECG-flavoured, no newlines (LLaMA's
    vocabulary has no newline piece: "\\n" falls back to the byte <0x0A>)."""
    rnd = random.Random(TOKENIZER_SEED)
    for _ in range(corpus["ecg_sentences"]):
        yield _ecg_sentence(rnd)
    if corpus["pseudo_words"]:
        words = [_pseudo_word(rnd) for _ in range(corpus["pseudo_words"])]
        # Zipf-like frequencies give BPE a realistic spread of merge counts.
        cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
        for _ in range(corpus["pseudo_sentences"]):
            yield " ".join(rnd.choices(words, cum_weights=cumulative, k=rnd.randint(4, 14)))


def train_tokenizer(shape: Mapping[str, Any]) -> bytes:
    """Train the shape's SentencePiece model in memory and return the serialized ``tokenizer.model``."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(TOKENIZER_SEED)
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=tokenizer_corpus(shape["corpus"]),
            model_writer=model,
            vocab_size=shape["vocab"],
            logstream=quiet,
            **SPM_OPTIONS,
        )
    return model.getvalue()


# --- configs --------------------------------------------------------------------------------------------


def llava_config(shape_name: str, shape: Mapping[str, Any], vocab_size: int, *, vision_tower: str, merge: str
                 ) -> dict[str, Any]:
    """config.json of a LlavaLlamaForCausalLM checkpoint: llava-v1.6-vicuna-7b's keys as PULSE's training
    (llava-torch) rewrites them: model_type llava_llama, mm_patch_merge_type from its own flag."""
    llm = shape["llm"]
    return {
        "_name_or_path": f"pulse-edge/synthetic-{shape_name}",
        "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "hidden_act": "silu",
        "hidden_size": llm["hidden_size"],
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": 224,
        "image_grid_pinpoints": IMAGE_GRID_PINPOINTS,
        "image_split_resolution": 224,
        "initializer_range": 0.02,
        "intermediate_size": llm["intermediate_size"],
        "max_position_embeddings": llm["max_position_embeddings"],
        "mm_hidden_size": shape["vision"]["hidden_size"],
        "mm_patch_merge_type": merge,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "mm_vision_tower_lr": 2e-06,
        "model_type": "llava_llama",
        "num_attention_heads": llm["num_attention_heads"],
        "num_hidden_layers": llm["num_hidden_layers"],
        "num_key_value_heads": llm["num_key_value_heads"],
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": llm["max_position_embeddings"],
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": True,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }


def clip_config(shape: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of the separate tower, a CLIPConfig like openai/clip-vit-large-patch14-336's."""
    vision, text = shape["vision"], shape["clip_text"]
    return {
        "_name_or_path": CLIP_TOWER_NAME,
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": vision["projection_dim"],
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": text["hidden_size"],
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": text["intermediate_size"],
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": text["max_position_embeddings"],
            "model_type": "clip_text_model",
            "num_attention_heads": text["num_attention_heads"],
            "num_hidden_layers": text["num_hidden_layers"],
            "pad_token_id": 1,
            "projection_dim": text["projection_dim"],
            "vocab_size": text["vocab_size"],
        },
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "vision_config": {
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": vision["hidden_size"],
            "image_size": vision["image_size"],
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": vision["intermediate_size"],
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": vision["num_attention_heads"],
            "num_channels": 3,
            "num_hidden_layers": vision["num_hidden_layers"],
            "patch_size": vision["patch_size"],
            "projection_dim": vision["projection_dim"],
        },
    }


def clip_preprocessor_config(shape: Mapping[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json of the separate tower (CLIPImageProcessor)."""
    size = shape["vision"]["image_size"]
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_files(max_length: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json as LLaVA saves them
    (LlamaTokenizer, BOS added, pad = <unk>)."""
    return {
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): {**_added_token(piece), "special": True} for i, piece in enumerate(("<unk>", "<s>", "</s>"))
            },
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": max_length,
            "pad_token": "<unk>",
            "padding_side": "right",
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
        "special_tokens_map.json": {
            "bos_token": _added_token("<s>"),
            "eos_token": _added_token("</s>"),
            "pad_token": "<unk>",
            "unk_token": _added_token("<unk>"),
        },
        "generation_config.json": {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "max_length": max_length,
            "pad_token_id": 0,
            "transformers_version": TRANSFORMERS_VERSION,
        },
    }


# --- writing --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    # HF writes configs with sorted keys and two-space indents.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_dir(path: Path, owned: Sequence[str], force: bool, what: str) -> None:
    """Refuse a ``path`` that holds files unless ``force``; with ``force`` remove only the files we write."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} {path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise FileExistsError(f"{what} {path} is not empty; pass --force to overwrite it")
        stale = [path / name for name in owned]
        stale += list(path.glob("model-*-of-*.safetensors")) + list(path.glob("*.safetensors.partial"))
        for file in stale:
            if file.is_file():
                file.unlink()


def _write_files(files: Sequence[tuple[Path, Sequence[_Tensor]]], seed: int, init: Mapping[str, Any],
                 dtype: str, buffers: Mapping[str, np.ndarray] | None = None) -> None:
    """Stream the tensors of several safetensors files from one pipeline of generated chunks.

    ``dtype`` is "BF16" or "F32"; F32 files hold the bf16-rounded values, so a separate tower equals the
    in-checkpoint one exactly. ``buffers`` (non-random arrays, stored in their own dtype) open the first file.
    """
    stream = _chunks([t for _, tensors in files for t in tensors], seed, init)
    try:
        _fill_files(files, stream, dtype, buffers or {})
    finally:
        stream.close()  # stops the worker threads, also when a write failed


def _fill_files(files: Sequence[tuple[Path, Sequence[_Tensor]]], stream: Iterator[tuple[str, np.ndarray]],
                dtype: str, buffers: Mapping[str, np.ndarray]) -> None:
    for k, (path, tensors) in enumerate(files):
        fixed = dict(buffers) if k == 0 else {}
        # 8-byte elements first keeps every tensor aligned to its element size.
        fixed_specs = sorted((TensorSpec(n, _dtype_name(a), a.shape) for n, a in fixed.items()),
                             key=lambda spec: -DTYPES[spec.dtype].itemsize)
        specs = fixed_specs + [TensorSpec(t.name, dtype, t.shape) for t in tensors]
        with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
            for spec in fixed_specs:
                writer.write(spec.name, fixed[spec.name].astype(DTYPES[spec.dtype]))
            for name, bits in itertools.islice(stream, sum(_chunk_count(t) for t in tensors)):
                writer.write(name, bits if dtype == "BF16" else bf16_bits_to_f32(bits))


def _dtype_name(array: np.ndarray) -> str:
    return {"f": "F32", "i": "I64"}[array.dtype.kind]


def _write_tower(out: Path, shape: Mapping[str, Any], seed: int) -> None:
    _write_json(out / "config.json", clip_config(shape))
    _write_json(out / "preprocessor_config.json", clip_preprocessor_config(shape))
    vision = shape["vision"]
    positions = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    # Older CLIP checkpoints also carry int64 position_ids buffers and a scalar logit_scale; keep them so a
    # reader meets what a real tower folder may hold.
    buffers = {
        "logit_scale": np.array(2.6592, dtype=np.float32),
        "text_model.embeddings.position_ids": np.arange(shape["clip_text"]["max_position_embeddings"])[None],
        "vision_model.embeddings.position_ids": np.arange(positions)[None],
    }
    _write_files([(out / "model.safetensors", tower_tensors(shape))], seed, shape["init"], "F32", buffers)


def write_checkpoint(
    out: Path,
    *,
    shape: str = "tiny",
    vision_tower_separate: Path | None = None,
    merge: str = "flat",
    seed: int = 0,
    tokenizer: Path | None = None,
    force: bool = False,
) -> Path:
    """Write a synthetic PULSE-7B-layout checkpoint of ``shape`` ("tiny" or "7b") to ``out`` and return it.

    ``vision_tower_separate`` moves the CLIP tower to that folder (CLIPModel layout, f32) and points
    ``mm_vision_tower`` at its absolute path; ``merge`` sets ``mm_patch_merge_type``. ``tokenizer`` is a
    ``tokenizer.model`` to copy instead of training one (the vocabulary size follows it). Refuses a non-empty
    ``out`` (or tower folder) unless ``force``. Raises ``ValueError`` for bad arguments and
    ``FileExistsError`` for a refused folder.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    if merge not in MERGE_TYPES:
        raise ValueError(f"unknown merge type {merge!r}; choose one of: {', '.join(MERGE_TYPES)}")
    table = SHAPES[shape]
    out = Path(out).absolute()
    tower_dir = Path(vision_tower_separate).absolute() if vision_tower_separate is not None else None
    if tower_dir is not None and tower_dir.resolve() == out.resolve():
        raise ValueError(f"the vision tower folder must differ from the checkpoint folder ({out})")
    given = Path(tokenizer).read_bytes() if tokenizer is not None else None  # a missing file fails before writing
    # Check both folders before writing anything, so a refusal leaves no half-written checkpoint.
    for folder, owned, what in ((out, CHECKPOINT_FILES, "output folder"), (tower_dir, TOWER_FILES, "vision tower folder")):
        if folder is not None:
            _check_dir(folder, owned, force, what)
    out.mkdir(parents=True, exist_ok=True)

    if given is None:
        logger.info("training the %s tokenizer (%d pieces)", shape, table["vocab"])
    (out / "tokenizer.model").write_bytes(given if given is not None else train_tokenizer(table))
    vocab_size = len(read_vocabulary(out / "tokenizer.model").tokens)  # parsed here: no sentencepiece needed

    if tower_dir is not None:
        logger.info("writing the separate vision tower to %s", tower_dir)
        tower_dir.mkdir(parents=True, exist_ok=True)
        _write_tower(tower_dir, table, seed)
    tower_name = str(tower_dir) if tower_dir is not None else CLIP_TOWER_NAME
    config = llava_config(shape, table, vocab_size, vision_tower=tower_name, merge=merge)
    _write_json(out / "config.json", config)
    for name, content in tokenizer_files(table["llm"]["max_position_embeddings"]).items():
        _write_json(out / name, content)

    tensors = checkpoint_tensors(table, vocab_size, with_vision=tower_dir is None)
    shard_of = _shard_of(tensors, SHARD_COUNT)
    names = [f"model-{k + 1:05d}-of-{SHARD_COUNT:05d}.safetensors" for k in range(SHARD_COUNT)]
    logger.info("writing %s", ", ".join(names))
    files = [(out / name, [t for t, s in zip(tensors, shard_of, strict=True) if s == k]) for k, name in enumerate(names)]
    _write_files(files, seed, table["init"], "BF16")
    index = {
        "metadata": {"total_size": sum(2 * math.prod(t.shape) for t in tensors)},
        "weight_map": {t.name: names[s] for t, s in zip(tensors, shard_of, strict=True)},
    }
    _write_json(out / "model.safetensors.index.json", index)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m convert.synthetic``."""
    parser = argparse.ArgumentParser(
        prog="python -m convert.synthetic",
        description="Write a random-weight checkpoint in the exact layout of PULSE-ECG/PULSE-7B.",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="checkpoint folder to create")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model size (default: tiny)")
    parser.add_argument("--vision-tower-separate", type=Path, metavar="DIR",
                        help="write the CLIP tower to DIR (openai/clip-vit-large-patch14-336 layout) instead")
    parser.add_argument("--merge", choices=MERGE_TYPES, default="flat", help="mm_patch_merge_type (default: flat)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--tokenizer", type=Path, metavar="FILE", help="copy this tokenizer.model instead of training one")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty OUT (and DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = write_checkpoint(args.out, shape=args.shape, vision_tower_separate=args.vision_tower_separate,
                                merge=args.merge, seed=args.seed, tokenizer=args.tokenizer, force=args.force)
    except (ValueError, OSError, ConversionError) as exc:
        parser.exit(1, f"Error: {exc}\n")
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
