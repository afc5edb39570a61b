"""numba kernels: accumulate, cross-products, per-group factor/BLUP, deviance, gradient, EM.

Two layouts (docs/math.md §2):

- the *statistics* ``M[r] = [n, m (m entries), C (packed m(m+1)/2)]`` per group, the
  weighted means and centred co-moments of ``v = [non-constant union columns, y]``,
  updated per event (:func:`accumulate`);
- the *blocks* ``F[g] = [ZZ_g (q×q), ZX_g (q×p), Zy_g (q)]`` around a centre ``c``, one
  contiguous row per group, built once per fit (:func:`cross_products`). Every
  evaluation of the criterion, its gradient, the BLUPs and the EM sums streams through
  ``F`` alone; the global ``XX, Xy, yy, n`` are computed with it, once.

The one per-group step all fit kernels share is :func:`group_factor`::

    L_g L_g' = Λ'ZZ_gΛ + I,   RZX_g = L_g⁻¹ Λ'ZX_g,   cu_g = L_g⁻¹ Λ'Zy_g

The passes of the criterion and of EM take it for :data:`BLOCK` groups at a time
(:func:`_factor_block`, the same steps with the groups innermost, so they vectorise)
from ``F`` in a blocked layout (:func:`by_block`). Sums over groups run in fixed
chunks of :data:`CHUNK` groups whose partial sums are added in chunk order, so the
result does not depend on the number of threads.

"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from streamlmm import compiling  # noqa: F401  (says when a kernel compiles)
from streamlmm.reservoir import priority

__all__ = [
    "packed_index",
    "first_overflow",
    "accumulate",
    "accumulate_one",
    "accumulate_unit",
    "accumulate_unit_sampled",
    "accumulate_coded",
    "decay_all",
    "merge_rows",
    "cross_products",
    "group_row",
    "Blocks",
    "PlsSums",
    "pls_sums",
    "gradient_terms",
    "gradient_parts",
    "contract_g3",
    "theta_parts",
    "group_conditional",
    "blups",
    "em_sums",
    "group_effect",
    "scratch_size",
    "predict_event",
    "predict_rows",
    "profile_tail",
    "copy_checked",
    "nan_rows",
    "CHUNK",
]

CHUNK = 2048  # groups per chunk of a sum over groups

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}
# FMAs, x/d as x·(1/d), sums over a block's groups reassociated (vectorised reductions);
# NaN and inf kept, and the order of every sum fixed by the chunk and block boundaries
_SUMS = {**_OPTS, "fastmath": {"contract", "arcp", "reassoc"}}


def packed_index(m: int) -> np.ndarray:
    """Symmetric map ``P[i, j]`` from a pair of positions in ``v`` to a packed offset.

    Examples
    --------
    >>> packed_index(3)
    array([[0, 1, 2],
           [1, 3, 4],
           [2, 4, 5]])

    """
    P = np.empty((m, m), dtype=np.int64)
    col = 0
    for i in range(m):
        for j in range(i, m):
            P[i, j] = P[j, i] = col
            col += 1
    return P


# -- statistics: update, decay, merge ------------------------------------------------------
@njit(**_OPTS)
def first_overflow(A, y, w, vi, limit):  # pragma: no cover - numba
    """First event ``e`` with ``w·max|v|² > limit`` (its products could overflow), or -1."""
    for e in range(y.shape[0]):
        vmax = abs(y[e])
        for i in range(vi.shape[0]):
            a = abs(A[e, vi[i]])
            if a > vmax:
                vmax = a
        if not w[e] * vmax * vmax <= limit:
            return e
    return -1


@njit(inline="always", **_OPTS)
def _decay_row(M, tg, r, t, inv_half_life, m):  # pragma: no cover - numba
    """Bring row ``r`` forward to time ``t``: n and C scale by the forgetting factor,
    the ``m`` means stay."""
    dt = t - tg[r]
    if dt > 0.0:
        f = 2.0 ** (-dt * inv_half_life)
        M[r, 0] *= f
        for c in range(1 + m, M.shape[1]):
            M[r, c] *= f
        tg[r] = t


@njit(inline="always", **_OPTS)
def _add_event(M, tg, r, v, w, t, inv_half_life, P):  # pragma: no cover - numba
    """West's weighted update of row ``r`` with ``v``: n += w, m += (w/n)d, C += w(n₀/n)dd'."""
    if inv_half_life > 0.0:
        if t < tg[r]:  # an older event joins with its weight decayed to the row's time
            w = w * 2.0 ** ((t - tg[r]) * inv_half_life)
        else:
            _decay_row(M, tg, r, t, inv_half_life, v.shape[0])
    m = v.shape[0]
    n0 = M[r, 0]
    n1 = n0 + w
    M[r, 0] = n1
    if n1 <= 0.0:
        return
    f = w / n1
    g = w * n0 / n1
    for i in range(m):
        v[i] -= M[r, 1 + i]  # d = v − m_old
    for i in range(m):
        M[r, 1 + i] += f * v[i]
        gd = g * v[i]
        for j in range(i, m):
            M[r, 1 + m + P[i, j]] += gd * v[j]


@njit(**_OPTS)
def accumulate(M, tg, rows, A, y, w, t, vi, inv_half_life, P):  # pragma: no cover - numba
    """Add events into their groups' rows, in event order.

    Event ``e`` contributes ``v = [A[e, vi], y[e]]`` with frequency weight ``w[e]`` at
    time ``t[e]`` (read only with forgetting, ``inv_half_life > 0``). A group is first
    decayed to the event's time when the event is newer than the group's last update
    ``tg[r]``; an older event is added with its weight decayed to ``tg[r]``.
    """
    k = vi.shape[0]
    v = np.empty(k + 1)
    for e in range(rows.shape[0]):
        for i in range(k):
            v[i] = A[e, vi[i]]
        v[k] = y[e]
        te = t[e] if inv_half_life > 0.0 else 0.0
        _add_event(M, tg, rows[e], v, w[e], te, inv_half_life, P)


@njit(**_OPTS)
def accumulate_one(M, tg, r, a, y, w, t, vi, inv_half_life, P, v):  # pragma: no cover
    """One event into row ``r`` (the ``learn_one`` path); ``v`` is scratch."""
    k = vi.shape[0]
    for i in range(k):
        v[i] = a[vi[i]]
    v[k] = y
    _add_event(M, tg, r, v, w, t, inv_half_life, P)


@njit(**_OPTS)
def accumulate_unit(M, r, a, y, vi, P):  # pragma: no cover - numba
    """One event of weight 1 into row ``r``, without forgetting: ``learn_one``'s fast
    path (few arguments, because a numba call costs per argument). The arithmetic is
    :func:`_add_event`'s with ``w = 1``, so both give the same bits."""
    k = vi.shape[0]
    m = k + 1
    n0 = M[r, 0]
    n1 = n0 + 1.0
    M[r, 0] = n1
    f = 1.0 / n1
    g = 1.0 * n0 / n1
    for i in range(m):  # C += g d d' with d = v − m_old (the means move below)
        gd = g * ((a[vi[i]] if i < k else y) - M[r, 1 + i])
        for j in range(i, m):
            M[r, 1 + m + P[i, j]] += gd * ((a[vi[j]] if j < k else y) - M[r, 1 + j])
    for i in range(m):
        M[r, 1 + i] += f * ((a[vi[i]] if i < k else y) - M[r, 1 + i])


@njit(**_OPTS)
def accumulate_unit_sampled(M, r, a, y, vi, P, khash, plan):  # pragma: no cover - numba
    """:func:`accumulate_unit`, and the event's reservoir priority
    (:func:`streamlmm.reservoir.priority`), in one call."""
    accumulate_unit(M, r, a, y, vi, P)
    return priority(khash[r], a, y, plan)


