"""gft/tracking.py: each tracker, through its own client, holds the numbers of
metrics.jsonl and the sample completions; read back with each library's own reader."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gft.errors import ConfigError
from gft.tracking import (SAMPLE_COLUMNS, Trackers, open_trackers, scalars, tracker_names,
                          tracker_numbers, wandb_init_args)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [  # what gft/loop.py writes to metrics.jsonl: step 0's evaluation, then steps
    {"step": 0, "eval/accuracy": 0.25, "eval/reward": 0.5, "eval/n": 4.0},
    {"step": 1, "loss": 1.5, "reward/rollout": 0.25, "grad_norm": 2.0, "entropy": None,
     "preset": "gft", "stage": 0, "lr": 0.5, "learning_rate": 0.5, "reward": 0.25},
    {"step": 2, "loss": 1.25, "reward/rollout": 0.5, "grad_norm": 1.5, "entropy": 3.0,
     "preset": "gft", "stage": 0, "lr": 0.25, "learning_rate": 0.25, "reward": 0.5},
]
SAMPLE = {"step": 2, "prompt": [{"role": "user", "content": "2+2?"}], "completion": "4",
          "reward": 1.0, "answer": "4"}


def expected(train_prefix: bool = False, global_step: bool = False
             ) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every number the trackers must hold; train_prefix: TRL's
    names under train/, as transformers' callbacks write them (TensorBoard, W&B, trackio);
    global_step: train/global_step as well, TRL runs' x-axis in W&B and trackio."""
    out = {(r["step"], k): v for r in RECORDS
           for k, v in tracker_numbers(scalars(r), train_prefix).items()}
    return out | ({(r["step"], "train/global_step"): r["step"] for r in RECORDS}
                  if global_step else {})


def log_all(trackers: Trackers) -> None:
    for record in RECORDS:
        trackers.log(record)
    trackers.log_samples([SAMPLE], 2)
    trackers.finish()


def test_scalars_are_the_numbers_of_a_metrics_line():
    assert scalars(RECORDS[1]) == {"loss": 1.5, "reward/rollout": 0.25, "grad_norm": 2.0,
                                   "stage": 0.0, "lr": 0.5, "learning_rate": 0.5,
                                   "reward": 0.25}  # no text, no null, no step


def test_trl_names_go_where_transformers_callbacks_put_a_trl_runs():
    """A TRL run's W&B, TensorBoard and trackio charts are train/loss, train/learning_rate,
    train/reward (transformers' rewrite_logs); MLflow's callback adds no prefix. gft's own
    names stay as they were, so a resumed run's charts are not split."""
    numbers = scalars(RECORDS[1])
    # MLflow's file store cannot hold `reward` beside `reward/rollout` (a file and a folder)
    assert tracker_numbers(numbers, train_prefix=False) == {
        k: v for k, v in numbers.items() if k != "reward"}
    assert tracker_numbers(numbers, train_prefix=True) == {
        "loss": 1.5, "train/loss": 1.5, "reward/rollout": 0.25, "grad_norm": 2.0,
        "train/grad_norm": 2.0, "stage": 0.0, "lr": 0.5, "train/learning_rate": 0.5,
        "train/reward": 0.25}
    from transformers.integrations.integration_utils import rewrite_logs
    trl = {"loss": 1.5, "grad_norm": 2.0, "learning_rate": 0.5, "reward": 0.25}
    assert rewrite_logs(trl).items() <= tracker_numbers(numbers, train_prefix=True).items()


def test_report_to_names(tmp_path):
    assert tracker_names([]) == [] and tracker_names("none") == []
    assert tracker_names("wandb") == ["wandb"]
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        tracker_names(["tensorbord"])
    from gft.config import build_config
    assert build_config({"report_to": ["tensorboard", "trackio"]}).report_to == \
        ["tensorboard", "trackio"]
    with pytest.raises(ConfigError, match="report_to"):
        build_config({"report_to": ["neptune"]})


def test_a_tracker_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r"wandb is not installed; pip install 'gft\[wandb\]'"):
        open_trackers(["tensorboard", "wandb"], tmp_path, {})
    assert not (tmp_path / "tensorboard").exists(), "nothing starts before the check"


