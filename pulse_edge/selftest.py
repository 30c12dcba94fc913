"""``pulse-edge doctor --selftest``: prove an installation end to end, offline, in seconds.

A tiny random model in PULSE-7B's exact layout is written (fixed seed, the tokenizer shipped in
``selftest_data/``), converted to F32 by the converter behind ``pulse-edge convert``, and reads pydicom's real
12-lead ECG (``waveform_ecg.dcm``) through the code behind ``pulse-edge read``: ``inputs.load`` and
``Reader.read``. What it computes is compared with known values that the test suite computes with an
independent reference, PyTorch + transformers + LLaVA's own code (``tests/selftest_expected.py``); the runtime
never produced them.

The converter and the synthetic-checkpoint writer (``convert/``: numpy and gguf only; the tokenizer is
shipped, so no ``sentencepiece``) are imported here, inside ``build_checkpoint`` and ``convert_model``, and
nowhere else in the runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pulse_edge.doctor import FAIL, OK, Check
from pulse_edge.errors import PulseEdgeError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

DATA_FOLDER = Path(__file__).parent / "selftest_data"
EXPECTED_PATH = DATA_FOLDER / "expected.json"
TOKENIZER_PATH = DATA_FOLDER / "tokenizer.model"
ECG_FILE = "waveform_ecg.dcm"  # pydicom's real 12-lead recording, shipped in its wheel
SEED = 0
MODEL_NAME = "pulse-selftest"  # the checkpoint folder; names the converted files (pulse-selftest-F32.gguf)
# The question the known values were computed for (they record it; the selftest asks what they record). Chosen
# because at every one of its greedy steps the chosen token leads the runner-up by at least 0.13 (of the ten
# PULSE-style questions tried, several had a step within 0.01).
QUESTION = "Is this ECG normal?"
MAX_TOKENS = 24
KNOWN_KEYS = ("made_with", "question", "checkpoint_sha256", "language_model_sha256", "page", "plan", "prompt", "rows",
              "logits", "greedy")

# Tolerances. Both sides compute in float32 (numpy CLIP and llama.cpp here, PyTorch in the reference); what
# differs is summation order (BLAS and ggml kernels pick it per CPU: AVX2, AVX-512, NEON) and the erf
# approximation, which moves float32 results by ~1e-6 relative. Measured on this code against the reference
# (2-core AMD EPYC, AVX2): image rows 6.2e-7 relative, first-token logits 2.4e-6 absolute (values ~6). The
# tolerances leave 160x and 200x room for other CPUs and BLAS builds (8x even at a pessimistic 1e-5 relative)
# and stay below what a real defect moves: float16 rounding anywhere shifts logits by ~1e-3, a wrong CLIP
# layer or CLS order by more than 0.1. Token ids, the tile plan and greedy tokens are compared exactly: at
# every greedy step the chosen logit leads by more than 0.1 (expected.json's greedy_min_gap), 1e4 times the
# float32 noise.
ROWS_RTOL = 1e-4  # image-row values and norms, relative to the largest |value| (norms: to themselves)
LOGITS_ATOL = 5e-4  # first-token logits at the reference's top tokens (values of about 6)
# The KV cache is float32 here (Reader's kv_type="f32"), so the logits can be held to float32 precision;
# 'read' defaults to a float16 cache, which rounds the cached keys and values to 2^-11.
KV_TYPE = "f32"


@dataclass(frozen=True)
class Selftest:
    """The outcome of the selftest: one check per step, in order, and the time each step took."""

    checks: list[Check]
    seconds: float
    answer: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": self.seconds, "answer": self.answer, "timings": self.timings,
                "checks": [asdict(c) for c in self.checks]}


class _Failed(Exception):
    """A step failed; its check is already recorded."""


# -- the model and the input (shared with the generator of the known values) -------------------------------


@dataclass(frozen=True)
class BuiltModel:
    checkpoint: Path
    tower_config: Path
    converted: Path
    checkpoint_sha256: dict[str, str]
    language_model_sha256: str


def build_checkpoint(work: Path) -> tuple[Path, Path]:
    """Write the tiny checkpoint (vision tower inside, flat merge) and a folder with only its tower's configs.

    The converter takes the tower's config from that folder; ``mm_vision_tower`` keeps its stock name, so the
    checkpoint's bytes (and the converted language model's) do not depend on where ``work`` is.
    """
    from convert.synthetic import SHAPES, clip_config, clip_preprocessor_config, write_checkpoint

    checkpoint = write_checkpoint(work / MODEL_NAME, shape="tiny", seed=SEED, tokenizer=TOKENIZER_PATH)
    tower = work / "tower-config"
    tower.mkdir()
    for name, content in (("config.json", clip_config(SHAPES["tiny"])),
                          ("preprocessor_config.json", clip_preprocessor_config(SHAPES["tiny"]))):
        (tower / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return checkpoint, tower


def convert_model(checkpoint: Path, tower: Path, out: Path) -> str:
    """Convert to an F32 language model and an f32 mmproj in ``out``; the language model's SHA-256."""
    from convert.pipeline import convert

    result = convert(str(checkpoint), out, quant=["F32"], vision_tower=tower, mmproj_type="f32", threads=1)
    return result.manifest.language_model("F32").sha256


