"""Training-free initialisation of Puzzle's child sub-blocks from the parent's (paper-digest §1.2, Puzzle App. A).

A child block starts from its parent's weights, so BLD starts near the parent instead of from noise:

    reduced-width FFN  keep the channels with the highest mean contribution   `ChannelContributionMeter`, `pruned_mlp`
    linear FFN         W_down @ W_up (the gate is ignored)                    `linear_mlp`
    fewer KV heads     mean-pool the K and V heads of each new group (GQA)    `fewer_kv_heads_attention`
    linear attention   W_o @ W_v ("every token attends only to itself")       `linear_attention`

Option (not in the paper): `LinearFit` streams calibration pairs and gives the least-squares linear map instead of
the weight product, for `linear_mlp` and `linear_attention` (`fit=`); the paper's products stay the default. On
SmolLM2-135M (layers 2/10/20/28, fit on 8k tokens, scored on 1.5k held-out ones, output MSE / parent output power)
the products scored 1.0-12.8 for the FFN and 2.5-11.5 for attention, i.e. no better than a zero output (1.0), the
fits 0.09-0.30 and 0.28-0.56. BLD trains either further; the fit is the better start whenever calibration is at hand.

Every function returns a *new* module built as `build_attention` / `build_ffn` build that block (same class,
parameter names and shapes, so state dicts load into a model whose `block_configs` name the block), on the parent's
device and dtype, with storage of its own: the parent is only read. Products and means are taken in fp32 and cast to
the parent's dtype once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.configuration import DeciLMConfig
from open_nemotron.model.modeling import DeciLMAttention, DeciLMLinearAttention, DeciLMLinearMLP, DeciLMMLP


class PuzzleInitError(OpenNemotronError, ValueError):
    """A child block that cannot be initialised from this parent block as asked."""


# ----------------------------------------------------------------------------------------------- helpers


def _owned(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` as a contiguous copy with `like`'s dtype and device: never a view of the parent's storage."""
    return tensor.detach().to(device=like.device, dtype=like.dtype, copy=True, memory_format=torch.contiguous_format)


def _assemble(factory, state: dict[str, torch.Tensor], training: bool) -> nn.Module:
    """Build a module on the meta device (no throwaway random init) and give it `state`; load_state_dict(strict)
    checks that names and shapes are exactly what the model builds for this block."""
    with torch.device("meta"):
        module = factory()
    module.load_state_dict(state, strict=True, assign=True)
    return module.train(training)


def _check_bias(linear: nn.Linear, expected: bool, flag: str, what: str) -> None:
    if (linear.bias is not None) != expected:
        has = "has" if linear.bias is not None else "has no"
        raise PuzzleInitError(f"{what} {has} bias but the child config says {flag}={expected}: expected them to agree")


def _check_hidden(module_hidden: int, config: DeciLMConfig, what: str) -> None:
    if module_hidden != config.hidden_size:
        raise PuzzleInitError(
            f"{what} works on hidden size {module_hidden} but the child config has hidden_size={config.hidden_size}"
        )


def _intermediate(mlp: DeciLMMLP, ffn_inputs: torch.Tensor) -> torch.Tensor:
    """X = silu(gate(x)) * up(x): what down_proj receives."""
    hidden = mlp.up_proj.in_features
    if ffn_inputs.shape[-1] != hidden:
        raise PuzzleInitError(f"FFN inputs have last dimension {ffn_inputs.shape[-1]}: expected hidden size {hidden}")
    x = ffn_inputs.to(mlp.up_proj.weight.dtype)
    with torch.no_grad():
        return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


def _down_column_norms(mlp: DeciLMMLP) -> torch.Tensor:
    """||W_down[:, i]||_2 for every intermediate channel i (torch weight layout [hidden, intermediate]), fp32."""
    return torch.linalg.vector_norm(mlp.down_proj.weight.detach().float(), dim=0)


# ----------------------------------------------------------------------------------------------- channel contributions


