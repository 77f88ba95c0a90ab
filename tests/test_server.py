"""The OpenAI-compatible server, exercised with the official `openai` client over loopback (tiny random model)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from models_for_tests import heterogeneous_config, random_decilm
from tokenizers_for_tests import chatml_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from open_nemotron.model.chat import ensure_reasoning_template, stop_token_ids  # noqa: E402
from open_nemotron.serve.engine import Engine  # noqa: E402
from open_nemotron.serve.server import ApiError, ReasoningSplitter, create_app, draining_server  # noqa: E402

SCRIPT = "<think>step one, step two</think>The answer is 4."


class Served:
    def __init__(self, engine: Engine, tokenizer, shutdown_grace_s: float = 30.0) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.app = create_app(engine, tokenizer, "tiny", queue_size=16)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = draining_server(self.app, shutdown_grace_s=shutdown_grace_s, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=120, max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _tokenizer():
    tok = chatml_tokenizer()
    ensure_reasoning_template(tok)
    return tok


@pytest.fixture(scope="module")
def served():
    tok = _tokenizer()
    model = random_decilm(heterogeneous_config(), seed=21)
    s = Served(Engine(model, max_batch_size=4, max_length=192, tokenizer=tok), tok)
    yield s
    s.close()


class ScriptedEngine(Engine):
    """Replies with SCRIPT then the end-of-turn token, whatever the model says (to test the reasoning split)."""

    def _sample(self, logits, states):
        script = self.tokenizer.encode(SCRIPT, add_special_tokens=False) + [stop_token_ids(self.tokenizer)[-1]]
        return [script[min(len(state.tokens), len(script) - 1)] for state in states]


@pytest.fixture(scope="module")
def scripted():
    tok = _tokenizer()
    s = Served(ScriptedEngine(random_decilm(heterogeneous_config(), seed=2), 2, 192, tokenizer=tok), tok)
    yield s
    s.close()


def _greedy(served: Served, messages: list[dict], thinking: bool, max_tokens: int) -> str:
    tok = served.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking, return_dict=False)
    stops = stop_token_ids(tok)
    out = served.engine.model.generate(
        torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=stops
    )[0, len(ids) :].tolist()
    return tok.decode(out, skip_special_tokens=True)


def _good_request(served: Served) -> None:
    reply = served.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None


MESSAGES = [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "What is 2 + 2?"}]


def test_chat_completion_is_the_models_greedy_reply(served):
    reply = served.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.content == _greedy(served, MESSAGES, False, 12).strip()
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_deltas_add_up_to_the_reply_and_end_with_done(served):
    full = served.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    stream = served.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.stream(
        "POST",
        served.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True},
        timeout=120,
    ) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_n_choices_and_completions_endpoint(served):
    reply = served.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, n=3, temperature=0.9, seed=5
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    again = served.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, n=3, temperature=0.9, seed=5
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    text = served.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and isinstance(text.choices[0].text, str)
    streamed = served.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert served.client.models.list().data[0].id == "tiny"
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_reasoning_on_goes_to_reasoning_content_and_off_has_none(scripted):
    on = scripted.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "2+2?"}],
        max_tokens=64,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = on.choices[0].message
    assert message.content == "The answer is 4." and "<think>" not in message.content
    assert message.reasoning_content == "step one, step two"
    assert on.choices[0].finish_reason == "stop"
    stream = scripted.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=64, stream=True
    )
    reasoning, content = "", ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert reasoning == "step one, step two" and content == "The answer is 4."


def test_ignore_eos_runs_to_max_tokens(scripted):
    """vLLM's `ignore_eos` extra: the scripted reply's end-of-turn token no longer ends it."""
    messages = [{"role": "user", "content": "hi"}]
    ended = scripted.client.chat.completions.create(model="tiny", messages=messages, max_tokens=60)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 60
    full = scripted.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=60, extra_body={"ignore_eos": True}
    )
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 60


def test_off_mode_reply_has_no_reasoning_field(served):
    reply = served.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("{not json", 400, "JSON"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
        ({"model": "nope", "messages": MESSAGES}, 404, "does not exist"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 400}]}, 400, "context"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "n": 99}, 400, "n"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(served, body, status, words):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    )
    response = httpx.post(served.url + "/v1/chat/completions", timeout=60, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert words.lower() in error["message"].lower() and error["type"] == "invalid_request_error"
    _good_request(served)


def test_eight_concurrent_clients_are_all_answered(served):
    def ask(i: int) -> str:
        reply = served.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5, temperature=0
        )
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(ask, range(8)))
    assert len(reasons) == 8 and all(r in ("stop", "length") for r in reasons)


class GatedEngine(Engine):
    """Holds every request at its third token until the test opens the gate: the client's cancel is then sure to
    arrive while the request is still running."""

    gate = threading.Event()

    def _sample(self, logits, states):
        if any(len(state.tokens) == 2 for state in states):
            assert self.gate.wait(timeout=120), "the test never opened the gate"
        return super()._sample(logits, states)


@pytest.fixture(scope="module")
def gated():
    tok = _tokenizer()
    s = Served(GatedEngine(random_decilm(heterogeneous_config(), seed=3), 2, 192, tokenizer=tok), tok)
    yield s
    GatedEngine.gate.set()
    s.close()


def test_a_cancelled_stream_frees_its_slot(gated):
    worker = gated.app.state.worker
    stream = gated.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=100, stream=True
    )
    next(iter(stream))  # the first token; the engine now waits at the third
    stream.close()  # the client goes away
    deadline = time.monotonic() + 60
    while worker.cancels_requested == 0:  # the server noticed and asked the engine to cancel
        assert time.monotonic() < deadline, "the server never cancelled the abandoned stream"
        time.sleep(0.01)
    GatedEngine.gate.set()
    while worker.open_requests != 0:
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.01)
    assert worker.cancelled == 1 and gated.engine.running == {}
    _good_request(gated)


def test_incremental_text_equals_decoding_everything():
    """Per-token tail decoding gives the full decode of every prefix that ends on a whole character, for random
    byte tokens (multi-byte UTF-8 split across tokens) and the SmolLM2-like tokenizer's specials."""
    from open_nemotron.serve.server import IncrementalText

    tok = _tokenizer()
    text = "Größe 東京 ok <think>x</think> naïve 🙂!"
    ids = tok.encode(text, add_special_tokens=False) + [2]
    gen = torch.Generator().manual_seed(0)
    ids += torch.randint(3, 259, (200,), generator=gen).tolist()
    inc = IncrementalText(tok)
    for n, token in enumerate(ids, 1):
        got = inc.add(token)
        full = tok.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(got)
        if not full.endswith("\ufffd"):
            assert got == full
    assert inc.text.startswith(text)


