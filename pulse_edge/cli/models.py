"""``pulse-edge models``: the local model store."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from pulse_edge.cli.render import byte_progress, stderr, stdout
from pulse_edge.errors import PulseEdgeError

if TYPE_CHECKING:
    from pulse_edge.store import StoredModel

models_app = typer.Typer(
    help="Manage the local model store: import converted models once, then use them by name.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

NameArg = Annotated[str, typer.Argument(help="Name of a model in the store (see 'pulse-edge models list').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line instead of text.")]

_STATUS_STYLE = {"OK": "green", "MISMATCH": "bold red", "MISSING": "bold red"}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _verified(model: StoredModel) -> str:
    v = model.verification
    if v is None:
        return "never"
    return f"{'verified' if v.ok else 'FAILED'} {v.time[:10]}"


def _as_dict(model: StoredModel) -> dict[str, Any]:
    return {
        "name": model.name, "folder": str(model.folder), "default": model.is_default, "quants": model.quants,
        "default_quant": model.manifest.default_quant, "size": model.size, "linked": model.linked,
        "verified": dataclasses.asdict(model.verification) if model.verification else None,
    }


def _how_to_get_one() -> str:
    from pulse_edge.model import HOW_TO_GET_ONE

    return f"No models in the store. {HOW_TO_GET_ONE}"


@models_app.command("list")
def list_command(as_json: JsonOpt = False) -> None:
    """List the models in the store: quants, size, last verification; * marks the default."""
    from pulse_edge.store import list_models

    models = list_models()
    if not models:
        stderr().print(_how_to_get_one(), markup=False)
        return
    if as_json:
        for model in models:
            typer.echo(json.dumps(_as_dict(model)))
        return
    rows = [(" ", "NAME", "QUANTS", "SIZE", "VERIFIED")] + [
        ("*" if m.is_default else " ", m.name, ",".join(m.quants), _size(m.size) + (" linked" if m.linked else ""),
         _verified(m))
        for m in models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@models_app.command("show")
def show_command(name: NameArg, as_json: JsonOpt = False) -> None:
    """Show a store model's manifest: files, sizes, SHA-256, source fingerprint, prompt template."""
    from pulse_edge.store import get

    model = get(name)
    manifest = model.manifest
    files = [{**dataclasses.asdict(f), "link": _link(model.folder / f.path)} for f in manifest.files]
    if as_json:
        data = {**_as_dict(model), "manifest": {**dataclasses.asdict(manifest), "files": files}}
        typer.echo(json.dumps(data))
        return
    lines = [
        ("name", model.name + (" (default)" if model.is_default else "")),
        ("folder", str(model.folder)),
        ("quants", ", ".join(model.quants) + f" (default {manifest.default_quant})"),
        ("size", _size(model.size) + (" (linked)" if model.linked else "")),
        ("verified", _verified(model)),
        ("prompt template", manifest.prompt_template),
        ("converter", f"pulse-edge {manifest.converter_version}, {manifest.created}"),
        ("source", manifest.source.get("folder", "")),
        *((f"  {key}", value) for key, value in sorted(manifest.source.items()) if key != "folder"),
        *((key, str(value)) for key, value in sorted(manifest.extra.items()) if key != "import"),
    ]
    for key, value in lines:
        typer.echo(f"{key:<22}{value}")
    typer.echo("files")
    for item in files:
        link = f" -> {item['link']}" if item["link"] else ""
        typer.echo(f"  {item['path']}{link}")
        typer.echo(f"    {item['role']} {item['quant']}, {item['size']} bytes, sha256 {item['sha256']}")


def _link(path: Path) -> str | None:
    import os

    return os.readlink(path) if path.is_symlink() else None


@models_app.command("import")
def import_command(
    src: Annotated[Path, typer.Argument(help="Folder written by 'pulse-edge convert' (e.g. on a USB stick).")],
    name: Annotated[str | None, typer.Option(help="Store name [default: the manifest's name].")] = None,
    link: Annotated[bool, typer.Option("--link", help="Link to the files in SRC instead of copying them.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a store model of the same name.")] = False,
    quant: Annotated[
        list[str] | None, typer.Option("--quant", "-q", help="Import only this language model; repeat for several.")
    ] = None,
) -> None:
    """Import a converted model into the store, after checking the SHA-256 of every file.

    The language model and the mmproj must come from the same checkpoint. Nothing is written
    until every file has been checked, and a failed import leaves the store as it was. The first
    model imported becomes the default.
    """
    from pulse_edge.store import import_model

    with byte_progress() as progress:
        result = import_model(src, name=name, link=link, force=force, quant=quant or (), progress=progress)
    model = result.model
    how = "linked" if link else "copied"
    typer.echo(f"Imported {model.name} ({', '.join(model.quants)}; {_size(model.size)} {how}) to {model.folder}")
    if result.became_default:
        typer.echo(f"{model.name} is now the default model.")


@models_app.command("verify")
def verify_command(
    model: Annotated[
        str | None, typer.Argument(help="Store name, model folder or manifest.json [default: the default model].")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every file of a model against the SHA-256 in its manifest, and that they belong together.

    Prints OK, MISMATCH or MISSING for each file and exits 1 when any is not OK. The result of a
    store model is shown by 'pulse-edge models list'.
    """
    from pulse_edge.store import verify

    out = stdout()
    with byte_progress() as progress:
        for check in verify(model, progress):
            if as_json:
                typer.echo(json.dumps({"file": check.path, "status": check.status, "detail": check.detail}))
                continue
            line = Text(f"{check.status:<8}", style=_STATUS_STYLE[check.status])
            line.append(f" {check.path}" + (f"  ({check.detail})" if check.detail else ""))
            out.print(line)


@models_app.command("rm")
def rm_command(
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a model from the store (for a linked model, only the links)."""
    from pulse_edge.store import get, remove

    model = get(name)
    if not yes:
        if not sys.stdin.isatty():
            raise PulseEdgeError(f"Not removing {name}: cannot ask for confirmation (stdin is not a terminal); "
                                 "pass --yes to remove it.")
        what = "the links to its files" if model.linked else _size(model.size)
        if not _confirm(f"Remove {name} ({what}) from {model.folder}? [y/N] "):
            stderr().print("Nothing removed.", markup=False)
            # Not typer.Exit: the non-standalone app returns its code and main() would exit 0.
            sys.exit(1)
    remove(name)
    typer.echo(f"Removed {name}.")
    if model.is_default:
        stderr().print(f"{name} was the default model; set another with 'pulse-edge models default NAME'.",
                       markup=False)


def _confirm(question: str) -> bool:
    # Not typer.confirm: click writes the end of its prompt to stdout, which must carry answers only.
    stderr().print(question, end="", markup=False)
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


@models_app.command("path")
def path_command(name: NameArg) -> None:
    """Print the store folder of a model (for scripts)."""
    from pulse_edge.store import get

    typer.echo(str(get(name).folder))


@models_app.command("default")
def default_command(
    name: Annotated[str | None, typer.Argument(help="Model to make the default [default: show the default].")] = None,
) -> None:
    """Show the default model, the one used when --model is not given; with NAME, set it."""
    from pulse_edge.store import default_model, set_default

    if name is not None:
        set_default(name)
        typer.echo(f"{name} is now the default model.")
        return
    current = default_model()
    if current is None:
        raise PulseEdgeError("No default model is set; set one with 'pulse-edge models default NAME' "
                             "(see 'pulse-edge models list').")
    typer.echo(current)
