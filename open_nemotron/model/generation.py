"""A lean decode loop for our model: static KV cache, no logits-processor machinery, same results as `generate`.

Batch-1 decode on a CPU is bound by streaming the weights once per token; everything else is overhead that
`transformers`' general `generate` pays per step (cache objects, mask building, processor lists, stopping
criteria). This loop keeps only what plain greedy / temperature / top-k / top-p sampling (and a streamer) needs:

- a preallocated K/V buffer per attention layer, each with that layer's own KV-head count (layers without
  attention have none), so a step writes one column instead of concatenating;
- no attention mask at all unless the batch is left-padded;
- sampling steps identical to transformers' (temperature, then top-k, then top-p, then multinomial), so
  `do_sample=False` gives the same tokens as `GenerationMixin.generate` and tests check it.

`DeciLMForCausalLM.generate` routes plain requests here and everything else to transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers.generation.streamers import BaseStreamer


class StaticKVCache:
    """Preallocated keys/values for every GQA layer, [batch, kv_heads, max_length, head_dim] each.

    Implements the two methods our attention uses (`update`, `get_seq_length`) with transformers' `Cache`
    semantics: `update` appends this step's keys/values for a layer and returns everything cached so far.
    """

    def __init__(self, config, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device) -> None:
        blocks = config.layers_blocks()
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * len(blocks)
        self.values: list[torch.Tensor | None] = [None] * len(blocks)
        self.lengths = [0] * len(blocks)
        for i, b in enumerate(blocks):
            if b.attention.has_kv_cache:
                shape = (batch_size, b.attention.num_key_value_heads, max_length, config.head_dim)
                self.keys[i] = torch.empty(shape, dtype=dtype, device=device)
                self.values[i] = torch.empty(shape, dtype=dtype, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"StaticKVCache holds {self.max_length} positions: cannot append up to {end}")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, start:end].copy_(key)
        v[:, :, start:end].copy_(value)
        self.lengths[layer_idx] = end
        if start == 0:
            return key, value  # prefill: attend over the fresh contiguous tensors rather than buffer views
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """transformers' warpers in transformers' order: temperature, top-k, top-p (keeping at least one token)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def select_tokens(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = process_logits(logits.float(), temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


@torch.inference_mode()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer: BaseStreamer | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` for a (left-padded) batch; returns prompt + new tokens like `generate`.

    Rows that emit an EOS token are filled with `pad_token_id` afterwards; the loop stops when all rows are done.
    A `streamer` is called as transformers calls it: `put(prompt ids)`, `put(new tokens)` once per step (on the CPU,
    which waits for the device), then `end()`.
    The weights stay in the layout they have (`decode_layout.set_decode_layout` chooses one explicitly).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: expected at least 1")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_ids = torch.tensor(eos, device=device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    padded = attention_mask is not None and not bool(attention_mask.all())
    total = prompt_len + max_new_tokens

    dtype = next(model.parameters()).dtype
    cache = StaticKVCache(model.config, batch, total, dtype, device)
    out = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)
    out[:, :prompt_len] = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if padded:
        full_mask = torch.ones((batch, total), dtype=attention_mask.dtype, device=device)
        full_mask[:, :prompt_len] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    else:
        full_mask = None
        position_ids = torch.arange(prompt_len, device=device)[None].expand(batch, -1)

    logits = model(
        input_ids,
        attention_mask=full_mask[:, :prompt_len] if padded else None,
        position_ids=position_ids,
        past_key_values=cache,
        logits_to_keep=1,
    ).logits[:, -1]
    next_position = position_ids[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    length = prompt_len
    for step in range(max_new_tokens):
        if step < min_new_tokens and eos:
            logits[:, eos_ids] = float("-inf")
        token = select_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        if eos:
            token = token.masked_fill(finished, pad_token_id)
            finished |= torch.isin(token, eos_ids)
        out[:, length] = token
        length += 1
        if streamer is not None:
            streamer.put(token.cpu())
        if step == max_new_tokens - 1 or (eos and bool(finished.all())):
            break
        logits = model(
            token[:, None],
            attention_mask=full_mask[:, :length] if padded else None,
            position_ids=next_position,
            past_key_values=cache,
        ).logits[:, -1]
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return out[:, :length]


# What the lean loop reads from a GenerationConfig, and transformers' documented default for each (used where
# neither the call nor the model's generation_config sets it: e.g. sampling keeps the 50 likeliest tokens).
_FAST_DEFAULTS = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "num_return_sequences": 1,
    "use_cache": True,
    "cache_implementation": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
# Fields that never change the tokens, and the neutral values of fields that would; any other field set to any
# other value (beams, penalties, dict outputs, ...) sends the call to transformers' implementation.
_IGNORED_FIELDS = {"transformers_version", "disable_compile", "compile_config"}
_NEUTRAL = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "typical_p": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "diversity_penalty": 0.0,
    "early_stopping": False,
}
# generate() arguments that only transformers' implementation handles.
_SLOW_ARGUMENTS = {
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "cache",
    "past_key_values",
    "inputs_embeds",
    "generator",
}


def merged_generation_config(model, generation_config, kwargs: dict):
    """(config, leftover kwargs) as `generate` resolves them: the call's kwargs over the given config, over the
    model's `generation_config` for fields the given one leaves unset. Public GenerationConfig API only."""
    from transformers import GenerationConfig

    config = copy.deepcopy(generation_config if generation_config is not None else GenerationConfig())
    own = model.generation_config.to_dict()
    for key, value in config.to_dict().items():
        if value is None and own.get(key) is not None:
            setattr(config, key, own[key])
    leftover = config.update(**kwargs)
    return config, leftover


def plain_decode_request(model, inputs, generation_config, kwargs: dict) -> dict | None:
    """Arguments for `decode` if this `generate` call is plain greedy/sampling on token ids, else None."""
    if any(kwargs.get(name) is not None for name in _SLOW_ARGUMENTS):
        return None
    kwargs = dict(kwargs)
    streamer = kwargs.pop("streamer", None)
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    attention_mask = kwargs.pop("attention_mask", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        return None
    config, leftover = merged_generation_config(model, generation_config, kwargs)
    if leftover:
        return None  # model inputs such as position_ids: transformers passes them to forward
    fields = config.to_dict()
    for key, value in fields.items():
        if key in _FAST_DEFAULTS or key in _IGNORED_FIELDS or key.startswith("_"):
            continue
        if value is not None and value is not False and value != _NEUTRAL.get(key):
            return None
    get = {
        key: (fields.get(key) if fields.get(key) is not None else default) for key, default in _FAST_DEFAULTS.items()
    }
    if get["use_cache"] is False or get["cache_implementation"] not in (None, "dynamic", "static"):
        return None
    prompt_len = input_ids.shape[1]
    max_new = get["max_new_tokens"] if get["max_new_tokens"] is not None else get["max_length"] - prompt_len
    min_new = get["min_new_tokens"] or max(0, get["min_length"] - prompt_len)
    if max_new < 1:
        return None  # let transformers report it
    repeats = get["num_return_sequences"]
    if repeats > 1:
        input_ids = input_ids.repeat_interleave(repeats, dim=0)
        attention_mask = attention_mask.repeat_interleave(repeats, dim=0) if attention_mask is not None else None
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": max_new,
        "min_new_tokens": min_new,
        "do_sample": bool(get["do_sample"]),
        "temperature": get["temperature"],
        "top_k": get["top_k"],
        "top_p": get["top_p"],
        "eos_token_id": get["eos_token_id"],
        "pad_token_id": get["pad_token_id"],
        "streamer": streamer,
    }
