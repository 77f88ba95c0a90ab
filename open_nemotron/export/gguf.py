"""`open-nemotron export MODEL --to gguf FILE --dtype f32|f16|q8_0`: a GGUF that llama.cpp runs with its `deci`
architecture (NVIDIA's heterogeneous Llama), written with the `gguf` package.

What llama.cpp's DECI converter and loader expect (notes/decilm-format.md §5):
- per-layer arrays `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length`:
  (H, kv, width) for GQA, (H, 0, ·) for linear attention (only `attn_output` is stored), (0, 0, ·) for none, and a
  width of 0 for no FFN. We write each layer's real width, so it need not be a multiple of 256 here. Where deci.cpp
  would run a layer without an FFN differently from us (attention without an FFN; the last layer), the layer gets an
  all-zero 32-wide FFN instead, which adds exactly 0 (model/compatibility.py, `llama_cpp_zero_ffn_layers`).
- q/k weights permuted from the HF rotary layout to llama.cpp's interleaved one, with each layer's own head counts.
- RoPE base, llama3 scaling as a `rope_freqs` tensor, RMS epsilon, context length, head size.
- the tokenizer: llama.cpp's own converter takes its sentencepiece path for any vocabulary size other than
  Llama-3's, so a GPT-2 BPE vocabulary (SmolLM2's) is written here: tokens, merges, token types (added special tokens
  are control tokens), the pre-tokenizer name, special token ids, and the chat template with the reasoning toggle.
What the loader cannot run is refused first (model/compatibility.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open_nemotron.export.vllm import ExportError
from open_nemotron.model.compatibility import ZERO_FFN_WIDTH, llama_cpp_zero_ffn_layers

GGUF_DTYPES = ("f32", "f16", "q8_0")

# llama.cpp picks a pre-tokenizer (the regex that splits text before BPE) by name; its converter finds the name by
# hashing the tokenizer's output on a fixed text. We name the ones we know by their vocabulary instead and let the
# user give any other (`tokenizer_pre`).
KNOWN_PRE_TOKENIZERS = {"smollm": lambda vocab: vocab.get("<|im_start|>") == 1 and len(vocab) == 49152}


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (its converter's `LlamaModel.permute`)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_type(name: str, data: np.ndarray, dtype: str):
    from gguf import GGMLQuantizationType

    # As llama.cpp's converter: 1-D tensors (norms) and rope_freqs stay f32 whatever the file type.
    if dtype == "f32" or data.ndim == 1 or name == "rope_freqs.weight":
        return GGMLQuantizationType.F32
    if dtype == "f16":
        return GGMLQuantizationType.F16
    if data.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32
        return GGMLQuantizationType.F16
    return GGMLQuantizationType.Q8_0


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> None:
    from gguf import GGMLQuantizationType, quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    kind = _tensor_type(name, data, dtype)
    if kind == GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif kind == GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)


def _llama3_rope_freqs(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """llama.cpp's per-frequency divisors for llama3 RoPE scaling (its converter's `generate_extra_tensors`)."""
    base = rope["rope_theta"]
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _bpe_model(tokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer.json, its BPE model), or a refusal for any other kind of vocabulary."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"export --to gguf: tokenizer model {model.get('type')!r}: expected a byte-level BPE")
    return data, model


def resolve_tokenizer_pre(tokenizer, given: str | None) -> str:
    """The llama.cpp pre-tokenizer name: the one given, or ours for a vocabulary we know; else a refusal."""
    if given:
        return given
    vocab = dict(_bpe_model(tokenizer)[1]["vocab"])
    found = next((name for name, test in KNOWN_PRE_TOKENIZERS.items() if test(vocab)), None)
    if found is None:
        raise ExportError(
            "export --to gguf: this vocabulary's llama.cpp pre-tokenizer is not known to us: pass --tokenizer-pre "
            "NAME (the name llama.cpp's convert_hf_to_gguf.py prints for this tokenizer, e.g. llama-bpe, smollm)"
        )
    return found


def _add_tokenizer(writer, tokenizer, vocab_size: int, tokenizer_pre: str) -> None:
    from gguf import TokenType

    data, model = _bpe_model(tokenizer)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding is wider than the vocabulary: llama.cpp's padding tokens
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp's loader: "cannot find tokenizer merges in model file"
        raise ExportError(
            "export --to gguf: the tokenizer has no BPE merges, and llama.cpp's GPT-2 BPE loader needs them"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = tokenizer.chat_template
    if isinstance(template, dict):  # our reasoning templates: the inference one is llama.cpp's default
        writer.add_chat_template([{"name": name, "template": text} for name, text in template.items()])
    elif template:
        writer.add_chat_template(template)


def gguf_export_problems(model_dir: str | os.PathLike) -> list[str]:
    """Why llama.cpp's deci architecture could not run this checkpoint as we do (empty when it can)."""
    from open_nemotron.model.compatibility import llama_cpp_problems
    from open_nemotron.model.loading import load_deci_config

    return llama_cpp_problems(load_deci_config(model_dir).layers_blocks())


