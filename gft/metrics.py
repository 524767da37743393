"""Step metrics: JSONL logs in the run directory and a progress bar on the terminal."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
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
    n = max(t["n"], 1.0)
    mean = t["advantage/sum"] / n
    out["advantage/mean"] = mean
    out["advantage/std"] = math.sqrt(max(t["advantage/sumsq"] / n - mean * mean, 0.0))
    out["zero_variance_groups"] = t["groups/flat"] / t["groups"] if t["groups"] else 0.0
    if t["n/rollout"]:
        out["truncated/rollout"] = t["truncated/rollout"] / t["n/rollout"]
    return out


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
