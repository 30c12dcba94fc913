"""The local model store: converted models imported under ``store_dir()/<name>/``.

Each entry holds the model's files (or links to them) and its own ``manifest.json``, plus ``verified.json``
with the last full check. ``home()/config.json`` names the default model. An import hashes every file
before anything is written and builds the entry in a hidden temporary folder that is renamed into place
only when complete, so a failed or interrupted import leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.errors import ManifestError, ModelError, PulseEdgeError
from pulse_edge.manifest import (
    COPY_AGAIN,
    MANIFEST_NAME,
    ROLE_LANGUAGE_MODEL,
    Manifest,
    ModelFile,
    read_manifest,
    sha256_file,
    write_manifest,
)
from pulse_edge.model import different_checkpoints, home, import_again, locate, remember_checked, store_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
VERIFIED_NAME = "verified.json"
SOURCE_PREFIX = "pulse.source."
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CHUNK = 8 << 20

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` with byte counts."""

OK, MISMATCH, MISSING = "OK", "MISMATCH", "MISSING"
PAIRING = "pairing"
"""The ``path`` of the check that the language model(s) and the mmproj come from the same checkpoint."""


class StoreError(ModelError):
    """The store, or an entry in it, cannot be used as asked."""


@dataclass(frozen=True)
class Verification:
    """The last full check of a store model."""

    time: str
    ok: bool
    problem: str | None = None


@dataclass(frozen=True)
class StoredModel:
    """A model in the store."""

    name: str
    folder: Path
    manifest: Manifest
    size: int
    linked: bool
    verification: Verification | None
    is_default: bool

    @property
    def quants(self) -> list[str]:
        return [f.quant for f in self.manifest.files if f.role == ROLE_LANGUAGE_MODEL]


@dataclass(frozen=True)
class FileCheck:
    """The result of checking one file of a model (or, with ``path == PAIRING``, the pairing of its files)."""

    path: str
    status: str
    detail: str = ""
    problem: str | None = None
    """What is wrong and what to do, for the final error; ``None`` when the check passed."""

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True)
class ImportResult:
    """What ``import_model`` put in the store."""

    model: StoredModel
    became_default: bool
    replaced: bool


# -- names and the default model ------------------------------------------------------------------


def valid_name(name: str) -> bool:
    """Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (so never hidden, never ``..``)."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not valid_name(name):
        raise StoreError(
            f"Invalid model name {name!r}: use up to 100 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit."
        )
    return name


def _config_path() -> Path:
    return home() / CONFIG_NAME


def _read_config() -> dict[str, Any]:
    path = _config_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(
            f"Cannot read {path} ({exc}); delete it and set the default again with 'pulse-edge models default NAME'."
        ) from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is not a JSON object; delete it and set the default again with "
                         "'pulse-edge models default NAME'.")
    return data


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def default_model() -> str | None:
    """The name of the default model, or ``None`` when none is set."""
    value = _read_config().get("default_model")
    return value if isinstance(value, str) and value else None


def set_default(name: str | None) -> None:
    """Make ``name`` the default model (it must be in the store); ``None`` clears the default."""
    config = _read_config()
    if name is None:
        config.pop("default_model", None)
    else:
        config["default_model"] = get(name).name
    _write_json_atomic(_config_path(), config)


# -- reading the store ----------------------------------------------------------------------------


def _read_verification(folder: Path) -> Verification | None:
    try:
        data = json.loads((folder / VERIFIED_NAME).read_text(encoding="utf-8"))
        return Verification(time=str(data["time"]), ok=bool(data["ok"]), problem=data.get("problem"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring the unreadable %s; run 'pulse-edge models verify' to check the model again",
                    folder / VERIFIED_NAME)
        return None


def _record_verification(folder: Path, ok: bool, problem: str | None) -> Verification:
    result = Verification(time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ok=ok, problem=problem)
    _write_json_atomic(folder / VERIFIED_NAME, dataclasses.asdict(result))
    return result


def _stored(name: str, folder: Path, default: str | None) -> StoredModel:
    manifest = read_manifest(folder / MANIFEST_NAME)
    return StoredModel(
        name=name, folder=folder, manifest=manifest, size=sum(f.size for f in manifest.files),
        linked=any((folder / f.path).is_symlink() for f in manifest.files),
        verification=_read_verification(folder), is_default=name == default,
    )


def get(name: str) -> StoredModel:
    """The store model called ``name``."""
    folder = store_dir() / check_name(name)
    if not (folder / MANIFEST_NAME).is_file():
        have = ", ".join(m.name for m in list_models()) or "none"
        raise StoreError(
            f"No model named {name!r} in the store ({store_dir()}; it has: {have}). "
            "See 'pulse-edge models list', or add one with 'pulse-edge models import DIR'."
        )
    return _stored(name, folder, default_model())


def list_models() -> list[StoredModel]:
    """Every model in the store, by name; an entry whose manifest cannot be read is skipped with a warning."""
    root = store_dir()
    if not root.is_dir():
        return []
    default = default_model()
    models = []
    for folder in sorted(root.iterdir()):
        # Hidden folders are imports or removals in progress (or interrupted ones).
        if not folder.is_dir() or not valid_name(folder.name):
            continue
        try:
            models.append(_stored(folder.name, folder, default))
        except ManifestError as exc:
            log.warning("skipping %s: %s", folder, exc)
    return models


# -- checking files -------------------------------------------------------------------------------


def source_keys(path: Path) -> dict[str, str]:
    """The ``pulse.source.*`` keys of a GGUF file (read through a memory map: only the header is touched)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
        keys = {
            name: str(field.contents())
            for name, field in reader.fields.items()
            if name.startswith(SOURCE_PREFIX)
        }
    except Exception as exc:  # a damaged file can make the parser fail in many ways
        raise ModelError(f"{path} is not a readable GGUF file ({exc}); copy the model again.") from None
    del reader  # releases the memory map
    return keys


