"""Continuing a run (`gft train --resume RUN`): where from, with which config, and what
may change on the way.

- The newest complete checkpoint is the resume point (gft/checkpoint.py); a run killed
  before its first checkpoint starts over from its saved config.yaml.
- The saved config is the base; `--set`/`--model`/`--data`/`--backend` change it from
  there on, except FIXED_ON_RESUME (what the saved weights, AdamW moments and data
  position are), which is refused in one line.
- Stored paths are found from any working directory (gft/runpaths.py); a checkpoint that
  holds the whole model needs no base model.
- Data with another row count than the run trained on is named (its position counts rows
  of the old data's order).
"""
from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from gft.checkpoint import (STATE_FILE, ResumePoint, clean_leftovers, find_resume_point,
                            read_state)
from gft.config import TrainConfig, build_config
from gft.yamlconfig import read_yaml
from gft.distributed import LOCAL, Comm, together
from gft.errors import ConfigError, ModelError
from gft.loop import LoopState
from gft.runpaths import RUN_PATH_KEYS, resolve_stored, resolve_stored_extras


def resume_point(run_dir: Path, overrides: dict[str, Any] | None, console: Console,
                 comm: Comm = LOCAL) -> tuple[TrainConfig, LoopState, ResumePoint]:
    """(config, loop state, resume point) to continue `run_dir` from: the newest complete
    checkpoint, whatever `latest` says. A run killed before its first checkpoint starts
    over from step 0 with its saved config.yaml."""
    with together(comm):  # rank 0 alone writes; if that fails, every rank stops
        if comm.rank == 0:
            clean_leftovers(run_dir)  # puts back a final/ whose replacement a crash cut short
            clean_leftovers(run_dir / "checkpoints")
    point = find_resume_point(run_dir, (overrides or {}).get("reset_optimizer") is True)
    for note in point.notes:
        console.print(f"[yellow]{note}", highlight=False)
    if point.checkpoint is None:
        saved_config = run_dir / "config.yaml"
        if not saved_config.is_file():
            raise ModelError(f"{run_dir}: no checkpoint and no config.yaml to resume from; "
                             "start the run again with gft train")
        cfg = build_config(read_yaml(saved_config), overrides, source=str(saved_config))
        console.print(f"resuming {run_dir}: no checkpoint yet, starting again from step 0")
        cfg = resolve_run_paths(cfg, run_dir, overrides, str(saved_config))
        return replace(cfg, reset_optimizer=False), LoopState(), point
    start_from = point.checkpoint
    saved = read_state(start_from)
    cfg = build_config(saved["config"], overrides, source=str(start_from / STATE_FILE))
    check_resume_changes(build_config(saved["config"], source=str(start_from / STATE_FILE)),
                         cfg, start_from)
    try:
        state = LoopState(**saved["loop"])
    except TypeError as e:
        raise ModelError(f"{start_from / STATE_FILE}: bad loop state: {e}") from None
    console.print(f"resuming {run_dir} from {start_from.name} (step {state.step})")
    cfg = resolve_run_paths(cfg, run_dir, overrides, str(start_from / STATE_FILE), start_from)
    # a one-off instruction for this resume, not a setting the run keeps
    return replace(cfg, reset_optimizer=False), state, point


# Keys a resume from a checkpoint cannot change: what the saved weights and AdamW moments
# are (the trained parameters: the whole model, or adapters of this shape) and the order
# the data is drawn in (the saved position counts rows of the seed's permutation; another
# seed would repeat some rows of the epoch and skip others). Every other key may change
# (max_steps, learning rate, preset, stages, backend, model and data paths, ...).
FIXED_ON_RESUME = {
    "lora_rank": "the trained parameters (the whole model, or adapters of this rank)",
    "lora_alpha": "the adapters' scale, which their weights were trained under",
    "lora_targets": "which layers have trained adapters",
    "seed": "the order the data is drawn in (the saved position counts rows of it)",
}


