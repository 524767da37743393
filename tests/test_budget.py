"""The policy-token stop (gft/budget.py): every preset and a staged run end at the same
number of policy tokens, within one step's tokens, and a resumed run stops where an
uninterrupted one does."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from gft.budget import advance
from gft.checkpoint import checkpoint_step, latest_checkpoint
from gft.config import build_config
from gft.errors import ConfigError
from gft.signals import Interrupted
from gft.loop import LoopState
from gft.stages import plan_stages
from gft.tiny import TinyModelSpec, write_tiny_model
from tests.helpers import yes_questions_data

BUDGET = 120  # policy tokens: several steps of every preset at the sizes below
HALF = BUDGET // 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("budget")
    model = write_tiny_model(root / "model", TinyModelSpec(seed=0))
    return model, yes_questions_data(root / "data")


def values(inputs, out: Path, **extra) -> dict:
    model, data = inputs
    return {"model": str(model), "data": str(data), "backend": "torch", "rewards": ["exact"],
            "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 16,
            "max_response_tokens": 4, "learning_rate": 1e-3, "eval_samples": 2,
            "eval_every": 0, "save_every": 0, "progress": False, "max_steps": 500,
            "output_dir": str(out), **extra}


def step_tokens(run: Path) -> list[tuple[int, float]]:
    """(stage, policy tokens) of every training step in metrics.jsonl."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["rollout_tokens"] + r["update_tokens"]) for r in recs if "loss" in r]


def train(cfg_values: dict, **kw) -> Path:
    from rich.console import Console
    from gft.run import run_training
    run_training(build_config(cfg_values, source="test") if cfg_values else None,
                 console=Console(quiet=True), **kw)
    return Path(cfg_values["output_dir"]) if cfg_values else Path(kw["resume"])


def assert_stopped_at(tokens: list[float], budget: int) -> None:
    """The budget is reached, and not one step earlier: total in [budget, budget + last step)."""
    assert sum(tokens) >= budget
    assert sum(tokens) - tokens[-1] < budget


STAGED = [{"preset": "sft", "steps": 400, "max_policy_tokens": HALF},
          {"preset": "gft", "steps": 400, "max_policy_tokens": HALF, "num_rollouts": 2}]
# Two rollouts per prompt (not the presets' 8 or 4) keep grpo and gft at several steps
SMALL_GROUPS = {"grpo": {"num_rollouts": 2}, "gft": {"num_rollouts": 2}}


@pytest.mark.parametrize("method", ["sft", "dft", "grpo", "gft", "sft>gft"])
def test_every_method_ends_at_the_same_policy_token_count(inputs, tmp_path, method):
    extra = ({"preset": "sft", "stages": STAGED} if method == "sft>gft"
             else {"preset": method, "max_policy_tokens": BUDGET, **SMALL_GROUPS.get(method, {})})
    steps = step_tokens(train(values(inputs, tmp_path / "run", **extra)))
    tokens = [t for _, t in steps]
    assert 2 <= len(steps) < 500  # the token budget stopped it, not the step cap
    if method != "sft>gft":
        assert_stopped_at(tokens, BUDGET)
        return
    # each stage ends at its own budget and the next starts at once
    first = [t for s, t in steps if s == 0]
    second = [t for s, t in steps if s == 1]
    assert first and second and len(first) + len(second) == len(steps)
    assert_stopped_at(first, HALF)
    assert_stopped_at(second, HALF)
    assert BUDGET <= sum(tokens) < BUDGET + first[-1] + second[-1]


class StopAfter:
    """Stands in for gft.signals.GracefulStop: asks the loop to stop after `n` checks."""

    def __init__(self, n: int):
        self.n, self.calls, self.signum = n, 0, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls > self.n:
            self.signum = signal.SIGINT
        return self.signum is not None


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(inputs, tmp_path, monkeypatch):
    staged = {"preset": "sft", "max_policy_tokens": BUDGET - 20,
              "stages": [{"preset": "sft", "steps": 400, "max_policy_tokens": HALF},
                         {"preset": "dft", "steps": 400, "max_policy_tokens": HALF}]}
    whole = step_tokens(train(values(inputs, tmp_path / "whole", **staged)))
    # interrupted twice: once inside the first stage, once inside the second
    n_first = sum(1 for s, _ in whole if s == 0)
    k = max(1, n_first // 2)
    run = tmp_path / "cut"
    # StopAfter(n) lets a fresh run train n - 1 steps (its first check comes before step 0's
    # evaluation) and a resumed one n steps: cut after step k, then one step into stage 2
    for i, n in enumerate((k + 1, n_first + 1 - k)):
        monkeypatch.setattr("gft.run.GracefulStop", lambda n=n: StopAfter(n))
        with pytest.raises(Interrupted):
            train(values(inputs, run, **staged)) if i == 0 else train({}, resume=run)
    monkeypatch.undo()
    resumed = step_tokens(train({}, resume=run))
    assert resumed == whole
    assert_stopped_at([t for _, t in whole], BUDGET - 20)  # the run's budget ends it in stage 2
    # the finished run's last checkpoint is its actual last step, with the counter in it
    # (final/ holds the model only)
    last = latest_checkpoint(run)
    assert checkpoint_step(last) == len(whole)
    assert json.loads((last / "trainer_state.json").read_text())["loop"]["policy_tokens"] \
        == sum(t for _, t in whole)


def test_old_loop_states_resume_in_the_planned_stage():
    """A checkpoint written before stages could end early has no stage fields: its stage
    follows from the step, as the plan says."""
    cfg = build_config({"model": "m", "data": "d", "stages": [{"sft": 3}, {"gft": 4}]})
    stages = plan_stages(cfg, 1)
    stage, state = advance(stages, LoopState(step=5), cfg)
    assert (stage.index, stage.start, stage.end, state.stage_start) == (1, 3, 7, 3)
    assert advance(stages, LoopState(step=7), cfg)[0] is None


def test_a_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="max_policy_tokens"):
        build_config({"model": "m", "data": "d", "max_policy_tokens": -1})


def test_the_stop_works_the_same_on_mlx(inputs, tmp_path):
    """The stop lives in the backend-agnostic loop: an MLX run obeys it too."""
    pytest.importorskip("mlx.core")
    run = values(inputs, tmp_path / "run", preset="gft", backend="mlx",
                 max_policy_tokens=BUDGET, **SMALL_GROUPS["gft"])
    steps = step_tokens(train(run))
    assert len(steps) >= 2
    assert_stopped_at([t for _, t in steps], BUDGET)
