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
from typing import Any

from open_nemotron.puzzle.config import CostsConfig, SearchConfig, TargetConfig
from open_nemotron.puzzle.mip import (
    Budget,
    Candidate,
    FixedCosts,
    SearchError,
    Solution,
    greedy_baseline,
    solve_diverse,
    solve_mip,
    sweep_batch_sizes,
)
from open_nemotron.puzzle.scoring import variant_score
from open_nemotron.puzzle.search_space import ATTENTION, FFN, SearchSpace

GIB = 1 << 30


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
                        score=variant_score(scores, i, ATTENTION, a.name, parent_a)
                        + variant_score(scores, i, FFN, f.name, parent_f),
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
    return fixed.runtime_s[batch] + sum(layers[i][j].runtime_s[batch] for i, j in enumerate(choice))


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
    data["predicted_speedup"] = parent_runtime / solution.runtime_s
    data["layers"] = [
        {"attention": layers[i][j].attention, "ffn": layers[i][j].ffn, "score": layers[i][j].score}
        for i, j in enumerate(solution.choice)
    ]
    return data


def run_search(
    space: SearchSpace, costs: dict[str, Any], scores: dict[str, Any], config: SearchConfig, costs_config: CostsConfig
) -> dict[str, Any]:
    layers = build_candidates(space, costs, scores)
    fixed = fixed_costs(costs)
    seq_len = config.seq_len or (costs_config.prompt_len + costs_config.gen_len)
    b0 = config.batch_sizes[0]
    parent = parent_choice(layers)
    parent_runtime = {b: predicted_runtime(layers, fixed, parent, b) for b in config.batch_sizes}
    parent_throughput = b0 / parent_runtime[b0]
    targets = []
    for target in config.targets:
        name = target.name
        budget = to_budget(target, parent_throughput)
        entry: dict[str, Any] = {"name": name, "target": vars(target), "budget": vars(budget)}
        try:
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
    batch = next((t["solution"]["batch_size"] for t in targets if t.get("solution")), b0)
    return {
        "batch_size": batch,
        "seq_len": seq_len,
        "metric": scores["metric"],
        "parent": {"runtime_s": parent_runtime[batch], "throughput": batch / parent_runtime[batch]},
        "targets": targets,
        "front": front(layers, fixed, batch, seq_len, parent_runtime[batch], config),
    }


def front(layers, fixed: FixedCosts, batch: int, seq_len: int, parent_runtime: float, config: SearchConfig) -> list:
    """MIP optima over evenly spaced speedups from 1 to 1.5x the largest speedup target (at least 2x), capped by the
    fastest architecture in the space: the region where the chosen children sit, at a readable scale."""
    fastest = fixed.runtime_s[batch] + sum(min(c.runtime_s[batch] for c in layer) for layer in layers)
    targets = [t.decode_speedup for t in config.targets if t.decode_speedup is not None]
    top = min(parent_runtime / fastest, max([2.0, *(1.5 * t for t in targets)]))
    points = []
    for k in range(config.front_points):
        speedup = 1.0 + (top - 1.0) * k / max(1, config.front_points - 1)
        budget = Budget(min_throughput=speedup * batch / parent_runtime)
        try:
            s = solve_mip(layers, fixed, budget, batch, seq_len, time_limit_s=config.time_limit_s)
        except SearchError:
            continue
        g = None
        with contextlib.suppress(SearchError):
            g = greedy_baseline(layers, fixed, budget, batch, seq_len)
        points.append(
            {
                "target_speedup": speedup,
                "predicted_speedup": parent_runtime / s.runtime_s,
                "score": s.score,
                "greedy_speedup": parent_runtime / g.runtime_s if g else None,
                "greedy_score": g.score if g else None,
            }
        )
    return points
