"""RPO: the three losses against their formulas and limit cases; the trainer on TRL's DPO machinery."""

from __future__ import annotations

import json
import math

import pytest
import torch
from models_for_tests import assert_local_model_card, save_tiny_llama, tiny_llama_config

from open_nemotron.train.rpo import PreferenceConfig, RPOError, load_pairs, rpo_loss, sequence_logps

# Two pairs: sequence log-prob sums under the policy and the reference, and the rewards.
PC, PR = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -9.0])
RC, RR = torch.tensor([-4.0, -9.5]), torch.tensor([-4.5, -9.0])
WC, WR = torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.7])


def _by_hand(beta: float, eta: float) -> dict[str, list[float]]:
    out = {"bwd_kl": [], "fwd_kl": [], "sq": []}
    for i in range(2):
        d = (PC[i] - RC[i]) - (PR[i] - RR[i])
        p_hat = 1 / (1 + math.exp(-beta * d))
        p_star = 1 / (1 + math.exp(-eta * (WC[i] - WR[i])))
        out["bwd_kl"].append(p_star * math.log(p_star / p_hat) + (1 - p_star) * math.log((1 - p_star) / (1 - p_hat)))
        out["fwd_kl"].append(p_hat * math.log(p_hat / p_star) + (1 - p_hat) * math.log((1 - p_hat) / (1 - p_star)))
        out["sq"].append(float((beta * d - eta * (WC[i] - WR[i])) ** 2))
    return out


@pytest.mark.parametrize("variant", ["bwd_kl", "fwd_kl", "sq"])
def test_rpo_losses_equal_their_formulas(variant) -> None:
    got = rpo_loss(PC, PR, RC, RR, WC, WR, beta=0.7, eta=3.0, variant=variant)
    assert got.tolist() == pytest.approx(_by_hand(0.7, 3.0)[variant], rel=1e-6)


def test_rpo_limit_cases() -> None:
    # Policy margin equal to the reward margin: every variant is 0 (the target is met exactly).
    d = (PC - RC) - (PR - RR)
    matched_reward = d * 0.5 / 2.0  # beta * d == eta * (r_c - r_r) with beta 0.5, eta 2
    for variant in ("bwd_kl", "fwd_kl", "sq"):
        loss = rpo_loss(PC, PR, RC, RR, matched_reward, torch.zeros(2), beta=0.5, eta=2.0, variant=variant)
        assert loss.abs().max().item() < 1e-6
    # A reward gap that goes to infinity: bwd_kl becomes DPO's -log sigmoid(beta * d).
    huge = rpo_loss(PC, PR, RC, RR, torch.full((2,), 1e4), torch.zeros(2), beta=0.5, eta=1.0, variant="bwd_kl")
    assert huge.tolist() == pytest.approx((-torch.nn.functional.logsigmoid(0.5 * d)).tolist(), rel=1e-5)
    # KLs are never negative; the squared loss is symmetric in the sign of the mismatch.
    for variant in ("bwd_kl", "fwd_kl"):
        assert (rpo_loss(PC, PR, RC, RR, WC, WR, beta=3.0, eta=0.1, variant=variant) >= 0).all()
    assert rpo_loss(PC, PR, RC, RR, WC, WR, beta=0.5, eta=1.0, variant="sq").tolist() == pytest.approx(
        rpo_loss(PR, PC, RR, RC, WR, WC, beta=0.5, eta=1.0, variant="sq").tolist()
    )
    with pytest.raises(RPOError, match="variant"):
        rpo_loss(PC, PR, RC, RR, WC, WR, beta=1, eta=1, variant="kl")


