"""``pulse-edge convert``: a PULSE checkpoint -> language-model GGUF(s) + mmproj GGUF + manifest.

Everything is checked before the first byte is written; every output is written under a
temporary name and renamed only when all of them are complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from convert import language, vision
from convert.checkpoint import TensorStore, fingerprint, looks_like_repo_id, read_json, resolve_source
from convert.quantize import FTYPES, WRITTEN_DIRECTLY, quantize
from convert.tokenizer import read_vocabulary
from pulse_edge import __version__
from pulse_edge.errors import ConversionError
from pulse_edge.manifest import (
    MANIFEST_NAME,
    ROLE_LANGUAGE_MODEL,
    ROLE_MMPROJ,
    Manifest,
    ModelFile,
    sha256_file,
    write_manifest,
)
from pulse_edge.prompt import LLAVA_V1

log = logging.getLogger(__name__)

QUANTS = tuple(FTYPES)
DEFAULT_QUANT = "Q4_K_M"
MMPROJ_TYPES = tuple(vision.MMPROJ_TYPES)
# Errors a write can hit when the disk (or a file-size limit) is full.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _out_of_space(exc: OSError) -> bool:
    # numpy's tofile() reports a short write as "N requested and M written", without an errno.
    return exc.errno in _NO_SPACE or (exc.errno is None and "requested and" in str(exc))

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` with byte counts."""


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert`` wrote."""

    folder: Path
    manifest_path: Path
    manifest: Manifest


def model_name(src: str, folder: Path) -> str:
    """A file-name stem: ``PULSE-ECG/PULSE-7B`` -> ``pulse-7b``."""
    base = src.rstrip("/").split("/")[-1] if looks_like_repo_id(src) else folder.resolve().name
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "model"


class _Outputs:
    """Temporary files that become the outputs only when ``commit`` is called."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.temps: dict[Path, Path] = {}

    def temp(self, final: Path) -> Path:
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        self.temps[final] = tmp
        return tmp

    def discard(self, final: Path) -> None:
        self.temps.pop(final).unlink(missing_ok=True)

    def commit(self) -> None:
        for final, tmp in self.temps.items():
            os.replace(tmp, final)
        self.temps.clear()

    def cleanup(self) -> None:
        for tmp in self.temps.values():
            tmp.unlink(missing_ok=True)
        self.temps.clear()


