"""SFT rows in the layout of NVIDIA's Llama-Nemotron-Post-Training-Dataset, validated on the way in.

A row is ``{"input": [messages], "output": str, "reasoning": "on"|"off", "system_prompt": "detailed thinking on|off",
"category", "generator", "license", "used_in_training", "version"}`` plus our optional ``task``, ``answer`` and
``metadata``. `example_from_row` turns a row into an `Example` or raises `MalformedRowError` with a short reason key;
`load_examples` reads jsonl, parquet, a folder of them, or a Hugging Face Hub id, and counts every row it drops by
reason in a `RowReport` (nothing is dropped silently). `write_examples` writes jsonl atomically and `to_messages`
gives the ``[system, *input, assistant]`` conversation SFT trains on.

Accepted variants of NVIDIA's own files:

* ``input`` as a list of ``{"role", "content"}`` messages (v1.1 JSONL), as a Llama-3 chat-formatted string
  (``<|start_header_id|>user<|end_header_id|>\\n\\n…<|eot_id|>``, the earliest v1 files), or a plain string (one user
  turn); a trailing ``<|eot_id|>`` on ``output`` is removed;
* a system message inside ``input`` that is exactly a toggle string becomes ``system_prompt``;
* ``used_in_training`` as a string (``"Ultra, Super, Nano"``, the real files) or a list (``["Ultra"]``, NeMo-Curator's
  tutorial), stored as the string;
* ``messages`` (a conversation ending in the assistant turn) instead of ``input``/``output``;
* ``metadata`` as a JSON string; a missing ``system_prompt`` is derived from ``reasoning`` and vice versa.

Outputs must obey the toggle-compliance rule of `open_nemotron.rewards.format.toggle_violation` (the one the eval
and the teachers use): reasoning-on outputs hold exactly one ``<think>…</think>`` block, at the start (whitespace
aside; an empty block is allowed, as in NVIDIA's data), followed by a non-empty answer; reasoning-off outputs hold
no think tags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat_template import THINK_CLOSE, THINK_OPEN, THINKING_OFF, THINKING_ON
from open_nemotron.rewards.format import toggle_violation
from open_nemotron.utils import atomic_write_text

# Every reason `example_from_row` / `load_examples` can give, so reports and tests can enumerate them.
MALFORMED_REASONS: tuple[str, ...] = (
    "bad_json",  # a jsonl line that is not JSON
    "not_a_mapping",  # a row that is not a JSON object
    "bad_input",  # input missing, of the wrong type, empty, or a message that is not {role, content} strings
    "bad_role",  # a role other than user/assistant, or a system message that is not a leading toggle string
    "bad_turn_order",  # the conversation does not end with a user turn (the output answers it)
    "bad_output",  # output missing, not a string, or empty
    "bad_reasoning",  # reasoning not "on"/"off" (or missing with no system prompt to derive it from)
    "bad_system_prompt",  # system_prompt not exactly "detailed thinking on" / "detailed thinking off"
    "reasoning_mismatch",  # system prompt and reasoning disagree
    "missing_think",  # reasoning on, but no <think> block
    "bad_think",  # think tags present but not exactly one well-formed block at the start
    "empty_answer",  # reasoning on, nothing after </think>
    "think_in_off",  # reasoning off, but think tags in the output
    "bad_field",  # category/generator missing, or a metadata field of the wrong type
)

_TOGGLES = {THINKING_ON: "on", THINKING_OFF: "off"}
_SYSTEM_FOR = {"on": THINKING_ON, "off": THINKING_OFF}
_PROMPT_ROLES = ("user", "assistant")
# Llama-3 special tokens seen in the earliest v1 files, where input was a chat-formatted string.
_LLAMA3_TURN = re.compile(
    r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|(?=<\|start_header_id\|>)|$)", re.S
)
_LLAMA3_BOS = "<|begin_of_text|>"
_LLAMA3_EOT = "<|eot_id|>"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class MalformedRowError(OpenNemotronError, ValueError):
    """A row that does not fit the schema; `reason` is a short key from `MALFORMED_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataSourceError(OpenNemotronError, ValueError):
    """A data source (file, folder or hub id) that cannot be read at all."""


@dataclass
class Example:
    """One row, Llama-Nemotron-Post-Training-Dataset layout plus our optional extras (task, answer, metadata)."""

    input: list[dict[str, str]]
    output: str
    reasoning: str
    system_prompt: str
    category: str
    generator: str
    license: str = "cc-by-4.0"
    used_in_training: str = ""
    version: str = "v1"
    task: str | None = None
    answer: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class RowReport:
    """What loading did with each row: `total` read, `kept`, and `dropped` counted by reason."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # The first message seen for each reason (with its location), so a report can show an instance.
    first_error: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, message: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_error.setdefault(reason, message)

    def summary(self) -> str:
        """One line, e.g. ``kept 98 of 100 rows; dropped bad_think 1, think_in_off 1``."""
        line = f"kept {self.kept} of {self.total} rows"
        if self.dropped:
            line += "; dropped " + ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items()))
        return line


def _short(value: Any, limit: int = 60) -> str:
    # repr keeps the excerpt on one line even when the value holds newlines.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_llama3_string(text: str) -> list[dict[str, str]]:
    """Messages from a Llama-3 chat-formatted prompt string; a plain string is one user message."""
    body = text.strip()
    if body.startswith(_LLAMA3_BOS):
        body = body[len(_LLAMA3_BOS) :]
    turns = [{"role": role, "content": content.strip()} for role, content in _LLAMA3_TURN.findall(body)]
    if not turns:
        return [{"role": "user", "content": text}]
    # The prompt ends with an open assistant header (the generation prompt), not a real turn.
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def _coerce_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise MalformedRowError("bad_input", f"input = {_short(value)}: expected a non-empty list of messages")
        return _parse_llama3_string(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise MalformedRowError("bad_input", f"input = {_short(value)}: expected a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise MalformedRowError(
                "bad_input", f"input[{i}] = {_short(message)}: expected {{'role': str, 'content': str}}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _split_system(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """Take a leading toggle system message out of `messages`; any other system message is malformed."""
    system = None
    if messages and messages[0]["role"] == "system":
        content = messages[0]["content"].strip()
        if content in _TOGGLES:
            system = content
        elif content:
            raise MalformedRowError(
                "bad_role",
                f"input[0] is a system message {_short(content)}: expected only the toggle "
                f"{THINKING_ON!r} or {THINKING_OFF!r} as a system message",
            )
        # An empty system message (newer NVIDIA files) carries nothing: drop it.
        messages = messages[1:]
    for i, message in enumerate(messages):
        if message["role"] not in _PROMPT_ROLES:
            raise MalformedRowError(
                "bad_role", f"input message role = {message['role']!r} (turn {i}): expected 'user' or 'assistant'"
            )
        if not message["content"].strip():
            raise MalformedRowError("bad_input", f"input message {i} ({message['role']}) is empty: expected text")
    if not messages:
        raise MalformedRowError("bad_input", "input has no user message: expected at least one")
    if messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        roles = ",".join(m["role"] for m in messages)
        raise MalformedRowError("bad_turn_order", f"input roles = {roles}: expected to start and end with a user turn")
    return system, messages


def _check_output(output: str, reasoning: str) -> None:
    """Raise `MalformedRowError` if `output` breaks the toggle-compliance rule (`toggle_violation`) for `reasoning`."""
    violation = toggle_violation(output, reasoning == "on")
    if violation is None:
        return
    opens, closes = output.count(THINK_OPEN), output.count(THINK_CLOSE)
    if violation == "think_in_off":
        detail = f"output has {opens} {THINK_OPEN} / {closes} {THINK_CLOSE} tags: expected none when reasoning is off"
    elif violation == "missing_think":
        detail = f"output = {_short(output)}: expected a {THINK_OPEN}…{THINK_CLOSE} block when reasoning is on"
    elif violation == "bad_think":
        detail = (
            f"output has {opens} {THINK_OPEN} / {closes} {THINK_CLOSE} tags, starting {_short(output.lstrip()[:30])}: "
            f"expected exactly one {THINK_OPEN}…{THINK_CLOSE} block at the start"
        )
    elif reasoning == "on":
        detail = f"output has nothing after {THINK_CLOSE}: expected the final answer"
    else:  # an off output that was nothing but a trailing <|eot_id|>
        violation, detail = "bad_output", f"output = {_short(output)}: expected a non-empty string"
    raise MalformedRowError(violation, detail)


def _optional_str(row: dict, name: str, default: str) -> str:
    value = row.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise MalformedRowError("bad_field", f"{name} = {_short(value)}: expected a string")
    return value


def _required_str(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise MalformedRowError("bad_field", f"{name} = {_short(value)}: expected a string")
    return value


def _used_in_training(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    raise MalformedRowError("bad_field", f"used_in_training = {_short(value)}: expected a string or a list of strings")


def _metadata(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise MalformedRowError("bad_field", f"metadata = {_short(value)}: expected a JSON object")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise MalformedRowError("bad_field", f"metadata is not JSON-serialisable ({e}): expected JSON values") from None
    return value


def _reasoning_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower()
    raise MalformedRowError("bad_reasoning", f"reasoning = {_short(value)}: expected 'on' or 'off'")


def example_from_row(row: dict) -> Example:
    """Validate one row and return it as an `Example`; raise `MalformedRowError(reason, detail)` otherwise."""
    if not isinstance(row, dict):
        raise MalformedRowError("not_a_mapping", f"row = {_short(row)}: expected a JSON object")
    if row.get("input") is None and row.get("output") is None and row.get("messages") is not None:
        conversation = _coerce_messages(row["messages"])
        if conversation[-1]["role"] != "assistant":
            raise MalformedRowError(
                "bad_turn_order", f"messages end with a {conversation[-1]['role']!r} turn: expected the assistant's"
            )
        raw_input, output = conversation[:-1], conversation[-1]["content"]
    else:
        if row.get("input") is None:
            raise MalformedRowError("bad_input", "input is missing: expected a non-empty list of messages")
        raw_input, output = _coerce_messages(row["input"]), row.get("output")
    if not isinstance(output, str) or not output.strip():
        raise MalformedRowError("bad_output", f"output = {_short(output)}: expected a non-empty string")
    if output.rstrip().endswith(_LLAMA3_EOT):
        output = output.rstrip()[: -len(_LLAMA3_EOT)]

    system_in_input, messages = _split_system(raw_input)
    system_prompt = row.get("system_prompt")
    if system_prompt == "":
        system_prompt = None
    if system_prompt is not None and system_prompt not in _TOGGLES:
        raise MalformedRowError(
            "bad_system_prompt",
            f"system_prompt = {_short(system_prompt)}: expected {THINKING_ON!r} or {THINKING_OFF!r}",
        )
    if system_prompt is not None and system_in_input is not None and system_prompt != system_in_input:
        raise MalformedRowError(
            "reasoning_mismatch",
            f"system_prompt = {system_prompt!r} but the input's system message is {system_in_input!r}: expected the same",
        )
    system_prompt = system_prompt or system_in_input
    reasoning = _reasoning_value(row.get("reasoning"))
    if reasoning is None and system_prompt is None:
        raise MalformedRowError("bad_reasoning", "reasoning and system_prompt are both missing: expected at least one")
    reasoning = reasoning or _TOGGLES[system_prompt]
    system_prompt = system_prompt or _SYSTEM_FOR[reasoning]
    if _TOGGLES[system_prompt] != reasoning:
        raise MalformedRowError(
            "reasoning_mismatch",
            f"reasoning = {reasoning!r} but system_prompt = {system_prompt!r}: expected them to agree",
        )
    _check_output(output, reasoning)

    task, answer = row.get("task"), row.get("answer")
    for name, value in (("task", task), ("answer", answer)):
        if value is not None and not isinstance(value, str):
            raise MalformedRowError("bad_field", f"{name} = {_short(value)}: expected a string or null")
    return Example(
        input=messages,
        output=output,
        reasoning=reasoning,
        system_prompt=system_prompt,
        category=_required_str(row, "category"),
        generator=_required_str(row, "generator"),
        license=_optional_str(row, "license", ""),
        used_in_training=_used_in_training(row.get("used_in_training")),
        version=_optional_str(row, "version", "v1"),
        task=task,
        answer=answer,
        metadata=_metadata(row.get("metadata")),
    )


def example_to_row(ex: Example) -> dict[str, Any]:
    """The JSON row for `ex` (every field, in the dataset's order, extras last)."""
    return asdict(ex)


def to_messages(ex: Example) -> list[dict[str, str]]:
    """The conversation SFT trains on: ``[system toggle, *input, assistant output]``."""
    return [
        {"role": "system", "content": ex.system_prompt},
        *({"role": m["role"], "content": m["content"]} for m in ex.input),
        {"role": "assistant", "content": ex.output},
    ]


def write_examples(path: str | Path, examples: Iterable[Example]) -> None:
    """Write `examples` as jsonl, atomically; each is validated first so a written file always loads back whole."""
    lines = []
    for i, ex in enumerate(examples):
        row = example_to_row(ex)
        try:
            example_from_row(row)
        except MalformedRowError as e:
            raise MalformedRowError(e.reason, f"example {i}: {e.detail}") from None
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


def _jsonl_rows(path: Path, report: RowReport) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                report.total += 1
                report.drop("bad_json", f"{path.name}:{lineno}: not JSON ({e.msg}): expected one JSON object per line")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    index = 0
    # Batches keep memory bounded on NVIDIA's multi-GB shards.
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield f"{path.name}:row {index}", row


def _hub_rows(source: str, config: str | None, split: str | None, limit: int | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        if split is not None and limit is not None:
            split = f"{split}[:{limit}]"
        loaded = datasets.load_dataset(source, name=config, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, offline, config); all mean "can't"
        reason = " ".join(str(e).split())[:200]
        raise DataSourceError(
            f"data source {source!r}: could not load it from the Hugging Face Hub or the local cache "
            f"({type(e).__name__}: {reason}); expected a cached dataset id (or network access), or a .jsonl/.parquet file"
        ) from None
    parts = loaded.items() if isinstance(loaded, dict) else [(split or "train", loaded)]
    for name, part in parts:
        for index, row in enumerate(part, 1):
            yield f"{source}[{name}] row {index}", row


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_LOCAL_SUFFIXES))
        if not files:
            raise DataSourceError(f"data source {str(path)!r} is a folder with no .jsonl/.json/.parquet files")
        return files
    if not path.name.endswith(_LOCAL_SUFFIXES):
        raise DataSourceError(f"data source {str(path)!r}: expected a .jsonl, .json or .parquet file")
    return [path]


def load_examples(
    source: str | Path, *, config: str | None = None, split: str | None = None, limit: int | None = None
) -> tuple[list[Example], RowReport]:
    """Read rows from a jsonl/parquet file, a folder of them, or a Hub dataset id; validate each.

    Returns the valid rows as `Example`s and a `RowReport` counting the rest by reason. `config`/`split` are passed
    to ``datasets.load_dataset`` for a hub id (e.g. ``config="SFT", split="math"`` for NVIDIA's dataset); `limit`
    stops after that many rows. Raises `DataSourceError` (one line) when the source cannot be read at all, e.g. a
    hub id that is neither cached nor reachable.
    """
    if limit is not None and limit < 0:
        raise DataSourceError(f"limit = {limit}: expected a non-negative integer or None")
    report = RowReport()
    text = str(source)
    path = Path(source).expanduser()
    if path.exists():
        rows: Iterator[tuple[str, Any]] = (
            row
            for file in _local_files(path)
            for row in (_parquet_rows(file) if file.suffix == ".parquet" else _jsonl_rows(file, report))
        )
    elif isinstance(source, Path) or text.endswith(_LOCAL_SUFFIXES) or text.startswith((".", "/", "~")):
        raise DataSourceError(f"data source {text!r}: no such file or folder")
    elif _HUB_ID.match(text):
        rows = _hub_rows(text, config, split, limit)
    else:
        raise DataSourceError(
            f"data source {text!r}: expected a .jsonl/.parquet file, a folder of them, or a hub id like owner/name"
        )

    examples: list[Example] = []
    for where, row in rows:
        if limit is not None and report.total >= limit:
            break
        report.total += 1
        try:
            examples.append(example_from_row(row))
        except MalformedRowError as e:
            report.drop(e.reason, f"{where}: {e.detail}")
    report.kept = len(examples)
    return examples, report
