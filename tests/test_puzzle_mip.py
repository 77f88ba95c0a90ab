"""Puzzle's architecture search (open_nemotron.puzzle.mip): the MIP against brute-force enumeration, each budget
binding, diversity, the greedy baseline, the batch-size sweep and input validation. Pure numpy/scipy, all fast."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from open_nemotron.errors import OpenNemotronError
from open_nemotron.puzzle.mip import (
    Budget,
    Candidate,
    FixedCosts,
    SearchError,
    Solution,
    evaluate,
    greedy_baseline,
    is_feasible,
    solve_diverse,
    solve_mip,
    sweep_batch_sizes,
)

BATCHES = (1, 4, 16, 64)
SEQ = 64
TOL = 1e-9


# --------------------------------------------------------------------------------------------- problem builders


def random_problem(seed: int, num_layers: int = 4, k_range: tuple[int, int] = (3, 5)):
    """Random layers whose runtimes grow sublinearly with batch size, plus fixed costs."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(num_layers):
        cands = []
        for j in range(int(rng.integers(k_range[0], k_range[1] + 1))):
            base = float(rng.uniform(0.5e-3, 3e-3))
            cands.append(
                Candidate(
                    attention=f"attn:{i}_{j}",
                    ffn=f"ffn:{i}_{j}",
                    score=float(rng.uniform(0.0, 1.0)),
                    runtime_s={b: base * (1 + b / 16) for b in BATCHES},
                    params=int(rng.integers(1_000, 100_000)),
                    params_bytes=int(rng.integers(2_000, 200_000)),
                    kv_bytes_per_token=int(rng.integers(0, 512)),
                )
            )
        layers.append(cands)
    fixed = FixedCosts(runtime_s={b: 1e-3 * (1 + b / 64) for b in BATCHES}, params=50_000, params_bytes=100_000)
    return layers, fixed


def costs(layers, fixed, choice, b, seq=SEQ):
    """Independent cost model, straight from the Budget docstrings."""
    picked = [layers[i][j] for i, j in enumerate(choice)]
    step = fixed.runtime_s[b] + sum(c.runtime_s[b] for c in picked)
    memory = (
        fixed.params_bytes + sum(c.params_bytes for c in picked) + b * seq * sum(c.kv_bytes_per_token for c in picked)
    )
    params = fixed.params + sum(c.params for c in picked)
    return step, memory, params


def feasible(layers, fixed, budget, choice, b, seq=SEQ) -> bool:
    step, memory, params = costs(layers, fixed, choice, b, seq)
    return (
        (budget.min_throughput is None or b / step >= budget.min_throughput * (1 - TOL))
        and (budget.max_step_latency_s is None or step <= budget.max_step_latency_s * (1 + TOL))
        and (budget.max_memory_bytes is None or memory <= budget.max_memory_bytes)
        and (budget.max_params is None or params <= budget.max_params)
    )


def score_of(layers, choice) -> float:
    return math.fsum(layers[i][j].score for i, j in enumerate(choice))


def brute_force(layers, fixed, budget, b, seq=SEQ, avoid=(), alpha=0.8):
    """Best feasible choice by enumeration (None if none), honouring the diversity rule."""
    cap = math.floor(alpha * len(layers) + 1e-9)
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in layers)):
        if not feasible(layers, fixed, budget, choice, b, seq):
            continue
        if any(sum(c == y for c, y in zip(choice, prev, strict=True)) > cap for prev in avoid):
            continue
        s = score_of(layers, choice)
        if best is None or s < best[0]:
            best = (s, list(choice))
    return best


def random_budget(layers, fixed, b, rng) -> Budget:
    """A random subset of budget kinds, each just loose enough for a random reference architecture."""
    ref = [int(rng.integers(len(layer))) for layer in layers]
    step, memory, params = costs(layers, fixed, ref, b)
    kinds = [k for k in ("tp", "lat", "mem", "par") if rng.random() < 0.6] or ["tp"]
    slack = lambda: float(rng.uniform(1.0, 1.15))  # noqa: E731
    return Budget(
        min_throughput=b / step / slack() if "tp" in kinds else None,
        max_step_latency_s=step * slack() if "lat" in kinds else None,
        max_memory_bytes=int(memory * slack()) if "mem" in kinds else None,
        max_params=int(params * slack()) if "par" in kinds else None,
    )


