"""Experiment tracking through each tracker's own client: `report_to: [tensorboard, wandb,
trackio, mlflow]` (any subset; none by default).

Every tracker receives the numbers written to metrics.jsonl (same keys, same step;
text fields such as `preset` and non-finite values, which JSON writes as null, are left
out), except that TensorBoard, W&B and trackio get the TRL-named ones (gft/metrics.py
TRL_NAMES: `learning_rate`, `reward`, ...; and `loss`, `grad_norm`, `entropy` besides
their own) under `train/`, where transformers' callbacks put a TRL run's, so one chart
holds both (tracker_numbers; W&B and trackio also get train/global_step, TRL runs'
x-axis there); MLflow's callback adds no prefix, nor does gft there (and `reward` is
left out there: its file store cannot hold it beside `reward/rollout`). The sample
completions of samples.jsonl go as a table where the tracker has one (W&B, trackio,
MLflow; TensorBoard gets a markdown table in its Text tab). Only rank 0
tracks (gft/run.py opens trackers on rank 0 alone).

Offline and local modes are the trackers' own: WANDB_MODE=offline (or `wandb offline`),
trackio's local database (TRACKIO_DIR), MLFLOW_TRACKING_URI; WANDB_PROJECT, TRACKIO_PROJECT
and MLFLOW_EXPERIMENT_NAME choose the project. A run is named `run_name` (TRL's key), else
after its run directory. What a W&B user sets in the environment wins over what gft would
pass (WANDB_NAME, WANDB_RUN_ID, WANDB_RESUME, WANDB_DIR, ...; MLFLOW_RUN_ID for MLflow):
gft passes an argument to wandb.init only when its variable is unset, because wandb.init's
arguments override the environment.

Resuming (one rule for every tracker): a resumed run continues the same tracker run, and
each step appears once in it. The tracker run ids are kept in <run>/trackers.json (W&B's
run id, offline runs too: `wandb sync` joins them; MLflow's run id; trackio's run name).
Steps after the checkpoint that the stopped process had already reported are redone:
- TensorBoard drops them: the new event file starts with SessionLog(START) at the first
  redone step, TensorBoard's own mark for a restart (torch's SummaryWriter purge_step), so
  it shows the redone values, as metrics.jsonl does;
- W&B, trackio and MLflow cannot drop logged steps (W&B ignores a step below the run's
  last; MLflow and trackio would keep both values), so each is sent only the steps after
  the last one it holds, as it says itself (W&B's starting step of the resumed run,
  trackio's last step, MLflow's metric histories): it keeps the values logged before the
  stop. Asking the tracker, not metrics.jsonl, matters after a hard kill: the clients
  buffer, so the last steps reported may never have reached the tracker. W&B offline
  cannot say (starting step 0): it is sent every redone step, and `wandb sync` decides.
  W&B's rewind (WANDB_RESUME_FROM="<id>?_step=<checkpoint step>", a W&B preview feature)
  truncates the run on W&B's side instead.

A tracker that fails during the run (a lost connection, a full disk) is reported once and
dropped; training goes on with the others and metrics.jsonl, as transformers' callbacks
effectively do. Its setup failing is a ConfigError before training starts.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from gft.errors import ConfigError, first_line
from gft.types import SAMPLE_COLUMNS

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
STATE_FILE = "trackers.json"  # each tracker's run id, for a resume to continue it


@dataclass
class Resume:
    """Where this process starts, for the trackers. first_step: the first step it logs (0
    for a new run, or for one that restarts from step 0). ids: the tracker run ids stored
    in trackers.json."""
    first_step: int = 0
    ids: dict[str, str] = field(default_factory=dict)

    def stored(self, tracker: str) -> str | None:
        """The tracker's earlier run id, when continuing a run (not when starting over)."""
        return self.ids.get(tracker) if self.first_step > 0 else None


