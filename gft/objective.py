"""The GFT objective, written once for every backend.

Paper: "GFT: From Imitation to Reward Fine-Tuning with Unbiased Group Advantages and
Dynamic Coefficient Rectification" (arXiv 2604.14258). For response i of a group and its
token t, with p = pi(o_t | x, o_<t) the plain softmax probability:

    C(p)  = 1 if p > tau else p                          (Dynamic Coefficient Rectification)
    loss  = agg_{i,t} [ - A_i * sg(C(p_{i,t})) * log p_{i,t} ]   over response tokens only

and the advantages are group-relative over a hybrid group of K dataset responses and n
on-policy rollouts (Group Advantage Learning):

    grpo:    A_i = (r_i - mean_G r) / (std_G r + eps),  std with N-1, eps = 1e-6
    dr_grpo: A_i =  r_i - mean_G r                       (Dr. GRPO, arXiv 2503.20783)
    rloo:    A_i =  r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_G r)
    constant: A_i = 1                                    (SFT and DFT)

Deliberate simplifications, as in the paper's configuration: no PPO ratio, no clipping,
no KL term, no entropy bonus, and no importance correction for off-policy responses.

Advantages are host-side NumPy (one number per response). The token loss is one pure
function over a tiny array namespace (`ArrayOps`) that each backend supplies, so the same
source lines run on torch tensors and mlx arrays. Shapes: B sequences, L tokens.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

EPS = 1e-6


# --------------------------------------------------------------------------- advantages
# Each estimator maps the rewards of ONE group [G] to advantages [G].

def _centred(r: np.ndarray) -> np.ndarray:
    """r - mean, exactly 0 for a group of equal rewards (mean() of [0.7]*3 is not 0.7 in
    floating point, and even 1e-16 advantages would leak a gradient)."""
    return np.zeros_like(r) if np.ptp(r) == 0 else r - r.mean()


def grpo_advantages(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + eps), unbiased std (N-1). A group of one has no baseline: 0."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size < 2:
        return np.zeros_like(r)
    return _centred(r) / (r.std(ddof=1) + EPS)


def dr_grpo_advantages(rewards: np.ndarray) -> np.ndarray:
    """r - mean: Dr. GRPO drops the std division, which up-weights low-variance groups."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size < 2:
        return np.zeros_like(r)
    return _centred(r)


def rloo_advantages(rewards: np.ndarray) -> np.ndarray:
    """Leave-one-out baseline: r_i - mean of the others = G/(G-1) (r_i - mean)."""
    r = np.asarray(rewards, dtype=np.float64)
    g = r.size
    if g < 2:
        return np.zeros_like(r)
    return g / (g - 1) * _centred(r)


def constant_advantages(rewards: np.ndarray) -> np.ndarray:
    """A = 1 for every response: SFT and DFT imitate the dataset, rewards only reported."""
    return np.ones(np.asarray(rewards).shape, dtype=np.float64)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "constant": constant_advantages,
}


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray, estimator: str) -> np.ndarray:
    """Apply `estimator` within each group. rewards, group_ids: [N] -> advantages [N]."""
    fn = ADVANTAGE_ESTIMATORS[estimator]
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for g in np.unique(group_ids):
        idx = np.flatnonzero(group_ids == g)
        out[idx] = fn(rewards[idx])
    return out


def zero_variance_fraction(rewards: np.ndarray, group_ids: np.ndarray) -> float:
    """Fraction of groups whose rewards are all equal (they give no gradient under GRPO)."""
    groups = np.unique(group_ids)
    if groups.size == 0:
        return 0.0
    flat = sum(np.ptp(rewards[group_ids == g]) == 0 for g in groups)
    return float(flat) / groups.size


# --------------------------------------------------------------------------- token loss

class ArrayOps(Protocol):
    """The few array operations the token loss needs; each backend supplies them."""

    def exp(self, x: Any) -> Any: ...
    def where(self, cond: Any, x: Any, y: Any) -> Any: ...
    def stop_gradient(self, x: Any) -> Any: ...
    def sum(self, x: Any, axis: int | None = None) -> Any: ...
    def clamp_min(self, x: Any, lo: float) -> Any: ...


def dcr_coefficient(ops: ArrayOps, logp: Any, tau: float) -> Any:
    """sg(C(p)) with C(p) = 1 if p > tau else p.

    tau = 0 gives C = 1 (plain log-likelihood); tau = 1 gives C = p (DFT: p * log p).
    Stop-gradient because C only rescales the token's gradient: its weight on grad p
    becomes C/p, bounded by 1/tau above tau and 1 below, instead of SFT's unbounded 1/p.
    """
    p = ops.exp(ops.stop_gradient(logp))
    return ops.where(p > tau, 1.0, p)


# Aggregations reduce per-token losses [B, L] (already masked) to a scalar. They divide
# by the denominators of the whole mini-batch (n_tokens, n_seqs), not of the micro-batch,
# so the losses of gradient-accumulation micro-batches add up to the mini-batch loss.

def token_mean(ops: ArrayOps, per_token: Any, mask: Any, n_tokens: float, n_seqs: float) -> Any:
    """verl's 'token-mean': every response token in the mini-batch weighs the same."""
    return ops.sum(per_token) / max(n_tokens, 1.0)


def seq_mean_token_mean(ops: ArrayOps, per_token: Any, mask: Any, n_tokens: float,
                        n_seqs: float) -> Any:
    """Mean over sequences of each sequence's token mean: every response weighs the same."""
    lengths = ops.clamp_min(ops.sum(mask, axis=1), 1.0)  # empty rows: 0/1, not 0/0
    return ops.sum(ops.sum(per_token, axis=1) / lengths) / max(n_seqs, 1.0)


def seq_mean_token_sum(ops: ArrayOps, per_token: Any, mask: Any, n_tokens: float,
                       n_seqs: float) -> Any:
    """Mean over sequences of each sequence's token sum: longer responses weigh more."""
    return ops.sum(per_token) / max(n_seqs, 1.0)


AGGREGATIONS = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
}


def gft_token_loss(ops: ArrayOps, logp: Any, mask: Any, advantages: Any, *, tau: float,
                   aggregation: Callable, n_tokens: float, n_seqs: float) -> Any:
    """The GFT loss of one (micro-)batch.

    logp:       [B, L] log pi of each target token (differentiable).
    mask:       [B, L] 1.0 on response tokens, 0.0 on prompt and padding.
    advantages: [B]    one advantage per response (constant: no gradient flows into it).
    aggregation: one of AGGREGATIONS' values, picked once where the config is read.
    """
    coef = dcr_coefficient(ops, logp, tau)
    weighted_logp = coef * logp
    per_token = -advantages[:, None] * weighted_logp * mask
    return aggregation(ops, per_token, mask, n_tokens, n_seqs)
