"""``pulse-edge inspect``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from pulse_edge.cli.render import stdout
from pulse_edge.errors import PulseEdgeError
from pulse_edge.questions import DEFAULT_QUESTION


def inspect_command(
    image: Annotated[Path, typer.Argument(help="ECG image file.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model folder, manifest.json, or store name [default: the default model].")
    ] = None,
    question: Annotated[str, typer.Option("--question", "-q", help="Question to build the prompt with.")] = DEFAULT_QUESTION,
    save_embeddings: Annotated[
        Path | None, typer.Option(help="Save the image embeddings (rows in the language model's order) as .npy.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of text.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --save-embeddings.")] = False,
) -> None:
    """Show how PULSE sees an image: pinpoint, tiles, image tokens and the full prompt.

    Nothing is generated; only the vision encoder and the vocabulary are loaded.
    """
    import numpy as np

    from pulse_edge.inputs import load
    from pulse_edge.model import resolve
    from pulse_edge.prompt import check_questions
    from pulse_edge.reader import inspect

    check_questions([question])  # before the image is encoded (prompt building checks it again)
    if save_embeddings is not None and save_embeddings.exists() and not force:
        raise PulseEdgeError(f"{save_embeddings} already exists; pass --force to overwrite it.")
    files = resolve(model)
    # the same loader as read and batch, so inspect shows what they see (first page of a PDF/TIFF/DICOM)
    result = inspect(files, load(image, 1)[0].image, question)
    if save_embeddings is not None:
        descriptor = os.open(save_embeddings, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            np.save(handle, result.embeddings)
    plan = result.plan
    console = stdout()
    if as_json:
        data = {"image": str(image), "plan": plan, "merge_type": result.merge_type,
                "image_tokens": result.image_tokens, "prefix_tokens": result.prefix_tokens,
                "suffix_tokens": result.suffix_tokens, "prompt": result.prompt,
                "embeddings_file": str(save_embeddings) if save_embeddings else None}
        typer.echo(json.dumps(data))
        return
    (w, h), (pw, ph) = plan["original_size"], plan["pinpoint"]
    cols, rows = plan["grid"]
    console.print(f"image          {image} ({w} x {h})")
    console.print(f"pinpoint       {pw} x {ph} ({cols} x {rows} tiles of {plan['tile']})")
    rw, rh = plan["resized_size"]
    console.print(f"resized        {rw} x {rh}, pasted at {tuple(plan['offset'])} on black")
    console.print(f"base           whole image squashed to {plan['tile']} x {plan['tile']}")
    for index, box in enumerate(plan["boxes"], start=1):
        console.print(f"tile {index:<9} {tuple(box)}")
    console.print(f"image tokens   {result.image_tokens} ({result.merge_type})")
    total = result.prefix_tokens + result.image_tokens + result.suffix_tokens
    console.print(f"prompt tokens  {result.prefix_tokens} + {result.image_tokens} image + {result.suffix_tokens} = {total}")
    if save_embeddings is not None:
        console.print(f"embeddings     {save_embeddings} {list(result.embeddings.shape)} float32")
    console.print("prompt")
    typer.echo(result.prompt)
