"""Tiny tokenizers built in code (no downloads) with parent-style chat templates, for offline tests.

The model is a byte-level BPE with no merges: every byte is one token and the chat special tokens are single tokens,
so decoding is lossless, character offsets are exact and token prefixes match string prefixes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# SmolLM2-135M-Instruct's template exactly (cpu-feasibility.md §2): ChatML with a default system prompt.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template (also TRL's llama3.jinja).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def _byte_tokenizer(special_tokens: tuple[str, ...], merges: tuple[tuple[str, str], ...] = ()) -> Tokenizer:
    # Special tokens first so their ids are small and stable; merged tokens (if any) after the bytes.
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def chatml_tokenizer(
    chat_template: str | None = SMOLLM2_CHAT_TEMPLATE, merges: tuple[tuple[str, str], ...] = ()
) -> PreTrainedTokenizerFast:
    """A SmolLM2-like ChatML tokenizer (bos `<|im_start|>`, eos = pad `<|im_end|>`, as in SmolLM2's GGUF). `merges`:
    BPE merges (each adds a token after the bytes), for readers that need some, such as llama.cpp's loader."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(CHATML_SPECIAL_TOKENS, merges),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=chat_template,
    )


def llama3_tokenizer(chat_template: str | None = LLAMA3_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A Llama-3-Instruct-like tokenizer (bos `<|begin_of_text|>`, eos `<|eot_id|>`)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(LLAMA3_SPECIAL_TOKENS),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=chat_template,
    )
