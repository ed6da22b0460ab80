"""minilora.heap: freed heap memory goes back to the OS (Linux with glibc; elsewhere a no-op)."""

import subprocess
import sys

import pytest

from minilora.heap import _malloc_trim

# In a fresh process: 3,000 freed 64 KiB tensors (under glibc's mmap threshold, so on the heap), each
# followed by a small one that stays alive, so no free memory is at the heap's top where free() would
# return it; prints the MiB of anonymous resident memory the trim gave back.
CHILD = """
import torch
from minilora.heap import return_freed_memory

def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))

freed, kept = [], []
for _ in range(3000):
    freed.append(torch.ones(16 * 1024))
    kept.append(torch.ones(16))
del freed
before = anon()
return_freed_memory()
print((before - anon()) / 2**20)
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_memory_between_live_allocations_is_returned():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert float(done.stdout) > 100  # of the ~188 MiB freed
