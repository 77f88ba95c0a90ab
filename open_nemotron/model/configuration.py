"""Configuration of the heterogeneous Llama in NVIDIA's DeciLM / "nemotron-nas" format.

A nemotron-nas config is a Llama config plus `block_configs`: one entry per layer saying what that layer's attention
and FFN are. The field names are the ones NVIDIA ships for Llama-Nemotron Super/Ultra and vLLM reads:

    {"attention": {"no_op": bool, "replace_with_linear": bool, "n_heads_in_group": int | None},
     "ffn":       {"no_op": bool, "replace_with_linear": bool, "ffn_mult": float | None,
                   "intermediate_size": int | None}}

- attention: GQA with `num_attention_heads // n_heads_in_group` KV heads, or one `Linear(hidden, hidden)`
  (`replace_with_linear`), or nothing (`no_op`: the sub-layer *and* its pre-norm are skipped);
- ffn: SwiGLU of width `intermediate_size`, or one `Linear(hidden, hidden)`, or nothing.

Every reader other than ours builds the FFN from `ffn_mult` (NVIDIA's 51B/Super code, vLLM, llama.cpp:
`round_up_256(int(2 * ffn_mult * hidden / 3))`) or asserts `intermediate_size % 256 == 0` (puzzletron), so a width
is *portable* only when that formula gives it back, i.e. when it is a multiple of 256. Other widths are refused unless
`non_portable_ffn_widths` is true, which config.json then records (only open-nemotron reads such a checkpoint; other
readers build a different FFN and fail on the weight shapes). Both fields are written, consistent for portable widths;
`intermediate_size` wins when they disagree on reading. RoPE is written twice as well: transformers 5's
`rope_parameters` and the legacy top-level `rope_theta` / `rope_scaling`, which NVIDIA's config class reads (it falls
back to 10000 without `rope_theta`). notes/decilm-format.md has the readers' code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from open_nemotron.errors import OpenNemotronError

# Keys NVIDIA's checkpoints carry that we accept but that must stay at their "off" value (we do not implement
# sliding-window or sink attention, nor sparsity).
_ATTENTION_INACTIVE_KEYS = {
    "window_length": None,
    "num_sink_tokens": None,
    "use_prefill_window_in_sink_attention": False,
    "unshifted_sink": False,
    "sparsify": None,
}
_FFN_INACTIVE_KEYS = {"sparsify": None}
_FFN_OPTIONAL_KEYS = {"hidden_act", "weights_precision"}
_ATTENTION_OPTIONAL_KEYS = {"weights_precision", "num_key_value_heads"}


class BlockConfigError(OpenNemotronError, ValueError):
    """A `block_configs` entry is malformed; the message names the layer, the field, the value and what was expected."""


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's width formula (also vLLM's and llama.cpp's): round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    intermediate = int(2 * ffn_mult * hidden_size / 3)
    return int(math.ceil(intermediate / 256) * 256)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """Inverse of the width formula, rounded to 6 decimals as NVIDIA's `FFNConfig` does."""
    return round(3 * intermediate_size / (2 * hidden_size), 6)


def ffn_width_is_portable(intermediate_size: int, hidden_size: int) -> bool:
    """True when readers that rebuild the width from `ffn_mult` get `intermediate_size` back (a multiple of 256)."""
    mult = intermediate_size_to_ffn_mult(intermediate_size, hidden_size)
    return ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size


def non_portable_ffn_layers(layers: list[LayerBlocks], hidden_size: int) -> list[int]:
    """Indices of the SwiGLU layers whose width other readers cannot rebuild from `ffn_mult`."""
    return [
        i
        for i, b in enumerate(layers)
        if b.ffn.kind == "swiglu" and not ffn_width_is_portable(b.ffn.intermediate_size, hidden_size)
    ]


