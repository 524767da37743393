"""Checkpoint files: atomic writes, leftovers of killed writers, the `latest` pointer,
pruning, checks of model and optimizer files, and no pickle anywhere.

A fake backend writes small files, so these tests need neither torch nor mlx.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gft.checkpoint import (STATE_FILE, CheckpointError, atomic_directory, clean_leftovers,
                            latest_checkpoint, read_state, save_checkpoint, save_step_checkpoint,
                            ResumePoint, find_resume_point)
from gft.modelfiles import (OPTIMIZER_FILE, check_model_dir, check_optimizer_state,
                            read_safetensors_header)
from gft.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


class FakeBackend:
    """Writes what a real backend writes: config.json, model.safetensors, optimizer."""
    name = "fake"

    def __init__(self, value: float = 0.0, fail_after_bytes: int | None = None):
        self.value, self.fail = value, fail_after_bytes

    def save_model(self, path: Path) -> None:
        (path / "config.json").write_text('{"model_type": "llama"}')
        save_file({"w": np.full((4, 3), self.value, np.float32)}, str(path / "model.safetensors"))
        if self.fail is not None:  # a disk that fills up in the middle of a file
            with open(path / "model.safetensors", "r+b") as f:
                f.truncate(self.fail)
            raise OSError(28, "No space left on device", str(path / "model.safetensors"))

    def save_optimizer(self, path: Path) -> None:
        save_file({"exp_avg.w": np.zeros((4, 3), np.float32),
                   "exp_avg_sq.w": np.zeros((4, 3), np.float32)}, str(path))


def state(step: int) -> dict:
    return {"loop": {"step": step}, "config": {}, "backend": "fake"}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def weights(checkpoint: Path) -> float:
    from safetensors.numpy import load_file
    return float(load_file(str(checkpoint / "model.safetensors"))["w"][0, 0])


# ---------------------------------------------------------------------------------------
# Atomic saves and leftovers


def test_save_step_checkpoints_latest_and_keep(tmp_path):
    for step in range(1, 5):
        save_step_checkpoint(FakeBackend(step), tmp_path, step, state(step), keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path) == root / "step-000004"
    assert read_state(root / "step-000004")["loop"]["step"] == 4


def test_failed_write_leaves_the_previous_checkpoint_and_no_temp_dir(tmp_path):
    save_step_checkpoint(FakeBackend(1.0), tmp_path, 1, state(1), keep=2)
    with pytest.raises(CheckpointError) as err:
        save_step_checkpoint(FakeBackend(2.0, fail_after_bytes=20), tmp_path, 2, state(2), keep=2)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message
    assert "step-000001 is intact" in message and "gft train --resume" in message
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
    assert latest_checkpoint(tmp_path) == root / "step-000001" and weights(root / "step-000001") == 1.0


def _safetensors_error(message):
    from safetensors import SafetensorError
    return SafetensorError(message)


@pytest.mark.parametrize("error, words", [
    # what safetensors and mlx raise on a full disk (seen on a full tmpfs): not OSError
    (lambda: _safetensors_error("Error while serializing: I/O error: No space left on device "
                                "(os error 28)"), "No space left on device (os error 28)"),
    (lambda: RuntimeError("[write] Unable to write 2951518 bytes to file."), "Unable to write"),
])
def test_library_full_disk_errors_are_checkpoint_errors(tmp_path, error, words):
    class Full(FakeBackend):
        def save_optimizer(self, path):
            raise error()
    with pytest.raises(CheckpointError, match=re.escape(words)):
        save_checkpoint(Full(), tmp_path / "final", state(3))
    assert not list(tmp_path.iterdir())


def test_other_errors_are_not_disguised(tmp_path):
    class Buggy(FakeBackend):
        def save_optimizer(self, path):
            raise KeyError("bug")
    with pytest.raises(KeyError):
        save_checkpoint(Buggy(), tmp_path / "final", state(3))


def test_killed_writer_leftovers_are_ignored_then_cleaned(tmp_path):
    """A SIGKILL mid-save leaves `.step-N.tmp-PID`: resume never reads it, the next save
    removes it (and a half-deleted `.del-` directory)."""
    save_step_checkpoint(FakeBackend(1.0), tmp_path, 1, state(1), keep=5)
    root = tmp_path / "checkpoints"
    pid = dead_pid()
    for name in (f".step-000002.tmp-{pid}", f".step-000000.del-{pid}"):
        (root / name).mkdir()
        (root / name / STATE_FILE).write_text(json.dumps(state(2)))  # looks complete
    assert latest_checkpoint(tmp_path) == root / "step-000001"
    save_step_checkpoint(FakeBackend(2.0), tmp_path, 2, state(2), keep=5)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]


def test_leftovers_of_a_running_process_are_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".step-000002.tmp-{live.pid}").mkdir()
        assert clean_leftovers(tmp_path) == []
        assert (tmp_path / f".step-000002.tmp-{live.pid}").exists()
    finally:
        live.kill()
        live.wait()


def test_replacement_cut_short_between_renames_is_restored(tmp_path):
    """Replacing final/ renames the old one aside first; a crash before the new one lands
    leaves only `.final.old-PID`, which resume puts back."""
    save_checkpoint(FakeBackend(1.0), tmp_path / "final", state(5))
    (tmp_path / "final").rename(tmp_path / f".final.old-{dead_pid()}")
    assert latest_checkpoint(tmp_path) is None
    clean_leftovers(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    assert weights(tmp_path / "final") == 1.0


def test_replacing_a_directory(tmp_path):
    save_checkpoint(FakeBackend(1.0), tmp_path / "final", state(5))
    save_checkpoint(FakeBackend(2.0), tmp_path / "final", state(7))
    assert weights(tmp_path / "final") == 2.0 and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_failed_replacement_keeps_the_old_directory(tmp_path):
    save_checkpoint(FakeBackend(1.0), tmp_path / "final", state(5))

    def write(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic_directory(tmp_path / "final", write)
    assert weights(tmp_path / "final") == 1.0 and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_latest_prefers_the_later_step_of_final_and_pointer(tmp_path):
    # a finished run (final at step 4) resumed with more steps and killed at step 6
    save_checkpoint(FakeBackend(4.0), tmp_path / "final", state(4))
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    save_step_checkpoint(FakeBackend(6.0), tmp_path, 6, state(6), keep=2)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000006"


def test_checkpoints_after_the_saved_step_are_never_deleted(tmp_path):
    """A checkpoint numbered after the one being saved is never pruned: resume starts from
    the newest complete one, so a newer one is incomplete and left for the user."""
    for step in (2, 4):
        save_step_checkpoint(FakeBackend(step), tmp_path, step, state(step), keep=1)
    save_checkpoint(FakeBackend(9.0), tmp_path / "checkpoints" / "step-000009", state(9))
    save_step_checkpoint(FakeBackend(3.0), tmp_path, 3, state(3), keep=1)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003", "step-000004",
                                                       "step-000009"]
    assert latest_checkpoint(tmp_path) == root / "step-000009"


@pytest.mark.parametrize("pointer", [None, "step-000007\n", "step-000001\n", "garbage"])
def test_latest_is_the_newest_complete_checkpoint_whatever_the_pointer_says(tmp_path, pointer):
    for step in (1, 2, 3):
        save_step_checkpoint(FakeBackend(step), tmp_path, step, state(step), keep=5)
    latest = tmp_path / "checkpoints" / "latest"
    latest.unlink() if pointer is None else latest.write_text(pointer)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000003"
    point = find_resume_point(tmp_path)
    assert point == ResumePoint(tmp_path / "checkpoints" / "step-000003", True, [])


def _three_steps(tmp_path):
    for step in (1, 2):
        save_step_checkpoint(FakeBackend(step), tmp_path, step, state(step), keep=5)
    return tmp_path / "checkpoints"


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / OPTIMIZER_FILE).unlink(), "step-000002/optimizer.safetensors: missing"),
    (lambda c: (c / OPTIMIZER_FILE).write_bytes(b"\x00" * 5),
     "step-000002/optimizer.safetensors: corrupted or truncated safetensors file"),
    (lambda c: (c / STATE_FILE).unlink(), "step-000002/trainer_state.json: missing"),
    (lambda c: (c / STATE_FILE).write_text("{not json"),
     "step-000002/trainer_state.json: unreadable trainer state"),
    (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    (lambda c: (c / "config.json").unlink(), "step-000002/config.json: missing"),
])
def test_incomplete_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage,
                                                                          problem):
    root = _three_steps(tmp_path)
    damage(root / "step-000002")
    point = find_resume_point(tmp_path)
    assert point.checkpoint == root / "step-000001" and point.load_optimizer
    assert len(point.notes) == 1 and problem in point.notes[0], point.notes
    assert point.notes[0].startswith("warning: step-000002 is incomplete (")
    assert "resuming from the previous complete checkpoint step-000001" in point.notes[0]
    # the next save of an earlier step leaves it alone
    save_step_checkpoint(FakeBackend(1.5), tmp_path, 1, state(1), keep=1)
    assert (root / "step-000002").is_dir()


def test_missing_optimizer_with_nothing_older_is_an_error_naming_the_key(tmp_path):
    save_step_checkpoint(FakeBackend(1.0), tmp_path, 1, state(1), keep=5)
    (tmp_path / "checkpoints" / "step-000001" / OPTIMIZER_FILE).unlink()
    with pytest.raises(ModelError) as e:
        find_resume_point(tmp_path)
    assert str(e.value) == (f"cannot resume: {tmp_path}/checkpoints/step-000001/"
                            "optimizer.safetensors: missing; to continue from step-000001 with "
                            "fresh optimizer state, add --set reset_optimizer=true")
    point = find_resume_point(tmp_path, reset_optimizer=True)
    assert point.checkpoint == tmp_path / "checkpoints" / "step-000001"
    assert not point.load_optimizer
    assert point.notes == [f"{tmp_path}/checkpoints/step-000001/optimizer.safetensors: missing; "
                           "reset_optimizer=true: continuing from step-000001 with fresh "
                           "optimizer state"]


def test_reset_optimizer_never_excuses_missing_weights(tmp_path):
    save_step_checkpoint(FakeBackend(1.0), tmp_path, 1, state(1), keep=5)
    (tmp_path / "checkpoints" / "step-000001" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model weights .*; no complete checkpoint to resume"):
        find_resume_point(tmp_path, reset_optimizer=True)


# ---------------------------------------------------------------------------------------
# Model and optimizer files


def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    FakeBackend().save_model(path)
    return path


def test_check_model_dir_accepts_a_good_directory_and_hub_ids(tmp_path):
    check_model_dir(model_dir(tmp_path))
    check_model_dir("Qwen/Qwen2.5-0.5B")  # not local: left to the backend


@pytest.mark.parametrize("damage, words", [
    (lambda p: (p / "model.safetensors").unlink(), "no model weights"),
    (lambda p: (p / "config.json").unlink(), "no config.json"),
    (lambda p: open(p / "model.safetensors", "r+b").truncate(60), "truncated"),
    (lambda p: open(p / "model.safetensors", "r+b").truncate(5), "no complete header"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{garbage}".ljust(16)),
     "unreadable header"),
    (lambda p: ((p / "model.safetensors").unlink(), (p / "pytorch_model.bin").write_bytes(b"x")),
     "only pickle weights"),
    (lambda p: (p / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00001-of-00002.safetensors"}}'), "missing"),
])
def test_check_model_dir_errors(tmp_path, damage, words):
    path = model_dir(tmp_path)
    damage(path)
    with pytest.raises(ModelError, match=words) as err:
        check_model_dir(path)
    assert "\n" not in str(err.value)


def test_a_run_directory_given_as_a_model_names_its_final_model(tmp_path):
    """`gft eval runs/x` (for runs/x/final) said only 'no config.json'."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("preset: sft\n")
    with pytest.raises(ModelError, match=rf"a gft run directory, not a model; its trained "
                                         rf"model is {re.escape(str(run / 'final'))}"):
        check_model_dir(run)


