"""Profiled REML/ML from the statistics, the bounded optimizer, and ML-EM steps.

Everything is computed in the shifted coordinates of :class:`~streamlmm.stats.GroupStats`
(docs/math.md §6) from the blocked cross-products alone; :func:`unshift` maps the estimates
back to the user's columns. The deviance is docs/math.md §3::

    RX'RX = XX − Σ RZX_g'RZX_g,   cβ = RX'⁻¹(Xy − Σ RZX_g'cu_g),   β̂ = RX⁻¹cβ
    r²    = yy − Σ‖cu_g‖² − ‖cβ‖²
    ML:   d(θ) = Σ 2 log|L_g| + n (1 + log(2π r²/n))
    REML: d(θ) = Σ 2 log|L_g| + 2 log|RX| + (n−p)(1 + log(2π r²/(n−p)))

"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from streamlmm import kernels
from streamlmm.stats import GroupStats

__all__ = [
    "Profile",
    "lam_of",
    "theta_of",
    "theta_lower",
    "theta_start",
    "profile",
    "gradient",
    "fit_theta",
    "loglik",
    "em_step",
    "ols_start",
    "unshift",
    "SINGULAR_TOL",
]

SINGULAR_TOL = 1e-4  # lme4's isSingular() tolerance on the diagonal of Λ
_LOG2PI = math.log(2.0 * math.pi)


# -- θ ↔ Λ ------------------------------------------------------------------------------
def _tril(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower-triangle positions in lme4's order for θ (column by column)."""
    cols, rows = np.triu_indices(q)  # (j, i) with i ≥ j, ordered by j then i
    return rows, cols


def lam_of(theta: np.ndarray, q: int) -> np.ndarray:
    """Λ from θ, lme4's order (``getME(m, "theta")``).

    >>> lam_of(np.array([1.0, 0.5, 2.0]), 2)
    array([[1. , 0. ],
           [0.5, 2. ]])

    """
    lam = np.zeros((q, q))
    lam[_tril(q)] = theta
    return lam


def theta_of(lam: np.ndarray) -> np.ndarray:
    """θ from Λ (inverse of :func:`lam_of`)."""
    return lam[_tril(lam.shape[0])].copy()


def theta_lower(q: int) -> np.ndarray:
    """Lower bounds of θ: 0 on the diagonal of Λ, −∞ elsewhere."""
    rows, cols = _tril(q)
    return np.where(rows == cols, 0.0, -np.inf)


def theta_start(q: int) -> np.ndarray:
    """lme4's starting point: Λ = I."""
    rows, cols = _tril(q)
    return (rows == cols).astype(float)


# -- profiled deviance --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Profile:
    """The profiled quantities at one θ (shifted coordinates)."""

    theta: np.ndarray
    criterion: float
    beta: np.ndarray
    sigma2: float
    RX: np.ndarray  # upper triangular, RX'RX = XX − Σ RZX'RZX
    logdet_L: float
    n: float
    reml: bool


def _sums(stats: GroupStats, lam: np.ndarray):
    f = stats.formula
    return kernels.pls_sums(stats.S, stats.n_groups, stats.P, f.zi, f.xi, stats.yi, lam)


def profile(stats: GroupStats, theta: np.ndarray, reml: bool) -> Profile | None:
    """Evaluate the profiled REML/ML criterion at θ; ``None`` where it is undefined.

    It is undefined when ``RX'RX`` is not positive definite (too few events or
    collinear fixed columns) or the penalised residual sum of squares is not positive
    (within rounding of the total sum of squares: data that the model fits exactly).
    """
    lam = lam_of(np.asarray(theta, dtype=float), stats.formula.q)
    logdet, A, c, s, XX, Xy, yy, n = _sums(stats, lam)
    if not math.isfinite(logdet):  # huge θ: Λ'ZZΛ + I lost its positive definiteness
        return None
    ok, d, beta, sigma2, RX = kernels.profile_tail(logdet, A, c, s, XX, Xy, yy, n, reml)
    if not ok:
        return None
    return Profile(
        theta=np.array(theta, dtype=float),
        criterion=float(d),
        beta=beta,
        sigma2=float(sigma2),
        RX=RX,
        logdet_L=float(logdet),
        n=float(n),
        reml=reml,
    )


def gradient(stats: GroupStats, prof: Profile) -> np.ndarray:
    """∂d/∂θ at ``prof.theta``, analytically from the statistics (one more pass).

    For θ_k = Λ[i, j] (E = ∂Λ/∂θ_k) the pieces are, per docs/math.md §3's quantities,
    ``∂Σlog|M_g| = 2 Σ (M_g⁻¹Λ'ZZ_g)[j, i]``, ``∂log|RX'RX| = −2 Σ (Λ'B_gC⁻¹B_g')[j, i]``
    and ``∂r² = −2 Σ (Z_g'res_g)[i] u_g[j]`` (the envelope theorem: β and u are optimal).
    """
    f = stats.formula
    lam = lam_of(prof.theta, f.q)
    RXinv = np.linalg.inv(prof.RX)
    G1, G2, G3 = kernels.grad_sums(
        stats.S, stats.n_groups, stats.P, f.zi, f.xi, stats.yi, lam, prof.beta, RXinv @ RXinv.T
    )
    dof = prof.n - f.p if prof.reml else prof.n
    r2 = prof.sigma2 * dof
    rows, cols = _tril(f.q)
    g = 2.0 * G1[cols, rows] - 2.0 * (dof / r2) * G3[rows, cols]
    if prof.reml:
        g -= 2.0 * G2[cols, rows]
    return g


