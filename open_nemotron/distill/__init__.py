"""Recovery training for Puzzle / fused children: global knowledge distillation and continued pretraining."""

from open_nemotron.distill.kd import DistillConfig, run
from open_nemotron.distill.losses import DistillError, hidden_cosine_loss, kl_divergence, layer_alignment, lm_loss

__all__ = ["DistillConfig", "DistillError", "hidden_cosine_loss", "kl_divergence", "layer_alignment", "lm_loss", "run"]
