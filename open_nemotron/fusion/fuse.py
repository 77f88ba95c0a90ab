"""FFN Fusion (digest §2): a run of consecutive attention-free layers becomes one layer with one wider SwiGLU.

A layer without attention computes x + FFN_k(norm_k(x)). A run of them, computed in parallel from the run's input
and summed, is x + Σ_k FFN_k(norm_k(x)), and a sum of SwiGLUs is one SwiGLU (Theorem 3.1): gate and up weights
concatenated on the output dimension, down weights on the input dimension. Each FFN keeps its own RMSNorm scale
s_k, folded into its gate/up columns (W·diag(s_k)); the fused layer's norm has unit scale, so the fused layer
computes exactly x + Σ_k FFN_k(norm_k(x)) (the paper's Eq. 5 uses the last layer's norm for all; folding is the
exact form of the same parallel computation).

What fusion changes is the *input* of every FFN but the first: it sees the run's input instead of its
predecessor's output. The block-dependency analysis (`analysis.py`) measures how much that matters; fused models
are healed by `distill` like any child.

The fused model is in our format with fewer layers; its config records `source_layers` (for each layer, the
original layers it stands for), which distillation uses to align it with its parent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from open_nemotron.errors import OpenNemotronError


class FusionError(OpenNemotronError, ValueError):
    """Layers that cannot be fused as asked."""


def attention_free_runs(config) -> list[list[int]]:
    """Maximal runs of consecutive layers without attention whose FFN is a SwiGLU or absent, each holding at least
    two SwiGLU FFNs (fewer leaves nothing to fuse). Linear attention and linear FFNs end a run: neither is a SwiGLU,
    so neither joins a wider one."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i, blocks in enumerate(config.layers_blocks()):
        if blocks.attention.kind == "no_op" and blocks.ffn.kind in ("swiglu", "no_op"):
            current.append(i)
            continue
        runs.append(current)
        current = []
    runs.append(current)
    blocks = config.layers_blocks()
    return [r for r in runs if sum(blocks[i].ffn.kind == "swiglu" for i in r) >= 2]


@dataclass(frozen=True)
class FusionPlan:
    """The layer groups to fuse (each: original layer indices, consecutive, attention-free)."""

    groups: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups]}


def plan_fusion(
    config,
    runs: list[list[int]] | None = None,
    max_width: int | None = None,
    exclude_last: bool = False,
) -> FusionPlan:
    """Groups to fuse from `runs` (default: every attention-free run): optionally without each run's last FFN (the
    paper found it sensitive), split into consecutive chunks whose summed FFN width stays within `max_width`.
    A group must hold two or more SwiGLU FFNs to be worth a layer of its own."""
    blocks = config.layers_blocks()
    runs = attention_free_runs(config) if runs is None else runs
    groups: list[tuple[int, ...]] = []
    for run in runs:
        run = sorted(run)
        _check_group(blocks, run)
        ffn_layers = [i for i in run if blocks[i].ffn.kind == "swiglu"]
        if exclude_last and ffn_layers:
            run = [i for i in run if i < ffn_layers[-1]]
        chunk: list[int] = []
        width = 0
        for i in run:
            w = blocks[i].ffn.intermediate_size or 0
            if max_width is not None and w > max_width:
                raise FusionError(f"layer {i}: FFN width {w} exceeds max_width {max_width}")
            if max_width is not None and chunk and width + w > max_width:
                groups.append(tuple(chunk))
                chunk, width = [], 0
            chunk.append(i)
            width += w
        groups.append(tuple(chunk))
    kept = tuple(g for g in groups if sum(blocks[i].ffn.kind == "swiglu" for i in g) >= 2)
    return FusionPlan(kept)


def _check_group(blocks, group) -> None:
    group = list(group)
    if not group or group != list(range(group[0], group[-1] + 1)) or group[-1] >= len(blocks) or group[0] < 0:
        raise FusionError(f"layers {group}: expected consecutive layers of the model (0..{len(blocks) - 1})")
    for i in group:
        if blocks[i].attention.kind != "no_op" or blocks[i].ffn.kind not in ("swiglu", "no_op"):
            raise FusionError(
                f"layer {i} has {blocks[i].attention.kind} attention and a {blocks[i].ffn.kind} FFN: expected "
                "no attention and a SwiGLU (or no) FFN"
            )


