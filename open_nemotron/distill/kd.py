"""`open-nemotron distill`: global knowledge distillation (Puzzle's GKD, digest §1.7) and continued pretraining.

The student (a Puzzle child, a fused child, any causal LM we load) learns to match the teacher (its parent):
``--loss kd`` (default) minimises the cosine loss over aligned layer outputs + KL(teacher ‖ student) on next-token
distributions, LM loss off unless given a weight (`distill/losses.py`); ``--loss lm`` is continued pretraining, plain
next-token cross-entropy on the data, no teacher needed (the paper's LN-Ultra did KD, then CPT).

Built on `transformers.Trainer` (a subclass with this loss): several GPUs under `accelerate launch` / `torchrun`,
gradient accumulation, linear warm-up then cosine decay, a token budget (→ steps), checkpoints every `save_steps`
and automatic resume from the newest one (weights, optimiser, scheduler, RNG and data position: a killed run
continues to the same weights as an uninterrupted one), `report_to` (e.g. tensorboard when installed).

Data (`data`): token windows, split into train / selection / reporting documents by Puzzle's calibration builder —
``parent`` (the teacher's own answers to a fixed prompt set, cached), a local .jsonl / .parquet / .txt, a hub
dataset id (only when cached), or a calibration directory already built (a Puzzle run's `calibration/`: with the
same settings the splits are identical, so the reporting set is the one Puzzle's report used, and no selection
document is ever trained on or reported on). KD trains on `train` only and selects nothing itself. Every
`report_every` steps it measures KL and top-1 agreement to the teacher on two held-out sets: `selection`
("validation": what a user reads to choose a learning rate or a budget) and `reporting` (the result, read by no
choice).

Artifacts in `output_dir`: `checkpoint-*/` (resumable), `final/` (student + tokenizer, our format),
`distill.json` (settings, curve, before/after), `distill_report.md`, `distill_curve.png`, `calibration/` (when
built here).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from open_nemotron.distill.losses import DistillError, hidden_cosine_loss, kl_divergence, layer_alignment, lm_loss
from open_nemotron.utils import atomic_write_text

LOSSES = ("kd", "lm")
# The most memory the teacher's held-out log-probabilities may take to be kept between measurements (float32).
REFERENCE_CACHE_BYTES = 2 * 1024**3


@dataclass
class DistillConfig:
    student: str
    output_dir: str
    teacher: str | None = None  # required for loss "kd"; with "lm" only for the reporting KL / top-1
    loss: str = "kd"  # "kd": cosine + KL (+ lm_weight x LM); "lm": continued pretraining (LM loss only)
    data: str = "parent"  # "parent", a calibration directory, a .jsonl/.parquet/.txt file or a hub dataset id
    text_field: str = "text"
    cosine_weight: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    train_tokens: int = 200_000  # the budget: steps = ceil(train_tokens / tokens per optimiser step)
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_embeddings: bool = False  # the (tied) embeddings / LM head stay the teacher's unless set
    train_sequences: int = 192  # windows built from the train documents (data not a calibration directory)
    reporting_sequences: int = 8
    generate_prompts: int = 80  # data "parent": prompts the teacher answers (cached), new tokens each
    generate_tokens: int = 160
    generate_free_text: int = 0  # data "parent": plain-text documents written on from an opening (cached)
    report_every: int = 10  # steps between reporting-set measurements (also at the start and the end)
    save_steps: int = 20
    logging_steps: int = 5
    seed: int = 0
    device: str | None = None
    report_to: str = "none"  # transformers' report_to: "none", "tensorboard", "wandb", ...

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise DistillError(f"distill: loss = {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.loss == "kd" and not self.teacher:
            raise DistillError("distill: loss 'kd' needs a teacher (--teacher)")
        for name in (
            "train_tokens",
            "batch_size",
            "grad_accum",
            "seq_len",
            "train_sequences",
            "reporting_sequences",
            "report_every",
            "save_steps",
            "logging_steps",
            "generate_prompts",
            "generate_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DistillError(f"distill: {name} = {value!r}: expected a positive integer")
        if not isinstance(self.generate_free_text, int) or self.generate_free_text < 0:
            raise DistillError(f"distill: generate_free_text = {self.generate_free_text!r}: expected an integer >= 0")
        for name in ("cosine_weight", "kl_weight", "lm_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise DistillError(f"distill: {name} = {getattr(self, name)!r}: expected a number >= 0")
        if not self.temperature > 0:
            raise DistillError(f"distill: temperature = {self.temperature!r}: expected a positive number")
        if not self.learning_rate > 0:
            raise DistillError(f"distill: learning_rate = {self.learning_rate!r}: expected a positive number")
        if not 0 <= self.warmup_ratio < 1:
            raise DistillError(f"distill: warmup_ratio = {self.warmup_ratio!r}: expected a number in [0, 1)")
        if self.loss == "kd" and self.cosine_weight + self.kl_weight + self.lm_weight == 0:
            raise DistillError("distill: every loss weight is 0: expected at least one positive weight")

    @property
    def weights(self) -> dict[str, float]:
        """The loss parts and their weights (`lm`: cross-entropy only)."""
        if self.loss == "lm":
            return {"lm": 1.0}
        return {k: w for k, w in (("cos", self.cosine_weight), ("kl", self.kl_weight), ("lm", self.lm_weight)) if w > 0}


def kd_loss_parts(
    student_out,
    teacher_out,
    input_ids: torch.Tensor,
    weights: dict[str, float],
    alignment: list[int] | None,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Each weighted part of the loss, unweighted: "cos", "kl", "lm" (only those in `weights`). The model outputs
    carry `logits` and, for "cos", `hidden_states` (embeddings first, as transformers returns them)."""
    mask = attention_mask.bool() if attention_mask is not None else None
    parts: dict[str, torch.Tensor] = {}
    if "cos" in weights:
        parts["cos"] = hidden_cosine_loss(student_out.hidden_states[1:], teacher_out.hidden_states[1:], alignment, mask)
    if "kl" in weights:
        parts["kl"] = kl_divergence(teacher_out.logits, student_out.logits, mask, temperature)
    if "lm" in weights:
        parts["lm"] = lm_loss(student_out.logits, input_ids, mask)
    return parts


