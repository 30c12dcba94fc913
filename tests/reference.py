"""The independent reference: PyTorch + transformers on the same checkpoint files (tests only).

Nothing here is shared with the runtime or the converter: it reads the Hugging Face checkpoint
with ``safetensors``/``transformers`` exactly as PULSE's own stack would.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

LM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(folder / shard)))
    return state


@lru_cache(maxsize=4)
def language_model(folder: Path) -> Any:
    """transformers' LlamaForCausalLM with the checkpoint's language-model weights, in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = _config(folder)
    config = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]), rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c.get("rope_theta", 10000.0), max_position_embeddings=c["max_position_embeddings"],
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"], pad_token_id=c.get("pad_token_id"),
        tie_word_embeddings=False, attention_bias=False, hidden_act=c.get("hidden_act", "silu"),
    )
    model = LlamaForCausalLM(config)
    state = {k: v.float() for k, v in checkpoint_state(folder).items() if k.startswith(LM_PREFIXES)}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@lru_cache(maxsize=4)
def tokenizer(folder: Path) -> Any:
    """transformers' LLaMA tokenizer from the checkpoint's own tokenizer.model + tokenizer_config.json.

    transformers 5 always builds the ``tokenizers`` (fast) version. PULSE's stack used the slow,
    SentencePiece-backed one (LLaVA loads ``use_fast=False``); the two differ on text that starts with
    whitespace (the fast one folds the leading space into the dummy prefix), see ``encode``.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@lru_cache(maxsize=4)
def _sentencepiece(folder: Path) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def encode(folder: Path, text: str, bos: bool = True) -> list[int]:
    """What PULSE's slow LlamaTokenizer gives for plain text: SentencePiece's own encoding, BOS first.

    For text without special-token markers this is what transformers' slow LlamaTokenizer produces with
    either ``legacy`` value: the non-legacy path re-adds the dummy prefix itself (the ``<unk>`` trick).
    """
    ids = list(_sentencepiece(folder).encode(text))
    return [1, *ids] if bos else ids


@lru_cache(maxsize=8)
def _slow_backend(folder: Path, legacy: bool) -> Any:
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=legacy, bos_token="<s>",
                                eos_token="</s>", unk_token="<unk>")


def slow_llama_encode(folder: Path, text: str, bos: bool = True, legacy: bool | None = None) -> list[int]:
    """PULSE's slow ``LlamaTokenizer`` (transformers 4.37, which LLaVA pins) on any text, special tokens included.

    transformers' SentencePiece backend splits the text on special tokens (``</s>`` becomes EOS) and, with
    ``legacy=False``, encodes each piece without SentencePiece's dummy prefix (the ``<unk>`` trick keeps a
    leading space). The 4.37 ``LlamaTokenizer.tokenize`` wrapper on top, restated here: non-legacy, the whole
    text is prefixed with "▁" (so only its start gets the word boundary), and a lone leading "▁" before a
    special token is dropped; legacy, every piece is encoded with the dummy prefix.
    ``legacy`` defaults to the checkpoint's tokenizer_config.json value (transformers' default: True).
    """
    if legacy is None:
        legacy = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("legacy", True))
    backend = _slow_backend(folder, legacy)
    if legacy or not text:
        tokens = backend.tokenize(text)
    else:
        tokens = backend.tokenize("\u2581" + text.replace("\u2581", " "))
        if len(tokens) > 1 and tokens[0] == "\u2581" and tokens[1] in backend.all_special_tokens:
            tokens = tokens[1:]
    ids = list(backend.convert_tokens_to_ids(tokens))
    return [1, *ids] if bos else ids


def next_token_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return language_model(folder)(torch.tensor([ids])).logits[0, -1].float()


def greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    """Greedy continuation, one full forward per step (no cache: the plainest possible reference)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(next_token_logits(folder, out).argmax()))
    return out[len(ids):]


