"""One benchmark job in its own process, so that its peak RSS is its own.

    python benchmarks/worker.py JOB '{"model": ..., "reps": ..., ...}' OUT.json

JOB is floor | gft | trl | mlx_lm_lora | sampler. Every trainer job runs `warmup + reps`
steps of benchmarks/workload.py's workload and records, per step: wall time, rollout
time, update time, completion lengths, the prompt length and the tokens the update
processed. The first `warmup` steps are kept in the file but flagged, and left out of
the statistics.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import workload as W  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> None:
    """Linux: restart the process's resident-set high-water mark (VmHWM) from the current
    RSS (`echo 5 > /proc/self/clear_refs`), so that a later update_peak_rss() is the peak
    of what ran in between. ru_maxrss cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def update_peak_rss() -> int | None:
    """VmHWM in bytes since the last reset_peak_rss() (None where /proc is not Linux's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class OpCounter:
    """Counts the aten operators dispatched while active (a TorchDispatchMode: every op of
    the forward, the backward, clipping and the optimizer step, as the device would see
    them). Made lazily so that the mlx jobs need no torch."""

    def __new__(cls):
        from collections import Counter
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.counts = Counter()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.counts[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))
        return _Mode()


def fixed_completions(a: dict) -> list[list[int]]:
    """--fixed-batch: the completions every trainer trains on instead of sampling, GROUP
    rows of exactly n_new(a) ids, random bytes (ids 0-255, which every tokenizer of these
    models spells, so rewards and advantages vary) from one seed: the same tokens for gft
    and TRL, and the update alone is measured (no rollout to wait for)."""
    import numpy as np
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(W.GROUP, n_new(a))).tolist()


def n_new(a: dict) -> int:
    """The completion length cap of this run (workload.MAX_NEW_TOKENS unless overridden)."""
    return a.get("max_new_tokens", W.MAX_NEW_TOKENS)


def _quiet() -> None:
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# --------------------------------------------------------------------------- floor

def job_floor(a: dict) -> dict:
    from benchmarks.floor import measure
    return measure(a.get("device", "cpu"), a.get("dtype", "float32"), quick=a.get("quick", False))


# --------------------------------------------------------------------------- gft

def job_gft(a: dict) -> dict:
    """gft's own loop (gft.loop.train_step) on the torch or mlx backend."""
    _quiet()
    from rich.console import Console
    import backends  # noqa: F401  (registers the provider open_backend loads through)
    from gft.config import build_config
    from gft.loop import train_step
    from gft.rewards import build_rewards
    from gft.run import load_data, open_backend

    tmp = Path(tempfile.mkdtemp(prefix="gft-bench-"))
    row = W.gft_row(mixed=a.get("mixed", False))
    (tmp / "train.jsonl").write_text(json.dumps(row) + "\n")
    cfg = build_config({
        "model": a["model"], "data": str(tmp / "train.jsonl"), "backend": a["backend"],
        "preset": a["preset"], "device": a.get("device", "auto"),
        "dtype": a.get("dtype", "float32"),
        "rollout_engine": a.get("rollout_engine", "policy"),
        "rollout_graphs": a.get("rollout_graphs", "auto"),
        "max_response_tokens": n_new(a), "prompts_per_step": 1, "prompts_per_minibatch": 1,
        "micro_batch_size": W.GROUP, "rollout_batch_size": W.GROUP, "rewards": [W.REWARD_SPEC],
        "learning_rate": W.LEARNING_RATE, "skip_zero_advantage": False, "progress": False,
        "max_prompt_tokens": 4096, "eval_samples": 1, "seed": 0,
        "lora_rank": a.get("lora_rank", 0), "check_memory": False})
    backend = open_backend(cfg, cfg.model)
    if a.get("share_prefix") is False:  # the GPU's update path, on the CPU (--count-ops):
        backend._share_prefix = backend._pack = False  # padded rows, one forward
    data, _ = load_data(cfg, backend.tokenizer, Console(quiet=True))
    if a.get("budget_rows"):  # micro_batch_tokens: that many full-length rows' tokens
        cfg.micro_batch_tokens = a["budget_rows"] * (len(data.prompt_ids[0]) + n_new(a))
    scorer = build_rewards(cfg.rewards)
    load_rss = peak_rss_bytes()
    rec: dict = {}
    generate, update = backend.generate, backend.train_step

    def timed_generate(prompts, sampling, seed):
        out = fixed_completions(a)[:len(prompts)] if a.get("fixed_batch") \
            else generate(prompts, sampling, seed)
        rec["completion_lengths"] = [len(o) for o in out]
        return out

    def counted_update(batches, lr, **kw):
        rec["seq_lengths"] = rec.get("seq_lengths", []) + [
            int(n) for b in batches for n in b.attention.sum(axis=1)]
        rec["padded_tokens"] = rec.get("padded_tokens", 0) + sum(
            int(b.input_ids.size) for b in batches)
        reset_peak_rss()
        if a.get("count_ops"):
            with OpCounter() as ops:
                out = update(batches, lr, **kw)
            rec["ops"] = dict(ops.counts)
        else:
            out = update(batches, lr, **kw)
        rec["update_peak_rss"] = update_peak_rss()
        rec["loss"] = out.get("loss")
        return out

    backend.generate, backend.train_step = timed_generate, counted_update
    steps = []
    for i in range(a["warmup"] + a["reps"]):
        rec.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        m = train_step(cfg, backend, data, [0], scorer, i, lambda _: cfg.learning_rate)
        wall = time.perf_counter() - t0
        steps.append({"warmup": i < a["warmup"], "step_s": wall,
                      "cpu_s": time.process_time() - c0, "rollout_s": m["time/rollout"],
                      "update_s": m["time/update"], "reward_s": m["time/reward"],
                      "prompt_len": len(data.prompt_ids[0]),
                      "completion_lengths": rec.get("completion_lengths", []),
                      "seq_lengths": rec.get("seq_lengths", []),
                      "padded_tokens": rec.get("padded_tokens", 0),
                      "update_peak_rss": rec.get("update_peak_rss"), "loss": rec.get("loss"),
                      "ops": rec.get("ops")})
        _progress(a, i, wall)
    # read before the matmul check below allocates anything
    peaks = _mlx_peak() if backend.name == "mlx" else _accelerator_peak(a)
    info = {"backend": backend.name, "preset": a["preset"], "load_peak_rss": load_rss,
            "first_step_s": steps[0]["step_s"]}
    graphs = getattr(getattr(backend, "rollout_engine", None), "graphs", None)
    if graphs is not None:  # rollout_graphs (auto: on CUDA): compiled, or why not
        info["rollout_graphs"] = graphs.failure or f"on, {len(graphs.steps)} compiled shape(s)"
    if backend.name == "mlx":
        info["blas_gflops"] = _mlx_blas_check()
    else:
        info["torch_gflops_after"] = _torch_matmul_rate(a)
    return {"steps": steps, "info": info, **peaks}