def test_sequence_logps_sum_only_completion_tokens() -> None:
    from models_for_tests import random_llama

    model = random_llama(tiny_llama_config(num_hidden_layers=1))
    ids = torch.tensor([[5, 6, 7, 8, 2], [5, 9, 10, 2, 2]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])
    with torch.no_grad():
        got = sequence_logps(model, ids, attn, comp)
        logp = torch.log_softmax(model(ids, attention_mask=attn).logits, -1)
    expected = [sum(logp[0, t - 1, ids[0, t]] for t in (2, 3, 4)), sum(logp[1, t - 1, ids[1, t]] for t in (2, 3))]
    assert got.tolist() == pytest.approx([float(e) for e in expected], rel=1e-5)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from open_nemotron.model.loading import convert

    base = save_tiny_llama(tmp_path_factory.mktemp("llama") / "m", tiny_llama_config(num_hidden_layers=2))
    return convert(base, tmp_path_factory.mktemp("policy") / "ours", non_portable_ffn_widths=True)


def _pairs(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
            "chosen_reward": 1.0,
            "rejected_reward": 0.25,
        }
        for i in range(8)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("method", ["rpo", "dpo"])
def test_rpo_and_dpo_train_on_the_same_pairs(policy, tmp_path, method) -> None:
    from open_nemotron.train.rpo import run

    result = run(
        PreferenceConfig(
            model=str(policy),
            output_dir=str(tmp_path / method),
            pairs=str(_pairs(tmp_path)),
            method=method,
            learning_rate=1e-3,
            batch_size=4,
            max_steps=4,
            save_steps=2,
            device="cpu",
        )
    )
    assert result["steps"] == 4 and result["pairs"] == 8
    assert_local_model_card(tmp_path / method, policy, "RPOTrainer" if method == "rpo" else "DPOTrainer")
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    if method == "rpo":
        # The first step's loss is the formula on the untrained policy (policy = reference: margin 0).
        p_star = torch.sigmoid(torch.tensor(0.75))
        first = p_star * torch.log(p_star / 0.5) + (1 - p_star) * torch.log((1 - p_star) / 0.5)
        assert losses[0] == pytest.approx(first.item(), rel=1e-4)
        assert losses[-1] < losses[0]


def test_preference_config_and_pair_file_errors(tmp_path) -> None:
    with pytest.raises(RPOError, match="exactly one"):
        PreferenceConfig(model="m", output_dir="o")
    with pytest.raises(RPOError, match="method"):
        PreferenceConfig(model="m", output_dir="o", pairs="p", method="ppo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}))
    with pytest.raises(RPOError, match="missing chosen_reward"):
        load_pairs(bad)


def test_online_pairs_pair_the_best_and_worst_sample_and_skip_ties(monkeypatch) -> None:
    """Scripted samples: row 0 gets one right and one wrong answer (a pair, right one chosen), row 1 two wrong
    ones (a tie: no pair); rewards are the weighted sum of the configured reward functions."""
    from open_nemotron.model import chat
    from open_nemotron.train.rl_data import task_rows
    from open_nemotron.train.rpo import online_pairs

    rows, _ = task_rows(["chain_sum"], 2, seed=0, on_fraction=0.0)
    gold = {r["prompt"][1]["content"]: r["answer"] for r in rows}
    first = rows[0]["prompt"][1]["content"]
    seen: dict[str, int] = {}

    def scripted(model, tokenizer, conversations, **kw):
        assert kw["thinking"] is False and kw["do_sample"] and kw["top_p"] == 1.0 and kw["seed"] == 3
        out = []
        for c in conversations:
            q = c[1]["content"]
            k = seen[q] = seen.get(q, -1) + 1
            out.append(f"The answer is {gold[q]}." if q == first and k == 0 else "The answer is -1.")
        return out

    monkeypatch.setattr(chat, "generate_chat", scripted)
    config = PreferenceConfig(model="m", output_dir="o", prompts="p", samples=2, seed=3,
                              rewards={"accuracy": 2.0, "format": 1.0})  # fmt: skip
    pairs = online_pairs(None, None, rows, config)
    assert len(pairs) == 1 and pairs[0]["prompt"] == rows[0]["prompt"]
    assert pairs[0]["chosen"][0]["content"] == f"The answer is {gold[first]}."
    assert (pairs[0]["chosen_reward"], pairs[0]["rejected_reward"]) == (3.0, 1.0)
