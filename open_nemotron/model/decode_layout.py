"""Weight layouts that make decode on CPUs stream weights faster; values are unchanged. Chosen explicitly.

Decode multiplies one activation row by every weight matrix, so its speed is the speed at which BLAS streams
the weights. On the AVX2/AVX-512 CPUs we measured, MKL's one-row product `x @ B` streams a row-major [in, out]
matrix B = W^T 1.3-1.8x faster than it streams the row-major nn.Linear layout W [out, in], and runs on one core;
`decode_linear` splits B's columns into one block per thread and multiplies them as a batch, which uses every core
(same dot products; bit-identical where BLAS sums them in the same order, within fp32 rounding elsewhere). The
"gemv" layout therefore:

- stores every Linear weight column-major (W^T contiguous: same Parameters, same values, other strides), and
- stores q/k/v and gate/up as views of one matrix each, so a decode step runs one product instead of three or two.

That layout is only good for one row at a time: multiplying 2-16 rows (batched decode), BLAS is fastest on the
ordinary row-major layout ("gemm", the checkpoint's own; see `decode_linear`). Both compute the same numbers.

Nothing switches a layout behind the caller's back: `generate` decodes in whatever layout the model has. The
layout is chosen when loading (`load_model(..., decode_layout="gemv")`) or by calling `set_decode_layout`
explicitly. A switch goes tensor by tensor, so it needs one tensor of extra memory, not a copy of the model; given
the checkpoint directory, it reads each tensor through its own short-lived file mapping, so the memory-mapped
checkpoint never becomes resident beside the new copies (peak memory stays ~1x the weights).

Training is unaffected: with gradients enabled the modules use their separate Parameters (the fused matrices are
used only under `torch.no_grad`/`inference_mode`), and the fused path turns itself off if a Parameter is replaced
(e.g. by `.to(dtype)`). `save_pretrained` writes contiguous tensors, so checkpoints are unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

DecodeLayout = Literal["gemm", "gemv"]
LAYOUTS = ("gemm", "gemv")


@dataclass
class FusedWeight:
    """One [sum(out_i), in] matrix whose row blocks are the `parts` Parameters (as views)."""

    weight: torch.Tensor
    parts: list[nn.Parameter] = field(default_factory=list)
    pointers: list[int] = field(default_factory=list)

    def is_live(self) -> bool:
        # O(1) guard: every part must still be the view we made (not replaced by .to(), load_state_dict(assign=True)...)
        return all(p.data_ptr() == ptr for p, ptr in zip(self.parts, self.pointers, strict=True))


def layout_for_batch(batch_size: int) -> DecodeLayout:
    """The layout that decodes `batch_size` rows fastest on a CPU."""
    return "gemv" if batch_size == 1 else "gemm"


def decode_layout(model: nn.Module) -> DecodeLayout:
    """The model's current layout ("gemm" = the checkpoint's row-major layout)."""
    return model.__dict__.get("decode_layout", "gemm")


def set_decode_layout(model: nn.Module, layout: DecodeLayout, checkpoint_dir: str | Path | None = None) -> nn.Module:
    """Give a DeciLM model's weights `layout`, in place and tensor by tensor (CPU only; a no-op elsewhere).

    `checkpoint_dir`: the safetensors directory the weights were loaded from; each tensor is then read from there
    through its own mapping (see the module docstring). Returns the model.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"decode layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if next(model.parameters()).device.type != "cpu" or decode_layout(model) == layout:
        return model
    source = _checkpoint_reader(model, Path(checkpoint_dir)) if checkpoint_dir is not None else _in_memory
    # The new storages must be ordinary tensors even when called under inference_mode, or the model could not be
    # trained afterwards (GRPO generates, then trains the same model).
    with torch.inference_mode(False), torch.no_grad():
        if layout == "gemv":
            _to_gemv_layout(model, source)
        else:
            _to_row_major(model, source)
    model.decode_layout = layout
    return model


def prepare_for_decode(model: nn.Module, batch_size: int = 1, checkpoint_dir: str | Path | None = None) -> nn.Module:
    """`set_decode_layout` with the layout that decodes `batch_size` rows fastest."""
    return set_decode_layout(model, layout_for_batch(batch_size), checkpoint_dir)


