"""Step metrics: JSONL logs in the run directory and a progress bar on the terminal."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gft.checkpoint import atomic_write_text
from gft.groups import Sequence_


def group_sums(seqs: list[Sequence_], n_groups: int, n_flat_groups: int) -> dict[str, float]:
    """Sums and counts behind the step's response metrics, in a fixed key order, so that
    data-parallel ranks can add theirs up (one all-reduce) before dividing."""
    out: dict[str, float] = {}
    for label, on in (("rollout", True), ("dataset", False)):
        part = [s for s in seqs if s.on_policy is on]
        out[f"n/{label}"] = float(len(part))
        out[f"reward/{label}"] = float(sum(s.reward for s in part))
        out[f"reward_sq/{label}"] = float(sum(s.reward ** 2 for s in part))
        out[f"accuracy/{label}"] = float(sum(s.correct for s in part))
        out[f"response_tokens/{label}"] = float(sum(len(s.response_ids) for s in part))
        out[f"truncated/{label}"] = float(sum(s.truncated for s in part))
    out["n"] = float(len(seqs))
    out["advantage/sum"] = float(sum(s.advantage for s in seqs))
    out["advantage/sumsq"] = float(sum(s.advantage ** 2 for s in seqs))
    out["groups"], out["groups/flat"] = float(n_groups), float(n_flat_groups)
    return out


def metrics_from_sums(t: dict[str, float]) -> dict[str, float]:
    """Reward and accuracy for rollouts and dataset responses separately, advantage stats,
    the fraction of zero-variance groups (no gradient under group advantages)."""
    out: dict[str, float] = {}
    for label in ("rollout", "dataset"):
        n = t[f"n/{label}"]
        if n:
            for key in ("reward", "accuracy", "response_tokens"):
                out[f"{key}/{label}"] = t[f"{key}/{label}"] / n
        if n > 1:  # unbiased, as TRL's reward_std (torch.std)
            mean = t[f"reward/{label}"] / n
            var = (t[f"reward_sq/{label}"] - n * mean * mean) / (n - 1)
            out[f"reward_std/{label}"] = math.sqrt(max(var, 0.0))
    n = max(t["n"], 1.0)
    mean = t["advantage/sum"] / n
    out["advantage/mean"] = mean
    out["advantage/std"] = math.sqrt(max(t["advantage/sumsq"] / n - mean * mean, 0.0))
    out["zero_variance_groups"] = t["groups/flat"] / t["groups"] if t["groups"] else 0.0
    if t["n/rollout"]:
        out["truncated/rollout"] = t["truncated/rollout"] / t["n/rollout"]
    return out


# TRL's GRPOTrainer (and transformers' Trainer) name for a number gft logs under its own
# name: logged under both, so a TRL user's charts (W&B, TensorBoard, trackio show them
# under train/, gft/tracking.py) hold gft runs too, and a resumed gft run's own charts
# go on unbroken. TRL's rewards/<function>/mean is gft's rewards/<function>/rollout.
TRL_NAMES = {"learning_rate": "lr", "reward": "reward/rollout",
             "reward_std": "reward_std/rollout",
             "frac_reward_zero_std": "zero_variance_groups",
             "completions/mean_length": "response_tokens/rollout",
             "completions/clipped_ratio": "truncated/rollout"}
# names gft and TRL share, meaning the same
TRL_SHARED = ("loss", "grad_norm", "entropy")
# The first part ("time" of "time/step") of every name gft writes to metrics.jsonl and its
# trackers (TRL's included, and train/ and eval/ where trackers and evaluation put them).
# A reward function's log_metric name may not start with one: it would replace one of
# gft's figures, or ("loss/kl" beside "loss") need MLflow's file store to hold a file
# and a folder of one name.
METRIC_ROOTS = frozenset({
    "accuracy", "advantage", "completions", "entropy", "epoch", "eval", "frac_reward_zero_std",
    "grad_norm", "groups", "learning_rate", "loss", "lr", "memory", "n", "policy_tokens",
    "preset", "response_tokens", "reward", "reward_sq", "reward_std", "rewards",
    "rollout_tok_s", "rollout_tokens", "samples", "skipped", "stage", "step", "time", "train",
    "truncated", "update_tok_s", "update_tokens", "updates", "zero_variance_groups"})


def trl_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The step's numbers under TRL's names (TRL_NAMES), where gft has them; the rollout
    ones only where the step sampled rollouts (SFT and DFT steps have none, as TRL's
    SFTTrainer logs no reward)."""
    rollouts = "response_tokens/rollout" in m
    out = {trl: m[ours] for trl, ours in TRL_NAMES.items()
           if ours in m and (rollouts or trl == "learning_rate")}
    out.update({key[:-len("/rollout")] + "/mean": value for key, value in m.items()
                if key.startswith("rewards/") and key.endswith("/rollout")})
    return out