def _mlx_blas_check() -> float:
    """The matmul rate mlx gets here (shows whether OpenBLAS was preloaded on Linux)."""
    import mlx.core as mx
    a, b = mx.random.normal((512, 576)), mx.random.normal((576, 8192))
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(3):
        mx.eval(a @ b)
    return 3 * 2 * 512 * 576 * 8192 / (time.perf_counter() - t0) / 1e9


def _torch_matmul_rate(a: dict) -> float:
    """The floor's matmul rate (benchmarks/floor.py) measured again in this process right
    after its steps: how far this machine drifted from the floor's own measurement."""
    from benchmarks.floor import measure_matmul
    return measure_matmul(a.get("device", "cpu"), a.get("dtype", "float32"),
                          quick=a.get("quick", False))


def _accelerator_peak(a: dict) -> dict:
    if str(a.get("device", "")).startswith("cuda"):
        import torch
        return {"gpu_peak_bytes": int(torch.cuda.max_memory_allocated())}
    return {}


def _mlx_peak() -> dict:
    """MLX's own allocator peak over the whole process (loading included): on a Mac the
    figure that matters (unified memory, not RSS); on Linux it is beside peak RSS."""
    import mlx.core as mx
    return {"mlx_peak_bytes": int(mx.get_peak_memory())}


