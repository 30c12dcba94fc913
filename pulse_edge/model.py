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


def locate(model: str | Path | None) -> tuple[Path, str | None]:
    """The manifest ``--model`` points at, and the store name when it is a store model.

    ``model`` is a folder, a manifest file or a store name, in that order; ``None`` means the default
    model of the store (``pulse-edge models default``).
    """
    from pulse_edge.store import default_model, valid_name

    if model is None:
        name = default_model()
        if name is None:
            raise ModelError(f"No model given. {HOW_TO_GET_ONE}")
        manifest_path = store_dir() / name / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ModelError(
                f"The default model {name!r} is not in the store ({store_dir() / name}); set another with "
                "'pulse-edge models default NAME' or import it again with 'pulse-edge models import DIR'."
            )
        return manifest_path, name
    path = Path(model).expanduser()
    if path.is_file():
        manifest_path = path
    elif path.is_dir():
        manifest_path = path / MANIFEST_NAME
    elif (store_dir() / str(model) / MANIFEST_NAME).is_file():
        manifest_path = store_dir() / str(model) / MANIFEST_NAME
    else:
        raise ModelError(f"No model at {model}. {HOW_TO_GET_ONE}")
    # A store folder given by its path is still that store model (its verify result is recorded).
    folder = manifest_path.parent.resolve()
    in_store = folder.parent == store_dir().resolve() and valid_name(folder.name)
    return manifest_path, folder.name if in_store else None


def resolve(model: str | Path | None, quant: str | None = None) -> ModelFiles:
    """Find a model's files and run the fast size check of its manifest (``None``: the default model)."""
    manifest_path, _ = locate(model)
    folder = manifest_path.parent
    manifest = read_manifest(manifest_path)
    check_sizes(manifest, folder)
    lm = manifest.language_model(quant)
    mm = manifest.mmproj()
    return ModelFiles(
        name=manifest.name, folder=folder, manifest=manifest, quant=lm.quant, language_model=folder / lm.path,
        mmproj=folder / mm.path, language_model_sha256=lm.sha256, mmproj_sha256=mm.sha256,
    )


def from_paths(language_model: Path, mmproj: Path) -> ModelFiles:
    """A model given as its two GGUF files, without a manifest (their SHA-256 is computed here)."""
    from pulse_edge.manifest import sha256_file

    for path in (language_model, mmproj):
        if not path.is_file():
            raise ModelError(f"{path}: no such file. {HOW_TO_GET_ONE}")
    synthetic = Manifest(name=language_model.stem, files=(), source={}, prompt_template="llava_v1",
                         converter_version="", default_quant="", created="")
    return ModelFiles(
        name=language_model.stem, folder=language_model.parent, manifest=synthetic, quant="",
        language_model=language_model, mmproj=mmproj, language_model_sha256=sha256_file(language_model),
        mmproj_sha256=sha256_file(mmproj),
    )
