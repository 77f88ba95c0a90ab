"""Tiny random Llama and nemotron-nas models built in code, saved like real checkpoints (offline tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers_for_tests import chatml_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from open_nemotron.model.configuration import DeciLMConfig
from open_nemotron.model.modeling import DeciLMForCausalLM

TINY_VOCAB = 259  # the byte-level test tokenizer's size


def tiny_llama_config(**overrides) -> LlamaConfig:
    """Odd sizes on purpose (hidden 48, FFN 70) so shape bugs cannot hide behind powers of two."""
    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=70,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def random_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so a skipped or misplaced norm changes the output
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def save_tiny_llama(path: Path, config: LlamaConfig | None = None, seed: int = 0) -> Path:
    model = random_llama(config or tiny_llama_config(), seed)
    model.save_pretrained(path)
    chatml_tokenizer().save_pretrained(path)
    return path


def heterogeneous_config(**overrides) -> DeciLMConfig:
    """One layer of each kind: GQA with fewer KV heads, linear and no-op attention; narrower, linear, no-op FFN."""
    blocks = [
        {"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 70}},  # 2 KV heads, full FFN
        {"attention": {"replace_with_linear": True}, "ffn": {"intermediate_size": 33}},  # linear attn, narrow FFN
        {"attention": {"n_heads_in_group": 6}, "ffn": {"replace_with_linear": True}},  # 1 KV head, linear FFN
        {"attention": {"no_op": True}, "ffn": {"ffn_mult": 1.0}},  # no attention, ffn_mult -> 256
        {"attention": {"n_heads_in_group": 1}, "ffn": {"no_op": True}},  # MHA, no FFN
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},  # an empty layer
    ]
    cfg = tiny_llama_config(num_hidden_layers=len(blocks)).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    # Widths 70 and 33 are not multiples of 256 on purpose (shape bugs), hence the non-portable switch.
    cfg.update({"block_configs": blocks, "non_portable_ffn_widths": True, **overrides})
    return DeciLMConfig(**cfg)


def random_decilm(config: DeciLMConfig, seed: int = 0) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids clear of the special ids 0-2."""
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): row r has 2r pad tokens (id 2) on the left."""
    ids = random_ids(batch, length, seed=1)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 2
    return ids, mask


def no_gqa_decilm(seed: int = 0):
    """Linear and no-op attention only (a Puzzle child under a tight budget): a model that keeps no keys/values."""
    cfg = heterogeneous_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    blocks = [
        {"attention": {"replace_with_linear": True}, "ffn": {"intermediate_size": 70}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 33}},
    ]
    return random_decilm(DeciLMConfig(**{**cfg, "num_hidden_layers": 2, "block_configs": blocks}), seed=seed)


def assert_local_model_card(run_dir, base_model, trainer_name: str) -> None:
    """The run directory's README.md is our card for a local base model (train.model_card), not TRL's Hub card."""
    card = (Path(run_dir) / "README.md").read_text()
    assert f"`{base_model}`" in card and f"`{trainer_name}`" in card, card
    assert "huggingface.co/None" not in card
