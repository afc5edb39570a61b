"""numba kernels: accumulate, per-group Cholesky/BLUP, deviance sums, EM sums.

Every per-group quantity comes from one packed row ``S[r]``: ``S[r, 0] = n_g = Σ w`` and
``S[r, P[i, j]] = Σ w v_i v_j`` for the augmented vector ``v = [a, y]`` (union columns,
then the response). ``P`` maps a pair of positions in ``v`` to a column of ``S``; the
blocks ``ZZ_g``, ``ZX_g``, ``Zy_g``, ``XX_g``, ``Xy_g``, ``yy_g`` are read through
``P[zi]``, ``P[xi]`` and ``P[yi]``.

The one per-group step all kernels share is :func:`group_factor` (docs/math.md §3)::

    L_g L_g' = Λ'ZZ_gΛ + I,   RZX_g = L_g⁻¹ Λ'ZX_g,   cu_g = L_g⁻¹ Λ'Zy_g

"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = [
    "packed_index",
    "accumulate",
    "decay_all",
    "pls_sums",
    "blups",
    "em_sums",
    "predict_rows",
    "accumulate_one",
    "predict_one",
]


def packed_index(m: int) -> np.ndarray:
    """Symmetric map ``P[i, j]`` from a pair of positions in ``v`` to a column of ``S``.

    Column 0 of ``S`` holds ``n_g``; the ``m(m+1)/2`` packed products follow.

    Examples
    --------
    >>> packed_index(3)
    array([[1, 2, 3],
           [2, 4, 5],
           [3, 5, 6]])

    """
    P = np.empty((m, m), dtype=np.int64)
    col = 1
    for i in range(m):
        for j in range(i, m):
            P[i, j] = P[j, i] = col
            col += 1
    return P


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _decay_row(S, tg, r, t, inv_half_life):  # pragma: no cover - numba
    """Bring row ``r`` forward to time ``t`` (no-op when it is not older)."""
    dt = t - tg[r]
    if dt > 0.0:
        f = 2.0 ** (-dt * inv_half_life)
        for c in range(S.shape[1]):
            S[r, c] *= f
        tg[r] = t


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _add_event(S, tg, r, v, w, t, inv_half_life, P):  # pragma: no cover - numba
    """Add ``w v v'`` to row ``r``, decaying the row first when the event is newer."""
    if inv_half_life > 0.0:
        if t < tg[r]:  # an older event joins with its weight decayed to the row's time
            w = w * 2.0 ** ((t - tg[r]) * inv_half_life)
        else:
            _decay_row(S, tg, r, t, inv_half_life)
    S[r, 0] += w
    m = v.shape[0]
    for i in range(m):
        wvi = w * v[i]
        for j in range(i, m):
            S[r, P[i, j]] += wvi * v[j]


@njit(cache=True, nogil=True, error_model="numpy")
def accumulate(S, tg, rows, A, y, shift, w, t, inv_half_life, P):  # pragma: no cover - numba
    """Scatter-add events into their groups' rows, in event order.

    Event ``e`` contributes ``v = [A[e], y[e]] − shift`` with frequency weight ``w[e]``
    at event time ``t[e]`` (read only with forgetting, ``inv_half_life > 0``). A group
    is first decayed to the event's time when the event is newer than the group's last
    update ``tg[r]``; an older event is added with its weight decayed to ``tg[r]``.
    """
    k = A.shape[1]
    v = np.empty(k + 1)
    for e in range(rows.shape[0]):
        for i in range(k):
            v[i] = A[e, i] - shift[i]
        v[k] = y[e] - shift[k]
        te = t[e] if inv_half_life > 0.0 else 0.0
        _add_event(S, tg, rows[e], v, w[e], te, inv_half_life, P)


@njit(cache=True, nogil=True, error_model="numpy")
def decay_all(S, tg, G, now, inv_half_life):  # pragma: no cover - numba
    """Decay every group's statistics to time ``now`` (docs/math.md §7)."""
    for r in range(G):
        _decay_row(S, tg, r, now, inv_half_life)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _chol_logdet(A, q, R, rel):  # pragma: no cover - numba
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


