"""Set up a run (model, data, rewards, run directory), train it, or resume it.

This is what `gft train` calls; the loop itself is gft/loop.py, and where a resume
starts from, with which config, is gft/resume.py. Backends are picked and loaded
through the provider registered with gft.backend (importing `backends` does it; the
gft command imports it), never imported from here.
"""
from __future__ import annotations

import shlex
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import yaml
from rich.console import Console

from gft.backend import OptimConfig, provider
from gft.checkpoint import (CheckpointError, ResumePoint, atomic_directory, atomic_write_text,
                            export_final, has_checkpoints, is_export_of, latest_checkpoint,
                            read_state, save_step_checkpoint)
from gft.modelfiles import OPTIMIZER_FILE, check_model_dir, check_optimizer_state
from gft.config import TrainConfig, to_dict
from gft.data import is_data_file, load_split
from gft.prompts import with_system_prompt
from gft.distributed import (LOCAL, Comm, check_divisible, first_text, init_comm, shutdown,
                             together)
from gft.errors import ConfigError, RewardError
from gft.loop import LoopState, run_over, total_steps, train, trainer_state
from gft import runlock
from gft.metrics import peak_memory, read_metrics, summary_lines
from gft.preflight import (check_answers, check_launcher, check_memory, check_sequences_fit,
                           check_trainable, dtype_note, nothing_to_train, rewards_needed,
                           rows_with_long_responses, shared_prompts)
from gft.rewards import build_rewards
from gft.resume import data_changed, resume_point
from gft.runpaths import base_as_stored, looks_local, stored_config
from gft.rollout import PreparedPrompts, check_token_ids, prepare_prompts
from gft.signals import GracefulStop, Interrupted, signal_name
from gft.stages import describe, plan_stages, plan_warnings
from gft.stops import unsaved_stops_note
from gft.tracking import Trackers, open_trackers
from gft.types import Example


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def materialize_defaults(cfg: TrainConfig, run_dir: Path, console: Console) -> TrainConfig:
    """Write the embedded model and task into the run directory when none were given
    (atomically: a run killed while writing them rewrites them on the next start)."""
    if cfg.model is None:
        from gft.tiny import DEFAULT_MODEL, TinyModelSpec, write_tiny_model
        path = run_dir / "base-model"
        if not path.exists():
            spec = TinyModelSpec(seed=cfg.seed, **DEFAULT_MODEL)
            atomic_directory(path, lambda tmp: write_tiny_model(tmp, spec))
        console.print(f"model: embedded default (tiny byte-level Llama, random init) -> {path}")
        cfg = replace(cfg, model=str(path))
    if cfg.data is None:
        from gft.tasks.arith import ArithTaskConfig, write_task
        path = run_dir / "task"
        if not path.exists():
            atomic_directory(path, lambda tmp: write_task(tmp, ArithTaskConfig()))
        console.print(f"data: embedded arithmetic word problems -> {path}")
        cfg = replace(cfg, data=str(path))
    return cfg


