"""Registration of the nemotron-nas model with the transformers Auto classes (no trust_remote_code needed)."""

from __future__ import annotations


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from open_nemotron.model.configuration import DeciLMConfig
    from open_nemotron.model.modeling import DeciLMForCausalLM, DeciLMModel

    if DeciLMConfig.model_type in CONFIG_MAPPING:  # idempotent: importing twice must not raise
        return
    AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig)
    AutoModel.register(DeciLMConfig, DeciLMModel)
    AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM)
