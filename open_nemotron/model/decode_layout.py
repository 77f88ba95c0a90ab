"""Weight layouts that make decode on CPUs stream weights faster; values are unchanged.

Decode multiplies one activation row by every weight matrix, so its speed is the speed at which BLAS streams
the weights. On the AVX2 CPUs we measured, MKL/oneDNN's matrix-vector product reads a [out, in] weight stored
column-major ("transposed") 1.3-1.8x faster than the row-major nn.Linear layout when out >= in (q/k/v, gate/up,
o_proj, the LM head), and slower when out < in (down_proj). `prepare_for_decode` therefore:

- re-lays those weights out column-major in place (same Parameters, same values, new strides), and
- stores q/k/v and gate/up as views of one matrix each, so a decode step runs one GEMV instead of three or two.

That layout is only good for one row at a time: multiplying 2-16 rows (batched decode), BLAS is fastest on the
ordinary row-major layout (see `DeciLMLinear`). `prepare_for_decode(model, batch_size)` therefore switches the
layout to what the batch needs; the switch costs about a memory copy of the weights (~0.5 s for 135M parameters
on 2 cores), paid once per change, and workloads rarely alternate (a server decodes one request, evaluation and
RL rollouts decode batches).

Training is unaffected: with gradients enabled the modules use their separate Parameters (the fused matrices are
used only under `torch.no_grad`/`inference_mode`), and the fused path turns itself off if a Parameter is replaced
(e.g. by `.to(dtype)`). `save_pretrained` writes contiguous tensors, so checkpoints are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class FusedWeight:
    """One [sum(out_i), in] matrix whose row blocks are the `parts` Parameters (as views)."""

    weight: torch.Tensor
    parts: list[nn.Parameter] = field(default_factory=list)
    pointers: list[int] = field(default_factory=list)

    def is_live(self) -> bool:
        # O(1) guard: every part must still be the view we made (not replaced by .to(), load_state_dict(assign=True)...)
        return all(p.data_ptr() == ptr for p, ptr in zip(self.parts, self.pointers, strict=True))


def _column_major(param: nn.Parameter) -> None:
    if param.dim() == 2 and param.stride() != (1, param.shape[0]):
        param.data = param.data.t().contiguous().t()


def fuse_rows(linears: list[nn.Linear]) -> FusedWeight | None:
    """Make the Linear weights views of one column-major [sum(out), in] matrix; returns it (None if biased)."""
    if any(lin.bias is not None for lin in linears):
        return None
    weights = [lin.weight for lin in linears]
    # Storage is [in, sum(out)] row-major = the fused weight in column-major layout.
    storage = torch.cat([w.detach().t() for w in weights], dim=1).contiguous()
    fused = FusedWeight(storage.t())
    start = 0
    for w in weights:
        out = w.shape[0]
        w.data = storage[:, start : start + out].t()
        start += out
        fused.parts.append(w)
        fused.pointers.append(w.data_ptr())
    return fused


def prepare_for_decode(model: nn.Module, batch_size: int = 1) -> nn.Module:
    """Give a DeciLM model the weight layout that decodes `batch_size` rows fastest, in place (CPU only)."""
    if next(model.parameters()).device.type != "cpu":
        return model
    want = "gemv" if batch_size == 1 else "gemm"
    if getattr(model, "_decode_layout", "gemm") == want:
        return model
    # The new weight storages must be ordinary tensors even when generate() runs under inference_mode, or the
    # model could not be trained afterwards (GRPO generates, then trains the same model).
    with torch.inference_mode(False), torch.no_grad():
        if want == "gemv":
            _to_gemv_layout(model)
        else:
            _to_row_major(model)
    model._decode_layout = want
    return model


def _to_row_major(model: nn.Module) -> None:
    from open_nemotron.model.modeling import DeciLMAttention, DeciLMMLP

    for module in model.modules():
        if isinstance(module, DeciLMAttention):
            module.fused_qkv = None
        elif isinstance(module, DeciLMMLP):
            module.fused_gate_up = None
    relaid: set[int] = set()
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()
            relaid.add(id(param))
    _own_remaining(model, relaid)


def _to_gemv_layout(model: nn.Module) -> None:
    from open_nemotron.model.modeling import DeciLMAttention, DeciLMMLP

    fused_parts: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeciLMAttention):
            module.fused_qkv = fuse_rows([module.q_proj, module.k_proj, module.v_proj])
            if module.fused_qkv is not None:
                fused_parts.update(id(lin) for lin in (module.q_proj, module.k_proj, module.v_proj))
        elif isinstance(module, DeciLMMLP):
            module.fused_gate_up = fuse_rows([module.gate_proj, module.up_proj])
            if module.fused_gate_up is not None:
                fused_parts.update(id(lin) for lin in (module.gate_proj, module.up_proj))
    relaid: set[int] = {id(p) for m in model.modules() if id(m) in fused_parts for p in m.parameters()}
    for module in model.modules():
        # o_proj, linear attention/FFN replacements, the LM head (tied embedding); never a fused part again,
        # which would give it its own storage and silently turn the fused path off.
        if (
            isinstance(module, nn.Linear)
            and id(module) not in fused_parts
            and module.out_features >= module.in_features
        ):
            _column_major(module.weight)
            relaid.add(id(module.weight))
    _own_remaining(model, relaid)


def _own_remaining(model: nn.Module, relaid: set[int]) -> None:
    """Copy the parameters a layout switch did not touch into memory of their own.

    `from_pretrained` may leave weights as views of the memory-mapped safetensors file; one such view keeps the
    whole mapping resident, so after a switch the process would hold the file *and* the new copies.
    """
    for param in model.parameters():
        if id(param) not in relaid:
            param.data = param.data.clone()
