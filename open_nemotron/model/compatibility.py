"""What other engines can run of our format: the one place that says why vLLM or llama.cpp would refuse, or silently
mis-run, a given architecture (notes/decilm-format.md §5 and §7 have the engines' code these rules come from).

Each function returns the reasons, one short sentence each naming the layers, and an empty list when the engine
runs the model as we do. Puzzle's `vllm_compatible` search space and `open-nemotron export` both ask here.
"""

from __future__ import annotations

from open_nemotron.model.configuration import LayerBlocks, non_portable_ffn_layers


def _layers(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return f"layer{'s' if len(indices) > 1 else ''} {shown}{', ...' if len(indices) > 8 else ''}"


def vllm_problems(layers: list[LayerBlocks], hidden_size: int) -> list[str]:
    """Why stock vLLM's `DeciLMForCausalLM` (model_executor/models/nemotron_nas.py) could not serve these layers."""
    problems = []
    linear = [i for i, b in enumerate(layers) if "linear" in (b.attention.kind, b.ffn.kind)]
    if linear:
        problems.append(f"linear attention or FFN in {_layers(linear)}: vLLM's nemotron-nas model has no linear blocks")
    attention = [i for i, b in enumerate(layers) if b.attention.kind == "gqa"]
    if not attention:
        problems.append("no attention layer at all: vLLM takes the KV-head count from the first attention layer")
    elif layers[0].attention.kind == "no_op":
        problems.append("no attention in layer 0: vLLM's first residual norm then runs without a residual")
    counts = sorted({layers[i].attention.num_key_value_heads for i in attention})
    if len(counts) > 1:
        problems.append(f"several KV-head counts {counts}: vLLM sizes every layer's KV cache from the first one")
    odd = non_portable_ffn_layers(layers, hidden_size)
    if odd:
        problems.append(
            f"FFN widths not multiples of 256 in {_layers(odd)}: vLLM rebuilds them from ffn_mult and would build "
            "other widths"
        )
    return problems


def llama_cpp_problems(layers: list[LayerBlocks]) -> list[str]:
    """Why llama.cpp's `deci` architecture (src/models/deci.cpp and its loader) could not run these layers as we do,
    even with the GGUF writer's stand-ins (`llama_cpp_zero_ffn_layers`). Our GGUF writer stores every layer's real
    width, so widths need not be multiples of 256 there."""
    problems = []
    if layers and layers[0].attention.kind == "no_op":
        problems.append("no attention in layer 0: llama.cpp's deci loader needs attention in the first layer")
    linear_ffn = [i for i, b in enumerate(layers) if b.ffn.kind == "linear"]
    if linear_ffn:
        problems.append(f"linear FFN in {_layers(linear_ffn)}: llama.cpp has no tensor for it")
    return problems


# The width of the stand-in FFN: one q8_0 block, the least llama.cpp quantises.
ZERO_FFN_WIDTH = 32


def llama_cpp_zero_ffn_layers(layers: list[LayerBlocks]) -> list[int]:
    """Layers without an FFN that llama.cpp's deci graph would run differently from us, which the GGUF writer
    therefore gives a `ZERO_FFN_WIDTH`-wide FFN whose weights are all zero (it adds exactly 0, so the layer computes
    what ours does):
    - attention without an FFN: deci.cpp does `if (n_ff == 0) continue;` before `inpL = cur`, dropping the layer's
      attention output;
    - no FFN in the last layer: deci.cpp selects the output rows inside the last layer and the same `continue`
      loses that selection, so llama.cpp aborts (GGML_ASSERT(buffer)) on any prompt longer than one token.
    A layer with neither attention nor FFN elsewhere runs right as it is (nothing to drop)."""
    last = len(layers) - 1
    return [i for i, b in enumerate(layers) if b.ffn.kind == "no_op" and (b.attention.kind != "no_op" or i == last)]


__all__ = ["ZERO_FFN_WIDTH", "llama_cpp_problems", "llama_cpp_zero_ffn_layers", "vllm_problems"]