class Tracker(Protocol):
    run_id: str  # kept in trackers.json, so a resumed run continues this tracker run
    skip_through: int  # the tracker run already holds steps <= this: not sent again
    train_prefix: bool  # TRL's names go under train/ (tracker_numbers)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Numbers of one metrics.jsonl line."""

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Sample completions (sample_columns) as a table."""

    def finish(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, without `step` (passed apart) and non-finite values."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def sample_columns(rows: list[dict[str, Any]]) -> list[str]:
    """SAMPLE_COLUMNS, then the columns reward functions added with log_extra (TRL's
    extra columns of its completions table), in the order they first appear."""
    extra = dict.fromkeys(k for r in rows for k in r if k not in SAMPLE_COLUMNS)
    return [*SAMPLE_COLUMNS, *extra]


def tracker_numbers(numbers: dict[str, float], train_prefix: bool) -> dict[str, float]:
    """What one tracker is sent of a record's numbers. With train_prefix (TensorBoard, W&B,
    trackio), as transformers' callbacks write a TRL run's logs there (rewrite_logs): a
    TRL name under train/ (train/learning_rate, train/reward, ...) and the names gft
    shares with TRL (loss, grad_norm, entropy) under both, so gft's own charts go on
    unbroken in a resumed run. eval/ keys already read as TRL's eval_ ones do there."""
    from gft.metrics import TRL_SHARED, is_trl_name
    if not train_prefix:
        # MLflow's file store keeps a metric as a file under folders named by its "/"
        # parts: TRL's `reward` beside gft's `reward/rollout` failed ("Is a directory")
        folders = {k.rsplit("/", i)[0] for k in numbers for i in range(1, k.count("/") + 1)}
        return {k: v for k, v in numbers.items() if not (is_trl_name(k) and k in folders)}
    out: dict[str, float] = {}
    for key, value in numbers.items():
        if not is_trl_name(key):
            out[key] = value
        if is_trl_name(key) or key in TRL_SHARED:
            out["train/" + key] = value
    return out


