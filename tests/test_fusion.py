"""FFN Fusion: the fused layer against the sum of the original FFNs, plans, removal baseline, dependency matrix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models_for_tests import random_decilm, random_ids, tiny_llama_config
from tokenizers_for_tests import chatml_tokenizer

from open_nemotron.distill import layer_alignment
from open_nemotron.fusion import FusionError, FusionPlan, attention_free_runs, fuse, plan_fusion, remove_ffns
from open_nemotron.fusion.analysis import block_dependency
from open_nemotron.model.configuration import DeciLMConfig


def runs_config(**overrides) -> DeciLMConfig:
    """7 layers: attention in 0 and 5; 1-4 attention-free (widths 70, 33, none, 50), 6 attention-free alone."""
    blocks = [
        {"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 70}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 70}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 33}},
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 50}},
        {"attention": {"n_heads_in_group": 6}, "ffn": {"intermediate_size": 40}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 20}},
    ]
    cfg = tiny_llama_config(num_hidden_layers=len(blocks)).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    cfg.update({"block_configs": blocks, "non_portable_ffn_widths": True, **overrides})  # odd widths on purpose
    return DeciLMConfig(**cfg)


@pytest.fixture
def model():
    return random_decilm(runs_config(), seed=2)


def test_attention_free_runs_and_plans(model):
    assert attention_free_runs(model.config) == [[1, 2, 3, 4]]  # layer 6 alone holds one FFN: nothing to fuse
    assert plan_fusion(model.config).groups == ((1, 2, 3, 4),)
    assert plan_fusion(model.config, exclude_last=True).groups == ((1, 2, 3),)
    # Widths 70 + 33 fit under 110, 50 does not: the chunk [4] alone holds one FFN and is dropped.
    assert plan_fusion(model.config, max_width=110).groups == ((1, 2, 3),)
    with pytest.raises(FusionError, match="layer 1: FFN width 70 exceeds max_width 60"):
        plan_fusion(model.config, max_width=60)
    with pytest.raises(FusionError, match="layer 0 has gqa attention"):
        plan_fusion(model.config, runs=[[0, 1]])
    with pytest.raises(FusionError, match="consecutive"):
        plan_fusion(model.config, runs=[[1, 4]])
    linear = runs_config()
    linear.block_configs[2]["ffn"] = {"replace_with_linear": True}
    linear = DeciLMConfig(**{**linear.to_dict(), "block_configs": linear.block_configs})
    assert attention_free_runs(linear) == []  # a linear FFN splits the run into [1] and [3, 4]: one FFN each


def test_fused_layer_is_the_sum_of_the_original_ffns(model):
    fused = fuse(model, FusionPlan(((1, 2, 3, 4),)))
    assert fused.config.num_hidden_layers == 4
    with pytest.raises(FusionError, match="layer 2 is in two groups"):
        fuse(model, FusionPlan(((1, 2), (2, 3))))
    assert fused.config.source_layers == [[0], [1, 2, 3, 4], [5], [6]]
    layer = fused.model.layers[1]
    assert layer.attention_kind == "no_op" and layer.mlp.intermediate_size == 70 + 33 + 50
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = x.clone()
        for k in (1, 2, 4):  # layer 3 has no FFN
            original = model.model.layers[k]
            expected = expected + original.mlp(original.post_attention_layernorm(x))
        got = layer.ffn_residual(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_model_equals_the_parallel_computation(model):
    """Whole-model logits of the fused model = the original with layers 1-4 run in parallel from one input."""
    fused = fuse(model, FusionPlan(((1, 2, 3, 4),)))
    ids = random_ids(2, 9)
    inner = model.model
    with torch.no_grad():
        h = inner.embed_tokens(ids)
        pe = inner.rotary_emb(h, torch.arange(9)[None])
        h = inner.run_layers(h, 0, 1, position_embeddings=pe)
        h = h + sum(inner.layers[k].mlp(inner.layers[k].post_attention_layernorm(h)) for k in (1, 2, 4))
        h = inner.run_layers(h, 5, 7, position_embeddings=pe)
        expected = model.lm_head(inner.norm(h))
        got = fused(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    before = copy.deepcopy(model.state_dict())
    fuse(model, FusionPlan(((1, 2),)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched


def test_fusing_a_run_of_one_layer_is_the_identity(model):
    one = fuse(model, FusionPlan(((2,),)))
    assert one.config.num_hidden_layers == model.config.num_hidden_layers
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(one(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_removal_baseline_keeps_the_last_ffn_of_each_group(model):
    plan = FusionPlan(((1, 2, 3, 4),))
    removed = remove_ffns(model, plan)
    assert removed.config.num_hidden_layers == fuse(model, plan).config.num_hidden_layers == 4
    torch.testing.assert_close(removed.model.layers[1].mlp.up_proj.weight, model.model.layers[4].mlp.up_proj.weight)
    ids = random_ids(1, 7)
    inner = model.model
    with torch.no_grad():
        h = inner.embed_tokens(ids)
        pe = inner.rotary_emb(h, torch.arange(7)[None])
        h = inner.run_layers(h, 0, 1, position_embeddings=pe)
        h = inner.run_layers(h, 4, 7, position_embeddings=pe)
        torch.testing.assert_close(removed(ids).logits, model.lm_head(inner.norm(h)), rtol=1e-5, atol=1e-5)


def test_fused_checkpoint_round_trips_and_aligns_for_distillation(model, tmp_path):
    from transformers import AutoModelForCausalLM

    fused = fuse(model, FusionPlan(((1, 2, 3, 4),)))
    fused.save_pretrained(tmp_path / "fused")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["source_layers"][1] == [1, 2, 3, 4]
    assert config["block_configs"][1]["ffn"]["intermediate_size"] == 153
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fused(ids).logits)
    assert layer_alignment(loaded.config, model.config) == [0, 4, 5, 6]
    with pytest.raises(FusionError, match="layer 2 has gqa attention"):
        fuse(loaded, FusionPlan(((1, 2),)))  # its layer 2 is the original layer 5, with attention
    # Fusing in two steps composes the source layers and gives the same function as one step.
    step = fuse(fuse(model, FusionPlan(((1, 2),))), FusionPlan(((1, 2, 3),)))
    assert step.config.source_layers == fused.config.source_layers
    with torch.no_grad():
        torch.testing.assert_close(step(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)


def test_block_dependency_against_zeroed_layers(model):
    """M[i, j] recomputed by hand: skipping layer i = zeroing its output projections; h_j from hidden states."""
    tokens = random_ids(3, 8)
    result = block_dependency(model, tokens, batch_size=2)
    m = torch.tensor(result["matrix"])
    layers = model.config.num_hidden_layers
    assert m.shape == (layers, layers) and result["tokens"] == 24
    assert torch.all(m.tril() == 0)  # no layer depends on a later one
    assert m[3].abs().max() < 1e-6  # layer 3 is empty: removing it changes nothing (up to rounding)

    def contributions(net):
        with torch.no_grad():
            hidden = net(tokens, output_hidden_states=True).hidden_states
        return [hidden[j + 1] - hidden[j] for j in range(layers - 1)]  # the last entry is after the final norm

    intact = contributions(model)
    for i in (0, 1, 5):
        skipped_model = copy.deepcopy(model)
        layer = skipped_model.model.layers[i]
        with torch.no_grad():
            if layer.attention_kind == "gqa":
                layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        skipped = contributions(skipped_model)
        for j in range(i + 1, layers - 1):
            cos = torch.nn.functional.cosine_similarity(intact[j], skipped[j], dim=-1)
            direct = (1 - cos).mean() if intact[j].abs().max() > 0 else torch.tensor(0.0)
            assert m[i, j].item() == pytest.approx(direct.item(), abs=1e-5), (i, j)
    assert result["relative_norm"][3] == 0 and result["io_cosine_distance"][3] == pytest.approx(0, abs=1e-6)


def test_fusion_cli(model, tmp_path):
    from typer.testing import CliRunner

    from open_nemotron.cli import app

    model.save_pretrained(tmp_path / "child")
    chatml_tokenizer().save_pretrained(tmp_path / "child")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "some words here " * (5 + i % 4) for i in range(30)))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "fusion",
            "analyze",
            str(tmp_path / "child"),
            "--out",
            str(tmp_path / "an"),
            "--data",
            str(corpus),
            "--sequences",
            "2",
            "--seq-len",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "attention-free runs: 1-4" in result.output
    for name in ("dependency.json", "dependency.png", "dependency.md"):
        assert (tmp_path / "an" / name).is_file()
    result = runner.invoke(app, ["fusion", "fuse", str(tmp_path / "child"), "--out", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert "7 -> 4 layers" in result.output
    assert json.loads((tmp_path / "fused" / "fusion.json").read_text())["groups"][0]["width"] == 153
    result = runner.invoke(app, ["fusion", "fuse", str(tmp_path / "fused"), "--out", str(tmp_path / "twice")])
    assert result.exit_code == 2 and "nothing to fuse" in result.output
    result = runner.invoke(
        app, ["fusion", "fuse", str(tmp_path / "child"), "--out", str(tmp_path / "x"), "--runs", "0-1"]
    )
    assert result.exit_code == 2 and "layer 0 has gqa attention" in result.output


def test_fused_model_keeps_the_source_generation_config(model):
    """A trained source carries `config.use_cache = False` (the Trainer's); the fused model must not turn that into
    cache-less generation: it keeps the source's generation config as it is."""
    model.config.use_cache = False
    model.generation_config.temperature, model.generation_config.eos_token_id = 0.6, [2, 7]
    fused = fuse(model, FusionPlan(((1, 2, 3, 4),)))
    assert fused.generation_config.to_dict() == model.generation_config.to_dict()
    assert fused.generation_config.use_cache is not False
