"""Decoupled blockwise local distillation (BLD, paper-digest §1.3): the block library.

Every attention variant is trained inside a layer whose FFN is the parent's (frozen), every FFN variant inside a
layer whose attention is the parent's (frozen); both reproduce the parent layer's output from the parent layer's
input. Per step, one parent forward pass (no grad) yields every layer's input, mid-layer residual and output, and
feeds every pending variant of every layer; parent activations are never recomputed per variant, and no gradient
crosses layers.

Loss: ``||y_child - y_parent||^2 / ||y_parent - x||^2`` per layer, with x the layer input. The numerator is the
paper's normalised MSE numerator; normalising by the parent layer's own contribution instead of its whole output
(which includes the residual stream) changes only the scale, and makes the number read as "share of the parent
block's contribution not reproduced": 1.0 for a no-op. All variants' losses are summed into one backward and one
AdamW step; since their parameters are disjoint and Adam is elementwise, that is exactly one optimiser per variant.

Variants start from the training-free inits (`puzzle.init`): FFN channel pruning by calibrated channel contribution,
KV-head mean pooling, linear attention W_o·W_v, linear FFN W_down·W_up. Parent sub-blocks and no-ops need no
training.

Artifacts (``library/``): ``layer_XXX/<variant>.safetensors`` per trained variant, holding the layer's tensors for
that half under their model names (``input_layernorm.weight``, ``self_attn.q_proj.weight``, ... or
``post_attention_layernorm.weight``, ``mlp.gate_proj.weight``, ...), with losses in the file's metadata;
``library.json`` (an index rebuilt from the files, so parallel shards never write one file together);
``_checkpoint/`` while a run is in progress. Resume: finished (layer, variant) files are skipped; unfinished ones
continue from the newest checkpoint. Layers split across processes with ``bld.shard = "K/N"`` or automatically under
``torchrun`` (RANK / WORLD_SIZE).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from open_nemotron.errors import OpenNemotronError
from open_nemotron.puzzle.config import BLDConfig, parse_shard
from open_nemotron.puzzle.progress import step_printer
from open_nemotron.puzzle.search_space import ATTENTION, FFN, SearchSpace, Variant, config_with_blocks
from open_nemotron.utils import atomic_path, atomic_write_text

LIBRARY_VERSION = 1


class LibraryError(OpenNemotronError, ValueError):
    """A library that is missing, incomplete or built for other settings."""


# ----------------------------------------------------------------------------------------------- parent activations


@dataclass
class ParentActivations:
    inputs: list[torch.Tensor]  # inputs[i] = residual entering layer i; inputs[i + 1] = layer i's output
    mids: list[torch.Tensor]  # residual after layer i's attention
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # the rotary (cos, sin) of these positions


@torch.no_grad()
def parent_activations(model, input_ids: torch.Tensor, last_layer: int | None = None) -> ParentActivations:
    """Run the parent's layers 0..last_layer once, keeping every layer's input and mid-layer residual."""
    inner = model.model
    end = len(inner.layers) if last_layer is None else last_layer + 1
    x = inner.embed_tokens(input_ids)
    rope = inner.rotary_emb(x, torch.arange(input_ids.shape[1], device=input_ids.device)[None])
    _, residuals = inner.run_layers(x, 0, end, position_embeddings=rope, return_residuals=True)
    return ParentActivations(residuals[0::2], residuals[1::2], rope)


# ----------------------------------------------------------------------------------------------- child layers


# The modules of each half of a decoder layer: (its pre-norm, the sub-block).
HALF_MODULES = {ATTENTION: ("input_layernorm", "self_attn"), FFN: ("post_attention_layernorm", "mlp")}


def layer_config(parent_config, layer: int, attention: Variant, ffn: Variant):
    """A copy of the parent config whose `layer` has the given attention and FFN (other layers unchanged)."""
    from open_nemotron.model.configuration import LayerBlocks, block_config_dict

    blocks = list(parent_config.block_configs)
    blocks[layer] = block_config_dict(
        LayerBlocks(attention.block, ffn.block), parent_config.num_attention_heads, parent_config.hidden_size
    )
    return config_with_blocks(parent_config, blocks)


def half_prefixes(part: str) -> tuple[str, str]:
    return tuple(f"{name}." for name in HALF_MODULES[part])


def half_state(layer: nn.Module, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one half of a decoder layer, under their layer-relative names."""
    prefixes = half_prefixes(part)
    return {k: v.detach().contiguous() for k, v in layer.state_dict().items() if k.startswith(prefixes)}


