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
from gft.tracking import SAMPLE_COLUMNS, Trackers, open_trackers, scalars, tracker_names

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [  # what gft/loop.py writes to metrics.jsonl: step 0's evaluation, then steps
    {"step": 0, "eval/accuracy": 0.25, "eval/reward": 0.5, "eval/n": 4.0},
    {"step": 1, "loss": 1.5, "reward/rollout": 0.25, "grad_norm": 2.0, "entropy": None,
     "preset": "gft", "stage": 0},
    {"step": 2, "loss": 1.25, "reward/rollout": 0.5, "grad_norm": 1.5, "entropy": 3.0,
     "preset": "gft", "stage": 0},
]
SAMPLE = {"step": 2, "prompt": [{"role": "user", "content": "2+2?"}], "completion": "4",
          "reward": 1.0, "answer": "4"}


def expected() -> dict[tuple[int, str], float]:
    """(step, key) -> value of every number the trackers must hold."""
    return {(r["step"], k): v for r in RECORDS for k, v in scalars(r).items()}


def log_all(trackers: Trackers) -> None:
    for record in RECORDS:
        trackers.log(record)
    trackers.log_samples([SAMPLE], 2)
    trackers.finish()


def test_scalars_are_the_numbers_of_a_metrics_line():
    assert scalars(RECORDS[1]) == {"loss": 1.5, "reward/rollout": 0.25, "grad_norm": 2.0,
                                   "stage": 0.0}  # no text, no null, no step


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
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    numbers, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            value = make_ndarray(event.tensor_proto)
            if value.dtype.kind == "f":
                numbers[(event.step, tag)] = float(value)
            else:
                texts[tag] = value.item().decode()
    return numbers, texts


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    log_all(open_trackers(["tensorboard"], tmp_path, {"tau": 0.1, "rewards": ["math"]}))
    numbers, texts = read_tensorboard(tmp_path / "tensorboard")
    assert numbers == pytest.approx(expected())
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
    assert numbers == pytest.approx(expected())
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
    assert numbers == pytest.approx(expected())
    [table] = [r["samples"] for r in logs if "samples" in r]
    assert table["_type"] == "trackio.table" and table["_value"][0]["completion"] == "4"


def test_mlflow_run_holds_the_metrics(tmp_path, monkeypatch):
    """mlflow is an optional extra, not in the dev one: this runs where it is installed."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    trackers = open_trackers(["mlflow"], tmp_path, {"tau": 0.1})
    run_id = trackers.trackers[0].run.info.run_id
    log_all(trackers)
    client = mlflow.MlflowClient()
    numbers = {(m.step, key): m.value for key in {k for _, k in expected()}
               for m in client.get_metric_history(run_id, key)}
    assert numbers == pytest.approx(expected())
    assert client.get_run(run_id).data.params["tau"] == "0.1"


@pytest.mark.slow
def test_gft_train_reports_what_metrics_jsonl_holds(tmp_path):
    """End to end: a short `gft train` with report_to tensorboard and an offline W&B run;
    both hold every number of metrics.jsonl."""
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
    want = {(r["step"], k): v for r in records for k, v in scalars(r).items()}
    numbers, texts = read_tensorboard(run / "tensorboard")
    assert numbers == pytest.approx(want, rel=1e-6)  # float32 in the event file
    assert texts["samples"].count("\n") >= 2
    [run_file] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = {(step, k): v for step, items in wandb_history(run_file)
              for k, v in items.items() if not k.startswith(("_", "samples"))}
    assert {k: v for k, v in logged.items() if k in want} == pytest.approx(want)
    assert set(want) <= set(logged)
