"""The vision half: PULSE's CLIP tower + mlp2x_gelu projector -> an mmproj GGUF.

The file carries the keys and tensor names llama.cpp's ``clip.cpp`` reads, so llama.cpp's own
tools can open it, and ``pulse.*`` keys with everything this project's runtime needs to
reproduce LLaVA's anyres preprocessing exactly. Only the layers up to the select layer are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convert.checkpoint import TensorStore, looks_like_repo_id, read_json, resolve_in_hf_cache
from pulse_edge.errors import ConversionError

# Prefix of the tower's tensors inside a LLaVA checkpoint, and inside a stand-alone CLIP folder.
CHECKPOINT_PREFIX = "model.vision_tower.vision_tower.vision_model."
FOLDER_PREFIX = "vision_model."

# Towers whose config is known without their folder: the published CLIP configs.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
}

TOWER_TENSORS = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
LAYER_TENSORS = {
    "encoder.layers.{i}.layer_norm1.{p}": "v.blk.{i}.ln1.{p}",
    "encoder.layers.{i}.self_attn.q_proj.{p}": "v.blk.{i}.attn_q.{p}",
    "encoder.layers.{i}.self_attn.k_proj.{p}": "v.blk.{i}.attn_k.{p}",
    "encoder.layers.{i}.self_attn.v_proj.{p}": "v.blk.{i}.attn_v.{p}",
    "encoder.layers.{i}.self_attn.out_proj.{p}": "v.blk.{i}.attn_out.{p}",
    "encoder.layers.{i}.layer_norm2.{p}": "v.blk.{i}.ln2.{p}",
    "encoder.layers.{i}.mlp.fc1.{p}": "v.blk.{i}.ffn_up.{p}",
    "encoder.layers.{i}.mlp.fc2.{p}": "v.blk.{i}.ffn_down.{p}",
}
PROJECTOR_TENSORS = {
    "model.mm_projector.0.weight": "mm.0.weight",
    "model.mm_projector.0.bias": "mm.0.bias",
    "model.mm_projector.2.weight": "mm.2.weight",
    "model.mm_projector.2.bias": "mm.2.bias",
    "model.image_newline": "v.image_newline",
}
# LLaVA projector types -> what clip.cpp calls them.
PROJECTORS = {"mlp2x_gelu": "mlp"}
MMPROJ_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}
_ACTIVATIONS = {"quick_gelu": False, "gelu": True}  # -> clip.use_gelu


@dataclass(frozen=True)
class Tower:
    """A CLIP vision tower: its config, where its weights are, and how to name them."""

    config: dict[str, Any]
    source: str
    store: TensorStore
    prefix: str

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def patches(self) -> int:
        return (int(self.config["image_size"]) // int(self.config["patch_size"])) ** 2


def _folder_config(folder: Path) -> dict[str, Any]:
    config = read_json(folder / "config.json")
    vision = dict(config.get("vision_config") or config)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        pre_config = read_json(pre)
        for key in ("image_mean", "image_std"):
            if key in pre_config:
                vision[key] = pre_config[key]
    defaults = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]
    for key in ("image_mean", "image_std", "layer_norm_eps", "hidden_act", "projection_dim"):
        vision.setdefault(key, defaults[key])
    return vision


def find_tower(config: dict[str, Any], checkpoint: Path, store: TensorStore, vision_tower: Path | None) -> Tower:
    """Vision config from ``--vision-tower``, a local ``mm_vision_tower`` folder, the HF cache, or the table;
    weights from the checkpoint when it has them, else from that folder."""
    name = str(config.get("mm_vision_tower") or "")
    folder: Path | None = None
    if vision_tower is not None:
        if not (vision_tower / "config.json").is_file():
            raise ConversionError(f"--vision-tower {vision_tower}: no config.json there; pass a CLIP model folder.")
        folder = vision_tower
    elif name and Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif looks_like_repo_id(name):
        folder = resolve_in_hf_cache(name)
    if folder is not None:
        tower_config, source = _folder_config(folder), str(folder)
    elif name in KNOWN_TOWERS:
        tower_config, source = dict(KNOWN_TOWERS[name]), name
    else:
        raise ConversionError(
            f"{checkpoint / 'config.json'}: vision tower {name!r} is not a local folder and not a known tower; "
            "pass its folder with --vision-tower DIR."
        )
    if any(True for _ in store.names(CHECKPOINT_PREFIX)):
        return Tower(tower_config, source, store, CHECKPOINT_PREFIX)
    if folder is None:
        raise ConversionError(
            f"{checkpoint} holds no vision tower weights ({CHECKPOINT_PREFIX}*) and {name!r} is not on this machine; "
            "pass the CLIP folder with --vision-tower DIR."
        )
    tower_store = TensorStore(folder)
    if not any(True for _ in tower_store.names(FOLDER_PREFIX)):
        raise ConversionError(f"{folder} holds no CLIP vision weights ({FOLDER_PREFIX}*); pass a CLIP model folder.")
    return Tower(tower_config, source, tower_store, FOLDER_PREFIX)


def kept_layers(config: dict[str, Any], tower: Tower) -> int:
    """How many CLIP layers the select layer uses (-2 of 24 -> 23: hidden_states[23])."""
    total = int(tower.config["num_hidden_layers"])
    select = int(config.get("mm_vision_select_layer", -2))
    kept = total + 1 + select if select < 0 else select
    if not 0 < kept <= total:
        raise ConversionError(f"mm_vision_select_layer {select} is outside a {total}-layer vision tower.")
    return kept


def plan(
    config: dict[str, Any], tower: Tower, checkpoint: TensorStore, lm_hidden: int
) -> list[tuple[TensorStore, str, str, tuple[int, ...]]]:
    """(store, source name, GGUF name, expected shape) for every mmproj tensor, in file order."""
    c = tower.config
    d, f, p = tower.hidden, int(c["intermediate_size"]), int(c["patch_size"])
    mm_hidden = int(config.get("mm_hidden_size", d))
    if mm_hidden != d:
        raise ConversionError(f"config.json mm_hidden_size {mm_hidden} disagrees with the vision tower's width {d}.")
    shapes: dict[str, tuple[int, ...]] = {
        "v.class_embd": (d,),
        "v.patch_embd.weight": (d, 3, p, p),
        "v.position_embd.weight": (tower.patches + 1, d),
        "v.pre_ln.weight": (d,),
        "v.pre_ln.bias": (d,),
        "ln1": (d,), "attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_out": (d, d),
        "ln2": (d,), "ffn_up": (f, d), "ffn_down": (d, f),
        "mm.0.weight": (lm_hidden, d), "mm.0.bias": (lm_hidden,),
        "mm.2.weight": (lm_hidden, lm_hidden), "mm.2.bias": (lm_hidden,),
        "v.image_newline": (lm_hidden,),
    }
    out = [(tower.store, tower.prefix + hf, gg, shapes[gg]) for hf, gg in TOWER_TENSORS.items()]
    for i in range(kept_layers(config, tower)):
        for hf, gg in LAYER_TENSORS.items():
            weight = shapes[gg.split(".")[3]]
            for part, shape in (("weight", weight), ("bias", weight[:1])):
                out.append((tower.store, tower.prefix + hf.format(i=i, p=part), gg.format(i=i, p=part), shape))
    out += [(checkpoint, hf, gg, shapes[gg]) for hf, gg in PROJECTOR_TENSORS.items()]
    for store, hf, _, shape in out:
        entry = store.entry(hf)
        if entry.shape != shape:
            raise ConversionError(
                f"{entry.file}: tensor {hf} has shape {list(entry.shape)} but the configs imply {list(shape)}; "
                "the weights and config.json do not belong together."
            )
    return out


def _target_type(shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    # 1-D tensors stay F32 (clip.cpp adds them to F32 activations); Q8_0 needs 2-D rows of 32.
    if len(shape) == 1 or kind == gguf.GGMLQuantizationType.F32:
        return gguf.GGMLQuantizationType.F32
    if kind == gguf.GGMLQuantizationType.Q8_0 and len(shape) == 2 and shape[-1] % 32 == 0:
        return kind
    return gguf.GGMLQuantizationType.F16


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_mmproj(
    path: Path,
    *,
    config: dict[str, Any],
    tower: Tower,
    checkpoint: TensorStore,
    lm_hidden: int,
    name: str,
    mmproj_type: str,
    extra: dict[str, str],
    progress: Callable[[int], None],
) -> None:
    """Write the vision tower (up to the select layer) and the projector as an mmproj GGUF."""
    c = tower.config
    projector = str(config.get("mm_projector_type", "linear"))
    if projector not in PROJECTORS:
        raise ConversionError(f"mm_projector_type {projector!r} is not supported (PULSE uses mlp2x_gelu).")
    activation = str(c.get("hidden_act", "quick_gelu"))
    if activation not in _ACTIVATIONS:
        raise ConversionError(f"vision tower activation {activation!r} is not supported (CLIP uses quick_gelu).")
    if str(config.get("mm_vision_select_feature", "patch")) != "patch":
        raise ConversionError("mm_vision_select_feature other than 'patch' is not supported (PULSE uses 'patch').")
    kind = MMPROJ_TYPES[mmproj_type]
    tensors = plan(config, tower, checkpoint, lm_hidden)
    kept = kept_layers(config, tower)
    pinpoints = [int(v) for pair in config.get("image_grid_pinpoints") or [] for v in pair]

    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name(name)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[mmproj_type])
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", PROJECTORS[projector])
    writer.add_uint32("clip.vision.image_size", int(c["image_size"]))
    writer.add_uint32("clip.vision.patch_size", int(c["patch_size"]))
    writer.add_uint32("clip.vision.embedding_length", tower.hidden)
    writer.add_uint32("clip.vision.feed_forward_length", int(c["intermediate_size"]))
    writer.add_uint32("clip.vision.projection_dim", int(c.get("projection_dim", lm_hidden)))
    writer.add_uint32("clip.vision.block_count", kept)
    writer.add_uint32("clip.vision.attention.head_count", int(c["num_attention_heads"]))
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(c.get("layer_norm_eps", 1e-5)))
    writer.add_array("clip.vision.image_mean", [float(v) for v in c["image_mean"]])
    writer.add_array("clip.vision.image_std", [float(v) for v in c["image_std"]])
    writer.add_bool("clip.use_gelu", _ACTIVATIONS[activation])
    if pinpoints:
        writer.add_array("clip.vision.image_grid_pinpoints", pinpoints)
    # Without it clip.cpp stops one layer short of LLaVA's select layer (llama.cpp issue 25817).
    writer.add_array("clip.vision.feature_layer", [kept])
    merge = str(config.get("mm_patch_merge_type", "flat"))
    writer.add_string("clip.vision.mm_patch_merge_type", merge)
    # What this project's runtime reads to redo LLaVA's preprocessing exactly.
    writer.add_int32("pulse.vision.select_layer", int(config.get("mm_vision_select_layer", -2)))
    writer.add_uint32("pulse.vision.source_block_count", int(c["num_hidden_layers"]))
    writer.add_string("pulse.vision.select_feature", "patch")
    writer.add_string("pulse.vision.activation", activation)
    writer.add_string("pulse.vision.tower", tower.source)
    writer.add_string("pulse.projector.type", projector)
    writer.add_string("pulse.image.aspect_ratio", str(config.get("image_aspect_ratio", "square")))
    writer.add_string("pulse.image.patch_merge_type", merge)
    if pinpoints:
        writer.add_array("pulse.image.grid_pinpoints", pinpoints)
    writer.add_uint32("pulse.image.tile_size", int(c["image_size"]))
    writer.add_array("pulse.image.pad_color", [0, 0, 0])
    writer.add_uint32("pulse.model.embedding_length", lm_hidden)
    for key, value in extra.items():
        writer.add_string(key, value)

    stored: list[tuple[TensorStore, str, gguf.GGMLQuantizationType]] = []
    for store, hf, gg, shape in tensors:
        qtype = _target_type(shape, kind)
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(gg, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        stored.append((store, hf, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for store, hf, qtype in stored:
        writer.write_tensor_data(_encode(store.load(hf), qtype))
        progress(store.entry(hf).nbytes)
    writer.close()


def source_bytes(tensors: list[tuple[TensorStore, str, str, tuple[int, ...]]]) -> int:
    return sum(store.entry(hf).nbytes for store, hf, _, _ in tensors)
