"""Check gft.plan's memory plan against measured peaks, on both backends.

    python -m benchmarks.plan_check [--hidden 256 --layers 4 --vocab 8192 ...]

For one model shape (random weights, gft.tiny, written to a temporary directory) and each
setting (full fine-tune, LoRA, LoRA over an mlx-lm 8-bit and 4-bit copy, QLoRA on torch
when bitsandbytes runs), it loads the backend, then measures
- the update: one train_step on a micro-batch of B rows x L tokens (prompt P, response L-P);
- the rollouts: one generate of ROWS rows, P prompt tokens + (L-P) new tokens (forced: EOS
  masked by a huge negative bias is not available, so max_new_tokens and a model that rarely
  emits EOS; the plan is for the full length).
Measured: MLX's own allocator peak (mx.get_peak_memory, reset before each phase);
torch.cuda.max_memory_allocated on CUDA; torch on CPU has no allocator statistics, so each
phase runs in its own process, once unmeasured and then again, and the measure is the
tensors the backend holds (counted from its parameters, buffers, quantization state,
gradients and optimizer state) plus the resident set's growth during the second run,
under a fixed glibc mmap threshold so that freed tensors leave the resident set (Meter).
Every setting runs in processes of its own (apart). Printed beside the plan's peak for the
same phase, with their ratio. Nothing is asserted: this is the measurement the plan's
constants are checked against.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from gft.config import build_config
from gft.plan import GiB, plan
from gft.types import TokenBatch


def _rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
    raise KeyError(key)


def make_batch(rows: int, length: int, prompt: int, seed: int = 0) -> TokenBatch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 256, size=(rows, length))
    ids[:, :prompt] = ids[0, :prompt]  # one prompt per group, as GRPO's rows share it
    mask = np.zeros((rows, length), np.float32)
    mask[:, prompt:] = 1.0
    adv = np.linspace(-1, 1, rows).astype(np.float32)
    return TokenBatch(ids, np.ones((rows, length), bool), mask, adv,
                      n_tokens=float(mask.sum()), n_seqs=float(rows))


def held_bytes(be) -> float:
    """Bytes of the tensors a torch backend holds between phases, each storage once: the
    model's parameters and buffers (with bitsandbytes' 4-bit quantization state: absmax,
    code and the nested state of double quantization), their gradients, AdamW's state."""
    import torch
    storages: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()

    def add_quant_state(qs) -> None:
        if qs is None:
            return
        for name in ("absmax", "code", "offset"):
            add(getattr(qs, name, None))
        add_quant_state(getattr(qs, "state2", None))

    for t in [*be.model.parameters(), *be.model.buffers()]:
        add(t)
        add(t.grad)
        add_quant_state(getattr(t, "quant_state", None))
    for state in be.optimizer.state.values():
        for v in state.values():
            add(v)
    return float(sum(storages.values()))


class Meter:
    """Peak bytes of one phase, by the backend's own measure.

    torch on CPU has no allocator statistics. The phase runs once unmeasured (its code is
    paged in, its kernels and thread pools initialised, as in every later step of a run),
    then again: the peak is the tensors held before it (held_bytes, exact) plus the growth
    of the process's resident set during it (VmHWM, reset through /proc/self/clear_refs,
    minus VmRSS at its start). apart() runs these processes with glibc's mmap threshold
    fixed (MALLOC_MMAP_THRESHOLD_), so every tensor above 128 KiB is mapped when made and
    unmapped when freed: the resident set then follows the live tensors instead of memory
    glibc kept from the first run."""

    def __init__(self, backend: str):
        self.backend = backend
        self.cuda = False
        if backend == "torch":
            import torch
            self.cuda = torch.cuda.is_available()
        self.held = self.rss0 = 0.0

    def start(self, be=None) -> None:
        if self.backend == "mlx":
            import mlx.core as mx
            mx.clear_cache()
            mx.reset_peak_memory()
        elif self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()
        else:
            self.held = held_bytes(be)
            _rss_reset()
            self.rss0 = _status("VmRSS")

    def peak(self) -> float:
        if self.backend == "mlx":
            import mlx.core as mx
            return float(mx.get_peak_memory())
        if self.cuda:
            import torch
            return float(torch.cuda.max_memory_allocated())
        return self.held + _status("VmHWM") - self.rss0


def measure(backend: str, model: Path, cfg, rows: int, prompt: int, length: int,
            phases=("update", "rollout")) -> dict:
    from backends import SamplingConfig, available_memory, load_backend
    from gft.lora import lora_from_train_config
    from gft.quant import read_config
    meter = Meter(backend)
    be = load_backend(backend, str(model), dtype=cfg.dtype, lora=lora_from_train_config(cfg),
                      load_in_4bit=cfg.load_in_4bit)
    out = {}
    if "update" in phases:  # the first step allocates the AdamW moments; measure the second
        be.train_step([make_batch(cfg.micro_batch_size, length, prompt, 1)], 1e-4, tau=0.1,
                      aggregation="token-mean")
        meter.start(be)
        be.train_step([make_batch(cfg.micro_batch_size, length, prompt)], 1e-4, tau=0.1,
                      aggregation="token-mean")
        out["update"] = meter.peak()
    if "rollout" in phases:
        prompts = [list(range(3, 3 + prompt))] * rows
        sampling = SamplingConfig(max_new_tokens=length - prompt, batch_size=rows)
        if backend == "torch" and not meter.cuda:  # see Meter: the measured run is the second
            be.generate(prompts, sampling, 1)
        meter.start(be)
        be.generate(prompts, sampling, 0)
        out["rollout"] = meter.peak()
    # the device named as gft.preflight.memory_plan names it (the plan shares a prompt on torch's
    # CPU only): the backend's own answer for the device measured on
    _, device = available_memory(backend, "cuda" if meter.cuda else "auto")
    p = plan(read_config(model), cfg, backend=backend, device=device)
    resident = sum(i.nbytes for i in p.resident)
    # a rollout-only process never made the update: no gradients or moments exist yet
    state = sum(i.nbytes for i in p.resident if i.name in ("gradients", "AdamW moments"))
    out["plan_update"] = resident + sum(i.nbytes for i in p.update)
    out["plan_rollout"] = resident + sum(i.nbytes for i in p.rollout) - (
        state if "update" not in phases else 0)
    return out


