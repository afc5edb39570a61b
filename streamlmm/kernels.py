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

Sums over groups run in fixed chunks of :data:`CHUNK` groups whose partial sums are
added in chunk order, so the result does not depend on the number of threads.

"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import njit, prange

__all__ = [
    "packed_index",
    "first_overflow",
    "accumulate",
    "accumulate_one",
    "accumulate_unit",
    "decay_all",
    "merge_rows",
    "cross_products",
    "group_row",
    "Blocks",
    "PlsSums",
    "pls_sums",
    "gradient_terms",
    "blups",
    "em_sums",
    "predict_group",
    "predict_event",
    "predict_rows",
    "profile_tail",
    "copy_checked",
    "nan_rows",
    "CHUNK",
]

CHUNK = 2048  # groups per chunk of a sum over groups

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}
_FAST = {**_OPTS, "fastmath": {"contract", "arcp"}}  # FMAs, x/d as x·(1/d); NaN, order kept


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
def _chol(A, q, R, rel):  # pragma: no cover - numba
    """In-place lower Cholesky of ``A[:q, :q]``; returns ``log|L|``, or NaN when a pivot
    is not above ``rel · R[j, j]`` (not positive definite, to that tolerance)."""
    logdet = 0.0
    for j in range(q):
        floor = rel * max(R[j, j], 1e-300)
        s = A[j, j]
        for k in range(j):
            s -= A[j, k] * A[j, k]
        if not s > floor:
            return np.nan
        d = math.sqrt(s)
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
    """Fill ``L_g``, ``RZX_g`` and ``cu_g`` from one group's blocks; return ``log|L_g|``."""
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
# Each per-group kernel below is written once, for any (q, p), and inlined into entry points
# that :func:`_fit_kernels` compiles per (q, p) with both as constants, so LLVM unrolls the
# small loops (a 2×2 factor then costs what hand-written code would).
def _layout(q: int, p: int) -> dict[str, int]:
    """Offsets in one chunk's sums of :func:`_eval_chunk` (``m = q(p+1)``)."""
    m = q * (p + 1)
    o = {"logdet": 0, "cu2": 1, "A": 2, "c": 2 + p * p, "T": 2 + p * p + p}
    o["WY"] = o["T"] + q * q
    o["WW"] = o["WY"] + m * m
    o["size"] = o["WW"] + m * m
    return o


@njit(fastmath={"reassoc", "contract"}, **_OPTS)
def _gram(Wt, Yt, n, WY, WW):  # pragma: no cover - numba
    """``WY += Σ_g W_g Y_g'`` and the upper triangle of ``WW += Σ_g W_g W_g'`` over the
    first ``n`` columns (one per group): long dot products, vectorised."""
    m = Wt.shape[0]
    for i in range(m):
        for j in range(m):
            s = 0.0
            for g in range(n):
                s += Wt[i, g] * Yt[j, g]
            WY[i * m + j] += s
        for j in range(i, m):
            s = 0.0
            for g in range(n):
                s += Wt[i, g] * Wt[j, g]
            WW[i * m + j] += s


