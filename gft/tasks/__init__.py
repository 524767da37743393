"""Built-in tasks: datasets generated on the fly, so `gft train` runs with no download.

Each task maps a name to a function `(cache_root) -> Path` that writes (once) and returns
an mlx-lm style data directory: train.jsonl, valid.jsonl, test.jsonl, and for arith also
the generalisation splits test_big.jsonl, test_chain.jsonl, test_reword.jsonl and
train_flawed.jsonl
(gft/tasks/arith.py says what each measures; `gft eval --split test_big` reads one).
"""
from __future__ import annotations

from gft.tasks.arith import ArithTaskConfig, default_task_dir, generate_split, write_task

BUILTIN_TASKS = {"arith": default_task_dir}

__all__ = ["ArithTaskConfig", "BUILTIN_TASKS", "default_task_dir", "generate_split", "write_task"]
