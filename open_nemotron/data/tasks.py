"""Verifiable prompts: a small registry over reasoning-gym, a fixed held-out suite, and GSM8K/MATH-style jsonl.

Each registry task names a reasoning-gym dataset and its config kwargs at three difficulties. Every item is made
from its own seed (``reasoning_gym.create_dataset(name, size=1, seed=item.seed, **kwargs)[0]``), so an item is
reproducible from ``(task, difficulty, seed)`` alone. Seeds from `VALIDATION_SEED_START` up are reserved: those below
`HELDOUT_SEED_START` for the validation suite (what a stage may choose a setting or a checkpoint on), those from it up
for the held-out suite (what results are reported on). ``make_items(split="train")`` refuses any range that reaches
them, so no training path can draw a validation or held-out item. (reasoning-gym seeds ``random.Random(seed +
index)`` and Python seeds from ``abs(seed)``, which is why negative seeds are refused too.) Questions get a one-line
instruction to put the final answer in ``\\boxed{}``.

Scoring extracts the final answer (`extract_final_answer`) and asks the task's own reasoning-gym scorer, or
math-verify for math jsonl items; a response counts as correct only at score 1.0 (some reasoning-gym scorers give
0.01 for a wrong but well-formed answer), so `score_answer` returns exactly 1.0 or 0.0.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat_template import split_reasoning

DIFFICULTIES = ("easy", "medium", "hard")
SPLITS = ("train", "validation", "heldout")
VALIDATION_SEED_START = 9 * 10**8
HELDOUT_SEED_START = 10**9
# Difficulty used for every held-out task, and how many items per task `heldout_suite()` gives by default.
# Easy: the level at which a 135M parent can keep written steps exact (at medium, both modes score ~2%).
HELDOUT_DIFFICULTY = "easy"
HELDOUT_N_PER_TASK = 50
ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."
MATH_TASK = "math"
MATH_SCORER = "math-verify"


class TaskError(OpenNemotronError, ValueError):
    """A bad task request: unknown task or difficulty, bad count or seed."""


class HeldoutSeedError(TaskError):
    """A training request that would reach into the reserved held-out seed range (or vice versa)."""


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: the reasoning-gym dataset and its config kwargs per difficulty."""

    name: str
    rg_name: str
    levels: dict[str, dict[str, Any]]
    description: str = ""

    def kwargs(self, difficulty: str) -> dict[str, Any]:
        if difficulty not in self.levels:
            raise TaskError(
                f"difficulty = {difficulty!r} for task {self.name!r}: expected one of {', '.join(self.levels)}"
            )
        return dict(self.levels[difficulty])


@dataclass
class TaskItem:
    """One verifiable prompt."""

    task: str  # registry name (or "math" for math jsonl items)
    question: str  # the user message, answer-format instruction included
    answer: str  # gold final answer
    entry: dict  # the source entry (reasoning-gym dict, JSON-able) used for scoring
    split: str  # "train" | "validation" | "heldout"
    seed: int
    difficulty: str  # "easy" | "medium" | "hard" (math jsonl: the row's level, or "unrated")


