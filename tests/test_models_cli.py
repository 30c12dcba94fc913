"""``pulse-edge models``: the local model store, end to end through the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pulse_edge.manifest import MANIFEST_NAME, read_manifest, write_manifest
from tests.conftest import run_cli

NAME = "pulse-tiny"
LM_FILES = ["pulse-tiny-F32.gguf", "pulse-tiny-F16.gguf", "pulse-tiny-Q8_0.gguf"]
MMPROJ = "pulse-tiny-mmproj-f16.gguf"
TODAY = time.strftime("%Y-%m-%d", time.gmtime())
PAIRING_OK = "language model and mmproj from the same checkpoint, config "


def store() -> Path:
    return Path(os.environ["PULSE_EDGE_HOME"]) / "models"


def config() -> dict[str, object]:
    return json.loads((Path(os.environ["PULSE_EDGE_HOME"]) / "config.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture
def usb(converted_tiny, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the converted tiny model, as if on a USB stick (the session fixture is never touched)."""
    return Path(shutil.copytree(converted_tiny.folder, tmp_path / "usb" / "converted"))


@pytest.fixture
def imported(usb: Path) -> Path:
    result = run_cli("models", "import", usb)
    assert result.code == 0, result.stderr
    return store() / NAME


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def size_text(folder: Path) -> str:
    return f"{sum(f.size for f in read_manifest(folder / MANIFEST_NAME).files) / 2**20:.1f} MiB"


def test_empty_store_says_how_to_get_a_model() -> None:
    for args in (("models", "list"), ("models", "list", "--json")):
        result = run_cli(*args)
        assert (result.code, result.stdout) == (0, "")
        assert result.stderr.strip() == (
            "No models in the store. Convert PULSE-7B on a connected machine ('pulse-edge convert "
            "PULSE-ECG/PULSE-7B --out DIR'), copy DIR here (e.g. on a USB stick) and import it with "
            "'pulse-edge models import DIR' (or pass --model DIR to use it where it is)."
        )


def test_import_copies_checks_and_becomes_the_default(usb: Path) -> None:
    result = run_cli("models", "import", usb)
    assert result.code == 0, result.stderr
    folder = store() / NAME
    assert result.stdout.splitlines() == [
        f"Imported {NAME} (F32, F16, Q8_0; {size_text(usb)} copied) to {folder}",
        f"{NAME} is now the default model.",
    ]
    assert result.stderr == ""  # no progress bar without a terminal
    for name in [*LM_FILES, MMPROJ]:
        assert not (folder / name).is_symlink()
        assert (folder / name).read_bytes() == (usb / name).read_bytes()
    assert config() == {"default_model": NAME}
    assert sorted(p.name for p in store().iterdir()) == [NAME]  # no temporary folder left
    stored = read_manifest(folder / MANIFEST_NAME)
    assert stored.files == read_manifest(usb / MANIFEST_NAME).files
    assert stored.extra["import"]["from"] == str(usb.resolve())

    listed = run_cli("models", "list")
    assert listed.code == 0
    assert listed.stdout.splitlines() == [
        "   NAME        QUANTS        SIZE      VERIFIED",
        f"*  {NAME}  F32,F16,Q8_0  {size_text(usb)}  verified {TODAY}",
    ]


def test_import_link_makes_links_and_rm_leaves_their_targets(usb: Path) -> None:
    result = run_cli("models", "import", usb, "--link", "--name", "tiny-linked", "--quant", "q8_0")
    assert result.code == 0, result.stderr
    folder = store() / "tiny-linked"
    for name in ("pulse-tiny-Q8_0.gguf", MMPROJ):
        assert (folder / name).is_symlink()
        assert (folder / name).resolve() == (usb / name).resolve()
    assert not (folder / MANIFEST_NAME).is_symlink()
    stored = read_manifest(folder / MANIFEST_NAME)
    assert [(f.path, f.quant) for f in stored.files] == [("pulse-tiny-Q8_0.gguf", "Q8_0"), (MMPROJ, "F16")]
    assert (stored.name, stored.default_quant) == ("tiny-linked", "Q8_0")

    row = json.loads(run_cli("models", "list", "--json").stdout)
    assert row["linked"] is True and row["quants"] == ["Q8_0"] and row["default"] is True

    removed = run_cli("models", "rm", "tiny-linked", "--yes")
    assert (removed.code, removed.stdout) == (0, "Removed tiny-linked.\n")
    assert not folder.exists()
    assert (usb / MMPROJ).is_file() and (usb / "pulse-tiny-Q8_0.gguf").is_file()


