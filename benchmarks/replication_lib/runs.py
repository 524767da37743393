"""One replication run, and the runner that runs many, cached.

A spec (a JSON-able dict) says what to train (gft TrainConfig values, or none: evaluate a
model as is), what to evaluate and what it depends on; its result.json is reused only while
the spec's fingerprint is unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "replicate.py"  # workers run it with --worker


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
    import backends  # noqa: F401  (registers the provider run_training loads through)
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
              "condition": spec.get("condition"), "lr": spec.get("lr"),
              "budget": spec.get("budget"), "run_dir": str(run_dir),
              "stages": spec.get("stages"), "train_wall_s": train_wall,
              "eval_wall_s": time.time() - t1, **ev, **run_stats(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    if log is not sys.stdout:
        log.close()
    return result


def evaluate_model(model: Path, spec: dict[str, Any]) -> dict[str, float]:
    """Greedy pass@1 and pass@k on every test split, greedy pass@1 on the validation split
    (what the learning-rate sweep chooses by), and the policy's entropy on the test split."""
    from backends import load_backend
    from gft.data import load_split
    from gft.evaluate import evaluate
    from gft.rewards import build_rewards
    from gft.rollout import prepare_prompts
    ev = spec["evaluation"]
    be = load_backend(ev["backend"], str(model), dtype=ev["dtype"], device=ev["device"])
    scorer = build_rewards(["math"])
    out: dict[str, float] = {}
    for split in ev["splits"]:
        rows = load_split(ev["data"], split)[:ev["n"]]
        if not rows:  # e.g. test_chain of a task without + and -
            continue
        prepared = prepare_prompts(rows, be.tokenizer, chat_template=None,
                                   max_prompt_tokens=10**9, overflow="error")
        k = 1 if split == "valid" else ev["k"]
        got = evaluate(be, prepared.rows, prepared.prompt_ids, scorer,
                       max_new_tokens=ev["max_new_tokens"], k=k, seed=12345,
                       batch_size=ev["batch_size"])
        if split == "test":
            got.update(policy_entropy(be, prepared.prompt_ids, ev))
        out.update({f"{split}/{key}": v for key, v in got.items()})
    return out


def policy_entropy(be, prompt_ids: list[list[int]], ev: dict[str, Any]) -> dict[str, float]:
    """Entropy of the policy itself, the same measurement for every method: the mean of
    -log p over the tokens of its own temperature-1 samples estimates H per token."""
    from backends import SamplingConfig
    from gft.groups import Sequence_, pad_batch
    n = ev["entropy_samples"]
    repeated = [p for p in prompt_ids for _ in range(n)]
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
    return {"entropy": nll / max(count, 1.0), "sample_tokens": count / max(len(seqs), 1)}


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
    per_step = [r.get("rollout_tokens", 0.0) + r.get("update_tokens", 0.0) for r in steps]
    out: dict[str, Any] = {"steps": len(steps), "tokens": rollout + update,
                           "rollout_tokens": rollout, "update_tokens": update,
                           "last_step_tokens": per_step[-1] if per_step else 0.0,
                           "max_step_tokens": max(per_step, default=0.0),
                           "steps_per_stage": [sum(1 for r in steps if r.get("stage") == i)
                                               for i in range(1 + max(
                                                   (r.get("stage", 0) for r in steps), default=0))]}
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
                proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", str(path)],
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


