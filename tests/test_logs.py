"""Logs a cluster job can read (gft/metrics.py): without a terminal, a plain line every
logging_steps, progress inside a long step, and an end-of-run summary."""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from cli import main
from gft.metrics import Heartbeat, step_line, summary_lines

STEP = {"loss": 0.51234, "reward/rollout": 0.25, "accuracy/rollout": 0.125, "entropy": 1.5,
        "grad_norm": 0.75, "rollout_tokens": 600.0, "update_tokens": 400.0, "time/step": 2.0,
        "memory/peak_host_gib": 1.25}


def test_step_line_has_the_headline_metrics():
    line = step_line(10, 450, STEP)
    for part in ("step 10/450", "loss 0.5123", "reward 0.250", "acc 0.125", "entropy 1.500",
                 "grad_norm 0.750", "tok/s 500", "peak_mem_gib 1.25", "s/step 2.00"):
        assert part in line, (part, line)
    assert "\n" not in line
    # a metric that a step does not have (SFT: no rollouts; NaN entropy) is left out
    assert step_line(1, 2, {"loss": 1.0, "entropy": float("nan")}) == "step 1/2  loss 1.0000"


def test_summary_has_time_tokens_throughput_memory_evaluations_and_checkpoint():
    records = [{"step": 0, "eval/accuracy": 0.1},
               {"step": 1, **STEP}, {"step": 2, **STEP, "eval/accuracy": 0.6},
               {"step": 3, **STEP, "eval/accuracy": 0.5}]
    lines = summary_lines(records, 125.0, {"memory/peak_host_gib": 1.5}, "runs/x/final")
    text = "\n".join(lines)
    assert "done: 3 steps, wall time 2m05s" in text
    assert "3,000 tokens (rollouts 1,800, updates 1,200), 500 tokens/s" in text
    assert "peak memory: host (peak RSS) 1.50 GiB" in text
    assert "first 0.100 (step 0), best 0.600 (step 2), last 0.500 (step 3)" in text
    assert lines[-1] == "final checkpoint: runs/x/final"


def test_summary_of_a_run_without_rewards_reports_its_held_out_loss():
    """An SFT run with no reward evaluates the held-out loss; its summary said
    'evaluation: none'."""
    records = [{"step": 0, "eval/loss": 2.5, "eval/n": 4.0}, {"step": 1, **STEP},
               {"step": 2, **STEP, "eval/loss": 1.25}, {"step": 3, **STEP, "eval/loss": 1.5}]
    lines = summary_lines(records, 1.0, {"memory/peak_host_gib": 1.5}, "f")
    assert lines[-2] == ("evaluation loss (NLL/token): first 2.500 (step 0), best 1.250 "
                         "(step 2), last 1.500 (step 3)")
    assert summary_lines([{"step": 1, **STEP}], 1.0, {"memory/peak_host_gib": 1.5},
                         "f")[-2] == "evaluation: none"


def test_summary_says_when_no_step_made_an_update():
    """GRPO where every group's rewards are equal (a task too hard, near-zero temperature)
    trains nothing; the summary said only 'updates 0' tokens."""
    flat = {**STEP, "updates": 0.0, "skipped": 0.0, "zero_variance_groups": 1.0}
    lines = summary_lines([{"step": 1, **flat}, {"step": 2, **flat}], 1.0,
                          {"memory/peak_host_gib": 1.5}, "f")
    assert lines[1].startswith("warning: none of the 2 steps made an optimizer update, so "
                               "the model did not change")
    for records in ([{"step": 1, **flat}, {"step": 2, **flat, "updates": 1.0}],
                    [{"step": 1, **flat, "skipped": 1.0}],  # non-finite: its own message
                    [{"step": 1, **STEP}]):
        assert not any(line.startswith("warning") for line in summary_lines(
            records, 1.0, {"memory/peak_host_gib": 1.5}, "f"))


