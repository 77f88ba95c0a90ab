"""Training-free inits of Puzzle's child blocks (open_nemotron.puzzle.init), checked against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_for_tests import random_decilm, tiny_llama_config

from open_nemotron.model.configuration import DeciLMConfig
from open_nemotron.model.modeling import (
    DeciLMAttention,
    DeciLMDecoderLayer,
    DeciLMForCausalLM,
    DeciLMLinearAttention,
    DeciLMLinearMLP,
    DeciLMMLP,
)
from open_nemotron.puzzle.init import (
    ChannelContributionMeter,
    LinearFit,
    PuzzleInitError,
    channel_contributions,
    fewer_kv_heads_attention,
    kept_channels,
    linear_attention,
    linear_mlp,
    pruned_mlp,
)

HIDDEN, FFN, HEADS, HEAD_DIM = 48, 70, 6, 8


def decilm_config(blocks: list[dict] | None = None, **overrides) -> DeciLMConfig:
    """The tiny Llama shapes (hidden 48, FFN 70, 6 heads of 8) as a DeciLM config; MHA parent by default."""
    overrides.setdefault("num_key_value_heads", HEADS)
    cfg = tiny_llama_config(**overrides).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    if blocks is not None:
        cfg["num_hidden_layers"] = len(blocks)
    return DeciLMConfig(**{**cfg, "block_configs": blocks, "non_portable_ffn_widths": True})  # FFN 70 on purpose


def randomize_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)


@pytest.fixture(scope="module")
def parent() -> DeciLMForCausalLM:
    return random_decilm(decilm_config(), seed=0)


@pytest.fixture(scope="module")
def biased_parent() -> DeciLMForCausalLM:
    model = random_decilm(decilm_config(attention_bias=True, mlp_bias=True), seed=1)
    randomize_biases(model)
    return model


def ffn_inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(seed))


def intermediate(mlp: DeciLMMLP, x: torch.Tensor) -> torch.Tensor:
    return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_untouched_and_unshared(parent: torch.nn.Module, before: dict, child: torch.nn.Module) -> None:
    for key, value in parent.state_dict().items():
        assert torch.equal(value, before[key]), key
    parent_storages = {p.untyped_storage().data_ptr() for p in parent.parameters()}
    for name, p in child.named_parameters():
        assert p.untyped_storage().data_ptr() not in parent_storages, name
        assert p.is_contiguous() and p.requires_grad and p.grad_fn is None, name
        assert p.device == next(parent.parameters()).device and p.dtype == next(parent.parameters()).dtype


# ----------------------------------------------------------------------------------------------- channel contributions


@torch.no_grad()
def test_channel_contributions_match_brute_force_definition(parent):
    mlp = parent.model.layers[0].mlp
    x = ffn_inputs(2, 5)
    acts = intermediate(mlp, x).reshape(-1, FFN).double()
    w_down = mlp.down_proj.weight.double()  # [hidden, intermediate]
    full = acts @ w_down.T  # sum_k X_k W_down[:, k] per token
    expected = torch.empty(FFN, dtype=torch.float64)
    for i in range(FFN):
        others = acts.clone()
        others[:, i] = 0  # sum over k != i
        expected[i] = torch.linalg.vector_norm(full - others @ w_down.T, dim=-1).mean()
    got = channel_contributions(mlp, x)
    assert got.dtype == torch.float32 and got.shape == (FFN,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-9)


@torch.no_grad()
def test_meter_over_batches_equals_one_call_on_their_concatenation(parent):
    mlp = parent.model.layers[1].mlp
    batches = [ffn_inputs(2, 7, seed=1), ffn_inputs(1, 3, seed=2), ffn_inputs(4, 5, seed=3)]
    meter = ChannelContributionMeter(mlp)
    for batch in batches:
        meter.update(batch)
    flat = torch.cat([b.reshape(-1, HIDDEN) for b in batches])
    assert meter.tokens == flat.shape[0]
    torch.testing.assert_close(meter.mean(), channel_contributions(mlp, flat), rtol=1e-6, atol=0)

    hooked = ChannelContributionMeter(mlp)  # the same from down_proj's inputs
    handle = mlp.down_proj.register_forward_pre_hook(lambda _m, args: hooked.update_intermediate(args[0]))
    try:
        for batch in batches:
            mlp(batch)
    finally:
        handle.remove()
    torch.testing.assert_close(hooked.mean(), meter.mean(), rtol=1e-6, atol=0)

    with pytest.raises(PuzzleInitError, match="no calibration tokens"):
        ChannelContributionMeter(mlp).mean()


# ----------------------------------------------------------------------------------------------- pruned FFN


@torch.no_grad()
@pytest.mark.parametrize("biased", [False, True])
def test_pruned_mlp_full_size_reproduces_parent_exactly(parent, biased_parent, biased):
    model = biased_parent if biased else parent
    mlp = model.model.layers[0].mlp
    x = ffn_inputs(2, 6)
    before = snapshot(mlp)
    child = pruned_mlp(mlp, model.config, FFN, channel_contributions(mlp, x))
    assert type(child) is DeciLMMLP and child.intermediate_size == FFN
    assert torch.equal(child(x), mlp(x))
    assert_untouched_and_unshared(mlp, before, child)


@torch.no_grad()
@pytest.mark.parametrize("biased", [False, True])
def test_pruned_mlp_drops_exactly_the_lowest_contribution_terms(parent, biased_parent, biased):
    model = biased_parent if biased else parent
    mlp = model.model.layers[2].mlp
    x = ffn_inputs(3, 4, seed=5)
    contributions = channel_contributions(mlp, x)
    size = 33
    child = pruned_mlp(mlp, model.config, size, contributions)

    keep = kept_channels(contributions, size)
    dropped = torch.tensor(sorted(set(range(FFN)) - set(keep.tolist())))
    assert keep.tolist() == sorted(keep.tolist())
    assert contributions[keep].min() >= contributions[dropped].max()  # the top channels, in their original order
    assert torch.equal(child.gate_proj.weight, mlp.gate_proj.weight[keep])
    assert torch.equal(child.up_proj.weight, mlp.up_proj.weight[keep])
    assert torch.equal(child.down_proj.weight, mlp.down_proj.weight[:, keep])

    acts = intermediate(mlp, x)
    dropped_terms = acts[..., dropped] @ mlp.down_proj.weight[:, dropped].T
    torch.testing.assert_close(child(x), mlp(x) - dropped_terms, rtol=1e-5, atol=1e-6)


def test_kept_channels_order_ties_and_errors(parent):
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1])
    assert kept_channels(scores, 3).tolist() == [1, 2, 3]
    assert kept_channels(torch.ones(5), 2).tolist() == [0, 1]  # ties: lower index first
    mlp = parent.model.layers[0].mlp
    for bad in (0, FFN + 1):
        with pytest.raises(PuzzleInitError, match="intermediate_size"):
            pruned_mlp(mlp, parent.config, bad, torch.ones(FFN))
    with pytest.raises(PuzzleInitError, match="one per parent channel"):
        pruned_mlp(mlp, parent.config, 10, torch.ones(FFN - 1))
    with pytest.raises(PuzzleInitError, match="NaN"):
        kept_channels(torch.tensor([1.0, float("nan")]), 1)


# ----------------------------------------------------------------------------------------------- linear FFN


@torch.no_grad()
def test_linear_mlp_is_down_times_up(parent):
    mlp = parent.model.layers[1].mlp
    before = snapshot(mlp)
    child = linear_mlp(mlp, parent.config)
    assert type(child) is DeciLMLinearMLP and set(child.state_dict()) == {"linear_mlp.weight"}
    torch.testing.assert_close(child.linear_mlp.weight, mlp.down_proj.weight @ mlp.up_proj.weight, rtol=1e-6, atol=0)
    x = ffn_inputs(2, 3)
    torch.testing.assert_close(child(x), x @ (mlp.down_proj.weight @ mlp.up_proj.weight).T, rtol=1e-5, atol=1e-7)
    assert_untouched_and_unshared(mlp, before, child)


@torch.no_grad()
def test_linear_mlp_least_squares_option(parent):
    mlp = parent.model.layers[1].mlp
    train, heldout = ffn_inputs(64, 8, seed=11), ffn_inputs(16, 8, seed=12)
    fit = LinearFit(HIDDEN, HIDDEN, ridge=0.0)
    for batch in train.split(16):  # streamed in batches
        fit.update(batch, mlp(batch))
    child = linear_mlp(mlp, parent.config, fit=fit)
    x, y = train.reshape(-1, HIDDEN).double(), mlp(train).reshape(-1, HIDDEN).double()
    reference = torch.linalg.lstsq(x, y).solution.T  # argmin ||X W^T - Y||
    torch.testing.assert_close(child.linear_mlp.weight.double(), reference, rtol=1e-4, atol=1e-6)

    # The fit minimises the block-output error that BLD trains on; it also beats the paper's product held out.
    def relative_error(module):
        return ((module(heldout) - mlp(heldout)).pow(2).mean() / mlp(heldout).pow(2).mean()).item()

    assert relative_error(child) < 0.9 * relative_error(linear_mlp(mlp, parent.config))

    with pytest.raises(PuzzleInitError, match="expected 48 -> 48"):
        linear_mlp(mlp, parent.config, fit=LinearFit(HIDDEN, 7))
    with pytest.raises(PuzzleInitError, match="singular"):
        few = LinearFit(HIDDEN, HIDDEN, ridge=0.0)
        few.update(train[0, :4], mlp(train[0, :4]))
        few.solve()


# ----------------------------------------------------------------------------------------------- fewer KV heads


def rope(model: DeciLMForCausalLM, seq: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(start, start + seq)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, seq, HIDDEN), positions)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def attention_output(attn, model: DeciLMForCausalLM, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    cos, sin = rope(model, x.shape[1], start)
    return attn(x, cos, sin, None, x.shape[1] > 1)


@torch.no_grad()
@pytest.mark.parametrize("biased", [False, True])
def test_fewer_kv_heads_with_parents_count_is_the_parent(parent, biased_parent, biased):
    model = biased_parent if biased else parent
    attn = model.model.layers[0].self_attn
    before = snapshot(attn)
    child = fewer_kv_heads_attention(attn, model.config, HEADS, 0)
    assert type(child) is DeciLMAttention and child.num_key_value_heads == HEADS
    for key, value in attn.state_dict().items():
        assert torch.equal(child.state_dict()[key], value), key
    x = ffn_inputs(2, 5, seed=3)
    assert torch.equal(attention_output(child, model, x), attention_output(attn, model, x))
    assert_untouched_and_unshared(attn, before, child)


@torch.no_grad()
@pytest.mark.parametrize("kv", [3, 2, 1])
@pytest.mark.parametrize("biased", [False, True])
def test_fewer_kv_heads_are_group_means(parent, biased_parent, kv, biased):
    model = biased_parent if biased else parent
    attn = model.model.layers[1].self_attn
    child = fewer_kv_heads_attention(attn, model.config, kv, 1)
    group, hd = HEADS // kv, HEAD_DIM
    assert child.num_key_value_heads == kv and child.layer_idx == 1
    for name in ("k_proj", "v_proj"):
        parent_w = getattr(attn, name).weight.reshape(HEADS, hd, HIDDEN)
        child_w = getattr(child, name).weight.reshape(kv, hd, HIDDEN)
        for j in range(kv):
            torch.testing.assert_close(child_w[j], parent_w[j * group : (j + 1) * group].mean(0), rtol=1e-6, atol=1e-7)
        if biased:
            parent_b = getattr(attn, name).bias.reshape(HEADS, hd)
            child_b = getattr(child, name).bias.reshape(kv, hd)
            torch.testing.assert_close(child_b, parent_b.reshape(kv, group, hd).mean(1), rtol=1e-6, atol=1e-7)
    assert torch.equal(child.q_proj.weight, attn.q_proj.weight) and torch.equal(child.o_proj.weight, attn.o_proj.weight)


@torch.no_grad()
def test_fewer_kv_heads_pooling_identical_heads_is_lossless():
    """If the parent's heads within each new group are equal (a GQA model expanded to MHA), pooling undoes it."""
    model = random_decilm(decilm_config(), seed=4)
    attn = model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        heads = proj.weight.reshape(HEADS, HEAD_DIM, HIDDEN)
        heads[1::2] = heads[0::2]  # pairs (0,1), (2,3), (4,5) identical
    child = fewer_kv_heads_attention(attn, model.config, 3, 0)
    x = ffn_inputs(2, 6, seed=8)
    torch.testing.assert_close(attention_output(child, model, x), attention_output(attn, model, x))