@njit(inline="always", **_OPTS)
def _eval_chunk(F, lo, hi, q, p, lam, grad, out):  # pragma: no cover - numba
    """Add groups lo..hi-1 into ``out`` (offsets: :func:`_layout`).

    Always ``Σ log|L|, Σ‖cu‖², Σ RZX'RZX, Σ RZX'cu``. With ``grad``, also the sums the
    gradient needs at *any* β, so that criterion and gradient take one pass: with
    ``Y_g = L'⁻¹[RZX | cu]`` and ``W_g = [ZX | Zy] − ZZ Λ Y_g`` (q×(p+1) each), ``u_g =
    Y_g β̃`` and ``Z_g'res_g = W_g β̃`` for ``β̃ = (−β, 1)``; returns ``Σ M_g⁻¹Λ'ZZ_g``,
    ``Σ vec(W_g)vec(Y_g)'`` and the upper triangle of ``Σ vec(W_g)vec(W_g)'``.
    """
    L, ZZlam, RZX, cu, col, _ = _scratch(q, p)
    k = p + 1
    m = q * k
    Yt = np.empty((m, CHUNK if grad else 0))  # Y_g, W_g of the chunk's groups, by column
    Wt = np.empty((m, CHUNK if grad else 0))
    LY = np.empty(m)
    zx = q * q
    zy = q * q + q * p
    oc = 2 + p * p
    oT = oc + p
    oWY = oT + q * q
    oWW = oWY + m * m
    for r in range(lo, hi):
        Fr = F[r]
        g = r - lo
        out[0] += group_factor(Fr, q, p, lam, L, RZX, cu, ZZlam)
        for a in range(q):
            out[1] += cu[a] * cu[a]
        for i in range(p):
            t = 0.0
            for a in range(q):
                t += RZX[a, i] * cu[a]
            out[oc + i] += t
            for j in range(i, p):
                t = 0.0
                for a in range(q):
                    t += RZX[a, i] * RZX[a, j]
                out[2 + i * p + j] += t
        if not grad:
            continue
        for j in range(k):  # Y = L'⁻¹ [RZX | cu]
            for a in range(q):
                col[a] = RZX[a, j] if j < p else cu[a]
            _bwd(L, col, q)
            for a in range(q):
                Yt[a * k + j, g] = col[a]
        for c in range(q):  # ΛY
            for j in range(k):
                t = 0.0
                for d in range(c + 1):
                    t += lam[c, d] * Yt[d * k + j, g]
                LY[c * k + j] = t
        for a in range(q):  # W = [ZX | Zy] − ZZ ΛY
            for j in range(k):
                t = Fr[zx + a * p + j] if j < p else Fr[zy + a]
                for c in range(q):
                    t -= Fr[a * q + c] * LY[c * k + j]
                Wt[a * k + j, g] = t
        for c in range(q):  # M⁻¹Λ'ZZ column by column; (Λ'ZZ)[a, c] = (ZZΛ)[c, a]
            for a in range(q):
                col[a] = ZZlam[c, a]
            _fwd(L, col, q)
            _bwd(L, col, q)
            for a in range(q):
                out[oT + a * q + c] += col[a]
    if grad:
        _gram(Wt, Yt, hi - lo, out[oWY:oWW], out[oWW:])


@njit(inline="always", **_OPTS)
def _blups_all(F, q, p, lam, beta):  # pragma: no cover - numba
    """All groups' ``b_g = Λu_g`` and ``Λ(L_gL_g')⁻¹Λ'`` (see :func:`blups`)."""
    G = F.shape[0]
    L, W, RZX, cu, u, _ = _scratch(q, p)
    B = np.empty((G, q))
    V = np.empty((G, q, q))
    for r in range(G):
        group_factor(F[r], q, p, lam, L, RZX, cu, W)
        _blup_into(L, RZX, cu, lam, beta, u, B[r], q, p)
        _cond_cov_into(L, lam, W, V[r], q)
    return B, V


@njit(inline="always", **_OPTS)
def _em_all(F, q, p, lam, beta):  # pragma: no cover - numba
    """The sums of :func:`em_sums`."""
    G = F.shape[0]
    L, W, RZX, cu, u, b = _scratch(q, p)
    K = np.empty((q, q))
    Sbb = np.zeros((q, q))
    SK = np.zeros((q, q))
    T = np.zeros(p)
    rss = 0.0
    trK = 0.0
    zx = q * q
    zy = q * q + q * p
    for r in range(G):
        Fr = F[r]
        group_factor(Fr, q, p, lam, L, RZX, cu, W)
        _blup_into(L, RZX, cu, lam, beta, u, b, q, p)
        _cond_cov_into(L, lam, W, K, q)
        for a in range(q):
            ra = Fr[zy + a]
            for j in range(p):
                ra -= Fr[zx + a * p + j] * beta[j]
            rss -= 2.0 * b[a] * ra
            for c in range(q):
                Sbb[a, c] += b[a] * b[c]
                SK[a, c] += K[a, c]
                zz = Fr[a * q + c]
                rss += zz * b[a] * b[c]
                trK += zz * K[c, a]
        for j in range(p):
            t = 0.0
            for a in range(q):
                t += Fr[zx + a * p + j] * b[a]
            T[j] += t
    return Sbb, SK, rss, trK, T