def read_tensorboard(logdir: Path) -> tuple[dict[tuple[int, str], float], dict[str, str]]:
    """(step, tag) -> number, tag -> text, as `tensorboard --load_fast=false` reads them
    (the plugin accumulator; the legacy one does not purge tensor summaries on a restart)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import \
        EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})  # all, not 10 a tag
    acc.Reload()
    numbers, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            value = make_ndarray(event.tensor_proto)
            if value.dtype.kind == "f":
                assert (event.step, tag) not in numbers, f"step {event.step} twice: {tag}"
                numbers[(event.step, tag)] = float(value)
            else:
                texts[tag] = value.item().decode()
    return numbers, texts


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    log_all(open_trackers(["tensorboard"], tmp_path, {"tau": 0.1, "rewards": ["math"]}))
    numbers, texts = read_tensorboard(tmp_path / "tensorboard")
    assert numbers == pytest.approx(expected(train_prefix=True))
    assert numbers[1, "train/learning_rate"] == numbers[1, "lr"] == 0.5  # TRL's chart, gft's
    assert "| step | prompt | completion | reward | answer |" in texts["samples"]
    assert "user: 2+2?" in texts["samples"] and "| tau | 0.1 |" in texts["config"]


def wandb_records(run_file: str) -> list:
    """The records of an offline W&B run file: a LevelDB-format log (32 KiB blocks, each
    record chunk behind a 7-byte header: crc32, length, type) of wandb protobuf Records,
    after W&B's 7-byte file header. wandb 0.31 ships no Python reader for it (its Go core
    reads it); the protobuf Record class is wandb's own."""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunk, out = Path(run_file).read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
        elif kind == 0 and length == 0:  # zero-filled: the end
            break
    return out


def wandb_history(run_file: str) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history record of an offline W&B run file."""
    out = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            out.append((items.pop("_step"), items))
    return out


def test_offline_wandb_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "gft-test")
    log_all(open_trackers(["wandb"], tmp_path, {"tau": 0.1}))
    [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb's core process writes the run file behind run.finish(); its last record
    # ("exit") says it is complete
    for _ in range(300):
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
            break
        time.sleep(0.1)
    numbers, tables = {}, []
    for step, items in wandb_history(run_file):
        numbers.update({(step, k): v for k, v in items.items()
                        if not k.startswith(("_", "samples"))})
        if items.get("samples/_type") == "table-file":
            tables.append((step, items["samples/path"], items["samples/nrows"]))
    assert numbers == pytest.approx(expected(train_prefix=True, global_step=True))
    assert tables and tables[0][0] == 2 and tables[0][2] == 1
    table = json.loads(next((tmp_path / "wandb").glob(f"offline-run-*/files/{tables[0][1]}"))
                       .read_text())
    assert table["columns"] == list(SAMPLE_COLUMNS) and table["data"][0][2] == "4"


TRACKIO_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.test_tracking import log_all
    from gft.tracking import open_trackers
    log_all(open_trackers(["trackio"], Path(sys.argv[1]), {"tau": 0.1}))
    from trackio.sqlite_storage import SQLiteStorage
    print("LOGS " + json.dumps(SQLiteStorage.get_logs("gft-test", Path(sys.argv[1]).name)))
""")


def test_trackio_local_run_holds_the_metrics(tmp_path):
    """In a fresh process: trackio reads TRACKIO_DIR (its local store) when imported."""
    pytest.importorskip("trackio")
    run_dir = tmp_path / "run-a"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"),
           "TRACKIO_PROJECT": "gft-test"}
    proc = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(run_dir), str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("LOGS ")]
    logs = json.loads(line[5:])
    numbers = {(r["step"], k): v for r in logs for k, v in r.items()
               if k not in ("step", "timestamp", "samples") and isinstance(v, (int, float))}
    assert numbers == pytest.approx(expected(train_prefix=True, global_step=True))
    [table] = [r["samples"] for r in logs if "samples" in r]
    assert table["_type"] == "trackio.table" and table["_value"][0]["completion"] == "4"


