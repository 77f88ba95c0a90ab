"""The llama.cpp engine's request handling against the reference engine: the same rules over a one-sequence forward
pass. The forward pass here is our model recomputed over the whole held sequence (no llama.cpp needed), and it
checks that the engine keeps exactly the prefix the sequence holds; llama.cpp itself is checked in
tests/test_llama_cpp_gguf.py (make check-gguf)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from models_for_tests import TINY_VOCAB, heterogeneous_config, random_decilm
from tokenizers_for_tests import chatml_tokenizer

from open_nemotron.model.chat import ensure_reasoning_template
from open_nemotron.serve.engine import Engine, Request, SamplingParams
from open_nemotron.serve.llama_cpp_engine import LlamaCppEngine, LlamaCppUnavailableError, load_gguf


class RecomputingForward:
    """One KV sequence, recomputed from scratch on every call: `logits(tokens, start)` must keep exactly the first
    `start` positions it holds (a stale or skipped position would change the logits, and is refused here)."""

    def __init__(self, model) -> None:
        self.model, self.vocab_size = model, model.config.vocab_size
        self.sequence: list[int] = []
        self.evaluated = 0  # tokens evaluated, to see prefix reuse

    @torch.inference_mode()
    def logits(self, tokens: Sequence[int], start: int) -> np.ndarray:
        assert 0 <= start <= len(self.sequence), (start, len(self.sequence))
        self.sequence = self.sequence[:start] + list(tokens)
        self.evaluated += len(tokens)
        return self.model(torch.tensor([self.sequence])).logits[0, -1].float().numpy()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n,), generator=gen).tolist()
    return [torch.randint(3, TINY_VOCAB, (k,), generator=gen).tolist() for k in lengths]


def _both(model, requests, max_length=32, tokenizer=None):
    reference = Engine(model, max_batch_size=3, max_length=max_length, tokenizer=tokenizer).run(requests())
    engine = LlamaCppEngine(RecomputingForward(model), max_length, tokenizer)
    return reference, engine.run(requests()), engine


def test_greedy_and_seeded_sampling_equal_the_reference_engine():
    model = random_decilm(heterogeneous_config(), seed=11)
    prompts = _prompts(6)

    def requests():
        out = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=3 + i, temperature=0)
            if i % 2:
                params = SamplingParams(max_tokens=3 + i, temperature=0.8, top_p=0.9, top_k=20, seed=100 + i)
            out.append(Request(prompt, params))
        return out

    reference, got, engine = _both(model, requests)
    assert [c.token_ids for c in got] == [c.token_ids for c in reference]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in reference]
    assert not engine.has_work()


def test_stop_tokens_and_the_context_limit_end_requests_as_in_the_reference():
    model = random_decilm(heterogeneous_config(), seed=5)
    prompts = _prompts(4, seed=2)
    first = Engine(model, max_batch_size=1, max_length=32).run(
        [Request(prompts[0], SamplingParams(max_tokens=8, temperature=0))]
    )
    stop = first[0].token_ids[3]

    def requests():
        params = SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop,))
        return [Request(p, params) for p in prompts]

    reference, got, _ = _both(model, requests, max_length=20)
    assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in reference]
    assert {c.finish_reason for c in got} <= {"stop", "length"} and "length" in {c.finish_reason for c in got}


def test_a_new_request_evaluates_only_what_the_cache_does_not_hold():
    model = random_decilm(heterogeneous_config(), seed=7)
    shared = _prompts(1, seed=3)[0] + [9, 10, 11, 12]
    prompts = [shared + [20, 21], shared + [22]]
    forward = RecomputingForward(model)
    engine = LlamaCppEngine(forward, 40)
    got = engine.run([Request(p, SamplingParams(max_tokens=4, temperature=0)) for p in prompts])
    reference = Engine(model, max_batch_size=1, max_length=40, prefix_reuse=False).run(
        [Request(p, SamplingParams(max_tokens=4, temperature=0)) for p in prompts]
    )
    assert [c.token_ids for c in got] == [c.token_ids for c in reference]
    assert engine.reused_tokens == len(shared)
    # First request: its prompt, then one token per decode step; second: only the unshared tail.
    assert forward.evaluated == len(prompts[0]) + 3 + 1 + 3


@pytest.mark.parametrize("budget", [0, 3])
def test_stop_strings_and_reasoning_budgets_follow_the_same_rules(budget):
    tok = chatml_tokenizer()
    ensure_reasoning_template(tok)
    model = random_decilm(heterogeneous_config(), seed=13)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    prompt = tok.encode(rendered + "<think>\n", add_special_tokens=False)

    def requests():
        return [
            Request(prompt, SamplingParams(max_tokens=20, temperature=0, max_reasoning_tokens=budget)),
            Request(prompt, SamplingParams(max_tokens=20, temperature=0, stop=("e",))),
        ]

    reference, got, _ = _both(model, requests, max_length=200, tokenizer=tok)
    for ours, ref in zip(got, reference, strict=True):
        assert (ours.token_ids, ours.text, ours.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
    assert got[0].reasoning_tokens == budget


def test_cancelling_the_running_request_lets_the_next_one_run():
    model = random_decilm(heterogeneous_config(), seed=2)
    prompts = _prompts(2, seed=4)
    engine = LlamaCppEngine(RecomputingForward(model), 32)
    ids = [engine.add_request(Request(p, SamplingParams(max_tokens=10, temperature=0))) for p in prompts]
    engine.step()
    cancelled = engine.cancel(ids[0])
    assert cancelled is not None and cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == 2
    rest = []
    while engine.has_work():
        rest += engine.step()
    expected = Engine(model, max_batch_size=1, max_length=32).run(
        [Request(prompts[1], SamplingParams(max_tokens=10, temperature=0))]
    )
    assert [c.token_ids for c in rest] == [expected[0].token_ids]


def test_load_gguf_refuses_what_is_not_a_gguf(tmp_path):
    with pytest.raises(LlamaCppUnavailableError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf", 64)
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x00" * 16)
    with pytest.raises(LlamaCppUnavailableError, match="not a GGUF file"):
        load_gguf(not_gguf, 64)


def test_without_llama_cpp_python_the_error_says_how_to_get_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here")
    gguf = tmp_path / "child.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 12)
    with pytest.raises(LlamaCppUnavailableError, match="make check-gguf"):
        load_gguf(gguf, 64)
