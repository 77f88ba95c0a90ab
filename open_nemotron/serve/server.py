"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): `open-nemotron serve MODEL`.

Endpoints: `POST /v1/chat/completions` (non-streaming and SSE streaming ending in `data: [DONE]`, `n`, `usage`),
`POST /v1/completions`, `GET /v1/models`, `GET /health`.

The reasoning switch per request, as vLLM takes it: a first system message that is exactly `detailed thinking on` /
`detailed thinking off`, or `chat_template_kwargs: {"enable_thinking": bool}` (our chat template is the one rule).
The reply's `<think>…</think>` block goes to `reasoning_content` (and `reasoning`, vLLM's newer name), the rest to
`content`, on messages and on stream deltas. Extra body fields: `top_k`, `max_reasoning_tokens` (the engine's
think-block budget), `ignore_eos` (vLLM's: generate through end-of-turn tokens up to `max_tokens`, for load
benchmarks). Sampling defaults when a request sets none: the paper's (reasoning on: temperature 0.6,
top-p 0.95; off: greedy).

One loop owns the engine (`EngineWorker`; on the main thread under `serve`, else a thread of its own): requests
reach it through a bounded queue (full: 429), tokens come back to the request's asyncio queue in one batch per
engine step (`EventRelay`). A client that goes away mid-stream cancels its request, which frees its slot. Bad requests
get an OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) and a 4xx; the server keeps
serving.

