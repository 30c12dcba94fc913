"""Read a whole archive of ECGs into a JSONL file that survives crashes, resumes, and splits across machines.

Each page of each input is one item. Items are sorted by (path, page) so that every machine sharing an
archive sees the same work list, and ``shard=(i, n)`` takes every n-th item starting at the i-th. One JSON
record per item is appended, flushed and fsync'd as the item finishes, so a crash (even ``kill -9``) loses
at most the item in flight; ``resume=True`` skips the items already read with the same model, questions and
generation parameters, and retries the ones that failed.
"""

from __future__ import annotations

import contextlib
import csv as csv_module
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from pulse_edge.errors import ImageError, PulseEdgeError
from pulse_edge.inputs import PathLike, count_pages, iter_pages, scan_inputs
from pulse_edge.llm import gguf_file_type, resolve_kv_type
from pulse_edge.model import ModelFiles, resolve
from pulse_edge.prompt import check_questions
from pulse_edge.questions import DEFAULT_QUESTION
from pulse_edge.reader import Generation, Reader, Reading

try:  # POSIX only: on other systems two runs on one output are not prevented
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_GENERATION = Generation()

OK, ERROR = "ok", "error"
FILE_MODE = 0o600  # results describe patients: readable by their owner only
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): such cells get a
# leading single quote, the usual mitigation, so they open as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

Key = tuple[str, int | None]  # (path as listed, 1-based page; None for a file whose pages cannot be counted)


@dataclass(frozen=True)
class Item:
    """One page of one input file, as planned (not yet read)."""

    path: Path
    page: int | None
    error: str | None = None  # already known at planning time: the file cannot even be opened

    @property
    def key(self) -> Key:
        return (str(self.path), self.page)


@dataclass(frozen=True)
class Record:
    """The outcome of one item: one line of the JSONL output."""

    path: str
    page: int | None
    status: str  # "ok" | "error"
    file_sha256: str | None = None
    kind: str | None = None
    reading: Reading | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        if self.reading is None:
            data: dict[str, Any] = {"path": self.path, "page": self.page}
            if self.file_sha256:
                data["file_sha256"] = self.file_sha256
            return {**data, "status": self.status, "error": self.error}
        reading = self.reading
        return {
            "path": self.path,
            "page": self.page,
            "file_sha256": self.file_sha256,
            "kind": self.kind,
            "answers": [{"question": a.question, "answer": a.text, "tokens": a.tokens, "stopped": a.stopped}
                        for a in reading.answers],
            "model": reading.model,
            "parameters": asdict(reading.generation),
            "plan": reading.plan,
            "image_tokens": reading.image_tokens,
            "timings": {**reading.timings,
                        "prefill_s": sum(a.prefill_s for a in reading.answers),
                        "generation_s": sum(a.generation_s for a in reading.answers),
                        "total_s": self.seconds},
            "disclaimer": reading.disclaimer,
            "status": self.status,
        }


@dataclass
class Batch:
    """A planned batch: what this shard holds, what is left to read, and the open output."""

    out: Path
    csv: Path | None
    questions: list[str]
    generation: Generation
    files: ModelFiles
    items: list[Item]  # this shard's items, in order
    todo: list[Item]  # those not already done
    threads: int | None = None
    gpu_layers: int | None = None
    kv_type: str = "auto"
    _handle: int | None = field(default=None, repr=False)
    _reader: Reader | None = field(default=None, repr=False)

    @property
    def skipped(self) -> int:
        return len(self.items) - len(self.todo)

    def __iter__(self) -> Iterator[Record]:
        return self.run()

    def run(self) -> Iterator[Record]:
        """Read every item left to do, appending (and syncing) its record before yielding it."""
        for item in self.todo:
            record = self._read(item)
            self._append(record)
            yield record

    def write_csv(self) -> None:
        """Write ``csv`` from the whole JSONL (the latest record of each item), so resumed runs are complete."""
        if self.csv is not None:
            write_csv(self.out, self.csv, self.questions)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._handle is not None:
            os.close(self._handle)  # also releases the lock
            self._handle = None

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one item -----------------------------------------------------------------------------
    def _read(self, item: Item) -> Record:
        path, started = str(item.path), time.perf_counter()
        if item.error is not None:
            return Record(path, item.page, ERROR, file_sha256=_sha256_or_none(item.path), error=item.error)
        reader = self._loaded()  # outside the try: a model that cannot load stops the batch, not one item
        sha256: str | None = None
        try:
            # Only the wanted page is decoded (a PDF renders one page, a TIFF seeks one frame).
            for page in iter_pages(item.path, item.page):
                sha256 = page.sha256
                reading = reader.read(page.image, self.questions, generation=self.generation,
                                      image_name=f"{path}#{page.page}")
                return Record(path, page.page, OK, file_sha256=page.sha256, kind=page.kind, reading=reading,
                              seconds=time.perf_counter() - started)
            raise PulseEdgeError(f"{path} has no page {item.page}.")  # iter_pages refuses this itself; a safety net
        except PulseEdgeError as exc:
            message = str(exc)
        except Exception as exc:  # one odd file must not stop (and, resumed, re-stop) a whole archive
            log.debug("%s", path, exc_info=True)
            message = f"{path}: unexpected {type(exc).__name__} ({exc}); please report it (run with -v for details)."
        return Record(path, item.page, ERROR, file_sha256=sha256 or _sha256_or_none(item.path), error=message)

    def _loaded(self) -> Reader:
        # Loaded at the first item that needs it: a resume with nothing left to do never loads the model.
        if self._reader is None:
            self._reader = Reader(self.files, threads=self.threads, gpu_layers=self.gpu_layers, kv_type=self.kv_type)
        return self._reader

    def _append(self, record: Record) -> None:
        if self._handle is None:
            raise PulseEdgeError(f"{self.out} is closed.")
        # ASCII JSON: a file name that is not valid UTF-8 survives as an escape instead of failing the write.
        line = (json.dumps(record.to_dict()) + "\n").encode("ascii")
        view = memoryview(line)
        while view:  # one write in practice; a short write continues where it stopped
            view = view[os.write(self._handle, view):]
        os.fsync(self._handle)


