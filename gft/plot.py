"""PNG curves from runs' metrics.jsonl: reward, held-out accuracy, entropy, grad norm.

`gft plot RUN_DIR [RUN_DIR ...]` writes one figure per run (in its directory) and, with
several runs, one overlaid figure, so presets can be compared at a glance.

A damaged line of metrics.jsonl (cut short by a kill, or edited by hand) is skipped with
a warning naming the file and line: plotting only reads, and the other lines still make
a useful figure. Values that are not finite numbers are left out of their curve.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

from gft.errors import GFTError

# (title, metric keys tried in order: the first one a run logged is plotted)
PANELS = [
    ("reward (rollouts, else dataset responses)", ("reward/rollout", "reward/dataset")),
    ("held-out accuracy (greedy)", ("eval/accuracy",)),
    ("token entropy", ("entropy",)),
    ("grad norm (before clipping)", ("grad_norm",)),
]


def series(records: list[dict], keys: Sequence[str]) -> tuple[list[int], list[float], str]:
    """(steps, values, key) for the first key that any record has; NaN-free."""
    for key in keys:
        points = [(r["step"], r[key]) for r in records if _number(r.get(key))]
        if points:
            steps, values = zip(*points)
            return list(steps), list(values), key
    return [], [], keys[0]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load(run: Path, warn: Callable[[str], None]) -> list[dict]:
    """The records of RUN/metrics.jsonl that have a numeric step; others are skipped,
    each with one warning naming its line."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise GFTError(f"{run}: no metrics.jsonl (is this a gft run directory?)")
    records = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and _number(record.get("step")):
            records.append(record)
        else:
            warn(f"warning: {path}:{number}: damaged line skipped (not a JSON object with a "
                 "numeric 'step')")
    return records


def plot_runs(runs: Sequence[Path], out: Path | None = None, smooth: int = 1,
              warn: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Write <run>/curves.png for each run, and `out` (overlay) when given several runs;
    `warn` gets one line per damaged metrics line skipped."""
    plt = _pyplot()

    loaded = {Path(r): _load(Path(r), warn) for r in runs}
    written: list[Path] = []
    targets = [(run, {run: recs}, run / "curves.png") for run, recs in loaded.items()]
    if len(loaded) > 1:
        targets.append((None, loaded, Path(out or "curves.png")))
    for _, group, path in targets:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for ax, (title, keys) in zip(axes.flat, PANELS):
            for run, recs in group.items():
                steps, values, key = series(recs, keys)
                if steps:
                    window = 1 if key.startswith("eval/") else smooth  # evals are sparse
                    ax.plot(steps, _smooth(values, window), marker="o" if window == 1 and
                            key.startswith("eval/") else None, markersize=3, label=f"{run.name} ({key})"
                            if len(group) > 1 else key)
            finish_axes(ax, title, "step")
        written.append(save_figure(fig, path, dpi=110))
    return written


def _pyplot():
    """matplotlib.pyplot drawing to files only, or a GFTError saying what to install
    (matplotlib is an optional extra: a training machine does not need it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise GFTError('gft plot needs matplotlib, which is not installed: '
                       'pip install "gft[plot]"') from exc
    return plt


def finish_axes(ax, title: str, xlabel: str) -> None:
    """Title, x label, light grid, and a legend when something was drawn."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Write a matplotlib figure as PNG (parent folders made) and free it."""
    plt = _pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; window 1 = raw values."""
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
