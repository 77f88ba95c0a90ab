"""IFEval's verifiable instructions: checks, the four accuracies, the RL reward and synthetic training prompts.

The checks are lm-evaluation-harness's IFEval implementation (``lm_eval.tasks.ifeval``: Google's 25 instruction
checkers, maintained there), called through its own ``test_instruction_following_strict`` / ``_loose``, so our
strict / loose accuracies are that implementation's by construction (tests compare them with its
``process_results`` and ``agg_inst_level_acc``). What this module adds:

- offline use: the one NLTK resource the checkers need (Punkt's English sentence model, ``punkt_tab``, MIT licence,
  for ``length_constraints:number_sentences``) ships in ``nltk_data/`` here and is put on NLTK's search path before
  lm-eval is imported, so nothing is downloaded; ``langdetect`` is seeded, so the language check is deterministic;
- reasoning-aware responses: with reasoning on only the answer after ``</think>`` is checked (an unclosed think
  block has no answer and follows nothing);
- ``synthetic_prompts``: training prompts built the paper's way (digest §3.8) from a bank of base requests and 1-10
  sampled instructions whose arguments the checkers themselves draw (``build_description()``), with IFEval's
  conflict table respected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError

NLTK_DATA = Path(__file__).parent / "nltk_data"


class InstructionError(OpenNemotronError, ValueError):
    """An unknown instruction id, arguments a checker refuses, or a malformed IFEval row."""


@cache
def _ifeval():
    """lm-eval's IFEval modules, imported once with our NLTK data on the path (no download at import)."""
    import langdetect
    import nltk

    if str(NLTK_DATA) not in nltk.data.path:
        # Appended: a user's own NLTK data (or a newer Punkt) still wins.
        nltk.data.path.append(str(NLTK_DATA))
    # langdetect samples; a fixed seed makes `language:response_language` give the same verdict every run.
    langdetect.DetectorFactory.seed = 0
    try:
        from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as err:
        raise InstructionError(
            f"IFEval checks need lm-eval, nltk, langdetect and immutabledict ({err}); "
            "install them with `pip install -e '.[rl]'`"
        ) from None
    return instructions_registry, utils


def instruction_ids() -> list[str]:
    """Every instruction id the checkers know (IFEval's 25)."""
    registry, _ = _ifeval()
    return sorted(registry.INSTRUCTION_DICT)


@dataclass
class IFExample:
    """One IFEval row: the prompt, its instruction ids and one kwargs dict per instruction."""

    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    key: int | str = 0

    def __post_init__(self) -> None:
        known = set(instruction_ids())
        unknown = [i for i in self.instruction_id_list if i not in known]
        if unknown:
            raise InstructionError(f"instruction_id_list: unknown {unknown}; expected ids from IFEval's registry")
        if len(self.kwargs) != len(self.instruction_id_list):
            raise InstructionError(
                f"kwargs: {len(self.kwargs)} dicts for {len(self.instruction_id_list)} instructions; expected one each"
            )

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "row") -> IFExample:
        missing = [k for k in ("prompt", "instruction_id_list", "kwargs") if k not in row]
        if missing:
            raise InstructionError(f"{where}: missing {', '.join(missing)}; expected IFEval's input format")
        kwargs = row["kwargs"]
        if isinstance(kwargs, str):  # our training rows store them as JSON (datasets wants one schema per column)
            kwargs = json.loads(kwargs)
        return cls(row["prompt"], list(row["instruction_id_list"]), list(kwargs), row.get("key", 0))


@dataclass
class IFResult:
    """Per-instruction verdicts for one response, strict and loose (IFEval's definitions)."""

    strict: list[bool]
    loose: list[bool]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def answer_text(response: str, thinking: bool) -> str:
    """The part of a response the checks read: everything with reasoning off, the answer after ``</think>`` with
    reasoning on ("" when the think block never closes)."""
    if not thinking:
        return response
    from open_nemotron.model.chat_template import THINK_CLOSE

    return response.split(THINK_CLOSE, 1)[1].lstrip() if THINK_CLOSE in response else ""


def check_response(example: IFExample, response: str, thinking: bool = False) -> IFResult:
    """IFEval's strict and loose verdicts for `response` (its answer part, see `answer_text`)."""
    _, utils = _ifeval()
    inp = utils.InputExample(
        key=example.key, instruction_id_list=example.instruction_id_list, prompt=example.prompt, kwargs=example.kwargs
    )
    text = answer_text(response, thinking)
    strict = utils.test_instruction_following_strict(inp, text).follow_instruction_list
    loose = utils.test_instruction_following_loose(inp, text).follow_instruction_list
    return IFResult(list(strict), list(loose))


def accuracies(results: Sequence[IFResult]) -> dict[str, float]:
    """IFEval's four numbers: prompt-level (all instructions of a prompt followed) and instruction-level (each
    instruction counted once), strict and loose."""
    if not results:
        raise InstructionError("no responses to score")
    flat_strict = [v for r in results for v in r.strict]
    flat_loose = [v for r in results for v in r.loose]
    return {
        "prompt_level_strict_acc": sum(r.prompt_strict for r in results) / len(results),
        "inst_level_strict_acc": sum(flat_strict) / len(flat_strict),
        "prompt_level_loose_acc": sum(r.prompt_loose for r in results) / len(results),
        "inst_level_loose_acc": sum(flat_loose) / len(flat_loose),
    }


