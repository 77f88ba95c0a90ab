"""`open-nemotron fusion analyze` and `fusion fuse`: the two steps of FFN Fusion as stages with artifacts.

- analyze: `dependency.json` (M, per-layer diagnostics, attention-free runs), `dependency.png` (heatmap, runs
  outlined), `dependency.md`; on calibration tokens (`train` windows; never the reporting set).
- fuse: the fused model in our format (`config.json` with `source_layers`) + tokenizer, written atomically, and
  `fusion.json` (the groups fused, widths, layers before/after) inside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from open_nemotron.fusion.fuse import FusionError, attention_free_runs, fuse, plan_fusion
from open_nemotron.utils import atomic_write_text


@dataclass
class AnalyzeConfig:
    model: str
    out_dir: str
    data: str = "parent"  # as distill's --data: parent, a calibration directory, a file, a hub id
    seq_len: int = 128
    sequences: int = 8  # calibration windows the matrix is averaged over
    batch_size: int = 4
    generate_prompts: int = 80
    generate_tokens: int = 160
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "sequences", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FusionError(f"fusion analyze: {name} = {getattr(self, name)!r}: expected a positive integer")


def analyze(config: AnalyzeConfig, progress: bool = True) -> dict[str, Any]:
    from open_nemotron.fusion.analysis import block_dependency, plot_dependency
    from open_nemotron.model.loading import load_model, load_tokenizer
    from open_nemotron.progress import StageProgress
    from open_nemotron.puzzle.calibration import prepare

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model, device=config.device, implementation="ours")
    tokens, _ = prepare(
        config.data,
        config.model,
        out / "calibration",
        seq_len=config.seq_len,
        train_sequences=max(config.sequences, 8),
        generate_prompts=config.generate_prompts,
        generate_tokens=config.generate_tokens,
        seed=config.seed,
        model=model,
        tokenizer=load_tokenizer(config.model),
    )
    windows = tokens["train"][: config.sequences]
    layers = model.config.num_hidden_layers
    batches = -(-windows.shape[0] // config.batch_size)
    with StageProgress("fusion analyze", layers * batches, enabled=progress) as bar:
        result = block_dependency(model, windows, config.batch_size, lambda i, n: bar.advance(f"layer {i} removed"))
    runs = attention_free_runs(model.config)
    result.update(
        config=asdict(config),
        layers=layers,
        attention_free_runs=runs,
        attention=[b.attention.kind for b in model.config.layers_blocks()],
        ffn=[b.ffn.kind for b in model.config.layers_blocks()],
    )
    atomic_write_text(out / "dependency.json", json.dumps(result, indent=1))
    atomic_write_text(out / "dependency.md", render_analysis(result))
    plot_dependency(result, runs, out / "dependency.png", title=f"block dependency: {config.model}")
    return result


def render_analysis(result: dict[str, Any]) -> str:
    m = result["matrix"]
    lines = [
        "# Block dependency",
        "",
        f"`{result['config']['model']}`, {result['tokens']} calibration tokens. M[i, j] = cosine distance of layer "
        "j's contribution with vs without layer i (`dependency.png`).",
        "",
        "Attention-free runs (fusable): "
        + (", ".join(f"{r[0]}–{r[-1]}" for r in result["attention_free_runs"]) or "none")
        + ".",
        "",
    ]
    for run in result["attention_free_runs"]:
        inner = [m[i][j] for i in run for j in run if j > i]
        if inner:
            lines.append(f"- run {run[0]}–{run[-1]}: max M inside {max(inner):.4f}, mean {sum(inner) / len(inner):.4f}")
    lines += [
        "",
        "| layer | attention | FFN | 1 − cos(x, f(x)) | ‖h‖ / ‖x‖ | max M[i, ·] (dependence of later layers on it) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for i in range(result["layers"]):
        lines.append(
            f"| {i} | {result['attention'][i]} | {result['ffn'][i]} | {result['io_cosine_distance'][i]:.4f} | "
            f"{result['relative_norm'][i]:.4f} | {max(m[i]):.4f} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class FuseConfig:
    model: str
    out_dir: str
    runs: list[list[int]] | None = None  # None: every attention-free run
    max_width: int | None = None  # cap on a fused FFN's width (split a run into chunks)
    exclude_last: bool = False  # leave each run's last FFN on its own (the paper: it is sensitive)
    device: str | None = None


def parse_runs(text: str) -> list[list[int]]:
    """ "20-23,25-27" -> [[20, 21, 22, 23], [25, 26, 27]]."""
    runs = []
    for part in text.split(","):
        part = part.strip()
        try:
            a, b = (int(x) for x in part.split("-"))
        except ValueError:
            raise FusionError(f"--runs {text!r}: {part!r} is not FIRST-LAST (e.g. 20-23)") from None
        if b <= a:
            raise FusionError(f"--runs {text!r}: {part!r}: expected LAST > FIRST")
        runs.append(list(range(a, b + 1)))
    return runs


def fuse_stage(config: FuseConfig) -> dict[str, Any]:
    from open_nemotron.model.loading import atomic_directory, load_model, load_tokenizer, publish_directory

    model = load_model(config.model, device=config.device, implementation="ours")
    plan = plan_fusion(model.config, config.runs, config.max_width, config.exclude_last)
    if not plan.groups:
        raise FusionError(
            f"{config.model}: nothing to fuse (attention-free runs: {attention_free_runs(model.config) or 'none'}; "
            "a group needs two or more FFNs): expected a model with consecutive attention-free layers, e.g. a Puzzle "
            "child from a recipe with search.min_attention_free_run"
        )
    fused = fuse(model, plan)
    blocks = model.config.layers_blocks()
    summary = {
        "config": asdict(config),
        "source": config.model,
        "groups": [
            {"layers": list(g), "width": sum(blocks[i].ffn.intermediate_size or 0 for i in g)} for g in plan.groups
        ],
        "layers_before": model.config.num_hidden_layers,
        "layers_after": fused.config.num_hidden_layers,
        "source_layers": fused.config.source_layers,
    }
    out = Path(config.out_dir)
    tmp = atomic_directory(out)
    fused.save_pretrained(tmp)
    load_tokenizer(config.model).save_pretrained(tmp)
    atomic_write_text(tmp / "fusion.json", json.dumps(summary, indent=1))
    publish_directory(tmp, out)
    return summary
