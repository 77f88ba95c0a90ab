"""FFN Fusion: block-dependency analysis and fusing runs of attention-free layers into wider SwiGLUs."""

from open_nemotron.fusion.fuse import FusionError, FusionPlan, attention_free_runs, fuse, plan_fusion, remove_ffns

__all__ = ["FusionError", "FusionPlan", "attention_free_runs", "fuse", "plan_fusion", "remove_ffns"]
