"""``pulse-edge batch`` from the outside: records, exit codes, resume after a crash, shards, CSV, file modes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

NOT_AN_IMAGE = "is not an image (it looks like text); pass a PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or DICOM file."
FAST = ("--max-tokens", "4")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _image(path: Path, seed: int) -> Path:
    images.synthetic(200, 120, seed).save(path)  # the smallest plan: 3 tiles, 1728 image tokens
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_folder_with_a_bad_file_then_resume_rereads_only_what_changed(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "archive"
    folder.mkdir()
    for seed, name in enumerate("abc"):
        _image(folder / f"{name}.png", seed)
    bad = folder / "bad.png"
    bad.write_text("not an ECG\n")
    out, table = tmp_path / "results.jsonl", tmp_path / "results.csv"
    model = converted_tiny.folder
    args = ("batch", folder, "--out", out, "--csv", table, "--model", model, *FAST, "-q", "Rate?", "-q", "Rhythm?")

    first = run_cli(*args)
    assert first.code == 3, first.stderr
    assert first.stdout == ""
    assert first.stderr.splitlines() == [f"Failed: {bad} {NOT_AN_IMAGE}", "3 read, 1 failed, 0 skipped (already done)"]
    records = _records(out)
    assert [(Path(r["path"]).name, r["page"], r["status"]) for r in records] == [
        ("a.png", 1, "ok"), ("b.png", 1, "ok"), ("bad.png", None, "error"), ("c.png", 1, "ok")]
    assert records[2] == {"path": str(bad), "page": None, "file_sha256": hashlib.sha256(b"not an ECG\n").hexdigest(),
                          "status": "error", "error": f"{bad} {NOT_AN_IMAGE}"}
    manifest = json.loads((model / "manifest.json").read_text())
    shas = {item["sha256"] for item in manifest["files"]}
    for record in (records[0], records[1], records[3]):
        assert record["file_sha256"] == hashlib.sha256(Path(record["path"]).read_bytes()).hexdigest()
        assert record["kind"] == "image"
        assert [(a["question"], a["tokens"], a["stopped"]) for a in record["answers"]] == [
            ("Rate?", 4, "max_tokens"), ("Rhythm?", 4, "max_tokens")]
        assert {record["model"]["language_model_sha256"], record["model"]["mmproj_sha256"]} <= shas
        assert record["parameters"] == {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0}
        assert record["image_tokens"] == 1728 and record["plan"]["grid"] == [1, 2]
        assert record["timings"]["total_s"] > 0
        assert record["disclaimer"].startswith("Research model output, not a medical device")
    assert _mode(out) == _mode(table) == 0o600  # patient data
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "page", "status", "Rate?", "Rhythm?", "error"]
    assert [row[:3] for row in rows[1:]] == [[r["path"], "" if r["page"] is None else str(r["page"]), r["status"]]
                                            for r in records]
    assert rows[1][3:5] == [a["answer"] for a in records[0]["answers"]] and rows[1][5] == ""
    assert rows[3][3:] == ["", "", f"{bad} {NOT_AN_IMAGE}"]

    # An existing output is never overwritten by accident.
    before = out.read_bytes()
    refused = run_cli(*args)
    assert refused.code == 1
    assert refused.stderr.strip() == f"Error: {out} already exists; pass --resume to continue it or --force to start over."
    assert out.read_bytes() == before

    # Resume: the failed file (now fixed) is retried; a.png was read with other parameters and b.png by another
    # model (as if an older run wrote them): both are read again; c.png is skipped.
    _image(bad, 3)
    records[0]["parameters"]["max_tokens"] = 8
    records[1]["model"]["language_model_sha256"] = "0" * 64
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    resumed = run_cli(*args, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert (resumed.stdout, resumed.stderr) == ("", "3 read, 0 failed, 1 skipped (already done)\n")
    added = _records(out)[4:]
    assert [(Path(r["path"]).name, r["status"]) for r in added] == [("a.png", "ok"), ("b.png", "ok"), ("bad.png", "ok")]
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert [(Path(row[0]).name, row[1], row[2], row[5]) for row in rows[1:]] == [
        ("a.png", "1", "ok", ""), ("b.png", "1", "ok", ""), ("bad.png", "1", "ok", ""), ("c.png", "1", "ok", "")]

    # Resume after completion: nothing to do, nothing written, the model not even loaded.
    before = out.read_bytes()
    again = run_cli(*args, "--resume")
    assert again.code == 0, again.stderr
    assert (again.stdout, again.stderr) == ("", "0 read, 0 failed, 4 skipped (already done)\n")
    assert out.read_bytes() == before

    # Another KV cache type is another setting: everything is read again, and recorded with it.
    other = run_cli(*args, "--resume", "--kv-cache", "q8_0")
    assert other.code == 0, other.stderr
    assert other.stderr == "4 read, 0 failed, 0 skipped (already done)\n"
    assert [r["model"]["kv_cache"] for r in _records(out)[-4:]] == ["q8_0"] * 4


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen[str], timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_bytes().count(b"\n")
            if lines >= count:
                return lines
        if proc.poll() is not None:
            raise AssertionError(f"the batch ended ({proc.returncode}) before writing {count} records: "
                                 f"{proc.communicate()[1]}")
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in {timeout} s")


def test_kill_9_and_ctrl_c_lose_at_most_the_page_in_flight(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "archive"
    folder.mkdir()
    names = [_image(folder / f"ecg{i}.png", i).name for i in range(4)]
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "pulse_edge", "batch", str(folder), "--out", str(out),
               "--model", str(converted_tiny.folder), *FAST]

    killed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = _wait_for_lines(out, 1, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert lines < 4, "the batch finished before it could be killed"
    with out.open("ab") as handle:  # what a kill in the middle of a write would leave
        handle.write(b'{"path": "' + str(folder).encode() + b'/ecg3.png", "page": 1, "file_sha')

    interrupted = subprocess.Popen([*command, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, lines + 1, interrupted)
    interrupted.send_signal(signal.SIGINT)
    stdout, stderr = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130, stderr
    assert stdout == ""
    assert re.fullmatch(rf"WARNING pulse_edge.batch: {re.escape(str(out))}: dropping an incomplete last record "
                        r"\(\d+ bytes\) left by an interrupted run", stderr.splitlines()[0]), stderr
    assert stderr.splitlines()[-1] == "Interrupted; every page read so far is saved: run again with --resume to continue."

    finished = run_cli(*command[3:], "--resume")
    assert finished.code == 0, finished.stderr
    records = _records(out)  # every line is whole JSON: the torn one was cut away
    assert sorted(Path(r["path"]).name for r in records) == names  # none lost, none read twice
    assert {r["status"] for r in records} == {"ok"}
    done = int(finished.stderr.split(" read, ")[0])
    assert finished.stderr.strip() == f"{done} read, 0 failed, {4 - done} skipped (already done)"


def test_shards_split_the_pages_and_together_cover_them(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scan = tmp_path / "scan.tif"
    first, second = images.synthetic(200, 120, 0), images.synthetic(200, 120, 1)
    first.save(scan, save_all=True, append_images=[second])
    bad = [tmp_path / "bad1.png", tmp_path / "bad2.png"]
    for path in bad:
        path.write_text("no")
    keys: dict[str, list[tuple[str, int | None]]] = {}
    for shard in ("1/2", "2/2"):
        out = tmp_path / f"shard{shard[0]}.jsonl"
        result = run_cli("batch", scan, *bad, "--out", out, "--shard", shard, "--model", converted_tiny.folder, *FAST)
        assert result.code == 3, result.stderr
        assert result.stderr.splitlines()[-1] == "1 read, 1 failed, 0 skipped (already done)"
        keys[shard] = [(Path(r["path"]).name, r["page"]) for r in _records(out)]
    # Sorted by path then page, every second item: each machine gets one bad file and one page of the TIFF.
    assert keys == {"1/2": [("bad1.png", None), ("scan.tif", 1)], "2/2": [("bad2.png", None), ("scan.tif", 2)]}
    assert [r.get("kind") for r in _records(tmp_path / "shard1.jsonl")] == [None, "tiff"]

    out = tmp_path / "page3.jsonl"
    beyond = run_cli("batch", scan, "--out", out, "--page", "3", "--model", converted_tiny.folder, *FAST)
    assert beyond.code == 3
    assert _records(out)[0]["error"] == f"{scan} has 2 pages; --page must be 1..2."


@pytest.mark.parametrize("value", ["0/2", "3/2", "2", "a/b"])
def test_a_bad_shard_is_a_usage_error(value: str, tmp_path: Path) -> None:
    result = run_cli("batch", tmp_path, "--out", tmp_path / "out.jsonl", "--shard", value)
    assert result.code == 2
    assert result.stderr.splitlines()[-1] == (f"Error: Invalid value for '--shard': {value!r} is not I/N with "
                                              "1 <= I <= N (e.g. 2/4 for the second of four machines).")
    assert not (tmp_path / "out.jsonl").exists()


def test_no_model_is_resolves_error_and_writes_nothing(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 0)
    out = tmp_path / "out.jsonl"
    result = run_cli("batch", tmp_path / "a.png", "--out", out)
    assert (result.code, result.stdout, result.stderr.splitlines()) == (1, "", [
        "Error: No model given. Convert PULSE-7B on a connected machine ('pulse-edge convert PULSE-ECG/PULSE-7B "
        "--out DIR'), copy DIR here (e.g. on a USB stick) and import it with 'pulse-edge models import DIR' (or "
        "pass --model DIR to use it where it is)."])
    assert not out.exists()


def test_a_missing_input_is_a_failed_item_and_resume_retries_it(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    present, missing = _image(tmp_path / "a.png", 0), tmp_path / "typo.png"
    out = tmp_path / "out.jsonl"
    args = ("batch", present, missing, "--out", out, "--model", converted_tiny.folder, *FAST)
    first = run_cli(*args)
    assert (first.code, first.stdout) == (3, "")
    assert first.stderr.splitlines() == [f"Failed: {missing}: no such file or folder.",
                                         "1 read, 1 failed, 0 skipped (already done)"]
    records = _records(out)
    assert [(r["path"], r["status"]) for r in records] == [(str(present), "ok"), (str(missing), "error")]
    assert records[1] == {"path": str(missing), "page": None, "status": "error",
                          "error": f"{missing}: no such file or folder."}

    # The error record is not "done": once the file is there, --resume reads it and skips the rest.
    _image(missing, 1)
    resumed = run_cli(*args, "--resume")
    assert (resumed.code, resumed.stderr) == (0, "1 read, 0 failed, 1 skipped (already done)\n")
    assert [(r["path"], r["page"], r["status"]) for r in _records(out)[2:]] == [(str(missing), 1, "ok")]


def test_a_missing_file_in_a_list_is_a_failed_item_that_names_its_line(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    present, missing = _image(tmp_path / "a.png", 0), tmp_path / "typo.png"
    listing, out, table = tmp_path / "ward-3.txt", tmp_path / "out.jsonl", tmp_path / "out.csv"
    listing.write_text("# morning\ntypo.png\na.png\n", encoding="utf-8")
    result = run_cli("batch", listing, "--out", out, "--csv", table, "--model", converted_tiny.folder, *FAST)
    error = f"{missing}: no such file or folder (line 2 of {listing}); correct that line or remove it."
    assert (result.code, result.stdout) == (3, "")
    assert result.stderr.splitlines() == [f"Failed: {error}", "1 read, 1 failed, 0 skipped (already done)"]
    records = _records(out)
    assert [(r["path"], r["status"]) for r in records] == [(str(present), "ok"), (str(missing), "error")]
    assert records[1] == {"path": str(missing), "page": None, "status": "error", "error": error}
    with table.open(newline="") as handle:
        assert list(csv.reader(handle))[2] == [str(missing), "", "error", "", error]


def test_no_existing_input_at_all_is_an_error(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.jsonl"
    one = run_cli("batch", tmp_path / "gone.png", "--out", out, "--model", converted_tiny.folder)
    assert (one.code, one.stdout, one.stderr.splitlines()) == (1, "", [f"Error: {tmp_path / 'gone.png'}: no such file "
                                                                        "or folder."])
    names = [tmp_path / f"gone{i}.png" for i in range(4)]
    several = run_cli("batch", *names, "--out", out, "--model", converted_tiny.folder)
    assert (several.code, several.stderr.splitlines()) == (1, [
        f"Error: None of the 4 inputs exists ({names[0]}, {names[1]}, {names[2]}, ...); check the paths."])
    assert not out.exists()


def test_csv_cells_that_look_like_formulas_open_as_text(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _image(tmp_path / "=HYPERLINK(1).png", 0)
    # Relative names, as typed in the folder: the CSV's path column starts with them.
    result = run_cli("batch", "=HYPERLINK(1).png", "@gone.png", "--out", "out.jsonl", "--csv", "out.csv",
                     "-q", "+1 or -1?", "--model", converted_tiny.folder, *FAST, cwd=tmp_path)
    assert result.code == 3, result.stderr
    records = _records(tmp_path / "out.jsonl")  # the JSONL keeps every value as it is
    assert [r["path"] for r in records] == ["=HYPERLINK(1).png", "@gone.png"]
    answer = records[0]["answers"][0]["answer"]  # the tiny model's words, escaped like any other cell
    answer_cell = "'" + answer if answer.startswith(("=", "+", "-", "@", "\t", "\r")) else answer
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["path", "page", "status", "'+1 or -1?", "error"],
        ["'=HYPERLINK(1).png", "1", "ok", answer_cell, ""],
        ["'@gone.png", "", "error", "", "'@gone.png: no such file or folder."],
    ]


def test_force_starts_over_with_a_private_file(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    out = tmp_path / "out.jsonl"
    out.write_text("old results\n")
    os.chmod(out, 0o644)
    result = run_cli("batch", bad, "--out", out, "--force", "--model", converted_tiny.folder, *FAST)
    assert result.code == 3
    assert [r["status"] for r in _records(out)] == ["error"]
    assert _mode(out) == 0o600
    both = run_cli("batch", bad, "--out", out, "--force", "--resume", "--model", converted_tiny.folder)
    assert (both.code, both.stderr.strip()) == (
        1, "Error: --resume continues an output and --force starts it over: pass only one of them.")


def test_ask_puts_the_preset_questions_after_the_own_ones(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pulse_edge.questions import PRESETS

    out = tmp_path / "out.jsonl"
    result = run_cli("batch", _image(tmp_path / "a.png", 0), "--out", out, "--model", converted_tiny.folder, *FAST,
                     "-q", "Rate?", "--ask", "report")
    assert result.code == 0, result.stderr
    (record,) = _records(out)
    assert [a["question"] for a in record["answers"]] == ["Rate?", PRESETS["report"].question]
