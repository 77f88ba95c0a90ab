"""Measured costs of every variant in the search space (paper-digest §1.4), on the device running the command.

Runtime: each variant is timed as a *probe*: `probe_layers` decoder layers holding only that sub-block (the other
half no-op), with their own weights so that they stream from memory as in a real model, in the layout our decode
loop uses at that batch size (`prepare_for_decode`). Decode = one new token per row over a KV cache of
``prompt_len + gen_len // 2`` tokens (the mean context of the scenario); prefill = ``prompt_len`` tokens per row.
Variants are timed round-robin, `repeats` times, and the median is kept, so machine drift hits them all alike.

Fixed costs: everything outside the layers (embedding, final norm, LM head, sampling, the loop's own overhead) is
the parent's measured decode step (our `generate`, as `bench-speed` times it) minus the sum of its blocks' probe
times. A child's predicted step is then fixed + the sum of its blocks: what `bench-speed` will measure.

Memory: parameter bytes per variant (its norm included) and KV-cache bytes per token; fixed parameter bytes
(embeddings, LM head if untied, final norm). Artifact ``costs.json`` (schema in docs/puzzle.md).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from open_nemotron.evaluate.hardware import describe_device, synchronize
from open_nemotron.puzzle.config import CostsConfig
from open_nemotron.puzzle.search_space import (
    ATTENTION,
    SearchSpace,
    Variant,
    attention_variant,
    child_block_configs,
    config_with_blocks,
    ffn_variant,
)


def probe_model(parent_config, variant: Variant, layers: int, device: torch.device, dtype: torch.dtype):
    """A small DeciLM whose every layer is `variant` plus a no-op other half (tiny vocabulary: only layers run)."""
    from open_nemotron.model.configuration import AttentionBlock, FFNBlock
    from open_nemotron.model.modeling import DeciLMForCausalLM

    attention = variant if variant.part == ATTENTION else attention_variant(AttentionBlock("no_op"))
    ffn = variant if variant.part != ATTENTION else ffn_variant(FFNBlock("no_op"))
    blocks = child_block_configs(parent_config, [attention] * layers, [ffn] * layers)
    config = config_with_blocks(parent_config, blocks, num_hidden_layers=layers, vocab_size=128)
    with torch.device(device):
        model = DeciLMForCausalLM(config).to(dtype).eval()
    return model


def _time(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class VariantProbe:
    """Timing closures for one variant at one batch size."""

    def __init__(self, parent_config, variant: Variant, config: CostsConfig, batch: int, device, dtype) -> None:
        from open_nemotron.model.decode_layout import prepare_for_decode
        from open_nemotron.model.generation import StaticKVCache

        self.model = probe_model(parent_config, variant, config.probe_layers, device, dtype)
        prepare_for_decode(self.model, batch)
        self.layers = self.model.model.layers
        hidden = parent_config.hidden_size
        self.context = config.prompt_len + config.gen_len // 2
        gen = torch.Generator().manual_seed(0)
        self.step_input = torch.randn(batch, 1, hidden, generator=gen).to(device=device, dtype=dtype)
        self.prompt_input = torch.randn(batch, config.prompt_len, hidden, generator=gen).to(device=device, dtype=dtype)
        self.cache = StaticKVCache(self.model.config, batch, self.context + 1, dtype, device)
        for i, k in enumerate(self.cache.keys):
            if k is not None:
                k.normal_()
                self.cache.values[i].normal_()
        rotary = self.model.model.rotary_emb
        cos, sin = rotary(self.step_input, torch.tensor([[self.context]], device=device))
        self.step_rope = (cos.unsqueeze(1), sin.unsqueeze(1))
        cos, sin = rotary(self.prompt_input, torch.arange(config.prompt_len, device=device)[None])
        self.prompt_rope = (cos.unsqueeze(1), sin.unsqueeze(1))
        self.prompt_cache = StaticKVCache(self.model.config, batch, config.prompt_len, dtype, device)

    @torch.inference_mode()
    def decode(self) -> None:
        self.cache.lengths = [self.context] * len(self.cache.lengths)
        cos, sin = self.step_rope
        for layer in self.layers:
            layer(self.step_input, cos, sin, None, False, self.cache)

    @torch.inference_mode()
    def prefill(self) -> None:
        self.prompt_cache.lengths = [0] * len(self.prompt_cache.lengths)
        cos, sin = self.prompt_rope
        for layer in self.layers:
            layer(self.prompt_input, cos, sin, None, True, self.prompt_cache)


def half_params(parent_config, variant: Variant) -> int:
    h = parent_config.hidden_size
    bias_attn = bool(getattr(parent_config, "attention_bias", False))
    bias_mlp = bool(getattr(parent_config, "mlp_bias", False))
    if variant.kind == "no_op":
        return 0
    if variant.part == ATTENTION:
        if variant.kind == "linear":
            return h + h * h
        q = parent_config.num_attention_heads * parent_config.head_dim
        kv = variant.size * parent_config.head_dim
        return h + h * (q + 2 * kv) + q * h + (q + 2 * kv + h if bias_attn else 0)
    if variant.kind == "linear":
        return h + h * h
    i = variant.size
    return h + 3 * h * i + (2 * i + h if bias_mlp else 0)


def kv_bytes_per_token(parent_config, variant: Variant, element_size: int) -> int:
    if variant.part == ATTENTION and variant.kind == "gqa":
        return 2 * variant.size * parent_config.head_dim * element_size
    return 0


def parent_blocks_sum(space: SearchSpace, variants: dict[str, Any], cost) -> float:
    """`cost(entry)` summed over the parent's own attention and FFN in every layer."""
    return sum(
        cost(variants[space.attention[i][0].name]) + cost(variants[space.ffn[i][0].name])
        for i in range(space.num_layers)
    )


