"""The GFT math: advantages, DCR coefficient, token loss and its limits.

Expected numbers are worked out by hand in the comments.
"""
import math

import numpy as np
import pytest
import torch

from backends.torch_backend import TORCH_OPS
from gft.objective import (AGGREGATIONS, constant_advantages, dcr_coefficient, dr_grpo_advantages,
                           gft_token_loss, group_advantages, grpo_advantages, rloo_advantages,
                           zero_variance_fraction)


# ----------------------------------------------------------------------------- advantages

def test_grpo_advantage_uses_unbiased_std():
    # r = [1, 0, 0, 1]: mean 0.5; deviations ±0.5; sum of squares 1.0; N-1 = 3
    # std = sqrt(1/3) = 0.57735; A = ±0.5 / (0.57735 + 1e-6) = ±0.866024
    a = grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0]))
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(a, [expected, -expected, -expected, expected], rtol=1e-12)


def test_dr_grpo_is_mean_centred_only():
    # r = [1, 0, 0, 0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]
    np.testing.assert_allclose(dr_grpo_advantages(np.array([1.0, 0, 0, 0])),
                               [0.75, -0.25, -0.25, -0.25])


def test_rloo_is_leave_one_out():
    # r = [1, 0, 0, 0]: A_0 = 1 - mean(0,0,0) = 1; A_1 = 0 - mean(1,0,0) = -1/3
    np.testing.assert_allclose(rloo_advantages(np.array([1.0, 0, 0, 0])),
                               [1.0, -1 / 3, -1 / 3, -1 / 3])


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_equal_rewards_give_zero_advantage(fn):
    np.testing.assert_array_equal(fn(np.array([0.7, 0.7, 0.7])), [0.0, 0.0, 0.0])


def test_constant_advantage_is_one():
    np.testing.assert_array_equal(constant_advantages(np.array([0.0, 1.0])), [1.0, 1.0])


def test_advantages_are_per_group():
    # group 0: [1, 0] -> mean .5, std (N-1) = sqrt(.5) = .7071 -> ±.7071
    # group 1: [1, 1] -> zero variance -> 0, 0
    r = np.array([1.0, 0.0, 1.0, 1.0])
    g = np.array([0, 0, 1, 1])
    a = group_advantages(r, g, "grpo")
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(a, [s, -s, 0.0, 0.0])
    assert zero_variance_fraction(r, g) == 0.5


# ----------------------------------------------------------------------------- coefficient

def test_dcr_coefficient_threshold():
    # p = [0.5, 0.05, 0.1]; tau = 0.1 -> C = [1, 0.05, 0.1]  (0.1 is not > 0.1)
    logp = torch.log(torch.tensor([0.5, 0.05, 0.1]))
    c = dcr_coefficient(TORCH_OPS, logp, 0.1)
    torch.testing.assert_close(c, torch.tensor([1.0, 0.05, 0.1]))


def test_dcr_coefficient_carries_no_gradient():
    logp = torch.log(torch.tensor([0.05], requires_grad=True))
    assert not dcr_coefficient(TORCH_OPS, logp, 0.1).requires_grad


# ----------------------------------------------------------------------------- token loss

def _loss(logp, mask, adv, tau, agg="token-mean"):
    n_tokens = float(mask.sum())
    return gft_token_loss(TORCH_OPS, logp, mask, adv, tau=tau, aggregation=AGGREGATIONS[agg],
                          n_tokens=n_tokens, n_seqs=float(mask.shape[0]))