Shutdown (SIGTERM or SIGINT, through `DrainingServer`): new requests get 503 at once; requests in flight may finish
for `shutdown_grace_s` seconds, and whatever is still generating then is cancelled: its reply ends there with
finish_reason "abort" (vLLM's name), streams with their final chunk and `data: [DONE]`, so no client is left with a
broken connection; then the worker stops and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN, THINKING_ON, split_reasoning
from open_nemotron.serve.engine import BaseEngine, Completion, Engine, EngineError, Request, SamplingParams

MAX_N = 8


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------- request bodies
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    max_reasoning_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False  # vLLM's extra: run to max_tokens through end-of-turn tokens (for benchmarks)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str


# ----------------------------------------------------------------------------------------------- the worker
@dataclass
class _Job:
    request: Request
    on_done: Callable[[Completion], None]


class EngineWorker:
    """The one thread that runs the engine. `submit` / `cancel` may be called from any thread."""

    def __init__(self, engine: BaseEngine, queue_size: int = 64) -> None:
        self.engine = engine
        self.queue_size = queue_size
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._open = 0  # submitted and not yet finished
        self._done: dict[str, Callable[[Completion], None]] = {}
        self._stop = threading.Event()
        self.draining = False  # shutting down: no new requests
        self._deadline: float | None = None  # when draining: cancel what is still in flight at this time
        self._thread = threading.Thread(target=self._loop, name="open-nemotron-engine", daemon=True)
        self.after_step: Callable[[], None] = lambda: None  # once per loop turn (the server flushes its events)
        self.cancels_requested = 0  # cancel() calls (a client went away)
        self.cancelled = 0  # requests a cancel actually stopped (the others had already finished)

    def start(self) -> EngineWorker:
        """Run the engine on a thread of its own."""
        self._thread.start()
        return self

    def run_here(self) -> None:
        """Run the engine on the calling thread until `stop` (what `serve` does on the main thread: torch then keeps
        the OpenMP threads of the thread that loaded the model, measured faster than a second thread's)."""
        self._loop()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def drain(self, grace_s: float) -> None:
        """Refuse new requests from now on; cancel those still in flight after `grace_s` seconds."""
        with self._lock:
            self.draining = True
        self._inbox.put(("drain", time.monotonic() + grace_s))

    def submit(self, request: Request, on_done: Callable[[Completion], None]) -> None:
        with self._lock:
            if self.draining:
                raise ApiError(503, "the server is shutting down")
            if self._open >= self.queue_size:
                raise ApiError(429, f"the server is busy: {self._open} requests open (queue size {self.queue_size})")
            self._open += 1
        self._inbox.put(("add", _Job(request, on_done)))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.cancels_requested += 1
        self._inbox.put(("cancel", request_id))

    @property
    def open_requests(self) -> int:
        return self._open

    def _finish(self, completion: Completion) -> None:
        with self._lock:
            self._open -= 1
        callback = self._done.pop(completion.request_id, None)
        if callback is not None:
            callback(completion)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_work():
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = ()
            else:
                try:  # idle: sleep until something arrives (waking now and then, so signals are handled)
                    item = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
            while item is not None:
                if item:
                    kind, payload = item
                    if kind == "add":
                        self._done[payload.request.request_id] = payload.on_done
                        try:
                            self.engine.add_request(payload.request)
                        except EngineError as err:  # the endpoint checks first; never let one request stop the loop
                            self._fail(payload.request, str(err))
                    elif kind == "drain":
                        self._deadline = payload
                    else:
                        completion = self.engine.cancel(payload)
                        if completion is not None:
                            self.cancelled += 1
                            self._finish(completion)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if item is None:
                break
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._cancel_all()
            if self.engine.has_work():
                try:
                    finished = self.engine.step()
                except Exception as err:  # a bug must fail the running requests, not the server
                    finished = []
                    for state in list(self.engine.running.values()):
                        self.engine.cancel(state.request.request_id)
                        self._fail(state.request, f"the engine failed: {type(err).__name__}: {err}")
                for completion in finished:
                    self._finish(completion)
            self.after_step()

    def _cancel_all(self) -> None:
        waiting = [r.request_id for r in self.engine.waiting]
        running = [state.request.request_id for state in self.engine.running.values()]
        for request_id in waiting + running:
            completion = self.engine.cancel(request_id)
            if completion is not None:
                self.cancelled += 1
                self._finish(completion)

    def _fail(self, request: Request, message: str) -> None:
        self._finish(Completion(request.request_id, list(request.prompt_ids), [], "error", text=message))


# ----------------------------------------------------------------------------------------------- streaming split
class IncrementalText:
    """The text of a growing token list, decoding a short tail per token instead of the whole list (vLLM's and
    TGI's detokenizer scheme): text is only extended once the tail decodes to something that is not a partial
    character (U+FFFD), so a multi-byte character split across tokens arrives whole."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self.prefix = 0  # tail decoding starts here (context for the tokenizer's spacing rules)
        self.read = 0  # tokens before this are in `text`

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        return self.text


class ReasoningSplitter:
    """Splits a growing reply text into (reasoning, answer) deltas: a reply that opens with `<think>` has its block
    routed to reasoning. Holds back text that could still turn out to be a tag."""

    def __init__(self) -> None:
        self.reasoning_sent = 0
        self.answer_sent = 0

    def split(self, text: str, final: bool) -> tuple[str, str]:
        stripped = text.lstrip()
        if not final and THINK_OPEN.startswith(stripped):
            return "", ""  # maybe the start of <think>
        if stripped.startswith(THINK_OPEN):
            body = stripped[len(THINK_OPEN) :]
            end = body.find(THINK_CLOSE)
            if end < 0:
                keep = len(body) if final else max(0, len(body) - len(THINK_CLOSE) + 1)
                reasoning, answer = body[:keep], ""
            else:
                reasoning, answer = body[:end], body[end + len(THINK_CLOSE) :]
        else:
            reasoning, answer = "", text
        reasoning_delta = reasoning[self.reasoning_sent :]
        answer_delta = answer[self.answer_sent :]
        self.reasoning_sent = max(self.reasoning_sent, len(reasoning))
        self.answer_sent = max(self.answer_sent, len(answer))
        return reasoning_delta, answer_delta


# ----------------------------------------------------------------------------------------------- the app
class EventRelay:
    """Hands the engine thread's events (tokens, completions) to the event loop in one batch per engine step: one
    wake-up of the loop per step instead of one per token and stream, which kept taking the GIL from the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[Any, asyncio.AbstractEventLoop, Any]] = []

    def put(self, loop: asyncio.AbstractEventLoop, target: asyncio.Queue, event: Any) -> None:
        with self._lock:
            self._events.append((target, loop, event))

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for target, loop, event in events:
            by_loop.setdefault(loop, []).append((target, event))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed (shutting down): nobody is listening
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list) -> None:
    for target, event in batch:
        target.put_nowait(event)


