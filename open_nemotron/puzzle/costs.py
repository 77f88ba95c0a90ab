"""Measured costs of every variant in the search space (paper-digest §1.4), on the device running the command.

Runtime: each variant is timed as a *probe*: `probe_layers` decoder layers holding only that sub-block (the other
half no-op), with their own weights so that they stream from memory as in a real model, in the layout our decode
loop uses at that batch size (`prepare_for_decode`). Decode = one new token per row over a KV cache of
``prompt_len + gen_len // 2`` tokens (the mean context of the scenario); prefill = ``prompt_len`` tokens per row.
Variants are timed round-robin, `repeats` times, and the median is kept, so machine drift hits them all alike.
Probes run through the model's public `run_layers` with a `StaticKVCache`; every timing goes through a `Timer`
(default: wall time between device synchronisations; tests inject a fake one).

Fixed costs: everything outside the layers (embedding, final norm, LM head, sampling, the loop's own overhead) is
the parent's measured decode step (our `generate`, timed as `bench-speed` times it: one call of `gen_len` tokens,
first new token to last through a streamer) minus the sum of its blocks' probe times. A child's predicted step is
then fixed + the sum of its blocks: what `bench-speed` will measure. The residual is kept signed: when the probes
sum to more than the parent's step it is negative (so the parent's prediction still equals its measurement), and
``residual_warnings`` says so; the search then excludes architectures whose predicted step is not positive
(`puzzle.mip`).

Memory: parameter bytes per variant (its norm included) and KV-cache bytes per token; fixed parameter bytes
(embeddings, LM head if untied, final norm). Artifact ``costs.json`` (schema in docs/puzzle.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from open_nemotron.errors import OpenNemotronError
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


class CostsError(OpenNemotronError, RuntimeError):
    """Measurements that cannot make a cost model (e.g. a parent decode step that is not positive)."""


@dataclass(frozen=True)
class Timing:
    """What a timer call measures: a probe's ``decode`` step or ``prefill`` (``variant`` set; the call covers
    `probe_layers` layers), or the parent's ``generate`` of ``new_tokens`` tokens (``variant`` None)."""

    kind: str  # "decode", "prefill" or "generate"
    batch_size: int
    variant: str | None = None
    new_tokens: int | None = None


# A probe's timing is the seconds of one call; the parent's "generate" is (prefill s, decode s) of one call: start to
# first new token, first to last (new_tokens - 1 steps).
Timer = Callable[[Timing, Callable[[], Any], torch.device], float | tuple[float, float]]


