"""The `report` stage: report.json (machine-readable), report.md (for people) and front.png.

report.json's top-level fields describe the first target that has a solution (`target_speedup`,
`predicted_speedup`, `measured_speedup`, `heldout_kl`, `top1_agreement`, `layers`), plus `stage_seconds`, the signed
`fixed_residual_s` with its `residual_warnings`, and a `targets` list with the same fields for every target.
"""

from __future__ import annotations

import time
from typing import Any

from open_nemotron.utils import atomic_path, write_result


def write_report(run) -> dict[str, Any]:
    search = run.read_json("search.json", "search")
    assembled = run.read_json("assemble.json", "assemble")
    costs = run.read_json("costs.json", "costs")
    library = run.read_json("library/library.json", "build-library")
    by_name = {c["name"]: c for c in assembled["children"]}
    targets = []
    for t in search["targets"]:
        sol = t.get("solution")
        entry: dict[str, Any] = {"name": t["name"], "target": t["target"]}
        if sol is None:
            entry["error"] = t.get("error")
            targets.append(entry)
            continue
        child = by_name.get(t["name"], {})
        greedy = t.get("greedy") or {}
        entry.update(
            target_speedup=t["target"].get("decode_speedup"),
            predicted_speedup=sol["predicted_speedup"],
            measured_speedup=child.get("measured_speedup"),
            prediction_error=(child["measured_speedup"] / sol["predicted_speedup"] - 1)
            if child.get("measured_speedup")
            else None,
            summed_score=sol["score"],
            heldout_kl=child.get("heldout_kl"),
            top1_agreement=child.get("top1_agreement"),
            # With coupled BLD: the decoupled composition's figures before it (heldout_kl is after).
            decoupled=child.get("decoupled"),
            coupled_bld=child.get("coupled_bld"),
            params=sol["params"],
            memory_bytes=sol["memory_bytes"],
            child_dir=child.get("dir"),
            greedy_summed_score=greedy.get("score"),
            greedy_predicted_speedup=greedy.get("predicted_speedup"),
            layers=[{"attention": la["attention"], "ffn": la["ffn"]} for la in sol["layers"]],
        )
        targets.append(entry)
    primary = next((t for t in targets if "layers" in t), None)
    if primary is None:
        raise RuntimeError("report: no target has an assembled child")
    losses = [e for e in library["entries"].values() if e.get("heldout_loss") is not None]
    report = {
        "parent": run.config.parent,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": costs["device"],
        "batch_size": search["batch_size"],
        "metric": search["metric"],
        **{
            k: primary[k]
            for k in (
                "target_speedup",
                "predicted_speedup",
                "measured_speedup",
                "heldout_kl",
                "top1_agreement",
                "layers",
            )
        },
        "stage_seconds": run.stage_seconds(),
        "targets": targets,
        "library": {
            "entries": len(library["entries"]),
            "mean_init_heldout_loss": _mean([e.get("init_heldout_loss") for e in losses]),
            "mean_heldout_loss": _mean([e["heldout_loss"] for e in losses]),
        },
        "parent_decode_tokens_per_s": assembled["parent_decode_tokens_per_s"],
        "machine_drift": assembled.get("machine_drift"),
        # fixed = the parent's measured step - its probed blocks, signed; negative: the probes overshoot.
        "fixed_residual_s": search.get("fixed_residual_s", costs["fixed"]["decode_s"].get(str(search["batch_size"]))),
        "residual_warnings": search.get("residual_warnings", costs.get("residual_warnings", [])),
        "front": search["front"],
    }
    plot_front(run.dir / "front.png", search, targets)
    # stage_seconds gains the report stage itself once it finishes: rewrite after.
    write_result(run.dir / "report.json", report, render_markdown(report))
    return report


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def plot_front(path, search: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = search["front"]
    if front:
        ax.plot(
            [p["predicted_speedup"] for p in front],
            [p["score"] for p in front],
            "o-",
            color="tab:blue",
            label="MIP front (predicted)",
        )
        greedy = [p for p in front if p.get("greedy_score") is not None]
        if greedy:
            ax.plot(
                [p["greedy_speedup"] for p in greedy],
                [p["greedy_score"] for p in greedy],
                "s--",
                color="tab:gray",
                alpha=0.7,
                label="greedy baseline (predicted)",
            )
    for k, t in enumerate(targets):
        if "layers" not in t:
            continue
        ax.scatter([t["predicted_speedup"]], [t["summed_score"]], marker="D", s=60, color="tab:orange", zorder=3)
        if t.get("measured_speedup"):
            ax.scatter([t["measured_speedup"]], [t["summed_score"]], marker="*", s=180, color="tab:red", zorder=4)
            ax.annotate(
                f"{t['name']}: measured {t['measured_speedup']:.2f}x",
                (t["measured_speedup"], t["summed_score"]),
                textcoords="offset points",
                xytext=(8, -14 if k % 2 else 8),
                fontsize=8,
            )
    ax.scatter([], [], marker="D", color="tab:orange", label="chosen child (predicted)")
    ax.scatter([], [], marker="*", s=120, color="tab:red", label="chosen child (measured)")
    ax.set_xlabel(f"decode speedup over the parent (batch {search['batch_size']})")
    ax.set_ylabel(f"summed replace-1-block {search['metric']}")
    ax.set_title("Puzzle: predicted speedup vs summed score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Puzzle report",
        "",
        f"Parent `{report['parent']}`, {report['date']}, device {report['device'].get('cpu') or report['device'].get('gpu')}"
        f" ({report['device']['device']}); decode at batch {report['batch_size']}; score = replace-1-block "
        f"{report['metric']}.",
        "",
        "| target | predicted speedup | measured speedup | error | summed score | held-out KL (reporting set) | "
        "top-1 agreement | "
        "params | greedy score (same budget) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in report["targets"]:
        if "layers" not in t:
            lines.append(f"| {t['name']} | no solution: {t.get('error')} | | | | | | | |")
            continue
        lines.append(
            f"| {t['name']} | {t['predicted_speedup']:.2f}x | "
            + (f"{t['measured_speedup']:.2f}x | {t['prediction_error']:+.1%}" if t["measured_speedup"] else "- | -")
            + f" | {t['summed_score']:.4f} | {t['heldout_kl']:.4f} | {t['top1_agreement']:.3f} | "
            f"{t['params'] / 1e6:.2f}M | {t['greedy_summed_score'] if t['greedy_summed_score'] is None else round(t['greedy_summed_score'], 4)} |"
        )
    drift = report.get("machine_drift")
    if drift is not None:
        lines += [
            "",
            f"Machine drift: the parent's decode step during the bench was {drift:.2f}x its time when costs were "
            "measured"
            + (
                " (predictions assume the costs-time state; rerun `costs` and `search` for a fresh one)."
                if abs(drift - 1) > 0.05
                else "."
            ),
        ]
    residual = report.get("fixed_residual_s")
    if residual is not None:
        lines += [
            "",
            f"Fixed residual (the parent's measured decode step minus its probed blocks, at batch "
            f"{report['batch_size']}): {residual * 1e3:.4g} ms"
            + (" — negative: the probes overshoot; it is kept signed (see below)." if residual < 0 else "."),
        ]
    lines += [f"- {w}" for w in report.get("residual_warnings") or []]
    coupled = [t for t in report["targets"] if t.get("coupled_bld")]
    if coupled:
        lines += [
            "",
            "Coupled BLD (each changed layer trained as a whole block from the decoupled weights; a layer keeps its "
            "trained weights only if its selection loss went down):",
            "",
            "| target | layers trained / kept | KL before → after (reporting set) | top-1 before → after |",
            "|---|---:|---:|---:|",
        ]
        for t in coupled:
            c, d = t["coupled_bld"], t["decoupled"]
            lines.append(
                f"| {t['name']} | {len(c['layers'])} / {len(c.get('kept_trained', []))} | "
                f"{d['heldout_kl']:.4f} → {t['heldout_kl']:.4f} | {d['top1_agreement']:.3f} → {t['top1_agreement']:.3f} |"
            )
    lines += ["", "![front](front.png)", "", "## Chosen architectures", ""]
    for t in report["targets"]:
        if "layers" not in t:
            continue
        lines += [f"### {t['name']}", "", "| layer | attention | FFN |", "|---:|---|---|"]
        lines += [f"| {i} | {la['attention']} | {la['ffn']} |" for i, la in enumerate(t["layers"])]
        lines.append("")
    lib = report["library"]
    lines += [
        "## Block library",
        "",
        f"{lib['entries']} trained variants; mean held-out BLD loss (share of the parent block's contribution not "
        f"reproduced) {_fmt(lib['mean_init_heldout_loss'])} at the training-free init -> {_fmt(lib['mean_heldout_loss'])} "
        "after BLD.",
        "",
        "## Stage times",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {s} | {v:.1f} |" for s, v in report["stage_seconds"].items()],
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
