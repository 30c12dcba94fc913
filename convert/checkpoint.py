"""Find a PULSE checkpoint on disk and read its safetensors shards without torch.

Tensors are read one at a time through a memory map of just their byte range, which is
unmapped again at once: converting a 14 GB checkpoint keeps only the tensor in hand resident.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype -> (numpy dtype of the stored bits, bytes per element). Only the float ones are
# converted; the others (e.g. CLIP's int64 position_ids buffer) are listed so the header can be checked.
DTYPES: dict[str, tuple[str, int]] = {"BF16": ("<u2", 2), "F16": ("<f2", 2), "F32": ("<f4", 4)}
OTHER_SIZES = {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HEADER_LIMIT = 100 << 20  # the safetensors spec's own bound on a header


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: shard file, dtype, shape and byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring ``HF_HUB_CACHE`` and ``HF_HOME`` like huggingface_hub."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hub"


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not os.path.isabs(text)


def resolve_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local hub cache, or ``None``. Never touches the network."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        snapshot = snapshots / ref.read_text(encoding="utf-8").strip()
        if snapshot.is_dir():
            return snapshot
    if snapshots.is_dir():
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return None


def resolve_source(src: str) -> Path:
    """A local folder, or a repo id found in the local Hugging Face cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if looks_like_repo_id(src):
        found = resolve_in_hf_cache(src)
        if found is not None:
            return found
        raise ConversionError(
            f"{src} is not a folder here and is not in the Hugging Face cache ({hf_cache_dir()}). "
            f"On a connected machine run 'hf download {src}' (or copy the repository folder), "
            "then pass that folder or copy the cache here."
        )
    raise ConversionError(f"{src}: no such checkpoint folder. Pass the folder that holds config.json.")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: the checkpoint is incomplete; download it again.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} cannot be read ({exc}); download it again.") from None


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check that its data is all there."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ConversionError(f"{file} is truncated (no safetensors header); download it again.")
            (length,) = struct.unpack("<Q", head)
            if length > _HEADER_LIMIT or 8 + length > size:
                raise ConversionError(f"{file} is truncated or not a safetensors file; download it again.")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise ConversionError(f"{file} is missing: the checkpoint is incomplete; download it again.") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{file} has a damaged safetensors header; download it again.") from None
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        itemsize = DTYPES[dtype][1] if dtype in DTYPES else OTHER_SIZES.get(dtype)
        if itemsize is None:
            raise ConversionError(f"{file}: tensor {name} has unknown dtype {dtype}; download the checkpoint again.")
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise ConversionError(f"{file}: tensor {name} has a byte range that disagrees with its shape; download it again.")
        entries[name] = TensorEntry(name, file, dtype, shape, base + start, base + end)
        data_end = max(data_end, base + end)
    if data_end > size:
        raise ConversionError(
            f"{file} is truncated ({size} bytes, its header needs {data_end}); download it again."
        )
    return entries


def load_tensor(entry: TensorEntry) -> np.ndarray:
    """Read one tensor as float32 (bf16 widened exactly; f16/f32 as stored)."""
    if entry.dtype not in DTYPES:
        raise ConversionError(
            f"{entry.file}: tensor {entry.name} is {entry.dtype}; only BF16, F16 and F32 weights can be converted."
        )
    page = mmap.ALLOCATIONGRANULARITY
    offset = entry.start - entry.start % page
    storage, _ = DTYPES[entry.dtype]
    with open(entry.file, "rb") as handle, mmap.mmap(
        handle.fileno(), entry.end - offset, access=mmap.ACCESS_READ, offset=offset
    ) as mapped:
        raw = np.frombuffer(mapped, dtype=storage, count=int(np.prod(entry.shape, dtype=np.int64)), offset=entry.start - offset)
        if entry.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        del raw  # release the buffer so the map can close
    return out.reshape(entry.shape)


class TensorStore:
    """All tensors of a folder's safetensors files, by name (index-driven when there is an index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            data = read_json(index)
            weight_map: dict[str, str] = data.get("weight_map", {}) if isinstance(data, dict) else {}
            if not weight_map:
                raise ConversionError(f"{index} has no weight_map; download the checkpoint again.")
            files = sorted(set(weight_map.values()))
            self.index_bytes = index.read_bytes()
        elif (folder / SINGLE_NAME).is_file():
            weight_map = {}
            files = [SINGLE_NAME]
            self.index_bytes = b""
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            if not found:
                bins = sorted(p.name for p in folder.glob("*.bin"))
                hint = (
                    f" It has PyTorch .bin files ({', '.join(bins[:3])}); save it as safetensors on a machine with torch."
                    if bins
                    else ""
                )
                raise ConversionError(f"{folder} has no safetensors weights.{hint}")
            weight_map = {}
            files = found
            self.index_bytes = b""
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            self.entries.update(read_header(folder / name))
        missing = sorted(n for n, f in weight_map.items() if n not in self.entries)
        if missing:
            raise ConversionError(
                f"{folder / weight_map[missing[0]]} lacks tensor {missing[0]} that {INDEX_NAME} places there "
                f"({len(missing)} missing in all); download the checkpoint again."
            )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self, prefix: str = "") -> Iterator[str]:
        return (n for n in self.entries if n.startswith(prefix))

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise ConversionError(f"{self.folder} has no tensor {name}; is this a PULSE/LLaVA checkpoint?") from None

    def load(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Load ``name`` as float32, checking its shape against what the config implies."""
        entry = self.entry(name)
        if shape is not None and entry.shape != shape:
            raise ConversionError(
                f"{entry.file}: tensor {name} has shape {list(entry.shape)} but config.json implies {list(shape)}; "
                "the weights and config.json do not belong together."
            )
        return load_tensor(entry)


def _sample(entry: TensorEntry, size: int = 4096) -> bytes:
    """The first, middle and last ``size`` bytes of a tensor: enough to tell fine-tuned weights apart."""
    with open(entry.file, "rb") as handle:
        parts = []
        for start in (entry.start, entry.start + max(entry.nbytes // 2 - size // 2, 0), max(entry.end - size, entry.start)):
            handle.seek(start)
            parts.append(handle.read(min(size, entry.nbytes)))
    return b"".join(parts)


def fingerprint(folder: Path, store: TensorStore) -> dict[str, str]:
    """Identify the source checkpoint: hashes of config.json, of its tensor index (names, shapes, dtypes),
    and of samples of every tensor's bytes (two fine-tunes of one architecture share the first two)."""
    config_hash = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    entries = sorted(store.entries.values(), key=lambda e: e.name)
    listing = json.dumps([(e.name, e.dtype, list(e.shape), e.end - e.start) for e in entries]).encode()
    samples = hashlib.sha256()
    for entry in entries:
        samples.update(entry.name.encode() + b"\0" + _sample(entry))
    return {
        "folder": folder.name,
        "config_sha256": config_hash,
        "tensor_index_sha256": hashlib.sha256(listing).hexdigest(),
        "weights_sample_sha256": samples.hexdigest(),
    }