class ChannelContributionMeter:
    """Streams calibration batches through one parent FFN and keeps its mean channel contributions.

    Puzzle prunes FFN channels by their mean contribution over a calibration set; a calibration set does not fit in
    one batch, so the running sum of |X_i| and the token count are kept (fp64 across batches) and the contribution
    is formed at the end: mean_t |X_i(t)| * ||W_down[:, i]||.
    """

    def __init__(self, mlp: DeciLMMLP) -> None:
        self.mlp = mlp
        self.tokens = 0
        self._abs_sum: torch.Tensor | None = None

    def update(self, ffn_inputs: torch.Tensor) -> None:
        """Add a batch of the FFN's inputs (after `post_attention_layernorm`), [..., hidden]."""
        self.update_intermediate(_intermediate(self.mlp, ffn_inputs))

    def update_intermediate(self, activations: torch.Tensor) -> None:
        """Add a batch of intermediate activations X (what `down_proj` receives, e.g. from a forward pre-hook),
        [..., intermediate]: saves recomputing gate and up when the parent's forward pass already did."""
        size = self.mlp.intermediate_size
        if activations.shape[-1] != size:
            raise PuzzleInitError(f"activations have last dimension {activations.shape[-1]}: expected {size}")
        rows = activations.detach().reshape(-1, size)
        batch_sum = rows.float().abs().sum(0).double()
        self._abs_sum = batch_sum if self._abs_sum is None else self._abs_sum + batch_sum
        self.tokens += rows.shape[0]

    def mean(self) -> torch.Tensor:
        """Mean contribution of every channel over all tokens seen, [intermediate], fp32."""
        if self._abs_sum is None or self.tokens == 0:
            raise PuzzleInitError("no calibration tokens were given to the channel-contribution meter")
        mean_abs = (self._abs_sum / self.tokens).float()
        return mean_abs * _down_column_norms(self.mlp).to(mean_abs.device)


def channel_contributions(mlp: DeciLMMLP, ffn_inputs: torch.Tensor) -> torch.Tensor:
    """Puzzle's channel contribution of every FFN channel, averaged over the tokens of `ffn_inputs` [..., hidden].

    Removing channel i changes one token's FFN output by ||X_i W_down[:, i]|| = |X_i| * ||W_down[:, i]||, with
    X = silu(gate(x)) * up(x); channels that change the output least on average are the ones to drop.
    Returns [intermediate], fp32.
    """
    meter = ChannelContributionMeter(mlp)
    meter.update(ffn_inputs)
    return meter.mean()