def _portable_width_error(layer: int, intermediate_size: int, hidden_size: int) -> BlockConfigError:
    rebuilt = ffn_mult_to_intermediate_size(intermediate_size_to_ffn_mult(intermediate_size, hidden_size), hidden_size)
    below = intermediate_size // 256 * 256
    nearest = f"{below} or {below + 256}" if below else "256"
    return BlockConfigError(
        f"block_configs[{layer}].ffn.intermediate_size = {intermediate_size}: NVIDIA's DeciLM code, vLLM and "
        f"llama.cpp rebuild the width from ffn_mult as round_up_256(int(2 * ffn_mult * hidden_size / 3)) and would "
        f"build {rebuilt}; expected a multiple of 256 (nearest: {nearest}), or non_portable_ffn_widths=true to keep "
        "it (recorded in config.json; then only open-nemotron reads the checkpoint)"
    )


@dataclass(frozen=True)
class AttentionBlock:
    """One layer's attention: `kind` is "gqa", "linear" or "no_op"; `num_key_value_heads` is set for "gqa"."""

    kind: str
    num_key_value_heads: int | None = None

    @property
    def has_kv_cache(self) -> bool:
        return self.kind == "gqa"


@dataclass(frozen=True)
class FFNBlock:
    """One layer's FFN: `kind` is "swiglu", "linear" or "no_op"; `intermediate_size` is set for "swiglu"."""

    kind: str
    intermediate_size: int | None = None
    hidden_act: str = "silu"


@dataclass(frozen=True)
class LayerBlocks:
    attention: AttentionBlock
    ffn: FFNBlock


