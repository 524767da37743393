"""MLX rollouts: a batched KV-cache decode loop (see backends/mlx_backend.py's docstring
for why not mlx-lm's batch_generate), each row drawing from its own seeded uniforms
(gft.distributed.uniform_table), so a row samples the same tokens in any batch or rank.
Shapes: B rows, V vocabulary."""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gft.backend import SamplingConfig
from gft.distributed import uniform_table
from gft.errors import ModelError
from gft.groups import shared_prompts

PREFILL_STEP = 2048  # prompt tokens per forward during prefill (bounds activation memory)


def inverse_cdf(probs: mx.array, u: mx.array) -> mx.array:
    """One index per row of [B, V] (unnormalised) probabilities, for uniforms u [B]: the
    first index whose cumulative mass exceeds u·total (never a zero-probability one)."""
    cdf = mx.cumsum(probs, axis=-1)
    idx = mx.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1)
    return mx.minimum(idx, probs.shape[-1] - 1)


def sample_next(logits: mx.array, sampling: SamplingConfig, u: mx.array) -> mx.array:
    """[B, V] logits -> [B] token ids: greedy, or temperature + nucleus (top-p) sampling
    by inverse CDF with the rows' own uniforms u [B]."""
    logits = logits.astype(mx.float32)
    if sampling.greedy or sampling.temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / sampling.temperature
    if sampling.top_p >= 1.0:
        return inverse_cdf(mx.softmax(logits, axis=-1), u)
    order = mx.argsort(-logits, axis=-1)  # descending
    probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    probs = mx.where((mx.cumsum(probs, axis=-1) - probs) < sampling.top_p, probs, 0.0)
    pick = inverse_cdf(probs, u)
    return mx.take_along_axis(order, pick[:, None], axis=-1).squeeze(-1)


def batch_cache(model: nn.Module, left_padding: list[int]) -> list:
    """The model's KV caches, in their batched, left-padding-aware form."""
    from mlx_lm.models.cache import (BatchKVCache, BatchRotatingKVCache, KVCache,
                                     RotatingKVCache, make_prompt_cache)
    caches = []
    for c in make_prompt_cache(model):
        if isinstance(c, RotatingKVCache):
            caches.append(BatchRotatingKVCache(c.max_size, left_padding))
        elif isinstance(c, KVCache):
            caches.append(BatchKVCache(left_padding))
        else:
            raise ModelError(f"mlx backend: batched generation does not support "
                             f"{type(c).__name__} caches yet")
    return caches


def decode_batch(model: nn.Module, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int], stop: set[int], pad: int) -> list[list[int]]:
    """Left-pad, prefill (each distinct prompt once, its cache rows copied to the rows
    that repeat it), then decode one token per row per forward until every row has
    emitted a stop id (`stop`) or max_new_tokens is reached. Rows that finish are dropped
    from the batch (and the KV cache), so short answers stop costing compute. The next
    step is queued (async_eval) before the host reads the current tokens, as mlx-lm
    does, which keeps the device busy while Python does its bookkeeping."""
    if any(len(p) == 0 for p in prompts):
        raise ModelError("mlx backend: cannot generate from an empty prompt")
    rows: list[list[int]] = [[] for _ in prompts]
    if sampling.max_new_tokens <= 0:
        return rows
    distinct, copies = shared_prompts(prompts)  # GRPO: G rows of one prompt
    width = max(len(p) for p in distinct)
    pads = [width - len(p) for p in distinct]
    ids = mx.array([[pad] * n + list(p) for n, p in zip(pads, distinct)], dtype=mx.int32)
    cache = batch_cache(model, pads)
    for i in range(0, width - 1, PREFILL_STEP):  # all but the last prompt column
        model(ids[:, i:min(i + PREFILL_STEP, width - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    if len(distinct) < len(prompts):  # one prefill per distinct prompt, rows copied
        idx = mx.array(copies)
        for c in cache:
            c.filter(idx)
        ids = ids[idx]
    draws = mx.array(uniform_table(seeds, sampling.max_new_tokens).astype(np.float32))

    def step(tokens: mx.array, i: int) -> mx.array:
        logits = model(tokens, cache=cache)[:, -1, :]
        return sample_next(logits, sampling, draws[:, i])

    active = list(range(len(prompts)))  # the prompt index of each batch row
    y = step(ids[:, -1:], 0)
    mx.async_eval(y)
    for i in range(sampling.max_new_tokens):
        y_next = None
        if i + 1 < sampling.max_new_tokens:
            y_next = step(y[:, None], i + 1)
            mx.async_eval(y_next)
        keep = []
        for k, t in enumerate(y.tolist()):
            rows[active[k]].append(t)
            if t not in stop:
                keep.append(k)
        if y_next is None or not keep:
            break
        if len(keep) < len(active):
            idx = mx.array(keep)
            for c in cache:
                c.filter(idx)
            y_next, draws = y_next[idx], draws[idx]
            active = [active[k] for k in keep]
        y = y_next
    return rows
