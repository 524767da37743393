"""The backend port: what the training loop asks of a backend, and how one is found.

gft/ is written against this module only; backends/ implements it (torch, mlx) and is
never imported from gft/ (tests/test_layout.py checks). The dataclasses and Protocols
below are the contract; `BackendProvider` is the one thing that picks and loads a backend
by name (backends/__init__.py), handed to gft by whoever assembles the program: importing
`backends` registers it (the `gft` command, cli.py, does), so a Mac install that has only
mlx never imports torch and gft/ stays importable without either.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:  # annotations only: `import backends` (cli.py) stays cheap, no NumPy
    import numpy as np

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
    # tokens a model with learned absolute positions can take (GPT-2, OPT), or a sliding
    # window mlx-lm does not apply; None: no limit (RoPE, ALiBi). gft.rollout.check_context
    # refuses longer sequences before any work, saying why (positions_reason; None: the
    # learned positions)
    max_positions: int | None
    positions_reason: str | None
    vocab_rows: int | None  # token ids the model embeds (0 .. vocab_rows-1); None: unknown

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
        """Every rank, before rank 0's save_model / save_optimizer: the collectives of the
        save (gathering sharded state), writing nothing. Rank 0 then writes with no
        collective left, so a write that fails there cannot leave the other ranks
        waiting in one."""

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters as float32 NumPy arrays (tests and metrics)."""


class BackendProvider(Protocol):
    """Picks and loads a backend by name: backends/__init__.py (the module itself is the
    provider). gft/run.py reaches it through `provider()`, never by importing it."""

    def resolve_backend_name(self, name: str) -> str:
        """auto -> the backend this machine would use; other names unchanged."""

    def check_device(self, name: str, device: str) -> None:
        """ConfigError if the backend has no such device here (before any work)."""

    def load_backend(self, name: str, model_path: str, **options: Any) -> Backend:
        """The model loaded into the named backend (options: backends.load_backend's)."""

    def available_memory(self, name: str, device: str = "auto") -> tuple[float | None, str]:
        """(bytes the device can give a run, its name), for gft.plan."""


_provider: BackendProvider | None = None


def register_provider(new: BackendProvider) -> None:
    """Make `new` the provider gft uses (backends/__init__.py registers itself on import)."""
    global _provider
    _provider = new


def provider() -> BackendProvider:
    """The registered provider; a program that trains must wire one in first."""
    if _provider is None:
        raise RuntimeError("no backend provider registered with gft.backend: `import "
                           "backends` first (the gft command, cli.py, does)")
    return _provider
