"""Backends: one module per array framework, imported only when chosen.

A Mac install has no torch and a CUDA install has no mlx, so nothing here imports either
at module level. The training loop (gft/loop.py) talks to a backend only through the
`Backend` Protocol below.
"""
from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from gft.errors import ConfigError
from gft.types import TokenBatch


@dataclass(frozen=True)
class OptimConfig:
    """What a backend needs to build its optimizer (AdamW with torch's semantics)."""
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled. greedy=True ignores temperature and top_p.
    stop_ids: tokens that end a row (kept as its last token). Callers leave it empty:
    backend.generate fills it with the model's stops (gft/stops.py: the tokenizer's EOS,
    generation_config.json's ids and the config's `stop`) before the engine decodes."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    batch_size: int = 64
    stop_ids: tuple[int, ...] = ()


class RolloutEngine(Protocol):
    """What samples a backend's rollouts. The loop never sees it: backend.generate calls
    it, and calls sync() before the first rollout after an optimizer update, so an engine
    holding its own copy of the weights (a bfloat16 copy, a vLLM engine) samples from
    the current policy. torch: backends/torch_sampler.py ROLLOUT_ENGINES."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: list[int]) -> list[list[int]]:
        """One completion per prompt; row i draws from seeds[i] only."""

    def sync(self) -> None:
        """Take the policy's current weights."""


class Backend(Protocol):
    name: str
    tokenizer: Any  # a transformers tokenizer; both backends use the same one
    stops: Any  # gft.stops.Stops: what ends a completion (set by load_backend)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seed: int | Sequence[int]) -> list[list[int]]:
        """Completions (token ids, ending with a stop id, or cut after a stop string or at
        max_new_tokens; see gft/stops.py), one per prompt.
        seed: one per prompt, or one for the call (row i then uses
        gft.distributed.row_seed(seed, i)); a row's draws depend only on its own seed, so
        the same row samples the same tokens in any batch, chunk or rank."""

    def train_step(self, micro_batches: Sequence[TokenBatch], lr: float, *, tau: float,
                   aggregation: str) -> dict[str, float]:
        """One optimizer update over the micro-batches (gradient accumulation), with clipping.
        tau and aggregation (a key of gft.objective.AGGREGATIONS) define the GFT loss.

        Returns loss, grad_norm, entropy (mean token entropy over response tokens),
        tokens, and skipped (1.0 when the loss or gradients were not finite and no
        update was made)."""

    def accumulate_gradients(self, micro_batches: Sequence[TokenBatch], *, tau: float,
                             aggregation: str) -> dict[str, float]:
        """Zero, then add up the gradients of the micro-batches (loss, entropy, tokens)."""

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients as float32 NumPy arrays by parameter name."""

    def apply_update(self, lr: float) -> tuple[float, bool]:
        """Clip, then AdamW at `lr`: (grad_norm before clipping, skipped if non-finite)."""

    def token_logprobs(self, batch: TokenBatch) -> np.ndarray:
        """[B, L-1] float32 log-probabilities of input_ids[:, 1:] (no gradient)."""

    def save_model(self, path: Path) -> None:
        """Hugging Face-layout directory: config.json, model.safetensors, tokenizer files,
        generation_config.json; transformers and mlx-lm load it unchanged."""

    def save_optimizer(self, path: Path) -> None:
        """AdamW moments keyed by parameter name, as safetensors (backend-neutral)."""

    def load_optimizer(self, path: Path) -> None: ...

    def join_save(self) -> None:
        """Data-parallel ranks other than 0: take part in rank 0's save (gathering sharded
        state), writing nothing."""

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters as float32 NumPy arrays (tests and metrics)."""


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
                 load_in_4bit: bool = False) -> Backend:
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
    load_in_4bit: torch only; QLoRA, the base in 4-bit through bitsandbytes."""
    from gft.lora import resolve_adapter
    from gft.modelfiles import check_model_dir
    from gft.quant import check_loadable
    check_model_dir(model_path)  # a missing or corrupted file is one line, not a traceback
    model_path, adapter, lora = resolve_adapter(model_path, base, lora)
    name = resolve_backend_name(name)
    check_loadable(name, model_path, lora=lora, adapter=adapter,  # quantized bases
                   load_in_4bit=load_in_4bit)
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
