"""A run survives being stopped or killed at any moment and resumes exactly.

- SIGTERM / SIGINT: the step in flight finishes, a checkpoint is saved, the exit code is
  143 / 130 and the message says how to resume; a second SIGINT aborts at once.
- The kill test: `gft train` in a subprocess, SIGKILLed at a random moment (during a
  rollout, an update or a checkpoint write: every step is saved, so many kills land in
  one), then resumed until it finishes. Before each resume the checkpoint it will start
  from is checked to be complete; at the end the run's metrics, samples and final
  weights must equal an uninterrupted run's bit for bit (CPU, float32): that only holds
  when the data position, step seeds, AdamW moments and step, the LR schedule and the
  truncation of metrics.jsonl/samples.jsonl are all restored exactly.

The fast variant kills one run three times; the slow one (pytest -m slow) runs
GFT_KILL_RUNS runs (default 20). The same helper runs standalone and prints its counts:

    python tests/test_reliability.py --runs 20
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12

# Deterministic fields only (timings and throughputs differ from run to run).
VOLATILE = ("time/", "_tok_s", "memory/")  # memory: measured, differs run to run


def train_args(model: Path, data: Path, steps: int = STEPS) -> list[str]:
    """A 12-step run that exercises everything a resume must restore: it crosses an epoch
    (32 rows, 4 per step), warms up and decays the LR, samples rollouts, evaluates every
    4 steps and logs a sample every step."""
    return ["--model", str(model), "--data", str(data), "--backend", "torch",
            "--max-steps", str(steps), "--set", "prompts_per_step=4",
            "--set", "prompts_per_minibatch=2", "--set", "learning_rate=1e-2",
            "--set", "lr_schedule=cosine", "--set", "warmup_steps=3",
            "--set", "num_offpolicy=1", "--set", "num_rollouts=3", "--set", "rewards=[exact]",
            "--set", "max_response_tokens=6", "--set", "eval_samples=4",
            "--set", "eval_every=4", "--set", "sample_every=1", "--set", "progress=false"]


def write_fixture(root: Path) -> tuple[Path, Path]:
    """The tiny model and a toy data set (see tests/test_cli_e2e.py)."""
    from gft.tiny import TinyModelSpec, write_tiny_model
    model = write_tiny_model(root / "model", TinyModelSpec(seed=0))
    rows = [{"prompt": f"Question {i}: is {i} a number?\nA:", "completion": "yes",
             "answer": "yes"} for i in range(40)]
    data = root / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    return model, data


def gft_env() -> dict[str, str]:
    # One thread: reductions then run in the same order in every process (bit-identical).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _default_sigint() -> None:
    # A test runner started in the background may ignore SIGINT; gft (rightly) keeps an
    # ignored signal ignored, so give the child the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "gft", "train", *args], cwd=ROOT,
                            env=gft_env(), stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=_default_sigint if os.name == "posix" else None)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until predicate() or the process exits; True if the predicate came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    raise TimeoutError("gft train did not get there in time")


def training_started(log: Path):
    """The "run: ..." line is printed right before the first step."""
    return lambda: log.exists() and "\nrun: " in "\n" + log.read_text(errors="replace")


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not any(s in k for s in VOLATILE)}
            for line in (run / name).read_text().splitlines()]


def final_weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_run(run: Path, baseline: Path) -> None:
    """Same per-step metrics and samples, and bit-identical final weights."""
    assert records(run) == records(baseline)
    assert records(run, "samples.jsonl") == records(baseline, "samples.jsonl")
    a, b = final_weights(run), final_weights(baseline)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def check_complete(checkpoint: Path) -> int:
    """Everything a resume reads is there and whole; returns the checkpoint's step."""
    from safetensors.numpy import load_file
    from gft.checkpoint import OPTIMIZER_FILE, read_state
    state = read_state(checkpoint)
    assert json.loads((checkpoint / "config.json").read_text())
    assert load_file(str(checkpoint / "model.safetensors"))  # reads every tensor
    assert load_file(str(checkpoint / OPTIMIZER_FILE))
    step = state["loop"]["step"]
    if checkpoint.name.startswith("step-"):
        assert int(checkpoint.name[5:]) == step
    return step


def leftovers_paths(run: Path) -> list[Path]:
    return [p for d in (run, run / "checkpoints") if d.is_dir()
            for p in d.iterdir() if p.name.startswith(".")]


def leftovers(run: Path) -> list[str]:
    return [p.name for p in leftovers_paths(run)]


