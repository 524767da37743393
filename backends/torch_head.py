"""The update's head on torch: hidden states -> log p of each target token and entropy.

Two paths, the same numbers up to float rounding:
- `logprobs_and_entropy` over logits the model made ([B, T, V] in one piece), with one
  softmax serving log-probs, entropy and backward (TokenLogProbs);
- `head_logprobs` over the last hidden states [B, T, H] and the lm_head weight [V, H],
  `chunk` positions at a time (ChunkedHead): a chunk's logits are made, reduced to log p
  and entropy, and dropped; the backward makes them again. The update's extra memory is
  then one chunk x V instead of B x T x V — at Qwen2.5's 151,936-token vocabulary, 8
  responses of 2,048 tokens are 10 GB of float32 logits, a chunk of 1,024 positions 0.6 GB.

The GFT math stays in gft/objective.py: it only sees log p [B, T] (small), whatever the
path. Shapes: N positions (B x T flattened), V vocabulary, H hidden size.
"""
from __future__ import annotations

import torch

HEAD_AFTER_BODY = ("llama", "qwen2", "qwen3", "mistral")
"""transformers model types whose ForCausalLM.forward is exactly: the decoder's
last_hidden_state, sliced to logits_to_keep, through lm_head (no soft-capping or logit
scale in between), so the head can be run apart from the body."""


def target_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p of each next token: [B, L, V] logits, [B, L] ids -> [B, L-1].

    Gather minus logsumexp instead of a full log_softmax: one [B, L-1, V] buffer fewer.
    """
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def logprobs_and_entropy(logits: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] logits at the positions that predict `targets` [B, T] ->
    (log p of each target [B, T], with gradient; entropy of each position [B, T], without).

    One softmax serves the log-probs, the entropy and the backward (TokenLogProbs)."""
    return TokenLogProbs.apply(logits.float(), targets)