def test_a_hugging_face_cache_folder_given_as_a_model_names_its_snapshot(tmp_path):
    """~/.cache/huggingface/hub/models--org--name, as a user finds it there: 'no
    config.json' alone did not say that the model is in snapshots/<revision>."""
    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    with pytest.raises(ModelError, match=rf"cache's folder of org/name, not a model; name it "
                                         rf"by its id \(org/name\) or give its snapshot, "
                                         rf"{re.escape(str(repo / 'snapshots' / '0123abc'))}"):
        check_model_dir(repo)


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        check_model_dir(tmp_path / "nope" / "model")


def test_safetensors_header(tmp_path):
    path = model_dir(tmp_path) / "model.safetensors"
    assert read_safetensors_header(path)["w"]["shape"] == [4, 3]


def test_optimizer_state_must_match_the_model(tmp_path):
    save_checkpoint(FakeBackend(), tmp_path / "ok", state(1))
    check_optimizer_state(tmp_path / "ok")
    save_file({"exp_avg.w": np.zeros((5, 3), np.float32)}, str(tmp_path / "ok" / OPTIMIZER_FILE))
    with pytest.raises(ModelError, match=r"shape \[5, 3\], the model's is \[4, 3\]"):
        check_optimizer_state(tmp_path / "ok")
    save_file({"exp_avg.other": np.zeros((4, 3), np.float32)}, str(tmp_path / "ok" / OPTIMIZER_FILE))
    with pytest.raises(ModelError, match="'other', which the model does not have"):
        check_optimizer_state(tmp_path / "ok")


