"""Keep torch's thread count across calls into numba-parallel code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count when the block ends.

    numba's OpenMP threading layer sets the process's OpenMP thread count, which torch
    reads, to numba's own whenever it runs parallel code (scanpy's Seurat-v3 gene selection
    does). Without this, ``torch.set_num_threads(1)`` would silently become 2 after such a
    call on a 2-core machine.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
