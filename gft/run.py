"""Set up a run (model, data, rewards, run directory), train it, or resume it.

This is what `gft train` calls; the loop itself is gft/loop.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from backends import OptimConfig, load_backend, resolve_backend_name
from gft.checkpoint import OPTIMIZER_FILE, latest_checkpoint, read_state, save_checkpoint
from gft.config import TrainConfig, build_config, to_dict
from gft.data import load_split
from gft.errors import ConfigError, ModelError
from gft.loop import LoopState, train
from gft.rewards import build_rewards
from gft.rollout import PreparedPrompts, prepare_prompts

# The embedded default model: a byte-level Llama small enough to learn the bundled
# arithmetic task from random init in a few minutes on 2 CPU cores.
DEFAULT_MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=256, max_position_embeddings=256)


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def materialize_defaults(cfg: TrainConfig, run_dir: Path, console: Console) -> TrainConfig:
    """Write the embedded model and task into the run directory when none were given."""
    if cfg.model is None:
        from gft.tiny import TinyModelSpec, write_tiny_model
        path = run_dir / "base-model"
        if not (path / "config.json").exists():
            write_tiny_model(path, TinyModelSpec(seed=cfg.seed, **DEFAULT_MODEL))
        console.print(f"model: embedded default (tiny byte-level Llama, random init) -> {path}")
        cfg = replace(cfg, model=str(path))
    if cfg.data is None:
        from gft.tasks.arith import ArithTaskConfig, write_task
        path = run_dir / "task"
        if not (path / "train.jsonl").exists():
            write_task(path, ArithTaskConfig())
        console.print(f"data: embedded arithmetic word problems -> {path}")
        cfg = replace(cfg, data=str(path))
    return cfg


def load_data(cfg: TrainConfig, tokenizer, console: Console) -> tuple[PreparedPrompts, PreparedPrompts | None]:
    """Training rows and the held-out split (eval_split, else valid), prompts tokenized."""
    train_rows = load_split(cfg.data, "train")
    eval_rows = load_split(cfg.data, cfg.eval_split, required=False)
    if not eval_rows and cfg.eval_split != "valid":
        eval_rows = load_split(cfg.data, "valid", required=False)
    kw = dict(chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
              overflow=cfg.prompt_overflow)
    data = prepare_prompts(train_rows, tokenizer, **kw)
    if data.n_truncated or data.n_skipped:
        console.print(f"[yellow]prompts over max_prompt_tokens={cfg.max_prompt_tokens}: "
                      f"{data.n_truncated} truncated, {data.n_skipped} skipped")
    if not data.rows:
        raise ConfigError(f"{cfg.data}: no training rows left after prompt_overflow={cfg.prompt_overflow}")
    held_out = prepare_prompts(eval_rows, tokenizer, **kw) if eval_rows else None
    return data, held_out


def open_backend(cfg: TrainConfig, model_path: str):
    optim = OptimConfig(weight_decay=cfg.weight_decay, beta1=cfg.adam_beta1,
                        beta2=cfg.adam_beta2, eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm)
    return load_backend(cfg.backend, model_path, dtype=cfg.dtype, device=cfg.device,
                        optim=optim, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
                        gradient_checkpointing=cfg.gradient_checkpointing)


def run_training(cfg: TrainConfig | None, *, resume: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, console: Console | None = None) -> Path:
    """Train (or resume) and return the path of the final checkpoint."""
    console = console or Console(soft_wrap=True)  # paths stay on one line, copy-pasteable
    state = LoopState()
    start_from: Path | None = None
    if resume is not None:
        run_dir = Path(resume)
        start_from = latest_checkpoint(run_dir)
        if start_from is None:
            raise ModelError(f"{run_dir}: no complete checkpoint to resume from")
        saved = read_state(start_from)
        cfg = build_config(saved["config"], overrides, source=str(start_from / "trainer_state.json"))
        state = LoopState(**saved["loop"])
        console.print(f"resuming {run_dir} from {start_from.name} (step {state.step})")
    else:
        run_dir = resolve_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = materialize_defaults(cfg, run_dir, console)
    cfg = replace(cfg, backend=resolve_backend_name(cfg.backend))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    scorer = build_rewards(cfg.rewards)
    backend = open_backend(cfg, str(start_from or cfg.model))
    if start_from is not None and (start_from / OPTIMIZER_FILE).exists():
        backend.load_optimizer(start_from / OPTIMIZER_FILE)
    data, held_out = load_data(cfg, backend.tokenizer, console)
    console.print(f"run: {run_dir}  backend: {backend.name}  preset: {cfg.preset} "
                  f"(K={cfg.num_offpolicy}, n={cfg.num_rollouts}, tau={cfg.tau}, "
                  f"advantage={cfg.advantage})  train rows: {len(data.rows)}")
    state = train(cfg, backend, data, held_out, scorer, run_dir, state, console)
    payload = {"loop": asdict(state), "config": to_dict(cfg), "backend": backend.name}
    final = save_checkpoint(backend, run_dir / "final", payload)
    console.print(f"final checkpoint: {final}")
    return final
