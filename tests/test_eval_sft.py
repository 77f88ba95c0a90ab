"""The on/off evaluation harness and SFT, end to end on tiny models (the real runs live in bench/ and recipes/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models_for_tests import assert_local_model_card, save_tiny_llama

from open_nemotron.data.schema import Example, write_examples
from open_nemotron.evaluate.reasoning_eval import EvalConfig, bootstrap_interval
from open_nemotron.evaluate.reasoning_eval import render_markdown as render_eval_markdown
from open_nemotron.evaluate.reasoning_eval import run as run_eval
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON
from open_nemotron.rewards.format import is_toggle_compliant
from open_nemotron.train.sft import SFTRunConfig, build_trainer, latest_checkpoint, mix_on_off
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
    assert_local_model_card(out, tiny_parent, "SFTTrainer")
    assert first["last_loss"] is not None
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "additional_chat_templates" / "training.jinja").is_file()
    assert latest_checkpoint(out).name == "checkpoint-2"
    second = run_sft(SFTRunConfig(max_steps=3, **config))  # picks up checkpoint-2, trains one more step
    assert second["resumed_from"].endswith("checkpoint-2") and second["steps"] == 3


# Scripted outputs for the four prompts of `math_suite` (gold 3, 7, 11, 15): per mode, one list per sample.
#   prompt 1: on right/right (compliant both),     off right (compliant)
#   prompt 2: on right/wrong (compliant both),     off wrong (compliant)
#   prompt 3: on right/right (neither compliant),  off right (not compliant: tags in off)
#   prompt 4: on no answer/right (2nd compliant),  off wrong (compliant)
SCRIPT = {
    True: [
        [
            "<think>1+2</think>\\boxed{3}",
            "<think>3+4</think>\\boxed{7}",
            "\\boxed{11}",
            "<think>never closed \\boxed{15}",
        ],
        [
            "<think>\n1+2=3\n</think>\n\nThe answer is 3.",
            "<think>3+4</think>\\boxed{8}",
            "<think>a</think><think>b</think>\\boxed{11}",
            "  <think></think>\\boxed{15}",
        ],
    ],
    False: [["\\boxed{3}", "The answer is 6.", "<think>x</think>\\boxed{11}", "\\boxed{14}"]],
}
EXPECTED = {
    "on": {"accuracy": (1 + 0.5 + 1 + 0.5) / 4, "compliance": 5 / 8, "per_prompt": [1, 0.5, 1, 0.5]},
    "off": {"accuracy": 2 / 4, "compliance": 3 / 4, "per_prompt": [1, 0, 1, 0]},
}


def test_eval_against_a_scripted_model(tiny_parent, math_suite, tmp_path, monkeypatch):
    """Accuracy, compliance, tokens, the paired on-minus-off and the records, computed by hand for scripted outputs."""
    import shutil

    from open_nemotron.model import chat

    perfect = shutil.copytree(tiny_parent, tmp_path / "perfect")  # a second model: right and compliant everywhere
    calls = []

    def scripted(model, tokenizer, conversations, **kw):
        thinking = kw["thinking"]
        keys = ("thinking", "max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")
        calls.append((model.name_or_path, *(kw[k] for k in keys), kw["reasoning_budget"], len(conversations)))
        assert kw["padded"] is False
        # All K samples of the four prompts in one call: row s * 4 + i is sample s of prompt i.
        questions = [c[0]["content"] for c in conversations]
        assert questions[0].startswith("What is 1 + 2?") and questions == questions[:4] * (len(questions) // 4)
        if model.name_or_path == str(perfect):
            gold = [3, 7, 11, 15] * (len(questions) // 4)
            return [f"<think>ok</think>\\boxed{{{g}}}" if thinking else f"\\boxed{{{g}}}" for g in gold]
        return [text for sample in SCRIPT[thinking] for text in sample]

    monkeypatch.setattr(chat, "generate_chat", scripted)
    config = EvalConfig(
        models=[str(tiny_parent), str(perfect)],
        suite=str(math_suite),
        samples=2,
        max_new_tokens_on=50,
        max_new_tokens_off=20,
        batch_size=3,
        bootstrap=300,
        seed=7,
        reasoning_budget=12,
        json_out=str(tmp_path / "eval.json"),
    )
    result = run_eval(config, progress=False)

    # On: K=2 samples of each prompt at temperature 0.6 / top-p 0.95 under the think budget, in one engine run
    # seeded 7 (each row its own generator); off: one greedy pass, no budget.
    assert [c for c in calls if c[0] == str(tiny_parent)] == [
        (str(tiny_parent), True, 50, True, 0.6, 0.95, 7, 3, 12, 8),
        (str(tiny_parent), False, 20, False, None, None, 7, 3, None, 4),
    ]
    scripted_model = result["models"][str(tiny_parent)]
    for mode, thinking in (("on", True), ("off", False)):
        got, want = scripted_model[mode], EXPECTED[mode]
        assert got["accuracy"] == pytest.approx(want["accuracy"])
        assert got["compliance"] == pytest.approx(want["compliance"])
        assert got["n_prompts"] == 4 and got["samples_per_prompt"] == (2 if thinking else 1)
        # The test tokenizer is byte-level (one token per byte, `<think>` included).
        texts = [t for sample in SCRIPT[thinking] for t in sample]
        assert got["mean_tokens"] == pytest.approx(np.mean([len(t.encode()) for t in texts]))
        assert got["ci95"] == pytest.approx(bootstrap_interval(np.array(want["per_prompt"], float), 300, 7))
        # One task in this suite: its per-task accuracy is the mean over its prompts, i.e. the accuracy.
        assert list(got["per_task"].values()) == pytest.approx([np.mean(want["per_prompt"])])
    paired = np.array(EXPECTED["on"]["per_prompt"], float) - np.array(EXPECTED["off"]["per_prompt"], float)
    assert scripted_model["on_minus_off"]["difference"] == pytest.approx(0.25)
    assert scripted_model["on_minus_off"]["ci95"] == pytest.approx(bootstrap_interval(paired, 300, 7))

    best = result["models"][str(perfect)]
    assert (best["on"]["accuracy"], best["on"]["compliance"], best["off"]["accuracy"], best["off"]["compliance"]) == (
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert best["on_minus_off"] == {"difference": 0.0, "ci95": (0.0, 0.0)}
    # Paired against the first model over the same prompts (what an RL-vs-SFT claim needs).
    for mode in ("on", "off"):
        diff = 1.0 - np.array(EXPECTED[mode]["per_prompt"], float)
        assert best["minus_first"][mode]["difference"] == pytest.approx(diff.mean())
        assert best["minus_first"][mode]["ci95"] == pytest.approx(bootstrap_interval(diff, 300, 7))
    assert "minus_first" not in scripted_model

    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["models"][str(tiny_parent)]["on"]["accuracy"] == pytest.approx(0.75)
    records = [json.loads(line) for line in (tmp_path / "eval.samples.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["model"] == str(tiny_parent)]
    assert len(mine) == 4 * 2 + 4 and len(records) == 2 * 12
    on0 = [r for r in mine if r["mode"] == "on" and r["sample"] == 0]
    assert [(r["gold"], r["correct"], r["compliant"]) for r in on0] == [
        ("3", True, True),
        ("7", True, True),
        ("11", True, False),
        ("15", False, False),
    ]
    assert [r["output"] for r in mine if r["mode"] == "off"] == SCRIPT[False][0]
    table = (tmp_path / "eval.md").read_text()
    assert f"| {tiny_parent} | on | 0.750 |" in table and f"| {tiny_parent} | off | 0.500 |" in table
    assert f"| {tiny_parent} | on - off | +0.250 |" in table


def _chatml_spans(messages: list[dict]) -> tuple[str, str, str]:
    """``(prompt, assistant target, rest)`` of a [system, user, assistant] conversation in ChatML, written out by
    hand: the loss must cover exactly the assistant's content and its end-of-turn token."""
    system, user, assistant = messages
    prompt = (
        f"<|im_start|>system\n{system['content']}<|im_end|>\n<|im_start|>user\n{user['content']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return prompt, assistant["content"] + "<|im_end|>", "\n"


def test_sft_labels_cover_exactly_the_assistant_tokens(tiny_parent, tmp_path):
    import torch
    import torch.nn.functional as F

    data = tmp_path / "data.jsonl"
    write_examples(data, _examples(3))
    config = SFTRunConfig(model=str(tiny_parent), data=str(data), output_dir=str(tmp_path / "o"), max_length=512)
    trainer, _, examples, _ = build_trainer(config)
    tokenizer = trainer.processing_class

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) == len(examples) == 6
    expected_ids, expected_labels = [], []
    for row in rows:
        prompt, target, rest = _chatml_spans(row["messages"])
        ids = encode(prompt) + encode(target) + encode(rest)
        labels = [-100] * len(encode(prompt)) + encode(target) + [-100] * len(encode(rest))
        assert row["input_ids"] == ids
        assert row["labels"] == labels
        assert tokenizer.decode([t for t in labels if t != -100]) == target  # what the loss is taken on
        expected_ids.append(ids)
        expected_labels.append(labels)

    # The collated batch: padding is never a target either.
    batch = trainer.data_collator(rows)
    width = batch["input_ids"].shape[1]
    assert width == max(len(ids) for ids in expected_ids)
    padded = torch.tensor([labels + [-100] * (width - len(labels)) for labels in expected_labels])
    assert torch.equal(batch["labels"], padded)
    for i, ids in enumerate(expected_ids):
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (width - len(ids))

    # The trainer's loss is the mean next-token cross-entropy over those positions only.
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, {k: v.to(model.device) for k, v in batch.items()})
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), padded[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, reference)


