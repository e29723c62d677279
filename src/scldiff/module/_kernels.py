"""Compiled (numba) loops of the CPU count sampler: which entries may be nonzero
(:func:`preselect`), and the inverse-CDF draws of the nonzero counts (:func:`inverse_cdf`).

numba comes with pynndescent, which builds the cell graph. The loops are compiled on their
first call and cached on disk (``cache=True``), so later processes load them. They release
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


@njit(cache=True, nogil=True, inline="always")
def _tick(key, start, g):
    """The 16-bit integer of entry ``start + g``: SplitMix64's output ``2 (start + g)``."""
    return np.float32(_mix(key + (start + np.uint64(g)) * _TWO * _GOLDEN) >> _S48)


@njit(cache=True, nogil=True)
def _flag_row(flags, row, kept_row, factor, scale_in_bound, has_kept, key, start):
    """``flags[g]``: whether entry ``g`` of the row passes the dense test (vectorised
    loops, one per kind of bound; a bound without ``scale``, the hurdle's, has ``kept``)."""
    if scale_in_bound and has_kept:
        for g in range(flags.size):
            flags[g] = _tick(key, start, g) <= row[g] * factor * kept_row[g]
    elif scale_in_bound:
        for g in range(flags.size):
            flags[g] = _tick(key, start, g) <= row[g] * factor
    else:
        for g in range(flags.size):
            flags[g] = _tick(key, start, g) <= factor * kept_row[g]


@njit(cache=True, nogil=True)
def _write(selected, row, kept_row, has_kept, library, i, start, key, count, rows, cols,
           mean, keep, uniform):
    """Row ``i``'s selected entries, from position ``count`` on; returns the new count."""
    for g in selected:
        fine = _mix(key + ((start + np.uint64(g)) * _TWO + _ONE) * _GOLDEN) >> _S11
        rows[count] = i
        cols[count] = g
        mean[count] = library * np.float64(row[g])
        if has_kept:
            keep[count] = np.float64(kept_row[g])
        uniform[count] = (np.float64(_tick(key, start, g)) + np.float64(fine) * _INV_53
                          ) * _INV_TICKS
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
    flags = np.empty(n_genes, np.uint8)
    selected = np.empty(n_genes + 1, np.int64)
    count = 0
    for i in range(n_cells):
        row = scale[i]
        kept_row = kept[i] if has_kept else kept[0]
        start = np.uint64(i * n_genes)
        _flag_row(flags, row, kept_row, np.float32(bound_factor[i]), scale_in_bound,
                  has_kept, key, start)
        # branch-free compaction: an unpredictable branch per entry costs more
        n_selected = 0
        for g in range(n_genes):
            selected[n_selected] = g
            n_selected += flags[g]
        if count + n_selected > rows.size:
            size = max(2 * rows.size, count + n_selected)
            rows, cols = _grow(rows, size), _grow(cols, size)
            mean, uniform = _grow(mean, size), _grow(uniform, size)
            if has_kept:
                keep = _grow(keep, size)
        count = _write(selected[:n_selected], row, kept_row, has_kept, library[i], i, start,
                       key, count, rows, cols, mean, keep, uniform)
    # views: copying them would cost more than the unused capacity they hold on to
    return (rows[:count], cols[:count], mean[:count], keep[: count if has_kept else 0],
            uniform[:count])


@njit(cache=True, nogil=True, inline="always")
def _first_step(m, theta, p0, has_theta):
    """``(ratio_a, ratio_b, pmf, cdf)`` at ``k = 1``: :math:`p(k)/p(k-1) = (k a + b)/k`."""
    if has_theta:
        q = m / (m + theta)
        ratio_a, ratio_b = q, (theta - 1.0) * q
    else:
        ratio_a, ratio_b = 0.0, m
    pmf = p0 * (ratio_a + ratio_b)
    return ratio_a, ratio_b, pmf, p0 + pmf


@njit(cache=True, nogil=True)
def inverse_cdf(mu, theta, p_zero, levels, has_theta, max_mean, out):
    r"""Inverse-CDF draws of :math:`X \mid X \ge 1` into ``out`` for the entries with
    ``mu <= max_mean`` (the others are left alone): the arithmetic, entry by entry, of
    the vectorised steps of :func:`scldiff.module._decoder._inverse_cdf_steps`, so the
    same draws. ``levels``: CDF levels on :math:`(P(0), 1)`; ``theta`` is read only with
    ``has_theta`` (otherwise Poisson). Float64 arrays.

    A first, vectorised pass settles the entries whose draw is 1 (most of them); the
    others step on one by one."""
    n = mu.size
    more = np.empty(n, np.uint8)
    for j in range(n):
        m = mu[j]
        ratio_a, ratio_b, pmf, cdf = _first_step(m, theta[j] if has_theta else 0.0,
                                                 p_zero[j], has_theta)
        small = m <= max_mean
        more[j] = small and cdf <= levels[j] and pmf > 0
        if small:
            out[j] = 1.0
    for j in np.flatnonzero(more):
        ratio_a, ratio_b, pmf, cdf = _first_step(mu[j], theta[j] if has_theta else 0.0,
                                                 p_zero[j], has_theta)
        level = levels[j]
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