def build_child_layer(parent_model, layer: int, attention: Variant, ffn: Variant, config=None) -> nn.Module:
    """An uninitialised decoder layer with these variants, the parent's dtype and device."""
    from open_nemotron.model.modeling import DeciLMDecoderLayer

    config = config or layer_config(parent_model.config, layer, attention, ffn)
    ref = parent_model.model.embed_tokens.weight
    return DeciLMDecoderLayer(config, layer).to(device=ref.device, dtype=ref.dtype)


def initial_half(parent_layer, config, layer: int, variant: Variant, stats: InitStatistics) -> nn.Module | None:
    """The training-free init of one variant (None for a no-op)."""
    from open_nemotron.puzzle import init as inits

    if variant.kind == "no_op":
        return None
    if variant.part == ATTENTION:
        if variant.kind == "gqa":
            return inits.fewer_kv_heads_attention(parent_layer.self_attn, config, variant.size, layer)
        return inits.linear_attention(parent_layer.self_attn, config, stats.fits.get((layer, ATTENTION)))
    if variant.kind == "swiglu":
        return inits.pruned_mlp(parent_layer.mlp, config, variant.size, stats.contributions[layer])
    return inits.linear_mlp(parent_layer.mlp, config, stats.fits.get((layer, FFN)))


def initial_layer(parent_model, layer: int, space: SearchSpace, variant: Variant, stats: InitStatistics) -> nn.Module:
    """A child layer whose `variant` half starts from its training-free init (its norm from the parent's) and whose
    other half *is* the parent's (shared, frozen) module."""
    parent_layer = parent_model.model.layers[layer]
    other = space.parent_variant(layer, FFN if variant.part == ATTENTION else ATTENTION)
    attention, ffn = (variant, other) if variant.part == ATTENTION else (other, variant)
    config = layer_config(parent_model.config, layer, attention, ffn)
    child = build_child_layer(parent_model, layer, attention, ffn, config)
    module = initial_half(parent_layer, config, layer, variant, stats)
    if module is not None:
        norm, block = HALF_MODULES[variant.part]
        setattr(child, block, module)
        getattr(child, norm).load_state_dict(getattr(parent_layer, norm).state_dict())
    if other.kind != "no_op":
        for name in HALF_MODULES[other.part]:
            setattr(child, name, getattr(parent_layer, name))
    ref = parent_model.model.embed_tokens.weight
    return child.to(device=ref.device, dtype=ref.dtype)


def trainable_parameters(child: nn.Module, part: str) -> list[tuple[str, nn.Parameter]]:
    prefixes = half_prefixes(part)
    return [(n, p) for n, p in child.named_parameters() if n.startswith(prefixes)]