class BlockView(dict):
    """A `block_configs` entry (and its `attention` / `ffn` parts): a plain dict that also reads as attributes,
    because vLLM's nemotron-nas model and its config convertor read `block.attention.no_op`, `block.ffn.ffn_mult`
    (NVIDIA's remote code builds dataclasses there). JSON, copies and pickles see an ordinary dict."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle probe dunders: never answer them from the keys
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"block config has no field {name!r}") from None


def _block_view(entry: dict[str, Any]) -> BlockView:
    return BlockView({k: _block_view(v) if isinstance(v, dict) else v for k, v in entry.items()})


def _check_bool(layer: int, part: str, entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise BlockConfigError(f"block_configs[{layer}].{part}.{key} = {value!r}: expected true or false")
    return value


def _replacement_kind(layer: int, part: str, entry: dict[str, Any]) -> str | None:
    """ "no_op", "linear" or None (the real sub-block) from the two mutually exclusive flags."""
    no_op = _check_bool(layer, part, entry, "no_op")
    linear = _check_bool(layer, part, entry, "replace_with_linear")
    if no_op and linear:
        raise BlockConfigError(
            f"block_configs[{layer}].{part}: no_op and replace_with_linear are both true: expected at most one"
        )
    return "no_op" if no_op else "linear" if linear else None


def _check_unknown_and_inactive(layer: int, part: str, entry: dict[str, Any], known: set[str], inactive: dict) -> None:
    unknown = sorted(set(entry) - known - set(inactive))
    if unknown:
        raise BlockConfigError(
            f"block_configs[{layer}].{part} has unknown field(s) {unknown}: expected only {sorted(known | set(inactive))}"
        )
    for key, off in inactive.items():
        if key in entry and entry[key] not in (off, None, [] if off is None else off):
            raise BlockConfigError(
                f"block_configs[{layer}].{part}.{key} = {entry[key]!r}: not supported by open-nemotron "
                f"(expected {off!r})"
            )


def parse_block_config(
    layer: int, block: Any, *, hidden_size: int, num_attention_heads: int, hidden_act: str = "silu"
) -> LayerBlocks:
    """Validate one `block_configs` entry and resolve it to concrete layer shapes."""
    if not isinstance(block, dict) or set(block) - {"attention", "ffn"} or not {"attention", "ffn"} <= set(block):
        raise BlockConfigError(
            f"block_configs[{layer}] = {block!r}: expected a mapping with exactly the keys 'attention' and 'ffn'"
        )
    attn, ffn = block["attention"], block["ffn"]
    for part, entry in (("attention", attn), ("ffn", ffn)):
        if not isinstance(entry, dict):
            raise BlockConfigError(f"block_configs[{layer}].{part} = {entry!r}: expected a mapping")

    # Attention.
    _check_unknown_and_inactive(
        layer,
        "attention",
        attn,
        {"no_op", "replace_with_linear", "n_heads_in_group"} | _ATTENTION_OPTIONAL_KEYS,
        _ATTENTION_INACTIVE_KEYS,
    )
    kind = _replacement_kind(layer, "attention", attn)
    if kind is not None:
        attention = AttentionBlock(kind)
    else:
        group = attn.get("n_heads_in_group")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1 or num_attention_heads % group:
            divisors = [d for d in range(1, num_attention_heads + 1) if num_attention_heads % d == 0]
            raise BlockConfigError(
                f"block_configs[{layer}].attention.n_heads_in_group = {group!r}: expected a divisor of "
                f"num_attention_heads={num_attention_heads}, one of {divisors}"
            )
        attention = AttentionBlock("gqa", num_attention_heads // group)

    # FFN.
    _check_unknown_and_inactive(
        layer,
        "ffn",
        ffn,
        {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size"} | _FFN_OPTIONAL_KEYS,
        _FFN_INACTIVE_KEYS,
    )
    kind = _replacement_kind(layer, "ffn", ffn)
    act = ffn.get("hidden_act") or hidden_act
    if act not in ("silu", "swish"):
        raise BlockConfigError(f"block_configs[{layer}].ffn.hidden_act = {act!r}: expected 'silu'")
    if kind is not None:
        ffn_block = FFNBlock(kind)
    else:
        size, mult = ffn.get("intermediate_size"), ffn.get("ffn_mult")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise BlockConfigError(
                    f"block_configs[{layer}].ffn.intermediate_size = {size!r}: expected a positive integer"
                )
        elif isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult > 0:
            size = ffn_mult_to_intermediate_size(float(mult), hidden_size)
        else:
            raise BlockConfigError(
                f"block_configs[{layer}].ffn: intermediate_size = {size!r}, ffn_mult = {mult!r}: expected a positive "
                "intermediate_size or ffn_mult"
            )
        ffn_block = FFNBlock("swiglu", size, "silu")
    return LayerBlocks(attention, ffn_block)


def block_config_dict(
    layer: LayerBlocks, num_attention_heads: int, hidden_size: int, ffn_mult: float | None = None
) -> dict[str, Any]:
    """The canonical on-disk `block_configs` entry for resolved layer shapes: every field explicit, both `ffn_mult`
    and `intermediate_size` written (vLLM reads the former, NVIDIA's newer code and ours the latter); a given
    `ffn_mult` is kept when it reproduces the width."""
    a, f = layer.attention, layer.ffn
    if f.kind == "swiglu" and (
        ffn_mult is None or ffn_mult_to_intermediate_size(ffn_mult, hidden_size) != f.intermediate_size
    ):
        ffn_mult = intermediate_size_to_ffn_mult(f.intermediate_size, hidden_size)
    attention = {
        "no_op": a.kind == "no_op",
        "replace_with_linear": a.kind == "linear",
        "n_heads_in_group": num_attention_heads // a.num_key_value_heads if a.kind == "gqa" else None,
    }
    ffn = {
        "no_op": f.kind == "no_op",
        "replace_with_linear": f.kind == "linear",
        "ffn_mult": ffn_mult if f.kind == "swiglu" else None,
        "intermediate_size": f.intermediate_size if f.kind == "swiglu" else None,
    }
    return _block_view({"attention": attention, "ffn": ffn})


def _given_ffn_mult(block: dict[str, Any]) -> float | None:
    mult = block.get("ffn", {}).get("ffn_mult")
    return float(mult) if isinstance(mult, (int, float)) and not isinstance(mult, bool) else None


@strict
class DeciLMConfig(LlamaConfig):
    r"""Llama config + per-layer `block_configs` (DeciLM / nemotron-nas format).

    With `block_configs=None` every layer is the plain Llama layer described by the global fields.
    """

    model_type = "nemotron-nas"
    # Not a field (never written to config.json): TRL's `create_model_from_path`, which builds GRPO's / DPO's
    # reference model, reads `config.auto_map` for an architecture transformers does not export, and transformers'
    # per-layer config access raises on a missing attribute. We register with the Auto classes instead: an empty,
    # read-only map (transformers tests `name in config.auto_map` when the attribute exists).
    auto_map = MappingProxyType({})

    block_configs: list | None = None
    # Allows SwiGLU widths that other readers cannot rebuild from `ffn_mult` (module docstring); written to config.json.
    non_portable_ffn_widths: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is None:
            uniform = LayerBlocks(
                AttentionBlock("gqa", self.num_key_value_heads),
                FFNBlock("swiglu", self.intermediate_size, "silu"),
            )
            self.block_configs = [
                block_config_dict(uniform, self.num_attention_heads, self.hidden_size)
                for _ in range(self.num_hidden_layers)
            ]
        if not isinstance(self.block_configs, list) or len(self.block_configs) != self.num_hidden_layers:
            found = (
                len(self.block_configs) if isinstance(self.block_configs, list) else type(self.block_configs).__name__
            )
            raise BlockConfigError(
                f"block_configs has {found} entries: expected one per layer (num_hidden_layers={self.num_hidden_layers})"
            )
        # Validate every entry now, so a bad config fails at load time with the layer and field named, not deep
        # inside a forward pass; then store the canonical form (NVIDIA-style entries with only ffn_mult or extra
        # inactive keys are accepted and written back explicit).
        parsed_layers = self.layers_blocks()
        if not isinstance(self.non_portable_ffn_widths, bool):
            raise BlockConfigError(
                f"non_portable_ffn_widths = {self.non_portable_ffn_widths!r}: expected true or false"
            )
        odd = [] if self.non_portable_ffn_widths else non_portable_ffn_layers(parsed_layers, self.hidden_size)
        if odd:
            raise _portable_width_error(odd[0], parsed_layers[odd[0]].ffn.intermediate_size, self.hidden_size)
        self.block_configs = [
            block_config_dict(parsed, self.num_attention_heads, self.hidden_size, _given_ffn_mult(raw))
            for parsed, raw in zip(parsed_layers, self.block_configs, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict plus the legacy top-level `rope_theta` (and `rope_scaling` for a non-default RoPE) that
        NVIDIA's DeciLM config class reads instead of `rope_parameters`."""
        out = super().to_dict()
        rope = out.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:  # a flat (not per-layer-type) RoPE, as Llama's
            out["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            else:
                out.pop("rope_scaling", None)
        return out

    def layers_blocks(self) -> list[LayerBlocks]:
        """Resolved (validated) shapes of every layer."""
        return [
            parse_block_config(
                i,
                b,
                hidden_size=self.hidden_size,
                num_attention_heads=self.num_attention_heads,
                hidden_act=self.hidden_act,
            )
            for i, b in enumerate(self.block_configs)
        ]

    def kv_cache_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes of K and V cached per token over all layers (GQA layers only)."""
        head_dim = self.head_dim
        return sum(
            2 * b.attention.num_key_value_heads * head_dim * bytes_per_element
            for b in self.layers_blocks()
            if b.attention.has_kv_cache
        )


__all__ = [
    "AttentionBlock",
    "BlockConfigError",
    "BlockView",
    "DeciLMConfig",
    "FFNBlock",
    "LayerBlocks",
    "block_config_dict",
    "ffn_mult_to_intermediate_size",
    "ffn_width_is_portable",
    "intermediate_size_to_ffn_mult",
    "non_portable_ffn_layers",
    "parse_block_config",
]