def load_data(cfg: TrainConfig, tokenizer, console: Console,
              train_rows: list[Example] | None = None
              ) -> tuple[PreparedPrompts, PreparedPrompts | None]:
    """Training rows (read here unless given) and the held-out rows (see held_out_rows),
    prompts tokenized."""
    if train_rows is None:
        train_rows = load_split(cfg.data, "train", **columns_of(cfg))
    train_rows, eval_rows, note = held_out_rows(cfg, train_rows)
    if cfg.system_prompt is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"system_prompt: {cfg.model}'s tokenizer has no chat template to "
                          "put a system message in (a base model?); leave system_prompt "
                          "out, or write it into the prompts' text")
    train_rows, eval_rows = (with_system_prompt(rows, cfg.system_prompt)
                             for rows in (train_rows, eval_rows))
    console.print(f"evaluation: {note}")
    if eval_rows and cfg.rewards is None and not rewards_needed(cfg) \
            and not any(ex.responses for ex in eval_rows):
        # no reward to score generations and no response to measure the loss on
        console.print("[yellow]warning: evaluation measures nothing: the held-out rows have "
                      "no response for the held-out loss and no reward is set; set rewards "
                      "(e.g. [math]) or give the held-out rows responses", highlight=False)
    shared = shared_prompts(train_rows, eval_rows)
    if shared:
        console.print(f"[yellow]warning: {len(shared)} of {len(eval_rows)} held-out rows ask a "
                      f"prompt the training rows also ask (the first: {shared[0].source}); "
                      "on those the evaluation is not held out", highlight=False)
    kw = dict(chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
              overflow=cfg.prompt_overflow)
    data = prepare_prompts(train_rows, tokenizer, **kw)
    held_out = prepare_prompts(eval_rows, tokenizer, **kw) if eval_rows else None
    for label, part in (("training", data), ("held-out", held_out)):
        if part is not None and (part.n_truncated or part.n_skipped):
            console.print(f"[yellow]{label} prompts over max_prompt_tokens={cfg.max_prompt_tokens}: "
                          f"{part.n_truncated} truncated, {part.n_skipped} skipped")
    if not data.rows:
        raise ConfigError(f"{cfg.data}: no training rows left after prompt_overflow={cfg.prompt_overflow}")
    long, limit = rows_with_long_responses(cfg, data.rows, tokenizer)
    if long:
        console.print(f"[yellow]warning: {len(long)} of {len(data.rows)} training rows have a "
                      f"dataset response over max_response_tokens={limit} "
                      f"(with its EOS; the first: {long[0].source}): it is trained cut short, "
                      "without its end", highlight=False)
    check_answers(cfg, [data, held_out])
    return data, held_out


def columns_of(cfg: TrainConfig) -> dict[str, str]:
    """load_split's column options, as the config names them."""
    return dict(answer_column=cfg.answer_column, prompt_column=cfg.prompt_column,
                completion_column=cfg.completion_column)


def held_out_rows(cfg: TrainConfig, train_rows: list[Example]
                  ) -> tuple[list[Example], list[Example], str]:
    """(training rows, held-out rows, what the evaluation will measure, in words).

    Held-out rows come from eval_data (a file, a directory, a Hub data set org/name, or a
    split name of `data`),
    else from eval_split (then valid) of a data directory, else from eval_holdout (a
    seeded fraction of the training rows, removed from training). Training rows are
    never evaluated on as if they were held out: without any of these there is none."""
    if cfg.eval_samples == 0:
        return train_rows, [], "off (eval_samples: 0)"
    answer = columns_of(cfg)
    if cfg.eval_data is not None:
        from gft.hubdata import hub_id
        hub = "/" in cfg.eval_data and not looks_local(cfg.eval_data) \
            and hub_id(cfg.eval_data) is not None  # org/name; a bare name is a split
        if Path(cfg.eval_data).exists() or hub:
            rows = load_split(cfg.eval_data, cfg.eval_split, required=False, **answer) \
                or load_split(cfg.eval_data, "valid", **answer)
        elif is_data_file(cfg.data):
            raise ConfigError(f"eval_data: '{cfg.eval_data}' is neither a file nor a "
                              f"directory, and data ({cfg.data}) is a single file with no "
                              "splits to name")
        elif is_data_file(cfg.eval_data) or "/" in cfg.eval_data or "\\" in cfg.eval_data:
            # written as a path: looking it up as a split name would report a missing
            # split "held/valid.jsonl" (expected held/valid.jsonl.jsonl, ...)
            raise ConfigError(f"eval_data: no such file or directory: {cfg.eval_data}")
        else:  # a split name of the data directory
            rows = load_split(cfg.data, cfg.eval_data, **answer)
        return train_rows, rows, _eval_note(cfg, rows, f"eval_data {cfg.eval_data}")
    if not is_data_file(cfg.data):
        # a split named on purpose must exist (a typo turned evaluation off in silence);
        # the default, test, falls back to valid
        named = cfg.eval_split != "test"
        rows = load_split(cfg.data, cfg.eval_split, required=named, **answer)
        split = cfg.eval_split
        if not rows and cfg.eval_split != "valid":
            rows, split = load_split(cfg.data, "valid", required=False, **answer), "valid"
        if rows:
            return train_rows, rows, _eval_note(cfg, rows, f"the '{split}' split of {cfg.data}")
    if cfg.eval_holdout > 0:
        order = np.random.default_rng([cfg.seed, 17]).permutation(len(train_rows))
        n = min(max(1, round(cfg.eval_holdout * len(train_rows))), len(train_rows) - 1)
        if n < 1:
            raise ConfigError(f"eval_holdout: {cfg.data} has 1 training row; none to hold out")
        held = set(order[:n].tolist())
        rows = [row for i, row in enumerate(train_rows) if i in held]
        kept = [row for i, row in enumerate(train_rows) if i not in held]
        return kept, rows, _eval_note(cfg, rows, f"{n} of {len(train_rows)} training rows "
                                                 f"set aside (eval_holdout={cfg.eval_holdout}; "
                                                 "not trained on)")
    return train_rows, [], (f"off: {cfg.data} has no held-out split; set eval_data (a file, "
                            "directory or split name) or eval_holdout (a fraction of the "
                            "training rows to set aside)")