def measure_costs(parent_model, space: SearchSpace, config: CostsConfig, progress: bool = True) -> dict[str, Any]:
    """Time every distinct variant and the parent; returns the ``costs.json`` content."""
    from rich.progress import Progress

    from open_nemotron.evaluate.throughput import random_prompt, timed_generate
    from open_nemotron.model.decode_layout import prepare_for_decode

    device = parent_model.model.embed_tokens.weight.device
    dtype = parent_model.model.embed_tokens.weight.dtype
    element = torch.empty((), dtype=dtype).element_size()
    pc = parent_model.config
    variants: dict[str, Variant] = {}
    for part_lists in (space.attention, space.ffn):
        for layer in part_lists:
            for v in layer:
                variants.setdefault(v.name, v)
    timed = [v for v in variants.values() if v.kind != "no_op"]
    started = time.perf_counter()
    out_variants: dict[str, Any] = {
        name: {
            "part": v.part,
            "params": half_params(pc, v),
            "params_bytes": half_params(pc, v) * element,
            "kv_bytes_per_token": kv_bytes_per_token(pc, v, element),
            "decode_s": {},
            "prefill_s": {},
        }
        for name, v in variants.items()
    }
    fixed: dict[str, Any] = {"decode_s": {}, "prefill_s": {}, "parent_decode_step_s": {}, "parent_prefill_s": {}}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("costs", total=len(config.batch_sizes) * (config.repeats * (len(timed) + 1)))
        for b in config.batch_sizes:
            probes = {v.name: VariantProbe(pc, v, config, b, device, dtype) for v in timed}
            samples: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in probes}
            prompt = random_prompt(b, config.prompt_len, pc.vocab_size, 0, device)
            prepare_for_decode(parent_model, b)
            timed_generate(parent_model, prompt, 4, device)  # warm-up
            parent_steps, parent_prefills = [], []
            for probe in probes.values():
                probe.decode()
                probe.prefill()
            for _ in range(config.repeats):
                for name, probe in probes.items():
                    samples[name]["decode"].append(_time(probe.decode, device) / config.probe_layers)
                    samples[name]["prefill"].append(_time(probe.prefill, device) / config.probe_layers)
                    bar.advance(task)
                first = timed_generate(parent_model, prompt, 1, device)
                total = timed_generate(parent_model, prompt, config.gen_len, device)
                parent_prefills.append(first)
                parent_steps.append((total - first) / (config.gen_len - 1))
                bar.advance(task)
            for name in probes:
                out_variants[name]["decode_s"][str(b)] = statistics.median(samples[name]["decode"])
                out_variants[name]["prefill_s"][str(b)] = statistics.median(samples[name]["prefill"])
            for name, v in variants.items():
                if v.kind == "no_op":
                    out_variants[name]["decode_s"][str(b)] = 0.0
                    out_variants[name]["prefill_s"][str(b)] = 0.0
            step = statistics.median(parent_steps)
            prefill = statistics.median(parent_prefills)
            blocks_decode = parent_blocks_sum(space, out_variants, lambda c, b=b: c["decode_s"][str(b)])
            blocks_prefill = parent_blocks_sum(space, out_variants, lambda c, b=b: c["prefill_s"][str(b)])
            fixed["parent_decode_step_s"][str(b)] = step
            fixed["parent_prefill_s"][str(b)] = prefill
            fixed["decode_s"][str(b)] = max(0.0, step - blocks_decode)
            fixed["prefill_s"][str(b)] = max(0.0, prefill - blocks_prefill)
            fixed.setdefault("parent_blocks_decode_s", {})[str(b)] = blocks_decode
            del probes
    total_params = sum(p.numel() for p in {id(p): p for p in parent_model.parameters()}.values())
    layer_params = parent_blocks_sum(space, out_variants, lambda c: c["params"])
    fixed["params"] = total_params - layer_params
    fixed["params_bytes"] = fixed["params"] * element
    return {
        "device": describe_device(device),
        "dtype": str(dtype).removeprefix("torch."),
        "scenario": {
            "batch_sizes": config.batch_sizes,
            "prompt_len": config.prompt_len,
            "gen_len": config.gen_len,
            "decode_context": config.prompt_len + config.gen_len // 2,
            "probe_layers": config.probe_layers,
            "repeats": config.repeats,
        },
        "fixed": fixed,
        "variants": out_variants,
        "seconds": time.perf_counter() - started,
    }