def wall_timer(what: Timing, fn: Callable[[], Any], device: torch.device) -> float | tuple[float, float]:
    """The default timer: a probe call's wall time between two device synchronisations; for the parent's
    ``generate``, the (prefill, decode) spans that `fn` measures itself inside its one call (a streamer's token
    times), so decode never comes out of a difference of two noisy calls."""
    if what.kind == "generate":
        prefill, decode = fn()
        return prefill, decode
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class VariantProbe:
    """Timing closures for one variant at one batch size, through the model's `run_layers` and a `StaticKVCache`.

    The decode steps append to one cache, prefilled so that the median of `calls` steps attends over the scenario's
    context (``prompt_len + gen_len // 2``); each prefill gets a fresh cache (allocated outside the timed call).
    """

    def __init__(self, parent_config, variant: Variant, config: CostsConfig, batch: int, device, dtype, calls: int):
        from open_nemotron.model.decode_layout import prepare_for_decode

        self.model = probe_model(parent_config, variant, config.probe_layers, device, dtype)
        prepare_for_decode(self.model, batch)
        self.inner = self.model.model
        self.batch, self.dtype, self.device, self.prompt_len = batch, dtype, device, config.prompt_len
        hidden = parent_config.hidden_size
        context = config.prompt_len + config.gen_len // 2
        gen = torch.Generator().manual_seed(0)
        self.step_input = torch.randn(batch, 1, hidden, generator=gen).to(device=device, dtype=dtype)
        self.prompt_input = torch.randn(batch, config.prompt_len, hidden, generator=gen).to(device=device, dtype=dtype)
        filled = max(1, context - calls // 2)
        self.cache = self._cache(filled + calls)
        with torch.inference_mode():
            history = torch.randn(batch, filled, hidden, generator=gen).to(device=device, dtype=dtype)
            self.inner.run_layers(history, cache=self.cache)
        rotary = self.inner.rotary_emb
        self.step_rope = rotary(self.step_input, torch.tensor([[context]], device=device))
        self.prompt_rope = rotary(self.prompt_input, torch.arange(config.prompt_len, device=device)[None])

    def _cache(self, length: int):
        from open_nemotron.model.generation import StaticKVCache

        return StaticKVCache(self.model.config, self.batch, length, self.dtype, self.device)

    @torch.inference_mode()
    def decode(self) -> None:
        self.inner.run_layers(self.step_input, cache=self.cache, position_embeddings=self.step_rope)

    def prefill_call(self) -> Callable[[], None]:
        """One prefill over a fresh cache (allocated here, outside the timed call)."""
        cache = self._cache(self.prompt_len)

        @torch.inference_mode()
        def prefill() -> None:
            self.inner.run_layers(self.prompt_input, cache=cache, position_embeddings=self.prompt_rope)

        return prefill


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


def residual_warning(what: str, batch: int, measured: float, blocks: float) -> str:
    """The line costs.json and the report carry when the probed blocks sum to more than the parent's measurement."""
    return (
        f"batch {batch}: the parent's probed blocks sum to {blocks * 1e3:.4g} ms, more than its measured {what} "
        f"({measured * 1e3:.4g} ms): the fixed residual is negative ({(measured - blocks) * 1e3:.4g} ms), kept "
        "signed so that the parent's prediction equals its measurement; children much smaller than the parent are "
        "predicted optimistically"
    )


def measure_costs(
    parent_model, space: SearchSpace, config: CostsConfig, progress: bool = True, timer: Timer | None = None
) -> dict[str, Any]:
    """Time every distinct variant and the parent; returns the ``costs.json`` content.

    ``timer(what, fn, device)`` returns the seconds of one probe call of `fn`, or the (prefill, decode) spans of the
    parent's generate (default `wall_timer`); a test passes a fake one to make the costs, and so the search's
    choices, deterministic.
    """
    from open_nemotron.evaluate.throughput import random_prompt, timed_generate, timed_prefill_and_decode
    from open_nemotron.model.decode_layout import prepare_for_decode
    from open_nemotron.progress import StageProgress

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
    fixed: dict[str, Any] = {
        "decode_s": {},
        "prefill_s": {},
        "parent_decode_step_s": {},
        "parent_prefill_s": {},
        "parent_blocks_decode_s": {},
        "parent_blocks_prefill_s": {},
    }
    warnings: list[str] = []
    timer = timer or wall_timer
    calls = config.repeats + 1  # one warm-up step, then the timed ones
    total_steps = len(config.batch_sizes) * (config.repeats * (len(timed) + 1))
    with StageProgress("costs", total_steps, enabled=progress) as bar:
        for b in config.batch_sizes:
            probes = {v.name: VariantProbe(pc, v, config, b, device, dtype, calls) for v in timed}
            samples: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in probes}
            prompt = random_prompt(b, config.prompt_len, pc.vocab_size, 0, device)
            prepare_for_decode(parent_model, b)
            timed_generate(parent_model, prompt, 4, device)  # warm-up
            parent_steps, parent_prefills = [], []
            for probe in probes.values():
                probe.decode()
                probe.prefill_call()()
            for _ in range(config.repeats):
                for name, probe in probes.items():
                    decode = timer(Timing("decode", b, name), probe.decode, device)
                    prefill = timer(Timing("prefill", b, name), probe.prefill_call(), device)
                    samples[name]["decode"].append(decode / config.probe_layers)
                    samples[name]["prefill"].append(prefill / config.probe_layers)
                    bar.advance(f"batch {b}: {name} decode {decode / config.probe_layers * 1e3:.3f} ms per block")
                first, rest = timer(
                    Timing("generate", b, new_tokens=config.gen_len),
                    lambda prompt=prompt: timed_prefill_and_decode(parent_model, prompt, config.gen_len, device),
                    device,
                )
                parent_prefills.append(first)
                parent_steps.append(rest / (config.gen_len - 1))
                bar.advance(f"batch {b}: the parent's step {parent_steps[-1] * 1e3:.2f} ms")
            for name in probes:
                out_variants[name]["decode_s"][str(b)] = statistics.median(samples[name]["decode"])
                out_variants[name]["prefill_s"][str(b)] = statistics.median(samples[name]["prefill"])
            for name, v in variants.items():
                if v.kind == "no_op":
                    out_variants[name]["decode_s"][str(b)] = 0.0
                    out_variants[name]["prefill_s"][str(b)] = 0.0
            step = statistics.median(parent_steps)
            prefill = statistics.median(parent_prefills)
            if not step > 0:
                raise CostsError(
                    f"costs: the parent's measured decode step at batch size {b} is {step:.6g} s: expected a "
                    "positive time (first to last new token of its generate); check the timer"
                )
            blocks_decode = parent_blocks_sum(space, out_variants, lambda c, b=b: c["decode_s"][str(b)])
            blocks_prefill = parent_blocks_sum(space, out_variants, lambda c, b=b: c["prefill_s"][str(b)])
            fixed["parent_decode_step_s"][str(b)] = step
            fixed["parent_prefill_s"][str(b)] = prefill
            # Signed residuals: fixed + the parent's blocks = the parent's measured step, even when the probes sum to
            # more than the step (then the residual is negative and flagged in `residual_warnings`).
            fixed["decode_s"][str(b)] = step - blocks_decode
            fixed["prefill_s"][str(b)] = prefill - blocks_prefill
            fixed["parent_blocks_decode_s"][str(b)] = blocks_decode
            fixed["parent_blocks_prefill_s"][str(b)] = blocks_prefill
            for what, measured, blocks in (("decode step", step, blocks_decode), ("prefill", prefill, blocks_prefill)):
                if blocks > measured:
                    warnings.append(residual_warning(what, b, measured, blocks))
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
        "residual_warnings": warnings,
        "variants": out_variants,
        "seconds": time.perf_counter() - started,
    }
