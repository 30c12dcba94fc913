"""Conversion benchmark: the 7B-shape synthetic checkpoint -> F16 and -> Q4_K_M, wall time and peak RSS.

    python benchmarks/convert_7b.py [--checkpoint DIR] [--work DIR] [--repeat N]

Each conversion runs as its own process (``pulse-edge convert``), so its peak RSS is measured alone.
Run it on a quiet machine: the CPU other processes used during each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, python, run_measured, save  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/pulse7b-synth"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/pulse7b-gguf"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quants", nargs="+", default=["F16", "Q4_K_M"])
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        subprocess.run([python(), "-m", "convert.synthetic", "--shape", "7b", str(args.checkpoint)], check=True)
    results: dict[str, dict[str, object]] = {}
    for quant in args.quants:
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(args.work, ignore_errors=True)
            run = run_measured([python(), "-m", "pulse_edge", "convert", str(args.checkpoint), "--out", str(args.work),
                                "--quant", quant])
            if run.returncode != 0:
                raise SystemExit(f"conversion to {quant} failed with exit code {run.returncode}")
            runs.append(run)
            sizes = {p.name: p.stat().st_size for p in args.work.glob("*.gguf")}
        results[quant] = {
            "wall_s_median": median([r.wall_s for r in runs]),
            "peak_rss_gib_median": median([r.peak_rss_gib for r in runs]),
            "others_cpu_s": [round(r.others_cpu_s, 1) for r in runs],
            "runs": [r.__dict__ for r in runs],
            "files": sizes,
        }
        print(quant, json.dumps(results[quant]["runs"]), flush=True)  # noqa: T201 - a benchmark's report
    shutil.rmtree(args.work, ignore_errors=True)
    path = save("convert_7b", {"checkpoint": str(args.checkpoint), "results": results})
    print(f"wrote {path}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
