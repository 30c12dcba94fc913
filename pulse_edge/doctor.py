"""``pulse-edge doctor``: what this installation has, and whether it can read ECGs offline.

Every check is a ``Check`` (ok, warn or fail, with what to do); a ``fail`` means ``pulse-edge read`` cannot
work here until it is fixed. Nothing here touches the network, and nothing loads a model's weights: the
default model's files get the fast size check ``read`` does, and llama.cpp reads only its header and
vocabulary. ``selftest=True`` adds ``pulse_edge.selftest``, which proves the code end to end on a tiny model.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pulse_edge import __version__
from pulse_edge.errors import PulseEdgeError

if TYPE_CHECKING:
    from pulse_edge.selftest import Selftest

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 1 << 30

# Installed distributions whose versions are reported (distribution name, import name); all are runtime
# dependencies, so each must import.
PACKAGES = (
    ("llama-cpp-python", "llama_cpp"),
    ("gguf", "gguf"),
    ("numpy", "numpy"),
    ("pillow", "PIL"),
    ("pypdfium2", "pypdfium2"),
    ("pydicom", "pydicom"),
    ("platformdirs", "platformdirs"),
    ("typer", "typer"),
    ("rich", "rich"),
)
# What each runtime package is needed for, for the fix of a package that does not import.
NEEDED_FOR = {
    "llama_cpp": "the language model", "gguf": "reading model files", "numpy": "the vision encoder",
    "PIL": "every image", "pypdfium2": "PDF inputs", "pydicom": "DICOM inputs", "platformdirs": "the model store",
    "typer": "the command line", "rich": "the command line",
}

# llama.cpp's CPU feature names (llama_print_system_info) -> the Linux /proc/cpuinfo flag of the same
# instructions. A build that uses one the CPU lacks stops with "Illegal instruction"; one that leaves out
# what the CPU has reads slower than it could.
CPU_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm", "SVE": "sve", "SME": "sme",
}
# Missing these from a build costs real speed on a CPU that has them.
SPEED_FEATURES = ("AVX2", "FMA", "F16C", "AVX512", "NEON", "DOTPROD")

# Memory for one reading. Measured peak RSS for 7B Q4_K_M at a 4,096-position context (2,880 image tokens +
# 128 new tokens; benchmarks/README.md, results/engine_7b_q4km_vision_fast.json): 5.83 GiB with the default cache
# (8-bit keys for quantised weights), 6.31 GiB with an f16 one. It is the language model (memory-mapped, 3.85 GiB),
# the KV cache, and ~0.3 GiB of compute buffers and working memory; the vision encoder is mapped only while no KV
# cache exists. The estimate below is an upper bound: both files, an f16 cache at the model's full context, and
# 0.5 GiB.
MEASURED_7B_Q4_K_M_PEAK = int(5.83 * GIB)
WORKING_MEMORY = GIB // 2
KV_BYTES = 2  # float16 keys and values ('read' default)
# Free disk below which importing PULSE-7B Q4_K_M (4.1 GB language model + 0.6 GB mmproj) will not fit.
IMPORT_DISK = 5 * 10**9
HOW_TO_REBUILD = ("rebuild llama-cpp-python on this machine: pip install --force-reinstall --no-binary "
                  "llama-cpp-python llama-cpp-python==0.3.36 (with CMAKE_ARGS=\"-DGGML_CUDA=on\" or "
                  "\"-DGGML_METAL=on\" for a GPU build)")


@dataclass(frozen=True)
class Check:
    """One finding: ``status`` is ``ok``, ``warn`` or ``fail``; ``fix`` says what to do when it is not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""
    seconds: float | None = None


@dataclass(frozen=True)
class LlamaBuild:
    """What the installed llama.cpp build can use."""

    loaded: bool
    error: str = ""
    system_info: str = ""
    backends: dict[str, list[str]] = field(default_factory=dict)  # "CPU" -> ["SSE3", "AVX2", ...]
    gpu_offload: bool = False

    @property
    def cpu_features(self) -> list[str]:
        return [f for f in self.backends.get("CPU", []) if "=" not in f]

    @property
    def accelerators(self) -> list[str]:
        return [name for name in self.backends if name != "CPU"]


