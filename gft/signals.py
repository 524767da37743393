"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (schedulers, `kill`).

The first signal only raises a flag. The training loop checks it between steps, so the
step in flight finishes; the run then saves a checkpoint, prints how to resume and exits
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), the codes shells, SLURM
and Kubernetes read as "terminated by that signal".

The first signal also restores the operating system's default action, so a second one
(Ctrl-C twice) ends the process at once, even inside a long C call, until the process
exits (a program that goes on after a stop calls `GracefulStop.restore()`). That is safe:
checkpoints are written under a temporary name and renamed when complete (gft/checkpoint.py),
so an abort leaves at worst a temporary directory, which the next save removes.

Handlers are installed only from the main thread (Python allows no other), and never
over a signal the parent process chose to ignore (background jobs of a non-interactive
shell ignore SIGINT; they keep doing so).
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from gft.errors import GFTError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(GFTError):
    """The run stopped on a signal after saving; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM set `signum` instead of killing.

        with GracefulStop() as stop:
            train(..., stop=stop)       # the loop calls stop() between steps
            if stop.signum: ...         # save, then exit 128 + stop.signum
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        """True once a stop was requested."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for sig in self._previous:  # a second signal now ends the process at once
            signal.signal(sig, signal.SIG_DFL)
        again = "Ctrl-C" if signum == signal.SIGINT else signal_name(signum)
        sys.stderr.write(f"\n{signal_name(signum)}: stopping after the current step and saving "
                         f"a checkpoint ({again} again to abort at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        """Put the previous handlers back, unless a stop was requested: the process is
        then on its way out, and a second signal must still end it at once rather than
        meet Python's KeyboardInterrupt during shutdown. `restore()` puts them back."""
        if self.signum is None:
            self.restore()

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
