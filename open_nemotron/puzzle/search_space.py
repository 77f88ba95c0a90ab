"""Puzzle's search space: the attention and FFN variants each layer may take (paper-digest §1.1).

A variant is named by what it is, so one name means one block shape everywhere (costs are measured once per name):

    attention: ``attn:gqa_kv{n}`` (GQA with n KV heads), ``attn:linear``, ``attn:no_op``
    FFN:       ``ffn:swiglu_{n}`` (SwiGLU with intermediate size n), ``ffn:linear``, ``ffn:no_op``

Each layer's lists start with its parent sub-block (score 0, no training). `vllm_compatible` keeps only what stock
vLLM's nemotron-nas model serves (notes/decilm-format.md §7): no linear sub-blocks, one KV-head count for every layer
that has attention, attention kept in layer 0, FFN widths that survive vLLM's ``ffn_mult`` round trip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.configuration import (
    AttentionBlock,
    DeciLMConfig,
    FFNBlock,
    LayerBlocks,
    block_config_dict,
    ffn_width_is_portable,
    non_portable_ffn_layers,
    parse_block_config,
)

ATTENTION = "attention"
FFN = "ffn"


class SearchSpaceError(OpenNemotronError, ValueError):
    """A search-space setting that cannot be built for this parent."""


@dataclass
class SearchSpaceConfig:
    # KV-head counts to try besides the parent's: "divisors" (every divisor of the parent's count) or a list.
    kv_heads: str | list[int] = "divisors"
    attention_linear: bool = True
    attention_no_op: bool = True
    # FFN widths as fractions of the parent's intermediate size, rounded to a multiple of `ffn_multiple`: a multiple
    # of 256 unless `non_portable_ffn_widths`, since other readers rebuild widths from `ffn_mult` in steps of 256
    # (model/configuration.py); children then record the switch in their config.
    ffn_fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25, 0.1])
    ffn_multiple: int = 256
    non_portable_ffn_widths: bool = False
    ffn_linear: bool = True
    ffn_no_op: bool = True
    vllm_compatible: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.kv_heads, str):
            if self.kv_heads != "divisors":
                raise SearchSpaceError(
                    f"search_space.kv_heads = {self.kv_heads!r}: expected 'divisors' or a list of positive integers"
                )
        elif not all(isinstance(k, int) and k > 0 for k in self.kv_heads):
            raise SearchSpaceError(
                f"search_space.kv_heads = {self.kv_heads!r}: expected 'divisors' or a list of positive integers"
            )
        bad = [f for f in self.ffn_fractions if not 0 < f < 1]
        if bad:
            raise SearchSpaceError(f"search_space.ffn_fractions = {self.ffn_fractions}: expected numbers in (0, 1)")
        if self.ffn_multiple < 1:
            raise SearchSpaceError(f"search_space.ffn_multiple = {self.ffn_multiple}: expected a positive integer")
        if self.ffn_multiple % 256 and not self.non_portable_ffn_widths:
            raise SearchSpaceError(
                f"search_space.ffn_multiple = {self.ffn_multiple}: NVIDIA's DeciLM code, vLLM and llama.cpp rebuild "
                "FFN widths from ffn_mult in steps of 256, so other widths build a different FFN there; expected a "
                "multiple of 256, or non_portable_ffn_widths: true (children readable by open-nemotron only)"
            )


@dataclass(frozen=True)
class Variant:
    name: str
    part: str  # "attention" | "ffn"
    kind: str  # attention: gqa | linear | no_op;  ffn: swiglu | linear | no_op
    size: int | None = None  # KV heads (gqa) or intermediate size (swiglu)

    @property
    def block(self) -> AttentionBlock | FFNBlock:
        if self.part == ATTENTION:
            return AttentionBlock(self.kind, self.size)
        return FFNBlock(self.kind, self.size)

    @property
    def trainable(self) -> bool:
        """No-op variants have no weights; everything else is initialised and trained by BLD (unless parent)."""
        return self.kind != "no_op"


def attention_variant(block: AttentionBlock) -> Variant:
    if block.kind == "gqa":
        return Variant(f"attn:gqa_kv{block.num_key_value_heads}", ATTENTION, "gqa", block.num_key_value_heads)
    return Variant(f"attn:{block.kind}", ATTENTION, block.kind)


def ffn_variant(block: FFNBlock) -> Variant:
    if block.kind == "swiglu":
        return Variant(f"ffn:swiglu_{block.intermediate_size}", FFN, "swiglu", block.intermediate_size)
    return Variant(f"ffn:{block.kind}", FFN, block.kind)


def parse_variant(name: str) -> Variant:
    """The inverse of the naming scheme (used when reading artifacts)."""
    part, _, rest = name.partition(":")
    try:
        if part == "attn":
            if rest.startswith("gqa_kv"):
                return attention_variant(AttentionBlock("gqa", int(rest[len("gqa_kv") :])))
            if rest in ("linear", "no_op"):
                return attention_variant(AttentionBlock(rest))
        if part == "ffn":
            if rest.startswith("swiglu_"):
                return ffn_variant(FFNBlock("swiglu", int(rest[len("swiglu_") :])))
            if rest in ("linear", "no_op"):
                return ffn_variant(FFNBlock(rest))
    except ValueError:
        pass
    raise SearchSpaceError(
        f"variant {name!r}: expected attn:gqa_kv<N>, attn:linear, attn:no_op, ffn:swiglu_<N>, ffn:linear or ffn:no_op"
    )


@dataclass
class SearchSpace:
    """Per layer: the parent's variants and the candidate lists (parent first)."""

    parents: list[LayerBlocks]
    attention: list[list[Variant]]
    ffn: list[list[Variant]]
    settings: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return len(self.parents)

    def parent_variant(self, layer: int, part: str) -> Variant:
        return self.attention[layer][0] if part == ATTENTION else self.ffn[layer][0]

    def variants(self, part: str) -> list[list[Variant]]:
        return self.attention if part == ATTENTION else self.ffn

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "layers": [
                {"attention": [v.name for v in a], "ffn": [v.name for v in f]}
                for a, f in zip(self.attention, self.ffn, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], parent_config: DeciLMConfig) -> SearchSpace:
        return cls(
            parents=parent_config.layers_blocks(),
            attention=[[parse_variant(n) for n in layer["attention"]] for layer in data["layers"]],
            ffn=[[parse_variant(n) for n in layer["ffn"]] for layer in data["layers"]],
            settings=data.get("settings", {}),
        )


