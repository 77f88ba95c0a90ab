"""`DeciLMModel.run_layers`: decoder layers i..j from a residual stream, against the full forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from models_for_tests import heterogeneous_config, random_decilm

from open_nemotron.model.generation import StaticKVCache
from open_nemotron.model.modeling import DeciLMDecoderLayer


@pytest.fixture(scope="module")
def model():
    return random_decilm(heterogeneous_config(), seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_layers_0_to_k_then_k_to_n_equal_the_full_forward(model, ids):
    inner = model.model
    reference = inner(ids, output_hidden_states=True)
    n = len(inner.layers)
    embeds = inner.embed_tokens(ids)
    for k in range(n + 1):
        head = inner.run_layers(embeds, 0, k)
        if k < n:  # hidden_states[k] is layer k's input; the last entry is after the final norm
            torch.testing.assert_close(head, reference.hidden_states[k], rtol=0, atol=1e-6)
        tail = inner.run_layers(head, k)
        torch.testing.assert_close(inner.norm(tail), reference.last_hidden_state, rtol=0, atol=1e-6)


@torch.no_grad()
def test_residuals_are_every_half_layer_of_the_stream(model, ids):
    inner = model.model
    reference = inner(ids, output_hidden_states=True).hidden_states
    embeds = inner.embed_tokens(ids)
    out, residuals = inner.run_layers(embeds, 0, return_residuals=True)
    assert len(reference) == len(inner.layers) + 1 and len(residuals) == 2 * len(inner.layers) + 1
    for i in range(len(inner.layers)):
        torch.testing.assert_close(residuals[2 * i], reference[i], rtol=0, atol=1e-6)
    # Layer 0 (GQA + SwiGLU): the mid residual is x + attention(norm(x)), written out by hand.
    layer, x = inner.layers[0], embeds
    cos, sin = inner.rotary_emb(x, torch.arange(ids.shape[1])[None])
    mid = x + layer.self_attn(layer.input_layernorm(x), cos.unsqueeze(1), sin.unsqueeze(1), None, True)
    torch.testing.assert_close(residuals[1], mid, rtol=0, atol=1e-6)
    torch.testing.assert_close(residuals[-1], out, rtol=0, atol=0)
    # Precomputed rotary embeddings give the same result.
    again = inner.run_layers(embeds, 0, position_embeddings=(cos, sin))
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@torch.no_grad()
def test_decode_step_with_a_cache_split_across_two_calls_equals_the_full_forward(model, ids):
    inner = model.model
    n = len(inner.layers)
    full = inner(ids).last_hidden_state[:, -1:]
    cache = StaticKVCache(model.config, ids.shape[0], ids.shape[1], torch.float32, ids.device)
    inner.run_layers(inner.embed_tokens(ids[:, :-1]), cache=cache)
    step = inner.embed_tokens(ids[:, -1:])
    k = 3  # layers 0-2 append to the cache first; layers 3.. still see the prompt's length as the past
    step = inner.run_layers(step, 0, k, cache=cache)
    step = inner.run_layers(step, k, n, cache=cache)
    torch.testing.assert_close(inner.norm(step), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_replace_runs_another_layer_in_place_of_the_models_own(model, ids):
    inner = model.model
    torch.manual_seed(5)
    other = DeciLMDecoderLayer(model.config, 0).eval()  # the GQA layer's shape, new weights, at index 2
    swapped = copy.deepcopy(model)
    swapped.model.layers[2] = other
    reference = swapped.model(ids, output_hidden_states=True).hidden_states
    out = inner.run_layers(inner.embed_tokens(ids), 0, 4, replace={2: other})
    torch.testing.assert_close(out, reference[4], rtol=0, atol=1e-6)
    assert not torch.allclose(out, inner(ids, output_hidden_states=True).hidden_states[4])


@torch.no_grad()
def test_padding_mask_matches_forward(model, ids):
    inner = model.model
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    reference = inner(ids, attention_mask=mask, output_hidden_states=True)
    out = inner.run_layers(inner.embed_tokens(ids), attention_mask=mask)
    torch.testing.assert_close(inner.norm(out), reference.last_hidden_state, rtol=0, atol=1e-6)


def test_bad_layer_range_is_named(model, ids):
    with pytest.raises(ValueError, match=r"run_layers\(4, 2\)"):
        model.model.run_layers(model.model.embed_tokens(ids), 4, 2)