def distill_trainer_class():
    """`transformers.Trainer` with the distillation loss (defined lazily: transformers imports slowly)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args, teacher=None, weights=None, alignment=None, temperature: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.weights = weights
            self.alignment = alignment
            self.temperature = temperature
            # Our loss is a per-token mean: the Trainer divides it by the accumulation steps itself.
            self.model_accepts_loss_kwargs = False
            self._part_sums: dict[str, float] = {}
            self._part_count = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            hidden = "cos" in self.weights
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)
            teacher_out = None
            if "cos" in self.weights or "kl" in self.weights:
                if next(self.teacher.parameters()).device != ids.device:
                    # Under torchrun / accelerate each process trains on its own GPU: the teacher follows once.
                    self.teacher.to(ids.device)
                with torch.no_grad():
                    teacher_out = self.teacher(
                        input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False
                    )
            parts = kd_loss_parts(out, teacher_out, ids, self.weights, self.alignment, self.temperature, mask)
            loss = sum(self.weights[k] * v for k, v in parts.items())
            for k, v in parts.items():
                self._part_sums[k] = self._part_sums.get(k, 0.0) + float(v.detach())
            self._part_count += 1
            return (loss, out) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self._part_count and "loss" in logs:  # the training log: add each part's mean since the last one
                logs.update({f"loss_{k}": v / self._part_count for k, v in self._part_sums.items()})
                self._part_sums, self._part_count = {}, 0
            super().log(logs, start_time)

    return DistillTrainer


def reporting_callback_class():
    from transformers import TrainerCallback

    class ReportingCallback(TrainerCallback):
        """Held-out KL / top-1 to the teacher on the validation (selection) and reporting sets: at step 0, every
        `every` steps and at the end, logged through the trainer (so `log_history`, checkpoints and report_to all
        have them). The teacher does not change, so its log-probabilities on the sets are computed once and kept
        (on the CPU) when they fit in `REFERENCE_CACHE_BYTES`: each later measurement runs the student only."""

        def __init__(self, teacher, sets: dict[str, torch.Tensor], every: int, batch_size: int) -> None:
            self.teacher, self.sets, self.every, self.batch_size = teacher, sets, every, batch_size
            self.trainer = None  # set once the trainer exists
            positions = sum(t.shape[0] * (t.shape[1] - 1) for t in sets.values())
            self.cache_reference = positions * teacher.config.vocab_size * 4 <= REFERENCE_CACHE_BYTES
            self.reference: dict[str, list[torch.Tensor]] = {}

        def _measure(self, state, model) -> None:
            from open_nemotron.evaluate.divergence import heldout_agreement, reference_log_probs

            done = {h["step"] for h in state.log_history if "report_kl" in h}
            if state.global_step in done:
                return
            logs = {}
            for prefix, tokens in self.sets.items():
                if self.cache_reference and prefix not in self.reference:
                    self.reference[prefix] = reference_log_probs(self.teacher, tokens, self.batch_size)
                quality = heldout_agreement(
                    self.teacher, model, tokens, self.batch_size, parent_logp=self.reference.get(prefix)
                )
                logs[f"{prefix}_kl"], logs[f"{prefix}_top1"] = quality["heldout_kl"], quality["top1_agreement"]
            self.trainer.log(logs)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self._measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
                self._measure(state, model)

    return ReportingCallback


def load_data(config: DistillConfig, tokenizer, out: Path, teacher_model=None) -> tuple[dict[str, torch.Tensor], Any]:
    """(token windows {"train", "selection", "reporting"}, calibration metadata) for `config.data`."""
    from open_nemotron.puzzle.calibration import prepare

    if config.data == "parent" and not config.teacher:
        raise DistillError("distill: data 'parent' is the teacher's own text: expected --teacher, or other data")
    tokens, meta = prepare(
        config.data,
        config.teacher or config.student,
        out / "calibration",
        text_field=config.text_field,
        seq_len=config.seq_len,
        train_sequences=config.train_sequences,
        reporting_sequences=config.reporting_sequences,
        generate_prompts=config.generate_prompts,
        generate_tokens=config.generate_tokens,
        generate_free_text=config.generate_free_text,
        seed=config.seed,
        model=teacher_model,
        tokenizer=tokenizer,
    )
    return {name: tokens[name] for name in ("train", "selection", "reporting")}, meta


def _trainable(model, train_embeddings: bool) -> int:
    """Freeze the embeddings (and the LM head tied to them) unless asked; returns the trainable parameter count."""
    if not train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_trainer(config: DistillConfig, callbacks: list | None = None):
    """``(trainer, tokenizer, data, calibration metadata, max_steps)`` for `run`."""
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from open_nemotron.model.loading import default_device, load_model, load_tokenizer

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device) if config.device else default_device()
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one process per GPU (torchrun, accelerate)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    teacher = None
    if config.teacher:
        # A Llama teacher loads into our class: the same hidden-state convention as the student, our fast kernels.
        teacher = load_model(config.teacher, device=device, dtype=dtype, implementation="ours").eval()
        teacher.requires_grad_(False)
    tokenizer = load_tokenizer(config.teacher or config.student)
    data, meta = load_data(config, tokenizer, out, teacher)
    # fp32 master weights (bf16 autocast on GPUs).
    student = load_model(config.student, device=device, dtype=torch.float32, implementation="ours").train()
    alignment = None
    if "cos" in config.weights:
        alignment = layer_alignment(student.config, teacher.config)
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise DistillError(
            f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary {student.config.vocab_size}: "
            "expected the same tokenizer"
        )
    _trainable(student, config.train_embeddings)

    max_steps = max(1, math.ceil(config.train_tokens / _tokens_per_step(config, data)))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to=config.report_to,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not on_gpu,
        bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    dataset = Dataset.from_dict({"input_ids": data["train"].tolist()})
    reporting = None
    if teacher is not None:
        sets = {"validation": data["selection"], "report": data["reporting"]}
        reporting = reporting_callback_class()(teacher, sets, config.report_every, config.batch_size)
    trainer = distill_trainer_class()(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[*(callbacks or []), *([reporting] if reporting else [])],
        teacher=teacher,
        weights=config.weights,
        alignment=alignment,
        temperature=config.temperature,
    )
    if reporting is not None:
        reporting.trainer = trainer
    return trainer, tokenizer, data, meta, max_steps


def run(config: DistillConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Distil (or continue pretraining); returns `distill.json`'s content. `callbacks`: extra
    `transformers.TrainerCallback`s (tests use one to kill a run after a checkpoint)."""
    from open_nemotron.model.loading import save_checkpoint
    from open_nemotron.train.sft import train_resuming

    trainer, tokenizer, data, meta, max_steps = build_trainer(config, callbacks)
    out = Path(config.output_dir)
    resume, seconds = train_resuming(trainer, out)
    per_step = _tokens_per_step(config, data)

    final = out / "final"
    student = trainer.model.eval()
    save_checkpoint(student, tokenizer, final)

    history = trainer.state.log_history
    curve = [
        {
            "step": h["step"],
            "tokens": h["step"] * per_step,
            "kl": h["report_kl"],
            "top1": h["report_top1"],
            "validation_kl": h["validation_kl"],
            "validation_top1": h["validation_top1"],
        }
        for h in history
        if "report_kl" in h
    ]
    train_log = [
        {k: v for k, v in h.items() if k == "step" or k.startswith("loss") or k == "learning_rate"}
        for h in history
        if "loss" in h
    ]
    result = {
        "config": asdict(config),
        "weights": config.weights,
        "steps": trainer.state.global_step,
        "max_steps": max_steps,
        "train_tokens": trainer.state.global_step * per_step,
        "train_windows": int(data["train"].shape[0]),
        "reporting_positions": int(data["reporting"].shape[0] * (data["reporting"].shape[1] - 1)),
        "validation_positions": int(data["selection"].shape[0] * (data["selection"].shape[1] - 1)),
        "calibration": meta,
        "resumed_from": str(resume) if resume else None,
        "train_seconds": seconds,
        "curve": curve,
        "before": curve[0] if curve else None,
        "after": curve[-1] if curve else None,
        "train_log": train_log,
        "final_model": str(final),
    }
    atomic_write_text(out / "distill.json", json.dumps(result, indent=1))
    atomic_write_text(out / "distill_report.md", render_markdown(result))
    if curve:
        plot_curve(curve, out / "distill_curve.png", title=f"{config.student} ← {config.teacher}")
    return result


