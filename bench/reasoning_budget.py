"""Held-out accuracy with reasoning on under a think-block budget: one `eval` run per budget, one plot.

The engine closes a think block at the budget (`max_reasoning_tokens`: it writes `</think>` itself and the model
goes on to its answer); "none" leaves only the reply's token limit. Same prompts, seeds and sampling for every
budget (the paper's reasoning-on protocol: temperature 0.6, top-p 0.95).

    .venv/bin/python bench/reasoning_budget.py runs/reasoning-v3/sft/final --budgets 32,64,128,none --limit 210 \\
        --samples 2 --max-new-tokens 320 --json runs/reasoning-budget/result.json

Writes the JSON, a Markdown table beside it and a PNG plot (accuracy with its 95% interval, and mean reasoning
length, against the budget). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from open_nemotron.evaluate.reasoning_eval import EvalConfig, run
from open_nemotron.progress import StageProgress
from open_nemotron.utils import write_result


def parse_budgets(text: str) -> list[int | None]:
    budgets: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("none", "unlimited"):
            budgets.append(None)
        elif part.isdigit():
            budgets.append(int(part))
        else:
            raise SystemExit(f"error: --budgets {text!r}: expected comma-separated integers >= 0 or none")
    return budgets


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["budgets"]
    labels = [str(r["budget"]) if r["budget"] is not None else "none" for r in rows]
    x = list(range(len(rows)))
    acc = [r["accuracy"] for r in rows]
    low = [r["accuracy"] - r["ci95"][0] for r in rows]
    high = [r["ci95"][1] - r["accuracy"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar(x, acc, yerr=[low, high], marker="o", capsize=4, label="accuracy (95% interval)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("reasoning budget (think-block tokens)")
    ax.set_ylabel("held-out accuracy, reasoning on")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, [r["mean_tokens"] for r in rows], "s--", color="tab:gray", label="mean reply tokens")
    twin.set_ylabel("mean reply tokens")
    twin.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    ax.set_title(result["model"], fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def render_markdown(result: dict) -> str:
    lines = [
        f"# Reasoning budget — {result['date']}",
        "",
        f"Model `{result['model']}`, suite `{result['suite']}` ({result['prompts']} prompts, {result['samples']} "
        "samples each at temperature 0.6 / top-p 0.95, average pass@1), reply limit "
        f"{result['max_new_tokens']} tokens.",
        "",
        "| budget | accuracy | 95% interval | compliance | mean reply tokens | seconds |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in result["budgets"]:
        label = r["budget"] if r["budget"] is not None else "none"
        lines.append(
            f"| {label} | {r['accuracy']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['compliance']:.3f} | "
            f"{r['mean_tokens']:.1f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--budgets", default="32,64,128,none")
    parser.add_argument("--suite", default="heldout")
    parser.add_argument("--limit", type=int, default=210)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", required=True, type=Path)
    args = parser.parse_args()
    budgets = parse_budgets(args.budgets)

    rows = []
    with StageProgress("reasoning budgets", len(budgets)) as bar:
        for budget in budgets:
            config = EvalConfig(
                models=[args.model],
                suite=args.suite,
                reasoning=["on"],
                samples=args.samples,
                limit=args.limit,
                max_new_tokens_on=args.max_new_tokens,
                batch_size=args.batch_size,
                reasoning_budget=budget,
                seed=args.seed,
                device=args.device,
            )
            start = time.perf_counter()
            on = run(config, progress=False)["models"][args.model]["on"]
            seconds = time.perf_counter() - start
            rows.append({"budget": budget, "seconds": seconds, **on})
            bar.advance(f"budget {budget}: accuracy {on['accuracy']:.3f}, {on['mean_tokens']:.0f} tokens")
    result = {
        "benchmark": "reasoning_budget",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": args.model,
        "suite": args.suite,
        "prompts": rows[0]["n_prompts"],
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "budgets": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result) + f"\n![accuracy vs budget]({args.json.with_suffix('.png').name})\n"
    write_result(args.json, result, markdown)
    plot(result, args.json.with_suffix(".png"))
    print(markdown)
    print(f"wrote {args.json}, {args.json.with_suffix('.md')} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