def fused_mlp_weights(layers: list, hidden_size: int) -> dict[str, torch.Tensor]:
    """The fused SwiGLU of `layers` (decoder layers without attention; those without FFN add nothing): gate/up
    [Σ widths, hidden] with each FFN's norm scale folded into its columns, down [hidden, Σ widths]."""
    gates, ups, downs = [], [], []
    for layer in layers:
        if layer.ffn_kind == "no_op":
            continue
        scale = layer.post_attention_layernorm.weight.detach().float()
        mlp = layer.mlp
        if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None or mlp.down_proj.bias is not None:
            raise FusionError("FFNs with biases: the fused down projection would add every bias once; not supported")
        dtype = mlp.gate_proj.weight.dtype
        gates.append((mlp.gate_proj.weight.detach().float() * scale[None, :]).to(dtype))
        ups.append((mlp.up_proj.weight.detach().float() * scale[None, :]).to(dtype))
        downs.append(mlp.down_proj.weight.detach())
    if not gates:
        raise FusionError("no FFN to fuse in this group")
    return {
        "mlp.gate_proj.weight": torch.cat(gates, 0).contiguous(),
        "mlp.up_proj.weight": torch.cat(ups, 0).contiguous(),
        "mlp.down_proj.weight": torch.cat(downs, 1).contiguous(),
        "post_attention_layernorm.weight": torch.ones(hidden_size, dtype=downs[0].dtype),
    }


def _rebuild(model, layer_groups: list[tuple[int, ...]], new_layers: list[dict[str, Any]]):
    """A new model whose layer n is `new_layers[n]` = {"blocks": LayerBlocks, "state": {name: tensor}}; every
    other weight (embeddings, final norm, LM head) is the model's own."""
    from open_nemotron.model.configuration import DeciLMConfig, block_config_dict
    from open_nemotron.model.modeling import DeciLMForCausalLM

    config = model.config
    sources = getattr(config, "source_layers", None) or [[i] for i in range(config.num_hidden_layers)]
    data = config.to_dict()
    data.pop("layer_types", None)
    data.update(
        num_hidden_layers=len(new_layers),
        block_configs=[
            block_config_dict(entry["blocks"], config.num_attention_heads, config.hidden_size) for entry in new_layers
        ],
        source_layers=[[s for i in group for s in sources[i]] for group in layer_groups],
    )
    new_config = DeciLMConfig.from_dict(data)
    ref = model.model.embed_tokens.weight
    with torch.device("meta"):
        new = DeciLMForCausalLM(new_config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for n, entry in enumerate(new_layers):
        state.update({f"model.layers.{n}.{k}": v for k, v in entry["state"].items()})
    new.load_state_dict(state, strict=True, assign=True)
    new.tie_weights()
    # The source's sampling defaults and special ids, not ones derived afresh from its config (a Trainer leaves
    # `config.use_cache = False`, which a derived generation config would turn into cache-less generation).
    new.generation_config = copy.deepcopy(model.generation_config)
    with torch.device(ref.device):
        new.model.rotary_emb = type(model.model.rotary_emb)(config=new_config)
    return new.to(device=ref.device, dtype=ref.dtype).eval()


def _partition(blocks, plan: FusionPlan) -> list[tuple[int, ...]]:
    """Every layer in order, as the plan's groups (each checked) and single layers between them; groups that share
    a layer are refused."""
    owner: dict[int, tuple[int, ...]] = {}
    for group in plan.groups:
        _check_group(blocks, group)
        for i in group:
            if i in owner:
                raise FusionError(
                    f"layer {i} is in two groups, {list(owner[i])} and {list(group)}: expected disjoint groups"
                )
            owner[i] = tuple(group)
    out, i = [], 0
    while i < len(blocks):
        group = owner.get(i, (i,))
        out.append(group)
        i = group[-1] + 1
    return out


def fuse(model, plan: FusionPlan):
    """A new model with each group of `plan` replaced by one fused layer (the input model is left as it is)."""
    from open_nemotron.model.configuration import AttentionBlock, FFNBlock, LayerBlocks

    blocks = model.config.layers_blocks()
    groups = _partition(blocks, plan)
    fused = set(plan.groups)
    new_layers: list[dict[str, Any]] = []
    for group in groups:
        if group in fused:
            weights = fused_mlp_weights([model.model.layers[k] for k in group], model.config.hidden_size)
            width = weights["mlp.gate_proj.weight"].shape[0]
            fused_blocks = LayerBlocks(
                AttentionBlock("no_op"), FFNBlock("swiglu", width, blocks[group[0]].ffn.hidden_act)
            )
            new_layers.append({"blocks": fused_blocks, "state": weights})
        else:
            (i,) = group
            new_layers.append({"blocks": blocks[i], "state": dict(model.model.layers[i].state_dict())})
    return _rebuild(model, groups, new_layers)


def remove_ffns(model, plan: FusionPlan):
    """The comparison fusion is judged against: the same number of sequential FFN steps dropped by *removing*
    FFNs instead of fusing them: in each group every FFN but the last is removed (their layers, now empty, go),
    so the result has exactly the fused model's layer count and one FFN of the group's, unchanged."""
    blocks = model.config.layers_blocks()
    groups = _partition(blocks, plan)
    new_layers: list[dict[str, Any]] = []
    for group in groups:
        # A group keeps its last FFN layer; a single layer keeps itself.
        i = [k for k in group if blocks[k].ffn.kind == "swiglu"][-1] if len(group) > 1 else group[0]
        new_layers.append({"blocks": blocks[i], "state": dict(model.model.layers[i].state_dict())})
    return _rebuild(model, groups, new_layers)
