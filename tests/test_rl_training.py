"""RL data, pass-rate curriculum and the GRPO / RLOO stage on TRL (tiny random models)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from models_for_tests import assert_local_model_card, save_tiny_llama, tiny_llama_config

from open_nemotron.train.curriculum import (
    CurriculumError,
    curriculum_batches,
    curriculum_sampler_class,
    random_batches,
)
from open_nemotron.train.rl_data import RLDataError, instruction_rows, load_rows, save_rows, task_rows


def _rates(n_per_bucket: dict[float, int]) -> list[float]:
    return [r for r, n in n_per_bucket.items() for _ in range(n)]


def test_curriculum_moves_from_easy_to_hard_without_repeats() -> None:
    """Equal supplies per bucket: the first batches are drawn from the easy end, the middle ones from the hard end;
    the last few hold what the target left over (the target is limited by what remains, as the paper says)."""
    rates = _rates({0.0: 24, 0.125: 24, 0.25: 24, 0.5: 24, 0.625: 24})
    batches = curriculum_batches(rates, 8, sigma=0.1, seed=0)
    assert len(batches) == len(rates) // 8 and all(len(b) == 8 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # never a prompt twice in an epoch
    means = [statistics.mean(rates[i] for i in b) for b in batches]
    assert min(means[:4]) > 0.45 and max(means[6:12]) < 0.25
    assert statistics.mean(means[:5]) > statistics.mean(means[5:]) + 0.2


def test_curriculum_respects_bucket_supplies_and_tops_up_from_the_fullest() -> None:
    # The easy bucket has 3 prompts only: the first batch's target wants mostly easy ones and must top up.
    rates = _rates({1.0: 3, 0.5: 30, 0.0: 7})
    batches = curriculum_batches(rates, 8, sigma=0.05, seed=1)
    first = [rates[i] for i in batches[0]]
    assert first.count(1.0) == 3 and first.count(0.5) == 5  # all of the easy bucket, then the fullest
    counts = {r: sum(rates[i] == r for b in batches for i in b) for r in (1.0, 0.5, 0.0)}
    assert counts[1.0] <= 3 and counts[0.0] <= 7 and sum(counts.values()) == 40
    # The hard prompts come only once the centre has moved past the middle (the last two of five batches).
    assert counts[0.0] == 7 and all(rates[i] != 0.0 for b in batches[:3] for i in b)


def test_curriculum_is_deterministic_per_seed_and_refuses_bad_input() -> None:
    rates = _rates({0.0: 10, 0.5: 10, 1.0: 12})
    assert curriculum_batches(rates, 4, seed=3) == curriculum_batches(rates, 4, seed=3)
    assert curriculum_batches(rates, 4, seed=3) != curriculum_batches(rates, 4, seed=4)
    assert sorted(i for b in random_batches(32, 4, seed=0) for i in b) == list(range(32))
    with pytest.raises(CurriculumError, match="pass rate of prompt 1"):
        curriculum_batches([0.5, 1.5], 1)
    with pytest.raises(CurriculumError, match="at least one batch"):
        curriculum_batches([0.5], 2)


def test_curriculum_sampler_keeps_trls_grouping_and_orders_by_epoch() -> None:
    rates = _rates({0.0: 4, 0.5: 4, 1.0: 4})
    sampler = curriculum_sampler_class()(list(range(12)), rates, mini_repeat_count=3, batch_size=4, repeat_count=2)
    order = list(sampler)
    assert len(order) == 12 * 3 * 2 == len(sampler)
    batches = sampler.batches()
    # Each prompt's group of 3 samples together, each generation batch twice (updates per rollout).
    expected = [i for chunk in batches for _ in range(2) for i in chunk for _ in range(3)]
    assert order == expected
    assert statistics.mean(rates[i] for i in batches[0]) > statistics.mean(rates[i] for i in batches[-1])
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    sampler.set_epoch(0)
    assert sampler.batches() == batches  # a function of (seed, epoch) only: what a resumed run needs
    random_order = curriculum_sampler_class()(list(range(12)), None, mini_repeat_count=1, batch_size=4)
    assert sorted(random_order) == list(range(12))


def test_task_rows_mix_modes_use_training_seeds_and_drop_heldout_overlaps(monkeypatch) -> None:
    rows, dropped = task_rows(["chain_sum", "gcd"], 10, seed=0, on_fraction=0.5)
    assert len(rows) + dropped == 20 and sum(r["thinking"] for r in rows) == round(len(rows) * 0.5)
    for r in rows:
        system = r["prompt"][0]["content"]
        assert system == ("detailed thinking on" if r["thinking"] else "detailed thinking off")
        assert json.loads(r["entry"]) and r["instruction_id_list"] == []
    # A held-out suite that contains our training items: every one of them is dropped.
    from open_nemotron.data import tasks

    monkeypatch.setattr(tasks, "heldout_suite", lambda: tasks.make_items("chain_sum", 10, seed=0))
    rows, dropped = task_rows(["chain_sum"], 10, seed=0)
    assert rows == [] and dropped == 10


def test_instruction_rows_refuse_an_eval_suites_prompts(tmp_path) -> None:
    rows = instruction_rows(6, seed=2)
    assert all(
        r["task"] == "" and r["instruction_id_list"] and r["if_prompt"] in r["prompt"][1]["content"] for r in rows
    )
    suite = tmp_path / "ifeval.jsonl"
    suite.write_text(
        json.dumps({"key": 1, "prompt": rows[0]["if_prompt"], "instruction_id_list": [], "kwargs": []}) + "\n"
    )
    from open_nemotron.rewards.instructions import InstructionError

    with pytest.raises(InstructionError, match="eval suite"):
        instruction_rows(6, seed=2, exclude_suites=[suite])


def test_load_rows_checks_columns_ids_and_pass_rates(tmp_path) -> None:
    rows, _ = task_rows(["chain_sum"], 3, seed=0)
    path = save_rows(tmp_path / "p.jsonl", rows)
    assert load_rows(path) == rows
    save_rows(path, [rows[0], rows[0]])
    with pytest.raises(RLDataError, match="appears twice"):
        load_rows(path)
    save_rows(path, [{k: v for k, v in rows[0].items() if k != "answer"}])
    with pytest.raises(RLDataError, match="missing answer"):
        load_rows(path)
    save_rows(path, [{**rows[0], "pass_rate": 2}])
    with pytest.raises(RLDataError, match="pass_rate"):
        load_rows(path)


# ------------------------------------------------------------------------------------------ GRPO / RLOO stage


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from open_nemotron.model.loading import convert

    base = save_tiny_llama(tmp_path_factory.mktemp("llama") / "m", tiny_llama_config(num_hidden_layers=2))
    return convert(base, tmp_path_factory.mktemp("policy") / "ours", non_portable_ffn_widths=True)


def _prompts(tmp_path, n: int = 4, pass_rates: bool = True):
    rows, _ = task_rows(["chain_sum"], n, seed=0)
    if pass_rates:
        rows = [{**r, "pass_rate": [0.0, 0.25, 0.5, 0.75][i % 4]} for i, r in enumerate(rows)]
    return save_rows(tmp_path / "prompts.jsonl", rows)


def _config(policy, prompts, out, **overrides):
    from open_nemotron.train.rl import RLConfig

    kwargs = dict(
        model=str(policy),
        prompts=str(prompts),
        output_dir=str(out),
        num_generations=2,
        prompts_per_step=2,
        max_completion_length=6,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-3,
        device="cpu",
    )
    kwargs.update(overrides)
    return RLConfig(**kwargs)


class _Killed(Exception):
    pass


def test_grpo_trains_logs_each_reward_and_a_killed_run_resumes_to_the_same_weights(
    policy, tmp_path, monkeypatch
) -> None:
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from open_nemotron.model import generation
    from open_nemotron.train.rl import run
    from open_nemotron.train.sft import latest_checkpoint

    # TRL's rollouts go through our static-cache decode loop (the CPU fast path), not transformers' generate.
    decode_calls = []
    real_decode = generation.decode
    monkeypatch.setattr(generation, "decode", lambda *a, **k: decode_calls.append(1) or real_decode(*a, **k))

    class KillAtFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Killed(state.global_step)

    prompts = _prompts(tmp_path)
    straight = run(_config(policy, prompts, tmp_path / "straight"))
    assert straight["steps"] == 4 and len(decode_calls) >= 2
    logged = {k for h in straight["log_history"] for k in h}
    assert {"rewards/accuracy/mean", "rewards/format/mean", "reward"} <= logged
    assert (tmp_path / "straight" / "rl_curves.png").stat().st_size > 0
    assert_local_model_card(tmp_path / "straight", policy, "GRPOTrainer")

    from open_nemotron.train import rl

    killed = _config(policy, prompts, tmp_path / "killed")
    trainer, _ = rl.build_trainer(killed, callbacks=[KillAtFirstCheckpoint()])
    with pytest.raises(_Killed):
        trainer.train()
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-2"
    resumed = run(killed)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_grpo_curriculum_needs_pass_rates_and_rloo_runs(policy, tmp_path) -> None:
    from open_nemotron.train.rl import RLError, run

    no_rates = _prompts(tmp_path, pass_rates=False)
    with pytest.raises(RLError, match="pass rates"):
        run(_config(policy, no_rates, tmp_path / "g"))
    result = run(_config(policy, no_rates, tmp_path / "r", algorithm="rloo", max_steps=2, curriculum=False))
    assert result["steps"] == 2 and (tmp_path / "r" / "final" / "config.json").is_file()
    # beta > 0: TRL builds the frozen reference from our checkpoint and logs the KL.
    with_kl = run(_config(policy, _prompts(tmp_path), tmp_path / "kl", max_steps=2, beta=0.1))
    assert any("kl" in h for h in with_kl["log_history"])
    with pytest.raises(RLError, match="at least 2"):
        _config(policy, no_rates, tmp_path / "x", num_generations=1)


def test_rollout_temperature_reaches_trls_sampling_and_both_models_log_probs(policy, tmp_path) -> None:
    # The rollouts sample at T and the policy gradient needs log-probs of the same tempered distribution, for the
    # policy and for the frozen reference (beta > 0): all three must read the config's one temperature.
    from open_nemotron.train import rl

    trainer, _ = rl.build_trainer(_config(policy, _prompts(tmp_path), tmp_path / "t", temperature=0.6, beta=0.1))
    assert trainer.args.temperature == 0.6 and trainer.args.top_p == 1.0
    ids = torch.tensor([[3, 17, 5, 9, 30, 2]])
    for model in (trainer.model, trainer.ref_model):
        with torch.no_grad():
            logits = type(model).forward(model, input_ids=ids).logits[:, :-1]
            out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        expected = torch.log_softmax(logits.float() / 0.6, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(out.log_probs, expected, rtol=1e-5, atol=1e-6)


def test_pass_rate_counts_full_rewards_filters_and_resumes(policy, tmp_path, monkeypatch) -> None:
    """Scripted samples: row 0 right 2 of 4 times, row 1 always, row 2 never, the IF row follows its instruction
    once; pass rates, the >= 0.75 filter (and --drop-unsolved), and a resume after a lost chunk."""
    from open_nemotron.model import chat
    from open_nemotron.train.pass_rate import PassRateConfig, run

    rows, _ = task_rows(["chain_sum"], 3, seed=0)
    rows = [
        {**r, "thinking": False, "prompt": [r["prompt"][0] | {"content": "detailed thinking off"}, r["prompt"][1]]}
        for r in rows
    ]
    if_row = {**instruction_rows(1, seed=0)[0], "thinking": False}
    if_row.update(if_prompt="p", instruction_id_list=["punctuation:no_comma"], instruction_kwargs="[{}]")
    prompts = save_rows(tmp_path / "p.jsonl", [*rows, if_row])
    answers = {r["prompt"][1]["content"]: r["answer"] for r in rows}
    script = {0: [True, False, True, False], 1: [True] * 4, 2: [False] * 4}
    calls = []

    def scripted(model, tokenizer, conversations, **kw):
        calls.append(len(conversations))
        out, seen = [], {}
        for c in conversations:
            text = c[1]["content"]
            k = seen[text] = seen.get(text, -1) + 1
            if text in answers:
                i = list(answers).index(text)
                out.append(f"The answer is {answers[text] if script[i][k] else 'unknown'}.")
            else:
                out.append("No commas here." if k == 0 else "A, b, c.")
        return out

    monkeypatch.setattr(chat, "generate_chat", scripted)
    config = PassRateConfig(
        model=str(policy), prompts=str(prompts), output_dir=str(tmp_path / "pr"), samples=4, chunk=2
    )
    result = run(config, progress=False)
    rates = [json.loads(line)["pass_rate"] for line in (tmp_path / "pr" / "pass_rates.jsonl").read_text().splitlines()]
    assert rates == [0.5, 1.0, 0.0, 0.25] and calls == [8, 8]
    kept = load_rows(tmp_path / "pr" / "kept.jsonl")
    assert [r["pass_rate"] for r in kept] == [0.5, 0.0, 0.25] and result["dropped_easy"] == 1
    # A kill that lost the second chunk: the rerun generates only that chunk and gives the same rates.
    lines = (tmp_path / "pr" / "pass_rates.jsonl").read_text().splitlines()
    (tmp_path / "pr" / "pass_rates.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    calls.clear()
    again = run(PassRateConfig(**{**config.__dict__, "drop_unsolved": True}), progress=False)
    assert calls == [8] and again["kept"] == 2 and again["dropped_unsolved"] == 1


def test_plain_lm_head_equals_trls_fused_kernel() -> None:
    """Our CPU LM head (`fused_lm_head=True` path) gives TRL's chunked kernel's log-probs, entropy and loss, with
    gradients; the plain path (no flag) stays the model's own forward."""
    from models_for_tests import heterogeneous_config, random_decilm
    from trl.trainer.utils import add_fused_lm_head

    from open_nemotron.train.rl import plain_lm_head

    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    ours, theirs = (random_decilm(heterogeneous_config(), seed=4) for _ in range(2))
    plain_lm_head(ours, temperature=0.7)
    add_fused_lm_head(theirs, temperature=0.7, outputs=("log_probs", "entropy"))
    a, b = ours(ids, labels=labels, fused_lm_head=True), theirs(ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    ga = dict(ours.named_parameters())["model.layers.0.mlp.down_proj.weight"].grad
    gb = dict(theirs.named_parameters())["model.layers.0.mlp.down_proj.weight"].grad
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)
