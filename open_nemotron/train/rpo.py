"""Reward-aware preference optimisation (RPO, NVIDIA; digest §3.9) on TRL's DPO machinery.

With sequence log-probabilities of the chosen (c) and rejected (l) responses under the policy π and the frozen
reference π_ref, and rewards r_c, r_l of the two:

    Δπ = [log π(c) − log π_ref(c)] − [log π(l) − log π_ref(l)],   Δr = r_c − r_l
    p̂ = σ(β·Δπ)  (the preference the policy implies),   p* = σ(η·Δr)  (the preference the rewards imply)
    bwd_kl = KL(p* ‖ p̂) = p*·(log p* − log p̂) + (1 − p*)·(log(1 − p*) − log(1 − p̂))
    fwd_kl = KL(p̂ ‖ p*)
    sq     = (β·Δπ − η·Δr)²

so the policy's implied margin is pulled towards the reward gap instead of towards "chosen always wins" (DPO's
−log σ(β·Δπ), the limit of bwd_kl as η·Δr → ∞). TRL's `rpo_alpha` option of DPO is a different method of the same
name (DPO plus an NLL term); this module is NVIDIA's.

`RPOTrainer` is TRL's `DPOTrainer` (data preparation, collation, reference model, checkpoints, logging) with the
loss replaced; preference rows carry ``chosen_reward`` and ``rejected_reward`` beside ``prompt`` / ``chosen`` /
``rejected``. The sequence log-probabilities are computed with a plain LM-head forward (TRL's fused, chunked head is
written for GPUs and slow on CPU, see `train.sft.plain_loss_trainer_class`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from open_nemotron.errors import OpenNemotronError
from open_nemotron.train.model_card import with_local_model_card

RPO_VARIANTS = ("bwd_kl", "fwd_kl", "sq")


class RPOError(OpenNemotronError, ValueError):
    """Bad RPO settings or preference rows without rewards."""


def rpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    *,
    beta: float,
    eta: float,
    variant: str = "bwd_kl",
) -> torch.Tensor:
    """Per-pair RPO loss (module docstring); every argument is a [pairs] tensor of sequence sums or rewards."""
    if variant not in RPO_VARIANTS:
        raise RPOError(f"rpo: variant = {variant!r}: expected one of {', '.join(RPO_VARIANTS)}")
    policy_margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    reward_margin = eta * (reward_chosen - reward_rejected)
    if variant == "sq":
        return (policy_margin - reward_margin) ** 2
    # log σ(x) and log(1 − σ(x)) = log σ(−x), in their stable forms.
    log_p_hat, log_q_hat = F.logsigmoid(policy_margin), F.logsigmoid(-policy_margin)
    log_p_star, log_q_star = F.logsigmoid(reward_margin), F.logsigmoid(-reward_margin)
    if variant == "bwd_kl":
        return log_p_star.exp() * (log_p_star - log_p_hat) + log_q_star.exp() * (log_q_star - log_q_hat)
    return log_p_hat.exp() * (log_p_hat - log_p_star) + log_q_hat.exp() * (log_q_hat - log_q_star)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Σ over completion tokens of log π(token | prefix), one value per row (right-padded batches)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logps = torch.gather(torch.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


def rpo_trainer_class():
    """TRL's DPOTrainer with the RPO loss (`rpo_loss`); `rpo_eta` and `rpo_variant` are set on the instance."""
    from trl import DPOTrainer

    class RPOTrainer(DPOTrainer):
        rpo_eta: float = 1.0
        rpo_variant: str = "bwd_kl"

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            for name in ("chosen_reward", "rejected_reward"):
                if name not in self._signature_columns:
                    self._signature_columns.append(name)

        def _compute_loss(self, model, inputs, return_outputs):
            if "chosen_reward" not in inputs:
                raise RPOError("rpo: the batch has no chosen_reward / rejected_reward (preference rows need both)")
            mode = "train" if self.model.training else "eval"
            ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            logps = sequence_logps(model, ids, attn, comp)
            with torch.no_grad():
                ref_logps = sequence_logps(self.ref_model, ids, attn, comp)
            chosen, rejected = logps.chunk(2)
            ref_chosen, ref_rejected = ref_logps.chunk(2)
            r_c = inputs["chosen_reward"].to(chosen.dtype)
            r_l = inputs["rejected_reward"].to(chosen.dtype)
            per_pair = rpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, r_c, r_l,
                beta=self.beta, eta=self.rpo_eta, variant=self.rpo_variant,
            )  # fmt: skip
            margins = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
            self._metrics[mode]["rewards/margins"].append(self.accelerator.gather(margins).mean().item())
            self._metrics[mode]["rewards/accuracies"].append(
                self.accelerator.gather((margins > 0).float()).mean().item()
            )
            self._metrics[mode]["logps/chosen"].append(self.accelerator.gather(chosen.detach()).mean().item())
            self._metrics[mode]["logps/rejected"].append(self.accelerator.gather(rejected.detach()).mean().item())
            loss = per_pair.mean()
            return (loss, None) if return_outputs else loss

    return with_local_model_card(RPOTrainer, "RPO")


