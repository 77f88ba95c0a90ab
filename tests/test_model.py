"""Our nemotron-nas model against transformers' LlamaForCausalLM, and heterogeneous layers on their own."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import (
    heterogeneous_config,
    left_padded,
    random_decilm,
    random_ids,
    random_llama,
    save_tiny_llama,
    tiny_llama_config,
)
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

import open_nemotron  # noqa: F401  (registers nemotron-nas)
from open_nemotron.model.configuration import BlockConfigError, DeciLMConfig
from open_nemotron.model.loading import convert
from open_nemotron.model.modeling import DeciLMForCausalLM

LLAMA_VARIANTS = {
    "gqa-untied-llama3-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "mha-tied-default-rope": dict(
        hidden_size=40, num_attention_heads=5, num_key_value_heads=5, intermediate_size=37, tie_word_embeddings=True
    ),
    "gqa-linear-rope-bias": dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}, attention_bias=True
    ),
    "mqa-yarn-rope": dict(
        num_key_value_heads=1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "dynamic-rope-explicit-head-dim": dict(
        head_dim=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    ),
}


@pytest.fixture(scope="module", params=sorted(LLAMA_VARIANTS))
def parent_and_converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    config = tiny_llama_config(**LLAMA_VARIANTS[request.param])
    save_tiny_llama(tmp / "parent", config, seed=3)
    convert(tmp / "parent", tmp / "converted", non_portable_ffn_widths=True)
    parent = LlamaForCausalLM.from_pretrained(tmp / "parent").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp / "converted").eval()
    return parent, ours


def test_converted_model_is_ours_with_parent_blocks(parent_and_converted):
    parent, ours = parent_and_converted
    assert type(ours) is DeciLMForCausalLM
    assert ours.config.model_type == "nemotron-nas"
    assert ours.config.architectures == ["DeciLMForCausalLM"]
    blocks = ours.config.layers_blocks()
    assert all(b.attention.num_key_value_heads == parent.config.num_key_value_heads for b in blocks)
    assert all(b.ffn.intermediate_size == parent.config.intermediate_size for b in blocks)


def test_logits_match_transformers_llama(parent_and_converted):
    parent, ours = parent_and_converted
    ids = random_ids(2, 37)
    with torch.no_grad():
        diff = (parent(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_logits_match_with_left_padding(parent_and_converted):
    parent, ours = parent_and_converted
    ids, mask = left_padded(3, 20)
    with torch.no_grad():
        ref = parent(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert (ref - got)[mask.bool()].abs().max().item() <= 1e-5


def test_greedy_generation_identical_to_transformers(parent_and_converted):
    parent, ours = parent_and_converted
    ids, mask = left_padded(3, 12)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=2)
    expected = parent.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, fast_decode=False, **kwargs), expected)  # transformers' loop
    assert torch.equal(ours.generate(ids, **kwargs), expected)  # our static-cache loop


def test_training_gradients_match_transformers(parent_and_converted):
    parent, ours = parent_and_converted
    ids = random_ids(2, 16)
    ref = parent(ids, labels=ids)
    got = ours(ids, labels=ids)
    ref.loss.backward()
    got.loss.backward()
    assert abs(ref.loss.item() - got.loss.item()) <= 1e-5
    ref_grads = dict(parent.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4), name
    parent.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


def test_heterogeneous_layers_have_the_right_modules_and_no_extra_weights():
    model = random_decilm(heterogeneous_config())
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.k_proj.weight" in names
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 48)
    assert "model.layers.1.self_attn.linear_attn.weight" in names
    assert "model.layers.1.input_layernorm.weight" in names  # a linear replacement keeps its pre-norm
    assert model.model.layers[1].mlp.down_proj.weight.shape == (48, 33)
    assert "model.layers.2.mlp.linear_mlp.weight" in names
    assert model.model.layers[2].self_attn.k_proj.weight.shape == (8, 48)
    assert not any(
        n.startswith("model.layers.3.self_attn") or n.startswith("model.layers.3.input_layernorm") for n in names
    )
    assert model.model.layers[3].mlp.gate_proj.weight.shape == (256, 48)  # ffn_mult 1.0 -> round_up(32, 256)
    assert not any(n.startswith("model.layers.4.mlp") or n.startswith("model.layers.4.post_attention") for n in names)
    assert not any(n.startswith("model.layers.5.") for n in names)


def test_heterogeneous_layer_math():
    """Each sub-block kind computes what the format says: x + f(norm(x)), skipped entirely when no-op."""
    model = random_decilm(heterogeneous_config())
    layers = model.model.layers
    x = torch.randn(1, 5, 48)
    cos, sin = model.model.rotary_emb(x, torch.arange(5)[None])
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    with torch.no_grad():
        lin = layers[1]
        h = x + lin.self_attn.linear_attn(lin.input_layernorm(x))
        expected = h + lin.mlp(lin.post_attention_layernorm(h))
        assert torch.allclose(lin(x, cos, sin, None, True), expected, atol=1e-6)
        assert torch.equal(layers[5](x, cos, sin, None, True), x)
        no_attn = layers[3]
        expected = x + no_attn.mlp(no_attn.post_attention_layernorm(x))
        assert torch.allclose(no_attn(x, cos, sin, None, True), expected, atol=1e-6)


def test_heterogeneous_save_reload_generate(tmp_path):
    model = random_decilm(heterogeneous_config(), seed=5)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DeciLMConfig)
    assert config.block_configs[3]["ffn"]["intermediate_size"] == 256
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    out = reloaded.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 19)


@pytest.mark.parametrize("padded", [False, True])
def test_heterogeneous_generation_with_cache_equals_without(padded):
    model = random_decilm(heterogeneous_config(), seed=7)
    ids, mask = left_padded(3, 10) if padded else (random_ids(2, 10), None)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=2)
    no_cache = model.generate(ids, use_cache=False, **kwargs)  # full recompute every step
    dynamic_cache = model.generate(ids, fast_decode=False, **kwargs)  # transformers' DynamicCache
    static_cache = model.generate(ids, **kwargs)  # our StaticKVCache loop
    assert torch.equal(dynamic_cache, no_cache)
    assert torch.equal(static_cache, no_cache)


def test_left_padded_batch_equals_rows_alone():
    model = random_decilm(heterogeneous_config(), seed=2)
    ids, mask = left_padded(3, 10)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    for row in range(3):
        alone = ids[row : row + 1, 2 * row :]
        single = model.generate(alone, max_new_tokens=8, do_sample=False, pad_token_id=2)
        assert torch.equal(batch[row, 10:], single[0, alone.shape[1] :])


def test_attention_free_model_generates():
    cfg = heterogeneous_config(
        block_configs=[{"attention": {"no_op": True}, "ffn": {"intermediate_size": 20}}] * 2, num_hidden_layers=2
    )
    model = random_decilm(cfg)
    ids = random_ids(1, 6)
    a = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    b = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2, use_cache=False)
    assert torch.equal(a, b)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_decilm(heterogeneous_config(), seed=4)
    ids = random_ids(2, 6)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
    torch.manual_seed(0)
    top1 = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, pad_token_id=2)
    assert torch.equal(top1, greedy)
    torch.manual_seed(11)
    s1 = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, pad_token_id=2)
    torch.manual_seed(11)
    s2 = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, pad_token_id=2)
    assert torch.equal(s1, s2)


def test_eos_stops_rows_and_pads_after():
    model = random_decilm(heterogeneous_config(), seed=4)
    ids = random_ids(2, 6)
    free = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = int(free[0, 8])  # row 0's third new token becomes its EOS
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    expected = model.generate(ids, fast_decode=False, **kwargs)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    assert (got[0, 9:] == 0).all()


def test_unsupported_generate_options_fall_back_to_transformers():
    model = random_decilm(heterogeneous_config(), seed=4)
    ids = random_ids(1, 6)
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=2, return_dict_in_generate=True)
    out = model.generate(ids, **kwargs)
    reference = model.generate(ids, use_cache=False, **kwargs)  # full recompute: no cache to get wrong
    assert out.sequences.shape == (1, 10)
    assert torch.equal(out.sequences, reference.sequences)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([{"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 1.0}}] * 3, "n_heads_in_group = 4"),
        ([{"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"no_op": True}}] * 3, "both true"),
        ([{"attention": {"no_op": True}, "ffn": {"no_op": True}}] * 2, "expected one per layer"),
        ([{"attention": {"no_op": True, "colour": 1}, "ffn": {"no_op": True}}] * 3, "unknown field"),
        ([{"attention": {"n_heads_in_group": 2, "window_length": 64}, "ffn": {"no_op": True}}] * 3, "window_length"),
        ([{"attention": {"n_heads_in_group": 2}, "ffn": {}}] * 3, "expected a positive intermediate_size"),
        ([{"attention": {"no_op": "yes"}, "ffn": {"no_op": True}}] * 3, "expected true or false"),
    ],
)
def test_bad_block_configs_name_layer_field_and_expectation(blocks, message):
    cfg = tiny_llama_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    with pytest.raises(BlockConfigError, match=message) as err:
        DeciLMConfig(**{**cfg, "block_configs": blocks})
    assert "block_configs" in str(err.value)
    assert "\n" not in str(err.value)


def test_nvidia_style_block_configs_are_accepted():
    """NVIDIA's checkpoints give only ffn_mult and carry inactive sliding-window fields."""
    cfg = tiny_llama_config(hidden_size=64, num_attention_heads=8).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    block = {
        "attention": {
            "no_op": False,
            "replace_with_linear": False,
            "n_heads_in_group": 4,
            "window_length": None,
            "num_sink_tokens": None,
            "sparsify": None,
            "unshifted_sink": False,
            "use_prefill_window_in_sink_attention": False,
        },
        "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 2.625, "sparsify": None},
    }
    config = DeciLMConfig(**{**cfg, "block_configs": [block] * 3})
    assert config.layers_blocks()[0].ffn.intermediate_size == 256  # round_up(int(2 * 2.625 * 64 / 3), 256)
    assert config.layers_blocks()[0].attention.num_key_value_heads == 2