def check_resume_changes(saved: TrainConfig, asked: TrainConfig, checkpoint: Path) -> None:
    """Refuse a resume that changes a FIXED_ON_RESUME key, naming the key, both values,
    and what to do instead (a new run from the checkpoint's model)."""
    for key, what in FIXED_ON_RESUME.items():
        old, new = getattr(saved, key), getattr(asked, key)
        if key == "lora_targets":  # a list in any order; a full fine-tune has none
            same = not saved.lora_rank or sorted(old) == sorted(new)
        else:
            same = old == new
        if not same:
            raise ConfigError(
                f"{key}: cannot change on resume ({old!r} in {checkpoint / STATE_FILE}, "
                f"{new!r} asked): it fixes {what}; resume without it, or start a new run "
                f"from these weights with it: gft train --model "
                f"{shlex.quote(str(checkpoint))} -o NEW_RUN --set {key}=...")


def resolve_run_paths(cfg: TrainConfig, run_dir: Path, overrides: dict[str, Any] | None,
                      source: str, checkpoint: Path | None = None) -> TrainConfig:
    """The saved paths (model, data, eval_data, reward files) as found from here
    (gft/runpaths.py); a value given again on the command line is taken as given.
    A checkpoint that holds the whole model (not a LoRA adapter) needs no base model: a
    run copied without it (only its last checkpoint, say) resumes, and the stored path
    is kept as it was, for config.yaml. Nor does a LoRA checkpoint whose adapter names a
    base found here other than the stored model: the run trained on from an adapter
    (`--model ADAPTER`), and the checkpoint holds those adapters, trained on; only their
    base is loaded (gft.run.open_backend)."""
    from gft.lora import is_peft_adapter
    given = overrides or {}
    keep = {k: getattr(cfg, k) for k in ("eval_data", "rewards") if k not in given}
    extras = resolve_stored_extras(keep, run_dir, source)
    whole = checkpoint is not None and (not is_peft_adapter(checkpoint)
                                        or adapter_base_found(checkpoint))

    def found(key: str) -> str | None:
        value = getattr(cfg, key)
        try:
            return resolve_stored(value, run_dir, key, source)
        except ConfigError:
            if key != "model" or not whole:
                raise
            # where stored_config finds it again: "./x" stays "./x", a path stays a path
            return value if Path(value).is_absolute() else str((run_dir / value).resolve())
    return replace(cfg, **extras,
                   **{k: found(k) for k in RUN_PATH_KEYS if k not in given})


def adapter_base_found(checkpoint: Path) -> bool:
    """Whether the base a LoRA checkpoint's adapter_config.json names is on this machine
    (or a Hub id, which the backend fetches). Called when the run's stored model is not
    here: a base found means that model was not this base but an adapter over it."""
    import json
    from gft.runpaths import adapter_base, looks_local
    try:
        config = json.loads((Path(checkpoint) / "adapter_config.json").read_text("utf-8"))
        stored = config.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(stored, str) or not stored:
        return False
    found = adapter_base(stored, Path(checkpoint))
    return not looks_local(found) or Path(found).expanduser().exists()


def data_changed(saved: dict[str, Any], n_rows: int, state: LoopState,
                 data: str | None) -> str | None:
    """A warning when the training rows are not as many as the checkpoint's run had (its
    trainer state's data_rows; runs written before it say nothing): other data, or the
    same at a new path (--data) changed. The saved position counts rows of the old data's
    seeded order, so the rest of this epoch repeats or skips rows."""
    before = saved.get("data_rows")
    if not isinstance(before, int) or before == n_rows:
        return None
    return (f"warning: {data} has {n_rows} training rows, the run trained on {before} up to "
            f"its checkpoint (at row {state.position} of epoch {state.epoch + 1}): it goes on "
            "from that position in the new rows' order, so until the epoch ends some rows "
            "may come twice and others not at all")