def _kv_head_options(config: SearchSpaceConfig, parent_kv: int, num_heads: int) -> list[int]:
    if config.kv_heads == "divisors":
        return [k for k in range(1, parent_kv + 1) if parent_kv % k == 0]
    bad = [k for k in config.kv_heads if num_heads % k]
    if bad:
        raise SearchSpaceError(
            f"search_space.kv_heads = {config.kv_heads}: {bad} do not divide the {num_heads} attention heads"
        )
    return sorted(set(config.kv_heads))


def ffn_width(parent_size: int, fraction: float, multiple: int) -> int | None:
    """`fraction` of the parent width rounded to the nearest multiple (at least one multiple); None when that is not
    below the parent (the option would be the parent's own width or wider)."""
    size = max(multiple, round(parent_size * fraction / multiple) * multiple)
    return size if size < parent_size else None


def build_search_space(parent_config: DeciLMConfig, config: SearchSpaceConfig) -> SearchSpace:
    """Every layer's candidate variants for this parent (which may itself be heterogeneous)."""
    parents = parent_config.layers_blocks()
    num_heads = parent_config.num_attention_heads
    odd = sorted(
        {parents[i].ffn.intermediate_size for i in non_portable_ffn_layers(parents, parent_config.hidden_size)}
    )
    if odd and not config.non_portable_ffn_widths:
        raise SearchSpaceError(
            f"the parent has FFN width(s) {odd}, not multiples of 256, which NVIDIA's DeciLM code, vLLM and llama.cpp "
            "cannot rebuild; its children would inherit them: expected a parent with multiples of 256, or "
            "search_space.non_portable_ffn_widths: true (children readable by open-nemotron only)"
        )
    attention, ffn = [], []
    gqa_counts = {b.attention.num_key_value_heads for b in parents if b.attention.kind == "gqa"}
    for i, blocks in enumerate(parents):
        parent_attn = attention_variant(blocks.attention)
        options: list[Variant] = [parent_attn]
        if blocks.attention.kind == "gqa" and not config.vllm_compatible:
            for k in _kv_head_options(config, blocks.attention.num_key_value_heads, num_heads):
                if k < blocks.attention.num_key_value_heads:
                    options.append(attention_variant(AttentionBlock("gqa", k)))
        if config.attention_linear and not config.vllm_compatible and blocks.attention.kind != "linear":
            options.append(attention_variant(AttentionBlock("linear")))
        keep_layer0 = config.vllm_compatible and i == 0
        if config.attention_no_op and blocks.attention.kind != "no_op" and not keep_layer0:
            options.append(attention_variant(AttentionBlock("no_op")))
        attention.append(_dedupe(options))

        parent_ffn = ffn_variant(blocks.ffn)
        f_options: list[Variant] = [parent_ffn]
        if blocks.ffn.kind == "swiglu":
            for fraction in config.ffn_fractions:
                size = ffn_width(blocks.ffn.intermediate_size, fraction, config.ffn_multiple)
                if size is None:
                    continue
                if config.vllm_compatible and not ffn_width_is_portable(size, parent_config.hidden_size):
                    continue
                f_options.append(ffn_variant(FFNBlock("swiglu", size)))
        if config.ffn_linear and not config.vllm_compatible and blocks.ffn.kind != "linear":
            f_options.append(ffn_variant(FFNBlock("linear")))
        if config.ffn_no_op and blocks.ffn.kind != "no_op":
            f_options.append(ffn_variant(FFNBlock("no_op")))
        ffn.append(_dedupe(f_options))

    if config.vllm_compatible:
        if len(gqa_counts) > 1:
            raise SearchSpaceError(
                f"search_space.vllm_compatible: the parent mixes KV-head counts {sorted(gqa_counts)}; vLLM needs one"
            )
        unservable = {v.name for layer in attention + ffn for v in layer[:1] if v.kind == "linear"}
        if unservable:
            raise SearchSpaceError(
                f"search_space.vllm_compatible: the parent itself has {sorted(unservable)}, which vLLM cannot serve"
            )
    return SearchSpace(parents, attention, ffn, {**asdict(config)})