def normalized_mse(y_child: torch.Tensor, y_parent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (y_child - y_parent).float().pow(2).mean() / (y_parent - x).float().pow(2).mean().clamp_min(1e-12)


def child_output(parent_model, child: nn.Module, part: str, acts: ParentActivations, layer: int) -> torch.Tensor:
    """The child layer's output from the parent's residual entering it (attention) or its mid residual (FFN)."""
    if part == ATTENTION:
        inputs = acts.inputs[layer]
        return parent_model.model.run_layers(
            inputs, layer, layer + 1, position_embeddings=acts.position_embeddings, replace={layer: child}
        )
    return child.ffn_residual(acts.mids[layer])


# ----------------------------------------------------------------------------------------------- channel contributions


@dataclass
class InitStatistics:
    contributions: dict[int, torch.Tensor]  # layer -> mean channel contribution of each parent FFN channel
    fits: dict[tuple[int, str], Any]  # (layer, part) -> LinearFit of the half's inputs -> the parent half's outputs


@torch.no_grad()
def init_statistics(
    parent_model, tokens: torch.Tensor, pending: list[tuple[int, Variant]], batch_size: int, linear_init: str
) -> InitStatistics:
    """One pass over calibration tokens for the inits that need data: channel contributions (FFN pruning) and, with
    ``linear_init="fit"``, least-squares fits for linear variants."""
    from open_nemotron.puzzle.init import ChannelContributionMeter, LinearFit

    hidden = parent_model.config.hidden_size
    prune = sorted({i for i, v in pending if v.part == FFN and v.kind == "swiglu"})
    fit_keys = sorted({(i, v.part) for i, v in pending if v.kind == "linear"}) if linear_init == "fit" else []
    if not prune and not fit_keys:
        return InitStatistics({}, {})
    meters = {i: ChannelContributionMeter(parent_model.model.layers[i].mlp) for i in prune}
    fits = {key: LinearFit(hidden, hidden) for key in fit_keys}
    last = max(prune + [i for i, _ in fit_keys])
    for start in range(0, tokens.shape[0], batch_size):
        acts = parent_activations(parent_model, tokens[start : start + batch_size], last)
        for i in prune:
            meters[i].update(parent_model.model.layers[i].post_attention_layernorm(acts.mids[i]))
        for (i, part), fit in fits.items():
            layer = parent_model.model.layers[i]
            if part == ATTENTION:  # the attention's own output: the residual it adds
                fit.update(layer.input_layernorm(acts.inputs[i]), acts.mids[i] - acts.inputs[i])
            else:
                fit.update(layer.post_attention_layernorm(acts.mids[i]), acts.inputs[i + 1] - acts.mids[i])
    return InitStatistics({i: m.mean() for i, m in meters.items()}, fits)


# ----------------------------------------------------------------------------------------------- library files


def variant_path(library: Path, layer: int, variant: Variant) -> Path:
    return library / f"layer_{layer:03d}" / f"{variant.name.replace(':', '-')}.safetensors"


def settings_digest(bld: BLDConfig, calibration_digest: str) -> str:
    """What a library entry depends on (shard assignment excluded: it only decides who trains what)."""
    import hashlib

    data = {k: v for k, v in asdict(bld).items() if k not in ("shard", "checkpoint_every")}
    text = json.dumps({"v": LIBRARY_VERSION, "bld": data, "calibration": calibration_digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_entry_metadata(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:
        return None  # unreadable (e.g. truncated by a kill): retrain
    try:
        return json.loads(meta.get("open_nemotron", "{}"))
    except json.JSONDecodeError:
        return None


def entry_done(library: Path, layer: int, variant: Variant, digest: str) -> bool:
    path = variant_path(library, layer, variant)
    if not path.is_file():
        return False
    meta = read_entry_metadata(path)
    return meta is not None and meta.get("settings") == digest


def load_half(library: Path, layer: int, variant: Variant) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = variant_path(library, layer, variant)
    if not path.is_file():
        raise LibraryError(f"{path}: missing; run build-library first (layer {layer}, variant {variant.name})")
    return load_file(str(path))


def missing_entries(space: SearchSpace, library: Path, digest: str, layers: list[int] | None = None) -> list:
    """(layer, variant) pairs of these layers (default: all) that need training and have no finished file."""
    return [
        (i, v)
        for i in (range(space.num_layers) if layers is None else layers)
        for part in (ATTENTION, FFN)
        for v in space.variants(part)[i][1:]
        if v.trainable and not entry_done(library, i, v, digest)
    ]


def write_index(library: Path, space: SearchSpace) -> dict[str, Any]:
    entries = {}
    for i in range(space.num_layers):
        for part in (ATTENTION, FFN):
            for v in space.variants(part)[i][1:]:
                path = variant_path(library, i, v)
                if v.trainable and path.is_file():
                    meta = read_entry_metadata(path) or {}
                    entries[f"{i}:{v.name}"] = {"file": str(path.relative_to(library)), **meta}
    index = {"version": LIBRARY_VERSION, "entries": entries}
    atomic_write_text(library / "library.json", json.dumps(index, indent=1))
    return index


# ----------------------------------------------------------------------------------------------- training


def assigned_layers(num_layers: int, shard: str | None) -> list[int]:
    if shard is not None:
        k, n = parse_shard(shard)
    else:
        k, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return [i for i in range(num_layers) if i % n == k]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_variants(
    parent_model, trainers: dict, tokens: torch.Tensor, batch_size: int, last: int
) -> dict[str, float]:
    sums = dict.fromkeys(trainers, 0.0)
    batches = 0
    for start in range(0, tokens.shape[0], batch_size):
        acts = parent_activations(parent_model, tokens[start : start + batch_size], last)
        batches += 1
        for key, (layer, variant, child) in trainers.items():
            y = child_output(parent_model, child, variant.part, acts, layer)
            sums[key] += normalized_mse(y, acts.inputs[layer + 1], acts.inputs[layer]).item()
    return {k: s / batches for k, s in sums.items()}


def build_library(
    parent_model,
    space: SearchSpace,
    tokens: dict[str, torch.Tensor],
    config: BLDConfig,
    library: Path,
    calibration_digest: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every missing (layer, variant) of this process's layers; returns the library index and timings."""
    from safetensors.torch import save_file

    from open_nemotron.progress import StageProgress

    library.mkdir(parents=True, exist_ok=True)
    digest = settings_digest(config, calibration_digest)
    layers = assigned_layers(space.num_layers, config.shard)
    pending = missing_entries(space, library, digest, layers)
    started = time.perf_counter()
    if not pending:
        return {"index": write_index(library, space), "trained": 0, "seconds": 0.0}

    parent_model.eval()
    for p in parent_model.parameters():
        p.requires_grad_(False)
    # Decisions (keep a linear init or its BLD result) read the selection set, never the reporting one.
    device = parent_model.model.embed_tokens.weight.device
    train, selection = tokens["train"].to(device), tokens["selection"].to(device)
    last = max(i for i, _ in pending)
    say = step_printer(progress)
    say(
        f"BLD: {len(pending)} variants of {len(layers)} layers; init statistics on {config.init_sequences} "
        "calibration sequences"
    )
    stats = init_statistics(
        parent_model, train[: config.init_sequences], pending, config.batch_size, config.linear_init
    )

    trainers: dict[str, tuple[int, Variant, nn.Module]] = {}
    for i, v in pending:
        trainers[f"{i}:{v.name}"] = (i, v, initial_layer(parent_model, i, space, v, stats))
    params = []
    for _, v, child in trainers.values():
        for _, p in trainable_parameters(child, v.part):
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(train.shape[0] / config.batch_size)
    total = max(1, math.ceil(steps_per_epoch * config.epochs))
    warmup = max(1, round(config.warmup_ratio * total))

    # Linear variants keep their init if BLD does not improve it on the selection tokens (a least-squares init is
    # already optimal for its data; Adam's first steps can only move it away). Snapshot before a checkpoint
    # overwrites them.
    init_states = {
        key: {n: t.clone() for n, t in half_state(child, v.part).items()}
        for key, (_, v, child) in trainers.items()
        if v.kind == "linear"
    }
    checkpoint = library / "_checkpoint"
    keys = sorted(trainers)
    step, init_losses = _load_checkpoint(checkpoint, keys, digest, trainers, optimizer)
    if step == 0:
        say(f"BLD: the inits' loss on {selection.shape[0]} selection sequences")
        init_losses = evaluate_variants(parent_model, trainers, selection, config.batch_size, last)
    else:
        say(f"BLD: resuming from the checkpoint at step {step} of {total}")
    generator = torch.Generator().manual_seed(0)
    orders = [torch.randperm(train.shape[0], generator=generator) for _ in range(math.ceil(config.epochs) + 1)]

    running: dict[str, float] = {}
    with StageProgress(f"BLD ({len(trainers)} variants)", total, enabled=progress, completed=step) as bar:
        for child in (c for _, _, c in trainers.values()):
            child.train()
        while step < total:
            epoch, offset = divmod(step * config.batch_size, max(1, train.shape[0]))
            idx = orders[epoch % len(orders)][offset : offset + config.batch_size]
            acts = parent_activations(parent_model, train[idx.to(device)], last)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * lr_factor(step, total, warmup)
            losses = torch.stack(
                [
                    normalized_mse(
                        child_output(parent_model, child, v.part, acts, layer),
                        acts.inputs[layer + 1],
                        acts.inputs[layer],
                    )
                    for layer, v, child in trainers.values()
                ]
            )
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            # One device sync per step for the logged losses, not one per variant.
            for key, value in zip(trainers, losses.detach().tolist(), strict=True):
                running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
            optimizer.step()
            step += 1
            bar.advance(f"step {step}, mean normalised loss {sum(running.values()) / len(running):.3f}")
            if step % config.checkpoint_every == 0 and step < total:
                _save_checkpoint(checkpoint, keys, digest, trainers, optimizer, step, init_losses)

    for child in (c for _, _, c in trainers.values()):
        child.eval()
    say(f"BLD: the trained variants' loss on {selection.shape[0]} selection sequences")
    final_losses = evaluate_variants(parent_model, trainers, selection, config.batch_size, last)
    seconds = time.perf_counter() - started
    for key, (layer, variant, child) in trainers.items():
        kept = "bld"
        if key in init_states and final_losses[key] > init_losses[key]:
            child.load_state_dict(init_states[key], strict=False)
            final_losses[key], kept = init_losses[key], "init"
        meta = {
            "kept": kept,
            "settings": digest,
            "layer": layer,
            "variant": variant.name,
            "steps": total,
            "init_heldout_loss": init_losses.get(key),
            "heldout_loss": final_losses[key],
            "train_loss": running.get(key),
        }
        with atomic_path(variant_path(library, layer, variant)) as tmp:
            save_file(half_state(child, variant.part), str(tmp), metadata={"open_nemotron": json.dumps(meta)})
    _clear_checkpoint(checkpoint)
    return {"index": write_index(library, space), "trained": len(trainers), "seconds": seconds, "steps": total}


def _save_checkpoint(path: Path, keys, digest, trainers, optimizer, step: int, init_losses) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key in keys:
        _, variant, child = trainers[key]
        for name, p in trainable_parameters(child, variant.part):
            tensors[f"param/{key}/{name}"] = p.detach().contiguous()
    state = optimizer.state_dict()["state"]
    for idx, entry in state.items():
        for name, value in entry.items():
            tensors[f"adam/{idx}/{name}"] = value.detach().reshape(value.shape).contiguous()
    meta = {"settings": digest, "keys": keys, "step": step, "init_losses": init_losses}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "state.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"open_nemotron": json.dumps(meta)})


def _load_checkpoint(path: Path, keys, digest, trainers, optimizer) -> tuple[int, dict]:
    """Restore parameters and AdamW state if a checkpoint for exactly these variants and settings exists."""
    from safetensors.torch import load_file

    file = path / "state.safetensors"
    if not file.is_file():
        return 0, {}
    meta = read_entry_metadata(file)
    if not meta or meta.get("settings") != digest or meta.get("keys") != keys:
        return 0, {}  # other settings or another variant set: start the pending variants afresh
    tensors = load_file(str(file))
    with torch.no_grad():
        for key in keys:
            _, variant, child = trainers[key]
            for name, p in trainable_parameters(child, variant.part):
                p.copy_(tensors[f"param/{key}/{name}"])
    state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("adam/"):
            _, idx, field = name.split("/")
            restored.setdefault(int(idx), {})[field] = value
    state["state"] = restored
    optimizer.load_state_dict(state)
    return int(meta["step"]), meta.get("init_losses", {})


def _clear_checkpoint(path: Path) -> None:
    (path / "state.safetensors").unlink(missing_ok=True)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def library_files(library: Path) -> list[Path]:
    """Every variant file in a library, sorted (layer, then name)."""
    return sorted(library.glob("layer_*/*.safetensors"))
