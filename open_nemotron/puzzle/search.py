"""The `search` stage: turn costs.json + scores.json into per-layer candidates and run the MIP for every target.

A layer's candidates are all (attention, FFN) pairs of its search space; a pair's score is the sum of its halves'
replace-1-block scores (decoupled BLD composes halves, paper-digest §1.3) and its costs are the sums of the halves'
measured costs. Relative targets (``decode_speedup``) become an absolute decode throughput: the factor times the
parent's predicted throughput at the first search batch size. Besides each target's MIP solution(s), the stage
records the paper's greedy baseline at the same budget and a front of MIP solutions over a range of speedups (for
the plot).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from open_nemotron.puzzle.config import CostsConfig, SearchConfig, TargetConfig
from open_nemotron.puzzle.mip import (
    Budget,
    Candidate,
    FixedCosts,
    SearchError,
    Solution,
    greedy_baseline,
    predicted_step_s,
    solve_diverse,
    solve_mip,
    sweep_batch_sizes,
)
from open_nemotron.puzzle.scoring import variant_score
from open_nemotron.puzzle.search_space import ATTENTION, FFN, SearchSpace

GIB = 1 << 30


def check_costs(costs: Any, space: SearchSpace, batch_sizes: list[int]) -> None:
    """A costs.json the search can use, or a one-line SearchError naming the first bad field."""

    def number(value: Any, where: str, signed: bool = False) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value < 0 and not signed):
            kind = "a finite number" if signed else "a finite non-negative number"
            raise SearchError(f"costs.json {where} = {value!r}: expected {kind}; re-run `puzzle costs`")

    def mapping(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise SearchError(
                f"costs.json {where}: expected a mapping, got {type(value).__name__}; re-run `puzzle costs`"
            )
        return value

    costs = mapping(costs, "(top level)")
    fixed = mapping(costs.get("fixed"), "fixed")
    for key in ("params", "params_bytes"):
        number(fixed.get(key), f"fixed.{key}")
    decode = mapping(fixed.get("decode_s"), "fixed.decode_s")
    for b in batch_sizes:
        number(decode.get(str(b)), f"fixed.decode_s[{str(b)!r}]", signed=True)  # the signed residual
    variants = mapping(costs.get("variants"), "variants")
    names = sorted({v.name for layer in space.attention + space.ffn for v in layer})
    for name in names:
        entry = mapping(variants.get(name), f"variants[{name!r}] (a variant of the search space)")
        for key in ("params", "params_bytes", "kv_bytes_per_token"):
            number(entry.get(key), f"variants[{name!r}].{key}")
        times = mapping(entry.get("decode_s"), f"variants[{name!r}].decode_s")
        for b in batch_sizes:
            number(times.get(str(b)), f"variants[{name!r}].decode_s[{str(b)!r}]")


def _score(scores: dict[str, Any], layer: int, part: str, variant: str, parent_name: str) -> float:
    try:
        return variant_score(scores, layer, part, variant, parent_name)
    except (KeyError, IndexError, TypeError):
        raise SearchError(
            f"scores.json: no {scores.get('metric')!r} score for layer {layer} {variant}; re-run `puzzle score`"
        ) from None


def build_candidates(space: SearchSpace, costs: dict[str, Any], scores: dict[str, Any]) -> list[list[Candidate]]:
    variants = costs["variants"]
    layers = []
    for i in range(space.num_layers):
        parent_a, parent_f = space.attention[i][0].name, space.ffn[i][0].name
        options = []
        for a in space.attention[i]:
            for f in space.ffn[i]:
                ca, cf = variants[a.name], variants[f.name]
                options.append(
                    Candidate(
                        attention=a.name,
                        ffn=f.name,
                        score=_score(scores, i, ATTENTION, a.name, parent_a) + _score(scores, i, FFN, f.name, parent_f),
                        runtime_s={int(b): ca["decode_s"][b] + cf["decode_s"][b] for b in ca["decode_s"]},
                        params=ca["params"] + cf["params"],
                        params_bytes=ca["params_bytes"] + cf["params_bytes"],
                        kv_bytes_per_token=ca["kv_bytes_per_token"] + cf["kv_bytes_per_token"],
                    )
                )
        layers.append(options)
    return layers


def fixed_costs(costs: dict[str, Any]) -> FixedCosts:
    fixed = costs["fixed"]
    return FixedCosts(
        runtime_s={int(b): s for b, s in fixed["decode_s"].items()},
        params=fixed["params"],
        params_bytes=fixed["params_bytes"],
    )


def parent_choice(layers: list[list[Candidate]]) -> list[int]:
    return [0] * len(layers)  # the search space lists the parent's variants first: pair (0, 0) is index 0


def predicted_runtime(layers: list[list[Candidate]], fixed: FixedCosts, choice: list[int], batch: int) -> float:
    return predicted_step_s(fixed.runtime_s[batch], (layers[i][j].runtime_s[batch] for i, j in enumerate(choice)))


def speedup(parent_runtime: float, runtime: float) -> float:
    """The parent's predicted step over a child's; both must be positive (the MIP never returns a step <= 0)."""
    if not (parent_runtime > 0 and runtime > 0):
        raise SearchError(
            f"predicted decode steps {parent_runtime:.6g} s (parent) and {runtime:.6g} s (child): expected positive "
            "times; costs.json is degenerate, re-run `puzzle costs`"
        )
    return parent_runtime / runtime


def to_budget(target: TargetConfig, parent_throughput: float) -> Budget:
    return Budget(
        min_throughput=(
            target.decode_speedup * parent_throughput if target.decode_speedup is not None else target.min_throughput
        ),
        max_step_latency_s=target.max_step_latency_ms / 1e3 if target.max_step_latency_ms is not None else None,
        max_memory_bytes=int(target.max_memory_gib * GIB) if target.max_memory_gib is not None else None,
        max_params=target.max_params,
    )


def describe(solution: Solution, layers: list[list[Candidate]], parent_runtime: float) -> dict[str, Any]:
    data = solution.to_dict()
    data["predicted_speedup"] = speedup(parent_runtime, solution.runtime_s)
    data["layers"] = [
        {"attention": layers[i][j].attention, "ffn": layers[i][j].ffn, "score": layers[i][j].score}
        for i, j in enumerate(solution.choice)
    ]
    return data


def run_search(
    space: SearchSpace, costs: dict[str, Any], scores: dict[str, Any], config: SearchConfig, costs_config: CostsConfig
) -> dict[str, Any]:
    check_costs(costs, space, config.batch_sizes)
    layers = build_candidates(space, costs, scores)
    fixed = fixed_costs(costs)
    seq_len = config.seq_len or (costs_config.prompt_len + costs_config.gen_len)
    b0 = config.batch_sizes[0]
    parent = parent_choice(layers)
    parent_runtime = {b: predicted_runtime(layers, fixed, parent, b) for b in config.batch_sizes}
    for b, step in parent_runtime.items():
        if not step > 0:
            raise SearchError(
                f"costs.json: the parent's predicted decode step at batch size {b} is {step:.6g} s (fixed residual "
                f"{fixed.runtime_s[b]:.6g} s + its blocks): expected a positive time; re-run `puzzle costs`"
            )
    parent_throughput = b0 / parent_runtime[b0]
    targets = []
    all_layers = layers
    for target in config.targets:
        name = target.name
        budget = to_budget(target, parent_throughput)
        entry: dict[str, Any] = {"name": name, "target": vars(target), "budget": vars(budget)}
        layers = all_layers
        try:
            if target.min_attention_free_run:
                layers, window = attention_free_window(
                    all_layers, fixed, budget, b0, seq_len, target.min_attention_free_run, config.time_limit_s
                )
                entry["attention_free_run"] = window
            best, log = sweep_batch_sizes(layers, fixed, budget, config.batch_sizes, seq_len)
            entry["sweep"] = log
            solutions = solve_diverse(
                layers, fixed, budget, best.batch_size, seq_len, n_solutions=config.n_solutions, alpha=config.alpha
            )
            b = best.batch_size
            entry["solution"] = describe(solutions[0], layers, parent_runtime[b])
            entry["alternatives"] = [describe(s, layers, parent_runtime[b]) for s in solutions[1:]]
        except SearchError as err:
            entry["solution"] = None
            entry["error"] = str(err)
            targets.append(entry)
            continue
        try:
            entry["greedy"] = describe(greedy_baseline(layers, fixed, budget, b, seq_len), layers, parent_runtime[b])
        except SearchError as err:
            entry["greedy"] = {"error": str(err)}
        targets.append(entry)
    layers = all_layers
    batch = next((t["solution"]["batch_size"] for t in targets if t.get("solution")), b0)
    return {
        "batch_size": batch,
        "seq_len": seq_len,
        "metric": scores["metric"],
        "parent": {"runtime_s": parent_runtime[batch], "throughput": batch / parent_runtime[batch]},
        # The signed fixed residual at the chosen batch size (negative: the probes overshoot the parent's step).
        "fixed_residual_s": fixed.runtime_s[batch],
        "residual_warnings": list(costs.get("residual_warnings", [])),
        "targets": targets,
        "front": front(layers, fixed, batch, seq_len, parent_runtime[batch], config),
    }


def attention_free_window(
    layers: list[list[Candidate]],
    fixed: FixedCosts,
    budget: Budget,
    batch: int,
    seq_len: int,
    length: int,
    time_limit_s: float,
) -> tuple[list[list[Candidate]], list[int]]:
    """The candidates with one window of `length` consecutive layers restricted to no attention (and a SwiGLU or no
    FFN, so that FFN Fusion can fuse it), for the window whose best architecture under `budget` scores best; and
    that window. Layer 0 keeps its attention (vLLM and llama.cpp need it there). One MIP per window: the best over
    windows is the exact optimum under "some run of `length` attention-free layers"."""
    if length > len(layers) - 1:
        raise SearchError(
            f"min_attention_free_run = {length}: expected at most {len(layers) - 1} (the model has {len(layers)} "
            "layers and layer 0 keeps its attention)"
        )

    def fusable(c: Candidate) -> bool:
        return c.attention == "attn:no_op" and c.ffn != "ffn:linear"

    best: tuple[float, list[list[Candidate]], list[int]] | None = None
    for start in range(1, len(layers) - length + 1):
        window = list(range(start, start + length))
        restricted = [[c for c in layer if fusable(c)] if i in window else layer for i, layer in enumerate(layers)]
        if any(not layer for layer in restricted):
            continue  # a layer of the window has no attention-free candidate in the search space
        try:
            solution = solve_mip(restricted, fixed, budget, batch, seq_len, time_limit_s=time_limit_s)
        except SearchError:
            continue
        if best is None or solution.score < best[0]:
            best = (solution.score, restricted, window)
    if best is None:
        raise SearchError(
            f"no window of {length} consecutive attention-free layers meets the budget ({', '.join(f'{k}={v:g}' for k, v in vars(budget).items() if v is not None)}) at batch size {batch}"
            " (is attn:no_op in the search space?)"
        )
    return best[1], best[2]


def front(layers, fixed: FixedCosts, batch: int, seq_len: int, parent_runtime: float, config: SearchConfig) -> list:
    """MIP optima over evenly spaced speedups from 1 to 1.5x the largest speedup target (at least 2x), capped by the
    fastest architecture in the space: the region where the chosen children sit, at a readable scale."""
    fastest = predicted_step_s(fixed.runtime_s[batch], (min(c.runtime_s[batch] for c in layer) for layer in layers))
    targets = [t.decode_speedup for t in config.targets if t.decode_speedup is not None]
    top = max([2.0, *(1.5 * t for t in targets)])
    if fastest > 0:  # otherwise (a negative fixed residual) no cap: the MIP excludes steps <= 0 itself
        top = min(top, speedup(parent_runtime, fastest))
    points = []
    for k in range(config.front_points):
        wanted = 1.0 + (top - 1.0) * k / max(1, config.front_points - 1)
        budget = Budget(min_throughput=wanted * batch / parent_runtime)
        try:
            s = solve_mip(layers, fixed, budget, batch, seq_len, time_limit_s=config.time_limit_s)
        except SearchError:
            continue
        g = None
        with contextlib.suppress(SearchError):
            g = greedy_baseline(layers, fixed, budget, batch, seq_len)
        points.append(
            {
                "target_speedup": wanted,
                "predicted_speedup": speedup(parent_runtime, s.runtime_s),
                "score": s.score,
                "greedy_speedup": speedup(parent_runtime, g.runtime_s) if g else None,
                "greedy_score": g.score if g else None,
            }
        )
    return points
