"""The language model half: PULSE's LLaMA weights and vocabulary -> a llama GGUF."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convert.checkpoint import TensorStore, read_json
from convert.safetensors import f32_to_bf16_bits
from convert.tokenizer import Vocabulary
from pulse_edge.errors import ConversionError
from pulse_edge.prompt import LLAVA_V1, jinja_chat_template

# Architectures this converter knows, by config.json "architectures[0]": the GGUF arch they become.
ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama"}

# Hugging Face tensor name -> GGUF tensor name ("{i}" is the layer).
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSORS = {
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

# Types written straight from the checkpoint: file type, numpy storage dtype, GGML tensor type of 2-D weights.
FILE_TYPES = {
    "F32": (gguf.LlamaFileType.ALL_F32, np.float32, gguf.GGMLQuantizationType.F32),
    "F16": (gguf.LlamaFileType.MOSTLY_F16, np.float16, gguf.GGMLQuantizationType.F16),
    "BF16": (gguf.LlamaFileType.MOSTLY_BF16, np.uint16, gguf.GGMLQuantizationType.BF16),
}


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters read from config.json (never assumed)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor name of the language model with the shape the config implies."""
        h, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        per_layer = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes


def _require(config: dict[str, Any], key: str, config_path: Path) -> Any:
    if key not in config:
        raise ConversionError(f"{config_path} has no {key!r}; this is not a complete PULSE/LLaVA config.")
    return config[key]


def read_shape(config: dict[str, Any], config_path: Path) -> LlamaShape:
    """Check the architecture and read the LLaMA hyper-parameters from config.json."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if archs[0] not in ARCHITECTURES:
        raise ConversionError(
            f"{config_path}: unknown architecture {archs[0]!r}; pulse-edge converts "
            f"{', '.join(ARCHITECTURES)} checkpoints (PULSE-7B, PULSE-7B-unfreeze-vit)."
        )
    if config.get("rope_scaling"):
        raise ConversionError(f"{config_path}: rope_scaling {config['rope_scaling']} is not supported (PULSE has none).")
    heads = int(_require(config, "num_attention_heads", config_path))
    return LlamaShape(
        hidden=int(_require(config, "hidden_size", config_path)),
        intermediate=int(_require(config, "intermediate_size", config_path)),
        layers=int(_require(config, "num_hidden_layers", config_path)),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab=int(_require(config, "vocab_size", config_path)),
        context=int(_require(config, "max_position_embeddings", config_path)),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
    )


def check_tensors(store: TensorStore, shapes: dict[str, tuple[int, ...]]) -> int:
    """Fail before writing anything if a tensor is missing or mis-shaped; return the bytes to read."""
    total = 0
    for name, shape in shapes.items():
        entry = store.entry(name)
        if entry.shape != shape:
            raise ConversionError(
                f"{entry.file}: tensor {name} has shape {list(entry.shape)} but config.json implies {list(shape)}; "
                "the weights and config.json do not belong together."
            )
        total += entry.nbytes
    return total


def check_vocabulary(vocab: Vocabulary, shape: LlamaShape, folder: Path) -> None:
    """The tokenizer must have exactly one piece per embedding row."""
    if len(vocab.tokens) != shape.vocab:
        raise ConversionError(
            f"{folder / 'tokenizer.model'} has {len(vocab.tokens)} pieces but config.json says vocab_size "
            f"{shape.vocab}; the tokenizer does not belong to these weights."
        )


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # HF stores q/k rows with the two rotary halves of each head apart; ggml's rope wants them interleaved.
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(shape: LlamaShape) -> list[tuple[str, str]]:
    """(HF name, GGUF name) in file order: embeddings, the layers, the final norm, the output."""
    names = [("model.embed_tokens.weight", GLOBAL_TENSORS["model.embed_tokens.weight"])]
    for i in range(shape.layers):
        names += [(hf.format(i=i), gg.format(i=i)) for hf, gg in LAYER_TENSORS.items()]
    names += [(hf, GLOBAL_TENSORS[hf]) for hf in ("model.norm.weight", "lm_head.weight")]
    return names


def _transform(hf_name: str, data: np.ndarray, shape: LlamaShape) -> np.ndarray:
    if hf_name.endswith("q_proj.weight"):
        return _rope_permute(data, shape.heads)
    if hf_name.endswith("k_proj.weight"):
        return _rope_permute(data, shape.kv_heads)
    return data


def read_special_tokens(folder: Path) -> dict[str, bool]:
    """``add_bos_token``/``add_eos_token`` from tokenizer_config.json (LLaMA defaults when absent)."""
    path = folder / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    return {
        "add_bos": bool(config.get("add_bos_token", True)),
        "add_eos": bool(config.get("add_eos_token", False)),
        # transformers' slow LlamaTokenizer: legacy=False adds no dummy space after a special token
        # (e.g. "</s>USER" in a multi-turn prompt); its default is True.
        "legacy": bool(config.get("legacy", True)),
    }


def write_language_model(
    path: Path,
    *,
    store: TensorStore,
    shape: LlamaShape,
    vocab: Vocabulary,
    folder: Path,
    config: dict[str, Any],
    name: str,
    file_type: str,
    extra: dict[str, str],
    progress: Callable[[int], None],
) -> None:
    """Stream every tensor of the language model into a F32, F16 or BF16 GGUF at ``path``."""
    ftype, dtype, matrix_type = FILE_TYPES[file_type]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(int(ftype))
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_vocab_size(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_bos_token_id(int(config.get("bos_token_id", vocab.bos_id)))
    writer.add_eos_token_id(int(config.get("eos_token_id", vocab.eos_id)))
    pad = config.get("pad_token_id")
    if pad is not None:
        writer.add_pad_token_id(int(pad))
    special = read_special_tokens(folder)
    writer.add_add_bos_token(special["add_bos"])
    writer.add_add_eos_token(special["add_eos"])
    writer.add_bool("pulse.tokenizer.legacy", special["legacy"])
    writer.add_add_space_prefix(vocab.add_dummy_prefix)
    writer.add_chat_template(jinja_chat_template(LLAVA_V1))
    writer.add_string("pulse.prompt.template", LLAVA_V1.id)
    for key, value in extra.items():
        writer.add_string(key, value)

    plan = _gguf_tensors(shape)
    shapes = shape.tensor_shapes()
    for hf, gg in plan:
        # 1-D tensors (norms) stay F32 as llama.cpp expects.
        out, kind = (np.float32, gguf.GGMLQuantizationType.F32) if len(shapes[hf]) == 1 else (dtype, matrix_type)
        nbytes = int(np.prod(shapes[hf])) * np.dtype(out).itemsize
        writer.add_tensor_info(gg, shapes[hf], np.dtype(np.float32), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf, _ in plan:
        data = store.load(hf, shapes[hf])
        out_dtype = np.float32 if data.ndim == 1 else dtype
        permuted = _transform(hf, data, shape)
        # bf16 -> f32 was exact, so rounding back to bf16 returns the checkpoint's own bits.
        converted = f32_to_bf16_bits(permuted) if out_dtype == np.uint16 else permuted.astype(out_dtype)
        if out_dtype == np.float16 and not np.isfinite(converted).all():
            raise ConversionError(
                f"{store.entry(hf).file}: tensor {hf} has values beyond float16's range; convert with --quant F32."
            )
        writer.write_tensor_data(np.ascontiguousarray(converted))
        progress(store.entry(hf).nbytes)
        del data, permuted, converted
    writer.close()
