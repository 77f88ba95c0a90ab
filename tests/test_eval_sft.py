"""The on/off evaluation harness and SFT, end to end on tiny models (the real runs live in bench/ and recipes/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models_for_tests import save_tiny_llama

from open_nemotron.data.schema import Example, write_examples
from open_nemotron.evaluate.reasoning_eval import EvalConfig, bootstrap_interval
from open_nemotron.evaluate.reasoning_eval import run as run_eval
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON
from open_nemotron.rewards.format import is_toggle_compliant
from open_nemotron.train.sft import SFTRunConfig, latest_checkpoint, mix_on_off
from open_nemotron.train.sft import run as run_sft


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "parent", seed=4)


@pytest.fixture(scope="module")
def math_suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "suite.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("text", "thinking", "ok"),
    [
        ("<think>\n2+2=4\n</think>\n\nThe answer is 4.", True, True),
        ("  <think></think>4", True, True),  # an empty think block is allowed (model card)
        ("<think>a</think><think>b</think> 4", True, False),
        ("<think>never closed", True, False),
        ("<think>x</think>   ", True, False),  # no answer
        ("4", True, False),
        ("The answer is 4.", False, True),
        ("<think>x</think> 4", False, False),
        ("", False, False),
    ],
)
def test_toggle_compliance(text, thinking, ok):
    assert is_toggle_compliant(text, thinking) is ok


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    a = bootstrap_interval(values, 500, seed=3)
    assert a == bootstrap_interval(values, 500, seed=3)
    assert a[0] <= values.mean() <= a[1]


def test_eval_reports_every_field_and_is_deterministic(tiny_parent, math_suite, tmp_path):
    def once(name: str) -> dict:
        config = EvalConfig(
            models=[str(tiny_parent)],
            suite=str(math_suite),
            samples=2,
            max_new_tokens_on=6,
            max_new_tokens_off=4,
            batch_size=3,
            bootstrap=200,
            seed=7,
            json_out=str(tmp_path / name),
        )
        return run_eval(config, progress=False)

    first, second = once("a.json"), once("b.json")
    assert first["models"] == second["models"]
    modes = first["models"][str(tiny_parent)]
    for mode in ("on", "off"):
        for key in ("accuracy", "ci95", "compliance", "mean_tokens", "n_prompts"):
            assert key in modes[mode]
        assert modes[mode]["n_prompts"] == 4
    assert modes["on"]["samples_per_prompt"] == 2 and modes["off"]["samples_per_prompt"] == 1
    assert "on_minus_off" in modes
    assert (tmp_path / "a.md").read_text().startswith("# eval")
    records = (tmp_path / "a.samples.jsonl").read_text().splitlines()
    assert len(records) == 4 * 2 + 4


def _examples(n: int) -> list[Example]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        question = [{"role": "user", "content": f"What is {a} + {b}?"}]
        rows.append(
            Example(
                input=question,
                output=f"<think>\n{a} plus {b} is {a + b}.\n</think>\n\nThe answer is {a + b}.",
                reasoning="on",
                system_prompt=THINKING_ON,
                category="math",
                generator="test",
                answer=str(a + b),
            )
        )
        rows.append(
            Example(
                input=question,
                output=f"The answer is {a + b}.",
                reasoning="off",
                system_prompt=THINKING_OFF,
                category="math",
                generator="test",
                answer=str(a + b),
            )
        )
    return rows


def test_mix_on_off_hits_the_fraction():
    mixed = mix_on_off(_examples(20), 0.25, seed=0)
    on = sum(e.reasoning == "on" for e in mixed)
    assert on / len(mixed) == pytest.approx(0.25, abs=0.03)


def test_sft_trains_saves_and_resumes(tiny_parent, tmp_path):
    data = tmp_path / "data.jsonl"
    write_examples(data, _examples(6))
    out = tmp_path / "sft"
    config = dict(
        model=str(tiny_parent),
        data=str(data),
        output_dir=str(out),
        batch_size=4,
        max_length=96,
        save_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
    )
    first = run_sft(SFTRunConfig(max_steps=2, **config))
    assert first["steps"] == 2 and first["resumed_from"] is None
    assert first["last_loss"] is not None
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "additional_chat_templates" / "training.jinja").is_file()
    assert latest_checkpoint(out).name == "checkpoint-2"
    second = run_sft(SFTRunConfig(max_steps=3, **config))  # picks up checkpoint-2, trains one more step
    assert second["resumed_from"].endswith("checkpoint-2") and second["steps"] == 3
