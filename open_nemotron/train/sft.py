"""`open-nemotron sft`: supervised fine-tuning on reasoning-on / reasoning-off data with TRL's SFTTrainer.

Each row becomes the conversation [system "detailed thinking on|off", user, assistant] rendered with the training
variant of our reasoning template, and the loss covers assistant tokens only (`assistant_only_loss`, the
template's `{% generation %}` markers). Linear warm-up then cosine decay (paper §3.5), optional packing,
an optional on/off mix, checkpoints every `save_steps` and automatic resume from the newest one. Runs on CPU in
fp32 (TRL defaults to bf16 and activation checkpointing, both slow there) and on GPUs in bf16; for several GPUs
launch the same command under `accelerate launch`.

Artifacts in `output_dir`: `checkpoint-*/` (resumable), `final/` (model + tokenizer with the inference template as
default), `sft_log.json` (every logged step), `sft_report.md` and `sft_loss.png`.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.train.model_card import with_local_model_card
from open_nemotron.utils import atomic_write_text


@dataclass
class SFTRunConfig:
    model: str
    data: str  # jsonl of `Example` rows (datagen output) or any source `load_examples` reads
    output_dir: str
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = False
    on_fraction: float | None = None  # share of reasoning-on rows after mixing; None keeps the data's own mix
    seed: int = 0
    save_steps: int = 50
    logging_steps: int = 5
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise OpenNemotronError(f"sft: {name} = {getattr(self, name)}: expected a positive integer")
        if self.learning_rate <= 0:
            raise OpenNemotronError(f"sft: learning_rate = {self.learning_rate}: expected a positive number")
        if not 0 <= self.warmup_ratio < 1:
            raise OpenNemotronError(f"sft: warmup_ratio = {self.warmup_ratio}: expected a number in [0, 1)")
        if self.on_fraction is not None and not 0 < self.on_fraction < 1:
            raise OpenNemotronError(f"sft: on_fraction = {self.on_fraction}: expected a number in (0, 1) or none")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise OpenNemotronError(f"sft: epochs = {self.epochs}: expected a positive number (or max_steps > 0)")


def mix_on_off(examples: list, on_fraction: float | None, seed: int) -> list:
    """Downsample the larger of the on/off groups so that on-rows make up `on_fraction` (deterministic)."""
    if on_fraction is None:
        return list(examples)
    on = [e for e in examples if e.reasoning == "on"]
    off = [e for e in examples if e.reasoning == "off"]
    if not on or not off:
        raise OpenNemotronError(
            f"sft: on_fraction = {on_fraction} needs both modes; the data has {len(on)} on and {len(off)} off rows"
        )
    rng = random.Random(seed)
    if len(on) / (len(on) + len(off)) > on_fraction:
        on = rng.sample(on, max(1, round(len(off) * on_fraction / (1 - on_fraction))))
    else:
        off = rng.sample(off, max(1, round(len(on) * (1 - on_fraction) / on_fraction)))
    mixed = on + off
    rng.shuffle(mixed)
    return mixed


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def train_resuming(trainer, output_dir: Path) -> tuple[Path | None, float]:
    """`trainer.train()`, resumed from the newest complete checkpoint in `output_dir` if there is one;
    returns (that checkpoint or None, seconds spent training in this call).

    A checkpoint already at `max_steps` (a run killed after its last save, or rerun when finished) is loaded, not
    trained on: transformers would otherwise take one more optimiser step past `max_steps`."""
    from transformers import TrainerState

    resume = latest_checkpoint(output_dir)
    start = time.perf_counter()
    if resume is not None and trainer.args.max_steps > 0:
        state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        if state.global_step >= trainer.args.max_steps:
            trainer._load_from_checkpoint(str(resume))  # the weights (sharded, tied, adapters) as Trainer loads them
            trainer.state = state
            return resume, 0.0
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return resume, time.perf_counter() - start


def plain_loss_trainer_class():
    """SFTTrainer computing the loss from the model's own logits.

    TRL 1.x computes the SFT loss with a fused, chunked LM-head kernel written for GPUs (Triton there, torch tiles
    elsewhere). On CPU those tiles made up 12 s of a 40 s step for SmolLM2-135M at 4 x 512 tokens, where one plain
    LM-head matmul + cross-entropy costs ~1.5 s. This subclass takes the plain path and logs the same metrics
    (entropy, mean_token_accuracy, num_tokens). Used on CPU only: on GPUs the fused kernel saves memory.
    """
    import torch
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            with torch.no_grad():
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                logits = outputs.logits[:, :-1][mask].float()
                n_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
                log_probs = torch.log_softmax(logits, dim=-1)
                entropy = -(log_probs.exp() * log_probs).sum()
                correct = (logits.argmax(-1) == labels[mask]).sum()
                entropy = self.accelerator.gather_for_metrics(entropy).sum()
                correct = self.accelerator.gather_for_metrics(correct).sum()
                self._metrics[mode]["entropy"].append((entropy / n_valid).item() if n_valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append((correct / n_valid).item() if n_valid > 0 else 0.0)
            if mode == "train":
                # As TRL counts them: padded batches by attention mask, padding-free (packed) ones by length.
                if "attention_mask" in inputs:
                    local = inputs["attention_mask"].sum()
                else:
                    local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return PlainLossSFTTrainer


def build_trainer(config: SFTRunConfig, callbacks: list | None = None) -> tuple[Any, Any, list, Any]:
    """The trainer `run` trains: ``(trainer, tokenizer, examples, row_report)``.

    `tokenizer` has the inference template as default (what `final/` gets); the trainer's own tokenizer has the
    training template as default. `callbacks` are extra `transformers.TrainerCallback`s.
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from open_nemotron.data.schema import load_examples, to_messages
    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.model.chat_template import TRAINING_TEMPLATE_NAME
    from open_nemotron.model.loading import default_device, load_model, load_tokenizer

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples, report = load_examples(config.data)
    if not examples:
        raise OpenNemotronError(f"sft: {config.data} has no usable rows ({report.dropped or 'empty'})")
    examples = mix_on_off(examples, config.on_fraction, config.seed)
    dataset = Dataset.from_list([{"messages": to_messages(e)} for e in examples])
    device = torch.device(config.device) if config.device else default_device()
    model = load_model(config.model, device=device).train()
    tokenizer = load_tokenizer(config.model)
    ensure_reasoning_template(tokenizer)
    # TRL checks the *default* template for {% generation %} markers: train with the training variant as default.
    train_tokenizer = copy.deepcopy(tokenizer)
    train_tokenizer.chat_template = tokenizer.chat_template[TRAINING_TEMPLATE_NAME]

    on_gpu = device.type == "cuda"
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        seed=config.seed,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=False,  # TRL turns it on by default; slow on CPU
        max_length=config.max_length,
        packing=config.packing,
        assistant_only_loss=True,
        dataloader_num_workers=0,
    )
    trainer_class = with_local_model_card(SFTTrainer if on_gpu else plain_loss_trainer_class(), "SFT")
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, processing_class=train_tokenizer, callbacks=callbacks
    )
    # TRL drops rows whose assistant tokens were all truncated away; with none left it would fail deep in torch.
    if len(trainer.train_dataset) == 0:
        raise OpenNemotronError(
            f"sft: max_length = {config.max_length} tokens cuts off the answer of every one of the {len(examples)} "
            "rows: expected a larger --max-length"
        )
    return trainer, tokenizer, examples, report


