"""Teachers and the resumable generation driver; the OpenAI teacher against a local stub of the OpenAI API.

The stub is an `http.server` on 127.0.0.1 in a thread that answers ``POST /v1/chat/completions`` with a reply chosen
by the user question, so each behaviour (inline think, reasoning_content, never answering, malformed, 500-then-ok,
...) is one question. The real `openai` client talks to it. No test depends on how fast anything runs: the client
timeout is generous (30 s) wherever a reply is expected, and the timeout test uses a question the stub never
answers (it holds the connection until the client hangs up), so any timeout is exceeded.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from open_nemotron.data.generate import (
    GenerationError,
    example_id,
    generate_to_jsonl,
    read_existing,
)
from open_nemotron.data.schema import load_examples
from open_nemotron.data.tasks import MATH_SCORER, TaskItem, make_items, score_answer
from open_nemotron.data.teachers import (
    BuiltinSolverTeacher,
    HFModelTeacher,
    OpenAITeacher,
    Teacher,
    TeacherReply,
    TeacherSpecError,
    format_output,
    make_teacher,
    normalise_reply,
    parse_openai_spec,
)
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON

THOUGHT = "I need 2 plus 5. 2 + 5 = 7."
ANSWER = "The answer is \\boxed{7}."
ON_TEXT = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"


def math_item(question: str, answer: str = "7", split: str = "train") -> TaskItem:
    return TaskItem(
        task="math",
        question=question,
        answer=answer,
        entry={"question": question, "answer": answer, "scorer": MATH_SCORER},
        split=split,
        seed=0,
        difficulty="unrated",
    )


# ------------------------------------------------------------------------------------------------ stub server

Reply = tuple[int, str, bytes]  # status, content type, body


def completion(content: object, **message_extra: object) -> bytes:
    message = {"role": "assistant", "content": content, **message_extra}
    finish = message.pop("finish_reason", "stop")
    body = {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return json.dumps(body).encode()


class StubOpenAI:
    """A scripted OpenAI-compatible server: behaviour by user question, normal answer otherwise.

    `requests` holds every parsed request body; `calls` counts requests per (question, system prompt).
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.calls: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Condition()
        self.stop = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                request = json.loads(self.rfile.read(length))
                status, ctype, body = stub.respond(self.path, request)
                if status == 0:  # never answer: hold the connection until the client hangs up or the stub closes
                    while not stub.stop.is_set():
                        readable, _, _ = select.select([self.connection], [], [], 0.05)
                        if readable and not self.connection.recv(1, socket.MSG_PEEK):
                            break  # the client gave up and closed the connection
                    return
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that timed out and hung up is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def respond(self, path: str, request: dict) -> Reply:
        messages = request["messages"]
        system, question = messages[0]["content"], messages[-1]["content"]
        with self.lock:
            self.requests.append(request)
            self.calls[(question, system)] += 1
            n = self.calls[(question, system)]
            self.lock.notify_all()
        on = system == THINKING_ON
        json_ct = "application/json"
        if path != "/v1/chat/completions":
            return 404, json_ct, b'{"error": {"message": "not found"}}'
        if question == "NEVER_ANSWERS":
            return 0, json_ct, b""
        if question == "MALFORMED_JSON":
            return 200, json_ct, b'{"choices": [{"message": '
        if question == "NOT_JSON":
            return 200, "text/plain", b"Internal proxy page"
        if question == "NO_CHOICES":
            return 200, json_ct, b'{"id": "x", "choices": []}'
        if question == "BAD_TYPES":
            return 200, json_ct, completion(42)
        if question == "EMPTY":
            return 200, json_ct, completion("")
        if question == "TRUNCATED":
            return 200, json_ct, completion("<think>\nstill going", finish_reason="length")
        if question == "BAD_REQUEST":
            return 400, json_ct, b'{"error": {"message": "bad request"}}'
        if question == "ALWAYS_500":
            return 500, json_ct, b'{"error": {"message": "boom"}}'
        if question == "FLAKY" and n == 1:
            return 500, json_ct, b'{"error": {"message": "try again"}}'
        if question == "REASONING_CONTENT":
            return 200, json_ct, completion(ANSWER, reasoning_content=THOUGHT) if on else completion(ANSWER)
        if question == "REASONING_FIELD":  # vLLM >= 0.11 names it `reasoning`; off still sends the field (null)
            return 200, json_ct, completion(ANSWER, reasoning=THOUGHT if on else None)
        if question == "THINKS_WHEN_OFF":
            return 200, json_ct, completion(ON_TEXT)
        return 200, json_ct, completion(ON_TEXT if on else ANSWER)

    def wait_for_calls(self, key: tuple[str, str], n: int) -> bool:
        """Wait until `key` has been requested `n` times (True), or give up after a minute (False)."""
        with self.lock:
            return self.lock.wait_for(lambda: self.calls[key] >= n, timeout=60)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def stub() -> Iterator[StubOpenAI]:
    server = StubOpenAI()
    try:
        yield server
    finally:
        server.close()


