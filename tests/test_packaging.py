"""What an installed pulse-edge gets: the wheel built from the tracked files (packaging/README.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Built from a copy of the files git tracks (the build writes into its source folder), with no index."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    src = tmp_path_factory.mktemp("src")
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("pulse_edge-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_every_module_and_the_selftest_data_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    tracked = {str(p.relative_to(ROOT)) for pkg in ("pulse_edge", "convert") for p in (ROOT / pkg).rglob("*.py")}
    assert tracked <= names, sorted(tracked - names)
    # 'pulse-edge doctor --selftest' reads these from the installed package
    assert {"pulse_edge/selftest_data/tokenizer.model", "pulse_edge/selftest_data/expected.json"} <= names
    assert not [n for n in names if n.split("/")[0] in {"tests", "benchmarks", "packaging", "models"}]


def test_the_wheel_declares_the_command_and_the_pinned_dependencies(wheel: zipfile.ZipFile) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(info).decode()
    required = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert [r for r in required if "extra ==" not in r] == project["dependencies"]
    entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "pulse-edge = pulse_edge.cli:main" in entry_points
    assert "License-Expression: Apache-2.0" in metadata
