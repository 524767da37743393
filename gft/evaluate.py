"""Held-out evaluation: greedy accuracy (pass@1) and sampled pass@k."""
from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

from backends import SamplingConfig
from gft.data import prompt_text
from gft.distributed import row_seed
from gft.types import Example


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(backend, rows: Sequence[Example], prompt_ids: Sequence[list[int]], scorer, *,
             max_new_tokens: int, k: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 64, first_row: int = 0) -> dict[str, float]:
    """Greedy accuracy and mean reward; with k > 1 also pass@k from k samples per prompt.

    first_row: the index of rows[0] in the whole held-out set; sample i of row r is seeded
    from (seed, (first_row + r)·k + i), so a data-parallel rank's share of the rows draws
    what one process would."""
    if not rows:
        return {}
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    outs = backend.generate(list(prompt_ids), greedy, seed)
    result = _score(backend, rows, outs, scorer)
    metrics = {"accuracy": float(result.correct.mean()), "reward": float(result.total.mean()),
               "n": float(len(rows))}
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
    return metrics


def _score(backend, rows: Sequence[Example], outs: Sequence[list[int]], scorer):
    tok = backend.tokenizer
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    columns: dict[str, list] = {"answer": [r.answer for r in rows]}
    for key in {k for r in rows for k in r.columns}:
        columns[key] = [r.columns.get(key) for r in rows]
    return scorer.score([prompt_text(r) for r in rows], texts, columns,
                        sources=[r.source for r in rows])
