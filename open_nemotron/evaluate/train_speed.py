"""`bench-train`: training-step throughput (forward, backward, AdamW) and the FLOP rate it achieves against the
machine's measured matmul rate, for several models interleaved in one process.

FLOPs per step = 6 x (parameters used in matmuls, i.e. every Linear including the LM head) x tokens
               + 6 x (causal attention score and value products: 2 x batch x seq^2 x heads x head_dim per layer).
The matmul rate is the median FLOP/s of a 2048^3 fp32 matmul on the same device, so `flop_rate_vs_matmul` says how
much of the machine's dense-compute ceiling a training step reaches.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from open_nemotron.errors import OpenNemotronError
from open_nemotron.evaluate.hardware import describe_device, measure_matmul_flops, synchronize
from open_nemotron.evaluate.throughput import split_spec
from open_nemotron.utils import write_result


@dataclass
class TrainSpeedConfig:
    models: list[str]
    batch: int = 4
    seq: int = 256
    steps: int = 3
    repeats: int = 2
    device: str | None = None
    seed: int = 0
    json_out: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise OpenNemotronError("bench-train: models is empty: expected at least one model")
        for name in ("batch", "seq", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise OpenNemotronError(f"bench-train: {name} = {getattr(self, name)}: expected a positive integer")
        for spec in self.models:
            split_spec(spec)


def training_flops_per_step(model: nn.Module, batch: int, seq: int) -> float:
    """Dense FLOPs of one forward+backward at this shape (see module docstring)."""
    seen, matmul_params = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            matmul_params += module.weight.numel()
    tokens = batch * seq
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if hasattr(config, "layers_blocks"):
        attention_layers = sum(b.attention.kind == "gqa" for b in config.layers_blocks())
    else:
        attention_layers = config.num_hidden_layers
    attention = attention_layers * 2 * batch * seq * seq * config.num_attention_heads * head_dim
    return 6.0 * matmul_params * tokens + 3.0 * attention


def _train_steps(model, optimizer, input_ids: torch.Tensor, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def run(config: TrainSpeedConfig, progress: bool = True) -> dict[str, Any]:
    from open_nemotron.model.loading import default_device, load_model
    from open_nemotron.progress import StageProgress

    device = torch.device(config.device) if config.device else default_device()
    models, optimizers = [], []
    for spec in config.models:
        impl, path = split_spec(spec)
        # fp32 everywhere on CPU (bf16 has no fast kernels there); bf16 weights on GPUs.
        model = load_model(path, device=device, implementation=impl).train()
        models.append(model)
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=1e-6))
    matmul_rate = measure_matmul_flops(device, dtype=next(models[0].parameters()).dtype)
    gen = torch.Generator().manual_seed(config.seed)
    vocab = min(m.config.vocab_size for m in models)
    input_ids = torch.randint(0, vocab, (config.batch, config.seq), generator=gen).to(device)
    seconds: list[list[float]] = [[] for _ in models]
    with StageProgress("bench-train", (config.repeats + 1) * len(models), enabled=progress) as bar:
        for m, (model, opt) in enumerate(zip(models, optimizers, strict=True)):  # warm-up: allocator, optimizer
            _train_steps(model, opt, input_ids, 1, device)
            bar.advance(f"warm-up {config.models[m]}")
        for repeat in range(config.repeats):
            for m, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
                seconds[m].append(_train_steps(model, opt, input_ids, config.steps, device))
                bar.advance(f"repeat {repeat + 1}, {config.models[m]}: {seconds[m][-1] / config.steps:.2f} s/step")
    tokens = config.batch * config.seq * config.steps
    results = []
    for m, spec in enumerate(config.models):
        median_s = statistics.median(seconds[m])
        flops = training_flops_per_step(models[m], config.batch, config.seq) * config.steps
        results.append(
            {
                "spec": spec,
                "class": type(models[m]).__name__,
                "tokens_per_s": tokens / median_s,
                "step_s": median_s / config.steps,
                "flop_rate": flops / median_s,
                "flop_rate_vs_matmul": flops / median_s / matmul_rate,
                "seconds_samples": seconds[m],
            }
        )
    for r in results:
        r["tokens_per_s_vs_first"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    result = {
        "benchmark": "bench-train",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": asdict(config),
        "hardware": describe_device(device),
        "matmul_flop_rate": matmul_rate,
        "models": results,
    }
    if config.json_out:
        write_result(config.json_out, result, render_markdown(result))
    return result


def render_table(result: dict[str, Any]):
    from rich.table import Table

    cfg = result["config"]
    table = Table(
        title=f"bench-train (batch {cfg['batch']} x seq {cfg['seq']}, AdamW; matmul rate "
        f"{result['matmul_flop_rate'] / 1e9:.1f} GFLOP/s)"
    )
    for col in ("model", "tokens/s", "s/step", "GFLOP/s", "vs matmul", "vs first"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["models"]:
        table.add_row(
            r["spec"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['step_s']:.2f}",
            f"{r['flop_rate'] / 1e9:.1f}",
            f"{r['flop_rate_vs_matmul']:.2f}",
            f"{r['tokens_per_s_vs_first']:.2f}",
        )
    return table


def render_markdown(result: dict[str, Any]) -> str:
    cfg, hw = result["config"], result["hardware"]
    lines = [
        f"# bench-train — {result['date']}",
        "",
        f"Device: {hw.get('gpu') or hw.get('cpu')} ({hw['device']}, {hw['threads']} threads, torch {hw['torch']}). "
        f"Batch {cfg['batch']} x {cfg['seq']} tokens, forward + backward + AdamW, {cfg['steps']} steps per sample, "
        f"{cfg['repeats']} samples, medians; models interleaved. Matmul rate: "
        f"{result['matmul_flop_rate'] / 1e9:.1f} GFLOP/s.",
        "",
        "| model | tokens/s | s/step | GFLOP/s | FLOP rate / matmul rate | vs first |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        lines.append(
            f"| {r['spec']} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | {r['flop_rate'] / 1e9:.1f} | "
            f"{r['flop_rate_vs_matmul']:.2f} | {r['tokens_per_s_vs_first']:.2f} |"
        )
    return "\n".join(lines) + "\n"