# -- vision: LLaVA's own preprocessing, HF CLIP, the mlp2x_gelu projector, LLaVA's merge --------------------
@lru_cache(maxsize=1)
def llava_mm_utils() -> Any:
    """llava-torch's ``llava/mm_utils.py`` (select_best_resolution, process_anyres_image, ...).

    ``import llava`` runs ``llava/__init__.py``, which imports LLaVA's model code; when that fails against the
    installed transformers, the file is loaded by path with a bare ``llava`` package standing in, for the
    duration of the load only. Raises ``ModuleNotFoundError`` when llava-torch is not installed.
    """
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llava-torch is not installed", name="llava")
    try:
        import llava.mm_utils

        return llava.mm_utils
    except Exception:  # LLaVA's model imports failed: load the file itself
        pass
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {name: sys.modules.get(name) for name in ("llava", "llava.constants")}
    try:
        package = types.ModuleType("llava")
        package.__path__ = [str(root)]
        sys.modules["llava"] = package
        for name in ("constants", "mm_utils"):
            file_spec = importlib.util.spec_from_file_location(f"llava.{name}", root / f"{name}.py")
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[f"llava.{name}"] = module
            file_spec.loader.exec_module(module)
        return module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        sys.modules.pop("llava.mm_utils", None)


@lru_cache(maxsize=4)
def clip_processor(tower: Path) -> Any:
    """transformers' PIL/numpy CLIP image processor from the tower folder's preprocessor_config.json.

    transformers 5's ``CLIPImageProcessor`` is the torchvision backend; LLaVA (transformers 4.37) used the
    PIL/numpy one, which is ``CLIPImageProcessorPil`` now.
    """
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(tower))


def anyres_pixels(image: Any, tower: Path, pinpoints: list[list[int]]) -> torch.Tensor:
    """LLaVA's ``process_anyres_image`` on ``Image.convert('RGB')``, as its loaders open images."""
    return llava_mm_utils().process_anyres_image(image.convert("RGB"), clip_processor(tower), pinpoints)


@lru_cache(maxsize=4)
def clip_vision(tower: Path) -> Any:
    """HF ``CLIPVisionModel`` from the tower folder, float32, eager attention."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(tower), torch_dtype=torch.float32, attn_implementation="eager")
    return model.float().eval()


@lru_cache(maxsize=4)
def projector(folder: Path) -> torch.nn.Sequential:
    """LLaVA's mlp2x_gelu projector with the checkpoint's ``model.mm_projector.*`` weights, float32."""
    state = {k: v for k, v in checkpoint_state(folder).items() if k.startswith("model.mm_projector.")}
    w0, w2 = state["model.mm_projector.0.weight"], state["model.mm_projector.2.weight"]
    mlp = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0]), torch.nn.GELU(),
                              torch.nn.Linear(w2.shape[1], w2.shape[0]))
    mlp.load_state_dict({k.removeprefix("model.mm_projector."): v.float() for k, v in state.items()}, strict=True)
    return mlp.float().eval()


def image_features(folder: Path, tower: Path, pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA's ``encode_images``: ``hidden_states[select_layer][:, 1:]`` through the projector, float32."""
    select = int(_config(folder).get("mm_vision_select_layer", -2))
    with torch.no_grad():
        out = clip_vision(tower)(pixels.float(), output_hidden_states=True)
        return projector(folder)(out.hidden_states[select][:, 1:].float())


def image_newline(folder: Path) -> torch.Tensor:
    return checkpoint_state(folder)["model.image_newline"].float()


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """A transcription of LLaVA's ``llava_arch.unpad_image`` (``original_size`` is PIL's (width, height))."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def merge_features(features: torch.Tensor, image_size: tuple[int, int], pinpoints: list[list[int]], tile: int,
                   merge_type: str, newline: torch.Tensor | None = None,
                   unpad: Any = unpad_image) -> torch.Tensor:
    """LLaVA's ``prepare_inputs_labels_for_multimodal`` merge for one anyres image, with its torch ops."""
    if merge_type == "flat":
        return features.flatten(0, 1)
    assert merge_type == "spatial_unpad" and newline is not None
    base, tiles = features[0], features[1:]
    height = width = int(round(base.shape[0] ** 0.5))
    grid_w, grid_h = llava_mm_utils().get_anyres_image_grid_shape(image_size, pinpoints, tile)
    grid = tiles.view(grid_h, grid_w, height, width, -1)
    grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    grid = unpad(grid, image_size)
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)
    grid = grid.flatten(1, 2).transpose(0, 1)
    return torch.cat((base, grid), dim=0)
