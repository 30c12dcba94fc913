"""Conversion of the tiny PULSE-layout checkpoint, read back with gguf's own reader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from convert.checkpoint import TensorStore
from convert.language import LAYER_TENSORS
from pulse_edge.manifest import read_manifest
from pulse_edge.prompt import LLAVA_V1

T = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType

# Every key llama.cpp reads from the language model, with the exact GGUF type it expects.
LM_KEY_TYPES = {
    "general.architecture": T.STRING,
    "general.file_type": T.UINT32,
    "llama.context_length": T.UINT32,
    "llama.embedding_length": T.UINT32,
    "llama.block_count": T.UINT32,
    "llama.feed_forward_length": T.UINT32,
    "llama.rope.dimension_count": T.UINT32,
    "llama.attention.head_count": T.UINT32,
    "llama.attention.head_count_kv": T.UINT32,
    "llama.attention.layer_norm_rms_epsilon": T.FLOAT32,
    "llama.rope.freq_base": T.FLOAT32,
    "llama.vocab_size": T.UINT32,
    "tokenizer.ggml.model": T.STRING,
    "tokenizer.ggml.tokens": T.ARRAY,
    "tokenizer.ggml.scores": T.ARRAY,
    "tokenizer.ggml.token_type": T.ARRAY,
    "tokenizer.ggml.bos_token_id": T.UINT32,
    "tokenizer.ggml.eos_token_id": T.UINT32,
    "tokenizer.ggml.unknown_token_id": T.UINT32,
    "tokenizer.ggml.padding_token_id": T.UINT32,
    "tokenizer.ggml.add_bos_token": T.BOOL,
    "tokenizer.ggml.add_eos_token": T.BOOL,
    "tokenizer.chat_template": T.STRING,
}
LM_ARRAY_TYPES = {"tokenizer.ggml.tokens": T.STRING, "tokenizer.ggml.scores": T.FLOAT32,
                  "tokenizer.ggml.token_type": T.INT32}

# What clip.cpp reads from an mmproj (a wrong type aborts llama.cpp).
MMPROJ_KEY_TYPES = {
    "general.architecture": T.STRING,
    "clip.has_vision_encoder": T.BOOL,
    "clip.projector_type": T.STRING,
    "clip.use_gelu": T.BOOL,
    "clip.vision.image_size": T.UINT32,
    "clip.vision.patch_size": T.UINT32,
    "clip.vision.embedding_length": T.UINT32,
    "clip.vision.feed_forward_length": T.UINT32,
    "clip.vision.projection_dim": T.UINT32,
    "clip.vision.block_count": T.UINT32,
    "clip.vision.attention.head_count": T.UINT32,
    "clip.vision.attention.layer_norm_epsilon": T.FLOAT32,
    "clip.vision.image_mean": T.ARRAY,
    "clip.vision.image_std": T.ARRAY,
    "clip.vision.image_grid_pinpoints": T.ARRAY,
    "clip.vision.feature_layer": T.ARRAY,
    "clip.vision.mm_patch_merge_type": T.STRING,
}
MMPROJ_ARRAY_TYPES = {"clip.vision.image_mean": T.FLOAT32, "clip.vision.image_std": T.FLOAT32,
                      "clip.vision.image_grid_pinpoints": T.INT32, "clip.vision.feature_layer": T.INT32}


def field_value(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def check_key_types(reader: gguf.GGUFReader, scalar: dict[str, T], arrays: dict[str, T]) -> None:
    for key, kind in scalar.items():
        assert key in reader.fields, key
        assert reader.fields[key].types[0] == kind, (key, reader.fields[key].types)
    for key, kind in arrays.items():
        assert reader.fields[key].types == [T.ARRAY, kind], (key, reader.fields[key].types)


def lm_file(result: object, quant: str) -> Path:
    manifest = result.manifest  # type: ignore[attr-defined]
    return result.folder / manifest.language_model(quant).path  # type: ignore[attr-defined, no-any-return]


def config_of(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / "config.json").read_text())


def test_manifest_lists_every_output_with_its_true_size_and_hash(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    manifest = read_manifest(converted_tiny.manifest_path)
    assert sorted((f.role, f.quant) for f in manifest.files) == [
        ("language_model", "F16"), ("language_model", "F32"), ("language_model", "Q8_0"), ("mmproj", "F16")]
    for item in manifest.files:
        data = (converted_tiny.folder / item.path).read_bytes()
        assert len(data) == item.size
        assert hashlib.sha256(data).hexdigest() == item.sha256
    assert manifest.default_quant == "F32"
    assert manifest.prompt_template == LLAVA_V1.id
    assert set(manifest.source) == {"folder", "config_sha256", "tensor_index_sha256", "weights_sample_sha256"}
    # Only the outputs and the manifest are left: no temporary or intermediate file.
    assert sorted(p.name for p in converted_tiny.folder.iterdir()) == sorted(
        [f.path for f in manifest.files] + ["manifest.json"])


@pytest.mark.parametrize("quant,matrix_type", [("F32", Q.F32), ("F16", Q.F16), ("Q8_0", Q.Q8_0)])
def test_language_model_has_every_tensor_with_its_shape_and_type(converted_tiny, tiny_checkpoint, quant,  # type: ignore[no-untyped-def]
                                                                 matrix_type) -> None:
    c = config_of(tiny_checkpoint)
    h, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    expected = {"token_embd.weight": (h, v), "output_norm.weight": (h,), "output.weight": (h, v)}
    layer = {"attn_norm": (h,), "attn_q": (h, h), "attn_k": (h, kv), "attn_v": (h, kv), "attn_output": (h, h),
             "ffn_norm": (h,), "ffn_gate": (h, f), "ffn_up": (h, f), "ffn_down": (f, h)}
    for i in range(n):
        expected.update({f"blk.{i}.{k}.weight": s for k, s in layer.items()})
    assert len(LAYER_TENSORS) == len(layer)
    reader = gguf.GGUFReader(lm_file(converted_tiny, quant))
    got = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}
    assert set(got) == set(expected)
    for name, ne in expected.items():  # GGUF stores ggml's ne order: the reverse of numpy's
        assert got[name][0] == ne, name
        assert got[name][1] == (Q.F32 if len(ne) == 1 else matrix_type), name


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0"])
def test_language_model_metadata_has_llama_cpp_types_and_config_values(converted_tiny, tiny_checkpoint,  # type: ignore[no-untyped-def]
                                                                       quant) -> None:
    reader = gguf.GGUFReader(lm_file(converted_tiny, quant))
    check_key_types(reader, LM_KEY_TYPES, LM_ARRAY_TYPES)
    c = config_of(tiny_checkpoint)
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "general.file_type") == {"F32": 0, "F16": 1, "Q8_0": 7}[quant]
    assert field_value(reader, "llama.embedding_length") == c["hidden_size"]
    assert field_value(reader, "llama.block_count") == c["num_hidden_layers"]
    assert field_value(reader, "llama.feed_forward_length") == c["intermediate_size"]
    assert field_value(reader, "llama.attention.head_count") == c["num_attention_heads"]
    assert field_value(reader, "llama.attention.head_count_kv") == c["num_key_value_heads"]
    assert field_value(reader, "llama.context_length") == c["max_position_embeddings"]
    assert field_value(reader, "llama.rope.dimension_count") == c["hidden_size"] // c["num_attention_heads"]
    assert field_value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c["rms_norm_eps"])
    assert field_value(reader, "llama.rope.freq_base") == pytest.approx(c["rope_theta"])
    assert len(field_value(reader, "tokenizer.ggml.tokens")) == c["vocab_size"]  # type: ignore[arg-type]
    assert field_value(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field_value(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field_value(reader, "tokenizer.ggml.add_bos_token") is True
    assert field_value(reader, "tokenizer.ggml.add_eos_token") is False
    assert field_value(reader, "pulse.prompt.template") == "llava_v1"
    tokenizer_config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert field_value(reader, "pulse.tokenizer.legacy") is tokenizer_config["legacy"] is False


def test_tokenizer_pieces_scores_and_types_equal_sentencepiece(converted_tiny, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    reader = gguf.GGUFReader(lm_file(converted_tiny, "F16"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    scores = field_value(reader, "tokenizer.ggml.scores")
    types = field_value(reader, "tokenizer.ggml.token_type")
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.allclose(scores, [sp.get_score(i) for i in range(sp.get_piece_size())], rtol=0, atol=0)  # type: ignore[arg-type]
    expected_types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                      else 5 if sp.is_unused(i) else 1 for i in range(sp.get_piece_size())]
    assert types == expected_types
    assert types[:3] == [2, 3, 3]  # <unk>, <s>, </s>
    assert 6 in types  # byte fallback pieces are there


def test_f32_tensors_equal_the_checkpoint_exactly(converted_tiny, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    store = TensorStore(tiny_checkpoint)
    c = config_of(tiny_checkpoint)
    reader = gguf.GGUFReader(lm_file(converted_tiny, "F32"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert np.array_equal(tensors["token_embd.weight"], store.load("model.embed_tokens.weight"))
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], store.load("model.layers.1.mlp.down_proj.weight"))
    # q and k are permuted for ggml's rope; undoing the permutation gives the source back exactly.
    heads, hd = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    q = tensors["blk.0.attn_q.weight"]
    unpermuted = q.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    assert np.array_equal(unpermuted, store.load("model.layers.0.self_attn.q_proj.weight"))
    assert not np.array_equal(q, unpermuted)


def test_mmproj_has_the_keys_clip_cpp_reads_with_their_exact_types(converted_tiny, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    c = config_of(tiny_checkpoint)
    reader = gguf.GGUFReader(converted_tiny.folder / converted_tiny.manifest.mmproj().path)
    check_key_types(reader, MMPROJ_KEY_TYPES, MMPROJ_ARRAY_TYPES)
    assert field_value(reader, "general.architecture") == "clip"
    assert field_value(reader, "clip.projector_type") == "mlp"
    assert field_value(reader, "clip.use_gelu") is False  # CLIP's quick_gelu
    assert field_value(reader, "clip.vision.image_size") == 336
    assert field_value(reader, "clip.vision.patch_size") == 14
    assert field_value(reader, "clip.vision.image_grid_pinpoints") == [v for p in c["image_grid_pinpoints"] for v in p]
    assert field_value(reader, "clip.vision.mm_patch_merge_type") == c["mm_patch_merge_type"] == "flat"
    assert field_value(reader, "pulse.vision.select_layer") == c["mm_vision_select_layer"] == -2
    assert field_value(reader, "pulse.image.pad_color") == [0, 0, 0]
    assert field_value(reader, "clip.vision.image_mean") == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert field_value(reader, "clip.vision.image_std") == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def test_mmproj_keeps_only_the_layers_the_select_layer_uses(converted_tiny) -> None:  # type: ignore[no-untyped-def]
    reader = gguf.GGUFReader(converted_tiny.folder / converted_tiny.manifest.mmproj().path)
    total = field_value(reader, "pulse.vision.source_block_count")
    kept = field_value(reader, "clip.vision.block_count")
    assert kept == total - 1  # type: ignore[operator]  # select layer -2 = hidden_states[n-1]
    assert field_value(reader, "clip.vision.feature_layer") == [kept]
    names = {t.name for t in reader.tensors}
    layers = {int(n.split(".")[2]) for n in names if n.startswith("v.blk.")}
    assert layers == set(range(kept))  # type: ignore[call-overload]
    assert not any(n.startswith("v.post_ln") for n in names)
    for needed in ("v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight",
                   "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.image_newline"):
        assert needed in names
    per_layer = {"ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_up", "ffn_down"}
    assert {n.split(".")[3] for n in names if n.startswith("v.blk.0.")} == per_layer
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["mm.0.weight"] == Q.F16 and types["mm.0.bias"] == Q.F32 and types["v.class_embd"] == Q.F32


def test_separate_tower_converts_to_the_same_vision_weights(converted_tiny, converted_separate) -> None:  # type: ignore[no-untyped-def]
    inside = gguf.GGUFReader(converted_tiny.folder / converted_tiny.manifest.mmproj().path)
    separate = gguf.GGUFReader(converted_separate.folder / converted_separate.manifest.mmproj().path)
    a = {t.name: np.asarray(t.data) for t in inside.tensors}
    b = {t.name: np.asarray(t.data) for t in separate.tensors}
    assert set(a) == set(b)
    for name in a:  # separate is f32, inside f16: equal once rounded the same way
        assert np.array_equal(a[name], b[name].astype(a[name].dtype)), name
    assert field_value(separate, "clip.vision.mm_patch_merge_type") == "spatial_unpad"
    assert {t.tensor_type for t in separate.tensors} == {Q.F32}


def test_bf16_language_model_holds_the_checkpoint_values_exactly(tiny_checkpoint, tiny_separate, converted_tiny,  # type: ignore[no-untyped-def]
                                                                 tmp_path) -> None:
    from convert.pipeline import convert

    result = convert(str(tiny_checkpoint), tmp_path / "bf16", quant=["BF16"], vision_tower=tiny_separate[1])
    reader = gguf.GGUFReader(result.folder / result.manifest.language_model("BF16").path)
    f32 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(lm_file(converted_tiny, "F32")).tensors}
    assert field_value(reader, "general.file_type") == 32
    for tensor in reader.tensors:
        if len(tensor.shape) == 1:
            continue
        assert tensor.tensor_type == Q.BF16, tensor.name
        values = gguf.quants.dequantize(tensor.data, Q.BF16)
        assert np.array_equal(values, f32[tensor.name]), tensor.name
    # the F16 intermediate is gone: only the BF16 model, the mmproj and the manifest remain
    assert sorted(p.name for p in result.folder.iterdir()) == sorted(
        [f.path for f in result.manifest.files] + ["manifest.json"])


def test_repo_id_resolves_in_the_local_hugging_face_cache(tiny_checkpoint, tiny_separate, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``PULSE-ECG/PULSE-7B`` found in HF_HOME's hub cache (refs/main -> snapshot), without any network."""
    import os
    import shutil

    from tests.conftest import run_cli

    repo = tmp_path / "hf-home" / "hub" / "models--PULSE-ECG--PULSE-7B"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    out = tmp_path / "out"
    result = run_cli("convert", "PULSE-ECG/PULSE-7B", "--out", out, "--quant", "Q8_0", "--vision-tower", tiny_separate[1])
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"Wrote {out / 'manifest.json'}"
    assert sorted(os.listdir(out)) == ["manifest.json", "pulse-7b-Q8_0.gguf", "pulse-7b-mmproj-f16.gguf"]
    assert result.stderr == ""  # no progress bar, no llama.cpp chatter when stderr is not a terminal


def test_fingerprint_tells_checkpoints_with_the_same_layout_apart(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from convert.checkpoint import fingerprint
    from convert.synthetic import write_checkpoint

    other = write_checkpoint(tmp_path / "PULSE-tiny", shape="tiny", seed=1)
    a, b = fingerprint(tiny_checkpoint, TensorStore(tiny_checkpoint)), fingerprint(other, TensorStore(other))
    assert (a["config_sha256"], a["tensor_index_sha256"]) == (b["config_sha256"], b["tensor_index_sha256"])
    assert a["weights_sample_sha256"] != b["weights_sample_sha256"]
