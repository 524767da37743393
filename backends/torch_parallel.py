"""Data parallelism for the torch backend with PyTorch's own engines: DDP, or FSDP2
(`fully_shard`) for models whose weights, gradients and AdamW moments should be split
over the ranks. Started by torchrun; the process group is set up in gft/distributed.py.

- DDP: every rank holds the whole model; gradients are averaged in backward (all-reduce),
  only on the last micro-batch of an update (`no_sync` before it). The chunked head works
  through it (DecoderOrModel).
- FSDP2: each decoder layer and the root are `fully_shard`ed; parameters are DTensors,
  all-gathered per layer in forward/backward and reduce-scattered after it. Rollouts run
  inside `full_weights`: every layer is gathered once and kept until the rollout ends,
  so ranks may run different numbers of decode steps without waiting for each other.
  The chunked head runs inside a second forward of the sharded root (add_head_method):
  lm_head's weight is a sharded DTensor outside the root's forward, whole only inside it.
- Checkpoints hold full tensors gathered with torch.distributed.checkpoint's state-dict
  APIs (`get_model_state_dict` / `get_optimizer_state_dict`, full_state_dict +
  cpu_offload): rank 0 writes the same HF-layout directory and optimizer file as a
  one-process run, so a checkpoint resumes on any number of ranks (or on MLX).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def wrap(model: torch.nn.Module, strategy: str, device: torch.device,
         mixed_precision: bool = False) -> torch.nn.Module:
    """The module the update runs forward through: DDP(model), or `model` itself sharded
    in place by FSDP2 (decoder layers first, then the root: the embeddings and lm_head,
    tied or not, live in the root's group). mixed_precision (FSDP2): float32 weights and
    moments, bfloat16 compute, gradients reduced in float32."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        return DDP(DecoderOrModel(model), device_ids=ids)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # FSDP2's public API (and register_fsdp_forward_method): torch 2.6
        from gft.errors import ConfigError
        raise ConfigError(f"parallel: fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is "
                          f"torch {torch.__version__}: upgrade it or use parallel: ddp") from None
    kw = {}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    return model


class DecoderOrModel(torch.nn.Module):
    """What DDP wraps: the causal LM, whose forward is the model's own, or with
    `decoder=True` the decoder's alone -> its last hidden states, which the chunked head
    (backends/torch_head.py) takes through lm_head `logits_chunk` positions at a time
    after the forward. So every update forward still goes through DDP (it arms its
    reducer there), and lm_head's gradient, made in the same backward outside that
    forward, is all-reduced all the same: DDP's hooks sit on the parameters, wherever
    they are used."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, decoder: bool = False, **kw):
        if not decoder:
            return self.model(*args, **kw)
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") \
            else self.model
        return inner.get_decoder()(*args, **kw).last_hidden_state


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: torch.nn.Module, strategy: str | None) -> Iterator[None]:
    """FSDP2: gather every layer's weights for the duration (rollouts, evaluation) and
    keep them gathered across forwards, so a forward needs no collective and ranks whose
    rows finish early simply stop. Other strategies: nothing to do."""
    if strategy != "fsdp":
        yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors by HF name on rank 0 (empty elsewhere). Collective: every rank calls."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_options())
    # Tied weights (lm_head = embed_tokens) come back as two gathered copies; save_pretrained
    # only drops a tied key when both share storage, so keep the names named_parameters()
    # (which lists a tied parameter once) and the buffers use, as a one-process save does.
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in own}


def full_optimizer_state(model: torch.nn.Module, optimizer) -> tuple[dict, int]:
    """(AdamW moments as {'exp_avg.NAME': t, 'exp_avg_sq.NAME': t}, step) on rank 0.
    Collective: every rank calls."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    tensors, step = {}, 0
    for name, st in osd.get("state", {}).items():
        if "exp_avg" not in st:
            continue
        step = int(st["step"])
        tensors[f"exp_avg.{name}"] = st["exp_avg"].contiguous()
        tensors[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].contiguous()
    return tensors, step


def load_full_optimizer_state(model: torch.nn.Module, optimizer, tensors: dict, step: int,
                              names: list[str]) -> None:
    """Shard full AdamW moments (read by every rank from the checkpoint) into the optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    state = {n: {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg.{n}"],
                 "exp_avg_sq": tensors[f"exp_avg_sq.{n}"]} for n in names}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
              for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def local_value(x) -> float:
    """A float from a tensor that may be a DTensor (FSDP2's grad norm)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (collective for FSDP2's DTensors)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


HEAD_METHOD = "gft_head_logprobs"


def add_head_method(model: torch.nn.Module, decoder: torch.nn.Module,
                    head: torch.nn.Linear) -> None:
    """FSDP2: give the sharded root `model` a second forward, HEAD_METHOD(targets, keep,
    chunk, **decoder_kwargs) -> (log p, entropy) [B, T], that runs the decoder and then the
    chunked head (backends/torch_head.head_logprobs) over the hidden states at positions
    `keep`. Registered with FSDP2 (register_fsdp_forward_method), so its pre-forward gathers
    the root's parameters (embeddings, final norm, lm_head) and its post-forward arms the
    backward like the model's own forward: lm_head's weight is read while it is whole, and
    its gradient, made by the head's backward, is reduce-scattered as usual. The update then
    holds one chunk x V of logits under FSDP2 as in one process."""
    import types

    from torch.distributed.fsdp import register_fsdp_forward_method

    from backends.torch_head import head_logprobs

    def head_forward(self, targets, keep, chunk, **kw):
        hidden = decoder(**kw).last_hidden_state[:, keep]
        return head_logprobs(hidden, head.weight, targets, chunk)  # the whole weight, here

    setattr(model, HEAD_METHOD, types.MethodType(head_forward, model))
    register_fsdp_forward_method(model, HEAD_METHOD)
