"""Checkpoints: a Hugging Face-layout model directory plus backend-neutral trainer state.

    RUN_DIR/checkpoints/step-000040/   config.json, model.safetensors, tokenizer files,
                                       generation_config.json   (transformers/mlx-lm load it)
                                       optimizer.safetensors    (AdamW moments by param name)
                                       trainer_state.json       (step, data position, config)
                                       gft.json                 (how prompts were rendered, stops)
    RUN_DIR/checkpoints/latest         name of the newest complete checkpoint
    RUN_DIR/final/                     a finished run's model (or adapter), tokenizer,
                                       generation config and gft.json only; its last step
                                       stays in checkpoints/ (runs before that: a full checkpoint)

Crash safety, step by step (a SIGKILL or power cut may land anywhere):
- a checkpoint is written into `.step-N.tmp-PID/`, every file fsynced, then renamed to
  `step-N/` and the parent directory fsynced: a directory under its real name is complete;
- `latest` is written to `latest.tmp`, fsynced and renamed over the old pointer;
- old checkpoints are first renamed to `.step-N.del-PID/`, then deleted;
- replacing a directory (final/ of a resumed run) renames the old one to `.final.old-PID/`
  first; if a crash lands between the two renames, the next save or resume puts it back;
- leftovers of a dead process (`.*.tmp-*`, `.*.del-*`, `.*.old-*`) are removed by the next
  save; resume never reads a dot-directory.
Model files and their checks are in gft/modelfiles.py; safetensors only, no pickle anywhere.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

from gft.errors import GFTError, ModelError, first_line
from gft.modelfiles import OPTIMIZER_FILE, check_model_dir, read_safetensors_header
from gft.quant import BASE_QUANT_FILE, copy_base_record
from gft.runpaths import moved_adapter_config
from gft.stops import STOP_EOS_KEY, write_generation_eos

STATE_FILE = "trainer_state.json"
# Beside config.json in every checkpoint and so in final/: what gft needs to use the folder
# as trained once it is copied out of its run (another machine, a hub upload), where
# neither trainer_state.json nor the run's config.yaml travel with it.
MODEL_RECORD = "gft.json"
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")


class CheckpointError(GFTError):
    """A checkpoint that could not be written (full disk, permissions); nothing saved
    before it is damaged. Like any file system failure, `gft` exits with 1, not 2."""
    exit_code = 1


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directory entries must be durable too)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (POSIX only: Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    """Is another process with this id running? Our own id counts as dead: this process
    writes one checkpoint at a time, so any leftover with its id is from a killed run
    (containers reuse small pids)."""
    if pid == os.getpid() or os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(root: Path) -> list[Path]:
    """Remove what killed writers left in `root` (`.X.tmp-PID`, `.X.del-PID`, `.X.old-PID`
    of processes no longer running); a `.X.old-PID` whose X is missing was cut short while
    being replaced and is complete, so it is renamed back to X. Returns what it touched."""
    root = Path(root)
    if not root.is_dir():
        return []
    touched = []
    for entry in sorted(root.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        target = root / match["target"]
        if match["kind"] == "old" and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        touched.append(entry)
    return touched


def atomic_directory(target: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir), fsync it, then swap it in as `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():  # replacing (e.g. final/): move the old one aside first
            os.replace(target, old)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def _remove_dir(path: Path) -> None:
    """Rename first, so a crash mid-delete never leaves a half checkpoint under its name."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Saving


def _io_failure(exc: BaseException) -> str | None:
    """The reason, if `exc` is the file system failing (full disk, permissions, ...).
    safetensors reports a full disk as SafetensorError("... No space left on device (os
    error 28)") and mlx as RuntimeError("[write] Unable to write N bytes to file."),
    neither as OSError."""
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{reason} [{name}]" if name else reason
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" or re.search(
            r"os error \d+|Errno \d+|No space left|Disk quota|Unable to (write|open)", text):
        return first_line(exc)
    return None


def _resume_hint(run_dir: Path) -> str:
    import shlex
    return f"gft train --resume {shlex.quote(str(run_dir))}"


def run_dir_of(checkpoint: Path) -> Path:
    """RUN_DIR of RUN_DIR/final or RUN_DIR/checkpoints/step-N."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def model_record(state: dict[str, Any]) -> dict[str, Any]:
    """MODEL_RECORD's content: `chat_template`, how `gft generate` and `gft eval` render a
    string prompt so that it looks like the run's training prompts (true: as a user turn
    of the tokenizer's chat template, as chat_template: true rendered string prompts and
    as chat-message prompts always are; false: as written); `stop`, the run's extra stop
    strings and ids (its config key `stop`), where its rollouts and evaluation ended a
    completion besides EOS, so that sampling from the folder ends there too;
    `system_prompt`, the system message its prompts opened with (when set);
    `rewards`, `answer_column`, `prompt_column`, `completion_column` and
    `max_response_tokens`, how its in-training evaluation read and scored held-out rows,
    which `gft eval` repeats by default; `step`, the step whose weights these are."""
    config, loop = state.get("config") or {}, state.get("loop") or {}
    templated = bool(config.get("chat_template")) or state.get("chat_prompts") is True
    scoring = {k: config[k] for k in ("rewards", "answer_column", "prompt_column",
                                      "completion_column", "max_response_tokens")
               if k in config}
    system = {"system_prompt": config["system_prompt"]} if config.get("system_prompt") else {}
    return {"chat_template": templated, "stop": stop_list(config.get("stop")), **system,
            **scoring,
            "step": int(loop.get("step", 0))}


def stop_list(value: Any) -> list:
    """The config key `stop` as a list (`stop: "</answer>"` means a list of one)."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, int)) else list(value)