@dataclass
class KillReport:
    """What a kill test did, for the issue: how many kills, where they landed, what
    each resume started from, and how many runs matched the uninterrupted one."""
    runs: int = 0
    kills: int = 0
    landed: Counter = field(default_factory=Counter)
    resumed_from: Counter = field(default_factory=Counter)
    identical_runs: int = 0
    missed: int = 0  # runs that finished before their kill and were started over

    def __str__(self) -> str:
        return (f"{self.runs} runs, {self.kills} SIGKILLs (landed: {dict(self.landed)}; "
                f"{self.missed} late draws started over); "
                f"resumed from: {dict(sorted(self.resumed_from.items()))}; "
                f"{self.identical_runs}/{self.runs} runs bit-identical to the uninterrupted run")


def timed_baseline(args: list[str], run: Path) -> float:
    """Run uninterrupted; return how long its training took (from "run:" to final/)."""
    log = run.with_suffix(".log")
    proc = launch([*args, "-o", str(run)], log)
    wait_for(training_started(log), proc)
    start = time.monotonic()
    wait_for(lambda: (run / "final").is_dir(), proc, timeout=600)
    window = time.monotonic() - start
    assert proc.wait(timeout=600) == 0, log.read_text()
    return window


def _landed(run: Path) -> str:
    """Where a kill landed, from what it left behind."""
    if any(p.is_dir() for p in leftovers_paths(run)):
        return "checkpoint write"
    return "rollout/update/eval"


def kill_and_resume(args: list[str], run: Path, window: float, rng: random.Random,
                    report: KillReport, kills: int = 1, steps: int = STEPS) -> None:
    """Start `gft train`, SIGKILL it `kills` times at random moments (uniform over what is
    left of the training window, after start-up), resuming after each, then resume until
    it finishes. A run that got to final/ before its kill is started over, so every run
    really is killed `kills` times while training. Asserts that every resume starts from
    a complete checkpoint (or, killed before the first one, from step 0) and says so,
    and that no temporary directory survives the finished run."""
    from gft.checkpoint import latest_checkpoint
    report.runs += 1
    attempt, killed_so_far = 0, 0
    while True:
        if (run / "config.yaml").exists():
            checkpoint = latest_checkpoint(run)
            step = check_complete(checkpoint) if checkpoint is not None else 0
            report.resumed_from[step] += 1
            cmd = ["--resume", str(run)]
        else:  # killed before the run directory had its config: start it again
            checkpoint, step, cmd = None, 0, [*args, "-o", str(run)]
        log = run.parent / f"{run.name}-{attempt}.log"
        attempt += 1
        proc = launch(cmd, log)
        killed = False
        if killed_so_far < kills:
            wait_for(training_started(log), proc)
            time.sleep(rng.uniform(0.0, window * (steps - step) / steps))
            if proc.poll() is None and not (run / "final").is_dir():
                proc.send_signal(signal.SIGKILL)
                killed = True
        rc = proc.wait(timeout=600)
        text = log.read_text()
        assert "Traceback" not in text, text
        if checkpoint is not None:
            assert f"from {checkpoint.name} (step {step})" in text, text
        if killed and rc == -signal.SIGKILL:
            killed_so_far += 1
            report.kills += 1
            report.landed[_landed(run)] += 1
            continue
        assert rc == 0, text
        if killed_so_far == kills:
            break
        report.missed += 1  # finished before its kill: start the run over
        shutil.rmtree(run)
        killed_so_far = 0
    assert (run / "final").is_dir()
    assert not leftovers(run), leftovers(run)  # stale temporary directories were cleaned
    assert not (run / "gft.lock").exists()  # each kill left a stale lock: taken over, released


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model, data = write_fixture(root)
    return root, train_args(model, data)


@pytest.fixture(scope="module")
def baseline(fixture_dir):
    """The uninterrupted run and its training time. It saves every step like the kill
    runs (so the window matches theirs); the SIGTERM run saves only when stopped, so
    comparing the two also shows that saving does not perturb training."""
    root, args = fixture_dir
    run = root / "baseline"
    window = timed_baseline([*args, "--set", "save_every=1"], run)
    return run, window


# ---------------------------------------------------------------------------------------
# Signals


