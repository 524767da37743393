"""The hardware floor: what a step would cost at the machine's measured limits.

Measured (in its own subprocess, same run, same machine):
- the large matrix-product rate, GFLOP/s: C = A @ B in the compute dtype, into a
  preallocated C;
- the memory-copy bandwidth, GB/s: dst.copy_(src) of a large tensor, counted as bytes
  read + bytes written.

Modelled (from the model's shapes and the tokens each trainer actually processed):
- update: forward + backward ≈ 6 x parameters x tokens FLOPs (2 forward, 4 backward;
  the tied embedding counted once, as the lm_head matrix it also is), over the matmul
  rate; a prompt that all of a step's sequences share counts once. Attention's own FLOPs (≈ 12·layers·hidden·context per token) are added too;
  at 100-token sequences they are ~1% of the total.
- rollout: a prefill of each distinct prompt (2 x parameters x prompt tokens FLOPs; rows
  that repeat a prompt share its KV cache, as a prefix-caching engine does, so GRPO's
  G copies of one prompt cost one prefill), then one decode step per
  generated position; step t costs at least max(bytes_t / bandwidth, flops_t / rate),
  where bytes_t = every weight read once + the KV cache of the rows still running
  (2·layers·kv_heads·head_dim·dtype bytes per cached position) and
  flops_t = 2 x parameters x rows running.
"""
from __future__ import annotations

import json
import statistics
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "float32": 4, "bfloat16": 2}