# Kwargs checked against the installed reasoning_gym config dataclasses (ChainSumConfig, BasicArithmeticDatasetConfig,
# SimpleEquationsConfig, LegCountingConfig, GCDConfig, BaseConversionConfig, GSMSymbolicDatasetConfig).
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "chain_sum",
            "chain_sum",
            {
                "easy": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
                "medium": {"min_terms": 3, "max_terms": 5, "min_digits": 2, "max_digits": 3},
                "hard": {"min_terms": 5, "max_terms": 8, "min_digits": 3, "max_digits": 5, "allow_negation": True},
            },
            "additions and subtractions of integers",
        ),
        TaskSpec(
            "basic_arithmetic",
            "basic_arithmetic",
            # allow_parentheses stays True: with it off, reasoning-gym computes left to right, ignoring precedence.
            {
                "easy": {
                    "min_terms": 2,
                    "max_terms": 3,
                    "min_digits": 1,
                    "max_digits": 1,
                    "operators": ("+", "-", "*"),
                },
                "medium": {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2},
                "hard": {"min_terms": 4, "max_terms": 6, "min_digits": 2, "max_digits": 3},
            },
            "integer expressions with + - * / and parentheses",
        ),
        TaskSpec(
            "simple_equations",
            "simple_equations",
            {
                "easy": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 20},
                "medium": {"min_terms": 2, "max_terms": 3, "min_value": 1, "max_value": 100},
                "hard": {
                    "min_terms": 3,
                    "max_terms": 5,
                    "min_value": 1,
                    "max_value": 1000,
                    "operators_weights": [0.35, 0.35, 0.3],
                },
            },
            "one linear equation in one variable",
        ),
        TaskSpec(
            "leg_counting",
            "leg_counting",
            {
                "easy": {"min_animals": 2, "max_animals": 3, "min_instances": 1, "max_instances": 5},
                "medium": {"min_animals": 3, "max_animals": 5, "min_instances": 1, "max_instances": 12},
                "hard": {"min_animals": 6, "max_animals": 10, "min_instances": 1, "max_instances": 30},
            },
            "total legs of a list of animals",
        ),
        TaskSpec(
            "gcd",
            "gcd",
            {
                "easy": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 100},
                "medium": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 1000},
                "hard": {"min_numbers": 2, "max_numbers": 3, "min_value": 1, "max_value": 10000},
            },
            "greatest common divisor",
        ),
        TaskSpec(
            "base_conversion",
            "base_conversion",
            # min_value 1: reasoning-gym writes 0 as an empty string in bases other than 2 and 16.
            {
                "easy": {"min_base": 2, "max_base": 10, "min_value": 1, "max_value": 100},
                "medium": {"min_base": 2, "max_base": 16, "min_value": 1, "max_value": 1000},
                "hard": {"min_base": 2, "max_base": 36, "min_value": 1, "max_value": 100000},
            },
            "convert an integer between bases",
        ),
        TaskSpec(
            "gsm_symbolic",
            "gsm_symbolic",
            # reasoning-gym supports only difficulty 1.0 for this dataset: the three levels are the same.
            {level: {"difficulty": 1.0} for level in DIFFICULTIES},
            "GSM8K-style word problems from symbolic templates",
        ),
    )
}

# The held-out suite: these tasks, `HELDOUT_DIFFICULTY`, seeds HELDOUT_SEED_START + i.
# The tasks the built-in teacher covers. gsm_symbolic word problems stay available for training and evaluation through
# the other teachers and jsonl suites, but no 135M-parameter model solves them in either mode, so in the fixed suite
# they would only add zeros.
HELDOUT_TASKS: tuple[str, ...] = (
    "chain_sum",
    "basic_arithmetic",
    "simple_equations",
    "leg_counting",
    "gcd",
    "base_conversion",
)


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise TaskError(f"task = {task!r}: expected one of {', '.join(TASKS)}")
    return TASKS[task]


def _jsonable(entry: dict) -> dict:
    # Tuples become lists and odd values (Fractions in gsm_symbolic) strings, exactly as a jsonl round trip would.
    return json.loads(json.dumps(entry, default=str))


def with_instruction(question: str) -> str:
    """`question` followed by the answer-format instruction."""
    return f"{question.strip()}\n\n{ANSWER_INSTRUCTION}"


