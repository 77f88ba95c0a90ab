"""The global knowledge-distillation loss of Puzzle (paper Eq. 1, digest §1.7) and the layer alignment it needs.

    L = w_cos · Σ_l (1 − cos(h_student^l, h_teacher^a(l)))  +  w_kl · KL(teacher ‖ student)  +  w_lm · CE(labels)

- h^l: the hidden state after layer l (transformers' `output_hidden_states`, entries 1..L; the last one is after the
  final norm, on both sides alike). The cosine is per token, averaged over the tokens that count; the sum runs over
  the student's layers, each compared with its aligned teacher layer a(l).
- KL(teacher ‖ student) = Σ_v p_v (log p_v − log q_v) per next-token position (p teacher, q student, softmax at
  `temperature`, scaled by temperature² as in Hinton et al. so that gradients keep their size), averaged.
- CE: the usual next-token cross-entropy on the data, off by default (the paper found it hurts).

Alignment: a student with the teacher's layer count aligns layer by layer (Puzzle children keep every layer, no-op
blocks included). A student whose config records `source_layers` (FFN Fusion writes it: for each layer, the
teacher layers it replaces) aligns each layer with the last teacher layer of its run: the fused layer's output
stands for the output of that run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from open_nemotron.errors import OpenNemotronError


class DistillError(OpenNemotronError, ValueError):
    """Distillation settings or models that cannot be used as given."""


def layer_alignment(student_config, teacher_config) -> list[int]:
    """For each student layer, the index of the teacher layer whose output it is compared with."""
    n_student, n_teacher = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    sources = getattr(student_config, "source_layers", None)
    if sources is not None:
        if len(sources) != n_student or any(not s for s in sources):
            raise DistillError(
                f"student config: source_layers has {len(sources)} entries: expected one non-empty list per layer "
                f"({n_student})"
            )
        aligned = [int(s[-1]) for s in sources]
    elif n_student == n_teacher:
        aligned = list(range(n_student))
    else:
        raise DistillError(
            f"the student has {n_student} layers and the teacher {n_teacher}, and the student's config has no "
            "source_layers (written by `open-nemotron fusion fuse`) to align them: expected equal layer counts"
        )
    if any(not 0 <= a < n_teacher for a in aligned) or aligned != sorted(set(aligned)):
        raise DistillError(
            f"student config: source_layers {sources}: expected increasing teacher layers in [0, {n_teacher})"
        )
    return aligned


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions (values [batch, seq]) where mask is true (all positions without a mask)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def hidden_cosine_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    alignment: Sequence[int],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_l mean over tokens of (1 − cos(student_hidden[l], teacher_hidden[alignment[l]])); hidden [batch, seq, dim],
    one per layer output (not the embeddings)."""
    if len(student_hidden) != len(alignment):
        raise DistillError(f"{len(student_hidden)} student hidden states for {len(alignment)} aligned layers")
    total = student_hidden[0].new_zeros(())
    for h_s, a in zip(student_hidden, alignment, strict=True):
        cos = F.cosine_similarity(h_s.float(), teacher_hidden[a].float(), dim=-1, eps=1e-8)
        total = total + _token_mean(1.0 - cos, mask)
    return total


def kl_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on next-token distributions at `temperature` (× temperature²)."""
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return _token_mean(kl, mask) * temperature**2


def lm_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of the student on the data (position t predicts token t + 1)."""
    logits, labels = student_logits[:, :-1].float(), input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return _token_mean(ce.view(labels.shape), None if mask is None else mask[:, 1:] & mask[:, :-1])
