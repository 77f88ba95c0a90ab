"""Block-dependency analysis (digest §2.3): how much each layer's contribution depends on each earlier layer.

h_j(X) = f_j(x_j) − x_j is layer j's contribution to the residual stream in the intact model; h̃_j^i(X) the same
with layer i skipped. M[i, j] = mean over tokens of the cosine distance 1 − cos(h_j, h̃_j^i) (0 for j ≤ i): small
means layer j hardly notices layer i (their order barely matters, they can run in parallel), large a sequential
dependency. Beside it, per layer: the cosine distance between its input and output and ‖h‖ / ‖x‖ (the paper's
supporting diagnostic: low in regions that fuse well).

Calibration tokens only (a decision input: never the reporting set). Cost: one forward per layer (layer i
skipped), on `tokens` [N, seq].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Skip(nn.Module):
    """A layer that passes the residual stream through (layer i removed)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def attention_residual(self, hidden_states, *args, **kwargs):
        return hidden_states

    def ffn_residual(self, hidden_states):
        return hidden_states


def _contributions(model, embeds: torch.Tensor, position_embeddings, skip: int | None = None) -> list[torch.Tensor]:
    """Each layer's contribution f_j(x_j) − x_j [batch, seq, hidden] (layer `skip` replaced by the identity)."""
    inner = model.model
    replace = {skip: _Skip()} if skip is not None else None
    h = embeds
    out = []
    for j in range(len(inner.layers)):
        nxt = inner.run_layers(h, j, j + 1, position_embeddings=position_embeddings, replace=replace)
        out.append(nxt - h)
        h = nxt
    return out


def _cos_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token 1 − cos(a, b); two zero vectors (a layer with nothing in it) count as identical."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    both_zero = (a.abs().amax(-1) == 0) & (b.abs().amax(-1) == 0)
    return torch.where(both_zero, torch.zeros_like(cos), 1.0 - cos)


@torch.no_grad()
def block_dependency(model, tokens: torch.Tensor, batch_size: int = 4, progress=None) -> dict[str, Any]:
    """{"matrix": M [L][L], "io_cosine_distance": [L], "relative_norm": [L], "tokens": n} on `tokens` [N, seq]."""
    device = next(model.parameters()).device
    layers = len(model.model.layers)
    matrix = torch.zeros(layers, layers, dtype=torch.float64)
    io_distance = torch.zeros(layers, dtype=torch.float64)
    relative_norm = torch.zeros(layers, dtype=torch.float64)
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        ids = tokens[start : start + batch_size].to(device)
        embeds = model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=device)[None]
        position_embeddings = model.model.rotary_emb(embeds, positions)
        intact = _contributions(model, embeds, position_embeddings)
        h = embeds
        for j, contribution in enumerate(intact):
            out = h + contribution
            io_distance[j] += _cos_distance(h, out).sum().item()
            relative_norm[j] += (
                (contribution.float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)).sum().item()
            )
            h = out
        for i in range(layers):
            skipped = _contributions(model, embeds, position_embeddings, skip=i)
            for j in range(i + 1, layers):
                matrix[i, j] += _cos_distance(intact[j], skipped[j]).sum().item()
            if progress is not None:
                progress(i, layers)
        count += ids.numel()
    return {
        "matrix": (matrix / count).tolist(),
        "io_cosine_distance": (io_distance / count).tolist(),
        "relative_norm": (relative_norm / count).tolist(),
        "tokens": count,
    }


def plot_dependency(result: dict[str, Any], runs: list[list[int]], path, title: str = "") -> None:
    """Heatmap of M (log colour scale) with the attention-free runs outlined on the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    m = np.array(result["matrix"])
    layers = m.shape[0]
    shown = np.where(m > 0, m, np.nan)
    positive = m[m > 0]
    fig, ax = plt.subplots(figsize=(7, 6))
    if positive.size:
        norm = LogNorm(vmin=max(positive.min(), 1e-6), vmax=positive.max())
        image = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="cosine distance of layer j's contribution without layer i")
    for run in runs:
        a, b = run[0], run[-1]
        ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a + 1, b - a + 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("layer j (whose contribution is measured)")
    ax.set_ylabel("layer i (removed)")
    ax.set_xticks(range(0, layers, max(1, layers // 15)))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title(title + ("\nred: attention-free runs" if runs else ""), fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