@njit(**_OPTS)
def accumulate_coded(M, r, vals, codes, recipe, a, y, vi, P, khash, plan):  # pragma: no cover
    """``learn_one``'s fast path for formulas with factors: fill the union values ``a``
    from the event's numeric values ``vals`` and factor level codes ``codes`` by
    ``recipe`` (:meth:`streamlmm.design.Design.coded_recipe`; the intercept columns are
    already 1), then :func:`accumulate_unit`; returns the event's reservoir priority
    (0 when ``plan`` is empty: no reservoir). The values are those of
    ``Design.encode_one``, bit for bit."""
    n = recipe[0]
    at = 1
    for _ in range(n):
        a[recipe[at]] = vals[recipe[at + 1]]
        at += 2
    n = recipe[at]
    at += 1
    for _ in range(n):
        i = recipe[at]
        slot = recipe[at + 1]
        nf = recipe[at + 2]
        at += 3
        hit = True
        for t in range(nf):
            if codes[recipe[at + 2 * t]] != recipe[at + 2 * t + 1]:
                hit = False
        at += 2 * nf
        a[i] = (vals[slot] if slot >= 0 else 1.0) if hit else 0.0
    accumulate_unit(M, r, a, y, vi, P)
    if plan.shape[0] == 0:
        return 0.0
    return priority(khash[r], a, y, plan)


@njit(**_OPTS)
def decay_all(M, tg, G, m, now, inv_half_life):  # pragma: no cover - numba
    """Decay every group's statistics to time ``now`` (docs/math.md §7)."""
    for r in range(G):
        _decay_row(M, tg, r, now, inv_half_life, m)


@njit(**_OPTS)
def merge_rows(M, rows, O, P):  # pragma: no cover - numba
    """Pool rows ``O[i]`` into ``M[rows[i]]`` (Chan et al.'s parallel update)."""
    m = P.shape[0]
    d = np.empty(m)
    for i in range(rows.shape[0]):
        r = rows[i]
        na = M[r, 0]
        nb = O[i, 0]
        n = na + nb
        if nb <= 0.0:
            continue
        if na <= 0.0:
            for c in range(M.shape[1]):
                M[r, c] = O[i, c]
            continue
        for a in range(m):
            d[a] = O[i, 1 + a] - M[r, 1 + a]
        g = na * nb / n
        for a in range(m):
            M[r, 1 + a] += d[a] * nb / n
            for b in range(a, m):
                c = 1 + m + P[a, b]
                M[r, c] += O[i, c] + g * d[a] * d[b]
        M[r, 0] = n


# -- cross-products around a centre ----------------------------------------------------------
@njit(inline="always", **_OPTS)
def _cp(Mr, vpos, c, P, m, i, j):  # pragma: no cover - numba
    """Σ w (a_i − c_i)(a_j − c_j) of one row, for union positions ``i, j`` (k = y)."""
    n = Mr[0]
    a = vpos[i]
    b = vpos[j]
    if a < 0 and b < 0:
        return n
    if a < 0:
        return n * (Mr[1 + b] - c[j])
    if b < 0:
        return n * (Mr[1 + a] - c[i])
    return Mr[1 + m + P[a, b]] + n * (Mr[1 + a] - c[i]) * (Mr[1 + b] - c[j])


@njit(**_OPTS)
def group_row(Mr, vpos, c, zi, xi, k, P, out):  # pragma: no cover - numba
    """One group's blocks ``[ZZ (q×q), ZX (q×p), Zy (q)]`` around ``c`` into ``out``."""
    q = zi.shape[0]
    p = xi.shape[0]
    m = P.shape[0]
    for a in range(q):
        for b in range(q):
            out[a * q + b] = _cp(Mr, vpos, c, P, m, zi[a], zi[b])
        for j in range(p):
            out[q * q + a * p + j] = _cp(Mr, vpos, c, P, m, zi[a], xi[j])
        out[q * q + q * p + a] = _cp(Mr, vpos, c, P, m, zi[a], k)


@njit(**_OPTS)
def cross_products(M, G, vpos, c, zi, xi, k, P):  # pragma: no cover - numba
    """Blocks ``F`` of every group and the global ``XX, Xy, yy, n`` around ``c``."""
    q = zi.shape[0]
    p = xi.shape[0]
    m = P.shape[0]
    F = np.empty((G, q * q + q * p + q))
    XX = np.zeros((p, p))
    Xy = np.zeros(p)
    yy = 0.0
    n = 0.0
    for r in range(G):
        Mr = M[r]
        group_row(Mr, vpos, c, zi, xi, k, P, F[r])
        for i in range(p):
            for j in range(i, p):
                XX[i, j] += _cp(Mr, vpos, c, P, m, xi[i], xi[j])
            Xy[i] += _cp(Mr, vpos, c, P, m, xi[i], k)
        yy += _cp(Mr, vpos, c, P, m, k, k)
        n += Mr[0]
    for i in range(p):
        for j in range(i):
            XX[i, j] = XX[j, i]
    return F, XX, Xy, yy, n


class Blocks(NamedTuple):
    """The fit's view of the statistics around a centre (see :func:`cross_products`)."""

    F: np.ndarray
    XX: np.ndarray
    Xy: np.ndarray
    yy: float
    n: float


# -- the per-group factor -----------------------------------------------------------------------
@njit(inline="always", **_OPTS)
def _pivot(s, floor):  # pragma: no cover - numba
    """A Cholesky pivot ``√s``, or NaN when ``s`` is not above ``floor``."""
    return math.sqrt(s) if s > floor else np.nan


@njit(inline="always", **_OPTS)
def _chol(A, q, R, rel):  # pragma: no cover - numba
    """In-place lower Cholesky of ``A[:q, :q]``; returns ``log|L|``, or NaN when a pivot
    is not above ``rel · R[j, j]`` (not positive definite, to that tolerance)."""
    logdet = 0.0
    for j in range(q):
        floor = rel * max(R[j, j], 1e-300)
        s = A[j, j]
        for k in range(j):
            s -= A[j, k] * A[j, k]
        d = _pivot(s, floor)
        if not d == d:
            return np.nan
        A[j, j] = d
        logdet += math.log(d)
        for i in range(j + 1, q):
            s = A[i, j]
            for k in range(j):
                s -= A[i, k] * A[j, k]
            A[i, j] = s / d
        for i in range(j):
            A[i, j] = 0.0
    return logdet


@njit(inline="always", **_OPTS)
def _fwd(L, x, q):  # pragma: no cover - numba
    """``x ← L⁻¹x`` for lower-triangular ``L``."""
    for a in range(q):
        t = x[a]
        for c in range(a):
            t -= L[a, c] * x[c]
        x[a] = t / L[a, a]


@njit(inline="always", **_OPTS)
def _bwd(L, x, q):  # pragma: no cover - numba
    """``x ← L'⁻¹x`` for lower-triangular ``L``."""
    for a in range(q - 1, -1, -1):
        t = x[a]
        for c in range(a + 1, q):
            t -= L[c, a] * x[c]
        x[a] = t / L[a, a]


@njit(inline="always", **_OPTS)
def group_factor(Fr, q, p, lam, L, RZX, cu, W):  # pragma: no cover - numba
    """Fill ``L_g``, ``RZX_g`` and ``cu_g`` from one group's blocks; return ``log|L_g|``.

    :func:`_factor_block` takes the same steps for a block of groups at once.
    """
    # W = ZZ Λ
    for a in range(q):
        for b in range(q):
            s = 0.0
            for c in range(b, q):  # Λ is lower triangular
                s += Fr[a * q + c] * lam[c, b]
            W[a, b] = s
    # L = Λ'W + I (lower triangle), then factorised in place
    for a in range(q):
        for b in range(a + 1):
            s = 0.0
            for c in range(a, q):
                s += lam[c, a] * W[c, b]
            L[a, b] = s
        L[a, a] += 1.0
    logdet = _chol(L, q, L, 0.0)
    # RZX = L⁻¹ Λ'ZX,  cu = L⁻¹ Λ'Zy
    zx = q * q
    zy = q * q + q * p
    for a in range(q):
        for j in range(p):
            s = 0.0
            for c in range(a, q):
                s += lam[c, a] * Fr[zx + c * p + j]
            for c in range(a):
                s -= L[a, c] * RZX[c, j]
            RZX[a, j] = s / L[a, a]
        s = 0.0
        for c in range(a, q):
            s += lam[c, a] * Fr[zy + c]
        for c in range(a):
            s -= L[a, c] * cu[c]
        cu[a] = s / L[a, a]
    return logdet


