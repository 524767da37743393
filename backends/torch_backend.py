"""PyTorch backend: any transformers causal LM, on CUDA, MPS or CPU.

Rollouts come from a rollout engine (backends/torch_sampler.py: batched KV-cache
sampling, one prefill per distinct prompt); the update runs the shared GFT token loss
(gft/objective.py) through `TORCH_OPS`, with gradient accumulation over micro-batches,
global grad-norm clipping and torch AdamW.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gft.backend import OptimConfig, SamplingConfig
from backends.host_memory import keep_freed_memory
from backends.torch_head import (HEAD_AFTER_BODY, head_logprobs, logprobs_and_entropy,
                                 target_logprobs)
from backends.torch_model import (accepts_logits_to_keep, config_values, learned_position_limit,
                                  separate_head, switch_off_dropout)
from backends.torch_parallel import HEAD_METHOD
from backends.torch_pack import (PACKABLE_ATTENTION, attention_pair_cost, grouped_query_sdpa,
                                 pack, packing_pays)
from backends.torch_sampler import DynamicCache, cache_keyword, full_attention_only
from gft.modelfiles import save_tokenizer, uniform_sliding_window, write_portable_config
from gft.weights import DEFAULT_SHARD_SIZE, natural_key, parse_size
from gft.distributed import row_seeds
from gft.groups import scored_from, shared_prefix
from gft.errors import ConfigError, ModelError, first_line
from gft.objective import AGGREGATIONS, gft_token_loss
from gft.stops import Stops, apply_string_stops, model_stops
from gft.types import TokenBatch


class _TorchOps:
    """The array namespace the shared loss needs (see gft.objective.ArrayOps)."""
    exp = staticmethod(torch.exp)
    where = staticmethod(torch.where)

    @staticmethod
    def stop_gradient(x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def sum(x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        return x.sum() if axis is None else x.sum(dim=axis)

    @staticmethod
    def clamp_min(x: torch.Tensor, lo: float) -> torch.Tensor:
        return x.clamp_min(lo)


TORCH_OPS = _TorchOps()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_device(device: str) -> None:
    """A device this machine has (ConfigError otherwise), checked before any loading."""
    try:
        dev = torch.device("cuda" if device == "gpu" else device) if device != "auto" else None
    except RuntimeError:
        raise ConfigError(f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:N, "
                          "mps)") from None
    if dev is None or dev.type == "cpu":
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}': CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use device: auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{device}': this machine has {torch.cuda.device_count()} "
                          "CUDA device(s), numbered from 0")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ConfigError(f"device '{device}': MPS (Apple GPU) is not available on this "
                          "machine; use device: auto or cpu")
    if dev.type not in ("cuda", "mps"):
        raise ConfigError(f"device '{device}' is not supported by gft's torch backend "
                          "(auto, cpu, cuda, cuda:N, mps)")


def pick_device(device: str) -> torch.device:
    """auto = cuda > mps > cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def clip_gradients_(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_, same coefficient (max_norm / (norm + 1e-6), applied
    when below 1); returns the global norm before clipping, as a float.

    Float32 CPU gradients take a path of a few operators whatever the parameter count
    (SmolLM2: 272 tensors; one dot product each dispatched 816 operators, half of what one
    update's head and loss dispatch): torch._foreach_norm over the tensors of at most
    FOREACH_NORM_MOST elements, one BLAS dot product for each larger one. The larger ones
    are apart because a float32 norm over tens of millions of elements drifts (SmolLM2's
    28M-element embedding: 3e-4 off the float64 norm through _foreach_norm, 4e-5 for the
    whole through this split, as with a dot per tensor; 25 ms, against 80 ms for the dots
    and 600 ms for a float64 _foreach_norm). The gradients are multiplied only when the
    coefficient is below 1, where torch multiplies always (by 1 when not clipping: a pass
    over every gradient for nothing on a CPU). Anything else (GPU, bfloat16, FSDP2's
    sharded DTensors) goes through torch's own function."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not all(type(g) is torch.Tensor and g.device.type == "cpu"
                            and g.dtype == torch.float32 for g in grads):
        from backends.torch_parallel import local_value  # FSDP2: a DTensor
        return local_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
    small = [g for g in grads if g.numel() <= FOREACH_NORM_MOST]
    squares = torch.stack(torch._foreach_norm(small)).double().square().sum() if small \
        else torch.zeros((), dtype=torch.float64)
    for g in (g for g in grads if g.numel() > FOREACH_NORM_MOST):
        flat = g.reshape(-1)
        squares += torch.dot(flat, flat).double()
    norm = float(squares.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm


FOREACH_NORM_MOST = 1 << 22
"""Gradient elements up to which clip_gradients_ takes a tensor's norm in _foreach_norm."""


def fused_adamw(device: torch.device, strategy: str | None) -> dict:
    """AdamW's one-kernel-per-tensor implementation where torch has it (CPU, CUDA, MPS).

    Without it, torch on CPU steps parameter by parameter with ~8 separate elementwise ops
    each, reading and writing every weight, gradient and moment several times: 0.31 s of a
    3.2 s SmolLM2 update on 2 cores. Same update rule; results differ from the loop only in
    rounding. FSDP2's sharded DTensors keep the default implementation."""
    if strategy == "fsdp" or device.type not in ("cpu", "cuda", "mps"):
        return {}
    return {"fused": True}


class TorchBackend:
    name = "torch"

    def __init__(self, model, tokenizer, device: torch.device, optim: OptimConfig, *,
                 lora=None, base: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
                 strategy: str | None = None, world: int = 1, train_module=None,
                 rollout_engine: str = "policy", mixed_precision: bool = False,
                 share_prefix: bool = True, rollout_graphs: str = "auto",
                 logits_chunk: int = 1024, pack_rows: bool = True):
        """share_prefix: run leading tokens common to a micro-batch's rows once
        (_prefix_shared_scores); off under gradient checkpointing.
        pack_rows: the update's forward over a micro-batch packed into one row where that
        pays (_packed_scores, backends/torch_pack.py).
        logits_chunk: positions whose logits the update holds at a time (0: all at once).
        strategy: None (one process), "ddp" or "fsdp" (backends/torch_parallel.py), with
        `train_module` the wrapper the update runs through; `model` stays the bare
        transformers model (rollouts, saving)."""
        self.model, self.tokenizer, self.device, self.optim_cfg = model, tokenizer, device, optim
        self.lora, self.base, self.shard_size = lora, base, parse_size(shard_size)
        self.max_positions = learned_position_limit(model)  # None: no wall (RoPE, ALiBi)
        self.positions_reason = None  # the learned positions (gft.rollout.check_context)
        self.vocab_rows = model.get_input_embeddings().num_embeddings  # ids it can embed
        # what ends a completion; load() adds generation_config.json's ids, load_backend
        # the config's `stop`
        self.stops = Stops(frozenset({tokenizer.eos_token_id}))
        self.config_rates: dict[str, float] = {}  # dropout rates save_model writes back
        self.strategy, self.world = strategy, world
        self._gathered: tuple | None = None  # FSDP2: join_save's full state, to be saved
        if device.type == "cpu":  # the step's big buffers are reused, not page-faulted in
            keep_freed_memory()
        # bfloat16 compute over float32 weights: autocast here; under FSDP2 the
        # MixedPrecisionPolicy given to fully_shard does the casting instead
        self.autocast = mixed_precision and strategy != "fsdp"
        from backends.torch_sampler import ROLLOUT_ENGINES
        # what samples rollouts (a Protocol: generate(prompts, sampling, seeds), sync());
        # synced lazily, before the first rollout after an optimizer update
        self.rollout_engine = ROLLOUT_ENGINES[rollout_engine](model, tokenizer, device, strategy,
                                                              rollout_graphs)
        self._engine_stale = False
        self._keeps_logits = accepts_logits_to_keep(model)
        # Running a shared prefix once takes two forwards per backward. Under DDP the
        # prefix runs through the bare model (DDP's reducer prepares once per forward of
        # the wrapper; each parameter's gradient still arrives once, summed over both
        # forwards); FSDP2 keeps the plain forward. Full attention only (no sliding
        # windows to reason about), and a KV cache in training (gradient checkpointing
        # turns caching off).
        # On the CPU only: there the update is compute-bound and the prefix's saved FLOPs
        # are time saved (SmolLM2, 8 x (45 + 64): ~1/3 of them). On a GPU the same update
        # is bound by kernel launches, and the second forward nearly doubles them: aten ops
        # of one update, SmolLM2 shape, counted on the CPU (benchmarks/RESULTS.md,
        # --count-ops) are above TRL's with the prefix run apart and below without.
        self._share_prefix = share_prefix and device.type == "cpu" \
            and strategy in (None, "ddp") and self._keeps_logits and full_attention_only(model)
        # Packing a micro-batch into one row (backends/torch_pack.py): one forward, no
        # padding, and a shared prefix run once too. CPU only for now: on a GPU the dense
        # [T, T] mask takes sdpa off its flash kernel, and the padded rows keep it (varlen
        # flash-attention would be the GPU's way to pack; not done here).
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._pack = pack_rows and device.type == "cpu" and strategy in (None, "ddp") \
            and self._keeps_logits and full_attention_only(model) \
            and getattr(inner.config, "model_type", None) in HEAD_AFTER_BODY \
            and inner.config._attn_implementation in PACKABLE_ATTENTION
        self._pair_cost = attention_pair_cost(inner.config) if self._pack else 0.0
        # the packed row's mask keeps rows apart but knows no window: a model that slides
        # every layer over `sliding_window` tokens with no per-layer types (Mistral) packs
        # only micro-batches no longer than its window, where sliding masks nothing
        self._pack_window = uniform_sliding_window(inner.config)
        # grouped-query heads unrepeated (torch_pack.grouped_query_sdpa), except under
        # gradient checkpointing: its recomputation in the backward runs outside the
        # forward's context and would repeat them, a different layout
        self._gqa_sdpa = not any(getattr(m, "gradient_checkpointing", False)
                                 for m in inner.modules())
        # Chunked head: one process, or DDP with the decoder run through its wrapper
        # (_decoder); under FSDP2 inside a second forward of the sharded root
        # (torch_parallel.add_head_method: lm_head's weight is whole only in there)
        self.logits_chunk = logits_chunk
        split = separate_head(model) if logits_chunk > 0 and self._keeps_logits else None
        self._split = split if strategy in (None, "ddp") else None
        self._fsdp_head = strategy == "fsdp" and split is not None
        if self._fsdp_head:
            from backends.torch_parallel import add_head_method
            add_head_method(model, *split)
        self._cache_kw = cache_keyword(model.get_base_model()
                                       if hasattr(model, "get_base_model") else model)
        self.train_module = train_module if train_module is not None else model
        if lora is not None:  # only the adapters train, under their PEFT file names
            from backends.torch_lora import lora_parameters
            self.params = lora_parameters(model)
        else:
            self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=0.0, betas=(optim.beta1, optim.beta2), eps=optim.eps,
            weight_decay=optim.weight_decay, **fused_adamw(device, strategy))

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seed: int | Sequence[int]) -> list[list[int]]:
        """Batched KV-cache sampling through the rollout engine (backends/torch_sampler.py:
        one prefill, a preallocated cache, finished rows leave the batch); greedy equals
        transformers' generate."""
        if self._engine_stale:  # the first rollout since an update: hand over the weights
            self.rollout_engine.sync()
            self._engine_stale = False
        self.model.eval()
        stop_ids = tuple(sorted(self.stops.ids | set(sampling.stop_ids)))
        sampling = replace(sampling, stop_ids=stop_ids)
        # a row's draws depend on its own seed only, not on its chunk or batch
        with self._compute_dtype():
            rows = self.rollout_engine.generate(prompts, sampling,
                                                row_seeds(seed, len(prompts)))
        return apply_string_stops(rows, self.stops, self.tokenizer.decode)

    @property
    def rollout_note(self) -> str | None:
        """A line for the run's header when rollouts do something the user should expect."""
        if getattr(self.rollout_engine, "graphs", None) is None:
            return None
        how = " and replayed as a CUDA graph" if self.device.type == "cuda" else ""
        return (f"rollouts: a decode step compiled{how} (rollout_graphs); the first rollout "
                "of each batch shape compiles for tens of seconds (rollout_graphs: off "
                "decodes eagerly)")

    def _compute_dtype(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast \
            else contextlib.nullcontext()

    # ------------------------------------------------------------------ update
    def _forward(self, batch: TokenBatch, trim: bool = False, hidden: bool = False):
        """(ids, scores, start): scores are logits, or with hidden=True (a model with
        `_split`) the decoder's last hidden states, from which the chunked head makes them.

        trim=False: logits [B, L, V] of every position (start = 0).
        trim=True: [B, L - 1 - start, V or H] at positions start..L-2 only, the ones that
        predict tokens start+1..L-1 (start = scored_from(batch)). lm_head (the largest
        matmul for small models with big vocabularies: 21% of SmolLM2's FLOPs) and the
        softmax then skip the prompt and the last position, and no [B, L, V] slice has to
        be zero-filled in the backward. An index tensor, not an int, so that lm_head sees
        one contiguous [B, T, H] block (see torch_sampler.last_logits_only)."""
        ids = torch.from_numpy(batch.input_ids).to(self.device)
        att = torch.from_numpy(batch.attention).to(self.device)
        if trim and not self._keeps_logits:  # a model without logits_to_keep: slice after
            ids, logits, _ = self._forward(batch)
            return ids, logits[:, :-1], 0
        start = scored_from(batch) if trim else 0
        if trim and self._pack and (self._pack_window is None
                                    or ids.shape[1] <= self._pack_window):
            # the common prefix may run into the scored positions
            shared = shared_prefix(batch, ids.shape[1])
            if packing_pays(batch.attention, shared, self._pair_cost):
                return ids, self._packed_scores(batch, shared, start, hidden), start
        shared = shared_prefix(batch, start) if self._share_prefix else 0
        if shared:
            return ids, self._prefix_shared_scores(ids, att, shared, start, hidden), start
        keep = torch.arange(start, ids.shape[1] - 1, device=self.device) if trim else None
        with self._compute_dtype():
            out = self._scores(keep, hidden, input_ids=ids, attention_mask=att,
                               use_cache=False)
        return ids, out, start

    def _scores(self, keep: torch.Tensor | None, hidden: bool, **kw) -> torch.Tensor:
        """The training forward's output at positions `keep` (None: all): logits through
        the (possibly DDP/FSDP-wrapped) model, or the decoder's last hidden states."""
        if hidden:
            return self._decoder(**kw)[:, keep]
        keep_kw = {} if keep is None else {"logits_to_keep": keep}
        return self.train_module(**kw, **keep_kw).logits

    def _decoder(self, **kw) -> torch.Tensor:
        """The decoder's last hidden states for the chunked head; under DDP through its
        wrapper (torch_parallel.DecoderOrModel), so that the backward all-reduces."""
        if self.strategy == "ddp":
            return self.train_module(decoder=True, **kw)
        return self._split[0](**kw).last_hidden_state

    def _packed_scores(self, batch: TokenBatch, shared: int, start: int,
                       hidden: bool) -> torch.Tensor:
        """The scores (_forward) of positions start..L-2, [B, S, V or H], from ONE forward
        over the micro-batch's real tokens packed into one row (backends/torch_pack.py):
        the shared prefix once, then each row's own tokens, position ids from the padded
        columns and a mask that keeps the rows apart. Same function of the weights as the
        padded forward (so the same loss and gradients, up to rounding); `keep` gathers the
        scored positions back into the padded [B, S] layout."""
        # the mask in the attention's dtype (the embedding's: never a quantized weight)
        dtype = torch.bfloat16 if self.autocast \
            else self.model.get_input_embeddings().weight.dtype
        p = pack(batch.input_ids, batch.attention, shared, start, self.device, dtype)
        kw = {"input_ids": p.ids, "attention_mask": p.mask, "position_ids": p.positions,
              "use_cache": False}
        gqa = grouped_query_sdpa() if self._gqa_sdpa else contextlib.nullcontext()
        with self._compute_dtype(), gqa:
            if hidden:
                return self._decoder(**kw)[0, p.keep]
            logits = self.train_module(**kw, logits_to_keep=p.keep.reshape(-1)).logits
        return logits.view(*p.keep.shape, logits.shape[-1])

    def _prefix_shared_scores(self, ids: torch.Tensor, att: torch.Tensor, shared: int,
                              start: int, hidden: bool) -> torch.Tensor:
        """The scores (_forward) of positions start..L-2 with the `shared` leading tokens
        that every row has in common run ONCE: one row's forward over them fills a KV
        cache, whose keys/values are expanded (a view) to all B rows for the forward over
        the rest.

        The same function of the weights as the full forward, so the same gradient: the
        expand's backward sums the rows' gradients into the one shared computation. GRPO's
        G rollouts of one prompt, or a system prompt common to the micro-batch, then cost
        one row instead of G (SmolLM2, 8 rows of a 45-token prompt + 64 tokens: ~1/3 of
        the update's FLOPs)."""
        B, L = ids.shape
        cache = DynamicCache()
        kv = {self._cache_kw: cache, "use_cache": True}
        nothing = torch.zeros(0, dtype=torch.long, device=self.device)
        with self._compute_dtype():
            # One embedding lookup for both parts: its backward builds a dense [V, H]
            # gradient (113 MB for SmolLM2), so two lookups would build and add two.
            embed = self.model.get_input_embeddings()(
                torch.cat([ids[0, :shared], ids[:, shared:].reshape(-1)]))
            if hidden:  # the prefix's own outputs are not needed, only its cache
                self._split[0](inputs_embeds=embed[None, :shared], **kv)
            else:
                self.model(inputs_embeds=embed[None, :shared], logits_to_keep=nothing, **kv)
            for layer in cache.layers:
                layer.keys = layer.keys.expand(B, -1, -1, -1)
                layer.values = layer.values.expand(B, -1, -1, -1)
            positions = torch.arange(shared, L, device=self.device)[None].expand(B, -1)
            keep = torch.arange(start - shared, L - shared - 1, device=self.device)
            rest = embed[shared:].view(B, L - shared, embed.shape[-1])
            return self._scores(keep, hidden, inputs_embeds=rest, attention_mask=att,
                                position_ids=positions, **kv)

    def accumulate_gradients(self, micro_batches: Sequence[TokenBatch], *, tau: float,
                             aggregation: str) -> dict[str, float]:
        """Zero the gradients, then forward/backward every micro-batch, adding up."""
        aggregate = AGGREGATIONS[aggregation]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # summed on the device and read once at the end: a float() per micro-batch would
        # make the host wait for the GPU before it could queue the next micro-batch's work
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS: no float64
        sums = torch.zeros(3, dtype=wide, device=self.device)  # loss, entropy sum, tokens
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            # DDP all-reduces in backward: only once per update, on the last micro-batch
            sync = self.train_module.no_sync() if self.strategy == "ddp" and i < last \
                else contextlib.nullcontext()
            with sync:
                loss, entropy, mask = self._micro_batch_loss(mb, tau, aggregate)
                # DDP / FSDP2 average over ranks; each rank's loss already uses the
                # global denominators, so scaling by world makes the average a sum
                (loss * self.world if self.world > 1 else loss).backward()
            sums += torch.stack([loss.detach(), (entropy * mask).sum(), mask.sum()]).to(sums)
        loss_sum, ent_sum, n_tok = sums.tolist()
        return {"loss": loss_sum, "entropy": ent_sum / max(n_tok, 1.0), "tokens": n_tok}

    def _micro_batch_loss(self, mb: TokenBatch, tau: float, aggregate):
        """(GFT loss, per-position entropy, response mask) over the scored positions."""
        start, logp, entropy = self._update_logprobs(mb)
        mask = torch.from_numpy(mb.response_mask[:, start + 1:]).to(self.device, torch.float32)
        adv = torch.from_numpy(mb.advantages).to(self.device, torch.float32)
        loss = gft_token_loss(TORCH_OPS, logp, mask, adv, tau=tau, aggregation=aggregate,
                              n_tokens=mb.n_tokens, n_seqs=mb.n_seqs)
        return loss, entropy, mask

    def _update_logprobs(self, mb: TokenBatch) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(start, log p [B, T] with gradient, entropy [B, T]) of the tokens start+1..L-1,
        through whichever head this backend runs: chunked (at most logits_chunk positions'
        logits at a time) in one process, under DDP or under FSDP2, else whole logits."""
        if self._fsdp_head:
            start = scored_from(mb)
            return (start, *self._decoder_head_logprobs(mb, start))
        chunked = self._split is not None and self._keeps_logits  # tests turn the latter off
        ids, scores, start = self._forward(mb, trim=True, hidden=chunked)
        targets = ids[:, start + 1:]
        if chunked:
            with self._compute_dtype():
                return (start, *head_logprobs(scores, self._split[1].weight, targets,
                                              self.logits_chunk))
        return (start, *logprobs_and_entropy(scores, targets))

    def _decoder_head_logprobs(self, batch: TokenBatch,
                               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p, entropy) [B, L-1-start] of tokens start+1..L-1 from one plain decoder
        forward and the chunked head: under FSDP2 both inside one forward of the sharded
        root (torch_parallel.add_head_method), else the decoder and lm_head of `_split`."""
        ids = torch.from_numpy(batch.input_ids).to(self.device)
        kw = {"input_ids": ids, "attention_mask": torch.from_numpy(batch.attention).to(self.device),
              "use_cache": False}
        keep, targets = slice(start, ids.shape[1] - 1), ids[:, start + 1:]
        with self._compute_dtype():
            if self._fsdp_head:
                return getattr(self.model, HEAD_METHOD)(targets, keep, self.logits_chunk, **kw)
            hidden = self._split[0](**kw).last_hidden_state[:, keep]
            return head_logprobs(hidden, self._split[1].weight, targets, self.logits_chunk)

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients, float32 NumPy, by parameter name (for tests)."""
        from backends.torch_parallel import full_tensor
        return {n: full_tensor(p.grad if p.grad is not None else torch.zeros_like(p))
                .float().cpu().numpy() for n, p in self.params.items()}

    def apply_update(self, lr: float) -> tuple[float, bool]:
        """Clip to max_grad_norm, then one AdamW step at `lr`; skip it if not finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.optim_cfg.max_grad_norm or math.inf
        grad_norm = clip_gradients_(list(self.params.values()), max_norm)
        if not math.isfinite(grad_norm):  # must not touch the weights or the moments
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, True
        self.optimizer.step()
        self._engine_stale = True
        return grad_norm, False

    def train_step(self, micro_batches: Sequence[TokenBatch], lr: float, *, tau: float,
                   aggregation: str) -> dict[str, float]:
        stats = self.accumulate_gradients(micro_batches, tau=tau, aggregation=aggregation)
        # One process: a non-finite loss skips at once. Several: a rank's NaN reaches every
        # rank through the gradient reduction, so the grad-norm check below skips on all.
        if self.world == 1 and not math.isfinite(stats["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            return {**stats, "grad_norm": float("nan"), "skipped": 1.0}
        grad_norm, skipped = self.apply_update(lr)
        return {**stats, "grad_norm": grad_norm, "skipped": float(skipped)}

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch) -> np.ndarray:
        """log p of each next token [B, L-1]; with the head apart (`_split`), through it
        `logits_chunk` positions at a time, as the update does: evaluating long responses
        over a big vocabulary holds one chunk's logits, not B x L x V."""
        self.model.eval()
        if self._split is None and not self._fsdp_head:
            ids, logits, _ = self._forward(batch)
            return target_logprobs(logits, ids).cpu().numpy()
        return self._decoder_head_logprobs(batch, 0)[0].float().cpu().numpy()

    # ------------------------------------------------------------------ state
    def save_model(self, path: Path) -> None:
        """The Hugging Face directory (shards above shard_size, in natural name order as the
        MLX backend writes them), or with LoRA the PEFT adapter directory."""
        path = Path(path)
        if self.lora is not None:
            from backends.torch_lora import save_adapter
            # peft turns fan_in_fan_out on where it meets GPT-2's Conv1D ([in, out] weights);
            # the adapter must say so, or a fuse adds B·A untransposed
            lora = replace(self.lora, fan_in_fan_out=bool(getattr(
                self.model.peft_config["default"], "fan_in_fan_out", False)))
            save_adapter(path, self.params, lora, self.base,
                         getattr(getattr(self.model, "config", None), "quantization_config", None))
            save_tokenizer(self.tokenizer, path)  # the adapter travels with its tokenizer
            return
        state = self._gathered[0] if self._gathered else self._full_state()
        ordered = {k: state[k] for k in sorted(state, key=natural_key)}
        with config_values(self.model.config, self.config_rates):
            self.model.save_pretrained(path, state_dict=ordered, max_shard_size=self.shard_size)
        save_tokenizer(self.tokenizer, path)
        write_portable_config(path)

    def _full_state(self) -> dict[str, torch.Tensor]:
        if self.strategy == "fsdp":
            from backends.torch_parallel import full_model_state
            return full_model_state(self.model)
        return self.model.state_dict()

    def join_save(self) -> None:
        """Every rank, before rank 0's save_model and save_optimizer: the collectives of the
        save. FSDP2 gathers the full weights and AdamW moments here (full on rank 0, empty
        elsewhere), which those two then write: rank 0 touches the disk only once no rank
        is inside a gather, so a save that fails there (a full disk) can stop every rank
        with its error (gft.distributed.together) instead of leaving them in a gather."""
        if self.strategy == "fsdp":
            from backends.torch_parallel import full_optimizer_state
            self._gathered = None  # the last save's, if it failed: freed before gathering
            self._gathered = (self._full_state(),
                              full_optimizer_state(self.model, self.optimizer))

    def save_optimizer(self, path: Path) -> None:
        if self.strategy == "fsdp":
            from backends.torch_parallel import full_optimizer_state
            gathered, self._gathered = self._gathered, None
            tensors, step = gathered[1] if gathered else \
                full_optimizer_state(self.model, self.optimizer)
            save_file(tensors, str(path), metadata={"format": "gft-adamw", "step": str(step)})
            return
        tensors, step = {}, 0
        for name, p in self.params.items():
            state = self.optimizer.state.get(p)
            if not state:
                continue
            step = int(state["step"])
            tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
        save_file(tensors, str(path), metadata={"format": "gft-adamw", "step": str(step)})

    def load_optimizer(self, path: Path) -> None:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {}).get("step", 0))
        tensors = load_file(str(path))
        if self.strategy == "fsdp" and tensors:
            from backends.torch_parallel import load_full_optimizer_state
            missing = [n for n in self.params if f"exp_avg.{n}" not in tensors]
            if missing:
                raise ModelError(f"{path}: no optimizer state for parameter '{missing[0]}' "
                                 "(checkpoint from a different model?)")
            load_full_optimizer_state(self.model, self.optimizer, tensors, step,
                                      list(self.params))
            return
        for name, p in self.params.items():
            if f"exp_avg.{name}" not in tensors:
                if tensors:
                    raise ModelError(f"{path}: no optimizer state for parameter '{name}' "
                                     "(checkpoint from a different model?)")
                continue
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"exp_avg.{name}"].to(p.device, p.dtype),
                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device, p.dtype)}

    def named_parameters(self) -> dict[str, np.ndarray]:
        # copy: for float32 CPU tensors .numpy() is a live view of the weights
        from backends.torch_parallel import full_tensor
        return {n: full_tensor(p.detach()).float().cpu().numpy().copy()
                for n, p in self.params.items()}