def create_app(engine: BaseEngine, tokenizer, model_name: str, queue_size: int = 64, worker_thread: bool = True):
    """The FastAPI app serving `engine` (which must have `tokenizer`) as model `model_name`. `worker_thread`: the
    app starts the engine's thread itself; False leaves running `app.state.worker.run_here()` to the caller."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from open_nemotron.model.chat import resolve_sampling, stop_token_ids

    worker = EngineWorker(engine, queue_size)
    relay = EventRelay()
    worker.after_step = relay.flush
    stop_ids = tuple(stop_token_ids(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if worker_thread:
            worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="open-nemotron", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError):
        return JSONResponse(status_code=err.status, content=err.body())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(status_code=400, content=ApiError(400, message, where or None).body())

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "open_requests": worker.open_requests}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "open-nemotron"}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                404, f"model {name!r} does not exist: this server serves {model_name!r}", "model", "model_not_found"
            )

    def sampling_for(body: _Sampling, prompt_len: int, thinking: bool, index: int) -> SamplingParams:
        limit = engine.max_length - prompt_len
        if limit < 1:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens: this server's context is {engine.max_length}",
                "messages",
                "context_length_exceeded",
            )
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if given is None else given
        if not 1 <= max_tokens <= limit:
            raise ApiError(
                400,
                f"max_tokens = {max_tokens}: expected 1 to {limit} (context {engine.max_length}, prompt {prompt_len})",
                "max_tokens",
            )
        settings = resolve_sampling(thinking, None, body.temperature, body.top_p)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=settings.temperature if settings.do_sample else 0.0,
                top_p=settings.top_p if settings.do_sample and settings.top_p is not None else 1.0,
                top_k=body.top_k or 0,
                stop_token_ids=() if body.ignore_eos else stop_ids,
                stop=stop,
                seed=None if body.seed is None else body.seed + index,
                max_reasoning_tokens=body.max_reasoning_tokens,
            )
        except EngineError as err:
            raise ApiError(400, str(err)) from None

    async def run_requests(prompt_ids: list[int], params: list[SamplingParams], stream: bool):
        """Submit one engine request per choice; returns (request ids, per-choice asyncio queues of events)."""
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in params]
        ids = []
        for q, p in zip(queues, params, strict=True):
            rid = f"req-{uuid.uuid4().hex[:12]}"

            def on_token(token: int, q=q) -> None:
                relay.put(loop, q, ("token", token))

            def on_done(completion: Completion, q=q) -> None:
                relay.put(loop, q, ("done", completion))

            request = Request(prompt_ids, p, request_id=rid, on_token=on_token if stream else None)
            try:
                worker.submit(request, on_done)
            except ApiError:
                for earlier in ids:
                    worker.cancel(earlier)
                raise
            ids.append(rid)
        return ids, queues

    def finish_reason(completion: Completion) -> str:
        # "cancelled" reaches a client only when the server cancelled it (shutting down): vLLM calls that "abort".
        return {"cancelled": "abort"}.get(completion.finish_reason, completion.finish_reason)

    async def respond(body: _Sampling, prompt_ids: list[int], thinking: bool, chat: bool):
        params = [sampling_for(body, len(prompt_ids), thinking, i) for i in range(body.n)]
        ids, queues = await run_requests(prompt_ids, params, body.stream)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            try:
                completions = [await _until_done(q) for q in queues]
            except asyncio.CancelledError:
                for rid in ids:
                    worker.cancel(rid)
                raise
            failed = [c for c in completions if c.finish_reason == "error"]
            if failed:
                raise ApiError(500, failed[0].text)
            choices = []
            for i, c in enumerate(completions):
                if chat:
                    reasoning, answer = split_reasoning(c.text)
                    message: dict[str, Any] = {"role": "assistant", "content": answer}
                    if reasoning is not None:
                        message["reasoning_content"] = message["reasoning"] = reasoning
                    choices.append({"index": i, "message": message, "finish_reason": finish_reason(c)})
                else:
                    choices.append({"index": i, "text": c.text, "finish_reason": finish_reason(c)})
            completion_tokens = sum(len(c.token_ids) for c in completions)
            return {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{ids[0]}",
                "object": kind,
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) * body.n + completion_tokens,
                },
            }
        return StreamingResponse(
            _stream(ids, queues, chat, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _until_done(q: asyncio.Queue) -> Completion:
        while True:
            kind, value = await q.get()
            if kind == "done":
                return value

    async def _stream(ids, queues, chat: bool, created: int) -> AsyncIterator[str]:
        # A client that goes away cancels this generator (Starlette): the `finally` below frees its slots.
        kind = "chat.completion.chunk" if chat else "text_completion"
        stream_id = f"{'chatcmpl' if chat else 'cmpl'}-{ids[0]}"

        def chunk(index: int, delta: dict | str, reason: str | None) -> str:
            choice = {"index": index, "finish_reason": reason}
            choice.update({"delta": delta} if chat else {"text": delta})
            payload = {"id": stream_id, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        open_ids = set(ids)
        try:
            for index, (rid, q) in enumerate(zip(ids, queues, strict=True)):
                if chat:
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
                text_so_far = IncrementalText(tokenizer)
                splitter = ReasoningSplitter()
                while True:
                    event, value = await q.get()
                    final = event == "done"
                    if final and value.finish_reason == "error":
                        open_ids.discard(rid)
                        yield f"data: {json.dumps(ApiError(500, value.text).body())}\n\n"
                        break
                    text = value.text if final else text_so_far.add(value)
                    if chat:
                        reasoning, answer = splitter.split(text, final)
                        delta: dict[str, str] = {}
                        if reasoning:
                            delta["reasoning_content"] = delta["reasoning"] = reasoning
                        if answer:
                            delta["content"] = answer
                        if delta:
                            yield chunk(index, delta, None)
                    else:
                        new = text[splitter.answer_sent :]
                        splitter.answer_sent = len(text)
                        if new:
                            yield chunk(index, new, None)
                    if final:
                        open_ids.discard(rid)
                        yield chunk(index, {} if chat else "", finish_reason(value))
                        break
            yield "data: [DONE]\n\n"
        finally:
            for rid in open_ids:  # the client went away (or the stream failed): free the slots
                worker.cancel(rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        kwargs = dict(body.chat_template_kwargs or {})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
        return await respond(body, prompt_ids, THINKING_ON in rendered, True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompt_ids = tokenizer.encode(body.prompt, add_special_tokens=False)
        if not prompt_ids:
            raise ApiError(400, "prompt is empty: expected some text", "prompt")
        return await respond(body, prompt_ids, False, False)

    return app


def draining_server(app, host: str = "127.0.0.1", port: int = 8000, shutdown_grace_s: float = 30.0, **options):
    """A uvicorn server for `app` (from `create_app`) that drains the engine when told to exit (see the module
    docstring); `options` go to `uvicorn.Config`."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.worker.drain(shutdown_grace_s)
            await super().shutdown(sockets)

    # uvicorn's own backstop, for a response that does not end even when its request is cancelled.
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_grace_s + 10, **options)
    return DrainingServer(config)