def test_heartbeat_says_what_a_long_step_is_doing():
    out = io.StringIO()
    console = Console(file=out, width=200)
    with Heartbeat(console, enabled=True, every=0.05) as beat:
        beat.phase("step 1: rollouts (64 sequences)", new_step=True)
        time.sleep(0.3)
        beat.phase("")
        time.sleep(0.15)
        quiet_from = len(out.getvalue())
        time.sleep(0.15)
    assert re.search(r"^step 1: rollouts \(64 sequences\) \(\d+ s into the step\)$",
                     out.getvalue(), re.M), out.getvalue()
    assert len(out.getvalue()) == quiet_from, "no line once the step is done"
    out.seek(0)
    out.truncate(0)
    with Heartbeat(console, enabled=True, every=1.0) as beat:  # steps shorter than `every`
        for _ in range(6):
            beat.phase("step 2: update", new_step=True)
            time.sleep(0.1)
    assert out.getvalue() == "", "short steps print nothing"
    silent = io.StringIO()
    with Heartbeat(Console(file=silent), enabled=False, every=0.01) as beat:
        beat.phase("x", new_step=True)
        time.sleep(0.05)
    assert silent.getvalue() == ""


def test_non_terminal_train_log_has_plain_lines_and_a_summary(tmp_path, monkeypatch):
    """CliRunner's stdout is not a terminal, as in a SLURM or nohup job."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "-o", "run", "--max-steps", "3",
                                       "--set", "eval_samples=4", "--set", "logging_steps=2"])
    assert result.exit_code == 0, result.output
    out = result.output
    lines = out.splitlines()
    steps = [x.split()[1] for x in lines if re.match(r"step \d+/\d+  ", x)]
    assert steps == ["1/3", "2/3", "3/3"]  # the first, every 2nd, and the last
    assert "━" not in out and "\r" not in out, "no progress-bar frames"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r.get("rollout_tokens", 0) + r.get("update_tokens", 0) for r in records)
    assert f"done: 3 steps, wall time" in out and f"{tokens:,.0f} tokens" in out
    assert "peak memory: host (peak RSS)" in out
    assert "evaluation accuracy: first" in out
    assert lines[-1] == f"final checkpoint: {tmp_path / 'run' / 'final'}" or \
        lines[-1] == "final checkpoint: run/final"
    assert all("memory/peak_host_gib" in r for r in records if "loss" in r)


def test_reward_std_is_trls_over_the_rollouts():
    """TRL's reward_std: the unbiased std of the rollouts' rewards (nanstd, Bessel's
    correction); dataset responses have theirs apart."""
    import numpy as np
    from gft.groups import Sequence_
    from gft.metrics import group_sums, metrics_from_sums
    rewards = [1.0, 0.0, 0.5, 0.25, 1.0]
    seqs = [Sequence_(i % 2, [1], [2, 3], "x", on_policy=True, reward=r)
            for i, r in enumerate(rewards)] + [Sequence_(0, [1], [2], "y", on_policy=False,
                                                         reward=3.0)]
    m = metrics_from_sums(group_sums(seqs, 2, 0))
    assert m["reward_std/rollout"] == pytest.approx(np.std(rewards, ddof=1), rel=1e-12)
    assert "reward_std/dataset" not in m  # one response: no unbiased std


def test_a_step_logs_trls_names_beside_gfts(tmp_path, monkeypatch):
    """A TRL user's dashboards read learning_rate, reward, reward_std, rewards/<f>/mean,
    completions/mean_length, ...: gft logged lr, reward/rollout, ... only. Both are
    logged (a resumed run's gft-named charts go on), the names as TRL's source has them."""
    from gft.metrics import TRL_NAMES
    from gft.tiny import write_tiny_model
    from tests.helpers import say_yes_data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lengths.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    write_tiny_model(tmp_path / "model")
    result = CliRunner().invoke(main, [
        "train", "--model", "model", "--data", str(say_yes_data(tmp_path / "data")),
        "--preset", "gft", "--max-steps", "1", "-o", "run", "--backend", "torch",
        "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
        "--set", "num_rollouts=4", "--set", "num_offpolicy=1", "--set", "max_response_tokens=6",
        "--set", "eval_samples=0", "--set", "rewards=[lengths.py:length]"])
    assert result.exit_code == 0, result.output
    [m] = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for trl, ours in TRL_NAMES.items():
        assert m[trl] == m[ours], trl
    assert m["rewards/length/mean"] == m["rewards/length/rollout"]
    assert m["reward_std"] > 0 and m["reward"] != m["reward/dataset"]
    # read, not imported (importing trl takes seconds)
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed")
    source = "".join((Path(importlib.util.find_spec(package).origin).parent / file).read_text()
                     for package, file in (("trl", "trainer/grpo_trainer.py"),
                                           ("transformers", "trainer.py")))
    for name in [*TRL_NAMES, "rewards/{reward_func_name}/mean", "loss", "grad_norm",
                 "entropy"]:
        assert f'"{name}"' in source, name