def _progress(a: dict, i: int, wall: float) -> None:
    tag = "warm-up" if i < a["warmup"] else "rep"
    print(f"[{a.get('label', '?')}] step {i + 1}/{a['warmup'] + a['reps']} ({tag}) "
          f"{wall:.2f}s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- TRL

def job_trl(a: dict) -> dict:
    """TRL's GRPOTrainer: 8 generations, beta 0, one iteration, no vLLM, plain generate."""
    _quiet()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import trl

    n_steps = a["warmup"] + a["reps"]
    rec: dict = {"gen_s": 0.0, "rollout_s": 0.0}
    steps: list[dict] = []

    class TimedGRPO(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            rec["gen_s"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = fixed_trl_batch(self, a) if a.get("fixed_batch") \
                else super()._generate_and_score_completions(inputs)
            rec["rollout_s"] += time.perf_counter() - t0
            pm, cm = out["prompt_mask"], out["completion_mask"]
            rec["prompt_len"] = int(pm.sum(1).max())
            rec["completion_lengths"] = [int(x) for x in cm.sum(1)]
            rec["seq_lengths"] = [int(x) for x in (pm.sum(1) + cm.sum(1))]
            rec["padded_tokens"] = int(pm.numel() + cm.numel())
            reset_peak_rss()  # the update's peak from here to the end of the step
            if a.get("count_ops"):  # ... and its operators
                rec["counter"] = OpCounter()
                rec["counter"].__enter__()
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            rec.update(gen_s=0.0, rollout_s=0.0, t0=time.perf_counter(), c0=time.process_time())

        def on_step_end(self, args, state, control, **kw):
            counter = rec.pop("counter", None)
            if counter is not None:
                counter.__exit__(None, None, None)
            wall = time.perf_counter() - rec["t0"]
            i = len(steps)
            steps.append({"warmup": i < a["warmup"], "step_s": wall,
                          "cpu_s": time.process_time() - rec["c0"],
                          "rollout_s": rec["gen_s"], "update_s": wall - rec["rollout_s"],
                          "reward_s": rec["rollout_s"] - rec["gen_s"],
                          "prompt_len": rec.get("prompt_len", 0),
                          "completion_lengths": rec.get("completion_lengths", []),
                          "seq_lengths": rec.get("seq_lengths", []),
                          "padded_tokens": rec.get("padded_tokens", 0),
                          "update_peak_rss": update_peak_rss(),
                          "ops": dict(counter.counts) if counter is not None else None})
            _progress(a, i, wall)

    cuda = str(a.get("device", "cpu")).startswith("cuda")
    bf16 = a.get("dtype") == "bfloat16"
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), report_to="none", save_strategy="no",
        per_device_train_batch_size=W.GROUP, num_generations=W.GROUP,
        gradient_accumulation_steps=1, max_completion_length=n_new(a),
        beta=0.0, num_iterations=1, use_vllm=False, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=W.LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.01,
        max_grad_norm=1.0, max_steps=n_steps, logging_steps=1, disable_tqdm=True,
        gradient_checkpointing=False, bf16=bf16, use_cpu=not cuda, seed=0,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
        dataloader_num_workers=0, log_completions=False)
    dataset = Dataset.from_list([{"prompt": W.PROMPT}] * n_steps)
    trainer = TimedGRPO(model=a["model"], reward_funcs=W.bench_reward, args=config,
                        train_dataset=dataset, callbacks=[StepTimer()])
    load_rss = peak_rss_bytes()
    trainer.train()
    info = {"trl": trl.__version__, "loss_type": config.loss_type, "load_peak_rss": load_rss,
            "gradient_checkpointing": config.gradient_checkpointing,
            "torch_gflops_after": _torch_matmul_rate(a)}
    return {"steps": steps, "info": info, **_accelerator_peak(a)}


def fixed_trl_batch(trainer, a: dict) -> dict:
    """What TRL's _generate_and_score_completions returns, for fixed_completions(a): the
    prompt's ids on every row, the fixed completions, no padding, and GRPO's advantages
    ((r - mean) / (std + 1e-4), TRL's scaling) of the benchmark reward."""
    import numpy as np
    import torch
    tok = trainer.processing_class
    device = trainer.accelerator.device
    prompt = tok(W.PROMPT, add_special_tokens=False)["input_ids"]
    done = fixed_completions(a)
    rewards = np.array(W.bench_reward([W.PROMPT] * len(done), tok.batch_decode(done)))
    adv = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)
    completion_ids = torch.tensor(done, device=device)
    return {"prompt_ids": torch.tensor([prompt] * len(done), device=device),
            "prompt_mask": torch.ones(len(done), len(prompt), dtype=torch.long, device=device),
            "completion_ids": completion_ids,
            "completion_mask": torch.ones_like(completion_ids),
            "advantages": torch.tensor(adv, dtype=torch.float32, device=device),
            "num_items_in_batch": torch.tensor(completion_ids.numel(), device=device)}


