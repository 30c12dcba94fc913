"""Which files make up a model: resolved from ``--model`` (a folder, a manifest, or a store name).

Resolving checks the size of every file the manifest lists. ``read`` and ``batch`` also ask for the SHA-256
of the two files they load, so that a damaged copy of the right size is refused instead of read into wrong
answers; a file found good is remembered by its identity in ``home()/checked-files.json`` and hashed again
only when it changes, so this costs one pass over the files after each copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.errors import ModelError
from pulse_edge.manifest import COPY_AGAIN, MANIFEST_NAME, Manifest, check_sizes, read_manifest, sha256_file

log = logging.getLogger(__name__)

HOME_ENV = "PULSE_EDGE_HOME"
CHECKED_NAME = "checked-files.json"


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
    "(e.g. on a USB stick) and import it with 'pulse-edge models import DIR' (or pass --model DIR to use it "
    "where it is)."
)


def import_again(name: str) -> str:
    """What to do about a missing or damaged file of store model ``name``: import it again from its original."""
    return f"import the model again with 'pulse-edge models import DIR --name {name} --force'"


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


def resolve(model: str | Path | None, quant: str | None = None, *, check_hashes: bool = False) -> ModelFiles:
    """Find a model's files and check them against its manifest (``None``: the default model).

    Every listed file must have its recorded size (a fast check). With ``check_hashes`` the language model
    of ``quant`` and the mmproj must also have their recorded SHA-256 (hashed the first time, then
    remembered until the file changes) and come from the same checkpoint.
    """
    manifest_path, name = locate(model)
    folder = manifest_path.parent
    manifest = read_manifest(manifest_path)
    check_sizes(manifest, folder, import_again(name) if name is not None else COPY_AGAIN)
    lm = manifest.language_model(quant)
    mm = manifest.mmproj()
    files = ModelFiles(
        name=manifest.name, folder=folder, manifest=manifest, quant=lm.quant, language_model=folder / lm.path,
        mmproj=folder / mm.path, language_model_sha256=lm.sha256, mmproj_sha256=mm.sha256,
    )
    if check_hashes:
        if name is not None:
            fix = f"run 'pulse-edge models verify {name}' to check the other files, then {import_again(name)}."
        else:
            fix = (f"run 'pulse-edge models verify {folder}' to check the other files, then copy the model again "
                   "(or convert it again).")
        with _CheckedFiles() as checked:
            keys = [checked.source_keys(path, expected=sha256,
                                        damaged=f"{path} does not match the SHA-256 in {manifest_path}: the file is "
                                                f"damaged; {fix}")
                    for path, sha256 in ((files.language_model, lm.sha256), (files.mmproj, mm.sha256))]
        _check_pairing(files.language_model, keys[0], files.mmproj, keys[1])
    return files


def from_paths(language_model: Path, mmproj: Path) -> ModelFiles:
    """A model given as its two GGUF files, without a manifest (their SHA-256 is computed here).

    The two must come from the same checkpoint, as their ``pulse.source.*`` keys show.
    """
    for path in (language_model, mmproj):
        if not path.is_file():
            raise ModelError(f"{path}: no such file. {HOW_TO_GET_ONE}")
    with _CheckedFiles() as checked:
        (lm_sha256, lm_keys), (mm_sha256, mm_keys) = (checked.fingerprint(path) for path in (language_model, mmproj))
    _check_pairing(language_model, lm_keys, mmproj, mm_keys)
    synthetic = Manifest(name=language_model.stem, files=(), source={}, prompt_template="llava_v1",
                         converter_version="", default_quant="", created="")
    return ModelFiles(
        name=language_model.stem, folder=language_model.parent, manifest=synthetic, quant="",
        language_model=language_model, mmproj=mmproj, language_model_sha256=lm_sha256, mmproj_sha256=mm_sha256,
    )


def different_checkpoints(language_model: Path, lm_keys: Mapping[str, str], mmproj: Path,
                          mm_keys: Mapping[str, str]) -> str | None:
    """Why a language model and an mmproj do not belong together (their ``pulse.source.*`` keys differ), or None."""
    differing = sorted(k for k in lm_keys.keys() | mm_keys.keys() if lm_keys.get(k) != mm_keys.get(k))
    if not differing:
        return None
    return (f"{language_model} and {mmproj} come from different checkpoints ({', '.join(differing)} differ): they "
            "do not belong together; use the language model and mmproj written by the same 'pulse-edge convert' run.")


def _check_pairing(language_model: Path, lm_keys: Mapping[str, str], mmproj: Path, mm_keys: Mapping[str, str]) -> None:
    # A file without the keys (converted by another tool) proves nothing either way: the reader's width
    # check is what is left for it. 'pulse-edge models import' and 'verify' insist on the keys.
    if lm_keys and mm_keys and (problem := different_checkpoints(language_model, lm_keys, mmproj, mm_keys)):
        raise ModelError(problem)


def remember_checked(files: Iterable[tuple[Path, str]]) -> None:
    """Record files whose whole content was just hashed elsewhere (``(path, sha256)`` pairs, e.g. the copies
    ``pulse-edge models import`` wrote), so that their first use does not hash them again."""
    with _CheckedFiles() as checked:
        for path, sha256 in files:
            checked.remember(path, sha256, _identity(path))


class _CheckedFiles:
    """The files already hashed whole, by identity: ``home()/checked-files.json``, rewritten on exit if it grew."""

    def __init__(self) -> None:
        self.path = home() / CHECKED_NAME
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or unreadable: start over (it is only a cache)
            data = {}
        self.entries: dict[str, Any] = data if isinstance(data, dict) else {}
        self.changed = False

    def __enter__(self) -> _CheckedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.changed:
            self._save()

    def fingerprint(self, path: Path, expected: str | None = None, damaged: str = "") -> tuple[str, dict[str, str]]:
        """The SHA-256 and ``pulse.source.*`` keys of ``path``; ``ModelError(damaged)`` if the hash is not ``expected``."""
        key, identity = str(path.resolve()), _identity(path)
        entry = self.entries.get(key)
        if (isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("source"), dict)
                and (expected is None or entry.get("sha256") == expected)):
            return str(entry["sha256"]), {str(k): str(v) for k, v in entry["source"].items()}
        log.info("hashing %s (first use since it changed)", path)
        sha256 = sha256_file(path)
        if expected is not None and sha256 != expected:
            raise ModelError(damaged)
        return sha256, self.remember(path, sha256, identity)

    def remember(self, path: Path, sha256: str, identity: list[int]) -> dict[str, str]:
        """Record ``path``, as it was at ``identity``, as hashed whole to ``sha256``; returns its source keys."""
        from pulse_edge.store import source_keys

        keys = source_keys(path)  # after the hash: a damaged header never reaches the GGUF parser
        self.entries[str(path.resolve())] = {"identity": identity, "sha256": sha256, "source": keys}
        self.changed = True
        return keys

    def source_keys(self, path: Path, *, expected: str, damaged: str) -> dict[str, str]:
        return self.fingerprint(path, expected, damaged)[1]

    def _save(self) -> None:
        live = {key: entry for key, entry in self.entries.items() if os.path.exists(key)}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:  # a read-only user folder only costs hashing again next time
            log.debug("cannot record checked files in %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()


def _identity(path: Path) -> list[int]:
    # Any rewrite, copy or touch changes one of these (ctime even when mtime is set back).
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