def preference_collator(base):
    """Wrap TRL's preference collator so that the rows' rewards reach the loss as tensors."""

    def collate(examples):
        batch = base([{k: v for k, v in e.items() if k not in ("chosen_reward", "rejected_reward")} for e in examples])
        if "chosen_reward" in examples[0]:
            batch["chosen_reward"] = torch.tensor([float(e["chosen_reward"]) for e in examples])
            batch["rejected_reward"] = torch.tensor([float(e["rejected_reward"]) for e in examples])
        return batch

    return collate


# ---------------------------------------------------------------------------------------------------------------
# The stage: offline pairs, or online pairs sampled and scored from RL prompt rows; RPO or TRL's DPO on them

METHODS = ("rpo", "dpo")


@dataclass
class PreferenceConfig:
    model: str
    output_dir: str
    pairs: str | None = None  # offline: jsonl rows prompt / chosen / rejected / chosen_reward / rejected_reward
    prompts: str | None = None  # online: RL prompt rows (`open-nemotron rl prompts`); pairs sampled and scored here
    method: str = "rpo"  # "rpo" (ours) or "dpo" (TRL's DPOTrainer, sigmoid loss): the comparison
    variant: str = "bwd_kl"
    beta: float = 0.1  # KL strength (paper: LN-Nano 3e-2, Super 1e-5)
    eta: float = 1.0  # reward scale (paper: Super 3.0)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    samples: int = 4  # online: responses per prompt; the best and the worst make a pair (ties dropped)
    max_new_tokens: int = 256
    temperature: float = 1.0
    learning_rate: float = 5e-7
    batch_size: int = 4
    max_steps: int = 50
    save_steps: int = 10
    max_length: int = 512
    seed: int = 0
    report_to: str = "none"
    device: str | None = None

    def __post_init__(self) -> None:
        if (self.pairs is None) == (self.prompts is None):
            raise RPOError("rpo: give exactly one of pairs (offline) and prompts (online)")
        if self.method not in METHODS:
            raise RPOError(f"rpo: method = {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.variant not in RPO_VARIANTS:
            raise RPOError(f"rpo: variant = {self.variant!r}: expected one of {', '.join(RPO_VARIANTS)}")
        for name in ("samples", "max_new_tokens", "batch_size", "max_steps", "save_steps", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RPOError(f"rpo: {name} = {value!r}: expected a positive integer")
        if self.samples < 2 and self.prompts is not None:
            raise RPOError(f"rpo: samples = {self.samples}: online pairs need at least 2 responses per prompt")
        for name in ("beta", "eta", "learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise RPOError(f"rpo: {name} = {getattr(self, name)!r}: expected a positive number")


PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise RPOError(f"{path}: no such preference file")
    from open_nemotron.utils import jsonl_rows

    rows = []
    for where, row in jsonl_rows(path, RPOError):
        missing = [c for c in PAIR_COLUMNS if c not in row]
        if missing:
            raise RPOError(f"{where}: missing {', '.join(missing)}; expected the columns {PAIR_COLUMNS}")
        rows.append({c: row[c] for c in PAIR_COLUMNS})
    if not rows:
        raise RPOError(f"{path}: no rows")
    return rows


def online_pairs(model, tokenizer, rows: list[dict[str, Any]], config: PreferenceConfig) -> list[dict[str, Any]]:
    """Sample `config.samples` responses per prompt row, score each with the weighted rewards, pair the best with
    the worst (prompts whose responses all score the same give no pair)."""
    from open_nemotron.rewards.functions import reward_functions
    from open_nemotron.train.rl_data import sample_responses

    funcs, weights = reward_functions(config.rewards)
    repeated, texts = sample_responses(
        model,
        tokenizer,
        rows,
        config.samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=1.0,
        seed_of=lambda _part, thinking: config.seed + int(thinking),
    )
    columns = {k: [r[k] for r in repeated] for k in repeated[0]} if repeated else {}
    prompts = [r["prompt"] for r in repeated]
    scores = [0.0] * len(texts)
    for func, weight in zip(funcs, weights, strict=True):
        for i, value in enumerate(func(prompts, texts, **columns)):
            scores[i] += weight * (value or 0.0)
    pairs = []
    for start in range(0, len(repeated), config.samples):
        group = range(start, start + config.samples)
        best, worst = max(group, key=lambda i: scores[i]), min(group, key=lambda i: scores[i])
        if scores[best] == scores[worst]:
            continue
        pairs.append(
            {
                "prompt": repeated[start]["prompt"],
                "chosen": [{"role": "assistant", "content": texts[best]}],
                "rejected": [{"role": "assistant", "content": texts[worst]}],
                "chosen_reward": scores[best],
                "rejected_reward": scores[worst],
            }
        )
    return pairs


def run(config: PreferenceConfig) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from open_nemotron.train.rl import load_policy
    from open_nemotron.train.rl_data import load_rows, save_rows
    from open_nemotron.train.sft import train_resuming
    from open_nemotron.utils import atomic_write_text

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_policy(config.model, config.device)
    pairs_path = out / "pairs.jsonl"
    if config.pairs is not None:
        pairs = load_pairs(config.pairs)
    elif pairs_path.is_file():  # online pairs of an earlier (killed) run: the same pairs, not new samples
        pairs = load_pairs(pairs_path)
    else:
        pairs = online_pairs(model, tokenizer, load_rows(config.prompts), config)
        if not pairs:
            raise RPOError("rpo: every prompt's samples scored the same: no pairs (more samples or other prompts)")
        save_rows(pairs_path, pairs)
    on_gpu = next(model.parameters()).device.type == "cuda"
    args = DPOConfig(
        output_dir=str(out),
        beta=config.beta,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        max_steps=config.max_steps,
        save_steps=config.save_steps,
        logging_steps=1,
        max_length=config.max_length,
        seed=config.seed,
        report_to=config.report_to,
        use_cpu=not on_gpu,
        bf16=on_gpu,
        lr_scheduler_type="constant",
    )
    dataset = Dataset.from_list(pairs)
    if config.method == "rpo":
        cls = rpo_trainer_class()
        collator = preference_collator(
            DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length)
        )
        trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator)
        trainer.rpo_eta, trainer.rpo_variant = config.eta, config.variant
    else:
        dataset = dataset.remove_columns(["chosen_reward", "rejected_reward"])
        trainer = with_local_model_card(DPOTrainer, "DPO")(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
    resume, seconds = train_resuming(trainer, out)
    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    result = {
        "config": asdict(config),
        "pairs": len(pairs),
        "steps": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "train_seconds": seconds,
        "log_history": [dict(h) for h in trainer.state.log_history],
        "final_model": str(final),
    }
    atomic_write_text(out / "preference.json", json.dumps(result, indent=1, default=str))
    return result