def _eval_note(cfg: TrainConfig, rows: list[Example], where: str) -> str:
    n = min(cfg.eval_samples, len(rows))
    return f"{n} held-out rows from {where}" if rows else f"off: {where} has no rows"


def build_scorer(cfg: TrainConfig):
    """The RewardModel the run scores with, or None: rewards unset and none needed."""
    raw = cfg.rewards if cfg.rewards is not None else (["math"] if rewards_needed(cfg) else None)
    return RequireApplicableReward(build_rewards(raw, cfg.reward_timeout)) \
        if raw is not None else None


class RequireApplicableReward:
    """The RewardModel, plus one check. A batch where no reward applies to any response
    (every function returned None for all of them) trains on all-zero rewards: nothing.
    Before any reward has applied in this process that is almost surely a reward reading
    the wrong column, so it stops the run at once with what to check. Once rewards have
    applied, a batch that happens to hold only rows no reward covers (mixed-task data,
    small batches) is a warning, and the run goes on, as TRL warns and goes on: stopping
    hours in would lose the run for one unlucky draw.

    The check is made by `settle`, which the loop calls once every rank has scored its
    share of a step's (or an evaluation's) batch: with several ranks "the batch" is the
    whole step's, as in one process, and every rank stops, or goes on, together. Made on
    each rank's share alone, one rank stopped while the others waited for it."""

    def __init__(self, model, warn: Callable[[str], None] | None = None):
        self.model = model
        self.applied = False  # some reward has scored some response in this run
        self.warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self.skipped = 0  # batches no reward applied to, after the first that one did
        self._scored = np.zeros(2)  # responses scored since the last settle, and the Nones
        self._first: str | None = None  # the first of them

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def score(self, prompts, completions, columns, sources=None, **kwargs):
        result = self.model.score(prompts, completions, columns, sources, **kwargs)
        if len(completions) and self._first is None:
            self._first = sources[0] if sources else "row 0"
        self._scored += [len(completions), result.n_none]
        return result

    def settle(self, comm: Comm = LOCAL) -> None:
        """Stop (RewardError) or warn when no reward applied to any response scored since
        the last call, on any rank. A collective: every rank calls it at the same point."""
        n, none = comm.all_sum(self._scored)
        first = first_text(comm, self._first) if n and none == n else None
        self._scored, self._first = np.zeros(2), None
        if not n or none < n:
            self.applied = self.applied or bool(n)
            return
        said = (f"rewards ({', '.join(self.model.names)}) returned None (not applicable) for "
                f"all {int(n)} responses of a batch (first: {first})")
        if not self.applied:
            raise RewardError(f"{said}; nothing to learn from: check what the reward "
                              "functions return and the columns they read")
        self.skipped += 1
        if comm.rank == 0 and (self.skipped == 1 or self.skipped % 100 == 0):
            self.warn(f"warning: {said}: its groups score 0 and train nothing; the run goes "
                      f"on ({self.skipped} such batch{'es' if self.skipped > 1 else ''} so "
                      "far; shown at the 1st and every 100th)")