def read_model_record(model_dir: str | Path) -> dict[str, Any] | None:
    """A model folder's MODEL_RECORD, or None: none there, or not readable as one (then the
    folder is used as any model folder is)."""
    path = Path(model_dir) / MODEL_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_checkpoint(backend, directory: Path, state: dict[str, Any]) -> Path:
    """Model, optimizer and trainer state into `directory`, atomically. A failing file
    system (a full disk) is a one-line CheckpointError; whatever was saved before is intact."""
    def write(tmp: Path) -> None:
        backend.save_model(tmp)
        backend.save_optimizer(tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        record = model_record(state)
        stops = getattr(backend, "stops", None)
        if stops is not None and write_generation_eos(tmp, stops) and stops.added:
            # transformers and mlx-lm end where the run's rollouts did (gft/stops.py)
            record[STOP_EOS_KEY] = list(stops.added)
        (tmp / MODEL_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    directory = Path(directory)
    try:
        return atomic_directory(directory, write)
    except Exception as exc:
        reason = _io_failure(exc)
        if reason is None:
            raise
        raise CheckpointError(f"cannot save checkpoint {directory}: {reason}; "
                              + _previous_note(run_dir_of(directory))) from exc


def _previous_note(run_dir: Path) -> str:
    try:
        previous = latest_checkpoint(run_dir)
    except GFTError:
        previous = None
    if previous is None:
        return "nothing was saved before it"
    return (f"the previous checkpoint {previous} is intact: free some space, then "
            f"{_resume_hint(run_dir)}")


def save_step_checkpoint(backend, run_dir: Path, step: int, state: dict[str, Any],
                         keep: int) -> Path:
    """checkpoints/step-N, then the `latest` pointer, then prune to the last `keep`.

    Step directories after N are never deleted: a resume starts from the newest complete
    checkpoint, so a newer one is incomplete, kept for the user to look at, and replaced
    when the run saves that step again."""
    root = Path(run_dir) / "checkpoints"
    path = save_checkpoint(backend, root / f"step-{step:06d}", state)
    try:
        atomic_write_text(root / "latest", path.name + "\n")
    except OSError as exc:
        raise CheckpointError(f"cannot update {root / 'latest'}: {_io_failure(exc)}; "
                              + _previous_note(Path(run_dir))) from exc
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    older = [p for p in steps if p.name < path.name]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        _remove_dir(old)
    return path


# ---------------------------------------------------------------------------------------
# Finding and reading checkpoints


class ResumePoint(NamedTuple):
    """Where a resume starts: the checkpoint (None: none saved yet), whether its optimizer
    state is used, and one line for each newer checkpoint that was passed over."""
    checkpoint: Path | None
    load_optimizer: bool
    notes: list[str]


class Problem(NamedTuple):
    """Why a checkpoint cannot be resumed from, naming the file; optimizer_only: its
    weights and trainer state are fine, so it can continue with fresh optimizer state."""
    message: str
    optimizer_only: bool


def _candidates(run_dir: Path) -> list[tuple[float, int, Path]]:
    """(step, tie-break, path) of every checkpoint directory, newest first. A step
    directory's step is its name; final/'s is its trainer state's (unreadable: newest, so
    that it is checked and reported rather than silently passed over)."""
    run_dir = Path(run_dir)
    out: list[tuple[float, int, Path]] = []
    root = run_dir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(r"step-(\d+)", path.name)
            if match and path.is_dir():
                out.append((int(match[1]), 0, path))
    final = run_dir / "final"
    # final/ is an export (model and tokenizer; the last step's checkpoint is in
    # checkpoints/), a resume candidate only in runs written before that layout
    if final.is_dir() and (final / STATE_FILE).exists():
        try:
            step: float = checkpoint_step(final)
        except GFTError:
            step = math.inf
        out.append((step, 1, final))  # final/ wins a tie: it is the finished run
    return sorted(out, key=lambda c: (c[0], c[1]), reverse=True)


def has_checkpoints(run_dir: Path) -> bool:
    """Any checkpoint directory at all, complete or not (a new run must not write over it)."""
    return bool(_candidates(run_dir))


def checkpoint_problem(checkpoint: Path) -> Problem | None:
    """None if `checkpoint` holds everything a resume reads, each file readable: trainer
    state, weights (config.json and complete safetensors, or a PEFT adapter) and
    optimizer state. Else the first problem, naming the file."""
    checkpoint = Path(checkpoint)
    try:
        read_state(checkpoint)
        if not (checkpoint / "adapter_config.json").is_file() \
                and not (checkpoint / "config.json").is_file():
            return Problem(f"{checkpoint / 'config.json'}: missing", False)
        check_model_dir(checkpoint)
    except ModelError as e:
        return Problem(str(e), False)
    optimizer = checkpoint / OPTIMIZER_FILE
    if not optimizer.is_file():
        return Problem(f"{optimizer}: missing", True)
    try:
        read_safetensors_header(optimizer)
    except ModelError as e:
        return Problem(str(e), True)
    return None


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint directory with everything a resume reads, every file readable."""
    return Path(checkpoint).is_dir() and checkpoint_problem(checkpoint) is None


def checkpoint_step(checkpoint: Path) -> int:
    return int(read_state(checkpoint).get("loop", {}).get("step", 0))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (step directories and final/, whatever the
    `latest` pointer says; final/ on a tie), or None. Temporary and half-deleted
    directories (names starting with '.') are never considered."""
    for _, _, path in _candidates(run_dir):
        if checkpoint_problem(path) is None:
            return path
    return None


def find_resume_point(run_dir: Path, reset_optimizer: bool = False) -> ResumePoint:
    """The newest complete checkpoint; a newer incomplete one is reported (one line) and
    left in place. With reset_optimizer, the newest checkpoint whose only problem is its
    optimizer state is used with fresh optimizer state. No complete checkpoint at all
    while some exist: ModelError naming the file (and reset_optimizer where it helps)."""
    notes: list[str] = []
    skipped: list[tuple[Path, Problem]] = []
    for _, _, path in _candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem is None or (problem.optimizer_only and reset_optimizer):
            notes += [_passed_over(old, why, path) for old, why in skipped]
            if problem is not None:
                notes.append(f"{problem.message}; reset_optimizer=true: continuing from "
                              f"{path.name} with fresh optimizer state")
            return ResumePoint(path, problem is None, notes)
        skipped.append((path, problem))
    if not skipped:
        return ResumePoint(None, False, [])
    path, problem = skipped[0]
    hint = (f"; to continue from {path.name} with fresh optimizer state, add "
            "--set reset_optimizer=true" if problem.optimizer_only
            else "; no complete checkpoint to resume from")
    raise ModelError(f"cannot resume: {problem.message}{hint}")


def _passed_over(path: Path, problem: Problem, used: Path) -> str:
    extra = (f"; --set reset_optimizer=true would continue from {path.name} with fresh "
             "optimizer state instead" if problem.optimizer_only else "")
    return (f"warning: {path.name} is incomplete ({problem.message}); resuming from the "
            f"previous complete checkpoint {used.name} (the steps after it are re-done; "
            f"{path.name} is replaced when they are){extra}")


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable trainer state: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("loop"), dict) \
            or not isinstance(state.get("config"), dict):
        raise ModelError(f"{path}: not a gft trainer state (needs 'loop' and 'config')")
    return state


# ---------------------------------------------------------------------------------------
# final/: the export users hand on


def export_final(checkpoint: Path, final: Path) -> Path:
    """final/ from the last step's checkpoint: what users hand on, the model (or adapter)
    with its tokenizer and generation config and nothing else (AdamW's moments are twice
    the model). The checkpoint keeps them: a resume of a finished run reads it."""
    def write(tmp: Path) -> None:
        for f in sorted(checkpoint.iterdir()):
            if f.name == "adapter_config.json":  # its base may be relative to the adapter
                (tmp / f.name).write_text(moved_adapter_config(f.read_text(), checkpoint, tmp))
            elif f.name == BASE_QUANT_FILE:  # and so may the one this record names
                copy_base_record(checkpoint, tmp)
            elif f.is_file() and f.name not in (OPTIMIZER_FILE, STATE_FILE):
                shutil.copy2(f, tmp / f.name)
    out = atomic_directory(final, write)
    clean_leftovers(final.parent / "checkpoints")
    return out


def is_export_of(final: Path, checkpoint: Path) -> bool:
    """Whether final/ is complete and was exported from `checkpoint`: the same gft.json
    (its step) and every file the export copies present with the same size."""
    def same(f: Path) -> bool:
        return (final / f.name).is_file() and (final / f.name).stat().st_size == f.stat().st_size
    try:
        check_model_dir(final)
        record = final / MODEL_RECORD
        if not record.is_file() or record.read_bytes() != (checkpoint / MODEL_RECORD).read_bytes():
            return False
        return all(same(f) for f in checkpoint.iterdir()
                   if f.is_file() and f.name not in _NOT_EXPORTED)
    except (ModelError, OSError):
        return False


# what export_final leaves out, and the files it rewrites (their base's path)
_NOT_EXPORTED = (OPTIMIZER_FILE, STATE_FILE, "adapter_config.json", BASE_QUANT_FILE)