Source = Callable[[nn.Parameter], torch.Tensor]


def _in_memory(param: nn.Parameter) -> torch.Tensor:
    return param.data


def _checkpoint_reader(model: nn.Module, checkpoint_dir: Path) -> Source:
    """A source that reads a parameter's values from the checkpoint, one short-lived file mapping per tensor."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        where.update({key: path for key in header if key != "__metadata__"})
    names = {id(p): name for name, p in model.named_parameters()}

    def read(param: nn.Parameter) -> torch.Tensor:
        name = names.get(id(param))
        if name not in where:
            return param.data  # not from the checkpoint (e.g. a freshly initialised block)
        with safe_open(where[name], framework="pt") as fh:
            tensor = fh.get_tensor(name)
        if tensor.shape != param.shape:
            raise ValueError(
                f"{checkpoint_dir}: {name} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}"
            )
        return tensor.to(param.dtype)

    return read


def _column_major(param: nn.Parameter, source: Source) -> None:
    if param.dim() == 2 and param.stride() != (1, param.shape[0]):
        param.data = source(param).t().contiguous().t()


def fuse_rows(linears: list[nn.Linear], source: Source = _in_memory) -> FusedWeight | None:
    """Make the Linear weights views of one column-major [sum(out), in] matrix; returns it (None if biased)."""
    if any(lin.bias is not None for lin in linears):
        return None
    weights = [lin.weight for lin in linears]
    # Storage is [in, sum(out)] row-major = the fused weight in column-major layout.
    storage = torch.empty(weights[0].shape[1], sum(w.shape[0] for w in weights), dtype=weights[0].dtype)
    fused = FusedWeight(storage.t())
    start = 0
    for w in weights:
        out = w.shape[0]
        storage[:, start : start + out].copy_(source(w).t())
        w.data = storage[:, start : start + out].t()
        start += out
        fused.parts.append(w)
        fused.pointers.append(w.data_ptr())
    return fused


def _to_row_major(model: nn.Module, source: Source) -> None:
    from open_nemotron.model.modeling import DeciLMAttention, DeciLMMLP

    for module in model.modules():
        if isinstance(module, DeciLMAttention):
            module.fused_qkv = None
        elif isinstance(module, DeciLMMLP):
            module.fused_gate_up = None
    relaid: set[int] = set()
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = source(param).contiguous()
            relaid.add(id(param))
    _own_remaining(model, relaid, source)


def _to_gemv_layout(model: nn.Module, source: Source) -> None:
    from open_nemotron.model.modeling import DeciLMAttention, DeciLMMLP

    fused_parts: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeciLMAttention):
            module.fused_qkv = fuse_rows([module.q_proj, module.k_proj, module.v_proj], source)
            if module.fused_qkv is not None:
                fused_parts.update(id(lin) for lin in (module.q_proj, module.k_proj, module.v_proj))
        elif isinstance(module, DeciLMMLP):
            module.fused_gate_up = fuse_rows([module.gate_proj, module.up_proj], source)
            if module.fused_gate_up is not None:
                fused_parts.update(id(lin) for lin in (module.gate_proj, module.up_proj))
    relaid: set[int] = {id(p) for m in model.modules() if id(m) in fused_parts for p in m.parameters()}
    for module in model.modules():
        # o_proj, linear attention/FFN replacements, the LM head (tied embedding); never a fused part again,
        # which would give it its own storage and silently turn the fused path off.
        if isinstance(module, nn.Linear) and id(module) not in fused_parts:
            _column_major(module.weight, source)
            relaid.add(id(module.weight))
    _own_remaining(model, relaid, source)


def _own_remaining(model: nn.Module, relaid: set[int], source: Source) -> None:
    """Give the parameters a layout switch did not touch memory of their own.

    `from_pretrained` may leave weights as views of the memory-mapped safetensors file; one such view keeps the
    whole mapping resident, so after a switch the process would hold the file *and* the new copies.
    """
    for param in model.parameters():
        if id(param) not in relaid:
            param.data = source(param).clone()
