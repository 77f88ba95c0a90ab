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
    """Why llama.cpp's `deci` architecture (src/models/deci.cpp and its loader) could not run these layers as we do.
    Our GGUF writer stores every layer's real width, so widths need not be multiples of 256 there."""
    problems = []
    if layers and layers[0].attention.kind == "no_op":
        problems.append("no attention in layer 0: llama.cpp's deci loader needs attention in the first layer")
    linear_ffn = [i for i, b in enumerate(layers) if b.ffn.kind == "linear"]
    if linear_ffn:
        problems.append(f"linear FFN in {_layers(linear_ffn)}: llama.cpp has no tensor for it")
    dropped = [i for i, b in enumerate(layers) if b.attention.kind != "no_op" and b.ffn.kind == "no_op"]
    if dropped:
        problems.append(
            f"attention without an FFN in {_layers(dropped)}: llama.cpp's deci graph skips such a layer's output "
            "(it handles only layers where both are no-op)"
        )
    last = len(layers) - 1
    if layers and layers[last].ffn.kind == "no_op" and last not in dropped:
        # deci.cpp selects the output rows inside the last layer and then `continue`s past a layer without an FFN
        # before keeping the selection: with a prompt of more than one token llama.cpp aborts (GGML_ASSERT(buffer)).
        problems.append(
            f"no FFN in the last layer ({last}): llama.cpp's deci graph loses its output-row selection there and "
            "aborts on prompts longer than one token"
        )
    return problems


__all__ = ["llama_cpp_problems", "vllm_problems"]