def test_import_refuses_an_altered_file_and_leaves_the_store_unchanged(usb: Path) -> None:
    flip_byte(usb / MMPROJ)
    result = run_cli("models", "import", usb)
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"Error: {usb / MMPROJ} does not match the SHA-256 in {usb / MANIFEST_NAME}: the file is damaged; copy the "
        "converted folder again (or convert the model again). Nothing was imported."
    ]
    assert not store().exists() or list(store().iterdir()) == []
    assert not (Path(os.environ["PULSE_EDGE_HOME"]) / "config.json").exists()


def test_import_refuses_a_language_model_and_mmproj_from_different_checkpoints(
    usb: Path, tmp_path: Path
) -> None:
    from convert.pipeline import convert
    from convert.synthetic import write_checkpoint

    # Another checkpoint (other weights, its own tower folder) whose mmproj has the same file name.
    other = write_checkpoint(tmp_path / "other" / "PULSE-tiny", shape="tiny", seed=1,
                             vision_tower_separate=tmp_path / "other" / "clip-seed1")
    converted = convert(str(other), tmp_path / "other-gguf", quant=["F32"], vision_tower=tmp_path / "other" / "clip-seed1")
    shutil.copyfile(converted.folder / MMPROJ, usb / MMPROJ)
    # A manifest with the right hashes, so only the pairing check can tell.
    manifest = read_manifest(usb / MANIFEST_NAME)
    swapped = dataclasses.replace(manifest, files=tuple(
        converted.manifest.mmproj() if f.path == MMPROJ else f for f in manifest.files))
    write_manifest(swapped, usb / MANIFEST_NAME)

    result = run_cli("models", "import", usb)
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"Error: {usb / LM_FILES[0]} and {usb / MMPROJ} come from different checkpoints "
        "(pulse.source.config_sha256, pulse.source.tensor_index_sha256, pulse.source.weights_sample_sha256 differ): "
        "they do not belong together; use the language model and mmproj written by the same 'pulse-edge convert' run."
    ]
    assert not store().exists() or list(store().iterdir()) == []

    # verify on the folder itself says the same, after one line per file.
    checked = run_cli("models", "verify", usb)
    assert checked.code == 1
    assert checked.stdout.splitlines() == [
        *(f"OK       {name}" for name in [*LM_FILES, MMPROJ]),
        f"MISMATCH pairing  ({LM_FILES[0]} and {MMPROJ} come from different checkpoints)",
    ]
    assert checked.stderr.splitlines() == result.stderr.splitlines()


def test_import_refuses_an_existing_name_without_force(imported: Path, usb: Path) -> None:
    before = (imported / MMPROJ).stat().st_ino
    result = run_cli("models", "import", usb)
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.strip() == (
        f"Error: A model named '{NAME}' is already in the store ({imported}); pass --force to replace it, "
        "or --name to import this one under another name."
    )
    assert (imported / MMPROJ).stat().st_ino == before
    forced = run_cli("models", "import", usb, "--force", "--quant", "F16")
    assert forced.code == 0, forced.stderr
    assert forced.stdout.splitlines() == [f"Imported {NAME} (F16; {size_text(imported)} copied) to {imported}"]
    assert sorted(p.name for p in imported.iterdir()) == sorted([MANIFEST_NAME, "verified.json",
                                                                 "pulse-tiny-F16.gguf", MMPROJ])
    assert sorted(p.name for p in store().iterdir()) == [NAME]


