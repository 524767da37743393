"""Equal compute by construction: the policy-token stop (`max_policy_tokens`).

Methods differ wildly in tokens per step (SFT trains on one demonstration per prompt, GRPO
samples and trains on eight rollouts), so equal *steps* are not equal compute. A run, or a
stage of a staged run, can instead end once it has processed a number of *policy tokens*:
rollout tokens generated plus response tokens in forward/backward passes (the metrics'
`rollout_tokens + update_tokens`, summed over every rank, so all ranks stop together).

The check runs after each step, so a run ends at its budget plus less than one step's
tokens. Stage boundaries become dynamic: a stage with its own budget may end before its
`steps`, and the next stage starts there. The counters live in the loop state, which the
checkpoint saves, so a resumed run stops exactly where an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from gft.stages import Stage

State = TypeVar("State")  # gft.loop.LoopState (not imported: the loop imports this module)


def step_policy_tokens(m: dict[str, Any]) -> float:
    """Policy tokens of one step from its metrics: rollouts generated + response tokens trained."""
    return float(m.get("rollout_tokens", 0.0)) + float(m.get("update_tokens", 0.0))


def placed(stages: list[Stage], state: Any) -> Stage:
    """The state's current stage, its step range moved to where it actually started."""
    s = stages[state.stage]
    return replace(s, start=state.stage_start, end=state.stage_start + s.end - s.start)


def _stage_done(stage: Stage, state: Any) -> bool:
    return state.step >= stage.end or bool(stage.tokens and state.stage_tokens >= stage.tokens)


def advance(stages: list[Stage], state: State, cfg: Any) -> tuple[Stage | None, State]:
    """(the stage the next step trains in, the state moved past finished stages);
    (None, state) once the run is over: its last stage is done, `max_steps` caps a staged
    run, or the run's `max_policy_tokens` are spent. Pure: `state` is not modified."""
    if cfg.max_policy_tokens and state.policy_tokens >= cfg.max_policy_tokens:
        return None, state
    if cfg.max_steps is not None and state.step >= cfg.max_steps or state.stage >= len(stages):
        return None, state  # the latter: a resume with a lower max_steps dropped stages
    stage = placed(stages, state)
    while _stage_done(stage, state):
        if state.stage + 1 >= len(stages):
            return None, state
        # a stage ended by steps hands over at its planned end (also true of checkpoints
        # written before stages could end early); one ended by tokens, where it stopped
        state = replace(state, stage=state.stage + 1, stage_start=min(state.step, stage.end),
                        stage_tokens=0.0)
        stage = placed(stages, state)
    return stage, state

