"""Backends: one module per array framework, imported only when chosen.

This package implements gft's backend port (gft/backend.py: the `Backend` and
`RolloutEngine` Protocols, `SamplingConfig`, `OptimConfig`) and is its provider: the
functions below pick and load a backend by name, and importing the package registers it
with gft.backend, which is how gft/run.py reaches them without importing upward.
The port's names are re-exported here for code written against `backends`.

A Mac install has no torch and a CUDA install has no mlx, so nothing here imports either
at module level.
"""
from __future__ import annotations

import importlib
import platform
import sys
from typing import Any, Sequence

import gft.backend
from gft.backend import Backend, OptimConfig, RolloutEngine, SamplingConfig
from gft.errors import ConfigError

__all__ = ["Backend", "OptimConfig", "RolloutEngine", "SamplingConfig", "BACKEND_MODULES",
           "resolve_backend_name", "check_device", "load_backend", "available_memory"]


BACKEND_MODULES = {"torch": "backends.torch_backend", "mlx": "backends.mlx_backend"}


def resolve_backend_name(name: str) -> str:
    """auto = mlx on Apple silicon (when installed), torch elsewhere."""
    if name != "auto":
        return name
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    if importlib.util.find_spec("mlx") is not None:
        return "mlx"
    raise ConfigError("no backend installed: pip install 'gft[torch]' or 'gft[mlx]'")


def check_device(name: str, device: str) -> None:
    """ConfigError if the backend `name` (resolved) has no such device on this machine;
    called before any work. A backend that is not installed is load_backend's to report."""
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except (ImportError, KeyError):
        return
    module.check_device(device)


def load_backend(name: str, model_path: str, *, dtype: str = "float32", device: str = "auto",
                 optim: OptimConfig = OptimConfig(), seed: int = 0,
                 trust_remote_code: bool = False, gradient_checkpointing: bool = False,
                 lora: Any = None, base: str | None = None,
                 shard_size: str | int = "5GB", parallel: str | None = None,
                 comm: Any = None, rollout_engine: str = "policy",
                 mixed_precision: bool = False, rollout_graphs: str = "auto",
                 stop: Sequence[int | str] = (), logits_chunk: int = 1024,
                 load_in_4bit: bool = False, disable_dropout: bool = True,
                 train: bool = True) -> Backend:
    """Import the chosen backend module lazily and load the model into it.

    lora (a gft.lora.LoraConfig): train LoRA adapters instead of the whole model. A PEFT
    adapter directory as model_path (a LoRA checkpoint) loads its base model (`base` when
    given, else the adapter's base_model_name_or_path) with the adapter on it.
    shard_size: saved weights are split into shards above this size.
    parallel / comm: data parallelism when started by torchrun or mlx.launch (a
    gft.distributed Comm with world > 1; parallel "ddp" | "fsdp" for torch).
    rollout_engine: "policy" | "bfloat16" (torch; see RolloutEngine).
    rollout_graphs: "auto" | "on" | "off" (torch: a compiled decode step, CUDA graphs).
    mixed_precision: torch only; bfloat16 compute over float32 weights.
    stop: token ids or strings that end completions besides the model's own EOS ids
    (the tokenizer's and every one in generation_config.json; gft/stops.py).
    logits_chunk: positions whose logits the update holds at a time (0: all at once).
    load_in_4bit: torch only; QLoRA, the base in 4-bit through bitsandbytes.
    disable_dropout: torch; the model's own dropout off in the update (mlx-lm's models
    have none). LoRA's dropout is lora.dropout.
    train: False when the model only samples and scores (generate, eval): a quantized
    model then loads without LoRA adapters, which training over it needs."""
    from gft.convert import peft_view
    from gft.modelfiles import check_model_dir
    check_model_dir(model_path)  # a missing or corrupted file is one line, not a traceback
    with peft_view(model_path, base) as path:  # an mlx-lm adapter is read as PEFT
        return _load(name, path, base=base, lora=lora, dtype=dtype, device=device,
                     optim=optim, seed=seed, trust_remote_code=trust_remote_code,
                     gradient_checkpointing=gradient_checkpointing, shard_size=shard_size,
                     parallel=parallel, comm=comm, rollout_engine=rollout_engine,
                     mixed_precision=mixed_precision, rollout_graphs=rollout_graphs,
                     stop=stop, logits_chunk=logits_chunk, load_in_4bit=load_in_4bit,
                     disable_dropout=disable_dropout, train=train)


