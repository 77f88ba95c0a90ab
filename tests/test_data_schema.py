"""The Llama-Nemotron row schema: validation by reason, NVIDIA's field variants, jsonl/parquet round trips."""

from __future__ import annotations

import json

import pytest

from open_nemotron.data.schema import (
    MALFORMED_REASONS,
    DataSourceError,
    Example,
    MalformedRowError,
    RowReport,
    example_from_row,
    example_to_row,
    load_examples,
    to_messages,
    write_examples,
)
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON


def nvidia_row(**overrides) -> dict:
    """A reasoning-on row as NVIDIA's v1.1 JSONL writes it (input messages, used_in_training a string)."""
    row = {
        "input": [{"role": "user", "content": "What is 2 + 5?"}],
        "output": "<think>\nI need 2 plus 5. 2 + 5 = 7.\n</think>\n\nThe answer is 7.",
        "category": "math",
        "license": "cc-by-4.0",
        "reasoning": "on",
        "generator": "DeepSeek-R1",
        "used_in_training": "Ultra, Super, Nano",
        "version": "v1.1",
        "system_prompt": THINKING_ON,
    }
    row.update(overrides)
    return row


def off_row(**overrides) -> dict:
    row = nvidia_row(
        output="The answer is 7.", reasoning="off", system_prompt=THINKING_OFF, generator="Qwen-2.5-Math-7B-Instruct"
    )
    row.update(overrides)
    return row


def test_nvidia_rows_accepted():
    on = example_from_row(nvidia_row())
    assert on.reasoning == "on" and on.system_prompt == THINKING_ON
    assert on.used_in_training == "Ultra, Super, Nano" and on.version == "v1.1"
    assert on.input == [{"role": "user", "content": "What is 2 + 5?"}]
    off = example_from_row(off_row())
    assert (off.reasoning, off.system_prompt, off.output) == ("off", THINKING_OFF, "The answer is 7.")
    # NeMo-Curator's tutorial row: used_in_training a list, no newlines around the think block.
    curator = example_from_row(
        nvidia_row(
            output="<think>Recall the theorem.</think>The square of the hypotenuse ...",
            used_in_training=["Ultra"],
            license="apache_v2",
            generator="llama-3.3-70b",
            version="v1",
        )
    )
    assert curator.used_in_training == "Ultra" and curator.license == "apache_v2"
    # An empty think block is what LN emits when no reasoning is needed; NVIDIA's data has such rows.
    assert example_from_row(nvidia_row(output="<think>\n\n</think>\n\nHello!")).reasoning == "on"
    # Multi-turn input ending with a user turn.
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2 + 5?"},
    ]
    assert len(example_from_row(nvidia_row(input=turns)).input) == 3


def test_nvidia_v1_string_input_and_eot():
    # The earliest v1 files stored the prompt chat-formatted, system toggle included, and ended output with <|eot_id|>.
    text = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking off<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 5?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    row = {"input": text, "output": "7<|eot_id|>", "category": "math", "generator": "x", "reasoning": "off"}
    ex = example_from_row(row)
    assert ex.input == [{"role": "user", "content": "What is 2 + 5?"}]
    assert (ex.output, ex.system_prompt, ex.license) == ("7", THINKING_OFF, "")
    plain = example_from_row({**row, "input": "What is 2 + 5?"})
    assert plain.input == [{"role": "user", "content": "What is 2 + 5?"}]


def test_system_toggle_inside_input_and_messages_layout():
    row = nvidia_row(input=[{"role": "system", "content": THINKING_ON}, {"role": "user", "content": "Q?"}])
    del row["system_prompt"]
    ex = example_from_row(row)
    assert ex.system_prompt == THINKING_ON and ex.input == [{"role": "user", "content": "Q?"}]
    messages = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."},
        ],
        "reasoning": "off",
        "category": "chat",
        "generator": "g",
        "metadata": '{"uuid": "1"}',
    }
    ex = example_from_row(messages)
    assert (ex.output, ex.system_prompt, ex.metadata) == ("A.", THINKING_OFF, {"uuid": "1"})


def test_on_off_consistency():
    with pytest.raises(MalformedRowError) as e:
        example_from_row(nvidia_row(system_prompt=THINKING_OFF))
    assert e.value.reason == "reasoning_mismatch"
    with pytest.raises(MalformedRowError) as e:
        example_from_row(
            nvidia_row(input=[{"role": "system", "content": THINKING_OFF}, {"role": "user", "content": "Q?"}])
        )
    assert e.value.reason == "reasoning_mismatch"
    # Either field alone determines the other.
    row = nvidia_row()
    del row["system_prompt"]
    assert example_from_row(row).system_prompt == THINKING_ON
    row = off_row()
    del row["reasoning"]
    assert example_from_row(row).reasoning == "off"
    # An off-mode answer must not think; an on-mode answer must.
    with pytest.raises(MalformedRowError, match="think_in_off"):
        example_from_row(off_row(output="<think>x</think>7"))
    with pytest.raises(MalformedRowError, match="missing_think"):
        example_from_row(nvidia_row(output="7"))


