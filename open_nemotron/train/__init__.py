"""Training stages: SFT (and later GRPO, RLOO, RPO, curriculum)."""
