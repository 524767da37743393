"""A time limit on one call (a reward function), without moving the call off the main thread.

Why not a worker thread with a join timeout: reward functions often use math_verify,
whose own timeouts are SIGALRM-based and only work in the main thread; and a hung thread
cannot be stopped anyway. Why not SIGALRM/setitimer ourselves: math_verify's timeouts set
and clear that same timer, so a nested one would silently cancel ours.

So the call stays on the main thread, and a watchdog thread (threading.Timer) sends
SIGUSR2 to the main thread when the limit passes; its handler raises `CallTimeout` there.
A real signal also interrupts a blocking system call (a socket read, a sleep), so a
reward waiting on a server that never answers is stopped too. CallTimeout derives from
BaseException, like KeyboardInterrupt, so a reward's own `except Exception` cannot
swallow it. Where this cannot work (no pthread_kill, e.g. Windows, or called off the
main thread) the call runs without a limit.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
_SIGNAL = getattr(signal, "SIGUSR2", None)


class CallTimeout(BaseException):
    """The call ran past its limit (raised inside it, on the main thread)."""


def limit_supported() -> bool:
    return (_SIGNAL is not None and hasattr(signal, "pthread_kill")
            and threading.current_thread() is threading.main_thread())


def call_with_timeout(fn: Callable[[], T], seconds: float) -> T:
    """fn(), or CallTimeout once `seconds` have passed (0 or less: no limit)."""
    if seconds <= 0 or not limit_supported():
        return fn()
    fired = threading.Event()
    main = threading.main_thread().ident

    def on_signal(signum, frame):
        if fired.is_set():  # ours, not a SIGUSR2 someone else sent
            raise CallTimeout()

    def fire() -> None:
        fired.set()
        signal.pthread_kill(main, _SIGNAL)

    previous = signal.signal(_SIGNAL, on_signal)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        timer.cancel()
        timer.join()
        signal.signal(_SIGNAL, signal.SIG_DFL if previous is None else previous)
