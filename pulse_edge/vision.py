"""PULSE's vision half in numpy: CLIP ViT tower + mlp2x_gelu projector + LLaVA's patch merge, in float32.

llama.cpp's own LLaVA graph puts the CLS embedding after the patches (see PULSE.md), so this project runs the
tower itself from the mmproj GGUF. The arithmetic is HF ``CLIPVisionModel``'s: CLS first, position embeddings,
pre-layernorm, pre-LN blocks with quick_gelu, output of the last block in the file (the converter keeps exactly
the layers up to LLaVA's select layer), CLS row dropped; then Linear, exact (erf) GELU, Linear.

All pieces of an image go through the big matmuls together (rows of every tile stacked), which keeps the
encoder near the BLAS floor on a CPU. Attention runs per (piece, head) in a few worker threads, each with
single-threaded BLAS; residual adds, biases, norms and activations run fused on cache-sized row blocks. The
float16 matrices stay in the mmproj's memory map, widened per use; exp and the float16 widening use llama.cpp's
vectorised loops (pulse_edge.native), numpy's where those are missing.
Measured at the real shape (5 tiles, 23 blocks) on a 2-core AMD EPYC VM (AVX2): 16.4 s (16.9 s inside a
reading, loading included), where its BLAS gives ~145 GFLOP/s (a 13.4 s floor for the ~1.95 TFLOP: the big
matmuls ~12 s, attention 2.2 s, elementwise 1.2 s, projector 1.2 s); see benchmarks/vision_speed.py.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pulse_edge.errors import ImageError, ModelError
from pulse_edge.image import ImageParams, TilePlan, pairs
from pulse_edge.native import exp_, widen_f16

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

F32 = np.float32
# Elementwise work runs on blocks of about this many float32 values, so each pass stays in L2.
_BLOCK = 1 << 16
# Pieces encoded together; more only grows the buffers (PULSE's pinpoints give at most 1 + 4).
_MAX_BATCH = 8

# mmproj tensor names per block (convert/vision.py writes them).
_LAYER_NAMES = ("ln1.weight", "ln1.bias", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
                "attn_v.weight", "attn_v.bias", "attn_out.weight", "attn_out.bias", "ln2.weight", "ln2.bias",
                "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias")


# -- elementwise kernels ----------------------------------------------------------------------------
# erf by cubic Hermite interpolation of math.erf on a 1/128 grid over [0, 6] (erf(6) = 1 - 2e-17). The error
# bound is max|erf''''| h^4 / 384 = 4.3 * 128**-4 / 384 ~ 4e-11, evaluated in float64.
_ERF_SCALE = 128
_ERF_MAX = 6.0


@lru_cache(maxsize=1)
def _erf_cubics() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = int(_ERF_MAX * _ERF_SCALE)
    xs = np.arange(n + 1, dtype=np.float64) / _ERF_SCALE
    f = np.array([math.erf(v) for v in xs])
    d = 2.0 / math.sqrt(math.pi) * np.exp(-xs * xs) / _ERF_SCALE  # derivative times the step
    return f[:-1], d[:-1], 3.0 * (f[1:] - f[:-1]) - 2.0 * d[:-1] - d[1:], 2.0 * (f[:-1] - f[1:]) + d[:-1] + d[1:]


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in float64 (absolute error below 1e-10; NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _erf_into(x.reshape(-1), out.reshape(-1), _Scratch(x.size))
    return out


class _Scratch:
    """Reusable float64/index buffers for :func:`_erf_into` (no allocation per block)."""

    def __init__(self, size: int) -> None:
        self.t = np.empty(size, dtype=np.float64)
        self.g = np.empty(size, dtype=np.float64)
        self.i = np.empty(size, dtype=np.intp)


def _erf_into(x: np.ndarray, out: np.ndarray, scratch: _Scratch) -> None:
    """``out = erf(x)`` for 1-D float64 arrays of at most the scratch's size."""
    c0, c1, c2, c3 = _erf_cubics()
    n = x.size
    t, g, i = scratch.t[:n], scratch.g[:n], scratch.i[:n]
    np.abs(x, out=t)
    np.minimum(t, _ERF_MAX, out=t)  # NaN propagates into t
    t *= _ERF_SCALE
    with np.errstate(invalid="ignore"):
        np.copyto(i, t, casting="unsafe")  # truncation: the interval; NaN gives garbage, clipped below
    np.clip(i, 0, len(c0) - 1, out=i)
    t -= i  # position inside the interval, in [0, 1]
    np.take(c3, i, out=out)
    for c in (c2, c1, c0):
        out *= t
        np.take(c, i, out=g)
        out += g
    np.copysign(out, x, out=out)


