"""Typed containers passed between the data, reward, group and backend layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The sample table's columns (samples.jsonl, each tracker's `samples`); reward functions'
# log_extra columns follow them (gft/rewardlog.py) and may not replace them.
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward", "answer")


@dataclass(frozen=True)
class Example:
    """One training or evaluation row.

    prompt:    a string, or chat messages [{"role": ..., "content": ...}, ...].
    responses: the off-policy responses that enter the group (expert demonstration
               first, then teacher answers); may be empty.
    answer:    ground truth for verifiable rewards, or None.
    columns:   every other column of the row, passed to reward functions by name.
    source:    "file:line" (or "file:index") for error messages.
    """
    prompt: str | list[dict[str, str]]
    responses: tuple[str, ...] = ()
    answer: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"


@dataclass
class TokenBatch:
    """A right-padded batch of prompt+response sequences, host-side (NumPy).

    Shapes: B sequences, L tokens.
    input_ids:     [B, L] int   token ids, padded with pad id.
    attention:     [B, L] bool  True on real tokens.
    response_mask: [B, L] float 1.0 where the token at that position is a response token
                                 (the loss is over these tokens only; prompt and padding are 0).
    advantages:    [B]    float one advantage per sequence.
    n_tokens / n_seqs: the denominators of the loss aggregation for the whole mini-batch
                   this batch belongs to, so that micro-batches sum to the mini-batch loss.
    """
    input_ids: np.ndarray
    attention: np.ndarray
    response_mask: np.ndarray
    advantages: np.ndarray
    n_tokens: float
    n_seqs: float
