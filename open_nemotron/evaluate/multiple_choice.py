"""`open-nemotron eval-mc`: multiple-choice log-likelihood accuracy with lm-evaluation-harness's definitions, and
each model's retention of the first model's accuracy (the paper's quality side of a speed claim).

A task is a jsonl file of rows `{"query": str, "choices": [str, ...], "gold": int}`, named by the file's stem. For
each item the score of a choice is the summed log-probability of its continuation `" " + choice` after `query`
(lm-evaluation-harness's `loglikelihood`: the continuation's tokens are those of `tokenize(query + continuation)`
after the query's own tokens, no special tokens added). `acc` picks the highest sum, `acc_norm` the highest sum
divided by the continuation's length in UTF-8 bytes; both come with the standard error of their mean
(sqrt(var / n), var with one degree of freedom, as the harness reports). Retention of a model = its acc_norm
averaged over tasks ÷ the first model's.

One model pass per item: the query is run once, its keys/values are repeated for every choice, and all choices'
continuations run in one right-padded batch over that cache (the shared prefix is computed once).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.cache import CACHE_GENERATE_KWARG, CACHE_OUTPUT_FIELD
from open_nemotron.utils import write_result


class MultipleChoiceError(OpenNemotronError, ValueError):
    """A task file or setting the harness cannot use (the file, the row, the field and what was expected)."""


@dataclass(frozen=True)
class MCItem:
    query: str
    choices: tuple[str, ...]
    gold: int


def load_task(path: str | Path, limit: int | None = None) -> tuple[str, list[MCItem]]:
    """(task name = the file's stem, its first `limit` items), every row checked."""
    path = Path(path)
    if not path.is_file():
        raise MultipleChoiceError(f"{path}: no such task file (expected a .jsonl of query/choices/gold rows)")
    from open_nemotron.utils import jsonl_rows

    items = []
    for where, row in jsonl_rows(path, MultipleChoiceError):
        if not isinstance(row, dict):
            raise MultipleChoiceError(f"{where}: expected an object with query, choices, gold")
        query, choices, gold = row.get("query"), row.get("choices"), row.get("gold")
        if not isinstance(query, str) or not query:
            raise MultipleChoiceError(f"{where}: query = {query!r}: expected a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise MultipleChoiceError(f"{where}: choices = {choices!r}: expected a list of 2 or more non-empty strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise MultipleChoiceError(
                f"{where}: gold = {gold!r}: expected an index into choices (0..{len(choices) - 1})"
            )
        items.append(MCItem(query, tuple(choices), gold))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise MultipleChoiceError(f"{path}: no items")
    return path.stem, items


def continuation_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: (context tokens, continuation tokens) where the continuation's tokens are those
    of the whole string after the context's own (so a merge across the boundary counts toward the continuation);
    trailing spaces of the context move to the continuation first, as the harness does."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return whole[: len(context_ids)], whole[len(context_ids) :]


@torch.inference_mode()
def choice_logprobs(model: Any, tokenizer: Any, item: MCItem) -> list[float]:
    """Summed log-probability of each choice's continuation after the query, one model pass for the query and one
    batched pass for all continuations over the query's repeated keys/values."""
    device = next(model.parameters()).device
    splits = [continuation_tokens(tokenizer, item.query, " " + choice) for choice in item.choices]
    contexts = {tuple(c) for c, _ in splits}
    if len(contexts) != 1:  # the boundary merge differs between choices: score each choice on its own row
        return [_logprob_alone(model, ctx, cont, device) for ctx, cont in splits]
    context = list(contexts.pop())
    if not context:
        raise MultipleChoiceError(f"query {item.query[:40]!r} tokenizes to nothing: expected some text")
    out = model(torch.tensor([context], device=device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    cache = getattr(out, CACHE_OUTPUT_FIELD)
    if cache is None:  # a model that keeps no keys/values (no GQA layer): nothing to share, one row per choice
        return [_logprob_alone(model, ctx, cont, device) for ctx, cont in splits]
    conts = [cont for _, cont in splits]
    width = max(len(c) for c in conts)
    n = len(conts)
    ids = torch.zeros(n, width, dtype=torch.long, device=device)
    mask = torch.zeros(n, len(context) + width, dtype=torch.long, device=device)
    mask[:, : len(context)] = 1
    for row, cont in enumerate(conts):
        ids[row, : len(cont)] = torch.tensor(cont, device=device)
        mask[row, len(context) : len(context) + len(cont)] = 1
    cache.batch_repeat_interleave(n)
    positions = torch.arange(len(context), len(context) + width, device=device)[None].expand(n, -1)
    logits = model(
        ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE_GENERATE_KWARG: cache}
    ).logits
    logprobs = torch.log_softmax(logits.float(), -1)
    sums = []
    for row, cont in enumerate(conts):
        total = float(first[cont[0]])
        for k in range(1, len(cont)):
            total += float(logprobs[row, k - 1, cont[k]])
        sums.append(total)
    return sums


def _logprob_alone(model: Any, context: list[int], continuation: list[int], device) -> float:
    ids = torch.tensor([context + continuation], device=device)
    logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logprobs[len(context) + k - 1, t] for k, t in enumerate(continuation)))


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean, sample variance (n - 1): lm-evaluation-harness's `mean_stderr`."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_items(logprobs: list[list[float]], items: list[MCItem]) -> dict[str, Any]:
    """acc / acc_norm and their standard errors from each item's choice log-probabilities."""
    acc, acc_norm = [], []
    for sums, item in zip(logprobs, items, strict=True):
        lengths = [len((" " + c).encode("utf-8")) for c in item.choices]
        acc.append(float(max(range(len(sums)), key=lambda i: sums[i]) == item.gold))
        normed = [s / length for s, length in zip(sums, lengths, strict=True)]
        acc_norm.append(float(max(range(len(normed)), key=lambda i: normed[i]) == item.gold))
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "n": len(items),
    }