def test_mlflow_run_holds_the_metrics(tmp_path, monkeypatch):
    """mlflow is an optional extra, not in the dev one: this runs where it is installed."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    trackers = open_trackers(["mlflow"], tmp_path, {"tau": 0.1})
    run_id = trackers.trackers["mlflow"].run.info.run_id
    log_all(trackers)
    client = mlflow.MlflowClient()
    numbers = {(m.step, key): m.value for key in {k for _, k in expected()}
               for m in client.get_metric_history(run_id, key)}
    assert numbers == pytest.approx(expected())
    assert client.get_run(run_id).data.params["tau"] == "0.1"


@pytest.mark.slow
def test_gft_train_reports_what_metrics_jsonl_holds(tmp_path):
    """End to end: a short `gft train` with report_to tensorboard and an offline W&B run;
    both hold every number of metrics.jsonl (TRL's names under train/)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "gft", "train", "-o", str(run), "--max-steps", "3",
         "--set", "report_to=[tensorboard,wandb]", "--set", "eval_samples=8",
         "--set", "sample_every=1", "--backend", "torch"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = {(r["step"], k): v for r in records
            for k, v in tracker_numbers(scalars(r), train_prefix=True).items()}
    assert any(k == "train/learning_rate" for _, k in want)
    numbers, texts = read_tensorboard(run / "tensorboard")
    assert numbers == pytest.approx(want, rel=1e-6)  # float32 in the event file
    assert texts["samples"].count("\n") >= 2
    [run_file] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = {(step, k): v for step, items in wandb_history(run_file)
              for k, v in items.items() if not k.startswith(("_", "samples"))}
    assert {k: v for k, v in logged.items() if k in want} == pytest.approx(want)
    assert set(want) <= set(logged)


# ---- resuming: each step appears once in every tracker ---------------------------------

def _record(step: int, value: float) -> dict:
    return {"step": step, "loss": value, "preset": "gft"}


def _first_process(run_dir: Path, report_to: list[str], sent: int = 7) -> None:
    """A run that logged steps 0..7 to metrics.jsonl, as the loop does, and was then
    killed; its checkpoint is older (resumed at step 5 below). Its trackers got steps
    0..sent: a client that buffers loses its last steps to a hard kill."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trackers = open_trackers(report_to, run_dir, {"tau": 0.1})
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in range(8):
            f.write(json.dumps(_record(step, float(step))) + "\n")
            if step <= sent:
                trackers.log(_record(step, float(step)))
    trackers.finish()


def _resumed_process(run_dir: Path, report_to: list[str], config=None) -> Trackers:
    """Resumed from the checkpoint of step 5: redoes 6.. with other values (+100)."""
    trackers = open_trackers(report_to, run_dir, config or {"tau": 0.1}, step=5)
    for step in range(6, 10):
        trackers.log(_record(step, 100.0 + step))
    return trackers


def test_tensorboard_resume_shows_each_step_once_with_the_redone_values(tmp_path):
    """TensorBoard's reader drops the stopped process's steps after the checkpoint (6, 7)
    when the new event file starts with SessionLog(START) at step 6. This is the reader
    of `tensorboard --load_fast=false` (the plugin accumulator: the legacy one purges only
    TF1 summaries); the default Rust reader also drops a series' steps when it goes back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import \
        EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    _first_process(tmp_path, ["tensorboard"])
    time.sleep(1.1)  # event file names carry the second they were opened in
    _resumed_process(tmp_path, ["tensorboard"]).finish()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()  # tensors: 0 keeps every event (the default samples 10 per tag)
    loss = [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
    assert loss == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 10)]
    assert len(acc.Tensors("config")) == 2  # step 0's and the resume's (step 6)


