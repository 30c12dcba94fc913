"""Options shared by the commands that read ECGs (read, chat, batch): one definition, one help text."""

from __future__ import annotations

from typing import Annotated

import typer

Model = Annotated[str | None, typer.Option("--model", "-m", help="Model folder, manifest.json, or store name.")]
Quant = Annotated[str | None, typer.Option("--quant", help="Which of the model's quants [default: the manifest's].")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 answers greedily, as in PULSE's evaluation.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature).")]
Seed = Annotated[int, typer.Option(help="Sampling seed (with --temperature above 0).")]
Threads = Annotated[int | None, typer.Option(min=1, help="CPU threads [default: physical cores].")]
GpuLayers = Annotated[
    int | None, typer.Option("--gpu-layers", help="Layers to offload to the GPU [default: all, when built with one].")
]
KvCache = Annotated[
    str,
    typer.Option("--kv-cache", help="KV cache: auto (as precise as the weights: f32 for F32, f16 for F16/BF16, 8-bit "
                                    "keys for quantised ones), f32, f16, or q8_0 (8-bit keys, f16 values)."),
]
Ask = Annotated[
    list[str] | None,
    typer.Option("--ask", metavar="NAME", help="A question in PULSE's own ECGBench wording (repeat for several): "
                                               "interpretation, report, rhythm, normal (normal or abnormal), classes "
                                               "(CPSC's 9 classes); the wordings are in pulse_edge/questions.py."),
]