def hub_snapshot(cfg: TrainConfig, start_from: Path | None = None) -> tuple[str, str] | None:
    """On mlx, (hub id, its local snapshot) of a model named by its Hub id
    (`mlx-community/...-4bit`, what mlx-lm users pass), or of the base a LoRA adapter
    names by Hub id (--model ADAPTER, or the checkpoint a run resumes from): mlx-lm's
    load_model reads local folders only (gft/hubmodel.py). config.yaml and the
    checkpoints keep the id, so a copied run fetches it again. None otherwise:
    transformers downloads hub ids itself."""
    if cfg.backend != "mlx" or not cfg.model:
        return None
    from gft.hubmodel import adapter_hub_base, local_model
    from gft.lora import is_mlx_adapter, is_peft_adapter
    if not looks_local(cfg.model):
        name = cfg.model
    else:
        # the checkpoint's adapter names the base only where --model does not: an adapter
        # trained on from, or one no longer here; a local base given is the base
        adapter = is_peft_adapter(cfg.model) or is_mlx_adapter(cfg.model)
        gone = not Path(cfg.model).expanduser().exists()
        name = adapter_hub_base(start_from if start_from is not None and (adapter or gone)
                                else cfg.model)
    return (name, local_model(name)) if name else None


def open_backend(cfg: TrainConfig, model_path: str, comm: Comm = LOCAL,
                 snapshot: str | None = None):
    """The backend, loaded from model_path; `snapshot` (hub_snapshot, on mlx): cfg.model's
    local copy when it is a hub id, or the base an adapter names by hub id, loaded as
    the base under a LoRA adapter or checkpoint."""
    optim = OptimConfig(weight_decay=cfg.weight_decay, beta1=cfg.adam_beta1,
                        beta2=cfg.adam_beta2, eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm)
    from gft.lora import is_mlx_adapter, is_peft_adapter, lora_from_train_config
    # `model` is the base under a LoRA checkpoint, unless it is itself an adapter (training
    # on from a PEFT or mlx-lm adapter): then its base is the one its adapter_config.json
    # names; taken as the base, transformers would load base + adapter and LoRA would go
    # on twice
    adapter = cfg.model and (is_peft_adapter(cfg.model) or is_mlx_adapter(cfg.model))
    # an adapter trained on from and no longer here (gft.resume.resolve_run_paths let a
    # resume go on without it): the checkpoint's adapter names the base too
    gone = cfg.model and looks_local(cfg.model) and not Path(cfg.model).expanduser().exists()
    model = snapshot or (None if adapter or (gone and is_peft_adapter(model_path))
                         else cfg.model)
    base = base_as_stored(model_path, model) if is_peft_adapter(model_path) else model
    return provider().load_backend(
        cfg.backend, model_path, dtype=cfg.dtype, device=cfg.device, optim=optim,
        seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing, lora=lora_from_train_config(cfg),
        base=base, shard_size=cfg.save_shard_size,
        parallel=cfg.parallel if comm.world > 1 else None, comm=comm,
        rollout_engine=cfg.rollout_engine, mixed_precision=cfg.mixed_precision,
        rollout_graphs=cfg.rollout_graphs, logits_chunk=cfg.logits_chunk,
        stop=cfg.stop, load_in_4bit=cfg.load_in_4bit, disable_dropout=cfg.disable_dropout)


def run_training(cfg: TrainConfig | None, *, resume: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, console: Console | None = None) -> Path:
    """Train (or resume) and return the path of the final checkpoint.

    SIGINT/SIGTERM stop it cleanly after the current step (gft/signals.py): a checkpoint
    is saved and `Interrupted` raised, which `gft train` turns into exit code 128 + signal."""
    console = console or Console(soft_wrap=True)  # paths stay on one line, copy-pasteable
    comm = init_comm()  # torchrun / mlx.launch: several ranks; else one process
    if comm.rank != 0:
        console = Console(quiet=True)  # rank 0 speaks for the run
    finished = False
    try:
        with GracefulStop() as stop:
            final = _run(cfg, resume, overrides, console, stop, comm)
        finished = True
        return final
    finally:
        shutdown(comm, finished)  # several torch ranks: a finished rank exits here