@njit(cache=True, nogil=True, error_model="numpy")
def block_maps(P, zi, xi, yi):  # pragma: no cover - numba
    """Columns of ``S`` holding ``ZZ`` (q×q), ``ZX`` (q×p), ``Zy`` (q), ``XX``, ``Xy``, ``yy``."""
    q = zi.shape[0]
    p = xi.shape[0]
    ZZi = np.empty((q, q), dtype=np.int64)
    ZXi = np.empty((q, p), dtype=np.int64)
    Zyi = np.empty(q, dtype=np.int64)
    XXi = np.empty((p, p), dtype=np.int64)
    Xyi = np.empty(p, dtype=np.int64)
    for a in range(q):
        Zyi[a] = P[zi[a], yi]
        for b in range(q):
            ZZi[a, b] = P[zi[a], zi[b]]
        for j in range(p):
            ZXi[a, j] = P[zi[a], xi[j]]
    for i in range(p):
        Xyi[i] = P[xi[i], yi]
        for j in range(p):
            XXi[i, j] = P[xi[i], xi[j]]
    return ZZi, ZXi, Zyi, XXi, Xyi, P[yi, yi]


@njit(cache=True, nogil=True, error_model="numpy")
def _scratch(q, p):  # pragma: no cover - numba
    """Per-group work arrays: ``L, W`` (q×q), ``RZX`` (q×p), ``cu, u, b`` (q)."""
    return (
        np.empty((q, q)),
        np.empty((q, q)),
        np.empty((q, p)),
        np.empty(q),
        np.empty(q),
        np.empty(q),
    )


@njit(cache=True, nogil=True, error_model="numpy")
def group_factor(Sr, ZZi, ZXi, Zyi, lam, L, RZX, cu, W):  # pragma: no cover - numba
    """Fill ``L_g``, ``RZX_g`` and ``cu_g`` from one group's row ``Sr``; return ``log|L_g|``.

    ``W`` is q×q scratch. All arrays are preallocated by the caller.
    """
    q = ZZi.shape[0]
    p = ZXi.shape[1]
    # W = ZZ Λ
    for a in range(q):
        for b in range(q):
            s = 0.0
            for c in range(b, q):  # Λ is lower triangular
                s += Sr[ZZi[a, c]] * lam[c, b]
            W[a, b] = s
    # L = Λ'W + I
    for a in range(q):
        for b in range(a + 1):
            s = 0.0
            for c in range(a, q):
                s += lam[c, a] * W[c, b]
            L[a, b] = s
        L[a, a] += 1.0
    for a in range(q):
        for b in range(a + 1, q):
            L[a, b] = L[b, a]
    logdet = _chol_logdet(L, q, L, 0.0)
    # RZX = L⁻¹ Λ'ZX,  cu = L⁻¹ Λ'Zy  (forward substitution, column by column)
    for a in range(q):
        for j in range(p):
            s = 0.0
            for c in range(a, q):
                s += lam[c, a] * Sr[ZXi[c, j]]
            for c in range(a):
                s -= L[a, c] * RZX[c, j]
            RZX[a, j] = s / L[a, a]
        s = 0.0
        for c in range(a, q):
            s += lam[c, a] * Sr[Zyi[c]]
        for c in range(a):
            s -= L[a, c] * cu[c]
        cu[a] = s / L[a, a]
    return logdet


@njit(cache=True, nogil=True, error_model="numpy")
def _pls_range(S, lo, hi, ZZi, ZXi, Zyi, XXi, Xyi, yyi, lam, A, c, XX, Xy, sc):  # pragma: no cover
    """Add groups ``lo..hi-1`` into ``A, c, XX, Xy`` (upper triangles) and
    ``sc = [Σ log|L_g|, Σ‖cu_g‖², yy, n]``."""
    q = ZZi.shape[0]
    p = ZXi.shape[1]
    L, W, RZX, cu, u, b = _scratch(q, p)
    for r in range(lo, hi):
        Sr = S[r]
        sc[0] += group_factor(Sr, ZZi, ZXi, Zyi, lam, L, RZX, cu, W)
        for i in range(p):
            for j in range(i, p):
                t = 0.0
                for a in range(q):
                    t += RZX[a, i] * RZX[a, j]
                A[i, j] += t
                XX[i, j] += Sr[XXi[i, j]]
            t = 0.0
            for a in range(q):
                t += RZX[a, i] * cu[a]
            c[i] += t
            Xy[i] += Sr[Xyi[i]]
        for a in range(q):
            sc[1] += cu[a] * cu[a]
        sc[2] += Sr[yyi]
        sc[3] += Sr[0]


