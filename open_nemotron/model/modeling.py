"""Heterogeneous Llama in NVIDIA's DeciLM / "nemotron-nas" format, readable top to bottom.

Every layer is a pre-norm residual block pair, as in Llama, but each layer chooses its own sub-blocks from its
`block_configs` entry (see `configuration.py`):

    attention: GQA with this layer's KV-head count | Linear(hidden, hidden) (`self_attn.linear_attn`) | nothing
    ffn:       SwiGLU of this layer's width         | Linear(hidden, hidden) (`mlp.linear_mlp`)      | nothing

A "nothing" (no_op) sub-block has no weights and no pre-norm. Weight names match NVIDIA's checkpoints, so a
Llama checkpoint is a nemotron-nas checkpoint with every block equal to the parent's.

With every block equal to the parent, the forward pass computes exactly what `transformers`' LlamaForCausalLM
computes (same RoPE module, same RMSNorm math, SDPA attention); tests check logits to 1e-5 in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from open_nemotron.model.cache import CACHE_GENERATE_KWARG, CACHE_OUTPUT_FIELD, DeciLMCache, resolve_cache_argument
from open_nemotron.model.configuration import AttentionBlock, DeciLMConfig, FFNBlock


class DeciLMRMSNorm(nn.Module):
    """RMSNorm with Llama's numerics: normalise in fp32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of five; identical math in fp32.
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with faster CPU paths for decode, same products in the same order.

    - One row, weight column-major (the "gemv" layout of `decode_layout.py`): MKL's matrix-vector product runs on
      one core, so the output columns are split into one block per thread and multiplied as a batch (`bmm`, which
      runs the blocks in parallel): each output is still one dot product over the whole input, about 1.5x faster on
      2 cores. It equals `F.linear` to fp32 rounding: bit for bit where BLAS sums both kernels in one order (MKL on
      the AVX2 EPYC we measured), up to summation order where it does not (AVX-512 Xeon: 8e-5 on outputs of ~170).
    - 2-16 rows, weight row-major: CPU BLAS runs 1.3-3x faster as (W @ x^T)^T than as x @ W^T.

    Used only without autograd, on CPU; everything else is `F.linear`.
    """
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    out_features, in_features = weight.shape
    if rows == 1 and weight.stride() == (1, out_features):
        threads = torch.get_num_threads()
        # Biased products stay on F.linear: its fused bias add rounds differently from a separate one.
        if bias is None and threads > 1 and out_features % threads == 0 and out_features >= 256 * threads:
            # weight.t() is [in, out] row-major; view its columns as `threads` blocks of [in, out/threads].
            blocks = weight.t().view(in_features, threads, out_features // threads).permute(1, 0, 2)
            out = torch.bmm(x.reshape(1, 1, in_features).expand(threads, 1, in_features), blocks)
            # bmm's [threads, 1, out/threads] result is contiguous: in memory it already is the [.., out] row.
            return out.view(*x.shape[:-1], out_features)
    elif 1 < rows <= 16 and weight.is_contiguous():
        # .contiguous(): a transposed result would push later kernels (SDPA, elementwise) onto slow paths.
        out = torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous()
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out_features)
    return F.linear(x, weight, bias)


class DeciLMLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys, wrappable by PEFT) with `decode_linear`'s CPU paths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE on [batch, heads, seq, head_dim] with cos/sin of shape [batch, 1, seq, head_dim]."""
    return x * cos + rotate_half(x) * sin


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads (SDPA)."""

    def __init__(self, config: DeciLMConfig, num_key_value_heads: int, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = DeciLMLinear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = DeciLMLinear(config.hidden_size, num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = DeciLMLinear(config.hidden_size, num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = DeciLMLinear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.fused_qkv = None  # set by `prepare_for_decode`: q/k/v weights as views of one matrix

    def rotated_qkv(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [batch, heads, seq, head_dim], with RoPE applied to q and k."""
        bsz, seq, _ = hidden_states.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_key_value_heads, self.head_dim
        fused = self.fused_qkv
        if fused is not None and not torch.is_grad_enabled() and fused.is_live():
            qkv = decode_linear(hidden_states, fused.weight)
            # q and k sit side by side in the fused output: one RoPE over both (same elementwise math, fewer ops).
            qk = qkv[..., : (heads + kv_heads) * head_dim].view(bsz, seq, heads + kv_heads, head_dim)
            qk = apply_rotary(qk, cos.transpose(1, 2), sin.transpose(1, 2))
            v = qkv[..., (heads + kv_heads) * head_dim :].view(bsz, seq, kv_heads, head_dim)
            return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)
        q = self.q_proj(hidden_states).reshape(bsz, seq, heads, head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).reshape(bsz, seq, kv_heads, head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).reshape(bsz, seq, kv_heads, head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | PackedSegments | None,
        is_causal: bool,
        cache=None,
    ) -> torch.Tensor:
        bsz, seq, _ = hidden_states.shape
        q, k, v = self.rotated_qkv(hidden_states, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if isinstance(attention_mask, PackedSegments):
            # One causal kernel call per packed sequence: a [total, total] block mask would cost total^2 on the
            # slow masked path (TRL's padding-free packing puts a whole batch in one row).
            out = torch.cat(
                [self.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, True) for a, b in attention_mask.bounds],
                dim=2,
            )
        else:
            out = self.attend(q, k, v, attention_mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scaling,
            enable_gqa=self.num_key_value_heads != self.num_heads,
        )


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one bias-free linear map (Puzzle's "linear attention"); key `self_attn.linear_attn`."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_attn = DeciLMLinear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear_attn(hidden_states)


class DeciLMMLP(nn.Module):
    """SwiGLU feed-forward of this layer's width."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        bias = config.mlp_bias
        self.gate_proj = DeciLMLinear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = DeciLMLinear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = DeciLMLinear(intermediate_size, config.hidden_size, bias=bias)
        self.fused_gate_up = None  # set by `prepare_for_decode`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_gate_up
        if fused is not None and not torch.is_grad_enabled() and fused.is_live():
            gate, up = decode_linear(x, fused.weight).split(self.intermediate_size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one bias-free linear map; key `mlp.linear_mlp`."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_mlp = DeciLMLinear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


def build_attention(config: DeciLMConfig, block: AttentionBlock, layer_idx: int) -> nn.Module | None:
    if block.kind == "gqa":
        return DeciLMAttention(config, block.num_key_value_heads, layer_idx)
    if block.kind == "linear":
        return DeciLMLinearAttention(config)
    return None


def build_ffn(config: DeciLMConfig, block: FFNBlock) -> nn.Module | None:
    if block.kind == "swiglu":
        return DeciLMMLP(config, block.intermediate_size)
    if block.kind == "linear":
        return DeciLMLinearMLP(config)
    return None


class DeciLMDecoderLayer(GradientCheckpointingLayer):
    """One layer; a no-op sub-block has neither module nor pre-norm, so it costs nothing."""

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        blocks = config.layers_blocks()[layer_idx]
        self.attention_kind = blocks.attention.kind
        self.ffn_kind = blocks.ffn.kind
        attn = build_attention(config, blocks.attention, layer_idx)
        if attn is not None:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = attn
        ffn = build_ffn(config, blocks.ffn)
        if ffn is not None:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = ffn

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache=None,
    ) -> torch.Tensor:
        hidden_states = self.attention_residual(hidden_states, cos, sin, attention_mask, is_causal, cache)
        return self.ffn_residual(hidden_states)

    def attention_residual(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | PackedSegments | None = None,
        is_causal: bool = False,
        cache=None,
    ) -> torch.Tensor:
        """The residual stream after this layer's attention (Puzzle trains and scores the two halves apart)."""
        if self.attention_kind == "no_op":
            return hidden_states
        return hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, is_causal, cache
        )

    def ffn_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.ffn_kind == "no_op":
            return hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = False

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        # `prepare_for_decode` leaves column-major / fused-view weights, which safetensors cannot write as they are.
        if state_dict is None and any(not p.is_contiguous() for p in self.parameters()):
            state_dict = {k: v.contiguous() for k, v in self.state_dict().items()}
            if getattr(self.config, "tie_word_embeddings", False):
                state_dict.pop("lm_head.weight", None)
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)


