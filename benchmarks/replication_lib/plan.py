"""From the set-up to run specs: the base model, the probe, equal policy tokens, the sweep.

Equal compute is by construction: every run carries `max_policy_tokens` = the budget (and
each stage of a pipeline its share), so gft's loop stops it within one step's tokens of the
budget (gft/budget.py). The step counts in the specs are only caps, set at one policy
token per prompt per step, which the token stop reaches first as long as a step processes
at least that (a demonstration or a rollout has at least one token); a run that hit its
cap would show in the tables' token column, under the budget. A short probe of each
preset from the base estimates tokens per step, which sets how often a run evaluates
during training (the curves), nothing else.

The learning-rate sweep: with several rates, every (condition, method) is trained at each
rate with the first seed; the rate with the best greedy accuracy on the validation split
(never a test split; ties: the higher mean reward, then the lower rate) is chosen and the
other seeds train at it. The first seed's run at the chosen rate is the same spec, reused.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.replication_lib.runs import Runner, fingerprint
from benchmarks.replication_lib.setup import EVAL_SPLITS, METHODS, PRESETS, Setup, initial_model


class Base(NamedTuple):
    """The model every run starts from, its own evaluation and its fingerprint."""
    path: Path
    result: dict[str, Any]
    fp: str


def evaluation(setup: Setup, data: Path) -> dict[str, Any]:
    t = setup.train
    return {"data": str(data), "n": setup.eval_n, "k": setup.eval_k,
            "splits": ["valid", *EVAL_SPLITS],
            "max_new_tokens": t["max_response_tokens"], "batch_size": t["rollout_batch_size"],
            "entropy_samples": setup.entropy_samples, "backend": t.get("backend", "auto"),
            "dtype": t.get("dtype", "float32"), "device": t.get("device", "auto")}


def make_base(setup: Setup, runner: Runner, model: str, out: Path, warm: Path,
              data: Path) -> Base:
    """SFT warm-up from the initial model (cached), then the base's own evaluation."""
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
                         "values": None, "evaluation": evaluation(setup, data),
                         "depends": base_fp})
    return Base(base, result, base_fp)


def probe(setup: Setup, runner: Runner, base: Base, data: Path, out: Path) -> dict[str, float]:
    """Policy tokens per step of each preset, measured over a few steps from the base."""
    specs = []
    for preset in PRESETS:
        run_dir = out / "probes" / preset
        values = {**setup.train, "model": str(base.path), "data": str(data), "preset": preset,
                  "max_steps": setup.probe_steps, "seed": 0, "output_dir": str(run_dir),
                  "eval_samples": 1, "eval_every": 0}
        specs.append({"name": f"probe-{preset}", "run_dir": str(run_dir), "values": values,
                      "eval": False, "depends": base.fp})
    results = runner.many(specs)
    return {p: r["tokens"] / max(r["steps"], 1) for p, r in zip(PRESETS, results)}


class StagePlan(NamedTuple):
    preset: str
    tokens: int       # the stage's policy-token budget
    cap: int          # steps it may not exceed (never reached: see the module docstring)
    expected: int     # steps the probe predicts (sets the evaluation cadence)


def plan(setup: Setup, per_step: dict[str, float]) -> dict[str, list[StagePlan]]:
    """Each method's stages with their share of the budget."""
    pps = setup.train["prompts_per_step"]
    out = {}
    for method, stages in METHODS.items():
        out[method] = [StagePlan(p, round(share * setup.budget_tokens),
                                 math.ceil(share * setup.budget_tokens / pps) + 1,
                                 max(1, round(share * setup.budget_tokens / per_step[p])))
                       for p, share in stages]
    return out


def run_spec_for(setup: Setup, stages: list[StagePlan], *, method: str, condition: str,
                 seed: int, lr: float, base: Base, data: Path, out: Path) -> dict[str, Any]:
    """The spec of one training run of `method` at equal policy tokens."""
    tag = f"{method.replace('>', '-')}-s{seed}-lr{lr:g}"
    run_dir = out / "runs" / condition / tag
    expected = sum(s.expected for s in stages)
    values = {**setup.train, "learning_rate": lr, "model": str(base.path), "data": str(data),
              "seed": seed, "output_dir": str(run_dir), "preset": stages[0].preset,
              "max_policy_tokens": setup.budget_tokens,
              "eval_every": max(1, expected // setup.evals_per_run)}
    if len(stages) == 1:
        values["max_steps"] = stages[0].cap
    else:
        values["stages"] = [{"preset": s.preset, "steps": s.cap, "max_policy_tokens": s.tokens}
                            for s in stages]
    return {"name": f"{method}-{condition}-s{seed}-lr{lr:g}", "method": method,
            "condition": condition, "seed": seed, "lr": lr, "budget": setup.budget_tokens,
            "stages": [[s.preset, s.tokens] for s in stages], "run_dir": str(run_dir),
            "values": values, "evaluation": evaluation(setup, data), "depends": base.fp}


def valid_key(result: dict[str, Any]) -> tuple[float, float, float]:
    """What the sweep maximises: validation accuracy, then reward, then a lower rate."""
    return (result.get("valid/accuracy", -1.0), result.get("valid/reward", -1.0),
            -result["lr"])


def run_all(setup: Setup, runner: Runner, steps: dict[str, list[StagePlan]], seeds: list[int],
            base: Base, data: dict[str, Path], out: Path
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results at each method's chosen rate for every seed, every sweep result)."""
    lrs = list(setup.lrs) or [setup.train["learning_rate"]]
    cells = [(c, m) for c in setup.conditions for m in steps]
    spec = lambda c, m, s, lr: run_spec_for(  # noqa: E731
        setup, steps[m], method=m, condition=c, seed=s, lr=lr, base=base, data=data[c], out=out)
    sweep = runner.many([spec(c, m, seeds[0], lr) for c, m in cells for lr in lrs])
    chosen = {(r["condition"], r["method"]): r["lr"] for r in sorted(
        sweep, key=valid_key)}  # ascending: the best of each cell is written last
    rest = runner.many([spec(c, m, s, chosen[c, m]) for s in seeds[1:] for c, m in cells])
    firsts = [r for r in sweep if r["lr"] == chosen[r["condition"], r["method"]]]
    return firsts + rest, sweep if len(lrs) > 1 else []
