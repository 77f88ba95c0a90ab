"""A continuous-batching generation engine over a slot KV cache.

Requests (prompt token ids + sampling settings + stop conditions) wait in a queue. Each engine step first
prefills waiting requests into free slots of a preallocated KV cache (one slot = one row of every GQA layer's
[slots, kv_heads, max_length, head_dim] buffers, each layer with its own KV-head count; layers without attention
have none), then decodes one token for every running request in one batched forward pass. A request that finishes
frees its slot at once and the next waiting request takes it, so a long generation never holds short ones back.

The decode pass runs our model's ordinary `forward`: `SlotKVCache.update` writes each row's new key/value at that
row's own length and returns the buffers up to the longest running row, and the 2-D attention mask marks each row's
valid keys, so rows of any length share one pass (rows past the highest running slot are not computed at all). A
new request reuses the longest prompt prefix any slot holds and prefills only the rest.

Per request: temperature (0 = greedy), top-k, top-p, max new tokens, stop token ids and strings, a seed and a
reasoning budget; a seeded request draws from its own generator, so it gives the same tokens whatever else is in
the batch.

With the engine's tokenizer: stop strings (the text ends before the first one) and a per-request reasoning budget
(`max_reasoning_tokens`: when a think block reaches it, the engine writes `</think>` itself and the model goes on
to its answer). Users: `open_nemotron.model.chat.generate_chat` (eval, the HF-model teacher, `generate`) and the
server (`server.py`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from open_nemotron.errors import OpenNemotronError

# Shorter shared prefixes are prefilled with the rest of the batch rather than in a pass of their own.
MIN_REUSE = 4


def _shared_prefix(held: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` a slot holding `held` can reuse: the common prefix, less the prompt's last
    token (a prefill needs at least one token to produce the next-token logits)."""
    limit = min(len(held), len(prompt) - 1)
    n = 0
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n


# Sampling reads the highest CANDIDATES logits of a row (one top-k instead of a sort of the vocabulary) when they
# already hold the top-p mass, which at the usual settings (temperature 0.6-1, top-p 0.9-0.95) they almost always do.
CANDIDATES = 256


def candidate_width(vocab: int, top_k: int, top_p: float) -> int:
    """How many candidates a row draws from when its nucleus fits in them: the whole vocabulary with neither top-k
    nor top-p, else the top_k (or CANDIDATES) highest logits."""
    if not top_k and top_p >= 1.0:
        return vocab
    return min(vocab, top_k or CANDIDATES)


