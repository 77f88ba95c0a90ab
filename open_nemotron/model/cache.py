"""The KV cache transformers' own generate loop uses with our model, and the cache keyword across releases.

A heterogeneous model has layers that cache nothing (linear or no-op attention). transformers' `DynamicCache(config)`
builds one layer object per entry of `config.layer_types`, and the names it accepts for a layer without KV cache
have changed meaning between releases ("moe" was one). So we build the cache ourselves: a transformers
`DynamicLayer` for every GQA layer and our own `NoKVCacheLayer` elsewhere, and look up sequence lengths on the
first layer that caches anything.

transformers 5.24 renamed the cache keyword of `forward`, `generate` and the model outputs from `past_key_values`
to `cache`. Our model accepts either name (`resolve_cache_argument`) and writes outputs with whichever field the
installed release declares (`CACHE_OUTPUT_FIELD`), so both 5.23 and 5.24 read them.
"""

from __future__ import annotations

import inspect

import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# The installed transformers' name for the cache in model outputs and in generate's model inputs.
CACHE_OUTPUT_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_GENERATE_KWARG = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def resolve_cache_argument(cache, past_key_values):
    """The one cache object a forward call was given under either keyword (passing both is an error)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class NoKVCacheLayer:
    """The cache entry of a layer without attention KV (linear or no-op attention): holds nothing.

    Deliberately not a transformers `CacheLayerMixin`: `Cache` methods skip such layers when they look for a
    sequence length, in every release we support. Every per-layer operation a `Cache` forwards is a no-op.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.is_initialized = True
        self.keys = None
        self.values = None

    def __repr__(self) -> str:
        return "NoKVCacheLayer"

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states is None and value_states is None:
            return None, None
        raise RuntimeError("a layer without attention KV cannot store keys/values")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def crop(self, max_length: int) -> None: ...
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: torch.Tensor) -> None: ...


class DeciLMCache(DynamicCache):
    """A transformers `DynamicCache` with one `DynamicLayer` per GQA layer and a `NoKVCacheLayer` elsewhere."""

    def __init__(self, config) -> None:
        super().__init__()
        self.layers = [
            DynamicLayer() if blocks.attention.has_kv_cache else NoKVCacheLayer() for blocks in config.layers_blocks()
        ]
        self.first_kv_layer = next((i for i, layer in enumerate(self.layers) if isinstance(layer, DynamicLayer)), None)

    def _kv_layer(self, layer_idx: int) -> int | None:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], NoKVCacheLayer):
            return self.first_kv_layer
        return layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        kv_layer = self._kv_layer(layer_idx)
        return 0 if kv_layer is None else super().get_seq_length(kv_layer)
