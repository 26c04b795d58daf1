"""Keeping a device process's resident memory near what it holds (``train.checkpointing=on``).

PyTorch's CPU allocator is the C library's ``malloc``. Training and quantising allocate large
temporaries between tensors that stay; glibc keeps the holes they leave (in one heap per
thread) instead of handing the pages back, so the resident set grows by whatever the holes
add up to, a different amount each run. :func:`return_free_heap` hands them back; each call
costs page faults when the pages are needed again, so only the memory-first paths call it
(the quantising loader per tensor, training with checkpointing per step).

Measured on SmolLM2 with the int8 base: the load's peak RSS 1,137-1,209 MiB without it,
814 MiB with it; four training steps 1,116-1,129 MiB without, 983 MiB with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["return_free_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library has none)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
