"""`open-nemotron eval`: accuracy with reasoning on and off, the paper's protocol, several models in one run.

Protocol (paper §3.10): reasoning on samples K answers per prompt at temperature 0.6 / top-p 0.95 and reports the
average pass@1 (mean over prompts of the fraction of correct samples); reasoning off decodes greedily once.
Reported per model and mode: accuracy with a 95% bootstrap interval over prompts, toggle compliance (on: exactly one
well-formed think block then an answer; off: no tags), mean generated tokens, number of prompts; and per model the
paired difference on - off with its own interval (the reasoning gain). Every generation is also written to a
JSONL file beside the JSON for inspection. Deterministic for a fixed seed.

Generation runs on the continuous-batching engine (`generate_chat`; Llama checkpoints are loaded into our class
for it, same weights and logits): all K samples of all prompts of a mode are one engine run, so a long reasoning
trace never holds finished rows back, and sample k of prompt i is drawn from its own seeded generator (the same
text whatever the batch size). `reasoning_budget` caps the think block of reasoning-on replies (the engine closes
it at that many tokens and the model goes on to its answer).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from open_nemotron.errors import OpenNemotronError
from open_nemotron.utils import atomic_write_text, write_result

MODES = ("on", "off")


@dataclass
class EvalConfig:
    models: list[str]
    suite: str = "heldout"  # "heldout", "validation" (for choosing, never reporting) or a jsonl path
    reasoning: list[str] = field(default_factory=lambda: ["on", "off"])
    samples: int = 4  # K samples per prompt with reasoning on
    limit: int | None = None  # first N prompts of the suite
    max_new_tokens_on: int = 384
    max_new_tokens_off: int = 128
    temperature: float = 0.6
    top_p: float = 0.95
    batch_size: int = 16  # engine slots decoding together
    reasoning_budget: int | None = None  # think-block cap for reasoning on (None: only max_new_tokens_on)
    padded: bool = False  # left-padded generate batches instead of the engine (to compare the two paths)
    seed: int = 0
    bootstrap: int = 2000
    device: str | None = None
    json_out: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise OpenNemotronError("eval: models is empty: expected at least one model")
        bad = [m for m in self.reasoning if m not in MODES]
        if bad or not self.reasoning:
            raise OpenNemotronError(f"eval: reasoning = {self.reasoning}: expected a non-empty subset of on,off")
        for name in ("samples", "max_new_tokens_on", "max_new_tokens_off", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise OpenNemotronError(f"eval: {name} = {getattr(self, name)}: expected a positive integer")
        if self.limit is not None and self.limit < 1:
            raise OpenNemotronError(f"eval: limit = {self.limit}: expected a positive integer or none")
        if self.padded and self.reasoning_budget is not None:
            raise OpenNemotronError("eval: reasoning_budget needs the engine: drop padded or the budget")
        if self.reasoning_budget is not None and (
            not isinstance(self.reasoning_budget, int) or self.reasoning_budget < 0
        ):
            raise OpenNemotronError(
                f"eval: reasoning_budget = {self.reasoning_budget!r}: expected an integer >= 0 or none"
            )


def _is_ifeval_file(path: str) -> bool:
    from open_nemotron.rewards.instructions import is_ifeval_row

    with open(path) as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return is_ifeval_row(json.loads(first))
    except (json.JSONDecodeError, TypeError, AttributeError):
        return False


def load_suite(suite: str, limit: int | None = None) -> list:
    """The prompts of a suite: `TaskItem`s for the fixed held-out suite or a GSM8K/MATH-style jsonl file,
    `IFExample`s for a file in IFEval's input format (``{"key", "prompt", "instruction_id_list", "kwargs"}``)."""
    from open_nemotron.data import tasks

    if suite.endswith(".jsonl") and Path(suite).is_file() and _is_ifeval_file(suite):
        from open_nemotron.rewards.instructions import load_suite as load_ifeval

        return load_ifeval(suite, limit).examples

    if suite in ("heldout", "validation"):
        make_suite = tasks.heldout_suite if suite == "heldout" else tasks.validation_suite
        if limit:
            # Balanced across tasks: the first ceil(limit / tasks) items of every task, interleaved, cut to `limit`.
            per_task = -(-limit // len(tasks.HELDOUT_TASKS))
            by_task: dict[str, list] = {}
            for item in make_suite(n_per_task=per_task):
                by_task.setdefault(item.task, []).append(item)
            interleaved = [group[i] for i in range(per_task) for group in by_task.values() if i < len(group)]
            return interleaved[:limit]
        items = make_suite()
    elif suite.endswith(".jsonl") and Path(suite).is_file():
        items = tasks.load_math_jsonl(suite)
    else:
        raise OpenNemotronError(f"eval: suite '{suite}': expected 'heldout', 'validation' or an existing .jsonl file")
    return items[:limit] if limit else items


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling prompts (deterministic for a seed)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def _evaluate_mode(
    model, tokenizer, items: list, thinking: bool, config: EvalConfig, seed: int, on_reply=None
) -> dict[str, Any]:
    from open_nemotron.data.tasks import score_answer
    from open_nemotron.model.chat import generate_chat
    from open_nemotron.rewards.format import is_toggle_compliant
    from open_nemotron.rewards.instructions import IFExample, accuracies, check_response

    instruction_suite = bool(items) and isinstance(items[0], IFExample)
    conversations = [
        [{"role": "user", "content": item.prompt if instruction_suite else item.question}] for item in items
    ]
    samples = config.samples if thinking else 1
    scores = np.zeros((len(items), samples))
    compliant = np.zeros((len(items), samples))
    tokens = np.zeros((len(items), samples))
    records = []
    if_results = []
    # Every sample of every prompt in one call: row s * len(items) + i is sample s of prompt i.
    texts = generate_chat(
        model,
        tokenizer,
        conversations * samples,
        thinking=thinking,
        max_new_tokens=config.max_new_tokens_on if thinking else config.max_new_tokens_off,
        do_sample=thinking,
        temperature=config.temperature if thinking else None,
        top_p=config.top_p if thinking else None,
        seed=seed,
        batch_size=config.batch_size,
        reasoning_budget=config.reasoning_budget if thinking else None,
        padded=config.padded,
        on_reply=on_reply,
    )
    for s in range(samples):
        for i, item in enumerate(items):
            text = texts[s * len(items) + i]
            compliant[i, s] = float(is_toggle_compliant(text, thinking))
            tokens[i, s] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if instruction_suite:
                # IFEval's checks on the answer part (after </think> with reasoning on); accuracy = prompt-level strict.
                verdict = check_response(item, text, thinking)
                if_results.append(verdict)
                scores[i, s] = float(verdict.prompt_strict)
                records.append(
                    {
                        "key": item.key,
                        "sample": s,
                        "mode": "on" if thinking else "off",
                        "prompt": item.prompt,
                        "output": text,
                        "strict": verdict.strict,
                        "loose": verdict.loose,
                        "compliant": bool(compliant[i, s]),
                    }
                )
                continue
            scores[i, s] = 1.0 if score_answer(item, text) >= 1.0 else 0.0
            records.append(
                {
                    "task": item.task,
                    "seed": item.seed,
                    "sample": s,
                    "mode": "on" if thinking else "off",
                    "question": item.question,
                    "gold": item.answer,
                    "output": text,
                    "correct": bool(scores[i, s]),
                    "compliant": bool(compliant[i, s]),
                }
            )
    per_prompt = scores.mean(axis=1)
    extra = {"ifeval": accuracies(if_results)} if instruction_suite else {}
    if not instruction_suite:
        # Accuracy per task (average pass@1 over its prompts), in the suite's task order.
        by_task: dict[str, list[float]] = {}
        for item, value in zip(items, per_prompt, strict=True):
            by_task.setdefault(item.task, []).append(float(value))
        extra["per_task"] = {task: float(np.mean(values)) for task, values in by_task.items()}
    return {
        **extra,
        "accuracy": float(per_prompt.mean()),
        "ci95": bootstrap_interval(per_prompt, config.bootstrap, config.seed),
        "compliance": float(compliant.mean()),
        "mean_tokens": float(tokens.mean()),
        "n_prompts": len(items),
        "samples_per_prompt": samples,
        "_per_prompt": per_prompt,
        "_records": records,
    }


def run(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.model.loading import load_model, load_tokenizer
    from open_nemotron.progress import StageProgress

    items = load_suite(config.suite, config.limit)
    results: dict[str, Any] = {}
    per_prompt: dict[str, dict[str, np.ndarray]] = {}
    all_records = []
    # One step per generated reply (reasoning on: K per prompt), a line at most every 15 s without a terminal.
    replies = len(items) * sum(config.samples if mode == "on" else 1 for mode in config.reasoning)
    with StageProgress("eval", len(config.models) * replies, enabled=progress, min_interval_s=15) as bar:
        for spec in config.models:
            # A Llama checkpoint goes into our class (same weights and logits) so that it runs on the engine.
            model = load_model(spec, device=config.device, implementation="ours")
            tokenizer = load_tokenizer(spec)
            ensure_reasoning_template(tokenizer)  # a raw parent gets the same switch as our models
            per_mode = {}
            for mode in config.reasoning:
                note = f"{spec} reasoning {mode}"
                per_mode[mode] = _evaluate_mode(
                    model, tokenizer, items, mode == "on", config, config.seed, lambda _i, n=note: bar.advance(n)
                )
                all_records += [{"model": spec, **r} for r in per_mode[mode].pop("_records")]
            if {"on", "off"} <= set(per_mode):
                diff = per_mode["on"]["_per_prompt"] - per_mode["off"]["_per_prompt"]
                per_mode["on_minus_off"] = {
                    "difference": float(diff.mean()),
                    "ci95": bootstrap_interval(diff, config.bootstrap, config.seed),
                }
            per_prompt[spec] = {mode: per_mode[mode].pop("_per_prompt") for mode in MODES if mode in per_mode}
            if spec != config.models[0]:
                # Paired over the same prompts: this model minus the first, per mode (e.g. RL policy vs its SFT start).
                per_mode["minus_first"] = {
                    mode: {
                        "difference": float((values - per_prompt[config.models[0]][mode]).mean()),
                        "ci95": bootstrap_interval(
                            values - per_prompt[config.models[0]][mode], config.bootstrap, config.seed
                        ),
                    }
                    for mode, values in per_prompt[spec].items()
                }
            results[spec] = per_mode
            del model
    result = {
        "benchmark": "eval",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": asdict(config),
        "suite_size": len(items),
        "models": results,
    }
    if config.json_out:
        write_result(config.json_out, result, render_markdown(result))
        samples = Path(config.json_out).with_suffix(".samples.jsonl")
        atomic_write_text(samples, "".join(json.dumps(r) + "\n" for r in all_records))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"# eval — {result['date']}",
        "",
        f"Suite `{cfg['suite']}` ({result['suite_size']} prompts). Reasoning on: {cfg['samples']} samples per prompt "
        f"at temperature {cfg['temperature']}, top-p {cfg['top_p']} (average pass@1)"
        + (
            f", think block capped at {cfg['reasoning_budget']} tokens"
            if cfg.get("reasoning_budget") is not None
            else ""
        )
        + "; off: greedy. 95% bootstrap intervals over prompts.",
        "",
        "| model | mode | accuracy | 95% interval | compliance | mean tokens | prompts |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for spec, modes in result["models"].items():
        for mode in MODES:
            if mode in modes:
                m = modes[mode]
                lines.append(
                    f"| {spec} | {mode} | {m['accuracy']:.3f} | [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] | "
                    f"{m['compliance']:.3f} | {m['mean_tokens']:.1f} | {m['n_prompts']} |"
                )
        if "on_minus_off" in modes:
            d = modes["on_minus_off"]
            lines.append(
                f"| {spec} | on - off | {d['difference']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | | | |"
            )
        for mode, d in modes.get("minus_first", {}).items():
            lines.append(
                f"| {spec} | {mode}: minus {next(iter(result['models']))} | {d['difference']:+.3f} | "
                f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | | | |"
            )
    task_rows = [
        (spec, mode, modes[mode]["per_task"])
        for spec, modes in result["models"].items()
        for mode in MODES
        if "per_task" in modes.get(mode, {})
    ]
    if task_rows and len(task_rows[0][2]) > 1:
        names = list(task_rows[0][2])
        lines += [
            "",
            "Accuracy per task:",
            "",
            "| model | mode | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        for spec, mode, per_task in task_rows:
            lines.append(
                f"| {spec} | {mode} | " + " | ".join(f"{per_task.get(n, float('nan')):.3f}" for n in names) + " |"
            )
    if_rows = [
        (spec, mode, modes[mode]["ifeval"])
        for spec, modes in result["models"].items()
        for mode in MODES
        if "ifeval" in modes.get(mode, {})
    ]
    if if_rows:
        lines += [
            "",
            "IFEval accuracies (accuracy above = prompt-level strict; checks read the answer after `</think>`):",
            "",
            "| model | mode | prompt strict | instruction strict | prompt loose | instruction loose |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for spec, mode, a in if_rows:
            lines.append(
                f"| {spec} | {mode} | {a['prompt_level_strict_acc']:.3f} | {a['inst_level_strict_acc']:.3f} | "
                f"{a['prompt_level_loose_acc']:.3f} | {a['inst_level_loose_acc']:.3f} |"
            )
    return "\n".join(lines) + "\n"