def _dedupe(options: list[Variant]) -> list[Variant]:
    seen, out = set(), []
    for v in options:
        if v.name not in seen:
            seen.add(v.name)
            out.append(v)
    return out


def child_block_configs(
    parent_config: DeciLMConfig, attention: list[Variant], ffn: list[Variant]
) -> list[dict[str, Any]]:
    """`block_configs` entries (the nemotron-nas schema) for a chosen variant per layer."""
    return [
        block_config_dict(LayerBlocks(a.block, f.block), parent_config.num_attention_heads, parent_config.hidden_size)
        for a, f in zip(attention, ffn, strict=True)
    ]


def config_with_blocks(
    parent_config: DeciLMConfig, block_configs: list[dict[str, Any]], **overrides: Any
) -> DeciLMConfig:
    """A copy of the parent config with other `block_configs` (and any other fields overridden). The copy records
    `non_portable_ffn_widths` when a width needs it: the search space, where that switch is given, is the gate."""
    data = parent_config.to_dict()
    data.update(block_configs=block_configs, **overrides)
    layers = [
        parse_block_config(i, b, hidden_size=data["hidden_size"], num_attention_heads=data["num_attention_heads"])
        for i, b in enumerate(block_configs)
    ]
    if non_portable_ffn_layers(layers, data["hidden_size"]):
        data["non_portable_ffn_widths"] = True
    data.pop("layer_types", None)  # derived from block_configs
    return DeciLMConfig.from_dict(data)


def vllm_servable(attention: list[Variant], ffn: list[Variant], hidden_size: int) -> list[str]:
    """Why stock vLLM could not serve this architecture (empty when it can): model/compatibility.py's rule."""
    from open_nemotron.model.compatibility import vllm_problems

    return vllm_problems([LayerBlocks(a.block, f.block) for a, f in zip(attention, ffn, strict=True)], hidden_size)
