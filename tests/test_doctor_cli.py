"""``pulse-edge doctor [--selftest]`` end to end: what it prints, its exit codes, and what it catches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pulse_edge import doctor
from pulse_edge.model import HOW_TO_GET_ONE
from pulse_edge.selftest import EXPECTED_PATH, LOGITS_ATOL, ROWS_RTOL
from tests.conftest import run_cli

NAME = "pulse-tiny"
ENVIRONMENT_CHECKS = ["llama.cpp", "packages", "cpu", "memory", "disk", "model"]
SELFTEST_CHECKS = ["checkpoint", "convert", "input", "load", "read", "tile plan", "prompt", "image rows", "logits",
                   "answer"]
# The test-only reference stack: the selftest must work without any of it.
TEST_ONLY = ("torch", "transformers", "sentencepiece", "safetensors", "tokenizers", "llava", "huggingface_hub")


def checks(stdout: str) -> dict[str, tuple[str, str]]:
    """``name -> (status, detail)`` from doctor's check lines (status in 6 columns, name in 12)."""
    found = {}
    for line in stdout.splitlines():
        status = line[:6].strip()
        if status in ("ok", "warn", "FAIL") and line[6:7] != " ":
            found[line[6:18].strip()] = (status, line[18:])
    return found


def what_to_do(stdout: str, name: str) -> str:
    """The 'what to do' line under the check called ``name``."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line[6:18].strip() == name)
    assert lines[at + 1].startswith("      what to do: "), lines[at + 1]
    return lines[at + 1].removeprefix("      what to do: ")


@pytest.fixture
def imported(converted_tiny, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The tiny model imported into this test's store (a copy: the session fixture is never touched)."""
    usb = Path(shutil.copytree(converted_tiny.folder, tmp_path / "usb" / "converted"))
    result = run_cli("models", "import", usb)
    assert result.code == 0, result.stderr
    return Path(os.environ["PULSE_EDGE_HOME"]) / "models" / NAME


def test_without_a_model_doctor_exits_1_and_says_how_to_get_one() -> None:
    result = run_cli("doctor")
    assert result.code == 1
    assert result.stderr == "Error: 1 check failed (model); see what to do above.\n"
    found = checks(result.stdout)
    assert list(found) == ENVIRONMENT_CHECKS
    assert found["model"][0] == "FAIL"
    assert found["model"][1].startswith("no model in the store (")
    assert what_to_do(result.stdout, "model") == HOW_TO_GET_ONE
    assert found["llama.cpp"][0] in ("ok", "warn") and found["llama.cpp"][1].startswith("loads; CPU: ")
    assert found["packages"][0] == "ok"
    # the versions come first; no colour codes when stdout is not a terminal
    assert result.stdout.startswith("pulse-edge 0.1.0 on ")
    assert "llama-cpp-python 0.3.36, gguf 0.19.0" in result.stdout.splitlines()[1]
    assert "\x1b[" not in result.stdout and "Traceback" not in result.stderr


def test_with_a_model_doctor_is_ready_and_llama_cpp_stays_quiet(imported: Path) -> None:
    result = run_cli("doctor")
    assert result.code == 0, result.stdout + result.stderr
    assert result.stderr == ""  # llama.cpp opened the model without a word
    found = checks(result.stdout)
    status, detail = found["model"]
    assert status == "ok"
    assert detail.startswith(f"{NAME} (default; F32/F16/Q8_0, 12 MiB, 2 layers x 256): its files have the manifest's "
                             "sizes and llama.cpp opens it, last full check ")
    assert detail.endswith(" passed; 'pulse-edge models verify' re-hashes them")
    # the memory estimate is the model's own: its files, a 2-layer 256-wide f16 KV cache at 4,096 positions
    assert f"reading with {NAME} F32 takes up to 0.5 GiB (files 7 MiB, KV cache at 4,096 positions 8 MiB, " \
           "working 0.5 GiB)" in found["memory"][1]
    assert result.stdout.splitlines()[-1].startswith("Ready to read ECGs offline.")


def test_verbose_shows_llama_cpp_opening_the_model(imported: Path) -> None:
    result = run_cli("--verbose", "doctor")
    assert result.code == 0
    assert "llama_model_loader" in result.stderr


