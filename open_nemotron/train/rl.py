"""GRPO and RLOO on TRL's trainers with our rewards, prompt sets and curriculum (digest §3.6, §3.8).

One stage, two algorithms: `RLConfig.algorithm` is "grpo" (TRL's `GRPOTrainer`: group-normalised advantages,
clipped ratio, optional KL to a frozen reference) or "rloo" (TRL's `RLOOTrainer`: leave-one-out baseline). What is
ours: the prompt rows (`train.rl_data`, reasoning on and off mixed), the reward functions (`rewards.functions`,
each logged as ``rewards/<name>/mean``), and for GRPO the pass-rate curriculum as the train sampler
(`train.curriculum`; TRL's own sampler would reshuffle). Generation is TRL's `model.generate`, which our
DeciLM class serves with its static-cache decode loop on CPU; ``use_vllm`` switches TRL to colocated vLLM on GPUs.

Artifacts in ``output_dir``: ``checkpoint-N/`` (a killed run resumes from the newest), ``final/`` (model +
tokenizer), ``rl.json`` (settings, log history, timing), ``rl_report.md`` and ``rl_curves.png`` (reward per
function, completion length, KL when β > 0, against steps).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.train.model_card import with_local_model_card
from open_nemotron.utils import atomic_write_text

ALGORITHMS = ("grpo", "rloo")


class RLError(OpenNemotronError, ValueError):
    """Bad RL settings."""


@dataclass
class RLConfig:
    model: str
    prompts: str  # RL rows (`open-nemotron rl prompts`, or the pass-rate filter's kept.jsonl)
    output_dir: str
    algorithm: str = "grpo"
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    curriculum: bool = True  # GRPO: pass-rate curriculum (needs pass_rate in the rows); False = random order
    curriculum_sigma: float = 0.15
    num_generations: int = 8  # samples per prompt (paper: 16)
    prompts_per_step: int = 4  # prompts per generation batch (paper: 72)
    num_iterations: int = 1  # gradient updates per rollout (paper: 2)
    temperature: float = 1.0  # paper: temperature 1, top-p 1
    top_p: float = 1.0
    beta: float = 0.0  # KL coefficient to the frozen reference (0: no reference model, no KL term)
    epsilon: float = 0.2  # clip range
    learning_rate: float = 1e-6
    max_completion_length: int = 256
    max_steps: int = 50
    save_steps: int = 10
    logging_steps: int = 1
    warmup_ratio: float = 0.0
    seed: int = 0
    use_vllm: bool = False
    report_to: str = "none"
    judge_url: str | None = None  # an OpenAI-compatible endpoint for the "judge" reward
    judge_model: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise RLError(f"rl: algorithm = {self.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
        for name in (
            "num_generations",
            "prompts_per_step",
            "num_iterations",
            "max_completion_length",
            "max_steps",
            "save_steps",
            "logging_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RLError(f"rl: {name} = {value!r}: expected a positive integer")
        if self.num_generations < 2:
            raise RLError(
                f"rl: num_generations = {self.num_generations}: expected at least 2 (a group needs a baseline)"
            )
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise RLError(f"rl: temperature = {self.temperature}, top_p = {self.top_p}: expected sampling settings")
        for name in ("beta", "epsilon", "learning_rate", "curriculum_sigma"):
            if not getattr(self, name) >= 0:
                raise RLError(f"rl: {name} = {getattr(self, name)!r}: expected a number >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise RLError(f"rl: warmup_ratio = {self.warmup_ratio}: expected a number in [0, 1)")
        if ("judge" in self.rewards) != bool(self.judge_url and self.judge_model):
            raise RLError("rl: the 'judge' reward and --judge-url/--judge-model go together")


def load_policy(spec: str, device: str | None = None):
    """(model, tokenizer) for an RL or preference stage: our reasoning template on the tokenizer, EOS as the pad
    token when it has none."""
    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.model.loading import load_model, load_tokenizer

    model = load_model(spec, device=device)
    tokenizer = load_tokenizer(spec)
    ensure_reasoning_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset

    # TRL passes every column to the reward functions; pass_rate is only the curriculum's.
    return Dataset.from_list([{k: v for k, v in r.items() if k not in ("pass_rate", "samples")} for r in rows])


def plain_lm_head(model, temperature: float) -> None:
    """Replace TRL's fused LM head on `model` (what `fused_lm_head=True` calls) by a plain one: the model's own
    forward, then log-softmax of logits / temperature over the whole vocabulary.

    TRL's GRPO / RLOO patch the policy's forward with a chunked log-prob kernel written for GPUs; on CPU the same
    kernel made up 12 s of a 40 s SFT step where one plain LM-head matmul + log-softmax cost ~1.5 s
    (`train.sft.plain_loss_trainer_class`). Same outputs (log-probs, entropy; test against TRL's kernel); used on
    CPU only, where the full logits of an RL micro-batch fit in memory."""
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    forward = type(model).forward

    def _plain_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels)) if v is not None}
            if num_items_in_batch is not None:
                extra["num_items_in_batch"] = num_items_in_batch
            return forward(self, *args, **kw, **extra)
        kw["use_cache"] = False
        logits = forward(self, *args, **kw).logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        log_probs = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
        entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(_plain_forward, model)


def trainer_class(algorithm: str):
    """TRL's trainer for `algorithm`; for GRPO with a sampler hook: `curriculum_pass_rates` set on the trainer
    (None = seeded random order) replaces TRL's shuffling RepeatSampler by `train.curriculum`'s."""
    if algorithm == "rloo":
        from trl import RLOOTrainer

        return with_local_model_card(RLOOTrainer, "RLOO")
    from trl import GRPOTrainer

    from open_nemotron.train.curriculum import curriculum_sampler_class

    sampler_class = curriculum_sampler_class()

    class CurriculumGRPOTrainer(GRPOTrainer):
        curriculum_pass_rates: list[float] | None = None
        curriculum_sigma: float = 0.15

        def _get_train_sampler(self, dataset=None):
            dataset = self.train_dataset if dataset is None else dataset
            return sampler_class(
                dataset,
                self.curriculum_pass_rates,
                mini_repeat_count=self.num_generations,
                batch_size=self.args.generation_batch_size // self.num_generations,
                repeat_count=self.num_iterations * self.args.steps_per_generation,
                sigma=self.curriculum_sigma,
                seed=self.args.seed,
            )

    return with_local_model_card(CurriculumGRPOTrainer, "GRPO")


def build_trainer(config: RLConfig, callbacks: list | None = None):
    """(trainer, rows) for `run`; also what the tests drive directly."""
    from open_nemotron.rewards.functions import JudgeReward, reward_functions
    from open_nemotron.train.rl_data import load_rows

    rows = load_rows(config.prompts)
    if len(rows) < config.prompts_per_step:
        raise RLError(
            f"rl: {len(rows)} prompts in {config.prompts}: fewer than prompts_per_step = {config.prompts_per_step}"
        )
    rates = None
    if config.algorithm == "grpo" and config.curriculum:
        missing = [r["id"] for r in rows if "pass_rate" not in r]
        if missing:
            raise RLError(
                f"rl: curriculum needs pass rates; {len(missing)} rows lack one (e.g. {missing[0]!r}): run "
                "`open-nemotron rl pass-rate` first and train on its kept.jsonl, or pass --random-order"
            )
        rates = [float(r["pass_rate"]) for r in rows]
    judge = JudgeReward(config.judge_url, config.judge_model) if config.judge_url and config.judge_model else None
    funcs, weights = reward_functions(config.rewards, judge)
    model, tokenizer = load_policy(config.model, config.device)
    tokenizer.padding_side = "left"
    on_gpu = next(model.parameters()).device.type == "cuda"
    common = dict(
        output_dir=config.output_dir,
        num_generations=config.num_generations,
        per_device_train_batch_size=config.num_generations,  # one prompt's group per micro-batch
        gradient_accumulation_steps=config.prompts_per_step,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        beta=config.beta,
        num_iterations=config.num_iterations,
        epsilon=config.epsilon,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup" if config.warmup_ratio else "constant",
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        max_steps=config.max_steps,
        save_steps=config.save_steps,
        logging_steps=config.logging_steps,
        reward_weights=weights,
        seed=config.seed,
        report_to=config.report_to,
        use_cpu=not on_gpu and config.device != "cuda",
        bf16=on_gpu,
        use_vllm=config.use_vllm,
        disable_tqdm=False,
        save_only_model=False,
    )
    if config.use_vllm:
        common["vllm_mode"] = "colocate"
    if config.algorithm == "rloo":
        from trl import RLOOConfig

        args = RLOOConfig(**common)
    else:
        from trl import GRPOConfig

        args = GRPOConfig(**common, shuffle_dataset=False)
    cls = trainer_class(config.algorithm)
    trainer = cls(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=_dataset(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if not on_gpu:
        for m in (trainer.model, getattr(trainer, "ref_model", None)):
            if m is not None:
                plain_lm_head(m, config.temperature)
    if config.algorithm == "grpo":
        trainer.curriculum_pass_rates = rates
        trainer.curriculum_sigma = config.curriculum_sigma
    return trainer, rows


def run(config: RLConfig) -> dict[str, Any]:
    from open_nemotron.train.sft import train_resuming

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer, rows = build_trainer(config)
    resume, seconds = train_resuming(trainer, out)
    final = out / "final"
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))
    history = [dict(h) for h in trainer.state.log_history]
    result = {
        "config": asdict(config),
        "prompts": len(rows),
        "steps": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "train_seconds": seconds,
        "log_history": history,
        "final_model": str(final),
    }
    atomic_write_text(out / "rl.json", json.dumps(result, indent=1, default=str))
    plot_curves(history, out / "rl_curves.png", title=f"{config.algorithm.upper()}: {config.model}")
    atomic_write_text(out / "rl_report.md", render_markdown(result))
    return result


def log_series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged key in a Trainer log history, NaNs left out."""
    points = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))]
    points = [(s, v) for s, v in points if not math.isnan(v)]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Rewards (total and per function), completion length and KL against steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward_keys = ["reward"] + sorted(
        {k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")}
    )
    panels = [("reward", reward_keys), ("completion length (tokens)", ["completions/mean_length"]), ("KL", ["kl"])]
    panels = [(name, [k for k in keys if log_series(history, k)[0]]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = log_series(history, key)
            ax.plot(steps, values, label=key.replace("rewards/", "").replace("/mean", ""), linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from open_nemotron.utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def render_markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    history = result["log_history"]
    first = next((h for h in history if "reward" in h), {})
    last = next((h for h in reversed(history) if "reward" in h), {})
    rows = []
    for key in ["reward"] + sorted(k for k in last if k.startswith("rewards/") and k.endswith("/mean")):
        if key in first:  # TRL logs None for a reward that applied to no row of that step
            cells = ("—" if v is None else f"{v:.3f}" for v in (first[key], last.get(key)))
            rows.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(
        [
            f"# {c['algorithm'].upper()}: {c['model']}",
            "",
            f"{result['steps']} steps on {result['prompts']} prompts from `{c['prompts']}` in "
            f"{result['train_seconds']:.0f} s; {c['prompts_per_step']} prompts x {c['num_generations']} samples per "
            f"step (temperature {c['temperature']}, top-p {c['top_p']}), β {c['beta']}, LR {c['learning_rate']}, "
            f"rewards {c['rewards']}"
            + (f", curriculum σ {c['curriculum_sigma']}" if c["algorithm"] == "grpo" and c["curriculum"] else "")
            + ".",
            "",
            "| training reward | first step | last step |",
            "|---|---:|---:|",
            *rows,
            "",
            "![curves](rl_curves.png)",
            "",
            "Training rewards are on the training prompts; held-out accuracy comes from `open-nemotron eval`.",
            "",
        ]
    )
