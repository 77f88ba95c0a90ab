"""RL prompt sets: verifiable reasoning-task prompts and synthetic instruction-following prompts, on and off.

One row format for GRPO, RLOO, the pass-rate filter and online RPO (jsonl, one row per line; every row has every
column so `datasets` sees one schema):

``id`` · ``prompt`` (conversation: the toggle's system message + the user turn) · ``thinking`` (bool) · ``task``,
``answer``, ``entry`` (JSON), ``difficulty`` for a task item ("" otherwise) · ``if_prompt``,
``instruction_id_list``, ``instruction_kwargs`` (JSON) for IFEval instructions (empty otherwise) · optional
``pass_rate`` (written by the pass-rate filter).

Held out means held out: task prompts come from training seeds only (`data.tasks.make_items` refuses held-out
seeds) and are decontaminated against the held-out suite with the SFT data's rule (`data.filters.HeldoutIndex`);
instruction prompts are synthetic (`rewards.instructions.synthetic_prompts`) and refused where they meet a given
IFEval suite's prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.utils import atomic_write_text, jsonl_rows

COLUMNS = (
    "id",
    "prompt",
    "thinking",
    "task",
    "answer",
    "entry",
    "difficulty",
    "if_prompt",
    "instruction_id_list",
    "instruction_kwargs",
)


class RLDataError(OpenNemotronError, ValueError):
    """A malformed RL prompt file or request."""


def _conversation(user: str, thinking: bool) -> list[dict[str, str]]:
    from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON

    return [{"role": "system", "content": THINKING_ON if thinking else THINKING_OFF}, {"role": "user", "content": user}]


def _modes(n: int, on_fraction: float, rng: random.Random) -> list[bool]:
    if not 0 <= on_fraction <= 1:
        raise RLDataError(f"on_fraction = {on_fraction!r}: expected a number in [0, 1]")
    n_on = round(n * on_fraction)
    modes = [True] * n_on + [False] * (n - n_on)
    rng.shuffle(modes)
    return modes


def task_rows(
    tasks: Sequence[str],
    per_task: int,
    *,
    seed: int = 0,
    difficulty: str = "easy",
    on_fraction: float = 0.5,
    decontaminate: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Rows for `per_task` training items of each task, each in one mode (a share `on_fraction` reasoning on);
    returns (rows, how many items were dropped for overlapping the held-out suite)."""
    from open_nemotron.data.filters import HeldoutIndex, heldout_questions
    from open_nemotron.data.tasks import heldout_suite, make_items

    items = [it for task in tasks for it in make_items(task, per_task, seed=seed, difficulty=difficulty)]
    dropped = 0
    if decontaminate:
        index = HeldoutIndex.build(heldout_questions(heldout_suite()))
        kept = [it for it in items if index.contaminated_by(it.question) is None]
        dropped, items = len(items) - len(kept), kept
    modes = _modes(len(items), on_fraction, random.Random(seed))
    rows = []
    for item, thinking in zip(items, modes, strict=True):
        rows.append(
            {
                "id": f"{item.task}-{difficulty}-{item.seed}",
                "prompt": _conversation(item.question, thinking),
                "thinking": thinking,
                "task": item.task,
                "answer": item.answer,
                "entry": json.dumps(item.entry),
                "difficulty": item.difficulty,
                "if_prompt": "",
                "instruction_id_list": [],
                "instruction_kwargs": "[]",
            }
        )
    return rows, dropped


def instruction_rows(
    n: int,
    *,
    seed: int = 0,
    on_fraction: float = 0.5,
    min_instructions: int = 1,
    max_instructions: int = 10,
    exclude_suites: Sequence[str | Path] = (),
) -> list[dict[str, Any]]:
    """Rows of synthetic IFEval-style prompts (base request + 1-10 verifiable instructions), none equal to a prompt
    of the IFEval-format files in `exclude_suites` (and no base request inside one)."""
    from open_nemotron.rewards.instructions import load_suite, synthetic_prompts

    exclude = [ex.prompt for path in exclude_suites for ex in load_suite(path).examples]
    examples = synthetic_prompts(
        n, seed=seed, min_instructions=min_instructions, max_instructions=max_instructions, exclude=exclude
    )
    modes = _modes(n, on_fraction, random.Random(seed + 1))
    return [
        {
            "id": str(ex.key),
            "prompt": _conversation(ex.prompt, thinking),
            "thinking": thinking,
            "task": "",
            "answer": "",
            "entry": "{}",
            "difficulty": "",
            "if_prompt": ex.prompt,
            "instruction_id_list": list(ex.instruction_id_list),
            "instruction_kwargs": json.dumps(ex.kwargs),
        }
        for ex, thinking in zip(examples, modes, strict=True)
    ]


def sample_responses(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    samples: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed_of: Callable[[list[dict[str, Any]], bool], int],
    batch_size: int = 16,
) -> tuple[list[dict[str, Any]], list[str]]:
    """`samples` sampled responses per row: (the rows repeated, a row's `samples` copies together; the responses,
    aligned). One engine run per reasoning mode (a row's ``thinking`` sets the switch), seeded with
    `seed_of(that mode's rows, thinking)`; every response has its own stream (`generate_chat`'s per-row seeds)."""
    from open_nemotron.model import chat

    repeated_all: list[dict[str, Any]] = []
    texts_all: list[str] = []
    for thinking in (False, True):
        part = [r for r in rows if bool(r["thinking"]) == thinking]
        if not part:
            continue
        repeated = [r for r in part for _ in range(samples)]
        texts_all += chat.generate_chat(
            model,
            tokenizer,
            [r["prompt"] for r in repeated],
            thinking=thinking,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            seed=seed_of(part, thinking),
            batch_size=batch_size,
        )
        repeated_all += repeated
    return repeated_all, texts_all


def save_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and check an RL prompt file (every column present, ids unique)."""
    path = Path(path)
    if not path.is_file():
        raise RLDataError(f"{path}: no such RL prompt file (write one with `open-nemotron rl prompts`)")
    rows, seen = [], set()
    for where, row in jsonl_rows(path, RLDataError):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise RLDataError(f"{where}: missing {', '.join(missing)}; expected the columns {COLUMNS}")
        if not isinstance(row["prompt"], list) or not row["prompt"]:
            raise RLDataError(f"{where}: prompt = {row['prompt']!r}: expected a list of messages")
        if row["id"] in seen:
            raise RLDataError(f"{where}: id {row['id']!r} appears twice")
        if "pass_rate" in row and not (isinstance(row["pass_rate"], (int, float)) and 0 <= row["pass_rate"] <= 1):
            raise RLDataError(f"{where}: pass_rate = {row['pass_rate']!r}: expected a number in [0, 1]")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise RLDataError(f"{path}: no rows")
    return rows