@dataclass
class MCConfig:
    models: list[str]
    tasks: list[str]
    limit: int | None = None
    device: str | None = None
    json_out: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise MultipleChoiceError("eval-mc: models is empty: expected at least one model")
        if not self.tasks:
            raise MultipleChoiceError("eval-mc: tasks is empty: expected at least one .jsonl task file")
        if self.limit is not None and self.limit < 1:
            raise MultipleChoiceError(f"eval-mc: limit = {self.limit}: expected a positive integer or none")


def run(config: MCConfig, progress: bool = True) -> dict[str, Any]:
    from open_nemotron.model.loading import load_model, load_tokenizer
    from open_nemotron.progress import StageProgress

    tasks = [load_task(path, config.limit) for path in config.tasks]
    names = [name for name, _ in tasks]
    if len(set(names)) != len(names):
        raise MultipleChoiceError(f"eval-mc: two task files share a name (stem): {names}")
    total = len(config.models) * sum(len(items) for _, items in tasks)
    results: dict[str, Any] = {}
    with StageProgress("eval-mc", total, enabled=progress) as bar:
        for spec in config.models:
            model = load_model(spec, device=config.device)
            tokenizer = load_tokenizer(spec)
            per_task = {}
            for name, items in tasks:
                logprobs = []
                for item in items:
                    logprobs.append(choice_logprobs(model, tokenizer, item))
                    bar.advance(f"{spec} {name}")
                per_task[name] = score_items(logprobs, items)
            average = sum(t["acc_norm"] for t in per_task.values()) / len(per_task)
            results[spec] = {"tasks": per_task, "avg_acc_norm": average}
            del model
    first = results[config.models[0]]["avg_acc_norm"]
    for spec in config.models:
        results[spec]["retention"] = results[spec]["avg_acc_norm"] / first if first > 0 else float("nan")
    result = {
        "benchmark": "eval-mc",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": asdict(config),
        "tasks": {name: len(items) for name, items in tasks},
        "models": results,
    }
    if config.json_out:
        write_result(config.json_out, result, render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    tasks = list(result["tasks"])
    header = "| model | " + " | ".join(f"{t} acc / acc_norm" for t in tasks) + " | avg acc_norm | retention |"
    lines = [
        f"# eval-mc — {result['date']}",
        "",
        "Log-likelihood multiple choice (lm-evaluation-harness definitions); ± is the standard error; retention = "
        "avg acc_norm ÷ the first model's. Items per task: "
        + ", ".join(f"{t} {n}" for t, n in result["tasks"].items())
        + ".",
        "",
        header,
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for spec, r in result["models"].items():
        cells = [
            f"{r['tasks'][t]['acc']:.3f} ± {r['tasks'][t]['acc_stderr']:.3f} / "
            f"{r['tasks'][t]['acc_norm']:.3f} ± {r['tasks'][t]['acc_norm_stderr']:.3f}"
            for t in tasks
        ]
        lines.append(f"| {spec} | " + " | ".join(cells) + f" | {r['avg_acc_norm']:.3f} | {r['retention']:.3f} |")
    return "\n".join(lines) + "\n"