def export_gguf(
    model: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16", tokenizer_pre: str | None = None
) -> Path:
    """Write `model` as a llama.cpp `deci` GGUF at `out` (atomically); refuses what llama.cpp cannot run."""
    import gguf

    from open_nemotron.model.loading import load_model, load_tokenizer, resolve_model_dir

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"export --dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)} for --to gguf")
    model_dir = resolve_model_dir(model)
    problems = gguf_export_problems(model_dir)
    if problems:
        raise ExportError(f"{model_dir}: llama.cpp cannot run this model: " + "; ".join(problems))
    tokenizer = load_tokenizer(model_dir)
    tokenizer_pre = resolve_tokenizer_pre(tokenizer, tokenizer_pre)
    loaded = load_model(model_dir, dtype=torch.float32, device="cpu", implementation="ours")
    config = loaded.config
    layers = config.layers_blocks()
    heads, head_dim = config.num_attention_heads, config.head_dim
    if head_dim * heads != config.hidden_size:
        raise ExportError(
            f"{model_dir}: head_dim {head_dim} x {heads} heads != hidden_size {config.hidden_size}: llama.cpp's "
            "deci converter derives the head size from hidden_size / heads"
        )
    n_head = [0 if b.attention.kind == "no_op" else heads for b in layers]
    n_head_kv = [b.attention.num_key_value_heads if b.attention.kind == "gqa" else 0 for b in layers]
    zero_ffn = set(llama_cpp_zero_ffn_layers(layers))  # FFN-less layers llama.cpp needs an (all-zero) FFN in
    n_ff = [
        b.ffn.intermediate_size if b.ffn.kind == "swiglu" else ZERO_FFN_WIDTH if i in zero_ffn else 0
        for i, b in enumerate(layers)
    ]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), "deci")
        writer.add_name(model_dir.name)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_feed_forward_length(n_ff)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        rope = dict(config.rope_parameters)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[dtype]
        )
        _add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)

        rope_type = rope.get("rope_type", "default")
        if rope_type == "llama3":
            _add_tensor(writer, "rope_freqs.weight", torch.from_numpy(_llama3_rope_freqs(rope, head_dim)), "f32")
        elif rope_type not in ("default", None):
            raise ExportError(f"{model_dir}: RoPE type {rope_type!r}: the GGUF export writes default and llama3 RoPE")

        state = loaded.state_dict()
        _add_tensor(writer, "token_embd.weight", state["model.embed_tokens.weight"], dtype)
        for i, block in enumerate(layers):
            p, g = f"model.layers.{i}.", f"blk.{i}."
            if block.attention.kind != "no_op":
                _add_tensor(writer, g + "attn_norm.weight", state[p + "input_layernorm.weight"], dtype)
            if block.attention.kind == "gqa":
                q = permute_for_llama_cpp(state[p + "self_attn.q_proj.weight"], heads)
                k = permute_for_llama_cpp(state[p + "self_attn.k_proj.weight"], block.attention.num_key_value_heads)
                _add_tensor(writer, g + "attn_q.weight", q, dtype)
                _add_tensor(writer, g + "attn_k.weight", k, dtype)
                _add_tensor(writer, g + "attn_v.weight", state[p + "self_attn.v_proj.weight"], dtype)
                _add_tensor(writer, g + "attn_output.weight", state[p + "self_attn.o_proj.weight"], dtype)
            elif block.attention.kind == "linear":
                _add_tensor(writer, g + "attn_output.weight", state[p + "self_attn.linear_attn.weight"], dtype)
            if block.ffn.kind == "swiglu":
                _add_tensor(writer, g + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"], dtype)
                for part in ("gate", "up", "down"):
                    _add_tensor(writer, g + f"ffn_{part}.weight", state[p + f"mlp.{part}_proj.weight"], dtype)
            elif i in zero_ffn:  # down(silu(gate x) * up x) with zero weights adds exactly 0
                hidden = config.hidden_size
                _add_tensor(writer, g + "ffn_norm.weight", torch.ones(hidden), dtype)
                _add_tensor(writer, g + "ffn_gate.weight", torch.zeros(ZERO_FFN_WIDTH, hidden), dtype)
                _add_tensor(writer, g + "ffn_up.weight", torch.zeros(ZERO_FFN_WIDTH, hidden), dtype)
                _add_tensor(writer, g + "ffn_down.weight", torch.zeros(hidden, ZERO_FFN_WIDTH), dtype)
        _add_tensor(writer, "output_norm.weight", state["model.norm.weight"], dtype)
        if not config.tie_word_embeddings:
            _add_tensor(writer, "output.weight", state["lm_head.weight"], dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


__all__ = ["GGUF_DTYPES", "export_gguf", "gguf_export_problems", "permute_for_llama_cpp"]
