"""``pulse-edge chat`` with questions piped in, the tiny model and the real llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pulse_edge.inputs import load
from pulse_edge.model import resolve
from pulse_edge.reader import DISCLAIMER, Conversation, Generation, Reader
from tests import images
from tests.conftest import run_cli

QUESTIONS = ["Is the rhythm regular?", "Why?", "Is there ST elevation?"]


@pytest.fixture(scope="module")
def ecg_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "ECG ü 1.png"
    images.scan("ecg00001.png").save(path)
    return path


@pytest.fixture(scope="module")
def expected(converted_tiny, ecg_png: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """The answers of the library's Conversation: turn 3 follows a reset, so it is a first turn again."""
    reader = Reader(resolve(converted_tiny.folder), threads=2)
    try:
        chat = Conversation(reader, load(ecg_png)[0].image, generation=Generation(max_tokens=6))
        answers = [chat.ask(QUESTIONS[0]).text, chat.ask(QUESTIONS[1]).text]
        chat.reset()
        answers.append(chat.ask(QUESTIONS[2]).text)
    finally:
        reader.close()
    return answers


def test_piped_questions_get_the_conversations_answers(converted_tiny, ecg_png: Path, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    script = f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n/history\n/reset\n{QUESTIONS[2]}\n/quit\nNever asked?\n"
    result = run_cli("chat", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "6", input=script)
    assert result.code == 0, result.stderr
    history = [f"Q: {QUESTIONS[0]}", f"A: {expected[0]}", f"Q: {QUESTIONS[1]}", f"A: {expected[1]}"]
    assert result.stdout.splitlines() == [f"[{DISCLAIMER}]", expected[0], expected[1], *history, expected[2]]
    assert result.stderr == "Conversation cleared; the image stays read.\n"


def test_json_gives_one_record_per_answer(converted_tiny, ecg_png: Path, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("chat", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "6", "--json",
                     input="\n".join(QUESTIONS[:2]))  # no newline at the end, no /quit: EOF ends it
    assert result.code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["turn"], r["question"], r["answer"]) for r in records] == [
        (1, QUESTIONS[0], expected[0]), (2, QUESTIONS[1], expected[1])]
    first = records[0]
    # the 3167 x 1580 scan picks the 1008 x 336 pinpoint: 3 tiles + the base image, 576 rows each
    assert first["disclaimer"] == DISCLAIMER and first["image_tokens"] == 4 * 576
    assert list(first["plan"]["pinpoint"]) == [1008, 336]
    assert first["model"]["language_model_sha256"] == converted_tiny.manifest.language_model().sha256
    assert first["generation"] == {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    assert len(first["file_sha256"]) == 64
    assert records[1]["timings"]["vision_s"] == first["timings"]["vision_s"]  # one vision pass for both


def test_unknown_command_and_full_context_keep_the_chat_going(converted_tiny, ecg_png: Path, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    script = f"/frobnicate\n{'why ' * 2000}\n{QUESTIONS[0]}\n"
    result = run_cli("chat", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "6", input=script)
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [f"[{DISCLAIMER}]", expected[0]]
    assert result.stderr.splitlines() == [
        "Unknown command /frobnicate; /help lists the commands.",
        "Error: The conversation has filled the model's context of 4096 positions; start again with /reset "
        "(the image stays read).",
    ]


def test_a_question_with_the_image_placeholder_is_refused_and_the_chat_goes_on(converted_tiny, ecg_png: Path,  # type: ignore[no-untyped-def]
                                                                               expected: list[str]) -> None:
    result = run_cli("chat", ecg_png, "--model", converted_tiny.folder, "--max-tokens", "6",
                     input=f"Is <image> normal?\n{QUESTIONS[0]}\n/history\n")
    assert result.code == 0, result.stderr
    assert result.stderr == ("Error: The question 'Is <image> normal?' contains <image>, the image placeholder of "
                             "PULSE's prompt; the image already comes before the question, so remove <image> from "
                             "the question.\n")
    # the refused question never joined the conversation: the next one is answered as a first question
    assert result.stdout.splitlines() == [f"[{DISCLAIMER}]", expected[0], f"Q: {QUESTIONS[0]}", f"A: {expected[0]}"]


def test_bad_inputs_fail_cleanly(converted_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope.png"
    result = run_cli("chat", missing, "--model", converted_tiny.folder, input="")
    assert (result.code, result.stdout, result.stderr) == (1, "", f"Error: {missing}: no such file.\n")
    tiff = tmp_path / "two pages.tif"
    first, second = images.synthetic(400, 300), images.synthetic(300, 400, seed=1)
    first.save(tiff, save_all=True, append_images=[second])
    result = run_cli("chat", tiff, "--model", converted_tiny.folder, input="")
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {tiff} has 2 pages; choose the one to talk about with --page.\n"
    result = run_cli("chat", tiff, "--page", "2", "--model", converted_tiny.folder, "--max-tokens", "2", input="Hi?\n")
    assert result.code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_without_a_model_chat_says_how_to_get_one(tmp_path: Path) -> None:
    image = tmp_path / "ecg.png"
    images.synthetic(400, 300).save(image)
    result = run_cli("chat", image, input="")
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.startswith("Error: No model given. Convert PULSE-7B on a connected machine "
                                    "('pulse-edge convert PULSE-ECG/PULSE-7B --out DIR')")
    assert "'pulse-edge models import DIR'" in result.stderr and "Traceback" not in result.stderr


class Terminal:
    """A pseudo-terminal for a child process: what it wrote so far, read until a marker shows."""

    def __init__(self) -> None:
        import pty

        self.master, self.slave = pty.openpty()
        self.seen = b""

    def started(self) -> None:
        import os

        os.close(self.slave)  # the child holds it now

    def write(self, data: bytes) -> None:
        import os

        os.write(self.master, data)

    def until(self, marker: bytes, start: int = 0, timeout: float = 120) -> int:
        """Read until ``marker`` shows after ``start``; the position after it (fails after ``timeout`` s)."""
        import os
        import select
        import time

        deadline = time.monotonic() + timeout
        while marker not in self.seen[start:]:
            assert time.monotonic() < deadline, self.seen.decode(errors="replace")
            if select.select([self.master], [], [], 1)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    break
        return self.seen.index(marker, start) + len(marker)

    def close(self) -> None:
        import os

        os.close(self.master)


def test_on_a_terminal_it_prompts_streams_and_quits(converted_tiny, ecg_png: Path, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    term = Terminal()
    proc = subprocess.Popen([sys.executable, "-m", "pulse_edge", "chat", str(ecg_png), "--model",
                             str(converted_tiny.folder), "--max-tokens", "6"],
                            stdin=term.slave, stdout=term.slave, stderr=term.slave, env={**os.environ, "TERM": "dumb"})
    term.started()
    try:
        start = term.until(b"> ", term.until(b"/help lists the commands."))
        term.write(f"{QUESTIONS[0]}\n".encode())
        term.until(b"> ", term.until(expected[0].encode(), start), timeout=60)
        term.write(b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        term.close()
    text = term.seen.decode(errors="replace").replace("\r\n", "\n")
    assert f"Reading {ecg_png} ..." in text and "Ready (2304 image tokens" in text
    assert f"[{DISCLAIMER}]" in text
    assert expected[0] in term.seen[start:].decode(errors="replace")  # the streamed answer, after the question


# The CLI with each sampled token slowed down, so that a Ctrl-C lands while an answer is being written; it says
# "[sampling]" on stderr when the first answer starts.
SLOW_CLI = """
import sys, time
from pulse_edge import llm
from pulse_edge.cli import main
sample, started = llm.LanguageModel.sample, []
def slow(self, chain):
    if not started:
        started.append(sys.stderr.write("[sampling]\\n"))
        sys.stderr.flush()
    time.sleep(0.05)
    return sample(self, chain)
llm.LanguageModel.sample = slow
main(sys.argv[1:])
"""
STOPPED, ASKED = QUESTIONS[0], QUESTIONS[2]


@pytest.fixture(scope="module")
def unstopped(converted_tiny, ecg_png: Path) -> str:  # type: ignore[no-untyped-def]
    """The answer to ASKED in a conversation where STOPPED was never asked (40 tokens at most)."""
    reader = Reader(resolve(converted_tiny.folder), threads=2)
    try:
        image = load(ecg_png)[0].image
        stopped = Conversation(reader, image, generation=Generation(max_tokens=40)).ask(STOPPED)
        assert stopped.tokens > 20  # so that a Ctrl-C after its first token stops it midway
        return Conversation(reader, image, generation=Generation(max_tokens=40)).ask(ASKED).text
    finally:
        reader.close()


def test_ctrl_c_on_a_terminal_stops_the_answer_not_the_chat(converted_tiny, ecg_png: Path, unstopped: str) -> None:  # type: ignore[no-untyped-def]
    import fcntl
    import os
    import subprocess
    import sys
    import termios

    term = Terminal()
    # A session of its own with the pty as its terminal: a typed Ctrl-C (\x03) then sends it SIGINT.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "chat", str(ecg_png), "--model",
                             str(converted_tiny.folder), "--max-tokens", "40"],
                            stdin=term.slave, stdout=term.slave, stderr=term.slave, env={**os.environ, "TERM": "dumb"},
                            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    term.started()
    until = term.until
    try:
        at = until(b"> ", until(b"/help lists the commands."))
        term.write(f"{STOPPED}\n".encode())
        at = until(b"[sampling]", at)
        term.write(b"\x03")
        at = until(b"> ", until(b"(answer stopped)", at))
        term.write(f"{ASKED}\n".encode())
        at = until(b"> ", until(unstopped.encode(), at))
        term.write(b"/history\n")
        history = at
        at = until(b"> ", until(f"A: {unstopped}".encode(), at))
        history_text = term.seen[history:at].decode(errors="replace")
        term.write(b"\x03")  # at the prompt: a new prompt, as in a Python REPL
        at = until(b"> ", at)
        term.write(b"\x04")  # Ctrl-D on an empty line ends the chat
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        term.close()
    assert f"Q: {ASKED}" in history_text and STOPPED not in history_text
    assert b"Interrupted." not in term.seen and b"Traceback" not in term.seen


def test_ctrl_c_with_piped_questions_ends_the_chat(converted_tiny, ecg_png: Path) -> None:  # type: ignore[no-untyped-def]
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "chat", str(ecg_png), "--model",
                             str(converted_tiny.folder), "--max-tokens", "40"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(f"{STOPPED}\n{ASKED}\n".encode())
        proc.stdin.flush()
        assert proc.stderr.readline() == b"[sampling]\n"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, stdout.decode(), stderr.decode()) == (130, f"[{DISCLAIMER}]\n", "Interrupted.\n")
