"""Reasoning-switch chat templates and the `<think>` parser, on tiny in-code tokenizers (no downloads, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from tokenizers_for_tests import SMOLLM2_CHAT_TEMPLATE, chatml_tokenizer, llama3_tokenizer
from transformers import AutoTokenizer
from trl.chat_template_utils import (
    get_training_chat_template,
    has_generation_markers,
    is_chat_template_prefix_preserving,
    is_chat_template_stop_token_trained,
)

from open_nemotron.model.chat_template import (
    THINK_CLOSE,
    THINK_OPEN,
    THINKING_OFF,
    THINKING_ON,
    UnsupportedChatFormatError,
    detect_chat_format,
    install_reasoning_templates,
    reasoning_chat_template,
    split_reasoning,
)


@dataclass(frozen=True)
class Fmt:
    """The expected wire format, written out independently of the templates under test."""

    name: str
    make: Callable
    bos: str
    eot: str
    turn: Callable[[str, str], str]
    gen: str


CHATML = Fmt(
    name="chatml",
    make=chatml_tokenizer,
    bos="",
    eot="<|im_end|>",
    turn=lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n",
    gen="<|im_start|>assistant\n",
)
LLAMA3 = Fmt(
    name="llama3",
    make=llama3_tokenizer,
    bos="<|begin_of_text|>",
    eot="<|eot_id|>",
    turn=lambda role, content: f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
    gen="<|start_header_id|>assistant<|end_header_id|>\n\n",
)


@pytest.fixture(params=[CHATML, LLAMA3], ids=lambda f: f.name)
def fmt(request: pytest.FixtureRequest) -> Fmt:
    return request.param


@pytest.fixture
def tok(fmt: Fmt):
    tokenizer = fmt.make()
    install_reasoning_templates(tokenizer)
    return tokenizer


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


USER = {"role": "user", "content": "What is 2+2?"}
ANSWER_ON = {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nIt is 4."}
ANSWER_OFF = {"role": "assistant", "content": "It is 4."}


# --- detect_chat_format -------------------------------------------------------------------------------------------


def test_detect_chat_format_known_templates() -> None:
    assert detect_chat_format(SMOLLM2_CHAT_TEMPLATE) == "chatml"
    assert detect_chat_format(llama3_tokenizer().chat_template) == "llama3"
    assert detect_chat_format(reasoning_chat_template("chatml")) == "chatml"
    assert detect_chat_format(reasoning_chat_template("llama3", training=True)) == "llama3"


@pytest.mark.parametrize(
    ("template", "found"),
    [(None, "None"), ("{% for m in messages %}[INST]\n{{ m['content'] }}[/INST]{% endfor %}", "[INST]")],
)
def test_detect_chat_format_rejects_others(template: str | None, found: str) -> None:
    with pytest.raises(UnsupportedChatFormatError) as info:
        detect_chat_format(template)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert found in message and "chatml" in message and "llama3" in message


def test_reasoning_chat_template_rejects_unknown_format() -> None:
    with pytest.raises(UnsupportedChatFormatError, match="mistral"):
        reasoning_chat_template("mistral")


# --- the reasoning switch -----------------------------------------------------------------------------------------


def test_exact_strings_literal() -> None:
    # Written out in full once per format, so a bug shared by the template and `Fmt` cannot hide.
    chatml, llama3 = chatml_tokenizer(), llama3_tokenizer()
    install_reasoning_templates(chatml)
    install_reasoning_templates(llama3)
    assert render(chatml, [USER], add_generation_prompt=True) == (
        "<|im_start|>system\ndetailed thinking on<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(llama3, [USER], add_generation_prompt=True, enable_thinking=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking off<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_default_is_on_and_parent_system_prompt_dropped(tok, fmt: Fmt) -> None:
    text = render(tok, [USER], add_generation_prompt=True)
    assert text == fmt.bos + fmt.turn("system", THINKING_ON) + fmt.turn("user", USER["content"]) + fmt.gen
    assert "SmolLM" not in text
    # Without a generation prompt the conversation just ends.
    assert render(tok, [USER]) == fmt.bos + fmt.turn("system", THINKING_ON) + fmt.turn("user", USER["content"])


@pytest.mark.parametrize(("enable", "control"), [(True, THINKING_ON), (False, THINKING_OFF), (None, THINKING_ON)])
def test_enable_thinking(tok, fmt: Fmt, enable: bool | None, control: str) -> None:
    # None (e.g. an unset server-side kwarg) counts as not given.
    text = render(tok, [USER], add_generation_prompt=True, enable_thinking=enable)
    assert text == fmt.bos + fmt.turn("system", control) + fmt.turn("user", USER["content"]) + fmt.gen


@pytest.mark.parametrize("control", [THINKING_ON, THINKING_OFF])
def test_control_system_message_used_once(tok, fmt: Fmt, control: str) -> None:
    messages = [{"role": "system", "content": control}, USER]
    text = render(tok, messages, add_generation_prompt=True)
    assert text == fmt.bos + fmt.turn("system", control) + fmt.turn("user", USER["content"]) + fmt.gen


@pytest.mark.parametrize(
    ("system", "enable", "control"), [(THINKING_OFF, True, THINKING_ON), (THINKING_ON, False, THINKING_OFF)]
)
def test_enable_thinking_overrides_control_system_message(
    tok, fmt: Fmt, system: str, enable: bool, control: str
) -> None:
    messages = [{"role": "system", "content": system}, USER]
    text = render(tok, messages, add_generation_prompt=True, enable_thinking=enable)
    assert text == fmt.bos + fmt.turn("system", control) + fmt.turn("user", USER["content"]) + fmt.gen
    assert text.count("detailed thinking") == 1


@pytest.mark.parametrize(("enable", "control"), [({}, THINKING_ON), ({"enable_thinking": False}, THINKING_OFF)])
def test_custom_system_message_follows_control(tok, fmt: Fmt, enable: dict, control: str) -> None:
    messages = [{"role": "system", "content": "You are terse."}, USER]
    text = render(tok, messages, add_generation_prompt=True, **enable)
    expected_system = f"{control}\n\nYou are terse."
    assert text == fmt.bos + fmt.turn("system", expected_system) + fmt.turn("user", USER["content"]) + fmt.gen


def test_empty_custom_system_message_adds_nothing(tok, fmt: Fmt) -> None:
    text = render(tok, [{"role": "system", "content": ""}, USER])
    assert text == fmt.bos + fmt.turn("system", THINKING_ON) + fmt.turn("user", USER["content"])


def test_llama3_bos_once() -> None:
    tokenizer = llama3_tokenizer()
    install_reasoning_templates(tokenizer)
    conversation = [USER, ANSWER_OFF, USER, ANSWER_OFF]
    for name in ("default", "training"):
        text = render(tokenizer, conversation, chat_template=name, add_generation_prompt=True)
        assert text.startswith("<|begin_of_text|>") and text.count("<|begin_of_text|>") == 1


# --- reasoning in the history -------------------------------------------------------------------------------------


MULTI_TURN = [
    {"role": "system", "content": THINKING_ON},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "<think>\nr1 </think> still r1\n</think>\n\n  a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "plain a2"},
    {"role": "user", "content": "q3"},
    {"role": "assistant", "content": "<think>r3</think>a3"},
]


def test_inference_strips_history_reasoning(tok, fmt: Fmt) -> None:
    text = render(tok, MULTI_TURN)
    assert text == fmt.bos + "".join(
        [
            fmt.turn("system", THINKING_ON),
            fmt.turn("user", "q1"),
            fmt.turn("assistant", "a1"),  # after the last </think>, leading whitespace stripped
            fmt.turn("user", "q2"),
            fmt.turn("assistant", "plain a2"),
            fmt.turn("user", "q3"),
            fmt.turn("assistant", "<think>r3</think>a3"),  # the final message keeps its reasoning
        ]
    )


def test_training_keeps_history_reasoning(tok, fmt: Fmt) -> None:
    text = render(tok, MULTI_TURN, chat_template="training", add_generation_prompt=True)
    # Every turn verbatim; Llama-3 trims every message, as the parent template does.
    expected = [fmt.turn("system", THINKING_ON)]
    expected += [fmt.turn(m["role"], m["content"].strip() if fmt is LLAMA3 else m["content"]) for m in MULTI_TURN[1:]]
    assert text == fmt.bos + "".join(expected) + fmt.gen


def test_variants_agree_without_history(tok) -> None:
    for messages, gen in (([USER], True), ([{"role": "system", "content": "Hi."}, USER, ANSWER_ON], False)):
        inference = render(tok, messages, add_generation_prompt=gen)
        training = render(tok, messages, chat_template="training", add_generation_prompt=gen)
        assert inference == training


def test_continue_final_message_prefills_think(tok, fmt: Fmt) -> None:
    messages = [USER, {"role": "assistant", "content": THINK_OPEN}]
    text = render(tok, messages, continue_final_message=True)
    assert text == fmt.bos + fmt.turn("system", THINKING_ON) + fmt.turn("user", USER["content"]) + fmt.gen + THINK_OPEN


# --- training variant: masks, prefix preservation, TRL's own checks ----------------------------------------------


def _masked_runs(input_ids: list[int], mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = 0
    for token, flag in zip(input_ids, mask, strict=True):
        if flag and not previous:
            runs.append([])
        if flag:
            runs[-1].append(token)
        previous = flag
    return runs


@pytest.mark.parametrize("enable", [True, False])
def test_generation_mask_covers_exactly_assistant_content(tok, fmt: Fmt, enable: bool) -> None:
    messages = [
        {"role": "system", "content": "Be kind."},
        USER,
        ANSWER_ON,
        {"role": "user", "content": "And 3+3?"},
        ANSWER_OFF,
    ]
    out = tok.apply_chat_template(
        messages,
        chat_template="training",
        enable_thinking=enable,
        return_assistant_tokens_mask=True,
        return_dict=True,
        tokenize=True,
    )
    runs = _masked_runs(out["input_ids"], out["assistant_masks"])
    assert [tok.decode(run) for run in runs] == [ANSWER_ON["content"] + fmt.eot, ANSWER_OFF["content"] + fmt.eot]
    # Masked spans are whole tokens: re-encoding the content gives the same ids (no merge across the boundary).
    assert runs[1] == tok.encode(ANSWER_OFF["content"] + fmt.eot, add_special_tokens=False)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_training_template_is_prefix_preserving(tok, kwargs: dict) -> None:
    conversation = [{"role": "system", "content": "Be kind."}, *MULTI_TURN[1:]]
    full_text = render(tok, conversation, chat_template="training", **kwargs)
    full_ids = tok.apply_chat_template(conversation, chat_template="training", return_dict=False, **kwargs)
    cuts = [k + 1 for k, message in enumerate(conversation) if message["role"] == "assistant"]
    assert len(cuts) == 3
    for cut in cuts:
        head = conversation[:cut]
        assert full_text.startswith(render(tok, head, chat_template="training", **kwargs))
        head_ids = tok.apply_chat_template(head, chat_template="training", return_dict=False, **kwargs)
        assert full_ids[: len(head_ids)] == head_ids
        # The prompt for the next assistant turn is a prefix too (prompt/completion tokenisation).
        prompt = render(tok, conversation[: cut - 1], chat_template="training", add_generation_prompt=True, **kwargs)
        assert full_text.startswith(prompt)


def test_trl_accepts_training_template(fmt: Fmt) -> None:
    tokenizer = fmt.make()
    install_reasoning_templates(tokenizer)
    # TRL's checks read `tokenizer.chat_template` (the default), so give it a tokenizer whose default is training.
    training_only = fmt.make(chat_template=tokenizer.chat_template["training"])
    assert has_generation_markers(training_only.chat_template)
    assert get_training_chat_template(training_only) is None  # None means "already training-compatible"
    assert is_chat_template_prefix_preserving(training_only)
    assert is_chat_template_stop_token_trained(training_only)
    # By name on the installed tokenizer, as a trainer would pass it.
    assert is_chat_template_stop_token_trained(tokenizer, chat_template="training")
    assert is_chat_template_prefix_preserving(tokenizer)


# --- installing, saving, reloading --------------------------------------------------------------------------------


def test_install_sets_default_and_training(fmt: Fmt) -> None:
    tokenizer = fmt.make()
    install_reasoning_templates(tokenizer)
    assert tokenizer.chat_template == {
        "default": reasoning_chat_template(fmt.name),
        "training": reasoning_chat_template(fmt.name, training=True),
    }
    assert "{% generation %}" not in tokenizer.chat_template["default"]
    assert has_generation_markers(tokenizer.chat_template["training"])
    before = dict(tokenizer.chat_template)
    install_reasoning_templates(tokenizer)  # idempotent
    assert tokenizer.chat_template == before


@pytest.mark.parametrize("template", [None, "{{ messages[0]['content'] }}"])
def test_install_rejects_unsupported(template: str | None) -> None:
    tokenizer = chatml_tokenizer(chat_template=template)
    with pytest.raises(UnsupportedChatFormatError):
        install_reasoning_templates(tokenizer)


def test_save_and_reload_keeps_both_templates(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == tok.chat_template["default"]
    assert (tmp_path / "additional_chat_templates" / "training.jinja").read_text(encoding="utf-8") == tok.chat_template[
        "training"
    ]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tok.chat_template
    for name in ("default", "training"):
        assert render(reloaded, MULTI_TURN, chat_template=name) == render(tok, MULTI_TURN, chat_template=name)
    assert render(reloaded, MULTI_TURN) == render(tok, MULTI_TURN, chat_template="default")


# --- split_reasoning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>R</think>A", ("R", "A")),
        ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.\n", ("step 1\nstep 2", "The answer is 4.")),
        ("  \n<think> R </think> A ", ("R", "A")),  # whitespace before <think> is allowed
        ("<think></think>A", ("", "A")),  # empty think block: reasoning is "" (not None)
        ("<think>\n\n</think>\n\nA", ("", "A")),
        ("<think>partial reasoning, then the budget ran ou", ("partial reasoning, then the budget ran ou", "")),
        ("<think>", ("", "")),
        ("reasoning from a pre-filled prompt\n</think>\n\nA", ("reasoning from a pre-filled prompt", "A")),
        ("</think>A", ("", "A")),
        ("  just an answer  ", (None, "just an answer")),
        ("", (None, "")),
        ("<think>R</think>A</think>B", ("R", "A</think>B")),  # reasoning ends at the first close tag
        ("Answer first <think>R</think>A", (None, "Answer first <think>R</think>A")),  # not a leading think block
    ],
)
def test_split_reasoning(text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text) == expected


def test_split_reasoning_inverts_a_reasoning_answer() -> None:
    reasoning, answer = "Let me add.\n2+2=4", "4"
    assert split_reasoning(f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}") == (reasoning, answer)
