"""The toggle-compliance rule: does an output obey the reasoning switch? One rule, in one place.

Used by the schema's row validation (`open_nemotron.data.schema`, hence the data filters), the teachers' reply
normalisation (`open_nemotron.data.teachers`), the evaluation harness's compliance and the RL format reward.

* Reasoning on: exactly one ``<think>`` and one ``</think>``, the ``<think>`` opening the text (whitespace aside),
  so the block is well formed and nothing comes before it; the block may be empty (NVIDIA's data and the model
  card allow it); a non-empty answer follows ``</think>``.
* Reasoning off: no think tag at all (neither ``<think>`` nor ``</think>``) and a non-empty answer.
"""

from __future__ import annotations

from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN

# Every reason `toggle_violation` can give.
TOGGLE_VIOLATIONS: tuple[str, ...] = (
    "missing_think",  # reasoning on, no think tag at all
    "bad_think",  # reasoning on, tags present but not exactly one block opening the text
    "empty_answer",  # nothing (but whitespace) after </think>, or an empty reasoning-off answer
    "think_in_off",  # reasoning off, but a think tag in the text
)


def toggle_violation(text: str, thinking: bool) -> str | None:
    """None if `text` complies with reasoning `thinking` (on/off), else a reason from `TOGGLE_VIOLATIONS`."""
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if not thinking:
        if opens or closes:
            return "think_in_off"
        return None if text.strip() else "empty_answer"
    if opens == 0 and closes == 0:
        return "missing_think"
    body = text.lstrip()
    # One <think> at the start and one </think>: the close necessarily follows the open, and nothing nests.
    if opens != 1 or closes != 1 or not body.startswith(THINK_OPEN):
        return "bad_think"
    if not body.split(THINK_CLOSE, 1)[1].strip():
        return "empty_answer"
    return None


def is_toggle_compliant(text: str, thinking: bool) -> bool:
    """True if `text` obeys the switch (`toggle_violation` gives no reason)."""
    return toggle_violation(text, thinking) is None


def format_reward(text: str, thinking: bool) -> float:
    """1.0 for a compliant answer, else 0.0 (the paper's RL format reward)."""
    return 1.0 if is_toggle_compliant(text, thinking) else 0.0