def serve(
    model_spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_length: int = 2048,
    queue_size: int = 64,
    model_name: str | None = None,
    device: str | None = None,
    shutdown_grace_s: float = 30.0,
) -> None:
    """Load a model and serve it until SIGTERM / SIGINT (then drain: see the module docstring)."""
    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.model.loading import load_model, load_tokenizer
    from open_nemotron.model.modeling import DeciLMForCausalLM

    model = load_model(model_spec, device=device, implementation="ours")
    if not isinstance(model, DeciLMForCausalLM):
        raise EngineError(f"{model_spec}: the engine serves Llama and nemotron-nas checkpoints")
    tokenizer = load_tokenizer(model_spec)
    ensure_reasoning_template(tokenizer)
    engine = Engine(model, max_batch_size=max_batch_size, max_length=max_length, tokenizer=tokenizer)
    serve_engine(engine, tokenizer, model_name or str(model_spec), host, port, queue_size, shutdown_grace_s)


def serve_gguf(
    path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_length: int = 2048,
    queue_size: int = 64,
    model_name: str | None = None,
    shutdown_grace_s: float = 30.0,
    threads: int | None = None,
) -> None:
    """Serve a GGUF file through llama.cpp (serve/llama_cpp_engine.py) with the same API, toggle and reasoning
    split; one request decodes at a time."""
    from open_nemotron.model.chat import ensure_reasoning_template
    from open_nemotron.serve.llama_cpp_engine import load_gguf

    engine, tokenizer = load_gguf(path, max_length, threads)
    ensure_reasoning_template(tokenizer)  # a GGUF written elsewhere may carry its parent's plain template
    serve_engine(engine, tokenizer, model_name or str(path), host, port, queue_size, shutdown_grace_s)


def serve_engine(
    engine: BaseEngine,
    tokenizer,
    model_name: str,
    host: str,
    port: int,
    queue_size: int,
    shutdown_grace_s: float,
) -> None:
    """Run the HTTP server over `engine` until SIGTERM / SIGINT, the engine on this (main) thread."""
    app = create_app(engine, tokenizer, model_name, queue_size, worker_thread=False)
    server = draining_server(app, host, port, shutdown_grace_s, log_level="info")
    # The engine runs on this (main) thread, uvicorn's event loop on another; uvicorn installs no signal handlers
    # off the main thread, so ours do what its own would (a second signal forces the exit).
    worker = app.state.worker

    def run_http() -> None:
        try:
            server.run()
        finally:
            worker.stop()  # uvicorn ending for any reason (a failed start too) ends the engine loop

    http = threading.Thread(target=run_http, name="open-nemotron-http", daemon=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    http.start()
    worker.run_here()
    http.join(timeout=60)
    if not server.started:
        raise EngineError(f"the HTTP server did not start on {host}:{port} (see the log above)")