def _quiet_transformers() -> None:
    """Our progress bar is the one users read; transformers' per-load bars are noise."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load(model_path: str, *, dtype: str = "float32", device: str = "auto",
         optim: OptimConfig = OptimConfig(), seed: int = 0, trust_remote_code: bool = False,
         gradient_checkpointing: bool = False, lora=None, adapter: str | None = None,
         shard_size: str | int = DEFAULT_SHARD_SIZE, parallel: str | None = None,
         world: int = 1, rollout_engine: str = "policy",
         mixed_precision: bool = False, rollout_graphs: str = "auto",
         logits_chunk: int = 1024, load_in_4bit: bool = False,
         disable_dropout: bool = True) -> TorchBackend:
    """lora (a gft.lora.LoraConfig): train adapters on the frozen model at model_path,
    fresh or loaded from the PEFT directory `adapter`.
    parallel: "ddp" or "fsdp" when started by torchrun with world > 1 processes (the
    process group already set up), else None.
    rollout_engine: "policy" (sample from the training weights) or "bfloat16" (from a
    bfloat16 copy refreshed after each update).
    mixed_precision: bfloat16 compute, float32 weights, gradients and AdamW moments.
    rollout_graphs: auto | on | off, decoding through a compiled step replayed as CUDA
    graphs (torch_sampler.GraphDecoder); auto = on CUDA.
    logits_chunk: positions whose [., V] logits the update holds at a time (0: all).
    load_in_4bit: QLoRA, the frozen base in 4-bit through bitsandbytes (torch_lora.py).
    disable_dropout: the model's own dropout off in the update (switch_off_dropout)."""
    _check_load_options(dtype, mixed_precision, parallel, world, lora, rollout_engine)
    _quiet_transformers()
    check_device(device)
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    torch.manual_seed(seed)
    from gft.modelfiles import load_tokenizer, tokenizer_source
    tokenizer = load_tokenizer(tokenizer_source(model_path, adapter),
                               trust_remote_code=trust_remote_code)
    model = _load_model(model_path, DTYPES[dtype], dev, trust_remote_code, load_in_4bit)
    if gradient_checkpointing:  # renamed in transformers 5; keep working on 4.x
        enable = getattr(model, "activation_checkpointing_enable", None) or \
            model.gradient_checkpointing_enable
        enable()
    config_rates = switch_off_dropout(model) if disable_dropout else {}
    if lora is not None:
        from backends.torch_lora import apply_lora
        model = apply_lora(model, lora, seed, adapter)
    train_module = None
    if parallel is not None and world > 1:
        from backends.torch_parallel import wrap
        train_module = wrap(model, parallel, dev, mixed_precision=mixed_precision)
    backend = TorchBackend(model, tokenizer, dev, optim, lora=lora, base=str(Path(model_path)),
                           shard_size=shard_size, strategy=parallel if world > 1 else None,
                           world=world, train_module=train_module, rollout_engine=rollout_engine,
                           mixed_precision=mixed_precision,
                           share_prefix=not gradient_checkpointing, rollout_graphs=rollout_graphs,
                           logits_chunk=logits_chunk)
    backend.stops = model_stops(tokenizer, model_path)
    backend.config_rates = config_rates
    return backend


