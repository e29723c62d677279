"""Keep freed memory in the C heap while training and generating (glibc's ``mallopt``).

Each training step allocates its dense ``(cells, genes)`` tensors anew, and so does
autograd for their gradients: hundreds of MiB per step. glibc hands freed memory at the
top of its heap back to the system once more than its trim threshold is free (by default
twice its mmap threshold, which it raises, up to 32 MiB, to the largest block it has
freed). What it handed back returns as fresh pages, which the kernel faults in and zeroes
one by one on first touch. On PBMC3K a stage-A step took from none to 31,000 page faults,
depending on the process's history.

:func:`heap_kept` sets the mmap threshold to 32 MiB (the value glibc's own rule reaches)
and the trim threshold to 256 MiB while it runs, so that each step reuses the heap's
pages: at most a few faults per step. Three runs each, 2 cores: 114-120 ms per stage-A
step against 121-138 ms, and 224-235 ms of CPU time against 238-271 ms. When the
outermost block ends, the trim threshold goes to 64 MiB, twice the mmap threshold, as
glibc's rule would set it, and ``malloc_trim(0)`` returns the kept memory. glibc has no
way back to its dynamic thresholds once they are set, so the process keeps these two
values: those of any process that has freed a block of 32 MiB.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ._settings import settings

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD_KEPT = 256 * 2**20
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD

_lock = threading.Lock()
_depth = 0


def user_malloc_settings() -> bool:
    """Whether the environment configures glibc's allocator itself (``MALLOC_*_``
    variables or ``glibc.malloc`` tunables): then scldiff leaves it alone."""
    return (any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


@functools.cache
def glibc():
    """The C library as a ``ctypes`` handle where it is glibc with ``mallopt`` and
    ``malloc_trim`` (Linux), else ``None``."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def heap_kept() -> Iterator[None]:
    """Keep up to 256 MiB of freed memory in the C heap while the block runs (see the
    module's notes). Does nothing where ``scldiff.settings.heap_tuning`` is off, the
    environment configures the allocator, or the C library is not glibc. Blocks may
    nest, also across threads: the outermost one restores."""
    global _depth
    libc = glibc() if settings.heap_tuning and not user_malloc_settings() else None
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_KEPT)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
                libc.malloc_trim(0)
