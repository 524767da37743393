"""Benchmark gft against TRL and mlx-lm-lora, and against the hardware floor, in one run.

    python benchmarks/bench.py --model smollm2,tiny --reps 3  # the measurement (minutes)
    python benchmarks/bench.py --model tiny --reps 1 --quick  # a smoke run (seconds)

Every job runs in its own subprocess (benchmarks/worker.py), one after another, so its
peak RSS is its own and no two jobs share the CPU. Results go to OUT/results.json (one
entry per model / device / dtype, replaced when re-run), OUT/RESULTS.md (rendered from
all entries) and OUT/results-<model>-<device>-<dtype>.png. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import models, report, workload  # noqa: E402
from benchmarks.floor import DTYPE_BYTES, model_shape  # noqa: E402
from benchmarks.openblas import openblas_env  # noqa: E402

HERE = Path(__file__).resolve().parent
# key -> (worker job, its arguments, the module it needs, the pip name to suggest)
TRAINERS = {
    "gft-torch:grpo": ("gft", {"backend": "torch", "preset": "grpo"}, "torch", "gft[torch]"),
    "gft-torch:gft": ("gft", {"backend": "torch", "preset": "gft"}, "torch", "gft[torch]"),
    # the same, rollouts sampled from a bfloat16 copy of the weights (rollout_engine)
    "gft-torch-bf16roll:grpo": ("gft", {"backend": "torch", "preset": "grpo",
                                        "rollout_engine": "bfloat16"}, "torch", "gft[torch]"),
    # the same, decoding eagerly: what rollout_graphs (on by default on CUDA) saves there
    "gft-torch-eager:grpo": ("gft", {"backend": "torch", "preset": "grpo",
                                     "rollout_graphs": "off"}, "torch", "gft[torch]"),
    # the update as a GPU runs it (padded rows: neither the packed row nor the shared-prefix
    # forward, TorchBackend._pack / _share_prefix), for --count-ops on the CPU; left out
    # of the default rows
    "gft-torch-noshare:grpo": ("gft", {"backend": "torch", "preset": "grpo",
                                       "share_prefix": False}, "torch", "gft[torch]"),
    # 4 dataset responses of varied length (workload.mixed_responses) + 4 rollouts
    "gft-torch-mixed:gft": ("gft", {"backend": "torch", "preset": "gft", "mixed": True},
                            "torch", "gft[torch]"),
    # the same, micro-batches capped at 3 full-length rows' tokens (micro_batch_tokens): the
    # 3 short responses together, the 5 full-length ones 3 + 2
    "gft-torch-mixed-tokens:gft": ("gft", {"backend": "torch", "preset": "gft", "mixed": True,
                                           "budget_rows": 3}, "torch", "gft[torch]"),
    "gft-mlx:grpo": ("gft", {"backend": "mlx", "preset": "grpo"}, "mlx", "gft[mlx]"),
    "gft-mlx:gft": ("gft", {"backend": "mlx", "preset": "gft"}, "mlx", "gft[mlx]"),
    "trl:grpo": ("trl", {}, "trl", "trl"),
    "mlx-lm-lora:grpo": ("mlx_lm_lora", {}, "mlx_lm_lora", "mlx-lm-lora"),
}
MLX_JOBS = {"gft-mlx:grpo", "gft-mlx:gft", "mlx-lm-lora:grpo"}
VERSIONED = ["torch", "transformers", "trl", "accelerate", "mlx", "mlx-lm", "mlx-lm-lora",
             "numpy", "matplotlib"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 | smollm2-shape (its shape and tokenizer, random weights) | "
                        "tiny | a model directory; a comma list runs each in turn")
    p.add_argument("--reps", type=int, default=3, help="measured steps per trainer")
    p.add_argument("--warmup", type=int, default=2,
                   help="unmeasured steps before them (two: see benchmarks/README.md)")
    p.add_argument("--trainers", default="all",
                   help="comma list of: " + ", ".join(TRAINERS) + ", sampler; or a prefix "
                        "such as gft-torch, trl; default all")
    p.add_argument("--device", default="cpu", help="cpu | cuda (torch jobs; mlx picks its own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-new-tokens", type=int, default=workload.MAX_NEW_TOKENS)
    p.add_argument("--out", default=str(HERE), help="where RESULTS.md, results.json, the PNG go")
    p.add_argument("--cache", default=str(HERE / "cache"), help="models, OpenBLAS, logs")
    p.add_argument("--quick", action="store_true", help="small floor measurement (smoke tests)")
    p.add_argument("--no-openblas", action="store_true", help="do not preload OpenBLAS for mlx")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    p.add_argument("--section", default="",
                   help="a name that keeps this run's section apart from others of the same "
                        "model / device / dtype / workload in RESULTS.md")
    p.add_argument("--note", action="append", default=[],
                   help="a line for this run's notes in RESULTS.md (e.g. what else ran)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="torch trainers train on the same fixed completions (random bytes, "
                        "--max-new-tokens each) instead of sampling: the update alone, on "
                        "the same tokens for gft and TRL")
    p.add_argument("--count-ops", action="store_true",
                   help="count the aten operators each update dispatches (a TorchDispatchMode; "
                        "slows the torch jobs, so the run gets a section of its own)")
    return p.parse_args(argv)


def selected(spec: str) -> list[str]:
    keys = list(TRAINERS) + ["sampler"]
    if spec == "all":
        return keys
    out = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [k for k in keys if k == part or k.split(":")[0] == part]
        if not hits:
            raise SystemExit(f"--trainers: unknown '{part}' (choose from {', '.join(keys)})")
        out += [h for h in hits if h not in out]
    return out


def without_repeats(keys: list[str], device: str, dtype: str) -> list[str]:
    """The default selection less the rows that would repeat another row's work here."""
    same = {"gft-torch-eager:grpo"} if device == "cpu" else set()  # graphs are CUDA's
    same.add("gft-torch-noshare:grpo")  # GPUs do this already; on the CPU for --count-ops
    if dtype == "bfloat16":
        same.add("gft-torch-bf16roll:grpo")  # the policy is bfloat16 already
    return [k for k in keys if k not in same]


