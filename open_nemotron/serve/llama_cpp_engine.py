"""`open-nemotron serve MODEL.gguf --engine llama.cpp`: llama.cpp computes the logits; this package's engine rules
and server do the rest.

For CPU users with a GGUF (`open-nemotron export MODEL --to gguf`): llama.cpp, through llama-cpp-python, runs the
forward pass. The request queue, sampling (the same per-request seeded draws), stop tokens and strings, the reasoning
budget (`BaseEngine`), the toggle (the chat template stored in the GGUF, rendered by transformers' own renderer) and
the `reasoning_content` split (server.py) are the ones `serve --engine ours` uses, so both engines answer a request
by the same rules. Tokens come from the GGUF's vocabulary through llama.cpp (`GGUFTokenizer`), as llama.cpp itself
would tokenize them.

One sequence at a time: llama-cpp-python's `Llama` holds one KV sequence, so requests wait in the queue while one
decodes (llama-cpp-python's own server does the same). A new request reuses the longest prefix the previous one
left in the KV cache (a system prompt, a conversation's earlier turns) and evaluates only the rest.

llama-cpp-python builds llama.cpp from source on install (~11 min on 2 cores): `make check-gguf` installs the
version the tests pass on. Without it, `--engine llama.cpp` says so and exits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from open_nemotron.errors import OpenNemotronError
from open_nemotron.serve.engine import BaseEngine, Completion, EngineError, _Running, _shared_prefix

LLAMA_CPP_PACKAGE = "llama-cpp-python==0.3.36"  # the version `make check-gguf` installs and the tests pass on
GGUF_MAGIC = b"GGUF"


class LlamaCppUnavailableError(OpenNemotronError, RuntimeError):
    """--engine llama.cpp cannot start (llama-cpp-python missing, or a file llama.cpp cannot load), with the reason."""


class Forward(Protocol):
    """A forward pass over one KV sequence (what `LlamaCppEngine` needs of a backend)."""

    vocab_size: int

    def logits(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """Keep the first `start` cached positions, evaluate `tokens` after them; the last position's logits."""
        ...


class LlamaCppForward:
    """llama.cpp's forward pass over the one KV sequence of a `llama_cpp.Llama`."""

    def __init__(self, llama: Any) -> None:
        import llama_cpp

        self.llama = llama
        self.vocab_size = int(llama.n_vocab())
        self._get_logits = llama_cpp.llama_get_logits

    def logits(self, tokens: Sequence[int], start: int) -> np.ndarray:
        # `Llama.eval` first drops the cached positions from `n_tokens` on (as `Llama.generate` does for its own
        # prefix reuse), so setting it keeps exactly the shared prefix.
        self.llama.n_tokens = start
        self.llama.eval(list(tokens))
        row = np.ctypeslib.as_array(self._get_logits(self.llama.ctx), shape=(self.vocab_size,))
        return row.astype(np.float32, copy=True)  # the buffer is overwritten by the next eval


class LlamaCppEngine(BaseEngine):
    """The engine's requests and rules over a one-sequence forward pass (llama.cpp's): one request decodes at a
    time, the others wait in order."""

    def __init__(self, forward: Forward, max_length: int, tokenizer: Any = None) -> None:
        super().__init__(1, max_length, forward.vocab_size, tokenizer)
        self.forward = forward
        self.held: list[int] = []  # tokens whose keys/values the sequence's cache holds, in order

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit the next waiting request when none runs (prefill, first token), then decode one token."""
        finished: list[Completion] = []
        if not self.running and self.waiting:
            request = self.waiting.popleft()
            prompt = list(request.prompt_ids)
            reuse = _shared_prefix(self.held, prompt)
            logits = self.forward.logits(prompt[reuse:], reuse)
            self.held = prompt
            self.prompt_tokens += len(prompt)
            self.reused_tokens += reuse
            state = self._new_state(request, 0)
            self.running[0] = state
            finished += self._advance(state, logits)
        if self.running:
            state = self.running[0]
            last = state.tokens[-1]
            logits = self.forward.logits([last], len(self.held))
            self.held.append(last)
            finished += self._advance(state, logits)
        return finished

    def _advance(self, state: _Running, logits: np.ndarray) -> list[Completion]:
        token = self._sample(torch.from_numpy(logits)[None], [state])[0]
        completion = self._append(state, token)
        return [] if completion is None else [completion]

    def _positions_used(self, state: _Running) -> int:
        return len(self.held)


class GGUFTokenizer:
    """A GGUF's own tokenizer through llama.cpp, with what the engine and the server call on a transformers
    tokenizer: `encode` (special tokens parsed), `decode`, `apply_chat_template` (the GGUF's
    `tokenizer.chat_template`, rendered by transformers' renderer with the same special-token variables) and the
    EOS / BOS tokens."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        metadata = dict(getattr(llama, "metadata", {}) or {})
        self.chat_template: str | dict[str, str] | None = metadata.get("tokenizer.chat_template")
        self.add_bos = metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        eos, bos = int(llama.token_eos()), int(llama.token_bos())
        self.eos_token_id = eos if eos >= 0 else None
        self.bos_token_id = bos if bos >= 0 else None
        self.eos_token = self._piece(self.eos_token_id)
        self.bos_token = self._piece(self.bos_token_id)

    def _piece(self, token: int | None) -> str | None:
        return None if token is None else self.decode([token])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        add_bos = add_special_tokens and self.add_bos
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives, as with
        # transformers' byte-level decoders (the server's IncrementalText waits for it).
        data = self.llama.detokenize(list(token_ids), special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        from transformers.utils.chat_template_utils import render_jinja_template

        templates = self.chat_template
        if isinstance(templates, dict):
            template = templates.get(chat_template or "default")
        else:
            template = chat_template or templates
        if template is None:
            raise EngineError("this GGUF has no tokenizer.chat_template: expected one (open-nemotron export writes it)")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        rendered, _ = render_jinja_template(
            conversations=[conversation],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **{**special, **kwargs},
        )
        return self.encode(rendered[0], add_special_tokens=False) if tokenize else rendered[0]


def load_gguf(path: str | Path, max_length: int, threads: int | None = None) -> tuple[LlamaCppEngine, GGUFTokenizer]:
    """The llama.cpp engine and the GGUF's tokenizer for the GGUF file at `path`, with a `max_length` context."""
    path = Path(path)
    how = "--engine llama.cpp serves a GGUF file; open-nemotron export MODEL --to gguf FILE writes one"
    if not path.exists():
        raise LlamaCppUnavailableError(f"{path}: no such file ({how})")
    if path.is_dir():
        raise LlamaCppUnavailableError(f"{path}: a directory, not a GGUF file ({how})")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise LlamaCppUnavailableError(f"{path}: not a GGUF file ({how})")
    try:
        import llama_cpp
    except ImportError as err:
        raise LlamaCppUnavailableError(
            f"--engine llama.cpp needs llama-cpp-python, which is not installed here: `make check-gguf` installs "
            f"{LLAMA_CPP_PACKAGE} (it builds llama.cpp from source, ~11 min on 2 cores)"
        ) from err
    try:
        llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=max_length, n_threads=threads or os.cpu_count() or 1, verbose=False
        )
    except (ValueError, RuntimeError) as err:
        raise LlamaCppUnavailableError(f"{path}: llama.cpp could not load it ({err})") from err
    tokenizer = GGUFTokenizer(llama)
    return LlamaCppEngine(LlamaCppForward(llama), max_length, tokenizer), tokenizer