@njit(inline="always", **_OPTS)
def _blup_into(L, RZX, cu, lam, beta, u, b, q, p):  # pragma: no cover - numba
    """``u = L'⁻¹(cu − RZX β)`` and ``b = Λ u`` for one group."""
    for a in range(q):
        t = cu[a]
        for j in range(p):
            t -= RZX[a, j] * beta[j]
        u[a] = t
    _bwd(L, u, q)
    for a in range(q):
        t = 0.0
        for c in range(a + 1):
            t += lam[a, c] * u[c]
        b[a] = t


@njit(inline="always", **_OPTS)
def _cond_cov_into(L, lam, Linv, out, q):  # pragma: no cover - numba
    """``out = Λ (L L')⁻¹ Λ'`` (to be scaled by σ²): the conditional covariance."""
    for j in range(q):
        for i in range(q):
            Linv[i, j] = 0.0
        Linv[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, q):
            t = 0.0
            for c in range(j, i):
                t -= L[i, c] * Linv[c, j]
            Linv[i, j] = t / L[i, i]
    for a in range(q):
        for b in range(a + 1):
            t = 0.0
            for c in range(q):
                mca = 0.0
                mcb = 0.0
                for d in range(c + 1):
                    mca += Linv[c, d] * lam[a, d]
                    mcb += Linv[c, d] * lam[b, d]
                t += mca * mcb
            out[a, b] = t
            out[b, a] = t


@njit(inline="always", **_OPTS)
def group_conditional(Fr, q, p, lam, beta, L, RZX, cu, W, u, b, K):  # pragma: no cover
    """One group's conditional mean and covariance given (β, Λ), from its blocks ``Fr``
    (docs/math.md §4): ``u = L'⁻¹(cu − RZX β)``, ``b = Λu`` and ``K = Λ(LL')⁻¹Λ'``, so
    that ``Var(b | y, β, Λ, σ) = σ²K``. Returns ``log|L|``. ``L`` (the group's factor,
    kept for draws ``u + σL'⁻¹z``), ``RZX, cu, W, u`` are scratch of
    :func:`_scratch`'s shapes.

    The one computation of a group's conditional: every caller (the BLUPs of a fit, the
    scale-out lookups, the Bayesian posterior's draws) goes through it.
    """
    ld = group_factor(Fr, q, p, lam, L, RZX, cu, W)
    _blup_into(L, RZX, cu, lam, beta, u, b, q, p)
    _cond_cov_into(L, lam, W, K, q)
    return ld


@njit(inline="always", **_OPTS)
def _scratch(q, p):  # pragma: no cover - numba
    """One group's work arrays: ``L, W`` (q×q), ``RZX`` (q×p), ``cu, u, b`` (q)."""
    return (
        np.empty((q, q)),
        np.empty((q, q)),
        np.empty((q, p)),
        np.empty(q),
        np.empty(q),
        np.empty(q),
    )


# -- sums over groups -----------------------------------------------------------------------------
# The sums run over a chunk block by block: :data:`BLOCK` groups' rows of ``F`` are
# transposed into scratch arrays ``(entries, BLOCK)`` (structure of arrays), and every step
# of :func:`group_factor`'s math is then a loop over the block's groups innermost, which
# LLVM vectorises (for q ≤ 3, q is a compile-time constant: :func:`_pass_kernels`), so
# the outer loops over q unroll. A partial block is padded with empty groups (ZZ,
# ZX, Zy = 0: L = I, every term 0), so every loop has the same trip count.
BLOCK = 64  # groups per block (measured: 64 beats 32, 128 and 256 at q=2, p=3)
_PER_CHUNK = CHUNK // BLOCK  # blocks per chunk
_BIG = 1e75  # the lanes' products of pivots are logged before they leave [1/_BIG, _BIG]


def _layout(q: int, p: int) -> dict[str, int]:
    """Offsets in one chunk's sums of :func:`_eval_chunk` (``m = q(p+1)``)."""
    m = q * (p + 1)
    o = {"logdet": 0, "cu2": 1, "A": 2, "c": 2 + p * p, "T": 2 + p * p + p}
    o["WY"] = o["T"] + q * q
    o["WW"] = o["WY"] + m * m
    o["size"] = o["WW"] + m * m
    return o


@njit(inline="always", **_OPTS)
def _dots24(X, i, Y, j):  # pragma: no cover - numba
    """``Σ_g X[i + r, g]·Y[j + t, g]`` for r = 0..1, t = 0..3 (a 2×4 tile)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for g in range(BLOCK):
        x0 = X[i, g]
        x1 = X[i + 1, g]
        y0 = Y[j, g]
        y1 = Y[j + 1, g]
        y2 = Y[j + 2, g]
        y3 = Y[j + 3, g]
        s0 += x0 * y0
        s1 += x0 * y1
        s2 += x0 * y2
        s3 += x0 * y3
        s4 += x1 * y0
        s5 += x1 * y1
        s6 += x1 * y2
        s7 += x1 * y3
    return s0, s1, s2, s3, s4, s5, s6, s7


@njit(inline="always", **_OPTS)
def _gram(X, Y, m4, upper, acc):  # pragma: no cover - numba
    """``acc[i, j] += Σ_g X[i, g]·Y[j, g]`` for ``i, j < m4`` (the tiles ``j ≥ i`` that
    hold the upper triangle if ``upper``). ``X, Y`` have zero rows up to ``m4``, a
    multiple of 4, so every 2×4 tile is whole and written without tests."""
    for i in range(0, m4, 2):
        for j in range(i - i % 4 if upper else 0, m4, 4):
            s = _dots24(X, i, Y, j)
            for r in range(2):
                for t in range(4):
                    acc[i + r, j + t] += s[r * 4 + t]


@njit(inline="always", **_OPTS)
def _log_lanes(P, fold):  # pragma: no cover - numba
    """``Σ log P[g]``, one log per ``fold`` lanes, and the lanes back to 1. With every
    lane in [1/_BIG, _BIG], a product of four is a finite double (NaN stays NaN)."""
    s = 0.0
    n = BLOCK // fold
    for g in range(n):
        x = P[g]
        for f in range(1, fold):
            x *= P[g + f * n]
        s += math.log(x)
    for g in range(BLOCK):
        P[g] = 1.0
    return s


@njit(inline="always", **_OPTS)
def _leaving_range(P):  # pragma: no cover - numba
    """Whether a lane product is about to leave [1/_BIG, _BIG] (NaN stays NaN: no)."""
    n = 0
    for g in range(BLOCK):
        n += (P[g] > _BIG) | (P[g] < 1.0 / _BIG)
    return n > 0


@njit(inline="always", **_OPTS)
def _factor_block(S, q, p, lam, ZZlam, L, dinv, V, P):  # pragma: no cover - numba
    """:func:`group_factor` for a block of groups (columns of ``S``, entries by row).

    Fills ``ZZlam = ZZ Λ``, the strict lower triangle of ``L`` (row-major q×q; its
    diagonal is scratch), ``dinv = 1/diag(L)`` and ``V = [RZX | cu] = L⁻¹Λ'[ZX | Zy]``
    (row-major q×(p+1)). The pivots multiply into the lanes ``P``; returns the logs of
    lane products flushed on the way. A pivot that is not positive is NaN, as in
    :func:`_chol` (with ``rel = 0``).
    """
    B = BLOCK
    k = p + 1
    zx = q * q
    zy = q * q + q * p
    for a in range(q):  # ZZ Λ  (Λ lower triangular)
        for b in range(q):
            for g in range(B):
                s = 0.0
                for c in range(b, q):
                    s += S[a * q + c, g] * lam[c, b]
                ZZlam[a * q + b, g] = s
    for a in range(q):  # L = Λ'ZZΛ + I, lower triangle
        for b in range(a + 1):
            for g in range(B):
                s = 1.0 if a == b else 0.0
                for c in range(a, q):
                    s += lam[c, a] * ZZlam[c * q + b, g]
                L[a * q + b, g] = s
    flushed = 0.0
    for j in range(q):  # Cholesky, column by column
        for g in range(B):
            s = L[j * q + j, g]
            for c in range(j):
                s -= L[j * q + c, g] * L[j * q + c, g]
            d = _pivot(s, 0.0)  # group_factor's _chol(..., rel=0): floor 0
            dinv[j, g] = 1.0 / d
            P[g] *= d
        for i in range(j + 1, q):
            for g in range(B):
                s = L[i * q + j, g]
                for c in range(j):
                    s -= L[i * q + c, g] * L[j * q + c, g]
                L[i * q + j, g] = s * dinv[j, g]
        if _leaving_range(P):  # a lane is at most _BIG times a pivot: finite
            flushed += _log_lanes(P, 1)
    for a in range(q):  # [RZX | cu] = L⁻¹ Λ'[ZX | Zy]
        for j in range(k):
            e = zx + j if j < p else zy  # column j of [ZX | Zy] at row c: S[e + c·p_or_1]
            st = p if j < p else 1
            for g in range(B):
                s = 0.0
                for c in range(a, q):
                    s += lam[c, a] * S[e + c * st, g]
                for c in range(a):
                    s -= L[a * q + c, g] * V[c * k + j, g]
                V[a * k + j, g] = s * dinv[a, g]
    return flushed


@njit(inline="always", **_OPTS)
def _grad_block(S, q, p, ZZlam, L, dinv, V, Y, W, X, T):  # pragma: no cover - numba
    """The gradient's per-group pieces for a block (after :func:`_factor_block`): ``Y =
    L'⁻¹[RZX | cu]`` and ``W = [ZX | Zy] − ZZΛ Y`` (row-major q×(p+1)); adds the block's
    ``Σ M⁻¹Λ'ZZ`` into ``T`` (row-major q×q; ``X`` is scratch)."""
    k = p + 1
    zx = q * q
    zy = q * q + q * p
    for a in range(q - 1, -1, -1):  # Y = L'⁻¹ V
        for j in range(k):
            for g in range(BLOCK):
                s = V[a * k + j, g]
                for c in range(a + 1, q):
                    s -= L[c * q + a, g] * Y[c * k + j, g]
                Y[a * k + j, g] = s * dinv[a, g]
    for a in range(q):  # W = [ZX | Zy] − ZZΛ Y
        for j in range(k):
            e = zx + a * p + j if j < p else zy + a
            for g in range(BLOCK):
                s = S[e, g]
                for c in range(q):
                    s -= ZZlam[a * q + c, g] * Y[c * k + j, g]
                W[a * k + j, g] = s
    for c in range(q):  # X = L'⁻¹L⁻¹ Λ'ZZ column by column; (Λ'ZZ)[a, c] = (ZZΛ)[c, a]
        for a in range(q):
            for g in range(BLOCK):
                s = ZZlam[c * q + a, g]
                for b in range(a):
                    s -= L[a * q + b, g] * X[b * q + c, g]
                X[a * q + c, g] = s * dinv[a, g]
        for a in range(q - 1, -1, -1):
            t = 0.0
            for g in range(BLOCK):
                s = X[a * q + c, g]
                for b in range(a + 1, q):
                    s -= L[b * q + a, g] * X[b * q + c, g]
                s *= dinv[a, g]
                X[a * q + c, g] = s
                t += s
            T[a * q + c] += t