def test_sigterm_saves_exits_143_and_resumes_exactly(fixture_dir, baseline):
    root, args = fixture_dir
    base, _ = baseline
    run = root / "term"
    log = root / "term.log"
    proc = launch([*args, "-o", str(run), "--set", "save_every=0"], log)
    wait_for(lambda: steps_logged(run) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    text = log.read_text()
    assert "Traceback" not in text
    assert f"resume with: gft train --resume {run}" in text
    # save_every=0 saves nothing during the run: the stop itself saved a checkpoint
    from gft.checkpoint import latest_checkpoint
    checkpoint = latest_checkpoint(run)
    step = check_complete(checkpoint)
    assert 1 <= step < STEPS and f"after step {step} of {STEPS}" in text
    assert steps_logged(run) == step  # no step half-done or logged but unsaved

    resumed = subprocess.run([sys.executable, "-m", "gft", "train", "--resume", str(run)],
                             cwd=ROOT, env=gft_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"from {checkpoint.name} (step {step})" in resumed.stdout
    assert_same_run(run, base)


def test_second_sigint_aborts_at_once(fixture_dir):
    root, args = fixture_dir
    run = root / "double-int"
    log = root / "double-int.log"
    proc = launch([*args, "-o", str(run), "--set", "save_every=0"], log)
    wait_for(training_started(log), proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "again to abort" in log.read_text(), proc, timeout=30)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    assert rc in (-signal.SIGINT, 130), (rc, log.read_text())
    assert "Traceback" not in log.read_text()


@pytest.fixture
def own_signals():
    """In-process stops leave SIGINT/SIGTERM at their default action (a second signal must
    end the process at once); give pytest its handlers back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # pytest started in the background (nohup, `&`) inherits an ignored SIGINT, which gft
    # rightly keeps ignored: start these tests from Python's own handler instead.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_handlers_come_back_when_no_signal_came():
    from gft.signals import GracefulStop
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before[1] and not stop()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def _kill_self_after(monkeypatch, signum: int, after_calls: int):
    """Send `signum` to this process from inside the backend's train_step."""
    from backends.torch_backend import TorchBackend
    original, calls = TorchBackend.train_step, []

    def train_step(self, *a, **kw):
        calls.append(1)
        if len(calls) == after_calls:
            os.kill(os.getpid(), signum)
        return original(self, *a, **kw)
    monkeypatch.setattr(TorchBackend, "train_step", train_step)


def test_sigint_in_process_exits_130_and_resume_matches(tmp_path, monkeypatch, own_signals):
    """Through click's CliRunner: the exit code, the message, a second SIGINT armed to kill,
    and a resume that matches an uninterrupted run in the same process."""
    from click.testing import CliRunner
    from cli import main
    model, data = write_fixture(tmp_path)
    args = train_args(model, data, steps=6) + ["--set", "save_every=4"]
    runner = CliRunner()
    full = runner.invoke(main, ["train", *args, "-o", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output

    _kill_self_after(monkeypatch, signal.SIGINT, after_calls=3)  # 2 updates per step
    part = runner.invoke(main, ["train", *args, "-o", str(tmp_path / "part")])
    assert part.exit_code == 130, part.output
    assert "interrupted by SIGINT after step 2 of 6" in part.output
    assert f"gft train --resume {tmp_path / 'part'}" in part.output
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert (tmp_path / "part" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.undo()

    resumed = runner.invoke(main, ["train", "--resume", str(tmp_path / "part")])
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(tmp_path / "part", tmp_path / "full")


def test_stop_before_the_first_step_saves_nothing_and_resume_starts_over(tmp_path, monkeypatch,
                                                                        own_signals):
    from click.testing import CliRunner
    import gft.run
    from cli import main
    model, data = write_fixture(tmp_path)
    args = train_args(model, data)
    original = gft.run.open_backend

    def open_then_signal(cfg, path, *args):  # SIGTERM while the model loads
        backend = original(cfg, path, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        return backend
    monkeypatch.setattr(gft.run, "open_backend", open_then_signal)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", *args, "-o", str(run)])
    assert result.exit_code == 143, result.output
    assert "after step 0 of 12; nothing trained yet" in result.output
    assert not (run / "checkpoints").exists()
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, ["train", "--resume", str(run), "--set", "max_steps=1"])
    assert resumed.exit_code == 0, resumed.output
    assert "no checkpoint yet, starting again from step 0" in resumed.output
    assert [r["step"] for r in records(run)] == [0, 1]


# ---------------------------------------------------------------------------------------
# One writer per run directory (gft/runlock.py)


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds `run`'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from gft.runlock import "
                             "take; take(sys.argv[1]); print('locked', flush=True); "
                             "time.sleep(120)", str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner
    from cli import main
    model, data = write_fixture(tmp_path)
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        for extra in (["-o", str(run)], ["--resume", str(run)]):
            args = train_args(model, data) + extra if extra[0] == "-o" else ["--resume", str(run)]
            result = CliRunner().invoke(main, ["train", *args])
            assert result.exit_code == 2, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert lines[0].startswith(f"error: {run}: another gft process (pid {holder.pid} on "
                                       f"{socket.gethostname()}, started "), lines[0]
            assert lines[0].endswith("is writing this run directory; wait for it to finish or "
                                     "stop it, or choose another --output-dir"), lines[0]
        assert sorted(p.name for p in run.iterdir()) == ["gft.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from gft.runlock import LOCK_FILE, release, take
    holder = _hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    path = take(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()


def test_a_lock_of_a_killed_but_unreaped_process_is_stale(tmp_path):
    """A killed child its parent has not waited for (a zombie) still answers kill -0."""
    from gft.runlock import take
    holder = _hold_lock(tmp_path)
    holder.kill()
    time.sleep(0.5)  # dead, not reaped
    try:
        assert json.loads(take(tmp_path).read_text())["pid"] == os.getpid()
    finally:
        holder.wait()


def test_a_lock_from_another_host_is_refused(tmp_path):
    from gft.errors import GFTError
    from gft.runlock import LOCK_FILE, take
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere",
                                                  "started": "2026-01-01T00:00:00"}))
    with pytest.raises(GFTError) as e:
        take(tmp_path)
    assert str(e.value) == (f"{tmp_path}: another gft process (pid 1 on elsewhere, started "
                            f"2026-01-01T00:00:00) is writing this run directory; if it is not "
                            f"running there, delete {tmp_path / LOCK_FILE} and try again")


def test_two_processes_taking_over_one_stale_lock_one_wins(tmp_path):
    from gft.runlock import LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for attempt in range(1):
        run = tmp_path / str(attempt)
        run.mkdir()
        (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        # each one dawdles between finding the lock stale and replacing it: without the
        # flock both would replace it and both would win
        code = ("import sys, time; import gft.runlock as rl\n"
                "stale = rl._stale\n"
                "rl._stale = lambda h: (stale(h), time.sleep(0.5))[0]\n"
                "try:\n    rl.take(sys.argv[1]); print('won')\n"
                "except Exception as e:\n    print('lost', type(e).__name__)\n"
                "time.sleep(1)")  # hold it while the other one tries
        procs = [subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outs == ["lost RunLockedError", "won"], outs


# ---------------------------------------------------------------------------------------
# SIGKILL at random moments


def test_killed_three_times_resumes_exactly(fixture_dir, baseline):
    root, args = fixture_dir
    base, window = baseline
    report = KillReport()
    run = root / "kill3"
    kill_and_resume([*args, "--set", "save_every=1"], run, window, random.Random(3),
                    report, kills=3)
    assert_same_run(run, base)
    report.identical_runs += 1
    print(report)
    assert report.kills >= 3  # a run cut short by a late draw was killed again


@pytest.mark.slow
def test_kill_test(fixture_dir, baseline):
    """GFT_KILL_RUNS runs (default 20), each SIGKILLed at a random moment and resumed."""
    root, args = fixture_dir
    base, window = baseline
    report = run_kill_test(root, args, base, window, int(os.environ.get("GFT_KILL_RUNS", 20)))
    print(report)
    assert report.identical_runs == report.runs and report.kills >= report.runs


def run_kill_test(root: Path, args: list[str], base: Path, window: float, runs: int,
                  seed: int = 0) -> KillReport:
    rng = random.Random(seed)
    report = KillReport()
    for i in range(runs):
        run = root / f"kill-{i:03d}"
        kill_and_resume([*args, "--set", "save_every=1"], run, window, rng, report)
        assert_same_run(run, base)
        report.identical_runs += 1
    return report


if __name__ == "__main__":
    import argparse
    import tempfile
    parser = argparse.ArgumentParser(description="The kill test, standalone.")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gft-kill-") as tmp:
        model, data = write_fixture(Path(tmp))
        cli_args = train_args(model, data)
        window = timed_baseline([*cli_args, "--set", "save_every=1"], Path(tmp) / "baseline")
        print(run_kill_test(Path(tmp), cli_args, Path(tmp) / "baseline", window, opts.runs,
                            opts.seed))
