"""Processes that must not outlive the one that started them (standard library only).

A replica's serving workers and its training child ask the kernel to signal them when their
parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG). SIGTERM, not SIGKILL: a training child
then records itself STOPPED and keeps its last checkpoint, and a worker drains.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PARENT_PID_ENV = "CONVSERVE_PARENT_PID"  # set by the parent: closes the race with its death
_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_BYTES = 4 << 20


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """For a process started by a replica (the replica sets $CONVSERVE_PARENT_PID to its pid):
    get `sig` when that parent dies, or now if it already has. Anything else (a training run
    started from a shell, say under nohup) is left alone. A no-op where prctl does not exist."""
    expected = os.environ.pop(PARENT_PID_ENV, "")  # not inherited by this process's children
    if not expected.isdigit():
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != int(expected):
        signal.raise_signal(sig)


def map_large_blocks_separately(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold, so that every block of `threshold` bytes or more is mapped on
    its own and goes back to the system the moment it is freed.

    Left dynamic, glibc raises the threshold after each large free (up to 32 MiB): a replaced
    ONNX Runtime session's large blocks then come back from the heap and fragment it. Measured
    (benchmarks/swap_memory.py, 20 swaps with a training run on the same 2 cores): 1.2-1.3x the
    memory after the first swap even with malloc_trim; fixed at 4 MiB, 1.01x. Blocks below it,
    such as a 64-image batch (0.8 MB), stay on the fast heap path. A fixed threshold also fixes
    glibc's trim threshold at 128 KiB, which would shrink and regrow the heap's top around every
    batch; it is set to twice the threshold, as glibc's own dynamic rule has it (explicit trims
    follow swaps, release_freed_memory). False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> bool:
    """Hand memory that is free inside the C heap back to the system (glibc's malloc_trim).

    A replaced ONNX Runtime session frees tens of MB, and glibc keeps what was on its heaps:
    measured, 20 swaps under load took a replica from 160 MB to 278 MB with neither this nor
    map_large_blocks_separately. Called once the old session is really gone. False where there
    is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
