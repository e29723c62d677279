"""Helpers for the CSR rows (``crow``, ``col``, ``value``) that minibatches carry."""

from __future__ import annotations

import torch
from torch import Tensor


def entry_rows(crow: Tensor, nnz: int) -> Tensor:
    """The row of each of the ``nnz`` stored entries of CSR row pointers ``crow``. The
    caller gives ``nnz`` (``crow[-1]``), known on the host: without it, a GPU would be
    waited for to learn the output's length."""
    return torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device),
                                   crow.diff(), output_size=nnz)