def check_pairing(manifest: Manifest, folder: Path, files: Sequence[ModelFile] | None = None) -> FileCheck:
    """Whether every language model and the mmproj come from the same source checkpoint."""
    listed = list(files if files is not None else manifest.files)
    mm = manifest.mmproj()
    mm_path = folder / mm.path
    mm_keys = source_keys(mm_path)
    if not mm_keys:
        problem = (f"{mm_path} carries no {SOURCE_PREFIX}* keys, so nothing shows which language model it belongs "
                   "with; convert the model again with 'pulse-edge convert'.")
        return FileCheck(PAIRING, MISMATCH, f"{mm.path} has no source fingerprint", problem)
    for item in listed:
        if item.role != ROLE_LANGUAGE_MODEL:
            continue
        lm_path = folder / item.path
        differ = different_checkpoints(lm_path, source_keys(lm_path), mm_path, mm_keys)
        if differ is not None:
            return FileCheck(PAIRING, MISMATCH, f"{item.path} and {mm.path} come from different checkpoints", differ)
    fingerprint = mm_keys.get(f"{SOURCE_PREFIX}config_sha256", "")[:12]
    return FileCheck(PAIRING, OK, f"language model and mmproj from the same checkpoint, config {fingerprint}")


def _check_file(item: ModelFile, folder: Path, manifest_path: Path, fix: str,
                progress: Callable[[int], None]) -> FileCheck:
    file = folder / item.path
    if not file.exists():
        if file.is_symlink():
            target = os.readlink(file)
            return FileCheck(item.path, MISSING, f"link to {target}",
                             f"{file} links to {target}, which is gone; connect the drive that holds it, "
                             "or import the model again without --link.")
        return FileCheck(item.path, MISSING, "", f"{file} is missing (listed in {manifest_path}); {fix}")
    size = file.stat().st_size
    if size != item.size:
        progress(size)
        return FileCheck(item.path, MISMATCH, f"{size} bytes, manifest says {item.size}",
                         f"{file} has {size} bytes, its manifest says {item.size}: the copy is incomplete or "
                         f"damaged; {fix}")
    if sha256_file(file, progress) != item.sha256:
        return FileCheck(item.path, MISMATCH, "SHA-256 differs",
                         f"{file} does not match the SHA-256 in {manifest_path}: the file is damaged; {fix}")
    return FileCheck(item.path, OK)


