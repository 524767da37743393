"""The training loop, written once for every backend.

One step (DESIGN.md's data flow):
    prompts_per_step prompts -> n rollouts each -> rewards for rollouts and the K dataset
    responses -> group advantages -> per mini-batch of prompts: padded micro-batches ->
    backend.train_step (one optimizer update) -> metrics -> eval / checkpoint.

Randomness is a pure function of (seed, step): the data order is a per-epoch permutation
and each step's sampling seed is derived from its index, so a resumed run draws exactly
what an uninterrupted one would, on either backend.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backends import SamplingConfig
from gft.checkpoint import save_step_checkpoint
from gft.config import TrainConfig, to_dict
from gft.evaluate import evaluate
from gft.groups import micro_batches
from gft.metrics import MetricsLog, ProgressBar, group_metrics
from gft.objective import zero_variance_fraction
from gft.rollout import PreparedPrompts, build_groups, score_groups
from gft.stages import Stage, plan_stages, stage_at


class DataSampler:
    """Prompts in a fresh seeded permutation each epoch; the position is resumable."""

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0):
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            chunk = order[self.position:self.position + k - len(out)]
            out.extend(int(i) for i in chunk)
            self.position += len(chunk)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def lr_at(update: int, total_updates: int, peak: float, schedule: str, warmup: int) -> float:
    """Learning rate of optimizer update `update` (0-based): linear warm-up, then a schedule."""
    if update < warmup:
        return peak * (update + 1) / (warmup + 1)
    span = max(total_updates - warmup, 1)
    frac = min((update - warmup) / span, 1.0)
    decay = {"constant": 1.0, "linear": 1.0 - frac,
             "cosine": 0.5 * (1.0 + math.cos(math.pi * frac))}[schedule]
    return peak * decay


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_rows / cfg.prompts_per_step))


def stage_lr(stage: Stage, step: int) -> Callable[[int], float]:
    """Learning rates of one step's updates, on the stage's own schedule."""
    c = stage.cfg
    per_step = math.ceil(c.prompts_per_step / c.prompts_per_minibatch)
    total = (stage.end - stage.start) * per_step
    first = (step - stage.start) * per_step
    return lambda i: lr_at(first + i, total, c.learning_rate, c.lr_schedule, c.warmup_steps)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


@dataclass
class LoopState:
    """Everything besides weights and optimizer moments that a resume needs."""
    step: int = 0
    epoch: int = 0
    position: int = 0
    bad_steps: int = 0          # consecutive non-finite updates
    skipped_updates: int = 0    # total non-finite updates skipped


def train_step(cfg: TrainConfig, backend, data: PreparedPrompts, indices: list[int],
               scorer, step: int, lr_fn: Callable[[int], float]) -> dict[str, Any]:
    """One GFT step over the prompts `indices`; returns its metrics.

    lr_fn(i) is the learning rate of this step's i-th optimizer update."""
    rows = [data.rows[i] for i in indices]
    prompt_ids = [data.prompt_ids[i] for i in indices]
    t0 = time.perf_counter()
    rollouts: list[list[int]] = []
    if cfg.num_rollouts:
        sampling = SamplingConfig(max_new_tokens=cfg.max_response_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  batch_size=cfg.rollout_batch_size)
        repeated = [p for p in prompt_ids for _ in range(cfg.num_rollouts)]
        rollouts = backend.generate(repeated, sampling, step_seed(cfg.seed, step))
    t1 = time.perf_counter()
    seqs = build_groups(rows, prompt_ids, rollouts, tokenizer=backend.tokenizer,
                        num_offpolicy=cfg.num_offpolicy, num_rollouts=cfg.num_rollouts,
                        max_response_tokens=cfg.max_response_tokens)
    scored = score_groups(seqs, rows, scorer, cfg.advantage)
    t2 = time.perf_counter()
    m: dict[str, Any] = group_metrics(
        seqs, zero_variance_fraction(scored["rewards"], scored["groups"]) if scored else 0.0)
    stats: list[dict[str, float]] = []
    per_mb = cfg.prompts_per_minibatch
    for first in range(0, len(rows), per_mb):
        part = [s for s in seqs if first <= s.group < first + per_mb]
        lr = lr_fn(first // per_mb)
        batches = micro_batches(part, cfg.micro_batch_size, backend.tokenizer.pad_token_id,
                                skip_zero_advantage=cfg.skip_zero_advantage)
        if batches:  # all-zero advantages: no gradient, so no update at all
            stats.append({**backend.train_step(batches, lr, tau=cfg.tau,
                                               aggregation=cfg.loss_aggregation), "lr": lr})
    t3 = time.perf_counter()
    rollout_tokens = float(sum(len(r) for r in rollouts))
    update_tokens = float(sum(s["tokens"] for s in stats))
    m.update({
        "loss": float(np.sum([s["loss"] for s in stats])) / max(len(stats), 1),
        "grad_norm": float(np.mean([s["grad_norm"] for s in stats])) if stats else 0.0,
        "entropy": float(np.mean([s["entropy"] for s in stats])) if stats else float("nan"),
        "lr": stats[-1]["lr"] if stats else lr_fn(0),
        "updates": float(len(stats)), "skipped": float(sum(s["skipped"] for s in stats)),
        "rollout_tokens": rollout_tokens, "update_tokens": update_tokens,
        "rollout_tok_s": rollout_tokens / max(t1 - t0, 1e-9),
        "update_tok_s": update_tokens / max(t3 - t2, 1e-9),
        "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
    })
    sample = next((s for s in seqs if s.on_policy), seqs[0] if seqs else None)
    if sample is not None:
        m["_sample"] = {"prompt": rows[sample.group].prompt, "completion": sample.text,
                        "reward": sample.reward, "answer": rows[sample.group].answer}
    return m


def run_eval(cfg: TrainConfig, backend, data: PreparedPrompts | None, scorer,
             step: int) -> dict[str, float]:
    if data is None or not data.rows:
        return {}
    n = min(cfg.eval_samples, len(data.rows))
    return evaluate(backend, data.rows[:n], data.prompt_ids[:n], scorer,
                    max_new_tokens=cfg.max_response_tokens, seed=step_seed(cfg.seed, -1),
                    batch_size=cfg.rollout_batch_size)


def train(cfg: TrainConfig, backend, data: PreparedPrompts, eval_data: PreparedPrompts | None,
          scorer, run_dir: Path, state: LoopState, console,
          stop: Callable[[], bool] = lambda: False) -> LoopState:
    """Run steps state.step .. total; log, evaluate and checkpoint along the way.

    stop() is checked between steps (gft/signals.py): once it is true the loop saves a
    checkpoint of the last finished step and returns early."""
    run_dir = Path(run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl")
    samples = MetricsLog(run_dir / "samples.jsonl")
    log.truncate_after(state.step if state.step else -1)  # step 0: drop a killed start's lines
    samples.truncate_after(state.step if state.step else -1)
    stages = plan_stages(cfg, total_steps(cfg, len(data.rows)))
    steps = stages[-1].end
    sampler = DataSampler(len(data.rows), cfg.seed, state.epoch, state.position)

    def checkpoint(step: int) -> Path:
        payload = {"loop": asdict(state), "config": to_dict(cfg), "backend": backend.name}
        return save_step_checkpoint(backend, run_dir, step, payload, cfg.keep_checkpoints)

    saved = state.step  # the step the newest checkpoint holds (0: start from the config)
    if state.step == 0 and not stop():
        ev = run_eval(cfg, backend, eval_data, scorer, 0)
        if ev:
            log.write({"step": 0, **{f"eval/{k}": v for k, v in ev.items()}})
            console.print(f"step 0: held-out accuracy {ev['accuracy']:.3f} (n={int(ev['n'])})")
    with ProgressBar(steps, state.step, cfg.progress, console) as bar:
        while state.step < steps and not stop():
            stage = stage_at(stages, state.step)
            if state.step == stage.start and len(stages) > 1:
                bar.console.print(f"stage {stage.index + 1}/{len(stages)}: {stage.name} for "
                                  f"{stage.end - stage.start} steps")
            indices = sampler.take(stage.cfg.prompts_per_step)
            t0 = time.perf_counter()
            m = train_step(stage.cfg, backend, data, indices, scorer, state.step,
                           stage_lr(stage, state.step))
            state.step += 1
            state.epoch, state.position = sampler.epoch, sampler.position
            sample = m.pop("_sample", None)
            m.update({"step": state.step, "epoch": state.epoch, "stage": stage.index,
                      "preset": stage.name, "time/step": time.perf_counter() - t0})
            if cfg.eval_every and state.step % cfg.eval_every == 0 or state.step == steps:
                ev = run_eval(cfg, backend, eval_data, scorer, state.step)
                m.update({f"eval/{k}": v for k, v in ev.items()})
                if ev:
                    bar.console.print(f"step {state.step}: held-out accuracy "
                                      f"{ev['accuracy']:.3f}, reward {ev['reward']:.3f}")
            log.write(m)
            _track_bad_steps(state, m, cfg)  # after logging: the step that stops it is logged
            if sample and cfg.sample_every and state.step % cfg.sample_every == 0:
                samples.write({"step": state.step, **sample})
            bar.update(state.step, m)
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < steps:
                checkpoint(state.step)
                saved = state.step
    if state.step < steps and state.step != saved:  # stopped early: keep what was done
        checkpoint(state.step)
    return state


def _track_bad_steps(state: LoopState, m: dict[str, Any], cfg: TrainConfig) -> None:
    """Count non-finite updates (the backend already skipped them); stop after too many."""
    from gft.errors import GFTError
    if m.get("skipped"):
        state.bad_steps += 1
        state.skipped_updates += int(m["skipped"])
        if state.bad_steps >= cfg.max_bad_steps:
            raise GFTError(f"{state.bad_steps} steps in a row had a non-finite loss or gradient; "
                           "stopping with the last good checkpoint intact (lower learning_rate?)")
    else:
        state.bad_steps = 0
