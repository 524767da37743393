"""The replication's report: tables per split and per method, the paper's claims checked
per split, the sweep, the machine; written into REPLICATION.md with its figures."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.replication_lib.figures import figure_lines, make_figures
from benchmarks.replication_lib.setup import EVAL_SPLITS, METHODS, Setup
from benchmarks.replication_lib.text import doc, limits_text

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


def by_condition(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    conditions = dict.fromkeys(r["condition"] for r in results)
    return {c: by_method([r for r in results if r["condition"] == c]) for c in conditions}


def accuracy_table(groups: dict[str, list[dict[str, Any]]], base: dict[str, Any], k: int) -> str:
    """Per method (rows) and per split (columns): greedy pass@1 and pass@k."""
    cols = [(f"{s}/accuracy", f"{s} pass@1") for s in EVAL_SPLITS]
    cols += [(f"{s}/pass@{k}", f"{s} pass@{k}") for s in EVAL_SPLITS]
    lines = ["| method | learning rate | " + " | ".join(c for _, c in cols) + " |",
             "|" + " --- |" * (len(cols) + 2),
             "| base | – | " + " | ".join(_fmt(_stat([base], key)) for key, _ in cols) + " |"]
    for method, rs in groups.items():
        lrs = sorted({r["lr"] for r in rs})
        lines.append(f"| {method} | {', '.join(f'{x:g}' for x in lrs)} | "
                     + " | ".join(_fmt(_stat(rs, key)) for key, _ in cols) + " |")
    return "\n".join(lines)


def compute_table(groups: dict[str, list[dict[str, Any]]], base: dict[str, Any],
                  prompts_per_step: int) -> str:
    """Per method: steps, prompts, policy tokens against the budget, entropy, gradients, time."""
    head = ("| method | steps per stage (seed mean) | prompts seen | policy tokens | "
            "last step's tokens | entropy (nats/token) | grad norm median | grad norm max | "
            "train wall (s) |\n|" + " --- |" * 9)
    entropy = _fmt(_stat([base], "test/entropy"))
    rows = [head, f"| base | – | – | – | – | {entropy} | – | – | – |"]
    for method, rs in groups.items():
        n_stages = len(rs[0]["stages"])  # a stage the run's budget ran out before took 0 steps
        per_stage = np.mean([(r["steps_per_stage"] + [0] * n_stages)[:n_stages] for r in rs],
                            axis=0)
        stages = " > ".join(f"{p} {n:.0f}" for (p, _), n in zip(rs[0]["stages"], per_stage))
        seen = float(np.mean([r["steps"] for r in rs])) * prompts_per_step
        rows.append(
            f"| {method} | {stages} | {seen:,.0f} | {_fmt(_stat(rs, 'tokens'), 0)} | "
            f"{_fmt(_stat(rs, 'last_step_tokens'), 0)} | {_fmt(_stat(rs, 'test/entropy'))} | "
            f"{_fmt(_stat(rs, 'grad_norm/median'), 3)} | {_fmt(_stat(rs, 'grad_norm/max'), 3)} | "
            f"{_fmt(_stat(rs, 'train_wall_s'), 0)} |")
    return "\n".join(rows)


def seed_table(groups: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    """Greedy pass@1 of every run, per split."""
    lines = ["| method | split | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + " --- |" * (len(seeds) + 2)]
    for method, rs in groups.items():
        for split in EVAL_SPLITS:
            key = f"{split}/accuracy"
            lines.append(f"| {method} | {split} | " + " | ".join(
                next((f"{r[key]:.3f}" for r in rs if r["seed"] == s and key in r), "–")
                for s in seeds) + " |")
    return "\n".join(lines)


def sweep_table(sweep: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> str:
    """Validation accuracy of every rate of the sweep (first seed), the chosen one in bold."""
    lrs = sorted({r["lr"] for r in sweep})
    picked = {(r["condition"], r["method"]): r["lr"] for r in chosen}
    lines = ["| condition | method | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
             "|" + " --- |" * (len(lrs) + 2)]
    for (c, m), lr_pick in picked.items():
        cells = []
        for x in lrs:
            r = next((r for r in sweep
                      if (r["condition"], r["method"], r["lr"]) == (c, m, x)), None)
            text = "–" if r is None else f"{r.get('valid/accuracy', float('nan')):.3f}"
            cells.append(f"**{text}**" if x == lr_pick else text)
        lines.append(f"| {c} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _vs(groups, a: str, b: str, key: str) -> tuple[bool, str]:
    """Is a's mean above b's; and a phrase with the numbers and whether seeds separate them."""
    higher, _, text = _versus(groups, a, b, key)
    return higher, text


def _versus(groups, a: str, b: str, key: str) -> tuple[bool, bool, str]:
    """(a's mean above b's, every seed's run on the same side — min of one above the max of
    the other — and a phrase with the numbers saying which)."""
    sa, sb = _stat(groups[a], key), _stat(groups[b], key)
    higher = sa[0] > sb[0]
    apart = sa[2] > sb[3] if higher else sb[2] > sa[3]
    n = min(len(groups[a]), len(groups[b]))
    spread = ("" if n < 2 else " — every seed agrees" if apart else
              " — within the spread over seeds")
    return higher, apart or n < 2, f"{a} {sa[0]:.3f} vs {b} {sb[0]:.3f}{spread}"


def _verdict(holds: bool, apart: bool) -> str:
    """'held' only where the seeds separate the two; on the means alone, said so."""
    if not holds:
        return "did not hold"
    return "held" if apart else "held on the means only (within the spread over seeds)"


NEED = {"sft", "dft", "grpo", "gft", "sft>grpo", "sft>gft>grpo"}


def accuracy_claims(groups: dict[str, list[dict[str, Any]]], split: str) -> list[str]:
    """The paper's accuracy claims on one split, each with a verdict from the numbers."""
    if not NEED <= set(groups) or any(_stat(groups[m], f"{split}/accuracy") is None
                                      for m in NEED):
        return ["(not every method ran or was evaluated on this split: no verdicts)"]
    out = []
    acc = f"{split}/accuracy"
    (g_s, a_s, t_s) = _versus(groups, "gft", "sft", acc)
    (g_d, a_d, t_d) = _versus(groups, "gft", "dft", acc)
    verdict = _verdict(True, a_s and a_d) if g_s and g_d else \
        "partly held" if g_s or g_d else "did not hold"
    out.append(f"**GFT beats SFT and DFT** (greedy pass@1): {verdict} ({t_s}; {t_d}).")
    below, a_p, t_p = _versus(groups, "grpo", "sft>grpo", acc)
    out.append(f"**SFT→GRPO underperforms GRPO alone**: {_verdict(below, a_p)} ({t_p}).")
    means = {m: _stat(rs, acc)[0] for m, rs in groups.items()}
    best = max(means, key=means.get)
    ranking = ", ".join(f"{m} {v:.3f}" for m, v in sorted(means.items(), key=lambda x: -x[1]))
    runner_up = max((m for m in means if m != "sft>gft>grpo"), key=means.get)
    _, a_b, t_b = _versus(groups, "sft>gft>grpo", runner_up, acc)
    verdict = _verdict(best == "sft>gft>grpo", a_b)
    out.append(f"**SFT→GFT→GRPO is best**: {verdict} "
               f"(greedy pass@1 by method: {ranking}; {t_b}).")
    return out


