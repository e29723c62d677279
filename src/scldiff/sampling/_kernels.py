"""Compiled (numba) loops of the CPU count sampler: which entries may be nonzero, straight
from the decoder's output logits (:func:`preselect_logits`), and which of those are nonzero
with their counts (:func:`nonzero_draws`, whose inverse-CDF steps are :func:`inverse_cdf`).

numba comes with pynndescent, which builds the cell graph. The loops are compiled on their
first call and cached on disk (``cache=True``), so later processes load them. They release
the GIL, so several chunks of cells can be drawn in parallel threads. They are written so
that LLVM vectorises the passes over a row: no Python error checks in the arithmetic
(``error_model="numpy"``), one loop per pass, and an exponential of its own
(:func:`_expf`), since numba's calls to the C library's ``exp`` are not vectorised.

The uniforms come from a counter-based generator: SplitMix64's output function (Steele,
Lea and Flood 2014; the generator behind Java's ``SplittableRandom``) applied to ``key +
c * 0x9E3779B97F4A7C15`` for counter ``c``, which is SplitMix64's ``c``-th output from
seed ``key``. In a chunk of ``G`` genes, entry ``(i, g)`` takes its 16-bit integer from
bits ``16 (g mod 4)`` to ``16 (g mod 4) + 15`` of output ``2 (i Q + g // 4)``, with ``Q =
ceil(G / 4)`` (one output gives four entries their integers), and the 53 bits that
complete it from output ``2 (i G + g) + 1``. So every uniform depends only on the key and
the entry's position, not on the order of evaluation (:func:`entry_uniforms`). The
kernels read the four 16-bit fields of an output as consecutive ``uint16`` values, which
is this order on a little-endian CPU (every platform torch is built for).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11, _S16, _S27, _S30, _S31 = (np.uint64(s) for s in (11, 16, 27, 30, 31))
_ONE, _TWO = np.uint64(1), np.uint64(2)
# the dense test is on 16-bit integers k: u = (k + v) / 2**16 with a 53-bit v
TICKS = 2**16
_INV_TICKS = 1.0 / TICKS
_INV_53 = 2.0**-53
# entries that take their 16-bit integers from one SplitMix64 output
_PER_OUTPUT = 4
# fast-math flags: contraction (FMA) only, so the exponential's range reduction keeps its
# order; sums and maxima may also be reassociated (vectorised); those of finite values
# only may assume no NaN or infinity
_EXACT = {"contract"}
_SUMS = {"contract", "reassoc", "nnan", "ninf", "nsz"}
_FINITE_SUMS = {"contract", "reassoc", "nsz"}  # sums that must still see a NaN
# the exponential's input range: exp(-87.3) is about float32's smallest normal number,
# exp(88.3) about 2**127.4, the largest whose power of two 2**n is normal (n <= 127)
_EXP_LOW = np.float32(-87.3)
_EXP_HIGH = np.float32(88.3)


@njit(cache=True, nogil=True, inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def splitmix_outputs(key: int, counters: np.ndarray) -> np.ndarray:
    """SplitMix64's outputs for ``counters`` from seed ``key`` (numpy; uint64), as the
    kernels compute them: for tests and for checking a draw by hand."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + counters.astype(np.uint64) * _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        return z ^ (z >> _S31)


