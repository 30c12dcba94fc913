"""LLaVA's own input assembly as the reference for the engine (tests only).

The prompt comes from llava-torch's ``conversation.py`` (``conv_templates["llava_v1"]``), the token ids
from its ``tokenizer_image_token``, the image features from ``tests.reference`` (HF CLIP + projector +
LLaVA's merge), and the language model is transformers' ``LlamaForCausalLM`` fed ``inputs_embeds``
exactly as ``prepare_inputs_labels_for_multimodal`` builds them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from tests import reference

IMAGE_TOKEN_INDEX = -200  # llava.constants


@lru_cache(maxsize=1)
def conversation_module() -> Any:
    """llava-torch's ``conversation.py`` loaded by path (it imports only the standard library and PIL)."""
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llava-torch is not installed", name="llava")
    path = Path(list(spec.submodule_search_locations)[0]) / "conversation.py"
    file_spec = importlib.util.spec_from_file_location("llava_conversation_reference", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def llava_prompt(turns: list[tuple[str, str | None]]) -> str:
    """LLaVA's prompt for ``(question, answer)`` turns, the image in the first question."""
    conv = conversation_module().conv_templates["llava_v1"].copy()
    for index, (question, answer) in enumerate(turns):
        conv.append_message(conv.roles[0], ("<image>\n" + question) if index == 0 else question)
        conv.append_message(conv.roles[1], answer)
    return str(conv.get_prompt())


class _SlowLlamaTokenizer:
    """The interface ``tokenizer_image_token`` uses, backed by PULSE's SentencePiece encoding."""

    bos_token_id = 1

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, text: str) -> Any:
        return type("Encoding", (), {"input_ids": reference.slow_llama_encode(self.folder, text)})()


def input_ids(folder: Path, prompt: str) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: ``<image>`` becomes ``IMAGE_TOKEN_INDEX``."""
    return list(reference.llava_mm_utils().tokenizer_image_token(prompt, _SlowLlamaTokenizer(folder)))


@dataclass
class LlavaInputs:
    ids: list[int]
    image_rows: torch.Tensor
    embeds: torch.Tensor


def embed_tokens(folder: Path) -> torch.Tensor:
    return reference.checkpoint_state(folder)["model.embed_tokens.weight"].float()


def llava_inputs(folder: Path, tower: Path, image: Any, question: str,
                 history: Sequence[tuple[str, str]] = ()) -> LlavaInputs:
    """The ``inputs_embeds`` LLaVA gives the language model for ``question`` about ``image``, after the
    ``(question, answer)`` turns of ``history`` (its multi-turn prompt)."""
    config = json.loads((folder / "config.json").read_text())
    pinpoints = config["image_grid_pinpoints"]
    pixels = reference.anyres_pixels(image, tower, pinpoints)
    features = reference.image_features(folder, tower, pixels)
    rgb = image.convert("RGB")
    tile = int(pixels.shape[-1])
    merge = config.get("mm_patch_merge_type", "flat")
    rows = reference.merge_features(features, rgb.size, pinpoints, tile, merge, reference.image_newline(folder))
    ids = input_ids(folder, llava_prompt([*history, (question, None)]))
    at = ids.index(IMAGE_TOKEN_INDEX)
    table = embed_tokens(folder)
    embeds = torch.cat([table[ids[:at]], rows, table[ids[at + 1:]]])
    return LlavaInputs(ids, rows, embeds)


def logits(folder: Path, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference.language_model(folder)(inputs_embeds=embeds[None]).logits[0, -1].float()


def greedy(folder: Path, embeds: torch.Tensor, n: int, eos: int = 2) -> list[int]:
    """Greedy continuation from ``inputs_embeds`` (full forward each step), stopping at EOS like LLaVA."""
    table = embed_tokens(folder)
    out: list[int] = []
    current = embeds
    for _ in range(n):
        token = int(logits(folder, current).argmax())
        if token == eos:
            break
        out.append(token)
        current = torch.cat([current, table[token][None]])
    return out
