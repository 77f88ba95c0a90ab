"""How far a child model's next-token distributions are from a reference's: the one KL / top-1 computation.

Puzzle's replace-1-block scores and its assembled children's held-out quality both use `kl_and_top1`.
"""

from __future__ import annotations

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
