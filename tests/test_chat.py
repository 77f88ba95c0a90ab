"""`generate_chat` and `ensure_reasoning_template` on tiny random models and the in-code tokenizers."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_decilm, random_llama, tiny_llama_config
from tokenizers_for_tests import LLAMA3_CHAT_TEMPLATE, SMOLLM2_CHAT_TEMPLATE, chatml_tokenizer, llama3_tokenizer

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat import (
    REASONING_TEMPLATE_MARKER,
    THINKING_TEMPERATURE,
    THINKING_TOP_P,
    ChatGenerationError,
    SamplingSettings,
    ensure_reasoning_template,
    generate_chat,
    has_reasoning_template,
    left_pad,
    resolve_sampling,
    stop_token_ids,
)
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON, reasoning_chat_template
from open_nemotron.model.loading import deci_config_from_llama

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the sum of the first ten prime numbers? Explain."}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]


def tiny_model(kind: str):
    """A tiny random model: our DeciLM ("ours") or transformers' Llama, same shapes and same seed."""
    # A large initializer_range spreads the logits, so greedy argmax never hinges on float rounding noise.
    config = tiny_llama_config(initializer_range=0.5)
    if kind == "ours":
        return random_decilm(deci_config_from_llama(config.to_dict()))
    return random_llama(config)


@pytest.fixture
def reasoning_chatml():
    tokenizer = chatml_tokenizer()
    ensure_reasoning_template(tokenizer)
    return tokenizer


def test_marker_is_in_every_reasoning_template() -> None:
    for fmt in ("chatml", "llama3"):
        for training in (False, True):
            assert REASONING_TEMPLATE_MARKER in reasoning_chat_template(fmt, training=training)


@pytest.mark.parametrize(
    ("make", "template", "system_turn"),
    [
        (chatml_tokenizer, SMOLLM2_CHAT_TEMPLATE, "<|im_start|>system\n{}<|im_end|>\n"),
        (llama3_tokenizer, LLAMA3_CHAT_TEMPLATE, "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"),
    ],
)
def test_raw_parent_template_gets_the_toggle(make, template, system_turn) -> None:
    tokenizer = make(template)
    raw = tokenizer.apply_chat_template(
        CONVERSATIONS[0], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert THINKING_OFF not in raw  # the parent's own template ignores enable_thinking
    assert not has_reasoning_template(tokenizer)

    ensure_reasoning_template(tokenizer)
    assert has_reasoning_template(tokenizer)
    for thinking, control in ((False, THINKING_OFF), (True, THINKING_ON)):
        rendered = tokenizer.apply_chat_template(
            CONVERSATIONS[0], add_generation_prompt=True, enable_thinking=thinking, tokenize=False
        )
        assert system_turn.format(control) in rendered


def test_ensure_reasoning_template_keeps_an_installed_template() -> None:
    tokenizer = chatml_tokenizer()
    ensure_reasoning_template(tokenizer)
    installed = dict(tokenizer.chat_template)
    # A template we would not produce ourselves but that carries the marker counts as ours: left alone.
    tokenizer.chat_template = {**installed, "default": installed["default"] + "{#- edited #}"}
    ensure_reasoning_template(tokenizer)
    assert tokenizer.chat_template["default"].endswith("{#- edited #}")


def test_ensure_reasoning_template_refuses_an_unknown_format() -> None:
    tokenizer = chatml_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(OpenNemotronError, match="supported chat formats"):
        ensure_reasoning_template(tokenizer)


def test_stop_tokens_add_the_end_of_turn_token_when_eos_differs() -> None:
    tokenizer = llama3_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(tokenizer) == [eot]
    tokenizer.eos_token = "<|end_of_text|>"  # a Llama-3 base tokenizer
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), eot]


def test_left_pad() -> None:
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sampling_defaults_follow_the_paper() -> None:
    assert resolve_sampling(thinking=True) == SamplingSettings(True, THINKING_TEMPERATURE, THINKING_TOP_P)
    assert resolve_sampling(thinking=False) == SamplingSettings(False, None, None)
    assert resolve_sampling(thinking=False, temperature=0.8) == SamplingSettings(True, 0.8, THINKING_TOP_P)
    assert resolve_sampling(thinking=True, temperature=0) == SamplingSettings(False, None, None)
    assert resolve_sampling(thinking=True, do_sample=False) == SamplingSettings(False, None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(do_sample=False, temperature=0.7), "greedy decoding takes neither"),
        (dict(do_sample=True, temperature=-1.0), "temperature = -1.0"),
        (dict(top_p=1.5), "top_p = 1.5"),
    ],
)
def test_bad_sampling_settings_are_one_line_errors(kwargs, message) -> None:
    with pytest.raises(ChatGenerationError, match=message) as info:
        resolve_sampling(thinking=True, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["ours", "transformers"])
def test_batches_keep_order_and_match_single_runs(reasoning_chatml, kind) -> None:
    model = tiny_model(kind)
    batched = generate_chat(model, reasoning_chatml, CONVERSATIONS, thinking=False, max_new_tokens=8, batch_size=2)
    alone = [
        generate_chat(model, reasoning_chatml, [conversation], thinking=False, max_new_tokens=8)[0]
        for conversation in CONVERSATIONS
    ]
    assert batched == alone
    assert len(set(batched)) == len(batched)  # distinct replies, so a reordering could not go unnoticed


def test_returns_only_the_new_text(reasoning_chatml) -> None:
    model = tiny_model("ours")
    (reply,) = generate_chat(model, reasoning_chatml, CONVERSATIONS[:1], thinking=False, max_new_tokens=6)
    prompt = reasoning_chatml.apply_chat_template(
        CONVERSATIONS[:1][0], add_generation_prompt=True, enable_thinking=False, return_dict=False
    )
    output = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)
    new_tokens = [t for t in output[0, len(prompt) :].tolist() if t != 2]
    assert reply == reasoning_chatml.decode(new_tokens)


def test_seed_makes_sampling_reproducible(reasoning_chatml) -> None:
    model = tiny_model("ours")

    def sample(seed: int) -> list[str]:
        return generate_chat(model, reasoning_chatml, CONVERSATIONS, thinking=True, max_new_tokens=8, seed=seed)

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first


def test_empty_input_and_bad_arguments(reasoning_chatml) -> None:
    model = tiny_model("ours")
    assert generate_chat(model, reasoning_chatml, [], thinking=False, max_new_tokens=4) == []
    with pytest.raises(ChatGenerationError, match="max_new_tokens = 0"):
        generate_chat(model, reasoning_chatml, CONVERSATIONS, thinking=False, max_new_tokens=0)
    with pytest.raises(ChatGenerationError, match="batch_size = 0"):
        generate_chat(model, reasoning_chatml, CONVERSATIONS, thinking=False, max_new_tokens=4, batch_size=0)
    with pytest.raises(ChatGenerationError, match="conversation 1"):
        generate_chat(model, reasoning_chatml, [CONVERSATIONS[0], []], thinking=False, max_new_tokens=4)