def sample_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of sample_columns(rows); chat prompts become their text (tables hold strings)."""
    def cell(row: dict[str, Any], key: str) -> Any:
        value = row.get(key)
        if isinstance(value, list):  # chat messages
            return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)
        return value if isinstance(value, (int, float)) or value is None else str(value)
    return [[cell(r, k) for k in sample_columns(rows)] for r in rows]


def _require(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"report_to: {tracker} is not installed; pip install "
                          f"'gft[{tracker}]'") from None


class TensorBoardTracker:
    """Event files in <run>/tensorboard, written with tensorboard's own writer and summary
    protos (no TensorFlow or torch needed); `tensorboard --logdir runs` shows them."""
    train_prefix = True

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume: Resume):
        _require("tensorboard", "tensorboard")
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb
        from tensorboard.plugins.text.summary_v2 import text_pb
        self._event, self._scalar, self._text = event_pb2.Event, scalar_pb, text_pb
        self.run_id, self.skip_through = "tensorboard", -1  # it drops what it redoes
        self.writer = EventFileWriter(str(Path(run_dir) / "tensorboard"))
        # START at the first step this process logs: TensorBoard's readers drop the earlier
        # event files' events of that step and later (a stopped run's steps after its
        # checkpoint, or a start that died before its first one), so each step shows once
        self.writer.add_event(self._event(
            wall_time=time.time(), step=resume.first_step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._write(resume.first_step, text_pb("config", _markdown_table(
            ["key", "value"], [[k, v] for k, v in config.items()])))

    def _write(self, step: int, summary: Any) -> None:
        self.writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._write(step, self._scalar(key, value))

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._write(step, self._text("samples", _markdown_table(sample_columns(rows),
                                                                sample_rows(rows))))

    def finish(self) -> None:
        self.writer.close()


def _markdown_table(columns: Iterable[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", "<br>")
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def wandb_init_args(run_dir: Path, name: str, stored_id: str | None,
                    environ: dict[str, str]) -> dict[str, Any]:
    """wandb.init's arguments, leaving out each one the user set through its environment
    variable: an explicit argument would override it (wandb's Settings take init's
    arguments over the environment)."""
    args: dict[str, Any] = {}
    if "WANDB_PROJECT" not in environ:
        args["project"] = "gft"
    if "WANDB_NAME" not in environ:
        args["name"] = name
    if "WANDB_DIR" not in environ:
        args["dir"] = str(run_dir)
    # the user's own choice of run, resume mode, rewind or fork wins over gft's stored id
    own = ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RESUME_FROM", "WANDB_FORK_FROM")
    if stored_id and not any(k in environ for k in own):
        args.update(id=stored_id, resume="allow")
    return args


class WandbTracker:
    """A W&B run (project: WANDB_PROJECT, else "gft"), its files under <run>/wandb unless
    WANDB_DIR says otherwise; WANDB_MODE=offline keeps it on disk for a later `wandb sync`."""
    train_prefix = True

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume: Resume):
        self.wandb = _require("wandb", "wandb")
        stored = resume.stored("wandb")
        self.run = self.wandb.init(config=config, **wandb_init_args(run_dir, name, stored,
                                                                    dict(os.environ)))
        self.run_id = self.run.id
        # a resumed online run starts after the last step W&B holds (after the rewind's
        # step with WANDB_RESUME_FROM); W&B would drop lower ones with a warning each.
        # Offline, W&B cannot know (0): every redone step is sent
        self.skip_through = int(self.run.starting_step) - 1

    def log(self, metrics: dict[str, float], step: int) -> None:
        # TRL runs' charts there are plotted against train/global_step (transformers'
        # callbacks log it, and W&B's define_metric makes it their x-axis)
        self.run.log({**metrics, "train/global_step": step}, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table = self.wandb.Table(columns=sample_columns(rows), data=sample_rows(rows))
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run in project TRACKIO_PROJECT, else "gft" (trackio's local database unless
    told otherwise). trackio finds a run by name: a resumed run continues the run of the
    name stored in trackers.json."""
    train_prefix = True

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume: Resume):
        self.trackio = _require("trackio", "trackio")
        project, stored = os.environ.get("TRACKIO_PROJECT", "gft"), resume.stored("trackio")
        if not stored:  # resume finds a run by name: a new one takes a name no other has
            name = _unused_name(name, _trackio_runs(project))
        self.run = self.trackio.init(project=project, name=stored or name, config=config,
                                     embed=False, resume="allow" if stored else "never")
        self.run_id = stored or name
        self.skip_through = -1
        if stored:  # the last step trackio's local store holds for the run (None: none)
            from trackio.sqlite_storage import SQLiteStorage
            last = SQLiteStorage.get_last_step(project, stored)
            self.skip_through = -1 if last is None else int(last)

    def log(self, metrics: dict[str, float], step: int) -> None:
        # transformers' trackio callback logs train/global_step beside a TRL run's
        # metrics: the same key lets a gft run's charts be read against it
        self.run.log({**metrics, "train/global_step": step}, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table = self.trackio.Table(columns=sample_columns(rows), data=sample_rows(rows))
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        # the module-level finish also clears trackio's current run, which its exit
        # handler would otherwise finish (and announce) a second time
        self.trackio.finish()


def _trackio_runs(project: str) -> list[str]:
    """The run names trackio's local store holds for the project ([] when none)."""
    from trackio.sqlite_storage import SQLiteStorage
    try:
        return list(SQLiteStorage.get_runs(project))
    except Exception:  # no database yet, or one trackio cannot read: nothing to avoid
        return []


def _unused_name(name: str, taken: list[str]) -> str:
    """`name`, or `name-2`, `name-3`, ... when runs already have it: two runs of one name
    (run directories called `run` in two places) would otherwise resume into each other."""
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


class MlflowTracker:
    """An MLflow run (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; MLFLOW_RUN_ID picks the
    run), config as params. A resumed run continues the stored run; MLflow params cannot
    change, so a key changed on resume keeps its first value there (config.yaml has the
    new one)."""
    train_prefix = False

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume: Resume):
        self.mlflow = _require("mlflow", "mlflow")
        stored = None if "MLFLOW_RUN_ID" in os.environ else resume.stored("mlflow")
        self.run = None
        if stored:
            try:
                self.run = self.mlflow.start_run(run_id=stored)
            except Exception as e:  # not in this tracking store (moved machines): a new run
                print(f"note: report_to: mlflow: the run's MLflow run {stored} is not in this "
                      f"tracking store ({first_line(e)}); this process logs to a new MLflow "
                      "run (MLFLOW_TRACKING_URI names the store)", file=sys.stderr)
        if self.run is None:
            self.run = self.mlflow.start_run(run_name=name)
        self.run_id = self.run.info.run_id
        # a run continued (stored, or MLFLOW_RUN_ID's) holds steps and params already
        self.skip_through = self._last_step()
        # MLflow params are strings of at most a few thousand characters, set once
        logged = self.run.data.params
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items() if k not in logged})

    def _last_step(self) -> int:
        """The last step of any metric the run holds (-1: none)."""
        client = self.mlflow.MlflowClient()
        return max((m.step for key in self.mlflow.get_run(self.run_id).data.metrics
                    for m in client.get_metric_history(self.run_id, key)), default=-1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        names = sample_columns(rows)
        columns = list(zip(*sample_rows(rows))) if rows else [()] * len(names)
        self.mlflow.log_table({k: list(c) for k, c in zip(names, columns)},
                              artifact_file=f"samples/step_{step:06d}.json")

    def finish(self) -> None:
        self.mlflow.end_run()


ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
            "trackio": TrackioTracker, "mlflow": MlflowTracker}