class _FitKernels(NamedTuple):
    evaluate: Any  # (F, lam, grad, parts) → None, chunk by chunk
    evaluate_parallel: Any
    blups: Any  # (F, lam, beta) → (B, V)
    em: Any  # (F, lam, beta) → (Sbb, SK, rss, trK, T)


_FIT_KERNELS: dict[tuple[int, int], _FitKernels] = {}


def _fit_kernels(q: int, p: int) -> _FitKernels:
    """The fit's entry points compiled for this (q, p) (numba caches each on disk)."""
    key = (int(q), int(p))
    got = _FIT_KERNELS.get(key)
    if got is None:
        got = _FIT_KERNELS[key] = _compile_fit_kernels(*key)
    return got


def _compile_fit_kernels(q: int, p: int) -> _FitKernels:
    @njit(**_FAST)
    def evaluate(F, lam, grad, parts):  # pragma: no cover - numba
        G = F.shape[0]
        for ch in range(parts.shape[0]):
            _eval_chunk(F, ch * CHUNK, min(G, (ch + 1) * CHUNK), q, p, lam, grad, parts[ch])

    @njit(parallel=True, **_FAST)
    def evaluate_parallel(F, lam, grad, parts):  # pragma: no cover - numba
        G = F.shape[0]
        for ch in prange(parts.shape[0]):
            _eval_chunk(F, ch * CHUNK, min(G, (ch + 1) * CHUNK), q, p, lam, grad, parts[ch])

    @njit(**_OPTS)
    def blups_qp(F, lam, beta):  # pragma: no cover - numba
        return _blups_all(F, q, p, lam, beta)

    @njit(**_OPTS)
    def em_qp(F, lam, beta):  # pragma: no cover - numba
        return _em_all(F, q, p, lam, beta)

    return _FitKernels(evaluate, evaluate_parallel, blups_qp, em_qp)


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


