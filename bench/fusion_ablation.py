"""FFN Fusion on a child with attention-free runs: speed and quality of (a) the child, (b) the fused child, (c) the
child with the same sequential FFN steps removed instead of fused (docs/fusion.md), and optionally (d) the fused
child after distillation.

    python bench/fusion_ablation.py PARENT CHILD --calibration RUN/calibration --out runs/fusion-ablation \
        [--exclude-last] [--distilled DIR]

Writes OUT/fused/ and OUT/removed/ (our format), then one bench-speed run over parent, child, fused and removed
(batch 16, interleaved, ratios from that one run), and the reporting-set KL / top-1 to the parent of every model
(the calibration's reporting windows: no fusion decision read them). Results: OUT/fusion-ablation.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from open_nemotron.evaluate.divergence import heldout_agreement
    from open_nemotron.evaluate.throughput import SpeedConfig
    from open_nemotron.evaluate.throughput import run as bench_speed
    from open_nemotron.fusion import plan_fusion, remove_ffns
    from open_nemotron.fusion.stage import FuseConfig, fuse_stage
    from open_nemotron.model.loading import load_model, load_tokenizer, resolve_model_dir
    from open_nemotron.puzzle.calibration import load_tokens
    from open_nemotron.utils import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent")
    parser.add_argument("child")
    parser.add_argument("--calibration", required=True, help="a calibration directory (its reporting windows)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--exclude-last", action="store_true")
    parser.add_argument("--max-width", type=int)
    parser.add_argument("--distilled", help="the fused child after `distill` (measured as (d))")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fused_dir, removed_dir = out / "fused", out / "removed"
    summary = fuse_stage(
        FuseConfig(model=args.child, out_dir=str(fused_dir), max_width=args.max_width, exclude_last=args.exclude_last)
    )
    child = load_model(args.child, implementation="ours")
    plan = plan_fusion(child.config, None, args.max_width, args.exclude_last)
    removed = remove_ffns(child, plan)
    removed.save_pretrained(removed_dir)
    load_tokenizer(args.child).save_pretrained(removed_dir)

    parent = load_model(args.parent, implementation="ours")
    reporting = load_tokens(Path(args.calibration))["reporting"]
    models = {"child": args.child, "fused": str(fused_dir), "removed": str(removed_dir)}
    if args.distilled:
        models["fused + distill"] = args.distilled
    quality = {"parent": {"heldout_kl": 0.0, "top1_agreement": 1.0}}
    with torch.no_grad():
        for name, spec in models.items():
            model = child if name == "child" else removed if name == "removed" else load_model(spec)
            quality[name] = heldout_agreement(parent, model, reporting)
            print(f"{name}: KL {quality[name]['heldout_kl']:.4f}, top-1 {quality[name]['top1_agreement']:.4f}")
    del parent, child, removed

    specs = [f"ours:{resolve_model_dir(args.parent)}", *[f"ours:{s}" for s in models.values()]]
    speed = bench_speed(
        SpeedConfig(
            models=specs,
            batch_sizes=[args.batch_size],
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
            repeats=args.repeats,
            memory=False,
            json_out=str(out / "bench-speed.json"),
        )
    )
    b = str(args.batch_size)
    rows = []
    for name, result in zip(["parent", *models], speed["models"], strict=True):
        rows.append(
            {
                "model": name,
                "layers": load_model_config_layers(result["spec"]),
                "decode_tokens_per_s": result["batches"][b]["decode_tokens_per_s"],
                "speedup_vs_parent": result["ratio_to_first"][b]["decode"],
                **quality[name],
            }
        )
    child_speed = rows[1]["decode_tokens_per_s"]
    for row in rows:
        row["speedup_vs_child"] = row["decode_tokens_per_s"] / child_speed
    result = {
        "benchmark": "fusion-ablation",
        "config": vars(args),
        "fusion": summary,
        "reporting_positions": int(reporting.shape[0] * (reporting.shape[1] - 1)),
        "rows": rows,
    }
    lines = [
        "# FFN Fusion ablation",
        "",
        f"Child `{args.child}`; fused groups: "
        + ", ".join(f"{g['layers'][0]}–{g['layers'][-1]} (width {g['width']})" for g in summary["groups"])
        + f"; removal keeps each group's last FFN. Decode at batch {args.batch_size} ({args.prompt_len} + "
        f"{args.gen_len} tokens, {args.repeats} repeats, one interleaved run); KL / top-1 to the parent on "
        f"{result['reporting_positions']} reporting positions.",
        "",
        "| model | layers | decode tok/s | × parent | × child | KL to parent | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['layers']} | {row['decode_tokens_per_s']:.1f} | {row['speedup_vs_parent']:.3f} | "
            f"{row['speedup_vs_child']:.3f} | {row['heldout_kl']:.4f} | {row['top1_agreement']:.4f} |"
        )
    write_result(str(out / "fusion-ablation.json"), result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def load_model_config_layers(spec: str) -> int:
    from open_nemotron.model.loading import resolve_model_dir

    path = resolve_model_dir(spec.split(":", 1)[1] if spec.startswith("ours:") else spec)
    return json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]


if __name__ == "__main__":
    sys.exit(main())