def installed_trackers() -> list[str]:
    return [n for n in TRACKERS if importlib.util.find_spec(n) is not None]


def tracker_names(value: Any) -> list[str]:
    """report_to as a list of tracker names: a name, a list, or none / [] (no tracking)."""
    names = [value] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n not in ("none", None)]
    for n in names:
        if n == "all":  # transformers: every integration that happens to be installed
            raise ConfigError(
                "'report_to': 'all' is not taken (it would depend on what happens to be "
                "installed); name the trackers, e.g. report_to: [tensorboard, wandb] "
                f"(installed here: {', '.join(installed_trackers()) or 'none'})")
        if n not in ADAPTERS:
            import difflib
            close = difflib.get_close_matches(str(n), TRACKERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'report_to': unknown tracker {n!r}; choose from "
                              f"{', '.join(TRACKERS)}{hint}")
    return list(dict.fromkeys(names))


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


class Trackers:
    """All chosen trackers as one; a metrics record in, every tracker gets its numbers.
    A tracker that raises is reported once through `warn` and dropped: the run goes on."""

    def __init__(self, trackers: dict[str, Tracker] | None = None,
                 warn: Callable[[str], None] = _stderr):
        self.trackers = dict(trackers or {})
        self.warn = warn

    def _each(self, step: int, call: Callable[[Tracker], None]) -> None:
        for name, t in list(self.trackers.items()):
            if step <= t.skip_through:
                continue
            try:
                call(t)
            except Exception as e:
                del self.trackers[name]
                self.warn(f"report_to: {name} failed at step {step} ({first_line(e)}); "
                          "training goes on without it (metrics.jsonl has every step)")

    def log(self, record: dict[str, Any]) -> None:
        numbers, step = scalars(record), int(record["step"])
        if numbers:
            self._each(step, lambda t: t.log(tracker_numbers(numbers, t.train_prefix), step))

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._each(step, lambda t: t.log_samples(rows, step))

    def finish(self) -> None:
        """Close every tracker; one that fails to close is reported, never raised: the
        run's final checkpoint comes after this."""
        trackers, self.trackers = self.trackers, {}
        for name, t in trackers.items():
            try:
                t.finish()
            except Exception as e:
                self.warn(f"report_to: {name} failed to finish its run ({first_line(e)})")


def read_resume(run_dir: Path, step: int) -> Resume:
    """What the trackers need when this process starts at checkpoint `step` of run_dir:
    the tracker run ids stored in trackers.json (unreadable: none, so new runs)."""
    path = Path(run_dir) / STATE_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    ids = {name: entry["id"] for name, entry in stored.items()
           if isinstance(entry, dict) and isinstance(entry.get("id"), str)}
    return Resume(first_step=step + 1 if step else 0, ids=ids)


def _save_state(run_dir: Path, trackers: dict[str, Tracker], resume: Resume) -> None:
    """Each open tracker's run id; a tracker left out of report_to this time keeps its
    entry, so naming it again on a later resume continues its run."""
    from gft.checkpoint import atomic_write_text
    state = {name: {"id": run_id} for name, run_id in resume.ids.items()}
    state.update({name: {"id": t.run_id} for name, t in trackers.items()})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / STATE_FILE, json.dumps(state, indent=1) + "\n")


def open_trackers(report_to: Any, run_dir: Path, config: dict[str, Any], step: int = 0,
                  name: str | None = None,
                  warn: Callable[[str], None] = _stderr) -> Trackers:
    """Start (or, resuming at checkpoint `step` > 0, continue) one run in each chosen
    tracker, named `name`, else after the run directory. A tracker that is not installed
    is a ConfigError naming the extra to install, raised before any other tracker starts."""
    names = tracker_names(report_to)
    for n in names:
        _require(n, n)
    if not names:
        return Trackers(warn=warn)
    resume = read_resume(run_dir, step)
    opened: dict[str, Tracker] = {}
    name = name or Path(run_dir).resolve().name
    flat = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
            for k, v in config.items()}
    n = ""
    try:
        for n in names:
            opened[n] = ADAPTERS[n](Path(run_dir), name, flat, resume)
    except Exception as e:  # a tracker's own setup error (store URI, login): one line
        Trackers(opened).finish()
        raise ConfigError(f"report_to: {n} could not start a run: {first_line(e)}") from None
    except BaseException:
        Trackers(opened).finish()
        raise
    _save_state(run_dir, opened, resume)
    return Trackers(opened, warn)