def _check_load_options(dtype: str, mixed_precision: bool, parallel: str | None, world: int,
                        lora, rollout_engine: str) -> None:
    """Options that cannot go together, refused before minutes of loading."""
    if mixed_precision and dtype != "float32":
        raise ConfigError("mixed_precision keeps float32 master weights: set dtype: float32 "
                          "(or turn mixed_precision off to train in bfloat16 throughout)")
    sharded = parallel == "fsdp" and world > 1
    if sharded and lora is not None:
        raise ConfigError("parallel: fsdp with LoRA is not supported; use parallel: ddp "
                          "(adapters are small: every rank can hold them)")
    if sharded and rollout_engine == "bfloat16":
        raise ConfigError("rollout_engine: bfloat16 needs the whole model on every rank; "
                          "with parallel: fsdp use rollout_engine: policy")


def _load_model(model_path: str, dtype, dev, trust_remote_code: bool, load_in_4bit: bool):
    """transformers' causal LM at model_path on `dev`, every weight checked as loaded; a
    4-bit QLoRA base is placed by bitsandbytes itself (no model.to())."""
    from transformers import AutoModelForCausalLM
    from gft.modelfiles import check_loaded_weights
    quantized = {}
    if load_in_4bit:
        from backends.torch_lora import qlora_load_kwargs
        quantized = qlora_load_kwargs(dtype, dev)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code,
            output_loading_info=True, **quantized)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{model_path}: cannot load the model: {first_line(e)}") from None
    check_loaded_weights(model_path, info["missing_keys"], info["unexpected_keys"],
                         info.get("mismatched_keys", []))
    if not quantized:
        model.to(dev)
    return model
