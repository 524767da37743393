"""The update's head on MLX: hidden states -> log p of each target token and entropy.

The MLX twin of backends/torch_head.py. `head_logprobs` runs lm_head, the log-softmax and
the entropy `chunk` positions at a time, through an `mx.custom_function` whose vjp makes
each chunk's logits again instead of keeping every chunk's [chunk, V] logits alive until
the backward, so the update's extra memory is one chunk x V, not B x T x V.
The GFT math stays in gft/objective.py, over the [B, T] log-probs.
Shapes: B sequences, T positions, H hidden size, V vocabulary.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def target_logprobs(logits: mx.array, input_ids: mx.array) -> mx.array:
    """log p of each next token: [B, L, V] logits, [B, L] ids -> [B, L-1] float32."""
    logits = logits[:, :-1].astype(mx.float32)
    picked = mx.take_along_axis(logits, input_ids[:, 1:, None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def token_entropy(logits: mx.array) -> mx.array:
    """Entropy of the next-token distribution at each position: [B, L, V] -> [B, L-1]."""
    logits = mx.stop_gradient(logits[:, :-1].astype(mx.float32))
    logz = mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logits - logz)
    return logz.squeeze(-1) - mx.sum(probs * logits, axis=-1)


def head_weight(model: nn.Module) -> mx.array | None:
    """lm_head's [V, H] weight when the head is a plain bias-free Linear (or the tied
    embedding used as one), else None (quantized or LoRA-wrapped heads: not chunked).
    Read at call time: inside nn.value_and_grad it is the traced parameter."""
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        embed = model.model.embed_tokens
        return embed.weight if type(embed) is nn.Embedding else None
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or "bias" in head:
        return None
    return head.weight


def _chunk_stats(h: mx.array, w: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """[n, H] hidden, [V, H] weight, [n] targets -> (log p [n], entropy [n] no gradient)."""
    z = (h @ w.T).astype(mx.float32)
    logz = mx.logsumexp(z, axis=-1)
    logp = mx.take_along_axis(z, targets[:, None], axis=-1).squeeze(-1) - logz
    zs, lzs = mx.stop_gradient(z), mx.stop_gradient(logz)
    entropy = lzs - mx.sum(mx.exp(zs - lzs[:, None]) * zs, axis=-1)
    return logp, entropy


def head_logprobs(hidden: mx.array, weight: mx.array, targets: mx.array,
                  chunk: int) -> tuple[mx.array, mx.array]:
    """[B, T, H] last hidden states, lm_head's [V, H] weight, [B, T] targets ->
    (log p [B, T], entropy [B, T] without gradient), `chunk` positions at a time (0 or
    a batch within one chunk: the logits in one piece, nothing recomputed)."""
    B, T, H = hidden.shape
    h, t = hidden.reshape(-1, H), targets.reshape(-1)
    if chunk <= 0 or B * T <= chunk:
        logp, entropy = _chunk_stats(h, weight, t)
    else:
        logp, entropy = _chunked(chunk)(h, weight, t)
    return logp.reshape(B, T), mx.stop_gradient(entropy).reshape(B, T)


_CHUNKED: dict = {}


def _chunked(chunk: int):
    """The chunked head as an mx.custom_function: forward and vjp loop over chunks of
    positions, each chunk made to wait for everything the previous one produced
    (mx.depends), so its logits are free before the next chunk's are made.
    Measured (8,192 positions, V 4,096, H 64, chunks of 64, forward + backward): 18 MB of
    peak against 259 MB in one piece. Left to MLX's lazy graph (each chunk under
    mx.checkpoint, no ordering), the evaluator ran chunks side by side and every chunk's
    [V, H] contribution to the weight's gradient waited for the final sum: 102 MB, growing
    with positions (at Qwen2.5's vocabulary and H 1,536, 0.9 GB per chunk). mx.eval per
    chunk does not help inside a vjp: the traced forward keeps its arrays (132 MB)."""
    if chunk in _CHUNKED:
        return _CHUNKED[chunk]

    @mx.custom_function
    def head(h, w, t):
        logps, entropies = [], []
        for i in range(0, h.shape[0], chunk):
            # after both results of the previous chunk, whose logits are then free
            hc = mx.depends(h[i:i + chunk], [logps[-1], entropies[-1]]) if logps \
                else h[i:i + chunk]
            logp, entropy = _chunk_stats(hc, w, t[i:i + chunk])
            logps.append(logp)
            entropies.append(entropy)
        return mx.concatenate(logps), mx.concatenate(entropies)

    @head.vjp
    def head_vjp(primals, cotangents, _outputs):
        h, w, t = primals
        grad_logp = cotangents[0].astype(mx.float32)
        grad_h, grad_w = [], mx.zeros(w.shape, dtype=mx.float32)
        for i in range(0, h.shape[0], chunk):
            # after the previous chunk's sum: one chunk's logits at a time
            hc = mx.depends(h[i:i + chunk], [grad_w, grad_h[-1]]) if grad_h \
                else h[i:i + chunk]
            tc, g = t[i:i + chunk], grad_logp[i:i + chunk, None]
            p = mx.softmax((hc @ w.T).astype(mx.float32), axis=-1)
            onehot = mx.arange(w.shape[0])[None, :] == tc[:, None]
            grad_z = ((onehot.astype(mx.float32) - p) * g).astype(h.dtype)  # d log p / dz
            grad_h.append(grad_z @ w)
            # float32 running sum over the chunks, as one matmul over all N would keep
            grad_w = grad_w + (grad_z.T @ hc).astype(mx.float32)
        return mx.concatenate(grad_h), grad_w.astype(w.dtype), mx.zeros_like(t)

    _CHUNKED[chunk] = head
    return head
