"""Stan's unconstrained coordinates for SDs, σ and correlation matrices, with Jacobians.

A sampler moves on the whole real line; the parameters do not. As Stan does:

- a standard deviation ``s > 0`` is ``exp(x)``, with log-Jacobian ``x``;
- a K×K correlation matrix ``R = LL'`` is its Cholesky factor ``L``, built row by row from
  ``K(K−1)/2`` canonical partial correlations ``z = tanh(y)`` (Stan's
  ``cholesky_corr_constrain``, LKJ's C-vine)::

      L[0, 0] = 1;   for row i ≥ 1:  L[i, 0] = z_i0,
      L[i, j] = z_ij · √(1 − Σ_{l<j} L[i, l]²)  (0 < j < i),   L[i, i] = √(1 − Σ_{l<i} L[i, l]²)

  with log-Jacobian ``Σ log(1 − z²)`` (the tanh) ``+ Σ_{i, 0<j<i} ½ log(1 − Σ_{l<j}
  L[i, l]²)``.

With ``w_ij = √(1 − Σ_{l<j} L[i, l]²) = Π_{l<j} √(1 − z_il²)``, row i's entries are
``z_ij w_ij`` and ``w_ii``, so the gradient in ``y`` is a backward pass along each row
(:func:`corr_cholesky_grad`). ``1 − tanh²(y)`` is computed as ``sech²(y)``, which stays
positive however large ``|y|`` is.

The compiled functions are used inside the log posterior's kernel
(:mod:`streamlmm.bayes.density`); :func:`corr_from_unconstrained` and
:func:`unconstrained_from_corr` are their numpy faces.

Examples
--------
>>> import numpy as np
>>> L, lj = corr_from_unconstrained(np.array([0.3, -0.2, 0.5]), 3)
>>> bool(np.allclose(np.diag(L @ L.T), 1.0))
True
>>> bool(np.allclose(unconstrained_from_corr(L @ L.T), [0.3, -0.2, 0.5]))
True

"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "corr_cholesky",
    "corr_cholesky_grad",
    "corr_from_unconstrained",
    "unconstrained_from_corr",
    "n_corr",
]

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


def n_corr(K: int) -> int:
    """Unconstrained coordinates of a K×K correlation matrix: ``K(K−1)/2``."""
    return K * (K - 1) // 2


@njit(inline="always", **_OPTS)
def _sech2(y):  # pragma: no cover - numba
    """``(1 − tanh²y, log(1 − tanh²y))``, stable for any y."""
    a = abs(y)
    e = math.exp(-2.0 * a)
    log_s = math.log(4.0) - 2.0 * a - 2.0 * math.log1p(e)
    return math.exp(log_s), log_s


@njit(inline="always", **_OPTS)
def corr_cholesky(y, off, K, L, lo):  # pragma: no cover - numba
    """``L[lo:lo+K, lo:lo+K]`` from ``y[off : off + K(K−1)/2]`` (Stan's order: row by
    row, ``(1,0), (2,0), (2,1), …``); returns the log-Jacobian of ``y ↦ L``."""
    lj = 0.0
    L[lo, lo] = 1.0
    k = off
    for i in range(1, K):
        w2 = 1.0  # w_ij² = 1 − Σ_{l<j} L[i, l]²
        for j in range(i):
            z = math.tanh(y[k])
            omz2, log_omz2 = _sech2(y[k])
            lj += log_omz2
            if j > 0:
                lj += 0.5 * math.log(w2)
            L[lo + i, lo + j] = z * math.sqrt(w2)
            w2 *= omz2
            k += 1
        L[lo + i, lo + i] = math.sqrt(w2)
        for j in range(i + 1, K):
            L[lo + i, lo + j] = 0.0
    for j in range(1, K):
        L[lo, lo + j] = 0.0
    return lj


@njit(inline="always", **_OPTS)
def corr_cholesky_grad(y, off, K, gL, lo, gy):  # pragma: no cover - numba
    """Add to ``gy[off : off + K(K−1)/2]`` the gradient in ``y`` of ``f(L(y)) + log|J|``,
    given ``gL = ∂f/∂L`` on the block ``[lo:lo+K, lo:lo+K]`` (lower triangle read).

    Per row i, with ``S_l = Σ_{l<j<i} gL[i, j] z_j w_j + gL[i, i] w_i``::

        ∂/∂y_l = (1 − z_l²) gL[i, l] w_l − z_l (S_l + (i − 1 − l)) − 2 z_l
    """
    z = np.empty(K)
    w = np.empty(K)
    for i in range(1, K):
        base = off + i * (i - 1) // 2
        wl = 1.0
        for l in range(i):
            w[l] = wl
            z[l] = math.tanh(y[base + l])
            omz2, _ = _sech2(y[base + l])
            wl = wl * math.sqrt(omz2)
        w_ii = wl
        S = gL[lo + i, lo + i] * w_ii
        for l in range(i - 1, -1, -1):
            omz2, _ = _sech2(y[base + l])
            gy[base + l] += omz2 * gL[lo + i, lo + l] * w[l] - z[l] * (S + (i - 1 - l)) - 2.0 * z[l]
            S += gL[lo + i, lo + l] * z[l] * w[l]


@njit(**_OPTS)
def _corr_kernel(y, K):  # pragma: no cover - numba
    L = np.zeros((K, K))
    lj = corr_cholesky(y, 0, K, L, 0)
    return L, lj


def corr_from_unconstrained(y: np.ndarray, K: int) -> tuple[np.ndarray, float]:
    """``(L, log|J|)`` of a K×K correlation matrix's Cholesky factor from its ``K(K−1)/2``
    unconstrained coordinates."""
    y = np.ascontiguousarray(y, dtype=float)
    if y.shape != (n_corr(K),):
        raise ValueError(f"a {K}x{K} correlation needs {n_corr(K)} coordinates, got {y.shape}")
    return _corr_kernel(y, int(K))


def unconstrained_from_corr(R: np.ndarray, clip: float = 1 - 1e-12) -> np.ndarray:
    """The inverse of :func:`corr_from_unconstrained`: the coordinates of a correlation
    matrix ``R`` (positive definite). Partial correlations are clipped to ``±clip`` so
    that a boundary value (a correlation of ±1) maps to a finite point."""
    L = np.linalg.cholesky(np.asarray(R, dtype=float))
    K = L.shape[0]
    out = []
    for i in range(1, K):
        ss = 0.0
        for j in range(i):
            w = math.sqrt(max(1.0 - ss, 1e-300))
            z = min(max(L[i, j] / w, -clip), clip)
            out.append(math.atanh(z))
            ss += L[i, j] ** 2
    return np.array(out)