def _wandb_env(monkeypatch, tmp_path):
    """W&B's settings for an offline test run. wandb reads its environment once per
    process, when its singleton starts: teardown() makes the next init read it again."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "gft-test")
    for key in ("WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RESUME_FROM",
                "WANDB_DIR", "WANDB_FORK_FROM"):
        monkeypatch.delenv(key, raising=False)


def _wandb_run_files(run_dir: Path) -> list[str]:
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    for run_file in files:  # the core process writes behind finish(); "exit" ends a file
        for _ in range(300):
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
                break
            time.sleep(0.1)
    # in start order: a run dir opened in the same second as another of the same id is
    # named "<...>-<id>-1", which sorts before "<...>-<id>/"
    return sorted(files, key=lambda f: _wandb_run_record(f).start_time.ToNanoseconds())


def _wandb_run_record(run_file: str):
    return next(r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run")


def test_offline_wandb_resume_continues_the_run(tmp_path, monkeypatch):
    """The resumed process continues the same W&B run (its id kept in trackers.json,
    resume="allow"; `wandb sync` joins offline runs by id). Offline, W&B cannot say which
    steps it holds (the resumed run's starting step is 0): every redone step is sent."""
    _wandb_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_NAME", "named-by-the-user")  # wins over the run directory
    _first_process(tmp_path, ["wandb"])
    monkeypatch.delenv("WANDB_NAME")
    __import__("wandb").teardown()
    _resumed_process(tmp_path, ["wandb"]).finish()
    first, second = _wandb_run_files(tmp_path)
    one, two = _wandb_run_record(first), _wandb_run_record(second)
    assert one.display_name == "named-by-the-user" and two.run_id == one.run_id
    assert two.resume and json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"] \
        == one.run_id
    assert [s for s, _ in wandb_history(first)] == list(range(8))
    assert [(s, items["loss"]) for s, items in wandb_history(second)] == \
        [(s, 100.0 + s) for s in range(6, 10)]


def test_wandb_rewind_set_by_the_user_gets_every_redone_step(tmp_path, monkeypatch):
    """WANDB_RESUME_FROM (W&B's rewind, which truncates the run on its side): gft passes
    no id or resume of its own (they would clash with it) and sends steps 6.. again."""
    _wandb_env(monkeypatch, tmp_path)
    _first_process(tmp_path, ["wandb"])
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"]
    monkeypatch.setenv("WANDB_RESUME_FROM", f"{run_id}?_step=5")
    __import__("wandb").teardown()
    _resumed_process(tmp_path, ["wandb"]).finish()
    second = _wandb_run_files(tmp_path)[-1]
    assert _wandb_run_record(second).branch_point.value == 5
    assert [s for s, _ in wandb_history(second)] == [6, 7, 8, 9]


@pytest.mark.parametrize("environ, missing", [
    ({}, set()),
    ({"WANDB_NAME": "x", "WANDB_PROJECT": "p", "WANDB_DIR": "/d"}, {"name", "project", "dir"}),
    ({"WANDB_RUN_ID": "mine"}, {"id", "resume"}),
    ({"WANDB_RESUME": "must"}, {"id", "resume"}),
    ({"WANDB_RESUME_FROM": "abc?_step=5"}, {"id", "resume"}),
    ({"WANDB_FORK_FROM": "abc?_step=5"}, {"id", "resume"}),
])
def test_wandb_settings_from_the_environment_are_not_overridden(environ, missing):
    """wandb.init's arguments override its environment variables (wandb's Settings), so
    gft passes none of those the user set."""
    args = wandb_init_args(Path("/runs/r"), "r", "stored-id", environ)
    everything = {"project": "gft", "name": "r", "dir": "/runs/r", "id": "stored-id",
                  "resume": "allow"}
    assert args == {k: v for k, v in everything.items() if k not in missing}


def test_mlflow_resume_continues_the_run_once_per_step_and_a_changed_param(tmp_path,
                                                                            monkeypatch):
    """The resumed process logs into the same MLflow run from the step after the last one
    MLflow holds (6: step 7 never reached it), so each step is there once; a config value
    changed on resume (MLflow params are immutable) does not stop it."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _first_process(tmp_path, ["mlflow"], sent=6)
    trackers = _resumed_process(tmp_path, ["mlflow"], {"tau": 0.2, "run_name": "x"})
    run_id = trackers.trackers["mlflow"].run.info.run_id
    trackers.finish()
    client = mlflow.MlflowClient()
    [run] = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.run_id == run_id
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(s, float(s)) for s in range(7)] + [(s, 100.0 + s) for s in (7, 8, 9)]
    assert run.data.params == {"tau": "0.1", "run_name": "x"}


def test_an_mlflow_run_missing_from_this_store_says_a_new_one_starts(tmp_path, monkeypatch,
                                                                     capsys):
    """A run copied to a machine whose MLflow store lacks its run: it logs to a new MLflow
    run, and says so (it did in silence)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _first_process(tmp_path, ["mlflow"], sent=6)
    first = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "other-store").as_uri())
    trackers = _resumed_process(tmp_path, ["mlflow"])
    assert trackers.trackers["mlflow"].run_id != first
    trackers.finish()
    said = capsys.readouterr().err
    assert f"the run's MLflow run {first} is not in this tracking store" in said


