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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gft.backend import SamplingConfig
from gft.budget import advance, step_policy_tokens
from gft.checkpoint import save_step_checkpoint
from gft.config import TrainConfig, to_dict
from gft.runpaths import stored_config
from gft.evaluate import evaluate
from gft.distributed import (LOCAL, Comm, local_positions, minibatch_sizes, row_seed,
                             together, union_of_names)
from gft.groups import Sequence_, micro_batches, pad_batch
from gft.metrics import (Heartbeat, MetricsLog, ProgressBar, group_sums, metrics_from_sums,
                         peak_memory, step_line, trl_metrics)
from gft.objective import zero_variance_fraction
from gft.rewardlog import add_logged
from gft.rewards import TrainerState, function_means, function_sums
from gft.rollout import PreparedPrompts, build_groups, score_groups
from gft.stages import Stage, plan_stages
from gft.tracking import Trackers
from gft.types import TokenBatch


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
    policy_tokens: float = 0.0  # rollout + update tokens so far (max_policy_tokens; gft/budget.py)
    stage: int = 0              # the current stage, where it started and its tokens so far:
    stage_start: int = 0        # a stage with a token budget may end before its planned steps
    stage_tokens: float = 0.0


def train_step(cfg: TrainConfig, backend, data: PreparedPrompts, indices: list[int],
               scorer, step: int, lr_fn: Callable[[int], float],
               comm: Comm = LOCAL, beat: Heartbeat | None = None,
               trainer_state: TrainerState | None = None) -> dict[str, Any]:
    """One GFT step over the prompts `indices`; returns its metrics.

    scorer: the RewardModel, or None when no reward is configured (SFT/DFT): reward and
    accuracy are then not reported. trainer_state: what reward functions receive.
    lr_fn(i) is the learning rate of this step's i-th optimizer update. With several
    ranks (gft/distributed.py) this rank rolls out, scores and trains on its share of
    every update's prompts; the metrics returned are those of the whole step.
    beat: told what the step is doing (a long first step shows progress in a
    non-terminal log)."""
    phase = beat.phase if beat is not None else (lambda text, **kw: None)
    positions = local_positions(len(indices), cfg.prompts_per_minibatch, comm.rank, comm.world)
    rows = [data.rows[indices[p]] for p in positions]
    prompt_ids = [data.prompt_ids[indices[p]] for p in positions]
    t0 = time.perf_counter()
    rollouts = _rollouts(cfg, backend, prompt_ids, positions, step, phase)
    t1 = time.perf_counter()
    # a reward that raises or times out on this rank's rows stops every rank (together)
    with together(comm):
        seqs = build_groups(rows, prompt_ids, rollouts, tokenizer=backend.tokenizer,
                            num_offpolicy=cfg.num_offpolicy, num_rollouts=cfg.num_rollouts,
                            max_response_tokens=cfg.max_response_tokens,
                            stops=getattr(backend, "stops", None))
        phase(f"step {step + 1}: rewards ({len(seqs)} responses)",
              new_step=not cfg.num_rollouts)
        scored = score_groups(seqs, rows, scorer, cfg.advantage,
                              trainer_state or TrainerState(global_step=step))
    settle(scorer, comm)
    t2 = time.perf_counter()
    flat = round(zero_variance_fraction(scored["rewards"], scored["groups"]) * len(rows)) \
        if scored else 0
    sums = group_sums(seqs, len(rows), flat)
    if scorer is not None:  # each reward function's mean, for rollouts and dataset apart
        sums.update(function_sums(scorer.log_names, scored.get("per_function"),
                                  scored.get("on_policy", np.zeros(0, bool))))
    updates = _update_batches(cfg, backend, seqs, positions, len(indices), comm)
    stats = _run_updates(cfg, backend, updates, lr_fn, step, phase)
    t3 = time.perf_counter()
    m = _step_metrics(sums, rollouts, stats, scored, scorer, comm, lr_fn)
    m.update({"rollout_tok_s": m["rollout_tokens"] / max(t1 - t0, 1e-9),
              "update_tok_s": m["update_tokens"] / max(t3 - t2, 1e-9),
              "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2})
    m.update(trl_metrics(m))
    if seqs:
        m["_sample"] = _sample_row(seqs, rows, scored, scorer)
    return m


def _rollouts(cfg: TrainConfig, backend, prompt_ids: list[list[int]], positions: list[int],
              step: int, phase) -> list[list[int]]:
    """num_rollouts samples of each prompt, each seeded by the prompt's place in the
    step (not in this rank's batch), so that any split over ranks draws the same."""
    n = cfg.num_rollouts
    if not n:
        return []
    sampling = SamplingConfig(max_new_tokens=cfg.max_response_tokens,
                              temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=cfg.rollout_batch_size)
    repeated = [p for p in prompt_ids for _ in range(n)]
    base = step_seed(cfg.seed, step)
    seeds = [row_seed(base, p * n + j) for p in positions for j in range(n)]
    phase(f"step {step + 1}: rollouts ({len(repeated)} sequences, up to "
          f"{cfg.max_response_tokens} tokens each)", new_step=True)
    return backend.generate(repeated, sampling, seeds)


def _run_updates(cfg: TrainConfig, backend, updates: list[list[TokenBatch]],
                 lr_fn: Callable[[int], float], step: int, phase) -> list[dict[str, float]]:
    """The step's optimizer updates, each over its micro-batches; their stats."""
    stats: list[dict[str, float]] = []
    for i, batches in enumerate(updates):
        if batches:  # all-zero advantages on every rank: no gradient, so no update at all
            phase(f"step {step + 1}: update {i + 1}/{len(updates)} ({len(batches)} "
                  "micro-batches)")
            lr = lr_fn(i)
            stats.append({**backend.train_step(batches, lr, tau=cfg.tau,
                                               aggregation=cfg.loss_aggregation), "lr": lr})
    return stats


def _step_metrics(sums: dict[str, float], rollouts: list[list[int]],
                  stats: list[dict[str, float]], scored: dict[str, Any], scorer, comm: Comm,
                  lr_fn: Callable[[int], float]) -> dict[str, Any]:
    """The whole step's metrics from every rank's, in one all-reduce: response sums,
    rollout tokens, the reward functions' log_metric values (a sum and a count per name
    any rank logged, so the mean spans every rank's), and per update the loss (global
    denominators: the ranks' losses add up), entropy and tokens."""
    logged = scored.get("logged", {}) if scored else {}
    names = union_of_names(comm, list(logged)) if scorer is not None else []
    user = [x for name in names for x in (sum(logged.get(name, ())),
                                          float(len(logged.get(name, ()))))]
    local = [*sums.values(), float(sum(len(r) for r in rollouts)), *user]
    for st in stats:
        local += [st["loss"], st["entropy"] * st["tokens"], st["tokens"]]
    total = comm.all_sum(np.array(local))
    summed = dict(zip(sums, total[:len(sums)]))
    m: dict[str, Any] = metrics_from_sums(summed)
    m.update(function_means(summed))
    if scorer is None:  # no reward configured: a reward of 0 would be a made-up figure
        m = {k: v for k, v in m.items()
             if not k.startswith(("reward/", "reward_std/", "accuracy/"))}
    user_sums = total[len(sums) + 1:len(sums) + 1 + len(user)].reshape(-1, 2)
    per_update = total[len(sums) + 1 + len(user):].reshape(-1, 3)
    update_tokens = float(per_update[:, 2].sum())
    m.update({
        "loss": float(per_update[:, 0].sum()) / max(len(stats), 1),
        "grad_norm": float(np.mean([s["grad_norm"] for s in stats])) if stats else 0.0,
        "entropy": float(per_update[:, 1].sum() / max(update_tokens, 1.0)) if stats
        else float("nan"),
        "lr": stats[-1]["lr"] if stats else lr_fn(0),
        "updates": float(len(stats)), "skipped": float(sum(s["skipped"] for s in stats)),
        "rollout_tokens": float(total[len(sums)]), "update_tokens": update_tokens,
        "_logged": {name: float(value_sum / count) for name, (value_sum, count)
                    in zip(names, user_sums) if count},
    })
    return m


def _sample_row(seqs: list[Sequence_], rows, scored: dict[str, Any], scorer) -> dict[str, Any]:
    """The sample table's row: the step's first rollout (else its first response), with
    the columns reward functions added by log_extra."""
    at = next((i for i, s in enumerate(seqs) if s.on_policy), 0)
    sample = seqs[at]
    return {"prompt": rows[sample.group].prompt, "completion": sample.text,
            "reward": sample.reward if scorer is not None else None,
            "answer": rows[sample.group].answer,
            **{column: values[at] for column, values in (scored.get("extra") or {}).items()}}


def _update_batches(cfg: TrainConfig, backend, seqs: list[Sequence_], positions: list[int],
                    n_prompts: int, comm: Comm) -> list[list[TokenBatch]]:
    """Micro-batches of each optimizer update of the step, for this rank.

    The loss denominators are the update's totals over ALL ranks (one all-reduce), and
    every rank gets the same number of micro-batches per update (padded with a
    zero-advantage one, which adds exactly nothing), because DDP and FSDP2 run
    collectives in every forward/backward and all ranks must take part."""
    pad = backend.tokenizer.pad_token_id
    sizes = minibatch_sizes(n_prompts, cfg.prompts_per_minibatch)
    starts = np.cumsum([0] + sizes)
    parts = [[s for s in seqs if starts[i] <= positions[s.group] < starts[i + 1]]
             for i in range(len(sizes))]
    local = [(sum(len(s.response_ids) for s in p), len(p)) for p in parts]
    totals = comm.all_sum(np.array(local, dtype=np.float64).reshape(-1)).reshape(-1, 2)
    updates = [micro_batches(p, cfg.micro_batch_size, pad, totals=(float(t[0]), float(t[1])),
                             skip_zero_advantage=cfg.skip_zero_advantage,
                             micro_batch_tokens=cfg.micro_batch_tokens)
               for p, t in zip(parts, totals)]
    if comm.world == 1:
        return updates
    counts = np.zeros((comm.world, len(sizes)))
    counts[comm.rank] = [len(u) for u in updates]
    most = comm.all_sum(counts.reshape(-1)).reshape(comm.world, -1).max(axis=0)
    for u, p, t, n in zip(updates, parts, totals, most):
        if len(u) < n:
            # a share with no response at all (sft rows without one, under n = 0) still
            # takes part: a one-token stand-in, advantage 0 like every filler
            like = p[0] if p else Sequence_(0, [pad], [pad], "", on_policy=False)
            filler = pad_batch([replace(like, advantage=0.0)], pad, float(t[0]), float(t[1]))
            u.extend([filler] * (int(n) - len(u)))
    return updates


def run_eval(cfg: TrainConfig, backend, data: PreparedPrompts | None, scorer,
             step: int, comm: Comm = LOCAL) -> dict[str, float]:
    """Held-out metrics on the first eval_samples rows (none when eval_samples is 0); each
    rank takes a contiguous share of them and the means are combined weighted by rows.
    The held-out loss needs the same forward passes on every rank, so it is measured in
    single-process runs only."""
    if data is None or not data.rows or cfg.eval_samples == 0:
        return {}
    n = min(cfg.eval_samples, len(data.rows))
    lo, hi = n * comm.rank // comm.world, n * (comm.rank + 1) // comm.world
    ev: dict[str, float] = {}
    with together(comm):  # a reward failing on this rank's rows stops every rank
        if lo == hi:  # fewer rows than ranks: still take part (FSDP2 gathers in generate)
            if scorer is not None:
                backend.generate([], SamplingConfig(greedy=True), 0)
        else:
            ev = evaluate(backend, data.rows[lo:hi], data.prompt_ids[lo:hi], scorer,
                          max_new_tokens=cfg.max_response_tokens,
                          seed=step_seed(cfg.seed, -1), batch_size=cfg.rollout_batch_size,
                          first_row=lo, loss=comm.world == 1, parts=comm.world > 1)
    settle(scorer, comm)
    parts = ev.pop("_parts", {})
    if comm.world == 1 or scorer is None:
        return ev
    # accuracy and reward weighted by each rank's rows; each reward function's and each
    # log_metric name's mean from every rank's sum and count (a name any rank has)
    names = union_of_names(comm, list(parts))
    keys = ("accuracy", "reward")
    total = comm.all_sum(np.array([ev.get(k, 0.0) * (hi - lo) for k in keys]
                                  + [x for name in names for x in parts.get(name, (0.0, 0.0))]))
    out = {**{k: float(v) / n for k, v in zip(keys, total)}, "n": float(n)}
    out.update({name: float(value_sum / count) for name, (value_sum, count)
                in zip(names, total[len(keys):].reshape(-1, 2)) if count})
    return out


def settle(scorer, comm: Comm) -> None:
    """The scorer's check over what every rank has just scored, when it has one
    (gft.run.RequireApplicableReward.settle; a collective)."""
    check = getattr(scorer, "settle", None)
    if check is not None:
        check(comm)


def describe_eval(ev: dict[str, float]) -> str:
    """One line of what the evaluation measured, e.g. "held-out accuracy 0.810, reward
    0.810, NLL/token 1.234 (n=100)" (eval/loss is the NLL per response token)."""
    parts = [f"{label} {ev[key]:.3f}" for key, label in
             (("accuracy", "held-out accuracy"), ("reward", "reward"), ("loss", "NLL/token"))
             if key in ev]
    if "accuracy" not in ev and parts:
        parts[0] = "held-out " + parts[0]
    return ", ".join(parts) + f" (n={int(ev.get('n', 0))})"


def train(cfg: TrainConfig, backend, data: PreparedPrompts, eval_data: PreparedPrompts | None,
          scorer, run_dir: Path, state: LoopState, console,
          stop: Callable[[], bool] = lambda: False, comm: Comm = LOCAL,
          trackers: Trackers | None = None) -> LoopState:
    """Run steps state.step .. total; log, evaluate and checkpoint along the way.

    stop() is checked between steps (gft/signals.py): once it is true the loop saves a
    checkpoint of the last finished step and returns early. With several ranks (comm),
    every rank runs this loop in step; rank 0 alone writes logs and checkpoints.
    trackers (gft/tracking.py, rank 0's) get every metrics line and sample. Without a
    terminal (a cluster job) a plain line every logging_steps stands in for the progress
    bar, and a long step says what it is doing every 30 s."""
    run_dir = Path(run_dir)
    lead = comm.rank == 0
    trackers = trackers if trackers is not None and lead else Trackers()
    plain = lead and not console.is_terminal
    with together(comm):  # rank 0's files: one it cannot write stops every rank
        log = MetricsLog(run_dir / "metrics.jsonl") if lead else NullLog()
        samples = MetricsLog(run_dir / "samples.jsonl") if lead else NullLog()
        log.truncate_after(state.step if state.step else -1)  # step 0: a killed start's lines
        samples.truncate_after(state.step if state.step else -1)
    stages = plan_stages(cfg, total_steps(cfg, len(data.rows)))
    steps = stages[-1].end  # at most: a policy-token budget may end the run sooner
    sampler = DataSampler(len(data.rows), cfg.seed, state.epoch, state.position)
    if comm.world > 1:  # a signal may reach one rank only: stop when any rank was asked
        local_stop = stop
        stop = lambda: bool(comm.all_sum(np.array([float(local_stop())]))[0])  # noqa: E731

    def checkpoint(step: int) -> Path | None:
        payload = trainer_state(state, cfg, run_dir, backend.name, data)
        backend.join_save()  # every rank: the save's collectives (FSDP2 gathers)
        # nobody runs ahead of (or resumes from) a half-written checkpoint, and a save that
        # fails on rank 0 (a full disk) stops every rank with its error
        with together(comm):
            path = save_step_checkpoint(backend, run_dir, step, payload,
                                        cfg.keep_checkpoints) if lead else None
        return path

    saved = state.step  # the step the newest checkpoint holds (0: start from the config)
    if state.step == 0 and not stop():
        ev = run_eval(cfg, backend, eval_data, scorer, 0, comm)
        with together(comm):
            if ev:
                record = {"step": 0, **{f"eval/{k}": v for k, v in ev.items()}}
                log.write(record)
                trackers.log(record)
                console.print(f"step 0: {describe_eval(ev)}")
    with ProgressBar(steps, state.step, cfg.progress and lead and not plain, console) as bar, \
            Heartbeat(console, plain) as beat:
        while not stop():
            stage, state = advance(stages, state, cfg)
            if stage is None:
                break
            if state.step == stage.start and len(stages) > 1:
                bar.console.print(f"stage {stage.index + 1}/{len(stages)}: {stage.name} for "
                                  f"{stage.end - stage.start} steps"
                                  + (f" or {stage.tokens:,} policy tokens" if stage.tokens else ""))
            progress = TrainerState(global_step=state.step, max_steps=steps,
                                    epoch=sampler.epoch + sampler.position / len(data.rows))
            indices = sampler.take(stage.cfg.prompts_per_step)
            t0 = time.perf_counter()
            m = train_step(stage.cfg, backend, data, indices, scorer, state.step,
                           stage_lr(stage, state.step), comm, beat, trainer_state=progress)
            beat.phase("")
            state.step += 1
            state.epoch, state.position = sampler.epoch, sampler.position
            spent = step_policy_tokens(m)
            state.policy_tokens += spent
            state.stage_tokens += spent
            last = run_over(stages, state, cfg)
            sample = m.pop("_sample", None)
            m.update({"step": state.step, "epoch": state.epoch, "stage": stage.index,
                      "preset": stage.name, "policy_tokens": state.policy_tokens,
                      "time/step": time.perf_counter() - t0,
                      **peak_memory()})
            add_logged(m, m.pop("_logged", {}))  # after gft's own: a clash is refused
            if cfg.eval_every and state.step % cfg.eval_every == 0 or last:
                ev = run_eval(cfg, backend, eval_data, scorer, state.step, comm)
                m.update({f"eval/{k}": v for k, v in ev.items()})
                if ev:
                    bar.console.print(f"step {state.step}: {describe_eval(ev)}")
            with together(comm):  # rank 0's logs failing to write (a full disk) stop all
                log.write(m)
                trackers.log(m)
                if plain and (state.step % cfg.logging_steps == 0 or state.step == 1 or last):
                    console.print(step_line(state.step, steps, m), highlight=False)
                _track_bad_steps(state, m, cfg)  # after logging: the step that stops it is logged
                if sample and cfg.sample_every and state.step % cfg.sample_every == 0:
                    samples.write({"step": state.step, **sample})
                    trackers.log_samples([{"step": state.step, **sample}], state.step)
                bar.update(state.step, m)
            if cfg.save_every and state.step % cfg.save_every == 0 and not last:
                checkpoint(state.step)
                saved = state.step
    if not run_over(stages, state, cfg) and state.step != saved:  # stopped: keep what was done
        checkpoint(state.step)
    return state


def trainer_state(state: LoopState, cfg: TrainConfig, run_dir: Path, backend: str,
                  data: PreparedPrompts) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: the loop state and the config (paths stored so
    the run can move), plus what a resume and the checkpoint's gft.json read of the data:
    its row count, and whether every prompt was chat messages (rendered with the chat
    template whatever chat_template says, so a string prompt given later should be too)."""
    return {"loop": asdict(state), "config": stored_config(to_dict(cfg), run_dir),
            "backend": backend, "data_rows": len(data.rows),
            "chat_prompts": bool(data.rows) and all(isinstance(ex.prompt, list)
                                                    for ex in data.rows)}


def run_over(stages: list[Stage], state: LoopState, cfg: TrainConfig) -> bool:
    """Whether the run has done all its steps or spent its policy-token budget."""
    return advance(stages, state, cfg)[0] is None


class NullLog:
    """What ranks other than 0 write their logs to."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


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
