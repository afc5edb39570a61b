"""Group effects of a posterior, exactly, from their Gaussian conditionals.

Given one posterior draw of (β, Λ, σ), group g's effect is Gaussian (docs/bayes.md)::

    u_g ~ N(L_g'⁻¹ c_g(β), σ²(L_gL_g')⁻¹),   b_g = Λ u_g

— the core's conditional (:func:`streamlmm.kernels.group_conditional`, the one
function every caller uses), here in the problem's coordinates and mapped to the
user's with ``T_z`` (``b = T_z b̃``; :mod:`streamlmm.bayes.density`). So:

- :func:`moments` gives every group's posterior mean and covariance *Rao-Blackwellised*:
  the mean over draws of the conditional means, and the mean of the conditional
  covariances plus the covariance of the conditional means (the law of total
  variance). Memory is O(groups), whatever the number of draws; no randomness;
- :func:`draws` gives exact draws of chosen groups' effects, one per posterior draw
  (``b = T_zΛ̃(u + σL'⁻¹z)``, z standard normal), for predictive checks and for
  whoever asks to keep them;
- :func:`conditionals` gives one group's conditional mean and covariance at every draw,
  whose Gaussian mixture is the group's posterior (:func:`mixture_quantiles`).

Draws are processed in the order given and groups in parallel runs of rows, each run
summed in draw order, so the results do not depend on the number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamlmm import kernels

__all__ = ["moments", "draws", "conditionals", "mixture_quantiles"]

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(inline="always", **_OPTS)
def _to_user(Tz, bt, K, s2, b, V, q):  # pragma: no cover - numba
    """``b = T_z b̃`` and ``V = s² T_z K T_z'``."""
    for a in range(q):
        t = 0.0
        for c in range(q):
            t += Tz[a, c] * bt[c]
        b[a] = t
    for a in range(q):
        for c in range(q):
            t = 0.0
            for i in range(q):
                for j in range(q):
                    t += Tz[a, i] * K[i, j] * Tz[c, j]
            V[a, c] = s2 * t


@njit(**_OPTS)
def _moments_q1(F, r0, r1, q, p, lam, beta, sig, Tz, mean, cov):  # pragma: no cover
    return _moments_body(F, r0, r1, 1, p, lam, beta, sig, Tz, mean, cov)


@njit(**_OPTS)
def _moments_q2(F, r0, r1, q, p, lam, beta, sig, Tz, mean, cov):  # pragma: no cover
    return _moments_body(F, r0, r1, 2, p, lam, beta, sig, Tz, mean, cov)


@njit(**_OPTS)
def _moments_q3(F, r0, r1, q, p, lam, beta, sig, Tz, mean, cov):  # pragma: no cover
    return _moments_body(F, r0, r1, 3, p, lam, beta, sig, Tz, mean, cov)


@njit(**_OPTS)
def _moments_qn(F, r0, r1, q, p, lam, beta, sig, Tz, mean, cov):  # pragma: no cover
    return _moments_body(F, r0, r1, q, p, lam, beta, sig, Tz, mean, cov)


_MOMENTS = {1: _moments_q1, 2: _moments_q2, 3: _moments_q3}