def test_mlflow_run_id_set_by_the_user_is_continued_once_per_step(tmp_path, monkeypatch):
    """MLFLOW_RUN_ID (mlflow's own variable) picks the run; gft still sends only the
    steps after the last one it holds."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _first_process(tmp_path, ["mlflow"])
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["id"]
    (tmp_path / "trackers.json").unlink()
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    _resumed_process(tmp_path, ["mlflow"]).finish()
    history = sorted((m.step, m.value)
                     for m in mlflow.MlflowClient().get_metric_history(run_id, "loss"))
    assert history == [(s, float(s)) for s in range(8)] + [(8, 108.0), (9, 109.0)]


TRACKIO_RESUME = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.test_tracking import _first_process, _resumed_process
    run_dir = Path(sys.argv[1])
    # another run directory of the same name, elsewhere, logged further (steps to 11):
    # resumed by name, run-a would have continued it (found in review)
    from gft.tracking import open_trackers
    other = open_trackers(["trackio"], run_dir.parent / "elsewhere" / run_dir.name, {})
    for step in range(12):
        other.log({"step": step, "loss": -1.0})
    other.finish()
    _first_process(run_dir, ["trackio"], sent=6)
    _resumed_process(run_dir, ["trackio"]).finish()
    from trackio.sqlite_storage import SQLiteStorage
    runs = [r["name"] for r in SQLiteStorage.get_run_records("gft-test")]
    name = json.loads((run_dir / "trackers.json").read_text())["trackio"]["id"]
    logs = SQLiteStorage.get_logs("gft-test", name)
    print("LOGS " + json.dumps({"runs": runs, "name": name,
                                "loss": [[r["step"], r["loss"]] for r in logs]}))
""")