def candidate_distribution(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [rows, C], token ids [rows, C]): what each row of `logits` [rows, vocab] draws from, after
    transformers' warpers in their order: temperature, top-k (the k highest logits), top-p (the smallest set of top
    tokens whose mass reaches top_p, at least one); probabilities of tokens outside the set are 0. In descending
    logit order, except with neither top-k nor top-p (then the whole vocabulary in token order).

    Exact, and cheap: the nucleus is a prefix of the descending order, so when the C highest logits (C = top_k, or
    CANDIDATES) hold the top-p mass the answer lies among them; a row where they do not is recomputed over the
    whole vocabulary."""
    logits = logits / temperature if temperature != 1.0 else logits
    rows, vocab = logits.shape
    if not top_k and top_p >= 1.0:  # the whole vocabulary, in token order
        return logits.softmax(-1), torch.arange(vocab, device=logits.device).expand(rows, -1)
    width = candidate_width(vocab, top_k, top_p)
    values, ids = torch.topk(logits, width, dim=-1)  # sorted, descending
    # With top-k the distribution is a softmax over the kept logits; else each candidate's share of the whole.
    probs = values.softmax(-1) if top_k else (values - torch.logsumexp(logits, -1, keepdim=True)).exp()
    if top_p < 1.0:
        short = probs.sum(-1) < top_p  # rows whose nucleus reaches past the candidates
        if bool(short.any()) and width < vocab:
            values_all, ids_all = torch.sort(logits[short], descending=True, dim=-1)
            probs_all = values_all.softmax(-1)
            probs = torch.cat([probs, probs.new_zeros(len(probs), vocab - width)], -1)
            ids = torch.cat([ids, ids.new_zeros(len(ids), vocab - width)], -1)
            probs[short], ids[short] = probs_all, ids_all
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs[..., 0] = probs[..., 0].clamp_min(torch.finfo(probs.dtype).tiny)  # at least one token
    return probs / probs.sum(-1, keepdim=True), ids


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability `probs[i]` (a 1-D vector summing to 1), by the exponential race: the argmax
    of probs / E with E ~ Exp(1) i.i.d. from `generator`, so a request's draws depend on its generator only."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int((probs / race).argmax())


def sample_rows(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` [rows, vocab], all rows with the same settings: one `candidate_distribution`,
    then one `draw` per row from that row's generator.

    Each row races over as many entries as it would alone: its candidates (top_k, or CANDIDATES, or the whole
    vocabulary with neither cut), or the whole vocabulary when its own nucleus reaches past them. A row that fits
    in its candidates is widened with zeros when another row of the group needed the whole vocabulary; racing
    over those zeros too would advance its generator by a number of draws that depends on the other requests,
    and every later token of the request would change with the batch."""
    probs, ids = candidate_distribution(logits, temperature, top_k, top_p)
    own = candidate_width(logits.shape[-1], top_k, top_p)
    tokens = []
    for row, generator in enumerate(generators):
        p = probs[row]
        if p.shape[0] > own and not bool(p[own:].any()):
            p = p[:own]
        tokens.append(int(ids[row, draw(p, generator)]))
    return tokens


class EngineError(OpenNemotronError, ValueError):
    """A request the engine cannot serve (the field, its value and what was expected)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. `temperature == 0` is greedy (argmax); top_k 0 and top_p 1.0 keep every token."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (need the engine's tokenizer); the text ends before the first one
    seed: int | None = None
    max_reasoning_tokens: int | None = None  # think-block budget: at it, the engine writes `</think>` itself

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EngineError(f"max_tokens = {self.max_tokens!r}: expected a positive integer")
        if not self.temperature >= 0:
            raise EngineError(f"temperature = {self.temperature!r}: expected a number >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise EngineError(f"top_k = {self.top_k!r}: expected an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p = {self.top_p!r}: expected a number in (0, 1]")
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise EngineError(f"stop = {self.stop!r}: expected non-empty strings")
        if self.max_reasoning_tokens is not None and (
            not isinstance(self.max_reasoning_tokens, int) or self.max_reasoning_tokens < 0
        ):
            raise EngineError(f"max_reasoning_tokens = {self.max_reasoning_tokens!r}: expected an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    # Called with each new token id as it is chosen (streaming); runs on the engine's thread, so keep it short.
    on_token: Callable[[int], None] | None = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token, included in token_ids, or a stop string), "length" or "cancelled"
    text: str | None = None  # the new text (special tokens skipped, cut before a stop string); needs a tokenizer
    reasoning_tokens: int = 0  # tokens generated inside the think block


@dataclass
class _Running:
    request: Request
    slot: int
    tokens: list[int]
    generator: torch.Generator | None
    thinking: bool = False  # inside a think block (opened by the prompt or by the model, not yet closed)
    reasoning_tokens: int = 0
    forced: list[int] = field(default_factory=list)  # tokens the engine writes instead of sampling (`</think>`)


class SlotKVCache:
    """Keys/values of every GQA layer for `slots` rows of up to `max_length` positions each, rows independent.

    Row r holds `lengths[r]` positions. `update` (called by our attention with this step's keys/values, one new
    position per row) writes them at each row's own length and returns the buffers' first `window` positions (the
    engine sets `window` to the longest running row + 1 before each step, so attention never reads the empty
    tail); the engine's attention mask marks which of them are real for each row. `get_seq_length` answers
    `window - 1` so that our model expects a mask of `window` key positions for a one-token step."""

    def __init__(self, config, slots: int, max_length: int, dtype: torch.dtype, device: torch.device) -> None:
        self.max_length = max_length
        self.window = max_length
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        for blocks in config.layers_blocks():
            shape = (slots, blocks.attention.num_key_value_heads, max_length, config.head_dim)
            has = blocks.attention.has_kv_cache
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device) if has else None)
            self.values.append(torch.zeros(shape, dtype=dtype, device=device) if has else None)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        rows = torch.arange(key.shape[0], device=key.device)
        positions = self.lengths[: key.shape[0]]
        keys, values = self.keys[layer_idx][: key.shape[0]], self.values[layer_idx][: key.shape[0]]
        keys[rows, :, positions] = key[:, :, 0]
        values[rows, :, positions] = value[:, :, 0]
        return keys[:, :, : self.window], values[:, :, : self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.window - 1

    def write_prefill(self, slot: int, prefill_cache, row: int, start: int, length: int, offset: int = 0) -> None:
        """Copy row `row`'s prefilled keys/values (positions start..start+length of a transformers-style cache, e.g. a
        left-padded batch) into `slot` as its positions offset..offset+length (offset > 0: after a reused prefix)."""
        for i, keys in enumerate(self.keys):
            if keys is None:
                continue
            layer = prefill_cache.layers[i]
            keys[slot, :, offset : offset + length] = layer.keys[row, :, start : start + length]
            self.values[i][slot, :, offset : offset + length] = layer.values[row, :, start : start + length]
        self.lengths[slot] = offset + length

    def copy_positions(self, source: int, target: int, length: int) -> None:
        """Copy slot `source`'s first `length` positions to slot `target` (a prefix another request reuses)."""
        for i, keys in enumerate(self.keys):
            if keys is not None:
                keys[target, :, :length] = keys[source, :, :length]
                self.values[i][target, :, :length] = self.values[i][source, :, :length]

    def load_prefix(self, slot: int, length: int, cache) -> None:
        """Put `slot`'s first `length` positions into an empty transformers-style `cache` (one row), so that a forward
        pass over the rest of a prompt attends to them."""
        # Views, not copies: the forward pass concatenates the rest onto them into new tensors.
        for i, keys in enumerate(self.keys):
            if keys is not None:
                cache.update(keys[slot : slot + 1, :, :length], self.values[i][slot : slot + 1, :, :length], i)


