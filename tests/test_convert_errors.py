"""Bad input to ``pulse-edge convert``: one clear ``Error:`` line, exit code 1, nothing left behind."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CliResult, run_cli


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "PULSE-tiny"))


def shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def assert_fails(result: CliResult, line: str, out: Path) -> None:
    assert result.code == 1, result
    assert result.stderr.strip().splitlines()[-1] == f"Error: {line}"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not out.exists() or sorted(os.listdir(out)) == []


def test_missing_shard(ckpt: Path, tmp_path: Path) -> None:
    shard = shard_of(ckpt, "lm_head.weight")
    shard.unlink()
    out = tmp_path / "out"
    assert_fails(run_cli("convert", ckpt, "--out", out), f"{shard} is missing: the checkpoint is incomplete; "
                 "download it again.", out)


def test_truncated_shard(ckpt: Path, tmp_path: Path) -> None:
    shard = shard_of(ckpt, "model.embed_tokens.weight")
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 100)
    out = tmp_path / "out"
    assert_fails(run_cli("convert", ckpt, "--out", out),
                 f"{shard} is truncated ({size - 100} bytes, its header needs {size}); download it again.", out)


def test_tensor_shape_disagrees_with_config(ckpt: Path, tmp_path: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    h, f = config["hidden_size"], config["intermediate_size"]
    edit_config(ckpt, intermediate_size=f + 32)
    name = "model.layers.0.mlp.gate_proj.weight"
    out = tmp_path / "out"
    assert_fails(run_cli("convert", ckpt, "--out", out),
                 f"{shard_of(ckpt, name)}: tensor {name} has shape [{f}, {h}] but config.json implies [{f + 32}, {h}]; "
                 "the weights and config.json do not belong together.", out)


def test_unknown_architecture(ckpt: Path, tmp_path: Path) -> None:
    edit_config(ckpt, architectures=["MistralForCausalLM"])
    out = tmp_path / "out"
    assert_fails(run_cli("convert", ckpt, "--out", out),
                 f"{ckpt / 'config.json'}: unknown architecture 'MistralForCausalLM'; pulse-edge converts "
                 "LlavaLlamaForCausalLM checkpoints (PULSE-7B, PULSE-7B-unfreeze-vit).", out)


def test_missing_tokenizer(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "tokenizer.model").unlink()
    out = tmp_path / "out"
    assert_fails(run_cli("convert", ckpt, "--out", out),
                 f"{ckpt / 'tokenizer.model'} is missing: PULSE checkpoints ship a SentencePiece tokenizer.model; "
                 "download it again.", out)


def test_missing_vision_tower_folder(tiny_separate: tuple[Path, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_separate[0], tmp_path / "PULSE-tiny-sep"))
    gone = tmp_path / "no-such-clip"
    edit_config(folder, mm_vision_tower=str(gone))
    out = tmp_path / "out"
    assert_fails(run_cli("convert", folder, "--out", out),
                 f"{folder / 'config.json'}: vision tower '{gone}' is not a local folder and not a known tower; "
                 "pass its folder with --vision-tower DIR.", out)


def test_known_tower_without_weights_anywhere(tiny_separate: tuple[Path, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_separate[0], tmp_path / "PULSE-tiny-sep"))
    edit_config(folder, mm_vision_tower="openai/clip-vit-large-patch14-336")
    out = tmp_path / "out"
    assert_fails(run_cli("convert", folder, "--out", out),
                 f"{folder} holds no vision tower weights (model.vision_tower.vision_tower.vision_model.*) and "
                 "'openai/clip-vit-large-patch14-336' is not on this machine; pass the CLIP folder with "
                 "--vision-tower DIR.", out)


def test_repo_id_missing_from_the_local_cache(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cache = tmp_path / "hf-home" / "hub"
    assert_fails(run_cli("convert", "PULSE-ECG/PULSE-7B", "--out", out),
                 f"PULSE-ECG/PULSE-7B is not a folder here and is not in the Hugging Face cache ({cache}). "
                 "On a connected machine run 'hf download PULSE-ECG/PULSE-7B' (or copy the repository folder), "
                 "then pass that folder or copy the cache here.", out)


def test_full_disk_leaves_nothing_behind(ckpt: Path, tiny_separate: tuple[Path, Path], tmp_path: Path) -> None:
    """A write that fails for lack of space (here a file-size limit, so no real disk is filled)."""
    out = tmp_path / "out"
    limit = 256 * 1024  # smaller than the tiny language model, larger than any header

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "pulse_edge", "convert", str(ckpt), "--out", str(out), "--quant", "F32",
               "--vision-tower", str(tiny_separate[1])]
    proc = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    result = CliResult(proc.returncode, proc.stdout, proc.stderr)
    assert result.code == 1, result
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: Not enough disk space to write the outputs in {out}: free at least "), line
    assert line.endswith(f"GiB in {out} and run again."), line
    assert sorted(os.listdir(out)) == []


def test_existing_output_is_not_overwritten_without_force(converted_tiny, tiny_checkpoint: Path,  # type: ignore[no-untyped-def]
                                                          tiny_separate: tuple[Path, Path]) -> None:
    manifest = converted_tiny.manifest_path
    before = manifest.read_bytes()
    result = run_cli("convert", tiny_checkpoint, "--out", converted_tiny.folder, "--quant", "F32",
                     "--vision-tower", tiny_separate[1])
    assert result.code == 1
    first = converted_tiny.folder / converted_tiny.manifest.language_model("F32").path
    assert result.stderr.strip().splitlines()[-1] == f"Error: {first} already exists; pass --force to overwrite it."
    assert manifest.read_bytes() == before


def test_unknown_quant_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_fails(run_cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q3_X"),
                 "Unknown --quant Q3_X; choose from F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0.", out)
