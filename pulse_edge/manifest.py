"""The manifest written beside a converted model: which files, how big, which hash.

A model is loaded only after a size check of every file it lists; ``verify`` re-hashes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pulse_edge.errors import ManifestError

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
ROLE_LANGUAGE_MODEL = "language_model"
ROLE_MMPROJ = "mmproj"
COPY_AGAIN = "copy the model again"  # what to do about a damaged file of a model folder
_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelFile:
    """One file of a converted model."""

    role: str
    path: str
    size: int
    sha256: str
    quant: str


@dataclass(frozen=True)
class Manifest:
    """What ``convert`` produced, and what ``verify`` checks."""

    name: str
    files: tuple[ModelFile, ...]
    source: dict[str, str]
    prompt_template: str
    converter_version: str
    default_quant: str
    created: str
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def language_model(self, quant: str | None = None) -> ModelFile:
        """The language model file for ``quant`` (the default quant when ``None``)."""
        wanted = quant or self.default_quant
        for item in self.files:
            if item.role == ROLE_LANGUAGE_MODEL and item.quant.upper() == wanted.upper():
                return item
        have = ", ".join(f.quant for f in self.files if f.role == ROLE_LANGUAGE_MODEL)
        raise ManifestError(f"Model {self.name!r} has no {wanted} language model (it has: {have}).")

    def mmproj(self) -> ModelFile:
        """The vision projector file."""
        for item in self.files:
            if item.role == ROLE_MMPROJ:
                return item
        raise ManifestError(f"Model {self.name!r} lists no mmproj file; convert it again.")

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """SHA-256 of a file, read in chunks; ``progress`` gets the bytes of each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"No manifest at {path}: point --model at a folder made by 'pulse-edge convert'.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"Cannot read manifest {path}: {exc}. Convert the model again.") from None
    try:
        if data["schema"] != SCHEMA:
            raise ManifestError(
                f"Manifest {path} has schema {data['schema']}, this pulse-edge reads {SCHEMA}: "
                "upgrade pulse-edge or convert the model again."
            )
        files = tuple(ModelFile(**item) for item in data.pop("files"))
        return Manifest(files=files, **data)
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"Manifest {path} is malformed ({exc}); convert the model again.") from None


def check_sizes(manifest: Manifest, folder: Path, fix: str = COPY_AGAIN) -> None:
    """The fast check done on every load: each listed file exists with its recorded size.

    ``fix`` says what to do about a missing or incomplete file (a store model is imported again instead).
    """
    for item in manifest.files:
        file = folder / item.path
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise ManifestError(f"{file} is missing (listed in {folder / MANIFEST_NAME}); {fix}.") from None
        if size != item.size:
            raise ManifestError(
                f"{file} has {size} bytes, its manifest says {item.size}: the copy is incomplete or damaged; {fix}."
            )


def check_hashes(manifest: Manifest, folder: Path, progress: Callable[[int], None] | None = None) -> None:
    """The full check: every listed file hashes to its recorded SHA-256."""
    check_sizes(manifest, folder)
    for item in manifest.files:
        file = folder / item.path
        if sha256_file(file, progress) != item.sha256:
            raise ManifestError(
                f"{file} does not match the SHA-256 in its manifest: the file is damaged; copy the model again."
            )
