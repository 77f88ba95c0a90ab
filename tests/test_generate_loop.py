"""transformers' own generate loop (beams, streamers, logits processors, dict outputs) on our model: token for token
what LlamaForCausalLM produces on the same weights, with and without a padding mask, on the installed transformers
(the cache keyword is `cache` from 5.24 on, `past_key_values` before; the model takes both)."""

from __future__ import annotations

import copy

import pytest
import torch
from models_for_tests import (
    heterogeneous_config,
    left_padded,
    random_decilm,
    random_ids,
    save_tiny_llama,
    tiny_llama_config,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.generation import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.streamers import BaseStreamer

import open_nemotron  # noqa: F401  (registers nemotron-nas)
from open_nemotron.model import generation
from open_nemotron.model.cache import CACHE_OUTPUT_FIELD, DeciLMCache, NoKVCacheLayer
from open_nemotron.model.loading import convert


@pytest.fixture(scope="module")
def parent_and_converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    save_tiny_llama(tmp / "parent", tiny_llama_config(), seed=5)
    convert(tmp / "parent", tmp / "converted", non_portable_ffn_widths=True)
    parent = LlamaForCausalLM.from_pretrained(tmp / "parent").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp / "converted").eval()
    return parent, ours


def _inputs(padded: bool) -> dict:
    if padded:
        ids, mask = left_padded(3, 11)
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": random_ids(2, 9)}


class CollectingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.ended = True