def gelu_(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x/2 (1 + erf(x/sqrt 2))``, in place on a float32 array (float64 inside)."""
    flat = x.reshape(-1)
    # Four float64 buffers of this size: L2-sized blocks would be faster per element, but then the ~20 numpy
    # calls per block cost more than the arithmetic.
    step = min(_BLOCK // 2, flat.size)
    scratch = _Scratch(step)
    wide = np.empty(step, dtype=np.float64)
    e = np.empty(step, dtype=np.float64)
    for start in range(0, flat.size, step):
        part = flat[start:start + step]
        w, v = wide[:part.size], e[:part.size]
        np.multiply(part, math.sqrt(0.5), out=w)
        _erf_into(w, v, scratch)
        v += 1.0
        v *= part
        v *= 0.5
        np.copyto(part, v, casting="same_kind")
    return x


def quick_gelu_(x: np.ndarray) -> np.ndarray:
    """CLIP's ``x * sigmoid(1.702 x)``, in place on a float32 array."""
    flat = x.reshape(-1)
    tmp = np.empty(min(_BLOCK, flat.size), dtype=F32)
    for start in range(0, flat.size, _BLOCK):
        part = flat[start:start + _BLOCK]
        t = tmp[:part.size]
        np.multiply(part, F32(-1.702), out=t)
        exp_(t)  # overflows to inf for x << 0: x / inf = -0, the right limit
        t += F32(1.0)
        np.divide(part, t, out=part)
    return x


class _Widened:
    """Weight matrices as float32, one matmul at a time, in one reused buffer.

    The mmproj's float16 matrices stay in its memory map (no copy at load: ~0.6 GiB for CLIP-L) and are widened
    just before their matmul; float16 -> float32 is exact, so the products are those of float32 weights. Each
    matrix is used once per image (all pieces go through the matmuls together), so this costs no more than
    widening at load. Several parts are stacked by rows (q, k and v make one matmul).
    """

    def __init__(self, workers: _Workers, size: int) -> None:
        self.workers = workers
        self.buffer = np.empty(size, dtype=F32)

    def __call__(self, *parts: np.ndarray) -> np.ndarray:
        if len(parts) == 1 and parts[0].dtype == F32:
            return parts[0]
        out = self.buffer[:sum(p.size for p in parts)].reshape(-1, parts[0].shape[1])
        row = 0
        for part in parts:
            self.workers.split(_widen(part, out[row:row + part.shape[0]]), part.shape[0])
            row += part.shape[0]
        return out


def _widen(src: np.ndarray, dst: np.ndarray) -> Callable[[int, int], None]:
    """Row-range job: ``dst = src`` as float32 (float16 through llama.cpp's vectorised loop)."""

    def run(a: int, b: int) -> None:
        if src.dtype == np.float16:
            widen_f16(src[a:b], dst[a:b])
        else:
            dst[a:b] = src[a:b]

    return run


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"quick_gelu": quick_gelu_, "gelu": gelu_}