def fit_theta(
    stats: GroupStats,
    reml: bool,
    theta0: np.ndarray | None = None,
    *,
    max_evals: int = 5000,
    polish: bool = False,
) -> tuple[Profile | None, int]:
    """Minimise d(θ) subject to diag(Λ) ≥ 0, warm-started from ``theta0``.

    A bounded quasi-Newton search (L-BFGS-B) on the analytic gradient
    (:func:`gradient`), run until the projected gradient vanishes to rounding. When a
    diagonal entry of Λ ends near its bound (a possibly singular fit), or ``polish`` is
    set, a derivative-free bounded Powell search follows, which lands on the boundary
    exactly. Returns the profile at the optimum (``None`` when the criterion is
    undefined everywhere tried) and the number of criterion evaluations.

    """
    q = stats.formula.q
    lower = theta_lower(q)
    bounds = optimize.Bounds(lower, np.full_like(lower, np.inf))
    evals = 0

    def f(theta):
        nonlocal evals
        evals += 1
        pr = profile(stats, theta, reml)
        return pr.criterion if pr is not None else math.inf

    def fg(theta):
        nonlocal evals
        evals += 1
        pr = profile(stats, theta, reml)
        if pr is None:
            return math.inf, np.zeros_like(theta)
        return pr.criterion, gradient(stats, pr)

    starts = [theta_start(q)] if theta0 is None else [np.asarray(theta0, float), theta_start(q)]
    best = None
    for x0 in starts:
        x0 = np.maximum(x0, lower)
        if math.isfinite(f(x0)):
            best = x0
            break
    if best is None:
        return None, evals
    gtol = 1e-11 * max(abs(f(best)), 1.0)

    def descend(x):
        fx = f(x)
        for _ in range(4):  # restart while a run still improves (e.g. after a failed search)
            res = optimize.minimize(
                fg,
                x,
                method="L-BFGS-B",
                jac=True,
                bounds=bounds,
                options={"ftol": 1e-15, "gtol": gtol, "maxfun": max_evals, "maxcor": 20},
            )
            improved = fx - res.fun
            if res.fun < fx:
                x, fx = res.x, res.fun
            if res.success or not improved > 1e-12 * max(abs(fx), 1.0):
                break
        return x, fx

    x, fx = descend(best)
    # A diagonal θ at 0 whose column of Λ is otherwise empty is a stationary point (d is
    # even in it), so a gradient method that steps onto that face can stay on a saddle.
    # Probe small steps back inside; descend from the best probe if it is lower. A truly
    # singular fit has no lower probe and stays on the face.
    diag = lower == 0
    for _ in range(3):
        on_face = diag & (x <= 1e-8)
        if not on_face.any():
            break
        scale = max(float(np.max(x[diag])), 0.1)
        probes = []
        for delta in (1e-2 * scale, 1e-1 * scale):
            kick = x.copy()
            kick[on_face] = delta
            probes.append((f(kick), kick))
        f_kick, kick = min(probes, key=lambda pk: pk[0])
        if not f_kick < fx:
            break
        x, fx = descend(kick)
    near_bound = np.any((lower == 0) & (x < 1e-3))
    if not near_bound:
        x = _newton_on_gradient(stats, reml, x)
    if polish or near_bound:
        res2 = optimize.minimize(
            f,
            x,
            method="Powell",
            bounds=[(lo if math.isfinite(lo) else None, None) for lo in lower],
            options={"xtol": 1e-10, "ftol": 1e-14, "maxfev": max_evals},
        )
        if res2.fun < fx:
            x = res2.x
        x = np.where(np.abs(x) < 1e-14, 0.0, x)
    return profile(stats, x, reml), evals


def _newton_on_gradient(stats: GroupStats, reml: bool, x: np.ndarray, iters: int = 3):
    """Finish an interior optimum with Newton steps on the analytic gradient.

    Line searches stall once changes of d(θ) reach its rounding (~1e-12 relative), with
    the gradient still ~1e-5; Newton on the gradient, with the Hessian from forward
    differences of the gradient, needs no function values and converges quadratically.
    A step is kept only if it shrinks the gradient.
    """

    def grad(t):
        pr = profile(stats, t, reml)
        return None if pr is None else gradient(stats, pr)

    g = grad(x)
    if g is None:
        return x
    n = x.shape[0]
    for _ in range(iters):
        h = 1e-6 * np.maximum(np.abs(x), 0.1)
        H = np.empty((n, n))
        for i in range(n):
            xi = x.copy()
            xi[i] += h[i]
            gi = grad(xi)
            if gi is None:
                return x
            H[:, i] = (gi - g) / h[i]
        H = (H + H.T) / 2
        try:
            np.linalg.cholesky(H)
            step = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            return x
        x_new = x - step
        if np.any(x_new < theta_lower(stats.formula.q)):
            return x
        g_new = grad(x_new)
        if g_new is None or not np.linalg.norm(g_new) < np.linalg.norm(g):
            return x
        x, g = x_new, g_new
    return x