def test_a_truncated_model_file_fails_with_what_to_do(imported: Path) -> None:
    mmproj = next(imported.glob("*mmproj*.gguf"))
    size = mmproj.stat().st_size
    with open(mmproj, "r+b") as handle:
        handle.truncate(size - 1000)
    result = run_cli("doctor")
    assert result.code == 1
    status, detail = checks(result.stdout)["model"]
    assert status == "FAIL"
    assert detail == (f"{NAME} (default): {mmproj} has {size - 1000} bytes, its manifest says {size}: the copy is "
                      f"incomplete or damaged; import the model again with 'pulse-edge models import DIR --name {NAME} "
                      "--force'.")
    assert what_to_do(result.stdout, "model") == (
        f"Check it with 'pulse-edge models verify {NAME}', then import the model again with 'pulse-edge models import DIR "
        f"--name {NAME} --force'.")


def test_a_model_that_failed_its_full_check_fails_doctor(imported: Path) -> None:
    # A flipped byte keeps the size: only the full check ('models verify') sees it, and doctor reports its result.
    lm = imported / f"{NAME}-F16.gguf"
    data = bytearray(lm.read_bytes())
    data[-100] ^= 0xFF
    lm.write_bytes(bytes(data))
    assert run_cli("models", "verify").code == 1
    result = run_cli("doctor")
    assert result.code == 1
    status, detail = checks(result.stdout)["model"]
    assert status == "FAIL" and detail.startswith(f"{NAME} (default): its last full check (")
    assert detail.endswith(") found it damaged")
    assert what_to_do(result.stdout, "model").startswith(f"Run 'pulse-edge models verify {NAME}' to see which file")


def test_json_is_one_object_with_every_fact(imported: Path) -> None:
    result = run_cli("doctor", "--json")
    assert result.code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    report = json.loads(line)
    assert report["ok"] is True and report["selftest"] is None
    assert [c["name"] for c in report["checks"]] == ENVIRONMENT_CHECKS
    assert set(report["checks"][0]) == {"name", "status", "detail", "fix", "seconds"}
    assert report["versions"]["llama-cpp-python"] == "0.3.36" and report["versions"]["pulse-edge"] == "0.1.0"
    llama = report["llama_cpp"]
    assert llama["loaded"] is True and "CPU" in llama["backends"] and isinstance(llama["gpu_offload"], bool)
    assert llama["system_info"].startswith("CPU : ")
    assert report["cores"]["physical"] >= 1 and report["cores"]["logical"] >= report["cores"]["physical"]
    assert report["memory"]["total"] > report["memory"]["available"] > 0
    assert report["disk"]["free"] > 0
    assert report["store"]["default"] == NAME
    (model,) = report["store"]["models"]
    assert (model["name"], model["files_ok"], model["verified_ok"]) == (NAME, True, True)


def test_json_without_a_model_says_not_ok_and_exits_1() -> None:
    result = run_cli("doctor", "--json")
    assert result.code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    model = next(c for c in report["checks"] if c["name"] == "model")
    assert (model["status"], model["fix"]) == ("fail", HOW_TO_GET_ONE)
    assert result.stderr == "Error: 1 check failed (model); see what to do above.\n"


# -- the selftest ----------------------------------------------------------------------------------------


