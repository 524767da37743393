"""From worker results to numbers, benchmarks/RESULTS.md and a PNG chart.

Per trainer row (warm-up steps excluded): median and [min-max] of the step time, median
rollout and update times, rollout tokens/s (generated tokens / rollout time), update
tokens/s (non-padding prompt+response tokens / update time), peak RSS of its process, and
the achieved fraction of the floor (benchmarks/floor.py), computed per step from the
lengths that trainer actually produced.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.floor import ModelShape, rollout_floor_s, update_floor_s

TARGETS = {  # issue 5's "what it must show", as (description, limit)
    "step_vs_trl": ("gft torch `grpo` step time / TRL GRPOTrainer step time", "≤ 0.6"),
    "step_bf16roll_vs_trl": ("gft torch `grpo` with `rollout_engine: bfloat16` step time / "
                             "TRL GRPOTrainer step time (float32 rollouts)", "≤ 0.6"),
    "rss_vs_trl": ("gft torch `grpo` peak RSS / TRL peak RSS", "≤ 1.0"),
    "gpu_vs_trl": ("gft torch `grpo` peak GPU memory / TRL's (torch.cuda.max_memory_allocated)",
                   "≤ 1.0"),
    "update_vs_matmul": ("gft torch update: achieved fraction of the matmul-rate floor",
                         "≥ 0.60"),
    "rollout_vs_bw": ("gft torch rollout: achieved fraction of the bandwidth floor", "≥ 0.70"),
    "mlx_vs_lora": ("gft mlx `grpo` step time / mlx-lm-lora GRPO step time", "≤ 1.0"),
    # issue 19, meant for the long-response workload (--model qwen-vocab --max-new-tokens 1024)
    "update_rss_vs_trl": ("gft torch `grpo` update peak RSS / TRL's (issue 19)", "≤ 0.5"),
    "update_vs_trl": ("gft torch `grpo` update time / TRL's (issue 19)", "≤ 1.0"),
    "ops_vs_trl": ("aten operators dispatched by one gft torch `grpo` update / TRL's "
                   "(issue 19, --count-ops)", "≤ 1.0"),
    # issue 19's mixed-length workload (--section mixed): micro_batch_tokens against
    # micro-batches of 8 sequences, made only when both rows' losses agree (same update)
    "mixed_tok_s": ("gft `gft` update tok/s, micro_batch_tokens / by sequence count, at "
                    "equal loss (issue 19, mixed lengths)", "≥ 1.3"),
}

TIMED = {"step_vs_trl", "step_bf16roll_vs_trl", "update_vs_trl", "update_vs_matmul",
         "rollout_vs_bw", "mlx_vs_lora", "mixed_tok_s"}
"""The targets that compare times (left out of a --count-ops run's table)."""


def products_line(sm: dict, floor: dict) -> str:
    """The decode step's matrix products timed alone, against the bandwidth floor's step:
    the most of the floor a rollout through these kernels could reach."""
    step = _med(sm["times"]["decode_products_alone"]) / sm["decode_steps"]
    nbytes, rows = sm["linear_weight_bytes"], sm["tokens"] // sm["decode_steps"]
    floor_step = nbytes / (floor["bandwidth_gbs"] * 1e9)
    return (f"The decode step's matrix products alone (every weight × {rows} rows, the "
            f"sampler's kernels, nothing else): {step * 1e3:.1f} ms per step, "
            f"{nbytes / step / 1e9:.1f} GB/s of weights read, against {floor_step * 1e3:.1f} ms "
            f"to read them at the copy bandwidth: with these kernels a rollout reaches at most "
            f"{floor_step / step:.0%} of the bandwidth floor.")


def graphs_line(sm: dict, group: int, dtype: str) -> str:
    """The sampler through rollout_graphs' compiled step (CUDA): its time, its compile, and
    whether it sampled the eager loop's tokens from the same seed."""
    hf, g = _med(sm["times"]["hf_generate"]), _med(sm["times"]["torch_sampler_graphs"])
    if sm.get("graphs_failure"):
        return (f"rollout_graphs failed here and the sampler decoded eagerly ({g:.2f} s): "
                f"{sm['graphs_failure']}.")
    return (f"The sampler through a compiled step replayed as CUDA graphs (`rollout_graphs`, "
            f"compiled before the timed rounds): {g:.2f} s ({sm['tokens'] / g:.0f} tok/s), "
            f"generate / that = {hf / g:.2f}; its first call, compiling included, took "
            f"{sm['graphs_first_call_s']:.1f} s. With one seed it sampled the eager loop's "
            f"tokens in {sm['graphs_rows_equal']} of {group} rows (common prefixes "
            f"{sm['graphs_common_prefix']} of {sm['tokens'] // group}; {dtype} rounding can "
            "differ between compiled and eager kernels).")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(result: dict, shape: ModelShape, floor: dict, dtype_bytes: int,
              fixed_batch: bool = False) -> dict:
    """One row's statistics from a worker's per-step records (fixed_batch: --fixed-batch,
    no rollout ran, so it has no rollout figures)."""
    steps = [s for s in result["steps"] if not s["warmup"]] or result["steps"]
    rate, bw = floor["matmul_gflops"] * 1e9, floor["bandwidth_gbs"] * 1e9
    gen = [sum(s["completion_lengths"]) for s in steps]
    upd = [sum(s["seq_lengths"]) for s in steps]
    # every row of a step samples the same prompt (benchmarks/workload.py): one prefill,
    # and the update needs that prompt's forward/backward once
    # fixed_batch: no rollout to floor (told, not guessed from the time: a tiny model's
    # rollout of 4 tokens can take under 10 ms)
    r_floor = [] if fixed_batch else [
        rollout_floor_s(shape, s["prompt_len"], s["completion_lengths"], rate, bw, dtype_bytes,
                        distinct_prompts=1) for s in steps]
    u_floor = [update_floor_s(shape, s["seq_lengths"], rate, shared_prompt=s["prompt_len"])
               for s in steps]
    step_s = [s["step_s"] for s in steps]
    return {
        "n": len(steps),
        "step_s": _med(step_s), "step_min": min(step_s), "step_max": max(step_s),
        "cpu_s": _med([s["cpu_s"] for s in steps if "cpu_s" in s]),
        "rollout_s": _med([s["rollout_s"] for s in steps]),
        "update_s": _med([s["update_s"] for s in steps]),
        "rollout_tok_s": _med([g / s["rollout_s"] for g, s in zip(gen, steps)
                               if s["rollout_s"] > 0 and r_floor]),
        "update_tok_s": _med([u / s["update_s"] for u, s in zip(upd, steps) if s["update_s"] > 0]),
        "completions": _med([len(s["completion_lengths"]) for s in steps]),
        "mean_completion": _med([g / max(len(s["completion_lengths"]), 1)
                                 for g, s in zip(gen, steps)]),
        "update_tokens": _med(upd),
        "padding": _med([1 - u / s["padded_tokens"] for u, s in zip(upd, steps)
                         if s["padded_tokens"]]),
        "rollout_floor_s": _med(r_floor), "update_floor_s": _med(u_floor),
        "rollout_frac": _med([f / s["rollout_s"] for f, s in zip(r_floor, steps)
                              if s["rollout_s"] > 0]),
        "update_frac": _med([f / s["update_s"] for f, s in zip(u_floor, steps)
                             if s["update_s"] > 0]),
        "peak_rss": result.get("peak_rss_bytes", 0),
        # the process's peak RSS during the update alone (VmHWM reset before it; Linux)
        "update_peak_rss": _med([s["update_peak_rss"] for s in steps
                                 if s.get("update_peak_rss")]) or None,
        "loss": _med([s["loss"] for s in steps if s.get("loss") is not None]),
        "ops": next((s["ops"] for s in reversed(steps) if s.get("ops")), None),
        "gpu_peak": result.get("gpu_peak_bytes"),
        "info": result.get("info", {}),
    }


def ratios(rows: dict[str, dict], fixed_batch: bool = False) -> dict[str, float]:
    """The issue's comparisons, where both sides ran (fixed_batch: no rollout was measured,
    so none of its comparisons is made)."""
    def ok(k):
        return k in rows and "summary" in rows[k]
    out = {}
    g, t, m, l = "gft-torch:grpo", "trl:grpo", "gft-mlx:grpo", "mlx-lm-lora:grpo"
    if ok(g) and ok(t):
        out["step_vs_trl"] = rows[g]["summary"]["step_s"] / rows[t]["summary"]["step_s"]
        out["rss_vs_trl"] = rows[g]["summary"]["peak_rss"] / rows[t]["summary"]["peak_rss"]
        if rows[g]["summary"].get("gpu_peak") and rows[t]["summary"].get("gpu_peak"):
            out["gpu_vs_trl"] = rows[g]["summary"]["gpu_peak"] / rows[t]["summary"]["gpu_peak"]
        gu, tu = rows[g]["summary"].get("update_peak_rss"), rows[t]["summary"].get(
            "update_peak_rss")
        if gu and tu:
            out["update_rss_vs_trl"] = gu / tu
        if rows[g]["summary"].get("ops") and rows[t]["summary"].get("ops"):
            out["ops_vs_trl"] = (sum(rows[g]["summary"]["ops"].values())
                                 / sum(rows[t]["summary"]["ops"].values()))
        if rows[g]["summary"].get("update_s") and rows[t]["summary"].get("update_s"):
            out["update_vs_trl"] = rows[g]["summary"]["update_s"] / rows[t]["summary"]["update_s"]
    b = "gft-torch-bf16roll:grpo"
    if ok(b) and ok(t):
        out["step_bf16roll_vs_trl"] = rows[b]["summary"]["step_s"] / rows[t]["summary"]["step_s"]
    if ok(g):
        out["update_vs_matmul"] = rows[g]["summary"]["update_frac"]
        if not fixed_batch and _number(rows[g]["summary"]["rollout_frac"]):
            out["rollout_vs_bw"] = rows[g]["summary"]["rollout_frac"]
    if ok(m) and ok(l):
        out["mlx_vs_lora"] = rows[m]["summary"]["step_s"] / rows[l]["summary"]["step_s"]
    a, b = "gft-torch-mixed:gft", "gft-torch-mixed-tokens:gft"
    if ok(a) and ok(b) and same_loss(rows[a]["summary"].get("loss"),
                                     rows[b]["summary"].get("loss")):
        out["mixed_tok_s"] = rows[b]["summary"]["update_tok_s"] / rows[a]["summary"][
            "update_tok_s"]
    return out


def same_loss(a: float | None, b: float | None, rel: float = 1e-4) -> bool:
    """Two rows' losses of the last measured step agree (float32 rounding apart)."""
    return _number(a) and _number(b) and abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def loss_line(rows: dict[str, dict]) -> list[str]:
    """--fixed-batch: every gft row trained on the same tokens, so their losses must agree;
    the line shows it (TRL's logged loss is another aggregation: left out)."""
    got = [(k, r["summary"]["loss"]) for k, r in rows.items() if k.startswith("gft-torch")
           and "summary" in r and _number(r["summary"].get("loss"))]
    if len(got) < 2:
        return []
    return ["Loss of the last measured step (the same fixed tokens for every gft row): "
            + ", ".join(f"{k} {v:.10g}" for k, v in got) + ".", ""]


def _number(x: float | None) -> bool:
    return x is not None and x == x  # not None, not nan


def _rollout_cells(s: dict, fixed_batch: bool) -> tuple[str, str]:
    """(rollout tok/s, rollout floor s (achieved)): n/a under --fixed-batch, where no
    rollout ran (its few microseconds of handing back fixed ids once read as 18 million
    tok/s and 16,733,327% of the floor), and wherever they are not numbers."""
    if fixed_batch or not _number(s["rollout_tok_s"]):
        tok = "n/a"
    else:
        tok = f"{s['rollout_tok_s']:.0f}"
    if fixed_batch or not (_number(s["rollout_floor_s"]) and _number(s["rollout_frac"])):
        return tok, "n/a"
    return tok, f"{s['rollout_floor_s']:.2f} ({s['rollout_frac']:.0%})"


def _meets(value: float, limit: str) -> str:
    op, num = limit.split()
    good = value <= float(num) if op == "≤" else value >= float(num)
    return "yes" if good else "**no**"


def _gib(n: float | None) -> str:
    return "–" if not n else f"{n / 2**30:.2f}"


def render_run(run: dict) -> str:
    """One run (one model / device / dtype) as a Markdown section."""
    m, fl = run["machine"], run["floor"]
    tags = "".join(f" · {t}" for t in (
        f"{run['max_new_tokens']} new tokens" if run["max_new_tokens"] != 64 else "",
        "fixed batch" if run.get("fixed_batch") else "",
        "operator counts" if run.get("count_ops") else "", run.get("section", "")) if t)
    lines = [f"## {run['model']} · {run['device']} · {run['dtype']}{tags} · {run['date']}", "",
             f"Command: `{run['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM"
             + (f", GPU: {m['gpu']}" if m.get("gpu") else "")
             + f"; {m['os']}; Python {m['python']}. "
             f"Load average before / after: {m['load_before']} / {m['load_after']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in run["versions"].items()) + ".", "",
             f"Workload: one prompt ({run['prompt_len']} tokens) × {run['group']} sequences per "
             f"step, ≤ {run['max_new_tokens']} new tokens, temperature 1, top-p 1, β = 0, one "
             f"update per step, no gradient checkpointing; {run['warmup']} warm-up step(s) then "
             f"{run['reps']} measured; model {run['params'] / 1e6:.1f} M parameters.", "",
             "Floor (measured in this run): matmul "
             + ", ".join(f"{k}: {v['gflops_median']:.0f}" for k, v in fl["matmul"].items())
             + f" GFLOP/s (floor uses {fl['matmul_gflops']:.0f}"
             + (", the highest of these and the torch jobs' re-timings below"
                if fl.get("retimed_gflops") else "") + "); memory copy "
             f"{fl['bandwidth_gbs']:.1f} GB/s (read + write of {fl['copy_bytes'] >> 20} MiB); "
             f"{fl['threads']} torch threads.", "",
             "| trainer | preset | step s, median [min–max] | CPU s | rollout s | update s | "
             "rollout tok/s | update tok/s | seqs × mean new tokens | peak RSS GiB (after load) | "
             "update peak RSS GiB | rollout floor s (achieved) | update floor s (achieved) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, row in run["rows"].items():
        name, preset = key.split(":")
        if "summary" not in row:
            lines.append(f"| {name} | {preset} | did not run: {row.get('error', '?')} "
                         "| | | | | | | | | | |")
            continue
        s = row["summary"]
        rss = _gib(s["peak_rss"])
        if s["info"].get("load_peak_rss"):
            rss += f" (load {_gib(s['info']['load_peak_rss'])})"
        if s.get("gpu_peak"):
            rss += f" (GPU {_gib(s['gpu_peak'])})"

        roll_tok, roll_floor = _rollout_cells(s, bool(run.get("fixed_batch")))
        lines.append(
            f"| {name} | {preset} | {s['step_s']:.2f} [{s['step_min']:.2f}–{s['step_max']:.2f}] "
            f"| {s['cpu_s']:.1f} | {s['rollout_s']:.2f} | {s['update_s']:.2f} "
            f"| {roll_tok} "
            f"| {s['update_tok_s']:.0f} | {s['completions']:.0f} × {s['mean_completion']:.1f} "
            f"| {rss} | {_gib(s.get('update_peak_rss'))} | {roll_floor} "
            f"| {s['update_floor_s']:.2f} ({s['update_frac']:.0%}) |")
    lines += ["", "CPU s is the job's CPU time per step, all threads: on a quiet machine it is "
              "about threads × step s; much less means the job waited for a core "
              "(a busy machine), and its times are not to be trusted. "
              "Rollout tok/s counts generated tokens; update tok/s counts the non-padding "
              "prompt + response tokens the forward/backward processed. TRL's rollout is its "
              "`_generate` (the rest of `_generate_and_score_completions`, rewards and padding, "
              "is counted in neither column but is in the step). gft's `gft` preset generates 4 "
              "rollouts and trains on 8 sequences (4 dataset responses + 4 rollouts); "
              "`gft-torch-mixed` the same with dataset responses of varied length "
              "(workload.mixed_responses). Update peak RSS: the process's resident-set peak "
              "from the end of the rollout to the end of the optimizer step (VmHWM reset "
              "between them), weights and optimizer state included.", ""]
    got = ratios(run["rows"], bool(run.get("fixed_batch")))
    if run.get("count_ops"):  # every op went through Python: its times are no measurement
        got = {k: v for k, v in got.items() if k not in TIMED}
    g, t = run["rows"].get("gft-torch:grpo", {}), run["rows"].get("trl:grpo", {})
    if "summary" in g and "summary" in t:
        lg, lt = g["summary"]["mean_completion"], t["summary"]["mean_completion"]
        if abs(lg - lt) > 0.05 * max(lg, lt):
            lines += [f"Unequal work: gft's rollouts averaged {lg:.1f} new tokens, TRL's "
                      f"{lt:.1f} (EOS is sampled); compare tok/s columns as well as step "
                      "times.", ""]
    if got:
        lines += ["| target | value | required | met |", "| --- | --- | --- | --- |"]
        for k, v in got.items():
            desc, limit = TARGETS[k]
            lines.append(f"| {desc} | {v:.2f} | {limit} | {_meets(v, limit)} |")
        lines.append("")
    lines += ops_lines(run["rows"])
    if run.get("fixed_batch"):
        lines += loss_line(run["rows"])
    if run.get("sampler"):
        sm = run["sampler"]
        hf, ours = _med(sm["times"]["hf_generate"]), _med(sm["times"]["torch_sampler"])
        lines += [f"Rollout engines alone ({sm['tokens']} tokens: {run['group']} rows × "
                  f"{sm['tokens'] // run['group']} new tokens, no EOS, sampled, interleaved runs): "
                  f"transformers `generate` {hf:.2f} s ({sm['tokens'] / hf:.0f} tok/s), "
                  f"backends/torch_sampler.py {ours:.2f} s ({sm['tokens'] / ours:.0f} tok/s); "
                  f"generate / sampler time = {hf / ours:.2f} (above 1: the sampler is faster)."]
        if sm["times"].get("torch_sampler_bf16_copy"):
            b = _med(sm["times"]["torch_sampler_bf16_copy"])
            lines[-1] += (f" The sampler on a bfloat16 copy of the weights (refreshed each call; "
                          f"`rollout_copy`/`sync_weights`): {b:.2f} s, "
                          f"generate / that = {hf / b:.2f}.")
        if sm["times"].get("torch_sampler_graphs"):
            lines[-1] += " " + graphs_line(sm, run["group"], run["dtype"])
        if sm["times"].get("decode_products_alone") and run.get("floor"):
            lines[-1] += " " + products_line(sm, run["floor"])
        lines.append("")
    for note in run.get("notes", []):
        lines.append(f"- {note}")
    if run.get("notes"):
        lines.append("")
    if run.get("chart"):
        lines += [f"![step time and memory]({run['chart']})", ""]
    return "\n".join(lines)


def ops_lines(rows: dict[str, dict], top: int = 10) -> list[str]:
    """--count-ops: the aten operators one update dispatched, per row, with the commonest."""
    counted = [(k, r["summary"]["ops"]) for k, r in rows.items()
               if "summary" in r and r["summary"].get("ops")]
    if not counted:
        return []
    out = ["| trainer | aten operators in one update | the most frequent |",
           "| --- | --- | --- |"]
    for key, ops in counted:
        common = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        out.append(f"| {key} | {sum(ops.values())} | "
                   + ", ".join(f"{name} {n}" for name, n in common) + " |")
    return out + [""]


def write_results(path: Path, runs: dict[str, dict]) -> None:
    header = ["# Benchmark results", "",
              "Written by `benchmarks/bench.py` (see benchmarks/README.md); one section per "
              "model / device / dtype, newest first. Every number in a section comes from one "
              "run on one machine.", ""]
    ordered = sorted(runs.values(), key=lambda r: r["date"], reverse=True)
    Path(path).write_text("\n".join(header) + "\n" + "\n".join(render_run(r) for r in ordered))


def chart(path: Path, run: dict) -> bool:
    """Stacked step-time bars (rollout / update / other) with the floor, and peak RSS."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [(k, r["summary"]) for k, r in run["rows"].items() if "summary" in r]
    if not rows:
        return False
    labels = [k for k, _ in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2),
                                   gridspec_kw={"width_ratios": [3, 1]})
    y = range(len(rows))
    roll = [s["rollout_s"] for _, s in rows]
    upd = [s["update_s"] for _, s in rows]
    other = [max(s["step_s"] - s["rollout_s"] - s["update_s"], 0) for _, s in rows]
    ax1.barh(y, roll, label="rollout", color="#4c72b0")
    ax1.barh(y, upd, left=roll, label="update", color="#dd8452")
    ax1.barh(y, other, left=[a + b for a, b in zip(roll, upd)], label="other", color="#aaaaaa")
    floors = [s["rollout_floor_s"] + s["update_floor_s"] for _, s in rows]
    ax1.scatter(floors, list(y), marker="|", s=400, color="black", label="floor", zorder=3)
    for i, (_, s) in enumerate(rows):
        ax1.plot([s["step_min"], s["step_max"]], [i, i], color="black", lw=1)
    ax1.set_yticks(list(y), labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds per step (median; line: min–max)")
    ax1.legend(loc="lower right")
    ax1.set_title(f"{run['model']} on {run['device']} ({run['dtype']})")
    ax2.barh(y, [s["peak_rss"] / 2**30 for _, s in rows], color="#55a868")
    ax2.set_yticks(list(y), [""] * len(rows))
    ax2.invert_yaxis()
    ax2.set_xlabel("peak RSS, GiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
