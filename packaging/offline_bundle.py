"""Build a folder that installs pulse-edge on a machine with no network: every wheel it needs, checksums, an installer.

    python packaging/offline_bundle.py OUT [--check]

Run it on a connected machine of the same kind as the offline one (operating system, CPU architecture, Python
minor version): llama-cpp-python has no wheel on PyPI and is compiled here, for this platform. For a GPU build set
llama-cpp-python's own ``CMAKE_ARGS`` first (``-DGGML_CUDA=on``, ``-DGGML_METAL=on``); the default build is for this
machine's CPU (``GGML_NATIVE``), so build on a CPU no newer than the target's, or set
``CMAKE_ARGS="-DGGML_NATIVE=off"`` for a portable one. ``--check`` then installs the bundle into a fresh virtual
environment with the package index switched off and runs ``pulse-edge doctor --selftest`` there.

OUT gets ``wheels/``, ``SHA256SUMS`` (of the wheels), ``bundle.json`` (what it was built for) and ``install.sh``.
Copy OUT to the offline machine and run ``sh install.sh [VENV]`` (Windows: see packaging/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pulse_edge.manifest import sha256_file  # noqa: E402 - the checkout's own, before pulse-edge is installed

INSTALL_SH = """#!/bin/sh
# Installs pulse-edge from the wheels beside this script; the package index is never contacted.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-"$here/venv"}
python=${PYTHON:-python3}
(cd "$here" && sha256sum -c --quiet SHA256SUMS)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-index --find-links "$here/wheels" pulse-edge
echo "Installed: $venv/bin/pulse-edge. Check it with: $venv/bin/pulse-edge doctor --selftest"
"""


def build(out: Path) -> list[Path]:
    """Wheels for pulse-edge and every runtime dependency, into ``out/wheels``."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--wheel-dir", str(wheels), str(ROOT)], check=True)
    return sorted(wheels.glob("*.whl"))


def write_bundle(out: Path, wheels: list[Path]) -> None:
    sums = "".join(f"{sha256_file(w)}  wheels/{w.name}\n" for w in wheels)
    (out / "SHA256SUMS").write_text(sums, encoding="utf-8")
    (out / "bundle.json").write_text(json.dumps({
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(), "system": platform.system(), "machine": platform.machine(),
        "wheels": [w.name for w in wheels],
    }, indent=2) + "\n", encoding="utf-8")
    script = out / "install.sh"
    script.write_text(INSTALL_SH, encoding="utf-8")
    script.chmod(0o755)


def check(out: Path) -> None:
    """Install from ``out`` with no package index into a fresh venv, then run the selftest there."""
    with tempfile.TemporaryDirectory(prefix="pulse-edge-bundle-check-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run(["sh", str(out / "install.sh"), str(venv)], check=True)
        pulse_edge = venv / "bin" / "pulse-edge"
        subprocess.run([str(pulse_edge), "doctor", "--selftest"], check=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": tmp, "PULSE_EDGE_HOME": str(Path(tmp) / "home")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the bundle folder to write (created)")
    parser.add_argument("--check", action="store_true", help="install it offline into a fresh venv and self-test")
    args = parser.parse_args()
    out = args.out.resolve()
    wheels = build(out)
    write_bundle(out, wheels)
    sys.stderr.write(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB in {out}\n")
    if args.check:
        check(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