@dataclass
class ModelShape:
    params: int          # parameters (a tied embedding counted once)
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def model_shape(model_dir: Path) -> ModelShape:
    """Parameter count from the safetensors headers (no framework needed) + config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    params = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                size = 1
                for d in meta["shape"]:
                    size *= d
                params += size
    heads = cfg["num_attention_heads"]
    return ModelShape(params=params, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                      kv_heads=cfg.get("num_key_value_heads", heads),
                      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                      vocab=cfg["vocab_size"])


def update_floor_s(shape: ModelShape, seq_lengths: list[int], matmul_flops: float,
                   shared_prompt: int = 0) -> float:
    """Seconds for forward + backward over sequences of these lengths at the matmul rate.

    shared_prompt: leading tokens all the sequences have in common (one prompt's group),
    which a trainer needs to run only once (gft does: TorchBackend._prefix_shared_logits):
    counted once, in the weights' FLOPs and in their own attention."""
    rows = len(seq_lengths)
    p = min([shared_prompt, *seq_lengths]) if rows > 1 else 0
    tokens = sum(seq_lengths) - (rows - 1) * p
    per_pos = 12 * shape.layers * shape.hidden / 2
    attention = sum(per_pos * (n * n - p * p) for n in seq_lengths) + per_pos * p * p
    return (6 * shape.params * tokens + attention) / matmul_flops


def rollout_floor_s(shape: ModelShape, prompt_len: int, completion_lengths: list[int],
                    matmul_flops: float, bandwidth: float, dtype_bytes: int = 4,
                    distinct_prompts: int | None = None) -> float:
    """Seconds for prefill + a batched decode of these completions at the measured limits.

    distinct_prompts: how many different prompts the rows come from (None: every row its
    own); each is prefilled once. Decode step t runs the rows whose completion is longer
    than t; rows share one read of the weights per step, each reads its own KV cache
    (prompt + t positions)."""
    rows = len(completion_lengths)
    if rows == 0:
        return 0.0
    prefills = rows if distinct_prompts is None else min(distinct_prompts, rows)
    total = 2 * shape.params * prompt_len * prefills / matmul_flops
    weights = shape.params * dtype_bytes
    kv = shape.kv_bytes_per_position(dtype_bytes)
    for t in range(1, max(completion_lengths)):
        live = sum(1 for n in completion_lengths if n > t)
        step_bytes = weights + live * kv * (prompt_len + t)
        step_flops = 2 * shape.params * live
        total += max(step_bytes / bandwidth, step_flops / matmul_flops)
    return total


# --------------------------------------------------------------------------- measuring

def matmul_shapes(device_type: str, quick: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of the timed products: a large square one and lm_head's shape."""
    if quick:
        return [(512, 512, 512)]
    if device_type == "cuda":
        return [(8192, 8192, 8192), (8192, 576, 49152)]
    return [(2048, 2048, 2048), (1024, 576, 49152)]


def _torch_on(device: str, dtype: str):
    """(torch, device, dtype, sync): what every timing here needs."""
    import torch
    dev = torch.device(device)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    return torch, dev, dt, sync


def _timed(fn, n: int, sync, warm_s: float = 0.0) -> list[float]:
    """Seconds of `n` runs of fn (device work waited for), after unmeasured runs for at
    least `warm_s` seconds (at least one). Why the warm-up: on this CPU a fresh process's
    2048^3 product speeds up over its first seconds (blocks of 8 read 294, 300, 324, 329,
    329 GFLOP/s in a row), so five runs right after one unmeasured run under-read the rate
    the trainers then get (the re-timing in each trainer's process read 10-20% higher in
    every earlier run), making the floor lenient."""
    t_end = time.perf_counter() + warm_s
    while True:
        fn()
        sync()
        if time.perf_counter() >= t_end:
            break
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _product(torch, dev, dt, m: int, k: int, n: int):
    """C = A @ B into one preallocated C: the product's own rate (into a fresh C each call
    it read 4-9% lower here, in alternating blocks in one process)."""
    a = torch.randn(m, k, device=dev, dtype=dt)
    b = torch.randn(k, n, device=dev, dtype=dt)
    c = torch.empty(m, n, device=dev, dtype=dt)
    return lambda: torch.mm(a, b, out=c)


WARM_S = 3.0
"""Seconds of unmeasured products before each timed matmul shape (not with --quick)."""


def measure_matmul(device: str = "cpu", dtype: str = "float32", quick: bool = False,
                   reps: int = 5) -> float:
    """The square product's rate alone (GFLOP/s, median of `reps`), as `measure` times it."""
    torch, dev, dt, sync = _torch_on(device, dtype)
    return _product_rates(torch, dev, dt, sync, matmul_shapes(dev.type, quick)[0], reps,
                          quick)["gflops_median"]


def _product_rates(torch, dev, dt, sync, shape: tuple[int, int, int], reps: int,
                   quick: bool) -> dict:
    """One shape's product rate, median and best of `reps` (GFLOP/s), after the warm-up."""
    m, k, n = shape
    times = _timed(_product(torch, dev, dt, m, k, n), reps, sync, 0.0 if quick else WARM_S)
    return {"gflops_median": 2 * m * k * n / statistics.median(times) / 1e9,
            "gflops_best": 2 * m * k * n / min(times) / 1e9}


def measure(device: str = "cpu", dtype: str = "float32", quick: bool = False,
            reps: int = 5) -> dict:
    """Matmul rates and copy bandwidth with torch, medians over `reps` timed runs."""
    torch, dev, dt, sync = _torch_on(device, dtype)
    matmul = {"x".join(map(str, shape)): _product_rates(torch, dev, dt, sync, shape, reps, quick)
              for shape in matmul_shapes(dev.type, quick)}  # each shape's tensors freed after
    size = (64 << 20) if quick else (1 << 30)
    src = torch.empty(size // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), reps, sync)
    src = dst = None
    best = max(matmul.values(), key=lambda r: r["gflops_median"])
    return {"matmul": matmul, "matmul_gflops": best["gflops_median"],
            "copy_bytes": size, "bandwidth_gbs": 2 * size / statistics.median(times) / 1e9,
            "bandwidth_gbs_best": 2 * size / min(times) / 1e9,
            "threads": torch.get_num_threads(), "device": device, "dtype": dtype}


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
