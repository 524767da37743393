"""Staged plans (gft/stages.py): step ranges, max_steps cutting a plan short or extending
its last stage (never ignored), and a resumed staged run made longer."""
from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from cli import main
from gft.config import build_config
from gft.loop import total_steps
from gft.stages import describe, long_warmup, plan_stages, plan_warnings, repeated_rows

STAGES = {"stages": [{"sft": 3}, {"preset": "gft", "steps": 2, "learning_rate": 1e-3}],
          "model": "m", "data": "d"}


def ranges(cfg):
    return [(s.name, s.start, s.end, s.extended) for s in plan_stages(cfg, 1)]


def test_the_plan_as_written():
    assert ranges(build_config(STAGES)) == [("sft", 0, 3, 0), ("gft", 3, 5, 0)]


def test_max_steps_below_the_plan_cuts_it_short():
    assert ranges(build_config(STAGES, {"max_steps": 2})) == [("sft", 0, 2, 0)]
    assert ranges(build_config(STAGES, {"max_steps": 4})) == [("sft", 0, 3, 0), ("gft", 3, 4, 0)]


def test_max_steps_beyond_the_plan_extends_the_last_stage_and_says_so():
    stages = plan_stages(build_config(STAGES, {"max_steps": 9}), 1)
    assert [(s.name, s.start, s.end, s.extended) for s in stages] == [
        ("sft", 0, 3, 0), ("gft", 3, 9, 4)]
    assert describe(stages).endswith(
        "gft 6 steps (K=4, n=4, tau=0.1, grpo, lr=0.001), extended by 4 steps (max_steps=9 is "
        "beyond the plan's 5)")


def test_a_resumed_staged_run_with_more_steps_runs_them(tmp_path):
    from gft.tiny import TinyModelSpec, write_tiny_model
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(seed=0))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": "yes",
                                        "answer": "yes"}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data), "-o", str(run),
            "--backend", "torch", "--set", "stages=[{sft: 1}, {dft: 1}]",
            "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
            "--set", "max_response_tokens=4", "--set", "eval_samples=1",
            "--set", "progress=false", "--set", "rewards=[exact]"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    more = CliRunner().invoke(main, ["train", "--resume", str(run), "--max-steps", "3"])
    assert more.exit_code == 0, more.output
    assert "dft 2 steps (K=1, n=0, tau=1.0, constant, lr=1e-06), extended by 1 step " \
           "(max_steps=3 is beyond the plan's 2)" in more.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    last = run / "checkpoints" / "step-000003"  # final/ holds the model only
    assert json.loads((last / "trainer_state.json").read_text())["loop"]["step"] == 3


@pytest.mark.parametrize("stage, message", [
    # YAML `- sft: 200` with `learning_rate: ...` indented under it: the natural mistake
    ({"sft": 2, "learning_rate": 1e-3},
     "stages[0]: 'sft: 2' with other keys (learning_rate); write it as {preset: sft, "
     "steps: 2, learning_rate: ...}"),
    ({"grpoo": 2}, "stages[0]: unknown preset 'grpoo' (did you mean 'grpo'?)"),
])
def test_a_stage_written_wrong_says_how_to_write_it(stage, message):
    """Both got only "expected 'preset: steps' or a mapping with 'preset' and 'steps'"."""
    from gft.config import build_config
    from gft.errors import ConfigError
    with pytest.raises(ConfigError) as excinfo:
        build_config({"model": "m", "stages": [stage]})
    assert str(excinfo.value) == message


@pytest.mark.parametrize("key, value", [("rewards", ["exact"]), ("save_every", 1),
                                        ("eval_samples", 3), ("max_grad_norm", 0.5),
                                        ("chat_template", True)])
def test_a_stage_cannot_set_what_the_run_reads_once(key, value):
    """These are read once for the whole run; set in a stage they were accepted and
    ignored (a stage's rewards: the run scored with math instead)."""
    from gft.errors import ConfigError
    with pytest.raises(ConfigError, match=rf"^stages\[1\]: '{key}' is set for the whole "
                                          r"run, not per stage$"):
        build_config({"model": "m", "stages": [{"sft": 1}, {"preset": "grpo", "steps": 1,
                                                             key: value}]})


def test_a_step_larger_than_the_data_is_said():
    """prompts_per_step=128 (the default) on 10 rows drew every row ~13 times in one
    step, and epochs: 1 ran 12.8 passes, in silence."""
    cfg = build_config({"model": "m", "data": "d", "preset": "sft"})
    stages = plan_stages(cfg, total_steps(cfg, 10))
    assert repeated_rows(cfg, stages, 10) == (
        "warning: prompts_per_step=128 is more than the 10 training rows, so each step draws "
        "every row about 12.8 times (epochs=1 makes 1 step: 12.8 passes over the data); for "
        "one pass per step set prompts_per_step (and prompts_per_minibatch) to at most 10")
    assert repeated_rows(cfg, stages, 128) is None
    staged = build_config({**STAGES, "prompts_per_step": 4, "prompts_per_minibatch": 4})
    note = repeated_rows(staged, plan_stages(staged, 1), 2)
    assert note.startswith("warning: stage 1 (sft): prompts_per_step=4 is more than the 2 "
                           "training rows, so each step draws every row about 2 times;")


def test_a_warm_up_longer_than_its_stage_is_said():
    """warmup_steps: 100 on a 10-update run: the learning rate rose to a tenth of its peak
    and never reached it, in silence."""
    cfg = build_config({"model": "m", "data": "d", "max_steps": 10, "warmup_steps": 100,
                        "learning_rate": 1e-4, "lr_schedule": "cosine",
                        "prompts_per_step": 4, "prompts_per_minibatch": 4})
    stages = plan_stages(cfg, total_steps(cfg, 100))
    assert long_warmup(stages) == (
        "warning: warmup_steps=100 is not shorter than its 10 optimizer updates: the learning "
        "rate rises to 9.9e-06 and never reaches learning_rate=0.0001 (nor decays: "
        "lr_schedule cosine)")
    assert plan_warnings(cfg, stages, 100) == [long_warmup(stages)]
    # 128 prompts per step in updates of 64: sft 3 steps x 2 updates, then gft 2 x 2
    staged = build_config({**STAGES, "warmup_steps": 4})
    assert long_warmup(plan_stages(staged, 1)).startswith(
        "warning: stage 2 (gft): warmup_steps=4 is not shorter than its 4 optimizer updates")
    assert long_warmup(plan_stages(build_config({**STAGES, "warmup_steps": 3}), 1)) is None
