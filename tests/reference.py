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


def next_token_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return language_model(folder)(torch.tensor([ids])).logits[0, -1].float()


def greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    """Greedy continuation, one full forward per step (no cache: the plainest possible reference)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(next_token_logits(folder, out).argmax()))
    return out[len(ids):]