def run(config: SFTRunConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train; returns the artifact paths and final metrics (also in `sft_report.md` / `sft_log.json`).

    `callbacks`: extra `transformers.TrainerCallback`s (tests use one to kill a run after a checkpoint).
    """
    trainer, tokenizer, examples, report = build_trainer(config, callbacks)
    out = Path(config.output_dir)
    resume, seconds = train_resuming(trainer, out)

    final = out / "final"
    trainer.model.eval()
    trainer.model.save_pretrained(final)
    tokenizer.save_pretrained(final)  # inference template as default, training template beside it
    history = trainer.state.log_history
    atomic_write_text(out / "sft_log.json", json.dumps(history, indent=1))
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    summary = {
        "config": asdict(config),
        "rows": len(examples),
        "rows_on": sum(e.reasoning == "on" for e in examples),
        "rows_dropped": report.dropped,
        "steps": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "train_seconds": seconds,
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "final_model": str(final),
    }
    atomic_write_text(out / "sft_summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "sft_report.md", _report_markdown(summary))
    _plot_loss(losses, out / "sft_loss.png")
    return summary


def _report_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    return "\n".join(
        [
            "# SFT report",
            "",
            f"Model `{cfg['model']}` on `{cfg['data']}`: {summary['rows']} rows ({summary['rows_on']} reasoning on), "
            f"{summary['steps']} steps of {cfg['batch_size']}x{cfg['grad_accum']} at peak LR {cfg['learning_rate']} "
            f"(warm-up {cfg['warmup_ratio']:.0%}, cosine), max length {cfg['max_length']}, packing {cfg['packing']}.",
            "",
            f"Loss {summary['first_loss']} -> {summary['last_loss']} in {summary['train_seconds']:.0f} s"
            + (f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else "")
            + ".",
            "",
            f"Final model: `{summary['final_model']}`. Loss curve: `sft_loss.png`.",
            "",
        ]
    )


def _plot_loss(losses: list[tuple[int, float]], path: Path) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
