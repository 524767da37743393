"""backends/host_memory.py: glibc keeps freed blocks, so a step's buffers stop page-faulting."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from backends.host_memory import user_chose_malloc

ROOT = Path(__file__).resolve().parents[1]

# A training step in miniature, 8 times: big buffers made, touched and freed, small
# allocations between them. Prints the page faults of the last 4 (the steady state).
STEPS = """
import resource, sys, torch
from backends.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    big = []
    for n in (16 << 20, 4 << 20, 24 << 20):
        big.append(torch.empty(n).fill_(1.0))
        small = [torch.ones(1000) for _ in range(50)]
    del big, small
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not user_chose_malloc({k: v})}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    # 4 steps x 176 MiB touched = 180k pages of 4 KiB: glibc's default maps and unmaps
    # the 64 and 96 MiB buffers (>= 32 MiB) every time, and trims the heap under the rest
    default = _faults("default")
    kept = _faults("keep")
    assert default > 100_000, default
    assert kept < 2_000, kept


def test_a_malloc_choice_in_the_environment_is_left_alone():
    assert not user_chose_malloc({})
    assert not user_chose_malloc({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"})
    assert user_chose_malloc({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_chose_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4"})
    assert user_chose_malloc({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