def test_trackio_resume_continues_the_run_once_per_step(tmp_path):
    """As for MLflow: trackio is sent the steps after the last one its store holds."""
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"),
           "TRACKIO_PROJECT": "gft-test"}
    proc = subprocess.run([sys.executable, "-c", TRACKIO_RESUME, str(tmp_path / "run-a"),
                           str(ROOT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("LOGS ")]
    got = json.loads(line[5:])
    assert sorted(got["runs"]) == ["run-a", "run-a-2"]  # this one continued, under its
    assert got["name"] == "run-a-2"                      # own name: the other untouched
    assert got["loss"] == [[s, float(s)] for s in range(7)] + [[s, 100.0 + s] for s in (7, 8, 9)]


def test_a_tracker_left_out_on_one_resume_continues_its_run_when_named_again(tmp_path,
                                                                              monkeypatch):
    _wandb_env(monkeypatch, tmp_path)
    _first_process(tmp_path, ["wandb"])
    first_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"]
    open_trackers(["tensorboard"], tmp_path, {}, step=5).finish()  # W&B not named
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"] == first_id
    trackers = open_trackers(["wandb"], tmp_path, {}, step=5)
    assert trackers.trackers["wandb"].run_id == first_id
    trackers.finish()


def test_a_run_that_starts_over_from_step_0_starts_new_tracker_runs(tmp_path, monkeypatch):
    """Killed before its first checkpoint, a run starts again at step 0: nothing of the
    earlier attempt is continued (TensorBoard drops all of it, START at step 0)."""
    _wandb_env(monkeypatch, tmp_path)
    _first_process(tmp_path, ["wandb"])
    first_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"]
    trackers = open_trackers(["wandb"], tmp_path, {}, step=0)
    assert trackers.trackers["wandb"].run_id != first_id
    trackers.finish()


# ---- a tracker that fails -----------------------------------------------------------

class _Fake:
    run_id, skip_through, train_prefix = "fake", -1, False

    def __init__(self, fail_at: int | None = None, fail_finish: bool = False):
        self.steps, self.fail_at, self.fail_finish, self.finished = [], fail_at, fail_finish, 0

    def log(self, metrics, step):
        if step == self.fail_at:
            raise ConnectionError("connection reset by peer\nmore detail")
        self.steps.append(step)

    def log_samples(self, rows, step):
        self.log({}, step)

    def finish(self):
        self.finished += 1
        if self.fail_finish:
            raise OSError("disk full")


def test_a_tracker_that_fails_is_reported_once_and_dropped_the_others_go_on():
    warnings = []
    bad, good = _Fake(fail_at=2), _Fake()
    trackers = Trackers({"wandb": bad, "tensorboard": good}, warn=warnings.append)
    for step in range(5):
        trackers.log(_record(step, 1.0))
        trackers.log_samples([SAMPLE], step)
    trackers.finish()
    assert good.steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and bad.steps == [0, 0, 1, 1]
    assert warnings == ["report_to: wandb failed at step 2 (connection reset by peer); "
                        "training goes on without it (metrics.jsonl has every step)"]
    assert good.finished == 1 and bad.finished == 0  # a dropped tracker is not touched again


def test_a_tracker_that_fails_to_finish_does_not_raise():
    """trackers.finish() runs before the final checkpoint is written (gft/run.py)."""
    warnings = []
    failing, other = _Fake(fail_finish=True), _Fake()
    Trackers({"mlflow": failing, "trackio": other}, warn=warnings.append).finish()
    assert other.finished == 1
    assert warnings == ["report_to: mlflow failed to finish its run (disk full)"]


# ---- TRL's keys -----------------------------------------------------------------------

def test_report_to_all_is_refused_naming_what_is_installed(monkeypatch):
    import gft.tracking
    monkeypatch.setattr(gft.tracking, "installed_trackers", lambda: ["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"'report_to': 'all' is not taken .* \(installed "
                                          r"here: tensorboard, wandb\)"):
        tracker_names("all")


def test_run_name_is_a_gft_key_that_names_the_tracker_run(tmp_path, monkeypatch):
    from gft.config import build_config
    assert build_config({"run_name": "my-grpo"}).run_name == "my-grpo"
    _wandb_env(monkeypatch, tmp_path)
    trackers = open_trackers(["wandb"], tmp_path, {}, name="my-grpo")
    trackers.finish()
    [run_file] = _wandb_run_files(tmp_path)
    assert _wandb_run_record(run_file).display_name == "my-grpo"


@pytest.mark.slow
def test_gft_train_resumed_after_a_crash_reports_each_step_once(tmp_path, monkeypatch):
    """Through `gft train` (~40 s): a run that dies in step 6 (checkpoint at step 4, step
    5 logged) is resumed; TensorBoard holds each step once with the values of
    metrics.jsonl; the offline W&B run is continued (same id, named run_name)."""
    pytest.importorskip("torch")
    from click.testing import CliRunner
    from backends.torch_backend import TorchBackend
    from cli import main
    from tests.test_reliability import train_args, write_fixture
    _wandb_env(monkeypatch, tmp_path)
    model, data = write_fixture(tmp_path)
    run = tmp_path / "run"
    args = train_args(model, data, steps=8) + [
        "-o", str(run), "--set", "save_every=4", "--set", "report_to=[tensorboard,wandb]",
        "--set", "run_name=my-run"]
    original, calls = TorchBackend.train_step, []

    def train_step(self, *a, **kw):  # 2 updates per step: call 11 is step 6's first
        calls.append(1)
        if len(calls) == 11:
            raise RuntimeError("the machine went away")
        return original(self, *a, **kw)
    monkeypatch.setattr(TorchBackend, "train_step", train_step)
    crashed = CliRunner().invoke(main, ["train", *args])
    assert crashed.exit_code != 0 and "went away" in str(crashed.exception)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == list(range(6))
    monkeypatch.setattr(TorchBackend, "train_step", original)
    __import__("wandb").teardown()
    resumed = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = {(r["step"], k): v for r in records
            for k, v in tracker_numbers(scalars(r), train_prefix=True).items()}
    numbers, _ = read_tensorboard(run / "tensorboard")
    assert numbers == pytest.approx(want, rel=1e-6)
    files = _wandb_run_files(run)
    assert [_wandb_run_record(f).display_name for f in files] == ["my-run", "my-run"]
    assert len({_wandb_run_record(f).run_id for f in files}) == 1
    assert [s for s, _ in wandb_history(files[1])] == list(range(5, 9))  # offline: all


@pytest.mark.parametrize("key", ["logging_dir", "logging_strategy", "logging_first_step"])
def test_transformers_logging_keys_point_at_what_gft_does(key):
    """Without a hint, logging_dir was an unknown key with did-you-mean 'logging_steps'."""
    from gft.config import build_config
    with pytest.raises(ConfigError, match=f"unknown key '{key}': gft (writes|logs|always)"):
        build_config({key: "x"})