def test_the_streaming_splitter_holds_back_partial_tags():
    splitter = ReasoningSplitter()
    deltas = [splitter.split(t, False) for t in ("<th", "<think>ab", "<think>abc</th", "<think>abc</think>A")]
    deltas.append(splitter.split("<think>abc</think>Ans", True))
    assert "".join(r for r, _ in deltas) == "abc" and "".join(a for _, a in deltas) == "Ans"
    assert deltas[0] == ("", "")


def test_the_data_generation_teacher_runs_against_this_server(scripted):
    """The project's own OpenAI-endpoint teacher (`openai:URL::MODEL`) gets a reasoning-on row from the server."""
    from open_nemotron.data.tasks import TaskItem
    from open_nemotron.data.teachers import make_teacher

    teacher = make_teacher(f"openai:{scripted.url}/v1::tiny", timeout_s=120.0, max_retries=0, max_tokens=64)
    item = TaskItem("math", "What is 2 + 2?", "4", {"question": "What is 2 + 2?", "answer": "4"}, "train", 0, "unrated")
    (reply,) = teacher.answer([item], reasoning=True)
    assert reply is not None
    assert reply.text == "<think>\nstep one, step two\n</think>\n\nThe answer is 4."  # the dataset layout
    teacher.close()


class FailingEngine(Engine):
    """Raises inside a decode step for prompts that contain the byte "!" (a stand-in for an engine bug)."""

    def _decode(self):
        bang = self.tokenizer.encode("!", add_special_tokens=False)[0]
        if any(bang in state.request.prompt_ids for state in self.running.values()):
            raise RuntimeError("boom")
        return super()._decode()


