"""Data parallelism across processes: which rank does what, and the few host-side
reductions the loop needs.

Launch (README "Training on many GPUs"):
    torchrun --nproc-per-node N -m gft train ...     torch: DDP, or FSDP2 with parallel: fsdp
    gft train --nproc N ...                          the same, torchrun started for you
    mlx.launch -n N python -m gft train ...          MLX: mx.distributed

Global-batch semantics: a step draws the same prompts_per_step prompts on every rank (the
sampler is a pure function of seed and step). Each optimizer update's prompts
(prompts_per_minibatch of them) are split into `world` equal, contiguous shares, one per
rank, so every group (K dataset responses + n rollouts of one prompt) stays whole on one
rank and its advantages are computed there, exactly as in one process. Each rank's loss
uses the mini-batch's GLOBAL denominators (response tokens, sequences; one all-reduce), so
the sum of the ranks' gradients is the gradient of the one-process loss; the backend sums
them (DDP / FSDP2 average, so the local loss is scaled by `world`, an exact power-of-two
scaling for 2, 4, 8 ranks). Rollout sampling is seeded per row from (step, prompt position,
rollout index), never from a rank's batch, so N ranks sample what one process samples.
The same config therefore gives the same update on 1 or N ranks, up to float reduction order.

The Comm Protocol below is all the loop sees of the launcher: a rank, a world size and
sums of small host arrays. Gradients never pass through it: the backend reduces them with
its framework's own engine (DDP / FSDP2 / mx.distributed).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence

import numpy as np

from gft.errors import ConfigError, GFTError, first_line


class Comm(Protocol):
    rank: int
    world: int

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a small float64 host array (metrics, counts)."""

    def broadcast_text(self, text: str) -> str:
        """Rank 0's string on every rank (the run directory, say)."""

    def barrier(self) -> None: ...


class LocalComm:
    """One process: every reduction is the identity."""
    rank, world = 0, 1

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def broadcast_text(self, text: str) -> str:
        return text

    def barrier(self) -> None:
        pass


LOCAL = LocalComm()


def _text_to_array(text: str | None, n: int) -> np.ndarray:
    raw = np.zeros(n, dtype=np.float64)
    if text is not None:
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        raw[:len(b)] = b
    return raw


def _array_to_text(raw: np.ndarray) -> str:
    b = raw.astype(np.uint8)
    return bytes(b[b != 0]).decode("utf-8")


def _broadcast_by_sum(comm: Comm, text: str | None, root: int = 0) -> str:
    """Rank `root`'s string on every rank with all_sum alone: the length, then the bytes
    (zeros everywhere but on `root`)."""
    mine = comm.rank == root
    n = int(comm.all_sum(np.array([len(text.encode("utf-8")) if mine else 0]))[0])
    return _array_to_text(comm.all_sum(_text_to_array(text if mine else None, n)))


def union_of_names(comm: Comm, names: Sequence[str]) -> list[str]:
    """Every rank's names, sorted and without repeats, on every rank, with all_sum alone:
    each rank writes its newline-joined names into its own row of a world × longest
    array. Collective: every rank calls it, whether it has names or not."""
    text = "\n".join(sorted(set(names))).encode("utf-8")
    if comm.world == 1:
        return sorted(set(names))
    lengths = np.zeros(comm.world)
    lengths[comm.rank] = len(text)
    longest = int(comm.all_sum(lengths).max())
    if longest == 0:
        return []
    rows = np.zeros((comm.world, longest))
    rows[comm.rank, :len(text)] = np.frombuffer(text, dtype=np.uint8)
    rows = comm.all_sum(rows.reshape(-1)).reshape(comm.world, longest)
    return sorted({name for row in rows for name in _array_to_text(row).split("\n") if name})


def _barrier_by_sum(comm: Comm) -> None:
    comm.all_sum(np.zeros(1))  # returns only once every rank has contributed


class TorchComm:
    """torch.distributed (gloo on CPU, nccl on CUDA): host arrays travel as float64
    tensors on the collective's device."""

    def __init__(self, device: str):
        import torch.distributed as dist
        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import torch
        t = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self.device)
        self.dist.all_reduce(t)
        return t.cpu().numpy()

    broadcast_text = _broadcast_by_sum
    barrier = _barrier_by_sum


class MLXComm:
    """mx.distributed (ring / MPI / JACCL backends, started by mlx.launch)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = group.rank(), group.size()

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import mlx.core as mx
        # float32 on the wire (not every MLX device has float64); counts stay exact < 2**24
        x = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float32)),
                                   group=self.group, stream=mx.cpu)
        return np.array(x, dtype=np.float64)

    broadcast_text = _broadcast_by_sum
    barrier = _barrier_by_sum


def first_text(comm: Comm, text: str | None) -> str | None:
    """The text of the lowest rank that has one (not None), on every rank; None on every
    rank when no rank has one. A collective: every rank calls it, with or without text."""
    has = np.zeros(comm.world)
    has[comm.rank] = text is not None
    ranks = np.flatnonzero(comm.all_sum(has))
    if not ranks.size:
        return None
    return _broadcast_by_sum(comm, text, int(ranks[0]))


class RankFailed(GFTError):
    """What the other ranks raise when work one rank did alone failed (see `together`):
    that rank's one-line message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def failure_line(exc: BaseException, rank: int) -> tuple[str, int]:
    """(the one line, exit code) the gft command reports for `exc` (cli.friendly_errors):
    a GFTError's message (exit 2 unless it sets exit_code), an OSError's reason and file
    (exit 1); anything else is a bug, named with the rank it happened on (exit 1)."""
    if isinstance(exc, GFTError):
        return str(exc), int(getattr(exc, "exit_code", 2))
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), 1
    return f"rank {rank} failed: {type(exc).__name__}: {first_line(exc)}", 1


