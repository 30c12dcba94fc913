"""The selftest's known values are the independent reference's, and what it pins is deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pulse_edge import selftest
from tests import selftest_expected

# Keys compared exactly: hashes, the tile plan, token ids, greedy tokens (integers), and what made them.
EXACT = ("question", "seed", "checkpoint_sha256", "language_model_sha256", "page", "plan", "prompt", "greedy")


def _shipped() -> dict[str, Any]:
    return json.loads(selftest.EXPECTED_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.mark.slow
def test_the_shipped_known_values_are_what_the_reference_computes(tmp_path: Path) -> None:
    """Recomputed with PyTorch + transformers + llava-torch: equal, floats within the selftest's own tolerances
    (a newer torch may sum in another order; it must not move a value by more than the selftest allows)."""
    shipped, fresh = _shipped(), selftest_expected.compute(tmp_path)
    for key in EXACT:
        assert shipped[key] == fresh[key], f"{key} differs: run 'python -m tests.selftest_expected'"
    rows, fresh_rows = shipped["rows"], fresh["rows"]
    assert rows["width"] == fresh_rows["width"]
    np.testing.assert_allclose(rows["tile_norms"], fresh_rows["tile_norms"], rtol=selftest.ROWS_RTOL, atol=0)
    assert [r[0] for r in rows["rows"]] == [r[0] for r in fresh_rows["rows"]]
    np.testing.assert_allclose([r[1] for r in rows["rows"]], [r[1] for r in fresh_rows["rows"]],
                               rtol=selftest.ROWS_RTOL, atol=0)
    np.testing.assert_allclose([r[2] for r in rows["rows"]], [r[2] for r in fresh_rows["rows"]], rtol=0,
                               atol=selftest.ROWS_RTOL * fresh_rows["max_abs"])
    assert [t for t, _ in shipped["logits"]["top"]] == [t for t, _ in fresh["logits"]["top"]]
    np.testing.assert_allclose([v for _, v in shipped["logits"]["top"]], [v for _, v in fresh["logits"]["top"]],
                               rtol=0, atol=selftest.LOGITS_ATOL)
    # The checks must be able to fail: the values are not flat, and greedy decoding is long enough to compare.
    assert len(shipped["greedy"]) >= 16 and len(set(shipped["greedy"])) > 4
    # Float32 noise (~1e-5 at most) cannot change a greedy token: at every step the chosen logit leads by far more.
    assert shipped["greedy_min_gap"] == pytest.approx(fresh["greedy_min_gap"], abs=selftest.LOGITS_ATOL)
    assert shipped["greedy_min_gap"] > 0.1


def test_the_converted_language_model_has_the_same_bytes_wherever_it_is_made(tmp_path: Path) -> None:
    """The selftest pins the F32 GGUF's SHA-256, so conversion must be byte-deterministic: two runs in
    different folders give the shipped hash (and the checkpoint the shipped file hashes)."""
    hashes = []
    for run in ("first", "second run/with space"):
        work = tmp_path / run
        work.mkdir(parents=True)
        checkpoint, tower = selftest.build_checkpoint(work)
        assert selftest.checkpoint_hashes(checkpoint) == _shipped()["checkpoint_sha256"]
        hashes.append(selftest.convert_model(checkpoint, tower, work / "converted"))
    assert hashes == [_shipped()["language_model_sha256"]] * 2