def moments(
    F: np.ndarray,
    q: int,
    p: int,
    lam: np.ndarray,
    beta: np.ndarray,
    sig: np.ndarray,
    Tz: np.ndarray,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Every group's posterior mean (G, q) and covariance (G, q, q) of its effect, in the
    problem's column order and the user's coordinates, Rao-Blackwellised over the draws
    ``(lam[d], beta[d], sig[d])`` (Λ̃, β̃, σ)."""
    G = F.shape[0]
    mean = np.zeros((G, q))
    cov = np.zeros((G, q, q))
    args = (
        np.ascontiguousarray(F),
        int(q),
        int(p),
        np.ascontiguousarray(lam, dtype=float),
        np.ascontiguousarray(beta, dtype=float),
        np.ascontiguousarray(sig, dtype=float),
        np.ascontiguousarray(Tz, dtype=float),
    )
    _in_runs(_MOMENTS.get(int(q), _moments_qn), G, threads, args, (mean, cov))
    return mean, cov


def _in_runs(kernel, G: int, threads: int, args, outs) -> None:
    """``kernel(*args[:1], r0, r1, *args[1:], *outs)`` over runs of rows on threads."""
    threads = max(1, min(int(threads), G // 256 or 1))
    cuts = [G * t // threads for t in range(threads + 1)]
    if threads == 1:
        kernel(args[0], 0, G, *args[1:], *outs)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        futs = [
            pool.submit(kernel, args[0], a, b, *args[1:], *outs)
            for a, b in zip(cuts[:-1], cuts[1:])
        ]
        for f in futs:
            f.result()


@njit(inline="always", **_OPTS)
def _moments_body(F, r0, r1, q, p, lam, beta, sig, Tz, mean, cov):  # pragma: no cover
    """Rows r0..r1-1 of :func:`moments`: per group, Welford's running mean and
    co-moment of the conditional means over the draws, and the running mean of the
    conditional covariances; ``cov = E[V] + M2/D``."""
    D = lam.shape[0]
    L = np.empty((q, q))
    W = np.empty((q, q))
    RZX = np.empty((q, p))
    cu = np.empty(q)
    u = np.empty(q)
    bt = np.empty(q)
    K = np.empty((q, q))
    b = np.empty(q)
    V = np.empty((q, q))
    m = np.empty(q)
    d0 = np.empty(q)
    M2 = np.empty((q, q))
    EV = np.empty((q, q))
    for r in range(r0, r1):
        m[:] = 0.0
        M2[:, :] = 0.0
        EV[:, :] = 0.0
        for d in range(D):
            kernels.group_conditional(F[r], q, p, lam[d], beta[d], L, RZX, cu, W, u, bt, K)
            _to_user(Tz, bt, K, sig[d] * sig[d], b, V, q)
            w = 1.0 / (d + 1.0)
            for a in range(q):
                d0[a] = b[a] - m[a]
                m[a] += w * d0[a]
            for a in range(q):
                for c in range(q):
                    M2[a, c] += d0[a] * (b[c] - m[c])
                    EV[a, c] += w * (V[a, c] - EV[a, c])
        for a in range(q):
            mean[r, a] = m[a]
            for c in range(q):
                cov[r, a, c] = EV[a, c] + M2[a, c] / D
    return 0


@njit(**_OPTS)
def _draws_kernel(F, r0, r1, q, p, lam, beta, sig, Tz, rows, z, out):  # pragma: no cover
    """Exact draws for entries r0..r1-1 of ``rows``: ``out[d, i] = T_zΛ̃(u + σL'⁻¹z)``."""
    D = lam.shape[0]
    L = np.empty((q, q))
    W = np.empty((q, q))
    RZX = np.empty((q, p))
    cu = np.empty(q)
    u = np.empty(q)
    bt = np.empty(q)
    K = np.empty((q, q))
    e = np.empty(q)
    for i in range(r0, r1):
        r = rows[i]
        for d in range(D):
            kernels.group_conditional(F[r], q, p, lam[d], beta[d], L, RZX, cu, W, u, bt, K)
            for a in range(q):
                e[a] = z[d, i, a]
            kernels._bwd(L, e, q)  # L'⁻¹z
            for a in range(q):
                e[a] = u[a] + sig[d] * e[a]
            for a in range(q):  # b̃ = Λ̃(u + σL'⁻¹z), then b = T_z b̃
                t = 0.0
                for c in range(a + 1):
                    t += lam[d, a, c] * e[c]
                bt[a] = t
            for a in range(q):
                t = 0.0
                for c in range(q):
                    t += Tz[a, c] * bt[c]
                out[d, i, a] = t
    return 0


def draws(
    F: np.ndarray,
    q: int,
    p: int,
    lam: np.ndarray,
    beta: np.ndarray,
    sig: np.ndarray,
    Tz: np.ndarray,
    rows: np.ndarray,
    rng: np.random.Generator,
    threads: int = 1,
) -> np.ndarray:
    """Exact draws (D, len(rows), q) of the effects of groups ``rows``, one per posterior
    draw (problem column order, user coordinates)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    D = lam.shape[0]
    z = rng.standard_normal((D, rows.shape[0], q))
    out = np.empty((D, rows.shape[0], q))
    args = (
        np.ascontiguousarray(F),
        int(q),
        int(p),
        np.ascontiguousarray(lam, dtype=float),
        np.ascontiguousarray(beta, dtype=float),
        np.ascontiguousarray(sig, dtype=float),
        np.ascontiguousarray(Tz, dtype=float),
        rows,
        z,
    )
    _in_runs(_draws_kernel, rows.shape[0], threads, args, (out,))
    return out


@njit(**_OPTS)
def _conditionals_kernel(Fr, q, p, lam, beta, sig, Tz, mean, cov):  # pragma: no cover
    D = lam.shape[0]
    L = np.empty((q, q))
    W = np.empty((q, q))
    RZX = np.empty((q, p))
    cu = np.empty(q)
    u = np.empty(q)
    bt = np.empty(q)
    K = np.empty((q, q))
    for d in range(D):
        kernels.group_conditional(Fr, q, p, lam[d], beta[d], L, RZX, cu, W, u, bt, K)
        _to_user(Tz, bt, K, sig[d] * sig[d], mean[d], cov[d], q)
    return 0


def conditionals(
    Fr: np.ndarray, q: int, p: int, lam, beta, sig, Tz
) -> tuple[np.ndarray, np.ndarray]:
    """One group's conditional mean (D, q) and covariance (D, q, q) at every draw."""
    D = np.shape(lam)[0]
    mean = np.empty((D, q))
    cov = np.empty((D, q, q))
    _conditionals_kernel(
        np.ascontiguousarray(Fr, dtype=float),
        int(q),
        int(p),
        np.ascontiguousarray(lam, dtype=float),
        np.ascontiguousarray(beta, dtype=float),
        np.ascontiguousarray(sig, dtype=float),
        np.ascontiguousarray(Tz, dtype=float),
        mean,
        cov,
    )
    return mean, cov


def mixture_quantiles(mean: np.ndarray, sd: np.ndarray, probs) -> np.ndarray:
    """Quantiles of the equal-weight mixture of normals ``N(mean[d], sd[d]²)`` (by
    bisection on its CDF to 1e-10 of its spread): the posterior quantiles of one
    coefficient of a group's effect, Rao-Blackwellised over the draws.

    >>> [round(float(v), 4) + 0.0 for v in mixture_quantiles(np.zeros(3), np.ones(3), [0.025, 0.5])]
    [-1.96, 0.0]

    """
    from scipy.special import ndtr

    mean = np.asarray(mean, dtype=float)
    sd = np.maximum(np.asarray(sd, dtype=float), 1e-300)
    lo0 = float(np.min(mean - 40 * sd))
    hi0 = float(np.max(mean + 40 * sd))
    out = []
    for pr in np.atleast_1d(probs):
        lo, hi = lo0, hi0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if float(np.mean(ndtr((mid - mean) / sd))) < pr:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-10 * max(hi0 - lo0, 1e-300):
                break
        out.append(0.5 * (lo + hi))
    return np.array(out)
