"""`eval-mc`: lm-evaluation-harness's log-likelihood multiple choice, checked against direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from models_for_tests import heterogeneous_config, no_gqa_decilm, random_decilm, random_llama, tiny_llama_config
from tokenizers_for_tests import chatml_tokenizer

from open_nemotron.evaluate.multiple_choice import (
    MCItem,
    MultipleChoiceError,
    choice_logprobs,
    continuation_tokens,
    load_task,
    mean_stderr,
    score_items,
)

SAMPLE = Path(__file__).parent / "data" / "mc_sample.jsonl"


def _direct_logprob(model, tokenizer, query: str, choice: str) -> float:
    """log P(" " + choice | query) from one full forward pass over query + continuation, no cache."""
    context = tokenizer.encode(query.rstrip(" "), add_special_tokens=False)
    whole = tokenizer.encode(query + " " + choice, add_special_tokens=False)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))


@pytest.mark.parametrize("kind", ["ours", "llama", "no-gqa"])
def test_choice_logprobs_equal_one_full_pass_per_choice(kind):
    makers = {
        "ours": lambda: random_decilm(heterogeneous_config(), seed=2),
        "llama": lambda: random_llama(tiny_llama_config()),
        "no-gqa": lambda: no_gqa_decilm(seed=2),
    }
    model = makers[kind]()
    tok = chatml_tokenizer()
    _, items = load_task(SAMPLE)
    for item in items:
        got = choice_logprobs(model, tok, item)
        want = [_direct_logprob(model, tok, item.query, c) for c in item.choices]
        assert got == pytest.approx(want, abs=1e-4)


def test_scores_by_hand():
    """Two items; in the second the raw sums prefer the long wrong choice and per-byte normalisation the gold one."""
    items = [MCItem("q1", ("a", "bb"), 0), MCItem("q2", ("yes", "no, certainly not"), 0)]
    logprobs = [[-1.0, -3.0], [-8.0, -6.0]]
    # item 2: acc picks choice 1 (-6 > -8): wrong; acc_norm: -8/4 = -2.0 vs -6/18 = -0.33: still choice 1, wrong.
    got = score_items(logprobs, items)
    assert got["acc"] == 0.5 and got["acc_norm"] == 0.5 and got["n"] == 2
    assert got["acc_stderr"] == pytest.approx(math.sqrt(0.5 / 2))  # var (ddof 1) of [1, 0] is 0.5
    logprobs = [[-1.0, -3.0], [-3.0, -6.0 * 18 / 2]]
    # now item 2: raw -3 > -54 (gold); normalised -0.75 vs -3.0 (gold): both right.
    assert score_items(logprobs, items)["acc_norm"] == 1.0
    items = [MCItem("q", ("x", "a much longer answer"), 1)]
    # raw sums prefer "x" (-2 > -5), per byte the long answer (-5/21 = -0.24 > -2/2 = -1): acc 0, acc_norm 1.
    got = score_items([[-2.0, -5.0]], items)
    assert (got["acc"], got["acc_norm"]) == (0.0, 1.0)
    assert mean_stderr([1.0, 1.0, 0.0, 0.0]) == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_context_trailing_spaces_move_to_the_continuation():
    tok = chatml_tokenizer()  # byte-level: one token per byte
    context, continuation = continuation_tokens(tok, "is ", " cold")
    assert tok.decode(context) == "is" and tok.decode(continuation) == "  cold"


@pytest.mark.parametrize(
    "row, message",
    [
        ("not json", "not valid JSON"),
        ('{"query": "", "choices": ["a", "b"], "gold": 0}', "query = ''"),
        ('{"query": "q", "choices": ["a"], "gold": 0}', "2 or more"),
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold = 2: expected an index into choices (0..1)"),
        ('{"query": "q", "choices": ["a", "b"], "gold": true}', "gold = True"),
    ],
)
def test_bad_rows_name_the_line_and_field(tmp_path, row, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n' + row + "\n")
    with pytest.raises(MultipleChoiceError, match="task.jsonl:2") as info:
        load_task(path)
    assert message in str(info.value)


def test_eval_mc_cli_table_and_retention(tmp_path):
    """Two models through the CLI: per-task acc / acc_norm from the harness functions, retention = avg acc_norm ratio."""
    from models_for_tests import save_tiny_llama
    from typer.testing import CliRunner

    from open_nemotron.cli import app

    a = save_tiny_llama(tmp_path / "a", seed=0)
    b = save_tiny_llama(tmp_path / "b", seed=1)
    second = tmp_path / "second.jsonl"
    second.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + SAMPLE.read_text().splitlines()[3] + "\n")
    out = tmp_path / "mc.json"
    result = CliRunner().invoke(
        app, ["eval-mc", str(a), str(b), "--tasks", f"{SAMPLE},{second}", "--limit", "4", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["tasks"] == {"mc_sample": 4, "second": 2}
    from open_nemotron.model.loading import load_model

    tok = chatml_tokenizer()
    for path in (a, b):
        model = load_model(path, device="cpu")
        for name, task in (("mc_sample", SAMPLE), ("second", second)):
            _, items = load_task(task, 4)
            want = score_items([choice_logprobs(model, tok, item) for item in items], items)
            assert saved["models"][str(path)]["tasks"][name] == pytest.approx(want, nan_ok=True)
    first, other = saved["models"][str(a)], saved["models"][str(b)]
    assert first["retention"] == 1.0
    assert other["retention"] == pytest.approx(other["avg_acc_norm"] / first["avg_acc_norm"])
    assert "retention" in (tmp_path / "mc.md").read_text()