def attention_masks(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int
) -> tuple[torch.Tensor | None, bool]:
    """The SDPA mask for one forward pass: (boolean mask [batch, 1, query, keys] or None, is_causal).

    `attention_mask` is the usual 2-D padding mask over past + current tokens (1 = real token). Without padding,
    no mask is built at all (SDPA's causal kernel for prefill, nothing for one-token decode), which is what makes
    the common cases cheap. With padding, a padded query row would mask every key, which SDPA turns into NaN;
    such rows may attend to themselves instead (their outputs are never used).
    """
    key_length = past_length + query_length
    if attention_mask is not None and attention_mask.shape[-1] != key_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions: expected past ({past_length}) + "
            f"current ({query_length}) = {key_length}"
        )
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding:
        if query_length == 1:
            return None, False
        if past_length == 0:
            return None, True
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(past_length, key_length, device=device)
    k_pos = torch.arange(key_length, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q, k] causal
    if has_padding:
        keys_real = attention_mask[:, None, None, :].bool()
        mask = mask & keys_real
        diagonal = k_pos[None, :] == q_pos[:, None]
        mask = mask | (~mask.any(-1, keepdim=True) & diagonal[None, None])
    return mask, False


def packed_sequences(position_ids: torch.Tensor) -> bool:
    """Whether a row holds several sequences packed end to end (positions restart), as TRL's padding-free packing
    produces: position_ids like [0 1 2 0 1 0 1 2 3]."""
    return bool(sequence_restarts(position_ids).any())