def openai_teacher(stub: StubOpenAI, **options: object) -> OpenAITeacher:
    # A generous timeout: a loaded machine must not turn a reply into a timeout.
    settings = {"timeout_s": 30.0, "max_retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "concurrency": 4}
    settings.update(options)
    return OpenAITeacher(stub.base_url, "stub-model", **settings)


# ------------------------------------------------------------------------------------------------ specs, format


def test_parse_openai_spec() -> None:
    assert parse_openai_spec("openai:http://127.0.0.1:8000/v1::Qwen/Qwen3-8B") == (
        "http://127.0.0.1:8000/v1",
        "Qwen/Qwen3-8B",
    )
    # The split is at the last '::', so IPv6 hosts work.
    assert parse_openai_spec("openai:http://[::1]:8000/v1::m") == ("http://[::1]:8000/v1", "m")
    for bad in (
        "http://127.0.0.1:8000/v1::m",  # no openai: prefix
        "openai:http://127.0.0.1:8000/v1",  # no model
        "openai:http://127.0.0.1:8000/v1::",  # empty model
        "openai:127.0.0.1:8000::m",  # no scheme
        "openai:ftp://host/v1::m",
    ):
        with pytest.raises(TeacherSpecError) as err:
            parse_openai_spec(bad)
        assert "\n" not in str(err.value) and "openai:BASE_URL::MODEL" in str(err.value)
    with pytest.raises(TeacherSpecError, match="not one of builtin"):
        make_teacher("vllm:http://x::m")
    teacher = make_teacher("openai:http://127.0.0.1:9/v1::m", timeout_s=1.0)
    assert isinstance(teacher, OpenAITeacher) and teacher.name == "openai:m"
    assert isinstance(teacher, Teacher) and isinstance(make_teacher("builtin"), Teacher)
    with pytest.raises(TeacherSpecError, match="concurrency"):
        OpenAITeacher("http://127.0.0.1:9/v1", "m", concurrency=0)


@pytest.mark.parametrize(
    ("content", "separate", "reasoning", "expected"),
    [
        (ON_TEXT, None, True, (ON_TEXT, None)),
        (f"  <think>{THOUGHT}</think>{ANSWER}  ", None, True, (ON_TEXT, None)),
        (f"{THOUGHT}\n</think>\n{ANSWER}", None, True, (ON_TEXT, None)),  # opening tag pre-filled by the server
        (ANSWER, THOUGHT, True, (ON_TEXT, None)),  # reasoning in a separate field
        (f"<think></think>{ANSWER}", THOUGHT, True, (ON_TEXT, None)),
        (ANSWER, None, True, (None, "missing_reasoning")),
        (f"<think>\n\n</think>\n\n{ANSWER}", None, True, (None, "missing_reasoning")),
        (f"<think>{THOUGHT}", None, True, (None, "malformed_think")),
        (f"<think>a</think><think>b</think>{ANSWER}", None, True, (None, "malformed_think")),
        (f"{ANSWER} <think>x</think> more", None, True, (None, "malformed_think")),
        (f"<think>{THOUGHT}</think>", None, True, (None, "empty_answer")),
        (ANSWER, THOUGHT, False, (ANSWER, None)),  # off ignores a separate reasoning field
        (f"<think>\n\n</think>\n\n{ANSWER}", None, False, (ANSWER, None)),  # Qwen3's empty block, dropped
        (ON_TEXT, None, False, (None, "reasoning_in_off_mode")),
        ("   ", None, False, (None, "empty_answer")),
    ],
)
def test_normalise_reply(content, separate, reasoning, expected) -> None:
    assert normalise_reply(content, separate, reasoning) == expected


def test_normalise_reply_strict() -> None:
    assert normalise_reply(ON_TEXT, None, True, strict=True) == (ON_TEXT, None)
    assert normalise_reply(f"{THOUGHT}</think>{ANSWER}", None, True, strict=True) == (None, "malformed_think")
    assert normalise_reply(f"<think>\n\n</think>\n\n{ANSWER}", None, False, strict=True) == (
        None,
        "reasoning_in_off_mode",
    )
    assert format_output(None, f" {ANSWER} ") == ANSWER


# ------------------------------------------------------------------------------------------------ OpenAI teacher


def test_openai_teacher_inline_and_separate_reasoning(stub: StubOpenAI) -> None:
    teacher = openai_teacher(stub, max_tokens=256)
    items = [math_item("What is 2 + 5?"), math_item("REASONING_CONTENT"), math_item("REASONING_FIELD")]
    on = teacher.answer(items, reasoning=True)
    assert on == [TeacherReply(ON_TEXT, "openai:stub-model")] * 3
    off = teacher.answer(items, reasoning=False)
    assert [r.text for r in off if r is not None] == [ANSWER] * 3
    assert not teacher.failures
    for item in items:
        assert score_answer(item, ON_TEXT) == 1.0

    first = stub.requests[0]
    assert first["model"] == "stub-model" and first["max_tokens"] == 256
    systems = Counter(r["messages"][0]["content"] for r in stub.requests)
    assert systems == {THINKING_ON: 3, THINKING_OFF: 3}
    by_mode = {r["messages"][0]["content"]: r for r in stub.requests}
    assert by_mode[THINKING_ON]["temperature"] == 0.6 and by_mode[THINKING_ON]["top_p"] == 0.95
    assert by_mode[THINKING_OFF]["temperature"] == 0.0 and "top_p" not in by_mode[THINKING_OFF]
    assert all(len(r["messages"]) == 2 and r["messages"][1]["role"] == "user" for r in stub.requests)


def test_openai_teacher_timeout_is_a_counted_failure(stub: StubOpenAI) -> None:
    # The stub never answers NEVER_ANSWERS, so the client's timeout is exceeded however short or long it is.
    teacher = openai_teacher(stub, timeout_s=0.05, max_retries=1)
    assert teacher.answer([math_item("NEVER_ANSWERS")], reasoning=True) == [None]
    assert teacher.failures == {"timeout": 1}
    assert teacher.stats == {"requests": 2, "retries": 1}  # the first try and one retry
    # The server may read a request the client already gave up on later: wait for it (an event, not a delay).
    assert stub.wait_for_calls(("NEVER_ANSWERS", THINKING_ON), 2)


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        ("MALFORMED_JSON", "malformed_json"),
        ("NOT_JSON", "malformed_json"),
        ("NO_CHOICES", "no_choices"),
        ("BAD_TYPES", "bad_content_type"),
        ("EMPTY", "empty_content"),
        ("TRUNCATED", "truncated"),
        ("BAD_REQUEST", "http_400"),
        ("THINKS_WHEN_OFF", "reasoning_in_off_mode"),
    ],
)
def test_openai_teacher_malformed_replies_are_counted_not_raised(stub: StubOpenAI, question: str, reason: str) -> None:
    teacher = openai_teacher(stub)
    assert teacher.answer([math_item(question)], reasoning=question != "THINKS_WHEN_OFF") == [None]
    assert teacher.failures == {reason: 1}
    assert sum(stub.calls.values()) == 1  # none of these is retried


