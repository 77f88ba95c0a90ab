"""Placeholder replaced by the model implementation."""


def register_auto_classes() -> None:
    return None
