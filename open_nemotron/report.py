"""The recipe's report (`DIR/report.md`, `DIR/report.json`, `DIR/report-*.png`): the whole story of one run, read
from the artifacts the stages wrote (pipeline.py) and nothing else.

Parent vs child (parameters, measured decode throughput, held-out KL and top-1 agreement to the parent,
multiple-choice retention), reasoning on/off accuracy and toggle compliance after SFT and after RL for each model,
instruction following, the exported artifacts with the command that serves each, and where the time went.
A section whose stage did not run says so instead of showing a number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from open_nemotron.utils import write_result


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def count_parameters(model_dir: str | Path) -> int:
    """Parameters stored in a checkpoint's safetensors (read from the headers, no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def _speed(rr, labels: dict[str, str]) -> dict[str, Any] | None:
    speed = _read(rr.dir / "eval" / "speed.json")
    if speed is None:
        return None
    out = {}
    for label, model in zip(labels, speed["models"], strict=False):
        out[label] = {
            b: {
                "decode_tokens_per_s": m["decode_tokens_per_s"],
                "ratio_to_parent": model["ratio_to_first"][b]["decode"],
            }
            for b, m in model["batches"].items()
        }
    return out


def _quality(rr) -> dict[str, Any]:
    """Held-out KL and top-1 agreement to the parent at each healing step (reporting sets no decision saw)."""
    r = rr.recipe
    out: dict[str, Any] = {}
    assemble = _read(rr.dir / "puzzle" / "assemble.json")
    if assemble:
        for child in assemble["children"]:
            if child["name"] == r.child:
                out["child (Puzzle)"] = {"kl": child["heldout_kl"], "top1": child["top1_agreement"]}
    distill = _read(rr.dir / "distill" / "distill.json")
    if distill and distill.get("curve"):
        first, last = distill["curve"][0], distill["curve"][-1]
        out["child before KD (KD's reporting set)"] = {"kl": first["kl"], "top1": first["top1"]}
        out["child after KD (KD's reporting set)"] = {"kl": last["kl"], "top1": last["top1"]}
    return out


def _retention(rr) -> dict[str, Any] | None:
    mc = _read(rr.dir / "eval" / "mc.json")
    if mc is None:
        return None
    from open_nemotron.pipeline import retention_models

    by_dir = {v: k for k, v in retention_models(rr).items()}
    return {
        by_dir.get(spec, spec): {"avg_acc_norm": m["avg_acc_norm"], "retention": m.get("retention")}
        for spec, m in mc["models"].items()
    }


def _eval_table(rr, name: str) -> dict[str, Any] | None:
    result = _read(rr.dir / "eval" / f"{name}.json")
    if result is None:
        return None
    from open_nemotron.pipeline import evaluated_models

    by_dir = {v: k for k, v in evaluated_models(rr).items()}
    table: dict[str, Any] = {}
    for spec, modes in result["models"].items():
        row = {}
        for mode in ("on", "off"):
            if mode in modes:
                m = modes[mode]
                row[mode] = {
                    "accuracy": m["accuracy"],
                    "ci95": m["ci95"],
                    "compliance": m["compliance"],
                    "mean_tokens": m["mean_tokens"],
                    **({"ifeval": m["ifeval"]} if "ifeval" in m else {}),
                }
        if "minus_first" in modes:
            row["minus_first"] = modes["minus_first"]
        table[by_dir.get(spec, spec)] = row
    return {"suite": result["config"]["suite"], "prompts": result["suite_size"], "models": table}


def _exports(rr) -> dict[str, Any] | None:
    export = _read(rr.dir / "export" / "export.json")
    if export is None:
        return None
    commands = {
        "gguf": ["open-nemotron serve {path} --engine llama.cpp"],
        "vllm": ["vllm serve {path}", "open-nemotron serve {path} --engine vllm"],
    }
    out = {"model": export["model"], "ours": f"open-nemotron serve {export['model']}"}
    for target in ("gguf", "vllm"):
        if target in export:
            entry = dict(export[target])
            if "path" in entry:
                entry["serve"] = [c.format(path=entry["path"]) for c in commands[target]]
            out[target] = entry
    return out


def build_report(rr) -> dict[str, Any]:
    models = {"parent": str(rr.parent_dir)}
    if rr.recipe.puzzle is not None:
        models["child"] = str(rr.child_dir())
    stages = rr.stages()
    return {
        "recipe": rr.recipe.to_dict(),
        "parameters": {label: count_parameters(path) for label, path in models.items()},
        "speed": _speed(rr, models),
        "quality": _quality(rr),
        "retention": _retention(rr),
        "reasoning": _eval_table(rr, "reasoning"),
        "instructions": _eval_table(rr, "if"),
        "exports": _exports(rr),
        "time_s": {name: entry.get("seconds", 0.0) for name, entry in stages.items() if name != "report"},
    }