@dataclass(frozen=True)
class Memory:
    total: int | None
    available: int | None
    source: str  # where the numbers come from


@dataclass(frozen=True)
class StoreModel:
    """A store model as doctor sees it (no hashing)."""

    name: str
    quants: list[str]
    size: int
    is_default: bool
    files_ok: bool
    problem: str = ""
    last_verified: str = ""
    verified_ok: bool | None = None


@dataclass
class Report:
    """Everything ``pulse-edge doctor`` found."""

    versions: dict[str, str | None]
    python: str
    platform: str
    llama_cpp: LlamaBuild
    cores: dict[str, int]
    memory: Memory
    disk: dict[str, Any]
    store: dict[str, Any]
    checks: list[Check]
    selftest: Selftest | None = None

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks) and (self.selftest is None or self.selftest.ok)

    @property
    def failures(self) -> list[Check]:
        failed = [c for c in self.checks if c.status == FAIL]
        if self.selftest is not None:
            failed += [c for c in self.selftest.checks if c.status == FAIL]
        return failed

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "selftest"}
        data["llama_cpp"].update(cpu_features=self.llama_cpp.cpu_features, accelerators=self.llama_cpp.accelerators)
        data["ok"] = self.ok
        data["selftest"] = self.selftest.to_dict() if self.selftest is not None else None
        return data


# -- facts ------------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Installed versions of pulse-edge and its runtime dependencies (``None``: not installed)."""
    found: dict[str, str | None] = {"pulse-edge": __version__}
    for dist, _ in PACKAGES:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def parse_system_info(text: str) -> dict[str, list[str]]:
    """``"CPU : SSE3 = 1 | AVX = 1 | CUDA : ARCHS = 890 | "`` -> ``{"CPU": ["SSE3", "AVX"], "CUDA": ["ARCHS=890"]}``."""
    backends: dict[str, list[str]] = {}
    current = ""
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        if " : " in part:  # a new backend section starts with its name
            current, _, part = (p.strip() for p in part.partition(" : "))
            backends.setdefault(current, [])
        key, _, value = (p.strip() for p in part.partition("="))
        if key and current:
            if value == "1":
                backends[current].append(key)
            elif value not in ("", "0"):
                backends[current].append(f"{key}={value}")
    return backends


def llama_build() -> LlamaBuild:
    """Load llama.cpp (its logs go to the DEBUG log) and ask what the build uses."""
    try:
        from pulse_edge.native import llama_cpp

        lib = llama_cpp()
        info = lib.llama_print_system_info()
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
        return LlamaBuild(loaded=True, system_info=text.strip(), backends=parse_system_info(text),
                          gpu_offload=bool(lib.llama_supports_gpu_offload()))
    except Exception as exc:  # a broken build fails in many ways: missing library, symbol, or ABI
        log.debug("llama.cpp failed to load", exc_info=True)
        return LlamaBuild(loaded=False, error=f"{type(exc).__name__}: {exc}")


def cpu_flags() -> set[str] | None:
    """This CPU's instruction-set flags (Linux only; ``None`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, ARM
                    return set(value.split())
    except OSError:
        pass
    return None


def cores() -> dict[str, int]:
    from pulse_edge.llm import physical_cores

    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return {"physical": physical_cores(), "logical": logical, "usable": usable}


def _meminfo() -> Memory | None:
    try:
        values = {}
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    total, available = values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))
    source = "/proc/meminfo"
    # A container's memory limit (cgroup v2) is what a reading can really use.
    try:
        limit_text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit_text != "max" and total is not None and int(limit_text) < total:
            total = int(limit_text)
            available = max(0, min(available or total, total - used))
            source = "cgroup memory.max"
    except (OSError, ValueError):
        pass
    return Memory(total, available, source)


def _windows_memory() -> Memory | None:
    import ctypes

    class Status(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                    ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                    ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                    ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

    status = Status()
    status.length = ctypes.sizeof(Status)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return Memory(int(status.total), int(status.available), "GlobalMemoryStatusEx")


def memory() -> Memory:
    """Total and available memory, without psutil: /proc/meminfo, Windows' API, or sysconf."""
    if sys.platform.startswith("linux") and (found := _meminfo()) is not None:
        return found
    if sys.platform == "win32" and (found := _windows_memory()) is not None:
        return found
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return Memory(None, None, "unknown")
    try:  # not on macOS
        available: int | None = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        available = None
    return Memory(total, available, "sysconf")


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


