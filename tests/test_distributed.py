"""Data parallelism (gft/distributed.py, backends/torch_parallel.py): 2 processes under
torchrun with the gloo backend on CPU train to the same weights as 1 process with the same
global batch, for DDP and FSDP2; checkpoints resume across world sizes.

Tolerance: float32, max |w_N - w_1| <= 1e-4 over all weights after 3 GFT steps at lr 1e-2.
That is the scale of float reduction-order noise here: in ONE process, changing only
micro_batch_size (the same gradients, summed in another order) moves the weights by
1.7e-5 (torch) and 6.4e-5 (MLX), because AdamW divides by sqrt(v) and so magnifies tiny
differences in coordinates with tiny gradients. A real mismatch is 100x larger: using each
rank's own token count instead of the update's (the bug the global denominators prevent)
gives 1.4e-2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gft.distributed import (LOCAL, check_divisible, local_positions, minibatch_sizes,
                             row_seed, row_seeds, uniform_table)
from gft.errors import ConfigError
from gft.groups import Sequence_, micro_batches
from gft.tiny import TinyModelSpec, write_tiny_model
from tests.helpers import yes_questions_data

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


# --------------------------------------------------------------------------- pure parts

def test_each_update_is_split_evenly_and_groups_stay_whole():
    # 8 prompts per step, 4 per update, 2 ranks: rank 0 takes 0,1 and 4,5; rank 1 2,3 and 6,7
    assert local_positions(8, 4, 0, 2) == [0, 1, 4, 5]
    assert local_positions(8, 4, 1, 2) == [2, 3, 6, 7]
    assert local_positions(8, 4, 0, 1) == list(range(8))
    assert minibatch_sizes(10, 4) == [4, 4, 2]
    every = sorted(local_positions(10, 4, 0, 2) + local_positions(10, 4, 1, 2))
    assert every == list(range(10))


def test_uneven_updates_are_a_config_error():
    check_divisible(8, 4, 2, "stage 1")
    check_divisible(6, 4, 2, "stage 1")  # updates of 4 and 2 prompts: both split
    with pytest.raises(ConfigError, match="cannot be split evenly over 2 processes"):
        check_divisible(6, 3, 2, "stage 1 (gft)")
    with pytest.raises(ConfigError, match="prompts_per_minibatch=4"):
        check_divisible(8, 4, 3, "stage 1 (gft)")


def test_row_seeds_are_per_row_and_reproducible():
    assert row_seeds(7, 3) == [row_seed(7, 0), row_seed(7, 1), row_seed(7, 2)]
    assert len(set(row_seeds(7, 100))) == 100
    assert row_seeds([5, 6], 2) == [5, 6]
    table = uniform_table([11, 12], 5)
    np.testing.assert_array_equal(table[1], uniform_table([12], 5)[0])  # row 1 alone
    assert table.shape == (2, 5) and (0 <= table).all() and (table < 1).all()


def test_local_comm_is_the_identity():
    assert LOCAL.rank == 0 and LOCAL.world == 1
    np.testing.assert_array_equal(LOCAL.all_sum(np.array([1.0, 2.0])), [1.0, 2.0])
    assert LOCAL.broadcast_text("runs/x") == "runs/x"


class ThreadComm:
    """One rank of `world` threads whose all_sum meets at a barrier: the collective's
    arithmetic without processes."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world, self.shared = rank, shared["world"], shared

    def all_sum(self, values):
        shared = self.shared
        shared["parts"][self.rank] = np.asarray(values, dtype=np.float64)
        shared["barrier"].wait()
        total = np.sum(shared["parts"], axis=0)
        shared["barrier"].wait()  # nobody overwrites a part before every rank has summed
        return total


def test_union_of_names_gives_every_rank_every_ranks_names():
    """What reward functions log with log_metric may differ by rank (a name only one rank's
    responses gave rise to); every rank must add the same names in the same order to its
    step's all-reduce, or the sums land in each other's slots."""
    import threading
    from gft.distributed import union_of_names
    shared = {"world": 3, "parts": [None] * 3, "barrier": threading.Barrier(3)}
    given = [["mean_len", "format"], [], ["mean_len", "ünïcode/name"]]
    out: list = [None] * 3
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(
        r, union_of_names(ThreadComm(r, shared), given[r]))) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == [["format", "mean_len", "ünïcode/name"]] * 3
    assert union_of_names(LOCAL, ["b", "a", "b"]) == ["a", "b"]