def _load(name: str, model_path: str, *, base, lora, dtype, device, optim, seed,
          trust_remote_code, gradient_checkpointing, shard_size, parallel, comm,
          rollout_engine, mixed_precision, rollout_graphs, stop, logits_chunk,
          load_in_4bit, disable_dropout, train) -> Backend:
    from gft.lora import resolve_adapter
    from gft.quant import check_loadable
    model_path, adapter, lora = resolve_adapter(model_path, base, lora)
    name = resolve_backend_name(name)
    check_loadable(name, model_path, lora=lora, adapter=adapter,  # quantized bases
                   load_in_4bit=load_in_4bit, train=train)
    if name not in BACKEND_MODULES:
        raise ConfigError(f"unknown backend '{name}' (choose auto, torch or mlx)")
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as e:
        extra = "torch" if name == "torch" else "mlx"
        raise ConfigError(f"backend '{name}' is not installed ({e}); pip install 'gft[{extra}]'") from None
    backend = module.load(model_path, dtype=dtype, device=device, optim=optim, seed=seed,
                          trust_remote_code=trust_remote_code,
                          gradient_checkpointing=gradient_checkpointing, lora=lora,
                          adapter=adapter, shard_size=shard_size, rollout_engine=rollout_engine,
                          rollout_graphs=rollout_graphs, logits_chunk=logits_chunk,
                          **({"mixed_precision": True} if mixed_precision else {}),
                          **({"load_in_4bit": True} if load_in_4bit else {}),
                          **({"disable_dropout": False} if name == "torch" and not disable_dropout
                             else {}),
                          **_parallel_kwargs(name, parallel, comm))
    from gft.stops import model_stops
    backend.stops = model_stops(backend.tokenizer, model_path, stop)
    return backend


def available_memory(name: str, device: str = "auto") -> tuple[float | None, str]:
    """(bytes the chosen device can give a run, its name), for gft.plan: a CUDA GPU's free
    memory, Metal's recommended working set, else the host's available memory."""
    name = resolve_backend_name(name)
    if name == "torch":
        import torch
        if device in ("auto", "cuda") or device.startswith("cuda:"):
            if torch.cuda.is_available():
                index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
                return float(torch.cuda.mem_get_info(index)[0]), \
                    f"torch cuda:{index} {torch.cuda.get_device_name(index)}"
        mps = getattr(torch.backends, "mps", None)
        if device in ("auto", "mps") and mps is not None and mps.is_available():
            return float(torch.mps.recommended_max_memory()), "torch mps"
    elif name == "mlx":
        import mlx.core as mx
        if device != "cpu" and mx.is_available(mx.gpu) and hasattr(mx, "device_info"):
            info = mx.device_info()
            size = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if size:
                return float(size), f"mlx gpu {info.get('device_name', '')}".strip()
    return _host_available(), f"{name} cpu (host memory)"


def _host_available() -> float | None:
    """MemAvailable on Linux; physical memory elsewhere (macOS: no cheap 'available')."""
    import os
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _parallel_kwargs(name: str, parallel: str | None, comm: Any) -> dict[str, Any]:
    if comm is None or comm.world == 1:
        return {}
    if name == "torch":
        return {"parallel": parallel or "ddp", "world": comm.world}
    return {"comm": comm}


# Importing the package makes it the provider gft.run loads backends through.
gft.backend.register_provider(sys.modules[__name__])