# -- the model store ----------------------------------------------------------------------------------------


def _store_model(model: Any) -> StoreModel:
    from pulse_edge.manifest import check_sizes
    from pulse_edge.model import import_again

    problem = ""
    try:
        check_sizes(model.manifest, model.folder, import_again(model.name))
    except PulseEdgeError as exc:
        problem = str(exc)
    verification = model.verification
    return StoreModel(
        name=model.name, quants=model.quants, size=model.size, is_default=model.is_default, files_ok=not problem,
        problem=problem, last_verified=verification.time if verification else "",
        verified_ok=verification.ok if verification else None,
    )


@dataclass(frozen=True)
class _Shape:
    """What the memory estimate needs from the default model."""

    name: str
    quant: str
    files: int
    layers: int
    width: int
    context: int


def _header_shape(path: Path) -> tuple[int, int, int]:
    """Layers, width and context of a language-model GGUF, from its header (memory-mapped: no weight is read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
        arch = str(reader.fields["general.architecture"].contents())
        values = [int(reader.fields[f"{arch}.{key}"].contents())
                  for key in ("block_count", "embedding_length", "context_length")]
    except Exception as exc:  # a damaged header fails the parser in many ways
        raise PulseEdgeError(f"{path} is not a readable language-model GGUF ({type(exc).__name__}: {exc}); check "
                             f"it with 'pulse-edge models verify'.") from None
    del reader  # releases the memory map
    return values[0], values[1], values[2]


def _default_shape(lib_loaded: bool) -> tuple[_Shape | None, str]:
    """The default model's shape; llama.cpp opens it (vocabulary only). A problem is returned as text."""
    from pulse_edge.model import resolve

    try:
        files = resolve(None)
        layers, width, context = _header_shape(files.language_model)
        shape = _Shape(files.name, files.quant, files.language_model.stat().st_size + files.mmproj.stat().st_size,
                       layers, width, context)
    except PulseEdgeError as exc:
        return None, str(exc)
    if lib_loaded:
        from pulse_edge.llm import LanguageModel

        try:
            LanguageModel(files.language_model, vocab_only=True).close()
        except PulseEdgeError as exc:
            return shape, str(exc)
    return shape, ""


def reading_memory(shape: _Shape) -> int:
    """The most one reading with this model can take: files + float16 KV cache at full context + working memory."""
    return shape.files + 2 * shape.layers * shape.context * shape.width * KV_BYTES + WORKING_MEMORY


# -- checks -------------------------------------------------------------------------------------------------


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"


def _packages_check() -> Check:
    broken = []
    for dist, module in PACKAGES:
        if module == "llama_cpp":
            continue  # its own check
        try:
            importlib.import_module(module)
        except Exception as exc:  # an import can fail in many ways (missing file, ABI, native library)
            broken.append((dist, module, f"{type(exc).__name__}: {exc}"))
    if broken:
        dist, module, error = broken[0]
        names = ", ".join(d for d, _, _ in broken)
        return Check("packages", FAIL, f"{names} cannot be imported ({error}); {dist} is needed for "
                     f"{NEEDED_FOR[module]}.", f"Reinstall {names} (pip install --force-reinstall {dist}, from the "
                     "same wheel folder on an offline machine).")
    return Check("packages", OK, f"the {len(PACKAGES) - 1} other runtime packages import")


