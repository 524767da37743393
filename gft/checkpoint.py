"""Checkpoints: a Hugging Face-layout model directory plus backend-neutral trainer state.

    RUN_DIR/checkpoints/step-000040/   config.json, model.safetensors, tokenizer files,
                                       generation_config.json   (transformers/mlx-lm load it)
                                       optimizer.safetensors    (AdamW moments by param name)
                                       trainer_state.json       (step, data position, config)
    RUN_DIR/checkpoints/latest         name of the newest complete checkpoint
    RUN_DIR/final/                     the last checkpoint of a finished run

Every directory is written under a temporary name, fsynced and renamed, so a crash at any
point leaves the previous checkpoint intact. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from gft.errors import ModelError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def write_portable_config(model_dir: Path) -> None:
    """Make config.json read the same in transformers and mlx-lm.

    transformers 5 writes RoPE settings only under `rope_parameters`; mlx-lm 0.32 does not
    read that block and silently falls back to rope_theta = 10000. A top-level `rope_theta`
    (which transformers also accepts) makes both libraries agree.
    """
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_tokenizer(model_path: str, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS if none); needs an EOS token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{model_path}: cannot load the tokenizer: {first}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{model_path}: the tokenizer has no EOS token; rollouts could never "
                         "stop. Set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, any id works
    return tok


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_directory(target: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir), fsync it, then swap it in as `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():  # replacing (e.g. final/): move the old one aside first
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_checkpoint(backend, directory: Path, state: dict[str, Any]) -> Path:
    """Model, optimizer and trainer state into `directory`, atomically."""
    def write(tmp: Path) -> None:
        backend.save_model(tmp)
        backend.save_optimizer(tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return atomic_directory(directory, write)


def save_step_checkpoint(backend, run_dir: Path, step: int, state: dict[str, Any],
                         keep: int) -> Path:
    """checkpoints/step-N, then the `latest` pointer, then prune to the last `keep`."""
    root = Path(run_dir) / "checkpoints"
    path = save_checkpoint(backend, root / f"step-{step:06d}", state)
    atomic_write_text(root / "latest", path.name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (final/ wins), or None."""
    run_dir = Path(run_dir)
    if (run_dir / "final" / STATE_FILE).exists():
        return run_dir / "final"
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        path = run_dir / "checkpoints" / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable trainer state: {e}") from None