def checkpoint_hashes(checkpoint: Path) -> dict[str, str]:
    """SHA-256 of the checkpoint's weight shards and tokenizer, by file name."""
    files = sorted(checkpoint.glob("*.safetensors")) + [checkpoint / "tokenizer.model"]
    from pulse_edge.manifest import sha256_file

    return {f.name: sha256_file(f) for f in files}


def ecg_file() -> Path:
    """pydicom's real 12-lead ECG, from its installed test data (never downloaded)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(ECG_FILE, download=False)
    if not path:
        raise PulseEdgeError(f"pydicom's test file {ECG_FILE} is not in this installation; reinstall pydicom "
                             "from its wheel (it ships the file).")
    return Path(str(path))


def pixels_sha256(image: Image.Image) -> str:
    """SHA-256 of an image's mode, size and pixel bytes."""
    head = f"{image.mode} {image.size[0]}x{image.size[1]}\n".encode()
    return hashlib.sha256(head + image.tobytes()).hexdigest()


def read_expected(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PulseEdgeError(f"Cannot read the selftest's known values {path} ({exc}); reinstall pulse-edge.") from None
    missing = [key for key in KNOWN_KEYS if key not in data] if isinstance(data, dict) else list(KNOWN_KEYS)
    if missing:
        raise PulseEdgeError(f"The selftest's known values {path} lack {', '.join(missing)}; reinstall pulse-edge.")
    return data  # type: ignore[no-any-return]


# -- the run --------------------------------------------------------------------------------------------


class _Steps:
    """Records one check per step, with its time, and stops the run at the first failure."""

    def __init__(self, on_check: Callable[[Check], None] | None) -> None:
        self.checks: list[Check] = []
        self.on_check = on_check
        self.started = time.perf_counter()

    def add(self, name: str, status: str, detail: str, fix: str = "", seconds: float | None = None) -> None:
        check = Check(name, status, detail, fix, None if seconds is None else round(seconds, 3))
        self.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)
        if status == FAIL:
            raise _Failed

    @contextmanager
    def step(self, name: str, fix: str) -> Iterator[None]:
        """Turn any error inside into a failed check named ``name`` (the selftest is a diagnosis: it reports)."""
        try:
            yield
        except (_Failed, KeyboardInterrupt):
            raise
        except PulseEdgeError as exc:
            self.add(name, FAIL, str(exc), fix)
        except Exception as exc:  # the point of a selftest is to say what broke, whatever it is
            log.debug("selftest step %s failed", name, exc_info=True)
            self.add(name, FAIL, f"{type(exc).__name__}: {exc}", fix)


REINSTALL = "Reinstall pulse-edge and its dependencies (from the same wheels), then run the selftest again."
REPORT = ("If it persists, report it with the output of 'pulse-edge doctor --selftest --json'; 'read' may not "
          "give PULSE's answers on this machine.")


