"""Chatting with a model under the reasoning switch: batched generation from conversations.

`generate_chat` renders conversations with the tokenizer's chat template (``enable_thinking`` selects
``detailed thinking on/off``), generates, and returns only the new text. Our model class (nemotron-nas, and Llama
checkpoints loaded into it) generates on the continuous-batching engine (`open_nemotron.serve.engine`): every
conversation is one request, a finished one frees its slot for the next at once, a seeded call gives every
conversation its own generator (the same samples whatever else is in the batch), and a reasoning budget can close
think blocks. Any other model class goes through left-padded `generate` batches. Its decoding defaults follow the
Llama-Nemotron paper's evaluation protocol: reasoning on samples at temperature 0.6 and top-p 0.95 (no top-k),
reasoning off decodes greedily.

A raw parent's own template ignores ``enable_thinking``; `ensure_reasoning_template` installs ours so that a
parent and a converted model see exactly the same prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat_template import (
    UnsupportedChatFormatError,
    detect_chat_format,
    end_of_turn_token,
    install_reasoning_templates,
)

# Every template built by `reasoning_chat_template` opens with a Jinja comment containing this text.
REASONING_TEMPLATE_MARKER = "open-nemotron reasoning template"

# The Llama-Nemotron paper's sampling settings for reasoning-on evaluation (reasoning off is greedy).
THINKING_TEMPERATURE = 0.6
THINKING_TOP_P = 0.95


class ChatGenerationError(OpenNemotronError, ValueError):
    """Bad arguments to `generate_chat` (decoding settings, batch size, conversations)."""


def _default_template(tokenizer: Any) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("default")
    return template


def has_reasoning_template(tokenizer: Any) -> bool:
    """Whether the tokenizer's default chat template is one of ours (and so honours ``enable_thinking``)."""
    template = _default_template(tokenizer)
    return template is not None and REASONING_TEMPLATE_MARKER in template


def ensure_reasoning_template(tokenizer: Any) -> None:
    """Install our reasoning templates unless the tokenizer already has them (converted models do).

    Raises `UnsupportedChatFormatError` for a template that is neither ChatML nor Llama-3.
    """
    if not has_reasoning_template(tokenizer):
        install_reasoning_templates(tokenizer)


@dataclass(frozen=True)
class SamplingSettings:
    """Resolved decoding settings: greedy (`do_sample=False`, no temperature/top-p) or sampling."""

    do_sample: bool
    temperature: float | None
    top_p: float | None

    def describe(self) -> str:
        if not self.do_sample:
            return "greedy"
        return f"sampling (temperature {self.temperature}, top-p {self.top_p})"