def check_solution(sol: Solution, layers, fixed, budget, b) -> None:
    step, memory, params = costs(layers, fixed, sol.choice, b)
    assert feasible(layers, fixed, budget, sol.choice, b)
    assert sol.batch_size == b
    assert sol.score == pytest.approx(score_of(layers, sol.choice), abs=1e-12)
    assert sol.runtime_s == pytest.approx(step, rel=1e-12)
    assert sol.throughput == pytest.approx(b / step, rel=1e-12)
    assert sol.memory_bytes == memory and sol.params == params


# ------------------------------------------------------------------------------------------------------ the MIP


@pytest.mark.parametrize(("seed", "num_layers"), [(s, 4) for s in range(12)] + [(s, 5) for s in range(12, 20)])
def test_mip_matches_brute_force_on_random_problems(seed, num_layers):
    rng = np.random.default_rng(1000 + seed)
    layers, fixed = random_problem(seed, num_layers=num_layers, k_range=(3, 5) if num_layers == 4 else (2, 5))
    b = int(rng.choice(BATCHES))
    budget = random_budget(layers, fixed, b, rng)
    sol = solve_mip(layers, fixed, budget, b, SEQ)
    best = brute_force(layers, fixed, budget, b)
    assert best is not None
    assert sol.method == "mip" and sol.proven_optimal
    check_solution(sol, layers, fixed, budget, b)
    assert sol.score == pytest.approx(best[0], abs=1e-9)
    assert is_feasible(layers, fixed, budget, b, SEQ, sol.choice)


def test_unconstrained_mip_takes_each_layers_best_score():
    layers, fixed = random_problem(3, num_layers=6)
    sol = solve_mip(layers, fixed, Budget(), 4, SEQ)
    assert sol.choice == [int(np.argmin([c.score for c in layer])) for layer in layers]


