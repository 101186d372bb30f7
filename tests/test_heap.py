"""runtime.heap: freed memory a worker thread's arena keeps resident goes back to the OS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ffnfusion.runtime.heap import _malloc_trim

# A worker thread allocates 128 MiB in 64 KiB blocks (below glibc's mmap threshold: its own arena)
# and one small block above them (so the arena cannot simply shrink), then frees the blocks.
PROBE = """
import gc, json, sys, threading, numpy as np
from ffnfusion.runtime.heap import release_freed_memory
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
kept = []
def work():
    blocks = [np.ones(16 * 1024, np.float32) for _ in range(2048)]
    kept.append(np.ones(16, np.float32))
    del blocks
thread = threading.Thread(target=work)
thread.start()
thread.join()
gc.collect()
before = rss()
released = release_freed_memory() if sys.argv[1] == "release" else None
print(json.dumps({"released": released, "mib": (before - rss()) / 2**20}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None,
                    reason="malloc_trim is glibc's (Linux); elsewhere release_freed_memory does nothing")
def test_freed_memory_stays_resident_until_released():
    assert _probe("keep")["mib"] < 16  # garbage collection alone gives nothing back
    released = _probe("release")
    assert released["released"] is True and released["mib"] > 48, released
