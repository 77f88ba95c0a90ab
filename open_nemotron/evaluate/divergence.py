"""How far a child model's next-token distributions are from a reference's: the one KL / top-1 computation.

Puzzle's replace-1-block scores, its assembled children's held-out quality and distillation's reporting curve all
use `kl_and_top1`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary, in float32 (half-precision logits lose the tail otherwise)."""
    return F.log_softmax(logits.float(), dim=-1)


def kl_and_top1(reference_logp: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (every dimension but the last, the vocabulary): KL(p || q) = Σ_v p_v (log p_v − log q_v) with p
    the reference's and q the model's distribution (both given as log-probabilities), and 1.0 where both put their
    highest probability on the same token (0.0 elsewhere)."""
    if reference_logp.shape != logp.shape:
        raise ValueError(f"log-probabilities of shapes {tuple(reference_logp.shape)} and {tuple(logp.shape)}")
    kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1)
    top1 = (reference_logp.argmax(-1) == logp.argmax(-1)).float()
    return kl, top1


@torch.no_grad()
def reference_log_probs(model, heldout: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The reference model's next-token log-probabilities on the held-out tokens [N, seq], one float32 tensor
    [batch, seq - 1, vocab] per batch of `batch_size` rows, on the CPU: computed once and handed to
    `heldout_agreement` when the same reference is compared with a model many times (distillation's curve)."""
    device = next(model.parameters()).device
    return [
        log_probs(model(heldout[start : start + batch_size].to(device)).logits[:, :-1]).cpu()
        for start in range(0, heldout.shape[0], batch_size)
    ]


@torch.no_grad()
def heldout_agreement(
    parent_model,
    child_model,
    heldout: torch.Tensor,
    batch_size: int = 4,
    parent_logp: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Mean KL(parent || child) per next-token position and top-1 agreement, over the held-out tokens [N, seq]
    (each model on its own device; a child in training mode is measured in eval mode and handed back as it was).
    `parent_logp`: the parent's log-probabilities from `reference_log_probs` on the same tokens and batch size, used
    instead of running the parent again (the same numbers)."""
    batches = range(0, heldout.shape[0], batch_size)
    if parent_logp is not None and len(parent_logp) != len(batches):
        raise ValueError(f"{len(parent_logp)} batches of parent log-probabilities for {len(batches)} batches of tokens")
    parent_device = next(parent_model.parameters()).device if parent_logp is None else None
    child_device = next(child_model.parameters()).device
    was_training = child_model.training
    child_model.eval()
    kl_sum, agree, n = 0.0, 0.0, 0
    for i, start in enumerate(batches):
        ids = heldout[start : start + batch_size]
        if parent_logp is None:
            reference = log_probs(parent_model(ids.to(parent_device)).logits[:, :-1])
        else:
            reference = parent_logp[i]
        child_logp = log_probs(child_model(ids.to(child_device)).logits[:, :-1]).to(reference.device)
        kl, top1 = kl_and_top1(reference, child_logp)
        kl_sum += kl.sum().item()
        agree += top1.sum().item()
        n += kl.numel()
    child_model.train(was_training)
    return {"heldout_kl": kl_sum / n, "top1_agreement": agree / n, "tokens": n}