def test_openai_teacher_retries_5xx(stub: StubOpenAI) -> None:
    teacher = openai_teacher(stub, max_retries=2)
    replies = teacher.answer([math_item("FLAKY"), math_item("ALWAYS_500")], reasoning=True)
    assert replies[0] == TeacherReply(ON_TEXT, "openai:stub-model")  # 500, then success
    assert replies[1] is None
    assert teacher.failures == {"http_500": 1}
    assert stub.calls[("FLAKY", THINKING_ON)] == 2
    assert stub.calls[("ALWAYS_500", THINKING_ON)] == 3  # 1 + max_retries


def test_openai_teacher_connection_refused() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", "m", timeout_s=30.0, max_retries=1, backoff_s=0.01)
    assert teacher.answer([math_item("hi")], reasoning=False) == [None]
    assert teacher.failures == {"connection_error": 1}


# ------------------------------------------------------------------------------------------------ resumability


def test_generate_resumes_after_a_kill(stub: StubOpenAI, tmp_path: Path) -> None:
    items = [math_item(f"What is {i} + 5?", str(i + 5)) for i in range(6)]
    out = tmp_path / "gen" / "rows.jsonl"
    teacher = openai_teacher(stub)
    first = generate_to_jsonl(teacher, items, out, ("on", "off"), batch_size=4)
    assert (first.requested, first.generated, first.already_present, first.missing) == (12, 12, 0, 0)
    assert first.by_mode == {"on": 6, "off": 6}
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["metadata"]["id"] for line in lines]
    assert sorted(ids) == sorted(example_id("math", item.question, m) for item in items for m in ("on", "off"))
    examples, report = load_examples(out)
    assert report.kept == 12 and not report.dropped
    assert {ex.system_prompt for ex in examples if ex.reasoning == "on"} == {THINKING_ON}
    assert all(ex.generator == "openai:stub-model" and ex.answer and ex.category == "math" for ex in examples)

    # A kill mid-write: five whole rows survive, the sixth is torn.
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    before = sum(stub.calls.values())
    second = generate_to_jsonl(openai_teacher(stub), items, out, ("on", "off"), batch_size=4)
    assert sum(stub.calls.values()) - before == 7  # only the missing ids were asked for
    assert (second.already_present, second.generated, second.torn_lines, second.missing) == (5, 7, 1, 0)
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["metadata"]["id"] for row in final) == sorted(ids)

    before = sum(stub.calls.values())
    third = generate_to_jsonl(openai_teacher(stub), items, out, ("on", "off"))
    assert (third.already_present, third.generated) == (12, 0) and sum(stub.calls.values()) == before