def sequence_restarts(position_ids: torch.Tensor) -> torch.Tensor:
    """[..., seq - 1] booleans: True where a new packed sequence starts (its position does not increase)."""
    return position_ids[..., 1:] <= position_ids[..., :-1]


@dataclass(frozen=True)
class PackedSegments:
    """Where the sequences packed into a single row start and end: [(start, end), ...] covering the row."""

    bounds: tuple[tuple[int, int], ...]

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> PackedSegments:
        starts = [0] + (sequence_restarts(position_ids[0]).nonzero().flatten() + 1).tolist()
        ends = starts[1:] + [position_ids.shape[-1]]
        return cls(tuple(zip(starts, ends, strict=True)))


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [batch, 1, seq, seq]: a token sees earlier tokens of its own sequence only."""
    restarts = sequence_restarts(position_ids)
    sequence = torch.cat([torch.zeros_like(restarts[..., :1]), restarts], dim=-1).long().cumsum(-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    same = sequence[..., :, None] == sequence[..., None, :]
    return (same & causal)[:, None]


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # transformers' own RoPE module: every rope_type (llama3, linear, dynamic, yarn, ...) for free.
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.first_cached_layer = next(
            (i for i, layer in enumerate(self.layers) if layer.attention_kind == "gqa"), None
        )
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The cache may come as `cache` (transformers >= 5.24) or `past_key_values` (earlier); other keyword
        arguments (e.g. `cache_position`, `num_items_in_batch`) are accepted and not needed."""
        cache = resolve_cache_argument(cache, past_key_values)
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: attention runs in SDPA kernels")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None and self.first_cached_layer is not None:
            cache = DeciLMCache(self.config)

        hidden_states = inputs_embeds
        cos, sin, mask, is_causal = self.layer_inputs(hidden_states, 0, position_ids, None, attention_mask, cache)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, cos, sin, mask, is_causal, cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_OUTPUT_FIELD: cache if use_cache or cache is not None else None},
        )

    def layer_inputs(
        self,
        hidden_states: torch.Tensor,
        start: int,
        position_ids: torch.LongTensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache,
        layers: list[nn.Module] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | PackedSegments | None, bool]:
        """What every layer of one pass shares: (cos, sin, attention mask, is_causal), the one place positions,
        padding, packed sequences and RoPE are worked out (`forward` and `run_layers` both use it).

        Positions default to continuing the cache (its length at the first GQA layer from `start` on); with left
        padding they count real tokens only, as transformers' generate does. Caller-given positions that restart
        mark packed sequences (TRL's padding-free packing), which attend only within themselves."""
        layers = list(self.layers)[start:] if layers is None else layers
        seq = hidden_states.shape[1]
        past = 0
        if cache is not None:
            cached = next(
                (start + k for k, lay in enumerate(layers) if getattr(lay, "attention_kind", None) == "gqa"), None
            )
            past = 0 if cached is None else cache.get_seq_length(cached)
            if cached is None:  # no layer attends over positions (linear / no-op attention only): nothing to mask
                attention_mask = None
        packed = False  # only caller-given positions can restart (checking costs a device sync: skipped otherwise)
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=hidden_states.device)[None]
        elif attention_mask is None and past == 0 and seq > 1:
            packed = packed_sequences(position_ids)
        if packed:
            if position_ids.shape[0] == 1:
                mask, is_causal = PackedSegments.from_position_ids(position_ids), False
            else:  # rows packed differently: one block-diagonal mask
                mask, is_causal = packed_causal_mask(position_ids), False
        else:
            mask, is_causal = attention_masks(attention_mask, seq, past)
        if position_embeddings is None:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        return cos, sin, mask, is_causal

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        *,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        replace: dict[int, nn.Module] | None = None,
        return_residuals: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run decoder layers ``start .. end - 1`` (default: to the last) on the residual stream ``hidden_states``
        [batch, seq, hidden]: the part of `forward` between the embeddings and the final norm, from any layer to
        any layer. ``run_layers(run_layers(embeds, 0, k), k)`` is the full forward's residual stream before the final
        norm, and ``run_layers(embeds, 0, k)`` its ``hidden_states[k]`` (``output_hidden_states=True``).

        - ``position_ids``, ``attention_mask`` (2-D padding mask over past + current tokens), ``cache``
          (a cache the GQA layers append to: ``transformers.DynamicCache`` or our ``StaticKVCache``): as in
          `forward`; default positions continue the cache (its length at the first GQA layer in the range).
        - ``position_embeddings``: ``self.rotary_emb(hidden_states, position_ids)`` (transformers' (cos, sin),
          [batch, seq, head_dim] each), for a caller that runs the same positions many times; when given, the
          rotary embeddings are not recomputed.
        - ``replace``: ``{layer index: module}`` run instead of the model's own layer at that index (same call
          signature as `DeciLMDecoderLayer`): Puzzle scores and trains block variants inside the parent this way.
        - ``return_residuals``: also return the residual stream after every half-layer, ``[input of start, after
          start's attention, output of start (= input of start + 1), ..., output of end - 1]`` (2·(end - start) + 1
          tensors; the layers must then have `attention_residual` / `ffn_residual`).
        """
        end = len(self.layers) if end is None else end
        if not 0 <= start <= end <= len(self.layers):
            raise ValueError(f"run_layers({start}, {end}): expected 0 <= start <= end <= {len(self.layers)}")
        replace = replace or {}
        layers = [replace.get(i, self.layers[i]) for i in range(start, end)]
        cos, sin, mask, is_causal = self.layer_inputs(
            hidden_states, start, position_ids, position_embeddings, attention_mask, cache, layers
        )
        if not return_residuals:
            for layer in layers:
                hidden_states = layer(hidden_states, cos, sin, mask, is_causal, cache)
            return hidden_states
        residuals = [hidden_states]
        for layer in layers:
            hidden_states = layer.attention_residual(hidden_states, cos, sin, mask, is_causal, cache)
            residuals.append(hidden_states)
            hidden_states = layer.ffn_residual(hidden_states)
            residuals.append(hidden_states)
        return hidden_states, residuals


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = DeciLMLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_OUTPUT_FIELD: getattr(outputs, CACHE_OUTPUT_FIELD)},
        )

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, fast_decode: bool = True, **kwargs):
        """`GenerationMixin.generate`, with plain greedy/sampling requests served by our lean static-cache loop
        (`generation.decode`: same tokens, much less per-step overhead; streamers too). Anything else (beams, logits
        processors, stopping criteria, dict outputs, ...) and `fast_decode=False` go to transformers' implementation,
        with our own `DeciLMCache` unless the caller brings a cache or asks for another kind."""
        from open_nemotron.model.generation import decode, merged_generation_config, plain_decode_request

        request = plain_decode_request(self, inputs, generation_config, kwargs) if fast_decode else None
        if request is not None:
            return decode(self, **request)
        # Decide on the settings transformers will use: a field the given config leaves unset comes from the model's
        # own generation config (a trained model's may say use_cache False; a cache handed over anyway would then
        # be read as holding the past of every full-sequence step).
        config, _ = merged_generation_config(self, generation_config, kwargs)
        wants_kv_cache = (
            config.use_cache is not False
            # transformers' StaticCache hands attention max-length buffers (for torch.compile); our layers attend
            # over what is cached, so "static" gets our cache too: same tokens (the fast loop's cache is static).
            and config.cache_implementation in (None, "dynamic", "static")
            and kwargs.get("cache") is None
            and kwargs.get("past_key_values") is None
            and self.model.first_cached_layer is not None
        )
        if wants_kv_cache:
            kwargs[CACHE_GENERATE_KWARG] = DeciLMCache(self.config)
            kwargs["cache_implementation"] = None  # transformers refuses a cache object beside an implementation
        return super().generate(inputs, generation_config, **kwargs)


__all__ = [
    "DeciLMAttention",
    "DeciLMDecoderLayer",
    "DeciLMForCausalLM",
    "DeciLMLinearAttention",
    "DeciLMLinearMLP",
    "DeciLMMLP",
    "DeciLMModel",
    "DeciLMPreTrainedModel",
    "DeciLMRMSNorm",
]