# One row per malformed reason (a string is a raw jsonl line).
MALFORMED = {
    "bad_json": '{"input": [',
    "not_a_mapping": "[1, 2]",
    "bad_input": nvidia_row(input=[{"role": "user"}]),
    "bad_role": nvidia_row(
        input=[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Q?"}]
    ),
    "bad_turn_order": nvidia_row(input=[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]),
    "bad_output": nvidia_row(output=""),
    "bad_reasoning": nvidia_row(reasoning="maybe"),
    "bad_system_prompt": nvidia_row(system_prompt="Think hard."),
    "reasoning_mismatch": off_row(system_prompt=THINKING_ON),
    "missing_think": nvidia_row(output="The answer is 7."),
    "bad_think": nvidia_row(output="<think>a</think><think>b</think>7"),
    "empty_answer": nvidia_row(output="<think>\nreasoning\n</think>\n\n"),
    "think_in_off": off_row(output="<think>\nr\n</think>\n\n7"),
    "bad_field": nvidia_row(category=None),
}


def test_every_malformed_reason_is_counted(tmp_path):
    assert set(MALFORMED) == set(MALFORMED_REASONS)
    lines = [json.dumps(nvidia_row()), ""]
    for row in MALFORMED.values():
        lines.append(row if isinstance(row, str) else json.dumps(row))
    lines.append(json.dumps(off_row()))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    examples, report = load_examples(path)
    assert len(examples) == 2
    assert report.total == 2 + len(MALFORMED) and report.kept == 2
    assert report.dropped == {reason: 1 for reason in MALFORMED_REASONS}
    assert set(report.first_error) == set(MALFORMED_REASONS)
    assert "rows.jsonl:3" in report.first_error["bad_json"]
    assert report.summary().startswith(f"kept 2 of {2 + len(MALFORMED)} rows; dropped ")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("Sure. <think>r</think>7", "bad_think"),  # not at the start
        ("<think>never closed", "bad_think"),
        ("r</think>7", "bad_think"),  # no opening tag
        ("<think>a <think>b</think></think>7", "bad_think"),  # nested
        ("7", "missing_think"),
    ],
)
def test_think_block_must_open_the_output(bad, reason):
    with pytest.raises(MalformedRowError) as e:
        example_from_row(nvidia_row(output=bad))
    assert e.value.reason == reason and "\n" not in str(e.value)


def test_round_trip(tmp_path):
    examples = [
        example_from_row(nvidia_row()),
        example_from_row(off_row()),
        Example(
            input=[{"role": "user", "content": "gcd(12, 18)?"}],
            output="<think>\n18 = 1 * 12 + 6\n</think>\n\n6",
            reasoning="on",
            system_prompt=THINKING_ON,
            category="reasoning-gym",
            generator="builtin-solver",
            task="gcd",
            answer="6",
            metadata={"seed": 3, "entry": {"answer": "6"}},
        ),
    ]
    path = tmp_path / "out" / "data.jsonl"
    write_examples(path, examples)
    loaded, report = load_examples(path)
    assert loaded == examples
    assert report == RowReport(total=3, kept=3)
    assert json.loads(path.read_text().splitlines()[2]) == example_to_row(examples[2])


def test_write_refuses_invalid_examples(tmp_path):
    bad = example_from_row(nvidia_row())
    bad.reasoning = "off"
    path = tmp_path / "never.jsonl"
    with pytest.raises(MalformedRowError, match="example 0"):
        write_examples(path, [bad])
    assert not path.exists()


def test_parquet_and_folder_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [nvidia_row(), off_row(), nvidia_row(output="no think")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.jsonl").write_text(json.dumps(off_row()) + "\n")
    examples, report = load_examples(tmp_path / "part-0.parquet")
    assert [e.reasoning for e in examples] == ["on", "off"]
    assert report.dropped == {"missing_think": 1}
    examples, report = load_examples(tmp_path)
    assert (report.total, report.kept) == (4, 3)
    examples, report = load_examples(tmp_path, limit=2)
    assert report.total == 2


def test_to_messages():
    ex = example_from_row(nvidia_row())
    assert to_messages(ex) == [
        {"role": "system", "content": THINKING_ON},
        {"role": "user", "content": "What is 2 + 5?"},
        {"role": "assistant", "content": ex.output},
    ]


def test_unreadable_sources_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(DataSourceError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(DataSourceError, match="expected a .jsonl"):
        load_examples("not a source")
    # A hub id that is not cached, with the hub offline: a clear one-line error, no traceback from datasets.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    with pytest.raises(DataSourceError) as e:
        load_examples("open-nemotron-tests/no-such-dataset")
    assert "\n" not in str(e.value) and "no-such-dataset" in str(e.value)