def _layer_norm_block(src: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: np.float32, dst: np.ndarray) -> None:
    np.subtract(src, src.mean(axis=1, keepdims=True), out=dst)
    var = np.einsum("ij,ij->i", dst, dst)
    var /= F32(src.shape[1])
    var += eps
    np.sqrt(var, out=var)
    dst /= var[:, None]
    dst *= weight
    dst += bias


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray,
               residual: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Row-wise LayerNorm of a 2-D float32 array into ``out`` (may be ``x``), in row blocks that stay in cache.

    With ``residual=(delta, delta_bias)``, ``x += delta + delta_bias`` first, block by block (the transformer's
    residual add fused with the next norm: one trip through memory instead of three).
    """
    rows = max(1, _BLOCK // x.shape[1])
    e = F32(eps)
    for start in range(0, x.shape[0], rows):
        src = x[start:start + rows]
        if residual is not None:
            src += residual[0][start:start + rows]
            src += residual[1]
        _layer_norm_block(src, weight, bias, e, out[start:start + rows])
    return out


# -- threads ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _openblas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) for the thread count of the OpenBLAS numpy runs on, or None where it cannot be found.

    Attention is many small matmuls: OpenBLAS splits each over its threads and gains nothing (worse when another
    process holds a core), while the same matmuls run one per thread in a pool scale with the cores. The pool
    needs OpenBLAS single-threaded meanwhile (a process-wide setting, restored after each attention step); it
    is found among the loaded libraries (Linux; numpy's own copy first), else the attention stays on the calling
    thread and BLAS keeps its own threading (Accelerate, MKL, other systems).
    """
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = sorted({line.split(None, 5)[-1] for line in maps.splitlines()
                    if "/" in line and "openblas" in line.rsplit("/", 1)[-1].lower()},
                   key=lambda path: "numpy" not in path)
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    put.restype, put.argtypes = None, [ctypes.c_int]
                    return get, put
    return None


class _Workers:
    """A few threads splitting row ranges or work items (numpy releases the GIL in ufuncs and matmul)."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pulse-vision") if self.threads > 1 else None
        self.blas = _openblas_threads() if self._pool is not None else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def split(self, fn: Callable[[int, int], None], total: int) -> None:
        """``fn(start, stop)`` over ``range(total)`` in contiguous parts, a few per thread: a thread that the OS
        holds back (a shared machine) leaves its remaining parts to the others."""
        parts = min(self.threads * 4, total)
        if self._pool is None or parts <= 1:
            fn(0, total)
            return
        bounds = [total * k // parts for k in range(parts + 1)]
        futures = [self._pool.submit(fn, bounds[k], bounds[k + 1]) for k in range(parts)]
        for future in futures:
            future.result()

    def small_matmuls(self, fn: Callable[[int, int], None], total: int) -> None:
        """Like :meth:`split`, for work made of small matmuls: threads only when BLAS can be single-threaded."""
        if self.blas is None:
            fn(0, total)
            return
        get, put = self.blas
        before = get()
        put(1)
        try:
            self.split(fn, total)
        finally:
            put(before)


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


# -- the encoder -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    ln1_w: np.ndarray
    ln1_b: np.ndarray
    q_w: np.ndarray  # matrices: the file's float16 (memory-mapped) or float32; q is scaled after widening
    k_w: np.ndarray
    v_w: np.ndarray
    q_b: np.ndarray  # q's bias, pre-scaled; k's bias cancels in the softmax, v's is folded into out_b
    out_w: np.ndarray
    out_b: np.ndarray
    ln2_w: np.ndarray
    ln2_b: np.ndarray
    up_w: np.ndarray
    up_b: np.ndarray
    down_w: np.ndarray
    down_b: np.ndarray


@dataclass(frozen=True)
class VisionConfig:
    """The tower's shape, as the mmproj states it."""

    width: int
    heads: int
    ffn: int
    blocks: int
    image_size: int
    patch: int
    eps: float
    activation: str
    output_width: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