def test_sft_loss_falls(tiny_parent, tmp_path):
    data = tmp_path / "data.jsonl"
    write_examples(data, _examples(4))
    summary = run_sft(
        SFTRunConfig(
            model=str(tiny_parent),
            data=str(data),
            output_dir=str(tmp_path / "sft"),
            max_steps=8,
            batch_size=4,
            max_length=256,
            learning_rate=3e-3,
            warmup_ratio=0.0,
            logging_steps=1,
            save_steps=100,
        )
    )
    log = json.loads((tmp_path / "sft" / "sft_log.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 8 and summary["first_loss"] == losses[0] and summary["last_loss"] == losses[-1]
    # A random model starts near ln(vocab) = ln(259) = 5.56 nats; eight steps on these rows must take a good bite
    # (5.54 -> 4.45 today; deterministic on CPU).
    assert losses[0] > 5.0
    assert losses[-1] < losses[0] - 0.7 and losses[-1] < min(losses[:3])


class _Killed(Exception):
    pass


def test_sft_resume_matches_an_uninterrupted_run(tiny_parent, tmp_path):
    """Killed right after checkpoint-2 and rerun, training ends where an uninterrupted run ends: same weights and
    the same optimiser state at step 4 (a resume that lost the Adam moments or the schedule would not)."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Killed(state.global_step)

    data = tmp_path / "data.jsonl"
    write_examples(data, _examples(6))

    def config(name: str) -> SFTRunConfig:
        return SFTRunConfig(
            model=str(tiny_parent),
            data=str(data),
            output_dir=str(tmp_path / name),
            max_steps=4,
            batch_size=4,
            max_length=128,
            save_steps=2,
            logging_steps=1,
            learning_rate=3e-3,
        )

    straight = run_sft(config("straight"))
    with pytest.raises(_Killed):
        run_sft(config("killed"), callbacks=[KillAfterFirstCheckpoint()])
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-2"
    assert not (tmp_path / "killed" / "final").exists()
    resumed = run_sft(config("killed"))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == straight["steps"] == 4

    for name in ("straight", "killed"):
        assert latest_checkpoint(tmp_path / name).name == "checkpoint-4"
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    opt_a = torch.load(tmp_path / "straight" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "killed" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, state in opt_a["state"].items():
        assert state["step"] == opt_b["state"][index]["step"] == 4
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[moment], opt_b["state"][index][moment], rtol=1e-5, atol=1e-8)
    assert [g["lr"] for g in opt_a["param_groups"]] == pytest.approx([g["lr"] for g in opt_b["param_groups"]])
    # The resumed run logs steps 3 and 4 only, with the uninterrupted run's losses.
    log_a = {
        h["step"]: h["loss"] for h in json.loads((tmp_path / "straight" / "sft_log.json").read_text()) if "loss" in h
    }
    log_b = {
        h["step"]: h["loss"] for h in json.loads((tmp_path / "killed" / "sft_log.json").read_text()) if "loss" in h
    }
    assert log_a.keys() == {1, 2, 3, 4}
    assert {s: log_b[s] for s in (3, 4)} == pytest.approx({s: log_a[s] for s in (3, 4)}, rel=1e-5)


def test_eval_on_an_ifeval_format_suite_reports_the_four_accuracies_per_mode(tiny_parent, tmp_path, monkeypatch):
    """`eval --suite` with IFEval rows: accuracy = prompt-level strict, the four IFEval numbers from our checks
    (equal to lm-eval's, tests/test_rl_rewards.py), reasoning on judged on the answer after </think>."""
    from open_nemotron.model import chat
    from open_nemotron.rewards.instructions import IFExample, accuracies, check_response

    rows = [
        {"key": 1, "prompt": "Write about tea.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {
            "key": 2,
            "prompt": "Write about rain.",
            "instruction_id_list": ["startend:end_checker", "punctuation:no_comma"],
            "kwargs": [{"end_phrase": "Bye."}, {}],
        },
    ]
    suite = tmp_path / "ifeval_mini.jsonl"
    suite.write_text("\n".join(json.dumps(r) for r in rows))
    replies = {
        False: ["Tea is good.", "Rain, rain. Bye."],
        True: ["<think>a, b</think>Tea is good.", "<think>x</think>Rain falls. Bye."],
    }

    def scripted(model, tokenizer, conversations, **kw):
        assert [c[0]["content"] for c in conversations][:2] == ["Write about tea.", "Write about rain."]
        return replies[kw["thinking"]] * (len(conversations) // 2)

    monkeypatch.setattr(chat, "generate_chat", scripted)
    result = run_eval(EvalConfig(models=[str(tiny_parent)], suite=str(suite), samples=1, bootstrap=50), progress=False)
    modes = result["models"][str(tiny_parent)]
    examples = [IFExample(r["prompt"], r["instruction_id_list"], r["kwargs"], r["key"]) for r in rows]
    for mode, thinking in (("on", True), ("off", False)):
        expected = accuracies(
            [check_response(e, t, thinking) for e, t in zip(examples, replies[thinking], strict=True)]
        )
        assert modes[mode]["ifeval"] == expected
        assert modes[mode]["accuracy"] == pytest.approx(expected["prompt_level_strict_acc"])
    assert modes["off"]["ifeval"]["prompt_level_strict_acc"] == 0.5 and modes["on"]["accuracy"] == 1.0
    assert "IFEval accuracies" in render_eval_markdown(result)