def convert(
    src: str,
    out: Path,
    *,
    quant: Sequence[str] = (DEFAULT_QUANT,),
    vision_tower: Path | None = None,
    keep_f16: bool = False,
    mmproj_type: str = "f16",
    force: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert the checkpoint ``src`` (folder or cached repo id) into ``out``."""
    report: Progress = progress or (lambda stage, done, total: None)
    quants = list(dict.fromkeys(q.upper() for q in quant))
    unknown = [q for q in quants if q not in FTYPES]
    if unknown or not quants:
        raise ConversionError(f"Unknown --quant {', '.join(unknown) or '(none)'}; choose from {', '.join(QUANTS)}.")
    if mmproj_type not in vision.MMPROJ_TYPES:
        raise ConversionError(f"Unknown --mmproj-type {mmproj_type}; choose from {', '.join(MMPROJ_TYPES)}.")

    # 1. Read and check everything before writing anything.
    folder = resolve_source(src)
    config_path = folder / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} is not a JSON object; download the checkpoint again.")
    shape = language.read_shape(config, config_path)
    vocab = read_vocabulary(folder / "tokenizer.model")
    language.check_vocabulary(vocab, shape, folder)
    store = TensorStore(folder)
    lm_bytes = language.check_tensors(store, shape.tensor_shapes())
    tower = vision.find_tower(config, folder, store, vision_tower)
    mm_bytes = vision.source_bytes(vision.plan(config, tower, store, shape.hidden))
    source = fingerprint(folder, store)
    extra = {f"pulse.source.{k}": v for k, v in source.items() if k != "folder"}

    name = model_name(src, folder)
    out.mkdir(parents=True, exist_ok=True)
    lm_paths = {q: out / f"{name}-{q}.gguf" for q in quants}
    f16_path = lm_paths.get("F16", out / f"{name}-F16.gguf")
    mmproj_path = out / f"{name}-mmproj-{mmproj_type}.gguf"
    manifest_path = out / MANIFEST_NAME
    finals = [*lm_paths.values(), mmproj_path, manifest_path] + ([f16_path] if keep_f16 else [])
    if not force:
        for final in finals:
            if final.exists():
                raise ConversionError(f"{final} already exists; pass --force to overwrite it.")

    outputs = _Outputs(out)
    try:
        _write_all(
            outputs, config=config, folder=folder, store=store, shape=shape, vocab=vocab, tower=tower,
            name=name, quants=quants, lm_paths=lm_paths, f16_path=f16_path, mmproj_path=mmproj_path,
            mmproj_type=mmproj_type, keep_f16=keep_f16, extra=extra, lm_bytes=lm_bytes, mm_bytes=mm_bytes,
            threads=threads, report=report,
        )
        files = _hash_outputs(outputs, lm_paths, f16_path if keep_f16 else None, mmproj_path, mmproj_type, report)
        manifest = Manifest(
            name=name,
            files=tuple(files),
            source=source,
            prompt_template=LLAVA_V1.id,
            converter_version=__version__,
            default_quant=quants[0],
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            extra={"mm_patch_merge_type": str(config.get("mm_patch_merge_type", "flat")),
                   "vision_tower": tower.source},
        )
        write_manifest(manifest, outputs.temp(manifest_path))
        outputs.commit()
    except OSError as exc:
        outputs.cleanup()
        if _out_of_space(exc):
            raise ConversionError(
                f"Not enough disk space to write the outputs in {out}: free at least "
                f"{(lm_bytes + mm_bytes) / 2**30 * 1.5:.1f} GiB in {out} and run again."
            ) from None
        raise ConversionError(f"Cannot write to {out}: {exc.strerror or exc}. Check the folder and run again.") from None
    except BaseException:
        outputs.cleanup()
        raise
    return ConversionResult(out, manifest_path, manifest)


def _write_all(
    outputs: _Outputs, *, config: dict[str, object], folder: Path, store: TensorStore, shape: language.LlamaShape,
    vocab: object, tower: vision.Tower, name: str, quants: list[str], lm_paths: dict[str, Path], f16_path: Path,
    mmproj_path: Path, mmproj_type: str, keep_f16: bool, extra: dict[str, str], lm_bytes: int, mm_bytes: int,
    threads: int | None, report: Progress,
) -> None:
    done = 0

    def tick(stage: str, total: int) -> Callable[[int], None]:
        nonlocal done
        done = 0
        report(stage, 0, total)

        def step(n: int) -> None:
            nonlocal done
            done += n
            report(stage, done, total)

        return step

    vision.write_mmproj(
        outputs.temp(mmproj_path), config=dict(config), tower=tower, checkpoint=store, lm_hidden=shape.hidden,
        name=name, mmproj_type=mmproj_type, extra=extra, progress=tick("mmproj", mm_bytes),
    )
    lm_args = dict(store=store, shape=shape, vocab=vocab, folder=folder, config=config, name=name, extra=extra)
    quantised = [q for q in quants if q not in WRITTEN_DIRECTLY]
    for direct in ("F32", "BF16"):
        if direct in quants:
            language.write_language_model(outputs.temp(lm_paths[direct]), file_type=direct,
                                          progress=tick(direct, lm_bytes), **lm_args)  # type: ignore[arg-type]
    if quantised or "F16" in quants or keep_f16:
        f16_tmp = outputs.temp(f16_path)
        language.write_language_model(f16_tmp, file_type="F16", progress=tick("F16", lm_bytes),
                                      **lm_args)  # type: ignore[arg-type]
        for q in quantised:
            step = tick(q, f16_tmp.stat().st_size)
            quantize(f16_tmp, outputs.temp(lm_paths[q]), q, threads)
            step(f16_tmp.stat().st_size)
        if "F16" not in quants and not keep_f16:
            outputs.discard(f16_path)


def _hash_outputs(
    outputs: _Outputs, lm_paths: dict[str, Path], kept_f16: Path | None, mmproj_path: Path, mmproj_type: str,
    report: Progress,
) -> list[ModelFile]:
    roles = [(ROLE_LANGUAGE_MODEL, path, q) for q, path in lm_paths.items()]
    if kept_f16 is not None and kept_f16 not in lm_paths.values():
        roles.append((ROLE_LANGUAGE_MODEL, kept_f16, "F16"))
    roles.append((ROLE_MMPROJ, mmproj_path, mmproj_type.upper()))
    total = sum(outputs.temps[path].stat().st_size for _, path, _ in roles)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        report("sha256", done, total)

    files = []
    for role, path, q in roles:
        tmp = outputs.temps[path]
        files.append(ModelFile(role=role, path=path.name, size=tmp.stat().st_size, sha256=sha256_file(tmp, step),
                               quant=q))
    return files