@njit(inline="always", **_OPTS)
def _eval_chunk(Fb, lo, hi, q, p, lam, grad, out):  # pragma: no cover - numba
    """Add groups lo..hi-1 into ``out`` (offsets: :func:`_layout`), block by block.

    Always ``Σ log|L|, Σ‖cu‖², Σ RZX'RZX, Σ RZX'cu``. With ``grad`` ≥ 1 (an int), also
    the sums the gradient needs at *any* β, so that criterion and gradient take one
    pass: with ``Y_g = L'⁻¹[RZX | cu]`` and ``W_g = [ZX | Zy] − ZZ Λ Y_g`` (q×(p+1)
    each), ``u_g = Y_g β̃`` and ``Z_g'res_g = W_g β̃`` for ``β̃ = (−β, 1)``; returns
    ``Σ M_g⁻¹Λ'ZZ_g``, ``Σ vec(W_g)vec(Y_g)'`` and, with ``grad`` = 2 (only REML's
    ``log|RX|`` needs it), the upper triangle of ``Σ vec(W_g)vec(W_g)'``.

    ``Σ log|L_g|`` is taken as the log of products of pivots, lane by lane (one log per
    lane and chunk, not one per pivot), logged early if a product would leave
    [1/_BIG, _BIG]. The sums over a block's groups are vectorised reductions: their
    order is fixed by the chunk and block boundaries, not by the threads.
    """
    k = p + 1
    m = q * k
    ZZlam = np.empty((q * q, BLOCK))
    L = np.empty((q * q, BLOCK))
    dinv = np.empty((q, BLOCK))
    m4 = (m + 3) // 4 * 4  # Y, W: zero rows up to a multiple of 4 (see _gram)
    V = np.empty((m, BLOCK))
    Y = np.zeros((m4, BLOCK))
    W = np.zeros((m4, BLOCK))
    X = np.empty((q * q, BLOCK))
    P = np.ones(BLOCK)
    AWY = np.zeros((m4, m4))  # the chunk's Gram sums, tile by tile (see _gram)
    AWW = np.zeros((m4, m4))
    oc = 2 + p * p
    oT = oc + p
    oWY = oT + q * q
    oWW = oWY + m * m
    for b in range(lo, hi):
        S = Fb[b]
        out[0] += _factor_block(S, q, p, lam, ZZlam, L, dinv, V, P)
        for i in range(k):  # the upper triangle of Σ V'V: A, c, ‖cu‖²
            for j in range(i, k):
                s = 0.0
                for g in range(BLOCK):
                    for a in range(q):
                        s += V[a * k + i, g] * V[a * k + j, g]
                if j < p:
                    out[2 + i * p + j] += s
                elif i < p:
                    out[oc + i] += s
                else:
                    out[1] += s
        if grad == 0:
            continue
        _grad_block(S, q, p, ZZlam, L, dinv, V, Y, W, X, out[oT:oWY])
        _gram(W, Y, m4, False, AWY)
        if grad > 1:
            _gram(W, W, m4, True, AWW)
    out[0] += _log_lanes(P, 4)
    if grad > 0:
        for i in range(m):
            for j in range(m):
                out[oWY + i * m + j] += AWY[i, j]
                if j >= i:
                    out[oWW + i * m + j] += AWW[i, j]


@njit(inline="always", **_OPTS)
def _block_conditionals_all(F, q, p, lam, beta):  # pragma: no cover - numba
    """All groups' ``b_g = Λu_g`` and ``Λ(L_gL_g')⁻¹Λ'`` (see :func:`block_conditionals`)."""
    G = F.shape[0]
    L, W, RZX, cu, u, _ = _scratch(q, p)
    B = np.empty((G, q))
    V = np.empty((G, q, q))
    for r in range(G):
        group_conditional(F[r], q, p, lam, beta, L, RZX, cu, W, u, B[r], V[r])
    return B, V


@njit(**_OPTS)
def _block_conditionals_kernel(F, q, p, lam, beta):  # pragma: no cover - numba
    return _block_conditionals_all(F, q, p, lam, beta)


