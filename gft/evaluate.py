"""Held-out evaluation: greedy accuracy (pass@1), sampled pass@k, and the held-out loss.

What is measured, on rows the run never trains on (gft/run.py picks them and says which):
- accuracy / reward: greedy completions scored by the configured rewards (only when
  rewards are configured), with each reward function's mean under rewards/<name>;
- loss: the mean negative log-likelihood per token of the rows' first dataset response
  (what SFT minimizes, and what TRL's SFTTrainer reports as eval_loss), when the rows
  carry responses.
"""
from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

from gft.backend import SamplingConfig
from gft.distributed import row_seed
from gft.groups import Sequence_, pad_batch
from gft.rewardlog import add_logged
from gft.rollout import encode_response, reward_columns
from gft.types import Example


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(backend, rows: Sequence[Example], prompt_ids: Sequence[list[int]], scorer, *,
             max_new_tokens: int, k: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 64, first_row: int = 0,
             loss: bool = False, parts: bool = False) -> dict[str, float]:
    """Greedy accuracy and mean reward (with a scorer); with k > 1 also pass@k from k
    samples per prompt; with `loss`, the held-out NLL of the rows' dataset responses.

    first_row: the index of rows[0] in the whole held-out set; sample i of row r is seeded
    from (seed, (first_row + r)·k + i), so a data-parallel rank's share of the rows draws
    what one process would. parts: also return "_parts", {name: [sum, count]} of each
    reward function's values and each log_metric name, so that ranks' shares combine."""
    if not rows:
        return {}
    metrics: dict[str, float] = {"n": float(len(rows))}
    if loss:
        metrics.update(heldout_loss(backend, rows, prompt_ids, max_new_tokens, batch_size))
    if scorer is None:
        return metrics
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    outs = backend.generate(list(prompt_ids), greedy, seed)
    result = _score(backend, rows, outs, scorer)
    metrics.update({"accuracy": float(result.correct.mean()),
                    "reward": float(result.total.mean())})
    sums: dict[str, list[float]] = {}
    for name, values in zip(scorer.log_names, result.per_function.values()):
        applied = values[~np.isnan(values)]
        sums[f"rewards/{name}"] = [float(applied.sum()), float(applied.size)]
        if applied.size:
            metrics[f"rewards/{name}"] = float(applied.mean())
    logged = dict(getattr(result, "logged", {}))  # the reward functions' log_metric values
    if k > 1:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, batch_size=batch_size)
        repeated = [p for p in prompt_ids for _ in range(k)]
        seeds = [row_seed(seed + 1, (first_row + r) * k + i)
                 for r in range(len(rows)) for i in range(k)]
        outs = backend.generate(repeated, sampling, seeds)
        sampled = _score(backend, [r for r in rows for _ in range(k)], outs, scorer)
        correct = sampled.correct.reshape(len(rows), k).sum(axis=1)
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(k, int(c), k) for c in correct]))
        metrics["pass@1_sampled"] = float(np.mean([pass_at_k(k, int(c), 1) for c in correct]))
        for name, values in getattr(sampled, "logged", {}).items():
            logged[name] = logged.get(name, []) + values
    add_logged(metrics, {name: float(np.mean(values)) for name, values in logged.items()})
    if parts:
        metrics["_parts"] = {**sums, **{name: [float(sum(values)), float(len(values))]
                                        for name, values in logged.items()}}
    return metrics


def heldout_loss(backend, rows: Sequence[Example], prompt_ids: Sequence[list[int]],
                 max_response_tokens: int, batch_size: int) -> dict[str, float]:
    """{"loss": mean NLL per response token, "loss_tokens": how many} over each row's
    first dataset response (+ EOS, as trained); {} when no row has a response."""
    tok = backend.tokenizer
    seqs = [Sequence_(i, list(pids), encode_response(ex.responses[0], tok,
                                                     max_response_tokens)[0], "", False)
            for i, (ex, pids) in enumerate(zip(rows, prompt_ids)) if ex.responses]
    if not seqs:
        return {}
    nll, tokens = 0.0, 0.0
    for start in range(0, len(seqs), batch_size):
        batch = pad_batch(seqs[start:start + batch_size], tok.pad_token_id, 1.0, 1.0)
        logprobs = backend.token_logprobs(batch)            # [B, L-1]: of input_ids[:, 1:]
        mask = batch.response_mask[:, 1:]                   # response tokens as targets
        nll -= float((np.asarray(logprobs, np.float64) * mask).sum())
        tokens += float(mask.sum())
    return {"loss": nll / tokens, "loss_tokens": tokens}


def _score(backend, rows: Sequence[Example], outs: Sequence[list[int]], scorer):
    tok = backend.tokenizer
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    return scorer.score([r.prompt for r in rows], texts, reward_columns(rows),
                        sources=[r.source for r in rows], completion_ids=list(outs))
