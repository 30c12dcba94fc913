"""``pulse-edge read`` end to end with the tiny model and the real llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pulse_edge.reader import DISCLAIMER
from tests import images
from tests.conftest import run_cli

DISCLAIMER_LINE = f"[{DISCLAIMER}]"


@pytest.fixture(scope="module")
def ecg_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("read") / "ECG café ü.png"
    images.scan("ecg00015.png").save(path)
    return path


def test_read_prints_the_answer_and_the_disclaimer_on_stdout_only(converted_tiny, ecg_png: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "6")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == DISCLAIMER_LINE
    assert lines[0].strip()  # the tiny random model's words: not checked, only that they arrived
    assert result.stderr == ""  # llama.cpp's loading chatter stays hidden without --verbose


def test_read_json_has_the_whole_record(converted_tiny, ecg_png: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "5", "--json",
                     "-q", "Is this normal?", "-q", "What is the heart rate?", "--seed", "7")
    assert result.code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert [a["question"] for a in record["answers"]] == ["Is this normal?", "What is the heart rate?"]
    assert all(a["tokens"] <= 5 for a in record["answers"])
    manifest = converted_tiny.manifest
    assert record["model"]["language_model_sha256"] == manifest.language_model().sha256
    assert record["model"]["mmproj_sha256"] == manifest.mmproj().sha256
    assert record["generation"] == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 7}
    assert record["plan"]["original_size"] == [999, 403]
    assert record["image_tokens"] == record["plan"]["tokens_flat"]
    assert record["disclaimer"] == DISCLAIMER
    assert record["page"] == 1 and record["kind"] == "image" and len(record["file_sha256"]) == 64
    assert set(record["timings"]) >= {"vision_s", "image_prefill_s"}


def test_read_picks_a_page_of_a_multi_page_tiff(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "two pages.tiff"
    first, second = images.synthetic(400, 300), images.synthetic(300, 700, seed=4)
    first.save(path, save_all=True, append_images=[second])
    result = run_cli("read", path, "--model", converted_tiny.folder, "--max-tokens", "2", "--json", "--page", "2")
    assert result.code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["page"] == 2 and record["plan"]["original_size"] == [300, 700]


def test_a_bad_file_among_good_ones_is_reported_and_the_rest_is_read(converted_tiny, ecg_png: Path,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run_cli("read", bad, ecg_png, "--model", converted_tiny.folder, "--max-tokens", "2")
    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"Error: {bad} is not an image (it looks like text); pass a PNG, JPEG, WebP, BMP, GIF, TIFF, PDF or DICOM file.",
        "Error: 1 of 2 inputs could not be read (see above).",
    ]
    assert result.stdout.splitlines()[0] == f"== {ecg_png}"
    assert result.stdout.splitlines()[-1] == DISCLAIMER_LINE


NO_MODEL = ("Error: No model given. Convert PULSE-7B on a connected machine ('pulse-edge convert PULSE-ECG/PULSE-7B "
            "--out DIR'), copy DIR here (e.g. on a USB stick) and import it with 'pulse-edge models import DIR' (or "
            "pass --model DIR to use it where it is).")


def test_without_a_model_read_says_how_to_get_one(ecg_png: Path) -> None:
    result = run_cli("read", ecg_png)
    assert (result.code, result.stdout, result.stderr.splitlines()) == (1, "", [NO_MODEL])


def test_the_default_question_and_report_are_worded_as_in_ecgbench(converted_tiny, ecg_png: Path) -> None:  # type: ignore[no-untyped-def]
    default = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "1", "--json")
    assert default.code == 0, default.stderr
    assert [a["question"] for a in json.loads(default.stdout)["answers"]] == [
        "Can you describe the features observed in this ECG, including the rhythm, waveforms, intervals, and any "
        "other notable findings?"]
    report = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "1", "--json", "-q", "Rate?",
                     "--report")
    assert report.code == 0, report.stderr
    assert [a["question"] for a in json.loads(report.stdout)["answers"]] == [
        "Rate?", "Please write a clinical report based on this ECG image."]


def test_ask_adds_presets_in_ecgbench_wording_after_the_own_questions(converted_tiny, ecg_png: Path) -> None:  # type: ignore[no-untyped-def]
    from pulse_edge.questions import PRESETS

    result = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "1", "--json", "-q", "Rate?",
                     "--ask", "rhythm", "--ask", "normal", "--report", "--ask", "rhythm")
    assert result.code == 0, result.stderr
    assert [a["question"] for a in json.loads(result.stdout)["answers"]] == [
        "Rate?", "What is the rhythm shown in this ECG?",
        "Classify the ECG as normal or abnormal. Provide NORM or ABNORMAL as the output.",
        PRESETS["report"].question]  # each preset once; --report is --ask report
    unknown = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--ask", "rythm")
    assert (unknown.code, unknown.stdout) == (1, "")
    assert unknown.stderr.strip() == ("Error: Unknown --ask 'rythm'; choose from interpretation, report, rhythm, "
                                      "normal, classes.")


def test_missing_file_and_usage_errors(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope.png"
    result = run_cli("read", missing, "--model", converted_tiny.folder)
    assert (result.code, result.stderr.strip()) == (1, f"Error: {missing}: no such file.")
    usage = run_cli("read", missing, "--max-tokens", "0")
    assert usage.code == 2
    assert "Invalid value for '--max-tokens'" in usage.stderr
    assert "Traceback" not in usage.stderr


def test_verbose_shows_llama_cpp_logs(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "small.png"
    Image.new("RGB", (200, 150), (255, 255, 255)).save(path)
    result = run_cli("--verbose", "read", path, "--model", converted_tiny.folder, "--max-tokens", "1")
    assert result.code == 0, result.stderr
    assert "llama_model_loader" in result.stderr or "llama_context" in result.stderr


@pytest.mark.parametrize(("quant", "kv_cache", "expected"), [
    ("F32", None, "f32"), ("F16", None, "f16"), ("Q8_0", None, "q8_0"), ("F32", "q8_0", "q8_0")])
def test_kv_cache_type_follows_the_weights_unless_chosen(converted_tiny, ecg_png: Path, quant: str,  # type: ignore[no-untyped-def]
                                                         kv_cache: str | None, expected: str) -> None:
    chosen = ("--kv-cache", kv_cache) if kv_cache else ()
    result = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--quant", quant, "--max-tokens", "2", "--json",
                     *chosen)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["kv_cache"] == expected


def test_an_unknown_kv_cache_type_is_refused(converted_tiny, ecg_png: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("read", ecg_png, "--model", converted_tiny.folder, "--kv-cache", "q4")
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr == "Error: KV cache type 'q4' is not one of auto, f32, f16, q8_0.\n"