def _llama_check(build: LlamaBuild, flags: set[str] | None) -> Check:
    if not build.loaded:
        return Check("llama.cpp", FAIL, f"llama-cpp-python does not load: {build.error}",
                     f"Reinstall it: pip install --force-reinstall llama-cpp-python==0.3.36, or {HOW_TO_REBUILD}.")
    uses = " ".join(build.cpu_features) or "no optional CPU features"
    gpu = (f"GPU offload through {', '.join(build.accelerators)}" if build.gpu_offload and build.accelerators
           else "GPU offload" if build.gpu_offload else "no GPU offload (CPU build)")
    detail = f"loads; CPU: {uses}; {gpu}"
    if flags is not None:
        missing = [f for f in build.cpu_features if f in CPU_FLAGS and CPU_FLAGS[f] not in flags]
        if missing:
            return Check("llama.cpp", FAIL, f"{detail}. It was built for another CPU: it uses {', '.join(missing)}, "
                         "which this CPU lacks, so it would stop with 'Illegal instruction'.",
                         f"Install a llama-cpp-python built for this CPU: {HOW_TO_REBUILD}.")
        unused = [f for f in SPEED_FEATURES if CPU_FLAGS[f] in flags and f not in build.cpu_features]
        if unused:
            return Check("llama.cpp", WARN, f"{detail}. This CPU has {', '.join(unused)}, which the build does not "
                         "use: reading is slower than it could be.", f"For full speed, {HOW_TO_REBUILD}.")
    return Check("llama.cpp", OK, detail)


def _cpu_check(counts: dict[str, int]) -> Check:
    detail = f"{counts['physical']} physical cores, {counts['logical']} logical"
    if counts["usable"] < counts["physical"]:
        return Check("cpu", WARN, f"{detail}, but this process may use only {counts['usable']} of them; reading "
                     f"starts {counts['physical']} threads, which then wait on each other.",
                     f"Pass --threads {counts['usable']} to read and batch.")
    return Check("cpu", OK, f"{detail}; reading uses {counts['physical']} threads")


def _memory_check(mem: Memory, shape: _Shape | None) -> Check:
    if shape is not None:
        need = reading_memory(shape)
        what = (f"reading with {shape.name} {shape.quant} takes up to {_gib(need)} (files {_gib(shape.files)}, KV "
                f"cache at {shape.context:,} positions {_gib(need - shape.files - WORKING_MEMORY)}, working "
                f"{_gib(WORKING_MEMORY)})")
    else:
        need = MEASURED_7B_Q4_K_M_PEAK
        what = f"a reading with PULSE-7B Q4_K_M peaks at {_gib(need)} (measured)"
    if mem.total is None:
        return Check("memory", WARN, f"cannot measure this machine's memory; {what}",
                     f"Make sure {_gib(need)} is free before reading.")
    have = f"{_gib(mem.total)} total, " + (f"{_gib(mem.available)} available" if mem.available is not None
                                           else "available unknown")
    if mem.total < need:
        return Check("memory", FAIL, f"{have}; {what}: it does not fit.",
                     "Read on a machine with more memory, or use a smaller quant (Q4_0) of the model.")
    if mem.available is not None and mem.available < need:
        return Check("memory", WARN, f"{have}; {what}: close other programs first.",
                     f"Free {_gib(need - mem.available)} before reading.")
    return Check("memory", OK, f"{have}; {what}")


def _disk_check(folder: Path, free: int, have_model: bool) -> Check:
    detail = f"{free / 1e9:.1f} GB free at {folder}"
    if not have_model and free < IMPORT_DISK:
        return Check("disk", WARN, f"{detail}; importing PULSE-7B Q4_K_M takes 4.7 GB.",
                     "Free some space, or import the model with --link to keep it where it is.")
    return Check("disk", OK, detail)