def _run(cfg: TrainConfig | None, resume: str | Path | None, overrides: dict[str, Any] | None,
         console: Console, stop: GracefulStop, comm: Comm) -> Path:
    """Lock the run directory (one writer: rank 0 holds it for every rank), then train."""
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = Path(comm.broadcast_text(str(resolve_run_dir(cfg))))  # one timestamp
    lock = lock_run_dir(run_dir, comm)
    try:
        return _run_locked(cfg, run_dir, resume is not None, overrides, console, stop, comm)
    finally:
        if lock is not None:
            runlock.release(lock)


def lock_run_dir(run_dir: Path, comm: Comm) -> Path | None:
    """Rank 0 takes RUN_DIR/gft.lock (gft/runlock.py); every rank raises its refusal (a
    busy directory: exit 2; one that cannot be created: exit 1), none waits forever."""
    path, refusal, failed = None, "", False
    if comm.rank == 0:
        try:
            path = runlock.take(run_dir)
        except runlock.RunLockedError as e:
            refusal = str(e)
        except OSError as e:
            refusal, failed = f"cannot create {run_dir}: {e.strerror or e}", True
    refusal = comm.broadcast_text(("1" if failed else "2") + refusal)
    if refusal[1:]:
        raise (CheckpointError if refusal[0] == "1" else runlock.RunLockedError)(refusal[1:])
    return path


def _run_locked(cfg: TrainConfig | None, run_dir: Path, resuming: bool,
                overrides: dict[str, Any] | None, console: Console, stop: GracefulStop,
                comm: Comm) -> Path:
    started = time.perf_counter()
    if resuming:
        cfg, state, point = resume_point(run_dir, overrides, console, comm)
    else:
        cfg, state, point = new_run(cfg, run_dir, console, comm), LoopState(), ResumePoint(
            None, False, [])
    done = finished_already(cfg, state) if resuming and point.checkpoint is not None else None
    if done is not None:  # before anything loads, and final/ is left as it is
        console.print(f"[yellow]note: {done}", highlight=False)
        return keep_final(run_dir, point.checkpoint, console, comm)
    cfg, start = _prepare(cfg, run_dir, point, comm, console)
    backend = _open(cfg, start, point, comm, console)
    data, held_out, stages = _load_checked(cfg, backend, start, point, state, comm, console)
    idle = _announce(cfg, backend, run_dir, data, stages, state, comm, console)
    with together(comm):  # rank 0's trackers: one that cannot start stops every rank
        trackers = open_trackers(cfg.report_to, run_dir, to_dict(cfg), step=state.step,
                                 name=cfg.run_name or None,
                                 warn=lambda text: console.print(f"[yellow]{text}",
                                                                 highlight=False)) \
            if comm.rank == 0 else Trackers()
    try:
        state = train(cfg, backend, data, held_out, start.scorer, run_dir, state, console,
                      stop=stop, comm=comm, trackers=trackers)
    finally:
        trackers.finish()
    if not run_over(stages, state, cfg):  # the loop only ends early when asked to stop
        # a signal may reach one rank only (a `kill` of one process): every rank names
        # the one that stopped the run, and exits with its code
        said = first_text(comm, str(stop.signum) if stop.signum else None)
        raise interrupted(int(said) if said else signal.SIGINT, run_dir, state.step,
                          stages[-1].end)
    final = _save_final(cfg, backend, run_dir, state, data, idle, comm)
    if comm.rank == 0:
        records = read_metrics(run_dir / "metrics.jsonl")
        for line in summary_lines(records, time.perf_counter() - started, peak_memory(), final):
            console.print(line, highlight=False)
    return final


class _Start(NamedTuple):
    """What a run starts from, checked before its backend loads."""
    scorer: Any              # the RewardModel (RequireApplicableReward), or None
    model_path: str          # the folder the backend loads (a checkpoint, a snapshot, ...)
    hub_id: str | None       # the Hub id it was fetched by, which checkpoints name
    snapshot: str | None     # that id's local snapshot
    train_rows: list[Example]


