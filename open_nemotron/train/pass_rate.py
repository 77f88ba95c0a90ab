"""Pass-rate filter (digest §3.6): K samples per prompt, the share that pass, and the RL set without the easy ones.

A sample passes when its reward is full: the task's answer is correct (``accuracy`` = 1) or every IFEval
instruction is followed (``instructions`` = 1, prompt-level strict). The paper dropped prompts with pass rate
>= 0.75 (LN-Super, 8 samples); prompts never solved can be dropped too (they give GRPO no signal either).

Artifacts in ``out_dir``: ``pass_rates.jsonl`` (every input row with ``pass_rate`` and ``samples``; written
incrementally, so a killed run resumes at the next unfinished chunk), ``kept.jsonl`` (the filtered RL set, with
``pass_rate``: the curriculum reads it), ``pass_rate.json`` and ``pass_rate.md`` (histogram and counts).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.utils import atomic_write_text


class PassRateError(OpenNemotronError, ValueError):
    """Bad pass-rate settings."""


@dataclass
class PassRateConfig:
    model: str
    prompts: str  # an RL prompt file (`open-nemotron rl prompts`)
    output_dir: str
    samples: int = 8  # K per prompt (paper: 8)
    threshold: float = 0.75  # drop prompts with pass rate >= threshold (paper: 0.75)
    drop_unsolved: bool = False  # also drop prompts no sample solved
    max_new_tokens: int = 256
    temperature: float = 1.0  # the RL sampling settings (paper: temperature 1, top-p 1)
    top_p: float = 1.0
    batch_size: int = 16
    chunk: int = 16  # prompts per resumable chunk
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PassRateError(f"pass-rate: {name} = {value!r}: expected a positive integer")
        if not 0 < self.threshold <= 1:
            raise PassRateError(f"pass-rate: threshold = {self.threshold!r}: expected a number in (0, 1]")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise PassRateError(
                f"pass-rate: temperature = {self.temperature!r}, top_p = {self.top_p!r}: expected sampling "
                "(temperature > 0, top_p in (0, 1])"
            )


def sample_passes(rows: list[dict[str, Any]], completions: list[str]) -> list[bool]:
    """Whether each (row, completion) pair earns the full reward (module docstring)."""
    from open_nemotron.rewards.functions import accuracy, instructions

    columns = {k: [r[k] for r in rows] for k in rows[0]}
    acc = accuracy([r["prompt"] for r in rows], completions, **columns)
    inst = instructions([r["prompt"] for r in rows], completions, **columns)
    return [(a is not None and a >= 1.0) or (i is not None and i >= 1.0) for a, i in zip(acc, inst, strict=True)]


def keep(rate: float, config: PassRateConfig) -> bool:
    return rate < config.threshold and not (config.drop_unsolved and rate == 0.0)


def _done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: that chunk is redone
            continue
        done[row["id"]] = row
    return done


def run(config: PassRateConfig, progress: bool = True) -> dict[str, Any]:
    from rich.progress import Progress

    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.model.loading import load_model, load_tokenizer
    from open_nemotron.train.rl_data import load_rows, sample_responses, save_rows

    rows = load_rows(config.prompts)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "pass_rates.jsonl"
    done = _done(partial)
    if partial.is_file():
        # Keep only whole rows: a line cut by a kill would otherwise swallow the next row appended after it.
        atomic_write_text(partial, "".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [r for r in rows if r["id"] not in done]
    if todo:
        model = load_model(config.model, device=config.device)
        tokenizer = load_tokenizer(config.model)
        ensure_reasoning_template(tokenizer)
        with Progress(disable=not progress) as bar, partial.open("a") as sink:
            task = bar.add_task("pass rate", total=len(rows), completed=len(done))
            for start in range(0, len(todo), config.chunk):
                chunk = todo[start : start + config.chunk]
                repeated, texts = sample_responses(
                    model,
                    tokenizer,
                    chunk,
                    config.samples,
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    # Per-row streams: a prompt's K samples differ, and a rerun draws the same ones.
                    seed_of=lambda part, _thinking: config.seed + sum(ord(c) for c in part[0]["id"]),
                    batch_size=config.batch_size,
                )
                passes = sample_passes(repeated, texts)
                rates = {
                    repeated[j]["id"]: sum(passes[j : j + config.samples]) / config.samples
                    for j in range(0, len(repeated), config.samples)
                }
                for r in chunk:
                    sink.write(json.dumps({**r, "pass_rate": rates[r["id"]], "samples": config.samples}) + "\n")
                sink.flush()
                bar.advance(task, len(chunk))
        done = _done(partial)
    scored = [done[r["id"]] for r in rows]
    kept = [r for r in scored if keep(r["pass_rate"], config)]
    save_rows(out / "kept.jsonl", kept)
    histogram = Counter(round(r["pass_rate"], 6) for r in scored)
    result = {
        "config": asdict(config),
        "prompts": len(rows),
        "kept": len(kept),
        "dropped_easy": sum(r["pass_rate"] >= config.threshold for r in scored),
        "dropped_unsolved": sum(r["pass_rate"] == 0 for r in scored) if config.drop_unsolved else 0,
        "mean_pass_rate": sum(r["pass_rate"] for r in scored) / len(scored),
        "histogram": {str(k): v for k, v in sorted(histogram.items())},
        "by_task": _by_task(scored),
    }
    atomic_write_text(out / "pass_rate.json", json.dumps(result, indent=1))
    atomic_write_text(out / "pass_rate.md", render_markdown(result))
    return result


def _by_task(scored: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for r in scored:
        name = r["task"] or "instructions"
        groups.setdefault(f"{name} ({'on' if r['thinking'] else 'off'})", []).append(r["pass_rate"])
    return {k: {"prompts": len(v), "mean_pass_rate": sum(v) / len(v)} for k, v in sorted(groups.items())}


def render_markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"# Pass rates: {c['model']}",
        "",
        f"{result['prompts']} prompts from `{c['prompts']}`, {c['samples']} samples each (temperature "
        f"{c['temperature']}, top-p {c['top_p']}, {c['max_new_tokens']} new tokens). Kept {result['kept']}: dropped "
        f"{result['dropped_easy']} with pass rate >= {c['threshold']}"
        + (f" and {result['dropped_unsolved']} never solved" if c["drop_unsolved"] else "")
        + f". Mean pass rate {result['mean_pass_rate']:.3f}.",
        "",
        "| pass rate | prompts |",
        "|---:|---:|",
        *[f"| {k} | {v} |" for k, v in result["histogram"].items()],
        "",
        "| task (mode) | prompts | mean pass rate |",
        "|---|---:|---:|",
        *[f"| {k} | {v['prompts']} | {v['mean_pass_rate']:.3f} |" for k, v in result["by_task"].items()],
        "",
    ]
    return "\n".join(lines)
