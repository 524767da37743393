"""A micro-batch's rows packed into one row for the update's forward (torch, no padding).

The right-padded [B, L] batch becomes one row of T real tokens: the leading tokens every
row shares (gft.groups.shared_prefix: a GRPO group's prompt) once, then each row's own
remaining tokens, back to back. Shapes: B rows, L padded width, T packed tokens, S scored
positions per row (L - 1 - start).

- position ids: each token keeps its padded column, so they restart at 0 for each row
  (no shared prefix) or continue from the prefix's length (shared prefix);
- attention: a [1, 1, T, T] mask in which a token sees the shared prefix and its own
  row's earlier tokens, nothing of the other rows (block-diagonal and causal when nothing
  is shared);
- the loss: `keep` [B, S] maps every scored position of the padded layout to its packed
  token, so the scores come back in the padded [B, S] shape and the targets, the response
  mask, DCR, the advantages and the aggregation (gft/objective.py) are untouched; the
  padding's places point at a real token and are masked out as before.

One forward instead of the two of the shared-prefix path (TorchBackend._prefix_shared_
scores), with the per-layer operators of a single forward, and no padding. Its price is
attention over all T x T pairs (the mask is dense: sdpa cannot skip the blocks it rules
out), so `packing_pays` packs only where that costs no more than the padded forward.

Where it applies (TorchBackend._pack): transformers passes a 4-D mask through unchanged
to `sdpa` and `eager` attention (masking_utils._preprocess_mask_arguments), full attention
only (a sliding-window layer would be handed the same full mask). flash_attention_2 takes
no 4-D mask (it would need varlen cumulative lengths instead), so that path, and
architectures outside torch_head.HEAD_AFTER_BODY, keep the padded forward.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import numpy as np
import torch

PACKABLE_ATTENTION = ("sdpa", "eager")
MAX_PACKED = 8192
"""Most tokens packed in one row: the [T, T] additive mask takes 4 T^2 bytes in float32
(256 MiB at 8192), and its host-side making a few T^2-byte temporaries."""


class Packed(NamedTuple):
    ids: torch.Tensor        # [1, T] token ids
    positions: torch.Tensor  # [1, T] position ids (the tokens' padded columns)
    mask: torch.Tensor       # [1, 1, T, T] additive: 0 where a token may attend
    keep: torch.Tensor       # [B, S] packed index of each scored position start..L-2


def layout(att: np.ndarray, shared: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray]:
    """(rows [T], cols [T], segment [T], index [B, L]) of the packed row, host side.

    Token k of the packed row is the padded batch's (rows[k], cols[k]); segment is -1 on
    the shared prefix and b on row b's own tokens; index[b, t] is where (b, t) went
    (padding: the row's last real token, whose score the response mask drops)."""
    B, L = att.shape
    lengths = att.sum(axis=1)
    own = [np.arange(shared, n) for n in lengths]
    cols = np.concatenate([np.arange(shared)] + own)
    rows = np.concatenate([np.zeros(shared, np.int64)]
                          + [np.full(len(c), b, np.int64) for b, c in enumerate(own)])
    segment = np.concatenate([np.full(shared, -1, np.int64), rows[shared:]])
    starts = shared + np.concatenate([[0], np.cumsum([len(c) for c in own])[:-1]])
    t = np.minimum(np.arange(L)[None, :], lengths[:, None] - 1)         # padding -> last
    index = np.where(t < shared, t, starts[:, None] + t - shared)
    return rows, cols, segment, index


def allowed(segment: np.ndarray) -> np.ndarray:
    """[T, T] bool: query q may attend to key k (k <= q, and k is in q's row or in the
    shared prefix)."""
    T = segment.shape[0]
    causal = np.tri(T, dtype=bool)
    return causal & ((segment[None, :] == segment[:, None]) | (segment[None, :] == -1))


def pack(input_ids: np.ndarray, att: np.ndarray, shared: int, start: int,
         device: torch.device, dtype: torch.dtype) -> Packed:
    """The packed row of a right-padded batch (see the module docstring).

    The mask is additive in `dtype`, the attention's compute dtype (0 where allowed,
    dtype's lowest value elsewhere): eager adds it to the scores, and sdpa takes it as it
    is, where a bool mask would be turned into that same float mask again in every layer
    (3 operators each)."""
    rows, cols, segment, index = layout(att, shared)
    ok = torch.from_numpy(allowed(segment))[None, None]
    mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)
    keep = index[:, start:input_ids.shape[1] - 1]
    return Packed(torch.from_numpy(input_ids[rows, cols][None]).to(device),
                  torch.from_numpy(cols[None]).to(device), mask.to(device),
                  torch.from_numpy(np.ascontiguousarray(keep)).to(device))


@contextlib.contextmanager
def grouped_query_sdpa():
    """transformers' sdpa attention hands grouped-query heads to torch's sdpa as they are
    (enable_gqa) only when there is no mask, else it first repeats the key/value heads
    (repeat_kv: 4 operators per tensor per layer, and their backward: ~450 of SmolLM2's
    update) — a guard for CUDA, whose fused kernels take no mask with GQA. torch's CPU
    sdpa kernel takes both. TRANSFORMERS_SDPA_FORCE_GQA is transformers' own switch for
    that (integrations/sdpa_attention.use_gqa_in_sdpa, read at each call); it is set only
    around the packed forward, which runs on the CPU only (TorchBackend._pack)."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def packing_pays(att: np.ndarray, shared: int, pair_cost: float) -> bool:
    """Whether one packed row costs no more than the padded forward of the same rows.

    Cost in units of one token through the layers' matrices: tokens + pair_cost x the
    query-key pairs attention computes (padded: B causal L x L triangles; packed: the
    whole T x T square, the mask being dense). pair_cost (attention_pair_cost) is ~3e-4
    for SmolLM2, so 8 rows of 45 + 64 tokens pack (557 against 872 tokens' worth), while
    8 rows of 2,048 do not (T^2 attention would outweigh the padding saved)."""
    B, L = att.shape
    T = int(att.sum()) - (B - 1) * shared
    if B < 2 or T > MAX_PACKED:
        return False
    return T + pair_cost * T * T <= B * L + pair_cost * B * L * L / 2


def attention_pair_cost(config) -> float:
    """One query-key pair's attention FLOPs (QK and PV products: 4 x heads x head_dim)
    over one token's FLOPs through a layer's matrices (2 x its weights), per layer."""
    c = config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    weights = (c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * kv)
               + 3 * c.hidden_size * c.intermediate_size)
    return 4 * c.num_attention_heads * head_dim / (2 * weights)
