"""One writer per run directory: RUN_DIR/gft.lock names the process that writes it.

- Taking the lock creates the file in one step: its content (pid, host, start time) is
  written to a private file first, then hard-linked to `gft.lock`, which fails if the lock
  exists. A reader never sees a half-written lock, on a local disk or NFS.
- A lock whose process is gone (same host, pid no longer running) is stale: a killed run
  left it. It is taken over under an exclusive flock on the run directory, so two
  processes that both find it stale cannot both take it.
- A lock from another host cannot be checked from here: it is refused, and the message
  says how to remove it by hand.
- Under torchrun / mlx.launch only rank 0 locks (run.py); the others write nothing of
  their own in the run directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from gft.checkpoint import _fsync_dir, _pid_alive
from gft.errors import GFTError

LOCK_FILE = "gft.lock"


class RunLockedError(GFTError):
    """Another process writes this run directory."""


def _alive(pid: int) -> bool:
    """Running, and not a zombie (a killed child not yet reaped still answers kill -0)."""
    if not _pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill -0
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _read(path: Path) -> dict | None:
    """The lock's holder, or None when the file is gone or unreadable (a lock that could
    not be parsed is treated like one of a dead process only on this host, see take)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    pid = holder.get("pid")
    return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
            and not isinstance(pid, bool) and not _alive(pid))


def _link_new(path: Path, content: str) -> bool:
    """Create `path` with `content` in one step; False if it already exists."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def _guard(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on the run directory itself while a stale lock is examined and
    replaced (POSIX; nothing extra is written)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _refusal(path: Path, holder: dict) -> RunLockedError:
    if not holder:
        return RunLockedError(f"{path}: unreadable lock file; if no gft process writes "
                              f"{path.parent}, delete {path} and try again")
    where = f"pid {holder.get('pid')} on {holder.get('host')}"
    since = holder.get("started", "?")
    if holder.get("host") != socket.gethostname():
        hint = f"if it is not running there, delete {path} and try again"
    else:
        hint = "wait for it to finish or stop it, or choose another --output-dir"
    return RunLockedError(f"{path.parent}: another gft process ({where}, started {since}) is "
                          f"writing this run directory; {hint}")


def take(run_dir: Path) -> Path:
    """Lock `run_dir` for this process (taking over a stale lock), or RunLockedError."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    if _link_new(path, content):
        return path
    with _guard(run_dir):
        holder = _read(path)
        if holder is None and _link_new(path, content):
            return path
        holder = _read(path)
        if holder is None or not _stale(holder):
            raise _refusal(path, holder or {})
        path.unlink()  # under the guard: nobody else can be replacing it now
        if not _link_new(path, content):
            raise _refusal(path, _read(path) or {})
    return path


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)
