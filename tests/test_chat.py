"""`generate_chat` and `ensure_reasoning_template` on tiny random models and the in-code tokenizers."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import heterogeneous_config, random_decilm, random_llama, tiny_llama_config
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
    generate_continuations,
    has_reasoning_template,
    left_pad,
    request_seed,
    resolve_sampling,
    stop_token_ids,
    uses_engine,
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
        return random_decilm(deci_config_from_llama(config.to_dict(), non_portable_ffn_widths=True))
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


MORE_CONVERSATIONS = CONVERSATIONS + [
    [{"role": "user", "content": "Count to five."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue? Answer in detail."}],
    [{"role": "user", "content": "2+2?"}],
]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("layout", ["llama", "heterogeneous"])
def test_greedy_on_the_engine_equals_the_padded_path_and_transformers(reasoning_chatml, layout, thinking) -> None:
    """Greedy replies on the engine (2 slots for 6 conversations: rows join as others finish) are those of padded
    `generate` batches, and for a Llama-shaped model those of transformers' LlamaForCausalLM."""
    if layout == "llama":
        model, reference = tiny_model("ours"), tiny_model("transformers")
    else:
        model = random_decilm(heterogeneous_config(initializer_range=0.5), seed=3)
        reference = None
    assert uses_engine(model) and not uses_engine(tiny_model("transformers"))
    kwargs = dict(thinking=thinking, max_new_tokens=10, do_sample=False, batch_size=2)
    on_engine = generate_chat(model, reasoning_chatml, MORE_CONVERSATIONS, **kwargs)
    padded = generate_chat(model, reasoning_chatml, MORE_CONVERSATIONS, padded=True, **kwargs)
    assert on_engine == padded
    if reference is not None:
        assert generate_chat(reference, reasoning_chatml, MORE_CONVERSATIONS, **kwargs) == on_engine
    assert len(set(on_engine)) > 1


@pytest.mark.parametrize("padded", [False, True])
def test_on_reply_sees_every_conversation_once(reasoning_chatml, padded) -> None:
    seen: list[int] = []
    replies = generate_chat(
        tiny_model("ours"),
        reasoning_chatml,
        MORE_CONVERSATIONS,
        thinking=False,
        max_new_tokens=4,
        batch_size=2,
        padded=padded,
        on_reply=seen.append,
    )
    assert sorted(seen) == list(range(len(MORE_CONVERSATIONS))) and len(replies) == len(seen)


def test_engine_samples_depend_on_the_seed_and_index_not_on_the_batching(reasoning_chatml) -> None:
    model = tiny_model("ours")

    def sample(batch_size: int, conversations=MORE_CONVERSATIONS) -> list[str]:
        return generate_chat(
            model, reasoning_chatml, conversations, thinking=True, max_new_tokens=8, seed=7, batch_size=batch_size
        )

    together = sample(6)
    assert sample(1) == together and sample(4) == together
    # Conversation i is drawn from request_seed(7, i): the first two alone give the same replies.
    assert sample(2, MORE_CONVERSATIONS[:2]) == together[:2]
    assert request_seed(7, 0) != request_seed(7, 1) != request_seed(8, 0)


def test_reasoning_budget_caps_the_think_block(reasoning_chatml, monkeypatch) -> None:
    """With a template that opens the think block after the generation prompt (as thinking templates do), each
    reply's reasoning is cut at the budget by the engine's own `</think>`; on the padded path a budget is refused."""
    from open_nemotron.model.chat_template import THINK_CLOSE

    templates = dict(reasoning_chatml.chat_template)
    templates["default"] += "{% if add_generation_prompt %}<think>\n{% endif %}"
    reasoning_chatml.chat_template = templates
    model = random_decilm(heterogeneous_config(initializer_range=0.5), seed=3)
    kwargs = dict(thinking=True, max_new_tokens=40, do_sample=False, batch_size=2)
    from open_nemotron.serve.engine import Engine

    completions = []
    real_run = Engine.run

    def spy_run(self, requests, on_finish=None):
        completions.extend(real_run(self, requests, on_finish))
        return completions[-len(CONVERSATIONS) :]

    free = generate_chat(model, reasoning_chatml, CONVERSATIONS, **kwargs)
    monkeypatch.setattr(Engine, "run", spy_run)
    capped = generate_chat(model, reasoning_chatml, CONVERSATIONS, reasoning_budget=3, **kwargs)
    close_ids = reasoning_chatml.encode("\n" + THINK_CLOSE, add_special_tokens=False)
    for reply, reference, completion in zip(
        capped, free, sorted(completions, key=lambda c: int(c.request_id)), strict=True
    ):
        assert THINK_CLOSE not in reference and THINK_CLOSE in reply  # a random model never closes it itself
        # 3 reasoning tokens of the model's own, then the engine's `\n</think>`, then the model again.
        assert completion.reasoning_tokens == 3
        assert completion.token_ids[3 : 3 + len(close_ids)] == close_ids
    with pytest.raises(ChatGenerationError, match="reasoning_budget needs the engine"):
        generate_chat(model, reasoning_chatml, CONVERSATIONS, reasoning_budget=3, padded=True, **kwargs)
    with pytest.raises(ChatGenerationError, match="reasoning_budget = -1"):
        generate_chat(model, reasoning_chatml, CONVERSATIONS, reasoning_budget=-1, **kwargs)


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


@pytest.mark.parametrize("kind", ["ours", "transformers"])
def test_continuations_follow_the_opening_as_plain_text_and_are_seeded(kind) -> None:
    """Plain-text sampling (the calibration's free-text documents): the prompt is the opening's own tokens, no
    chat markup; with a seed the engine's samples do not depend on the batching; both paths give text."""
    tokenizer, model = chatml_tokenizer(), tiny_model(kind)
    openings = ["hello there", "the cat", "hello there"]

    def sample(batch_size: int) -> list[str]:
        return generate_continuations(model, tokenizer, openings, max_new_tokens=6, seed=3, batch_size=batch_size)

    first = sample(2)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    if kind == "ours":
        assert first == sample(1) == sample(3)
        assert first[0] != first[2]  # equal openings, other rows: other streams
    with pytest.raises(ChatGenerationError, match="max_new_tokens"):
        generate_continuations(model, tokenizer, openings, max_new_tokens=0)