def open_batch(
    inputs: Sequence[PathLike],
    *,
    out: PathLike,
    csv: PathLike | None = None,
    questions: Sequence[str] = (),
    recursive: bool = False,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    model: str | Path | None = None,
    quant: str | None = None,
    generation: Generation = DEFAULT_GENERATION,
    threads: int | None = None,
    gpu_layers: int | None = None,
    kv_type: str = "auto",
    page: int | None = None,
    force: bool = False,
) -> Batch:
    """Plan a batch and open its output: iterate the result to read, then ``write_csv()`` and ``close()``.

    The model is checked (sizes, and SHA-256 the first time its files are used) but not loaded; the output is
    created (mode 0600), locked, and with ``resume`` cleaned of a torn last line left by a crash.
    """
    out_path = Path(out)
    csv_path = Path(csv) if csv is not None else None
    if resume and force:
        raise PulseEdgeError("--resume continues an output and --force starts it over: pass only one of them.")
    if shard is not None and not 1 <= shard[0] <= shard[1]:
        raise PulseEdgeError(f"Shard {shard[0]}/{shard[1]} does not exist; use I/N with 1 <= I <= N.")
    if out_path.exists() and not (resume or force):
        raise PulseEdgeError(f"{out_path} already exists; pass --resume to continue it or --force to start over.")
    if csv_path is not None and csv_path.exists() and not (resume or force):
        raise PulseEdgeError(f"{csv_path} already exists; pass --resume or --force to write it again.")
    if csv_path is not None and csv_path.resolve() == out_path.resolve():
        raise PulseEdgeError(f"--csv and --out both name {out_path}; give the CSV its own file.")
    wanted = list(questions) or [DEFAULT_QUESTION]
    check_questions(wanted)  # once, before the model is hashed or the output made: not one error record per page
    files = resolve(model, quant, check_hashes=True)
    items = plan(inputs, recursive=recursive, page=page, shard=shard)
    handle = _open_output(out_path, truncate=force)
    try:
        done = _done(out_path, handle, files, wanted, generation, kv_type) if resume else {}
        hashes: dict[Path, str | None] = {}
        todo = [item for item in items if not _is_done(item, done, hashes)]
    except BaseException:
        os.close(handle)
        raise
    log.debug("%d items in this shard, %d to read", len(items), len(todo))
    return Batch(out=out_path, csv=csv_path, questions=wanted, generation=generation, files=files, items=items,
                 todo=todo, threads=threads, gpu_layers=gpu_layers, kv_type=kv_type, _handle=handle)