def test_token_mean_value_by_hand():
    # two sequences; probabilities of response tokens:
    #   seq 0 (A = 2): p = 0.5, 0.05   ; seq 1 (A = -1): p = 0.25, [masked 0.9]
    # tau = 0.1: C = 1, 0.05, 1
    # per-token -A*C*log p: 2*ln .5 = -1.386294 ; 2*.05*ln .05 = -0.299573 ; -1*ln .25 = -1.386294
    #   -> -(-1.386294) = 1.386294 ; 0.299573 ; -1.386294
    # token-mean over 3 tokens: (1.386294 + 0.299573 - 1.386294) / 3 = 0.099858
    logp = torch.log(torch.tensor([[0.5, 0.05], [0.25, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    expected = (2 * math.log(2) + 2 * 0.05 * -math.log(0.05) + math.log(0.25)) / 3
    assert float(_loss(logp, mask, adv, 0.1)) == pytest.approx(expected, rel=1e-6)


def test_seq_aggregations_by_hand():
    # same per-token values t00 = 1.386294, t01 = 0.299573, t10 = -1.386294
    # seq-mean-token-mean: ((t00 + t01)/2 + t10/1) / 2
    # seq-mean-token-sum:  ((t00 + t01)   + t10  ) / 2
    logp = torch.log(torch.tensor([[0.5, 0.05], [0.25, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    t00, t01, t10 = 2 * math.log(2), 0.1 * -math.log(0.05), math.log(0.25)
    assert float(_loss(logp, mask, adv, 0.1, "seq-mean-token-mean")) == pytest.approx(
        ((t00 + t01) / 2 + t10) / 2, rel=1e-6)
    assert float(_loss(logp, mask, adv, 0.1, "seq-mean-token-sum")) == pytest.approx(
        ((t00 + t01) + t10) / 2, rel=1e-6)


def _logits_grad(tau: float, adv: float = 1.0):
    """Gradient of the GFT loss w.r.t. logits of a 1-token response, and the probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 7, requires_grad=True)  # B=1, L=2 positions, V=7
    target = torch.tensor([[3, 5]])
    logp = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    mask = torch.tensor([[1.0, 1.0]])
    loss = _loss(logp, mask, torch.tensor([adv]), tau)
    (g,) = torch.autograd.grad(loss, logits)
    return logits, target, logp.detach(), g


def test_tau_zero_is_nll_gradient():
    # tau = 0, A = 1: C = 1, so loss = mean(-log p) = the cross-entropy on the response.
    logits, target, _, g = _logits_grad(0.0)
    nll = torch.nn.functional.cross_entropy(logits.view(-1, 7), target.view(-1))
    (g_ref,) = torch.autograd.grad(nll, logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)


def test_tau_one_is_dft_gradient():
    # tau = 1: C = sg(p), so the gradient is mean(-sg(p) * grad log p) — DFT's p·∇log p.
    logits, target, logp, g = _logits_grad(1.0)
    logp_live = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    dft = -(logp.exp() * logp_live).mean()
    (g_ref,) = torch.autograd.grad(dft, logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)


def test_zero_advantage_gives_zero_gradient():
    _, _, _, g = _logits_grad(0.1, adv=0.0)
    assert torch.count_nonzero(g) == 0


def test_masked_tokens_contribute_nothing():
    # Changing logits at masked positions (prompt, padding) changes neither loss nor gradient
    # of the other positions; their own gradient is exactly zero.
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    target = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -0.5])
    logp = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    loss = _loss(logp, mask, adv, 0.1)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g[mask == 0]) == 0
    with torch.no_grad():
        bumped = logits.clone()
        bumped[mask == 0] += 10.0
    logp2 = torch.log_softmax(bumped, -1).gather(-1, target[..., None]).squeeze(-1)
    assert float(_loss(logp2, mask, adv, 0.1)) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_micro_batches_sum_to_the_minibatch_loss():
    # token-mean with the mini-batch's token count as the denominator: splitting the batch
    # into two micro-batches and adding their losses gives the full-batch loss.
    torch.manual_seed(2)
    logp = -torch.rand(4, 3)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    for agg in AGGREGATIONS:
        full = _loss(logp, mask, adv, 0.1, agg)
        parts = sum(gft_token_loss(TORCH_OPS, logp[s], mask[s], adv[s], tau=0.1,
                                   aggregation=AGGREGATIONS[agg], n_tokens=float(mask.sum()),
                                   n_seqs=4.0) for s in (slice(0, 2), slice(2, 4)))
        assert float(parts) == pytest.approx(float(full), rel=1e-6), agg
