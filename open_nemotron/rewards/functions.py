"""The RL rewards as TRL reward functions: ``f(prompts, completions, **columns) -> list[float | None]``.

TRL's GRPO / RLOO trainers call every function in ``reward_funcs`` with the batch's prompts, completions and every
other dataset column as keyword lists, log each one separately (``rewards/<name>/mean``) and sum them with
``reward_weights``. A function returns None for a row it does not apply to (an instruction reward on a maths
prompt); TRL then leaves that row out of that function's term.

Dataset columns read here (written by `open_nemotron.train.rl_data`):
- ``thinking`` (bool): the reasoning switch the prompt's system message sets;
- ``task``, ``answer``, ``entry`` (JSON): a verifiable task item (`open_nemotron.data.tasks`); ``task`` is "" on
  rows without one;
- ``if_prompt``, ``instruction_id_list``, ``instruction_kwargs`` (JSON): IFEval instructions (empty list if none).

Each rule lives where it is defined: accuracy is `data.tasks.score_answer` (final answer after ``</think>``,
``\\boxed{}`` first, math-verify for maths), format is `rewards.format.format_reward` (the toggle rule the eval and
the data filters use), instructions are `rewards.instructions.instruction_reward` (IFEval's checkers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from open_nemotron.errors import OpenNemotronError


class RewardError(OpenNemotronError, ValueError):
    """An unknown reward name, a bad weight, or a dataset without the columns a reward reads."""


def completion_text(completion: Any) -> str:
    """The generated text of one TRL completion: a string, or (conversational data) a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    raise RewardError(f"completion {completion!r}: expected a string or a list of messages")


def _column(kwargs: dict[str, Any], name: str, reward: str, n: int) -> list[Any]:
    if name not in kwargs:
        raise RewardError(f"reward {reward!r} reads the dataset column {name!r}; the dataset has none")
    values = kwargs[name]
    if len(values) != n:
        raise RewardError(f"column {name!r}: {len(values)} values for {n} completions")
    return list(values)


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if the final answer is correct for the row's task item, else 0.0; None on rows without a task."""
    from open_nemotron.data.tasks import TaskItem, score_answer

    n = len(completions)
    tasks, answers, entries = (_column(kwargs, c, "accuracy", n) for c in ("task", "answer", "entry"))
    out: list[float | None] = []
    for completion, task, answer, entry in zip(completions, tasks, answers, entries, strict=True):
        if not task:
            out.append(None)
            continue
        item = TaskItem(task, "", answer, json.loads(entry) if isinstance(entry, str) else entry, "train", 0, "")
        out.append(score_answer(item, completion_text(completion)))
    return out


def format(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 if the completion obeys the row's reasoning switch (`rewards.format`), else 0.0."""
    from open_nemotron.rewards.format import format_reward

    thinking = _column(kwargs, "thinking", "format", len(completions))
    return [format_reward(completion_text(c), bool(t)) for c, t in zip(completions, thinking, strict=True)]


def instructions(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Share of the row's IFEval instructions followed (strict, answer part only); None on rows without any."""
    from open_nemotron.rewards.instructions import IFExample, instruction_reward

    n = len(completions)
    ids = _column(kwargs, "instruction_id_list", "instructions", n)
    args = _column(kwargs, "instruction_kwargs", "instructions", n)
    texts = _column(kwargs, "if_prompt", "instructions", n)
    thinking = kwargs.get("thinking") or [False] * n
    out: list[float | None] = []
    for completion, id_list, kw, prompt, think in zip(completions, ids, args, texts, thinking, strict=True):
        if not id_list:
            out.append(None)
            continue
        example = IFExample(prompt, list(id_list), json.loads(kw) if isinstance(kw, str) else list(kw))
        out.append(instruction_reward(example, completion_text(completion), bool(think)))
    return out


JUDGE_PROMPT = """You are checking a student's answer against the reference answer.
Question: {question}
Reference answer: {reference}
Student's answer: {answer}
Is the student's answer equivalent to the reference answer? Reply with exactly one word: yes or no."""


class JudgeReward:
    """Accuracy judged by an LLM behind any OpenAI-compatible endpoint (the paper: Llama-3.3-70B-Instruct decides
    whether the answer after ``</think>`` matches the ground truth). 1.0 for "yes", 0.0 for "no", None when the
    endpoint fails or replies with neither (logged as ``judge_errors``), so one bad call never stops training.

    Reads the columns ``question`` (the user's question; else the prompt's last user message) and ``answer``."""

    __name__ = "judge"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        prompt: str = JUDGE_PROMPT,
        timeout: float = 60.0,
        client: Any = None,
    ) -> None:
        for key in ("{question}", "{reference}", "{answer}"):
            if key not in prompt:
                raise RewardError(f"judge prompt: missing the placeholder {key}")
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)
        self.client, self.model, self.prompt = client, model, prompt

    def verdict(self, question: str, reference: str, answer: str) -> float | None:
        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {
                        "role": "user",
                        "content": self.prompt.format(question=question, reference=reference, answer=answer),
                    }
                ],
                temperature=0.0,
                max_tokens=4,
            )
            text = (reply.choices[0].message.content or "").strip().lower()
        except Exception:  # any transport or server error: no verdict for this row
            return None
        word = re.match(r"[a-z]+", text)
        return {"yes": 1.0, "no": 0.0}.get(word.group(0) if word else "")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        from open_nemotron.model.chat_template import split_reasoning

        n = len(completions)
        references = _column(kwargs, "answer", "judge", n)
        questions = kwargs.get("question") or [_last_user_message(p) for p in prompts]
        out: list[float | None] = []
        for completion, question, reference in zip(completions, questions, references, strict=True):
            if not reference:
                out.append(None)
                continue
            _, answer = split_reasoning(completion_text(completion))
            out.append(self.verdict(question, reference, answer))
        errors = sum(1 for v, r in zip(out, references, strict=True) if v is None and r)
        if "log_metric" in kwargs and callable(kwargs["log_metric"]):
            kwargs["log_metric"]("judge_errors", float(errors))
        return out


def _last_user_message(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


REWARDS: dict[str, Callable[..., list]] = {"accuracy": accuracy, "format": format, "instructions": instructions}


def parse_reward_weights(value: str, option: str = "rewards") -> dict[str, float]:
    """``"accuracy=1,format=0.5"`` -> ``{"accuracy": 1.0, "format": 0.5}`` (a bare name weighs 1)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        name, sep, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise RewardError(f"{option} {value!r}: expected name=weight pairs, e.g. accuracy=1,format=1") from None
    if not out:
        raise RewardError(f"{option} {value!r}: expected at least one reward")
    return out


def reward_functions(
    weights: dict[str, float], judge: JudgeReward | None = None
) -> tuple[list[Callable[..., list]], list[float]]:
    """TRL's ``reward_funcs`` and ``reward_weights`` for `weights` (name -> weight; names from `REWARDS`, plus
    "judge" when a `judge` is given). A weight of 0 leaves the reward out."""
    funcs, out = [], []
    for name, weight in weights.items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise RewardError(f"reward weight {name} = {weight!r}: expected a number >= 0")
        if name == "judge":
            if judge is None:
                raise RewardError("reward 'judge' needs a judge endpoint (--judge-url and --judge-model)")
            func = judge
        elif name in REWARDS:
            func = REWARDS[name]
        else:
            raise RewardError(f"reward {name!r}: expected one of {', '.join([*REWARDS, 'judge'])}")
        if weight > 0:
            funcs.append(func)
            out.append(float(weight))
    if not funcs:
        raise RewardError(f"rewards {weights}: every weight is 0; expected at least one positive")
    return funcs, out