class VisionEncoder:
    """CLIP tower + projector in numpy float32, with the image parameters of the same mmproj."""

    def __init__(self, config: VisionConfig, weights: Mapping[str, np.ndarray], params: ImageParams,
                 source: str = "<memory>", threads: int | None = None) -> None:
        """``weights`` uses the mmproj tensor names (float32 or anything castable). Vectors are copied; float16 and
        float32 matrices are kept as given (views of the file's memory map, from ``from_gguf``) and only read.

        ``threads``: worker threads for attention and elementwise work (default: the CPUs this process may use).
        """
        self.config = config
        self.params = params
        self.source = source
        self.threads = threads or default_threads()
        c = config
        if c.width % c.heads:
            raise ModelError(f"{source}: vision width {c.width} is not divisible by {c.heads} heads.")
        if c.activation not in ACTIVATIONS:
            raise ModelError(f"{source}: vision activation {c.activation!r} is not supported "
                             f"(known: {', '.join(ACTIVATIONS)}).")

        def take(name: str, shape: tuple[int, ...], matrix: bool = False) -> np.ndarray:
            """A vector as an owned float32 copy; a ``matrix`` as the file holds it (float16 or float32, read-only
            views of the memory map kept as they are: never written, widened per use by ``_Widened``)."""
            if name not in weights:
                raise ModelError(f"{source}: tensor {name} is missing; convert the model again.")
            source_array = weights[name]
            dtype = source_array.dtype if matrix and source_array.dtype in (np.float16, F32) else F32
            array = np.ascontiguousarray(source_array, dtype=dtype)
            if not matrix and not array.flags.writeable:  # a view of the file's memory map: own a copy
                array = array.copy()
            if array.shape != shape:
                raise ModelError(f"{source}: tensor {name} has shape {list(array.shape)}, expected {list(shape)}; "
                                 "convert the model again.")
            return array

        d, f, p, h = c.width, c.ffn, c.patch, c.output_width
        self.class_embd = take("v.class_embd", (d,))
        self.patch_w = take("v.patch_embd.weight", (d, 3, p, p)).reshape(d, 3 * p * p)
        self.position = take("v.position_embd.weight", (c.patches + 1, d))
        self.pre_ln = (take("v.pre_ln.weight", (d,)), take("v.pre_ln.bias", (d,)))
        # HF scales q after its projection; folding the scale into q's weights is exact for head_dim 64 (1/8).
        scale = F32((d // c.heads) ** -0.5)
        self.blocks: list[_Block] = []
        for i in range(c.blocks):
            t = {n: f"v.blk.{i}.{n}" for n in _LAYER_NAMES}
            take(t["attn_k.bias"], (d,))  # present and well-shaped, but q.(k + b) - q.b is a per-row constant
            out_w, v_b = take(t["attn_out.weight"], (d, d), matrix=True), take(t["attn_v.bias"], (d,))
            # softmax rows sum to 1, so attention adds v's bias to every row unchanged: out_w @ v_b + out_b.
            out_b = (out_w.astype(np.float64) @ v_b + take(t["attn_out.bias"], (d,))).astype(F32)
            self.blocks.append(_Block(
                ln1_w=take(t["ln1.weight"], (d,)), ln1_b=take(t["ln1.bias"], (d,)),
                q_w=take(t["attn_q.weight"], (d, d), matrix=True), k_w=take(t["attn_k.weight"], (d, d), matrix=True),
                v_w=take(t["attn_v.weight"], (d, d), matrix=True),
                q_b=take(t["attn_q.bias"], (d,)) * scale, out_w=out_w, out_b=out_b,
                ln2_w=take(t["ln2.weight"], (d,)), ln2_b=take(t["ln2.bias"], (d,)),
                up_w=take(t["ffn_up.weight"], (f, d), matrix=True), up_b=take(t["ffn_up.bias"], (f,)),
                down_w=take(t["ffn_down.weight"], (d, f), matrix=True), down_b=take(t["ffn_down.bias"], (d,)),
            ))
        self.q_scale = scale
        self.mm0 = (take("mm.0.weight", (h, d), matrix=True), take("mm.0.bias", (h,)))
        self.mm2 = (take("mm.2.weight", (h, h), matrix=True), take("mm.2.bias", (h,)))
        self.image_newline = take("v.image_newline", (h,)) if "v.image_newline" in weights else None
        if params.merge_type == "spatial_unpad" and self.image_newline is None:
            raise ModelError(f"{source}: spatial_unpad merge needs v.image_newline, which is missing.")

    @property
    def output_width(self) -> int:
        """Width of the embeddings handed to the language model."""
        return self.config.output_width

    @classmethod
    def from_gguf(cls, path: Path | str, threads: int | None = None) -> VisionEncoder:
        """Load an mmproj written by ``pulse-edge convert``; weights dequantised to float32 once."""
        import gguf

        path = Path(path)
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # a damaged header fails the parser in many ways (IndexError, struct errors, ...)
            raise ModelError(f"{path}: cannot read it as GGUF ({type(exc).__name__}: {exc}); check the model with "
                             f"'pulse-edge models verify {path.parent}', then copy it again (or convert it "
                             "again).") from exc

        def field(key: str, default: Any = None) -> Any:
            item = reader.fields.get(key)
            if item is None:
                if default is None:
                    raise ModelError(f"{path}: key {key} is missing; it is not an mmproj written by "
                                     "`pulse-edge convert`, convert the model again.")
                return default
            return item.contents()

        projector = str(field("pulse.projector.type"))
        if projector != "mlp2x_gelu":
            raise ModelError(f"{path}: projector {projector!r} is not supported (PULSE uses mlp2x_gelu).")
        if str(field("pulse.vision.select_feature", "patch")) != "patch":
            raise ModelError(f"{path}: only the 'patch' select feature is supported.")
        config = VisionConfig(
            width=int(field("clip.vision.embedding_length")),
            heads=int(field("clip.vision.attention.head_count")),
            ffn=int(field("clip.vision.feed_forward_length")),
            blocks=int(field("clip.vision.block_count")),
            image_size=int(field("clip.vision.image_size")),
            patch=int(field("clip.vision.patch_size")),
            eps=float(field("clip.vision.attention.layer_norm_epsilon")),
            activation=str(field("pulse.vision.activation", "quick_gelu")),
            output_width=int(field("pulse.model.embedding_length")),
        )
        params = ImageParams(
            pinpoints=pairs([int(v) for v in field("pulse.image.grid_pinpoints")]),
            tile=int(field("pulse.image.tile_size")),
            patch=config.patch,
            mean=tuple(float(v) for v in field("clip.vision.image_mean")),
            std=tuple(float(v) for v in field("clip.vision.image_std")),
            merge_type=str(field("pulse.image.patch_merge_type", "flat")),
            aspect_ratio=str(field("pulse.image.aspect_ratio", "anyres")),
        )
        if params.tile != config.image_size:
            raise ModelError(f"{path}: tile size {params.tile} differs from the tower's image size "
                             f"{config.image_size}; convert the model again.")

        class _Lazy(Mapping[str, np.ndarray]):
            """Dequantise each tensor when the encoder takes it, so only one extra copy exists at a time."""

            def __init__(self, tensors: Any) -> None:
                self.tensors = {t.name: t for t in tensors}

            def __getitem__(self, name: str) -> np.ndarray:
                tensor = self.tensors[name]
                if tensor.tensor_type == gguf.GGMLQuantizationType.F16:
                    return np.asarray(tensor.data).view(np.float16)  # the encoder keeps or widens it
                try:
                    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                except NotImplementedError as exc:
                    raise ModelError(f"{path}: tensor {name} is {tensor.tensor_type.name}, which this reader "
                                     "cannot dequantise; convert with --mmproj-type f16, f32 or q8_0.") from exc

            def __contains__(self, name: object) -> bool:
                return name in self.tensors

            def __iter__(self) -> Any:
                return iter(self.tensors)

            def __len__(self) -> int:
                return len(self.tensors)

        # The class is cyclic garbage (freed only by the garbage collector): it must not hold the file's memory
        # map, whose pages would stay resident beside the language model. The encoder owns copies.
        weights = _Lazy(reader.tensors)
        try:
            return cls(config, weights, params, source=str(path), threads=threads)
        finally:
            weights.tensors.clear()

    # -- forward ---------------------------------------------------------------------------------
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Projected patch features: ``(n, 3, S, S)`` pixels -> ``(n, patches, output_width)`` float32."""
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (3, c.image_size, c.image_size):
            raise ImageError(f"pixels have shape {list(pixels.shape)}, expected [n, 3, {c.image_size}, "
                             f"{c.image_size}]; preprocess the image first.")
        n = pixels.shape[0]
        out = np.empty((n, c.patches, c.output_width), dtype=F32)
        workers = _Workers(self.threads)
        d, f, h = c.width, c.ffn, c.output_width
        widened = _Widened(workers, max(3 * d * d, f * d, h * d, h * h))
        try:
            for start in range(0, n, _MAX_BATCH):
                batch = pixels[start:start + _MAX_BATCH]
                out[start:start + len(batch)] = self._project(self._tower(batch, workers, widened), widened)
        finally:
            workers.close()
        return out

    def embed(self, image: Image.Image) -> tuple[np.ndarray, TilePlan]:
        """One image to the rows the language model receives, and the plan that made them."""
        pixels, plan = self.params.prepare(image)
        rows = merge(self.encode(pixels), plan, self.params.merge_type, self.image_newline)
        return rows, plan

    def _tower(self, pixels: np.ndarray, workers: _Workers, widened: _Widened) -> np.ndarray:
        """``(n, 3, S, S)`` -> ``(n * patches, width)``: the last block's output without the CLS rows."""
        c = self.config
        n, d, p = pixels.shape[0], c.width, c.patch
        side = c.image_size // p
        tokens = c.patches + 1
        rows = n * tokens
        # Conv 14x14 stride 14 without bias == a matmul over (c, ky, kx)-flattened patches, patches row-major.
        patches = pixels.astype(F32, copy=False).reshape(n, 3, side, p, side, p).transpose(0, 2, 4, 1, 3, 5)
        x3 = np.empty((n, tokens, d), dtype=F32)
        x3[:, 1:] = (patches.reshape(n * c.patches, 3 * p * p) @ self.patch_w.T).reshape(n, c.patches, d)
        x3[:, 0] = self.class_embd  # CLS first, then the patches: positions 0..576 in that order
        x3 += self.position
        x = x3.reshape(rows, d)
        h = np.empty_like(x)
        qkv = np.empty((rows, 3 * d), dtype=F32)
        ctx = np.empty((rows, d), dtype=F32)
        up = np.empty((rows, c.ffn), dtype=F32)
        activation = ACTIVATIONS[c.activation]
        attention = _Attention(qkv, ctx, n, tokens, d, c.heads)
        eps = c.eps

        workers.split(_norm(x, x, *self.pre_ln, eps), rows)
        workers.split(_norm(x, h, self.blocks[0].ln1_w, self.blocks[0].ln1_b, eps), rows)
        for k, blk in enumerate(self.blocks):
            qkv_w = widened(blk.q_w, blk.k_w, blk.v_w)  # always a copy: q's rows may be scaled in place
            qkv_w[:c.width] *= self.q_scale  # 1/8 for head_dim 64: a power of two, exact as HF's scaling of q
            np.matmul(h, qkv_w.T, out=qkv)
            attention.q_bias = blk.q_b
            workers.small_matmuls(attention, n * c.heads)
            np.matmul(ctx, widened(blk.out_w).T, out=h)
            workers.split(_norm(x, h, blk.ln2_w, blk.ln2_b, eps, residual_bias=blk.out_b), rows)
            np.matmul(h, widened(blk.up_w).T, out=up)
            workers.split(_biased(up, blk.up_b, activation), rows)
            np.matmul(up, widened(blk.down_w).T, out=h)
            if k + 1 < len(self.blocks):
                nxt = self.blocks[k + 1]
                workers.split(_norm(x, h, nxt.ln1_w, nxt.ln1_b, eps, residual_bias=blk.down_b), rows)
            else:
                x += h
                x += blk.down_b
        return x3[:, 1:].reshape(n * c.patches, d)

    def _project(self, features: np.ndarray, widened: _Widened) -> np.ndarray:
        w0, b0 = self.mm0
        w2, b2 = self.mm2
        hidden = features @ widened(w0).T
        # One thread: erf's many short numpy calls hold the GIL often enough that a second thread only waits.
        _biased(hidden, b0, gelu_)(0, hidden.shape[0])
        out = hidden @ widened(w2).T
        out += b2
        return out.reshape(-1, self.config.patches, self.config.output_width)


def _norm(x: np.ndarray, out: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
          residual_bias: np.ndarray | None = None) -> Callable[[int, int], None]:
    """Row-range job: ``out = LN(x)``, or with ``residual_bias``, ``x += out + residual_bias; out = LN(x)``."""

    def run(a: int, b: int) -> None:
        residual = None if residual_bias is None else (out[a:b], residual_bias)
        layer_norm(x[a:b], weight, bias, eps, out=out[a:b], residual=residual)

    return run


def _biased(x: np.ndarray, bias: np.ndarray, activation: Callable[[np.ndarray], np.ndarray]
            ) -> Callable[[int, int], None]:
    """Row-range job: ``x = activation(x + bias)`` in place."""

    def run(a: int, b: int) -> None:
        rows = max(1, _BLOCK // x.shape[1])
        for start in range(a, b, rows):
            part = x[start:min(start + rows, b)]
            part += bias
            activation(part)

    return run


class _Attention:
    """Softmax attention per (piece, head): ``fn(start, stop)`` over those items, for :class:`_Workers`.

    Each thread has its own score buffer (reused: no fresh pages per head). Scores are normalised after the
    matmul with v, on (t, head_dim) instead of (t, t) values.
    """

    def __init__(self, qkv: np.ndarray, out: np.ndarray, n: int, tokens: int, width: int, heads: int) -> None:
        import threading

        self.qkv, self.out, self.n, self.tokens, self.width, self.heads = qkv, out, n, tokens, width, heads
        self.head_dim = width // heads
        self.q_bias = np.zeros(width, dtype=F32)
        self._local = threading.local()

    def __call__(self, start: int, stop: int) -> None:
        t, d, hd, qkv = self.tokens, self.width, self.head_dim, self.qkv
        if not hasattr(self._local, "scores"):
            self._local.scores = np.empty((t, t), dtype=F32)
            self._local.values = np.empty((t, hd), dtype=F32)
        s, o = self._local.scores, self._local.values
        for item in range(start, stop):
            i, j = divmod(item, self.heads)
            rows = slice(i * t, (i + 1) * t)
            q = qkv[rows, j * hd:(j + 1) * hd]
            q += self.q_bias[j * hd:(j + 1) * hd]
            np.matmul(q, qkv[rows, d + j * hd:d + (j + 1) * hd].T, out=s)
            s -= s.max(axis=1, keepdims=True)
            exp_(s)
            total = s.sum(axis=1, keepdims=True)
            np.matmul(s, qkv[rows, 2 * d + j * hd:2 * d + (j + 1) * hd], out=o)
            np.divide(o, total, out=self.out[rows, j * hd:(j + 1) * hd])


def merge(features: np.ndarray, plan: TilePlan, merge_type: str, image_newline: np.ndarray | None = None) -> np.ndarray:
    """LLaVA's patch merge (``prepare_inputs_labels_for_multimodal``): ``(n, patches, w)`` -> ``(tokens, w)``.

    ``flat``: every piece's patches in order, base image first. ``spatial_unpad``: the base image's patches,
    then the tiles' patches as one (rows*24, cols*24) map, cropped back to the image's aspect ratio
    (``unpad_image``), row by row, each row followed by ``image_newline``.
    """
    n, patches, width = features.shape
    side = plan.patches_per_side
    if n != plan.n_images or patches != side * side:
        raise ImageError(f"features have shape {list(features.shape)} but the plan needs "
                         f"[{plan.n_images}, {side * side}, ...].")
    if merge_type == "flat":
        return np.ascontiguousarray(features.reshape(n * patches, width))
    if merge_type != "spatial_unpad":
        raise ModelError(f"patch merge type {merge_type!r} is not supported (known: flat, spatial_unpad).")
    if image_newline is None or image_newline.shape != (width,):
        raise ModelError(f"spatial_unpad merge needs an image_newline of width {width}.")
    cols, rows = plan.grid
    grid = features[1:].reshape(rows, cols, side, side, width).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * side, cols * side, width)
    (r0, r1), (c0, c1) = plan.unpad_rows, plan.unpad_cols
    out = np.empty((plan.tokens_spatial_unpad, width), dtype=features.dtype)
    out[:patches] = features[0]
    body = out[patches:].reshape(r1 - r0, c1 - c0 + 1, width)
    body[:, :-1] = grid[r0:r1, c0:c1]
    body[:, -1] = image_newline
    return out