def kept_channels(contributions: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Indices of the `intermediate_size` highest contributions, ascending (channels keep their original order).
    Ties go to the lower index, so the choice is deterministic."""
    if contributions.dim() != 1:
        raise PuzzleInitError(f"contributions have shape {tuple(contributions.shape)}: expected one value per channel")
    full = contributions.shape[0]
    if not isinstance(intermediate_size, int) or not 1 <= intermediate_size <= full:
        raise PuzzleInitError(f"intermediate_size = {intermediate_size!r}: expected an integer in 1..{full}")
    if not bool(torch.isfinite(contributions).all()):
        raise PuzzleInitError("contributions contain NaN or infinite values")
    order = torch.argsort(contributions.detach().float().cpu(), descending=True, stable=True)
    return order[:intermediate_size].sort().values


def pruned_mlp(
    parent: DeciLMMLP, config: DeciLMConfig, intermediate_size: int, contributions: torch.Tensor
) -> DeciLMMLP:
    """The parent SwiGLU narrowed to its `intermediate_size` highest-contribution channels (rows of gate/up and
    their biases, columns of down; down's bias kept): the child computes the parent's output minus the dropped
    channels' terms, the least damage per channel by the contribution measure."""
    _check_hidden(parent.up_proj.in_features, config, "the parent FFN")
    _check_bias(parent.gate_proj, config.mlp_bias, "mlp_bias", "the parent FFN")
    if contributions.shape != (parent.intermediate_size,):
        raise PuzzleInitError(
            f"contributions have shape {tuple(contributions.shape)}: expected ({parent.intermediate_size},), one per "
            "parent channel"
        )
    keep = kept_channels(contributions, intermediate_size).to(parent.gate_proj.weight.device)
    gate, up, down = parent.gate_proj, parent.up_proj, parent.down_proj
    state = {
        "gate_proj.weight": _owned(gate.weight.index_select(0, keep), gate.weight),
        "up_proj.weight": _owned(up.weight.index_select(0, keep), up.weight),
        "down_proj.weight": _owned(down.weight.index_select(1, keep), down.weight),
    }
    if config.mlp_bias:
        state["gate_proj.bias"] = _owned(gate.bias.index_select(0, keep), gate.bias)
        state["up_proj.bias"] = _owned(up.bias.index_select(0, keep), up.bias)
        state["down_proj.bias"] = _owned(down.bias, down.bias)
    return _assemble(lambda: DeciLMMLP(config, intermediate_size), state, parent.training)


# ----------------------------------------------------------------------------------------------- least-squares option


class LinearFit:
    """Streams (input, target) pairs and solves for the bias-free W minimising ||X W^T - Y||^2 (+ a small ridge).

    An option beside the paper's weight products: it fits exactly what BLD then minimises (the block's output on
    calibration inputs), where W_down @ W_up ignores the gate and W_o @ W_v ignores every other token. Only the normal
    equations are kept (X^T X [in, in] and X^T Y [in, out], per batch in fp32, summed in fp64), so the memory does not
    grow with the number of tokens. `ridge` damps X^T X by ridge * its mean diagonal, which keeps the solve defined
    with fewer tokens than features (0 = plain least squares, needs full-rank inputs).
    """

    def __init__(self, in_features: int, out_features: int, ridge: float = 1e-6) -> None:
        if ridge < 0:
            raise PuzzleInitError(f"ridge = {ridge!r}: expected a non-negative number")
        self.in_features = in_features
        self.out_features = out_features
        self.ridge = ridge
        self.rows = 0
        self._gram: torch.Tensor | None = None
        self._cross: torch.Tensor | None = None

    def update(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: `inputs` [..., in_features] and the parent block's outputs for them, [..., out_features]."""
        if inputs.shape[-1] != self.in_features or targets.shape[-1] != self.out_features:
            raise PuzzleInitError(
                f"fit batch has inputs [..., {inputs.shape[-1]}] and targets [..., {targets.shape[-1]}]: expected "
                f"[..., {self.in_features}] and [..., {self.out_features}]"
            )
        x = inputs.detach().reshape(-1, self.in_features).float()
        y = targets.detach().reshape(-1, self.out_features).float().to(x.device)
        if x.shape[0] != y.shape[0]:
            raise PuzzleInitError(f"fit batch has {x.shape[0]} input rows but {y.shape[0]} target rows")
        gram, cross = (x.T @ x).double(), (x.T @ y).double()
        self._gram = gram if self._gram is None else self._gram + gram
        self._cross = cross if self._cross is None else self._cross + cross
        self.rows += x.shape[0]

    def solve(self) -> torch.Tensor:
        """W, [out_features, in_features], fp32."""
        if self._gram is None or self.rows == 0:
            raise PuzzleInitError("no calibration rows were given to the least-squares fit")
        if not self.ridge and self.rows < self.in_features:
            raise PuzzleInitError(
                f"least-squares fit is singular ({self.rows} rows, {self.in_features} features): use ridge > 0 or "
                "more calibration tokens"
            )
        gram = self._gram
        if self.ridge:
            damp = self.ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
            gram = gram + damp * torch.eye(self.in_features, dtype=gram.dtype, device=gram.device)
        try:
            solution = torch.linalg.solve(gram, self._cross)  # (X^T X) W^T = X^T Y
        except RuntimeError as err:  # torch.linalg.LinAlgError: singular normal equations
            raise PuzzleInitError(
                f"least-squares fit is singular ({self.rows} rows, {self.in_features} features): use ridge > 0 or "
                "more calibration tokens"
            ) from err
        return solution.T.float()


def _fitted_weight(fit: LinearFit, hidden: int) -> torch.Tensor:
    if (fit.in_features, fit.out_features) != (hidden, hidden):
        raise PuzzleInitError(
            f"fit maps {fit.in_features} -> {fit.out_features} features: expected {hidden} -> {hidden}"
        )
    return fit.solve()


# ----------------------------------------------------------------------------------------------- linear FFN


def linear_mlp(parent: DeciLMMLP, config: DeciLMConfig, fit: LinearFit | None = None) -> DeciLMLinearMLP:
    """A linear FFN from the parent SwiGLU.

    Default (Puzzle): W = W_down @ W_up, the FFN with its gate ignored (silu(gate) taken as 1); biases, if any, are
    dropped (the target is bias-free). With `fit` (a `LinearFit` of the FFN's inputs -> the parent FFN's outputs),
    W is the least-squares map on those inputs instead.
    """
    _check_hidden(parent.up_proj.in_features, config, "the parent FFN")
    like = parent.down_proj.weight
    if fit is None:
        weight = parent.down_proj.weight.detach().float() @ parent.up_proj.weight.detach().float()
    else:
        weight = _fitted_weight(fit, config.hidden_size)
    state = {"linear_mlp.weight": _owned(weight, like)}
    return _assemble(lambda: DeciLMLinearMLP(config), state, parent.training)


# ----------------------------------------------------------------------------------------------- attention


def _check_attention(parent: DeciLMAttention, config: DeciLMConfig) -> None:
    _check_hidden(parent.q_proj.in_features, config, "the parent attention")
    if parent.num_heads != config.num_attention_heads or parent.head_dim != config.head_dim:
        raise PuzzleInitError(
            f"the parent attention has {parent.num_heads} heads of size {parent.head_dim} but the child config has "
            f"num_attention_heads={config.num_attention_heads}, head_dim={config.head_dim}"
        )


def fewer_kv_heads_attention(
    parent: DeciLMAttention, config: DeciLMConfig, num_key_value_heads: int, layer_idx: int
) -> DeciLMAttention:
    """GQA with fewer KV heads by mean pooling (GQA paper, Ainslie et al. 2023): the parent's KV heads are split
    into `num_key_value_heads` consecutive groups, and each new K (V) head is its group's mean K (V) projection.

    Consecutive groups are what GQA's head sharing needs: query head h reads parent KV head h // (H / P) and new
    KV head h // (H / n) = (parent head) // (P / n). q_proj and o_proj are copied. With n equal to the parent's
    count, the child equals the parent.
    """
    _check_attention(parent, config)
    _check_bias(parent.q_proj, config.attention_bias, "attention_bias", "the parent attention")
    parent_kv = parent.num_key_value_heads
    if not isinstance(num_key_value_heads, int) or num_key_value_heads < 1 or parent_kv % num_key_value_heads:
        divisors = [d for d in range(1, parent_kv + 1) if parent_kv % d == 0]
        raise PuzzleInitError(
            f"num_key_value_heads = {num_key_value_heads!r}: expected a divisor of the parent's {parent_kv} KV heads, "
            f"one of {divisors}"
        )
    n, group, head_dim = num_key_value_heads, parent_kv // num_key_value_heads, parent.head_dim

    def pooled(t: torch.Tensor) -> torch.Tensor:  # [P * head_dim, ...] -> [n * head_dim, ...]
        heads = t.detach().float().reshape(n, group, head_dim, *t.shape[1:])
        return _owned(heads.mean(1).reshape(n * head_dim, *t.shape[1:]), t)

    state = {
        "q_proj.weight": _owned(parent.q_proj.weight, parent.q_proj.weight),
        "k_proj.weight": pooled(parent.k_proj.weight),
        "v_proj.weight": pooled(parent.v_proj.weight),
        "o_proj.weight": _owned(parent.o_proj.weight, parent.o_proj.weight),
    }
    if config.attention_bias:
        state["q_proj.bias"] = _owned(parent.q_proj.bias, parent.q_proj.bias)
        state["k_proj.bias"] = pooled(parent.k_proj.bias)
        state["v_proj.bias"] = pooled(parent.v_proj.bias)
        state["o_proj.bias"] = _owned(parent.o_proj.bias, parent.o_proj.bias)
    return _assemble(lambda: DeciLMAttention(config, n, layer_idx), state, parent.training)


def linear_attention(
    parent: DeciLMAttention, config: DeciLMConfig, fit: LinearFit | None = None
) -> DeciLMLinearAttention:
    """A linear attention from the parent attention.

    Default (Puzzle): W = W_o · W_v, the attention of a token that attends only to itself (softmax over one key is 1,
    so the output is o_proj(v)); exact for a sequence of length 1. With GQA, query head h reads KV head h // group:
    summing each group's o_proj column blocks before multiplying by that KV head's v_proj rows is the same product as
    expanding W_v to the query heads, `group` times cheaper. q/k projections (and biases) do not matter for a single
    key. A v_proj / o_proj bias would add the constant W_o·b_v + b_o to every output; the target is a bias-free Linear
    (NVIDIA's format has no bias for it) and its input is RMS-normalised, so the constant cannot be folded in and is
    dropped. With `fit` (a `LinearFit` of attention inputs -> the parent attention's outputs, per token), W is the
    least-squares map on those pairs instead.
    """
    _check_attention(parent, config)
    like = parent.o_proj.weight
    if fit is None:
        kv, heads, head_dim, hidden = parent.num_key_value_heads, parent.num_heads, parent.head_dim, config.hidden_size
        group = heads // kv
        w_o = parent.o_proj.weight.detach().float().reshape(hidden, kv, group, head_dim).sum(2)  # [hidden, kv, hd]
        w_v = parent.v_proj.weight.detach().float()  # [kv * hd, hidden]
        weight = w_o.reshape(hidden, kv * head_dim) @ w_v
    else:
        weight = _fitted_weight(fit, config.hidden_size)
    state = {"linear_attn.weight": _owned(weight, like)}
    return _assemble(lambda: DeciLMLinearAttention(config), state, parent.training)


__all__ = [
    "ChannelContributionMeter",
    "LinearFit",
    "PuzzleInitError",
    "channel_contributions",
    "fewer_kv_heads_attention",
    "kept_channels",
    "linear_attention",
    "linear_mlp",
    "pruned_mlp",
]