def is_trl_name(key: str) -> bool:
    """A key trl_metrics writes (a TRL name that is not also gft's own)."""
    return key in TRL_NAMES or (key.startswith("rewards/") and key.endswith("/mean"))


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per line; `truncate_after(step)` drops lines of steps that a
    resumed run will redo, so a resumed log reads like an uninterrupted one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep lines of steps <= step; drop a line torn by a kill mid-write. The file is
        replaced atomically, so a kill here loses nothing."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ProgressBar:
    """A rich progress bar with the headline metrics; silent when disabled."""

    def __init__(self, total: int, start: int, enabled: bool, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> "ProgressBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, m: dict[str, float]) -> None:
        parts = [f"loss {m.get('loss', float('nan')):.3f}"]
        for key, label in (("reward/rollout", "r_roll"), ("accuracy/rollout", "acc_roll"),
                           ("entropy", "ent"), ("grad_norm", "|g|")):
            if key in m:
                parts.append(f"{label} {m[key]:.3f}")
        self.progress.update(self.task, completed=step, info=" ".join(parts))


# --------------------------------------------------------------------------- plain logs
# A cluster job (SLURM, nohup, a pipe) has no terminal: the progress bar is off there, and
# these plain lines stand in for it (gft/loop.py).

def peak_memory() -> dict[str, float]:
    """Peak memory so far in GiB: the process's peak RSS (host), and the accelerator's
    peak allocation when a framework already loaded reports one (torch CUDA, MLX Metal).
    Looks only at frameworks already imported: gft/ imports no backend."""
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"memory/peak_host_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "get_peak_memory") and mx.metal.is_available():
        out["memory/peak_device_gib"] = mx.get_peak_memory() / 2**30
    return out


def _fmt(m: dict[str, Any], key: str, label: str, spec: str = ".3f") -> str | None:
    value = m.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return f"{label} {value:{spec}}"


def step_line(step: int, steps: int, m: dict[str, Any]) -> str:
    """One plain line per logged step: what a progress bar would show, and more."""
    tokens = m.get("rollout_tokens", 0.0) + m.get("update_tokens", 0.0)
    tok_s = tokens / m["time/step"] if m.get("time/step") else float("nan")
    mem = m.get("memory/peak_device_gib", m.get("memory/peak_host_gib"))
    parts = [f"step {step}/{steps}", _fmt(m, "loss", "loss", ".4f"),
             _fmt(m, "reward/rollout", "reward"), _fmt(m, "accuracy/rollout", "acc"),
             _fmt(m, "reward/dataset", "reward_data"), _fmt(m, "entropy", "entropy"),
             _fmt(m, "grad_norm", "grad_norm"), _fmt({"t": tok_s}, "t", "tok/s", ".0f"),
             _fmt({"m": mem}, "m", "peak_mem_gib", ".2f"), _fmt(m, "time/step", "s/step", ".2f")]
    return "  ".join(p for p in parts if p)


class Heartbeat:
    """Inside a long step (a first step can take minutes: compiling, long rollouts), a line
    at most every `every` seconds saying what the step is doing, from a background thread.
    `phase(text)` sets what it is doing; silent when disabled."""

    def __init__(self, console: Console, enabled: bool, every: float = 30.0):
        import threading
        self.console, self.enabled, self.every = console, enabled, every
        self._text, self._since = "", 0.0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def __enter__(self) -> "Heartbeat":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def phase(self, text: str, *, new_step: bool = False) -> None:
        import time
        with self._lock:
            self._text = text
            if new_step:
                self._since = time.perf_counter()

    def _run(self) -> None:
        import time
        while not self._stop.wait(self.every):
            with self._lock:
                text, since = self._text, self._since
            elapsed = time.perf_counter() - since
            if text and elapsed >= self.every:  # only a step that has run that long
                self.console.print(f"{text} ({elapsed:.0f} s into the step)", highlight=False)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _evaluation_line(records: list[dict[str, Any]]) -> str:
    """First, best and last held-out accuracy; without a reward (SFT, DFT), the held-out
    loss, which a run without rewards evaluates (it said "evaluation: none")."""
    for key, what, better in (("eval/accuracy", "evaluation accuracy", max),
                              ("eval/loss", "evaluation loss (NLL/token)", min)):
        evals = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if evals:
            best = better(evals, key=lambda e: (e[1], -e[0] if better is max else e[0]))
            return (f"{what}: first {evals[0][1]:.3f} (step {evals[0][0]}), best "
                    f"{best[1]:.3f} (step {best[0]}), last {evals[-1][1]:.3f} "
                    f"(step {evals[-1][0]})")
    return "evaluation: none"


def _no_update_warning(train: list[dict[str, Any]]) -> list[str]:
    """A line when no step made an optimizer update (none was skipped as non-finite
    either): every group's rewards were equal, which under group advantages is no
    gradient, so the model came out as it went in. The step lines showed only
    'loss 0.0000  grad_norm 0.000'; nothing said the run had trained nothing."""
    if not train or any(not isinstance(r.get("updates"), (int, float)) for r in train) \
            or sum(r["updates"] for r in train) or sum(r.get("skipped") or 0 for r in train):
        return []
    return [f"warning: none of the {len(train)} steps made an optimizer update, so the model "
            "did not change: in every group all responses got the same reward (metrics.jsonl: "
            "zero_variance_groups 1.0), and equal rewards have no group advantage. Check what "
            "the rewards return on these rows (rewards/<name>/rollout), or sample more varied "
            "rollouts (temperature, num_rollouts)"]


def summary_lines(records: list[dict[str, Any]], wall_s: float, memory: dict[str, float],
                  final: Path | str) -> list[str]:
    """The end of a run, from its metrics.jsonl records: time, tokens, throughput, peak
    memory, first and best evaluation, and where the checkpoint is."""
    train = [r for r in records if "loss" in r]
    rollout = sum(r.get("rollout_tokens") or 0.0 for r in train)
    update = sum(r.get("update_tokens") or 0.0 for r in train)
    busy = sum(r.get("time/step") or 0.0 for r in train)
    steps = max((r.get("step", 0) for r in train), default=0)
    lines = [f"done: {steps} steps, wall time {_duration(wall_s)} (this process); "
             f"{rollout + update:,.0f} tokens (rollouts {rollout:,.0f}, updates {update:,.0f}), "
             f"{(rollout + update) / busy if busy else 0.0:,.0f} tokens/s over the steps"]
    lines += _no_update_warning(train)
    mem = [f"host (peak RSS) {memory['memory/peak_host_gib']:.2f} GiB"]
    if "memory/peak_device_gib" in memory:
        mem.insert(0, f"device {memory['memory/peak_device_gib']:.2f} GiB")
    lines.append("peak memory: " + ", ".join(mem))
    lines.append(_evaluation_line(records))
    lines.append(f"final checkpoint: {final}")
    return lines
