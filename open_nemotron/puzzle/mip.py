"""Puzzle's architecture search: pick one (attention, FFN) candidate per layer under decode-time budgets.

This is the grouped-knapsack mixed-integer programme of paper-digest §1.6 (Appendix B of the Puzzle paper): binary
x_ij = 1 iff layer i uses candidate j, exactly one per layer, minimising the summed replace-1-block scores (lower is
better, e.g. KL) subject to any of four budgets at a fixed batch size b:

* ``min_throughput``:   b / (fixed.runtime_s[b] + Σ runtime_s[b]·x) >= T  (linear as Σ runtime·x <= b/T - fixed)
* ``max_step_latency_s``: fixed.runtime_s[b] + Σ runtime_s[b]·x <= S
* ``max_memory_bytes``: fixed.params_bytes + Σ (params_bytes + b·seq_len·kv_bytes_per_token)·x <= M
* ``max_params``:       fixed.params + Σ params·x <= P

The predicted decode step of a choice is ``fixed.runtime_s[b] + Σ runtime_s[b]·x`` (:func:`predicted_step_s`, the
one place it is computed). ``fixed.runtime_s`` is a signed residual (the parent's measured step minus its probed
blocks) and may be negative; a choice whose predicted step is not positive is outside the cost model and never
returned: when the space holds such choices, a row ``fixed + Σ runtime·x >= MIN_STEP_S`` excludes them.

The batch size is not a decision variable: :func:`sweep_batch_sizes` solves once per batch size and keeps the best
score. Diversity (the paper's α): for every earlier solution y, Σ_i x[i, y_i] <= floor(α·L), so each new solution
differs from each earlier one in at least ceil((1-α)·L) layers.

The solver is HiGHS through :func:`scipy.optimize.milp` (the paper used python-mip; both are exact branch and bound).
Each cost row is shifted by its per-layer minimum and scaled so HiGHS's tolerances are far below one byte or 1e-9
of the budget, the MIP gap is 0, and every returned choice is re-checked in exact arithmetic (integers for bytes and
parameters, a 1e-9 relative tolerance for seconds); a choice that only fits within the solver's tolerance tightens
that row and is solved again. Scores and costs of a :class:`Solution` are recomputed from the candidates, never taken
from the solver.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from open_nemotron.errors import OpenNemotronError

REL_TOL = 1e-9  # budgets in seconds are honoured to this relative tolerance (bytes and parameters exactly)
_MAX_TIGHTEN = 8  # re-solves allowed when HiGHS returns a choice that fits only within its own tolerance
_TIGHTEN_MARGIN = 1e-10  # first relative cut below such a choice's use (then 4x per retry)
_OBJ_SCALE = 1e6  # the largest per-layer score difference, in objective units (see _milp)
_ROW_SCALE = 1e6  # the traded range of each budget row, in row units (see _milp)
GIB = 1 << 30
MIN_STEP_S = 1e-9  # the smallest predicted decode step the MIP accepts (only binds with a negative fixed residual)


class SearchError(OpenNemotronError, ValueError):
    """Bad search input (names the field, value and what was expected) or a budget no architecture can meet."""


@dataclass(frozen=True)
class Candidate:
    """One (attention, FFN) pair for one layer, with its score and measured costs."""

    attention: str  # variant name, e.g. "attn:gqa_kv3", "attn:no_op"
    ffn: str  # e.g. "ffn:swiglu_768", "ffn:no_op"
    score: float  # summed replace-1-block score of its two sub-blocks (lower = better, e.g. KL)
    runtime_s: dict[int, float]  # decode-step time of this layer at batch size b (seconds)
    params: int  # parameter count of the layer
    params_bytes: int
    kv_bytes_per_token: int  # KV-cache bytes per token per sequence for this layer


@dataclass(frozen=True)
class FixedCosts:
    """Everything outside the searched layers (embeddings, LM head, final norm, per-step overhead)."""

    runtime_s: dict[int, float]  # per batch size; a signed residual: may be negative (see the module docstring)
    params: int
    params_bytes: int


@dataclass(frozen=True)
class Budget:
    """Resource limits for the child; any subset may be set, None means unconstrained."""

    min_throughput: float | None = None  # decoded tokens/s at batch b: b / step time >= this
    max_step_latency_s: float | None = None  # fixed.runtime_s[b] + Σ runtime_s[b] <= this
    max_memory_bytes: int | None = None  # parameters + KV cache (b sequences of seq_len tokens) <= this
    max_params: int | None = None  # fixed.params + Σ params <= this

    def __post_init__(self) -> None:
        # Fail at construction so a bad target is reported before any solving; NaN fails every comparison.
        for name, strict in (
            ("min_throughput", True),
            ("max_step_latency_s", True),
            ("max_memory_bytes", False),
            ("max_params", False),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise SearchError(f"budget.{name}={value!r}: expected a number or None")
            ok = value > 0 if strict else value >= 0
            if not ok:
                expected = "a positive number" if strict else "a non-negative number"
                raise SearchError(f"budget.{name}={value!r}: expected {expected} or None (unconstrained)")


_BUDGET_FIELDS = ("min_throughput", "max_step_latency_s", "max_memory_bytes", "max_params")


@dataclass
class Solution:
    """One architecture: the chosen candidate index per layer and its predicted costs at ``batch_size``."""

    choice: list[int]  # index into each layer's candidate list
    batch_size: int
    score: float
    runtime_s: float  # predicted decode-step time incl. fixed
    throughput: float  # batch_size / runtime_s
    memory_bytes: int
    params: int
    method: str  # "mip" or "greedy"
    proven_optimal: bool = False  # True when HiGHS proved optimality (not on a time limit, never for greedy)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["choice"] = [int(j) for j in self.choice]
        return data


# --------------------------------------------------------------------------------------------------- problem setup


@dataclass
class _Problem:
    """Validated inputs flattened for one batch size; costs stay Python numbers for exact re-checking."""

    layers: list[list[Candidate]]
    fixed: FixedCosts
    budget: Budget
    batch_size: int
    seq_len: int
    runtime: list[list[float]]
    memory: list[list[int]]  # params_bytes + b·seq_len·kv_bytes_per_token
    params: list[list[int]]
    score: list[list[float]]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def fastest(self) -> float:
        """The predicted step of the per-layer fastest choice (may be <= 0 with a negative fixed residual)."""
        return predicted_step_s(self.fixed.runtime_s[self.batch_size], (min(rt) for rt in self.runtime))

    def slowest(self) -> float:
        return predicted_step_s(self.fixed.runtime_s[self.batch_size], (max(rt) for rt in self.runtime))

    def step_limit(self) -> float | None:
        """The tighter of the two runtime budgets, as a decode-step time including fixed costs."""
        limits = []
        if self.budget.min_throughput is not None:
            limits.append(self.batch_size / self.budget.min_throughput)
        if self.budget.max_step_latency_s is not None:
            limits.append(float(self.budget.max_step_latency_s))
        return min(limits) if limits else None

    def evaluate(self, choice: Sequence[int], method: str, proven_optimal: bool = False) -> Solution:
        b = self.batch_size
        runtime = predicted_step_s(self.fixed.runtime_s[b], (self.runtime[i][j] for i, j in enumerate(choice)))
        return Solution(
            choice=[int(j) for j in choice],
            batch_size=b,
            score=math.fsum(self.score[i][j] for i, j in enumerate(choice)),
            runtime_s=runtime,
            throughput=b / runtime if runtime > 0 else math.nan,  # not positive: a violation, never returned
            memory_bytes=int(self.fixed.params_bytes) + sum(self.memory[i][j] for i, j in enumerate(choice)),
            params=int(self.fixed.params) + sum(self.params[i][j] for i, j in enumerate(choice)),
            method=method,
            proven_optimal=proven_optimal,
        )


def predicted_step_s(fixed_s: float, blocks_s: Iterable[float]) -> float:
    """A child's predicted decode step: the fixed (signed) residual plus its blocks' times, summed exactly."""
    return fixed_s + math.fsum(blocks_s)


def _check_number(value: Any, field: str, *, integer: bool = False, signed: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SearchError(f"{field}={value!r}: expected a {'whole ' if integer else ''}number")
    if not math.isfinite(value) or (value < 0 and not signed):
        raise SearchError(f"{field}={value!r}: expected a finite {'' if signed else 'non-negative '}number")
    if integer and value != int(value):
        raise SearchError(f"{field}={value!r}: expected a whole number")


def _runtime_at(runtime_s: Any, batch_size: int, field: str, signed: bool = False) -> float:
    if not isinstance(runtime_s, dict):
        raise SearchError(f"{field}={runtime_s!r}: expected a dict of batch size -> decode-step seconds")
    if batch_size not in runtime_s:
        raise SearchError(
            f"{field}: no entry for batch size {batch_size} (has {sorted(runtime_s)}); "
            "expected a decode-step time for every searched batch size"
        )
    value = runtime_s[batch_size]
    _check_number(value, f"{field}[{batch_size}]", signed=signed)
    return float(value)


def _check_positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SearchError(f"{field}={value!r}: expected a positive whole number")
    return int(value)


def _problem(
    layers: Sequence[Sequence[Candidate]], fixed: FixedCosts, budget: Budget, batch_size: int, seq_len: int
) -> _Problem:
    """Validate every input once, naming the offending field, and precompute per-candidate costs."""
    b = _check_positive_int(batch_size, "batch_size")
    seq = _check_positive_int(seq_len, "seq_len")
    if not isinstance(budget, Budget):
        raise SearchError(f"budget={budget!r}: expected a Budget")
    if not isinstance(fixed, FixedCosts):
        raise SearchError(f"fixed={fixed!r}: expected a FixedCosts")
    _runtime_at(fixed.runtime_s, b, "fixed.runtime_s", signed=True)  # a residual: negative when probes overshoot
    _check_number(fixed.params, "fixed.params", integer=True)
    _check_number(fixed.params_bytes, "fixed.params_bytes", integer=True)
    if len(layers) == 0:
        raise SearchError("layers=[]: expected at least one layer, each with at least one Candidate")
    runtime, memory, params, score = [], [], [], []
    for i, layer in enumerate(layers):
        if len(layer) == 0:
            raise SearchError(f"layers[{i}]=[]: expected at least one Candidate per layer")
        rt, mem, par, sc = [], [], [], []
        for j, cand in enumerate(layer):
            where = f"layers[{i}][{j}]"
            if not isinstance(cand, Candidate):
                raise SearchError(f"{where}={cand!r}: expected a Candidate")
            if isinstance(cand.score, bool) or not isinstance(cand.score, (int, float, np.integer, np.floating)):
                raise SearchError(f"{where}.score={cand.score!r}: expected a finite number")
            if not math.isfinite(cand.score):
                raise SearchError(f"{where}.score={cand.score!r}: expected a finite number")
            rt.append(_runtime_at(cand.runtime_s, b, f"{where}.runtime_s"))
            for name in ("params", "params_bytes", "kv_bytes_per_token"):
                _check_number(getattr(cand, name), f"{where}.{name}", integer=True)
            mem.append(int(cand.params_bytes) + b * seq * int(cand.kv_bytes_per_token))
            par.append(int(cand.params))
            sc.append(float(cand.score))
        runtime.append(rt)
        memory.append(mem)
        params.append(par)
        score.append(sc)
    return _Problem([list(layer) for layer in layers], fixed, budget, b, seq, runtime, memory, params, score)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not 0 <= alpha <= 1:
        raise SearchError(f"alpha={alpha!r}: expected a number in [0, 1] (the largest allowed share of equal layers)")
    return float(alpha)


def _check_avoid(avoid: Sequence[Sequence[int]], problem: _Problem) -> list[list[int]]:
    out = []
    for k, y in enumerate(avoid):
        y = list(y)
        if len(y) != problem.num_layers:
            raise SearchError(
                f"avoid[{k}] has {len(y)} entries: expected one candidate index per layer ({problem.num_layers})"
            )
        for i, j in enumerate(y):
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not 0 <= j < len(problem.layers[i]):
                raise SearchError(
                    f"avoid[{k}][{i}]={j!r}: expected a candidate index in [0, {len(problem.layers[i]) - 1}]"
                )
        out.append([int(j) for j in y])
    return out


# ------------------------------------------------------------------------------------------------- feasibility


def _fmt_bytes(n: float) -> str:
    return f"{int(n)} bytes ({n / GIB:.3f} GiB)"


def _unreachable(problem: _Problem) -> list[str]:
    """Budgets that no architecture meets even alone, each with the best value the search space can reach."""
    b, bud, fixed = problem.batch_size, problem.budget, problem.fixed
    fixed_rt = fixed.runtime_s[b]
    fastest = problem.fastest()
    reasons = []
    slowest = problem.slowest()
    if slowest < MIN_STEP_S:
        reasons.append(
            f"every architecture's predicted decode step is at most {slowest:.6g} s at batch size {b} (fixed residual "
            f"{fixed_rt:.6g} s): expected a positive time; the costs are degenerate, re-measure them"
        )
        return reasons
    if bud.min_throughput is not None and fastest > (b / bud.min_throughput) * (1 + REL_TOL):
        reasons.append(
            f"min_throughput={bud.min_throughput:g} tok/s is unreachable at batch size {b}: the fastest architecture "
            f"in the search space decodes {b / fastest:.6g} tok/s (step {fastest * 1e3:.6g} ms, of which "
            f"{fixed_rt * 1e3:.6g} ms fixed)"
        )
    if bud.max_step_latency_s is not None and fastest > bud.max_step_latency_s * (1 + REL_TOL):
        reasons.append(
            f"max_step_latency_s={bud.max_step_latency_s:g} is unreachable at batch size {b}: the fastest "
            f"architecture's decode step takes {fastest:.6g} s (of which {fixed_rt:.6g} s fixed)"
        )
    if bud.max_memory_bytes is not None:
        smallest = int(fixed.params_bytes) + sum(min(m) for m in problem.memory)
        if smallest > bud.max_memory_bytes:
            reasons.append(
                f"max_memory_bytes={int(bud.max_memory_bytes)} is unreachable at batch size {b}, seq_len "
                f"{problem.seq_len}: the smallest architecture needs {_fmt_bytes(smallest)} of parameters + KV cache"
            )
    if bud.max_params is not None:
        fewest = int(fixed.params) + sum(min(p) for p in problem.params)
        if fewest > bud.max_params:
            reasons.append(
                f"max_params={int(bud.max_params)} is unreachable: the smallest architecture has {fewest} parameters"
            )
    return reasons


def _violations(problem: _Problem, sol: Solution) -> list[str]:
    """Budgets a solution breaks, with its value and the limit (exact for bytes/params, 1e-9 relative for time)."""
    bud, out = problem.budget, []
    if bud.min_throughput is not None and sol.runtime_s > problem.batch_size / bud.min_throughput * (1 + REL_TOL):
        out.append(f"min_throughput: {sol.throughput:.6g} tok/s < {bud.min_throughput:g} tok/s")
    if bud.max_step_latency_s is not None and sol.runtime_s > bud.max_step_latency_s * (1 + REL_TOL):
        out.append(f"max_step_latency_s: {sol.runtime_s:.6g} s > {bud.max_step_latency_s:g} s")
    if bud.max_memory_bytes is not None and sol.memory_bytes > bud.max_memory_bytes:
        out.append(f"max_memory_bytes: {sol.memory_bytes} > {int(bud.max_memory_bytes)}")
    if bud.max_params is not None and sol.params > bud.max_params:
        out.append(f"max_params: {sol.params} > {int(bud.max_params)}")
    if not sol.runtime_s > 0:
        out.append(
            f"predicted step {sol.runtime_s:.6g} s is not positive (fixed residual "
            f"{problem.fixed.runtime_s[problem.batch_size]:.6g} s): outside the cost model"
        )
    return out


def is_feasible(
    layers: Sequence[Sequence[Candidate]],
    fixed: FixedCosts,
    budget: Budget,
    batch_size: int,
    seq_len: int,
    choice: Sequence[int],
) -> bool:
    """Whether ``choice`` meets every budget, with the same tolerances the solvers use (for callers and tests)."""
    problem = _problem(layers, fixed, budget, batch_size, seq_len)
    _check_avoid([choice], problem)
    return not _violations(problem, problem.evaluate(choice, "check"))


def evaluate(
    layers: Sequence[Sequence[Candidate]], fixed: FixedCosts, batch_size: int, seq_len: int, choice: Sequence[int]
) -> Solution:
    """Predicted score and costs of any choice (e.g. the parent's), as a Solution with method="given"."""
    problem = _problem(layers, fixed, Budget(), batch_size, seq_len)
    _check_avoid([choice], problem)
    return problem.evaluate(choice, "given")


def _budget_summary(budget: Budget) -> str:
    text = ", ".join(f"{n}={getattr(budget, n):g}" for n in _BUDGET_FIELDS if getattr(budget, n) is not None)
    return text or "none"


# ---------------------------------------------------------------------------------------------------------- MIP


_SECONDS_ROWS = ("runtime", "positive_step")  # rows in seconds (the others count bytes or parameters exactly)


@dataclass
class _Row:
    """One budget as a linear row over the layers' costs: Σ cost[i][j]·x_ij <= limit."""

    name: str
    cost: list[list[float]] | list[list[int]]
    limit: float


def _rows(problem: _Problem) -> list[_Row]:
    b, fixed, bud = problem.batch_size, problem.fixed, problem.budget
    rows = []
    step = problem.step_limit()
    if step is not None:
        # The same 1e-9 relative tolerance as the exact check, so solver and check agree on what fits.
        rows.append(_Row("runtime", problem.runtime, step * (1 + REL_TOL) - fixed.runtime_s[b]))
    if problem.fastest() < MIN_STEP_S:  # a negative fixed residual: exclude choices predicted at <= 0 s
        rows.append(
            _Row("positive_step", [[-r for r in rt] for rt in problem.runtime], fixed.runtime_s[b] - MIN_STEP_S)
        )
    if bud.max_memory_bytes is not None:
        rows.append(_Row("memory", problem.memory, int(bud.max_memory_bytes) - int(fixed.params_bytes)))
    if bud.max_params is not None:
        rows.append(_Row("params", problem.params, int(bud.max_params) - int(fixed.params)))
    return rows


def _row_used(row: _Row, choice: Sequence[int]) -> float | int:
    """A choice's exact layer sum on one row (fsum for seconds, integers for bytes and parameters)."""
    if row.name in _SECONDS_ROWS:
        return math.fsum(row.cost[i][j] for i, j in enumerate(choice))
    return sum(row.cost[i][j] for i, j in enumerate(choice))


def _milp(
    problem: _Problem, rows: list[_Row], avoid: list[list[int]], alpha: float, time_limit_s: float
) -> tuple[list[int] | None, bool, int, str]:
    """One HiGHS solve. Returns (choice or None, proven optimal, scipy status, solver message)."""
    sizes = [len(layer) for layer in problem.layers]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n, L = int(offsets[-1]), problem.num_layers

    # Objective: subtract each layer's best score (a constant, since one candidate per layer is chosen) and scale
    # the largest difference to _OBJ_SCALE so HiGHS's absolute gap (1e-6) cannot hide a better architecture.
    c = np.zeros(n)
    for i, sc in enumerate(problem.score):
        c[offsets[i] : offsets[i + 1]] = np.asarray(sc) - min(sc)
    if c.max() > 0:
        c *= _OBJ_SCALE / c.max()

    constraints = []
    one_hot = np.zeros((L, n))
    for i in range(L):
        one_hot[i, offsets[i] : offsets[i + 1]] = 1.0
    constraints.append(LinearConstraint(one_hot, 1.0, 1.0))

    for row in rows:
        # Shift by each layer's cheapest candidate and scale the traded range to _ROW_SCALE: at O(1) HiGHS accepts
        # overruns of ~1e-7 of the range; at 1e9 it returned a suboptimal "optimum" in tests; 1e6 was exact.
        a = np.zeros(n)
        slack, widest = float(row.limit), 0.0
        for i, costs in enumerate(row.cost):
            low = min(costs)
            a[offsets[i] : offsets[i + 1]] = np.asarray(costs, dtype=float) - float(low)
            slack -= float(low)
            widest += float(max(costs) - low)
        slack = max(slack, 0.0)
        if widest <= slack:
            continue  # even the most expensive combination fits this budget
        scale = _ROW_SCALE / max(slack, float(a.max()))
        constraints.append(LinearConstraint(a[None, :] * scale, -np.inf, slack * scale))

    if avoid:
        cap = math.floor(alpha * L + 1e-9)
        div = np.zeros((len(avoid), n))
        for k, y in enumerate(avoid):
            for i, j in enumerate(y):
                div[k, offsets[i] + j] = 1.0
        constraints.append(LinearConstraint(div, -np.inf, float(cap)))

    for presolve in (True, False):  # HiGHS occasionally reports "Solve error" after presolve; retry without it
        res = milp(
            c,
            integrality=np.ones(n),
            bounds=Bounds(np.zeros(n), np.ones(n)),
            constraints=constraints,
            options={"time_limit": float(time_limit_s), "mip_rel_gap": 0.0, "disp": False, "presolve": presolve},
        )
        if res.status != 4:
            break
    if res.x is None:
        return None, False, int(res.status), str(res.message)
    x = np.asarray(res.x)
    choice = [int(np.argmax(x[offsets[i] : offsets[i + 1]])) for i in range(L)]
    return choice, res.status == 0, int(res.status), str(res.message)


def solve_mip(
    layers: Sequence[Sequence[Candidate]],
    fixed: FixedCosts,
    budget: Budget,
    batch_size: int,
    seq_len: int,
    avoid: Sequence[Sequence[int]] = (),
    alpha: float = 0.8,
    time_limit_s: float = 60.0,
) -> Solution:
    """The best-scoring architecture within ``budget`` at ``batch_size`` (exact, up to ``time_limit_s``).

    ``avoid`` lists earlier solutions' choices; the result shares at most floor(alpha·L) layer choices with each.
    Raises SearchError for bad input, for a budget no architecture meets (naming it and the best reachable value),
    for budgets that are reachable one by one but not together, and when diversity leaves nothing feasible.
    """
    problem = _problem(layers, fixed, budget, batch_size, seq_len)
    alpha = _check_alpha(alpha)
    previous = _check_avoid(avoid, problem)
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float, np.integer, np.floating)):
        raise SearchError(f"time_limit_s={time_limit_s!r}: expected a positive number of seconds")
    if not time_limit_s > 0:
        raise SearchError(f"time_limit_s={time_limit_s!r}: expected a positive number of seconds")
    reasons = _unreachable(problem)
    if reasons:
        raise SearchError("; ".join(reasons))

    rows = _rows(problem)
    for attempt in range(_MAX_TIGHTEN):
        choice, optimal, status, message = _milp(problem, rows, previous, alpha, time_limit_s)
        if choice is None and attempt > 0 and status == 2:
            raise SearchError(
                f"at batch size {problem.batch_size} only architectures that overrun the budget "
                f"({_budget_summary(budget)}) by less than the solver's tolerance were found; relax it slightly"
            )
        if choice is None:
            raise SearchError(_why_infeasible(problem, rows, previous, alpha, time_limit_s, status, message))
        sol = problem.evaluate(choice, "mip", proven_optimal=optimal)
        if not _violations(problem, sol):
            return sol
        # HiGHS accepted the choice within its own (partly relative, ~1e-10) feasibility tolerance: pull each row it
        # overruns below this choice's use by a margin that grows 4x per retry (at least one byte/parameter).
        for row in rows:
            used = _row_used(row, choice)
            if used > row.limit:
                margin = _TIGHTEN_MARGIN * 4**attempt * abs(float(row.limit))
                if row.name not in _SECONDS_ROWS:
                    margin = max(math.ceil(margin), 1)
                row.limit = row.limit - max(used - row.limit, margin)
    raise SearchError(
        f"the MIP kept returning choices that break the budget ({_budget_summary(budget)}) at batch size "
        f"{problem.batch_size} by less than the solver tolerance; relax the budget slightly"
    )


