"""Assembly: build the chosen child from the block library in our nemotron-nas format, and measure it.

The child's embeddings, final norm and LM head are the parent's; each layer takes its attention and FFN halves from
the parent (parent variants) or the library (trained variants); no-op halves have no tensors at all (vLLM refuses
extra keys for them). The directory is written atomically with the parent's tokenizer. Quality against the parent
on the reporting calibration tokens (held out from every decision): mean KL(parent || child) per token and next-token
top-1 agreement.
"""

from __future__ import annotations

from pathlib import Path

import torch

from open_nemotron.evaluate.divergence import heldout_agreement  # noqa: F401  (the pipeline's import)
from open_nemotron.puzzle.scoring import library_layer
from open_nemotron.puzzle.search_space import SearchSpace, Variant, child_block_configs, config_with_blocks


def child_config(parent_config, attention: list[Variant], ffn: list[Variant]):
    return config_with_blocks(parent_config, child_block_configs(parent_config, attention, ffn))


def assemble_child(parent_model, space: SearchSpace, library: Path, attention: list[Variant], ffn: list[Variant]):
    """The child model (same dtype and device as the parent), weights from the parent and the library."""
    from open_nemotron.model.modeling import DeciLMForCausalLM

    config = child_config(parent_model.config, attention, ffn)
    ref = parent_model.model.embed_tokens.weight
    with torch.device("meta"):
        child = DeciLMForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in parent_model.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor
    for i, (a, f) in enumerate(zip(attention, ffn, strict=True)):
        layer = library_layer(parent_model, space, library, i, a, f)
        state.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    child.load_state_dict(state, strict=False, assign=True)
    child.tie_weights()
    missing = [n for n, p in child.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"assembled child lacks weights for {missing[:3]}")
    # Buffers (RoPE frequencies) are recomputed on the real device.
    with torch.device(ref.device):
        child.model.rotary_emb = type(parent_model.model.rotary_emb)(config=config)
    return child.to(device=ref.device, dtype=ref.dtype).eval()