def test_same_weights_any_parent_class_loads_into_ours(tmp_path):
    """load_model(implementation='ours') reads a plain Llama checkpoint into our class (same-weights benches)."""
    from open_nemotron.model.loading import load_model

    save_tiny_llama(tmp_path, seed=9)
    ours = load_model(tmp_path, implementation="ours", device="cpu")
    ref = load_model(tmp_path, implementation="transformers", device="cpu")
    assert type(ours) is DeciLMForCausalLM and type(ref) is LlamaForCausalLM
    ids = random_ids(1, 11)
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5


def test_random_llama_helper_is_deterministic():
    a, b = random_llama(tiny_llama_config(), 1), random_llama(tiny_llama_config(), 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_packed_sequences_attend_only_within_themselves():
    """TRL's padding-free packing: one row, positions restart per sequence; logits equal separate forwards."""
    model = random_decilm(heterogeneous_config(), seed=8)
    a, b = random_ids(1, 7, seed=1), random_ids(1, 5, seed=2)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=positions).logits
        expected = torch.cat([model(a).logits, model(b).logits], dim=1)
    assert (got - expected).abs().max().item() <= 1e-5


def test_packed_rows_with_different_boundaries_use_one_block_mask():
    """Several packed rows (positions restart at different places): each sequence still sees only itself."""
    model = random_decilm(heterogeneous_config(), seed=8)
    a, b, c, d = random_ids(1, 7, seed=1), random_ids(1, 5, seed=2), random_ids(1, 3, seed=3), random_ids(1, 9, seed=4)
    packed = torch.cat([torch.cat([a, b], dim=1), torch.cat([c, d], dim=1)])
    positions = torch.stack(
        [torch.cat([torch.arange(7), torch.arange(5)]), torch.cat([torch.arange(3), torch.arange(9)])]
    )
    with torch.no_grad():
        got = model(packed, position_ids=positions).logits
        first = torch.cat([model(a).logits, model(b).logits], dim=1)
        second = torch.cat([model(c).logits, model(d).logits], dim=1)
    assert (got - torch.cat([first, second])).abs().max().item() <= 1e-5
