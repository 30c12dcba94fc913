"""The README keeps a newcomer's path and a CLI reference that is exactly what the CLI prints."""

from __future__ import annotations

import re

from tests import cli_reference


def test_cli_reference_equals_every_commands_help() -> None:
    text = cli_reference.README.read_text(encoding="utf-8")
    section = cli_reference.readme_section(text)
    assert section, "README.md lacks the CLI reference markers"
    assert section == cli_reference.render(), "README's CLI reference is stale: run python -m tests.cli_reference --write"


def test_reference_covers_every_command() -> None:
    section = cli_reference.readme_section(cli_reference.README.read_text(encoding="utf-8"))
    documented = set(re.findall(r"^### `pulse-edge ?([a-z -]*)`$", section, flags=re.M))
    assert {"", "read", "chat", "batch", "inspect", "convert", "doctor", "models", "models import",
            "models verify", "models list"} <= documented


def test_readme_starts_with_install_then_test_commands() -> None:
    text = cli_reference.README.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block is not None
    lines = block.group(1).splitlines()
    assert lines[0].startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[test]'")
    assert lines[1].endswith(".venv/bin/python -m pytest")
    ci = (cli_reference.README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert lines[0] in ci and lines[1] in ci  # CI runs exactly the README's commands
