"""``pulse-edge chat``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from pulse_edge.cli import options
from pulse_edge.cli.render import stderr, stdout
from pulse_edge.errors import PulseEdgeError
from pulse_edge.reader import DEFAULT_MAX_TOKENS

COMMANDS = {
    "/reset": "forget the questions and answers so far (the image stays read)",
    "/history": "show the conversation so far",
    "/help": "show these commands",
    "/quit": "end the conversation (also /exit, or Ctrl-D)",
}


def _questions(interactive: bool) -> Iterator[str]:
    """Lines from the user: with line editing and history on a terminal, else plain lines from stdin."""
    if interactive:
        try:
            import readline  # noqa: F401 - importing it gives input() editing and an in-memory history
        except ImportError:  # not on every platform (Windows)
            pass
        while True:
            try:
                yield input("> ")
            except EOFError:
                stderr().print()
                return
            except KeyboardInterrupt:  # as at a Python prompt: drop the line, ask again
                stderr().print()
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def chat_command(
    image: Annotated[Path, typer.Argument(help="One ECG image: PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or DICOM.")],
    model: options.Model = None,
    quant: options.Quant = None,
    page: Annotated[int | None, typer.Option(min=1, help="Page of a PDF/TIFF/DICOM (1-based) [default: the only one].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per answer on stdout.")] = False,
    max_tokens: options.MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    seed: options.Seed = 0,
    threads: options.Threads = None,
    gpu_layers: options.GpuLayers = None,
    kv_cache: options.KvCache = "auto",
) -> None:
    """Talk with PULSE about one ECG image, turn by turn.

    The image is read once; each question sees the conversation so far (PULSE's multi-turn
    prompt). Type /help for the commands (/reset, /history, /quit); Ctrl-C stops an answer, Ctrl-D
    ends the chat. Questions can also be piped in, one per line. Research model output, not a
    medical device: a clinician must over-read every ECG.
    """
    from pulse_edge.inputs import load
    from pulse_edge.model import resolve
    from pulse_edge.reader import DISCLAIMER, Conversation, Generation, Reader

    if not image.exists():
        raise PulseEdgeError(f"{image}: no such file.")
    pages = load(image, page)
    if len(pages) > 1:
        raise PulseEdgeError(f"{image} has {len(pages)} pages; choose the one to talk about with --page.")
    files = resolve(model, quant, check_hashes=True)
    interactive = sys.stdin.isatty()
    out, err = stdout(), stderr()
    stream = out.is_terminal and not as_json
    generation = Generation(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    reader = Reader(files, threads=threads, gpu_layers=gpu_layers, kv_type=kv_cache)
    try:
        if interactive:
            err.print(f"Reading {image} ...", markup=False)
        chat = Conversation(reader, pages[0].image, generation=generation, image_name=str(image))
        if interactive:
            took = chat.timings["vision_s"] + chat.timings["image_prefill_s"]
            err.print(f"Ready ({chat.image_tokens} image tokens, {took:.0f} s). Ask a question; /help lists the commands.",
                      markup=False)
        if not as_json:
            out.print(f"[{DISCLAIMER}]", markup=False)
        for line in _questions(interactive):
            question = line.strip()
            if not question:
                continue
            command = question.lower()
            if command in ("/quit", "/exit"):
                break
            if command == "/help":
                for name, what in COMMANDS.items():
                    err.print(f"{name:<9} {what}", markup=False)
            elif command == "/reset":
                chat.reset()
                err.print("Conversation cleared; the image stays read.", markup=False)
            elif command == "/history":
                for asked, answered in chat.turns:
                    out.print(f"Q: {asked}\nA: {answered}", markup=False)
            elif command.startswith("/"):
                err.print(f"Unknown command {question.split()[0]}; /help lists the commands.", markup=False)
            else:
                try:
                    # Streamed with plain writes: a Ctrl-C in the middle of a Rich print can leave that console
                    # buffering everything after it.
                    answer = chat.ask(question, on_token=(lambda text: typer.echo(text, nl=False)) if stream else None)
                except PulseEdgeError as exc:  # a full context, <image> in the question: the user can go on
                    err.print(f"Error: {exc}", markup=False)
                    continue
                except KeyboardInterrupt:
                    if not interactive:  # piped questions: Ctrl-C ends the run (exit 130)
                        raise
                    # Ctrl-C stops this answer only: it does not join the conversation (see Conversation.ask)
                    if stream:
                        out.print()
                    err.print("(answer stopped)", markup=False)
                    continue
                if as_json:
                    typer.echo(json.dumps({
                        "image": str(image), "page": pages[0].page, "file_sha256": pages[0].sha256,
                        "turn": len(chat.turns), "question": question, "answer": answer.text,
                        "tokens": answer.tokens, "stopped": answer.stopped, "model": reader.model_info(),
                        "generation": asdict(generation), "plan": chat.plan, "image_tokens": chat.image_tokens,
                        "timings": {**chat.timings, "prefill_s": answer.prefill_s, "generation_s": answer.generation_s},
                        "disclaimer": DISCLAIMER,
                    }, ensure_ascii=False))
                elif stream:
                    out.print()
                else:
                    typer.echo(answer.text)
    finally:
        reader.close()