def test_selftest_passes_without_a_model_or_the_test_only_packages(tmp_path: Path) -> None:
    """The runtime's dependencies only: torch, transformers, sentencepiece & co. cannot be imported here."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in TEST_ONLY)
    code = f"import sys; {block}; from pulse_edge.cli import main; main(['doctor', '--selftest'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    found = checks(proc.stdout)
    assert list(found) == ENVIRONMENT_CHECKS + SELFTEST_CHECKS
    assert found["model"][0] == "warn"  # no model: 'read' needs one, but the software is proven
    assert all(found[name][0] == "ok" for name in SELFTEST_CHECKS), proc.stdout
    assert found["tile plan"][1] == ("2200 x 1700 page -> pinpoint 672 x 672, 2 x 2 tiles + the whole page: 2880 "
                                     "image tokens, as LLaVA's code gives")
    assert found["image rows"][1].startswith(f"5 tile norms and 15 rows equal the reference's within {ROWS_RTOL:g}")
    assert found["logits"][1].startswith(f"the first token's 8 highest logits equal the reference's within "
                                         f"{LOGITS_ATOL:g}")
    assert found["answer"][1] == "the 24 greedy tokens equal the reference's"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("Selftest passed in ") for line in lines)
    assert lines[-1] == "The software works (selftest passed); 'read' needs a model (see 'model' above)."
    assert list(temp.iterdir()) == []  # the temporary model is gone


def _tampered(tmp_path: Path, change: Any) -> Path:
    known = json.loads(EXPECTED_PATH.read_text())
    change(known)
    path = tmp_path / "expected.json"
    path.write_text(json.dumps(known))
    return path


def _scale_first_tile_norm(known: dict[str, Any]) -> None:
    known["rows"]["tile_norms"][0] *= 1 + 3 * ROWS_RTOL


def _shift_top_logit(known: dict[str, Any]) -> None:
    known["logits"]["top"][0][1] += 2 * LOGITS_ATOL


def _change_greedy_token(known: dict[str, Any]) -> None:
    known["greedy"][5] = (known["greedy"][5] + 1) % 512


@pytest.mark.parametrize(("change", "name", "message"), [
    (_scale_first_tile_norm, "image rows", "tile 0 norm "),
    (_shift_top_logit, "logits", f"(tolerance {LOGITS_ATOL:g})"),
    (_change_greedy_token, "answer", "greedy token 6 differs: "),
])
def test_selftest_catches_a_wrong_number(tmp_path: Path, change: Any, name: str, message: str) -> None:
    result = run_cli("doctor", "--selftest", "--expected", _tampered(tmp_path, change))
    assert result.code == 1
    assert result.stderr == f"Error: 1 check failed ({name}); see what to do above.\n"
    found = checks(result.stdout)
    assert found[name][0] == "FAIL" and message in found[name][1]
    assert what_to_do(result.stdout, name).startswith("If it persists, report it with the output of 'pulse-edge "
                                                      "doctor --selftest --json'")
    selftest = SELFTEST_CHECKS[:SELFTEST_CHECKS.index(name) + 1]  # it stops at the first wrong number
    assert [n for n in found if n not in ENVIRONMENT_CHECKS] == selftest
    assert "Selftest FAILED in " in result.stdout


def test_selftest_json_has_each_step_and_its_time(tmp_path: Path) -> None:
    pixels = _tampered(tmp_path, lambda known: known["page"].update(pixels_sha256="0" * 64))
    result = run_cli("doctor", "--selftest", "--json", "--expected", pixels)
    assert result.code == 1
    report = json.loads(result.stdout)
    selftest = report["selftest"]
    assert selftest["ok"] is False and report["ok"] is False
    assert [c["name"] for c in selftest["checks"]] == ["checkpoint", "convert", "input"]
    assert all(c["seconds"] >= 0 for c in selftest["checks"])
    failed = selftest["checks"][-1]
    assert failed["status"] == "fail"
    assert failed["detail"].startswith("waveform_ecg.dcm was drawn as a 2200 x 1700 printout whose pixels differ "
                                       "from the known 2200 x 1700 one (Pillow ")
    assert result.stderr == "Error: 1 check failed (input); see what to do above.\n"


# -- what the llama.cpp check says about builds this machine does not have ---------------------------------


def test_system_info_of_a_cuda_build_is_parsed_into_backends() -> None:
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 | "
    assert doctor.parse_system_info(text) == {"CPU": ["SSE3", "AVX", "AVX2"], "CUDA": ["ARCHS=900", "USE_GRAPHS"]}
    build = doctor.LlamaBuild(loaded=True, system_info=text, backends=doctor.parse_system_info(text), gpu_offload=True)
    check = doctor._llama_check(build, {"pni", "avx", "avx2"})
    assert (check.status, check.detail) == ("ok", "loads; CPU: SSE3 AVX AVX2; GPU offload through CUDA")


def test_a_build_for_a_newer_cpu_fails_and_one_for_an_older_cpu_warns() -> None:
    build = doctor.LlamaBuild(loaded=True, backends={"CPU": ["AVX", "AVX2", "AVX512"]})
    newer = doctor._llama_check(build, {"avx", "avx2"})
    assert newer.status == "fail"
    assert "it uses AVX512, which this CPU lacks, so it would stop with 'Illegal instruction'" in newer.detail
    assert newer.fix.startswith("Install a llama-cpp-python built for this CPU: rebuild llama-cpp-python on this "
                                "machine: pip install --force-reinstall --no-binary")
    older = doctor._llama_check(doctor.LlamaBuild(loaded=True, backends={"CPU": ["AVX"]}), {"avx", "avx2", "fma"})
    assert older.status == "warn" and "This CPU has AVX2, FMA, which the build does not use" in older.detail
