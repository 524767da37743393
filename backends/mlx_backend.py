"""MLX backend: any mlx-lm causal LM, on Apple silicon (Metal) or Linux (`mlx[cpu]`).

Mirrors backends/torch_backend.py method for method, so the loop cannot tell them apart:
- rollouts are a batched KV-cache decode loop (backends/mlx_sampler.py): left-padded
  prompts in mlx-lm's `BatchKVCache`, whose per-row RoPE offsets and padding mask give
  every row the positions an unpadded run would see, each row drawing from its own seeded
  uniforms
  (gft.distributed.uniform_table), so a row samples the same tokens in any batch or rank;
- the update runs the shared GFT token loss (gft/objective.py) through `MLX_OPS`, with
  gradient accumulation, global grad-norm clipping and an AdamW written out below;
- checkpoints are the same Hugging Face directory and backend-neutral optimizer file the
  torch backend writes, so a run can move between the two.

Deliberate choices:
- AdamW is hand-written rather than `mlx.optimizers.AdamW`: its moments and step must be
  saved and loaded by Hugging Face parameter name, and the arithmetic is torch's
  (decoupled decay before the moments, lerp'd first moment, denom = sqrt(v)/sqrt(bc2) + eps,
  step size lr/bc1) so that the two backends' weights agree after any number of updates.
- mlx-lm's `batch_generate` is not used: it leaves the stop token out of its results,
  wants mlx-lm's tokenizer wrapper (not the transformers tokenizer both backends share)
  and samples from the global RNG inside `BatchGenerator`'s continuous batching. The loop
  below decodes as fast (same model, same rows: within 3% on CPU), keeps EOS, drops
  finished rows from the batch and is seeded per row.
- Data parallel (mlx.launch, gft/distributed.py): gradients are summed over ranks with
  `mx.distributed.all_sum` after accumulation (each rank's loss already has the global
  denominators); every rank then takes the same clipped AdamW step.
- Parameter names are mlx-lm's (`tree_flatten`), which equal transformers' for dense
  Llama/Qwen2-style models; architectures whose `sanitize` renames weights save under
  mlx-lm names, which mlx-lm (and this backend) still load.
Shapes: B sequences, L tokens, V vocabulary.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from gft.backend import OptimConfig, SamplingConfig
from backends.mlx_sampler import decode_batch
from backends.mlx_head import head_logprobs, head_weight, target_logprobs, token_entropy
from gft.modelfiles import save_tokenizer, write_portable_config
from gft.weights import DEFAULT_SHARD_SIZE, write_weights
from gft.distributed import row_seeds
from gft.errors import ConfigError, ModelError
from gft.groups import scored_from, shared_prefix
from gft.objective import AGGREGATIONS, gft_token_loss
from gft.stops import apply_string_stops, model_stops
from gft.types import TokenBatch


class _MlxOps:
    """The array namespace the shared loss needs (see gft.objective.ArrayOps)."""
    exp = staticmethod(mx.exp)
    where = staticmethod(mx.where)
    stop_gradient = staticmethod(mx.stop_gradient)

    @staticmethod
    def sum(x: mx.array, axis: int | None = None) -> mx.array:
        return mx.sum(x, axis=axis)

    @staticmethod
    def clamp_min(x: mx.array, lo: float) -> mx.array:
        return mx.maximum(x, lo)


MLX_OPS = _MlxOps()
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
HEAD_AFTER_BODY = ("llama", "qwen2", "qwen3")
"""mlx-lm model types whose Model.__call__ is exactly body, then lm_head (or the tied
embedding as a linear): nothing else (no logit soft-capping, as in gemma2) in between."""


def split_head(model: nn.Module):
    """(body, head) with model(ids) == head(body(ids)), or None for other model types.

    The update needs logits only from the position before the first response token on
    (gft.groups.scored_from); with the head apart, lm_head — the largest matrix of a small
    model with a big vocabulary — and the softmaxes skip the prompt."""
    if getattr(model, "model_type", None) not in HEAD_AFTER_BODY:
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        return model.model, model.model.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (model.model, head) if head is not None else None


class PrefixKV:
    """A KV cache for training, in mlx-lm's cache interface (offset, update_and_fetch,
    make_mask): one row's forward over the prefix every row shares fills it, `expand`
    broadcasts it to B rows, and the forward over the rest attends to it. Unlike mlx-lm's
    KVCache (a preallocated buffer written by slice), keys grow by concatenation, and the
    broadcast's gradient sums the rows' gradients into the one prefix computation: the
    same function of the weights as the full forward. GRPO's G rollouts of one prompt
    then cost the prompt once (SmolLM2, 45 of 109 tokens)."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # positions cached before this call: the RoPE offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        # MLX's "causal" aligns the n queries with the last n keys (bottom right)
        if return_array:
            from mlx_lm.models.base import create_causal_mask
            return create_causal_mask(n, self.offset)
        return "causal" if n > 1 else None

    def expand(self, rows: int) -> None:
        self.keys = mx.broadcast_to(self.keys, (rows, *self.keys.shape[1:]))
        self.values = mx.broadcast_to(self.values, (rows, *self.values.shape[1:]))


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (activation checkpointing).

    Like mlx_lm.tuner.trainer.grad_checkpoint, but the wrapped __call__ goes on a subclass
    made for these instances only, so other models in the process are left alone, and it
    applies in training mode only (generation passes KV caches, and needs no backward).
    """
    for layer in getattr(model, "layers", []):
        base = type(layer)

        def call(self, *args, _base=base, **kwargs):
            if not self.training:
                return _base.__call__(self, *args, **kwargs)

            def inner(params, *a, **kw):
                self.update(params)
                return _base.__call__(self, *a, **kw)
            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(base.__name__, (base,), {"__call__": call})


def adamw_tensor_update(c: OptimConfig):
    """torch.optim.AdamW's single-tensor update, term for term, for one parameter.

    clip = the grad-norm clipping factor (torch multiplies the gradients by it first),
    decay = 1 - lr*wd, step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
    Every stored result is rounded to the parameter's dtype, as torch's in-place ops do.
    """
    def update(p, g, m, v, clip, decay, step_size, bc2_sqrt):
        dt = p.dtype
        g = (g * clip).astype(g.dtype)                               # clip_grad_norm_
        p = (p * decay).astype(dt)                                   # param.mul_(decay)
        m = (m + (g - m) * (1 - c.beta1)).astype(dt)                 # exp_avg.lerp_(g, 1-b1)
        v = (v * c.beta2 + (g * g) * (1 - c.beta2)).astype(dt)       # .mul_(b2).addcmul_(g, g)
        denom = (mx.sqrt(v) / bc2_sqrt + c.eps).astype(dt)           # sqrt(v)/sqrt(bc2) + eps
        return (p - step_size * (m / denom)).astype(dt), m, v        # addcdiv_(m, denom, -ss)
    return update


class MlxBackend:
    name = "mlx"
    # the architectures MLX trains here all use RoPE: no wall of positions, except a
    # sliding window that mlx-lm does not apply (backends/mlx_config.unslid_window)
    max_positions: int | None = None
    positions_reason: str | None = None

    def __init__(self, model: nn.Module, tokenizer, model_path: Path, dtype: str,
                 optim: OptimConfig, *, lora=None, shard_size: str | int = DEFAULT_SHARD_SIZE,
                 group=None, share_prefix: bool = True, logits_chunk: int = 1024):
        """group: the mx.distributed group when data parallel (else None).
        logits_chunk: positions whose logits the update holds at a time (0: all at once;
        backends/mlx_head.py).
        share_prefix: run leading tokens common to a micro-batch's rows once (PrefixKV);
        off under gradient checkpointing."""
        self.group = group
        self.model, self.tokenizer, self.model_path = model, tokenizer, Path(model_path)
        # the base's hub id when model_path is its local snapshot (gft.run.hub_snapshot):
        # what a saved adapter names as its base, not a path in this machine's cache
        self.base_name: str | None = None
        # token ids the model embeds (mlx-lm's models keep their ModelArgs as .args)
        self.vocab_rows = getattr(getattr(model, "args", None), "vocab_size", None)
        # what ends a completion: generation_config.json's ids too; load_backend adds the
        # config's `stop`
        self.stops = model_stops(tokenizer, model_path)
        self.dtype, self.optim_cfg = dtype, optim
        self.lora, self.shard_size = lora, shard_size
        self._loss_and_grad = nn.value_and_grad(model, self._loss)
        self._head = split_head(model)
        self.logits_chunk = logits_chunk
        # a shared prefix runs once through a KV cache: needs the head apart, full
        # attention in every layer (PrefixKV's mask knows no windows) and no activation
        # checkpointing (mx.checkpoint cannot carry the caches)
        self._share_prefix = share_prefix and self._head is not None and not any(
            getattr(layer, "use_sliding", False) for layer in model.model.layers)
        self._adamw_tensor = mx.compile(adamw_tensor_update(optim))  # one fused kernel
        self._grads: dict[str, mx.array] | None = None  # accumulated, by parameter name
        self._exp_avg: dict[str, mx.array] = {}
        self._exp_avg_sq: dict[str, mx.array] = {}
        self._step = 0

    def _params(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def _neutral(self, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
        """Names (and LoRA orientation) as they leave the backend: gft/lora.py's."""
        from backends.mlx_lora import to_neutral
        return to_neutral(tensors) if self.lora is not None else tensors

    def _native(self, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
        from backends.mlx_lora import from_neutral
        return from_neutral(tensors) if self.lora is not None else tensors

    # ------------------------------------------------------------------ rollouts
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seed: int | Sequence[int]) -> list[list[int]]:
        """seed: one per prompt, or one for the call (row i: row_seed(seed, i))."""
        self.model.eval()
        seeds = row_seeds(seed, len(prompts))
        out: list[list[int]] = []
        for start in range(0, len(prompts), sampling.batch_size):
            end = start + sampling.batch_size
            out.extend(self._generate_batch(prompts[start:end], sampling, seeds[start:end]))
        return apply_string_stops(out, self.stops, self.tokenizer.decode)

    def _generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                        seeds: Sequence[int]) -> list[list[int]]:
        return decode_batch(self.model, prompts, sampling, seeds,
                            self.stops.ids | set(sampling.stop_ids), self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ update
    def _loss(self, ids: mx.array, mask: mx.array, adv: mx.array, tau: float, aggregate,
              n_tokens: float, n_seqs: float, start: int = 0,
              shared: int = 0) -> tuple[mx.array, mx.array]:
        """(GFT loss, summed response-token entropy) of one right-padded micro-batch whose
        logits are needed from position `start` on (mask: response positions start+1..),
        and whose rows all begin with the same `shared` (<= start) tokens.
        Padding sits after every real token, so the causal mask alone gives real tokens
        the same logits an attention mask would."""
        if start:  # lm_head and the softmaxes skip the prompt (see split_head)
            body, head = self._head
            if shared:  # the rows' common first tokens run once (PrefixKV)
                cache = [PrefixKV() for _ in body.layers]
                body(ids[:1, :shared], cache)  # fills the caches; output not needed
                for c in cache:
                    c.expand(ids.shape[0])
                hidden = body(ids[:, shared:], cache)[:, start - shared:]
            else:
                hidden = body(ids)[:, start:]
            weight = head_weight(self.model) if self.logits_chunk > 0 else None
            if weight is not None:  # at most logits_chunk positions' logits at a time
                logp, entropy = head_logprobs(hidden[:, :-1], weight, ids[:, start + 1:],
                                              self.logits_chunk)
                return self._token_loss(logp, entropy, mask, adv, tau, aggregate,
                                        n_tokens, n_seqs)
            logits, ids = head(hidden), ids[:, start:]
        else:
            logits = self.model(ids)
        return self._token_loss(target_logprobs(logits, ids), token_entropy(logits), mask,
                                adv, tau, aggregate, n_tokens, n_seqs)

    @staticmethod
    def _token_loss(logp, entropy, mask, adv, tau, aggregate, n_tokens, n_seqs):
        """(GFT loss, summed response-token entropy) from [B, T] log-probs and entropies."""
        loss = gft_token_loss(MLX_OPS, logp, mask, adv, tau=tau, aggregation=aggregate,
                              n_tokens=n_tokens, n_seqs=n_seqs)
        return loss, mx.sum(entropy * mask)

    def accumulate_gradients(self, micro_batches: Sequence[TokenBatch], *, tau: float,
                             aggregation: str) -> dict[str, float]:
        """Zero the gradients, then forward/backward every micro-batch, adding up."""
        aggregate = AGGREGATIONS[aggregation]
        self.model.train()
        self._grads = None
        loss_sum, ent_sum, n_tok = 0.0, 0.0, 0.0
        for mb in micro_batches:
            start = scored_from(mb) if self._head is not None else 0
            shared = shared_prefix(mb, start) if self._share_prefix else 0
            ids = mx.array(mb.input_ids.astype(np.int32))
            mask = mx.array(mb.response_mask[:, start + 1:].astype(np.float32))
            adv = mx.array(np.asarray(mb.advantages, dtype=np.float32))
            (loss, ent), grads = self._loss_and_grad(ids, mask, adv, tau, aggregate,
                                                     mb.n_tokens, mb.n_seqs, start, shared)
            grads = dict(tree_flatten(grads))
            self._grads = grads if self._grads is None else {
                n: self._grads[n] + g for n, g in grads.items()}
            mx.eval(loss, ent, self._grads)  # one micro-batch's graph at a time
            loss_sum += loss.item()
            ent_sum += ent.item()
            n_tok += float(mb.response_mask[:, 1:].sum())
        if self.group is not None and self._grads:  # data parallel: sum over ranks
            self._grads = {n: mx.distributed.all_sum(g, group=self.group)
                           for n, g in self._grads.items()}
            mx.eval(self._grads)
        return {"loss": loss_sum, "entropy": ent_sum / max(n_tok, 1.0), "tokens": n_tok}

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients, float32 NumPy, by parameter name (for tests)."""
        grads = self._grads or {}
        full = {n: grads[n] if n in grads else mx.zeros_like(p) for n, p in self._params().items()}
        return {n: np.array(g.astype(mx.float32)) for n, g in self._neutral(full).items()}

    def apply_update(self, lr: float) -> tuple[float, bool]:
        """Clip to max_grad_norm, then one AdamW step at `lr`; skip it if not finite.

        Clipping is torch.nn.utils.clip_grad_norm_'s: coef = max_norm / (norm + 1e-6),
        capped at 1. With no gradients (no micro-batches) nothing changes, as in torch."""
        if not self._grads:
            return 0.0, False
        grads = self._grads
        norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in grads.values()))
        grad_norm = norm.item()
        if not math.isfinite(grad_norm):  # must not touch the weights or the moments
            self._grads = None
            return grad_norm, True
        max_norm = self.optim_cfg.max_grad_norm or math.inf
        clip = mx.array(min(max_norm / (grad_norm + 1e-6), 1.0), dtype=mx.float32)
        # Clipped inside the fused update; kept (lazily) for gradients(), as torch keeps .grad.
        self._grads = {n: (g * clip).astype(g.dtype) for n, g in grads.items()}
        self._adamw(grads, clip, lr)
        return grad_norm, False

    def _adamw(self, grads: dict[str, mx.array], clip: mx.array, lr: float) -> None:
        """One AdamW step; the per-step scalars are computed in double, as torch does."""
        c = self.optim_cfg
        self._step += 1
        bc1, bc2 = 1 - c.beta1 ** self._step, 1 - c.beta2 ** self._step
        scalars = [mx.array(x, dtype=mx.float32)  # arrays, so a new lr does not recompile
                   for x in (1 - lr * c.weight_decay, lr / bc1, math.sqrt(bc2))]
        params, new = self._params(), {}
        for name, g in grads.items():
            p = params[name]
            m = self._exp_avg.get(name, mx.zeros_like(p))
            v = self._exp_avg_sq.get(name, mx.zeros_like(p))
            new[name], self._exp_avg[name], self._exp_avg_sq[name] = self._adamw_tensor(
                p, g, m, v, clip, *scalars)
        self.model.update(tree_unflatten(list(new.items())))
        mx.eval(self.model.parameters(), self._exp_avg, self._exp_avg_sq)

    def train_step(self, micro_batches: Sequence[TokenBatch], lr: float, *, tau: float,
                   aggregation: str) -> dict[str, float]:
        stats = self.accumulate_gradients(micro_batches, tau=tau, aggregation=aggregation)
        # several ranks: a NaN reaches every rank through all_sum and the norm check skips
        if self.group is None and not math.isfinite(stats["loss"]):
            self._grads = None
            return {**stats, "grad_norm": float("nan"), "skipped": 1.0}
        grad_norm, skipped = self.apply_update(lr)
        return {**stats, "grad_norm": grad_norm, "skipped": float(skipped)}

    def token_logprobs(self, batch: TokenBatch) -> np.ndarray:
        """log p of each next token [B, L-1]; through the head `logits_chunk` positions at
        a time where the update chunks it (mlx_head.head_logprobs), so evaluation holds
        one chunk's logits, not B x L x V."""
        self.model.eval()
        ids = mx.array(batch.input_ids.astype(np.int32))
        weight = head_weight(self.model) if self.logits_chunk > 0 and self._head else None
        if weight is None:
            return np.array(target_logprobs(self.model(ids), ids))
        logp, _ = head_logprobs(self._head[0](ids)[:, :-1], weight, ids[:, 1:],
                                self.logits_chunk)
        return np.array(logp)

    # ------------------------------------------------------------------ state
    def save_model(self, path: Path) -> None:
        """The directory transformers' save_pretrained would write (same keys, tied
        embeddings without lm_head.weight), from the source config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:  # the adapter only, in PEFT format
            from backends.mlx_lora import save_adapter
            save_adapter(path, self._params(), self.lora, str(self.model_path),
                         self.base_name)
            save_tokenizer(self.tokenizer, path)  # the adapter travels with its tokenizer
            return
        weights = dict(tree_flatten(self.model.parameters()))
        write_weights(path, weights, lambda f, t: mx.save_safetensors(
            str(f), t, metadata={"format": "pt"}), lambda a: a.nbytes, self.shard_size)
        cfg = json.loads((self.model_path / "config.json").read_text())
        cfg["dtype"] = self.dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = self.dtype
        tied = getattr(getattr(self.model, "args", None), "tie_word_embeddings", None)
        if "tie_word_embeddings" not in cfg and tied is not None:
            cfg["tie_word_embeddings"] = tied  # mlx-lm and transformers default differently
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_portable_config(path)
        save_tokenizer(self.tokenizer, path)
        gen_src = self.model_path / "generation_config.json"
        if gen_src.exists():
            if gen_src.resolve() != (path / "generation_config.json").resolve():
                shutil.copyfile(gen_src, path / "generation_config.json")
        else:
            tok = self.tokenizer
            gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
            (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    def join_save(self) -> None:
        """Every rank, before rank 0 saves: every rank holds the same weights, so there
        is nothing to gather."""

    def save_optimizer(self, path: Path) -> None:
        tensors = {f"exp_avg.{n}": m for n, m in self._neutral(self._exp_avg).items()}
        tensors.update({f"exp_avg_sq.{n}": v for n, v in self._neutral(self._exp_avg_sq).items()})
        mx.save_safetensors(str(path), tensors,
                            metadata={"format": "gft-adamw", "step": str(self._step)})

    def load_optimizer(self, path: Path) -> None:
        tensors, meta = mx.load(str(path), return_metadata=True)
        params = self._neutral(self._params())
        if not tensors:
            return
        exp_avg, exp_avg_sq = {}, {}
        for name, p in params.items():
            if f"exp_avg.{name}" not in tensors:
                raise ModelError(f"{path}: no optimizer state for parameter '{name}' "
                                 "(checkpoint from a different model?)")
            exp_avg[name] = tensors[f"exp_avg.{name}"].astype(p.dtype)
            exp_avg_sq[name] = tensors[f"exp_avg_sq.{name}"].astype(p.dtype)
        exp_avg, exp_avg_sq = self._native(exp_avg), self._native(exp_avg_sq)
        mx.eval(exp_avg, exp_avg_sq)
        self._exp_avg, self._exp_avg_sq = exp_avg, exp_avg_sq
        self._step = int((meta or {}).get("step", 0))

    def named_parameters(self) -> dict[str, np.ndarray]:
        return {n: np.array(p.astype(mx.float32)) for n, p in self._neutral(self._params()).items()}


def check_device(device: str) -> None:
    """A device MLX has on this machine (ConfigError otherwise), checked before loading."""
    if device in ("auto", "cpu"):
        return
    if device in ("gpu", "mps", "metal", "cuda"):
        if not mx.is_available(mx.gpu):
            raise ConfigError(f"device '{device}': MLX has no GPU on this machine "
                              "(use device: cpu or auto)")
        return
    raise ConfigError(f"device '{device}' is not an MLX device (auto, cpu or gpu)")


def set_device(device: str) -> None:
    """auto = MLX's default (the GPU where there is one); cpu; gpu (Metal or CUDA)."""
    check_device(device)
    if device == "cpu":
        mx.set_default_device(mx.cpu)
    elif device != "auto":
        mx.set_default_device(mx.gpu)


def load(model_path: str, *, dtype: str = "float32", device: str = "auto",
         optim: OptimConfig = OptimConfig(), seed: int = 0, trust_remote_code: bool = False,
         gradient_checkpointing: bool = False, lora=None, adapter: str | None = None,
         shard_size: str | int = DEFAULT_SHARD_SIZE, parallel: str | None = None,
         comm=None, rollout_engine: str = "policy",
         mixed_precision: bool = False, rollout_graphs: str = "auto",
         logits_chunk: int = 1024) -> MlxBackend:
    """Load an mlx-lm model and the Hugging Face tokenizer the torch backend would use.
    comm: a gft.distributed.MLXComm when started by mlx.launch (data parallel; `parallel`
    is a torch setting and is ignored here).
    lora (a gft.lora.LoraConfig): train adapters on the frozen model, fresh or loaded from
    the PEFT directory `adapter`.

    trust_remote_code goes to the tokenizer and to mlx-lm, which only uses it for a
    config's custom `model_file`; mlx-lm never runs transformers' remote modeling code."""
    from mlx_lm.utils import load_model
    from gft.modelfiles import load_tokenizer, tokenizer_source
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported by the mlx backend "
                          f"(choose {' or '.join(DTYPES)})")
    if mixed_precision:
        raise ConfigError("mixed_precision is a torch option; on mlx set dtype: bfloat16")
    if rollout_graphs == "on":
        raise ConfigError("rollout_graphs is a torch option (CUDA graphs); the mlx backend "
                          "compiles its own decode step")
    if rollout_engine != "policy":
        raise ConfigError(f"rollout_engine '{rollout_engine}' is a torch option; the mlx "
                          "backend samples from the policy itself (set dtype: bfloat16 to "
                          "train and sample in bfloat16)")
    set_device(device)
    mx.random.seed(seed)
    tokenizer = load_tokenizer(tokenizer_source(model_path, adapter),
                               trust_remote_code=trust_remote_code)
    from backends.mlx_config import check_weight_names, mlx_model_config, unslid_window
    config = mlx_model_config(model_path)  # as transformers reads it, or a refusal
    try:
        model, _ = load_model(Path(model_path), strict=True, model_config=config,
                              trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            AssertionError, ImportError, SystemExit) as e:  # mlx-lm building an architecture
        # it reads differently, or a model module that exits (olmo without hf_olmo)
        # one line, even for mlx-lm's multi-line "Missing N parameters: \n a\n b ..."
        first = " ".join(str(e).split())[:300] or type(e).__name__
        if isinstance(e, (SystemExit, ImportError)):
            first = (f"mlx-lm's {config.get('model_type')} module cannot be imported (it needs "
                     "a package that is not installed)")
        raise ModelError(f"{model_path}: cannot load the model: {first}") from None
    check_weight_names([n for n, _ in tree_flatten(model.parameters())], model_path)
    model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    if lora is not None:
        from backends.mlx_lora import apply_lora
        apply_lora(model, lora, seed, adapter)
    if gradient_checkpointing:
        checkpoint_layers(model)
    backend = MlxBackend(model, tokenizer, Path(model_path), dtype, optim, lora=lora,
                         shard_size=shard_size, group=getattr(comm, "group", None),
                         share_prefix=not gradient_checkpointing, logits_chunk=logits_chunk)
    window = unslid_window(model_path)
    if window is not None:
        backend.max_positions = window
        backend.positions_reason = (
            f"transformers slides a {window}-token attention window over every layer of "
            "this model (config.json sliding_window) and mlx-lm attends over the whole "
            "context: past the window the two would train different models (--backend "
            "torch applies the window)")
    return backend
