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
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gft.config import (FIELDS, PRESETS, TrainConfig, _coerce, _suggest, unknown_key,
                        validate)
from gft.errors import ConfigError

# Keys a stage may not change: they define the model, the data or the run itself.
RUN_KEYS = {"model", "backend", "device", "dtype", "data", "output_dir", "seed", "stages",
            "trust_remote_code", "max_steps", "epochs", "lora_rank", "lora_alpha",
            "lora_dropout", "lora_targets", "save_shard_size", "gradient_checkpointing",
            "parallel", "rollout_engine", "mixed_precision", "logits_chunk"}


@dataclass(frozen=True)
class Stage:
    index: int
    name: str           # the preset, for logs
    cfg: TrainConfig    # the config this stage trains with
    start: int          # first global step (0-based)
    end: int            # one past its last global step (planned: a budget may end it sooner)
    extended: int = 0   # steps added by a max_steps beyond the plan (last stage only)
    tokens: int = 0     # the stage's own policy-token budget (0: none; gft/budget.py)


def _normalize(item: Any, i: int) -> dict[str, Any]:
    """`sft: 200`, `"sft:200"` or `{preset: sft, steps: 200, ...}` -> a dict."""
    if isinstance(item, str) and ":" in item:
        name, steps = item.split(":", 1)
        try:
            return {"preset": name.strip(), "steps": int(steps)}
        except ValueError:
            raise ConfigError(f"stages[{i}]: '{item}' must look like preset:steps") from None
    if isinstance(item, dict) and len(item) == 1 and next(iter(item)) in PRESETS:
        (name, steps), = item.items()
        return {"preset": name, "steps": steps}
    if isinstance(item, dict) and "preset" in item:
        return dict(item)
    raise ConfigError(f"stages[{i}]: expected 'preset: steps' or a mapping with 'preset' and "
                      f"'steps', got {item!r}")


def stage_config(base: TrainConfig, values: dict[str, Any], i: int) -> tuple[TrainConfig, int]:
    """The base config with the stage's preset, then its own keys; and its step count."""
    preset = values.pop("preset")
    if preset not in PRESETS:
        raise ConfigError(f"stages[{i}]: unknown preset {preset!r}" + _suggest(str(preset), PRESETS))
    steps = values.pop("steps", None)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"stages[{i}]: 'steps' must be a positive integer, got {steps!r}")
    for key in values:
        if key not in FIELDS:
            raise ConfigError(unknown_key(key, f"stages[{i}]"))
        if key in RUN_KEYS:
            raise ConfigError(f"stages[{i}]: '{key}' is set for the whole run, not per stage")
    own = {k: _coerce(k, v, f"stages[{i}]") for k, v in values.items()}
    cfg = replace(base, preset=preset, stages=None, **{**PRESETS[preset], **own})
    return validate(cfg), steps


def plan_stages(cfg: TrainConfig, single_stage_steps: int) -> list[Stage]:
    """The run's stages with their global step ranges; max_steps cuts a staged run short,
    or extends its last stage."""
    if not cfg.stages:
        return [Stage(0, cfg.preset, cfg, 0, single_stage_steps)]
    if not isinstance(cfg.stages, list):
        raise ConfigError("'stages' must be a list of 'preset: steps' entries")
    out: list[Stage] = []
    start = 0
    for i, item in enumerate(cfg.stages):
        values = _normalize(item, i)
        stage_cfg, steps = stage_config(cfg, values, i)
        tokens = stage_cfg.max_policy_tokens if "max_policy_tokens" in values else 0
        out.append(Stage(i, stage_cfg.preset, stage_cfg, start, start + steps, tokens=tokens))
        start += steps
    if cfg.max_steps is not None and cfg.max_steps > start:  # e.g. a resumed run made longer
        out[-1] = replace(out[-1], end=cfg.max_steps, extended=cfg.max_steps - start)
    elif cfg.max_steps is not None:  # e.g. a quick smoke run of a staged config
        out = [replace(s, end=min(s.end, cfg.max_steps)) for s in out if s.start < cfg.max_steps]
    return out


def stage_at(stages: list[Stage], step: int) -> Stage:
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]


def describe(stages: list[Stage]) -> str:
    """One line for the terminal: 'sft 300 steps (K=1, n=0, tau=0.0, constant) -> gft ...'."""
    return " -> ".join(
        f"{s.name} {s.end - s.start} steps"
        + (f" or {s.tokens:,} policy tokens" if s.tokens else "")
        + f" (K={s.cfg.num_offpolicy}, n={s.cfg.num_rollouts}, "
        f"tau={s.cfg.tau}, {s.cfg.advantage}, lr={s.cfg.learning_rate:g})"
        + (f", extended by {s.extended} step{'s' * (s.extended > 1)} (max_steps={s.end} is "
           f"beyond the plan's {s.end - s.extended})" if s.extended else "") for s in stages)
