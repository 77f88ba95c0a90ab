"""Coupled BLD (digest §1.3, the paper's second pass): train the chosen child's layers as whole blocks.

Decoupled BLD trains each attention variant with the parent's FFN and each FFN variant with the parent's attention,
then composes the two halves; the composition was never trained together. Once the MIP has picked a child, coupled
BLD trains each of its layers that differ from the parent's — attention and FFN together, every parameter of the
layer — from the parent's residual entering that layer to the parent's residual leaving it (Puzzle's normalised
MSE), starting from the decoupled library weights. One parent forward per step feeds every layer (inputs are the
parent's activations, so the layers train independently, in one optimiser).

Per layer, the trained weights are kept only when they lower the layer's normalised loss on the selection tokens
(a decision: never the reporting set), so a layer cannot come out worse than its decoupled composition on held-out
data. The child is changed in place; the parent never is (layers are copied before training: an assembled child
shares the parent's tensors where it uses the parent's blocks).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from open_nemotron.puzzle.bld import child_output, lr_factor, normalized_mse, parent_activations
from open_nemotron.puzzle.search_space import ATTENTION


def layers_to_couple(child, space) -> list[int]:
    """The layers whose attention or FFN is not the parent's and that have parameters at all."""
    from open_nemotron.puzzle.search_space import FFN, attention_variant, ffn_variant

    out = []
    for i, blocks in enumerate(child.config.layers_blocks()):
        chosen = (attention_variant(blocks.attention).name, ffn_variant(blocks.ffn).name)
        parent = (space.parent_variant(i, ATTENTION).name, space.parent_variant(i, FFN).name)
        if chosen != parent and any(True for _ in child.model.layers[i].parameters()):
            out.append(i)
    return out


def _layer_losses(parent_model, child, layers: list[int], tokens: torch.Tensor, batch_size: int) -> dict[int, float]:
    sums = dict.fromkeys(layers, 0.0)
    batches = 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            acts = parent_activations(parent_model, tokens[start : start + batch_size], max(layers))
            batches += 1
            for i in layers:
                y = _layer_output(parent_model, child, acts, i)
                sums[i] += normalized_mse(y, acts.inputs[i + 1], acts.inputs[i]).item()
    return {i: s / batches for i, s in sums.items()}


def _layer_output(parent_model, child, acts, i: int) -> torch.Tensor:
    """Child layer i, whole, on the parent's residual entering layer i (BLD's attention-half runner does exactly
    that: it runs the full layer from its input)."""
    return child_output(parent_model, child.model.layers[i], ATTENTION, acts, i)


def coupled_bld(
    parent_model,
    child,
    space,
    train: torch.Tensor,
    selection: torch.Tensor,
    epochs: float,
    learning_rate: float,
    batch_size: int = 4,
    warmup_ratio: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `child`'s non-parent layers jointly per layer (in place); returns per-layer selection losses before
    and after, which layers kept their trained weights, and the time taken."""
    from open_nemotron.progress import StageProgress

    layers = layers_to_couple(child, space)
    if not layers:
        return {"layers": [], "steps": 0, "seconds": 0.0}
    started = time.perf_counter()
    device = parent_model.model.embed_tokens.weight.device
    train, selection = train.to(device), selection.to(device)
    parent_model.eval()
    for i in layers:  # own tensors: the assembled child shares the parent's where it uses the parent's blocks
        child.model.layers[i] = copy.deepcopy(child.model.layers[i])
    before = _layer_losses(parent_model, child, layers, selection, batch_size)
    snapshots = {i: {k: v.clone() for k, v in child.model.layers[i].state_dict().items()} for i in layers}
    params = [p for i in layers for p in child.model.layers[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(train.shape[0] / batch_size)
    total = max(1, math.ceil(steps_per_epoch * epochs))
    warmup = max(1, round(warmup_ratio * total))
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(train.shape[0], generator=generator) for _ in range(math.ceil(epochs) + 1)]
    for i in layers:
        child.model.layers[i].train()
    with StageProgress(f"coupled BLD ({len(layers)} layers)", total, enabled=progress) as bar:
        for step in range(total):
            epoch, offset = divmod(step * batch_size, train.shape[0])
            idx = orders[epoch % len(orders)][offset : offset + batch_size]
            acts = parent_activations(parent_model, train[idx.to(device)], max(layers))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * lr_factor(step, total, warmup)
            losses = torch.stack(
                [
                    normalized_mse(_layer_output(parent_model, child, acts, i), acts.inputs[i + 1], acts.inputs[i])
                    for i in layers
                ]
            )
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            bar.advance(f"step {step + 1}, mean normalised loss {losses.mean().item():.3f}")
    for p in params:
        p.requires_grad_(False)
    for i in layers:
        child.model.layers[i].eval()
    after = _layer_losses(parent_model, child, layers, selection, batch_size)
    kept = []
    for i in layers:
        if after[i] < before[i]:
            kept.append(i)
        else:
            child.model.layers[i].load_state_dict(snapshots[i])
    return {
        "layers": layers,
        "kept_trained": kept,
        "selection_loss_before": {str(i): before[i] for i in layers},
        "selection_loss_after": {str(i): after[i] for i in layers},
        "steps": total,
        "seconds": time.perf_counter() - started,
    }