def monotone_problem(seed: int):
    """Candidate 0 is the best-scoring and the most expensive in every resource, so any binding budget moves away."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(4):
        k = 4
        scores = np.sort(rng.uniform(0, 1, k))
        rts, pbs, kvs, ps = (np.sort(rng.uniform(lo, hi, k))[::-1] for lo, hi in [(1e-4, 1e-3)] + [(1e3, 1e5)] * 3)
        layers.append(
            [
                Candidate(
                    f"attn:{j}",
                    f"ffn:{j}",
                    float(scores[j]),
                    {b: float(rts[j]) * (1 + b / 32) for b in BATCHES},
                    int(ps[j]),
                    int(pbs[j]),
                    int(kvs[j]) // 100,
                )
                for j in range(k)
            ]
        )
    fixed = FixedCosts({b: 2e-4 for b in BATCHES}, 10_000, 20_000)
    return layers, fixed


@pytest.mark.parametrize("kind", ["min_throughput", "max_step_latency_s", "max_memory_bytes", "max_params"])
def test_each_budget_binds(kind):
    layers, fixed = monotone_problem(7)
    b = 16
    free = solve_mip(layers, fixed, Budget(), b, SEQ)
    assert free.choice == [0, 0, 0, 0]
    step, memory, params = costs(layers, fixed, free.choice, b)
    budget = {
        "min_throughput": Budget(min_throughput=b / step * (1 + 1e-6)),
        "max_step_latency_s": Budget(max_step_latency_s=step * (1 - 1e-6)),
        "max_memory_bytes": Budget(max_memory_bytes=memory - 1),
        "max_params": Budget(max_params=params - 1),
    }[kind]
    assert not feasible(layers, fixed, budget, free.choice, b)
    sol = solve_mip(layers, fixed, budget, b, SEQ)
    assert sol.choice != free.choice
    check_solution(sol, layers, fixed, budget, b)
    assert sol.score == pytest.approx(brute_force(layers, fixed, budget, b)[0], abs=1e-9)
    # The budget at exactly the unconstrained optimum's cost still admits it.
    exact = {
        "min_throughput": Budget(min_throughput=b / step),
        "max_step_latency_s": Budget(max_step_latency_s=step),
        "max_memory_bytes": Budget(max_memory_bytes=memory),
        "max_params": Budget(max_params=params),
    }[kind]
    assert solve_mip(layers, fixed, exact, b, SEQ).choice == free.choice


def test_huge_byte_budgets_are_exact_to_one_byte():
    g = 10**10

    def cand(score, params_bytes):
        return Candidate("attn:x", "ffn:x", score, {1: 1e-3}, 0, params_bytes, 0)

    layers = [[cand(0.0, g), cand(1.0, g // 2)], [cand(0.0, g), cand(1.5, g // 2)]]
    fixed = FixedCosts({1: 0.0}, 0, 0)
    assert solve_mip(layers, fixed, Budget(max_memory_bytes=2 * g), 1, 1).choice == [0, 0]
    sol = solve_mip(layers, fixed, Budget(max_memory_bytes=2 * g - 1), 1, 1)
    assert sol.choice == [1, 0] and sol.memory_bytes == g + g // 2


def test_solution_to_dict_is_json():
    layers, fixed = random_problem(1)
    data = solve_mip(layers, fixed, Budget(max_params=10**9), 4, SEQ).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) >= {"choice", "batch_size", "score", "runtime_s", "throughput", "memory_bytes", "params", "method"}


def test_evaluate_reports_a_given_choice():
    layers, fixed = random_problem(2)
    sol = evaluate(layers, fixed, 4, SEQ, [0] * len(layers))
    check_solution(sol, layers, fixed, Budget(), 4)
    assert sol.method == "given"


# ------------------------------------------------------------------------------------------------- infeasibility


def test_unreachable_budgets_name_the_budget_and_the_best_value():
    layers, fixed = random_problem(4)
    b = 16
    fastest = fixed.runtime_s[b] + sum(min(c.runtime_s[b] for c in layer) for layer in layers)
    with pytest.raises(SearchError, match="min_throughput") as err:
        solve_mip(layers, fixed, Budget(min_throughput=2 * b / fastest), b, SEQ)
    assert f"{b / fastest:.6g} tok/s" in str(err.value)
    with pytest.raises(SearchError, match="max_step_latency_s") as err:
        solve_mip(layers, fixed, Budget(max_step_latency_s=fastest / 2), b, SEQ)
    assert f"{fastest:.6g} s" in str(err.value)
    smallest = fixed.params_bytes + sum(
        min(c.params_bytes + b * SEQ * c.kv_bytes_per_token for c in layer) for layer in layers
    )
    with pytest.raises(SearchError, match="max_memory_bytes") as err:
        solve_mip(layers, fixed, Budget(max_memory_bytes=smallest - 1), b, SEQ)
    assert str(smallest) in str(err.value)
    fewest = fixed.params + sum(min(c.params for c in layer) for layer in layers)
    with pytest.raises(SearchError, match="max_params") as err:
        solve_mip(layers, fixed, Budget(max_params=fewest - 1), b, SEQ)
    assert str(fewest) in str(err.value)
    # Fixed costs alone above the latency budget.
    with pytest.raises(SearchError, match="max_step_latency_s"):
        solve_mip(layers, fixed, Budget(max_step_latency_s=fixed.runtime_s[b] / 2), b, SEQ)


def test_budgets_reachable_alone_but_not_together():
    layers = [
        [
            Candidate("attn:fast", "ffn:big", 0.0, {1: 1.0}, 10, 10, 0),
            Candidate("attn:slow", "ffn:small", 1.0, {1: 2.0}, 5, 5, 0),
        ]
    ]
    fixed = FixedCosts({1: 0.0}, 0, 0)
    budget = Budget(max_step_latency_s=1.5, max_memory_bytes=7)
    assert brute_force(layers, fixed, budget, 1, 1) is None
    with pytest.raises(SearchError, match="cannot all be met") as err:
        solve_mip(layers, fixed, budget, 1, 1)
    assert "max_step_latency_s=1.5" in str(err.value) and "max_memory_bytes=7" in str(err.value)


# --------------------------------------------------------------------------------------------------- diversity


@pytest.mark.parametrize(("seed", "alpha", "num_layers"), [(0, 0.5, 4), (1, 0.8, 5), (2, 0.6, 5), (3, 0.0, 4)])
def test_diverse_solutions_differ_enough_and_are_the_best_such(seed, alpha, num_layers):
    rng = np.random.default_rng(2000 + seed)
    layers, fixed = random_problem(seed, num_layers=num_layers, k_range=(3, 4))
    b = 4
    budget = random_budget(layers, fixed, b, rng)
    sols = solve_diverse(layers, fixed, budget, b, SEQ, n_solutions=3, alpha=alpha)
    need = math.ceil((1 - alpha) * num_layers - 1e-9)
    for k, sol in enumerate(sols):
        check_solution(sol, layers, fixed, budget, b)
        for prev in sols[:k]:
            assert sum(x != y for x, y in zip(sol.choice, prev.choice, strict=True)) >= need
        best = brute_force(layers, fixed, budget, b, avoid=[s.choice for s in sols[:k]], alpha=alpha)
        assert sol.score == pytest.approx(best[0], abs=1e-9)
    assert len(sols) == 3 or brute_force(layers, fixed, budget, b, avoid=[s.choice for s in sols], alpha=alpha) is None
    assert sols[0].score <= sols[1].score


def test_solve_diverse_stops_early_and_solve_mip_explains_why():
    layers = [[Candidate(f"attn:{j}", "ffn:x", float(j), {1: 1e-3}, 1, 1, 0) for j in range(2)] for _ in range(2)]
    fixed = FixedCosts({1: 0.0}, 0, 0)
    sols = solve_diverse(layers, fixed, Budget(), 1, 1, n_solutions=5, alpha=0.0)
    assert [s.choice for s in sols] == [[0, 0], [1, 1]]  # alpha=0: every layer must differ from every earlier one
    with pytest.raises(SearchError, match="alpha=0") as err:
        solve_mip(layers, fixed, Budget(), 1, 1, avoid=[s.choice for s in sols], alpha=0.0)
    assert "2 of 2 layers" in str(err.value)


def test_alpha_one_allows_repeats():
    layers, fixed = random_problem(5)
    first = solve_mip(layers, fixed, Budget(), 4, SEQ)
    again = solve_mip(layers, fixed, Budget(), 4, SEQ, avoid=[first.choice], alpha=1.0)
    assert again.choice == first.choice


# ------------------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("seed", range(10))
def test_greedy_respects_its_budget_and_never_beats_the_mip(seed):
    rng = np.random.default_rng(3000 + seed)
    layers, fixed = random_problem(seed, num_layers=5)
    b = int(rng.choice(BATCHES))
    budget = random_budget(layers, fixed, b, rng)
    mip = solve_mip(layers, fixed, budget, b, SEQ)
    try:
        greedy = greedy_baseline(layers, fixed, budget, b, SEQ)
    except SearchError as err:
        assert "greedy" in str(err)
        return
    assert greedy.method == "greedy" and not greedy.proven_optimal
    check_solution(greedy, layers, fixed, budget, b)
    assert greedy.score >= mip.score - 1e-12


def test_greedy_without_budget_takes_the_best_scores():
    layers, fixed = random_problem(6)
    greedy = greedy_baseline(layers, fixed, Budget(), 4, SEQ)
    assert greedy.choice == solve_mip(layers, fixed, Budget(), 4, SEQ).choice


def test_greedy_is_strictly_worse_on_a_hand_made_case():
    # Budget: 3 s of layer time, 1.5 s per layer. The easy layer (low mean score) goes first and takes its full
    # block (1.5 s fits its share); the hard layer then has 1.5 s left and must drop to its bad cheap block.
    # The MIP instead shrinks the easy layer (+0.2) and keeps the hard layer's full block (2.5 s).
    def cand(name, score, rt):
        return Candidate(f"attn:{name}", f"ffn:{name}", score, {1: rt}, 1, 1, 0)

    layers = [
        [cand("full", 0.0, 1.5), cand("cheap", 0.2, 0.5)],  # easy: mean 0.1
        [cand("full", 0.0, 2.5), cand("cheap", 5.0, 0.5)],  # hard: mean 2.5
    ]
    fixed = FixedCosts({1: 0.0}, 0, 0)
    budget = Budget(max_step_latency_s=3.0)
    greedy = greedy_baseline(layers, fixed, budget, 1, 1)
    mip = solve_mip(layers, fixed, budget, 1, 1)
    assert greedy.choice == [0, 1] and greedy.score == pytest.approx(5.0)
    assert mip.choice == [1, 0] and mip.score == pytest.approx(0.2)
    # The same budget as a throughput target (1 sequence / 3 s) gives the same result.
    assert greedy_baseline(layers, fixed, Budget(min_throughput=1 / 3.0), 1, 1).choice == [0, 1]


def test_greedy_raises_when_it_overruns_a_reachable_budget():
    # The easy layer spends its 1 s share; the hard layer's only block needs 2 s: greedy ends at 3 s > 2 s,
    # although the MIP fits 2 s by taking the easy layer's free block.
    layers = [
        [
            Candidate("attn:full", "ffn:full", 0.0, {1: 1.0}, 1, 1, 0),
            Candidate("attn:no_op", "ffn:no_op", 0.1, {1: 0.0}, 0, 0, 0),
        ],
        [Candidate("attn:full", "ffn:full", 5.0, {1: 2.0}, 1, 1, 0)],
    ]
    fixed = FixedCosts({1: 0.0}, 0, 0)
    budget = Budget(max_step_latency_s=2.0)
    assert solve_mip(layers, fixed, budget, 1, 1).choice == [1, 0]
    with pytest.raises(SearchError, match="greedy baseline breaks the budget") as err:
        greedy_baseline(layers, fixed, budget, 1, 1)
    assert "max_step_latency_s" in str(err.value)
    with pytest.raises(SearchError, match="max_params"):
        greedy_baseline(layers, fixed, Budget(max_params=0), 1, 1)


def test_greedy_with_memory_and_params_budgets():
    layers, fixed = monotone_problem(11)
    b = 4
    free = costs(layers, fixed, [0] * 4, b)
    budget = Budget(max_memory_bytes=int(free[1] * 0.8), max_params=int(free[2] * 0.8))
    greedy = greedy_baseline(layers, fixed, budget, b, SEQ)
    check_solution(greedy, layers, fixed, budget, b)
    assert greedy.score >= solve_mip(layers, fixed, budget, b, SEQ).score - 1e-12


# ------------------------------------------------------------------------------------------------------- sweep


def test_sweep_picks_the_best_batch_size_and_logs_the_infeasible_ones():
    layers, fixed = random_problem(8)
    # Throughput rises with batch size (runtimes grow sublinearly) while the KV cache grows linearly: pick a
    # throughput only reachable from b=4 on and a memory budget that the smallest architecture breaks at b=64.
    fastest = {b: fixed.runtime_s[b] + sum(min(c.runtime_s[b] for c in layer) for layer in layers) for b in BATCHES}
    smallest = {
        b: fixed.params_bytes
        + sum(min(c.params_bytes + b * SEQ * c.kv_bytes_per_token for c in layer) for layer in layers)
        for b in BATCHES
    }
    budget = Budget(min_throughput=1.05 / fastest[1], max_memory_bytes=(smallest[16] + smallest[64]) // 2)
    best, log = sweep_batch_sizes(layers, fixed, budget, BATCHES, SEQ)
    brute = {b: brute_force(layers, fixed, budget, b) for b in BATCHES}
    assert brute[1] is None and brute[64] is None
    assert best.score == pytest.approx(min(v[0] for v in brute.values() if v), abs=1e-9)
    assert brute[best.batch_size][0] == pytest.approx(best.score, abs=1e-9)
    check_solution(best, layers, fixed, budget, best.batch_size)
    by_batch = {e["batch_size"]: e for e in log}
    assert [e["batch_size"] for e in log] == list(BATCHES)
    assert not by_batch[1]["feasible"] and "min_throughput" in by_batch[1]["reason"]
    assert not by_batch[64]["feasible"] and "max_memory_bytes" in by_batch[64]["reason"]
    for b in (4, 16):
        assert by_batch[b]["feasible"] and by_batch[b]["score"] == pytest.approx(brute[b][0], abs=1e-9)
    json.dumps(log)


def test_sweep_with_every_batch_size_infeasible_lists_each_reason():
    layers, fixed = random_problem(9)
    with pytest.raises(SearchError, match="no batch size meets the budget") as err:
        sweep_batch_sizes(layers, fixed, Budget(min_throughput=1e12), [1, 4], SEQ)
    text = str(err.value)
    assert "batch size 1: min_throughput" in text and "batch size 4: min_throughput" in text


# -------------------------------------------------------------------------------------------------- validation


def _call_with(**overrides):
    layers, fixed = random_problem(0, num_layers=2, k_range=(2, 2))
    args = {"layers": layers, "fixed": fixed, "budget": Budget(), "batch_size": 4, "seq_len": SEQ}
    args.update({k: v(args) if callable(v) else v for k, v in overrides.items()})
    return solve_mip(**args)


def _without_batch(cand: Candidate, b: int) -> Candidate:
    return Candidate(
        cand.attention,
        cand.ffn,
        cand.score,
        {k: v for k, v in cand.runtime_s.items() if k != b},
        cand.params,
        cand.params_bytes,
        cand.kv_bytes_per_token,
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"layers": []}, "layers=[]"),
        ({"layers": lambda a: [a["layers"][0], []]}, "layers[1]=[]"),
        ({"layers": lambda a: [[a["layers"][0][0], _without_batch(a["layers"][0][1], 4)]]}, "layers[0][1].runtime_s"),
        ({"fixed": FixedCosts({1: 0.0}, 0, 0)}, "fixed.runtime_s: no entry for batch size 4"),
        ({"fixed": FixedCosts({4: 0.0}, -5, 0)}, "fixed.params=-5"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"avoid": [[0]]}, "avoid[0] has 1 entries"),
        ({"avoid": [[0, 7]]}, "avoid[0][1]=7"),
        ({"time_limit_s": 0}, "time_limit_s=0"),
        ({"layers": lambda a: [[Candidate("a", "f", float("nan"), {4: 1.0}, 1, 1, 1)]]}, "layers[0][0].score=nan"),
        ({"layers": lambda a: [[Candidate("a", "f", 0.0, {4: -1.0}, 1, 1, 1)]]}, "layers[0][0].runtime_s[4]=-1.0"),
        ({"layers": lambda a: [[Candidate("a", "f", 0.0, {4: 1.0}, 1, 1, -3)]]}, "layers[0][0].kv_bytes_per_token=-3"),
    ],
)
def test_bad_inputs_name_the_field(overrides, needle):
    with pytest.raises(SearchError) as err:
        _call_with(**overrides)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, OpenNemotronError)


def test_missing_batch_size_message_lists_what_is_there():
    layers, fixed = random_problem(0, num_layers=1, k_range=(1, 1))
    with pytest.raises(SearchError, match=r"no entry for batch size 8 \(has \[1, 4, 16, 64\]\)"):
        solve_mip(layers, fixed, Budget(), 8, SEQ)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_memory_bytes": -1}, "budget.max_memory_bytes=-1"),
        ({"max_params": -2}, "budget.max_params=-2"),
        ({"min_throughput": 0}, "budget.min_throughput=0"),
        ({"max_step_latency_s": float("nan")}, "budget.max_step_latency_s=nan"),
        ({"max_step_latency_s": "fast"}, "budget.max_step_latency_s='fast'"),
    ],
)
def test_bad_budgets_name_the_field(kwargs, needle):
    with pytest.raises(SearchError) as err:
        Budget(**kwargs)
    assert needle in str(err.value)


def test_bad_solution_count_and_batch_list_are_named():
    layers, fixed = random_problem(0, num_layers=2)
    with pytest.raises(SearchError, match="n_solutions=0"):
        solve_diverse(layers, fixed, Budget(), 4, SEQ, n_solutions=0)
    with pytest.raises(SearchError, match=r"batch_sizes=\[\]"):
        sweep_batch_sizes(layers, fixed, Budget(), [], SEQ)
    with pytest.raises(SearchError, match=r"batch_sizes\[1\]=-4"):
        sweep_batch_sizes(layers, fixed, Budget(), [4, -4], SEQ)
    # An unmeasured batch size is bad input, raised at once rather than logged as infeasible.
    with pytest.raises(SearchError, match="no entry for batch size 8"):
        sweep_batch_sizes(layers, fixed, Budget(), [4, 8], SEQ)


def test_time_limit_is_reported(monkeypatch):
    import open_nemotron.puzzle.mip as mip_module

    layers, fixed = random_problem(0, num_layers=3)
    real_milp = mip_module.milp

    def stopped_with_incumbent(*args, **kwargs):
        res = real_milp(*args, **kwargs)
        res.status, res.message = 1, "Time limit reached."
        return res

    monkeypatch.setattr(mip_module, "milp", stopped_with_incumbent)
    sol = solve_mip(layers, fixed, Budget(), 4, SEQ, time_limit_s=0.5)
    assert sol.method == "mip" and not sol.proven_optimal

    def stopped_empty(*args, **kwargs):
        res = real_milp(*args, **kwargs)
        res.status, res.message, res.x = 1, "Time limit reached.", None
        return res

    monkeypatch.setattr(mip_module, "milp", stopped_empty)
    with pytest.raises(SearchError, match=r"no architecture within time_limit_s=0.5"):
        solve_mip(layers, fixed, Budget(), 4, SEQ, time_limit_s=0.5)


# ------------------------------------------------------------------------------------------ negative fixed residual


def test_a_negative_fixed_residual_excludes_choices_predicted_at_or_below_zero_seconds():
    """fixed = -2.5 ms: the best-scoring choice (every layer at 0 s) would be predicted at -2.5 ms; brute force over
    the choices predicted above 0 s gives the answer, for the MIP and for a throughput budget alike."""

    def cand(score, runtime):
        return Candidate("attn:x", "ffn:x", score, {1: runtime}, 1, 1, 0)

    layers = [[cand(0.0, 0.0), cand(1.0 + i / 10, 1e-3), cand(3.0, 2e-3)] for i in range(4)]
    fixed = FixedCosts({1: -2.5e-3}, 0, 0)
    for budget in (Budget(), Budget(min_throughput=1 / 3.5e-3)):
        best = None
        for choice in itertools.product(range(3), repeat=4):
            step = -2.5e-3 + sum(layers[i][j].runtime_s[1] for i, j in enumerate(choice))
            score = sum(layers[i][j].score for i, j in enumerate(choice))
            fits = step > 0 and (budget.min_throughput is None or 1 / step >= budget.min_throughput * (1 - TOL))
            if fits and (best is None or score < best[0] - 1e-12):
                best = (score, list(choice))
        sol = solve_mip(layers, fixed, budget, 1, SEQ)
        assert sol.choice == best[1] and sol.runtime_s == pytest.approx(0.5e-3) and sol.throughput > 0
        assert not is_feasible(layers, fixed, budget, 1, SEQ, [0, 0, 0, 0])  # -2.5 ms: outside the cost model
    assert evaluate(layers, fixed, 1, SEQ, [0, 0, 0, 0]).runtime_s == pytest.approx(-2.5e-3)  # reported, signed
    with pytest.raises(SearchError, match=r"greedy baseline breaks the budget.*not positive|predicted step"):
        greedy_baseline(layers, fixed, Budget(), 1, SEQ)  # greedy takes the best scores: predicted -2.5 ms
    degenerate = FixedCosts({1: -1.0}, 0, 0)  # even the slowest choice is predicted below 0 s
    with pytest.raises(SearchError, match=r"every architecture's predicted decode step is at most"):
        solve_mip(layers, degenerate, Budget(), 1, SEQ)


@pytest.mark.parametrize("seed", range(4))
def test_attention_free_window_is_the_best_architecture_with_such_a_run(seed):
    """Against enumeration: the best feasible choice among those with `length` consecutive layers (from layer 1 on)
    whose attention is a no-op and whose FFN is not linear."""
    from open_nemotron.puzzle.search import attention_free_window

    rng = np.random.default_rng(seed)
    layers, fixed = random_problem(seed, num_layers=5, k_range=(3, 4))
    # Relabel: some candidates of every layer lose their attention (and one of those gets a linear FFN).
    layers = [
        [
            Candidate(
                "attn:no_op" if j % 2 else f"attn:{i}_{j}",
                "ffn:linear" if j == 3 else c.ffn,
                *list(vars(c).values())[2:],
            )
            for j, c in enumerate(layer)
        ]
        for i, layer in enumerate(layers)
    ]
    b = 4
    budget = random_budget(layers, fixed, b, rng)
    length = 2

    def has_run(choice) -> bool:
        ok = [layers[i][j].attention == "attn:no_op" and layers[i][j].ffn != "ffn:linear" for i, j in enumerate(choice)]
        return any(all(ok[s : s + length]) for s in range(1, len(ok) - length + 1))

    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in layers)):
        if has_run(choice) and feasible(layers, fixed, budget, choice, b):
            s = score_of(layers, choice)
            if best is None or s < best:
                best = s
    if best is None:
        with pytest.raises(SearchError, match="no window of 2 consecutive attention-free layers"):
            attention_free_window(layers, fixed, budget, b, SEQ, length, 10.0)
        return
    restricted, window = attention_free_window(layers, fixed, budget, b, SEQ, length, 10.0)
    assert len(window) == length and window[0] >= 1
    sol = solve_mip(restricted, fixed, budget, b, SEQ)
    assert sol.score == pytest.approx(best, abs=1e-9)
    assert all(restricted[i][j].attention == "attn:no_op" for i, j in enumerate(sol.choice) if i in window)
