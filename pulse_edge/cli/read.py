"""``pulse-edge read``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pulse_edge.cli import options
from pulse_edge.cli.render import stderr, stdout
from pulse_edge.errors import PulseEdgeError
from pulse_edge.reader import DEFAULT_MAX_TOKENS


def read_command(
    images: Annotated[list[Path], typer.Argument(help="ECG images: PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or DICOM.")],
    question: Annotated[
        list[str] | None, typer.Option("--question", "-q", help="A question (repeat for several; the image is read once).")
    ] = None,
    report: Annotated[bool, typer.Option("--report", help="Ask PULSE for a full report (--ask report).")] = False,
    ask: options.Ask = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    model: options.Model = None,
    quant: options.Quant = None,
    page: Annotated[int | None, typer.Option(min=1, help="Page of a PDF/TIFF/DICOM (1-based) [default: all].")] = None,
    max_tokens: options.MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    seed: options.Seed = 0,
    threads: options.Threads = None,
    gpu_layers: options.GpuLayers = None,
    kv_cache: options.KvCache = "auto",
) -> None:
    """Read ECG images with PULSE and answer questions about them.

    Without --question or --ask, PULSE gives its standard interpretation. Answers stream to stdout as they
    are generated on a terminal. Research model output, not a medical device: a clinician must
    over-read every ECG.
    """
    from pulse_edge.inputs import load
    from pulse_edge.model import resolve
    from pulse_edge.prompt import check_questions
    from pulse_edge.questions import DEFAULT_QUESTION, with_presets
    from pulse_edge.reader import DISCLAIMER, Generation, Reader

    questions = with_presets(question or [], [*(ask or []), *(["report"] if report else [])]) or [DEFAULT_QUESTION]
    check_questions(questions)  # before loading a 4 GB model (prompt building checks them again)
    generation = Generation(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    for path in images:  # fail before loading a 4 GB model for a typo
        if not path.exists():
            raise PulseEdgeError(f"{path}: no such file.")
    files = resolve(model, quant, check_hashes=True)
    reader = Reader(files, threads=threads, gpu_layers=gpu_layers, kv_type=kv_cache)
    out = stdout()
    stream = out.is_terminal and not as_json
    failed = 0
    try:
        for path in images:
            try:
                pages = load(path, page)
            except PulseEdgeError as exc:
                if len(images) == 1:
                    raise
                failed += 1
                stderr().print(f"Error: {exc}", markup=False)
                continue
            for item in pages:
                if not as_json and (len(images) > 1 or len(pages) > 1):
                    out.print(f"== {path}" + (f" (page {item.page})" if len(pages) > 1 else ""), markup=False)
                current = [-1]

                def show(index: int, text: str, current: list[int] = current) -> None:
                    if index != current[0]:
                        current[0] = index
                        out.print(f"Q: {questions[index]}\nA: ", end="", markup=False)
                    out.print(text, end="", markup=False)

                reading = reader.read(item.image, questions, generation=generation, image_name=str(path),
                                      on_token=show if stream else None)
                if as_json:
                    record = reading.to_dict()
                    record.update(path=str(path), page=item.page, file_sha256=item.sha256, kind=item.kind)
                    typer.echo(json.dumps(record, ensure_ascii=False))
                    continue
                for answer in reading.answers:
                    if stream:
                        out.print()
                    else:
                        if len(questions) > 1:
                            out.print(f"Q: {answer.question}", markup=False)
                        typer.echo(answer.text)
                out.print(f"[{DISCLAIMER}]", markup=False)
    finally:
        reader.close()
    if failed:
        raise PulseEdgeError(f"{failed} of {len(images)} inputs could not be read (see above).")