def softmax_rows(z: torch.Tensor) -> int:
    """Rows of [N, V] logits that softmax_stats_ processes at a time.

    On the CPU, ~8 MB at a time: logsumexp's temporary stays that small and is reused,
    and the only [N, V] buffer made is the softmax itself, written once. Over the whole
    tensor at once, each step allocated and page-faulted its own 100 MB temporary
    (SmolLM2, 8 x 64 positions). Not smaller: each chunk dispatches 8 operators, and at
    1 MB (5 of SmolLM2's 49,152-wide rows) its 512 positions took 103 chunks, ~1,100
    operators, a seventh of the whole update's (benchmarks/RESULTS.md, --count-ops);
    timed here (on a busy machine) 1 MB chunks were no faster than 4 or 8 MB ones.
    GPUs take it in one piece."""
    if z.device.type != "cpu":
        return max(1, z.shape[0])
    return max(1, (1 << 21) // z.shape[-1])


def softmax_stats_(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes softmax(z) into p ([N, V] each, float32); returns (logZ [N], entropy [N])
    with H = logZ - sum(p * z) (a dot product per row: no [N, V] product is made)."""
    logz = z.new_empty(z.shape[0])
    pz = z.new_empty(z.shape[0])  # sum(p * z) per row
    step = softmax_rows(z)
    for i in range(0, z.shape[0], step):
        zc, pc, lz = z[i:i + step], p[i:i + step], logz[i:i + step]
        torch.logsumexp(zc, dim=-1, out=lz)
        torch.sub(zc, lz[:, None], out=pc).exp_()
        torch.linalg.vecdot(pc, zc, out=pz[i:i + step])
    return logz, logz - pz


class TokenLogProbs(torch.autograd.Function):
    """log p = z_target - logZ and H = logZ - sum(p * z), with p = softmax(z) made once.

    The backward is d log p / dz = onehot(target) - p, written into the saved p in place:
    autograd's own graph for the same formulas would materialize the [B, T, V] softmax
    again in logsumexp's backward, a zero-filled gather gradient and their sum — ~5 more
    passes over a 100 MB tensor for SmolLM2 at 8 x 64 positions (0.35 -> 0.23 s here).
    once_differentiable: the in-place backward cannot be run twice or differentiated."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        V = logits.shape[-1]
        z = logits.reshape(-1, V)                                          # [N, V]
        p = torch.empty_like(z)
        logz, entropy = softmax_stats_(z, p)
        logp = z.gather(-1, targets.reshape(-1, 1)).squeeze(-1) - logz
        ctx.save_for_backward(p, targets)
        ctx.logits_shape = logits.shape
        entropy = entropy.view(targets.shape)
        ctx.mark_non_differentiable(entropy)
        return logp.view(targets.shape), entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy):
        p, targets = ctx.saved_tensors
        g = grad_logp.reshape(-1, 1)
        grad = p.mul_(-g)
        grad.scatter_add_(-1, targets.reshape(-1, 1), g)
        return grad.view(ctx.logits_shape), None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, H] last hidden states, lm_head's [V, H] weight, [B, T] targets ->
    (log p [B, T] with gradient, entropy [B, T] without), `chunk` positions at a time.

    Up to one chunk of positions the logits are made once and kept for the backward
    (TokenLogProbs: no recomputation when it would save nothing); beyond, ChunkedHead."""
    dtype = compute_dtype(hidden)
    if chunk <= 0 or targets.numel() <= chunk:
        with torch.autocast(hidden.device.type, enabled=False):
            logits = hidden.to(dtype) @ weight.to(dtype).T
        return logprobs_and_entropy(logits, targets)
    logp, entropy = ChunkedHead.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                      targets.reshape(-1), chunk, dtype)
    return logp.view(targets.shape), entropy.view(targets.shape)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's (mixed precision) when on, else the hidden's."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


class ChunkedHead(torch.autograd.Function):
    """log p and entropy of N positions through lm_head, `chunk` rows of [N, V] logits at a
    time; only [N]-sized results are kept for the backward (logZ), which makes each chunk's
    logits again: grad z = (onehot(target) - p) * grad_logp, then grad h = grad_z W and
    grad W += grad_z^T h. One recomputed head matmul is the price of the memory (Liger
    Kernel's fused linear cross-entropy pays none by taking the gradient in the forward, but
    the GFT loss's weights are only known after the forward: gft/objective.py)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype):
        N, V = hidden.shape[0], weight.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # softmax dtype: float32 or 64
        logp = hidden.new_empty(N, dtype=acc)
        logz, entropy = torch.empty_like(logp), torch.empty_like(logp)
        z_buf = hidden.new_empty(min(chunk, N), V, dtype=acc)
        p_buf = torch.empty_like(z_buf)
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, N, chunk):
                n = min(chunk, N - i)
                z, p = _logits_into(z_buf[:n], hidden[i:i + n].to(dtype), w), p_buf[:n]
                logz[i:i + n], entropy[i:i + n] = softmax_stats_(z, p)
                logp[i:i + n] = z.gather(-1, targets[i:i + n, None]).squeeze(-1) - logz[i:i + n]
        ctx.save_for_backward(hidden, weight, targets, logz)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy):
        hidden, weight, targets, logz = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        N, V = hidden.shape[0], weight.shape[0]
        acc = logz.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 accumulation over the chunks, as one matmul over all N would do inside
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if need_w else None
        z_buf = hidden.new_empty(min(chunk, N), V, dtype=acc)
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, N, chunk):
                n = min(chunk, N - i)
                h = hidden[i:i + n].to(dtype)
                p = _logits_into(z_buf[:n], h, w).sub_(logz[i:i + n, None]).exp_()
                g = grad_logp[i:i + n, None].to(acc)
                grad_z = p.mul_(-g).scatter_add_(-1, targets[i:i + n, None], g).to(dtype)
                if need_h:
                    torch.mm(grad_z, w, out=grad_h[i:i + n]) if grad_h.dtype == dtype \
                        else grad_h[i:i + n].copy_(grad_z @ w)
                if need_w:
                    grad_w.addmm_(grad_z.T.to(acc), h.to(acc))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T in out's dtype into `out` (a reused buffer: no [chunk, V] allocation per
    chunk when the matmul is in that dtype already)."""
    if h.dtype == out.dtype:
        return torch.mm(h, w.T, out=out)
    return out.copy_(h @ w.T)