def selftest(
    *,
    expected: Path | None = None,
    threads: int | None = None,
    gpu_layers: int | None = None,
    on_check: Callable[[Check], None] | None = None,
) -> Selftest:
    """Build the tiny model, read the real ECG with it, and compare every step with the known values.

    ``expected`` replaces the shipped known values (tests point it at altered ones); ``on_check`` is called
    with each check as soon as it is made. Never raises for a failed step: the failure is the last check.
    """
    steps = _Steps(on_check)
    answer = ""
    timings: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pulse-edge-selftest-", ignore_cleanup_errors=True) as tmp:
            with steps.step("selftest", REPORT):  # whatever no step caught (a malformed known value, a bug)
                answer, timings = _run(steps, Path(tmp), expected or EXPECTED_PATH, threads, gpu_layers)
    except _Failed:
        pass
    return Selftest(steps.checks, round(time.perf_counter() - steps.started, 3), answer, timings)


def _run(steps: _Steps, work: Path, expected_path: Path, threads: int | None, gpu_layers: int | None
         ) -> tuple[str, dict[str, float]]:
    import numpy as np
    import PIL
    import pydicom

    known: dict[str, Any] = {}
    with steps.step("known values", REINSTALL):
        known = read_expected(expected_path)
    made_with = known["made_with"]

    # 1. The tiny checkpoint: random weights from numpy's generator, seeded per tensor.
    start = time.perf_counter()
    with steps.step("checkpoint", REINSTALL):
        checkpoint, tower = build_checkpoint(work)
        hashes = checkpoint_hashes(checkpoint)
    differing = sorted(name for name in hashes.keys() | known["checkpoint_sha256"].keys()
                       if hashes.get(name) != known["checkpoint_sha256"].get(name))
    if differing:
        steps.add("checkpoint", FAIL,
                  f"the tiny checkpoint's {', '.join(differing)} differ from the known bytes: numpy {np.__version__} "
                  f"draws other random weights than numpy {made_with['numpy']}, which made the known values, so no "
                  "number below could match.", REPORT, time.perf_counter() - start)
    steps.add("checkpoint", OK, f"tiny PULSE-layout checkpoint (seed {SEED}, {len(hashes)} files) has the known bytes",
              seconds=time.perf_counter() - start)

    # 2. The converter, as 'pulse-edge convert --quant F32 --mmproj-type f32'.
    start = time.perf_counter()
    converted = work / "converted"
    lm_sha = ""
    with steps.step("convert", REINSTALL):
        lm_sha = convert_model(checkpoint, tower, converted)
    if lm_sha != known["language_model_sha256"]:
        steps.add("convert", FAIL, f"the converted F32 language model has SHA-256 {lm_sha[:16]}..., the known one is "
                  f"{known['language_model_sha256'][:16]}...: the converter wrote different bytes.", REPORT,
                  time.perf_counter() - start)
    steps.add("convert", OK, f"F32 language model + f32 mmproj written; the language model has the known SHA-256 "
              f"{lm_sha[:12]}", seconds=time.perf_counter() - start)

    # 3. The input, as 'read' loads it.
    from pulse_edge.inputs import load

    start = time.perf_counter()
    pages = []
    with steps.step("input", REINSTALL):
        path = ecg_file()
        pages = load(path)
    page = pages[0].image
    page_known = known["page"]
    if (len(pages), pages[0].kind) != (1, "dicom-waveform"):
        steps.add("input", FAIL, f"{ECG_FILE} gave {len(pages)} page(s) of kind {pages[0].kind}, expected one "
                  "dicom-waveform page.", REINSTALL, time.perf_counter() - start)
    if pixels_sha256(page) != page_known["pixels_sha256"]:
        steps.add("input", FAIL,
                  f"{ECG_FILE} was drawn as a {page.size[0]} x {page.size[1]} printout whose pixels differ from the "
                  f"known {page_known['size'][0]} x {page_known['size'][1]} one (Pillow {PIL.__version__} and "
                  f"pydicom {pydicom.__version__} here; the known values were made with Pillow {made_with['pillow']}, "
                  f"pydicom {made_with['pydicom']}), so no number below could match.", REPORT,
                  time.perf_counter() - start)
    steps.add("input", OK, f"{ECG_FILE} (pydicom's real 12-lead ECG) drawn as the known "
              f"{page.size[0]} x {page.size[1]} printout", seconds=time.perf_counter() - start)

    # 4. The model, as 'read' loads it (with a float32 KV cache: see KV_TYPE).
    from pulse_edge.model import resolve
    from pulse_edge.reader import Generation, Reader

    class RecordingReader(Reader):
        """Reader, keeping the image rows that read() computed."""

        rows: np.ndarray | None = None

        def image_rows(self, image: Any) -> tuple[np.ndarray, Any, float]:
            rows, plan, seconds = super().image_rows(image)
            self.rows = rows
            return rows, plan, seconds

    start = time.perf_counter()
    reader: RecordingReader | None = None
    with steps.step("load", "Run 'pulse-edge doctor' for llama.cpp's state. " + REINSTALL):
        reader = RecordingReader(resolve(converted, "F32"), threads=threads, gpu_layers=gpu_layers, kv_type=KV_TYPE)
    assert reader is not None  # a failed step raised above
    try:
        layers = reader.llm.gpu_layers
        where = "on the CPU" if layers == 0 else "all layers on the GPU" if layers < 0 else f"{layers} layers on the GPU"
        steps.add("load", OK, f"llama.cpp loaded the converted model ({where}, {reader.llm.threads} threads)",
                  seconds=time.perf_counter() - start)

        # 5. The reading, through Reader.read like 'pulse-edge read'.
        start = time.perf_counter()
        with steps.step("read", "Run 'pulse-edge doctor' for llama.cpp's state. " + REPORT):
            question = str(known["question"])
            reading = reader.read(page, [question], generation=Generation(max_tokens=MAX_TOKENS),
                                  image_name=str(path))
            prefix, suffix, _ = reader.prompt_pieces(question)
            # The first token's logits: cut the cache back to the image's end and feed the question again, as
            # read() does for a second question (the image stays cached after read()).
            reader.llm.truncate(len(prefix) + reading.image_tokens)
            reader.llm.feed_tokens(suffix)
            logits = reader.llm.logits()
        answer = reading.answers[0]
        steps.add("read", OK, f"read the ECG: vision {reading.timings['vision_s']:.2f} s, {reading.image_tokens} "
                  f"image tokens prefilled in {reading.timings['image_prefill_s']:.2f} s, {answer.tokens} new tokens "
                  f"in {answer.generation_s:.2f} s", seconds=time.perf_counter() - start)
        rows = reader.rows
    finally:
        reader.close()
    assert rows is not None
    _compare(steps, known, reading.plan, reading.image_tokens, prefix, suffix, rows, logits, answer.token_ids)
    timings = {"vision_s": reading.timings["vision_s"], "image_prefill_s": reading.timings["image_prefill_s"],
               "generation_s": answer.generation_s}
    return answer.text, {k: round(v, 3) for k, v in timings.items()}