def test_an_engine_failure_is_a_500_for_its_request_and_the_server_keeps_serving():
    tok = _tokenizer()
    s = Served(FailingEngine(random_decilm(heterogeneous_config(), seed=4), 2, 192, tokenizer=tok), tok)
    try:
        response = httpx.post(
            s.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "fail!"}], "max_tokens": 5},
            timeout=60,
        )
        assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
        _good_request(s)
        assert s.app.state.worker.open_requests == 0
    finally:
        s.close()


class SlowEngine(Engine):
    """Sleeps 20 ms per step, so a long request is surely still running when the server is told to stop."""

    def step(self):
        time.sleep(0.02)
        return super().step()


@pytest.mark.parametrize("grace_s, max_tokens, reason", [(0.3, 120, "abort"), (60.0, 12, "length")])
def test_shutdown_lets_requests_finish_within_the_grace_then_aborts_them_cleanly(grace_s, max_tokens, reason):
    """What SIGTERM does (uvicorn's should_exit): a stream in flight ends with its final chunk and [DONE] either
    way, finishing normally within the grace period and with finish_reason "abort" after it; new requests get 503;
    the server and its worker stop."""
    tok = _tokenizer()
    model = random_decilm(heterogeneous_config(), seed=8)
    s = Served(SlowEngine(model, 2, 192, tokenizer=tok), tok, shutdown_grace_s=grace_s)
    stream = s.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=max_tokens, temperature=0, stream=True
    )
    chunks = iter(stream)
    next(chunks)  # the request is in the engine now
    s.server.should_exit = True  # uvicorn's SIGTERM / SIGINT handler does exactly this
    rest = list(chunks)  # ends normally: the client saw [DONE], no broken connection
    assert rest[-1].choices[0].finish_reason == reason
    assert all(c.choices[0].finish_reason is None for c in rest[:-1])
    worker = s.app.state.worker
    with pytest.raises(ApiError) as refused:
        worker.submit(None, lambda completion: None)
    assert refused.value.status == 503 and "shutting down" in refused.value.message
    s.thread.join(timeout=60)
    assert not s.thread.is_alive() and not worker._thread.is_alive()
    assert worker.open_requests == 0 and s.engine.running == {}


def test_sigterm_drains_the_cli_server(tmp_path):
    """`open-nemotron serve` in its own process: SIGTERM aborts the stream in flight with a final chunk and
    [DONE] (grace 0 s), and the process ends without a traceback (uvicorn re-raises the signal once it has shut
    down, so the exit status is that of SIGTERM)."""
    import os
    import signal
    import subprocess
    import sys

    from models_for_tests import random_llama, tiny_llama_config

    model = random_llama(tiny_llama_config())
    with torch.no_grad():  # special tokens (0-2, the stop tokens among them) get logit 0: greedy never picks them
        model.lm_head.weight[:3] = 0
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    chatml_tokenizer().save_pretrained(model_dir)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "open_nemotron.cli", "serve", str(model_dir), "--port", str(port)]
    command += ["--model-name", "tiny", "--shutdown-grace", "0", "--device", "cpu", "--max-length", "4000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=3900, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        server.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest and rest[-1].choices[0].finish_reason == "abort"
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        log = server.stdout.read()
        assert "Traceback" not in log and "Shutting down" in log, log
    finally:
        if server.poll() is None:
            server.kill()