@njit(inline="always", **_OPTS)
def _em_block(S, nb, q, p, lam, beta, L, dinv, V, U, Bl, N, out):  # pragma: no cover
    """ML-EM's terms for a block (after :func:`_factor_block`), added into ``out =
    [Σ b b' (q×q), Σ K (q×q), Σ(tr(ZZ b b') − 2 b'r), Σ tr(ZZ K), Σ ZX'b (p)]``.

    Per group (as :func:`_blup_into` and :func:`_cond_cov_into`): ``u = L'⁻¹(cu − RZX
    β)``, ``b = Λu`` and ``K = Λ(LL')⁻¹Λ' = N'N`` for ``N = L⁻¹Λ'``; ``U, Bl, N`` are
    scratch. Only the first ``nb`` groups are real: the padding's terms are 0 but for
    ``K = ΛΛ'``, which is left out.
    """
    k = p + 1
    zx = q * q
    zy = q * q + q * p
    for a in range(q - 1, -1, -1):  # u = L'⁻¹(cu − RZX β)
        for g in range(BLOCK):
            s = V[a * k + p, g]
            for j in range(p):
                s -= V[a * k + j, g] * beta[j]
            for c in range(a + 1, q):
                s -= L[c * q + a, g] * U[c, g]
            U[a, g] = s * dinv[a, g]
    for a in range(q):  # b = Λu
        for g in range(BLOCK):
            s = 0.0
            for c in range(a + 1):
                s += lam[a, c] * U[c, g]
            Bl[a, g] = s
    for a in range(q):  # column a of N = L⁻¹Λ' is L⁻¹ (row a of Λ)'
        for c in range(q):
            for g in range(BLOCK):
                s = lam[a, c] if c <= a else 0.0
                for d in range(c):
                    s -= L[c * q + d, g] * N[d * q + a, g]
                N[c * q + a, g] = s * dinv[c, g]
    oK = q * q
    o = 2 * q * q
    for a in range(q):
        for c in range(a, q):
            sbb = 0.0
            for g in range(BLOCK):
                sbb += Bl[a, g] * Bl[c, g]
            sk = 0.0
            for g in range(nb):
                for d in range(q):
                    sk += N[d * q + a, g] * N[d * q + c, g]
            out[a * q + c] += sbb
            out[oK + a * q + c] += sk
            if c > a:
                out[c * q + a] += sbb
                out[oK + c * q + a] += sk
    rss = 0.0
    trK = 0.0
    for g in range(BLOCK):
        for a in range(q):
            ra = S[zy + a, g]
            for j in range(p):
                ra -= S[zx + a * p + j, g] * beta[j]
            rss -= 2.0 * Bl[a, g] * ra
            for c in range(q):
                zz = S[a * q + c, g]
                rss += zz * Bl[a, g] * Bl[c, g]
                t = 0.0
                for d in range(q):
                    t += N[d * q + c, g] * N[d * q + a, g]
                trK += zz * t
    out[o] += rss
    out[o + 1] += trK
    for j in range(p):
        t = 0.0
        for g in range(BLOCK):
            for a in range(q):
                t += S[zx + a * p + j, g] * Bl[a, g]
        out[o + 2 + j] += t


