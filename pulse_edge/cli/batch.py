"""``pulse-edge batch``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from pulse_edge.cli import options
from pulse_edge.cli.render import stderr
from pulse_edge.questions import DEFAULT_QUESTION
from pulse_edge.reader import DEFAULT_MAX_TOKENS

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    match = _SHARD.fullmatch(value)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise typer.BadParameter(f"{value!r} is not I/N with 1 <= I <= N (e.g. 2/4 for the second of four machines).",
                                 param_hint="'--shard'")
    return int(match[1]), int(match[2])


class _SecondsPerItem(ProgressColumn):
    """The rate as people think of ECGs: seconds per page, not pages per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{1 / speed:.1f} s/page" if speed else "")


def batch_command(
    inputs: Annotated[list[Path], typer.Argument(help="ECG files, folders, or .txt/.lst lists of paths.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file: one record per page, written as each finishes.")],
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write a CSV (one row per page) at the end.")] = None,
    question: Annotated[
        list[str] | None,
        typer.Option("--question", "-q", help="Question to ask about every page; repeat for several. "
                                              f"[default: {DEFAULT_QUESTION}]"),
    ] = None,
    ask: options.Ask = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look into subfolders.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue OUT: skip pages already read with this model, questions and "
                                             "parameters; retry the failed ones.")
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option("--shard", metavar="I/N", help="Read only the I-th of N equal shares of the sorted pages "
                                                    "(one per machine; together they cover everything)."),
    ] = None,
    model: options.Model = None,
    quant: options.Quant = None,
    max_tokens: options.MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    seed: options.Seed = 0,
    threads: options.Threads = None,
    gpu_layers: options.GpuLayers = None,
    kv_cache: options.KvCache = "auto",
    page: Annotated[int | None, typer.Option(min=1, help="Read only this page of each file (1-based).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start OUT (and --csv) over if they exist.")] = False,
) -> None:
    """Read many ECGs into a JSONL file (and a CSV), one record per page.

    Each record is written and synced as soon as its page is read: after a crash, --resume continues
    where it stopped. Files that cannot be read, and inputs that do not exist, get an error record and
    the batch goes on; it then exits with status 3.
    """
    from pulse_edge.batch import open_batch
    from pulse_edge.cli import EXIT_BATCH_FAILED, EXIT_INTERRUPTED
    from pulse_edge.questions import with_presets
    from pulse_edge.reader import Generation

    parts = _shard(shard)
    console = stderr()
    generation = Generation(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    read = failed = 0
    try:
        with open_batch(inputs, out=out, csv=csv, questions=with_presets(question or [], ask or []),
                        recursive=recursive, resume=resume, shard=parts, model=model, quant=quant,
                        generation=generation, threads=threads, gpu_layers=gpu_layers, kv_type=kv_cache, page=page,
                        force=force) as batch:
            progress = Progress(TextColumn("Reading"), BarColumn(), MofNCompleteColumn(), _SecondsPerItem(),
                                TimeRemainingColumn(), console=console, disable=not console.is_terminal)
            try:
                with progress:
                    task = progress.add_task("batch", total=len(batch.todo))
                    for record in batch:
                        if record.ok:
                            read += 1
                        else:
                            failed += 1
                            progress.console.print(f"Failed: {record.error}", markup=False, highlight=False,
                                                   soft_wrap=True)
                        progress.advance(task)
                batch.write_csv()
            finally:  # Ctrl-C included: say how far it got
                console.print(f"{read} read, {failed} failed, {batch.skipped} skipped (already done)",
                              markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print("Interrupted; every page read so far is saved: run again with --resume to continue.",
                      markup=False, highlight=False, soft_wrap=True)
        _exit(EXIT_INTERRUPTED)
    if failed:
        _exit(EXIT_BATCH_FAILED)


def _exit(code: int) -> NoReturn:
    # SystemExit, not typer.Exit: typer's non-standalone main() returns an Exit's code (and turns Ctrl-C into
    # Exit(130)) instead of raising it, so main() would never see either and would exit 0.
    sys.exit(code)