def _prepare(cfg: TrainConfig, run_dir: Path, point: ResumePoint, comm: Comm,
             console: Console) -> tuple[TrainConfig, _Start]:
    """The checks each rank makes on its own (its GPU's free memory, a reward module it
    imports, rank 0's config.yaml write), and the training rows: any that fails stops
    every rank before the backend's first collective, with the same error."""
    chosen = provider()
    with together(comm):
        cfg = replace(cfg, backend=chosen.resolve_backend_name(cfg.backend))
        chosen.check_device(cfg.backend, cfg.device)
        check_launcher(cfg, comm)
        if comm.rank == 0:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
                stored_config(to_dict(cfg), run_dir), sort_keys=False))
        scorer = build_scorer(cfg)
        hub_id, snapshot = hub_snapshot(cfg, point.checkpoint) or (None, None)
        # the snapshot replaces a hub-id model; under an adapter it is the adapter's base
        model_path = str(point.checkpoint or (snapshot if hub_id == cfg.model else cfg.model))
        check_model_dir(model_path)
        check_memory(cfg, model_path)
        if point.load_optimizer:
            check_optimizer_state(point.checkpoint)
        train_rows = load_split(cfg.data, "train", **columns_of(cfg))
        check_trainable(cfg, train_rows, console)
    return cfg, _Start(scorer, model_path, hub_id, snapshot, train_rows)


def _open(cfg: TrainConfig, start: _Start, point: ResumePoint, comm: Comm, console: Console):
    """The backend, with the checkpoint's optimizer state when the run resumes."""
    backend = open_backend(cfg, start.model_path, comm, start.snapshot)
    if start.hub_id:  # adapters name the hub id as their base, not this machine's cache
        backend.base_name = start.hub_id
    for note in (dtype_note(cfg, start.model_path), unsaved_stops_note(backend.stops)):
        if note:
            console.print(f"[yellow]{note}", highlight=False)
    if point.load_optimizer:  # (FSDP2: a collective, so outside `together`)
        backend.load_optimizer(point.checkpoint / OPTIMIZER_FILE)
    return backend


def _load_checked(cfg: TrainConfig, backend, start: _Start, point: ResumePoint,
                  state: LoopState, comm: Comm, console: Console):
    """(training prompts, held-out prompts, the stage plan), tokenized and checked against
    the model; the data each rank reads (a Hub download may fail on one) is `together`."""
    with together(comm):
        data, held_out = load_data(cfg, backend.tokenizer, console, start.train_rows)
        if point.checkpoint is not None and state.step:
            note = data_changed(read_state(point.checkpoint), len(data.rows), state, cfg.data)
            if note:
                console.print(f"[yellow]{note}", highlight=False)
        stages = plan_stages(cfg, total_steps(cfg, len(data.rows)))
        check_sequences_fit(backend, data, held_out, stages, start.scorer)
        check_token_ids(getattr(backend, "vocab_rows", None), backend.tokenizer,
                        [data, held_out], max(stage.cfg.max_response_tokens for stage in stages),
                        str(cfg.model))
        for stage in stages:
            check_divisible(stage.cfg.prompts_per_step, stage.cfg.prompts_per_minibatch,
                            comm.world, f"stage {stage.index + 1} ({stage.name})")
    return data, held_out, stages


def _announce(cfg: TrainConfig, backend, run_dir: Path, data: PreparedPrompts, stages,
              state: LoopState, comm: Comm, console: Console) -> bool:
    """The run's header lines and plan warnings; whether it is idle (a resume with no
    step left, which finished_already could not tell before the data was tokenized)."""
    how = cfg.parallel if cfg.backend == "torch" else "data parallel"
    ranks = f"  processes: {comm.world} ({how})" if comm.world > 1 else ""
    console.print(f"run: {run_dir}  backend: {backend.name}  train rows: {len(data.rows)}{ranks}\n"
                  f"plan: {describe(stages)}")
    for warning in plan_warnings(cfg, stages, len(data.rows)):
        console.print(f"[yellow]{warning}", highlight=False)
    idle = bool(state.step) and run_over(stages, state, cfg)
    if idle:
        console.print(f"[yellow]note: {nothing_to_train(stages, state)}", highlight=False)
    if getattr(backend, "rollout_note", None):  # e.g. a first rollout that compiles
        console.print(backend.rollout_note)
    return idle


