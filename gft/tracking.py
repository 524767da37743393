"""Experiment tracking through each tracker's own client: `report_to: [tensorboard, wandb,
trackio, mlflow]` (any subset; none by default).

Every tracker receives exactly the numbers written to metrics.jsonl (same keys, same step;
text fields such as `preset` and non-finite values, which JSON writes as null, are left
out), and the sample completions of samples.jsonl as a table where the tracker has one
(W&B, trackio, MLflow; TensorBoard gets a markdown table in its Text tab). Only rank 0
tracks (gft/loop.py passes the trackers to rank 0 alone).

Offline and local modes are the trackers' own: WANDB_MODE=offline (or `wandb offline`),
trackio's local database (TRACKIO_DIR), MLFLOW_TRACKING_URI; WANDB_PROJECT and
MLFLOW_EXPERIMENT_NAME choose the project. Each run is named after its run directory;
a resumed run starts a new tracker run under the same name (steps continue where the
checkpoint left off). TensorBoard event files go to <run>/tensorboard, W&B's offline
files to <run>/wandb.
"""
from __future__ import annotations

import importlib
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

from gft.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward", "answer")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Numbers of one metrics.jsonl line."""

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Sample completions (SAMPLE_COLUMNS) as a table."""

    def finish(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, without `step` (passed apart) and non-finite values."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def sample_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of SAMPLE_COLUMNS; chat prompts become their text (tables hold strings)."""
    def cell(row: dict[str, Any], key: str) -> Any:
        value = row.get(key)
        if isinstance(value, list):  # chat messages
            return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)
        return value if isinstance(value, (int, float)) or value is None else str(value)
    return [[cell(r, k) for k in SAMPLE_COLUMNS] for r in rows]


def _require(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"report_to: {tracker} is not installed; pip install "
                          f"'gft[{tracker}]'") from None


class TensorBoardTracker:
    """Event files in <run>/tensorboard, written with tensorboard's own writer and summary
    protos (no TensorFlow or torch needed); `tensorboard --logdir runs` shows them."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        _require("tensorboard", "tensorboard")
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb
        from tensorboard.plugins.text.summary_v2 import text_pb
        self._event, self._scalar, self._text = event_pb2.Event, scalar_pb, text_pb
        self.writer = EventFileWriter(str(Path(run_dir) / "tensorboard"))
        self._write(0, text_pb("config", _markdown_table(["key", "value"],
                                                         [[k, v] for k, v in config.items()])))

    def _write(self, step: int, summary: Any) -> None:
        self.writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._write(step, self._scalar(key, value))

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._write(step, self._text("samples", _markdown_table(SAMPLE_COLUMNS,
                                                                sample_rows(rows))))

    def finish(self) -> None:
        self.writer.close()


def _markdown_table(columns: Iterable[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", "<br>")
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


class WandbTracker:
    """A W&B run (project: WANDB_PROJECT, else "gft"), its files under <run>/wandb;
    WANDB_MODE=offline keeps it on disk for a later `wandb sync`."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        self.wandb = _require("wandb", "wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "gft"), name=name,
                                   config=config, dir=str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS), data=sample_rows(rows))
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run in project "gft" (trackio's local database unless told otherwise)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        self.trackio = _require("trackio", "trackio")
        self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "gft"),
                                     name=name, config=config, embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table = self.trackio.Table(columns=list(SAMPLE_COLUMNS), data=sample_rows(rows))
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        # the module-level finish also clears trackio's current run, which its exit
        # handler would otherwise finish (and announce) a second time
        self.trackio.finish()


class MlflowTracker:
    """An MLflow run (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), config as params."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        self.mlflow = _require("mlflow", "mlflow")
        self.run = self.mlflow.start_run(run_name=name)
        # MLflow params are strings of at most a few thousand characters
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(zip(*sample_rows(rows))) if rows else [()] * len(SAMPLE_COLUMNS)
        self.mlflow.log_table({k: list(c) for k, c in zip(SAMPLE_COLUMNS, columns)},
                              artifact_file=f"samples/step_{step:06d}.json")

    def finish(self) -> None:
        self.mlflow.end_run()


ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
            "trackio": TrackioTracker, "mlflow": MlflowTracker}


def tracker_names(value: Any) -> list[str]:
    """report_to as a list of tracker names: a name, a list, or none / [] (no tracking)."""
    names = [value] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n not in ("none", None)]
    for n in names:
        if n not in ADAPTERS:
            import difflib
            close = difflib.get_close_matches(str(n), TRACKERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'report_to': unknown tracker {n!r}; choose from "
                              f"{', '.join(TRACKERS)}{hint}")
    return list(dict.fromkeys(names))


class Trackers:
    """All chosen trackers as one; a metrics record in, every tracker gets its numbers."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    def log(self, record: dict[str, Any]) -> None:
        numbers = scalars(record)
        if numbers:
            for t in self.trackers:
                t.log(numbers, int(record["step"]))

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for t in self.trackers:
            t.log_samples(rows, step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def open_trackers(report_to: Any, run_dir: Path, config: dict[str, Any]) -> Trackers:
    """Start one run in each chosen tracker (named after the run directory). A tracker
    that is not installed is a ConfigError naming the extra to install, raised before any
    other tracker starts."""
    names = tracker_names(report_to)
    for n in names:
        _require(n, n)
    opened: list[Tracker] = []
    name = Path(run_dir).resolve().name
    flat = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
            for k, v in config.items()}
    n = ""
    try:
        for n in names:
            opened.append(ADAPTERS[n](Path(run_dir), name, flat))
    except Exception as e:  # a tracker's own setup error (store URI, login): one line
        Trackers(opened).finish()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"report_to: {n} could not start a run: {first}") from None
    except BaseException:
        Trackers(opened).finish()
        raise
    return Trackers(opened)