def apart(name: str, argv: list[str], phases: tuple[str, ...]) -> dict:
    """A setting measured in processes of its own: one per phase in `phases`, or one for
    both phases when phases is ("update+rollout",). MLX's and CUDA's peaks are absolute (every
    live array counts), so a setting measured after another in one process would count
    whatever the earlier one left alive (a backend's arrays freed only by the garbage
    collector's cycle pass: the 4-bit rollout once read 8 MiB high for it); torch on CPU
    needs one process per phase (see the docstring)."""
    import subprocess
    import sys
    out = {}
    for phase in phases:
        done = subprocess.run([sys.executable, "-m", "benchmarks.plan_check", *argv,
                               "--only", name, "--phase", phase, "--emit"],
                              capture_output=True, text=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
            raise RuntimeError(tail[-1])
        out.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


SETTINGS = {  # name: (backend, config overrides, quantize bits)
    "mlx full": ("mlx", {}, None),
    "mlx lora": ("mlx", {"lora_rank": 8}, None),
    "mlx lora 8-bit": ("mlx", {"lora_rank": 8}, 8),
    "mlx lora 4-bit": ("mlx", {"lora_rank": 8}, 4),
    "torch full": ("torch", {}, None),
    "torch lora": ("torch", {"lora_rank": 8}, None),
    "torch qlora nf4": ("torch", {"lora_rank": 8, "load_in_4bit": True}, None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16, help="rollout rows")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--length", type=int, default=192)
    ap.add_argument("--only", nargs="*", help="settings to run (default: all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--phase", choices=["update", "rollout", "update+rollout"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import sys
    argv = [a for a in sys.argv[1:] if a not in ("--emit",)]
    shape_args = argv[:argv.index("--only")] if "--only" in argv else argv
    if "--json" in shape_args:  # the subprocesses write nothing
        i = shape_args.index("--json")
        shape_args = shape_args[:i] + shape_args[i + 2:]
    from gft.tiny import TinyModelSpec, write_tiny_model
    root = Path(tempfile.mkdtemp(prefix="gft-plan-"))
    spec = TinyModelSpec(arch="llama", hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.kv_heads,
                         intermediate_size=args.intermediate, vocab_size=args.vocab,
                         max_position_embeddings=max(512, args.length))
    base = write_tiny_model(root / "base", spec)
    cfg = build_config({}, {"model": str(base), "data": "unused", "max_prompt_tokens": args.prompt,
                            "max_response_tokens": args.length - args.prompt,
                            "micro_batch_size": args.micro_batch, "rollout_batch_size": args.rows,
                            # what the rollout phase measures: ROWS rollouts of one prompt
                            # (GRPO's group), no held-out evaluation
                            "prompts_per_step": 1, "prompts_per_minibatch": 1,
                            "num_rollouts": args.rows,
                            "eval_samples": 0, "check_memory": False})
    results = {}
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; update "
          f"{args.micro_batch} x {args.length} tokens, rollouts {args.rows} x {args.length}")
    print(f"{'setting':<18}{'phase':<9}{'measured':>12}{'plan':>12}{'plan/measured':>15}")
    for name, (backend, over, bits) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        model = base
        if bits:
            from gft.convert import convert
            model = root / f"q{bits}"
            if not model.exists():
                convert(base, model, quantize=bits, group_size=64)
        try:
            if args.emit:  # one setting (and phase), for apart()
                phases = tuple(args.phase.split("+"))
                r = measure(backend, model, replace(cfg, **over), args.rows, args.prompt,
                            args.length, phases=phases)
                keep = {*phases, *(f"plan_{p}" for p in phases)}
                print(json.dumps({k: v for k, v in r.items() if k in keep}))
                return
            import torch
            cpu = backend == "torch" and not torch.cuda.is_available()
            r = apart(name, shape_args, ("update", "rollout") if cpu else ("update+rollout",))
        except Exception as e:  # noqa: BLE001 - a setting that cannot run here is reported
            print(f"{name:<18}not measured: {str(e).splitlines()[0][:90]}")
            continue
        results[name] = r
        for phase in ("update", "rollout"):
            m, p = r[phase], r[f"plan_{phase}"]
            print(f"{name:<18}{phase:<9}{m / 2**20:>9.1f} MiB{p / 2**20:>9.1f} MiB{p / m:>15.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