def _why_infeasible(
    problem: _Problem,
    rows: list[_Row],
    previous: list[list[int]],
    alpha: float,
    time_limit_s: float,
    status: int,
    message: str,
) -> str:
    """Explain a solve without a solution: time limit, solver failure, diversity, or budgets that clash."""
    b = problem.batch_size
    if status == 1:
        return (
            f"the MIP found no architecture within time_limit_s={time_limit_s:g} at batch size {b} ({message}); "
            "raise time_limit_s"
        )
    if status != 2:
        return f"the MIP solver failed at batch size {b} ({message})"
    if previous:
        # Is it the diversity constraint? Re-solve without it.
        choice, _, _, _ = _milp(problem, rows, [], alpha, time_limit_s)
        if choice is not None:
            need = problem.num_layers - math.floor(alpha * problem.num_layers + 1e-9)
            return (
                f"no architecture within the budget ({_budget_summary(problem.budget)}) at batch size {b} differs "
                f"from each of the {len(previous)} previous solution(s) in at least {need} of "
                f"{problem.num_layers} layers (alpha={alpha:g})"
            )
    return (
        f"the budgets {_budget_summary(problem.budget)} cannot all be met at once at batch size {b}, seq_len "
        f"{problem.seq_len}, although each alone can ({_best_values(problem)})"
    )


