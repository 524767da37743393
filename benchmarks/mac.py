"""Fine-tuning on a Mac's budget: one GFT step on SmolLM2-135M-Instruct with MLX, in
bfloat16, LoRA over bfloat16, LoRA over mlx-lm 8-bit and 4-bit, beside mlx-lm-lora's LoRA
GRPO over the same 4-bit model; gft's memory plan (`gft train --dry-run`) beside each
measured peak.

    python benchmarks/mac.py                      # writes benchmarks/MAC.md
    python benchmarks/mac.py --rows gft-lora-q4,mlx-lm-lora-q4 --reps 1

The models are made once under --cache from benchmarks/models.py's float32 SmolLM2:
`gft convert --dtype bfloat16` for the bfloat16 rows, and `gft convert --quantize 8|4` of
the float32 model (mlx-lm's own quantization, group size 64) for the quantized rows,
which compute in float32 (scales, biases, activations, adapters): on MLX's CPU backend a
bfloat16 quantized matmul runs about 12x slower than a float32 one (a 616x576 by 576x1536
product: 11 s against 0.9 s, 0.02 s unquantized float32 with OpenBLAS), which would make
one step of a quantized bfloat16 row take about an hour here. On a Mac (Metal) use
bfloat16 throughout (mlx-community's quantized models carry bfloat16 scales).
Every row runs in its own process (benchmarks/worker.py), one after another, on the same
workload (benchmarks/workload.py: one prompt; 8 sequences per update; gft's `gft` preset
is 4 dataset responses + 4 rollouts, mlx-lm-lora's GRPO 8 rollouts; --max-new-tokens new
tokens; lr 1e-6, beta 0, no gradient checkpointing), LoRA rank 8, alpha 16 (scale 2) on
every attention and MLP projection.

Peak memory, measured the same way for every row: the process's peak resident set
(ru_maxrss: weights as loaded, libraries and Python included), and MLX's own allocator
peak over the whole process (`mx.get_peak_memory()`: every MLX array, weights included;
on a Mac, where memory is unified, this is the figure to compare with the plan). The plan
is gft.plan.plan for the row's config with max_prompt_tokens set to the prompt's length
(the plan is for the longest sequence the config allows); for the mlx-lm-lora row it is
gft's plan of the same model and LoRA under the `grpo` preset (8 rollouts).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench, models, workload  # noqa: E402
from benchmarks.openblas import openblas_env  # noqa: E402

HERE = Path(__file__).resolve().parent
LORA_RANK, LORA_ALPHA = 8, 16.0
# key -> (what the table calls it, worker job, model variant, job arguments); the variant
# sets the dtype (VARIANT_DTYPE)
ROWS = {
    "gft-full-bf16": ("gft, full fine-tune, bfloat16", "gft", "bf16", {}),
    "gft-lora-bf16": ("gft, LoRA over bfloat16", "gft", "bf16", {"lora_rank": LORA_RANK}),
    "gft-lora-q8": ("gft, LoRA over 8-bit", "gft", "q8", {"lora_rank": LORA_RANK}),
    "gft-lora-q4": ("gft, LoRA over 4-bit", "gft", "q4", {"lora_rank": LORA_RANK}),
    "mlx-lm-lora-q4": ("mlx-lm-lora GRPO, LoRA over 4-bit", "mlx_lm_lora", "q4",
                       {"lora_rank": LORA_RANK, "lora_scale": LORA_ALPHA / LORA_RANK}),
}
VARIANT_DTYPE = {"bf16": "bfloat16", "q8": "float32", "q4": "float32"}
# mlx-lm-lora's GRPO differentiates its completions in chunks of as many as it has prompts
# per batch (grpo_trainer._grpo_microbatches, chunk = batch_size = 1 here): one sequence
# per forward/backward, gradients accumulated. Its row is set beside gft's plan for the
# same micro-batching.
PLAN_MICRO_BATCH = {"mlx-lm-lora-q4": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help="comma list of: " + ", ".join(ROWS))
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per row")
    p.add_argument("--reps", type=int, default=2, help="measured steps per row")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache", default=str(HERE / "cache"), help="models, OpenBLAS, logs")
    p.add_argument("--out", default=str(HERE / "MAC.md"), help="the results file")
    p.add_argument("--no-openblas", action="store_true", help="do not preload OpenBLAS")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    p.add_argument("--replan", action="store_true",
                   help="measure nothing: recompute the plan columns of --out's JSON with "
                        "this checkout's gft.plan and write --out again (the measured "
                        "figures and the run's record stay; the plan's commit is noted)")
    return p.parse_args(argv)


def prepare_variants(cache: Path) -> dict[str, Path]:
    """bf16 / q8 / q4 copies of SmolLM2-135M-Instruct, through `gft convert` (once); the
    quantized ones from the float32 model (see the docstring)."""
    from gft.convert import convert
    base = models.prepare("smollm2", cache)
    out = {"bf16": cache / "smollm2-bf16", "q8": cache / "smollm2-q8", "q4": cache / "smollm2-q4"}
    if not (out["bf16"] / "config.json").exists():
        convert(base, out["bf16"], dtype="bfloat16")
    for bits in (8, 4):
        if not (out[f"q{bits}"] / "config.json").exists():
            convert(base, out[f"q{bits}"], quantize=bits, group_size=64)
    return out


def plan_settings(preset: str, lora_rank: int, prompt_len: int, new_tokens: int, dtype: str,
                  micro_batch: int = workload.GROUP) -> dict:
    """The config keys a row sets beyond model and data, with max_prompt_tokens = the
    prompt's length: worker.job_gft's config and the `--dry-run` that prints its plan."""
    return {"preset": preset, "dtype": dtype, "lora_rank": lora_rank,
            "lora_alpha": LORA_ALPHA, "max_prompt_tokens": prompt_len,
            "max_response_tokens": new_tokens, "prompts_per_step": 1,
            "prompts_per_minibatch": 1, "micro_batch_size": micro_batch,
            "rollout_batch_size": workload.GROUP, "eval_samples": 1}


def gft_config(model: Path, preset: str, lora_rank: int, prompt_len: int, new_tokens: int,
               dtype: str, micro_batch: int = workload.GROUP):
    """The TrainConfig worker.job_gft runs (what `gft train --dry-run` would plan)."""
    from gft.config import build_config
    return build_config({}, {
        "model": str(model), "data": "unused", "backend": "mlx", "check_memory": False,
        **plan_settings(preset, lora_rank, prompt_len, new_tokens, dtype, micro_batch)})


def plan_of(model: Path, preset: str, lora_rank: int, prompt_len: int, new_tokens: int,
            dtype: str, micro_batch: int = workload.GROUP):
    from gft.plan import plan
    from gft.quant import read_config
    cfg = gft_config(model, preset, lora_rank, prompt_len, new_tokens, dtype, micro_batch)
    return plan(read_config(model), cfg, backend="mlx")


def dry_run_command(model: Path, preset: str, lora_rank: int, prompt_len: int,
                    new_tokens: int, dtype: str, micro_batch: int = workload.GROUP) -> str:
    """The `gft train --dry-run` that prints the same plan."""
    sets = plan_settings(preset, lora_rank, prompt_len, new_tokens, dtype, micro_batch)
    args = " ".join(f"--set {k}={v:g}" if isinstance(v, float) else f"--set {k}={v}"
                    for k, v in sets.items() if not (k == "lora_rank" and not v)
                    and not (k == "lora_alpha" and not lora_rank))
    where = Path(model).resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    return f"gft train --dry-run --backend mlx --model {where} --data DATA {args}"


def median(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps if not s["warmup"])


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def plan_fields(key: str, model: Path, prompt_len: int, new_tokens: int) -> dict:
    """The plan columns of a row: gft.plan for its config (see the docstring)."""
    _, job, variant, extra = ROWS[key]
    dtype, preset = VARIANT_DTYPE[variant], "gft" if job == "gft" else "grpo"
    mb = PLAN_MICRO_BATCH.get(key, workload.GROUP)
    p = plan_of(model, preset, extra.get("lora_rank", 0), prompt_len, new_tokens, dtype, mb)
    return {"plan_peak": p.peak, "plan_resident": sum(i.nbytes for i in p.resident),
            "plan_update": sum(i.nbytes for i in p.update),
            "plan_rollout": sum(i.nbytes for i in p.rollout),
            "plan_items": {i.name: i.nbytes for i in p.items},
            "dry_run": dry_run_command(model, preset, extra.get("lora_rank", 0), prompt_len,
                                       new_tokens, dtype, mb)}


def replan(out: Path, cache: Path) -> Path:
    """--replan: the stored rows with their plan columns made again."""
    data = json.loads(out.with_suffix(".json").read_text())
    variants = {"bf16": cache / "smollm2-bf16", "q8": cache / "smollm2-q8",
                "q4": cache / "smollm2-q4"}
    for r in data["rows"]:
        r.update(plan_fields(r["key"], variants[ROWS[r["key"]][2]], r["prompt_len"],
                             data["meta"]["max_new_tokens"]))
    data["meta"]["plan_commit"] = bench.versions()["gft"]
    out.write_text(render(data["rows"], data["failed"], data["meta"]))
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"[mac] re-planned {out}", flush=True)
    return out


def summarize(key: str, res: dict, model: Path, new_tokens: int) -> dict:
    """One row: times, both peaks, the plan and its items."""
    label, _, variant, _ = ROWS[key]
    steps = res["steps"]
    prompt_len = steps[0]["prompt_len"]
    return {"key": key, "label": label, "model": model.name, "dtype": VARIANT_DTYPE[variant],
            "prompt_len": prompt_len,
            "step_s": median(steps, "step_s"), "rollout_s": median(steps, "rollout_s"),
            "update_s": median(steps, "update_s"),
            "completion_tokens": [s["completion_lengths"] for s in steps if not s["warmup"]],
            "peak_rss": res["peak_rss_bytes"], "load_rss": res["info"].get("load_peak_rss"),
            "mlx_peak": res.get("mlx_peak_bytes"),
            "blas_gflops": res["info"].get("blas_gflops"),
            **plan_fields(key, model, prompt_len, new_tokens)}


def busy_note(m: dict) -> list[str]:
    """A line when other work shared the CPU (its times are then loose, not its memory)."""
    try:
        busiest = max(float(x) for x in f"{m['load_before']} {m['load_after']}".split())
    except (ValueError, TypeError):
        return []
    if busiest <= 0.5 * (m.get("cores") or 1):
        return []
    return [f"- Other jobs shared the {m['cores']} cores during this run (load average up to "
            f"{busiest:.1f}): the times compare loosely, the memory figures do not depend "
            "on it."]


def peak_for_time(rows: list[dict]) -> str:
    """What mlx-lm-lora's one-at-a-time differentiation bought, read from the measured
    rows: its MLX peak and step time against gft's row on the same 4-bit model."""
    by_key = {r["key"]: r for r in rows}
    theirs, ours = by_key.get("mlx-lm-lora-q4"), by_key.get("gft-lora-q4")
    if not (theirs and ours and theirs["mlx_peak"] and ours["mlx_peak"]):
        return ""
    return (f": measured, its MLX peak is {theirs['mlx_peak'] / ours['mlx_peak']:.2f}x and "
            f"its step {theirs['step_s'] / ours['step_s']:.2f}x gft's LoRA-over-4-bit row")