SPLIT_WORDS = {"test": "in distribution (new phrasings of trained facts)",
               "test_big": "on larger numbers than training had",
               "test_chain": "on chained operations training never chains",
               "test_reword": "on trained facts asked in wording training never used"}


def pick_lines(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Which method to pick per split, in plain words: the best greedy pass@1, and every
    method the seeds do not separate from it (a tie at this scale)."""
    out = []
    for split in EVAL_SPLITS:
        acc = f"{split}/accuracy"
        means = {m: st[0] for m, rs in groups.items() if (st := _stat(rs, acc)) is not None}
        if not means:
            continue
        best = max(means, key=means.get)
        tied = [m for m in means if m != best and not _versus(groups, best, m, acc)[1]]
        tie = (f"; not separated from it by the seeds: {', '.join(tied)}" if tied
               else "; every other method is below it in every seed")
        out.append(f"{SPLIT_WORDS.get(split, split)}: **{best}** ({means[best]:.3f}){tie}.")
    return out


def signal_claims(groups: dict[str, list[dict[str, Any]]], base: dict[str, Any]) -> list[str]:
    """The paper's entropy and gradient claims, from the test split and the training logs."""
    if not {"sft", "gft"} <= set(groups):
        return ["(SFT or GFT did not run: no verdicts)"]
    out = []
    h0 = base["test/entropy"]
    hs, hg = _stat(groups["sft"], "test/entropy")[0], _stat(groups["gft"], "test/entropy")[0]
    keeps, t_e = _vs(groups, "gft", "sft", "test/entropy")
    collapses = hs < h0
    verdict = ("held" if keeps and collapses else "did not hold" if not keeps else
               "partly held (GFT's entropy is higher, but SFT did not lower it below the base)")
    out.append(f"**GFT keeps policy entropy where SFT collapses it**: {verdict} (entropy of "
               f"the policy's own samples on the test prompts, nats/token: base {h0:.3f}; "
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
    return out


def sample_efficiency(groups: dict[str, list[dict[str, Any]]], pps: int) -> str | None:
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
        g_ev = [x for x in read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
                if x.get("eval/accuracy") is not None]
        s_ev = [x for x in read_metrics(Path(sft["run_dir"]) / "metrics.jsonl")
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


def flaw_cost_lines(conditions: dict[str, dict[str, list[dict[str, Any]]]],
                    split: str = "test") -> list[str]:
    """What flawed demonstrations cost each method on `split`: greedy pass@1 trained on
    clean minus trained on flawed data, paired by seed (the same seed sees the same prompts
    in the same order in both conditions, so the pair differs only in the flaw)."""
    clean, flawed = conditions.get("clean"), conditions.get("flawed")
    if not clean or not flawed:
        return []
    key, rows, drops = f"{split}/accuracy", [], {}
    for m in (m for m in METHODS if m in clean and m in flawed):
        a = {r["seed"]: r.get(key) for r in clean[m]}
        b = {r["seed"]: r.get(key) for r in flawed[m]}
        d = np.array([a[s] - b[s] for s in sorted(a.keys() & b.keys())
                      if a[s] is not None and b[s] is not None], dtype=float)
        if not d.size:
            continue
        drops[m] = (float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else 0.0)
        rows.append(f"| {m} | {_fmt(_stat(clean[m], key))} | {_fmt(_stat(flawed[m], key))} | "
                    f"{drops[m][0]:+.3f} ± {drops[m][1]:.3f} |")
    if not rows:
        return []
    readers = [m for m in drops if m != "grpo"] or list(drops)  # grpo: K = 0, nothing to read
    least = min(readers, key=lambda m: drops[m][0])
    most = max(readers, key=lambda m: drops[m][0])
    after = {m: st[0] for m, rs in flawed.items() if (st := _stat(rs, key)) is not None}
    top = max(after, key=after.get)
    same_grpo = ("GRPO reads no demonstrations (K = 0): its two conditions trained the same. "
                 if drops.get("grpo") == (0.0, 0.0) else "")
    return ["### What flawed demonstrations cost", "",
            f"Greedy pass@1 on `{split}` trained on correct and on flawed expert "
            "demonstrations, and the loss (clean − flawed, mean ± standard deviation of the "
            "per-seed differences; each seed sees the same prompts in both conditions).", "",
            "| method | clean | flawed | clean − flawed |", "| --- | --- | --- | --- |", *rows, "",
            "Of the methods that read demonstrations, least hurt by the flawed ones: "
            f"**{least}** ({drops[least][0]:+.3f}); "
            f"most: **{most}** ({drops[most][0]:+.3f}). Best on `{split}` after training on "
            f"them: **{top}** ({after[top]:.3f}). " + same_grpo + "GFT scores its demonstrations "
            "with the reward, SFT and DFT imitate them as they are.", ""]


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
                per_step: dict[str, float], plan: dict[str, list]) -> list[str]:
    t, k = setup.task, setup.eval_k
    warm_lr = setup.warmup.get("learning_rate", setup.train["learning_rate"])
    train = ", ".join(f"{key}={v}" for key, v in setup.train.items()
                      if key not in ("progress", "learning_rate"))
    rates = (f"the sweep {', '.join(f'{x:g}' for x in setup.lrs)} for every method, chosen "
             "per method and condition on `valid` with the first seed" if setup.lrs else
             f"{setup.train['learning_rate']:g} for every method")
    base_acc = ", ".join(f"{s} {base.get(f'{s}/accuracy', float('nan')):.3f}" for s in EVAL_SPLITS)
    return [
        "### Setup of this run", "",
        f"- model: `{model}`; base = {setup.warmup_steps} SFT warm-up steps on the warm-up "
        f"split (learning rate {warm_lr}); greedy pass@1 of the base: {base_acc}.",
        f"- task: `ArithTaskConfig(max_operand={t.max_operand}, ops={t.ops}, "
        f"n_train={t.n_train}, n_valid={t.n_valid}, n_test={t.n_test}, n_ood={t.n_ood}, "
        f"n_teacher={t.n_teacher}, teacher_error_rate={t.teacher_error_rate}, "
        f"expert_error_rate={t.expert_error_rate}, seed={t.seed})`; conditions: "
        f"{', '.join(setup.conditions)}.",
        f"- training, every method: {train}; presets as in gft (sft: K=1, n=0, tau=0; dft: "
        "K=1, n=0, tau=1; grpo: K=0, n=8; gft: K=4, n=4, tau=0.1).",
        f"- learning rate: {rates}.",
        f"- budget: **{setup.budget_tokens:,} policy tokens per run**, stopped by gft's "
        "`max_policy_tokens`; pipelines: " + "; ".join(
            f"{m}: " + " > ".join(f"{s.preset} {s.tokens:,}" for s in st)
            for m, st in plan.items() if len(st) > 1) + f"; seeds {seeds}.",
        f"- evaluation: greedy pass@1 and pass@{k} (temperature 1) on "
        f"{', '.join(EVAL_SPLITS)}; entropy from {setup.entropy_samples} sample(s) per test "
        "prompt.",
        f"- probe ({setup.probe_steps} steps from the base, policy tokens per step; sets only "
        "how often runs evaluate during training): "
        + ", ".join(f"{p} {v:,.0f}" for p, v in per_step.items()) + ".", ""]


def condition_lines(setup: Setup, condition: str, groups: dict[str, list[dict[str, Any]]],
                    base: dict[str, Any], seeds: list[int]) -> list[str]:
    """The tables and the claims of one training condition."""
    pps = setup.train["prompts_per_step"]
    what = {"clean": "correct expert demonstrations (train.jsonl)",
            "flawed": "flawed expert demonstrations (train_flawed)"}.get(condition, condition)
    lines = [f"### Trained on {what}", "",
             f"Mean ± standard deviation over {len(seeds)} seed(s); every split's greedy pass@1 "
             "and sampled pass@k.", "", accuracy_table(groups, base, setup.eval_k), "",
             "Compute and training signals. Policy tokens = rollout tokens generated + "
             "response tokens in forward/backward, summed from each run's metrics.jsonl; "
             "every run stops within its last step's tokens of the budget. Entropy: of the "
             "policy's own temperature-1 samples on the test prompts.", "",
             compute_table(groups, base, pps), "",
             "Greedy pass@1 of every run:", "", seed_table(groups, seeds), "",
             "#### The paper's claims, checked", ""]
    for split in EVAL_SPLITS:
        lines += [f"On `{split}`:", ""] + [f"- {c}" for c in accuracy_claims(groups, split)] + [""]
    lines += [f"#### What to pick, trained on {what}", "",
              "The method with the best greedy pass@1 on each split, at this budget and "
              "scale:", ""] + [f"- {c}" for c in pick_lines(groups)] + [""]
    if condition == "clean":
        lines += ["Training signals:", ""] + [f"- {c}" for c in signal_claims(groups, base)]
        efficiency = sample_efficiency(groups, pps)
        if efficiency:
            lines.append(f"- {efficiency}")
        lines += ["", "At equal tokens SFT sees many more prompts than the methods that sample "
                  "rollouts (the 'prompts seen' column): tokens, not samples, are what a "
                  "fixed machine and time buy."]
    return lines + [""]


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
                 per_step: dict[str, float], plan: dict[str, list],
                 results: list[dict[str, Any]], sweep: list[dict[str, Any]],
                 walls: dict[str, Any], argv: list[str] | None) -> Path:
    """REPLICATION.md (the documentation, then the measurements), its figures, summary.json."""
    report = Path(report)
    figdir = report.parent / report.stem.lower()
    conditions = by_condition(results)
    command = command_line(argv)
    what = ("a smoke test: the numbers mean nothing" if key == "tiny-test"
            else "measured here, nothing copied")
    lines = [doc(), limits_text(key), "## Results", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} ({what}).", ""]
    lines += setup_lines(setup, model, base, seeds, per_step, plan)
    figures: list[Path] = []
    for condition, groups in conditions.items():
        lines += condition_lines(setup, condition, groups, base, seeds)
        figures += make_figures(groups, figdir, setup.budget_tokens, condition)
    lines += flaw_cost_lines(conditions)
    if sweep:
        lines += ["### Learning-rate sweep", "",
                  "Greedy pass@1 on `valid` of each rate (first seed); the chosen rate in bold "
                  "(a tie on accuracy goes to the higher validation reward, then to the lower "
                  "rate).",
                  "", sweep_table(sweep, results), ""]
    lines += figure_lines(figures, report.parent)
    lines += machine_lines(jobs, threads, walls,
                           list({r['name']: r for r in results + sweep}.values()), out)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(
        {"setup": {**asdict(setup), "task": asdict(setup.task)}, "per_step": per_step,
         "plan": plan, "base": base, "results": results, "sweep": sweep, "walls": walls,
         "command": command}, indent=1, default=str) + "\n")
    print(f"[replicate] wrote {report} and {len(figures)} figures in {figdir}", flush=True)
    return report