def _save_final(cfg: TrainConfig, backend, run_dir: Path, state: LoopState,
                data: PreparedPrompts, idle: bool, comm: Comm) -> Path:
    """The last step's checkpoint (unless the loop saved it) and final/ exported from it.
    Every rank takes part in the save (FSDP gathers); final/ is then copied on rank 0,
    with no collective of its own."""
    final = run_dir / "final"
    last = run_dir / "checkpoints" / f"step-{state.step:06d}"
    lead = comm.rank == 0
    saved = comm.broadcast_text("yes" if lead and latest_checkpoint(run_dir) == last else "")
    if not saved:
        backend.join_save()  # every rank: the save's collectives (FSDP2 gathers)
    with together(comm):  # rank 0's save or export failing (a full disk) stops every rank
        if lead:
            if not saved:
                payload = trainer_state(state, cfg, run_dir, backend.name, data)
                save_step_checkpoint(backend, run_dir, state.step, payload, cfg.keep_checkpoints)
            if not (idle and is_export_of(final, last)):
                export_final(last, final)
    return final


def finished_already(cfg: TrainConfig, state: LoopState) -> str | None:
    """Why a resumed run has no step left (gft.preflight.nothing_to_train), or None,
    found without loading the model: its steps are max_steps or its stages', or (epochs)
    come from the number of training rows. Only when prompt_overflow: skip drops rows
    by their token count is the tokenizer needed: then None, and the run finds out once
    its data is tokenized (and trains nothing)."""
    if not state.step:
        return None
    if cfg.max_steps is not None or cfg.stages:
        n_rows = 0  # not used by the plan
    elif cfg.prompt_overflow == "skip":
        return None
    else:
        rows = load_split(cfg.data, "train", **columns_of(cfg))
        n_rows = len(held_out_rows(cfg, rows)[0])
    stages = plan_stages(cfg, total_steps(cfg, n_rows))
    return nothing_to_train(stages, state) if run_over(stages, state, cfg) else None


def keep_final(run_dir: Path, checkpoint: Path, console: Console, comm: Comm) -> Path:
    """A finished run's final/, exported from its last checkpoint only when it is not
    that checkpoint's export already (a run killed between the two, or final/ deleted)."""
    final = run_dir / "final"
    with together(comm):
        if comm.rank == 0 and checkpoint != final and not is_export_of(final, checkpoint):
            export_final(checkpoint, final)
    console.print(f"final checkpoint: {final}", highlight=False)
    return final


def new_run(cfg: TrainConfig, run_dir: Path, console: Console, comm: Comm) -> TrainConfig:
    """A new run may not write over another's checkpoints; rank 0 writes the embedded
    model and task when none were given."""
    with together(comm):  # every rank has looked before rank 0 writes
        if has_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds a run with checkpoints; continue it "
                              f"with gft train --resume {shlex.quote(str(run_dir))}, or choose "
                              "another --output-dir")
    with together(comm):  # (and a write that fails stops every rank)
        if comm.rank == 0:
            cfg = materialize_defaults(cfg, run_dir, console)
    if comm.rank != 0:  # the files exist now: this only fills in their paths
        cfg = materialize_defaults(cfg, run_dir, console)
    return cfg


def interrupted(signum: int, run_dir: Path, step: int, steps: int) -> Interrupted:
    checkpoint = latest_checkpoint(run_dir)
    saved = (f"checkpoint saved: {checkpoint}" if step and checkpoint is not None
             else "nothing trained yet")
    return Interrupted(f"interrupted by {signal_name(signum)} after step {step} of {steps}; "
                       f"{saved}\nresume with: gft train --resume {shlex.quote(str(run_dir))}",
                       signum)