def render(rows: list[dict], failed: dict[str, str], meta: dict) -> str:
    """MAC.md: the table, the plans' items, the machine, versions and command."""
    lora = f"mlx-lm-lora {meta['versions'].get('mlx-lm-lora', '(version not recorded)')}"
    lines = ["# Fine-tuning on a Mac's budget: SmolLM2-135M-Instruct on MLX", "",
             "Written by `benchmarks/mac.py` (see its docstring and benchmarks/README.md); "
             "every figure below was measured in the run this file describes.", "",
             f"Workload: one prompt ({rows[0]['prompt_len'] if rows else '?'} tokens) x "
             f"{workload.GROUP} sequences per update, at most {meta['max_new_tokens']} new "
             f"tokens, LoRA rank {LORA_RANK} alpha {LORA_ALPHA:g} on every "
             f"attention and MLP projection, {meta['warmup']} warm-up + {meta['reps']} "
             "measured step(s) per row, each row in its own process. gft: preset `gft` "
             "(4 dataset responses + 4 rollouts); mlx-lm-lora: `train_grpo`, group 8 "
             "(8 rollouts), beta 0. Times are medians of the measured steps. The bfloat16 "
             "rows compute in bfloat16; the quantized rows (mlx-lm 8-bit and 4-bit, group "
             "size 64, quantized from the float32 model) compute in float32, because MLX's "
             "CPU backend runs a bfloat16 quantized matmul about 12x slower than a float32 "
             "one (see benchmarks/mac.py's docstring); on a Mac (Metal) they would run in "
             "bfloat16.", "",
             "| row | model | dtype | step s | rollout s | update s | peak RSS (after load) | "
             "MLX peak | plan | plan / MLX peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['plan_peak'] / r['mlx_peak']:.2f}" if r["mlx_peak"] else "—"
        lines.append(f"| {r['label']} | {r['model']} | {r['dtype']} | {r['step_s']:.1f} | "
                     f"{r['rollout_s']:.1f}"
                     f" | {r['update_s']:.1f} | {mib(r['peak_rss'])} ({mib(r['load_rss'])}) | "
                     f"{mib(r['mlx_peak'])} | {mib(r['plan_peak'])} | {ratio} |")
    for key, why in failed.items():
        lines.append(f"| {ROWS[key][0]} | not measured: {why} | | | | | | | | |")
    lines += ["", "The plan's items (`gft train --dry-run` prints these; the mlx-lm-lora row "
              "shows gft's plan for the same model and LoRA under the `grpo` preset with "
              f"micro_batch_size 1, because {lora}'s GRPO differentiates one "
              "completion at a time, accumulating gradients):", "",
              "| row | held for the run | update | rollouts | peak |",
              "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {mib(r['plan_resident'])} | {mib(r['plan_update'])} | "
                     f"{mib(r['plan_rollout'])} | {mib(r['plan_peak'])} |")
    m = meta["machine"]
    lines += ["", "Reading it:",
              "- **peak RSS** is the process's resident-set peak (`ru_maxrss`): the weights as "
              "loaded, the libraries (mlx, mlx-lm, transformers' tokenizer) and Python; in "
              "brackets its value right after loading. **MLX peak** is `mx.get_peak_memory()` "
              "over the process: every MLX array (weights, adapters, optimizer state, "
              "activations, KV cache), which is what a Mac's unified memory must hold and "
              "what the plan models.",
              "- The plan counts tensors only, for the longest sequences the config allows "
              "(prompt + max new tokens on every row). gft's rows run one micro-batch of 8 "
              f"sequences; {lora}'s GRPO differentiates one completion at a time "
              "(`_grpo_microbatches`, as many per chunk as prompts per batch: 1)"
              + peak_for_time(rows) + "; gft does the same with `micro_batch_size: 1`.",
              *busy_note(meta["machine"]), "",
              f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB, {m['os']}, "
              f"Python {m['python']}; load average before {m['load_before']}, after "
              f"{m['load_after']}. {meta['openblas']}.",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
              f"Date: {meta['date']}. Command: `{meta['command']}`."
              + (f" Plan columns recomputed at {meta['plan_commit']} "
                 "(`python benchmarks/mac.py --replan`; nothing re-measured)."
                 if meta.get("plan_commit") else ""), "",
              "The same plans, as `gft train --dry-run` prints them:", ""]
    lines += [f"- {r['label']}: `{r['dry_run']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    cache, out = Path(a.cache), Path(a.out)
    if a.replan:
        return replan(out, cache)
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    keys = list(ROWS) if a.rows == "all" else [k.strip() for k in a.rows.split(",")]
    for k in keys:
        if k not in ROWS:
            raise SystemExit(f"--rows: unknown '{k}' (choose from {', '.join(ROWS)})")
    variants = prepare_variants(cache)
    env, blas_note = (None, "OpenBLAS not preloaded (--no-openblas)") if a.no_openblas \
        else openblas_env(cache)
    machine = bench.machine("cpu")
    bench.warn_if_busy()
    rows, failed = [], {}
    argv_text = " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    meta = {"machine": machine, "versions": bench.versions(), "openblas": blas_note,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": f"python benchmarks/mac.py {argv_text}".strip(),
            "max_new_tokens": a.max_new_tokens, "warmup": a.warmup, "reps": a.reps}
    for key in keys:
        _, job, variant, extra = ROWS[key]
        args = {"model": str(variants[variant].resolve()), "warmup": a.warmup, "reps": a.reps,
                "device": "cpu", "dtype": VARIANT_DTYPE[variant],
                "max_new_tokens": a.max_new_tokens,
                **({"backend": "mlx", "preset": "gft"} if job == "gft" else {}), **extra}
        res = bench.run_job(job, args, f"mac-{key}", cache / "logs", a.timeout, env=env)
        if "error" in res:
            failed[key] = res["error"]
        else:
            rows.append(summarize(key, res, variants[variant], a.max_new_tokens))
            r = rows[-1]
            print(f"[mac] {r['label']}: step {r['step_s']:.1f}s, peak RSS {mib(r['peak_rss'])}, "
                  f"MLX peak {mib(r['mlx_peak'])}, plan {mib(r['plan_peak'])}", flush=True)
        machine["load_after"] = bench._load()  # written after every row: a cut run keeps its rows
        out.write_text(render(rows, failed, meta))
        out.with_suffix(".json").write_text(json.dumps({"rows": rows, "failed": failed,
                                                        "meta": meta}, indent=1) + "\n")
    print(f"[mac] wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
