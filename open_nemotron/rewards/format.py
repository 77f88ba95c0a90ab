"""Does an answer obey the reasoning switch? Shared by the evaluation harness, data filters and RL format rewards."""

from __future__ import annotations

from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN


def is_toggle_compliant(text: str, thinking: bool) -> bool:
    """Reasoning on: exactly one well-formed `<think>…</think>` block at the start (it may be empty, as the model
    card allows), then a non-empty answer. Reasoning off: no think tags at all and a non-empty answer."""
    if thinking:
        body = text.lstrip()
        if not body.startswith(THINK_OPEN) or body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
            return False
        return bool(body.split(THINK_CLOSE, 1)[1].strip())
    return THINK_OPEN not in text and THINK_CLOSE not in text and bool(text.strip())


def format_reward(text: str, thinking: bool) -> float:
    """1.0 for a compliant answer, else 0.0 (the paper's RL format reward)."""
    return 1.0 if is_toggle_compliant(text, thinking) else 0.0
