"""The pulse-edge command line: the only place that prints, exits or imports typer/rich."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from pulse_edge import __version__
from pulse_edge.errors import PulseEdgeError

EXIT_ERROR, EXIT_USAGE, EXIT_BATCH_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130

app = typer.Typer(
    name="pulse-edge",
    help="Read ECG images offline with PULSE-7B through llama.cpp. Research use only: not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pulse-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs, llama.cpp's included.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)


def _register() -> None:
    from pulse_edge.cli import batch, chat, convert, doctor, inspect, models, read

    app.command(name="read")(read.read_command)
    app.command(name="chat")(chat.chat_command)
    app.command(name="batch")(batch.batch_command)
    app.command(name="inspect")(inspect.inspect_command)
    app.command(name="convert")(convert.convert_command)
    app.add_typer(models.models_app, name="models")
    app.command(name="doctor")(doctor.doctor_command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every outcome into an exit code (the one error boundary)."""
    debug = os.environ.get("PULSE_EDGE_DEBUG") == "1"
    try:
        # Without standalone mode typer returns the code of a typer.Exit (Ctrl-C included, as 130).
        code = app(args=argv, prog_name="pulse-edge", standalone_mode=False)
    except PulseEdgeError as exc:
        if debug:
            raise
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("Interrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        # typer vendors its own click: its usage and parameter errors are recognised by their interface.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if debug or show is None or exit_code is None:
            raise
        show()
        sys.exit(exit_code)
    if code == EXIT_INTERRUPTED:
        typer.echo("Interrupted.", err=True)
    sys.exit(code if isinstance(code, int) else 0)
