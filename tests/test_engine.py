"""The continuous-batching engine against our own sequential generation (references: `model.generate` per prompt)."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import TINY_VOCAB, heterogeneous_config, no_gqa_decilm, random_decilm

from open_nemotron.model.generation import process_logits
from open_nemotron.serve.engine import (
    CANDIDATES,
    Engine,
    EngineError,
    Request,
    SamplingParams,
    candidate_distribution,
    draw,
    sample_rows,
)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n,), generator=gen).tolist()
    return [torch.randint(3, TINY_VOCAB, (k,), generator=gen).tolist() for k in lengths]


def _greedy_reference(model, prompt: list[int], max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=list(stop) or None,
    )
    tokens = out[0, len(prompt) :].tolist()
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_greedy_equals_sequential_generation_with_more_requests_than_slots(slots):
    """Ten requests of different prompt lengths and budgets through 1, 3 or 8 slots: rows join as others finish."""
    model = random_decilm(heterogeneous_config(), seed=11)
    prompts = _prompts(10)
    budgets = [3, 9, 1, 14, 5, 7, 2, 11, 6, 4]
    engine = Engine(model, max_batch_size=slots, max_length=32)
    got = engine.run(
        [Request(p, SamplingParams(max_tokens=b, temperature=0)) for p, b in zip(prompts, budgets, strict=True)]
    )
    for completion, prompt, budget in zip(got, prompts, budgets, strict=True):
        assert completion.token_ids == _greedy_reference(model, prompt, budget)
        assert completion.finish_reason == "length" and completion.prompt_ids == prompt
    assert not engine.has_work() and engine.running == {}


def test_stop_tokens_end_a_request_and_free_its_slot():
    model = random_decilm(heterogeneous_config(), seed=5)
    prompts = _prompts(4, seed=2)
    free_run = Engine(model, max_batch_size=2, max_length=32).run(
        [Request(p, SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
    )
    stop = free_run[0].token_ids[3]  # request 0's fourth token becomes a stop token for everyone
    got = Engine(model, max_batch_size=2, max_length=32).run(
        [Request(p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,))) for p in prompts]
    )
    assert got[0].token_ids == free_run[0].token_ids[: free_run[0].token_ids.index(stop) + 1]
    assert got[0].finish_reason == "stop"
    for completion, prompt in zip(got, prompts, strict=True):
        assert completion.token_ids == _greedy_reference(model, prompt, 10, (stop,))


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    model = random_decilm(heterogeneous_config(), seed=7)
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_tokens=8, temperature=1.3, top_k=20, top_p=0.9, seed=1234)
    alone = Engine(model, max_batch_size=1, max_length=32).run([Request(prompts[2], params)])[0]
    others = [Request(p, SamplingParams(max_tokens=6, temperature=0.8, seed=i)) for i, p in enumerate(prompts)]
    crowd = Engine(model, max_batch_size=4, max_length=32).run(others[:2] + [Request(prompts[2], params)] + others[3:])
    assert crowd[2].token_ids == alone.token_ids


def test_seeded_sampling_follows_the_sampling_formula():
    """One request, its own generator: each token is the exponential-race draw over the distribution that
    transformers' warpers give (process_logits: temperature, top-k, top-p) for the model's next-token logits,
    recomputed here with the full model and no cache."""
    model = random_decilm(heterogeneous_config(), seed=8)
    prompt = _prompts(1, seed=4)[0]
    for top_k, top_p in ((15, 0.8), (0, 0.9), (0, 1.0)):
        params = SamplingParams(max_tokens=6, temperature=0.7, top_k=top_k, top_p=top_p, seed=99)
        got = Engine(model, max_batch_size=2, max_length=32).run([Request(prompt, params)])[0].token_ids
        generator = torch.Generator().manual_seed(99)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                probs = process_logits(logits[None], 0.7, top_k, top_p).softmax(-1)[0]
                # The engine lists candidates by descending logit (the whole vocabulary in token order when
                # nothing is cut) and races one exponential per candidate.
                order = torch.arange(len(probs)) if (top_k, top_p) == (0, 1.0) else logits.argsort(descending=True)
                width = len(order) if (top_k, top_p) == (0, 1.0) else (top_k or CANDIDATES)
                candidates = order[:width]
                race = torch.empty(width).exponential_(1.0, generator=generator)
                ids.append(int(candidates[(probs[candidates] / race).argmax()]))
        assert got == ids[len(prompt) :], (top_k, top_p)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.6, 0, 0.95), (1.0, 0, 0.5), (1.3, 40, 0.9), (0.7, 7, 1.0)])
def test_candidate_distribution_is_transformers_warpers(temperature, top_k, top_p):
    """Same kept tokens and probabilities as process_logits (transformers' warpers, full sort), for rows whose
    nucleus fits in the candidates and rows (flat logits) where it does not and the whole vocabulary is sorted."""
    gen = torch.Generator().manual_seed(0)
    vocab = 2000
    sharp = torch.randn(6, vocab, generator=gen) * 4
    flat = torch.randn(3, vocab, generator=gen) * 0.01  # top-p mass spread over far more than CANDIDATES tokens
    logits = torch.cat([sharp, flat])
    probs, ids = candidate_distribution(logits, temperature, top_k, top_p)
    want = process_logits(logits, temperature, top_k, top_p).softmax(-1)
    got = torch.zeros_like(want).scatter_add_(1, ids, probs)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(probs.sum(-1), torch.ones(len(logits)))


# With top-k the candidates are the k highest logits and no row is widened: that case must not change either.
@pytest.mark.parametrize("top_k, top_p", [(0, 0.95), (0, 0.5), (30, 0.9)])
def test_a_rows_draws_do_not_depend_on_the_other_rows_of_its_group(top_k, top_p):
    """A sharp row (nucleus inside the candidates) sampled together with flat rows (nucleus past them, so the
    group's distribution is widened to the whole vocabulary) draws the very tokens it draws alone, step after step
    from one generator: its generator advances by the same number of draws either way."""
    gen = torch.Generator().manual_seed(1)
    vocab = 2000
    sharp = torch.randn(20, vocab, generator=gen) * 4
    flat = torch.randn(20, vocab, generator=gen) * 0.01
    alone_gen, crowd_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    alone, crowd = [], []
    for step in range(20):
        alone += sample_rows(sharp[step : step + 1], 0.8, top_k, top_p, [alone_gen])
        both = torch.stack([flat[step], sharp[step]])
        crowd += sample_rows(both, 0.8, top_k, top_p, [torch.Generator().manual_seed(step), crowd_gen])[1:]
    assert crowd == alone
    # And the flat row alone draws what it draws beside a sharp one.
    for step in range(5):
        flat_alone = sample_rows(flat[step : step + 1], 0.8, top_k, top_p, [torch.Generator().manual_seed(step)])
        flat_crowd = sample_rows(
            torch.stack([flat[step], sharp[step]]), 0.8, top_k, top_p, [torch.Generator().manual_seed(step), None]
        )[:1]
        assert flat_crowd == flat_alone


def test_draw_follows_the_probabilities():
    generator = torch.Generator().manual_seed(3)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(4000)]), minlength=4)
    assert counts[3] == 0
    assert torch.allclose(counts.float() / 4000, probs, atol=0.03)


def test_max_length_ends_a_request_before_the_cache_overflows():
    model = random_decilm(heterogeneous_config(), seed=9)
    prompt = _prompts(1, seed=5)[0][:6]
    got = Engine(model, max_batch_size=2, max_length=10).run(
        [Request(prompt, SamplingParams(max_tokens=50, temperature=0))]
    )
    assert got[0].finish_reason == "length"
    assert len(prompt) + len(got[0].token_ids) == 11  # 10 cached positions + the last token, never cached
    assert got[0].token_ids == _greedy_reference(model, prompt, len(got[0].token_ids))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens = 0"),
        ({"temperature": -1.0}, "temperature = -1.0"),
        ({"top_p": 0.0}, "top_p = 0.0"),
        ({"top_k": -3}, "top_k = -3"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(EngineError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused_with_the_reason():
    engine = Engine(random_decilm(heterogeneous_config(), seed=1), max_batch_size=1, max_length=8)
    with pytest.raises(EngineError, match="empty"):
        engine.add_request(Request([]))
    with pytest.raises(EngineError, match="at most 7"):
        engine.add_request(Request(list(range(3, 11))))
    with pytest.raises(EngineError, match="token ids in"):
        engine.add_request(Request([5, TINY_VOCAB]))
    assert not engine.has_work()
    with pytest.raises(EngineError, match="training mode"):
        Engine(random_decilm(heterogeneous_config(), seed=1).train())


def _chat_prompt(tokenizer, text: str, suffix: str = "") -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(rendered + suffix, add_special_tokens=False)


def test_stop_strings_cut_the_text_before_the_first_match():
    from tokenizers_for_tests import chatml_tokenizer

    tok = chatml_tokenizer()
    model = random_decilm(heterogeneous_config(), seed=12)
    prompt = _chat_prompt(tok, "hello there")
    free = Engine(model, max_batch_size=2, max_length=200, tokenizer=tok).run(
        [Request(prompt, SamplingParams(max_tokens=20, temperature=0))]
    )[0]
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    visible = free.text
    stop = visible[5:8]  # a piece of the model's own text
    assert stop and visible.find(stop) >= 0
    got = Engine(model, max_batch_size=2, max_length=200, tokenizer=tok).run(
        [Request(prompt, SamplingParams(max_tokens=20, temperature=0, stop=("never-there", stop)))]
    )[0]
    assert got.finish_reason == "stop"
    assert got.text == visible[: visible.find(stop)]
    assert got.token_ids == free.token_ids[: len(got.token_ids)]


@pytest.mark.parametrize("budget", [0, 4])
def test_reasoning_budget_closes_the_think_block_and_the_model_goes_on(budget):
    """A prompt that opens `<think>`: after `budget` reasoning tokens the engine writes `\\n</think>` itself; every
    other token is the model's greedy choice given everything before it (checked against generate)."""
    from tokenizers_for_tests import chatml_tokenizer

    tok = chatml_tokenizer()
    model = random_decilm(heterogeneous_config(), seed=13)
    prompt = _chat_prompt(tok, "think about it", suffix="<think>\n")
    got = Engine(model, max_batch_size=2, max_length=200, tokenizer=tok).run(
        [Request(prompt, SamplingParams(max_tokens=24, temperature=0, max_reasoning_tokens=budget))]
    )[0]
    close = tok.encode("\n</think>", add_special_tokens=False)
    if budget:
        assert got.token_ids[:budget] == _greedy_reference(model, prompt, budget)
    assert got.token_ids[budget : budget + len(close)] == close
    assert got.reasoning_tokens == budget
    head = prompt + got.token_ids[: budget + len(close)]
    rest = 24 - budget - len(close)
    assert got.token_ids[budget + len(close) :] == _greedy_reference(model, head, rest)
    assert "</think>" in got.text


def test_stop_strings_and_budgets_need_a_tokenizer():
    engine = Engine(random_decilm(heterogeneous_config(), seed=1), max_batch_size=1, max_length=16)
    with pytest.raises(EngineError, match="need the engine's tokenizer"):
        engine.add_request(Request([5, 6], SamplingParams(stop=("x",))))
    with pytest.raises(EngineError, match="max_reasoning_tokens = -1"):
        SamplingParams(max_reasoning_tokens=-1)


def test_streamed_tokens_and_cancellation_free_the_slot():
    """on_token sees every token as it is chosen; cancelling a running request frees its slot for the next one, and
    the others' tokens are unaffected."""
    model = random_decilm(heterogeneous_config(), seed=14)
    prompts = _prompts(3, seed=6)
    engine = Engine(model, max_batch_size=2, max_length=64)
    streamed: list[int] = []
    long = Request(prompts[0], SamplingParams(max_tokens=40, temperature=0), on_token=streamed.append)
    other = Request(prompts[1], SamplingParams(max_tokens=6, temperature=0))
    late = Request(prompts[2], SamplingParams(max_tokens=5, temperature=0))
    for request in (long, other, late):
        engine.add_request(request)
    assert engine.step() == [] and set(engine.running) == {0, 1} and len(engine.waiting) == 1
    engine.step()
    cancelled = engine.cancel(long.request_id)
    assert cancelled.finish_reason == "cancelled" and cancelled.token_ids == streamed and len(streamed) == 3
    assert cancelled.token_ids == _greedy_reference(model, prompts[0], 3)
    done = {}
    while engine.has_work():
        for completion in engine.step():
            done[completion.request_id] = completion
    assert 0 not in engine.running and len(streamed) == 3  # nothing more was generated for it
    assert done[other.request_id].token_ids == _greedy_reference(model, prompts[1], 6)
    assert done[late.request_id].token_ids == _greedy_reference(model, prompts[2], 5)  # took the freed slot
    waiting = Request(prompts[2], SamplingParams(max_tokens=5, temperature=0))
    engine.add_request(waiting)
    assert engine.cancel(waiting.request_id).token_ids == [] and not engine.has_work()
    assert engine.cancel("no-such-request") is None


def test_a_freed_slot_lends_its_prompt_prefix_and_the_tokens_stay_those_of_generate():
    """Prefix reuse: a request goes to the free slot whose kept keys/values share the longest prefix with its prompt
    and prefills only the rest; greedy tokens equal sequential generation and the engine without reuse."""
    model = random_decilm(heterogeneous_config(), seed=17)
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(3, TINY_VOCAB, (9,), generator=gen).tolist()
    tails = [torch.randint(3, TINY_VOCAB, (k,), generator=gen).tolist() for k in (3, 5, 2)]
    prompts = [shared + tails[0], shared + tails[1], shared + tails[0], shared + tails[2], shared[:4]]
    budgets = [6, 4, 7, 5, 3]

    def run(reuse: bool, slots: int):
        engine = Engine(model, max_batch_size=slots, max_length=40, prefix_reuse=reuse)
        requests = [
            Request(p, SamplingParams(max_tokens=b, temperature=0)) for p, b in zip(prompts, budgets, strict=True)
        ]
        return engine, [c.token_ids for c in engine.run(requests)]

    for slots in (1, 2):
        engine, got = run(True, slots)
        assert got == run(False, slots)[1]
        assert got == [_greedy_reference(model, p, b) for p, b in zip(prompts, budgets, strict=True)]
        assert engine.prompt_tokens == sum(len(p) for p in prompts)
        assert engine.reused_tokens >= len(shared) * 2  # the later prompts reuse the shared part at least
    # One slot: request 2 repeats request 0's prompt behind request 1: it reuses the 9 shared tokens only, request
    # 3 the same; request 4 (a 4-token prefix of them) could reuse 3 (a prefill needs one token of its own), fewer
    # than MIN_REUSE, so it is prefilled whole.
    engine, _ = run(True, 1)
    assert engine.reused_tokens == 9 + 9 + 9
    # Two slots: request 1 is admitted with request 0 and reads the shared part of request 0's slot (copied over);
    # request 2 repeats request 0's prompt, finds slot 0 free and reuses all of it but the last token; request 3 the
    # shared part; request 4 too little.
    engine, _ = run(True, 2)
    assert engine.reused_tokens == 9 + (len(prompts[0]) - 1) + 9


def test_prefix_choice_picks_the_slot_with_the_longest_shared_prefix():
    from open_nemotron.serve.engine import _shared_prefix

    assert _shared_prefix([1, 2, 3, 4], [1, 2, 3, 9]) == 3
    assert _shared_prefix([1, 2, 3], [1, 2, 3]) == 2  # the prompt's last token is always prefilled
    assert _shared_prefix([], [5, 6]) == 0 and _shared_prefix([5], [6, 5]) == 0
    model = random_decilm(heterogeneous_config(), seed=18)
    engine = Engine(model, max_batch_size=3, max_length=32)
    a, b = [5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25, 26]
    first = engine.run([Request(p, SamplingParams(max_tokens=2, temperature=0)) for p in (a, b)])
    assert [c.finish_reason for c in first] == ["length", "length"]
    assert engine.held[0][: len(a)] == a and engine.held[1][: len(b)] == b
    # The free slot 1 shares 5 tokens: the request takes slot 1 itself (slot 0 and 2 are free too).
    engine.run([Request([20, 21, 22, 23, 24, 99], SamplingParams(max_tokens=1, temperature=0))])
    assert engine.held[1] == [20, 21, 22, 23, 24, 99] and engine.reused_tokens == 5


def test_a_model_without_any_gqa_layer_decodes_on_the_engine():
    """Only linear and no-op attention (a Puzzle child under a tight budget): no layer reads the cache, so the
    engine's key mask has nothing to apply to; tokens equal sequential generation."""
    model = no_gqa_decilm(seed=4)
    prompts = _prompts(3, seed=6)
    got = Engine(model, max_batch_size=2, max_length=32).run(
        [Request(p, SamplingParams(max_tokens=5, temperature=0)) for p in prompts]
    )
    assert [c.token_ids for c in got] == [_greedy_reference(model, p, 5) for p in prompts]
