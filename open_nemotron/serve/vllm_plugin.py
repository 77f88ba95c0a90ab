"""vLLM general plugin: registers our `nemotron-nas` config class in every vLLM process.

vLLM builds a model's config through `transformers.AutoConfig` and ships no class for `nemotron-nas` (NVIDIA's
checkpoints bring remote code); its model registry already maps `DeciLMForCausalLM` to its own nemotron-nas model.
With open-nemotron installed, vLLM finds this function through the `vllm.general_plugins` entry point in
pyproject.toml and calls it in the API server, the engine core and each worker, so `vllm serve DIR` reads our
checkpoints without `--trust-remote-code`. `VLLM_PLUGINS` filters plugins by name: ours is `open_nemotron`.
"""

from __future__ import annotations


def register() -> None:
    from open_nemotron.model.registration import register_auto_classes

    register_auto_classes()  # idempotent
