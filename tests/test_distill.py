"""Global KD and continued pretraining: the loss against its formula, layer alignment, training, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from models_for_tests import heterogeneous_config, random_decilm, random_ids, save_tiny_llama, tiny_llama_config
from tokenizers_for_tests import chatml_tokenizer

from open_nemotron.distill import DistillConfig, DistillError, layer_alignment
from open_nemotron.distill import run as run_distill
from open_nemotron.distill.kd import kd_loss_parts
from open_nemotron.distill.losses import hidden_cosine_loss, kl_divergence, lm_loss
from open_nemotron.train.sft import latest_checkpoint


def test_kl_divergence_matches_the_formula_by_hand():
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    student = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]]])
    expected = []
    for t_row, s_row in zip(teacher[0].tolist(), student[0].tolist(), strict=True):
        zt, zs = sum(math.exp(x) for x in t_row), sum(math.exp(x) for x in s_row)
        p = [math.exp(x) / zt for x in t_row]
        q = [math.exp(x) / zs for x in s_row]
        expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    assert kl_divergence(teacher, student).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # A mask keeps the second position only; temperature 2 scales logits by 1/2 and the KL by 4.
    mask = torch.tensor([[False, True]])
    assert kl_divergence(teacher, student, mask).item() == pytest.approx(expected[1], rel=1e-6)
    halved = kl_divergence(teacher / 2, student / 2).item() * 4
    assert kl_divergence(teacher, student, temperature=2.0).item() == pytest.approx(halved, rel=1e-6)
    assert kl_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_hidden_cosine_loss_sums_aligned_layers():
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 4, generator=gen) for _ in range(2)]
    teacher = [torch.randn(2, 3, 4, generator=gen) for _ in range(3)]
    alignment = [0, 2]  # student layer 1 stands for teacher layers 1-2 (a fused run)

    def one_minus_cos(a, b):  # per token, by hand
        return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    expected = sum(one_minus_cos(student[i], teacher[a]).mean() for i, a in enumerate(alignment))
    assert hidden_cosine_loss(student, teacher, alignment).item() == pytest.approx(expected.item(), rel=1e-6)
    # The same hidden states give zero; a scaled copy too (cosine ignores length).
    assert hidden_cosine_loss([t * 3 for t in teacher], teacher, [0, 1, 2]).item() == pytest.approx(0, abs=1e-6)


def test_lm_loss_is_next_token_cross_entropy():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 3, 0, 4]])
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 0, 3] + logp[0, 1, 0] + logp[0, 2, 4]) / 3
    assert lm_loss(logits, ids).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kd_loss_parts_of_real_models_match_the_formula():
    """Teacher a tiny Llama (run through transformers), student a heterogeneous DeciLM with as many layers."""
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=6)).eval()
    student = random_decilm(heterogeneous_config(), seed=3)
    ids = random_ids(2, 10)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
        s_out = student(ids, output_hidden_states=True)
    weights = {"cos": 1.0, "kl": 1.0, "lm": 0.5}
    parts = kd_loss_parts(s_out, t_out, ids, weights, list(range(6)))
    # Direct formulas: per-layer outputs (entries 1..L, the last after the final norm on both sides).
    cos = sum(
        (
            1 - torch.nn.functional.cosine_similarity(s_out.hidden_states[i + 1], t_out.hidden_states[i + 1], dim=-1)
        ).mean()
        for i in range(6)
    )
    p = torch.softmax(t_out.logits, -1)
    kl = (p * (torch.log_softmax(t_out.logits, -1) - torch.log_softmax(s_out.logits, -1))).sum(-1).mean()
    ce = (
        torch.nn.functional.cross_entropy(s_out.logits[0, :-1], ids[0, 1:]) / 2
        + torch.nn.functional.cross_entropy(s_out.logits[1, :-1], ids[1, 1:]) / 2
    )
    assert parts["cos"].item() == pytest.approx(cos.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts["lm"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert set(kd_loss_parts(s_out, t_out, ids, {"kl": 1.0}, None)) == {"kl"}


def test_layer_alignment():
    six = heterogeneous_config()
    assert layer_alignment(six, six) == list(range(6))
    fused = heterogeneous_config(num_hidden_layers=6)
    fused.num_hidden_layers = 4
    fused.source_layers = [[0], [1], [2, 3, 4], [5]]
    assert layer_alignment(fused, six) == [0, 1, 4, 5]
    fused.source_layers = [[0], [1], [3], [2]]
    with pytest.raises(DistillError, match="increasing teacher layers"):
        layer_alignment(fused, six)
    del fused.source_layers
    with pytest.raises(DistillError, match="4 layers and the teacher 6"):
        layer_alignment(fused, six)


def test_config_validation():
    with pytest.raises(DistillError, match="loss = 'mse'"):
        DistillConfig(student="s", output_dir="o", teacher="t", loss="mse")
    with pytest.raises(DistillError, match="needs a teacher"):
        DistillConfig(student="s", output_dir="o")
    with pytest.raises(DistillError, match="train_tokens = 0"):
        DistillConfig(student="s", output_dir="o", teacher="t", train_tokens=0)
    with pytest.raises(DistillError, match="every loss weight is 0"):
        DistillConfig(student="s", output_dir="o", teacher="t", cosine_weight=0, kl_weight=0)
    assert DistillConfig(student="s", output_dir="o", loss="lm").weights == {"lm": 1.0}
    assert DistillConfig(student="s", output_dir="o", teacher="t").weights == {"cos": 1.0, "kl": 1.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama teacher (6 layers); a student in our format that is the teacher with noisy layer weights (as a
    Puzzle child is the parent with replaced blocks); a text corpus."""
    from open_nemotron.model.loading import load_model

    root = tmp_path_factory.mktemp("distill")
    # Wider initial weights than the default: peaked next-token distributions, so the KL has something to show.
    teacher = save_tiny_llama(root / "teacher", tiny_llama_config(num_hidden_layers=6, initializer_range=0.3), seed=0)
    student = root / "student"
    model = load_model(teacher, implementation="ours")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    model.save_pretrained(student)
    chatml_tokenizer().save_pretrained(student)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "hex",
        "bold",
        "jumping",
        "frogs",
    ]
    docs = [" ".join(words[(i + k) % len(words)] for k in range(12 + i % 5)) for i in range(40)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    return teacher, student, corpus


def _config(models, out, **overrides) -> DistillConfig:
    teacher, student, corpus = models
    kwargs = dict(
        teacher=str(teacher),
        student=str(student),
        output_dir=str(out),
        data=str(corpus),
        seq_len=32,
        train_sequences=16,
        reporting_sequences=2,
        batch_size=4,
        train_tokens=4 * 32 * 12,  # 12 steps
        learning_rate=1e-2,
        warmup_ratio=0.0,
        report_every=6,
        save_steps=2,
        logging_steps=1,
    )
    kwargs.update(overrides)
    return DistillConfig(**kwargs)


def test_distill_lowers_the_reporting_kl_and_writes_its_artifacts(models, tmp_path):
    result = run_distill(_config(models, tmp_path / "kd"))
    assert result["steps"] == result["max_steps"] == 12
    assert [c["step"] for c in result["curve"]] == [0, 6, 12]
    assert result["after"]["kl"] < 0.8 * result["before"]["kl"]
    # The validation (selection) windows are measured beside the reporting ones, for choosing settings.
    assert result["after"]["validation_kl"] < result["before"]["validation_kl"]
    assert result["validation_positions"] > 0
    # The loss parts are logged separately; the embeddings (tied or not) stayed the student's own.
    assert {"loss_cos", "loss_kl"} <= set(result["train_log"][0])
    for name in ("distill.json", "distill_report.md", "distill_curve.png", "final/model.safetensors"):
        assert (tmp_path / "kd" / name).is_file(), name
    from safetensors.torch import load_file

    before = load_file(models[1] / "model.safetensors")
    after = load_file(tmp_path / "kd" / "final" / "model.safetensors")
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    # The reporting windows come from documents the training windows never saw.
    calibration = json.loads((tmp_path / "kd" / "calibration" / "calibration.json").read_text())
    assert calibration["documents"]["reporting"] >= 1
    assert "KL" in (tmp_path / "kd" / "distill_report.md").read_text()


class _Killed(Exception):
    pass


def test_the_curve_with_the_teachers_log_probs_kept_equals_the_curve_recomputing_them(models, tmp_path, monkeypatch):
    import open_nemotron.distill.kd as kd_module

    kept = run_distill(_config(models, tmp_path / "kept", train_tokens=4 * 32 * 4, report_every=2))
    monkeypatch.setattr(kd_module, "REFERENCE_CACHE_BYTES", 0)  # too small: the teacher runs at every measurement
    recomputed = run_distill(_config(models, tmp_path / "recomputed", train_tokens=4 * 32 * 4, report_every=2))
    for key in ("kl", "top1", "validation_kl", "validation_top1"):
        assert [c[key] for c in kept["curve"]] == pytest.approx([c[key] for c in recomputed["curve"]], rel=1e-6), key


def test_killed_distill_resumes_to_the_uninterrupted_weights(models, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Killed(state.global_step)

    straight = run_distill(_config(models, tmp_path / "straight", train_tokens=4 * 32 * 4, report_every=2))
    killed_config = _config(models, tmp_path / "killed", train_tokens=4 * 32 * 4, report_every=2)
    with pytest.raises(_Killed):
        run_distill(killed_config, callbacks=[KillAfterFirstCheckpoint()])
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-2"
    resumed = run_distill(killed_config)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == straight["steps"] == 4
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # Rerunning the finished run trains nothing more (no step past max_steps) and writes the same weights.
    again = run_distill(killed_config)
    assert again["steps"] == 4 and again["train_seconds"] == 0.0
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    c = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-6, msg=key)
    # The curve survives the kill (it lives in the checkpoint's trainer state), each step measured once.
    assert [c["step"] for c in resumed["curve"]] == [c["step"] for c in straight["curve"]] == [0, 2, 4]
    assert [c["kl"] for c in resumed["curve"]] == pytest.approx([c["kl"] for c in straight["curve"]], rel=1e-5)


def test_continued_pretraining_needs_no_teacher(models, tmp_path):
    config = _config(models, tmp_path / "cpt", teacher=None, loss="lm")
    result = run_distill(config)
    assert result["weights"] == {"lm": 1.0} and result["curve"] == []
    losses = [h["loss_lm"] for h in result["train_log"]]
    assert losses[-1] < losses[0]
    with pytest.raises(DistillError, match="teacher's own text"):
        run_distill(_config(models, tmp_path / "cpt2", teacher=None, loss="lm", data="parent"))


def test_distill_refuses_misaligned_layer_counts(models, tmp_path):
    teacher, _, corpus = models
    small = tmp_path / "small"
    save_tiny_llama(small, tiny_llama_config(num_hidden_layers=3), seed=1)
    with pytest.raises(DistillError, match="3 layers and the teacher 6"):
        run_distill(_config((teacher, small, corpus), tmp_path / "bad"))


def test_distill_cli_trains_and_reports_errors_in_one_line(models, tmp_path):
    from typer.testing import CliRunner

    from open_nemotron.cli import app

    teacher, student, corpus = models
    runner = CliRunner()
    args = [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
        "--train-sequences",
        "8",
        "--reporting-sequences",
        "2",
        "--train-tokens",
        "256",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--report-every",
        "2",
        "--save-steps",
        "2",
        "--out",
        str(tmp_path / "kd"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 2 steps (256 tokens)" in result.output and "reporting KL" in result.output
    written = json.loads((tmp_path / "kd" / "distill.json").read_text())["config"]
    assert written["learning_rate"] == 1e-2 and written["seq_len"] == 32 and written["loss"] == "kd"
    result = runner.invoke(app, ["distill", "--student", str(student), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error: distill: loss 'kd' needs a teacher (--teacher)" in result.output