def _checks(manifest: Manifest, folder: Path, manifest_path: Path, fix: str, files: Sequence[ModelFile],
            progress: Progress | None) -> Iterator[FileCheck]:
    """Hash every file of ``files`` (one ``sha256`` progress stage), then, if all are good, check their pairing."""
    report: Progress = progress or (lambda stage, done, total: None)
    total = sum(f.size for f in files)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        report("sha256", done, total)

    report("sha256", 0, total)
    all_ok = True
    for item in files:
        check = _check_file(item, folder, manifest_path, fix, step)
        all_ok = all_ok and check.ok
        yield check
    # A missing, truncated or damaged file is already a failure; its fingerprint (unreadable when truncated)
    # would only add a second, misleading one.
    if all_ok:
        try:
            yield check_pairing(manifest, folder, files)
        except PulseEdgeError as exc:
            yield FileCheck(PAIRING, MISMATCH, "a file cannot be read", str(exc))


def _failure(checks: Sequence[FileCheck]) -> str | None:
    bad = [c for c in checks if not c.ok]
    if not bad:
        return None
    more = len(bad) - 1
    first = bad[0].problem or f"{bad[0].path}: {bad[0].detail}"
    return first + (f" ({more} more problem{'s' if more > 1 else ''} listed above.)" if more else "")


def verify(model: str | Path | None = None, progress: Progress | None = None) -> Iterator[FileCheck]:
    """Hash every file of a model against its manifest and check their pairing, yielding one result per file.

    ``model`` is a store name, a folder or a manifest (``None``: the default model). The result of a store
    model is recorded for ``pulse-edge models list``. Raises ``ModelError`` at the end when any check failed.
    """
    manifest_path, name = locate(model)
    folder = manifest_path.parent
    manifest = read_manifest(manifest_path)
    fix = import_again(name) if name is not None else COPY_AGAIN
    checks = []
    for check in _checks(manifest, folder, manifest_path, fix + ".", manifest.files, progress):
        checks.append(check)
        yield check
    problem = _failure(checks)
    if name is not None:
        _record_verification(folder, problem is None, problem)
    if problem is not None:
        raise ModelError(problem)


# -- changing the store ---------------------------------------------------------------------------


def _select(manifest: Manifest, quant: Sequence[str]) -> Manifest:
    """The manifest restricted to the language models of ``quant`` (all of them when empty) and the mmproj."""
    if not quant:
        return manifest
    wanted = list(dict.fromkeys(q.upper() for q in quant))
    lms = [manifest.language_model(q) for q in wanted]  # raises, naming what the model has
    files = tuple(f for f in manifest.files if f.role != ROLE_LANGUAGE_MODEL or f in lms)
    default = manifest.default_quant if manifest.default_quant.upper() in wanted else lms[0].quant
    return dataclasses.replace(manifest, files=files, default_quant=default)


