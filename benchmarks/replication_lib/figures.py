"""The replication's figures: gft's own curves per method and a tokens-on-the-x-axis overlay."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _cumulative(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Policy tokens processed up to and including each record's step."""
    total, xs = 0.0, []
    for r in records:
        total += (r.get("rollout_tokens") or 0.0) + (r.get("update_tokens") or 0.0)
        xs.append(total)
    return np.array(xs), records


def plot_tokens(runs: dict[str, list[Path]], path: Path, budget: float) -> Path:
    """Methods compared on one x axis, policy tokens processed; seeds averaged in bins."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gft.metrics import read_metrics
    from gft.plot import finish_axes, save_figure
    edges = np.linspace(0, budget * 1.1, 45)
    centers = (edges[1:] + edges[:-1]) / 2
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("held-out accuracy (greedy, during training)", "eval/accuracy", None),
              ("training token entropy (bin mean)", "entropy", np.nanmean),
              ("grad norm before clipping (bin mean)", "grad_norm", np.nanmean),
              ("grad norm before clipping (bin max, log)", "grad_norm", np.nanmax)]
    for ax, (title, key, reduce) in zip(axes.flat, panels):
        for method, dirs in runs.items():
            curves = []
            for d in dirs:
                xs, recs = _cumulative(read_metrics(d / "metrics.jsonl"))
                pts = [(x, r[key]) for x, r in zip(xs, recs) if r.get(key) is not None]
                curves.append(pts)
            if reduce is None:  # evals: the same steps for every seed
                n = min(len(c) for c in curves)
                if n == 0:
                    continue
                x = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
                y = np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)
                ax.plot(x, y, marker="o", markersize=3, label=method)
                continue
            per_seed = []
            for c in curves:
                x = np.array([p[0] for p in c])
                y = np.array([p[1] for p in c])
                idx = np.digitize(x, edges) - 1
                per_seed.append([reduce(y[idx == i]) if np.any(idx == i) else np.nan
                                 for i in range(len(centers))])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = np.nanmean(np.array(per_seed, dtype=float), axis=0)
            ax.plot(centers, y, label=method)
        if reduce is np.nanmax:
            ax.set_yscale("log")
        finish_axes(ax, title, "policy tokens processed")
    return save_figure(fig, path, dpi=90)


def shrink_png(path: Path, colors: int = 16) -> None:
    """Palette PNG with few colours: committed figures stay ~30-40 kB (from ~130 kB)."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def make_figures(groups: dict[str, list[dict[str, Any]]], figdir: Path, budget: float,
                 condition: str = "clean") -> list[Path]:
    """Every figure for the clean condition; for another, its tokens overlay only."""
    from gft.plot import plot_runs
    figdir.mkdir(parents=True, exist_ok=True)
    dirs = {m: [Path(r["run_dir"]) for r in rs] for m, rs in groups.items()}
    if condition != "clean":
        written = [plot_tokens(dirs, figdir / f"compare-tokens-{condition}.png", budget)]
        shrink_png(written[0])
        return written
    written = [plot_tokens(dirs, figdir / "compare-tokens.png", budget)]
    firsts = [ds[0] for ds in dirs.values()]
    written += [p for p in plot_runs(firsts, figdir / "overlay-steps.png", smooth=10)
                if p.parent == figdir]
    for method, ds in dirs.items():
        target = figdir / f"curves-{method.replace('>', '-')}.png"
        paths = plot_runs(ds, target, smooth=10)
        if len(ds) == 1:
            shutil.copyfile(paths[0], target)
        written.append(target)
    for p in written:
        shrink_png(p)
    return written


CAPTIONS = {
    "compare-tokens-flawed.png": "The same overlay for the runs trained on flawed expert "
    "demonstrations (train_flawed); accuracy during training is on the in-distribution test.",
    "compare-tokens.png": "All methods against policy tokens processed (seeds averaged). "
    "Training entropy is measured on each method's own update batch (SFT/DFT: the "
    "demonstrations; GRPO: its rollouts; GFT: both), so it is not the same quantity across "
    "methods; the table's entropy is.",
    "overlay-steps.png": "`gft plot` overlay of the seed-0 runs (x axis: steps, which differ "
    "per method at equal tokens; smoothed over 10 steps).",
}


def figure_lines(figures: list[Path], where: Path) -> list[str]:
    lines = ["### Curves", ""]
    for p in figures:
        method = p.stem[len("curves-"):].replace("-", ">")
        caption = CAPTIONS.get(p.name, f"`gft plot` of {method} (every seed; "
                               "smoothed over 10 steps).")
        lines += [f"![{p.stem}]({os.path.relpath(p, where)})", "", caption, ""]
    return lines


