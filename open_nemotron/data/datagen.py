"""`open-nemotron datagen`: prompts from the task registry -> teacher answers (reasoning on and off) -> filters.

Artifacts in `out_dir`:
- `raw.jsonl`: every teacher answer as an `Example` row, appended as it arrives (a killed run resumes: rows
  already there are not asked for again);
- `data.jsonl`: the rows that passed every filter (answer verification, lengths, exact and near duplicates,
  decontamination against the held-out suite) — the SFT input;
- `data_report.json` / `data_report.md`: counts in and out per stage, by reason and by mode;
- `generation.json`: what the teacher did (rows written, failures by reason).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.utils import atomic_write_text


def _default_tasks() -> list[str]:
    from open_nemotron.data.solvers import SOLVABLE_TASKS

    return list(SOLVABLE_TASKS)


@dataclass
class DatagenConfig:
    out_dir: str
    tasks: list[str] = field(default_factory=_default_tasks)
    n_per_task: int = 100
    difficulties: list[str] = field(default_factory=lambda: ["easy", "medium"])
    modes: list[str] = field(default_factory=lambda: ["on", "off"])
    teacher: str = "builtin"
    teacher_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    verify: bool = True

    def __post_init__(self) -> None:
        from open_nemotron.data.tasks import DIFFICULTIES, TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise OpenNemotronError(f"datagen: tasks = {self.tasks}: expected names from {', '.join(TASKS)}")
        bad = [d for d in self.difficulties if d not in DIFFICULTIES]
        if bad or not self.difficulties:
            raise OpenNemotronError(
                f"datagen: difficulties = {self.difficulties}: expected from {', '.join(DIFFICULTIES)}"
            )
        if self.n_per_task < 1:
            raise OpenNemotronError(f"datagen: n_per_task = {self.n_per_task}: expected a positive integer")


def training_items(config: DatagenConfig) -> list:
    """`n_per_task` training items per task, spread over the difficulties, from disjoint seed ranges per difficulty."""
    from open_nemotron.data.tasks import make_items

    items = []
    for task in config.tasks:
        per = [config.n_per_task // len(config.difficulties)] * len(config.difficulties)
        for i in range(config.n_per_task % len(config.difficulties)):
            per[i] += 1
        for d, (difficulty, n) in enumerate(zip(config.difficulties, per, strict=True)):
            if n:
                # Each difficulty draws from its own seed block, so adding a level never repeats another's prompts.
                items += make_items(task, n, split="train", seed=config.seed + d * 1_000_000, difficulty=difficulty)
    return items


def run(config: DatagenConfig, progress: bool = True) -> dict[str, Any]:

    from open_nemotron.data.filters import run_filters
    from open_nemotron.data.generate import generate_to_jsonl
    from open_nemotron.data.schema import load_examples, write_examples
    from open_nemotron.data.teachers import make_teacher

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = training_items(config)
    teacher = make_teacher(config.teacher, **config.teacher_options)
    from open_nemotron.progress import StageProgress

    with StageProgress(f"datagen ({config.teacher})", len(items) * len(config.modes), enabled=progress) as bar:

        def on_batch(report) -> None:
            done = report.already_present + report.generated + sum(report.failed.values())
            bar.advance(f"{report.generated} generated, {sum(report.failed.values())} failed", steps=done - bar.done)

        generation = generate_to_jsonl(teacher, items, out / "raw.jsonl", config.modes, progress=on_batch)
    atomic_write_text(out / "generation.json", json.dumps(generation.to_dict(), indent=2))
    raw, row_report = load_examples(out / "raw.jsonl")
    kept, data_report = run_filters(raw, row_report=row_report, verify=config.verify)
    write_examples(out / "data.jsonl", kept)
    data_report.write(out / "data_report.json", out / "data_report.md")
    summary = {
        "config": asdict(config),
        "items": len(items),
        "generation": generation.summary(),
        "raw_rows": len(raw),
        "kept_rows": len(kept),
        "kept_on": sum(e.reasoning == "on" for e in kept),
        "kept_off": sum(e.reasoning == "off" for e in kept),
        "data": str(out / "data.jsonl"),
        "report": str(out / "data_report.md"),
    }
    atomic_write_text(out / "datagen_summary.json", json.dumps(summary, indent=2))
    return summary