def plot_time(path: Path, time_s: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(time_s)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    ax.barh(names[::-1], [time_s[n] / 60 for n in names[::-1]], color="tab:blue")
    ax.set_xlabel("minutes")
    ax.set_title("Where the time went")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reasoning(path: Path, reasoning: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(reasoning["models"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(labels)), 3.2))
    width = 0.38
    for k, mode in enumerate(("on", "off")):
        values = [reasoning["models"][m].get(mode, {}).get("accuracy", 0.0) for m in labels]
        errors = [
            [
                v - reasoning["models"][m][mode]["ci95"][0] if mode in reasoning["models"][m] else 0
                for m, v in zip(labels, values, strict=True)
            ],
            [
                reasoning["models"][m][mode]["ci95"][1] - v if mode in reasoning["models"][m] else 0
                for m, v in zip(labels, values, strict=True)
            ],
        ]
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=f"reasoning {mode}")
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("held-out accuracy")
    # Accuracy lives in [0, 1]: an all-zero smoke run must not draw an axis symmetric around 0.
    tops = [
        reasoning["models"][m][mode]["ci95"][1]
        for m in labels
        for mode in ("on", "off")
        if mode in reasoning["models"][m]
    ]
    ax.set_ylim(0, min(1.0, max([0.1, *(1.15 * t for t in tops)])))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any], images: dict[str, str]) -> str:
    lines = ["# open-nemotron run report", ""]
    r = report["recipe"]
    lines += [f"Parent `{r['parent']}`; Puzzle target `{r['child']}`; models {', '.join(r['models'])}.", ""]
    lines += [
        "## Parent vs child",
        "",
        "| | parameters |"
        + "".join(f" decode tok/s @ batch {b} | × parent @ {b} |" for b in (report["speed"] or {}).get("parent", {})),
        "|---|---:|" + "---:|---:|" * len((report["speed"] or {}).get("parent", {})),
    ]
    for label, n in report["parameters"].items():
        row = f"| {label} | {n / 1e6:.2f} M |"
        for s in ((report["speed"] or {}).get(label) or {}).values():
            row += f" {s['decode_tokens_per_s']:.1f} | {s['ratio_to_parent']:.2f}× |"
        lines.append(row)
    if not report["speed"]:
        lines.append("(decode speed not measured: the eval stage did not run)")
    lines.append("")
    if report["quality"]:
        lines += ["Held-out agreement with the parent (reporting tokens no decision saw):", ""]
        lines += ["| child | KL(parent ‖ child) | top-1 agreement |", "|---|---:|---:|"]
        lines += [f"| {k} | {_f(v['kl'])} | {_f(v['top1'])} |" for k, v in report["quality"].items()]
        lines.append("")
    if report["retention"]:
        lines += ["Multiple-choice retention (avg acc_norm ÷ the parent's):", ""]
        lines += ["| model | avg acc_norm | retention |", "|---|---:|---:|"]
        lines += [f"| {k} | {_f(v['avg_acc_norm'])} | {_f(v['retention'])} |" for k, v in report["retention"].items()]
        lines.append("")
    for key, title in (("reasoning", "Reasoning on / off"), ("instructions", "Instruction following")):
        table = report[key]
        lines += [f"## {title}", ""]
        if table is None:
            lines += ["(not measured: the stage did not run)", ""]
            continue
        lines += [f"Suite `{table['suite']}`, {table['prompts']} prompts.", ""]
        extra = " prompt strict | instruction strict |" if key == "instructions" else ""
        lines += [
            f"| model | mode | accuracy | 95% interval | compliance |{extra}",
            "|---|---|---:|---|---:|" + "---:|" * bool(extra) * 2,
        ]
        for label, row in table["models"].items():
            for mode in ("on", "off"):
                if mode in row:
                    m = row[mode]
                    cells = f"| {label} | {mode} | {_f(m['accuracy'])} | [{_f(m['ci95'][0])}, {_f(m['ci95'][1])}] | {_f(m['compliance'])} |"
                    if extra:
                        ife = m.get("ifeval", {})
                        cells += f" {_f(ife.get('prompt_level_strict_acc'))} | {_f(ife.get('inst_level_strict_acc'))} |"
                    lines.append(cells)
        if key == "reasoning" and "reasoning" in images:
            lines += ["", f"![reasoning accuracy]({images['reasoning']})"]
        lines.append("")
    lines += ["## Exports and how to serve them", ""]
    exports = report["exports"]
    if exports is None:
        lines += ["(not exported: the export stage did not run)", ""]
    else:
        lines.append(f"- ours (CPU or GPU): `{exports['ours']}`")
        for target in ("gguf", "vllm"):
            if target in exports:
                e = exports[target]
                if "path" in e:
                    serve = " or ".join(f"`{c}`" for c in e["serve"])
                    lines.append(f"- {target} ({e['dtype']}): `{e['path']}`; serve: {serve}")
                else:
                    lines.append(f"- {target}: refused: {e['refused']}")
        lines.append("")
    lines += ["## Where the time went", "", "| step | minutes |", "|---|---:|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in report["time_s"].items()]
    total = sum(report["time_s"].values())
    lines += [f"| **total** | **{total / 60:.1f}** |", ""]
    if "time" in images:
        lines.append(f"![time per step]({images['time']})")
    return "\n".join(lines) + "\n"


def write_report(rr) -> dict[str, Any]:
    report = build_report(rr)
    images: dict[str, str] = {}
    if report["time_s"]:
        plot_time(rr.dir / "report-time.png", report["time_s"])
        images["time"] = "report-time.png"
    if report["reasoning"]:
        plot_reasoning(rr.dir / "report-reasoning.png", report["reasoning"])
        images["reasoning"] = "report-reasoning.png"
    write_result(rr.dir / "report.json", report, render_markdown(report, images))
    return report