def test_fewer_kv_heads_rejects_non_divisors(parent):
    attn = parent.model.layers[0].self_attn
    for bad in (4, 0, 12):
        with pytest.raises(PuzzleInitError, match=r"divisor of the parent's 6 KV heads, one of \[1, 2, 3, 6\]"):
            fewer_kv_heads_attention(attn, parent.config, bad, 0)
    gqa_parent = random_decilm(decilm_config(num_key_value_heads=2), seed=0)
    with pytest.raises(PuzzleInitError, match="one of \\[1, 2\\]"):
        fewer_kv_heads_attention(gqa_parent.model.layers[0].self_attn, gqa_parent.config, 3, 0)
    with pytest.raises(PuzzleInitError, match="attention_bias=True"):
        fewer_kv_heads_attention(attn, decilm_config(attention_bias=True), 3, 0)


# ----------------------------------------------------------------------------------------------- linear attention


@torch.no_grad()
@pytest.mark.parametrize("kv", [6, 2, 1])  # MHA and GQA parents
def test_linear_attention_equals_attention_on_one_token(kv):
    model = random_decilm(decilm_config(num_key_value_heads=kv), seed=kv)
    attn = model.model.layers[2].self_attn
    before = snapshot(attn)
    child = linear_attention(attn, model.config)
    assert type(child) is DeciLMLinearAttention and set(child.state_dict()) == {"linear_attn.weight"}
    x = ffn_inputs(3, 1, seed=kv)
    for start in (0, 7):  # RoPE does not touch values
        torch.testing.assert_close(child(x), attention_output(attn, model, x, start), rtol=1e-5, atol=1e-5)
    # The product the docs describe: W_o times W_v expanded to the query heads.
    w_v = attn.v_proj.weight.reshape(kv, HEAD_DIM, HIDDEN).repeat_interleave(HEADS // kv, 0)
    w_v = w_v.reshape(HEADS * HEAD_DIM, HIDDEN)
    torch.testing.assert_close(child.linear_attn.weight, attn.o_proj.weight @ w_v, rtol=1e-5, atol=1e-7)
    assert_untouched_and_unshared(attn, before, child)


@torch.no_grad()
def test_linear_attention_drops_only_the_constant_bias_term(biased_parent):
    attn = biased_parent.model.layers[0].self_attn
    child = linear_attention(attn, biased_parent.config)
    x = ffn_inputs(2, 1, seed=9)
    constant = attn.o_proj(attn.v_proj.bias)  # W_o b_v + b_o (an MHA parent: no head expansion)
    torch.testing.assert_close(child(x) + constant, attention_output(attn, biased_parent, x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_linear_attention_least_squares_option(parent):
    attn = parent.model.layers[0].self_attn
    x = ffn_inputs(8, 12, seed=21)
    y = attention_output(attn, parent, x)
    fit = LinearFit(HIDDEN, HIDDEN, ridge=0.0)
    fit.update(x, y)
    child = linear_attention(attn, parent.config, fit=fit)
    reference = torch.linalg.lstsq(x.reshape(-1, HIDDEN).double(), y.reshape(-1, HIDDEN).double()).solution.T
    torch.testing.assert_close(child.linear_attn.weight.double(), reference, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------- into a child model


@torch.no_grad()
def test_inits_load_into_the_model_their_block_configs_describe(parent):
    """Assemble a whole child from the parent's inits: names and shapes must be what `block_configs` builds."""
    blocks = [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 33}},  # 3 KV heads, pruned FFN
        {"attention": {"replace_with_linear": True}, "ffn": {"replace_with_linear": True}},
        {"attention": {"n_heads_in_group": 6}, "ffn": {"intermediate_size": FFN}},  # 1 KV head, full FFN
    ]
    child_config = decilm_config(blocks)
    x = ffn_inputs(2, 6, seed=30)
    state = {k: v for k, v in parent.state_dict().items() if ".self_attn." not in k and ".mlp." not in k}
    layers = parent.model.layers
    modules = {
        0: (fewer_kv_heads_attention(layers[0].self_attn, child_config, 3, 0),
            pruned_mlp(layers[0].mlp, child_config, 33, channel_contributions(layers[0].mlp, x))),
        1: (linear_attention(layers[1].self_attn, child_config), linear_mlp(layers[1].mlp, child_config)),
        2: (fewer_kv_heads_attention(layers[2].self_attn, child_config, 1, 2),
            pruned_mlp(layers[2].mlp, child_config, FFN, channel_contributions(layers[2].mlp, x))),
    }  # fmt: skip
    for i, (attn, mlp) in modules.items():
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in attn.state_dict().items()})
        state.update({f"model.layers.{i}.mlp.{k}": v for k, v in mlp.state_dict().items()})
    child = DeciLMForCausalLM(child_config).eval()
    child.load_state_dict(state, strict=True)

    # A decoder layer built from the block config runs the init modules' computation.
    layer = DeciLMDecoderLayer(child_config, 0).eval()
    layer.load_state_dict({k.removeprefix("model.layers.0."): v for k, v in state.items() if ".layers.0." in k})
    cos, sin = rope(parent, 6)
    h = ffn_inputs(2, 6, seed=31)
    mid = h + modules[0][0](layer.input_layernorm(h), cos, sin, None, True)
    expected = mid + modules[0][1](layer.post_attention_layernorm(mid))
    torch.testing.assert_close(layer(h, cos, sin, None, True), expected)

    ids = torch.randint(0, parent.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = child(ids).logits
    assert logits.shape == (2, 9, parent.config.vocab_size) and bool(torch.isfinite(logits).all())
    assert child.model.layers[0].self_attn.num_key_value_heads == 3
    assert child.model.layers[2].self_attn.num_key_value_heads == 1


@torch.no_grad()
def test_inits_keep_the_parents_dtype():
    model = random_decilm(decilm_config(num_key_value_heads=2), seed=0).to(torch.bfloat16)
    layer, config = model.model.layers[0], model.config
    x = ffn_inputs(2, 3).to(torch.bfloat16)
    children = [
        pruned_mlp(layer.mlp, config, 20, channel_contributions(layer.mlp, x)),
        linear_mlp(layer.mlp, config),
        fewer_kv_heads_attention(layer.self_attn, config, 1, 0),
        linear_attention(layer.self_attn, config),
    ]
    for child in children:
        assert {p.dtype for p in child.parameters()} == {torch.bfloat16}
    # Same-count "pooling" is exact in bf16 too (the fp32 mean of one head casts back to itself).
    same = fewer_kv_heads_attention(layer.self_attn, config, 2, 0)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in layer.self_attn.state_dict().items())