class BaseEngine:
    """What every engine shares: the request queue, per-request sampling (seeded generators, forced tokens), stop
    tokens and strings, reasoning budgets and completions. A subclass computes the next-token logits in `step` (this
    package's model over a slot KV cache: `Engine`; llama.cpp: `serve/llama_cpp_engine.py`), so every engine follows
    the same rules token for token."""

    def __init__(self, max_batch_size: int, max_length: int, vocab_size: int, tokenizer=None) -> None:
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size = {max_batch_size}: expected a positive integer")
        if max_length < 2:
            raise EngineError(f"max_length = {max_length}: expected at least 2")
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer  # for stop strings, reasoning budgets and Completion.text
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Running] = {}  # slot -> request
        self._ids = itertools.count()
        self.prompt_tokens = 0  # prompt tokens admitted
        self.reused_tokens = 0  # of those, read from kept keys/values instead of prefilled

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> str:
        prompt = list(request.prompt_ids)
        if not prompt:
            raise EngineError("prompt_ids is empty: expected at least one token")
        if len(prompt) + 1 > self.max_length:
            raise EngineError(
                f"prompt of {len(prompt)} tokens: expected at most {self.max_length - 1} (max_length {self.max_length})"
            )
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise EngineError(f"prompt_ids: expected token ids in [0, {self.vocab_size})")
        if self.tokenizer is None and (request.params.stop or request.params.max_reasoning_tokens is not None):
            raise EngineError(
                "stop strings and max_reasoning_tokens need the engine's tokenizer: Engine(..., tokenizer=)"
            )
        if request.request_id is None:
            request.request_id = f"req-{next(self._ids)}"
        self.waiting.append(request)
        return request.request_id

    def cancel(self, request_id: str) -> Completion | None:
        """Stop a waiting or running request now (e.g. its client went away) and free its slot; returns what it had
        generated (finish_reason "cancelled"), or None if no such request is waiting or running."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return Completion(request_id, list(request.prompt_ids), [], "cancelled")
        for slot, state in self.running.items():
            if state.request.request_id == request_id:
                del self.running[slot]
                return self._completion(state, "cancelled", self._text(state.tokens) if self.tokenizer else None)
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(
        self, requests: Iterable[Request], on_finish: Callable[[Completion], None] | None = None
    ) -> list[Completion]:
        """Serve `requests` to the end; completions in the order the requests were given (`on_finish` sees each as
        it finishes, e.g. for progress)."""
        order = [self.add_request(r) for r in requests]
        done: dict[str, Completion] = {}
        while self.has_work():
            for completion in self.step():
                done[completion.request_id] = completion
                if on_finish is not None:
                    on_finish(completion)
        return [done[i] for i in order]

    def _sample(self, logits: torch.Tensor, states: list[_Running]) -> list[int]:
        """The next token of each state from its row of `logits` [len(states), vocab]: forced tokens first, greedy
        rows by one argmax, sampled rows with the same settings together (`sample_rows`: one draw per row from
        the request's own generator)."""
        chosen: list[int | None] = [None] * len(states)
        greedy = [i for i, st in enumerate(states) if not st.forced and st.request.params.greedy]
        if greedy:
            for i, token in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
                chosen[i] = token
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, st in enumerate(states):
            p = st.request.params
            if st.forced:
                chosen[i] = st.forced.pop(0)
            elif not p.greedy:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            tokens = sample_rows(logits[rows].float(), temperature, top_k, top_p, [states[i].generator for i in rows])
            for i, token in zip(rows, tokens, strict=True):
                chosen[i] = token
        return chosen  # type: ignore[return-value]

    def _prompt_opens_think(self, request: Request) -> bool:
        """Whether the prompt ends inside a think block (a template that pre-fills `<think>`)."""
        if self.tokenizer is None or request.params.max_reasoning_tokens is None:
            return False
        from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN

        tail = self.tokenizer.decode(list(request.prompt_ids)[-32:])
        return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)

    def _think_close_ids(self) -> list[int]:
        from open_nemotron.model.chat_template import THINK_CLOSE

        return self.tokenizer.encode("\n" + THINK_CLOSE, add_special_tokens=False)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _track_reasoning(self, state: _Running) -> None:
        """Count think-block tokens; at the budget, queue `</think>` to be written instead of sampled tokens."""
        from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN

        budget = state.request.params.max_reasoning_tokens
        text = self.tokenizer.decode(state.tokens)
        opened, closed = text.rfind(THINK_OPEN), text.rfind(THINK_CLOSE)
        if opened > closed:
            state.thinking = True
        elif closed >= 0 and closed >= opened:
            state.thinking = False
        if state.thinking and not state.forced:
            state.reasoning_tokens += 1
            if state.reasoning_tokens >= budget:
                state.forced = self._think_close_ids()

    def _append(self, state: _Running, token: int) -> Completion | None:
        state.tokens.append(token)
        if state.request.on_token is not None:
            state.request.on_token(token)
        params = state.request.params
        if params.max_reasoning_tokens is not None:
            self._track_reasoning(state)
        reason, text = None, None
        if params.stop:  # decode every step only for requests that have stop strings
            text = self._text(state.tokens)
            cut = min((i for i in (text.find(stop) for stop in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None and token in params.stop_token_ids and not state.forced:
            reason = "stop"
        elif reason is None and (
            len(state.tokens) >= params.max_tokens or self._positions_used(state) >= self.max_length
        ):
            reason = "length"  # (the next step would write this token at position lengths[slot]: none left)
        if reason is None:
            return None
        del self.running[state.slot]
        if text is None and self.tokenizer is not None:
            text = self._text(state.tokens)  # once, at the end
        return self._completion(state, reason, text)

    def _completion(self, state: _Running, reason: str, text: str | None) -> Completion:
        return Completion(
            state.request.request_id,
            list(state.request.prompt_ids),
            state.tokens,
            reason,
            text=text,
            reasoning_tokens=state.reasoning_tokens,
        )

    # ------------------------------------------------------------------ for subclasses
    def step(self) -> list[Completion]:
        """Admit waiting requests, decode one token for every running one; the requests that finished."""
        raise NotImplementedError

    def _positions_used(self, state: _Running) -> int:
        """Context positions `state`'s sequence holds now (its prompt and every token but the last)."""
        raise NotImplementedError

    def _new_state(self, request: Request, slot: int, device: torch.device | str = "cpu") -> _Running:
        """A running request: its own generator (seeded, or freshly random) unless greedy, and whether its prompt
        already opened a think block (a zero budget then closes it at once)."""
        generator = None
        if not request.params.greedy:
            generator = torch.Generator(device=device)
            if request.params.seed is not None:
                generator.manual_seed(request.params.seed)
            else:
                generator.seed()  # a fresh random seed for this request only
        state = _Running(request, slot, [], generator, thinking=self._prompt_opens_think(request))
        if state.thinking and request.params.max_reasoning_tokens == 0:
            state.forced = self._think_close_ids()
        return state


class Engine(BaseEngine):
    """Continuous batching over `max_batch_size` slots of `max_length` positions (prompt + new tokens) each."""

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = 8,
        max_length: int = 512,
        tokenizer=None,
        prefix_reuse: bool = True,
    ) -> None:
        super().__init__(max_batch_size, max_length, model.config.vocab_size, tokenizer)
        if model.training:  # not switched here: no hidden state changes on the caller's model
            raise EngineError("the model is in training mode (dropout would change every token): call model.eval()")
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = SlotKVCache(model.config, max_batch_size, max_length, self.dtype, self.device)
        # Prefix reuse: every slot's keys/values stay valid while it runs and after it is freed; `held[slot]` are the
        # tokens at its valid positions (the request's prompt and every generated token but the last). A new request
        # reads the longest prefix any slot shares with its prompt (a free source becomes its slot; else the prefix
        # is copied into a free slot) and prefills only the rest.
        self.prefix_reuse = prefix_reuse
        self.held: list[list[int]] = [[] for _ in range(max_batch_size)]

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit waiting requests into free slots (prefill, first token), then decode one token for every running
        request. Returns the requests that finished in this step."""
        finished: list[Completion] = []
        free = [s for s in range(self.max_batch_size) if s not in self.running]
        admitted = []
        while self.waiting and free:
            request = self.waiting.popleft()
            prompt = list(request.prompt_ids)
            source, reuse = None, 0
            if self.prefix_reuse:  # any slot's kept positions: free, running, or admitted earlier in this step
                for candidate in range(self.max_batch_size):
                    shared = _shared_prefix(self.held[candidate], prompt)
                    if shared > reuse or (shared == reuse > 0 and candidate in free and source not in free):
                        source, reuse = candidate, shared
                if reuse < MIN_REUSE:
                    source, reuse = None, 0
            # A free source is taken itself (nothing to copy); else the lowest free slot, running rows in front.
            slot = source if source in free else free[0]
            free.remove(slot)
            self.held[slot] = prompt  # from here on, later admissions of this step may reuse it
            admitted.append((request, slot, source, reuse))
        if admitted:
            finished += self._admit(admitted)
        if self.running:
            finished += self._decode()
        return finished

    def _admit(self, admitted: list[tuple[Request, int, int | None, int]]) -> list[Completion]:
        """Prefill the new requests, move their keys/values into their slots, and sample each one's first token.
        Requests with nothing to reuse share one left-padded pass. One that reuses the first `reuse` positions of a
        source slot (copied over first when the source is another slot) then runs its own pass over the rest of its
        prompt, attending to them; these go in admission order, after the shared pass, so a source admitted earlier
        in this step is already written."""
        from open_nemotron.model.cache import DeciLMCache

        fresh = [(request, slot) for request, slot, _, reuse in admitted if reuse == 0]
        last_logits: dict[int, torch.Tensor] = {}
        if fresh:
            lengths = [len(request.prompt_ids) for request, _ in fresh]
            width = max(lengths)
            ids = torch.zeros(len(fresh), width, dtype=torch.long, device=self.device)
            mask = torch.zeros(len(fresh), width, dtype=torch.long, device=self.device)
            for row, ((request, _), length) in enumerate(zip(fresh, lengths, strict=True)):
                ids[row, width - length :] = torch.tensor(list(request.prompt_ids), device=self.device)
                mask[row, width - length :] = 1
            prefill_cache = DeciLMCache(self.model.config)
            logits = self.model(ids, attention_mask=mask, cache=prefill_cache, use_cache=True, logits_to_keep=1).logits
            for row, ((_, slot), length) in enumerate(zip(fresh, lengths, strict=True)):
                self.cache.write_prefill(slot, prefill_cache, row, width - length, length)
                last_logits[slot] = logits[row, -1]
        for request, slot, source, reuse in admitted:
            if reuse == 0:
                continue
            if source != slot:
                self.cache.copy_positions(source, slot, reuse)
            rest = list(request.prompt_ids)[reuse:]
            prefill_cache = DeciLMCache(self.model.config)
            self.cache.load_prefix(slot, reuse, prefill_cache)
            ids = torch.tensor([rest], dtype=torch.long, device=self.device)
            positions = torch.arange(reuse, reuse + len(rest), device=self.device)[None]
            logits = self.model(
                ids, position_ids=positions, cache=prefill_cache, use_cache=True, logits_to_keep=1
            ).logits
            self.cache.write_prefill(slot, prefill_cache, 0, reuse, len(rest), offset=reuse)
            last_logits[slot] = logits[0, -1]
        finished, states = [], []
        for request, slot, _, reuse in admitted:
            self.prompt_tokens += len(request.prompt_ids)
            self.reused_tokens += reuse
            state = self._new_state(request, slot, self.device)
            self.running[slot] = state
            states.append(state)
        rows = torch.stack([last_logits[state.slot] for state in states])
        for state, token in zip(states, self._sample(rows, states), strict=True):
            completion = self._append(state, token)
            if completion is not None:
                finished.append(completion)
        return finished

    def _decode(self) -> list[Completion]:
        rows = max(self.running) + 1  # compute the leading rows up to the last running slot only
        last = [self.running[s].tokens[-1] if s in self.running else 0 for s in range(rows)]
        tokens = torch.tensor(last, dtype=torch.long, device=self.device)[:, None]
        lengths = self.cache.lengths[:rows]
        positions = lengths[:, None].clone()
        active = torch.zeros(rows, dtype=torch.bool, device=self.device)
        active[list(self.running)] = True
        # Attend over the positions up to the longest running row's new one only.
        self.cache.window = int(lengths[active].max()) + 1
        # Valid keys per row: its cached positions and the one written now. Rows of free slots see nothing real.
        keys = torch.arange(self.cache.window, device=self.device)[None, :]
        mask = ((keys <= lengths[:, None]) & active[:, None]).long()
        logits = self.model(tokens, attention_mask=mask, position_ids=positions, cache=self.cache).logits[:, -1]
        self.cache.lengths[:rows] += active.long()
        for slot, state in self.running.items():
            self.held[slot].append(state.tokens[-1])  # its key/value now sits at the slot's last position
        finished = []
        slots = list(self.running)
        states = [self.running[slot] for slot in slots]
        for state, token in zip(states, self._sample(logits[slots], states), strict=True):
            completion = self._append(state, token)
            if completion is not None:
                finished.append(completion)
        return finished

    def _positions_used(self, state: _Running) -> int:
        return int(self.cache.lengths[state.slot])
