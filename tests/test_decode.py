"""The lean decode loop and the decode weight layouts: same numbers as the reference paths."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import heterogeneous_config, random_decilm, random_ids
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from open_nemotron.model.decode_layout import decode_layout, prepare_for_decode, set_decode_layout
from open_nemotron.model.generation import StaticKVCache, process_logits


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.6, 0, 0.95), (1.3, 7, 1.0), (0.7, 20, 0.5), (1.0, 1, 0.9)]
)
def test_logit_processing_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(process_logits(logits, temperature, top_k, top_p), expected)


def test_static_cache_appends_per_layer_with_own_head_counts():
    config = heterogeneous_config()
    cache = StaticKVCache(config, batch_size=2, max_length=10, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.keys[1] is None and cache.keys[3] is None  # linear / no-op attention: no cache
    assert cache.keys[0].shape == (2, 2, 10, 8) and cache.keys[2].shape == (2, 1, 10, 8)
    k = torch.randn(2, 2, 4, 8)
    got_k, _ = cache.update(k, k, 0)
    assert torch.equal(got_k, k) and cache.get_seq_length(0) == 4
    k2 = torch.randn(2, 2, 1, 8)
    got_k, _ = cache.update(k2, k2, 0)
    assert torch.equal(got_k, torch.cat([k, k2], dim=2))
    with pytest.raises(ValueError, match="holds 10 positions"):
        cache.update(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), 0)


def test_decode_layout_keeps_logits_and_is_idempotent():
    model = random_decilm(heterogeneous_config(), seed=1)
    ids = random_ids(2, 9)
    with torch.no_grad():
        before = model(ids).logits
        prepare_for_decode(model, batch_size=1)
        prepare_for_decode(model, batch_size=1)
        after = model(ids).logits
    for layer in model.model.layers:  # every fused matrix still owns its parts (its fast path is live)
        if layer.attention_kind == "gqa":
            assert layer.self_attn.fused_qkv.is_live()
        if layer.ffn_kind == "swiglu":
            assert layer.mlp.fused_gate_up.is_live()
    assert not model.lm_head.weight.is_contiguous()  # column-major now
    assert (before - after).abs().max().item() <= 1e-5


def _weights_layout(model) -> list[tuple]:
    return [(name, p.data_ptr(), p.stride()) for name, p in model.named_parameters()]


def _train_step(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.eval()
    return loss.item(), grads


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_changes_no_weights_and_training_after_it_is_unaffected(batch):
    """No hidden re-layout: generate leaves every Parameter where and how it was, and a training step after it
    computes exactly what the same step computes on an identical model that never generated."""
    model = random_decilm(heterogeneous_config(), seed=1)
    untouched = random_decilm(heterogeneous_config(), seed=1)
    ids = random_ids(batch, 9)
    before = _weights_layout(model)
    with torch.inference_mode():  # as TRL and our benches call it
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert _weights_layout(model) == before
    loss, grads = _train_step(model, ids)
    expected_loss, expected_grads = _train_step(untouched, ids)
    assert loss == expected_loss
    assert all(torch.equal(grads[name], expected_grads[name]) for name in expected_grads)


def test_training_in_the_gemv_layout_equals_training_in_the_checkpoint_layout():
    model = set_decode_layout(random_decilm(heterogeneous_config(), seed=1), "gemv")
    reference = random_decilm(heterogeneous_config(), seed=1)
    ids = random_ids(2, 9)
    loss, grads = _train_step(model, ids)
    expected_loss, expected_grads = _train_step(reference, ids)
    assert abs(loss - expected_loss) <= 1e-6
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name


def test_layout_read_from_the_checkpoint_equals_the_loaded_weights(tmp_path):
    from open_nemotron.model.loading import load_model

    random_decilm(heterogeneous_config(tie_word_embeddings=True), seed=2).save_pretrained(tmp_path)
    plain = load_model(tmp_path, device="cpu")
    fast = load_model(tmp_path, device="cpu", decode_layout="gemv")
    assert decode_layout(plain) == "gemm" and decode_layout(fast) == "gemv"
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # still tied
    assert not fast.lm_head.weight.is_contiguous() and fast.model.layers[0].self_attn.fused_qkv.is_live()
    expected = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        assert torch.equal(p, expected[name]), name
    ids = random_ids(1, 7)
    assert torch.equal(
        fast.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2),
        plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2),
    )
    with pytest.raises(ValueError, match="expected one of gemm, gemv"):
        set_decode_layout(plain, "columns")


def test_model_trains_after_generate_and_fused_path_sees_updates():
    model = prepare_for_decode(random_decilm(heterogeneous_config(), seed=1), batch_size=1)
    ids = random_ids(2, 9)
    with torch.inference_mode():  # as TRL and our benches call it
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():  # fused (no-grad) path and separate (grad) path must agree after the update
        fused = model(ids).logits
    with torch.enable_grad():
        separate = model(ids).logits.detach()
    assert (fused - separate).abs().max().item() <= 1e-5


def test_dtype_change_after_layout_falls_back_safely():
    model = random_decilm(heterogeneous_config(), seed=1)
    prepare_for_decode(model)
    model = model.to(torch.float64)  # replaces every Parameter's storage: the fused views no longer own them
    ids = random_ids(1, 7)
    with torch.no_grad():
        got = model(ids).logits
    reference = random_decilm(heterogeneous_config(), seed=1).to(torch.float64)
    with torch.no_grad():
        expected = reference(ids).logits
    assert (got - expected).abs().max().item() <= 1e-9


def test_save_after_layout_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_decilm(heterogeneous_config(tie_word_embeddings=True), seed=1)
    ids = random_ids(1, 7)
    with torch.no_grad():
        expected = model(ids).logits
    prepare_for_decode(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert (reloaded(ids).logits - expected).abs().max().item() <= 1e-5


def test_num_return_sequences_and_min_new_tokens():
    model = random_decilm(heterogeneous_config(), seed=3)
    ids = random_ids(2, 5)
    kwargs = dict(
        max_new_tokens=6,
        min_new_tokens=6,
        num_return_sequences=2,
        do_sample=True,
        top_k=1,
        pad_token_id=0,
        eos_token_id=5,
    )
    fast = model.generate(ids, **kwargs)
    slow = model.generate(ids, fast_decode=False, **kwargs)
    assert fast.shape == (4, 11)
    assert torch.equal(fast, slow)


def test_layout_switches_back_for_batches():
    model = random_decilm(heterogeneous_config(), seed=1)
    ids = random_ids(3, 9)
    with torch.no_grad():
        before = model(ids).logits
        prepare_for_decode(model, batch_size=1)
        prepare_for_decode(model, batch_size=8)
        after = model(ids).logits
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.model.layers[0].self_attn.fused_qkv is None
    assert (before - after).abs().max().item() <= 1e-5


def test_decode_linear_fast_path_matches_f_linear():
    from open_nemotron.model.modeling import DeciLMLinear

    lin = DeciLMLinear(48, 70, bias=True)
    for rows in (1, 2, 7, 16, 17):
        x = torch.randn(rows, 1, 48)
        with torch.no_grad():
            assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-6)


def test_one_row_split_product_equals_the_float64_product_to_fp32_rounding():
    """The one-row product over column blocks (one per thread) computes every output as one dot product over the whole
    input: within the fp32 error bound of any summation order of the float64 result (MKL sums it in F.linear's order
    on AVX2, not on AVX-512, so bit-identity is machine-dependent and not asserted); a misplaced block would be off
    by the outputs' own size. Biased products stay on F.linear."""
    from open_nemotron.model.modeling import decode_linear

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        for out_features, in_features in ((1024, 48), (1536, 576), (576, 1536)):
            weight = torch.randn(out_features, in_features, generator=gen).t().contiguous().t()  # column-major
            bias = torch.randn(out_features, generator=gen)
            x = torch.randn(1, 1, in_features, generator=gen)
            exact = x.double() @ weight.double().t()
            # |fl(sum) - sum| <= n * u * sum |x_i w_i| for any order of an n-term fp32 sum (u = 2^-24).
            bound = in_features * 2.0**-24 * (x.double().abs() @ weight.double().abs().t())
            with torch.no_grad():
                assert ((decode_linear(x, weight).double() - exact).abs() <= bound).all()
                assert torch.equal(decode_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    finally:
        torch.set_num_threads(threads)
