"""`bench-speed`: prefill and decode throughput, peak memory, size and KV-cache cost of several models, measured
in one process with the models interleaved and repeated, so that ratios between them survive a noisy machine.

Each (repeat, batch size, model) measurement runs the model's own `generate` once on a random prompt, `gen_len`
tokens with EOS disabled, and reads the clock from inside it through a streamer (transformers' hook, which our fast
loop serves too): prefill = the call's start to the first new token on the host; decode = the first new token to
the last, over `gen_len - 1` steps. One call gives both, so decode time cannot come out negative as a difference of
two separately timed calls can on a tiny model.
Batch-1 decode is compared with its floor: the time to stream the weights once at the measured memory bandwidth.
Peak memory is measured afterwards, one fresh subprocess per model and batch size (so models never share an
allocator): peak resident memory during one generate minus the process's memory before loading the model
(on CUDA: peak allocated bytes).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from open_nemotron.errors import OpenNemotronError
from open_nemotron.evaluate.hardware import (
    describe_device,
    measure_memory_bandwidth,
    synchronize,
)
from open_nemotron.utils import write_result

IMPLEMENTATIONS = ("auto", "ours", "transformers")


@dataclass
class SpeedConfig:
    models: list[str]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    prompt_len: int = 128
    gen_len: int = 128
    repeats: int = 3
    memory: bool = True
    device: str | None = None
    seed: int = 0
    json_out: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise OpenNemotronError("bench-speed: models is empty: expected at least one model")
        for name in ("prompt_len", "gen_len", "repeats"):
            if getattr(self, name) < 1:
                raise OpenNemotronError(f"bench-speed: {name} = {getattr(self, name)}: expected a positive integer")
        if self.gen_len < 2:
            raise OpenNemotronError(
                f"bench-speed: gen_len = {self.gen_len}: expected at least 2 (decode = tokens after the first)"
            )
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise OpenNemotronError(f"bench-speed: batch_sizes = {self.batch_sizes}: expected positive integers")
        for spec in self.models:
            split_spec(spec)


def split_spec(spec: str) -> tuple[str, str]:
    """`ours:DIR` / `transformers:DIR` pick the implementation for the same weights; plain specs use `auto`."""
    head, sep, rest = spec.partition(":")
    if sep and head in IMPLEMENTATIONS and rest:
        return head, rest
    return "auto", spec


def model_facts(model) -> dict[str, Any]:
    """Parameter count, bytes streamed per decoded token, KV-cache bytes per token."""
    seen, params, nbytes = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue  # tied embeddings count once
        seen.add(p.data_ptr())
        params += p.numel()
        nbytes += p.numel() * p.element_size()
    streamed = nbytes
    embed = model.get_input_embeddings().weight
    if not getattr(model.config, "tie_word_embeddings", False):
        # An untied input embedding is only gathered (one row per token), never streamed.
        streamed -= embed.numel() * embed.element_size()
    return {
        "class": type(model).__name__,
        "params": params,
        "weight_bytes": nbytes,
        "streamed_bytes_per_token": streamed,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.config, embed.element_size()),
    }


def kv_cache_bytes_per_token(config, bytes_per_element: int) -> int:
    if hasattr(config, "kv_cache_bytes_per_token"):
        return config.kv_cache_bytes_per_token(bytes_per_element)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * bytes_per_element


def _generate_exactly(model, input_ids: torch.Tensor, new_tokens: int, streamer: BaseStreamer | None = None) -> None:
    """Greedy `generate` of exactly `new_tokens` tokens (EOS disabled): the unit every timing here measures."""
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=streamer,
        )


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    _generate_exactly(model, input_ids, new_tokens)
    synchronize(device)
    return time.perf_counter() - start


class _StepClock(BaseStreamer):
    """A streamer that only notes when each chunk of new tokens reaches the host (`put` receives CPU tensors, so
    the device has finished that step by then)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.token_times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_prefill_and_decode(
    model, input_ids: torch.Tensor, new_tokens: int, device: torch.device
) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy `generate` of `new_tokens` (>= 2) tokens with EOS disabled:
    start to first new token, first new token to last (`new_tokens - 1` steps)."""
    clock = _StepClock()
    synchronize(device)
    start = time.perf_counter()
    _generate_exactly(model, input_ids, new_tokens, clock)
    if len(clock.token_times) != new_tokens:
        raise OpenNemotronError(
            f"bench-speed: generate streamed {len(clock.token_times)} new tokens, expected {new_tokens}"
        )
    return clock.token_times[0] - start, clock.token_times[-1] - clock.token_times[0]


def random_prompt(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + batch)
    # Stay clear of the lowest ids (often special tokens) so the prompt is ordinary text-like ids.
    return torch.randint(min(100, vocab - 1), vocab, (batch, length), generator=gen).to(device)


def memory_probe(spec: str, batch: int, prompt_len: int, gen_len: int, device: str | None) -> dict[str, int]:
    """Peak memory of one generate for one model, run in this (fresh) process (our models loaded in the weight
    layout for this batch size, as a user decoding such batches would load them)."""
    from open_nemotron.model.decode_layout import layout_for_batch
    from open_nemotron.model.loading import load_model

    impl, path = split_spec(spec)
    dev = torch.device(device) if device else None
    if dev is not None and dev.type == "cuda" or (dev is None and torch.cuda.is_available()):
        model = load_model(path, device=dev, implementation=impl)
        dev = next(model.parameters()).device
        torch.cuda.reset_peak_memory_stats(dev)
        ids = random_prompt(batch, prompt_len, model.config.vocab_size, 0, dev)
        timed_generate(model, ids, gen_len, dev)
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(dev))}
    baseline = _rss_bytes()
    model = load_model(path, device="cpu", implementation=impl, decode_layout=layout_for_batch(batch))
    ids = random_prompt(batch, prompt_len, model.config.vocab_size, 0, torch.device("cpu"))
    _reset_peak_rss()
    timed_generate(model, ids, gen_len, torch.device("cpu"))
    return {"peak_memory_bytes": _peak_rss_bytes() - baseline}


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OpenNemotronError(f"/proc/self/status has no {field_name}: peak memory needs Linux (use --no-memory)")


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _run_memory_probe(spec: str, batch: int, config: SpeedConfig) -> int | None:
    cmd = [
        sys.executable,
        "-m",
        "open_nemotron.evaluate.throughput",
        "probe",
        spec,
        str(batch),
        str(config.prompt_len),
        str(config.gen_len),
        config.device or "",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OpenNemotronError(f"memory probe for {spec} (batch {batch}) failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_memory_bytes"]


def run(config: SpeedConfig, progress: bool = True) -> dict[str, Any]:
    """Measure every model; returns the result dict (also written to `config.json_out` atomically)."""
    from open_nemotron.model.decode_layout import layout_for_batch, set_decode_layout
    from open_nemotron.model.loading import default_device, load_model
    from open_nemotron.model.modeling import DeciLMForCausalLM
    from open_nemotron.progress import StageProgress

    device = torch.device(config.device) if config.device else default_device()
    n_models, n_batches = len(config.models), len(config.batch_sizes)
    timing_steps = n_batches * n_models * (config.repeats + 1)  # + one warm-up per model and batch size
    memory_steps = n_models * n_batches if config.memory else 0
    models, facts = [], []
    with StageProgress("bench-speed", n_models + 1 + timing_steps + memory_steps, enabled=progress) as bar:
        for spec in config.models:
            impl, path = split_spec(spec)
            model = load_model(path, device=device, implementation=impl)
            models.append(model)
            facts.append(model_facts(model))
            bar.advance(f"loaded {spec}")
        for m, model in enumerate(models):
            if model.config.vocab_size != models[0].config.vocab_size:
                raise OpenNemotronError(
                    f"bench-speed: {config.models[m]} has vocab_size {model.config.vocab_size}, "
                    f"{config.models[0]} has {models[0].config.vocab_size}: expected models sharing one tokenizer"
                )
        bandwidth = measure_memory_bandwidth(device)
        bar.advance(f"memory bandwidth: copy {bandwidth.copy_bytes_per_s / 1e9:.1f} GB/s")
        samples: dict[tuple[int, int], dict[str, list[float]]] = {
            (m, b): {"prefill_s": [], "decode_s": []} for m in range(n_models) for b in config.batch_sizes
        }
        prompts = {
            b: random_prompt(b, config.prompt_len, models[0].config.vocab_size, config.seed, device)
            for b in config.batch_sizes
        }
        # Batch sizes in the outer loop: our models get the weight layout for each batch size (decode_layout.py),
        # switched explicitly here, once per batch size.
        for b in config.batch_sizes:
            for model in models:
                if isinstance(model, DeciLMForCausalLM):
                    set_decode_layout(model, layout_for_batch(b))
            for repeat in range(config.repeats):
                for m, model in enumerate(models):
                    if not samples[(m, b)]["prefill_s"]:  # warm-up at this batch size
                        timed_generate(model, prompts[b], 4, device)
                        bar.advance(f"batch {b}: warm-up {config.models[m]}")
                    prefill_s, decode_s = timed_prefill_and_decode(model, prompts[b], config.gen_len, device)
                    samples[(m, b)]["prefill_s"].append(prefill_s)
                    samples[(m, b)]["decode_s"].append(decode_s)
                    step_ms = 1e3 * decode_s
                    bar.advance(
                        f"batch {b}, repeat {repeat + 1}/{config.repeats}, {config.models[m]}: "
                        f"{step_ms / (config.gen_len - 1):.1f} ms/step"
                    )
        # Memory after timing: fresh processes, one at a time (never beside the timing loop).
        peak_memory: dict[tuple[int, int], int | None] = {}
        if config.memory:
            del models, model
            for m, spec in enumerate(config.models):
                for b in config.batch_sizes:
                    peak_memory[(m, b)] = _run_memory_probe(spec, b, config)
                    bar.advance(f"peak memory {spec}, batch {b}: {peak_memory[(m, b)] / 2**20:.0f} MiB")
    results = []
    for m, spec in enumerate(config.models):
        f = facts[m]
        floor_s = f["streamed_bytes_per_token"] / bandwidth.copy_bytes_per_s
        floor_read_s = f["streamed_bytes_per_token"] / bandwidth.read_bytes_per_s
        per_batch = {}
        for b in config.batch_sizes:
            s = samples[(m, b)]
            prefill = statistics.median(s["prefill_s"])
            decode = statistics.median(s["decode_s"])
            step_s = decode / (config.gen_len - 1)
            entry = {
                "prefill_tokens_per_s": b * config.prompt_len / prefill,
                "decode_tokens_per_s": b * (config.gen_len - 1) / decode,
                "decode_ms_per_step": step_s * 1e3,
                "prefill_s_samples": s["prefill_s"],
                "decode_s_samples": s["decode_s"],
            }
            if b == 1:
                entry["decode_vs_floor"] = step_s / floor_s
            per_batch[str(b)] = entry
        results.append(
            {
                "spec": spec,
                **f,
                "floor_ms_per_token": floor_s * 1e3,
                "floor_read_ms_per_token": floor_read_s * 1e3,
                "batches": per_batch,
            }
        )
    for (m, b), peak in peak_memory.items():
        results[m]["batches"][str(b)]["peak_memory_bytes"] = peak
    base = results[0]
    for r in results:
        r["ratio_to_first"] = {
            b: {
                "prefill": r["batches"][b]["prefill_tokens_per_s"] / base["batches"][b]["prefill_tokens_per_s"],
                "decode": r["batches"][b]["decode_tokens_per_s"] / base["batches"][b]["decode_tokens_per_s"],
            }
            for b in r["batches"]
        }
    result = {
        "benchmark": "bench-speed",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": asdict(config),
        "hardware": describe_device(device),
        "memory_bandwidth": {
            "copy_gb_per_s": bandwidth.copy_bytes_per_s / 1e9,
            "read_gb_per_s": bandwidth.read_bytes_per_s / 1e9,
            "buffer_bytes": bandwidth.buffer_bytes,
        },
        "models": results,
    }
    if config.json_out:
        write_result(config.json_out, result, render_markdown(result))
    return result


def render_table(result: dict[str, Any]):
    """A rich table: medians per model and batch size plus ratios to the first model."""
    from rich.table import Table

    bw = result["memory_bandwidth"]
    table = Table(
        title=f"bench-speed (prompt {result['config']['prompt_len']}, gen {result['config']['gen_len']}; "
        f"bandwidth copy {bw['copy_gb_per_s']:.1f} GB/s, read {bw['read_gb_per_s']:.1f} GB/s)"
    )
    for col in (
        "model",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "ms/step",
        "x floor",
        "vs first (prefill/decode)",
        "peak mem",
        "params",
        "KV B/token",
        "floor ms",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["models"]:
        for b, e in r["batches"].items():
            ratio = r["ratio_to_first"][b]
            mem = e.get("peak_memory_bytes")
            table.add_row(
                r["spec"],
                b,
                f"{e['prefill_tokens_per_s']:.0f}",
                f"{e['decode_tokens_per_s']:.1f}",
                f"{e['decode_ms_per_step']:.1f}",
                f"{e['decode_vs_floor']:.2f}" if "decode_vs_floor" in e else "",
                f"{ratio['prefill']:.2f} / {ratio['decode']:.2f}",
                f"{mem / 2**20:.0f} MiB" if mem is not None else "-",
                f"{r['params'] / 1e6:.1f}M",
                f"{r['kv_cache_bytes_per_token']}",
                f"{r['floor_ms_per_token']:.1f}",
            )
    return table


def render_markdown(result: dict[str, Any]) -> str:
    """The human-readable report written beside the JSON."""
    bw = result["memory_bandwidth"]
    cfg = result["config"]
    hw = result["hardware"]
    lines = [
        f"# bench-speed — {result['date']}",
        "",
        f"Device: {hw.get('gpu') or hw.get('cpu')} ({hw['device']}, {hw['threads']} threads, torch {hw['torch']}). "
        f"Prompt {cfg['prompt_len']} tokens, {cfg['gen_len']} generated (greedy, EOS off), {cfg['repeats']} repeats, "
        "medians; models interleaved in one process.",
        "",
        f"Memory bandwidth: copy {bw['copy_gb_per_s']:.2f} GB/s (buffer bytes per second), read "
        f"{bw['read_gb_per_s']:.2f} GB/s. Floor = bytes streamed per token / copy bandwidth; "
        "'x floor (read)' uses the read bandwidth instead.",
        "",
        "| model | batch | prefill tok/s | decode tok/s | ms/step | x floor | x floor (read) | vs first: prefill | "
        "vs first: decode | peak memory | params | KV bytes/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        for b, e in r["batches"].items():
            ratio = r["ratio_to_first"][b]
            mem = e.get("peak_memory_bytes")
            floor_cols = (
                f"{e['decode_ms_per_step'] / r['floor_ms_per_token']:.2f} | "
                f"{e['decode_ms_per_step'] / r['floor_read_ms_per_token']:.2f}"
                if b == "1"
                else " | "
            )
            lines.append(
                f"| {r['spec']} | {b} | {e['prefill_tokens_per_s']:.1f} | {e['decode_tokens_per_s']:.2f} | "
                f"{e['decode_ms_per_step']:.1f} | {floor_cols} | {ratio['prefill']:.2f} | {ratio['decode']:.2f} | "
                f"{(f'{mem / 2**20:.0f} MiB') if mem is not None else '-'} | {r['params'] / 1e6:.2f} M | "
                f"{r['kv_cache_bytes_per_token']} |"
            )
    lines += [
        "",
        "Floors per token (batch 1): "
        + "; ".join(
            f"{r['spec']}: {r['floor_ms_per_token']:.1f} ms (copy), {r['floor_read_ms_per_token']:.1f} ms (read)"
            for r in result["models"]
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) >= 6 and sys.argv[1] == "probe":
    out = memory_probe(
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] else None,
    )
    print(json.dumps(out))