def test_import_rejects_bad_names_and_unknown_quants(usb: Path) -> None:
    bad = run_cli("models", "import", usb, "--name", "../evil")
    assert (bad.code, bad.stderr.strip()) == (1, "Error: Invalid model name '../evil': use up to 100 letters, "
                                                  "digits, '.', '_' and '-', starting with a letter or digit.")
    quant = run_cli("models", "import", usb, "--quant", "Q4_K_M")
    assert (quant.code, quant.stderr.strip()) == (
        1, f"Error: Model '{NAME}' has no Q4_K_M language model (it has: F32, F16, Q8_0).")
    assert not store().exists()


def test_verify_ok_is_recorded_for_list(imported: Path) -> None:
    (imported / "verified.json").unlink()
    assert run_cli("models", "list").stdout.splitlines()[1].endswith("  never")
    result = run_cli("models", "verify")  # the default model
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:-1] == [f"OK       {name}" for name in [*LM_FILES, MMPROJ]]
    assert lines[-1].startswith(f"OK       pairing  ({PAIRING_OK}")
    assert result.stderr == ""
    row = json.loads(run_cli("models", "list", "--json").stdout)
    assert row["verified"]["ok"] is True and row["verified"]["time"].startswith(TODAY)


def test_verify_mismatch_and_missing(imported: Path) -> None:
    flip_byte(imported / LM_FILES[1])
    (imported / LM_FILES[2]).unlink()
    result = run_cli("models", "verify", NAME)
    assert result.code == 1
    assert result.stdout.splitlines() == [
        f"OK       {LM_FILES[0]}",
        f"MISMATCH {LM_FILES[1]}  (SHA-256 differs)",
        f"MISSING  {LM_FILES[2]}",
        f"OK       {MMPROJ}",
    ]
    assert result.stderr.splitlines() == [
        f"Error: {imported / LM_FILES[1]} does not match the SHA-256 in {imported / MANIFEST_NAME}: the file is "
        f"damaged; import the model again with 'pulse-edge models import DIR --name {NAME} --force'. "
        "(1 more problem listed above.)"
    ]
    listed = run_cli("models", "list")
    assert listed.stdout.splitlines()[1].endswith(f"  FAILED {TODAY}")
    row = json.loads(run_cli("models", "list", "--json").stdout)
    assert row["verified"]["ok"] is False
    assert row["verified"]["problem"].startswith(f"{imported / LM_FILES[1]} does not match")

    as_json = run_cli("models", "verify", NAME, "--json")
    assert as_json.code == 1
    statuses = [(r["file"], r["status"]) for r in map(json.loads, as_json.stdout.splitlines())]
    assert statuses == [(LM_FILES[0], "OK"), (LM_FILES[1], "MISMATCH"), (LM_FILES[2], "MISSING"), (MMPROJ, "OK")]


def test_verify_a_missing_link_target(usb: Path) -> None:
    assert run_cli("models", "import", usb, "--link").code == 0
    (usb / MMPROJ).unlink()
    result = run_cli("models", "verify", NAME)
    assert result.code == 1
    assert result.stdout.splitlines()[-1] == f"MISSING  {MMPROJ}  (link to {usb.resolve() / MMPROJ})"
    assert result.stderr.splitlines() == [
        f"Error: {store() / NAME / MMPROJ} links to {usb.resolve() / MMPROJ}, which is gone; connect the drive "
        "that holds it, or import the model again without --link."
    ]


def test_verify_a_folder_outside_the_store(usb: Path) -> None:
    result = run_cli("models", "verify", usb)
    assert result.code == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["OK"] * 5
    assert not store().exists()  # nothing recorded, nothing created
    (usb / MMPROJ).unlink()
    missing = run_cli("models", "verify", usb)
    assert missing.code == 1
    assert missing.stdout.splitlines()[-1] == f"MISSING  {MMPROJ}"  # no pairing check without the file
    assert missing.stderr.strip() == (
        f"Error: {usb / MMPROJ} is missing (listed in {usb / MANIFEST_NAME}); copy the model again.")