# ---------------------------------------------------------------------------------------
# Security


def _sources() -> list[Path]:
    return [ROOT / "cli.py", *sorted((ROOT / "gft").rglob("*.py")),
            *sorted((ROOT / "backends").rglob("*.py"))]


def _code(path: Path) -> str:
    """The code tokens of a file, without comments and strings (prose may say "pickle")."""
    import io
    import tokenize
    prose = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    return " ".join(tok.string for tok in
                    tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                    if tok.type not in prose)


@pytest.mark.parametrize("pattern", [r"\bpickle\b", r"\btorch \. load\b", r"\bjoblib\b",
                                     r"allow_pickle", r"weights_only", r"\bdill\b",
                                     r"\bmarshal\b", r"\bshelve\b"])
def test_no_pickle_anywhere(pattern):
    hits = [str(p.relative_to(ROOT)) for p in _sources() if re.search(pattern, _code(p))]
    assert not hits, f"{pattern} in {hits}"


def test_trust_remote_code_is_off_by_default():
    from gft.config import TrainConfig, build_config
    assert TrainConfig().trust_remote_code is False
    assert build_config({"model": "m", "data": "d"}).trust_remote_code is False


def test_code_is_only_imported_from_fixed_names_or_the_rewards_config():
    """Dynamic imports: backends and experiment trackers (gft/tracking.py, names checked
    against its ADAPTERS table first) by fixed name tables, user rewards from the config's
    `rewards` entries (gft/rewards.py); nothing else imports or executes code by name."""
    allowed = {"backends/__init__.py", "gft/rewards.py", "gft/tracking.py"}
    pattern = r"import_module|spec_from_file_location|exec_module|(?<!\. )\b(exec|eval) \(|__import__"
    hits = {str(p.relative_to(ROOT)) for p in _sources() if re.search(pattern, _code(p))}
    assert hits <= allowed, hits - allowed


def test_metrics_are_cut_back_to_the_checkpoint_even_after_a_torn_line(tmp_path):
    """A kill mid-write can leave half a line; resume drops it with the steps to redo."""
    from gft.metrics import MetricsLog, read_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "loss": 1.0}\n{"step": 2}\n{"step": 3, "lo')
    MetricsLog(path).truncate_after(1)
    assert read_metrics(path) == [{"step": 0}, {"step": 1, "loss": 1.0}]
    MetricsLog(path).truncate_after(-1)  # a run starting over from step 0
    assert path.read_text() == "" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
