"""Small-scale replication of the GFT paper's comparison (GFT.md; issues 8 and 21).

    python benchmarks/replicate.py [--budget-tokens N] [--seeds 0 1 2] [--model tiny|smollm2|PATH]
                                   [--lr-sweep R,R,...] [--conditions clean flawed]
                                   [--out DIR] [--jobs J] [--report PATH] [--tiny-test]

What one command does, every step cached in --out so a rerun only does what is missing:
  1. task   the bundled arithmetic word problems (gft/tasks/arith.py) at a harder setting
            than the default job (operands 0..19, + and -), with its splits: test (in
            distribution), test_big, test_chain and test_reword (out of distribution), valid (for the
            sweep), and two training conditions: clean and flawed expert demonstrations;
  2. base   the model (tiny: gft.tiny's ~90k-parameter byte-level Llama, random init) is
            first trained briefly with SFT on a separate warm-up split, so it starts with
            partial skill, as the paper's base model does; every run starts from it;
  3. probe  a few steps of each preset from the base estimate policy tokens per step
            (only to space the evaluations during training);
  4. train  sft, dft, grpo, gft and the pipelines sft>grpo and sft>gft>grpo (gft's
            `stages`) for every condition and seed, each stopped by gft's
            `max_policy_tokens` at the same budget (each stage at its share), through gft's
            Python API in worker processes (--jobs in parallel); with --lr-sweep, every
            rate for the first seed, the best on `valid` for the others;
  5. eval   greedy pass@1 and sampled pass@k on every test split, valid accuracy, and the
            policy's entropy on the test prompts, for the base and every run;
  6. report tables per split and per method, the paper's claims checked per split, the
            sweep, curves, the machine, versions, commands and wall times.
The parts live in benchmarks/replication_lib/ (set-up, runs, plan, report, figures).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # `python benchmarks/replicate.py` from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.replication_lib.plan import make_base, plan, probe, run_all  # noqa: E402
from benchmarks.replication_lib.report import write_report  # noqa: E402
from benchmarks.replication_lib.runs import Runner, cached, fingerprint, run_spec  # noqa: E402,F401
from benchmarks.replication_lib.setup import CONDITIONS, SETUPS, write_tasks  # noqa: E402


def lr_list(text: str) -> tuple[float, ...]:
    """'1e-4,3e-4,1e-3' -> (1e-4, 3e-4, 1e-3); argparse turns a ValueError into a usage error."""
    rates = tuple(float(x) for x in text.split(",") if x.strip())
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(text)
    return rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default) | smollm2 | a model directory")
    ap.add_argument("--budget-tokens", type=int, help="policy tokens per run (default: the "
                    "model's setup: tiny 1,500,000; smollm2 20,000)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (smollm2: 0)")
    ap.add_argument("--lr-sweep", type=lr_list, metavar="R,R,...", help="learning rates tried "
                    "for every method (the same sweep for all) with the first seed; the best "
                    "on the validation split is used for every seed (default: the setup's "
                    "one rate)")
    ap.add_argument("--conditions", nargs="+", choices=sorted(CONDITIONS), help="training "
                    "data: clean and/or flawed expert demonstrations (default: both)")
    ap.add_argument("--out", type=Path, help="work directory with every run (cached; default "
                    "runs/replicate-<model>)")
    ap.add_argument("--report", type=Path, help="where REPLICATION.md goes (default: "
                    "benchmarks/REPLICATION.md for tiny, else <out>/REPLICATION.md); its figures "
                    "go to a folder beside it")
    ap.add_argument("--jobs", type=int, help="runs in parallel, each a worker process "
                    "(default: 2 for tiny, 1 otherwise; 0 = in this process)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / jobs)")
    ap.add_argument("--tiny-test", action="store_true", help="tiny budgets, 1 seed, in-process: "
                    "checks that everything runs (about a minute), results mean nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.worker:
        run_spec(json.loads(Path(args.worker).read_text()))
        return Path(args.worker)
    t_start = time.time()
    key = "tiny-test" if args.tiny_test else ("smollm2" if args.model == "smollm2" else "tiny")
    setup = SETUPS[key]
    if args.model not in ("tiny", "smollm2"):  # a local model: the smollm2 budgets
        setup = SETUPS["smollm2"]
    if args.budget_tokens:
        setup = replace(setup, budget_tokens=args.budget_tokens)
    if args.lr_sweep:
        setup = replace(setup, lrs=args.lr_sweep)
    if args.conditions:
        setup = replace(setup, conditions=tuple(dict.fromkeys(args.conditions)))
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
    print(f"[replicate] {key}: budget {setup.budget_tokens:,} policy tokens/run, seeds {seeds}, "
          f"conditions {list(setup.conditions)}, learning rates "
          f"{list(setup.lrs) or [setup.train['learning_rate']]}, {jobs} job(s) x {threads} "
          f"thread(s), work dir {out}", flush=True)

    data, warm = write_tasks(setup, out)
    base = make_base(setup, runner, args.model, out, warm, data["clean"])
    per_step = probe(setup, runner, base, data["clean"], out)
    stages = plan(setup, per_step)
    results, sweep = run_all(setup, runner, stages, seeds, base, data, out)

    walls = record_wall(out, time.time() - t_start, runner.executed)
    return write_report(report=report, out=out, setup=setup, key=key, model=args.model,
                        seeds=seeds, jobs=jobs, threads=threads, base=base.result,
                        per_step=per_step, plan=stages, results=results, sweep=sweep,
                        walls=walls, argv=argv)


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
