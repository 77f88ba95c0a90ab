"""Teachers: whatever writes the reasoning-on and reasoning-off answers of the SFT data.

A teacher answers a batch of `TaskItem`s in one mode and returns, per item, a `TeacherReply` (the assistant text in
the dataset's layout) or ``None`` when it could not produce a usable answer; every ``None`` is counted by reason in
the teacher's ``failures`` counter. Output layout, as in NVIDIA's Llama-Nemotron post-training data:

* reasoning on: ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``;
* reasoning off: ``{answer}``, with no think tags at all.

Three teachers (issue 5, item 3):

* `BuiltinSolverTeacher`: the step-by-step solvers of `open_nemotron.data.solvers` (the offline default);
* `OpenAITeacher`: any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, a hosted API) through the real
  ``openai`` client, with a thread pool, retries with backoff, timeouts, and malformed replies counted, never raised;
* `HFModelTeacher`: a local transformers model, rejection-sampled: the first sample whose final answer is right (and
  whose think tags are well formed) is kept.

`make_teacher` builds one from a command-line spec: ``builtin``, ``openai:BASE_URL::MODEL`` or ``hf:PATH``.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN, THINKING_OFF, THINKING_ON, split_reasoning
from open_nemotron.rewards.format import toggle_violation

if TYPE_CHECKING:
    from open_nemotron.data.tasks import TaskItem

BUILTIN_GENERATOR = "builtin-solver"
OPENAI_SPEC_PREFIX = "openai:"
HF_SPEC_PREFIX = "hf:"


class TeacherSpecError(OpenNemotronError, ValueError):
    """A teacher spec or teacher setting that cannot be used (malformed ``openai:`` spec, bad concurrency, ...)."""


@dataclass(frozen=True)
class TeacherReply:
    """One assistant output in the dataset layout, and who wrote it (the row's ``generator``)."""

    text: str
    generator: str


@runtime_checkable
class Teacher(Protocol):
    """Answers items in one mode. ``failures`` counts the ``None`` replies by reason (cumulative over calls)."""

    name: str
    failures: Counter[str]

    def answer(self, items: list[TaskItem], reasoning: bool) -> list[TeacherReply | None]: ...


def format_output(reasoning: str | None, answer: str) -> str:
    """The dataset's assistant text: ``<think>\\nR\\n</think>\\n\\nA`` for reasoning on (`reasoning` given), else ``A``."""
    if reasoning is None:
        return answer.strip()
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def _has_tag(text: str) -> bool:
    return THINK_OPEN in text or THINK_CLOSE in text


# The teachers' failure reasons for each way a reply can break the toggle-compliance rule.
_VIOLATION_REASONS = {
    "missing_think": "missing_reasoning",
    "bad_think": "malformed_think",
    "empty_answer": "empty_answer",
    "think_in_off": "reasoning_in_off_mode",
}


def normalise_reply(
    content: str | None, separate_reasoning: str | None, reasoning: bool, *, strict: bool = False
) -> tuple[str | None, str | None]:
    """Turn a model's reply into the dataset layout: ``(text, None)``, or ``(None, reason)`` when it is unusable.

    Reasoning on accepts inline ``<think>R</think>A`` in `content`, ``R</think>A`` (the server pre-filled the
    opening tag), or reasoning in a separate field (vLLM/SGLang ``reasoning_content`` / ``reasoning``) beside a
    tag-free answer; inline tags win when both are present. An empty or missing reasoning is ``missing_reasoning``:
    a reasoning-on training row must show reasoning (stricter than the compliance rule, which allows an empty
    block). Reasoning off ignores any separate reasoning field; an empty think block in the content is dropped, a
    non-empty one is ``reasoning_in_off_mode``. The text returned always obeys the toggle-compliance rule
    (`open_nemotron.rewards.format.toggle_violation`).

    `strict` (local sampling): the reply itself must already obey that rule (on: opens with ``<think>`` and holds
    exactly one block; off: no tag at all); nothing is repaired.
    """
    content = content or ""
    if strict:
        violation = toggle_violation(content, reasoning)
        # An empty answer is reported below, after the reasoning check, as for every reply.
        if violation is not None and violation != "empty_answer":
            return None, _VIOLATION_REASONS[violation]
    thought: str | None
    if reasoning:
        if _has_tag(content):
            if content.count(THINK_OPEN) > 1 or content.count(THINK_CLOSE) != 1:
                return None, "malformed_think"
            thought, answer = split_reasoning(content)
            if thought is None:  # an opening tag that is not at the start
                return None, "malformed_think"
            if not thought and separate_reasoning and not strict:
                thought = separate_reasoning
        else:
            thought, answer = separate_reasoning, content
        if thought is None or not thought.strip():
            return None, "missing_reasoning"
    else:
        thought = None
        answer = content
        if _has_tag(content):
            inline, rest = split_reasoning(content)
            if inline is None or inline or content.count(THINK_OPEN) > 1 or content.count(THINK_CLOSE) != 1:
                return None, "reasoning_in_off_mode"
            answer = rest  # an empty think block (Qwen3-style), dropped
    text = format_output(thought, answer)
    # Tags inside a separate reasoning field, or an empty answer, break the rule in the normalised text.
    violation = toggle_violation(text, reasoning)
    if violation is not None:
        return None, _VIOLATION_REASONS[violation]
    return text, None


class _FailureCounter:
    """A thread-safe `Counter` of failure reasons plus request statistics, shared by the teachers."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n


# --------------------------------------------------------------------------------------------------- (a) built-in


class BuiltinSolverTeacher(_FailureCounter):
    """Teacher (a): `open_nemotron.data.solvers.solve`. Off mode is the solver's answer sentence only."""

    def __init__(self) -> None:
        super().__init__()
        self.name = BUILTIN_GENERATOR

    def answer(self, items: list[TaskItem], reasoning: bool) -> list[TeacherReply | None]:
        from open_nemotron.data.solvers import solve

        replies: list[TeacherReply | None] = []
        for item in items:
            solution = solve(item)
            if solution is None:
                self._fail("no_solver")
                replies.append(None)
                continue
            text, reason = normalise_reply(
                solution.answer_text, solution.reasoning if reasoning else None, reasoning, strict=False
            )
            if text is None:
                self._fail(f"bad_solution:{reason}")
                replies.append(None)
                continue
            replies.append(TeacherReply(text=text, generator=self.name))
        return replies


# ----------------------------------------------------------------------------------------------- (b) OpenAI API


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """``openai:BASE_URL::MODEL`` -> ``(BASE_URL, MODEL)``; anything else is a one-line `TeacherSpecError`.

    The split is at the last ``::``, so IPv6 hosts (``http://[::1]:8000/v1``) work.
    """
    expected = "expected openai:BASE_URL::MODEL, e.g. openai:http://127.0.0.1:8000/v1::Qwen/Qwen3-8B"
    if not spec.startswith(OPENAI_SPEC_PREFIX):
        raise TeacherSpecError(f"teacher spec {spec!r} does not start with 'openai:'; {expected}")
    base_url, sep, model = spec[len(OPENAI_SPEC_PREFIX) :].rpartition("::")
    if not sep:
        raise TeacherSpecError(f"teacher spec {spec!r} has no '::' before the model name; {expected}")
    base_url, model = base_url.strip(), model.strip()
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise TeacherSpecError(f"teacher spec {spec!r}: base URL {base_url!r} is not an http(s) URL; {expected}")
    if not model:
        raise TeacherSpecError(f"teacher spec {spec!r} has an empty model name; {expected}")
    return base_url, model


class MalformedResponse(Exception):
    """A 2xx reply from the endpoint that is not a usable chat completion (internal; becomes a counted failure)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_chat_completion(body: str) -> tuple[str | None, str | None, str | None]:
    """``(content, separate_reasoning, finish_reason)`` of a chat-completion JSON body; `MalformedResponse` if none."""
    try:
        data = json.loads(body)
    except ValueError:
        raise MalformedResponse("malformed_json") from None
    if not isinstance(data, dict):
        raise MalformedResponse("malformed_body")
    if data.get("error") is not None and not data.get("choices"):
        raise MalformedResponse("error_body")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("no_choices")
    choice = choices[0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise MalformedResponse("malformed_choice")
    message = choice["message"]
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedResponse("bad_content_type")
    separate = None
    for key in ("reasoning_content", "reasoning"):  # SGLang / older vLLM, then vLLM >= 0.11
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MalformedResponse("bad_reasoning_type")
        if value.strip():
            separate = value
            break
    finish_reason = choice.get("finish_reason")
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise MalformedResponse("malformed_choice")
    if not (content or "").strip() and separate is None:
        raise MalformedResponse("empty_content")
    return content, separate, finish_reason


class OpenAITeacher(_FailureCounter):
    """Teacher (b): an OpenAI-compatible ``/chat/completions`` endpoint, through the ``openai`` client.

    Each item is one request: system ``detailed thinking on|off`` plus the user question. Requests run on a pool of
    `concurrency` threads sharing one sync client (httpx clients are thread-safe). The client's own retries are off;
    this class retries timeouts, connection errors, 408/409/429 and 5xx up to `max_retries` times with exponential
    backoff (`backoff_s` doubling, capped at `max_backoff_s`, jittered; a numeric ``Retry-After`` is honoured). Other
    4xx, malformed bodies, truncated replies (``finish_reason == "length"``) and unusable think tags are failures
    counted by reason, never exceptions.

    Sampling defaults follow the paper: reasoning on temperature 0.6 / top-p 0.95, off greedy (temperature 0);
    `temperature` / `top_p` override both modes. `enable_thinking_kwarg` also sends
    ``chat_template_kwargs={"enable_thinking": ...}`` for Qwen3-style servers whose template ignores the system prompt.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "EMPTY",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        enable_thinking_kwarg: bool = False,
    ) -> None:
        super().__init__()
        if concurrency < 1:
            raise TeacherSpecError(f"concurrency = {concurrency}: expected a positive integer")
        if not timeout_s > 0:
            raise TeacherSpecError(f"timeout_s = {timeout_s}: expected a positive number of seconds")
        if max_retries < 0:
            raise TeacherSpecError(f"max_retries = {max_retries}: expected 0 or more")
        if max_tokens is not None and max_tokens < 1:
            raise TeacherSpecError(f"max_tokens = {max_tokens}: expected a positive integer")
        try:
            import openai
        except ImportError:
            raise TeacherSpecError(
                "the OpenAI teacher needs the openai package: pip install 'open-nemotron[reasoning]'"
            ) from None
        self._openai = openai
        self.base_url = base_url
        self.model = model
        self.name = f"openai:{model}"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.enable_thinking_kwarg = enable_thinking_kwarg
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> OpenAITeacher:
        base_url, model = parse_openai_spec(spec)
        return cls(base_url, model, **options)

    def close(self) -> None:
        self._client.close()

    def request_kwargs(self, question: str, reasoning: bool) -> dict[str, Any]:
        """The ``chat.completions.create`` arguments for one question."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": THINKING_ON if reasoning else THINKING_OFF},
                {"role": "user", "content": question},
            ],
        }
        temperature, top_p = self.temperature, self.top_p
        if temperature is None:
            temperature = 0.6 if reasoning else 0.0
        if top_p is None and reasoning:
            top_p = 0.95
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.enable_thinking_kwarg:
            kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": reasoning}}
        return kwargs

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
        if retry_after:
            with contextlib.suppress(ValueError):  # an HTTP-date Retry-After: keep the backoff
                delay = max(delay, min(self.max_backoff_s, float(retry_after)))
        return delay

    def answer_one(self, question: str, reasoning: bool) -> tuple[TeacherReply | None, str | None]:
        """One question with retries: ``(reply, None)`` or ``(None, failure reason)``; never raises for the endpoint."""
        openai = self._openai
        kwargs = self.request_kwargs(question, reasoning)
        reason = "unknown"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            retry_after = None
            try:
                raw = self._client.chat.completions.with_raw_response.create(**kwargs)
                body = raw.http_response.text
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIConnectionError:
                reason = "connection_error"
            except openai.APIStatusError as err:
                reason = f"http_{err.status_code}"
                retry_after = err.response.headers.get("retry-after")
                if not (err.status_code in (408, 409, 429) or err.status_code >= 500):
                    return None, reason
            except openai.OpenAIError as err:
                return None, f"client_error:{type(err).__name__}"
            else:
                try:
                    content, separate, finish_reason = parse_chat_completion(body)
                except MalformedResponse as err:
                    return None, err.reason
                if finish_reason == "length":
                    return None, "truncated"
                text, problem = normalise_reply(content, separate, reasoning)
                if text is None:
                    return None, problem
                return TeacherReply(text=text, generator=self.name), None
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        return None, reason

    def _answer_counted(self, question: str, reasoning: bool) -> TeacherReply | None:
        try:
            reply, reason = self.answer_one(question, reasoning)
        except Exception as err:  # a bug or an exotic transport error must not lose the whole batch
            reply, reason = None, f"error:{type(err).__name__}"
        if reply is None:
            self._fail(reason or "unknown")
        return reply

    def answer(self, items: list[TaskItem], reasoning: bool) -> list[TeacherReply | None]:
        if not items:
            return []
        workers = min(self.concurrency, len(items))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-teacher") as pool:
            return list(pool.map(lambda item: self._answer_counted(item.question, reasoning), items))


# ------------------------------------------------------------------------------------------ (c) local HF model


class HFModelTeacher(_FailureCounter):
    """Teacher (c): a local model sampled through `open_nemotron.model.chat.generate_chat`, with rejection sampling.

    Up to `samples` rounds; each round samples one reply for every item still open (a different seed per round) and
    keeps, per item, the first reply that is well formed under `normalise_reply(strict=True)` (on: exactly one think
    block, opening the reply, with non-empty reasoning; off: no tags) and whose final answer scores 1.0 with
    `open_nemotron.data.tasks.score_answer`. Both modes sample (temperature 0.6, top-p 0.95 unless given): greedy
    rounds would repeat the same reply. Items with no accepted sample fail as ``no_correct_sample``; per-sample
    rejections are counted in ``stats`` (``rejected:<reason>``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        samples: int = 4,
        *,
        max_new_tokens: int = 512,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int = 0,
        batch_size: int = 16,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if samples < 1:
            raise TeacherSpecError(f"samples = {samples}: expected a positive integer")
        from open_nemotron.model.chat import ensure_reasoning_template

        ensure_reasoning_template(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.samples = samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.batch_size = batch_size
        if name is None:
            path = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
            name = f"hf:{path}"
        self.name = name

    def accept(self, item: TaskItem, sample: str, reasoning: bool) -> tuple[str | None, str | None]:
        """``(normalised text, None)`` if `sample` is kept for `item`, else ``(None, reason)``."""
        from open_nemotron.data.tasks import score_answer

        text, reason = normalise_reply(sample, None, reasoning, strict=True)
        if text is None:
            return None, reason
        if score_answer(item, text) != 1.0:
            return None, "wrong_answer"
        return text, None

    def answer(self, items: list[TaskItem], reasoning: bool) -> list[TeacherReply | None]:
        from open_nemotron.model import chat

        replies: list[TeacherReply | None] = [None] * len(items)
        open_rows = list(range(len(items)))
        for round_index in range(self.samples):
            if not open_rows:
                break
            conversations = [[{"role": "user", "content": items[i].question}] for i in open_rows]
            samples = chat.generate_chat(
                self.model,
                self.tokenizer,
                conversations,
                thinking=reasoning,
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed + round_index,
                batch_size=self.batch_size,
            )
            self._count("samples", len(samples))
            still_open = []
            for row, sample in zip(open_rows, samples, strict=True):
                text, reason = self.accept(items[row], sample, reasoning)
                if text is None:
                    self._count(f"rejected:{reason}")
                    still_open.append(row)
                else:
                    replies[row] = TeacherReply(text=text, generator=self.name)
            open_rows = still_open
        for _ in open_rows:
            self._fail("no_correct_sample")
        return replies


# ------------------------------------------------------------------------------------------------------ specs


def make_teacher(spec: str, **options: Any) -> Teacher:
    """``builtin`` -> `BuiltinSolverTeacher`; ``openai:BASE_URL::MODEL`` -> `OpenAITeacher` (options are its keyword
    arguments); ``hf:PATH`` -> `HFModelTeacher` on a model loaded with `open_nemotron.model.loading`."""
    spec = spec.strip()
    if spec == "builtin":
        if options:
            raise TeacherSpecError(f"the builtin teacher takes no options (got {', '.join(sorted(options))})")
        return BuiltinSolverTeacher()
    if spec.startswith(OPENAI_SPEC_PREFIX):
        return OpenAITeacher.from_spec(spec, **options)
    if spec.startswith(HF_SPEC_PREFIX):
        path = spec[len(HF_SPEC_PREFIX) :].strip()
        if not path:
            raise TeacherSpecError(f"teacher spec {spec!r} has no model path; expected hf:PATH_OR_ALIAS")
        from open_nemotron.model.loading import load_model, load_tokenizer

        # A Llama checkpoint goes into our class (same weights and logits) so that it samples on the engine.
        model = load_model(path, implementation="ours")
        return HFModelTeacher(model, load_tokenizer(path), name=f"hf:{path}", **options)
    raise TeacherSpecError(f"teacher spec {spec!r} is not one of builtin, openai:BASE_URL::MODEL, hf:PATH")
