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



def test_the_python_example_runs_as_written(converted_tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The README's library example in a fresh Python (network blocked there too), with only the model name and
    the image path replaced by the tiny model and a real scan; it must not need typer or rich."""
    import json
    import subprocess
    import sys

    from pulse_edge.model import resolve
    from tests import images

    image = tmp_path / "ecg.png"
    images.scan("ecg00001.png").save(image)
    text = cli_reference.README.read_text(encoding="utf-8")
    block = re.search(r"## Use it from Python\n.*?```python\n(.*?)```", text, flags=re.S)
    assert block is not None
    code = block.group(1)
    assert code.count('"pulse-7b"') == 1 and code.count('"ecg.png"') == 1
    code = code.replace('"pulse-7b"', repr(str(converted_tiny.folder))).replace('"ecg.png"', repr(str(image)))
    code += ("\nimport json, sys\nprint('FACTS', json.dumps({'ui': sorted({'typer', 'rich'} & set(sys.modules)), "
             "'answers': [a.text for a in reading.answers], 'sha': reading.model['language_model_sha256']}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout.rsplit("FACTS ", 1)[1])
    assert facts["ui"] == [] and facts["sha"] == resolve(converted_tiny.folder).language_model_sha256
    first, second = facts["answers"]
    assert f"What is the rhythm? -> {first} (" in run.stdout and f"Is there ST elevation? -> {second} (" in run.stdout
    assert run.stdout.startswith(first + second)  # streamed as it was written, before the summary lines