def resolve_sampling(
    thinking: bool, do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None
) -> SamplingSettings:
    """Fill in the paper's defaults and check the settings.

    With `do_sample=None`: temperature 0 means greedy, an explicit temperature or top-p means sampling, and
    otherwise reasoning on samples and reasoning off is greedy. Sampling defaults to temperature 0.6 and top-p 0.95.
    """
    if do_sample is None:
        if temperature == 0:
            do_sample = False
            temperature = None
        else:
            do_sample = thinking or temperature is not None or top_p is not None
    if not do_sample:
        # A temperature or top-p under greedy decoding would be silently ignored: refuse it instead.
        if temperature not in (None, 0) or top_p not in (None, 1.0):
            raise ChatGenerationError(
                f"temperature={temperature}, top_p={top_p} with do_sample=False: greedy decoding takes neither "
                "(leave them unset, or sample)"
            )
        return SamplingSettings(False, None, None)
    temperature = THINKING_TEMPERATURE if temperature is None else float(temperature)
    top_p = THINKING_TOP_P if top_p is None else float(top_p)
    if not temperature > 0:
        raise ChatGenerationError(f"temperature = {temperature}: expected a positive number when sampling (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ChatGenerationError(f"top_p = {top_p}: expected a number in (0, 1]")
    return SamplingSettings(True, temperature, top_p)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id plus its chat format's end-of-turn id when that is a different token.

    Chat models end an answer with the end-of-turn token (``<|eot_id|>``, ``<|im_end|>``), which for some
    tokenizers is not the EOS token (Llama-3 base tokenizers have EOS ``<|end_of_text|>``).
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    try:
        eot = end_of_turn_token(detect_chat_format(_default_template(tokenizer)))
    except UnsupportedChatFormatError:
        eot = None  # some other template: EOS is all we know
    # The end-of-turn token counts when the vocabulary has it as one token. Asked through `encode` (special tokens
    # parsed) so that a tokenizer without HF's vocabulary API (the GGUF one, serve/llama_cpp_engine.py) answers too.
    eot_ids = tokenizer.encode(eot, add_special_tokens=False) if eot is not None else []
    if len(eot_ids) == 1 and int(eot_ids[0]) not in ids:
        ids.append(int(eot_ids[0]))
    if not ids:
        raise ChatGenerationError("tokenizer has no eos_token and its chat template has no known end-of-turn token")
    return ids


def render_chat_prompts(tokenizer: Any, conversations: list[list[dict]], thinking: bool) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt and the reasoning switch."""
    prompts = []
    for conversation in conversations:
        # return_dict=False: transformers 5 otherwise returns a BatchEncoding rather than the id list.
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, enable_thinking=thinking, tokenize=True, return_dict=False
        )
        prompts.append(list(ids))
    return prompts


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for prompts padded on the left, so every row's last token is its prompt's last."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _cut_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def request_seed(seed: int, index: int) -> int:
    """The seed of conversation `index` in a call seeded with `seed`: a hash, so that (seed, index) pairs never
    share a stream (seed + index would give call 1's row 0 the stream of call 0's row 1)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def uses_engine(model: Any) -> bool:
    """Whether `generate_chat` runs `model` on the continuous-batching engine (our model class) or on padded
    `generate` batches (any other class)."""
    from open_nemotron.model.modeling import DeciLMForCausalLM

    return isinstance(model, DeciLMForCausalLM)


def generate_chat(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict]],
    *,
    thinking: bool,
    max_new_tokens: int,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    reasoning_budget: int | None = None,
    padded: bool = False,
    on_reply: Callable[[int], None] | None = None,
) -> list[str]:
    """Generate one reply per conversation (new text only, special tokens removed), in input order.

    `thinking` sets the reasoning switch (the tokenizer must have our reasoning template for it to take effect,
    see `ensure_reasoning_template`); decoding defaults are those of `resolve_sampling`. On the engine (our model
    class, see `uses_engine`): `batch_size` is the number of slots decoding together, `seed` seeds conversation i
    with `request_seed(seed, i)` (reproducible whatever the batching), and `reasoning_budget` caps each think block
    (the engine writes `</think>` at that many reasoning tokens and the model goes on to its answer).
    `padded=True`, or a model of another class, runs left-padded `generate` batches instead (`seed` then seeds
    torch's global generator first; `reasoning_budget` is refused there). Greedy replies are the same on both
    paths. `on_reply(i)` is called as conversation i's reply is ready (progress).
    """
    if max_new_tokens < 1:
        raise ChatGenerationError(f"max_new_tokens = {max_new_tokens}: expected a positive integer")
    if batch_size < 1:
        raise ChatGenerationError(f"batch_size = {batch_size}: expected a positive integer")
    if reasoning_budget is not None and (not isinstance(reasoning_budget, int) or reasoning_budget < 0):
        raise ChatGenerationError(f"reasoning_budget = {reasoning_budget!r}: expected an integer >= 0 or None")
    sampling = resolve_sampling(thinking, do_sample, temperature, top_p)
    on_engine = uses_engine(model) and not padded
    if reasoning_budget is not None and not on_engine:
        raise ChatGenerationError(
            f"reasoning_budget needs the engine (our model class); got {type(model).__name__}"
            + (" with padded=True" if padded else "")
        )
    if not conversations:
        return []
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation:
            raise ChatGenerationError(f"conversation {i} is {conversation!r}: expected a non-empty list of messages")

    prompts = render_chat_prompts(tokenizer, conversations, thinking)
    stop_ids = stop_token_ids(tokenizer)
    if on_engine:
        return _generate_on_engine(
            model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size, reasoning_budget, stop_ids, on_reply
        )
    return _generate_padded(model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size, stop_ids, on_reply)


