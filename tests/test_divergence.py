"""The one KL / top-1 function (open_nemotron.evaluate.divergence) against the formula, written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from open_nemotron.evaluate.divergence import kl_and_top1, log_probs


def test_kl_is_the_sum_of_p_times_log_p_over_q_and_top1_compares_the_argmaxes():
    p = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]
    q = [[0.1, 0.6, 0.3], [0.2, 0.3, 0.5]]
    kl, top1 = kl_and_top1(torch.tensor(p).log(), torch.tensor(q).log())
    for row in range(2):
        expected = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p[row], q[row], strict=True))
        assert kl[row].item() == pytest.approx(expected, rel=1e-6)
    assert top1.tolist() == [0.0, 1.0]  # argmax 0 vs 1; 2 vs 2


def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_not_symmetric():
    gen = torch.Generator().manual_seed(0)
    a, b = log_probs(torch.randn(2, 5, 11, generator=gen)), log_probs(torch.randn(2, 5, 11, generator=gen))
    kl, top1 = kl_and_top1(a, a)
    assert kl.shape == (2, 5) and torch.allclose(kl, torch.zeros(2, 5), atol=1e-6) and bool(top1.all())
    forward, _ = kl_and_top1(a, b)
    backward, _ = kl_and_top1(b, a)
    assert bool((forward > 0).all()) and not torch.allclose(forward, backward)


def test_log_probs_are_float32_log_softmax_and_shapes_must_match():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    out = log_probs(logits)
    assert out.dtype == torch.float32
    z = sum(math.exp(x) for x in (1.0, 2.0, 3.0))
    assert out[0].tolist() == pytest.approx([x - math.log(z) for x in (1.0, 2.0, 3.0)], rel=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        kl_and_top1(torch.zeros(2, 3), torch.zeros(3, 3))


def test_heldout_agreement_with_the_parents_cached_log_probs_equals_running_the_parent():
    from models_for_tests import heterogeneous_config, random_decilm, random_ids

    from open_nemotron.evaluate.divergence import heldout_agreement, reference_log_probs

    parent, child = random_decilm(heterogeneous_config(), seed=0), random_decilm(heterogeneous_config(), seed=1)
    tokens = random_ids(5, 9)  # 5 rows in batches of 2: the last batch is short
    direct = heldout_agreement(parent, child, tokens, batch_size=2)
    cached = reference_log_probs(parent.eval(), tokens, batch_size=2)
    assert [tuple(c.shape[:2]) for c in cached] == [(2, 8), (2, 8), (1, 8)]

    class MustNotRun(torch.nn.Module):  # the parent is not called again when its log-probabilities are given
        def forward(self, *args, **kwargs):
            raise AssertionError("the parent ran")

    reused = heldout_agreement(MustNotRun(), child, tokens, batch_size=2, parent_logp=cached)
    assert reused == direct and direct["tokens"] == 40
    with pytest.raises(ValueError, match="2 batches of parent log-probabilities for 3 batches"):
        heldout_agreement(parent, child, tokens, batch_size=2, parent_logp=cached[:2])
