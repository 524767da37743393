"""The replication's set-up: the task and its splits, the methods, the settings per model.

Methods are gft presets and staged pipelines of them; conditions are the training data
(clean expert demonstrations, or flawed ones: gft/tasks/arith.py's train_flawed). Every run
of every method is stopped by gft's `max_policy_tokens` (gft/budget.py) at the same
budget; a pipeline gives each stage its share of it.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gft.tasks.arith import (SPLIT_FILES, ArithTaskConfig, config_record, generate_split,
                             make_row, split_problems, write_jsonl, write_task)

HERE = Path(__file__).resolve().parents[1]  # benchmarks/

# Methods: name -> [(preset, share of the token budget)]; a pipeline is gft `stages`.
METHODS: dict[str, list[tuple[str, float]]] = {
    "sft": [("sft", 1.0)],
    "dft": [("dft", 1.0)],
    "grpo": [("grpo", 1.0)],
    "gft": [("gft", 1.0)],
    "sft>grpo": [("sft", 0.5), ("grpo", 0.5)],
    "sft>gft>grpo": [("sft", 1 / 3), ("gft", 1 / 3), ("grpo", 1 / 3)],
}
PRESETS = ("sft", "dft", "grpo", "gft")


# Conditions: which training split a run fine-tunes on (gft reads <data>/train.jsonl).
CONDITIONS = {"clean": "train", "flawed": "train_flawed"}
EVAL_SPLITS = ("test", "test_big", "test_chain", "test_reword")  # reported; "valid" chooses learning rates


@dataclass
class Setup:
    """Everything a replication depends on besides the seeds (recorded in the report)."""
    task: ArithTaskConfig
    train: dict[str, Any]            # TrainConfig keys shared by every run
    warmup_steps: int                # SFT steps that make the base model (0: use as is)
    warmup: dict[str, Any]           # TrainConfig keys of the warm-up (over `train`)
    budget_tokens: int               # policy tokens per run (see the module docstring)
    lrs: tuple[float, ...] = ()      # learning-rate sweep (empty: train's learning_rate only)
    conditions: tuple[str, ...] = ("clean", "flawed")  # keys of CONDITIONS
    probe_steps: int = 8             # steps of each preset from the base: sets eval cadence
    evals_per_run: int = 10          # held-out evaluations during training (for curves)
    eval_k: int = 8                  # pass@k
    eval_n: int | None = None        # test prompts in the final evaluation (None: all)
    entropy_samples: int = 2         # temperature-1 samples per test prompt for entropy
    notes: list[str] = field(default_factory=list)


# The learning rate when there is no sweep (--lr-sweep): pilots (one seed) of the earlier
# replication: at 1e-3 GRPO's rollouts collapsed to junk within ~100 steps (from a 400-step
# base); at 3e-4 and 1e-4 it improved steadily; SFT and GFT did about as well at 3e-4 as at 1e-3.
TRAIN_TINY = dict(
    learning_rate=3e-4, lr_schedule="constant", warmup_steps=0, weight_decay=0.01,
    max_grad_norm=1.0, prompts_per_step=32, prompts_per_minibatch=32, micro_batch_size=64,
    max_prompt_tokens=128, max_response_tokens=24, rollout_batch_size=256,
    temperature=1.0, top_p=1.0, eval_samples=100, save_every=0, sample_every=50,
    progress=False, backend="torch",
    rewards=["math"],  # given, so that sft and dft runs report held-out accuracy too
)

SETUPS: dict[str, Setup] = {
    # The default: about an hour on a 2-core CPU (REPLICATION.md has the measured time).
    # 800 warm-up steps give a base with ~40% held-out greedy accuracy (the paper's base
    # models score 25-45%); 1.5M tokens is ~180 GRPO steps or ~2,300 SFT steps.
    "tiny": Setup(
        task=ArithTaskConfig(seed=0, n_train=4000, n_valid=100, n_test=200, max_operand=19,
                             ops=("+", "-"), n_ood=200),
        train=TRAIN_TINY, warmup_steps=800,
        warmup=dict(learning_rate=3e-3, warmup_steps=5),
        budget_tokens=1_500_000),
    # SmolLM2-135M-Instruct on CPU: one seed and 20k tokens per run, about an hour on 2
    # cores (probe timings: ~30 tokens/s for SFT, ~60 for GRPO/GFT, one thread); base
    # after 10 warm-up steps: ~65% held-out. On a GPU: --seeds 0 1 2 --budget-tokens 1000000.
    "smollm2": Setup(
        task=ArithTaskConfig(seed=0, n_train=4000, n_valid=50, n_test=100, max_operand=19,
                             ops=("+", "-"), n_ood=100),
        train=dict(TRAIN_TINY, learning_rate=1e-5, prompts_per_step=8, prompts_per_minibatch=8,
                   micro_batch_size=16, max_response_tokens=32, rollout_batch_size=64,
                   eval_samples=50),
        warmup_steps=10, warmup=dict(learning_rate=2e-5),
        budget_tokens=20_000, probe_steps=3, evals_per_run=4, eval_k=4, entropy_samples=1),
    # The test: a few steps of everything, in-process, in seconds.
    "tiny-test": Setup(
        task=ArithTaskConfig(seed=0, n_train=64, n_valid=4, n_test=8, max_operand=9,
                             ops=("+", "-"), n_ood=6),
        train=dict(TRAIN_TINY, prompts_per_step=4, prompts_per_minibatch=4, micro_batch_size=16,
                   max_response_tokens=12, eval_samples=4),
        warmup_steps=3, warmup=dict(learning_rate=3e-3),
        budget_tokens=600, probe_steps=1, evals_per_run=2, eval_k=2, entropy_samples=1),
}


# --------------------------------------------------------------------------- data and models

def write_tasks(setup: Setup, out: Path) -> tuple[dict[str, Path], Path]:
    """One data directory per condition (train.jsonl = that condition's training split,
    the same valid and test splits) and the warm-up task: rows freshly drawn from the same
    train problems (never a held-out one), with the same test split."""
    task = out / "task"
    if not (task / "task.json").exists():
        write_task(task, setup.task)
    elif json.loads((task / "task.json").read_text()) != json.loads(json.dumps(
            config_record(setup.task))):
        raise SystemExit(f"{out} holds runs of another task config: choose another --out")
    dirs = {}
    for condition, split in CONDITIONS.items():
        d = out / f"data-{condition}"
        if not (d / "train.jsonl").exists():
            d.mkdir(parents=True, exist_ok=True)
            for name in ("valid", *EVAL_SPLITS):
                shutil.copyfile(task / SPLIT_FILES[name], d / SPLIT_FILES[name])
            shutil.copyfile(task / SPLIT_FILES[split], d / "train.jsonl")
        dirs[condition] = d
    warm = out / "warmup-task"
    if not (warm / "train.jsonl").exists():
        rng = random.Random(f"replicate/warmup/{setup.task.seed}")
        pool = split_problems(setup.task)["train"]
        rows = [make_row(pool[rng.randrange(len(pool))], setup.task, rng)
                for _ in range(setup.task.n_train)]
        warm.mkdir(parents=True, exist_ok=True)
        write_jsonl(warm / "train.jsonl", rows)
        write_jsonl(warm / "test.jsonl", generate_split(setup.task, "test"))
    return dirs, warm


def _bench_models():
    """benchmarks/models.py (the shared model cache: SmolLM2 conversion), loaded by path."""
    spec = importlib.util.spec_from_file_location("gft_bench_models", HERE / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_model(name: str, out: Path) -> Path:
    """The model the warm-up starts from: tiny = gft.tiny's default spec, random init."""
    if name in ("tiny", "tiny-test"):
        from gft.tiny import TinyModelSpec, write_tiny_model
        path = out / "tiny-init"
        if not (path / "config.json").exists():
            write_tiny_model(path, TinyModelSpec(seed=0))
        return path
    if name == "smollm2":
        return _bench_models().prepare("smollm2", HERE / "cache")
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {name}: not tiny, smollm2 or a model directory")
    return path