@torch.no_grad()
def test_inits_from_a_parent_in_decode_layout():
    """After `prepare_for_decode` the parent's q/k/v and gate/up are views of fused matrices and some weights are
    column-major: the children still get the same values, in contiguous storage of their own."""
    from open_nemotron.model.decode_layout import prepare_for_decode

    plain = random_decilm(decilm_config(num_key_value_heads=2), seed=6)
    fused = prepare_for_decode(random_decilm(decilm_config(num_key_value_heads=2), seed=6), batch_size=1)
    assert fused.model.layers[0].self_attn.fused_qkv is not None
    x, config = ffn_inputs(1, 4, seed=2), plain.config
    for build in (
        lambda m: pruned_mlp(m.mlp, config, 40, channel_contributions(m.mlp, x)),
        lambda m: linear_mlp(m.mlp, config),
        lambda m: fewer_kv_heads_attention(m.self_attn, config, 1, 0),
        lambda m: fewer_kv_heads_attention(m.self_attn, config, 2, 0),
        lambda m: linear_attention(m.self_attn, config),
    ):
        want, got = build(plain.model.layers[0]), build(fused.model.layers[0])
        for key, value in want.state_dict().items():
            torch.testing.assert_close(got.state_dict()[key], value, rtol=1e-6, atol=1e-7)
        parent_storages = {p.untyped_storage().data_ptr() for p in fused.parameters()}
        for p in got.parameters():
            assert p.is_contiguous() and p.untyped_storage().data_ptr() not in parent_storages