# --------------------------------------------------------------------------- mlx-lm-lora

def job_mlx_lm_lora(a: dict) -> dict:
    """mlx-lm-lora's train_grpo (group 8, beta 0), called in-process: a full fine-tune, or
    with a["lora_rank"] LoRA adapters on gft's default targets (every attention and MLP
    projection of every layer, scale alpha / rank = a["lora_scale"]) through mlx-lm's own
    linear_to_lora_layers over the frozen (possibly quantized) model, as mlx-lm-lora does."""
    _quiet()
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    import mlx_lm_lora
    from mlx_lm_lora.trainer import grpo_trainer as G
    from mlx_lm_lora.trainer.datasets import GRPODataset
    from mlx.utils import tree_flatten

    model, tokenizer = load(a["model"])
    if a.get("lora_rank"):
        from mlx_lm.tuner.utils import linear_to_lora_layers
        model.freeze()
        keys = [f"self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            f"mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")]
        linear_to_lora_layers(model, len(model.layers), {
            "rank": a["lora_rank"], "scale": a.get("lora_scale", 2.0), "dropout": 0.0,
            "keys": keys})
    load_rss = peak_rss_bytes()
    n_steps = a["warmup"] + a["reps"]
    rec: dict = {}
    steps: list[dict] = []
    original = G.generate_grpo

    def timed_generate(*args, **kw):
        t0 = time.perf_counter()
        out = original(*args, **kw)
        rec["rollout_s"] = time.perf_counter() - t0
        rec["completion_lengths"] = [int(c.size) for c in out[0]]
        return out

    G.generate_grpo = timed_generate

    class Report(TrainingCallback):
        def on_train_loss_report(self, info):
            wall = 1.0 / info["iterations_per_second"]
            i = len(steps)
            cpu, rec["cpu_mark"] = time.process_time() - rec["cpu_mark"], time.process_time()
            lengths = rec.get("completion_lengths", [])
            steps.append({"warmup": i < a["warmup"], "step_s": wall, "cpu_s": cpu,
                          "rollout_s": rec.get("rollout_s", 0.0),
                          "update_s": wall - rec.get("rollout_s", 0.0), "reward_s": 0.0,
                          "prompt_len": rec["prompt_len"], "completion_lengths": lengths,
                          "seq_lengths": [rec["prompt_len"] + n for n in lengths],
                          "padded_tokens": sum(rec["prompt_len"] + n for n in lengths)})
            _progress(a, i, wall)

        def on_val_loss_report(self, info):
            pass

    data = GRPODataset([{"prompt": W.PROMPT, "answer": "753"}] * n_steps, tokenizer,
                       text_completion_key="prompt")
    rec["prompt_len"] = len(data[0][0])
    rec["cpu_mark"] = time.process_time()  # CPU time between two reports = one step's
    args = G.GRPOTrainingArgs(
        batch_size=1, iters=n_steps, val_batches=0, steps_per_report=1,
        steps_per_eval=10**9, steps_per_save=10**9,
        adapter_file=str(Path(tempfile.mkdtemp(prefix="mlxlora-bench-")) / "adapters.safetensors"),
        max_seq_length=4096, max_completion_length=n_new(a), grad_checkpoint=False,
        beta=0.0, group_size=W.GROUP, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
        grpo_loss_type="grpo")
    G.train_grpo(model=model, ref_model=None, tokenizer=tokenizer,
                 optimizer=optim.AdamW(learning_rate=W.LEARNING_RATE, weight_decay=0.01),
                 train_dataset=data, val_dataset=None, reward_funcs=[W.bench_reward],
                 args=args, training_callback=Report(), end_answer_token="")
    peaks = _mlx_peak()  # before the matmul check allocates anything
    info = {"mlx_lm_lora": getattr(mlx_lm_lora, "__version__", "?"), "load_peak_rss": load_rss,
            "blas_gflops": _mlx_blas_check(),
            "trainable": sum(v.size for _, v in tree_flatten(model.trainable_parameters()))}
    return {"steps": steps, "info": info, **peaks}


# --------------------------------------------------------------------------- sampler

def job_sampler(a: dict) -> dict:
    """backends.torch_sampler.sample vs transformers' generate: 8 x MAX_NEW_TOKENS tokens,
    no EOS (every row runs to the cap, so both do identical work), runs interleaved."""
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from backends.torch_sampler import (GraphDecoder, rollout_copy, rollout_packing, sample,
                                        sync_weights)

    dev = torch.device(a.get("device", "cpu"))
    dt = torch.bfloat16 if a.get("dtype") == "bfloat16" else torch.float32
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dt).to(dev).eval()
    prompt = tok(W.PROMPT).input_ids
    ids = torch.tensor([prompt] * W.GROUP, device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_cfg = GenerationConfig(max_new_tokens=n_new(a), do_sample=True, temperature=1.0,
                               top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=pad)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def hf():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           generation_config=gen_cfg)

    def ours(m=model, graphs=None):
        return sample(m, [prompt] * W.GROUP, max_new_tokens=n_new(a), eos_id=None,
                      pad_id=pad, seed=0, device=dev, graphs=graphs)

    engines = [("hf_generate", hf), ("torch_sampler", ours)]
    agreement = {}
    if dev.type == "cuda":  # rollout_graphs' default there, compiled before the timed rounds
        graphs = GraphDecoder()
        engines.append(("torch_sampler_graphs", lambda: ours(graphs=graphs)))
        # the same seed through both loops: the same tokens, up to the rounding of the
        # compiled kernels (a row that differs once goes its own way from there)
        t0 = time.perf_counter()
        compiled = ours(graphs=graphs)
        agreement["graphs_first_call_s"] = time.perf_counter() - t0
        eager = ours()
        agreement["graphs_failure"] = graphs.failure
        agreement["graphs_rows_equal"] = sum(x == y for x, y in zip(compiled, eager))
        agreement["graphs_common_prefix"] = [next((i for i, (u, v) in enumerate(zip(x, y))
                                                   if u != v), len(x))
                                             for x, y in zip(compiled, eager)]
    if dt == torch.float32:  # rollouts from a bfloat16 copy, refreshed every call as a
        shadow = rollout_copy(model)  # trainer would after each update

        def ours_bf16():
            sync_weights(shadow, model)
            ours(shadow)
        engines.append(("torch_sampler_bf16_copy", ours_bf16))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(W.GROUP, m.in_features, device=dev, dtype=dt) for m in linears]

    def products_alone():
        """One rollout's decode-step matrix products and nothing else: every nn.Linear
        once per step at GROUP rows, through the kernels the sampler uses (the rollout
        engine's packing included), n_new steps. The rollout's time can go no lower."""
        with torch.inference_mode(), rollout_packing(model, W.GROUP, n_new(a)):
            for _ in range(n_new(a)):
                for m, x in zip(linears, inputs):
                    m(x)
    engines.append(("decode_products_alone", products_alone))
    times: dict[str, list[float]] = {name: [] for name, _ in engines}
    for i in range(a["warmup"] + a["reps"]):
        for name, fn in engines:
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= a["warmup"]:
                times[name].append(time.perf_counter() - t0)
        print(f"[sampler] round {i + 1}/{a['warmup'] + a['reps']}", file=sys.stderr, flush=True)
    return {"times": times, "tokens": W.GROUP * n_new(a), "prompt_len": len(prompt),
            "decode_steps": n_new(a), **agreement,
            "linear_weight_bytes": sum(m.weight.numel() * m.weight.element_size()
                                       for m in linears)}


JOBS = {"floor": job_floor, "gft": job_gft, "trl": job_trl, "mlx_lm_lora": job_mlx_lm_lora,
        "sampler": job_sampler}


def main() -> None:
    job, args, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    t0 = time.perf_counter()
    result = JOBS[job](args)
    result.update(peak_rss_bytes=peak_rss_bytes(), job_s=time.perf_counter() - t0)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