def test_generate_counts_failures_and_retries_them_next_run(stub: StubOpenAI, tmp_path: Path) -> None:
    items = [math_item("What is 2 + 5?"), math_item("FLAKY"), math_item("NO_CHOICES")]
    out = tmp_path / "rows.jsonl"
    report = generate_to_jsonl(openai_teacher(stub, max_retries=0), items, out, ("on",))
    assert report.generated == 1 and report.failed == {"http_500": 1, "no_choices": 1} and report.missing == 2
    again = generate_to_jsonl(openai_teacher(stub, max_retries=0), items, out, ("on",))
    assert again.already_present == 1 and again.generated == 1  # FLAKY succeeds on its second request
    assert again.failed == {"no_choices": 1}
    assert "2 already present" not in again.summary() and "1 already present" in again.summary()
    assert read_existing(out).rows == 2


def test_generate_refuses_heldout_items_and_bad_modes(tmp_path: Path) -> None:
    teacher = BuiltinSolverTeacher()
    with pytest.raises(GenerationError, match="heldout items"):
        generate_to_jsonl(teacher, [math_item("q", split="heldout")], tmp_path / "x.jsonl")
    with pytest.raises(GenerationError, match="validation items"):
        generate_to_jsonl(teacher, [math_item("p"), math_item("q", split="validation")], tmp_path / "x.jsonl")
    with pytest.raises(GenerationError, match="reasoning modes"):
        generate_to_jsonl(teacher, [math_item("q")], tmp_path / "x.jsonl", ("maybe",))
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------------------------------ builtin, HF


