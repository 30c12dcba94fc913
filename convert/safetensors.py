"""Safetensors files without torch: a streaming writer and bf16 rounding helpers.

Format (https://github.com/huggingface/safetensors): an unsigned little-endian u64 N, then N bytes of
UTF-8 JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
padded with spaces so the data starts 8-byte aligned, then the tensor bytes, little-endian, with offsets
relative to the start of the data and no holes between tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np

# Safetensors dtype name -> numpy dtype of the stored bytes. BF16 has no numpy type: its 16-bit patterns
# travel as uint16 (see f32_to_bf16_bits / bf16_bits_to_f32).
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}

# numpy dtype kind+size -> safetensors name, for arrays written in their own (non-float) dtype.
_NAME_OF_NUMPY: dict[tuple[str, int], str] = {
    ("f", 2): "F16",
    ("f", 4): "F32",
    ("f", 8): "F64",
    ("i", 1): "I8",
    ("u", 1): "U8",
    ("i", 2): "I16",
    ("u", 2): "U16",
    ("i", 4): "I32",
    ("u", 4): "U32",
    ("i", 8): "I64",
    ("u", 8): "U64",
    ("b", 1): "BOOL",
}

# Safetensors readers refuse headers above 100 MB; ours stay far below.
_HEADER_LIMIT = 100 * 1024 * 1024


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16, round-to-nearest-even, and return the bit patterns as uint16.

    NaNs stay NaN (quiet, sign kept); values beyond the bf16 range round to +-inf as in PyTorch.
    """
    values = np.asarray(a, dtype=np.float32, order="C")
    shape = values.shape
    values = values.reshape(-1)  # 0-d inputs would otherwise turn into numpy scalars below
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds half to even (in place: 7B values).
    rounded = bits >> np.uint32(16)
    rounded &= np.uint32(1)
    rounded += np.uint32(0x7FFF)
    rounded += bits
    rounded >>= np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        # The carry could turn a NaN into inf (or wrap); keep the upper half and force a quiet-NaN bit.
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    result: np.ndarray = out.reshape(shape)
    return result


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    wide: np.ndarray = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


class TensorSpec(NamedTuple):
    """One tensor as the header announces it: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of data this tensor occupies in the file."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class SafetensorsWriter:
    """Writes one safetensors file whose header is fixed up front, so tensors can stream in chunk by chunk.

    Tensors must arrive in the order of ``specs``, each as one or more arrays already in the stored dtype
    (uint16 bit patterns for BF16), and each exactly filled before the next begins. Anything else raises
    ``ValueError``. The file is written as ``<path>.partial`` and renamed on a complete ``close()``, so an
    interrupted run never leaves a file that looks finished.
    """

    def __init__(
        self,
        path: Path,
        specs: Sequence[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        names = [s.name for s in self._specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names in the header")
        for spec in self._specs:
            if spec.dtype not in DTYPES:
                raise ValueError(f"{self.path}: tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
            if spec.name == "__metadata__":
                raise ValueError(f"{self.path}: '__metadata__' is reserved and cannot name a tensor")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for spec in self._specs:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        if len(raw) > _HEADER_LIMIT:
            raise ValueError(f"{self.path}: header of {len(raw)} bytes exceeds the 100 MB safetensors limit")
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file = open(self._partial, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._index = 0
        self._written = 0  # bytes of the current tensor
        self._total = 0
        self._expected = offset
        self._closed = False

    def write(self, name: str, data: np.ndarray) -> None:
        """Append ``data`` (all or the next part of tensor ``name``) in the header's dtype."""
        if self._closed:
            raise ValueError(f"{self.path}: write after close")
        # Move past finished tensors (zero-sized ones included) until the one being written.
        while (
            self._index < len(self._specs)
            and self._written == self._specs[self._index].nbytes
            and self._specs[self._index].name != name
        ):
            self._index += 1
            self._written = 0
        if self._index >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {name!r} written after the last announced tensor")
        spec = self._specs[self._index]
        if name != spec.name:
            raise ValueError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        stored = DTYPES[spec.dtype]
        if data.dtype.kind != stored.kind or data.dtype.itemsize != stored.itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} is {spec.dtype} but got a {data.dtype} array")
        chunk = np.ascontiguousarray(data, dtype=stored)
        if self._written + chunk.nbytes > spec.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} got more than its {spec.nbytes} bytes")
        chunk.tofile(self._file)
        self._written += chunk.nbytes
        self._total += chunk.nbytes

    def close(self) -> None:
        """Finish the file; raises ``ValueError`` (and deletes the partial file) if any tensor is short."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._total != self._expected:
            self._partial.unlink(missing_ok=True)
            end = 0
            for spec in self._specs:
                end += spec.nbytes
                if end > self._total:
                    break
            raise ValueError(f"{self.path}: incomplete, tensor {spec.name!r} and any after it were not fully written")
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop the partial file without finishing it."""
        if not self._closed:
            self._closed = True
            self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _stored(array: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    """Floating arrays are converted to ``dtype``; integer and bool arrays keep their own type."""
    if array.dtype.kind == "f":
        if dtype == "BF16":
            return dtype, f32_to_bf16_bits(array)
        return dtype, np.asarray(array, dtype=DTYPES[dtype], order="C")
    name = _NAME_OF_NUMPY.get((array.dtype.kind, array.dtype.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {array.dtype} has no safetensors equivalent")
    return name, np.asarray(array, dtype=DTYPES[name], order="C")


def write_safetensors(
    path: Path,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: str = "BF16",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to one safetensors file at ``path``.

    Floating arrays are stored as ``dtype`` ("BF16", "F16" or "F32"; BF16 rounds to nearest even);
    integer and bool arrays keep their own type. Tensors are laid out widest dtype first (stable
    otherwise), as the safetensors library does, so every tensor starts aligned to its element size.
    """
    if dtype not in ("BF16", "F16", "F32"):
        raise ValueError(f"dtype must be BF16, F16 or F32, not {dtype!r}")
    converted = [(name, *_stored(np.asarray(a), dtype)) for name, a in tensors.items()]
    converted.sort(key=lambda item: -DTYPES[item[1]].itemsize)
    specs = [TensorSpec(name, kind, tuple(int(d) for d in arr.shape)) for name, kind, arr in converted]
    with SafetensorsWriter(path, specs, metadata=metadata) as writer:
        for name, _, arr in converted:
            writer.write(name, arr)
