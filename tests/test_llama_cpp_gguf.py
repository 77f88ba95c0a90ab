"""Our GGUF run by llama.cpp itself (llama-cpp-python): greedy tokens equal ours. Skipped unless llama_cpp is
installed, which `make check-gguf` does (it builds llama.cpp from source, ~11 min on 2 cores); never in `make test`'s
default path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models_for_tests import random_decilm
from test_export import MERGES, SERVABLE, ZERO_FFN, _config, _save

from open_nemotron.export.gguf import export_gguf
from open_nemotron.model.generation import decode

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make check-gguf)")
pytestmark = pytest.mark.llama_cpp


def llama_cpp_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=2, verbose=False)
    vocab = llm.n_vocab()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize("blocks", [SERVABLE, ZERO_FFN], ids=["servable", "zero-ffn-stand-ins"])
def test_llama_cpp_runs_a_heterogeneous_child_as_we_do(tmp_path: Path, blocks):
    """Including attention without an FFN and an empty last layer, which the GGUF gives an all-zero FFN."""
    config = _config(blocks)
    model_dir = _save(tmp_path, config, "child")
    path = export_gguf(model_dir, tmp_path / "child.gguf", dtype="f32", tokenizer_pre="gpt-2")
    ours = random_decilm(config, seed=3)
    for seed in range(3):
        prompt = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
        expected = decode(ours, prompt, max_new_tokens=16)[0, 12:].tolist()
        assert llama_cpp_greedy(path, prompt[0].tolist(), 16) == expected


@pytest.mark.slow
def test_llama_cpp_runs_the_converted_parent_and_tokenizes_as_we_do(tmp_path: Path):
    from open_nemotron.model.loading import convert, load_model, load_tokenizer, resolve_model_dir

    converted = convert(resolve_model_dir("smollm2-135m"), tmp_path / "converted")
    path = export_gguf(converted, tmp_path / "parent.gguf", dtype="f32")
    tokenizer = load_tokenizer(converted)
    model = load_model(converted, device="cpu")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    for text in ["What is 12*7? Explain briefly.", "The capital of France is", "def fibonacci(n):"]:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        expected = decode(model, torch.tensor([ids]), max_new_tokens=12)[0, len(ids) :].tolist()
        assert llama_cpp_greedy(path, ids, 12) == expected


def test_serving_through_llama_cpp_follows_our_engine(tmp_path: Path):
    """`serve --engine llama.cpp`'s engine and tokenizer over our GGUF: the chat prompt renders and tokenizes as
    the checkpoint's own tokenizer does, and greedy and seeded requests give our engine's tokens and text."""
    from tokenizers_for_tests import chatml_tokenizer

    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.serve.engine import Engine, Request, SamplingParams
    from open_nemotron.serve.llama_cpp_engine import load_gguf

    config = _config(SERVABLE)
    model_dir = _save(tmp_path, config, "child")
    path = export_gguf(model_dir, tmp_path / "child.gguf", dtype="f32", tokenizer_pre="gpt-2")
    engine, gguf_tokenizer = load_gguf(path, 160)
    ensure_reasoning_template(gguf_tokenizer)
    tokenizer = chatml_tokenizer(merges=MERGES)
    ensure_reasoning_template(tokenizer)
    messages = [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "Hi, 12*7?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    assert gguf_tokenizer.encode(rendered, add_special_tokens=False) == prompt
    assert gguf_tokenizer.eos_token_id == tokenizer.eos_token_id

    def requests():
        return [
            Request(prompt, SamplingParams(max_tokens=12, temperature=0)),
            Request(prompt[:-2], SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5)),
        ]

    ours = Engine(random_decilm(config, seed=3), max_batch_size=2, max_length=160, tokenizer=tokenizer).run(requests())
    got = engine.run(requests())
    assert [c.token_ids for c in got] == [c.token_ids for c in ours]
    assert [c.text for c in got] == [c.text for c in ours]
    # The second prompt is a prefix of what the cache holds: all of it is reused but its last token, which is
    # evaluated again for the next-token logits.
    assert engine.reused_tokens == len(prompt) - 3
