"""The one toggle-compliance rule (`rewards.format.toggle_violation`) on hand-written cases, and every caller of it:
the schema's row validation, the teachers' reply normalisation, the eval's compliance and the RL format reward."""

from __future__ import annotations

import pytest

from open_nemotron.data.schema import MALFORMED_REASONS, MalformedRowError, example_from_row
from open_nemotron.data.teachers import normalise_reply
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON
from open_nemotron.rewards.format import TOGGLE_VIOLATIONS, format_reward, is_toggle_compliant, toggle_violation

ON_CASES = [
    ("<think>\n2+2=4\n</think>\n\nThe answer is 4.", None),
    ("  <think></think>4", None),  # an empty think block is allowed (model card, NVIDIA's data)
    ("\n\n<think>r</think>4", None),  # whitespace before the block is not text
    ("<think>r</think>\n4\n", None),
    ("<think>a</think><think>b</think> 4", "bad_think"),  # two blocks
    ("<think><think>x</think></think> 4", "bad_think"),  # nested
    ("<think>never closed", "bad_think"),  # missing close
    ("<think>never closed, 4", "bad_think"),
    ("2+2=4</think>4", "bad_think"),  # missing open (a server's pre-filled <think>): not compliant as text
    ("Sure. <think>r</think>4", "bad_think"),  # text before the block
    ("</think><think>r4", "bad_think"),  # close before open
    ("<think>r</think>4 </think>", "bad_think"),  # a stray close after the answer
    ("<think>r</think>4 <think>", "bad_think"),  # a stray open after the answer
    ("<think>r</think>   ", "empty_answer"),
    ("<think>r</think>", "empty_answer"),
    ("<think></think>", "empty_answer"),
    ("4", "missing_think"),
    ("<thinking>r</thinking>4", "missing_think"),  # not our tags
    ("", "missing_think"),
]
OFF_CASES = [
    ("The answer is 4.", None),
    ("  4  ", None),
    ("<think>x</think> 4", "think_in_off"),
    ("<think></think>4", "think_in_off"),  # even an empty block is a tag
    ("4 </think>", "think_in_off"),
    ("4 <think>", "think_in_off"),
    ("", "empty_answer"),
    (" \n ", "empty_answer"),
]
CASES = [(text, True, reason) for text, reason in ON_CASES] + [(text, False, reason) for text, reason in OFF_CASES]


@pytest.mark.parametrize(("text", "thinking", "reason"), CASES)
def test_toggle_violation(text: str, thinking: bool, reason: str | None) -> None:
    assert toggle_violation(text, thinking) == reason
    assert is_toggle_compliant(text, thinking) is (reason is None)
    assert format_reward(text, thinking) == (1.0 if reason is None else 0.0)


def test_every_violation_is_a_schema_reason() -> None:
    assert set(TOGGLE_VIOLATIONS) <= set(MALFORMED_REASONS)
    assert {reason for _, _, reason in CASES} - {None} == set(TOGGLE_VIOLATIONS)


def row(output: str, thinking: bool) -> dict:
    return {
        "input": [{"role": "user", "content": "What is 2 + 2?"}],
        "output": output,
        "reasoning": "on" if thinking else "off",
        "system_prompt": THINKING_ON if thinking else THINKING_OFF,
        "category": "math",
        "generator": "test",
    }


@pytest.mark.parametrize(("text", "thinking", "reason"), CASES)
def test_schema_applies_the_rule(text: str, thinking: bool, reason: str | None) -> None:
    if not text.strip():
        reason = "bad_output"  # an empty output is refused before the rule is asked
    if reason is None:
        assert example_from_row(row(text, thinking)).output == text
    else:
        with pytest.raises(MalformedRowError) as err:
            example_from_row(row(text, thinking))
        assert err.value.reason == reason


def test_schema_refuses_an_off_output_that_is_only_an_end_of_turn_token() -> None:
    # The trailing <|eot_id|> is stripped; what is left is empty (this used to pass as an empty off answer).
    with pytest.raises(MalformedRowError) as err:
        example_from_row(row("<|eot_id|>", False))
    assert err.value.reason == "bad_output"
    with pytest.raises(MalformedRowError) as err:
        example_from_row(row("<|eot_id|>", True))
    assert err.value.reason == "missing_think"


TEACHER_REASONS = {
    "missing_think": "missing_reasoning",
    "bad_think": "malformed_think",
    "empty_answer": "empty_answer",
    "think_in_off": "reasoning_in_off_mode",
}


@pytest.mark.parametrize(("text", "thinking", "reason"), CASES)
def test_strict_teacher_normalisation_applies_the_rule(text: str, thinking: bool, reason: str | None) -> None:
    """Local sampling keeps exactly the compliant samples, except an empty think block (a training row shows
    reasoning); whatever it keeps is compliant after normalisation too."""
    normalised, problem = normalise_reply(text, None, thinking, strict=True)
    if text.strip().startswith("<think></think>") and reason in (None, "empty_answer"):
        assert (normalised, problem) == (None, "missing_reasoning")  # checked before the answer
    elif reason is None:
        assert problem is None and is_toggle_compliant(normalised, thinking)
        assert normalised.split("</think>")[-1].strip() == text.split("</think>")[-1].strip()
    else:
        assert (normalised, problem) == (None, TEACHER_REASONS[reason])


@pytest.mark.parametrize(("text", "thinking", "reason"), CASES)
def test_lenient_teacher_normalisation_returns_only_compliant_text(text: str, thinking: bool, reason) -> None:
    normalised, problem = normalise_reply(text, "separate reasoning", thinking)
    assert (normalised is None) is (problem is not None)
    if normalised is not None:
        assert is_toggle_compliant(normalised, thinking)


def test_tags_inside_a_separate_reasoning_field_break_the_rule() -> None:
    assert normalise_reply("4", "a <think> b", True) == (None, "malformed_think")
    assert normalise_reply("", "r", True) == (None, "empty_answer")
