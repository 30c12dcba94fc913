"""Vision encoder speed at the real PULSE shape (CLIP ViT-L/14-336, 23 blocks, projector 1024 -> 4096 -> 4096).

    python benchmarks/vision_speed.py [--tiles 5] [--repeat 1] [--blocks 23] [--save]

Random float16 weights (as an f16 mmproj holds them) are built in memory; nothing is read from disk. Reports
the seconds ``VisionEncoder.encode`` takes for ``--tiles`` pieces (a landscape 12-lead page is 5: base image +
2x2 tiles), and the CPU that other processes used meanwhile (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulse_edge.image import ImageParams  # noqa: E402
from pulse_edge.vision import VisionConfig, VisionEncoder  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def random_encoder(blocks: int, seed: int = 0) -> VisionEncoder:
    config = VisionConfig(width=1024, heads=16, ffn=4096, blocks=blocks, image_size=336, patch=14, eps=1e-5,
                          activation="quick_gelu", output_width=4096)
    rng = np.random.default_rng(seed)
    d, f, h = config.width, config.ffn, config.output_width

    def w(*shape: int, std: float = 0.02) -> np.ndarray:
        """float16 values, as an f16 mmproj holds them; the encoder widens the matrices per use, as from a file."""
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float16)

    weights = {"v.class_embd": w(d), "v.patch_embd.weight": w(d, 3, 14, 14), "v.position_embd.weight": w(577, d),
               "v.pre_ln.weight": 1 + w(d), "v.pre_ln.bias": w(d),
               "mm.0.weight": w(h, d), "mm.0.bias": w(h), "mm.2.weight": w(h, h), "mm.2.bias": w(h),
               "v.image_newline": w(h)}
    for i in range(blocks):
        for name, shape in (("ln1", (d,)), ("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)),
                            ("attn_out", (d, d)), ("ln2", (d,)), ("ffn_up", (f, d)), ("ffn_down", (d, f))):
            weights[f"v.blk.{i}.{name}.weight"] = (1 + w(d)) if name.startswith("ln") else w(*shape)
            weights[f"v.blk.{i}.{name}.bias"] = w(shape[0])
    params = ImageParams(pinpoints=PINPOINTS, tile=336, patch=14, mean=CLIP_MEAN, std=CLIP_STD)
    return VisionEncoder(config, weights, params, source="random")


def busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=23)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/vision_speed.json")
    args = parser.parse_args()
    encoder = random_encoder(args.blocks)
    pixels = np.random.default_rng(1).standard_normal((args.tiles, 3, 336, 336), dtype=np.float32)
    runs = []
    for _ in range(args.repeat):
        busy, cpu, start = busy_seconds(), time.process_time(), time.perf_counter()
        out = encoder.encode(pixels)
        wall = time.perf_counter() - start
        own = time.process_time() - cpu
        others = max(busy_seconds() - busy - own, 0.0)
        runs.append({"wall_s": round(wall, 3), "cpu_s": round(own, 3), "others_cpu_s": round(others, 3)})
        sys.stderr.write(f"{args.tiles} tiles, {args.blocks} blocks: {wall:.2f} s (own CPU {own:.1f} s, "
                         f"other processes {others:.1f} s) -> {out.shape}\n")
    if args.save:
        from benchmarks.common import save

        save("vision_speed", {"tiles": args.tiles, "blocks": args.blocks, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
