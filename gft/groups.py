"""Hybrid groups and token batches (host side, NumPy).

A group is everything scored against one prompt: K dataset responses (expert and teacher
answers, off-policy) followed by n on-policy rollouts. Each response becomes one
sequence prompt+response; batches are right-padded with a response mask that is 1 only
on response tokens, so prompt and padding never enter the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gft.types import TokenBatch


@dataclass
class Sequence_:
    """One response of one group, tokenized."""
    group: int              # index of its prompt within the step
    prompt_ids: list[int]
    response_ids: list[int]
    text: str               # decoded response (what rewards see)
    on_policy: bool         # rollout (True) or dataset response (False)
    truncated: bool = False  # hit max_response_tokens without EOS
    reward: float = 0.0
    correct: bool = False
    advantage: float = 0.0


def pad_batch(seqs: Sequence[Sequence_], pad_id: int, n_tokens: float,
              n_seqs: float) -> TokenBatch:
    """Right-pad prompt+response rows into one TokenBatch."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in seqs]
    width = max(lengths)
    B = len(seqs)
    ids = np.full((B, width), pad_id, dtype=np.int64)
    att = np.zeros((B, width), dtype=bool)
    mask = np.zeros((B, width), dtype=np.float32)
    for i, s in enumerate(seqs):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, :p + r] = s.prompt_ids + s.response_ids
        att[i, :p + r] = True
        mask[i, p:p + r] = 1.0
    adv = np.array([s.advantage for s in seqs], dtype=np.float32)
    return TokenBatch(ids, att, mask, adv, n_tokens=n_tokens, n_seqs=n_seqs)


def micro_batches(seqs: Sequence[Sequence_], micro_batch_size: int, pad_id: int, *,
                  skip_zero_advantage: bool = True,
                  totals: tuple[float, float] | None = None,
                  micro_batch_tokens: int = 0) -> list[TokenBatch]:
    """Split one optimizer update's sequences into padded micro-batches.

    The aggregation denominators (response tokens, sequences) are those of ALL the
    sequences, including zero-advantage ones we skip: they carry no gradient but the
    token-mean counts their tokens, so skipping them saves compute without changing
    the loss. Sorting by length keeps padding waste low.

    totals: (response tokens, sequences) of the whole update when `seqs` is only one
    data-parallel rank's share of it.
    micro_batch_tokens: > 0 also caps each micro-batch's padded tokens (pack_by_tokens).
    """
    n_tokens = float(sum(len(s.response_ids) for s in seqs))
    n_seqs = float(len(seqs))
    if totals is not None:
        n_tokens, n_seqs = totals
    live = [s for s in seqs if not (skip_zero_advantage and s.advantage == 0.0)]
    live.sort(key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    return [pad_batch(part, pad_id, n_tokens, n_seqs)
            for part in pack_by_tokens(live, micro_batch_size, micro_batch_tokens)]


def pack_by_tokens(ordered: Sequence[Sequence_], most: int, budget: int = 0
                   ) -> list[list[Sequence_]]:
    """Consecutive runs of `ordered` (sorted by length, shortest first): at most `most`
    sequences each, and with budget > 0 at most `budget` padded tokens each (rows x the
    longest row; a sequence longer than the budget alone). Greedy: a run grows until the
    next sequence would break a limit.

    GFT's groups mix short demonstrations with long rollouts: a fixed number of sequences
    pads every short one to the longest of its micro-batch; a token budget puts the short
    ones together and the long ones together, so the forward/backward spends less on
    padding, and the loss is the same (the denominators are the whole update's)."""
    runs: list[list[Sequence_]] = []
    for s in ordered:
        width = len(s.prompt_ids) + len(s.response_ids)  # the longest so far: sorted
        run = runs[-1] if runs else None
        if run is None or len(run) >= most or (budget > 0 and (len(run) + 1) * width > budget):
            runs.append([s])
        else:
            run.append(s)
    return runs


def scored_from(batch: TokenBatch) -> int:
    """The first position whose logits the loss needs: the one before the earliest
    response token of the batch (prompt positions before it only feed attention, so a
    backend may skip their lm_head and softmax)."""
    cols = np.flatnonzero(batch.response_mask.any(axis=0))
    return max(int(cols[0]) - 1, 0) if cols.size else 0


MIN_SHARED_PREFIX = 8
"""Leading tokens the rows of a micro-batch must share before they are run once."""


def shared_prefix(batch: TokenBatch, limit: int) -> int:
    """How many leading columns (at most `limit`) hold the same real tokens in every row
    of the batch; 0 for a batch of one row, or when fewer than MIN_SHARED_PREFIX do."""
    ids, att = batch.input_ids[:, :limit], batch.attention[:, :limit]
    if ids.shape[0] < 2 or limit <= 0:
        return 0
    same = (ids == ids[:1]).all(axis=0) & att.all(axis=0)
    n = limit if same.all() else int(np.argmin(same))
    return n if n >= MIN_SHARED_PREFIX else 0


def shared_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """(the distinct prompts in first-seen order, for each row the index of its prompt).

    GRPO samples G completions of each prompt: prefilling each prompt once and copying its
    KV rows saves (G - 1) / G of the prefill, as a prefix-caching engine does."""
    index: dict[tuple[int, ...], int] = {}
    copies = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], copies
