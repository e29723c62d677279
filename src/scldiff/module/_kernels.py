"""Compiled (numba) inner loop of the CPU count sampler: which entries may be nonzero.

numba comes with pynndescent, which builds the cell graph. The kernel is compiled on its
first call and cached on disk (``cache=True``), so later processes load it. It releases
the GIL, so several chunks of cells can be drawn in parallel threads.

The uniforms come from a counter-based generator: SplitMix64's output function (Steele,
Lea and Flood 2014; the generator behind Java's ``SplittableRandom``) applied to ``key +
c * 0x9E3779B97F4A7C15`` for counter ``c``, which is SplitMix64's ``c``-th output from
seed ``key``. Entry ``j`` of the chunk (row-major) uses counter ``2j`` for its 16-bit
uniform and ``2j + 1`` for the 53 bits that complete it, so every uniform depends only on
the key and the entry's position, not on the order of evaluation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31, _S48 = (np.uint64(s) for s in (11, 27, 30, 31, 48))
_ONE, _TWO = np.uint64(1), np.uint64(2)
# the dense test is on 16-bit integers k: u = (k + v) / 2**16 with a 53-bit v
TICKS = 2**16
_INV_TICKS = 1.0 / TICKS
_INV_53 = 2.0**-53


@njit(cache=True, nogil=True, inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def splitmix_outputs(key: int, counters: np.ndarray) -> np.ndarray:
    """SplitMix64's outputs for ``counters`` from seed ``key`` (numpy; uint64), as the
    kernel computes them: for tests and for checking a draw by hand."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + counters.astype(np.uint64) * _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        return z ^ (z >> _S31)


def entry_uniforms(key: int, n_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """The 16-bit integers ``k`` and the completed uniforms ``(k + v) / 2**16`` of entries
    ``0 .. n_entries - 1`` under ``key``, as :func:`preselect` draws them (numpy)."""
    j = np.arange(n_entries, dtype=np.uint64)
    ticks = splitmix_outputs(key, 2 * j) >> _S48
    fine = splitmix_outputs(key, 2 * j + 1) >> _S11
    return ticks, (ticks.astype(np.float64) + fine.astype(np.float64) * _INV_53) * _INV_TICKS


@njit(cache=True, nogil=True)
def _grow(a, size):
    out = np.empty(size, a.dtype)
    out[: a.size] = a
    return out


@njit(cache=True, nogil=True)
def _scan(ticks, bound, row, kept, has_kept, library, i, start, key, count, rows, cols,
          mean, keep, uniform):
    """The entries of row ``i`` whose 16-bit integer is at most their bound, written from
    position ``count`` on; returns the new count."""
    for g in range(ticks.size):
        if ticks[g] <= bound[g]:
            counter = (start + np.uint64(g)) * _TWO + _ONE
            fine = _mix(key + counter * _GOLDEN) >> _S11
            rows[count] = i
            cols[count] = g
            mean[count] = library * np.float64(row[g])
            if has_kept:
                keep[count] = np.float64(kept[i, g])
            uniform[count] = (np.float64(ticks[g]) + np.float64(fine) * _INV_53) * _INV_TICKS
            count += 1
    return count


@njit(cache=True, nogil=True)
def preselect(scale, kept, library, bound_factor, scale_in_bound, has_kept, key):
    r"""Entries that may be nonzero, with their uniforms.

    ``scale`` and ``kept``: ``(cells, genes)`` float32, C-contiguous (``kept`` may be a
    dummy when ``has_kept`` is false). The bound of entry ``(i, g)`` in units of
    :math:`2^{-16}` is ``bound_factor[i] * scale[i, g] * kept[i, g]`` in float32 (without
    ``scale`` unless ``scale_in_bound``, without ``kept`` unless ``has_kept``). The entry
    is kept when its 16-bit uniform ``k`` is at most that bound: :math:`u < b` implies
    :math:`k < 2^{16} b`, so no entry with :math:`u` below its bound is missed.

    Returns, for the kept entries in row-major order: row, column, mean
    ``library[i] * scale[i, g]`` (float64), ``kept[i, g]`` (float64; empty without
    ``has_kept``) and the completed uniform :math:`u = (k + v) 2^{-16}` (float64).
    """
    n_cells, n_genes = scale.shape
    capacity = max(1024, n_cells * n_genes // 8)
    rows = np.empty(capacity, np.int64)
    cols = np.empty(capacity, np.int64)
    mean = np.empty(capacity, np.float64)
    keep = np.empty(capacity if has_kept else 0, np.float64)
    uniform = np.empty(capacity, np.float64)
    key = np.uint64(key)
    bound = np.empty(n_genes, np.float32)
    ticks = np.empty(n_genes, np.float32)
    count = 0
    for i in range(n_cells):
        factor = np.float32(bound_factor[i])
        row = scale[i]
        if scale_in_bound:
            for g in range(n_genes):
                bound[g] = row[g] * factor
        else:
            for g in range(n_genes):
                bound[g] = factor
        if has_kept:
            kept_row = kept[i]
            for g in range(n_genes):
                bound[g] = bound[g] * kept_row[g]
        start = np.uint64(i * n_genes)
        # vectorised: the 16 high bits of each entry's output
        for g in range(n_genes):
            counter = (start + np.uint64(g)) * _TWO
            ticks[g] = np.float32(_mix(key + counter * _GOLDEN) >> _S48)
        if count + n_genes > rows.size:  # room for a whole row (outside the scan below,
            size = max(2 * rows.size, count + n_genes)  # which then keeps its arrays)
            rows, cols = _grow(rows, size), _grow(cols, size)
            mean, uniform = _grow(mean, size), _grow(uniform, size)
            if has_kept:
                keep = _grow(keep, size)
        count = _scan(ticks, bound, row, kept, has_kept, library[i], i, start, key, count,
                      rows, cols, mean, keep, uniform)
    return (rows[:count].copy(), cols[:count].copy(), mean[:count].copy(),
            keep[: count if has_kept else 0].copy(), uniform[:count].copy())


@njit(cache=True, nogil=True)
def inverse_cdf(mu, theta, p_zero, levels, has_theta, max_mean, out):
    r"""Inverse-CDF draws of :math:`X \mid X \ge 1` into ``out`` for the entries with
    ``mu <= max_mean`` (the others are left alone): the arithmetic, entry by entry, of
    the vectorised steps of :func:`scldiff.module._decoder._inverse_cdf_steps`, so the
    same draws. ``levels``: CDF levels on :math:`(P(0), 1)`; ``theta`` is read only with
    ``has_theta`` (otherwise Poisson). Float64 arrays."""
    for j in range(mu.size):
        m = mu[j]
        if not m <= max_mean:
            continue
        p0 = p_zero[j]
        level = levels[j]
        if has_theta:
            q = m / (m + theta[j])
            ratio_a, ratio_b = q, (theta[j] - 1.0) * q
        else:
            ratio_a, ratio_b = 0.0, m  # p(k)/p(k-1) = (k*a + b)/k
        pmf = p0 * (ratio_a + ratio_b)
        cdf = p0 + pmf
        k = 1.0
        stalled = False
        # stop where the CDF has passed the level, or where rounding stalls it past the
        # mode (see _inverse_cdf_steps)
        while cdf <= level and pmf > 0 and not stalled:
            k += 1.0
            factor = (k * ratio_a + ratio_b) / k
            pmf *= factor
            previous = cdf
            cdf = cdf + pmf
            stalled = cdf == previous and factor < 1.0
        out[j] = k
