"""fastrlhf.runtime: retain_freed_memory keeps memory PyTorch frees in the process (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fastrlhf.runtime import retain_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# a fresh process frees a 16 MiB tensor, then reports the heap's free bytes and the mmap-ed bytes
_PROBE = """
import ctypes, sys, torch
from fastrlhf.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                               "fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.ones(4 << 20)  # 16 MiB
held = libc.mallinfo2().hblkhd
del x
info = libc.mallinfo2()
print(info.fordblks, held)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    free, mapped = map(int, out.stdout.split())
    return free, mapped


def test_retain_freed_memory_applies_where_glibc_is():
    assert retain_freed_memory() is GLIBC
    assert retain_freed_memory() is GLIBC  # idempotent


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_tensor_memory_stays_in_the_heap():
    """By default glibc mmaps a 16 MiB block by itself and unmaps it on free; retained, the block
    comes from the heap and stays there as free memory for the next allocation."""
    free, mapped = _probe("default")
    assert mapped >= 16 << 20 and free < 16 << 20
    free, mapped = _probe("retain")
    assert mapped < 16 << 20 and free >= 16 << 20