def _chunks(G: int) -> int:
    return max(1, (G + CHUNK - 1) // CHUNK)


def _symmetric(U: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose upper triangle is ``U``'s."""
    return np.triu(U) + np.triu(U, 1).T


def pls_sums(
    F: np.ndarray, q: int, p: int, lam: np.ndarray, parallel: bool, grad: bool = False
) -> PlsSums:
    """The sums over groups that the profiled deviance (and, with ``grad``, its gradient)
    needs at Λ: one pass over ``F``, in chunks summed in chunk order."""
    o = _layout(q, p)
    parts = np.zeros((_chunks(F.shape[0]), o["size"] if grad else o["T"]))
    k = _fit_kernels(q, p)
    (k.evaluate_parallel if parallel else k.evaluate)(F, lam, grad, parts)
    s = parts.sum(axis=0) if parts.shape[0] > 1 else parts[0]
    A = _symmetric(s[o["A"] : o["c"]].reshape(p, p))
    sums = PlsSums(float(s[0]), float(s[1]), A, s[o["c"] : o["T"]].copy())
    if not grad:
        return sums
    m = q * (p + 1)
    return sums._replace(
        T=s[o["T"] : o["WY"]].reshape(q, q).copy(),
        WY=s[o["WY"] : o["WW"]].reshape(m, m).copy(),
        WW=_symmetric(s[o["WW"] :].reshape(m, m)),
    )


def gradient_terms(s: PlsSums, q: int, p: int, lam, beta, Cinv):
    """The gradient's sums over groups at β, from :func:`pls_sums` (``grad=True``).

    With ``M_g = L_gL_g'``, ``u_g`` the spherical BLUP at β, ``Z_g'res_g = Zy_g − ZX_gβ −
    ZZ_gΛu_g`` and ``B_g = ZX_g − ZZ_gΛL_g'⁻¹RZX_g`` (the first p columns of ``W_g``),
    returns ``(Σ M_g⁻¹Λ'ZZ_g, Σ Λ'B_g C⁻¹B_g', Σ (Z_g'res_g) u_g')`` for ``C⁻¹ =
    (RX'RX)⁻¹``. A θ entry at Λ[i, j] then has derivative ``2 G1[j, i]`` in Σ log|M_g|,
    ``−2 G2[j, i]`` in log|RX'RX| and ``−2 G3[i, j]`` in r².
    """
    k = p + 1
    bt = np.append(-np.asarray(beta, dtype=float), 1.0)
    G3 = np.einsum("ajck,j,k->ac", s.WY.reshape(q, k, q, k), bt, bt)
    BB = s.WW.reshape(q, k, q, k)[:, :p, :, :p]
    G2 = lam.T @ np.einsum("djck,jk->dc", BB, Cinv)
    return s.T, G2, G3


def blups(F, q: int, p: int, lam, beta):
    """All groups' BLUPs ``b_g = Λu_g`` and ``Λ(L_gL_g')⁻¹Λ'`` (times σ² = condVar)."""
    return _fit_kernels(q, p).blups(F, lam, np.asarray(beta, dtype=float))


def em_sums(F, q: int, p: int, lam, beta):
    """Sums over groups for one ML-EM step in the Λ form (docs/math.md §5).

    With ``K_g = Λ(L_gL_g')⁻¹Λ'``, ``r_g = Zy_g − ZX_g β``, ``b_g = K_g r_g`` and
    ``C_g = σ²K_g``, returns ``(Σ b b', Σ K, Σ(tr(ZZ b b') − 2 b'r), Σ tr(ZZ K), Σ ZX'b)``.
    """
    return _fit_kernels(q, p).em(F, lam, np.asarray(beta, dtype=float))


@njit(**_OPTS)
def predict_group(Fr, q, p, lam, beta, b):  # pragma: no cover - numba
    """One group's BLUP ``b = Λu`` from its blocks ``Fr`` (e.g. :func:`group_row`)."""
    L, W, RZX, cu, u, _ = _scratch(q, p)
    group_factor(Fr, q, p, lam, L, RZX, cu, W)
    _blup_into(L, RZX, cu, lam, beta, u, b, q, p)


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


@njit(**_OPTS)
def predict_event(M, r, a, c, f, vpos, zi, xi, k, P, lam, beta, blk, b):  # pragma: no cover
    """``ŷ = c_y + x̃'β̃ + z̃'b̃_g`` for one event with union values ``a``: the group's
    BLUP from its current statistics (row ``r``, scaled by its forgetting factor ``f``;
    ``r < 0``: an unseen group, fixed part only). A NaN feature takes the centre value."""
    q = zi.shape[0]
    p = xi.shape[0]
    yhat = c[k]
    for j in range(p):
        v = a[xi[j]] - c[xi[j]]
        if v == v:
            yhat += v * beta[j]
    if r < 0:
        return yhat
    group_row(M[r], vpos, c, zi, xi, k, P, blk)
    if f != 1.0:
        for i in range(blk.shape[0]):
            blk[i] *= f
    predict_group(blk, q, p, lam, beta, b)
    for i in range(q):
        v = a[zi[i]] - c[zi[i]]
        if v == v:
            yhat += v * b[i]
    return yhat


@njit(**_OPTS)
def predict_rows(M, rows, A, c, fac, vpos, zi, xi, k, P, lam, beta, out):  # pragma: no cover
    """:func:`predict_event` for every row of ``A``."""
    q = zi.shape[0]
    blk = np.empty(q * q + q * xi.shape[0] + q)
    b = np.empty(q)
    for e in range(rows.shape[0]):
        out[e] = predict_event(M, rows[e], A[e], c, fac[e], vpos, zi, xi, k, P, lam, beta, blk, b)
