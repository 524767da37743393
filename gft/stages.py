"""Staged pipelines: one run that chains presets, e.g. SFT -> GFT -> GRPO.

    stages:
      - sft: 200                        # shorthand: preset: steps
      - {preset: gft, steps: 300, learning_rate: 1e-5}
      - grpo: 200
      - {preset: gft, steps: 1000, max_policy_tokens: 500000}   # ends at whichever comes first

Each stage is the run's config with the stage's preset applied, then the stage's own
keys. Steps are counted globally (a checkpoint at step 250 resumes inside stage 2); the
weights and the AdamW moments carry over; each stage has its own LR schedule and warm-up.
Without `stages`, a run is a single stage of `max_steps` (or `epochs`) steps.
With `stages`, `max_steps` below the plan's total cuts the run short there; above it, the
last stage is extended to reach it (its LR schedule then spans the longer stage), and the
plan line says so. To continue with another preset instead, add a stage to `stages`.
A stage's own `max_policy_tokens` ends it once it has processed that many policy tokens
(gft/budget.py); the next stage then starts at once, so stages' step ranges are planned
here as upper bounds and placed by the loop as the run goes.
What a stage entry may say (its preset, steps and keys; RUN_KEYS stay whole-run: the
model and data, rewards, evaluation, checkpoints, logging and the optimizer's settings
other than its learning-rate schedule) is the
config's schema, checked by gft/config.py `read_stages` when the config is built; this
module owns the plan built from those entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gft.config import TrainConfig, read_stages


@dataclass(frozen=True)
class Stage:
    index: int
    name: str           # the preset, for logs
    cfg: TrainConfig    # the config this stage trains with
    start: int          # first global step (0-based)
    end: int            # one past its last global step (planned: a budget may end it sooner)
    extended: int = 0   # steps added by a max_steps beyond the plan (last stage only)
    tokens: int = 0     # the stage's own policy-token budget (0: none; gft/budget.py)


def plan_stages(cfg: TrainConfig, single_stage_steps: int) -> list[Stage]:
    """The run's stages with their global step ranges; max_steps cuts a staged run short,
    or extends its last stage."""
    if not cfg.stages:
        return [Stage(0, cfg.preset, cfg, 0, single_stage_steps)]
    out: list[Stage] = []
    start = 0
    for i, (stage_cfg, steps, tokens) in enumerate(read_stages(cfg)):
        out.append(Stage(i, stage_cfg.preset, stage_cfg, start, start + steps, tokens=tokens))
        start += steps
    if cfg.max_steps is not None and cfg.max_steps > start:  # e.g. a resumed run made longer
        out[-1] = replace(out[-1], end=cfg.max_steps, extended=cfg.max_steps - start)
    elif cfg.max_steps is not None:  # e.g. a quick smoke run of a staged config
        out = [replace(s, end=min(s.end, cfg.max_steps)) for s in out if s.start < cfg.max_steps]
    return out


def describe(stages: list[Stage]) -> str:
    """One line for the terminal: 'sft 300 steps (K=1, n=0, tau=0.0, constant) -> gft ...'."""
    return " -> ".join(
        f"{s.name} {s.end - s.start} steps"
        + (f" or {s.tokens:,} policy tokens" if s.tokens else "")
        + f" (K={s.cfg.num_offpolicy}, n={s.cfg.num_rollouts}, "
        f"tau={s.cfg.tau}, {s.cfg.advantage}, lr={s.cfg.learning_rate:g})"
        + (f", extended by {s.extended} step{'s' * (s.extended > 1)} (max_steps={s.end} is "
           f"beyond the plan's {s.end - s.extended})" if s.extended else "") for s in stages)


def repeated_rows(cfg: TrainConfig, stages: list[Stage], n_rows: int) -> str | None:
    """A warning when a stage's step draws more prompts than there are training rows:
    the sampler then wraps round the data inside the step, so every row is drawn several
    times per step, and `epochs` (steps = epochs x rows / prompts_per_step, at least 1)
    runs many passes where it says one. (mlx-lm refuses a data set smaller than its
    batch_size.) Here the step is kept as configured, and said."""
    big = [s for s in stages if s.cfg.prompts_per_step > n_rows]
    if not big:
        return None
    stage, rows = big[0], f"{n_rows} training row{'s' * (n_rows != 1)}"
    times = stage.cfg.prompts_per_step / n_rows
    where = f"stage {stage.index + 1} ({stage.name}): " if cfg.stages else ""
    by_epochs = "" if cfg.max_steps is not None or cfg.stages else (
        f" (epochs={cfg.epochs:g} makes {stage.end} step{'s' * (stage.end != 1)}: "
        f"{stage.end * times:.3g} passes over the data)")
    return (f"warning: {where}prompts_per_step={stage.cfg.prompts_per_step} is more than the "
            f"{rows}, so each step draws every row about {times:.3g} times{by_epochs}; for "
            f"one pass per step set prompts_per_step (and prompts_per_minibatch) to at most "
            f"{n_rows}")


def long_warmup(stages: list[Stage]) -> str | None:
    """A warning when a stage's warm-up is as long as its optimizer updates or longer:
    its learning rate then never reaches learning_rate (and a linear or cosine decay
    never starts), which the run did without a word."""
    for stage in stages:
        c = stage.cfg
        updates = (stage.end - stage.start) * math.ceil(c.prompts_per_step /
                                                        c.prompts_per_minibatch)
        if c.warmup_steps >= updates:
            where = f"stage {stage.index + 1} ({stage.name}): " if len(stages) > 1 else ""
            top = c.learning_rate * updates / (c.warmup_steps + 1)
            return (f"warning: {where}warmup_steps={c.warmup_steps} is not shorter than its "
                    f"{updates} optimizer update{'s' * (updates != 1)}: the learning rate "
                    f"rises to {top:.3g} and never reaches learning_rate={c.learning_rate:g}"
                    + (f" (nor decays: lr_schedule {c.lr_schedule})"
                       if c.lr_schedule != "constant" else ""))
    return None


def plan_warnings(cfg: TrainConfig, stages: list[Stage], n_rows: int) -> list[str]:
    """What the plan does that the config does not say: steps larger than the data, a
    warm-up longer than its stage."""
    return [w for w in (repeated_rows(cfg, stages, n_rows), long_warmup(stages)) if w]