def _model_check(models: Sequence[StoreModel], default: str | None, store: Path, problem: str,
                 shape: _Shape | None, selftest: bool) -> Check:
    from pulse_edge.model import HOW_TO_GET_ONE, import_again

    others = [m for m in models if not m.is_default]
    listed = ", ".join(m.name for m in models)
    if not models:
        # 'read' cannot work without a model; the selftest proves the software without one.
        return Check("model", WARN if selftest else FAIL, f"no model in the store ({store}), so 'read' has nothing "
                     "to read with", HOW_TO_GET_ONE)
    if default is None:
        return Check("model", WARN, f"{len(models)} model(s) in the store ({listed}) but no default: 'read' "
                     "needs --model NAME", f"Set one: 'pulse-edge models default {models[0].name}'.")
    mine = next((m for m in models if m.is_default), None)
    if mine is None:
        return Check("model", FAIL, f"the default model {default!r} is not in the store ({store}; it has {listed})",
                     f"Choose another with 'pulse-edge models default NAME', or import it again with "
                     f"'pulse-edge models import DIR --name {default}'.")
    again = import_again(default)
    if problem:
        return Check("model", FAIL, f"{default} (default): {problem}",
                     f"Check it with 'pulse-edge models verify {default}', then {again}.")
    if mine.verified_ok is False:
        return Check("model", FAIL, f"{default} (default): its last full check ({mine.last_verified}) found it damaged",
                     f"Run 'pulse-edge models verify {default}' to see which file; {again}.")
    quants = "/".join(mine.quants)
    checked = f", last full check {mine.last_verified} passed" if mine.verified_ok else ""
    layers = f", {shape.layers} layers x {shape.width}" if shape is not None else ""
    detail = (f"{mine.name} (default; {quants}, {_gib(mine.size)}{layers}): its files have the manifest's sizes and "
              f"llama.cpp opens it{checked}; 'pulse-edge models verify' re-hashes them")
    broken = [m for m in others if not m.files_ok]
    if broken:
        return Check("model", WARN, f"{detail}. Other models: {broken[0].problem}",
                     f"Run 'pulse-edge models verify {broken[0].name}'.")
    if others:
        detail += f"; also in the store: {', '.join(m.name for m in others)}"
    return Check("model", OK, detail)


def doctor(
    *,
    selftest: bool = False,
    expected: Path | None = None,
    on_check: Callable[[Check], None] | None = None,
) -> Report:
    """Check this installation; with ``selftest``, also prove it end to end on a tiny model.

    ``on_check`` is called with each selftest check as it is made (the environment checks take well under
    a second and come back in the report). ``expected`` replaces the selftest's known values (for tests).
    """
    from pulse_edge.model import store_dir

    build = llama_build()
    flags = cpu_flags()
    counts = cores()
    mem = memory()
    store = store_dir()
    disk_folder = _existing(store)
    free = shutil.disk_usage(disk_folder).free

    models: list[StoreModel] = []
    default: str | None = None
    store_problem = ""
    try:
        from pulse_edge.store import default_model, list_models

        models = [_store_model(m) for m in list_models()]
        default = default_model()
    except PulseEdgeError as exc:
        store_problem = str(exc)
    shape, problem = (None, "")
    if default is not None and not store_problem:
        shape, problem = _default_shape(build.loaded)
    checks = [
        _llama_check(build, flags),
        _packages_check(),
        _cpu_check(counts),
        _memory_check(mem, shape),
        _disk_check(disk_folder, free, bool(models)),
        (Check("model", FAIL, store_problem, "Fix or delete the file named above.") if store_problem
         else _model_check(models, default, store, problem, shape, selftest)),
    ]
    report = Report(
        versions=versions(),
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        llama_cpp=build,
        cores=counts,
        memory=mem,
        disk={"folder": str(disk_folder), "free": free},
        store={"folder": str(store), "default": default, "models": [asdict(m) for m in models]},
        checks=checks,
    )
    if selftest:
        from pulse_edge.selftest import selftest as run_selftest

        report.selftest = run_selftest(expected=expected, on_check=on_check)
    return report