PLS_CHUNK = 4096  # groups per parallel chunk; the chunking depends on G only, so the
# sums are the same whatever the number of threads


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def pls_sums(S, G, P, zi, xi, yi, lam):  # pragma: no cover - numba
    """Sums over groups that the profiled deviance needs (docs/math.md §3).

    Returns ``(Σ log|L_g|, Σ RZX'RZX, Σ RZX'cu, Σ‖cu‖², XX, Xy, yy, n)``. Groups are
    summed in fixed chunks, in parallel, and the chunks are added in order.
    """
    ZZi, ZXi, Zyi, XXi, Xyi, yyi = block_maps(P, zi, xi, yi)
    p = xi.shape[0]
    nc = max(1, (G + PLS_CHUNK - 1) // PLS_CHUNK)
    Ak = np.zeros((nc, p, p))
    ck = np.zeros((nc, p))
    XXk = np.zeros((nc, p, p))
    Xyk = np.zeros((nc, p))
    sck = np.zeros((nc, 4))
    for k in prange(nc):
        lo = k * PLS_CHUNK
        hi = min(G, lo + PLS_CHUNK)
        _pls_range(
            S, lo, hi, ZZi, ZXi, Zyi, XXi, Xyi, yyi, lam, Ak[k], ck[k], XXk[k], Xyk[k], sck[k]
        )
    A = np.zeros((p, p))
    c = np.zeros(p)
    XX = np.zeros((p, p))
    Xy = np.zeros(p)
    sc = np.zeros(4)
    for k in range(nc):
        A += Ak[k]
        c += ck[k]
        XX += XXk[k]
        Xy += Xyk[k]
        sc += sck[k]
    for i in range(p):
        for j in range(i):
            A[i, j] = A[j, i]
            XX[i, j] = XX[j, i]
    return sc[0], A, c, sc[1], XX, Xy, sc[2], sc[3]


@njit(cache=True, nogil=True, error_model="numpy")
def _blup_into(L, RZX, cu, lam, beta, u, b):  # pragma: no cover - numba
    """``u = L'⁻¹(cu − RZX β)`` and ``b = Λ u`` for one group."""
    q = L.shape[0]
    p = beta.shape[0]
    for a in range(q):
        t = cu[a]
        for j in range(p):
            t -= RZX[a, j] * beta[j]
        u[a] = t
    for a in range(q - 1, -1, -1):
        t = u[a]
        for c in range(a + 1, q):
            t -= L[c, a] * u[c]
        u[a] = t / L[a, a]
    for a in range(q):
        t = 0.0
        for c in range(a + 1):
            t += lam[a, c] * u[c]
        b[a] = t


@njit(cache=True, nogil=True, error_model="numpy")
def _cond_cov_into(L, lam, Linv, out):  # pragma: no cover - numba
    """``out = Λ (L L')⁻¹ Λ'`` (to be scaled by σ²): the conditional covariance."""
    q = L.shape[0]
    # Linv = L⁻¹ (lower)
    for j in range(q):
        for i in range(q):
            Linv[i, j] = 0.0
        Linv[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, q):
            t = 0.0
            for c in range(j, i):
                t -= L[i, c] * Linv[c, j]
            Linv[i, j] = t / L[i, i]
    # M = L⁻¹ Λ'  → out = M'M
    for a in range(q):
        for b in range(a + 1):
            t = 0.0
            for c in range(q):
                # (L⁻¹Λ')[c, a] = Σ_d Linv[c, d] Λ[a, d]
                mca = 0.0
                mcb = 0.0
                for d in range(c + 1):
                    mca += Linv[c, d] * lam[a, d]
                    mcb += Linv[c, d] * lam[b, d]
                t += mca * mcb
            out[a, b] = t
            out[b, a] = t


@njit(cache=True, nogil=True, error_model="numpy")
def blups(S, G, P, zi, xi, yi, lam, beta):  # pragma: no cover - numba
    """All groups' BLUPs ``b_g = Λu_g`` and ``Λ(L_gL_g')⁻¹Λ'`` (times σ² = condVar)."""
    ZZi, ZXi, Zyi, XXi, Xyi, yyi = block_maps(P, zi, xi, yi)
    q = zi.shape[0]
    p = xi.shape[0]
    L, W, RZX, cu, u, b = _scratch(q, p)
    u = np.empty(q)
    B = np.empty((G, q))
    V = np.empty((G, q, q))
    for r in range(G):
        group_factor(S[r], ZZi, ZXi, Zyi, lam, L, RZX, cu, W)
        _blup_into(L, RZX, cu, lam, beta, u, B[r])
        _cond_cov_into(L, lam, W, V[r])
    return B, V


@njit(cache=True, nogil=True, error_model="numpy")
def em_sums(S, G, P, zi, xi, yi, lam, beta):  # pragma: no cover - numba
    """Sums over groups for one ML-EM step in the Λ form (docs/math.md §5).

    With ``K_g = Λ(L_gL_g')⁻¹Λ'``, ``r_g = Zy_g − ZX_g β``, ``b_g = K_g r_g`` and
    ``C_g = σ²K_g``, returns ``(Σ b b', Σ K, Σ(tr(ZZ b b') − 2 b'r), Σ tr(ZZ K), Σ ZX'b)``.
    """
    ZZi, ZXi, Zyi, XXi, Xyi, yyi = block_maps(P, zi, xi, yi)
    q = zi.shape[0]
    p = xi.shape[0]
    L, W, RZX, cu, u, b = _scratch(q, p)
    K = np.empty((q, q))
    Sbb = np.zeros((q, q))
    SK = np.zeros((q, q))
    T = np.zeros(p)
    rss = 0.0
    trK = 0.0
    for r in range(G):
        group_factor(S[r], ZZi, ZXi, Zyi, lam, L, RZX, cu, W)
        _blup_into(L, RZX, cu, lam, beta, u, b)
        _cond_cov_into(L, lam, W, K)
        for a in range(q):
            ra = S[r, Zyi[a]]
            for j in range(p):
                ra -= S[r, ZXi[a, j]] * beta[j]
            rss -= 2.0 * b[a] * ra
            for c in range(q):
                Sbb[a, c] += b[a] * b[c]
                SK[a, c] += K[a, c]
                zz = S[r, ZZi[a, c]]
                rss += zz * b[a] * b[c]
                trK += zz * K[c, a]
        for j in range(p):
            t = 0.0
            for a in range(q):
                t += S[r, ZXi[a, j]] * b[a]
            T[j] += t
    return Sbb, SK, rss, trK, T


@njit(cache=True, nogil=True, error_model="numpy")
def predict_rows(S, rows, A, shift, fac, P, zi, xi, yi, lam, beta, out):  # pragma: no cover
    """:func:`predict_one` for every event: ``out[e]`` from group row ``rows[e]`` (−1:
    unseen), union values ``A[e]`` and forgetting factor ``fac[e]``."""
    for e in range(rows.shape[0]):
        out[e] = predict_one(S, rows[e], A[e], shift, fac[e], P, zi, xi, yi, lam, beta)


@njit(cache=True, nogil=True, error_model="numpy")
def accumulate_one(S, tg, r, a, y, shift, w, t, inv_half_life, P, v):  # pragma: no cover
    """One event into row ``r`` (the ``learn_one`` path); ``v`` is (k+1) scratch."""
    k = a.shape[0]
    for i in range(k):
        v[i] = a[i] - shift[i]
    v[k] = y - shift[k]
    _add_event(S, tg, r, v, w, t, inv_half_life, P)


@njit(cache=True, nogil=True, error_model="numpy")
def predict_one(S, r, a, shift, f, P, zi, xi, yi, lam, beta):  # pragma: no cover - numba
    """``shift_y + x̃'β + z̃'b_g`` for one event; ``f`` scales the group's statistics
    (its forgetting factor), ``r < 0`` is an unseen group. NaN features count as the
    reference value (x̃ = 0)."""
    ZZi, ZXi, Zyi, XXi, Xyi, yyi = block_maps(P, zi, xi, yi)
    q = zi.shape[0]
    p = xi.shape[0]
    yhat = shift[yi]
    for j in range(p):
        v = a[xi[j]] - shift[xi[j]]
        if v == v:
            yhat += v * beta[j]
    if r < 0:
        return yhat
    L, W, RZX, cu, u, b = _scratch(q, p)
    Sr = S[r : r + 1].copy()
    if f != 1.0:
        for c in range(Sr.shape[1]):
            Sr[0, c] *= f
    group_factor(Sr[0], ZZi, ZXi, Zyi, lam, L, RZX, cu, W)
    _blup_into(L, RZX, cu, lam, beta, u, b)
    for i in range(q):
        v = a[zi[i]] - shift[zi[i]]
        if v == v:
            yhat += v * b[i]
    return yhat


@njit(cache=True, nogil=True, error_model="numpy")
def profile_tail(logdet, A, c, s, XX, Xy, yy, n, reml):  # pragma: no cover - numba
    """The global p×p step of the profiled deviance (docs/math.md §3) from :func:`pls_sums`.

    Returns ``(ok, d, β, σ², RX)``; ``ok`` is False where the criterion is undefined:
    ``RX'RX`` not positive definite (too few events or collinear fixed columns), or
    the penalised residual sum of squares at rounding level (data fit exactly).
    """
    p = Xy.shape[0]
    Lx = XX - A  # RX'RX, factorised in place: Lx = RX'
    beta = np.zeros(p)
    dof = n - p if reml else n
    if not dof > 0.0:
        return False, np.inf, beta, np.nan, Lx
    logdet_rx = _chol_logdet(Lx, p, XX, 1e-20)  # RX[j, j] > 1e-10 √XX[j, j]
    if not np.isfinite(logdet_rx):
        return False, np.inf, beta, np.nan, Lx
    cbeta = Xy - c
    for i in range(p):  # RX' cβ = Xy − c
        t = cbeta[i]
        for k in range(i):
            t -= Lx[i, k] * cbeta[k]
        cbeta[i] = t / Lx[i, i]
    for i in range(p - 1, -1, -1):  # RX β = cβ
        t = cbeta[i]
        for k in range(i + 1, p):
            t -= Lx[k, i] * beta[k]
        beta[i] = t / Lx[i, i]
    r2 = yy - s
    for i in range(p):
        r2 -= cbeta[i] * cbeta[i]
    # r² at rounding level (≤ p distinct events fit exactly): σ̂ = 0 and d(θ) = −∞
    if not (r2 > 1e-13 * yy and np.isfinite(r2)):
        return False, np.inf, beta, np.nan, Lx
    dev = 2.0 * logdet + dof * (1.0 + np.log(2.0 * np.pi) + np.log(r2 / dof))
    if reml:
        dev += 2.0 * logdet_rx
    return True, dev, beta, r2 / dof, Lx.T.copy()


@njit(cache=True, nogil=True, error_model="numpy")
def _grad_range(S, lo, hi, ZZi, ZXi, Zyi, lam, beta, Cinv, G1, G2, G3):  # pragma: no cover
    """Add groups ``lo..hi-1`` into the gradient sums of :func:`grad_sums`."""
    q = ZZi.shape[0]
    p = ZXi.shape[1]
    L, W, RZX, cu, u, b = _scratch(q, p)
    T = np.empty((q, q))
    V = np.empty((q, p))
    B = np.empty((q, p))
    BC = np.empty((q, p))
    res = np.empty(q)
    for r in range(lo, hi):
        Sr = S[r]
        group_factor(Sr, ZZi, ZXi, Zyi, lam, L, RZX, cu, W)
        _blup_into(L, RZX, cu, lam, beta, u, b)  # b = Λu
        # T = Λ'ZZ, then T ← M⁻¹T = L'⁻¹L⁻¹T (column by column)
        for a in range(q):
            for c in range(q):
                t = 0.0
                for d in range(a, q):
                    t += lam[d, a] * Sr[ZZi[d, c]]
                T[a, c] = t
        for c in range(q):
            for a in range(q):  # forward: L x = T[:, c]
                t = T[a, c]
                for d in range(a):
                    t -= L[a, d] * T[d, c]
                T[a, c] = t / L[a, a]
            for a in range(q - 1, -1, -1):  # backward: L' x = ...
                t = T[a, c]
                for d in range(a + 1, q):
                    t -= L[d, a] * T[d, c]
                T[a, c] = t / L[a, a]
        # V = L'⁻¹RZX;  B = ZX − ZZ Λ V
        for j in range(p):
            for a in range(q - 1, -1, -1):
                t = RZX[a, j]
                for d in range(a + 1, q):
                    t -= L[d, a] * V[d, j]
                V[a, j] = t / L[a, a]
        for a in range(q):
            for j in range(p):
                t = Sr[ZXi[a, j]]
                for c in range(q):
                    lv = 0.0
                    for d in range(c + 1):
                        lv += lam[c, d] * V[d, j]
                    t -= Sr[ZZi[a, c]] * lv
                B[a, j] = t
        # BC = B C⁻¹;  G2 += Λ' (BC) B'
        for a in range(q):
            for j in range(p):
                t = 0.0
                for k in range(p):
                    t += B[a, k] * Cinv[k, j]
                BC[a, j] = t
        # res'Z = Zy − ZXβ − ZZ b
        for a in range(q):
            t = Sr[Zyi[a]]
            for j in range(p):
                t -= Sr[ZXi[a, j]] * beta[j]
            for c in range(q):
                t -= Sr[ZZi[a, c]] * b[c]
            res[a] = t
        for a in range(q):
            for c in range(q):
                G1[a, c] += T[a, c]
                G3[a, c] += res[a] * u[c]
                t = 0.0
                for d in range(a, q):
                    bcb = 0.0
                    for j in range(p):
                        bcb += BC[d, j] * B[c, j]
                    t += lam[d, a] * bcb
                G2[a, c] += t


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def grad_sums(S, G, P, zi, xi, yi, lam, beta, Cinv):  # pragma: no cover - numba
    """Sums over groups for the gradient of the profiled criterion in Λ.

    With ``M_g = L_gL_g'``, ``u_g`` the spherical BLUP at β, ``res'Z_g = Zy_g − ZX_gβ −
    ZZ_gΛu_g`` and ``B_g = Z_g'V̄_g⁻¹X_g = ZX_g − ZZ_gΛL_g'⁻¹RZX_g``, returns
    ``(Σ M_g⁻¹Λ'ZZ_g, Σ Λ'B_g C⁻¹B_g', Σ (Z_g'res_g) u_g')`` for ``C⁻¹ = (RX'RX)⁻¹``.
    A θ entry at Λ[i, j] then has derivative ``2 G1[j, i]`` in Σ log|M_g|,
    ``−2 G2[j, i]`` in log|RX'RX| and ``−2 G3[i, j]`` in r².
    """
    ZZi, ZXi, Zyi, XXi, Xyi, yyi = block_maps(P, zi, xi, yi)
    q = zi.shape[0]
    nc = max(1, (G + PLS_CHUNK - 1) // PLS_CHUNK)
    G1k = np.zeros((nc, q, q))
    G2k = np.zeros((nc, q, q))
    G3k = np.zeros((nc, q, q))
    for k in prange(nc):
        lo = k * PLS_CHUNK
        hi = min(G, lo + PLS_CHUNK)
        _grad_range(S, lo, hi, ZZi, ZXi, Zyi, lam, beta, Cinv, G1k[k], G2k[k], G3k[k])
    G1 = np.zeros((q, q))
    G2 = np.zeros((q, q))
    G3 = np.zeros((q, q))
    for k in range(nc):
        G1 += G1k[k]
        G2 += G2k[k]
        G3 += G3k[k]
    return G1, G2, G3


@njit(cache=True, nogil=True, error_model="numpy")
def copy_checked(dst, col):  # pragma: no cover - numba
    """``dst[:] = col`` as floats in one pass; returns the first row holding ±inf, or -1.
    NaN (a missing value) is copied as is."""
    for r in range(col.shape[0]):
        v = float(col[r])
        dst[r] = v
        if v == v and v - v != 0.0:
            return r
    return -1


@njit(cache=True, nogil=True, error_model="numpy")
def nan_rows(A, y, miss):  # pragma: no cover - numba
    """``miss[e] |= any NaN in A[e] or y[e]``."""
    k = A.shape[1]
    for e in range(A.shape[0]):
        bad = y[e] != y[e]
        for i in range(k):
            bad |= A[e, i] != A[e, i]
        miss[e] |= bad