@njit(inline="always", **_OPTS)
def _em_all(Fb, G, q, p, lam, beta):  # pragma: no cover - numba
    """The sums of :func:`em_sums` over ``G`` groups, block by block in chunks added in
    chunk order."""
    k = p + 1
    ZZlam = np.empty((q * q, BLOCK))
    L = np.empty((q * q, BLOCK))
    dinv = np.empty((q, BLOCK))
    V = np.empty((q * k, BLOCK))
    U = np.empty((q, BLOCK))
    Bl = np.empty((q, BLOCK))
    N = np.empty((q * q, BLOCK))
    P = np.ones(BLOCK)  # the pivots' products, not needed here
    n = Fb.shape[0]
    size = 2 * q * q + 2 + p
    parts = np.zeros(((n + _PER_CHUNK - 1) // _PER_CHUNK, size))
    for ch in range(parts.shape[0]):
        for b in range(ch * _PER_CHUNK, min(n, (ch + 1) * _PER_CHUNK)):
            _factor_block(Fb[b], q, p, lam, ZZlam, L, dinv, V, P)
            nb = min(BLOCK, G - b * BLOCK)
            _em_block(Fb[b], nb, q, p, lam, beta, L, dinv, V, U, Bl, N, parts[ch])
    s = parts[0].copy()
    for ch in range(1, parts.shape[0]):
        for i in range(size):
            s[i] += parts[ch, i]
    Sbb = s[: q * q].copy().reshape((q, q))
    SK = s[q * q : 2 * q * q].copy().reshape((q, q))
    o = 2 * q * q
    return Sbb, SK, s[o], s[o + 1], s[o + 2 :].copy()


@njit(inline="always", **_OPTS)
def _sums(parts, q, p, grad):  # pragma: no cover - numba
    """The chunks' sums (:func:`_layout`) added in chunk order, as ``(logdet, cu2, A, c,
    T, WY, WW)``, ``A`` and ``WW`` filled in from their upper triangles (without
    ``grad``, ``T, WY, WW`` are empty)."""
    s = parts[0].copy()
    for ch in range(1, parts.shape[0]):
        for i in range(s.shape[0]):
            s[i] += parts[ch, i]
    m = q * (p + 1) if grad > 0 else 0
    qg = q if grad > 0 else 0
    oc = 2 + p * p
    oT = oc + p
    oWY = oT + q * q
    oWW = oWY + m * m
    A = np.empty((p, p))
    for i in range(p):
        for j in range(i, p):
            A[i, j] = A[j, i] = s[2 + i * p + j]
    T = np.empty((qg, qg))
    for e in range(qg * qg):
        T[e // qg, e % qg] = s[oT + e]
    WY = np.empty((m, m))
    WW = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            WY[i, j] = s[oWY + i * m + j]
            if j >= i:
                WW[i, j] = WW[j, i] = s[oWW + i * m + j]
    return s[0], s[1], A, s[oc:oT].copy(), T, WY, WW


@njit(**_OPTS)
def _sums_kernel(parts, q, p, grad):  # pragma: no cover - numba
    return _sums(parts, q, p, grad)


class _PassKernels(NamedTuple):
    evaluate: Any  # (Fb, q, p, lam, grad, parts, c0, c1) → chunks c0..c1-1 into parts
    em: Any  # (Fb, G, q, p, lam, beta) → (Sbb, SK, rss, trK, T)


SPECIAL_Q = (1, 2, 3)  # q with passes of their own (q known to the compiler); others share one
_PASS_KERNELS: dict[int, _PassKernels] = {}


def _pass_kernels(q: int) -> _PassKernels:
    """The passes over the groups for ``q`` random-effect columns.

    For q = 1, 2, 3 each is compiled with q as a constant, so the loops over q unroll
    around the vectorised loops over a block's groups; p is always an argument. Every
    other q shares one version with q as an argument. So a new formula never compiles:
    the eight passes are compiled once, by ``python -m streamlmm.warm`` (which
    ``scripts/setup`` runs), and loaded from numba's cache afterwards.
    """
    Q = int(q) if int(q) in SPECIAL_Q else 0
    got = _PASS_KERNELS.get(Q)
    if got is None:
        got = _PASS_KERNELS[Q] = _compile_pass_kernels(Q)
    return got


def _compile_pass_kernels(Q: int) -> _PassKernels:
    """The two passes; ``Q`` a constant of the compiled code, or 0 (q an argument)."""
    if Q:

        @njit(**_SUMS)
        def evaluate(Fb, q, p, lam, grad, parts, c0, c1):  # pragma: no cover - numba
            n = Fb.shape[0]
            for ch in range(c0, c1):
                lo, hi = ch * _PER_CHUNK, min(n, (ch + 1) * _PER_CHUNK)
                _eval_chunk(Fb, lo, hi, Q, p, lam, grad, parts[ch])

        @njit(**_SUMS)
        def em(Fb, G, q, p, lam, beta):  # pragma: no cover - numba
            return _em_all(Fb, G, Q, p, lam, beta)

    else:

        @njit(**_SUMS)
        def evaluate(Fb, q, p, lam, grad, parts, c0, c1):  # pragma: no cover - numba
            n = Fb.shape[0]
            for ch in range(c0, c1):
                lo, hi = ch * _PER_CHUNK, min(n, (ch + 1) * _PER_CHUNK)
                _eval_chunk(Fb, lo, hi, q, p, lam, grad, parts[ch])

        @njit(**_SUMS)
        def em(Fb, G, q, p, lam, beta):  # pragma: no cover - numba
            return _em_all(Fb, G, q, p, lam, beta)

    return _PassKernels(evaluate, em)


_POOL: list = []  # [size, executor]: the threads of parallel passes, made on first use


def _chunks_in_threads(
    evaluate, Fb, q: int, p: int, lam, grad: int, parts: np.ndarray, threads: int
) -> None:
    """Chunks split into ``threads`` contiguous runs, one per thread, each run by the one
    compiled ``evaluate`` (it releases the GIL). Every chunk's sums are the serial pass's
    bits, and they are added in chunk order afterwards, so the result does not depend on
    the number of threads. Waiting threads block; they never spin."""
    from concurrent.futures import ThreadPoolExecutor

    n = parts.shape[0]
    cuts = [n * t // threads for t in range(threads + 1)]
    if not _POOL or _POOL[0] < threads - 1:
        _POOL[:] = [threads - 1, ThreadPoolExecutor(threads - 1, thread_name_prefix="streamlmm")]
    pool = _POOL[1]
    runs = [
        pool.submit(evaluate, Fb, q, p, lam, grad, parts, a, b) for a, b in zip(cuts[1:], cuts[2:])
    ]
    evaluate(Fb, q, p, lam, grad, parts, cuts[0], cuts[1])
    for r in runs:
        r.result()


class PlsSums(NamedTuple):
    """Sums over groups of the profiled criterion at one Λ (docs/math.md §3), and, when
    asked for, those of its gradient at any β (see :func:`gradient_terms`)."""

    logdet: float  # Σ log|L_g|
    cu2: float  # Σ ‖cu_g‖²
    A: np.ndarray  # Σ RZX_g'RZX_g
    c: np.ndarray  # Σ RZX_g'cu_g
    T: np.ndarray | None = None  # Σ M_g⁻¹Λ'ZZ_g (q×q)
    WY: np.ndarray | None = None  # Σ vec(W_g)vec(Y_g)' (q(p+1) square)
    WW: np.ndarray | None = None  # Σ vec(W_g)vec(W_g)'


def by_block(F: np.ndarray) -> np.ndarray:
    """``F`` in blocks of :data:`BLOCK` groups, each transposed: ``Fb[b, e, g] =
    F[b·BLOCK + g, e]``, the last block padded with empty groups. The layout that
    :func:`pls_sums` reads (a fit makes it once, for all its evaluations).

    Examples
    --------
    >>> F = np.arange(2.0 * 3).reshape(2, 3)  # two groups
    >>> Fb = by_block(F)
    >>> Fb.shape == (1, 3, BLOCK), Fb[0, :, :3].tolist()
    (True, [[0.0, 3.0, 0.0], [1.0, 4.0, 0.0], [2.0, 5.0, 0.0]])

    """
    G, e = F.shape
    padded = np.zeros((max(1, -(-G // BLOCK)) * BLOCK, e))
    padded[:G] = F
    return np.ascontiguousarray(padded.reshape(-1, BLOCK, e).transpose(0, 2, 1))


def pls_sums(
    F: np.ndarray,
    q: int,
    p: int,
    lam: np.ndarray,
    parallel: bool | int,
    grad: bool = False,
    *,
    Fb: np.ndarray | None = None,
    ww: bool = True,
) -> PlsSums:
    """The sums over groups that the profiled deviance (and, with ``grad``, its gradient)
    needs at Λ: one pass over ``F``, in chunks summed in chunk order; ``parallel``
    spreads the chunks over threads (``True``: every core; an int: that many), which
    changes no bit of the result.

    ``Fb`` is ``F`` in the blocked layout (:func:`by_block`), if the caller keeps it
    across evaluations; else it is made here. ``ww=False`` leaves out the sums that only
    REML's ``∂log|RX|`` needs (``WW`` is then zero): the ML criterion and the log
    likelihood at any β (:mod:`streamlmm.bayes.density`) do without them.
    """
    evaluate = _pass_kernels(q).evaluate
    Fb = by_block(F) if Fb is None else Fb
    grad = (2 if ww else 1) if grad else 0
    parts = np.zeros(((Fb.shape[0] + _PER_CHUNK - 1) // _PER_CHUNK, _layout(q, p)["size"]))
    threads = min(parts.shape[0], _threads(parallel)) if parallel else 1
    q, p = int(q), int(p)
    if threads > 1:
        _chunks_in_threads(evaluate, Fb, q, p, lam, grad, parts, threads)
    else:
        evaluate(Fb, q, p, lam, grad, parts, 0, parts.shape[0])
    s = _sums_kernel(parts, q, p, grad)
    return PlsSums(*s) if grad > 0 else PlsSums(*s[:4])


def _threads(parallel: bool | int) -> int:
    """Threads for a parallel pass: a count, or (``True``) every core numba would use."""
    if parallel is True:
        import numba

        return max(1, int(numba.config.NUMBA_NUM_THREADS))
    return max(1, int(parallel))


@njit(inline="always", **_OPTS)
def contract_g3(WY, beta, q):  # pragma: no cover - numba
    """``G3 = Σ_jk WY[:, j, :, k] β̃_j β̃_k = Σ_g (Z_g'res_g) u_g'`` at β, for ``β̃ = (−β, 1)``."""
    p = beta.shape[0]
    k = p + 1
    bt = np.empty(k)
    for j in range(p):
        bt[j] = -beta[j]
    bt[p] = 1.0
    G3 = np.zeros((q, q))
    for a in range(q):
        for c in range(q):
            for j in range(k):
                for l in range(k):
                    G3[a, c] += WY[a * k + j, c * k + l] * bt[j] * bt[l]
    return G3


@njit(inline="always", **_OPTS)
def _contract_g2(WW, lam, Cinv):  # pragma: no cover - numba
    """``G2 = Λ' Σ_jk BB[:, j, :, k] C⁻¹[j, k]`` (``BB``: the first p columns of each
    block of ``WW``)."""
    q = lam.shape[0]
    p = Cinv.shape[0]
    k = p + 1
    H = np.zeros((q, q))
    for a in range(q):
        for c in range(q):
            for j in range(p):
                for l in range(p):
                    H[a, c] += WW[a * k + j, c * k + l] * Cinv[j, l]
    G2 = np.zeros((q, q))
    for a in range(q):
        for c in range(q):
            for d in range(a, q):  # Λ lower triangular: (Λ')[a, d] = Λ[d, a]
                G2[a, c] += lam[d, a] * H[d, c]
    return G2


@njit(**_OPTS)
def _contract(WY, WW, lam, beta, Cinv):  # pragma: no cover - numba
    """``(G2, G3)`` of :func:`gradient_terms`."""
    return _contract_g2(WW, lam, Cinv), contract_g3(WY, beta, lam.shape[0])


@njit(inline="always", **_OPTS)
def theta_parts(G1, G2, G3, rows, cols):  # pragma: no cover - numba
    """The criterion's pieces differentiated in each θ entry ``θ_k = Λ[rows[k], cols[k]]``
    (docs/math.md §3), from :func:`gradient_terms`' sums: ``(∂Σ log|M_g|, ∂log|RX'RX|,
    ∂r²) = (2 G1[j, i], −2 G2[j, i], −2 G3[i, j])``. ``∂r²`` holds β (and u) fixed: it is
    the derivative of the penalised residual sum of squares ``Q(β)`` at the β of
    ``G3``, which at β̂ is the whole derivative of r² (the envelope theorem)."""
    n = rows.shape[0]
    dM = np.empty(n)
    dRX = np.empty(n)
    dr2 = np.empty(n)
    for t in range(n):
        i = rows[t]
        j = cols[t]
        dM[t] = 2.0 * G1[j, i]
        dRX[t] = -2.0 * G2[j, i]
        dr2[t] = -2.0 * G3[i, j]
    return dM, dRX, dr2


@njit(**_OPTS)
def _theta_parts_kernel(G1, G2, G3, rows, cols):  # pragma: no cover - numba
    return theta_parts(G1, G2, G3, rows, cols)


def gradient_terms(s: PlsSums, q: int, p: int, lam, beta, Cinv):
    """The gradient's sums over groups at β, from :func:`pls_sums` (``grad=True``).

    With ``M_g = L_gL_g'``, ``u_g`` the spherical BLUP at β, ``Z_g'res_g = Zy_g − ZX_gβ −
    ZZ_gΛu_g`` and ``B_g = ZX_g − ZZ_gΛL_g'⁻¹RZX_g`` (the first p columns of ``W_g``),
    returns ``(Σ M_g⁻¹Λ'ZZ_g, Σ Λ'B_g C⁻¹B_g', Σ (Z_g'res_g) u_g')`` for ``C⁻¹ =
    (RX'RX)⁻¹``. A θ entry at Λ[i, j] then has derivative ``2 G1[j, i]`` in Σ log|M_g|,
    ``−2 G2[j, i]`` in log|RX'RX| and ``−2 G3[i, j]`` in r² (:func:`gradient_parts`).
    """
    G2, G3 = _contract(s.WY, s.WW, lam, np.asarray(beta, dtype=float), Cinv)
    return s.T, G2, G3


def blups(M, G: int, vpos, c, zi, xi, k: int, P, lam, beta, *, pool: bool = True):
    """Every group's effect from its statistics row (:func:`group_effect`): with
    ``pool`` the BLUPs ``b_g = Λu_g`` and ``Λ(L_gL_g')⁻¹Λ'`` (times σ² = condVar);
    without, each group's own least-squares estimate at β and ``(Z_g'Z_g)⁻¹`` (times σ²:
    its covariance), NaN where the group alone does not identify it."""
    return _blups_kernel(M, int(G), vpos, c, zi, xi, int(k), P, lam, beta, bool(pool))


def gradient_parts(G1, G2, G3, rows, cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`theta_parts` of :func:`gradient_terms`' sums, for the θ entries at
    ``Λ[rows, cols]``: ``(∂Σ log|M_g|, ∂log|RX'RX|, ∂r²)``."""
    return _theta_parts_kernel(G1, G2, G3, rows, cols)


def block_conditionals(F, q: int, p: int, lam, beta):
    """All groups' ``b_g = Λu_g`` and ``Λ(L_gL_g')⁻¹Λ'`` (times σ² = condVar) from their
    blocks ``F`` (:func:`group_conditional`)."""
    return _block_conditionals_kernel(F, int(q), int(p), lam, np.asarray(beta, dtype=float))


def em_sums(F, q: int, p: int, lam, beta, *, Fb: np.ndarray | None = None):
    """Sums over groups for one ML-EM step in the Λ form (docs/math.md §5).

    With ``K_g = Λ(L_gL_g')⁻¹Λ'``, ``r_g = Zy_g − ZX_g β``, ``b_g = K_g r_g`` and
    ``C_g = σ²K_g``, returns ``(Σ b b', Σ K, Σ(tr(ZZ b b') − 2 b'r), Σ tr(ZZ K), Σ ZX'b)``.
    One pass over ``F`` in the blocked layout ``Fb`` (:func:`by_block`; made here if not
    given), like :func:`pls_sums`.
    """
    Fb = by_block(F) if Fb is None else Fb
    em = _pass_kernels(q).em
    return em(Fb, F.shape[0], int(q), int(p), lam, np.asarray(beta, dtype=float))


@njit(**_OPTS)
def profile_tail(logdet, A, c, s, XX, Xy, yy, n, reml):  # pragma: no cover - numba
    """The global p×p step of the profiled deviance (docs/math.md §3).

    Returns ``(ok, d, β, σ², RX)``; ``ok`` is False where the criterion is undefined:
    ``RX'RX`` not positive definite, or the penalised residual sum of squares at
    rounding level (data fit exactly).
    """
    p = Xy.shape[0]
    Lx = XX - A  # RX'RX, factorised in place: Lx = RX'
    beta = np.zeros(p)
    dof = n - p if reml else n
    if not dof > 0.0:
        return False, np.inf, beta, np.nan, Lx
    logdet_rx = _chol(Lx, p, XX, 1e-20)  # RX[j, j] > 1e-10 √XX[j, j]
    if not np.isfinite(logdet_rx):
        return False, np.inf, beta, np.nan, Lx
    cbeta = Xy - c
    _fwd(Lx, cbeta, p)  # RX' cβ = Xy − c
    for i in range(p):
        beta[i] = cbeta[i]
    _bwd(Lx, beta, p)  # RX β = cβ
    r2 = yy - s
    for i in range(p):
        r2 -= cbeta[i] * cbeta[i]
    if not (r2 > 1e-13 * yy and np.isfinite(r2)):
        return False, np.inf, beta, np.nan, Lx
    dev = 2.0 * logdet + dof * (1.0 + np.log(2.0 * np.pi) + np.log(r2 / dof))
    if reml:
        dev += 2.0 * logdet_rx
    return True, dev, beta, r2 / dof, Lx.T.copy()


# -- column helpers for validation ------------------------------------------------------------
@njit(**_OPTS)
def copy_checked(dst, col):  # pragma: no cover - numba
    """``dst[:] = col`` as floats in one pass; returns the first row holding ±inf or a
    value beyond ±1e150, or -1. NaN (a missing value) is copied as is."""
    for r in range(col.shape[0]):
        v = float(col[r])
        dst[r] = v
        if v == v and not abs(v) <= 1e150:
            return r
    return -1


@njit(**_OPTS)
def nan_rows(A, y, miss):  # pragma: no cover - numba
    """``miss[e] |= any NaN in A[e] or y[e]``; returns whether any ``miss[e]`` is set."""
    k = A.shape[1]
    some = False
    for e in range(A.shape[0]):
        bad = y[e] != y[e]
        for i in range(k):
            bad |= A[e, i] != A[e, i]
        bad |= miss[e]
        miss[e] = bad
        some |= bad
    return some


# -- one group's effect from its statistics ----------------------------------------------------
# The fit's passes take each group's blocks around the centre c (the normal equations
# M_g = Λ'ZZ_gΛ + I). A group's own effect is computed instead from a square root of its
# statistics, so that one extreme event cannot cancel its other events' digits away: the
# rows S (1 + q_s of them, q_s the random columns other than the intercept) with
# S'S = [Z X y]'[Z X y] around c, namely √n·(means − c) and the Cholesky rows of the
# group's centred co-moments (exact to the rounding of its own spread, docs/math.md §2),
# and then Givens rotations of [S_ZΛ, S_y − S_Xβ; I, 0] (lme4's penalised least squares
# for one group) instead of a Cholesky factor of M_g. docs/math.md §4.
PIVOT_TOL = 1e-10  # a co-moment pivot below this share of its diagonal is rounding: 0
RANK_TOL = 1e-7  # the own estimate is identified when |R_jj| > RANK_TOL·‖S_Z[:, j]‖


@njit(**_OPTS)
def scratch_size(q, p):  # pragma: no cover - numba
    """Length of the work array of :func:`group_effect` for q random and p fixed columns."""
    return (1 + q) * (q + p + 1) + (1 + 2 * q) * (q + 1) + 2 * q * q


@njit(inline="always", **_OPTS)
def _sqrt_rows(Mr, vpos, c, zi, xi, k, P, f, S):  # pragma: no cover - numba
    """The group's rows ``S`` (see above) into ``S[:1 + q_s, :q + p + 1]`` (columns: z,
    x, y), for the statistics row ``Mr`` scaled by the forgetting factor ``f``; returns
    ``1 + q_s``. A co-moment pivot at rounding level (a slope column with no spread in
    the group, or one collinear with earlier ones) makes its row 0."""
    q = zi.shape[0]
    p = xi.shape[0]
    m = P.shape[0]
    w = q + p + 1
    n = Mr[0] * f
    sn = math.sqrt(n) if n > 0.0 else 0.0
    for j in range(w):
        col = zi[j] if j < q else (xi[j - q] if j < q + p else k)
        a = vpos[col]
        S[0, j] = sn if a < 0 else sn * (Mr[1 + a] - c[col])
    r = 0
    for i in range(q):
        ai = vpos[zi[i]]
        if ai < 0:
            continue
        r += 1
        cii = Mr[1 + m + P[ai, ai]] * f
        d = cii
        for rr in range(1, r):
            d -= S[rr, i] * S[rr, i]
        if not (cii > 0.0 and d > PIVOT_TOL * cii):
            for j in range(w):
                S[r, j] = 0.0
            continue
        piv = math.sqrt(d)
        for j in range(w):
            if j < i:
                S[r, j] = 0.0  # upper triangular in z (earlier columns are done)
                continue
            if j == i:
                S[r, j] = piv
                continue
            col = zi[j] if j < q else (xi[j - q] if j < q + p else k)
            aj = vpos[col]
            t = 0.0 if aj < 0 else Mr[1 + m + P[ai, aj]] * f
            for rr in range(1, r):
                t -= S[rr, i] * S[rr, j]
            S[r, j] = t / piv
    return 1 + r


@njit(inline="always", **_OPTS)
def _solve_rows(S, nr, q, p, lam, beta, pool, want_cov, b, K, work):  # pragma: no cover
    """The group's effect from its rows ``S[:nr]``: with ``pool``, ``u`` minimising
    ``‖S_y − S_Xβ − S_ZΛu‖² + ‖u‖²`` and ``b = Λu``, ``K = Λ(R'R)⁻¹Λ'``; without,
    ``b`` minimising ``‖S_y − S_Xβ − S_Z b‖²`` and ``K = (R'R)⁻¹``, NaN unless
    identified. ``R`` is the triangle of Givens rotations of the stacked rows;
    ``work`` holds ``(nr + q)(q + 1) + 2q²`` numbers."""
    cols = q + 1
    rows = nr + q if pool else nr
    G = work[: rows * cols].reshape((rows, cols))
    Rinv = work[rows * cols : rows * cols + q * q].reshape((q, q))
    T = work[rows * cols + q * q : rows * cols + 2 * q * q].reshape((q, q))
    ok = True
    for i in range(nr):
        t = S[i, q + p]
        for j in range(p):
            t -= S[i, q + j] * beta[j]
        G[i, q] = t
        for a in range(q):
            if pool:
                s = 0.0
                for cc in range(a, q):  # (S_Z Λ)[i, a]; Λ is lower triangular
                    s += S[i, cc] * lam[cc, a]
                G[i, a] = s
            else:
                G[i, a] = S[i, a]
    if pool:
        for i in range(q):
            for a in range(cols):
                G[nr + i, a] = 1.0 if a == i else 0.0
    else:
        for a in range(q):  # identified: each |R_aa| above RANK_TOL of its column's norm
            s = 0.0
            for i in range(nr):
                s += G[i, a] * G[i, a]
            Rinv[a, 0] = math.sqrt(s)
    for j in range(min(q, rows)):
        for i in range(j + 1, rows):
            x = G[i, j]
            if x == 0.0:
                continue
            y = G[j, j]
            h = math.hypot(y, x)
            ct = y / h
            st = x / h
            for a in range(j, cols):
                gj = G[j, a]
                gi = G[i, a]
                G[j, a] = ct * gj + st * gi
                G[i, a] = ct * gi - st * gj
            G[i, j] = 0.0
    if not pool:
        for a in range(q):
            if not (a < rows and abs(G[a, a]) > RANK_TOL * Rinv[a, 0]):
                ok = False
    if not ok:
        for a in range(q):
            b[a] = np.nan
            if want_cov:
                for cc in range(q):
                    K[a, cc] = np.nan
        return
    for a in range(q - 1, -1, -1):  # v = R⁻¹ t
        t = G[a, q]
        for cc in range(a + 1, q):
            t -= G[a, cc] * b[cc]
        b[a] = t / G[a, a]
    if pool:
        for a in range(q - 1, -1, -1):  # b = Λv (Λ lower triangular: from the bottom)
            t = 0.0
            for cc in range(a + 1):
                t += lam[a, cc] * b[cc]
            b[a] = t
    if not want_cov:
        return
    for j in range(q):  # R⁻¹ (upper triangular)
        for i in range(q):
            Rinv[i, j] = 0.0
        Rinv[j, j] = 1.0 / G[j, j]
        for i in range(j - 1, -1, -1):
            t = 0.0
            for cc in range(i + 1, j + 1):
                t -= G[i, cc] * Rinv[cc, j]
            Rinv[i, j] = t / G[i, i]
    for a in range(q):  # T = ΛR⁻¹ (or R⁻¹), K = TT'
        for j in range(q):
            if pool:
                t = 0.0
                for cc in range(a + 1):
                    t += lam[a, cc] * Rinv[cc, j]
                T[a, j] = t
            else:
                T[a, j] = Rinv[a, j]
    for a in range(q):
        for cc in range(a + 1):
            t = 0.0
            for j in range(q):
                t += T[a, j] * T[cc, j]
            K[a, cc] = t
            K[cc, a] = t


@njit(**_OPTS)
def group_effect(Mr, vpos, c, zi, xi, k, P, f, lam, beta, pool, b, K, work):  # pragma: no cover
    """One group's effect ``b`` (and ``K``, unless it has no rows) from its statistics
    row ``Mr`` (scaled by the forgetting factor ``f``) around ``c``, at Λ and β:
    the BLUP with ``pool``, the group's own estimate without (see :func:`_solve_rows`).
    ``work`` has :func:`scratch_size` numbers."""
    q = zi.shape[0]
    p = xi.shape[0]
    w = q + p + 1
    S = work[: (1 + q) * w].reshape((1 + q, w))
    nr = _sqrt_rows(Mr, vpos, c, zi, xi, k, P, f, S)
    _solve_rows(S, nr, q, p, lam, beta, pool, K.shape[0] == q, b, K, work[(1 + q) * w :])


@njit(**_OPTS)
def _blups_kernel(M, G, vpos, c, zi, xi, k, P, lam, beta, pool):  # pragma: no cover - numba
    q = zi.shape[0]
    B = np.empty((G, q))
    V = np.empty((G, q, q))
    work = np.empty(scratch_size(q, xi.shape[0]))
    for r in range(G):
        group_effect(M[r], vpos, c, zi, xi, k, P, 1.0, lam, beta, pool, B[r], V[r], work)
    return B, V


@njit(**_OPTS)
def predict_event(M, r, a, c, f, vpos, zi, xi, k, P, lam, beta, b, work):  # pragma: no cover
    """``ŷ = c_y + x̃'β̃ + z̃'b̃_g`` for one event with union values ``a``: the group's
    BLUP from its current statistics (row ``r``, scaled by its forgetting factor ``f``;
    ``r < 0``: an unseen group, fixed part only; :func:`group_effect`). A NaN feature
    takes the centre value."""
    q = zi.shape[0]
    p = xi.shape[0]
    yhat = c[k]
    for j in range(p):
        v = a[xi[j]] - c[xi[j]]
        if v == v:
            yhat += v * beta[j]
    if r < 0:
        return yhat
    group_effect(M[r], vpos, c, zi, xi, k, P, f, lam, beta, True, b, np.empty((0, 0)), work)
    for i in range(q):
        v = a[zi[i]] - c[zi[i]]
        if v == v:
            yhat += v * b[i]
    return yhat


@njit(**_OPTS)
def predict_rows(M, rows, A, c, fac, vpos, zi, xi, k, P, lam, beta, out):  # pragma: no cover
    """:func:`predict_event` for every row of ``A``."""
    q = zi.shape[0]
    work = np.empty(scratch_size(q, xi.shape[0]))
    b = np.empty(q)
    for e in range(rows.shape[0]):
        out[e] = predict_event(M, rows[e], A[e], c, fac[e], vpos, zi, xi, k, P, lam, beta, b, work)


_PRELOADED: set[int] = set()


def preload(q: int) -> None:
    """Load, once per process, every cached kernel that a model with ``q`` random-effect
    columns calls while it learns, predicts and fits, so that none of those calls stalls
    on a load (:func:`streamlmm.compiling.load_cached`). Kernels that are not cached
    compile at their first call, as usual."""
    Q = int(q) if int(q) in SPECIAL_Q else 0
    if Q in _PRELOADED:
        return
    _PRELOADED.add(Q)
    from numba.core.registry import CPUDispatcher

    from streamlmm.compiling import load_cached

    module = [v for v in globals().values() if isinstance(v, CPUDispatcher)]
    load_cached(*module, *_pass_kernels(q))
    freeze_gc()


def freeze_gc() -> None:
    """Move every object alive now (numba's compiler, its type registries, the loaded
    kernels: some 100k objects that live as long as the process) out of the garbage
    collector's full passes (``gc.freeze()``). Each full collection would otherwise
    traverse them all, a pause of about 50 ms inside whichever call happened to
    allocate last (measured in ``bench_core.py --only cold``). ``STREAMLMM_GC_FREEZE=0``
    turns it off."""
    import gc
    import os

    if os.environ.get("STREAMLMM_GC_FREEZE", "1") != "0":
        gc.freeze()