def _copy_hashed(src: Path, dst: Path, progress: Callable[[int], None]) -> str:
    """Copy ``src`` to the new file ``dst``, flushed to disk; returns the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    with open(src, "rb") as reader, open(dst, "xb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            progress(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _source_folder(src: Path) -> Path:
    src = src.expanduser()
    if src.is_file() and src.name == MANIFEST_NAME:
        return src.parent
    if not src.is_dir():
        raise StoreError(f"{src} is not a folder; pass the folder 'pulse-edge convert' wrote (it holds "
                         f"{MANIFEST_NAME} and the .gguf files).")
    return src


def import_model(
    src: Path,
    *,
    name: str | None = None,
    link: bool = False,
    force: bool = False,
    quant: Sequence[str] = (),
    progress: Progress | None = None,
) -> ImportResult:
    """Import the converted model in folder ``src`` into the store, after checking every file's SHA-256.

    ``quant`` limits the language models imported; ``link`` makes symbolic links to the files of ``src``
    instead of copies; ``force`` replaces a store model of the same name.
    """
    report: Progress = progress or (lambda stage, done, total: None)
    folder = _source_folder(src)
    manifest_path = folder / MANIFEST_NAME
    manifest = _select(read_manifest(manifest_path), quant)
    manifest.mmproj()  # a model without its vision projector is of no use
    store_name = check_name(name) if name is not None else _manifest_name(manifest, manifest_path)
    root = store_dir()
    dest = root / store_name
    if folder.resolve() == dest.resolve():
        raise StoreError(f"{folder} is already the store entry {store_name!r}; nothing to import.")
    if link and folder.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{folder} is inside the store; import it without --link (a link would break "
                         "when that entry is removed).")
    if dest.exists() and not force:
        raise StoreError(f"A model named {store_name!r} is already in the store ({dest}); pass --force to replace "
                         "it, or --name to import this one under another name.")

    # 1. Check every byte before anything is written.
    checks = list(_checks(manifest, folder, manifest_path, "copy the converted folder again (or convert the "
                          "model again). Nothing was imported.", manifest.files, report))
    if (problem := _failure(checks)) is not None:
        raise ModelError(problem)
    if not link:
        root.mkdir(parents=True, exist_ok=True)
        needed, free = sum(f.size for f in manifest.files), shutil.disk_usage(root).free
        if needed > free:
            raise StoreError(f"Not enough disk space in {root}: the model needs {needed / 2**30:.2f} GiB, "
                             f"{free / 2**30:.2f} GiB is free. Free some space, or import with --link.")

    # 2. Build the entry in a hidden folder and rename it into place at the end.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".import-{store_name}-", dir=root))
    try:
        _fill(tmp, folder, manifest, link, report)
        stored = dataclasses.replace(manifest, name=store_name, extra={
            **manifest.extra,
            "import": {"from": str(folder.resolve()), "name": manifest.name, "link": link,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        })
        write_manifest(stored, tmp / MANIFEST_NAME)
        _record_verification(tmp, True, None)
        replaced = _swap_in(tmp, dest, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"Cannot write the model to {root}: {exc.strerror or exc}. Nothing was imported; "
                         "check the folder and run again.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not link:
        # Each copy was hashed as it was written: remembered, the first read does not hash it again.
        with contextlib.suppress(PulseEdgeError, OSError):  # only a cache: the import is done either way
            remember_checked((dest / item.path, item.sha256) for item in manifest.files)
    became_default = default_model() not in {m.name for m in list_models()}
    if became_default:
        set_default(store_name)
    return ImportResult(model=get(store_name), became_default=became_default, replaced=replaced)


def _manifest_name(manifest: Manifest, manifest_path: Path) -> str:
    if not valid_name(manifest.name):
        raise StoreError(f"The model name {manifest.name!r} in {manifest_path} cannot name a store entry; "
                         "pass --name NAME (letters, digits, '.', '_' and '-').")
    return manifest.name


def _fill(tmp: Path, folder: Path, manifest: Manifest, link: bool, report: Progress) -> None:
    if link:
        for item in manifest.files:
            target = (folder / item.path).resolve()
            if not target.is_file():
                raise StoreError(f"{target} does not exist; nothing to link to. Nothing was imported.")
            (tmp / item.path).symlink_to(target)
        return
    total, done = sum(f.size for f in manifest.files), 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        report("copy", done, total)

    report("copy", 0, total)
    for item in manifest.files:
        # The copy is hashed too: a read error during the copy cannot slip into the store.
        if _copy_hashed(folder / item.path, tmp / item.path, step) != item.sha256:
            raise ModelError(f"{folder / item.path} changed while it was being copied (its SHA-256 no longer "
                             "matches the manifest); check the drive and run again. Nothing was imported.")


def _swap_in(tmp: Path, dest: Path, force: bool) -> bool:
    """Rename ``tmp`` to ``dest``; with ``force``, an existing ``dest`` is moved aside first and then deleted."""
    old = None
    if dest.exists() or dest.is_symlink():
        if not force:
            raise StoreError(f"A model named {dest.name!r} appeared in the store ({dest}) during the import; "
                             "pass --force to replace it.")
        old = Path(tempfile.mkdtemp(prefix=f".replaced-{dest.name}-", dir=dest.parent)) / dest.name
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
    return old is not None


def remove(name: str) -> StoredModel:
    """Delete a store model (links are removed, never what they point at); clears the default if it was it."""
    model = get(name)
    # Move it out of sight first, so an interrupted removal never leaves a half model under its name.
    trash = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=model.folder.parent))
    try:
        os.rename(model.folder, trash / name)
    except OSError as exc:
        shutil.rmtree(trash, ignore_errors=True)
        raise StoreError(f"Cannot remove {model.folder}: {exc.strerror or exc}; check its permissions.") from None
    with contextlib.suppress(OSError):
        shutil.rmtree(trash)
    if model.is_default:
        set_default(None)
    return model
