"""Which files make up a model: resolved from ``--model`` (a folder, a manifest, or a store name)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pulse_edge.errors import ModelError
from pulse_edge.manifest import MANIFEST_NAME, Manifest, check_sizes, read_manifest

HOME_ENV = "PULSE_EDGE_HOME"


def home() -> Path:
    """The user folder: ``PULSE_EDGE_HOME`` when set (read at call time, so tests can redirect it)."""
    if value := os.environ.get(HOME_ENV):
        return Path(value).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("pulse-edge", appauthor=False))


def store_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class ModelFiles:
    """A converted model ready to load: the language model and the mmproj it belongs with."""

    name: str
    folder: Path
    manifest: Manifest
    quant: str
    language_model: Path
    mmproj: Path
    language_model_sha256: str
    mmproj_sha256: str


HOW_TO_GET_ONE = (
    "Convert PULSE-7B on a connected machine ('pulse-edge convert PULSE-ECG/PULSE-7B --out DIR'), copy DIR here "
    "(e.g. on a USB stick) and pass --model DIR."
)


def resolve(model: str | Path | None, quant: str | None = None) -> ModelFiles:
    """Find a model's files and run the fast size check of its manifest."""
    if model is None:
        raise ModelError(f"No model given. {HOW_TO_GET_ONE}")
    path = Path(model).expanduser()
    if path.is_file():
        manifest_path = path
    elif path.is_dir():
        manifest_path = path / MANIFEST_NAME
    elif (store_dir() / str(model) / MANIFEST_NAME).is_file():
        manifest_path = store_dir() / str(model) / MANIFEST_NAME
    else:
        raise ModelError(f"No model at {model}. {HOW_TO_GET_ONE}")
    folder = manifest_path.parent
    manifest = read_manifest(manifest_path)
    check_sizes(manifest, folder)
    lm = manifest.language_model(quant)
    mm = manifest.mmproj()
    return ModelFiles(
        name=manifest.name, folder=folder, manifest=manifest, quant=lm.quant, language_model=folder / lm.path,
        mmproj=folder / mm.path, language_model_sha256=lm.sha256, mmproj_sha256=mm.sha256,
    )