def _tokens_per_step(config: DistillConfig, data) -> int:
    """Tokens per optimiser step over all processes (the budget's unit)."""
    return config.batch_size * config.grad_accum * int(data["train"].shape[1]) * int(os.environ.get("WORLD_SIZE", "1"))


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Distillation report",
        "",
        f"Student `{cfg['student']}`, teacher `{cfg['teacher']}`, loss {cfg['loss']} "
        f"(weights {', '.join(f'{k} {v:g}' for k, v in result['weights'].items())}), data `{cfg['data']}`.",
        f"{result['steps']} steps of {cfg['batch_size']}x{cfg['grad_accum']} windows "
        f"({result['train_tokens']:,} tokens from {result['train_windows']} training windows), peak LR "
        f"{cfg['learning_rate']:g} (warm-up {cfg['warmup_ratio']:.0%}, cosine), {result['train_seconds']:.0f} s"
        + (f", resumed from {result['resumed_from']}" if result["resumed_from"] else "")
        + ".",
        "",
    ]
    if result["curve"]:
        b, a = result["before"], result["after"]
        lines += [
            f"Held out from training: validation = the selection windows ({result['validation_positions']} "
            "next-token positions; for choosing settings), reporting = the reporting windows "
            f"({result['reporting_positions']} positions; read by no choice).",
            "",
            "| | step | validation KL | reporting KL(teacher ‖ student) | reporting top-1 agreement |",
            "|---|---:|---:|---:|---:|",
            f"| before | {b['step']} | {b['validation_kl']:.4f} | {b['kl']:.4f} | {b['top1']:.4f} |",
            f"| after | {a['step']} | {a['validation_kl']:.4f} | {a['kl']:.4f} | {a['top1']:.4f} |",
            "",
            f"Reporting KL {100 * (1 - a['kl'] / b['kl']):.1f}% lower. Curve: `distill_curve.png`."
            if b["kl"] > 0
            else "",
            "",
        ]
    lines += [f"Final model: `{result['final_model']}`.", ""]
    return "\n".join(lines)


def plot_curve(curve: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    tokens = [c["tokens"] for c in curve]
    ax.plot(tokens, [c["kl"] for c in curve], marker="o", color="tab:blue", label="KL, reporting set")
    if all(c.get("validation_kl") is not None for c in curve):
        ax.plot(
            tokens, [c["validation_kl"] for c in curve], ls="--", color="tab:blue", alpha=0.6, label="KL, validation"
        )
    ax.legend(loc="upper center", fontsize=8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KL(teacher ‖ student), nats / token", color="tab:blue")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(tokens, [c["top1"] for c in curve], marker="s", color="tab:orange")
    twin.set_ylabel("top-1 agreement (reporting set)", color="tab:orange")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
