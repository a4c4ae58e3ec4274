"""Process-wide CPU settings for long runs (the ``fastrlhf`` command applies them).

:func:`retain_freed_memory`: glibc's ``malloc`` hands freed blocks back to the kernel (blocks of
128 KiB and more are ``mmap``-ed one by one, and the top of the heap is trimmed), so every training
step of a PyTorch model on the CPU faults its activations' pages in afresh; in a virtual machine
that costs as much as the arithmetic. Keeping freed memory in the process (as the CUDA caching
allocator does on GPUs) makes later steps reuse it: ``bench/allocator.py`` measures both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Tell glibc's ``malloc`` to keep freed memory in the process: blocks up to 32 MiB come from
    the heap instead of their own ``mmap``, and the heap's top is only returned to the kernel past
    2 GiB free. The process then holds its peak memory (as PyTorch's CUDA allocator does).

    Returns:
        True when applied; False where there is no glibc (macOS, Windows, musl): nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