def instruction_reward(example: IFExample, response: str, thinking: bool = False) -> float:
    """The RL reward: the share of the prompt's instructions the response follows (strict). A partial credit
    rather than all-or-nothing: with 1-10 instructions per prompt, all-or-nothing is almost always 0 for a small
    model, and RLOO then has no signal; prompt-level strict accuracy stays the reported metric."""
    strict = check_response(example, response, thinking).strict
    return sum(strict) / len(strict)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic training prompts (digest §3.8: base requests with 1-10 verifiable instructions)

# Written for this list; none is an IFEval prompt (and `synthetic_prompts` refuses overlap with a given suite).
BASE_REQUESTS: tuple[str, ...] = (
    "Write a short blog post about your favourite season.",
    "Describe how to make a cup of tea.",
    "Explain why people should drink enough water.",
    "Write a letter to a friend about a recent trip.",
    "Give advice to someone starting their first job.",
    "Describe a city you would like to visit.",
    "Write a product description for a wooden desk.",
    "Explain how a bicycle works.",
    "Write a story about a dog who learns to swim.",
    "Summarise the benefits of reading books.",
    "Describe the life cycle of a butterfly.",
    "Write a review of an imaginary restaurant.",
    "Explain what a budget is and why it helps.",
    "Write a speech for a school's sports day.",
    "Describe your ideal weekend.",
    "Explain how rain forms.",
    "Write a note asking a neighbour to water your plants.",
    "Give tips for studying for an exam.",
    "Describe a memorable meal.",
    "Write an advertisement for a new board game.",
    "Explain the rules of a simple card game.",
    "Write a poem about the night sky.",
    "Describe how to plant a tree.",
    "Write a complaint about a late train.",
    "Explain why exercise is good for the brain.",
    "Write a short biography of a fictional inventor.",
    "Describe a walk through a forest.",
    "Write a job advert for a bakery assistant.",
    "Explain how to change a light bulb safely.",
    "Write a thank-you message to a volunteer.",
    "Describe the view from a mountain top.",
    "Explain what a computer virus is.",
    "Write a diary entry about a rainy day.",
    "Give reasons to learn a second language.",
    "Describe how to organise a small party.",
    "Write a news report about a local festival.",
    "Explain how bees make honey.",
    "Write a message welcoming new members to a club.",
    "Describe the sound of the sea.",
    "Explain how to save energy at home.",
)


def synthetic_prompts(
    n: int,
    *,
    seed: int = 0,
    min_instructions: int = 1,
    max_instructions: int = 10,
    base_requests: Sequence[str] = BASE_REQUESTS,
    exclude: Sequence[str] = (),
) -> list[IFExample]:
    """`n` IFEval-style training prompts: a base request plus 1-10 instructions (count uniform in the range), ids
    drawn without IFEval's conflicting pairs, arguments drawn by each checker, descriptions appended in order.

    Reproducible for a seed (Python's global `random`, which the checkers draw from, is saved and restored).
    `exclude`: prompts (e.g. an eval suite's) no generated prompt may equal; a base request that appears inside
    one of them is refused up front."""
    if n < 0 or not 1 <= min_instructions <= max_instructions:
        raise InstructionError(
            f"n = {n}, instructions {min_instructions}-{max_instructions}: expected n >= 0 and 1 <= min <= max"
        )
    excluded = {p.strip() for p in exclude}
    leaked = [b for b in base_requests if any(b.strip() in p for p in excluded)]
    if leaked:
        raise InstructionError(f"base requests found in an eval suite's prompts: {leaked[:3]}")
    registry, _ = _ifeval()
    ids = sorted(registry.INSTRUCTION_DICT)
    conflicts = registry.INSTRUCTION_CONFLICTS
    max_instructions = min(max_instructions, len(ids))
    rng = random.Random(seed)
    saved = random.getstate()
    out: list[IFExample] = []
    try:
        while len(out) < n:
            base = rng.choice(list(base_requests))
            want = rng.randint(min_instructions, max_instructions)
            chosen: list[str] = []
            for candidate in rng.sample(ids, len(ids)):
                if len(chosen) == want:
                    break
                if any(candidate in conflicts.get(c, ()) or c in conflicts.get(candidate, ()) for c in chosen):
                    continue
                chosen.append(candidate)
            random.seed(rng.getrandbits(64))
            descriptions, kwargs = [], []
            for instruction_id in chosen:
                checker = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
                if instruction_id == "combination:repeat_prompt":
                    descriptions.append(checker.build_description(prompt_to_repeat=base))
                else:
                    descriptions.append(checker.build_description())
                args = checker.get_instruction_args() or {}
                kwargs.append({k: v for k, v in args.items() if v is not None})
            prompt = " ".join([base, *descriptions])
            if prompt.strip() in excluded:
                continue
            out.append(IFExample(prompt, chosen, kwargs, key=f"synthetic-{seed}-{len(out)}"))
    finally:
        random.setstate(saved)
    return out


@dataclass
class IFSuite:
    """An IFEval-format suite read from jsonl (``{"key", "prompt", "instruction_id_list", "kwargs"}`` per line)."""

    name: str
    examples: list[IFExample] = field(default_factory=list)


def load_suite(path: str | Path, limit: int | None = None) -> IFSuite:
    path = Path(path)
    if not path.is_file():
        raise InstructionError(f"{path}: no such IFEval suite file")
    from open_nemotron.utils import jsonl_rows

    examples = []
    for where, row in jsonl_rows(path, InstructionError):
        examples.append(IFExample.from_row(row, where))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InstructionError(f"{path}: no rows")
    return IFSuite(path.stem, examples)


def is_ifeval_row(row: dict[str, Any]) -> bool:
    """True for a row in IFEval's input format (how `eval --suite` tells an IF suite from a reasoning suite)."""
    return "instruction_id_list" in row and "kwargs" in row and "prompt" in row