def test_builtin_solver_teacher(tmp_path: Path) -> None:
    items = make_items("chain_sum", 3, seed=7) + [math_item("What is 2 + 5?")]  # math items have no solver
    teacher = BuiltinSolverTeacher()
    on = teacher.answer(items, reasoning=True)
    off = teacher.answer(items, reasoning=False)
    assert on[3] is None and off[3] is None and teacher.failures == {"no_solver": 2}
    for item, reply_on, reply_off in zip(items[:3], on[:3], off[:3], strict=True):
        assert reply_on is not None and reply_off is not None
        assert reply_on.generator == "builtin-solver"
        assert reply_on.text.startswith("<think>\n") and "\n</think>\n\n" in reply_on.text
        assert "<think>" not in reply_off.text and reply_on.text.endswith(reply_off.text)
        assert score_answer(item, reply_on.text) == 1.0 and score_answer(item, reply_off.text) == 1.0
    report = generate_to_jsonl(teacher, items, tmp_path / "b.jsonl")
    assert report.generated == 6 and report.failed == {"no_solver": 2}
    examples, _ = load_examples(tmp_path / "b.jsonl")
    assert {ex.category for ex in examples} == {"reasoning-gym"}


def scripted_generate(script: list[list[str]]) -> Callable[..., list[str]]:
    """A stand-in for generate_chat returning script[round][row] (rows: the items still open that round)."""
    rounds = iter(script)

    def fake(model, tokenizer, conversations, *, thinking, seed, do_sample, **kwargs):
        assert do_sample is True
        replies = next(rounds)
        assert len(replies) == len(conversations)
        return replies

    return fake


def test_hf_teacher_rejection_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    from models_for_tests import random_llama, tiny_llama_config
    from tokenizers_for_tests import chatml_tokenizer

    from open_nemotron.model import chat

    items = [math_item("What is 2 + 5?", "7"), math_item("What is 3 + 3?", "6")]
    teacher = HFModelTeacher(random_llama(tiny_llama_config()), chatml_tokenizer(), samples=3)
    monkeypatch.setattr(
        chat,
        "generate_chat",
        scripted_generate(
            [
                ["<think>7</think>", "<think>x</think><think>y</think>\\boxed{6}"],  # empty answer; two blocks
                ["7</think>\\boxed{7}", "<think>3 and 3</think>The answer is \\boxed{5}."],  # no opening tag; wrong
                ["<think>2 + 5 = 7</think>\\boxed{7}", "<think>3 + 3 = 6</think>\\boxed{6}"],
            ]
        ),
    )
    replies = teacher.answer(items, reasoning=True)
    assert [r.text if r else None for r in replies] == [
        "<think>\n2 + 5 = 7\n</think>\n\n\\boxed{7}",
        "<think>\n3 + 3 = 6\n</think>\n\n\\boxed{6}",
    ]
    assert teacher.stats["rejected:wrong_answer"] == 1 and teacher.stats["rejected:malformed_think"] == 2
    assert teacher.stats["rejected:empty_answer"] == 1 and teacher.stats["samples"] == 6
    assert not teacher.failures

    monkeypatch.setattr(chat, "generate_chat", scripted_generate([["<think>7</think>7", "6"], ["x"], ["y"]]))
    off = teacher.answer(items, reasoning=False)
    assert off[0] is None and off[1] == TeacherReply("6", teacher.name)
    assert teacher.failures == {"no_correct_sample": 1}


def test_hf_teacher_with_a_tiny_random_model() -> None:
    from models_for_tests import random_llama, tiny_llama_config
    from tokenizers_for_tests import chatml_tokenizer

    teacher = HFModelTeacher(random_llama(tiny_llama_config()), chatml_tokenizer(), samples=2, max_new_tokens=6)
    replies = teacher.answer([math_item("What is 2 + 5?")], reasoning=True)
    assert replies == [None]  # random weights never write a correct, well-formed answer
    assert teacher.failures == {"no_correct_sample": 1} and teacher.stats["samples"] == 2