def plan(inputs: Sequence[PathLike], *, recursive: bool = False, page: int | None = None,
         shard: tuple[int, int] | None = None) -> list[Item]:
    """The sorted work list (one item per page), or the ``shard=(i, n)`` part of it (1-based ``i``).

    The split is taken from the whole sorted list, before anything done is skipped, so it never depends on
    what a machine has already read: the n shards are disjoint and together cover every item.
    An input that does not exist, given or on a line of a list, is an item that fails, like an unreadable
    file, so that one typo does not stop an archive; when none of the inputs exists, that is an error.
    """
    found, missing = scan_inputs(inputs, recursive)
    if missing and not found:
        if len(missing) == 1:
            raise ImageError(missing[0].error)
        shown = ", ".join(str(gone.path) for gone in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ImageError(f"None of the {len(missing)} inputs exists ({shown}); check the paths.")
    items = [Item(gone.path, None, error=gone.error) for gone in missing]
    for path in found:
        if page is not None:
            items.append(Item(path, page))  # a file with fewer pages fails when read, with load()'s message
            continue
        try:
            total = count_pages(path)
        except PulseEdgeError as exc:
            items.append(Item(path, None, error=str(exc)))
            continue
        items.extend(Item(path, number) for number in range(1, total + 1))
    items.sort(key=lambda item: (str(item.path), item.page or 0))
    if shard is None:
        return items
    index, count = shard
    return items[index - 1::count]


# -- the output file --------------------------------------------------------------------------


def _open_output(path: Path, truncate: bool) -> int:
    created = not path.exists()
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
    except OSError as exc:
        raise PulseEdgeError(f"{path}: cannot open it for writing ({exc.strerror}); pick another --out.") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PulseEdgeError(f"{path} is being written by another pulse-edge batch; wait for it to end "
                                     "or pick another --out.") from None
        if truncate:
            os.ftruncate(handle, 0)
            os.fchmod(handle, FILE_MODE)  # starting over: a new file in all but name
        if created:
            _sync_folder(path.parent)
    except BaseException:
        os.close(handle)
        raise
    return handle


def _sync_folder(folder: Path) -> None:
    # A new file's name lives in its folder: without this a power cut can lose the whole file.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def read_records(path: Path, handle: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records of a JSONL output with each one's end offset; a torn last line is left out.

    A line that is not a JSON object anywhere but at the end is damage nobody can guess the fix for: refused.
    """
    offset, number, torn = 0, 0, None
    for line in handle:
        number += 1
        if torn is not None:
            raise PulseEdgeError(f"{path} line {torn} is not a JSON record; delete that line (or pass --force to "
                                 "start over) and run again.")
        record = _parse(line)
        if record is None:
            torn = number
            continue
        offset += len(line)
        yield offset, record


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):  # every record is written with its newline in one write
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


_DoneKey = Key
_Done = dict[_DoneKey, str | None]  # item -> the SHA-256 of the file it was read from


def _done(path: Path, handle: int, files: ModelFiles, questions: list[str], generation: Generation,
          kv_type: str) -> _Done:
    """Items already read with this model, KV cache type, these questions and these parameters; a torn tail is
    cut away."""
    done: _Done = {}
    wanted_model = (files.language_model_sha256, files.mmproj_sha256)
    wanted_parameters = asdict(generation)
    wanted_kv = resolve_kv_type(kv_type, gguf_file_type(files.language_model))  # as LanguageModel resolves it
    end = 0
    with open(os.dup(handle), "rb") as stream:  # a duplicate: closing it keeps our descriptor (and lock)
        stream.seek(0)
        for offset, record in read_records(path, stream):
            end = offset
            key = (str(record.get("path")), record.get("page"))
            model = record.get("model") or {}
            same = (record.get("status") == OK
                    and (model.get("language_model_sha256"), model.get("mmproj_sha256")) == wanted_model
                    and model.get("kv_cache", "f16") == wanted_kv
                    and [a.get("question") for a in record.get("answers") or []] == questions
                    and record.get("parameters") == wanted_parameters)
            if same:
                done[key] = record.get("file_sha256")
            else:
                done.pop(key, None)  # a later failure or another setting supersedes an earlier success
        size = stream.seek(0, os.SEEK_END)
    if size != end:
        log.warning("%s: dropping an incomplete last record (%d bytes) left by an interrupted run", path, size - end)
        os.ftruncate(handle, end)
        os.fsync(handle)
    return done


def _is_done(item: Item, done: _Done, hashes: dict[Path, str | None]) -> bool:
    if item.key not in done:
        return False
    # The same name may now hold another ECG: only the same bytes count as read.
    if item.path not in hashes:  # a multi-page file is hashed once, not once per page
        hashes[item.path] = _sha256_or_none(item.path)
    return done[item.key] == hashes[item.path]


def _sha256_or_none(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


# -- CSV --------------------------------------------------------------------------------------


def write_csv(jsonl: Path, path: Path, questions: Sequence[str]) -> None:
    """One row per item of ``jsonl`` (its latest record): path, page, status, an answer per question, error.

    Written to a temporary file and renamed, so an interrupted write never leaves half a CSV. A text cell that
    a spreadsheet would take for a formula (see ``FORMULA_STARTS``) starts with a single quote.
    """
    latest: dict[Key, dict[str, Any]] = {}
    with open(jsonl, "rb") as stream:
        for _, record in read_records(jsonl, stream):
            name, page = str(record.get("path")), record.get("page")
            # A file that could not be opened has one page-less record; reading it later replaces that (and the
            # other way round: a file that became unreadable replaces its old pages).
            stale = [key for key in latest if key[0] == name and (page is None) != (key[1] is None)]
            for key in stale:
                del latest[key]
            latest[(name, page)] = record
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            writer = csv_module.writer(handle)
            writer.writerow(["path", "page", "status", *map(_text_cell, questions), "error"])
            for key in sorted(latest, key=lambda k: (k[0], k[1] or 0)):
                record = latest[key]
                answers = {a.get("question"): a.get("answer", "") for a in record.get("answers") or []}
                writer.writerow([_text_cell(key[0]), "" if key[1] is None else key[1], record.get("status", ""),
                                 *(_text_cell(str(answers.get(q) or "")) for q in questions),
                                 _text_cell(str(record.get("error") or ""))])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _text_cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text
