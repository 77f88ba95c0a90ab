"""Replace-1-block scores (paper-digest §1.5): the quality cost of each library variant in isolation.

For layer i and a variant v of one of its halves, the parent with only that half replaced is run on the selection
tokens (held out from BLD; the report's quality uses the separate reporting set)
and compared with the parent: KL(parent || child) of the next-token distributions, averaged over tokens (the
paper's recommended metric), plus the LM loss and top-1 agreement as alternatives. The run starts from the parent's
cached residual stream entering layer i, not from the embeddings: layers before i are the parent's in both models,
so their output is computed once for all variants. The parent's own variant scores 0 by definition.

Artifact ``scores.json``: ``{"metric": ..., "tokens": N, "parent_lm_loss": ..., "layers": [{"attention":
{variant: {"kl", "lm_loss", "top1"}}, "ffn": {...}}, ...]}``. Written after every layer, so a killed run resumes at
the first unscored (layer, variant).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from open_nemotron.evaluate.divergence import kl_and_top1, log_probs
from open_nemotron.puzzle.bld import build_child_layer, half_state, load_half, parent_activations
from open_nemotron.puzzle.progress import step_printer
from open_nemotron.puzzle.search_space import ATTENTION, FFN, SearchSpace, Variant
from open_nemotron.utils import atomic_write_text

SCORES_VERSION = 1


def library_layer(parent_model, space: SearchSpace, library: Path, layer: int, attention: Variant, ffn: Variant):
    """A decoder layer with these variants: parent halves from the parent, the others from the library."""
    child = build_child_layer(parent_model, layer, attention, ffn)
    parent_layer = parent_model.model.layers[layer]
    state: dict[str, torch.Tensor] = {}
    for part, variant in ((ATTENTION, attention), (FFN, ffn)):
        if variant.kind == "no_op":
            continue
        if variant.name == space.parent_variant(layer, part).name:
            state.update(half_state(parent_layer, part))
        else:
            state.update(load_half(library, layer, variant))
    child.load_state_dict(state, strict=True)
    return child.eval()


@torch.no_grad()
def run_from_layer(parent_model, start: int, first_layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Logits of the parent with layer `start` replaced by `first_layer`, started from the residual entering it."""
    inner = parent_model.model
    x = inner.run_layers(hidden, start, position_embeddings=position_embeddings, replace={start: first_layer})
    return parent_model.lm_head(inner.norm(x))


def token_metrics(parent_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over tokens (positions with a next token): KL(parent || child), child LM loss, top-1 agreement."""
    logq = log_probs(logits[:, :-1])
    kl, top1 = kl_and_top1(parent_logp[:, :-1], logq)
    lm = F.nll_loss(logq.reshape(-1, logq.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    return {"kl": kl.sum().item(), "lm_loss": lm.item(), "top1": top1.sum().item()}


def score_library(
    parent_model,
    space: SearchSpace,
    library: Path,
    selection: torch.Tensor,
    out_path: Path,
    batch_size: int = 4,
    metric: str = "kl",
    progress: bool = True,
) -> dict[str, Any]:
    """Score every non-parent variant of every layer (resuming from `out_path`)."""
    from open_nemotron.progress import StageProgress

    parent_model.eval()
    device = parent_model.model.embed_tokens.weight.device
    selection = selection.to(device)
    started = time.perf_counter()
    result = _load_partial(out_path, selection, metric, space)
    todo = [
        (i, part, v)
        for i in range(space.num_layers)
        for part in (ATTENTION, FFN)
        for v in space.variants(part)[i][1:]
        if v.name not in result["layers"][i][part]
    ]
    if todo:
        batches = [selection[s : s + batch_size] for s in range(0, selection.shape[0], batch_size)]
        step_printer(progress)(
            f"scores: {len(todo)} variants on {selection.shape[0]} selection sequences (parent activations first)"
        )
        with torch.no_grad():
            cached = [parent_activations(parent_model, b) for b in batches]
            parent_logp = [log_probs(parent_model.lm_head(parent_model.model.norm(a.inputs[-1]))) for a in cached]
        n_tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        parent_lm = sum(
            F.nll_loss(lp[:, :-1].reshape(-1, lp.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
            for lp, b in zip(parent_logp, batches, strict=True)
        )
        result["tokens"] = n_tokens
        result["parent_lm_loss"] = parent_lm / n_tokens
        with StageProgress("replace-1-block scores", len(todo), enabled=progress) as bar:
            for layer in sorted({i for i, _, _ in todo}):
                for _, part, variant in [t for t in todo if t[0] == layer]:
                    other = space.parent_variant(layer, FFN if part == ATTENTION else ATTENTION)
                    attention, ffn = (variant, other) if part == ATTENTION else (other, variant)
                    child = library_layer(parent_model, space, library, layer, attention, ffn)
                    sums = {"kl": 0.0, "lm_loss": 0.0, "top1": 0.0}
                    for acts, logp, ids in zip(cached, parent_logp, batches, strict=True):
                        logits = run_from_layer(
                            parent_model, layer, child, acts.inputs[layer], acts.position_embeddings
                        )
                        for k, v in token_metrics(logp, logits, ids).items():
                            sums[k] += v
                    result["layers"][layer][part][variant.name] = {k: v / n_tokens for k, v in sums.items()}
                    bar.advance(f"layer {layer} {variant.name}: {metric} {sums[metric] / n_tokens:.4f}")
                result["seconds"] = result.get("seconds", 0.0) + (time.perf_counter() - started)
                started = time.perf_counter()
                atomic_write_text(out_path, json.dumps(result, indent=1))
    atomic_write_text(out_path, json.dumps(result, indent=1))
    return result


def _load_partial(out_path: Path, selection: torch.Tensor, metric: str, space: SearchSpace) -> dict[str, Any]:
    fingerprint = {"version": SCORES_VERSION, "tokens_shape": list(selection.shape), "tokens_sum": int(selection.sum())}
    if out_path.is_file():
        try:
            data = json.loads(out_path.read_text())
        except json.JSONDecodeError:
            data = None
        if data and data.get("fingerprint") == fingerprint and len(data.get("layers", [])) == space.num_layers:
            data["metric"] = metric
            return data
    return {
        "fingerprint": fingerprint,
        "metric": metric,
        "layers": [{ATTENTION: {}, FFN: {}} for _ in range(space.num_layers)],
    }


def variant_score(scores: dict[str, Any], layer: int, part: str, variant: str, parent_name: str) -> float:
    """The chosen metric for one variant (0 for the parent's own)."""
    if variant == parent_name:
        return 0.0
    return scores["layers"][layer][part][variant][scores["metric"]] - (
        scores["parent_lm_loss"] if scores["metric"] == "lm_loss" else 0.0
    )
