"""Resumable generation: a teacher's answers to task items, appended row by row to a jsonl of `Example`s.

`generate_to_jsonl` asks a teacher for each (item, mode) pair and appends every finished row to the output file at
once (one JSON line, flushed), keyed by a stable id (`example_id`: a hash of task, question and mode, also stored in
``metadata["id"]``). Rerun after a crash or a kill, it reads the file, skips every id already there and asks only for
the rest. A last line without its newline (the process was killed mid-write) is cut off and counted, as are
complete lines that do not parse; the file is never rewritten otherwise.

Validation and held-out items (``split`` "validation" / "heldout") are refused: no training path draws from the
suites that settings are chosen on and results reported on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from open_nemotron.data.schema import Example, MalformedRowError, example_from_row, example_to_row
from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON

if TYPE_CHECKING:
    from open_nemotron.data.tasks import TaskItem
    from open_nemotron.data.teachers import Teacher

MODES = ("on", "off")


class GenerationError(OpenNemotronError, ValueError):
    """Bad arguments to the generation driver (modes, batch size, held-out items)."""


def example_id(task: str | None, question: str, mode: str) -> str:
    """A stable 16-hex-digit id for one (prompt, mode) row: the same item and mode give the same id in every run."""
    key = json.dumps([task or "", question, mode], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def id_of_example(ex: Example) -> str:
    """The row's id: ``metadata["id"]`` when present, else recomputed from task, last user message and mode."""
    stored = ex.metadata.get("id")
    if isinstance(stored, str) and stored:
        return stored
    return example_id(ex.task, prompt_question(ex), ex.reasoning)


def prompt_question(ex: Example) -> str:
    """The last user message of the prompt (the question, for generated rows)."""
    for message in reversed(ex.input):
        if message["role"] == "user":
            return message["content"]
    return ""


def default_category(item: TaskItem) -> str:
    """The row category of an item: ``reasoning-gym`` for registry tasks, ``math`` otherwise (math jsonl items)."""
    from open_nemotron.data.tasks import TASKS

    return "reasoning-gym" if item.task in TASKS else "math"


def example_from_reply(item: TaskItem, mode: str, text: str, generator: str, category: str) -> Example:
    """The dataset row for a teacher's answer `text` to `item` in `mode`."""
    return Example(
        input=[{"role": "user", "content": item.question}],
        output=text,
        reasoning=mode,
        system_prompt=THINKING_ON if mode == "on" else THINKING_OFF,
        category=category,
        generator=generator,
        task=item.task,
        answer=item.answer,
        metadata={
            "id": example_id(item.task, item.question, mode),
            "split": item.split,
            "seed": item.seed,
            "difficulty": item.difficulty,
            "entry": item.entry,
        },
    )


def item_from_example(ex: Example) -> TaskItem:
    """Rebuild the `TaskItem` a generated row came from (for scoring); rows from elsewhere get empty defaults."""
    from open_nemotron.data.tasks import TaskItem

    meta = ex.metadata
    entry = meta.get("entry")
    seed = meta.get("seed")
    return TaskItem(
        task=ex.task or "",
        question=prompt_question(ex),
        answer=ex.answer or "",
        entry=entry if isinstance(entry, dict) else {},
        split=str(meta.get("split") or "train"),
        seed=seed if isinstance(seed, int) else 0,
        difficulty=str(meta.get("difficulty") or "easy"),
    )


@dataclass
class ExistingRows:
    """What `read_existing` found in an output file."""

    ids: set[str] = field(default_factory=set)
    rows: int = 0
    torn_lines: int = 0  # a last line without a newline, cut off
    unreadable_lines: int = 0  # complete lines that are not valid rows (left in place, counted)