# -- ML log-likelihood at given parameters and EM -----------------------------------------
def loglik(stats: GroupStats, theta: np.ndarray, beta: np.ndarray, sigma2: float) -> float:
    """ML log-likelihood at (β, θ, σ²), not profiled (shifted coordinates).

    ``−2 log L = Σ 2 log|L_g| + n log(2πσ²) + Q(β)/σ²`` with
    ``Q(β) = yy − 2β'Xy + β'XXβ − (Σ‖cu‖² − 2β'ΣRZX'cu + β'ΣRZX'RZX β)``.
    """
    lam = lam_of(theta, stats.formula.q)
    logdet, A, c, s, XX, Xy, yy, n = _sums(stats, lam)
    Q = yy - 2 * beta @ Xy + beta @ XX @ beta - (s - 2 * beta @ c + beta @ A @ beta)
    return float(-0.5 * (2 * logdet + n * (_LOG2PI + math.log(sigma2)) + Q / sigma2))


def _lower_factor(F: np.ndarray) -> np.ndarray:
    """Lower-triangular Λ with ΛΛ' = FF' and diag(Λ) ≥ 0, by QR of F' (F may be singular)."""
    _, R = np.linalg.qr(F.T)
    lam = R.T
    return lam * np.where(np.diag(lam) < 0, -1.0, 1.0)


def _chol_psd(M: np.ndarray) -> np.ndarray:
    """Lower-triangular Λ with ΛΛ' = M for a positive semi-definite M."""
    M = (M + M.T) / 2
    try:
        return np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        w, U = np.linalg.eigh(M)
        return _lower_factor(U * np.sqrt(np.clip(w, 0.0, None)))


def ols_start(stats: GroupStats) -> tuple[np.ndarray, float]:
    """OLS β and σ² = RSS/n from the global sums: EM's usual starting point."""
    _, _, _, _, XX, Xy, yy, n = _sums(stats, np.zeros((stats.formula.q,) * 2))
    beta = np.linalg.lstsq(XX, Xy, rcond=None)[0]
    return beta, float(max(yy - beta @ Xy, 1e-300) / n)


def em_step(
    stats: GroupStats, theta: np.ndarray, beta: np.ndarray, sigma2: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """One ML-EM step (docs/math.md §5) in the Λ form, so a singular D is fine.

    Returns the new ``(θ, β, σ²)``; ``D = σ²ΛΛ'``.
    """
    f = stats.formula
    lam = lam_of(theta, f.q)
    Sbb, SK, rss_b, trK, T = kernels.em_sums(
        stats.S, stats.n_groups, stats.P, f.zi, f.xi, stats.yi, lam, beta
    )
    _, _, _, _, XX, Xy, yy, n = _sums(stats, lam)
    D = (Sbb + sigma2 * SK) / stats.n_groups
    rss = (yy - 2 * beta @ Xy + beta @ XX @ beta) + rss_b + sigma2 * trK
    sigma2_new = float(rss / n)
    beta_new = np.linalg.solve(XX, Xy - T)
    theta_new = theta_of(_chol_psd(D / sigma2_new))
    return theta_new, beta_new, sigma2_new


# -- back to the user's columns -----------------------------------------------------------
def unshift(stats: GroupStats, beta, vcov_beta, theta, b, condvar):
    """Map shifted-coordinate estimates to the user's columns (docs/math.md §6).

    With ``c`` the shift, ``β = T_x β̃ + c_y e₀`` and ``b = T_z b̃`` where
    ``T = I − e₀ c'`` moves the shift into the intercept; covariances map as ``T V T'``
    and Λ is re-triangularised so that ``ΛΛ' = T_z Λ̃Λ̃' T_z'``.
    """
    f = stats.formula
    c = stats.shift if stats.shift is not None else np.zeros(f.k + 1)
    cx, cz, cy = c[f.xi], c[f.zi], c[-1]

    def T(cv: np.ndarray) -> np.ndarray:
        M = np.eye(cv.shape[0])
        if cv.any():  # shiftable columns imply an intercept at position 0
            M[0] -= cv
        return M

    Tx, Tz = T(cx), T(cz)
    beta_u = Tx @ beta
    if cy:
        beta_u[0] += cy
    lam_u = _lower_factor(Tz @ lam_of(theta, f.q))
    return (
        beta_u,
        Tx @ vcov_beta @ Tx.T,
        theta_of(lam_u),
        b @ Tz.T,
        np.einsum("ij,gjk,lk->gil", Tz, condvar, Tz),
    )
