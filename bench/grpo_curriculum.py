"""GRPO from the SFT model: pass-rate curriculum vs random order at the same budget, then the held-out eval.

Each arm is one `open_nemotron.train.rl.run` with the same prompts, seed, rewards and step budget; only the order
of the prompts differs (`curriculum=True`: the pass-rate curriculum; False: TRL-style random order). A finished arm
is not retrained (its `final/` and `rl.json` are read back) and a killed one resumes, so the arms can be run one per
session (`--arms curriculum`, later `--arms random`). The eval then scores the SFT model and every trained arm in
one `open_nemotron.evaluate.reasoning_eval.run` on the held-out suite (the reported numbers; nothing here is chosen
on it), paired against the SFT model with bootstrap intervals, per mode and per task.

    .venv/bin/python bench/grpo_curriculum.py runs/reasoning-v3/sft/final --prompts runs/rl-v2/pass-rate/kept.jsonl \\
        --out runs/rl-v2/grpo --max-steps 40 --arms curriculum,random

With `--select-on-validation N`, each arm's saved checkpoints (and its final model) are first scored on N prompts of
the validation suite (the held-out suite's tasks at other seeds, sharing no question with it), and the one with the
best reasoning-on accuracy among those keeping toggle compliance >= 0.97 in both modes goes to the held-out eval: a
checkpoint is chosen without reading the suite it is reported on.

Writes `OUT/result.json`, `OUT/result.md` and `OUT/curves.png` (training reward, its accuracy part and completion
length of each arm against the step). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from open_nemotron.evaluate.reasoning_eval import EvalConfig
from open_nemotron.evaluate.reasoning_eval import run as run_eval
from open_nemotron.rewards.functions import parse_reward_weights
from open_nemotron.train.rl import RLConfig, log_series
from open_nemotron.train.rl import run as run_rl
from open_nemotron.utils import write_result

ARMS = {"curriculum": True, "random": False}


def train_arm(args: argparse.Namespace, arm: str) -> dict:
    out = Path(args.out) / arm
    done = out / "rl.json"
    # Read back, not rerun: `run` on a finished arm would load it from its last checkpoint and rewrite rl.json
    # with 0 training seconds, losing the arm's measured time.
    if done.is_file() and (out / "final").is_dir():
        saved = json.loads(done.read_text())
        if saved["steps"] >= args.max_steps:
            return saved
    config = RLConfig(
        model=args.model,
        prompts=args.prompts,
        output_dir=str(out),
        algorithm="grpo",
        rewards=parse_reward_weights(args.rewards),
        curriculum=ARMS[arm],
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
        learning_rate=args.lr,
        beta=args.beta,
        temperature=args.temperature,
        top_p=args.top_p,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        seed=args.seed,
    )
    return run_rl(config)


MIN_COMPLIANCE = 0.97  # the bar for toggle compliance in both modes


def eval_config(args: argparse.Namespace, models: list[str], suite: str, limit: int, json_out: Path) -> EvalConfig:
    return EvalConfig(
        models=models,
        suite=suite,
        samples=args.eval_samples,
        limit=limit,
        max_new_tokens_on=args.max_new_tokens_on,
        max_new_tokens_off=args.max_new_tokens_off,
        json_out=str(json_out),
    )


def checkpoints(arm_dir: Path, max_steps: int) -> list[str]:
    """The arm's saved checkpoints in step order, then its final model (a checkpoint of the last step is the final
    model's twin and is left out)."""
    saved = {int(p.name.split("-")[1]): p for p in arm_dir.glob("checkpoint-*") if (p / "config.json").is_file()}
    return [str(saved[step]) for step in sorted(saved) if step < max_steps] + [str(arm_dir / "final")]


def select_on_validation(args: argparse.Namespace, arms: list[str]) -> tuple[dict[str, str], dict]:
    """Per arm, the checkpoint with the best validation accuracy with reasoning on among those that keep compliance
    >= MIN_COMPLIANCE in both modes (the final model when none does). Scored in one eval with the SFT model beside
    them, for reference; the SFT model itself is not a candidate."""
    out = Path(args.out)
    candidates = {arm: checkpoints(out / arm, args.max_steps) for arm in arms}
    models = [args.model] + [c for arm in arms for c in candidates[arm]]
    validation = run_eval(eval_config(args, models, "validation", args.select_on_validation, out / "validation.json"))

    def key(spec: str) -> tuple[bool, float]:
        m = validation["models"][spec]
        ok = min(m["on"]["compliance"], m["off"]["compliance"]) >= MIN_COMPLIANCE
        return ok, m["on"]["accuracy"]

    chosen = {}
    for arm in arms:
        best = max(candidates[arm], key=key)  # max keeps the first of equals: the earlier checkpoint
        chosen[arm] = best if key(best)[0] else candidates[arm][-1]
    return chosen, validation


