"""Read a SentencePiece ``tokenizer.model`` without the sentencepiece library.

The file is a protobuf ``ModelProto``; only the fields llama.cpp needs are decoded: the pieces
(text, score, type), the special ids, and whether a dummy space prefix is added.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pulse_edge.errors import ConversionError

# ModelProto field numbers (sentencepiece_model.proto)
_PIECES, _TRAINER, _NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK = 3, 35
_TRAINER_IDS = {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_NORMALIZER_ADD_DUMMY_PREFIX = 3
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
# SentencePiece piece types share llama.cpp's token-type numbers: 1 normal, 2 unknown,
# 3 control, 4 user defined, 5 unused, 6 byte.
_NORMAL = 1


@dataclass(frozen=True)
class Vocabulary:
    """What the GGUF ``tokenizer.ggml.*`` keys hold."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_dummy_prefix: bool
    model_type: str
    byte_fallback: bool


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message level into ``(field, value)`` pairs."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        out.append((field, value))
    return out


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def read_vocabulary(path: Path) -> Vocabulary:
    """Decode ``tokenizer.model``; errors name the file and say what to do."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConversionError(
            f"{path} is missing: PULSE checkpoints ship a SentencePiece tokenizer.model; download it again."
        ) from None
    try:
        tokens: list[str] = []
        scores: list[float] = []
        types: list[int] = []
        ids = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
        add_dummy_prefix = True
        model_type = "unigram"
        byte_fallback = False
        for field, value in _fields(data):
            if field == _PIECES and isinstance(value, bytes):
                text, score, kind = "", 0.0, _NORMAL
                for sub, sub_value in _fields(value):
                    if sub == _PIECE_TEXT and isinstance(sub_value, bytes):
                        text = sub_value.decode("utf-8")
                    elif sub == _PIECE_SCORE and isinstance(sub_value, bytes):
                        (score,) = struct.unpack("<f", sub_value)
                    elif sub == _PIECE_TYPE and isinstance(sub_value, int):
                        kind = sub_value
                tokens.append(text)
                scores.append(score)
                types.append(kind)
            elif field == _TRAINER and isinstance(value, bytes):
                for sub, sub_value in _fields(value):
                    if sub in _TRAINER_IDS and isinstance(sub_value, int):
                        ids[_TRAINER_IDS[sub]] = _int32(sub_value)
                    elif sub == _TRAINER_MODEL_TYPE and isinstance(sub_value, int):
                        model_type = _MODEL_TYPES.get(sub_value, str(sub_value))
                    elif sub == _TRAINER_BYTE_FALLBACK and isinstance(sub_value, int):
                        byte_fallback = bool(sub_value)
            elif field == _NORMALIZER and isinstance(value, bytes):
                for sub, sub_value in _fields(value):
                    if sub == _NORMALIZER_ADD_DUMMY_PREFIX and isinstance(sub_value, int):
                        add_dummy_prefix = bool(sub_value)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ConversionError(f"{path} is not a SentencePiece model ({exc}); download tokenizer.model again.") from None
    if not tokens:
        raise ConversionError(f"{path} holds no vocabulary; download tokenizer.model again.")
    return Vocabulary(tokens, scores, types, add_dummy_prefix=add_dummy_prefix, model_type=model_type,
                      byte_fallback=byte_fallback, **ids)
