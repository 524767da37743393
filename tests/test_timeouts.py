"""gft/timeouts.py: a limit on one call that stays on the main thread."""
from __future__ import annotations

import threading
import time

import pytest

from gft.timeouts import CallTimeout, call_with_timeout


def test_a_blocking_call_is_stopped_at_the_limit():
    start = time.monotonic()
    with pytest.raises(CallTimeout):
        call_with_timeout(lambda: time.sleep(30), 0.2)
    assert time.monotonic() - start < 10  # not the 30 s sleep


def test_a_call_within_the_limit_returns_its_value():
    assert call_with_timeout(lambda: 42, 5.0) == 42
    assert call_with_timeout(lambda: 7, 0) == 7  # 0 = no limit


def test_math_verify_timeouts_inside_still_work_and_do_not_cancel_ours():
    """math_verify arms and clears SIGALRM itself: our limit uses another signal."""
    from math_verify import parse, verify

    def graded_then_hung():
        assert verify(parse("$\\frac{1}{2}$"), parse("\\boxed{0.5}"), timeout_seconds=5)
        time.sleep(30)
    with pytest.raises(CallTimeout):
        call_with_timeout(graded_then_hung, 1.0)


def test_off_the_main_thread_it_runs_without_a_limit():
    out = []
    worker = threading.Thread(target=lambda: out.append(call_with_timeout(lambda: 1, 0.1)))
    worker.start()
    worker.join()
    assert out == [1]