def make_items(task: str, n: int, *, split: str = "train", seed: int = 0, difficulty: str = "easy") -> list[TaskItem]:
    """`n` items of `task` at `difficulty`, from seeds ``seed, seed + 1, …, seed + n - 1`` (deterministic).

    ``split="train"`` needs ``0 <= seed`` and ``seed + n <= VALIDATION_SEED_START``; ``split="validation"`` needs
    ``VALIDATION_SEED_START <= seed`` and ``seed + n <= HELDOUT_SEED_START``; ``split="heldout"`` needs
    ``seed >= HELDOUT_SEED_START``. Anything else raises (`HeldoutSeedError` for a reserved-range violation).
    """
    spec = _spec(task)
    kwargs = spec.kwargs(difficulty)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TaskError(f"n = {n!r}: expected a non-negative integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TaskError(f"seed = {seed!r}: expected a non-negative integer (Python seeds from abs(seed))")
    if split == "train":
        if seed + n > VALIDATION_SEED_START:
            raise HeldoutSeedError(
                f"seed = {seed} with n = {n} reaches seed {seed + n - 1}: training seeds must stay below "
                f"{VALIDATION_SEED_START} (seeds from there up are the validation and held-out suites')"
            )
    elif split == "validation":
        if seed < VALIDATION_SEED_START or seed + n > HELDOUT_SEED_START:
            raise HeldoutSeedError(
                f"seed = {seed} with n = {n} for split 'validation': expected seeds in "
                f"[{VALIDATION_SEED_START}, {HELDOUT_SEED_START})"
            )
    elif split == "heldout":
        if seed < HELDOUT_SEED_START:
            raise HeldoutSeedError(f"seed = {seed} for split 'heldout': expected a seed >= {HELDOUT_SEED_START}")
    else:
        raise TaskError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")

    import reasoning_gym

    items = []
    for s in range(seed, seed + n):
        entry = _jsonable(reasoning_gym.create_dataset(spec.rg_name, size=1, seed=s, **kwargs)[0])
        items.append(
            TaskItem(
                task=task,
                question=with_instruction(entry["question"]),
                answer=str(entry["answer"]),
                entry=entry,
                split=split,
                seed=s,
                difficulty=difficulty,
            )
        )
    return items


def heldout_suite(n_per_task: int | None = None) -> list[TaskItem]:
    """The fixed held-out suite: `HELDOUT_TASKS` at `HELDOUT_DIFFICULTY`, seeds from `HELDOUT_SEED_START`.

    Prefix-stable: the suite with ``n_per_task=k`` is the first k items per task of any larger suite.
    """
    n = HELDOUT_N_PER_TASK if n_per_task is None else n_per_task
    items = []
    for task in HELDOUT_TASKS:
        items += make_items(task, n, split="heldout", seed=HELDOUT_SEED_START, difficulty=HELDOUT_DIFFICULTY)
    return items


def validation_suite(n_per_task: int | None = None) -> list[TaskItem]:
    """The validation suite: the held-out suite's tasks and difficulty, seeds from `VALIDATION_SEED_START`, for
    choosing a setting or a checkpoint so that the held-out suite stays unread until the result is reported.

    At easy difficulty a question can repeat across seeds, so an item that overlaps one of the first
    `VALIDATION_EXCLUDES_HELDOUT` held-out items per task, by the rule training data is decontaminated with
    (`filters.decontaminate`), is skipped and the next seed taken. Prefix-stable like `heldout_suite`.
    """
    n = HELDOUT_N_PER_TASK if n_per_task is None else n_per_task
    index = _heldout_index()
    items = []
    for task in HELDOUT_TASKS:
        kept: list[TaskItem] = []
        seed = VALIDATION_SEED_START
        while len(kept) < n:
            # Draw in chunks: one create_dataset call per item either way, chunks only bound the overshoot.
            chunk = make_items(task, n - len(kept), split="validation", seed=seed, difficulty=HELDOUT_DIFFICULTY)
            kept += [item for item in chunk if index.contaminated_by(item.question) is None][: n - len(kept)]
            seed += len(chunk)
        items += kept
    return items


# Held-out items per task that no validation item overlaps: what a held-out eval reads up to --limit 1200 (six tasks);
# a larger held-out read could meet a validation question again.
VALIDATION_EXCLUDES_HELDOUT = 200


@cache
def _heldout_index():
    from open_nemotron.data.filters import HeldoutIndex, heldout_questions

    return HeldoutIndex.build(heldout_questions(heldout_suite(VALIDATION_EXCLUDES_HELDOUT)))


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced; None if there is none or it is open."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


_NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_IS = re.compile(r"(?:answer\s+is|answer\s*:)\s*:?\s*(.+)", re.I)
# "42 legs" -> "42"; "3/4" and "1a3" stay whole.
_LEADING_NUMBER = re.compile(rf"^({_NUMBER})\s+[A-Za-z]")


def _clean(answer: str) -> str:
    answer = answer.strip()
    # Markdown bold, surrounding $…$ and a sentence's final period are wrapping, not the answer.
    answer = answer.strip("*").strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    answer = re.sub(r"\.$", "", answer).strip()
    answer = answer.replace("−", "-")
    # Thousands separators: "1,000" is 1000 (reasoning-gym's exact-match scorers would reject the comma).
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer


def extract_final_answer(response: str) -> str | None:
    """The final answer in a model response, or None.

    Only the text after ``</think>`` counts when the response has a think block (None if the block never closes).
    Within it: the last ``\\boxed{…}`` wins, then the last "answer is X" / "Answer: X" (X up to the end of the
    line; a leading number is taken alone, so "The answer is 42 legs." gives "42"), then the last number.
    """
    if not isinstance(response, str):
        return None
    reasoning, answer_part = split_reasoning(response)
    text = answer_part if reasoning is not None else response
    if not text.strip():
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        boxed = _clean(boxed)
        return boxed or None
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        said = matches[-1].group(1).strip()
        said = re.split(r"\.\s|\n", said, maxsplit=1)[0]
        said = _clean(said)
        number = _LEADING_NUMBER.match(said)
        if number:
            return _clean(number.group(1))
        if said:
            return said
    numbers = re.findall(_NUMBER, text)
    return _clean(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@cache
def _rg_scorer(rg_name: str):
    import reasoning_gym

    # reasoning-gym's scorers read only the entry, not the config: one instance per dataset serves every level.
    return reasoning_gym.create_dataset(rg_name, size=1, seed=0).score_answer


def _math_verify_timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread (it raises elsewhere).
    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_gold(answer: str) -> str:
    text = answer.strip()
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def math_verify_equal(gold: str, predicted: str) -> bool:
    """math-verify equivalence of a gold answer and a predicted final answer (both plain or LaTeX strings)."""
    from math_verify import parse, verify

    timeout = _math_verify_timeout()
    gold_parsed = parse(_math_gold(gold), parsing_timeout=timeout)
    if not gold_parsed:
        return False
    pred_parsed = parse(_math_gold(predicted), parsing_timeout=timeout)
    if not pred_parsed:
        return False
    # Gold first: verify() is not symmetric.
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


# What a reasoning-gym scorer that parses the answer as a number (int, float, Decimal) raises for malformed text:
# a wrong answer. Anything else (TypeError, KeyError, AttributeError, ...) is a bug and propagates.
_RG_MALFORMED_ANSWER_ERRORS: tuple[type[BaseException], ...] = (ValueError, ArithmeticError)


def _math_verify_malformed_answer_errors() -> tuple[type[BaseException], ...]:
    # math-verify (raise_on_error=False) already turns malformed input into "no match"; only its timeout, a
    # BaseException raised by signal.alarm, can escape for a pathological answer.
    from math_verify.errors import TimeoutException

    return (TimeoutException,)


def score_answer(item: TaskItem, response: str) -> float:
    """1.0 if `response`'s final answer is correct for `item`, else 0.0.

    A malformed answer scores 0.0: the scorer's own complaints about it (`_RG_MALFORMED_ANSWER_ERRORS` for
    reasoning-gym, math-verify's timeout) are caught. Any other exception is a bug and propagates.
    """
    answer = extract_final_answer(response)
    if answer is None:
        return 0.0
    if item.entry.get("scorer") == MATH_SCORER:
        try:
            return 1.0 if math_verify_equal(item.answer, answer) else 0.0
        except _math_verify_malformed_answer_errors():
            return 0.0
    rg_name = _spec(item.task).rg_name
    try:
        score = _rg_scorer(rg_name)(answer, item.entry)
    except _RG_MALFORMED_ANSWER_ERRORS:
        return 0.0
    return 1.0 if score >= 1.0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# GSM8K / MATH-style jsonl


def _gold_from(row: dict) -> str | None:
    """The gold final answer: ``answer`` (GSM8K's ``#### X`` tail, a ``\\boxed{}``, or plain) else ``solution``'s box."""
    for key in ("answer", "solution"):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or not value.strip():
            continue
        if "####" in value:
            gold = value.rsplit("####", 1)[1].strip().replace(",", "")
        elif "\\boxed" in value:
            gold = _last_boxed(value)
        elif key == "answer":
            gold = value.strip()
        else:
            gold = None
        if gold:
            return gold
    return None


def load_math_jsonl(path: str | Path, *, split: str = "train") -> list[TaskItem]:
    """Items from a GSM8K/MATH-style jsonl (``question``/``problem`` plus ``answer``/``solution``), scored by math-verify.

    Raises `TaskError` naming the first bad line; a file is a benchmark, so a bad line is not skipped silently.
    """
    if split not in SPLITS:
        raise TaskError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"math jsonl {str(path)!r}: no such file")
    items = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path.name}:{lineno}: not JSON ({e.msg}): expected one object per line") from None
            question = row.get("question", row.get("problem")) if isinstance(row, dict) else None
            if not isinstance(question, str) or not question.strip():
                raise TaskError(f"{path.name}:{lineno}: question/problem = {question!r}: expected a non-empty string")
            gold = _gold_from(row)
            if gold is None:
                raise TaskError(
                    f"{path.name}:{lineno}: no gold answer: expected 'answer' (plain, '#### X' or \\boxed{{}}) "
                    "or a 'solution' with \\boxed{}"
                )
            level = row.get("level")
            entry = {"question": question, "answer": gold, "scorer": MATH_SCORER, "source": path.name, "line": lineno}
            items.append(
                TaskItem(
                    task=MATH_TASK,
                    question=with_instruction(question),
                    answer=gold,
                    entry=entry,
                    split=split,
                    seed=lineno,
                    difficulty=str(level) if level is not None else "unrated",
                )
            )
    return items