def _best_values(problem: _Problem) -> str:
    b, fixed = problem.batch_size, problem.fixed
    fastest = problem.fastest()
    smallest = int(fixed.params_bytes) + sum(min(m) for m in problem.memory)
    fewest = int(fixed.params) + sum(min(p) for p in problem.params)
    speed = f"{b / fastest:.6g}" if fastest > 0 else "undefined (not positive: such choices are excluded)"
    return (
        f"fastest step {fastest:.6g} s = {speed} tok/s; smallest memory {_fmt_bytes(smallest)}; "
        f"fewest parameters {fewest}"
    )


def solve_diverse(
    layers: Sequence[Sequence[Candidate]],
    fixed: FixedCosts,
    budget: Budget,
    batch_size: int,
    seq_len: int,
    n_solutions: int,
    alpha: float = 0.8,
    time_limit_s: float = 60.0,
) -> list[Solution]:
    """Up to ``n_solutions`` MIP optima, each differing from all earlier ones in >= ceil((1-alpha)·L) layers.

    The first solve's errors propagate; after that, the first SearchError (typically: diversity leaves nothing within
    the budget) ends the list early, so fewer than ``n_solutions`` may come back.
    """
    n = _check_positive_int(n_solutions, "n_solutions")
    solutions = [solve_mip(layers, fixed, budget, batch_size, seq_len, alpha=alpha, time_limit_s=time_limit_s)]
    while len(solutions) < n:
        try:
            solutions.append(
                solve_mip(
                    layers,
                    fixed,
                    budget,
                    batch_size,
                    seq_len,
                    avoid=[s.choice for s in solutions],
                    alpha=alpha,
                    time_limit_s=time_limit_s,
                )
            )
        except SearchError:
            break
    return solutions


