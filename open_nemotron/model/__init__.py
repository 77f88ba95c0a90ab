"""Heterogeneous Llama (DeciLM / nemotron-nas format), parent loading and the reasoning-toggle chat template."""


def register() -> None:
    """Register the nemotron-nas config and model with the transformers Auto classes (idempotent)."""
    from open_nemotron.model.registration import register_auto_classes

    register_auto_classes()