def run_job(job: str, args: dict, label: str, logs: Path, timeout: float,
            env: dict | None = None) -> dict:
    """Run one worker; its result dict, or {'error': the last line it printed}."""
    out = logs / f"{label.replace(':', '-')}.json"
    log = logs / f"{label.replace(':', '-')}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "worker.py"), job, json.dumps({**args, "label": label}),
           str(out)]
    t0 = time.perf_counter()
    print(f"[bench] {label} ...", flush=True)
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, **(env or {})}, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    took = time.perf_counter() - t0
    if code == 0 and out.exists():
        print(f"[bench] {label} done in {took:.0f}s", flush=True)
        return json.loads(out.read_text())
    tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    why = (f"timed out after {timeout:.0f}s" if code == "timeout"
           else tail[-1] if tail else f"exit {code}")
    print(f"[bench] {label} FAILED ({why}); log: {log}", flush=True)
    return {"error": why[:300]}


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    elif sys.platform == "darwin":
        got = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                             text=True)
        cpu = got.stdout.strip() or cpu
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    gpu = None
    if device.startswith("cuda"):
        got = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)
        ok = got.returncode == 0 and got.stdout.strip()
        gpu = got.stdout.strip().splitlines()[0] if ok else "cuda"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "gpu": gpu,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "load_before": _load(), "load_after": None}


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    out["gft"] = (got.stdout.strip() or "?") + ("+dirty" if dirty else "")
    return out


def warn_if_busy() -> None:
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"[bench] warning: load average {busy:.1f} on {os.cpu_count()} cores: other "
              "processes are running and the timings will not be trustworthy", flush=True)