# ------------------------------------------------------------------------------------------------------- greedy


def greedy_baseline(
    layers: Sequence[Sequence[Candidate]], fixed: FixedCosts, budget: Budget, batch_size: int, seq_len: int
) -> Solution:
    """The paper's budget-constrained greedy baseline (paper-digest §1.6), to show what the MIP buys.

    Exactly what it does:

    1. Budgets become layer-side limits R_r (total budget minus fixed costs) for each set resource r: runtime (the
       tighter of ``min_throughput`` and ``max_step_latency_s``), memory, parameters. Each layer's share is R_r / L.
    2. Layers are visited in ascending order of the mean score over their candidates (easiest first; ties by index).
    3. At the k-th visited layer the allowance is k·R_r/L minus what the earlier visited layers used, i.e. its even
       share plus the unused budget carried from earlier layers (a negative carry, from an overrun, is carried too).
    4. It takes the lowest-score candidate whose costs fit every allowance (ties: cheaper, then lower index); if none
       fits, the cheapest candidate, measured as Σ_r cost_r / R_r (ties: lower score, then lower index).
    5. The result is checked against the budget in exact arithmetic; if it breaks it (possible even when the MIP
       finds a feasible architecture), SearchError names the broken budgets and their values.

    With no budget set it returns the per-layer best scores. Returns ``method="greedy"``.
    """
    problem = _problem(layers, fixed, budget, batch_size, seq_len)
    reasons = _unreachable(problem)
    if reasons:
        raise SearchError("; ".join(reasons))
    # The positive-step row is not a budget to share out; the final check rejects a choice predicted at <= 0 s.
    rows = [row for row in _rows(problem) if row.name != "positive_step"]
    L = problem.num_layers
    means = [float(np.mean(sc)) for sc in problem.score]
    order = sorted(range(L), key=lambda i: (means[i], i))
    spent = [0.0] * len(rows)
    choice = [0] * L

    def weight(row: _Row) -> float:
        return max(float(row.limit), 1e-300)

    for k, i in enumerate(order, start=1):
        allowance = [k * float(row.limit) / L - spent[r] for r, row in enumerate(rows)]
        slack = [1e-12 * abs(float(row.limit)) for row in rows]
        options = range(len(problem.layers[i]))
        cheapness = {j: sum(float(row.cost[i][j]) / weight(row) for row in rows) for j in options}
        fits = [j for j in options if all(row.cost[i][j] <= allowance[r] + slack[r] for r, row in enumerate(rows))]
        if fits:
            j = min(fits, key=lambda j: (problem.score[i][j], cheapness[j], j))
        else:
            j = min(options, key=lambda j: (cheapness[j], problem.score[i][j], j))
        choice[i] = j
        for r, row in enumerate(rows):
            spent[r] += float(row.cost[i][j])

    sol = problem.evaluate(choice, "greedy")
    broken = _violations(problem, sol)
    if broken:
        raise SearchError(
            f"the greedy baseline breaks the budget at batch size {problem.batch_size}: {'; '.join(broken)} "
            f"(the search space can reach each budget: {_best_values(problem)})"
        )
    return sol