def truncate(path: Path, by: int = 1000) -> tuple[int, int]:
    """Cut ``by`` bytes off the end of ``path``, as an interrupted copy would; returns (size now, size before)."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size - by)
    return size - by, size


def test_verify_a_truncated_file_reports_its_size_and_nothing_else(usb: Path) -> None:
    now, before = truncate(usb / LM_FILES[1])
    result = run_cli("models", "verify", usb)
    assert result.code == 1
    # No pairing line: a truncated file's fingerprint cannot be read, and that is not a second problem.
    assert result.stdout.splitlines() == [
        f"OK       {LM_FILES[0]}",
        f"MISMATCH {LM_FILES[1]}  ({now} bytes, manifest says {before})",
        f"OK       {LM_FILES[2]}",
        f"OK       {MMPROJ}",
    ]
    assert result.stderr.splitlines() == [
        f"Error: {usb / LM_FILES[1]} has {now} bytes, its manifest says {before}: the copy is incomplete or damaged; "
        "copy the model again."]


def test_a_truncated_store_file_says_to_import_the_model_again(imported: Path) -> None:
    from pulse_edge.errors import ManifestError
    from pulse_edge.model import resolve

    now, before = truncate(imported / MMPROJ)
    problem = (f"{imported / MMPROJ} has {now} bytes, its manifest says {before}: the copy is incomplete or damaged; "
               f"import the model again with 'pulse-edge models import DIR --name {NAME} --force'.")
    result = run_cli("models", "verify", NAME)
    assert result.code == 1
    assert result.stdout.splitlines()[-1] == f"MISMATCH {MMPROJ}  ({now} bytes, manifest says {before})"
    assert result.stderr.splitlines() == [f"Error: {problem}"]
    # What read, chat and batch say before loading it (their size check): the same advice.
    with pytest.raises(ManifestError) as caught:
        resolve(NAME, check_hashes=True)
    assert str(caught.value) == problem


def test_the_first_read_after_an_import_does_not_hash_again(usb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.model
    from pulse_edge.errors import ModelError
    from pulse_edge.model import resolve
    from pulse_edge.store import import_model

    import_model(usb)  # hashes every file while copying it
    hashed: list[Path] = []
    real = pulse_edge.model.sha256_file
    monkeypatch.setattr(pulse_edge.model, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    files = resolve(None, check_hashes=True)  # what read and batch do before loading
    assert (files.folder, hashed) == (store() / NAME, [])
    # The remembered copy is the file as imported: once it changes, it is hashed (and refused) again.
    flip_byte(files.language_model)
    with pytest.raises(ModelError, match="the file is damaged"):
        resolve(None, check_hashes=True)
    assert hashed == [files.language_model]


def test_verify_without_a_default_model_says_how_to_get_one() -> None:
    result = run_cli("models", "verify")
    assert result.code == 1
    assert result.stderr.strip().startswith("Error: No model given. Convert PULSE-7B on a connected machine")


def test_show_text_and_json(imported: Path, usb: Path) -> None:
    manifest = read_manifest(usb / MANIFEST_NAME)
    result = run_cli("models", "show", NAME)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:8] == [
        f"name                  {NAME} (default)",
        f"folder                {imported}",
        "quants                F32, F16, Q8_0 (default F32)",
        f"size                  {size_text(usb)}",
        f"verified              verified {TODAY}",
        "prompt template       llava_v1",
        f"converter             pulse-edge {manifest.converter_version}, {manifest.created}",
        "source                PULSE-tiny",
    ]
    assert f"  config_sha256       {manifest.source['config_sha256']}" in lines
    assert f"  tensor_index_sha256 {manifest.source['tensor_index_sha256']}" in lines
    mm = manifest.mmproj()
    assert lines[-2:] == [f"  {MMPROJ}", f"    mmproj F16, {mm.size} bytes, sha256 {mm.sha256}"]

    data = json.loads(run_cli("models", "show", NAME, "--json").stdout)
    assert (data["name"], data["folder"], data["default"]) == (NAME, str(imported), True)
    assert data["manifest"]["source"] == manifest.source
    assert data["manifest"]["prompt_template"] == "llava_v1"
    assert data["manifest"]["converter_version"] == manifest.converter_version
    assert [(f["path"], f["size"], f["sha256"], f["link"]) for f in data["manifest"]["files"]] == [
        (f.path, f.size, f.sha256, None) for f in manifest.files]
    assert all(hashlib.sha256((imported / f.path).read_bytes()).hexdigest() == f.sha256 for f in manifest.files)


def test_path_default_and_rm(imported: Path, usb: Path) -> None:
    assert run_cli("models", "path", NAME).stdout == f"{imported}\n"
    assert run_cli("models", "import", usb, "--name", "second", "--quant", "Q8_0").code == 0
    assert run_cli("models", "default").stdout == f"{NAME}\n"  # the first import stays the default
    switched = run_cli("models", "default", "second")
    assert (switched.code, switched.stdout) == (0, "second is now the default model.\n")
    assert config() == {"default_model": "second"}

    unknown = run_cli("models", "default", "nope")
    assert (unknown.code, unknown.stderr.strip()) == (1, (
        f"Error: No model named 'nope' in the store ({store()}; it has: {NAME}, second). See 'pulse-edge models "
        "list', or add one with 'pulse-edge models import DIR'."))
    assert run_cli("models", "path", "nope").code == 1

    refused = run_cli("models", "rm", "second", stdin=subprocess.DEVNULL)
    assert (refused.code, refused.stdout) == (1, "")
    assert refused.stderr.strip() == ("Error: Not removing second: cannot ask for confirmation (stdin is not a "
                                      "terminal); pass --yes to remove it.")
    assert (store() / "second").is_dir()

    removed = run_cli("models", "rm", "second", "--yes")
    assert (removed.code, removed.stdout) == (0, "Removed second.\n")
    assert removed.stderr.strip() == "second was the default model; set another with 'pulse-edge models default NAME'."
    assert config() == {}
    assert sorted(p.name for p in store().iterdir()) == [NAME]
    none = run_cli("models", "default")
    assert (none.code, none.stderr.strip()) == (1, (
        "Error: No default model is set; set one with 'pulse-edge models default NAME' (see 'pulse-edge models list')."))
    listed = run_cli("models", "list")
    assert listed.stdout.splitlines()[1].startswith(f"   {NAME}  ")  # no default marker


def test_model_name_and_default_resolve_to_the_store(imported: Path, usb: Path) -> None:
    from pulse_edge.errors import ManifestError, ModelError
    from pulse_edge.model import resolve

    by_name = resolve(NAME, "Q8_0")
    assert (by_name.folder, by_name.language_model, by_name.quant) == (imported, imported / LM_FILES[2], "Q8_0")
    assert by_name.mmproj == imported / MMPROJ
    default = resolve(None)
    assert (default.folder, default.quant) == (imported, "F32")
    assert resolve(usb).folder == usb  # a folder still wins over the store

    # Loading stays fast: only sizes are checked, so a same-size damaged file loads (verify finds it).
    flip_byte(imported / LM_FILES[0])
    assert resolve(NAME).language_model == imported / LM_FILES[0]
    (imported / LM_FILES[0]).write_bytes(b"short")
    with pytest.raises(ManifestError, match="the copy is incomplete or damaged"):
        resolve(NAME)

    assert run_cli("models", "rm", NAME, "--yes").code == 0
    with pytest.raises(ModelError, match=r"^No model given\. Convert PULSE-7B"):
        resolve(None)


def test_an_interrupted_import_leaves_nothing(usb: Path) -> None:
    from pulse_edge.store import import_model

    def interrupt_half_way(stage: str, done: int, total: int) -> None:
        if stage == "copy" and done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_model(usb, progress=interrupt_half_way)
    assert list(store().iterdir()) == []  # not even the hidden temporary folder
    assert not (Path(os.environ["PULSE_EDGE_HOME"]) / "config.json").exists()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_rm_asks_on_a_terminal(imported: Path) -> None:
    question = f"Remove {NAME} ({size_text(imported)}) from {imported}? [y/N] "
    for answer, code, stdout in (("n", 1, ""), ("y", 0, f"Removed {NAME}.\n")):
        master, slave = os.openpty()
        try:
            os.write(master, f"{answer}\n".encode())
            result = run_cli("models", "rm", NAME, stdin=slave)
        finally:
            os.close(master)
            os.close(slave)
        assert (result.code, result.stdout) == (code, stdout), result.stderr
        assert result.stderr.startswith(question)
        assert imported.exists() == (answer == "n")
