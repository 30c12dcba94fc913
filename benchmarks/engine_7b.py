"""Engine benchmark on the 7B-shape model: one landscape 12-lead page (2,880 image tokens), 128 new tokens.

    python benchmarks/engine_7b.py --model DIR [--quants Q4_K_M ...] [--image PNG] [--repeat N]

For each quant, in separate processes (so each peak RSS is its own):
  engine  pulse-edge's Reader: vision, image prefill, two questions (the second from the cached image)
  raw     llama.cpp alone, as its own defaults load it (memory-mapped, flash attention auto), decoding the
          same number of input-embedding positions and question tokens, then generating as many tokens
  vision  the numpy CLIP encoder alone on the same image
  torch   PULSE's own stack (torch + transformers, bf16, CPU) on the same image, questions and budget, from the
          checkpoint (``--checkpoint``): LLaVA's anyres preprocessing, CLIP and projector, then the language
          model from ``inputs_embeds`` with a KV cache, greedy (needs the test extra; ONEDNN_MAX_CPU_ISA honoured)
Also records the CPU that other processes used during each run. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import median, python, run_measured, save  # noqa: E402
from pulse_edge.llm import physical_cores  # noqa: E402
from pulse_edge.native import llama_cpp  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "ecg-real-scans" / "ecg00053.png"
QUESTIONS = ["What are the main findings of this ECG?", "Is there atrial fibrillation?"]


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def child_engine(model: str, quant: str, image: Path, max_tokens: int, kv_type: str = "f16",
                 n_ctx: int = 0) -> dict[str, Any]:
    """``n_ctx``: make every context at least this big (the issue's "at a 4096 context"; the engine itself
    sizes it to the image, the prompt and the answer budget)."""
    from pulse_edge.inputs import load
    from pulse_edge.model import resolve
    from pulse_edge.reader import Generation, Reader

    memory = {"start": rss_gib()}
    start = time.perf_counter()
    reader = Reader(resolve(model, quant), kv_type=kv_type)
    load_s = time.perf_counter() - start
    memory["loaded (weights mapped; vision encoder checked, then released)"] = rss_gib()
    ensure_context = reader.llm.ensure_context
    reader.llm.ensure_context = lambda n: ensure_context(max(n, n_ctx))  # type: ignore[method-assign]
    reading = reader.read(load(image, 1)[0].image, QUESTIONS, generation=Generation(max_tokens=max_tokens))
    memory["after reading (+ KV cache, compute buffers)"] = rss_gib()
    memory["peak (VmHWM)"] = hwm_gib()
    first, second = reading.answers
    t = reading.timings
    ttft_1 = t["vision_s"] + t["image_prefill_s"] + first.time_to_first_token_s
    return {
        "load_s": load_s,
        "image_tokens": reading.image_tokens,
        "vision_s": t["vision_s"],
        "image_prefill_s": t["image_prefill_s"],
        "prefill_tok_s": t["image_prefill_tok_s"],
        "generated_tokens": first.tokens,
        "generation_tok_s": first.tokens / first.generation_s,
        "time_to_first_token_s": ttft_1,
        "total_s": t["vision_s"] + t["image_prefill_s"] + first.prefill_s + first.generation_s,
        "second_question_ttft_s": second.time_to_first_token_s,
        "second_over_first_ttft": second.time_to_first_token_s / ttft_1,
        "rss_gib_by_stage": memory,
        "kv_type": kv_type,
        "n_ctx": reader.llm.n_ctx,
        "llama_system_info": llama_cpp().llama_print_system_info().decode(),
    }


def hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def child_raw(model: str, quant: str, positions: int, question_tokens: int, max_tokens: int,
              like_engine: bool = False) -> dict[str, Any]:
    """llama.cpp with its own defaults (or, with ``like_engine``, pulse-edge's settings: no repack buffers,
    flash attention off); the same decode work as the engine's first question."""
    import ctypes

    import numpy as np

    from pulse_edge.model import resolve
    from pulse_edge.native import llama_cpp

    lib = llama_cpp()
    files = resolve(model, quant)
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    if like_engine:
        mparams.use_extra_bufts = False
    start = time.perf_counter()
    llm_model = lib.llama_model_load_from_file(str(files.language_model).encode(), mparams)
    load_s = time.perf_counter() - start
    vocab = lib.llama_model_get_vocab(llm_model)
    n_embd = lib.llama_model_n_embd(llm_model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = 4096
    cparams.n_batch = 512
    cparams.n_ubatch = 512
    if like_engine:
        cparams.flash_attn_type = 0
    ctx = lib.llama_init_from_model(llm_model, cparams)
    rows = (np.random.default_rng(0).standard_normal((positions, n_embd)) * 0.02).astype(np.float32)
    pos = 0

    def decode_embd(chunk: np.ndarray, want_logits: bool) -> None:
        nonlocal pos
        batch = lib.llama_batch_init(len(chunk), n_embd, 1)
        batch.n_tokens = len(chunk)
        ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
        for i in range(len(chunk)):
            batch.pos[i], batch.n_seq_id[i], batch.logits[i] = pos + i, 1, want_logits and i == len(chunk) - 1
            batch.seq_id[i][0] = 0
        assert lib.llama_decode(ctx, batch) == 0
        lib.llama_batch_free(batch)
        pos += len(chunk)

    def decode_tokens(tokens: list[int]) -> None:
        nonlocal pos
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
        assert lib.llama_decode(ctx, batch) == 0
        lib.llama_batch_free(batch)
        pos += len(tokens)

    start = time.perf_counter()
    for begin in range(0, positions, 512):
        decode_embd(rows[begin:begin + 512], False)
    decode_tokens(list(range(100, 100 + question_tokens)))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(max_tokens):
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        decode_tokens([int(logits.argmax())])
    generation_s = time.perf_counter() - start
    return {"load_s": load_s, "prefill_s": prefill_s, "prefill_tok_s": (positions + question_tokens) / prefill_s,
            "generation_tok_s": max_tokens / generation_s, "rss_gib_end": rss_gib()}


def child_vision(model: str, image: Path) -> dict[str, Any]:
    from pulse_edge.inputs import load
    from pulse_edge.model import resolve
    from pulse_edge.vision import VisionEncoder

    encoder = VisionEncoder.from_gguf(resolve(model).mmproj)
    picture = load(image, 1)[0].image
    times = []
    for _ in range(2):
        start = time.perf_counter()
        rows, plan = encoder.embed(picture)
        times.append(time.perf_counter() - start)
    return {"tiles_with_base": plan.n_images, "seconds": times, "rss_gib": rss_gib()}


def child_torch(checkpoint: Path, image: Path, max_tokens: int) -> dict[str, Any]:
    """PULSE's stack as its code runs it on a CPU: everything in bfloat16, sdpa attention, greedy with a KV cache.

    LLaVA's ``generate`` does the same work: one forward over the whole input, then one token at a time.
    """
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    from convert.synthetic import SHAPES, clip_config, clip_preprocessor_config
    from pulse_edge.inputs import load
    from tests import reference, reference_llava

    torch.set_num_threads(physical_cores())
    memory = {"start": rss_gib()}
    config = json.loads((checkpoint / "config.json").read_text())
    shape = SHAPES["7b"] if config["hidden_size"] == SHAPES["7b"]["llm"]["hidden_size"] else SHAPES["tiny"]
    start = time.perf_counter()
    lm = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16).eval()
    tower_prefix = "model.vision_tower.vision_tower."
    from safetensors import safe_open

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {k: v for k, v in index.items() if k.startswith((tower_prefix, "model.mm_projector."))}
    state: dict[str, Any] = {}
    for shard in sorted(set(wanted.values())):
        with safe_open(str(checkpoint / shard), framework="pt") as handle:
            state.update({k: handle.get_tensor(k) for k in wanted if wanted[k] == shard})
    clip = CLIPVisionModel(CLIPVisionConfig(**clip_config(shape)["vision_config"])).to(torch.bfloat16).eval()
    clip.load_state_dict({k.removeprefix(tower_prefix): v for k, v in state.items() if k.startswith(tower_prefix)},
                         strict=False)
    w0, w2 = state["model.mm_projector.0.weight"], state["model.mm_projector.2.weight"]
    projector = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0]), torch.nn.GELU(),
                                    torch.nn.Linear(w2.shape[1], w2.shape[0])).to(torch.bfloat16).eval()
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items()
                               if k.startswith("model.mm_projector.")})
    del state
    load_s = time.perf_counter() - start
    memory["loaded"] = rss_gib()
    processor = CLIPImageProcessorPil(**clip_preprocessor_config(shape))
    picture = load(image, 1)[0].image
    table = lm.get_input_embeddings().weight
    with torch.inference_mode():
        start = time.perf_counter()
        pixels = reference.llava_mm_utils().process_anyres_image(picture.convert("RGB"), processor,
                                                                 config["image_grid_pinpoints"])
        hidden = clip(pixels.to(torch.bfloat16), output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]]
        rows = projector(hidden[:, 1:]).flatten(0, 1)
        vision_s = time.perf_counter() - start
        ids = reference_llava.input_ids(checkpoint, reference_llava.llava_prompt([(QUESTIONS[0], None)]))
        at = ids.index(reference_llava.IMAGE_TOKEN_INDEX)
        embeds = torch.cat([table[ids[:at]], rows, table[ids[at + 1:]]])[None]
        start = time.perf_counter()
        out = lm(inputs_embeds=embeds, use_cache=True)
        prefill_s = time.perf_counter() - start
        memory["after prefill"] = rss_gib()
        cache, token = out.past_key_values, out.logits[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(max_tokens - 1):  # the first token came with the prefill
            out = lm(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax()
        generation_s = time.perf_counter() - start
    return {"load_s": load_s, "image_tokens": int(rows.shape[0]), "vision_s": vision_s,
            "prefill_tok_s": embeds.shape[1] / prefill_s, "generation_tok_s": (max_tokens - 1) / generation_s,
            "time_to_first_token_s": vision_s + prefill_s, "total_s": vision_s + prefill_s + generation_s,
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "rss_gib_by_stage": memory}


CHILDREN = ("engine", "engine-q8_0", "raw", "raw-like-engine", "vision", "torch")


def run_child(args: list[str]) -> tuple[dict[str, Any], Any]:
    out = Path("/tmp/pulse-edge-bench-child.json")
    run = run_measured([python(), __file__, "--child-out", str(out), *args])
    if run.returncode != 0:
        raise SystemExit(f"child {args} failed ({run.returncode})")
    return json.loads(out.read_text()), run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quants", nargs="+", default=["Q4_K_M"])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--parts", nargs="+", default=["vision", "engine", "raw"])
    parser.add_argument("--name", default="engine_7b")
    parser.add_argument("--checkpoint", type=Path, help="the safetensors checkpoint, for the torch part")
    parser.add_argument("--child", choices=list(CHILDREN))
    parser.add_argument("--n-ctx", type=int, default=4096, help="smallest context for the engine parts")
    parser.add_argument("--child-out", type=Path)
    parser.add_argument("--quant")
    parser.add_argument("--positions", type=int, default=2951)
    parser.add_argument("--question-tokens", type=int, default=30)
    args = parser.parse_args()
    if args.child:
        result = {
            "engine": lambda: child_engine(args.model, args.quant, args.image, args.max_tokens, "f16", args.n_ctx),
            "engine-q8_0": lambda: child_engine(args.model, args.quant, args.image, args.max_tokens, "q8_0",
                                                args.n_ctx),
            "raw": lambda: child_raw(args.model, args.quant, args.positions, args.question_tokens, args.max_tokens),
            "raw-like-engine": lambda: child_raw(args.model, args.quant, args.positions, args.question_tokens,
                                                 args.max_tokens, like_engine=True),
            "vision": lambda: child_vision(args.model, args.image),
            "torch": lambda: child_torch(args.checkpoint, args.image, args.max_tokens),
        }[args.child]()
        args.child_out.write_text(json.dumps(result))
        return 0

    report: dict[str, Any] = {"image": str(args.image), "max_tokens": args.max_tokens, "quants": {}}
    if "vision" in args.parts:
        runs = [run_child(["--child", "vision", "--model", args.model, "--image", str(args.image)])
                for _ in range(args.repeat)]
        report["vision"] = {"runs": [r for r, _ in runs], "others_cpu_s": [m.others_cpu_s for _, m in runs],
                            "median_s": median([min(r["seconds"]) for r, _ in runs])}
        print("vision", json.dumps(report["vision"]), flush=True)  # noqa: T201 - a benchmark's report
    for quant in args.quants:
        entry: dict[str, Any] = {}
        for part in [p for p in args.parts if p != "vision"]:
            common = ["--model", args.model, "--quant", quant, "--max-tokens", str(args.max_tokens),
                      "--positions", str(args.positions)]
            extra = ["--image", str(args.image), "--n-ctx", str(args.n_ctx)]
            if part == "torch":
                extra += ["--checkpoint", str(args.checkpoint)]
            runs = [run_child(["--child", part, *common, *extra]) for _ in range(args.repeat)]
            entry[part] = {
                "runs": [r for r, _ in runs],
                "peak_rss_gib": [m.peak_rss_gib for _, m in runs],
                "wall_s": [m.wall_s for _, m in runs],
                "others_cpu_s": [m.others_cpu_s for _, m in runs],
                "median": {k: median([r[k] for r, _ in runs]) for k in runs[0][0] if isinstance(runs[0][0][k], float)},
            }
            print(quant, part, json.dumps(entry[part]), flush=True)  # noqa: T201
        report["quants"][quant] = entry
    path = save(args.name, report)
    print(f"wrote {path}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