def plot(arms: dict[str, dict], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ("reward", "rewards/accuracy/mean", "completions/mean_length")
    fig, axes = plt.subplots(1, len(keys), figsize=(14, 3.6))
    for arm, result in arms.items():
        for ax, key in zip(axes, keys, strict=True):
            steps, values = log_series(result["log_history"], key)
            if not steps:
                continue
            (line,) = ax.plot(steps, values, alpha=0.3, linewidth=1)
            if len(values) >= window:  # a running mean: one rollout of 4 prompts is a noisy point
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ax.plot(
                    steps[window - 1 :],
                    smooth,
                    color=line.get_color(),
                    linewidth=2,
                    label=f"{arm} ({window}-step mean)",
                )
            else:
                line.set_label(arm)
    axes[0].set_title("training reward (weighted sum)")
    axes[1].set_title("accuracy reward")
    axes[2].set_title("completion length (tokens)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    from open_nemotron.utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def render(result: dict) -> str:
    lines = [
        f"# GRPO from {result['model']}: curriculum vs random order — {result['date']}",
        "",
        f"Prompts `{result['prompts']}`; {result['max_steps']} steps per arm. Held-out eval: "
        f"{result['eval']['suite_size']} prompts, reasoning on {result['eval']['config']['samples']} samples at "
        f"T {result['eval']['config']['temperature']}, off greedy.",
        "",
        "| model | train s | on | on − SFT [95%] | on compliance | off | off − SFT [95%] | off compliance |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for name, spec in result["specs"].items():
        m = result["eval"]["models"][spec]
        row = [name, f"{result['train_seconds'].get(name, 0):.0f}" if name != "sft" else ""]
        for mode in ("on", "off"):
            row.append(f"{m[mode]['accuracy']:.3f}")
            d = m.get("minus_first", {}).get(mode)
            row.append(f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "")
            row.append(f"{m[mode]['compliance']:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    tasks = list(next(iter(result["eval"]["models"].values()))["on"].get("per_task", {}))
    if tasks:
        lines += ["", "| model | mode | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
        for name, spec in result["specs"].items():
            for mode in ("on", "off"):
                per_task = result["eval"]["models"][spec][mode]["per_task"]
                lines.append(f"| {name} | {mode} | " + " | ".join(f"{per_task[t]:.3f}" for t in tasks) + " |")
    validation = result.get("validation")
    if validation:
        lines += [
            "",
            f"Checkpoints chosen on the validation suite ({validation['suite_size']} prompts; the held-out eval above "
            "read only the chosen ones):",
            "",
            "| model | on | on compliance | off | off compliance |",
            "|---|---:|---:|---:|---:|",
        ]
        for spec, m in validation["models"].items():
            mark = " (chosen)" if spec in result["specs"].values() and spec != result["model"] else ""
            lines.append(
                f"| `{spec}`{mark} | {m['on']['accuracy']:.3f} | {m['on']['compliance']:.3f} | "
                f"{m['off']['accuracy']:.3f} | {m['off']['compliance']:.3f} |"
            )
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the SFT model (GRPO's start and the eval's reference)")
    parser.add_argument("--prompts", required=True, help="RL rows with pass_rate (rl pass-rate's kept.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arms", default="curriculum,random", help="comma-separated: curriculum, random")
    parser.add_argument("--rewards", default="accuracy=1,format=1")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient to the frozen SFT model (0: none)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="rollout sampling temperature (paper: 1; the eval samples at 0.6)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus top-p (paper: 1)")
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=210)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens-on", type=int, default=320)
    parser.add_argument("--max-new-tokens-off", type=int, default=96)
    parser.add_argument("--smooth", type=int, default=5, help="running-mean window of the plotted curves")
    parser.add_argument(
        "--select-on-validation",
        type=int,
        default=0,
        metavar="N",
        help="choose each arm's checkpoint on N validation prompts before the held-out eval (0: the final model)",
    )
    parser.add_argument("--no-eval", action="store_true", help="train the arms only")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise SystemExit(f"error: --arms {args.arms!r}: expected a comma-separated subset of {', '.join(ARMS)}")

    out = Path(args.out)
    trained = {}
    for arm in arms:
        start = time.perf_counter()
        trained[arm] = train_arm(args, arm)
        print(f"{arm}: {trained[arm]['steps']} steps, {time.perf_counter() - start:.0f} s this call", flush=True)
    plot(trained, out / "curves.png", args.smooth)
    if args.no_eval:
        return
    validation = None
    if args.select_on_validation:
        chosen, validation = select_on_validation(args, arms)
    else:
        chosen = {arm: trained[arm]["final_model"] for arm in arms}
    specs = {"sft": args.model, **chosen}
    evaluation = run_eval(eval_config(args, list(specs.values()), "heldout", args.eval_limit, out / "eval.json"))
    result = {
        "benchmark": "grpo_curriculum",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": args.model,
        "prompts": args.prompts,
        "max_steps": args.max_steps,
        "args": vars(args),
        "specs": specs,
        "train_seconds": {arm: trained[arm]["train_seconds"] for arm in arms},
        "eval": evaluation,
        "validation": validation,
    }
    write_result(out / "result.json", result, render(result))
    print(render(result))


if __name__ == "__main__":
    main()