def entry_uniforms(key: int, n_cells: int, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """The 16-bit integers ``k`` and the completed uniforms ``(k + v) / 2**16`` of the
    ``(n_cells, n_genes)`` entries of a chunk under ``key``, as the kernels draw them
    (numpy; row-major ``(n_cells * n_genes,)`` arrays)."""
    per_row = -(-n_genes // _PER_OUTPUT)
    i, g = np.divmod(np.arange(n_cells * n_genes, dtype=np.uint64), np.uint64(n_genes))
    outputs = splitmix_outputs(key, _TWO * (i * np.uint64(per_row) + g // np.uint64(4)))
    ticks = (outputs >> (_S16 * (g % np.uint64(4)))) & np.uint64(0xFFFF)
    fine = splitmix_outputs(key, _TWO * (i * np.uint64(n_genes) + g) + _ONE) >> _S11
    return ticks, (ticks.astype(np.float64) + fine.astype(np.float64) * _INV_53) * _INV_TICKS


@njit(cache=True, nogil=True, fastmath=_EXACT, error_model="numpy", inline="always")
def _expf(v):
    r""":math:`e^v` in float32, to about 1.4 units in the last place, in a form LLVM
    vectorises (Cephes' ``expf``: :math:`v = n \ln 2 + r`, :math:`e^r` by its minimax
    polynomial, :math:`2^n` put into the exponent bits). Inputs are clamped to
    ``[_EXP_LOW, _EXP_HIGH]``: below, the result is :math:`e^{-87.3}`, about float32's
    smallest normal number, instead of a subnormal or zero; NaN gives that too, so callers
    check their inputs."""
    v = v if v > _EXP_LOW else _EXP_LOW
    v = v if v < _EXP_HIGH else _EXP_HIGH
    n = np.floor(v * np.float32(1.44269504088896341) + np.float32(0.5))
    r = v - n * np.float32(0.693359375)  # ln 2 in two parts (Cody and Waite)
    r = r + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * (r * r) + r + np.float32(1.0)
    return y * np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)


@njit(cache=True, nogil=True, fastmath=_EXACT, error_model="numpy")
def exp_f32(x, out):
    """``out = exp(x)`` elementwise by :func:`_expf` (float32; for tests)."""
    for j in range(x.size):
        out[j] = _expf(x[j])


def _widen(value):
    """A product as float32: itself, or from the bit pattern of a bfloat16 (``uint16``),
    which is the float32 with the same upper 16 bits (exact)."""


@overload(_widen, inline="always")
def _widen_overload(value):
    if value == types.uint16:
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    return lambda value: np.float32(value)


@njit(cache=True, nogil=True, fastmath=_FINITE_SUMS, error_model="numpy")
def _add_bias(products, bias, out):
    """``out = products + bias``; returns their sum in float64, which is finite exactly
    when they all are (NaN and infinities propagate through a reassociated sum too).
    ``products``: float32, or the bit patterns of bfloat16 values (``uint16``), as a
    matrix product under bf16 autocast gives them, widened here without a pass of their
    own."""
    total = 0.0
    for g in range(products.size):
        out[g] = _widen(products[g]) + bias[g]
        total += np.float64(out[g])
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def _max(a):
    """The largest entry of ``a`` (finite; at least one), from 16 running maxima that
    LLVM vectorises (it does not vectorise a single running maximum)."""
    lanes = 16
    partial = np.full(lanes, a[0])
    whole = a.size // lanes * lanes
    for g in range(0, whole, lanes):
        for j in range(lanes):
            partial[j] = a[g + j] if a[g + j] > partial[j] else partial[j]
    largest = partial.max()
    for g in range(whole, a.size):
        largest = a[g] if a[g] > largest else largest
    return largest


@njit(cache=True, nogil=True, fastmath=_EXACT, error_model="numpy")
def _exp_shifted(logits, shift, out):
    """``out = exp(logits - shift)``: a softmax's numerators."""
    for g in range(logits.size):
        out[g] = _expf(logits[g] - shift)


@njit(cache=True, nogil=True, fastmath=_EXACT, error_model="numpy")
def _sigmoid_of_negated(logits, out):
    """``out = 1 / (1 + exp(logits))``, the sigmoid of minus the logits: the ZINB's
    :math:`1 - \\pi` from its dropout logits."""
    for g in range(logits.size):
        out[g] = np.float32(1.0) / (np.float32(1.0) + _expf(logits[g]))


@njit(cache=True, nogil=True, fastmath=_SUMS, error_model="numpy")
def _sum(a):
    total = 0.0
    for g in range(a.size):
        total += np.float64(a[g])
    return total


@njit(cache=True, nogil=True, fastmath=_SUMS, error_model="numpy")
def _dot(a, b):
    total = 0.0
    for g in range(a.size):
        total += np.float64(a[g] * b[g])
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def _row_outputs(outputs, key, first):
    """``outputs[q]``: SplitMix64's output ``2 (first + q)``, whose four 16-bit fields are
    the integers of four consecutive entries of a row."""
    for q in range(outputs.size):
        outputs[q] = _mix(key + (first + np.uint64(q)) * _TWO * _GOLDEN)


@njit(cache=True, nogil=True, error_model="numpy")
def _flag_row(flags, ticks, row, kept_row, factor, has_kept):
    """``flags[g]``: whether entry ``g`` of the row passes the dense test, its integer
    ``ticks[g]`` at most its bound ``factor * row[g]`` (times ``kept_row[g]`` with
    ``has_kept``); one vectorised loop for each kind of bound."""
    if has_kept:
        for g in range(flags.size):
            flags[g] = np.float32(ticks[g]) <= row[g] * factor * kept_row[g]
    else:
        for g in range(flags.size):
            flags[g] = np.float32(ticks[g]) <= row[g] * factor


@njit(cache=True, nogil=True, error_model="numpy")
def _compact(flags, selected):
    """The positions of the set flags into ``selected``, without a branch per entry (an
    unpredictable branch costs more); returns how many."""
    n_selected = 0
    for g in range(flags.size):
        selected[n_selected] = g
        n_selected += flags[g]
    return n_selected


@njit(cache=True, nogil=True)
def _grow(a, size):
    out = np.empty(size, a.dtype)
    out[: a.size] = a
    return out


@njit(cache=True, nogil=True)
def _empty_selection(capacity, has_kept):
    """Arrays for the selected entries: row, column, mean, kept and uniform."""
    return (np.empty(capacity, np.int64), np.empty(capacity, np.int64),
            np.empty(capacity, np.float64), np.empty(capacity if has_kept else 0, np.float64),
            np.empty(capacity, np.float64))


@njit(cache=True, nogil=True, error_model="numpy")
def _write_row(out, count, selected, n_selected, ticks, row, kept_row, has_kept, mean_factor,
               i, start, key):
    """Row ``i``'s ``n_selected`` selected entries into the arrays ``out`` from position
    ``count`` on (growing them if needed); returns the arrays and the new count. Means are
    ``mean_factor * row[g]`` in float64, uniforms completed with their 53 bits."""
    rows, cols, mean, keep, uniform = out
    if count + n_selected > rows.size:
        size = max(2 * rows.size, count + n_selected)
        rows, cols = _grow(rows, size), _grow(cols, size)
        mean, uniform = _grow(mean, size), _grow(uniform, size)
        if has_kept:
            keep = _grow(keep, size)
    for s in range(n_selected):
        g = selected[s]
        fine = _mix(key + ((start + np.uint64(g)) * _TWO + _ONE) * _GOLDEN) >> _S11
        rows[count] = i
        cols[count] = g
        mean[count] = mean_factor * np.float64(row[g])
        if has_kept:
            keep[count] = np.float64(kept_row[g])
        uniform[count] = (np.float64(ticks[g]) + np.float64(fine) * _INV_53) * _INV_TICKS
        count += 1
    return (rows, cols, mean, keep, uniform), count


@njit(cache=True, nogil=True)
def _row_buffers(n_genes):
    per_row = (n_genes + _PER_OUTPUT - 1) // _PER_OUTPUT
    outputs = np.empty(per_row, np.uint64)
    return outputs, outputs.view(np.uint16), np.empty(n_genes, np.uint8), \
        np.empty(n_genes + 1, np.int64)


@njit(cache=True, nogil=True)
def preselect_logits(products, bias, zi_products, zi_bias, library, bound_slack, has_kept,
                     key):
    r"""The entries of a chunk that may be nonzero, with their uniforms, straight from the
    decoder's output layers: their biases, the softmax and the ZINB's renormalisation in the
    same pass over each row.

    ``products``: ``(cells, genes)`` float32, the products of the hidden layer with the
    output layer's weights, and ``bias`` its ``(genes,)`` biases: the logits of the gene
    proportions :math:`\rho` (a softmax over genes) are their sums. ``zi_products`` and
    ``zi_bias``: those of the ZINB's dropout probabilities :math:`\pi` (with ``has_kept``;
    otherwise dummies). Row :math:`i` gets :math:`e_g = \exp(l_g - \max_h l_h)` and
    :math:`k_g = 1 - \pi_g = \sigma(-l^\pi_g)` (:func:`_expf`), and the mean
    :math:`\ell\rho_g / \sum_h k_h\rho_h = \ell e_g / \sum_h k_h e_h` (NB and Poisson:
    :math:`\ell e_g / \sum_h e_h`), as :class:`~scldiff.distributions.CountParams` has
    it, without writing the probabilities out. The bound is :math:`2^{16} E[X]`, the mean
    times :math:`k_g`, times ``bound_slack`` in float32. An entry is kept when its 16-bit
    integer :math:`k` is at most its bound: :math:`u < b` implies :math:`k < 2^{16} b`,
    so no entry with :math:`u` below its bound is missed. A NaN or infinite logit raises
    ``FloatingPointError``.

    Returns, for the kept entries in row-major order: row, column, mean (float64),
    :math:`k_g` (float64; empty without ``has_kept``) and the completed uniform :math:`u =
    (k + v) 2^{-16}` (float64).
    """
    n_cells, n_genes = products.shape
    out = _empty_selection(max(1024, n_cells * n_genes // 8), has_kept)
    key = np.uint64(key)
    outputs, ticks, flags, selected = _row_buffers(n_genes)
    logits = np.empty(n_genes, np.float32)
    zi_logits = np.empty(n_genes if has_kept else 1, np.float32)
    numerators = np.empty(n_genes, np.float32)
    kept_row = np.empty(n_genes if has_kept else 1, np.float32)
    count = 0
    for i in range(n_cells):
        finite = np.isfinite(_add_bias(products[i], bias, logits))
        if has_kept:
            finite = finite and np.isfinite(_add_bias(zi_products[i], zi_bias, zi_logits))
        if not finite:
            raise FloatingPointError("The decoder's output is not finite (NaN or infinite "
                                     "logits): the latents or the model's weights hold NaN "
                                     "or infinite values.")
        _exp_shifted(logits, _max(logits), numerators)
        if has_kept:
            _sigmoid_of_negated(zi_logits, kept_row)
            total = _dot(numerators, kept_row)
        else:
            total = _sum(numerators)
        mean_factor = library[i] / total
        _row_outputs(outputs, key, np.uint64(i * outputs.size))
        _flag_row(flags, ticks, numerators, kept_row, np.float32(mean_factor * bound_slack),
                  has_kept)
        n_selected = _compact(flags, selected)
        out, count = _write_row(out, count, selected, n_selected, ticks, numerators, kept_row,
                                has_kept, mean_factor, i, np.uint64(i * n_genes), key)
    rows, cols, mean, keep, uniform = out
    return (rows[:count], cols[:count], mean[:count], keep[: count if has_kept else 0],
            uniform[:count])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _first_step(m, theta, p0, has_theta):
    """``(ratio_a, ratio_b, pmf, cdf)`` at ``k = 1``: :math:`p(k)/p(k-1) = (k a + b)/k`."""
    if has_theta:
        q = m / (m + theta)
        ratio_a, ratio_b = q, (theta - 1.0) * q
    else:
        ratio_a, ratio_b = 0.0, m
    pmf = p0 * (ratio_a + ratio_b)
    return ratio_a, ratio_b, pmf, p0 + pmf


# the inverse CDF steps all its running entries in passes while more than this many run,
# then the rest one by one
_STEP_PASSES_ABOVE = 64


@njit(cache=True, nogil=True, error_model="numpy")
def _step_pass(k, index, ratio_a, ratio_b, pmf, cdf, levels, n, out):
    """Step ``k`` of the inverse CDF for the first ``n`` running entries (``index``: their
    positions in ``out``, which gets ``k``), and keep in front, in place and in order,
    those that run on; returns how many. No branch per entry: each one's outcome is
    unpredictable."""
    running = 0
    for s in range(n):
        factor = (k * ratio_a[s] + ratio_b[s]) / k
        p = pmf[s] * factor
        previous = cdf[s]
        c = previous + p
        out[index[s]] = k
        index[running] = index[s]
        ratio_a[running] = ratio_a[s]
        ratio_b[running] = ratio_b[s]
        pmf[running] = p
        cdf[running] = c
        levels[running] = levels[s]
        # as in the loop below: the CDF has not passed the level, the pmf is positive and
        # rounding has not stalled the CDF past the mode
        running += (c <= levels[s]) & (p > 0) & ((c != previous) | (factor >= 1.0))
    return running


@njit(cache=True, nogil=True, error_model="numpy")
def inverse_cdf(mu, theta, p_zero, levels, has_theta, max_mean, out):
    r"""Inverse-CDF draws of :math:`X \mid X \ge 1` into ``out`` for the entries with
    ``mu <= max_mean`` (the others are left alone): the arithmetic, entry by entry, of
    the vectorised steps of :func:`scldiff.sampling._torch.inverse_cdf_draws`, so the
    same draws. ``levels``: CDF levels on :math:`(P(0), 1)`; ``theta`` is read only with
    ``has_theta`` (otherwise Poisson). Float64 arrays.

    A first, vectorised pass settles the entries whose draw is 1 (most of them). The
    others take the next steps together, one pass per step (:func:`_step_pass`), while
    more than ``_STEP_PASSES_ABOVE`` run; the long tail's last few step on one by one."""
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
    index = np.flatnonzero(more)
    running = index.size
    state_a, state_b = np.empty(running), np.empty(running)
    state_pmf, state_cdf, state_level = np.empty(running), np.empty(running), np.empty(running)
    for s in range(running):
        j = index[s]
        state_a[s], state_b[s], state_pmf[s], state_cdf[s] = _first_step(
            mu[j], theta[j] if has_theta else 0.0, p_zero[j], has_theta)
        state_level[s] = levels[j]
    k = 1.0
    while running > _STEP_PASSES_ABOVE:
        k += 1.0
        running = _step_pass(k, index, state_a, state_b, state_pmf, state_cdf, state_level,
                             running, out)
    for s in range(running):
        ratio_a, ratio_b, pmf, cdf = state_a[s], state_b[s], state_pmf[s], state_cdf[s]
        level = state_level[s]
        step = k
        stalled = False
        # stop where the CDF has passed the level, or where rounding stalls it past the
        # mode (see _inverse_cdf_steps)
        while cdf <= level and pmf > 0 and not stalled:
            step += 1.0
            factor = (step * ratio_a + ratio_b) / step
            pmf *= factor
            previous = cdf
            cdf = cdf + pmf
            stalled = cdf == previous and factor < 1.0
        out[index[s]] = step


@njit(cache=True, nogil=True, error_model="numpy")
def nonzero_draws(rows, cols, mean, kept, uniform, zero_m1, theta, has_kept, has_theta,
                  max_mean, n_cells):
    r"""Which pre-selected entries are nonzero, and their counts where the mean is at
    most ``max_mean``, as the CSR arrays of the chunk's counts.

    Per entry (float64 arrays): ``mean`` :math:`\mu`, ``kept`` (:math:`1 - \pi` of the
    ZINB; read only with ``has_kept``), ``uniform`` :math:`u`, ``zero_m1`` :math:`P_0 - 1 =
    \mathrm{expm1}(\log P_0)` with :math:`P_0` the negative binomial's (Poisson's)
    probability of a zero, and ``theta`` (read only with ``has_theta``). The entry is
    nonzero when :math:`u < P(X > 0)`, which is :math:`-\mathrm{expm1}(\log P_0)` times
    :math:`1 - \pi`. Its count is drawn from :math:`X \mid X \ge 1`
    by inverse CDF (:func:`inverse_cdf`) at the level :math:`P_0 + (1 - P_0)\,u / P(X >
    0)`: given :math:`u < P(X > 0)`, the ratio is a fresh uniform.

    Returns ``indptr`` (int64), ``indices`` (int32), the counts (float64; those of means
    above ``max_mean`` are left for the caller), and the nonzero entries' means and
    ``theta`` (empty without ``has_theta``), in order.
    """
    n = uniform.size
    flags = np.empty(n, np.uint8)
    if has_kept:
        for j in range(n):
            flags[j] = uniform[j] < -zero_m1[j] * kept[j]
    else:
        for j in range(n):
            flags[j] = uniform[j] < -zero_m1[j]
    source = np.empty(n + 1, np.int64)
    count = _compact(flags, source)
    indptr = np.zeros(n_cells + 1, np.int64)
    indices = np.empty(count, np.int32)
    mu = np.empty(count, np.float64)
    theta_out = np.empty(count if has_theta else 0, np.float64)
    p_zero = np.empty(count, np.float64)
    levels = np.empty(count, np.float64)
    for s in range(count):
        j = source[s]
        indptr[rows[j] + 1] += 1
        indices[s] = cols[j]
        mu[s] = mean[j]
        if has_theta:
            theta_out[s] = theta[j]
        p_nonzero = -zero_m1[j] * kept[j] if has_kept else -zero_m1[j]
        p_zero[s] = 1.0 + zero_m1[j]
        levels[s] = p_zero[s] - zero_m1[j] * (uniform[j] / p_nonzero)
    for i in range(n_cells):
        indptr[i + 1] += indptr[i]
    values = np.empty(count, np.float64)
    inverse_cdf(mu, theta_out if has_theta else mu, p_zero, levels, has_theta, max_mean,
                values)
    return indptr, indices, values, mu, theta_out