def generate_continuations(
    model: Any,
    tokenizer: Any,
    openings: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Sample the model's plain-text continuation of each opening (no chat template; special tokens as the
    tokenizer adds them to plain text: Llama-3's BOS, none for SmolLM2, whose "BOS" is the chat turn marker), new
    text only, in input order. Same engine / padded paths and per-row seeding as `generate_chat`."""
    if max_new_tokens < 1:
        raise ChatGenerationError(f"max_new_tokens = {max_new_tokens}: expected a positive integer")
    if batch_size < 1:
        raise ChatGenerationError(f"batch_size = {batch_size}: expected a positive integer")
    if not openings:
        return []
    sampling = SamplingSettings(do_sample=True, temperature=temperature, top_p=top_p)
    prompts = [list(tokenizer(text)["input_ids"]) for text in openings]
    if any(not p for p in prompts):
        raise ChatGenerationError("an opening is empty: expected at least one token to continue")
    stop_ids = stop_token_ids(tokenizer)
    if uses_engine(model):
        return _generate_on_engine(
            model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size, None, stop_ids, None
        )
    return _generate_padded(model, tokenizer, prompts, sampling, max_new_tokens, seed, batch_size, stop_ids, None)


def _generate_on_engine(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    sampling: SamplingSettings,
    max_new_tokens: int,
    seed: int | None,
    batch_size: int,
    reasoning_budget: int | None,
    stop_ids: list[int],
    on_reply: Callable[[int], None] | None,
) -> list[str]:
    from open_nemotron.serve.engine import Engine, Request, SamplingParams

    # Longest prompts first: they cost the most, and the short ones fill the slots freed at the end. Equal prompts
    # (the K samples of one eval prompt) next to each other: the engine then prefills the prompt once.
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), prompts[i], i))
    engine = Engine(
        model,
        max_batch_size=min(batch_size, len(prompts)),
        max_length=max(len(p) for p in prompts) + max_new_tokens,
        # Only a budget needs the engine's tokenizer; without one it would decode every reply a second time.
        tokenizer=tokenizer if reasoning_budget is not None else None,
    )
    requests = []
    for i in order:
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            top_k=0,
            stop_token_ids=tuple(stop_ids),
            seed=None if seed is None or not sampling.do_sample else request_seed(seed, i),
            max_reasoning_tokens=reasoning_budget,
        )
        requests.append(Request(prompts[i], params, request_id=str(i)))
    replies = [""] * len(prompts)
    finished = None if on_reply is None else (lambda completion: on_reply(int(completion.request_id)))
    for completion in engine.run(requests, on_finish=finished):
        tokens = _cut_at_stop(completion.token_ids, stop_ids)
        replies[int(completion.request_id)] = tokenizer.decode(tokens, skip_special_tokens=True)
    return replies


def _generate_padded(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    sampling: SamplingSettings,
    max_new_tokens: int,
    seed: int | None,
    batch_size: int,
    stop_ids: list[int],
    on_reply: Callable[[int], None] | None,
) -> list[str]:
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    sampling_kwargs: dict[str, Any] = {"do_sample": sampling.do_sample}
    if sampling.do_sample:
        sampling_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)

    # Batches of similar length waste less compute on padding; replies are put back in input order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad_token_id)
            output = model.generate(
                input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=stop_ids,
                **sampling_kwargs,
            )
            new_tokens = output[:, input_ids.shape[1] :].tolist()
            for row, tokens in zip(rows, new_tokens, strict=True):
                replies[row] = tokenizer.decode(_cut_at_stop(tokens, stop_ids), skip_special_tokens=True)
                if on_reply is not None:
                    on_reply(row)
    return replies