def test_global_denominators_make_rank_losses_add_up():
    # Two ranks, each half of one update: with the update's totals as denominators the
    # token-mean of each half is (its token sum) / (all tokens), so the halves add up.
    seqs = [Sequence_(g, [1, 2], [3] * (g + 1), "", True, advantage=1.0) for g in range(4)]
    whole = micro_batches(seqs, 8, 0)
    half = micro_batches(seqs[:2], 8, 0, totals=(10.0, 4.0))
    assert whole[0].n_tokens == half[0].n_tokens == 10.0
    assert whole[0].n_seqs == half[0].n_seqs == 4.0


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_row_samples_the_same_tokens_in_any_batch(tmp_path, backend):
    """What lets N ranks sample what one process does: a row's completion depends on its
    prompt, its seed and the weights, not on the rows beside it or the chunking."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from backends import SamplingConfig, load_backend
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(seed=3))
    be = load_backend(backend, str(model))
    # repeated prompts share one prefill (torch_sampler.shared_prompts): still row by row
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [6, 7, 8, 9], [10], [4, 5], [11, 12]]
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, batch_size=8)
    seeds = row_seeds(123, len(prompts))
    together = be.generate(prompts, sampling, seeds)
    alone = [be.generate([p], sampling, [s])[0] for p, s in zip(prompts, seeds)]
    chunked = be.generate(prompts, SamplingConfig(max_new_tokens=8, top_p=0.9, batch_size=2),
                          seeds)
    assert together == alone == chunked
    assert be.generate(prompts, sampling, 123) == together  # int seed: row_seed(123, i)
    assert be.generate(prompts, sampling, 124) != together


# --------------------------------------------------------------------------- torchrun runs

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = write_tiny_model(tmp / "model", TinyModelSpec(seed=0))
    data = yes_questions_data(tmp / "data")
    return tmp, model, data


def _args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    # 4 prompts per step in 2 updates of 2: each rank gets one prompt per update; GFT
    # groups of 1 dataset response + 3 rollouts (random model: rollouts score 0, the
    # dataset response 1, so every group has a gradient through rollout tokens).
    return ["--model", str(model), "--data", str(data), "--backend", "torch",
            "-o", str(out), "--max-steps", str(steps),
            "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=2",
            "--set", "micro_batch_size=2", "--set", "learning_rate=1e-2",
            "--set", "num_offpolicy=1", "--set", "num_rollouts=3", "--set", "rewards=[exact]",
            "--set", "max_response_tokens=6", "--set", "eval_samples=4",
            "--set", "progress=false", "--set", "save_every=2"]


def _gft(args: list[str], nproc: int = 1, *, extra: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "gft", "train", *args, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "gft", "train", *args, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "final" / "model.safetensors"))


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(setup):
    tmp, model, data = setup
    _gft(_args(model, data, tmp / "one", 3))
    return tmp / "one"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ddp-chunk5", "fsdp-chunk5"])
def test_two_processes_train_to_the_weights_of_one(setup, one_process, parallel):
    """ddp-chunk5: DDP with the update's head in chunks of 5 positions (many per
    micro-batch; DDP runs the decoder through its wrapper and lm_head after it).
    fsdp-chunk5: the same under FSDP2, the head inside a second forward of the sharded
    root (torch_parallel.add_head_method)."""
    tmp, model, data = setup
    run = tmp / f"two-{parallel}"
    parallel, _, chunk = parallel.partition("-chunk")
    extra = ["--set", f"parallel={parallel}"] + (["--set", f"logits_chunk={chunk}"] if chunk
                                                 else [])
    out = _gft(_args(model, data, run, 3), nproc=2, extra=extra)
    assert f"processes: 2 ({parallel})" in out.stdout
    base, init = _weights(one_process), load_file(str(model / "model.safetensors"))
    assert _close(base, init) > 1e-3  # training moved the weights
    assert _close(_weights(run), base) <= TOL
    # rank 0 logged the whole step: same rewards, tokens and loss as one process
    m1, m2 = _metrics(one_process), _metrics(run)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for a, b in zip(m1, m2):
        for key in ("reward/rollout", "update_tokens", "rollout_tokens", "eval/accuracy"):
            assert a.get(key) == b.get(key), key
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # the checkpoint is the single-process layout, loadable by transformers as is
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (run / "checkpoints" / "step-000002" / "optimizer.safetensors").exists()
    assert not (run / "metrics.jsonl.tmp").exists()


def test_resume_two_processes_with_one_and_one_with_two(setup, one_process):
    tmp, model, data = setup
    base = _weights(one_process)
    # 2 -> 1: two ranks (FSDP2) train 2 steps; one process continues to step 3
    a = tmp / "two-then-one"
    _gft(_args(model, data, a, 2), nproc=2, extra=["--set", "parallel=fsdp"])
    out = _gft(["--resume", str(a), "--set", "max_steps=3"])
    assert "from step-000002 (step 2)" in out.stdout
    assert _close(_weights(a), base) <= TOL
    # 1 -> 2: one process trains 2 steps; two ranks (DDP, through gft train --nproc) go on
    b = tmp / "one-then-two"
    _gft(_args(model, data, b, 2))
    out = _gft(["--resume", str(b), "--set", "max_steps=3", "--nproc", "2"])
    assert "processes: 2 (ddp)" in out.stdout
    assert _close(_weights(b), base) <= TOL


def test_uneven_split_is_refused_before_training(setup):
    tmp, model, data = setup
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = _args(model, data, tmp / "uneven", 1) + ["--set", "prompts_per_minibatch=3",
                                                   "--set", "prompts_per_step=3"]
    out = subprocess.run([sys.executable, "-m", "gft", "train", *args, "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2  # a user error, as in one process
    assert "error: [rank 0] " in out.stderr and "[rank 1] " in out.stderr
    assert "cannot be split evenly over 2 processes" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr  # each rank's one line, no torchrun dump


# --------------------------------------------------------------------------- MLX: mlx.launch

@pytest.mark.mlx
def test_mlx_two_processes_train_to_the_weights_of_one(setup):
    """mx.distributed data parallel, 2 local processes (mlx.launch, ring backend)."""
    pytest.importorskip("mlx.core")
    import shutil
    launch = shutil.which("mlx.launch")
    if launch is None:
        pytest.skip("mlx.launch not on PATH")
    tmp, model, data = setup
    # mlx.launch reads its own --backend (ring | mpi | ...): name gft's with --set
    def mlx_args(out):
        args = _args(model, data, out, 3)
        i = args.index("--backend")
        return args[:i] + ["--set", "backend=mlx"] + args[i + 2:]
    _gft(mlx_args(tmp / "mlx-one"))
    two = tmp / "mlx-two"
    args2 = mlx_args(two)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([launch, "-n", "2", "--backend", "ring", sys.executable, "-m", "gft",
                          "train", *args2], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "processes: 2 (data parallel)" in out.stdout
    assert _close(_weights(two), _weights(tmp / "mlx-one")) <= TOL


def test_fsdp_mixed_precision_trains_float32_weights(setup):
    """parallel: fsdp + mixed_precision: FSDP2's MixedPrecisionPolicy (bfloat16 compute,
    float32 reduction) on 2 gloo processes; the checkpoint keeps float32 weights."""
    tmp, model, data = setup
    run = tmp / "fsdp-mixed"
    _gft(_args(model, data, run, 2), nproc=2,
         extra=["--set", "parallel=fsdp", "--set", "mixed_precision=true"])
    weights, init = _weights(run), load_file(str(model / "model.safetensors"))
    assert all(w.dtype == np.float32 for w in weights.values())
    assert _close(weights, init) > 1e-3
    losses = [r["loss"] for r in _metrics(run) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
