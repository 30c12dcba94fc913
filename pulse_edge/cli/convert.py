"""``pulse-edge convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pulse_edge.cli.render import byte_progress, stdout


def convert_command(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, or a repo id such as PULSE-ECG/PULSE-7B found in "
                                             "the local Hugging Face cache (never downloaded).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the GGUF files and manifest.json.")],
    quant: Annotated[
        list[str] | None,
        typer.Option("--quant", "-q", help="Language-model type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0. "
                                           "Repeat for several; the first is the default. [default: Q4_K_M]"),
    ] = None,
    vision_tower: Annotated[
        Path | None, typer.Option(help="CLIP vision-tower folder, when the checkpoint does not hold the tower.")
    ] = None,
    keep_f16: Annotated[bool, typer.Option("--keep-f16", help="Keep the F16 intermediate as a model too.")] = False,
    mmproj_type: Annotated[str, typer.Option(help="mmproj tensor type: f32, f16 or q8_0.")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    threads: Annotated[int | None, typer.Option(help="Quantisation threads [default: all cores].")] = None,
) -> None:
    """Convert a PULSE-7B Hugging Face checkpoint to GGUF files llama.cpp can run, offline.

    Writes the language model (quantised), the vision projector (mmproj) and manifest.json with
    every file's size and SHA-256. Needs no network and no PyTorch.
    """
    from convert.pipeline import DEFAULT_QUANT, convert

    with byte_progress() as progress:
        result = convert(
            src, out, quant=quant or [DEFAULT_QUANT], vision_tower=vision_tower, keep_f16=keep_f16,
            mmproj_type=mmproj_type, force=force, threads=threads, progress=progress,
        )
    console = stdout()
    console.print(f"Wrote {result.manifest_path}")
    for item in result.manifest.files:
        console.print(f"  {item.path}  {item.quant}  {item.size / 2**20:.1f} MiB  sha256 {item.sha256[:16]}")