@contextmanager
def together(comm: Comm) -> Iterator[None]:
    """Run a block that holds no collective on every rank, then agree on how it went.

    Work a rank does on its own share (scoring its rows, rank 0 writing a file) can fail
    on one rank only; that rank would stop while the others went on into the next
    collective and waited for it: a hang, or torchrun killing them with a gloo traceback.
    After the block (one small all-reduce when nothing failed) every rank raises when
    any rank's block raised: a rank that failed its own exception, the others RankFailed
    with the lowest failing rank's message and exit code. So every rank stops at the
    same point with the same one-line error, or all go on. One process: no collective,
    exceptions pass as they are."""
    if comm.world == 1:
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (re-raised below, on every rank)
        failure = exc
    said = first_text(comm, None if failure is None else
                      "{1}\n{0}".format(*failure_line(failure, comm.rank)))
    if failure is not None:
        raise failure
    if said is not None:
        code, _, message = said.partition("\n")
        raise RankFailed(message, int(code))


def launcher() -> str | None:
    """'torch' under torchrun (WORLD_SIZE > 1), 'mlx' under mlx.launch (MLX_RANK, or
    mpirun's rank variables), None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torch"
    if os.environ.get("MLX_RANK") is not None or os.environ.get("OMPI_COMM_WORLD_SIZE"):
        return "mlx"
    return None


def init_comm(device: str = "auto") -> Comm:
    """The Comm for this process: LOCAL unless started by torchrun / mlx.launch.

    torch: initialises the default process group (nccl when CUDA is used, else gloo)."""
    kind = launcher()
    if kind is None:
        return LOCAL
    if kind == "mlx":
        import mlx.core as mx
        group = mx.distributed.init()
        return MLXComm(group) if group.size() > 1 else LOCAL
    import torch
    import torch.distributed as dist
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return TorchComm(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def shutdown(comm: Comm, finished: bool = False) -> None:
    """Leave the torch process group at the end of a run.

    finished: the run succeeded, so every rank has passed the final barrier and rank 0 has
    written `final/` (checkpoints are fsynced, metrics files closed after each line). The
    rank then ends at once with exit code 0 (os._exit, stdio flushed) instead of tearing
    gloo/c10d down: destroy_process_group and interpreter teardown aborted a rank after a
    complete run with "terminate called without an active exception" (SIGABRT) in 2 of 5
    CI runs of this test suite (torch 2.13, gloo, 2 processes), which torchrun and
    `gft train --nproc` then report as a failed run. A run that fails or is interrupted
    with several ranks (every rank has agreed on the error: gft.distributed.together)
    leaves the group as it is: the command's error handler ends the rank the same way,
    with the error's exit code (cli._exit)."""
    if isinstance(comm, TorchComm) and comm.dist.is_initialized():
        if finished and comm.world > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if comm.world == 1:
            comm.dist.destroy_process_group()


def minibatch_sizes(prompts_per_step: int, per_minibatch: int) -> list[int]:
    """Prompts in each optimizer update of a step (the last one may be smaller)."""
    return [min(per_minibatch, prompts_per_step - first)
            for first in range(0, prompts_per_step, per_minibatch)]


def check_divisible(prompts_per_step: int, per_minibatch: int, world: int, where: str) -> None:
    """Every update's prompts must split evenly over the ranks (groups are never cut)."""
    for size in minibatch_sizes(prompts_per_step, per_minibatch):
        if size % world:
            raise ConfigError(
                f"{where}: an optimizer update of {size} prompts cannot be split evenly over "
                f"{world} processes (prompts_per_step={prompts_per_step}, prompts_per_minibatch="
                f"{per_minibatch}); make both multiples of {world}")


def local_positions(prompts_per_step: int, per_minibatch: int, rank: int,
                    world: int) -> list[int]:
    """Positions (within the step's prompts) this rank rolls out and trains on: its
    contiguous share of every mini-batch, so each update has prompts from every rank."""
    out: list[int] = []
    first = 0
    for size in minibatch_sizes(prompts_per_step, per_minibatch):
        share = size // world
        out.extend(range(first + rank * share, first + (rank + 1) * share))
        first += size
    return out


def row_seed(seed: int, index: int) -> int:
    """A sampling seed for one row, from a call's seed and the row's global index: what a
    row samples then never depends on which other rows share its batch or its rank."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1)[0])


def row_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """Per-row seeds: a list as given, or derived from one seed by position."""
    if isinstance(seed, (int, np.integer)):
        return [row_seed(int(seed), i) for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def uniform_table(seeds: Sequence[int], steps: int) -> np.ndarray:
    """[B, steps] float64 uniforms in [0, 1), row i from its own generator: the draws a
    sampler uses for row i's tokens, one per position."""
    table = np.empty((len(seeds), max(steps, 0)), dtype=np.float64)
    for i, s in enumerate(seeds):
        table[i] = np.random.default_rng(s).random(max(steps, 0))
    return table
