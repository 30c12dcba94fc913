"""Damaged and mismatched models: ``read`` refuses each with one ``Error:`` line that names the file and says
what to do, before loading anything; ``models verify`` finds the same problems."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from pulse_edge.manifest import MANIFEST_NAME, read_manifest, write_manifest
from tests import images
from tests.conftest import CliResult, run_cli


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad-models") / "ecg.png"
    images.synthetic(200, 120, 0).save(path)
    return path


@pytest.fixture
def usb(converted_tiny, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the converted tiny model (the session fixture is never touched)."""
    return Path(shutil.copytree(converted_tiny.folder, tmp_path / "usb" / "converted"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Another model: other weights and a language model twice as wide (512), converted to F16."""
    from convert.pipeline import convert
    from convert.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("wide")
    folder = write_checkpoint(root / "PULSE-tiny", shape="tiny-wide", seed=1, vision_tower_separate=root / "clip")
    return convert(str(folder), root / "gguf", quant=["F16"], vision_tower=root / "clip")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def files(folder: Path) -> tuple[Path, Path]:
    """The language model ``read`` loads by default, and the mmproj."""
    manifest = read_manifest(folder / MANIFEST_NAME)
    return folder / manifest.language_model().path, folder / manifest.mmproj().path


def damaged(file: Path) -> str:
    folder = file.parent
    return (f"Error: {file} does not match the SHA-256 in {folder / MANIFEST_NAME}: the file is damaged; run "
            f"'pulse-edge models verify {folder}' to check the other files, then copy the model again (or convert "
            "it again).")


def assert_refused(result: CliResult, line: str) -> None:
    assert (result.code, result.stdout, result.stderr.splitlines()) == (1, "", [line])


@pytest.mark.parametrize("offset", [3, 24, -100], ids=["magic", "header", "tensor-data"])
def test_a_damaged_language_model_of_the_right_size(usb: Path, image: Path, offset: int) -> None:
    lm, _ = files(usb)
    flip_byte(lm, offset)
    assert_refused(run_cli("read", image, "--model", usb, "--max-tokens", "1"), damaged(lm))


def test_a_file_read_once_is_checked_again_when_it_changes(usb: Path, image: Path) -> None:
    first = run_cli("read", image, "--model", usb, "--max-tokens", "1")
    assert first.code == 0, first.stderr  # hashed and remembered
    lm, _ = files(usb)
    flip_byte(lm, -100)
    assert_refused(run_cli("read", image, "--model", usb, "--max-tokens", "1"), damaged(lm))


def test_a_damaged_store_model_says_to_import_it_again(usb: Path, image: Path) -> None:
    assert run_cli("models", "import", usb).code == 0
    stored = Path(os.environ["PULSE_EDGE_HOME"]) / "models" / "pulse-tiny"
    lm, _ = files(stored)
    flip_byte(lm, -100)
    assert_refused(run_cli("read", image, "--max-tokens", "1"),  # the default model
                   f"Error: {lm} does not match the SHA-256 in {stored / MANIFEST_NAME}: the file is damaged; run "
                   "'pulse-edge models verify pulse-tiny' to check the other files, then import the model again with "
                   "'pulse-edge models import DIR --name pulse-tiny --force'.")


def test_a_truncated_language_model(usb: Path, image: Path) -> None:
    lm, _ = files(usb)
    size = lm.stat().st_size
    with lm.open("r+b") as handle:
        handle.truncate(size - 1000)
    assert_refused(run_cli("read", image, "--model", usb),
                   f"Error: {lm} has {size - 1000} bytes, its manifest says {size}: the copy is incomplete or damaged; "
                   "copy the model again.")


@pytest.mark.parametrize("offset", [24, -100], ids=["header", "tensor-data"])
def test_a_damaged_mmproj(usb: Path, image: Path, offset: int) -> None:
    _, mmproj = files(usb)
    flip_byte(mmproj, offset)
    assert_refused(run_cli("read", image, "--model", usb), damaged(mmproj))


def test_an_mmproj_from_another_model(usb: Path, image: Path, wide) -> None:  # type: ignore[no-untyped-def]
    lm, mmproj = files(usb)
    shutil.copyfile(wide.folder / mmproj.name, mmproj)
    # The manifest lists the foreign file with its own size and hash: only the pairing can tell.
    manifest = read_manifest(usb / MANIFEST_NAME)
    write_manifest(dataclasses.replace(manifest, files=tuple(
        wide.manifest.mmproj() if f.path == mmproj.name else f for f in manifest.files)), usb / MANIFEST_NAME)
    assert_refused(run_cli("read", image, "--model", usb),
                   f"Error: {lm} and {mmproj} come from different checkpoints (pulse.source.config_sha256, "
                   "pulse.source.tensor_index_sha256, pulse.source.weights_sample_sha256 differ): they do not belong "
                   "together; use the language model and mmproj written by the same 'pulse-edge convert' run.")


def test_two_gguf_paths_from_different_models(converted_tiny, wide) -> None:  # type: ignore[no-untyped-def]
    from pulse_edge.errors import ModelError
    from pulse_edge.model import from_paths

    lm, _ = files(converted_tiny.folder)
    _, mmproj = files(wide.folder)
    with pytest.raises(ModelError) as caught:
        from_paths(lm, mmproj)
    assert str(caught.value).startswith(f"{lm} and {mmproj} come from different checkpoints (")
    _, own = files(converted_tiny.folder)
    assert from_paths(lm, own).mmproj_sha256 == converted_tiny.manifest.mmproj().sha256


def test_without_the_hash_check_damage_still_ends_in_a_clean_error(usb: Path) -> None:
    """What reaches the loaders when nobody hashed the files (the library's fast path)."""
    from pulse_edge.errors import ModelError
    from pulse_edge.model import resolve
    from pulse_edge.reader import Reader

    lm, mmproj = files(usb)
    original = mmproj.read_bytes()
    flip_byte(mmproj, 20)  # the key-value count: the GGUF parser fails with an IndexError
    with pytest.raises(ModelError) as caught:
        Reader(resolve(usb))
    assert str(caught.value).startswith(f"{mmproj}: cannot read it as GGUF (IndexError: ")
    assert str(caught.value).endswith(f"check the model with 'pulse-edge models verify {usb}', then copy it again "
                                      "(or convert it again).")
    mmproj.write_bytes(original)
    flip_byte(lm, 3)
    with pytest.raises(ModelError) as caught:
        Reader(resolve(usb))
    assert str(caught.value) == (f"llama.cpp could not load {lm}: the file is damaged or is not a llama GGUF; check "
                                 f"the model with 'pulse-edge models verify {usb}', then copy it again (or convert "
                                 "it again).")


def test_verify_names_a_truncated_language_model_and_a_damaged_mmproj(usb: Path) -> None:
    lm, mmproj = files(usb)
    size = lm.stat().st_size
    with lm.open("r+b") as handle:
        handle.truncate(size - 1000)
    flip_byte(mmproj, -100)
    result = run_cli("models", "verify", usb)
    assert result.code == 1
    lines = result.stdout.splitlines()
    assert f"MISMATCH {lm.name}  ({size - 1000} bytes, manifest says {size})" in lines
    assert f"MISMATCH {mmproj.name}  (SHA-256 differs)" in lines
    # no pairing line: the truncated file's fingerprint cannot be read, which says nothing new
    assert lines[-1] == f"MISMATCH {mmproj.name}  (SHA-256 differs)"
    assert result.stderr.splitlines() == [
        f"Error: {lm} has {size - 1000} bytes, its manifest says {size}: the copy is incomplete or damaged; copy the "
        "model again. (1 more problem listed above.)"]
