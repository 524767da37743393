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


def test_union_of_names_gives_every_rank_every_ranks_names():
    """What reward functions log with log_metric may differ by rank (a name only one rank's
    responses gave rise to); every rank must add the same names in the same order to its
    step's all-reduce, or the sums land in each other's slots."""
    from gft.distributed import union_of_names
    given = [["mean_len", "format"], [], ["mean_len", "ünïcode/name"]]
    out = on_ranks(3, lambda comm: union_of_names(comm, given[comm.rank]))
    assert out == [["format", "mean_len", "ünïcode/name"]] * 3
    assert on_ranks(2, lambda comm: union_of_names(comm, [])) == [[], []]
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


# --------------------------------------------------------------------------- ranks agree
# Work one rank does on its own share (scoring its rows, rank 0 writing a file) can fail on
# that rank alone. It must stop every rank at the same point with the same one-line error,
# or none: a rank that stops alone leaves the others waiting in their next all-reduce
# (mlx.launch: a hang; torchrun: the others killed with a gloo traceback).

class ThreadComm:
    """`world` ranks as threads of one process (gft.distributed.Comm): all_sum meets at a
    barrier with a timeout, so a rank left waiting fails the test instead of hanging it."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world, self.shared = rank, world, shared

    def all_sum(self, values):
        slots, meet = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = np.asarray(values, dtype=np.float64)
        meet.wait()
        total = np.sum([slots[r] for r in range(self.world)], axis=0)
        meet.wait()  # nobody overwrites a slot before every rank has read them all
        return total

    def broadcast_text(self, text):
        from gft.distributed import _broadcast_by_sum
        return _broadcast_by_sum(self, text)

    def barrier(self):
        self.all_sum(np.zeros(1))


def on_ranks(world: int, work) -> list:
    """work(comm) on `world` thread ranks; per rank what it returned or raised."""
    import threading
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=10)}
    out: list = [None] * world

    def run(rank: int) -> None:
        try:
            out[rank] = work(ThreadComm(rank, world, shared))
        except Exception as e:  # noqa: BLE001 (the test looks at it)
            out[rank] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_first_text_is_the_lowest_rank_that_has_one():
    from gft.distributed import first_text
    texts = [None, "rank 1's", "rank 2's"]
    assert on_ranks(3, lambda c: first_text(c, texts[c.rank])) == ["rank 1's"] * 3
    assert on_ranks(2, lambda c: first_text(c, None)) == [None, None]
    assert first_text(LOCAL, "alone") == "alone"


def test_work_that_fails_on_one_rank_stops_every_rank_with_its_error():
    import errno
    from gft.distributed import RankFailed, together
    from gft.errors import RewardError

    def work(failure):
        def on_rank(comm):
            with together(comm):
                if comm.rank == 1 and failure is not None:
                    raise failure
            comm.barrier()  # the next collective: reached only when every rank went on
            return "went on"
        return on_rank
    bad = RewardError("reward 'f' raised ValueError: data.jsonl:3")
    got = on_ranks(2, work(bad))
    assert got[1] is bad  # the failing rank: its own error, traceback and all
    assert isinstance(got[0], RankFailed) and str(got[0]) == str(bad)
    assert got[0].exit_code == 2  # as the gft command exits for a RewardError
    # rank 0 writing a file: the reason and the file on every rank, exit code 1
    full = OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl")
    got = on_ranks(2, work(full))
    assert str(got[0]) == "No space left on device: run/metrics.jsonl" and got[0].exit_code == 1
    # a bug: the other ranks name the rank and the exception
    got = on_ranks(2, work(KeyError("x")))
    assert isinstance(got[1], KeyError) and str(got[0]) == "rank 1 failed: KeyError: 'x'"
    assert on_ranks(3, work(None)) == ["went on"] * 3  # nothing failed: all go on


def test_the_first_batch_reward_check_is_made_over_every_rank():
    """No reward applying to a rank's share of a batch stopped that rank alone; in one
    process the batch is the whole step's, and a reward that applied to another rank's
    rows means the reward works. Every rank now decides on the whole batch, together."""
    from types import SimpleNamespace
    from gft.errors import RewardError
    from gft.run import RequireApplicableReward

    class Scorer:  # None for every response of a "code" row
        names = ["math"]

        def score(self, prompts, completions, columns, sources=None, **kwargs):
            return SimpleNamespace(n_none=sum(t == "code" for t in columns["task"]))

    def step(tasks, said):
        def on_rank(comm):
            scorer = RequireApplicableReward(Scorer(), warn=said.append)
            outcome = []
            for task in tasks(comm.rank):
                scorer.score(["p"] * 4, ["c"] * 4, {"task": [task] * 4},
                             [f"rank{comm.rank}.jsonl:{i}" for i in range(4)])
                scorer.settle(comm)
                outcome.append(scorer.applied)
            return outcome
        return on_rank
    said: list[str] = []
    # rank 1's rows have no applicable reward, rank 0's do: every rank goes on
    assert on_ranks(2, step(lambda r: ["math" if r == 0 else "code"], said)) == [[True]] * 2
    # no reward applied on any rank: the same error on every rank, for the whole batch
    got = on_ranks(2, step(lambda r: ["code"], said))
    assert all(isinstance(e, RewardError) for e in got) and str(got[0]) == str(got[1])
    assert "for all 8 responses of a batch (first: rank0.jsonl:0)" in str(got[0])
    # after rewards applied, a batch none covers is a warning, written once (rank 0)
    assert on_ranks(2, step(lambda r: ["math", "code"], said)) == [[True, True]] * 2
    assert len(said) == 1 and "the run goes on (1 such batch so far" in said[0]


RANK_REWARDS = '''import os


def _rank():
    return os.environ.get("RANK") or os.environ.get("MLX_RANK")


def none_on_rank1(completions, log_metric, **kw):  # no reward applies to rank 1's rows
    log_metric("both", 1.0 if _rank() == "0" else 3.0)  # TRL's callback, on every rank
    if _rank() == "1":
        log_metric("rank1_only", 2.0)  # a name rank 0 never logs
    return [None if _rank() == "1" else 0.0 for _ in completions]


def raise_on_rank1(completions, **kw):  # e.g. a verifier meeting a row only rank 1 holds
    if _rank() == "1":
        raise ValueError("cannot parse this row")
    return [0.0 for _ in completions]
'''


def _two_ranks(setup, label: str, extra: list[str], launch: list[str] | None = None,
               backend: tuple[str, ...] = ("--backend", "torch")):
    """A 1-step run on 2 ranks with `extra` arguments; `launch`: the command before gft's
    arguments, ending in `gft train` (default: gft train --nproc 2, torchrun for you).
    The timeout fails a hang (before: mlx.launch waited forever for a rank that stopped)."""
    tmp, model, data = setup
    launch = launch or [sys.executable, "-m", "gft", "train", "--nproc", "2"]
    args = _args(model, data, tmp / f"ranks-{label}", 1) + ["--set", "eval_samples=0", *extra]
    i = args.index("--backend")
    args = args[:i] + list(backend) + args[i + 2:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # its own process group: a hung launch is ended with every rank it started
    proc = subprocess.Popen([*launch, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"{label}: the ranks did not end within 120 s (one waits for another)")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _rank_reward(setup, name: str) -> list[str]:
    """--set rewards=[...] naming RANK_REWARDS' function `name`."""
    rewards = setup[0] / "rank_rewards.py"
    rewards.write_text(RANK_REWARDS)
    return ["--set", f"rewards=[{rewards}:{name}]"]


