"""The selftest's known values, computed with the independent reference (tests only).

``python -m tests.selftest_expected`` writes ``pulse_edge/selftest_data/expected.json``;
``tests/test_selftest.py`` recomputes the values and checks the shipped file against them.

The numbers (tile plan, prompt token ids, image rows, first-token logits, greedy tokens) come from PyTorch +
transformers + llava-torch's own code (``tests/reference.py``, ``tests/reference_llava.py``) on the same
checkpoint and the same page; the runtime does not compute any of them. The SHA-256 pins (checkpoint files,
converted language model, page pixels) are of the selftest's own inputs: they say which step changed when a
number no longer matches.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge import selftest
from pulse_edge.inputs import load
from tests import reference, reference_llava

TILE_ROWS = (0, 287, 575)  # rows checked in each piece (576 rows each)
ROW_VALUES = 8  # leading values of each checked row
TOP_LOGITS = 8


def compute(work: Path) -> dict[str, Any]:
    """Build the selftest's checkpoint in ``work`` and compute every known value with the reference."""
    checkpoint, tower_config = selftest.build_checkpoint(work)
    lm_sha = selftest.convert_model(checkpoint, tower_config, work / "converted")
    # The reference's CLIPVisionModel loads a tower folder: the same tower values, written separately.
    clip = work / "clip-tower"
    from convert.synthetic import write_checkpoint

    write_checkpoint(work / "tower-source", shape="tiny", seed=selftest.SEED, tokenizer=selftest.TOKENIZER_PATH,
                     vision_tower_separate=clip)

    (page,) = load(selftest.ecg_file())
    image = page.image
    ref = reference_llava.llava_inputs(checkpoint, clip, image, selftest.QUESTION)
    config = json.loads((checkpoint / "config.json").read_text())
    pinpoints = config["image_grid_pinpoints"]
    pinpoint = list(reference.llava_mm_utils().select_best_resolution(image.size, pinpoints))
    vision = json.loads((clip / "config.json").read_text())["vision_config"]
    tile = int(vision["image_size"])
    patches = (tile // int(vision["patch_size"])) ** 2
    rows = ref.image_rows.double().numpy()
    pieces = rows.reshape(-1, patches, rows.shape[1])  # flat merge: the whole page, then the tiles
    at = ref.ids.index(reference_llava.IMAGE_TOKEN_INDEX)
    logits = reference_llava.logits(checkpoint, ref.embeds).double().numpy()
    top = np.argsort(-logits)[:TOP_LOGITS]
    greedy = reference_llava.greedy(checkpoint, ref.embeds, selftest.MAX_TOKENS)
    gaps = greedy_gaps(checkpoint, ref.embeds, greedy)
    return {
        "about": "Known values for 'pulse-edge doctor --selftest', computed by tests/selftest_expected.py with the "
                 "PyTorch/transformers/llava-torch reference; regenerate with 'python -m tests.selftest_expected'.",
        "made_with": {name: importlib.metadata.version(name)
                      for name in ("torch", "transformers", "llava-torch", "numpy", "pillow", "pydicom", "gguf")},
        "seed": selftest.SEED,
        "question": selftest.QUESTION,
        "checkpoint_sha256": selftest.checkpoint_hashes(checkpoint),
        "language_model_sha256": lm_sha,
        "page": {"size": list(image.size), "pixels_sha256": selftest.pixels_sha256(image)},
        "plan": {"original_size": list(image.size), "pinpoint": pinpoint,
                 "grid": [pinpoint[0] // tile, pinpoint[1] // tile], "image_tokens": int(rows.shape[0])},
        "prompt": {"prefix_ids": ref.ids[:at], "suffix_ids": ref.ids[at + 1:]},
        "rows": {
            "width": int(rows.shape[1]),
            "max_abs": float(np.abs(rows).max()),
            "tile_norms": [float(np.linalg.norm(piece)) for piece in pieces],
            "rows": [[k * patches + r, float(np.linalg.norm(rows[k * patches + r])),
                      rows[k * patches + r, :ROW_VALUES].tolist()] for k in range(len(pieces)) for r in TILE_ROWS],
        },
        "logits": {"top": [[int(t), float(logits[t])] for t in top]},
        "greedy": greedy,
        "greedy_min_gap": min(gaps),
    }


def greedy_gaps(checkpoint: Path, embeds: Any, tokens: list[int]) -> list[float]:
    """At each greedy step, how far the chosen token's logit is above the runner-up's (what float noise must
    overcome to change the answer)."""
    import torch

    table = reference_llava.embed_tokens(checkpoint)
    gaps, current = [], embeds
    for token in tokens:
        top2 = torch.topk(reference_llava.logits(checkpoint, current), 2).values
        gaps.append(float(top2[0] - top2[1]))
        current = torch.cat([current, table[token][None]])
    return gaps


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="selftest-expected-") as tmp:
        values = compute(Path(tmp))
    selftest.EXPECTED_PATH.write_text(json.dumps(values, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {selftest.EXPECTED_PATH}: {len(values['greedy'])} greedy tokens")  # noqa: T201


if __name__ == "__main__":
    main()