class BanEveryThirdToken(LogitsProcessor):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, ::3] = float("-inf")
        return scores


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_transformers_loop_greedy_equals_llama(parent_and_converted, padded):
    parent, ours = parent_and_converted
    kwargs = dict(**_inputs(padded), max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(ours.generate(fast_decode=False, **kwargs), parent.generate(**kwargs))


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_beam_search_equals_llama(parent_and_converted, padded):
    parent, ours = parent_and_converted
    kwargs = dict(
        **_inputs(padded),
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    expected = parent.generate(**kwargs)
    got = ours.generate(**kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(got.sequences_scores, expected.sequences_scores, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_streamer_and_logits_processor_equal_llama(parent_and_converted, padded):
    parent, ours = parent_and_converted
    streams = []
    outputs = []
    for model in (parent, ours):
        streamer = CollectingStreamer()
        inputs = _inputs(padded)
        if padded:  # streamers take one row
            inputs = {k: v[-1:] for k, v in inputs.items()}
        out = model.generate(
            **inputs,
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=2,
            streamer=streamer,
            logits_processor=LogitsProcessorList([BanEveryThirdToken(), RepetitionPenaltyLogitsProcessor(1.3)]),
        )
        assert streamer.ended
        streams.append(torch.cat([c.flatten() for c in streamer.chunks]))
        outputs.append(out)
    assert torch.equal(outputs[1], outputs[0])
    assert torch.equal(streams[1], streams[0])
    assert not bool((outputs[1][0, -10:] % 3 == 0).any())  # the processor really ran


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_fast_loop_streams_what_llama_streams(parent_and_converted, padded, monkeypatch):
    """A streamer alone keeps the request plain: our loop serves it and calls the streamer as transformers does
    (the prompt, one chunk per new token, end), for a whole batch and with EOS-finished rows padded."""
    parent, ours = parent_and_converted
    calls = []
    real = generation.decode
    monkeypatch.setattr(generation, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = _inputs(padded)
    eos = int(parent.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=2)[0, -1])
    chunks, outputs = [], []
    for model in (parent, ours):
        streamer = CollectingStreamer()
        outputs.append(
            model.generate(
                **inputs, max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=eos, streamer=streamer
            )
        )
        assert streamer.ended
        chunks.append(streamer.chunks)
    assert calls == [1]
    assert torch.equal(outputs[1], outputs[0])
    assert len(chunks[1]) == len(chunks[0]) and all(torch.equal(a, b) for a, b in zip(*chunks, strict=True))


def test_seeded_sampling_with_default_top_k_equals_llama(parent_and_converted):
    """The fast loop applies transformers' defaults (top_k = 50 when unset) exactly: same draws, same tokens."""
    parent, ours = parent_and_converted
    kwargs = dict(input_ids=random_ids(2, 7), max_new_tokens=12, do_sample=True, temperature=1.7, pad_token_id=2)
    torch.manual_seed(123)
    expected = parent.generate(**kwargs)
    torch.manual_seed(123)
    assert torch.equal(ours.generate(**kwargs), expected)  # fast loop
    torch.manual_seed(123)
    assert torch.equal(ours.generate(fast_decode=False, **kwargs), expected)


def test_plain_requests_take_the_fast_loop_and_others_do_not(parent_and_converted, monkeypatch):
    _, ours = parent_and_converted
    calls = []
    real = generation.decode
    monkeypatch.setattr(generation, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = random_ids(1, 5)
    ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
    ours.generate(ids, max_new_tokens=3, do_sample=True, top_p=0.8, pad_token_id=2)
    assert len(calls) == 2
    ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2, repetition_penalty=1.2)
    ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2, num_beams=2)
    ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2, output_scores=True)
    ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2, fast_decode=False)
    assert len(calls) == 2


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_heterogeneous_beams_with_cache_equal_without(padded):
    """Beam search reorders the cache every step: layers without KV (linear, no-op attention) must keep up."""
    model = random_decilm(heterogeneous_config(), seed=9)
    kwargs = dict(**_inputs(padded), max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=2)
    assert torch.equal(model.generate(**kwargs), model.generate(use_cache=False, **kwargs))


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
@pytest.mark.parametrize("fast_decode", [True, False], ids=["our-loop", "transformers-loop"])
def test_static_cache_request_gives_the_uncached_tokens(padded, fast_decode):
    model = random_decilm(heterogeneous_config(), seed=3)
    kwargs = dict(**_inputs(padded), max_new_tokens=8, do_sample=False, pad_token_id=2)
    expected = model.generate(use_cache=False, **kwargs)
    assert torch.equal(model.generate(fast_decode=fast_decode, cache_implementation="static", **kwargs), expected)


def test_cache_keyword_either_name_and_output_field():
    model = random_decilm(heterogeneous_config(), seed=3)
    ids = random_ids(2, 6)
    step = random_ids(2, 1, seed=5)
    with torch.no_grad():
        full = model(torch.cat([ids, step], dim=1)).logits[:, -1]
        for name in ("cache", "past_key_values"):
            first = model(ids, use_cache=True)
            cache = getattr(first, CACHE_OUTPUT_FIELD)
            assert isinstance(cache, DeciLMCache) and cache.get_seq_length() == 6
            out = model(step, **{name: cache})
            assert torch.allclose(out.logits[:, -1], full, atol=1e-5)
        with pytest.raises(ValueError, match="not both"):
            model(step, cache=DeciLMCache(model.config), past_key_values=DeciLMCache(model.config))


def test_cache_has_no_kv_layers_where_attention_is_not_gqa():
    config = heterogeneous_config()
    cache = DeciLMCache(config)
    kinds = [b.attention.kind for b in config.layers_blocks()]
    assert [isinstance(layer, NoKVCacheLayer) for layer in cache.layers] == [k != "gqa" for k in kinds]
    k = torch.randn(2, 2, 4, 8)
    cache.update(k, k, 0)
    assert cache.get_seq_length(1) == 4 and cache.get_seq_length(0) == 4  # a no-KV layer answers for the first KV
    with pytest.raises(RuntimeError, match="cannot store"):
        cache.update(k, k, 1)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_a_model_whose_generation_config_turns_the_cache_off(padded):
    """What a Trainer-trained model can carry: generation_config.use_cache False. A GenerationConfig that leaves
    use_cache unset (TRL's GRPO passes one) then generates without a cache, as transformers resolves it, and must
    give the cached tokens: it once got our cache anyway and failed on the first full-sequence step."""
    from transformers import GenerationConfig

    model = random_decilm(heterogeneous_config(), seed=4)
    kwargs = dict(**_inputs(padded), pad_token_id=2)
    asked = GenerationConfig(max_new_tokens=6, do_sample=False, repetition_penalty=1.1)  # not plain: transformers
    assert asked.use_cache is None
    expected = model.generate(**kwargs, max_new_tokens=6, do_sample=False)
    with_cache = model.generate(**kwargs, generation_config=copy.deepcopy(asked))
    model.generation_config.use_cache = False
    assert torch.equal(model.generate(**kwargs, generation_config=copy.deepcopy(asked)), with_cache)
    assert torch.equal(model.generate(**kwargs, max_new_tokens=6, do_sample=False), expected)  # our loop refuses it too


@pytest.mark.parametrize("which", ["llama", "ours"])
def test_bench_speed_clock_reads_every_new_token_from_inside_generate(parent_and_converted, which):
    """bench-speed's timing streamer sees each of the `new_tokens` tokens once on both implementations (ours through
    the fast loop), so decode time is a span inside one call: never negative."""
    from open_nemotron.evaluate.throughput import timed_prefill_and_decode

    model = dict(zip(("llama", "ours"), parent_and_converted, strict=True))[which]
    prefill, decode = timed_prefill_and_decode(model, random_ids(2, 6), 5, torch.device("cpu"))
    assert prefill > 0 and decode >= 0