def read_existing(path: Path) -> ExistingRows:
    """Ids already in `path`; a torn last line is truncated away so appending starts on a fresh line."""
    found = ExistingRows()
    if not path.exists():
        return found
    data = path.read_bytes()
    end = len(data)
    if data and not data.endswith(b"\n"):
        end = data.rfind(b"\n") + 1  # 0 when the only line is torn
        found.torn_lines = 1
        with path.open("r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    for line in data[:end].decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            ex = example_from_row(json.loads(line))
        except (ValueError, MalformedRowError):
            found.unreadable_lines += 1
            continue
        found.ids.add(id_of_example(ex))
        found.rows += 1
    return found


@dataclass
class GenerationReport:
    """Counts of one `generate_to_jsonl` run."""

    path: str
    teacher: str
    requested: int = 0  # distinct (item, mode) ids asked for
    already_present: int = 0  # of those, found in the file from an earlier run
    generated: int = 0  # rows appended by this run
    failed: dict[str, int] = field(default_factory=dict)  # this run's teacher failures by reason
    duplicate_items: int = 0  # (item, mode) pairs given more than once in `items`
    torn_lines: int = 0
    unreadable_lines: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)  # rows appended per mode

    @property
    def missing(self) -> int:
        """Ids still absent from the file after this run (failures)."""
        return self.requested - self.already_present - self.generated

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "teacher": self.teacher,
            "requested": self.requested,
            "already_present": self.already_present,
            "generated": self.generated,
            "missing": self.missing,
            "failed": dict(sorted(self.failed.items())),
            "duplicate_items": self.duplicate_items,
            "torn_lines": self.torn_lines,
            "unreadable_lines": self.unreadable_lines,
            "by_mode": dict(sorted(self.by_mode.items())),
        }

    def summary(self) -> str:
        line = (
            f"{self.path}: {self.generated} new rows, {self.already_present} already present, "
            f"{self.missing} missing of {self.requested}"
        )
        if self.failed:
            line += "; failures " + ", ".join(f"{r} {n}" for r, n in sorted(self.failed.items()))
        if self.torn_lines or self.unreadable_lines:
            line += f"; ignored {self.torn_lines} torn and {self.unreadable_lines} unreadable lines"
        return line


def generate_to_jsonl(
    teacher: Teacher,
    items: Sequence[TaskItem],
    out_path: str | Path,
    reasoning_modes: Sequence[str] = MODES,
    *,
    category: str | Callable[[TaskItem], str] | None = None,
    batch_size: int = 64,
    progress: Callable[[GenerationReport], None] | None = None,
) -> GenerationReport:
    """Append the teacher's answers for every (item, mode) not yet in `out_path`; return the run's counts.

    Items are asked for in batches of `batch_size` per mode, and each batch's rows are appended (one flushed line
    each, fsynced per batch) before the next batch starts, so a kill loses at most the batch in flight. `category`
    is the rows' category (a string or a function of the item; default `default_category`). `progress` is called
    with the report after every batch.
    """
    modes = list(dict.fromkeys(reasoning_modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise GenerationError(f"reasoning modes = {list(reasoning_modes)!r}: expected a non-empty subset of on, off")
    if batch_size < 1:
        raise GenerationError(f"batch_size = {batch_size}: expected a positive integer")
    reserved = [item for item in items if item.split in ("heldout", "validation")]
    if reserved:
        raise GenerationError(
            f"{len(reserved)} of the items are {reserved[0].split} items (first: task {reserved[0].task!r}, seed "
            f"{reserved[0].seed}): expected training items only; the validation and held-out suites are for evaluation"
        )
    if category is None or isinstance(category, str):
        fixed = category

        def category_of(item: TaskItem) -> str:
            return fixed if fixed is not None else default_category(item)

    else:
        category_of = category

    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_existing(path)
    report = GenerationReport(
        path=str(path),
        teacher=teacher.name,
        torn_lines=existing.torn_lines,
        unreadable_lines=existing.unreadable_lines,
    )
    failures_before = Counter(teacher.failures)
    invalid: Counter[str] = Counter()

    todo: dict[str, list[TaskItem]] = {mode: [] for mode in modes}
    seen: set[str] = set()
    for mode in modes:
        for item in items:
            key = example_id(item.task, item.question, mode)
            if key in seen:
                report.duplicate_items += 1
                continue
            seen.add(key)
            report.requested += 1
            if key in existing.ids:
                report.already_present += 1
            else:
                todo[mode].append(item)

    with path.open("a", encoding="utf-8") as fh:
        for start in range(0, max((len(v) for v in todo.values()), default=0), batch_size):
            for mode in modes:
                batch = todo[mode][start : start + batch_size]
                if not batch:
                    continue
                replies = teacher.answer(list(batch), mode == "on")
                if len(replies) != len(batch):
                    raise GenerationError(
                        f"teacher {teacher.name!r} returned {len(replies)} replies for {len(batch)} items"
                    )
                for item, reply in zip(batch, replies, strict=True):
                    if reply is None:
                        continue
                    row = example_to_row(example_from_reply(item, mode, reply.text, reply.generator, category_of(item)))
                    try:  # a row that would not load back is a failure, not a line for the next run to skip
                        example_from_row(row)
                    except MalformedRowError as err:
                        invalid[f"invalid_row:{err.reason}"] += 1
                        continue
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    fh.flush()
                    report.generated += 1
                    report.by_mode[mode] = report.by_mode.get(mode, 0) + 1
                os.fsync(fh.fileno())
                report.failed = dict(Counter(teacher.failures) - failures_before + invalid)
                if progress is not None:
                    progress(report)
    report.failed = dict(Counter(teacher.failures) - failures_before + invalid)
    return report