def new_run(a: argparse.Namespace, argv: list[str] | None, model: str, model_dir: Path,
            params: int) -> dict:
    """The run record: what was measured, where, with what, and by which command."""
    argv_text = " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    notes = []
    if model == "smollm2-shape":
        notes.append("smollm2-shape: SmolLM2-135M-Instruct's config and tokenizer with random "
                     "weights (benchmarks/models.py), so every completion runs to the cap")
    return {"model": model if model in models.NAMED else model_dir.name,
            "device": a.device, "dtype": a.dtype,
            "command": f"python benchmarks/bench.py {argv_text}".strip(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(a.device), "versions": versions(), "group": workload.GROUP,
            "max_new_tokens": a.max_new_tokens, "warmup": a.warmup, "reps": a.reps,
            "params": params, "rows": {}, "notes": notes}


def settle_floor_rate(floor: dict, retimed: list[float | None]) -> None:
    """The floor's matrix-product rate: the highest of the floor job's and the torch jobs'
    re-timings of the same product (each in its own process, right after its steps).

    The floor job runs first, in a fresh process, and has read 10-20% below the
    re-timings in every earlier run (e.g. 285 against 332-365 GFLOP/s): a floor from it
    alone would be that much too lenient. The highest rate is what this machine was
    shown to do in this run, so every row's update is set against it."""
    floor.setdefault("job_gflops", floor["matmul_gflops"])
    floor["retimed_gflops"] = [r for r in retimed if r is not None]
    floor["matmul_gflops"] = max([floor["job_gflops"], *floor["retimed_gflops"]])


def run_trainers(run: dict, keys: list[str], common: dict, shape, a: argparse.Namespace,
                 logs: Path) -> None:
    """Each selected trainer in its own process; a row (or the reason it has none) each."""
    mlx_env = None
    if any(k in MLX_JOBS for k in keys) and not a.no_openblas:
        mlx_env, note = openblas_env(Path(a.cache))
        run["notes"].append(note)
    raw: dict[str, dict] = {}
    for key in (k for k in keys if k in TRAINERS):
        job, extra, module, pip_name = TRAINERS[key]
        if importlib.util.find_spec(module) is None:
            run["rows"][key] = {"error": f"{module} not installed (pip install {pip_name})"}
            continue
        res = run_job(job, {**common, **extra}, key, logs, a.timeout,
                      env=mlx_env if key in MLX_JOBS else None)
        if "error" in res:
            run["rows"][key] = res
            continue
        raw[key] = res
        run["rows"][key] = {}  # its place in the table; the row is made below
    settle_floor_rate(run["floor"], [r["info"].get("torch_gflops_after") for r in raw.values()])
    for key, res in raw.items():
        # a bfloat16 rollout engine reads 2-byte weights: its floor is that much lower
        weight_bytes = 2 if "bf16roll" in key else DTYPE_BYTES[a.dtype]
        summary = report.summarize(res, shape, run["floor"], weight_bytes, a.fixed_batch)
        run["rows"][key] = {"summary": summary, "steps": res["steps"]}
        run.setdefault("prompt_len", res["steps"][0]["prompt_len"])
        if summary["info"].get("blas_gflops") is not None:
            run["notes"].append(f"{key}: mlx matmul rate in that process "
                                f"{summary['info']['blas_gflops']:.0f} GFLOP/s")
        if summary["info"].get("rollout_graphs"):
            run["notes"].append(f"{key}: rollout_graphs {summary['info']['rollout_graphs']}; its "
                                f"first (warm-up) step took {summary['info']['first_step_s']:.1f} s, "
                                "compiling included")
        if summary["info"].get("torch_gflops_after") is not None:
            run["notes"].append(f"{key}: the floor's matmul rate again, in that process after "
                                f"its steps: {summary['info']['torch_gflops_after']:.0f} GFLOP/s "
                                f"(the floor uses {run['floor']['matmul_gflops']:.0f})")
    run.setdefault("prompt_len", "?")


def run_sampler(run: dict, common: dict, a: argparse.Namespace, logs: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        run["notes"].append("sampler comparison skipped: torch not installed")
        return
    sm = run_job("sampler", common, "sampler", logs, a.timeout)
    if "error" in sm:
        run["notes"].append(f"sampler comparison failed: {sm['error']}")
    else:
        run["sampler"] = sm


def save(run: dict, out: Path) -> Path:
    """Chart, then results.json (this run's entry replaced) and RESULTS.md from all runs."""
    key = f"{run['model']}-{run['device']}-{run['dtype']}"
    if run["max_new_tokens"] != workload.MAX_NEW_TOKENS:  # another workload: its own section
        key += f"-{run['max_new_tokens']}tok"
    if run.get("fixed_batch"):
        key += "-fixed"
    if run.get("section"):
        key += f"-{run['section']}"
    if run.get("count_ops"):
        key += "-ops"
    png = out / f"results-{key}.png"
    if not any("summary" in r for r in run["rows"].values()):
        pass  # no trainer rows (a sampler-only run, say): nothing to chart
    elif report.chart(png, run):
        run["chart"] = png.name
    else:
        run["notes"].append("no chart: pip install matplotlib")
    store = out / "results.json"
    runs = json.loads(store.read_text())["runs"] if store.exists() else {}
    runs[key] = run
    store.write_text(json.dumps({"runs": runs}, indent=1))
    report.write_results(out / "RESULTS.md", runs)
    return out / "RESULTS.md"


def bench_model(a: argparse.Namespace, argv: list[str] | None, model: str) -> Path:
    """Every selected job on one model; its section of RESULTS.md."""
    out, cache = Path(a.out), Path(a.cache)
    logs = cache / "logs"
    model_dir = models.prepare(model, cache).resolve()
    shape = model_shape(model_dir)
    keys = selected(a.trainers)
    run = new_run(a, argv, model, model_dir, shape.params)
    if a.device != "cpu" and a.trainers == "all":  # mlx never runs on CUDA: its CPU rows
        keys = [k for k in keys if k not in MLX_JOBS]  # do not belong in a GPU section
        run["notes"].append(f"mlx rows skipped on --device {a.device} (mlx runs on Apple "
                            "silicon or CPU; name them in --trainers to run them anyway)")
    if a.trainers == "all":
        keys = without_repeats(keys, a.device, a.dtype)
    common = {"model": str(model_dir), "warmup": a.warmup, "reps": a.reps, "device": a.device,
              "dtype": a.dtype, "max_new_tokens": a.max_new_tokens, "count_ops": a.count_ops,
              "fixed_batch": a.fixed_batch}
    run["notes"] += a.note
    if a.section:
        run["section"] = a.section
    if a.fixed_batch:
        run["fixed_batch"] = True
        run["notes"].append("--fixed-batch: no sampling; every torch trainer trained on the "
                            "same fixed completions (random byte ids, the full length each), "
                            "so the rollout columns are empty and the update is the measure")
    if a.count_ops:
        run["count_ops"] = True
        run["notes"].append("--count-ops: every torch op of the updates went through a Python "
                            "dispatch mode that counted it, so this run's times are slowed "
                            "and only its operator counts are measurements")
    floor = run_job("floor", {"device": a.device, "dtype": a.dtype, "quick": a.quick},
                    "floor", logs, a.timeout)
    if "error" in floor:
        raise SystemExit(f"the floor measurement failed: {floor['error']}")
    run["floor"] = floor
    run_trainers(run, keys, common, shape, a, logs)
    if "sampler" in keys:
        run_sampler(run, common, a, logs)
    run["machine"]["load_after"] = _load()
    path = save(run, out)
    print(f"[bench] {model}: wrote {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.cache) / "logs").mkdir(parents=True, exist_ok=True)
    warn_if_busy()
    path = Path(a.out) / "RESULTS.md"
    for model in (m.strip() for m in a.model.split(",") if m.strip()):
        path = bench_model(a, argv, model)
    return path


if __name__ == "__main__":
    main()