def _compare(steps: _Steps, known: dict[str, Any], plan: dict[str, Any], image_tokens: int, prefix: list[int],
             suffix: list[int], rows: np.ndarray, logits: np.ndarray, token_ids: list[int]) -> None:
    import numpy as np

    # Exact: the tile plan and the token ids depend on integer arithmetic only.
    want = known["plan"]
    got = {"original_size": list(plan["original_size"]), "pinpoint": list(plan["pinpoint"]),
           "grid": list(plan["grid"]), "image_tokens": image_tokens}
    if got != want:
        steps.add("tile plan", FAIL, f"got {got}, LLaVA's preprocessing gives {want}.", REPORT)
    steps.add("tile plan", OK, f"{want['original_size'][0]} x {want['original_size'][1]} page -> pinpoint "
              f"{want['pinpoint'][0]} x {want['pinpoint'][1]}, {want['grid'][0]} x {want['grid'][1]} tiles + the "
              f"whole page: {image_tokens} image tokens, as LLaVA's code gives")

    want_ids = known["prompt"]
    if (prefix, suffix) != (want_ids["prefix_ids"], want_ids["suffix_ids"]):
        steps.add("prompt", FAIL, f"llama.cpp's token ids {prefix} <image> {suffix} differ from LLaVA's "
                  f"{want_ids['prefix_ids']} <image> {want_ids['suffix_ids']}.", REPORT)
    steps.add("prompt", OK, f"{len(prefix)} + {len(suffix)} token ids around the image equal LLaVA's "
              "tokenizer_image_token (SentencePiece)")

    # Within ROWS_RTOL: statistics of the image rows the language model received.
    ref = known["rows"]
    scale = float(ref["max_abs"])
    worst, problems = 0.0, []
    if rows.shape != (image_tokens, ref["width"]):
        steps.add("image rows", FAIL, f"the image rows have shape {list(rows.shape)}, the reference "
                  f"[{image_tokens}, {ref['width']}].", REPORT)
    per_tile = rows.astype(np.float64).reshape(len(ref["tile_norms"]), -1, rows.shape[1])
    tile_norms = np.sqrt((per_tile ** 2).sum(axis=(1, 2)))
    for index, (mine, theirs) in enumerate(zip(tile_norms, ref["tile_norms"], strict=True)):
        error = abs(mine - theirs) / abs(theirs)
        worst = max(worst, error)
        if error > ROWS_RTOL:
            problems.append(f"tile {index} norm {mine:.6g} vs {theirs:.6g}")
    for index, norm, values in ref["rows"]:
        row = rows[index].astype(np.float64)
        error = abs(float(np.linalg.norm(row)) - norm) / norm
        worst = max(worst, error)
        if error > ROWS_RTOL:
            problems.append(f"row {index} norm {np.linalg.norm(row):.6g} vs {norm:.6g}")
        deviation = float(np.abs(row[:len(values)] - np.asarray(values)).max()) / scale
        worst = max(worst, deviation)
        if deviation > ROWS_RTOL:
            problems.append(f"row {index} values differ by {deviation:.2g} of the largest value")
    checked = f"{len(ref['tile_norms'])} tile norms and {len(ref['rows'])} rows"
    if problems:
        steps.add("image rows", FAIL, f"{'; '.join(problems[:3])} (tolerance {ROWS_RTOL:g} relative): the vision "
                  "encoder does not compute what LLaVA's CLIP + projector compute.", REPORT)
    steps.add("image rows", OK, f"{checked} equal the reference's within {ROWS_RTOL:g} relative "
              f"(largest difference {worst:.1e})")

    # Within LOGITS_ATOL: the first token's logits at the reference's highest-scoring tokens.
    top = known["logits"]["top"]
    errors = [abs(float(logits[token]) - value) for token, value in top]
    mine_top = int(np.argmax(logits))
    if max(errors) > LOGITS_ATOL or mine_top != top[0][0]:
        token, value = top[int(np.argmax(errors))]
        steps.add("logits", FAIL, f"first-token logit of token {token} is {float(logits[token]):.6f}, the "
                  f"reference's {value:.6f} (tolerance {LOGITS_ATOL:g}); highest token {mine_top}, the reference's "
                  f"{top[0][0]}.", REPORT)
    steps.add("logits", OK, f"the first token's {len(top)} highest logits equal the reference's within "
              f"{LOGITS_ATOL:g} (largest difference {max(errors):.1e})")

    # Exact: greedy decoding picks the same tokens (the logit gaps dwarf float32 noise).
    want_tokens: Sequence[int] = known["greedy"]
    if token_ids != list(want_tokens):
        at = next((i for i, (a, b) in enumerate(zip(token_ids, want_tokens, strict=False)) if a != b),
                  min(len(token_ids), len(want_tokens)))
        steps.add("answer", FAIL, f"greedy token {at + 1} differs: {token_ids[at:at + 4]} where the reference has "
                  f"{list(want_tokens[at:at + 4])}.", REPORT)
    steps.add("answer", OK, f"the {len(token_ids)} greedy tokens equal the reference's")
