"""Shared fixtures: tiny PULSE-layout checkpoints, their conversions, and a sealed environment.

Every test runs with the user folder in ``tmp_path``, ``NO_COLOR=1``, and network connections
refused, in this process and in every Python process a test starts (``tests/netblock``).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NETBLOCK = Path(__file__).parent / "netblock"
runpy.run_path(str(NETBLOCK / "sitecustomize.py"))


@pytest.fixture(autouse=True)
def sealed_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PULSE_EDGE_HOME", str(tmp_path / "pulse-edge-home"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("PULSE_EDGE_DEBUG", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NETBLOCK), os.environ.get("PYTHONPATH")])))
    yield


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, env: dict[str, str] | None = None, **kwargs: object) -> CliResult:
    """Run ``pulse-edge`` in a fresh process (network blocked there too)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pulse_edge", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600, **kwargs,  # type: ignore[call-overload]
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in PULSE-7B's layout, vision tower inside, ``flat`` merge."""
    from convert.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "PULSE-tiny", shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_separate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same weights with the tower only in a separate CLIP folder, ``spatial_unpad`` merge."""
    from convert.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("ckpt-separate")
    tower = root / "clip-vit-tiny-336"
    folder = write_checkpoint(root / "PULSE-tiny-sep", shape="tiny", seed=0, vision_tower_separate=tower,
                              merge="spatial_unpad")
    return folder, tower


@pytest.fixture(scope="session")
def converted_tiny(tiny_checkpoint: Path, tiny_separate: tuple[Path, Path],  # type: ignore[no-untyped-def]
                   tmp_path_factory: pytest.TempPathFactory):
    """The tiny checkpoint converted to F32, F16 and Q8_0 in one run (one F16 intermediate).

    The tower's weights come from inside the checkpoint; its config from the tiny CLIP folder.
    """
    from convert.pipeline import convert

    return convert(str(tiny_checkpoint), tmp_path_factory.mktemp("gguf"), quant=["F32", "F16", "Q8_0"],
                   vision_tower=tiny_separate[1])


@pytest.fixture(scope="session")
def converted_separate(tiny_separate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from convert.pipeline import convert

    folder, tower = tiny_separate
    return convert(str(folder), tmp_path_factory.mktemp("gguf-sep"), quant=["Q4_K_M", "F32"], vision_tower=tower,
                   mmproj_type="f32")
