"""``pulse-edge doctor``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from pulse_edge.cli.render import stderr, stdout
from pulse_edge.errors import PulseEdgeError

if TYPE_CHECKING:
    from pulse_edge.doctor import Check, Report

_LABEL = {"ok": ("ok", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "bold red")}
_NAME_WIDTH = 12


def doctor_command(
    selftest: Annotated[bool, typer.Option("--selftest", help=(
        "Also prove the installation end to end (a few seconds, no model or network needed): build a tiny "
        "synthetic model, read pydicom's real 12-lead ECG with it through the same code as 'read', and compare "
        "the numbers with values computed by an independent PyTorch reference."))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of text.")] = False,
    expected: Annotated[Path | None, typer.Option(hidden=True, help="The selftest's known values (for tests).")] = None,
) -> None:
    """Check that this machine can read ECGs offline, and say what to do when it cannot.

    Shows the versions, what the installed llama.cpp build can use (CPU features, Metal, CUDA), cores,
    memory, free disk and the model store (the default model's files get the fast size check;
    'pulse-edge models verify' re-hashes them). Exits 1 when something 'read' needs is unusable. With
    --selftest the exit code says whether the software works, with or without a model installed.
    """
    from pulse_edge.doctor import doctor

    with _selftest_status(selftest and not as_json) as on_check:
        report = doctor(selftest=selftest, expected=expected, on_check=on_check)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        _render(stdout(), report)
    failures = report.failures
    if failures:
        names = ", ".join(dict.fromkeys(c.name for c in failures))
        raise PulseEdgeError(f"{len(failures)} check{'s' if len(failures) > 1 else ''} failed ({names}); see what "
                             "to do above.")


@contextlib.contextmanager
def _selftest_status(show: bool) -> Iterator[Callable[[Check], None] | None]:
    """A status line on stderr (terminal only) naming the selftest's last finished step."""
    console = stderr()
    if not show or not console.is_terminal:
        yield None
        return
    with console.status("Checking the installation...") as status:

        def on_check(check: Check) -> None:
            status.update(f"Selftest: {check.name} {check.status} ...")

        yield on_check


def _line(console: Console, check: Check, seconds: bool = False) -> None:
    label, style = _LABEL[check.status]
    text = Text.assemble((f"{label:<6}", style), f"{check.name:<{_NAME_WIDTH}}", check.detail)
    if seconds and check.seconds is not None:
        text.append(f" ({check.seconds:.2f} s)", style="dim")
    console.print(text)
    if check.status != "ok" and check.fix:
        console.print(Text.assemble(" " * 6, ("what to do: ", "bold"), check.fix))


def _render(console: Console, report: Report) -> None:
    versions = report.versions
    console.print(f"pulse-edge {versions['pulse-edge']} on {report.platform}, Python {report.python}", markup=False)
    console.print("  " + ", ".join(f"{name} {version or 'MISSING'}" for name, version in versions.items()
                                   if name != "pulse-edge"), markup=False)
    console.print(f"  model store: {report.store['folder']}", markup=False)
    console.print()
    for check in report.checks:
        _line(console, check)
    if report.selftest is not None:
        result = report.selftest
        console.print()
        console.print("Selftest: a tiny synthetic PULSE model reads pydicom's real 12-lead ECG; the numbers are "
                      "compared with an independent PyTorch reference.", markup=False)
        for check in result.checks:
            _line(console, check, seconds=True)
        verdict = "passed" if result.ok else "FAILED"
        console.print(f"Selftest {verdict} in {result.seconds:.1f} s.", markup=False)
    console.print()
    _summary(console, report)


def _summary(console: Console, report: Report) -> None:
    if report.failures:
        return  # the error line on stderr says it
    model = next(c for c in report.checks if c.name == "model")
    warnings = [c.name for c in report.checks if c.status == "warn" and c is not model]
    if model.status == "ok":
        verdict = "Ready to read ECGs offline."
    else:
        verdict = "The software works" + (" (selftest passed)" if report.selftest is not None else "") + \
            "; 'read' needs a model (see 'model' above)."
    console.print(verdict + (f" Warnings: {', '.join(warnings)}." if warnings else ""), markup=False)