def _same_error_on_every_rank(out: subprocess.CompletedProcess, text: str,
                              ranks: tuple[str, ...] = ("0", "1")) -> None:
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    said = {line.split("] ", 1)[1] for line in lines}
    assert {f"error: [rank {r}]" for r in ranks} <= \
        {line[:len("error: [rank 0]")] for line in lines}, out.stderr[-3000:]
    assert len(said) == 1 and text in said.pop()
    assert "Traceback" not in out.stdout + out.stderr  # no gloo "Connection closed by peer"


def test_a_reward_that_fails_on_one_rank_stops_every_rank_alike(setup):
    """torchrun, 2 gloo ranks. Before: rank 1 printed its error, rank 0 died in its next
    all-reduce with a gloo traceback (or was killed). Now both print rank 1's line, exit 2.
    And no reward applying to rank 1's rows alone is no error: rank 0's rows scored."""
    out = _two_ranks(setup, "raise", _rank_reward(setup, "raise_on_rank1"))
    assert out.returncode == 2, out.stderr[-3000:]
    _same_error_on_every_rank(out, "raised ValueError at ")
    out = _two_ranks(setup, "none", _rank_reward(setup, "none_on_rank1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # log_metric's values are averaged over both ranks, names only one rank logged included
    step = json.loads((setup[0] / "ranks-none" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (step["both"], step["rank1_only"]) == (2.0, 2.0)


def test_evaluation_over_two_ranks_keeps_each_reward_and_log_metric(setup):
    """Two ranks each score half the held-out rows; only accuracy and reward were combined,
    so eval/rewards/<function> and the reward functions' log_metric values were missing
    from every multi-rank run's evaluation."""
    out = _two_ranks(setup, "eval", _rank_reward(setup, "none_on_rank1")
                     + ["--set", "eval_samples=4"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    first = json.loads((setup[0] / "ranks-eval" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["eval/n"] == 4
    # rank 0 logged 1.0, rank 1 3.0: the mean of both; the reward applied on rank 0 only
    assert (first["eval/both"], first["eval/rank1_only"]) == (2.0, 2.0)
    assert first["eval/rewards/none_on_rank1"] == 0.0


def test_a_check_that_fails_on_one_rank_at_the_start_stops_every_rank(setup):
    """A reward module that cannot be imported on rank 1 (a package missing on one node):
    before, rank 1 stopped and rank 0 went on into loading the model and was killed
    there with a gloo traceback."""
    tmp = setup[0]
    module = tmp / "rank_import.py"
    module.write_text("import os\nif os.environ.get('RANK') == '1':\n"
                      "    raise ImportError('no verifier on this node')\n"
                      "def f(completions, **kw):\n    return [0.0 for _ in completions]\n")
    out = _two_ranks(setup, "import", ["--set", f"rewards=[{module}:f]"])
    assert out.returncode == 2, out.stderr[-3000:]
    _same_error_on_every_rank(out, "no verifier on this node")
    # rank 0 alone opens the trackers: one that cannot start (its folder is a file here)
    pytest.importorskip("tensorboard")
    run = tmp / "ranks-tracker"
    run.mkdir()
    (run / "tensorboard").write_text("not a directory\n")
    out = _two_ranks(setup, "tracker", ["--set", "report_to=[tensorboard]"])
    assert out.returncode == 2, out.stderr[-3000:]
    _same_error_on_every_rank(out, "report_to: tensorboard could not start a run")


def test_a_checkpoint_rank_0_cannot_save_stops_every_rank(setup):
    """FSDP2: rank 0 writes the checkpoint that every rank gathered. Before, rank 0 failed
    (here: `checkpoints` is a file) and the others were killed in their next collective;
    with the failure agreed on after the save, a failure before the gathers left them
    inside one (a hang), so every rank now gathers (join_save) before rank 0 writes."""
    tmp = setup[0]
    run = tmp / "ranks-save"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory\n")
    out = _two_ranks(setup, "save", ["--set", "save_every=1", "--max-steps", "2",
                                     "--set", "parallel=fsdp"])
    assert out.returncode == 1, out.stderr[-3000:]  # a file system failure: exit 1
    _same_error_on_every_rank(out, "cannot save checkpoint ")


@pytest.mark.mlx
@pytest.mark.slow
def test_mlx_a_reward_that_fails_on_one_rank_stops_every_rank_alike(setup):
    """mlx.launch, 2 ring ranks (about 30 s here). Before: rank 1 exited and rank 0 waited
    in mx.distributed.all_sum for ever (the run hung)."""
    pytest.importorskip("mlx.core")
    import shutil
    launch = shutil.which("mlx.launch")
    if launch is None:
        pytest.skip("mlx.launch not on PATH")
    out = _two_ranks(setup, "raise-mlx", _rank_reward(setup, "raise_on_rank1"),
                     [launch, "-n", "2", "--backend", "ring", sys.executable, "-m", "gft",
                      "train"], ("--set", "backend=mlx"))
    # mlx.launch ends the other ranks once one exits, so rank 0's line may be cut off;
    # whatever is printed is rank 1's error (mlx.launch 0.32 itself exits 0 either way)
    _same_error_on_every_rank(out, "raised ValueError at ", ranks=("1",))


def test_a_rank_whose_share_has_no_response_still_takes_part_in_the_update():
    """SFT (n = 0) over rows some of which have no response (a warning, and they train
    nothing): a step can give one rank only such rows. That rank built its zero-advantage
    filler from its first response and had none: IndexError on that rank alone, while
    the other waited in the update's gradient all-reduce."""
    from types import SimpleNamespace
    from gft.loop import _update_batches
    cfg = SimpleNamespace(prompts_per_minibatch=2, micro_batch_size=2, micro_batch_tokens=None,
                          skip_zero_advantage=True)
    backend = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))
    # 2 prompts, one per rank; rank 0's has a dataset response, rank 1's has none
    seqs = [[Sequence_(0, [5, 6], [7, 8], "yes", False, advantage=1.0)], []]

    def on_rank(comm):
        positions = local_positions(2, 2, comm.rank, comm.world)
        return _update_batches(cfg, backend, seqs[comm.rank], positions, 2, comm)
    got = on_ranks(2, on_rank)
    assert not any(isinstance(g, Exception) for g in got), got
    assert [len(u) for u in got[0]] == [len(u) for u in got[1]] == [1]  # in step
    assert (got[1][0][0].advantages == 0).all()  # the stand-in adds nothing
    assert got[1][0][0].n_tokens == got[0][0][0].n_tokens  # the update's global totals


def test_a_signal_to_one_rank_is_named_alike_on_every_rank(setup):
    """A SIGTERM that reaches rank 1 only (here its reward sends it) stops every rank after
    the step, as before; but rank 0, which got no signal, said "interrupted by SIGINT"
    and exited 130 (what `gft train --nproc` returned) where rank 1 said SIGTERM, 143."""
    module = setup[0] / "rank_signal.py"
    module.write_text("import os, signal\n"
                      "def f(completions, **kw):\n"
                      "    if os.environ.get('RANK') == '1':\n"
                      "        os.kill(os.getpid(), signal.SIGTERM)\n"
                      "    return [0.0 for _ in completions]\n")
    out = _two_ranks(setup, "signal", ["--set", f"rewards=[{module}:f]", "--max-steps", "3"])
    assert out.returncode == 143, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if "interrupted by" in line]
    assert sorted(line.split("] ", 1)[0] for line in said) == ["[rank 0", "[rank 1"]
    assert all("interrupted by SIGTERM after step 1 of 3" in line for line in said), said