# -------------------------------------------------------------------------------------------------------- sweep


def sweep_batch_sizes(
    layers: Sequence[Sequence[Candidate]],
    fixed: FixedCosts,
    budget: Budget,
    batch_sizes: Sequence[int],
    seq_len: int,
    time_limit_s: float = 60.0,
) -> tuple[Solution, list[dict[str, Any]]]:
    """Solve the MIP at each batch size and keep the best score (ties: higher throughput, then smaller batch).

    The batch size is not a MIP variable (the paper solves per batch size). Returns the best solution and a per-batch
    log: ``{"batch_size", "feasible", ...}`` with the solution's score/costs or the infeasibility ``reason``. Input
    errors (e.g. a batch size without measured runtimes) raise at once; if every batch size is infeasible, the
    SearchError lists each one's reason.
    """
    if isinstance(batch_sizes, (str, bytes)) or len(batch_sizes) == 0:
        raise SearchError(f"batch_sizes={batch_sizes!r}: expected a non-empty list of positive whole numbers")
    sizes: list[int] = []
    for k, b in enumerate(batch_sizes):
        b = _check_positive_int(b, f"batch_sizes[{k}]")
        if b not in sizes:
            sizes.append(b)
    for b in sizes:  # validate everything before solving, so bad input is never logged as "infeasible"
        _problem(layers, fixed, budget, b, seq_len)

    log: list[dict[str, Any]] = []
    best: Solution | None = None
    for b in sizes:
        try:
            sol = solve_mip(layers, fixed, budget, b, seq_len, time_limit_s=time_limit_s)
        except SearchError as err:
            log.append({"batch_size": b, "feasible": False, "reason": str(err)})
            continue
        log.append(
            {
                "batch_size": b,
                "feasible": True,
                "score": sol.score,
                "runtime_s": sol.runtime_s,
                "throughput": sol.throughput,
                "memory_bytes": sol.memory_bytes,
                "params": sol.params,
            }
        )
        if best is None or (sol.score, -sol.throughput) < (best.score, -best.throughput):
            best = sol
    if best is None:
        detail = "; ".join(f"batch size {e['batch_size']}: {e['reason']}" for e in log)
        raise SearchError(f"no batch size meets the budget ({_budget_summary(budget)}): {detail}")
    return best, log
