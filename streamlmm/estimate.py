"""Profiled REML/ML from the blocked cross-products, the optimizer, lme4's checks, and EM.

A fit works on a :class:`Problem`: the statistics' blocks around a centre ``c``
(docs/math.md §2, §6), the kept fixed columns (lme4's rank check) and the structure of
Λ. The profiled criterion is::

    RX'RX = XX − Σ RZX_g'RZX_g,   cβ = RX'⁻¹(Xy − Σ RZX_g'cu_g),   β̂ = RX⁻¹cβ
    r²    = yy − Σ‖cu_g‖² − ‖cβ‖²
    ML:   d(θ) = Σ 2 log|L_g| + n (1 + log(2π r²/n))
    REML: d(θ) = Σ 2 log|L_g| + 2 log|RX| + (n−p)(1 + log(2π r²/(n−p)))

:func:`fit_theta` minimises it in phases (start, trust-region Newton on the analytic
gradient, boundary escape, lme4's convergence check) and returns an
:class:`OptSummary`; :func:`estimates_at` turns a θ into the user's estimates (the role
of lme4's ``mkMerMod``).

"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import numpy as np

from streamlmm import kernels
from streamlmm.formula import INTERCEPT
from streamlmm.stats import GroupStats

__all__ = [
    "Problem",
    "Profile",
    "GradientParts",
    "group_conditionals",
    "OptSummary",
    "Estimates",
    "make_problem",
    "fixed_rank",
    "theta_index",
    "fit_theta",
    "estimates_at",
    "group_estimates",
    "em_step",
    "loglik",
    "SINGULAR_TOL",
    "RANK_TOL",
    "PARALLEL_MIN_GROUPS",
]

SINGULAR_TOL = 1e-4  # lme4's isSingular(): a diagonal entry of Λ below this is a boundary fit
RANK_TOL = 1e-7  # lme4's rank tolerance on |R_jj| / ‖x_j‖ (qr(X, tol = 1e-7))
CONV_TOL = 2e-3  # lme4's check.conv.grad: max |H⁻¹g| at the optimum
PARALLEL_MIN_GROUPS = 50_000  # below this, one thread is faster (scripts/bench_core.py)
_LOG2PI = math.log(2.0 * math.pi)


# -- structure of Λ ---------------------------------------------------------------------------
def theta_index(blocks, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(rows, cols)`` in Λ of the θ entries, in lme4's order: block by block,
    each block's lower triangle column by column (``getME(m, "theta")``).

    >>> theta_index([(0, 1)], 2)
    (array([0, 1, 1]), array([0, 0, 1]))
    >>> theta_index([(0,), (1,)], 2)  # (1 + x || g): two 1×1 blocks
    (array([0, 1]), array([0, 1]))

    """
    rows, cols = [], []
    for block in blocks:
        for j, c in enumerate(block):
            for r in block[j:]:
                rows.append(r)
                cols.append(c)
    return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)


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


# -- the problem ----------------------------------------------------------------------------
def fixed_rank(XX: np.ndarray, raw_sq: np.ndarray, tol: float = RANK_TOL) -> np.ndarray:
    """lme4's rank check, from the cross-product: which fixed columns to keep.

    Columns are taken in formula order; a column is dropped (aliased) when its residual
    sum of squares on the kept earlier columns is at most ``tol²`` times its raw sum of
    squares ``raw_sq`` — the pivots of a sequential Cholesky of ``XX`` are the squared
    ``R_jj`` of the QR that lme4 computes (``qr(X, tol = 1e-7)``, LINPACK's dqrdc2).

    >>> XX = np.array([[4.0, 2.0, 6.0], [2.0, 2.0, 4.0], [6.0, 4.0, 10.0]])  # x3 = x1 + x2
    >>> fixed_rank(XX, np.diag(XX)).tolist()
    [True, True, False]

    """
    p = XX.shape[0]
    keep = np.zeros(p, dtype=bool)
    L = np.zeros((p, p))
    kept: list[int] = []
    for j in range(p):
        if not raw_sq[j] > 0:
            continue
        v = XX[kept, j].copy() if kept else np.zeros(0)
        for a in range(len(kept)):  # v ← L⁻¹ XX[kept, j]
            v[a] = (v[a] - L[a, :a] @ v[:a]) / L[a, a]
        d = XX[j, j] - v @ v
        if not d > tol * tol * raw_sq[j]:
            continue
        a = len(kept)
        L[a, :a] = v
        L[a, a] = math.sqrt(d)
        kept.append(j)
        keep[j] = True
    return keep


@dataclasses.dataclass(frozen=True)
class Profile:
    """The profiled quantities at one θ (the problem's coordinates)."""

    theta: np.ndarray
    criterion: float
    beta: np.ndarray
    sigma2: float
    RX: np.ndarray  # upper triangular, RX'RX = XX − Σ RZX'RZX
    logdet_L: float
    n: float
    reml: bool
    sums: kernels.PlsSums | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A fit's view of the statistics: blocks around ``c``, kept fixed columns, Λ's shape.

    Build it with :func:`make_problem`. ``xi`` are the kept fixed columns' union
    positions, ``keep`` the mask over all fixed columns.
    """

    F: np.ndarray
    XX: np.ndarray
    Xy: np.ndarray
    yy: float
    n: float
    n_groups: int
    c: np.ndarray
    xi: np.ndarray
    zi: np.ndarray
    keep: np.ndarray
    blocks: tuple
    reml: bool
    parallel: bool | int  # the sums' threads: False (one), True (every core) or a count
    xint: int  # position of the intercept among the kept fixed columns, -1 if none
    zint: int  # position of the intercept among the random columns, -1 if none
    stats: GroupStats | None = None  # the statistics (decayed to now): each group's own effect

    @property
    def p(self) -> int:
        return int(self.xi.shape[0])

    @property
    def q(self) -> int:
        return int(self.zi.shape[0])

    @functools.cached_property
    def tindex(self) -> tuple[np.ndarray, np.ndarray]:
        return theta_index(self.blocks, self.q)

    @functools.cached_property
    def Fb(self) -> np.ndarray:
        """``F`` in the blocked layout that every evaluation reads (:func:`kernels.by_block`)."""
        return kernels.by_block(self.F)

    def lam(self, theta: np.ndarray) -> np.ndarray:
        """Λ from θ."""
        lam = np.zeros((self.q, self.q))
        lam[self.tindex] = theta
        return lam

    def theta(self, lam: np.ndarray) -> np.ndarray:
        """θ from Λ (inverse of :meth:`lam`)."""
        return lam[self.tindex].copy()

    def lower(self) -> np.ndarray:
        """Lower bounds of θ: 0 on the diagonal of Λ, −∞ elsewhere."""
        r, c = self.tindex
        return np.where(r == c, 0.0, -np.inf)

    def start(self) -> np.ndarray:
        """lme4's starting point: Λ = I."""
        r, c = self.tindex
        return (r == c).astype(float)

    # -- coordinates ----------------------------------------------------------------------
    def Tz(self) -> np.ndarray:
        """``b = T_z b̃``: moves the centre of the random columns into their intercept."""
        cz = self.c[self.zi]
        T = np.eye(self.q)
        if cz.any():  # shiftable random columns share a block with the intercept
            T[self.zint] -= cz
        return T

    def Tx(self) -> np.ndarray:
        """``β = T_x β̃ + c_y e₀`` for the kept fixed columns."""
        cx = self.c[self.xi]
        T = np.eye(self.p)
        if cx.any():
            T[self.xint] -= cx
        return T

    def to_user_lam(self, lam: np.ndarray) -> np.ndarray:
        """The user's Λ (lower triangular per block) from this problem's."""
        return _blockwise_lower(self.Tz() @ lam, self.blocks)

    def from_user_lam(self, lam_u: np.ndarray) -> np.ndarray:
        """This problem's Λ from the user's."""
        return _blockwise_lower(np.linalg.solve(self.Tz(), lam_u), self.blocks)

    # -- the criterion --------------------------------------------------------------------
    def profile(self, theta: np.ndarray, *, grad: bool = False) -> Profile | None:
        """Profiled REML/ML at θ; ``None`` where the criterion is undefined.

        One pass over the groups; with ``grad`` it also gathers the sums that
        :meth:`gradient` needs, so the gradient costs no further pass.
        """
        theta = np.asarray(theta, dtype=float)
        s = kernels.pls_sums(
            self.F, self.q, self.p, self.lam(theta), self.parallel, grad, Fb=self.Fb, ww=self.reml
        )
        if not math.isfinite(s.logdet):  # huge θ: Λ'ZZΛ + I lost its positive definiteness
            return None
        ok, d, beta, sigma2, RX = kernels.profile_tail(
            s.logdet, s.A, s.c, s.cu2, self.XX, self.Xy, self.yy, self.n, self.reml
        )
        if not ok:
            return None
        return Profile(
            theta.copy(), float(d), beta, float(sigma2), RX, s.logdet, self.n, self.reml, s
        )

    def gradient_parts(self, prof: Profile) -> GradientParts:
        """The criterion's pieces differentiated in θ at ``prof.theta``, from the sums of
        its pass (:func:`kernels.gradient_terms`, :func:`kernels.gradient_parts`).

        For θ_k = Λ[i, j] they are ``∂Σlog|M_g| = 2 Σ (M_g⁻¹Λ'ZZ_g)[j, i]`` (``Σ 2
        log|L_g|``), ``∂log|RX'RX| = −2 Σ (Λ'B_gC⁻¹B_g')[j, i]`` (``2 log|RX|``; zero
        unless the problem is REML) and ``∂r² = −2 Σ (Z_g'res_g)[i] u_g[j]`` at β̂ (β and
        u are optimal: the envelope theorem). The Bayesian log density adds its priors to
        the same pieces at any β (:mod:`streamlmm.bayes.density`).
        """
        if prof.sums is None or prof.sums.T is None:
            prof = self.profile(prof.theta, grad=True)
        RXinv = np.linalg.inv(prof.RX)
        lam = self.lam(prof.theta)
        G1, G2, G3 = kernels.gradient_terms(
            prof.sums, self.q, self.p, lam, prof.beta, RXinv @ RXinv.T
        )
        rows, cols = self.tindex
        return GradientParts(*kernels.gradient_parts(G1, G2, G3, rows, cols))

    def gradient(self, prof: Profile) -> np.ndarray:
        """∂d/∂θ at ``prof.theta`` from :meth:`gradient_parts`: ``∂Σlog|M| + (dof/r²)∂r²``,
        plus ``∂log|RX'RX|`` for REML."""
        parts = self.gradient_parts(prof)
        dof = prof.n - self.p if prof.reml else prof.n
        r2 = prof.sigma2 * dof
        g = parts.logdet_L + (dof / r2) * parts.r2
        if prof.reml:
            g += parts.logdet_RX
        return g


class GradientParts(NamedTuple):
    """∂/∂θ of the profiled criterion's pieces (:meth:`Problem.gradient_parts`)."""

    logdet_L: np.ndarray  # ∂ Σ_g 2 log|L_g| (= ∂ Σ_g log|M_g|)
    logdet_RX: np.ndarray  # ∂ 2 log|RX| (= ∂ log|RX'RX|)
    r2: np.ndarray  # ∂ r², β held where it is


def _blockwise_lower(F: np.ndarray, blocks) -> np.ndarray:
    out = np.zeros_like(F)
    for b in blocks:
        ix = np.ix_(b, b)
        out[ix] = _lower_factor(F[ix])
    return out


def _raw_sq(XX: np.ndarray, cx: np.ndarray, n: float, xint: int) -> np.ndarray:
    """Σ w x_j² in the user's coordinates from ``XX`` around ``c``."""
    d = np.diag(XX).copy()
    if cx.any():
        d += 2.0 * cx * XX[xint] + cx * cx * n
    return d


def make_problem(
    stats: GroupStats,
    spec,
    reml: bool,
    *,
    threads: int | None = None,
    center: np.ndarray | None = None,
) -> tuple[Problem, dict[str, Any]]:
    """The fit's view of ``stats`` for the column spec ``spec`` (a formula or design).

    Returns the problem and, over all fixed columns, their raw sums of squares and
    standard deviations (for lme4's checks). Fixed columns that lme4 would drop as
    aliased are left out of the problem. ``center`` overrides the centre (zeros: the
    user's own coordinates, as lme4 sees the data).
    """
    stats.decay_to_now()
    c = stats.center() if center is None else np.asarray(center, dtype=float)
    xi_all = np.asarray(spec.xi, dtype=np.int64)
    zi = np.asarray(spec.zi, dtype=np.int64)
    b = stats.cross_products(c, zi, xi_all)
    names = list(spec.columns)
    fixed = [names[i] for i in xi_all]
    xint_all = fixed.index(INTERCEPT) if INTERCEPT in fixed else -1
    raw = _raw_sq(b.XX, c[xi_all], b.n, xint_all)
    keep = fixed_rank(b.XX, raw)
    random = [names[i] for i in zi]
    F = b.F
    if not keep.all():  # drop the ZX columns of the aliased fixed columns
        q, p = zi.shape[0], xi_all.shape[0]
        cols = np.concatenate(
            [
                np.arange(q * q),
                q * q + (np.arange(q)[:, None] * p + np.flatnonzero(keep)).ravel(),
                q * q + q * p + np.arange(q),
            ]
        )
        F = np.ascontiguousarray(F[:, cols])
    G = stats.n_groups
    parallel = G >= PARALLEL_MIN_GROUPS and (threads is None or threads > 1)
    if parallel and threads is not None:
        parallel = threads  # this many threads, not every core
    prob = Problem(
        F=F,
        XX=b.XX[np.ix_(keep, keep)].copy(),
        Xy=b.Xy[keep].copy(),
        yy=float(b.yy),
        n=float(b.n),
        n_groups=G,
        c=c,
        xi=xi_all[keep],
        zi=zi,
        keep=keep,
        blocks=tuple(tuple(int(i) for i in blk) for blk in spec.blocks),
        reml=reml,
        parallel=parallel,
        xint=int(np.cumsum(keep)[xint_all] - 1) if xint_all >= 0 and keep[xint_all] else -1,
        zint=random.index(INTERCEPT) if INTERCEPT in random else -1,
        stats=stats,
    )
    return prob, {"raw_sq": raw, "sd": _column_sd(b.XX, b.n, xint_all, fixed)}


def _column_sd(XX: np.ndarray, n: float, xint: int, names) -> dict[str, float]:
    """Standard deviations of the fixed columns other than the intercept (lme4's scale
    check), from the cross-product around the centre."""
    if xint < 0 or not n > 1:
        return {}
    out = {}
    for j, name in enumerate(names):
        if j != xint:
            ss = XX[j, j] - XX[xint, j] ** 2 / n
            out[name] = math.sqrt(max(ss, 0.0) / (n - 1))
    return out


# -- the optimizer --------------------------------------------------------------------------
@dataclasses.dataclass
class OptSummary:
    """What the optimizer did (MixedModels.jl's ``OptSummary``, lme4's ``optinfo``)."""

    method: str = "trust-region Newton (analytic gradient, differenced Hessian)"
    theta0: list = dataclasses.field(default_factory=list)
    theta: list = dataclasses.field(default_factory=list)
    criterion0: float = math.nan
    criterion: float = math.nan
    evals: int = 0  # criterion evaluations (one pass over the groups each)
    grad_evals: int = 0  # gradients (from their criterion's pass: no pass of their own)
    em_steps: int = 0  # ML-EM passes of a cold start
    iterations: int = 0
    grad_norm: float = math.nan  # max |g| over the free θ at the end
    scaled_grad: float = math.nan  # max |H⁻¹g| (lme4's checkConv)
    hessian_pd: bool = False
    converged: bool = False
    return_code: str = "not run"
    seconds: float = 0.0
    messages: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Counted:
    """The criterion and gradient of a problem, counting evaluations."""

    def __init__(self, prob: Problem, max_evals: int):
        self.prob = prob
        self.max_evals = max_evals
        self.evals = 0
        self.grad_evals = 0
        self.em_steps = 0
        self.last_hessian: tuple[np.ndarray, np.ndarray] | None = None  # (θ, H)

    @property
    def exhausted(self) -> bool:
        return self.evals >= self.max_evals

    def f(self, theta) -> Profile | None:
        self.evals += 1
        return self.prob.profile(theta, grad=True)

    def fg(self, theta) -> tuple[Profile | None, np.ndarray | None]:
        return self.g(self.f(theta))

    def g(self, pr: Profile | None) -> tuple[Profile | None, np.ndarray | None]:
        """The gradient at an evaluated profile (from the sums of its pass)."""
        if pr is None:
            return None, None
        self.grad_evals += 1
        return pr, self.prob.gradient(pr)

    def hessian(self, theta, g) -> np.ndarray | None:
        """Forward differences of the analytic gradient, symmetrised."""
        n = theta.shape[0]
        H = np.empty((n, n))
        lower = self.prob.lower()
        for i in range(n):
            h = 1e-6 * max(abs(theta[i]), 0.1)
            t = theta.copy()
            t[i] += h if theta[i] + h >= lower[i] else -h
            pr, gi = self.fg(t)
            if pr is None:
                return None
            H[:, i] = (gi - g) / (t[i] - theta[i])
        H = (H + H.T) / 2
        self.last_hessian = (theta.copy(), H)
        return H


def _free(theta, g, lower) -> np.ndarray:
    """θ entries not held at their bound (a bound held when the gradient pushes into it)."""
    return ~((theta <= lower) & (g >= 0))


def _tr_step(g, H, free, radius):
    """Minimise ``g's + ½s'Hs`` over the free entries with ‖s‖ ≤ radius (Levenberg)."""
    s = np.zeros_like(g)
    if not free.any():
        return s
    gf, Hf = g[free], H[np.ix_(free, free)]
    lam_min = float(np.linalg.eigvalsh(Hf)[0])
    mu = max(0.0, -lam_min + 1e-12 * max(1.0, abs(lam_min)))
    for _ in range(60):
        try:
            step = -np.linalg.solve(Hf + mu * np.eye(len(gf)), gf)
        except np.linalg.LinAlgError:
            step = None
        if step is not None and np.linalg.norm(step) <= radius * (1 + 1e-12):
            s[free] = step
            return s
        mu = max(2.0 * mu, 1e-8 * max(1.0, abs(lam_min)), 1e-12)
    s[free] = -gf * (radius / max(np.linalg.norm(gf), 1e-300))
    return s


def _descend(fn: _Counted, pr: Profile, g: np.ndarray, summary: OptSummary, max_iter: int = 100):
    """Trust-region Newton iterations, projected onto the bounds, to a stationary point.

    Far from the optimum a step is accepted on the decrease of d(θ) (ratio test). Once
    the predicted decrease is at rounding level of d(θ), line searches cannot see
    progress any more, and a full Newton step is accepted while it shrinks the gradient
    (quadratic convergence to rounding, so every arrival order lands on the same θ).
    """
    prob = fn.prob
    lower = prob.lower()
    theta = pr.theta
    radius = max(1.0, float(np.linalg.norm(theta)))
    f = pr.criterion
    noise = 1e-13 * max(1.0, abs(f))
    H = None  # a differenced Hessian, or its BFGS update after a long step
    for _ in range(max_iter):
        free = _free(theta, g, lower)
        gnorm = float(np.max(np.abs(g[free]), initial=0.0))
        if gnorm == 0.0:
            break
        if fn.exhausted:
            summary.messages.append("evaluation limit reached")
            break
        if H is None:
            H = fn.hessian(theta, g)
        if H is None:
            summary.messages.append("criterion undefined next to θ")
            break
        summary.iterations += 1
        improved = False
        for _ in range(30):
            s = _tr_step(g, H, free, radius)
            new = _toward_bound(theta, theta + s, lower)
            s = new - theta
            if not np.any(s):
                break
            pred = -(g @ s + 0.5 * s @ H @ s)
            pr_new, g_new = fn.fg(new)
            if pr_new is None:
                radius = np.linalg.norm(s) / 4.0
                continue
            if pred > noise:  # d(θ) can see the step: the ratio test decides
                if pr_new.criterion < f:
                    rho = (f - pr_new.criterion) / pred
                    if rho > 0.75 and np.linalg.norm(s) > 0.9 * radius:
                        radius *= 2.0
                    elif rho < 0.25:
                        radius = max(radius / 4.0, 1e-12)
                    improved = True
            else:  # rounding regime: the gradient decides
                fnew = _free(new, g_new, lower)
                if np.max(np.abs(g_new[fnew]), initial=0.0) < gnorm and (
                    pr_new.criterion <= f + noise
                ):
                    improved = True
            if improved:
                H = _far_update(H, s, g_new - g, f - pr_new.criterion, f)
                if np.any(new <= lower):  # on a bound: the curvature there is differenced
                    H = None
                theta, f, g, pr = new, pr_new.criterion, g_new, pr_new
                break
            radius = np.linalg.norm(s) / 4.0
            if radius < 1e-15 * max(1.0, float(np.linalg.norm(theta))) or fn.exhausted:
                break
        if not improved:
            break
        if np.max(np.abs(s)) <= 1e-13 * max(1.0, float(np.max(np.abs(theta)))):
            break
    return pr, g


def _toward_bound(theta, new, lower, keep: float = 0.1):
    """Project a step onto the bounds, but stop a diagonal entry that would cross its
    bound at ``keep`` of its distance from it, unless it is already within 1e-6 of the
    scale of θ: a bound is reached in a few steps when the optimum is on it, and a
    near-boundary optimum inside is not mistaken for a face (where d(θ) is even in the
    entry, so Newton would stop on a saddle)."""
    out = np.maximum(new, lower)
    hit = (new < lower) & (theta - lower > 1e-6 * max(1.0, float(np.max(np.abs(theta)))))
    out[hit] = lower[hit] + keep * (theta[hit] - lower[hit])
    return out


FAR = 1e-6  # a decrease of d(θ) above FAR·|d| is a long step: its Hessian is updated


def _far_update(H, s, y, decrease: float, f: float):
    """The Hessian for the next iteration: after a long step (d(θ) fell by more than
    ``FAR·|d|``), the BFGS update of ``H`` from the step ``s`` and the change of the
    gradient ``y``, which costs no pass; near the optimum (or when the update would
    not stay positive definite) ``None``, so Newton differences the gradient afresh and
    converges quadratically to rounding."""
    sy = float(s @ y)
    if decrease <= FAR * max(1.0, abs(f)) or not sy > 0.0:
        return None
    Hs = H @ s
    sHs = float(s @ Hs)
    if not sHs > 0.0:
        return None
    return H - np.outer(Hs, Hs) / sHs + np.outer(y, y) / sy


def _escape_boundary(fn: _Counted, pr: Profile, g: np.ndarray, summary: OptSummary):
    """A diagonal θ at 0 whose column of Λ is otherwise empty is a stationary point (d is
    even in it), so Newton can stop on a saddle. Probe steps back inside over four
    orders of magnitude (an optimum just inside is missed by a probe beyond twice its
    distance, where the even function is back above its value on the face) and descend
    from the lowest; a truly singular fit has none lower and stays on the face."""
    lower = fn.prob.lower()
    diag = lower == 0
    for _ in range(3):
        on_face = diag & (pr.theta <= 1e-8)
        if not on_face.any() or fn.exhausted:  # out of passes: the next fit probes
            break
        scale = max(float(np.max(pr.theta[diag])), 0.1)
        best = None
        for delta in (1e-4 * scale, 1e-3 * scale, 1e-2 * scale, 1e-1 * scale):
            kick = pr.theta.copy()
            kick[on_face] = delta
            pk, gk = fn.fg(kick)
            if (
                pk is not None
                and pk.criterion < pr.criterion
                and (best is None or pk.criterion < best[0].criterion)
            ):
                best = (pk, gk)
        if best is None:
            break
        summary.messages.append("left a saddle on the boundary")
        pr, g = _descend(fn, best[0], best[1], summary)
    return pr, g


def _versus_no_random_effects(
    fn: _Counted, pr: Profile, g: np.ndarray, summary: OptSummary
) -> tuple[Profile, np.ndarray]:
    """d(θ) need not be convex: a descent from the start can end in a local minimum
    above d at Λ = 0 (no random effects, the corner every θ can reach). One pass
    there; if it is lower, the descent starts again from it and the lower end wins."""
    zero = np.zeros_like(pr.theta)
    if fn.exhausted or np.array_equal(pr.theta, zero):
        return pr, g
    z = fn.f(zero)
    if z is None or not z.criterion < pr.criterion - 1e-10 * abs(pr.criterion):
        return pr, g
    summary.messages.append(f"left a local minimum at θ = {pr.theta.tolist()} above Λ = 0")
    z, gz = fn.g(z)
    z, gz = _descend(fn, z, gz, summary)
    z, gz = _escape_boundary(fn, z, gz, summary)
    return (z, gz) if z.criterion < pr.criterion else (pr, g)


def _check_convergence(fn: _Counted, pr: Profile, g: np.ndarray, summary: OptSummary) -> None:
    """lme4's ``checkConv``: a small scaled gradient ``H⁻¹g`` and a positive-definite
    Hessian over the free θ; an exhausted evaluation budget counts as failure."""
    lower = fn.prob.lower()
    free = _free(pr.theta, g, lower) & ~(pr.theta <= lower)
    summary.grad_norm = float(np.max(np.abs(g[_free(pr.theta, g, lower)]), initial=0.0))
    if fn.exhausted:  # the budget is spent: no Hessian (lme4 too reports maxfun)
        summary.return_code = "evaluation limit"
        if "evaluation limit reached" not in summary.messages:  # the descent may have said it
            summary.messages.append("evaluation limit reached")
        return
    H = np.zeros((0, 0))
    if free.any():
        last = fn.last_hessian  # Newton's last step from there was at rounding level
        near = last is not None and np.max(np.abs(last[0] - pr.theta)) <= 1e-7 * max(
            1.0, float(np.max(np.abs(pr.theta)))
        )
        H = last[1] if near else fn.hessian(pr.theta, g)
    if H is None:
        summary.return_code = "hessian undefined"
        summary.messages.append("criterion undefined next to the optimum")
        return
    Hf = H[np.ix_(free, free)] if free.any() else np.zeros((0, 0))
    ev = np.linalg.eigvalsh(Hf) if Hf.size else np.ones(1)
    summary.hessian_pd = bool(ev[0] > 1e-10 * max(1.0, abs(ev[-1])))
    if summary.hessian_pd and Hf.size:
        summary.scaled_grad = float(np.max(np.abs(np.linalg.solve(Hf, g[free]))))
    else:
        summary.scaled_grad = 0.0 if not Hf.size else math.inf
    if fn.exhausted:
        summary.return_code = "evaluation limit"
    elif not summary.hessian_pd:
        summary.return_code = "hessian not positive definite"
        summary.messages.append(
            f"Hessian at the optimum is not positive definite (eigenvalues {ev.tolist()}): "
            "the variance components are not identified by these data"
        )
    elif summary.scaled_grad > CONV_TOL:
        summary.return_code = "gradient"
        summary.messages.append(
            f"failed to converge with max|H⁻¹grad| = {summary.scaled_grad:.3g} (tol = {CONV_TOL})"
        )
    else:
        summary.return_code = "ok"
        summary.converged = True


def fit_theta(
    prob: Problem, theta0: np.ndarray | None = None, *, max_evals: int = 500
) -> tuple[Profile | None, OptSummary]:
    """Minimise d(θ) subject to diag(Λ) ≥ 0, warm-started from ``theta0``.

    Phases: :func:`_start` (θ0, else Λ = I), :func:`_descend` (trust-region Newton
    on the analytic gradient with a differenced Hessian, projected onto the bounds),
    :func:`_escape_boundary` (saddles where a column of Λ is empty),
    :func:`_versus_no_random_effects` (a local minimum above Λ = 0) and
    :func:`_check_convergence` (lme4's checkConv). Returns the profile at the optimum
    (``None`` when the criterion is undefined everywhere tried) and the summary.
    """
    t0 = time.perf_counter()
    fn = _Counted(prob, max_evals)
    summary = OptSummary()
    pr, g = _start(fn, theta0)
    if pr is None:
        summary.return_code = "criterion undefined"
        summary.messages.append("the criterion is undefined at the start (too few observations?)")
        summary.evals = fn.evals
        return None, summary
    summary.theta0, summary.criterion0 = pr.theta.tolist(), pr.criterion
    pr, g = _descend(fn, pr, g, summary)
    pr, g = _escape_boundary(fn, pr, g, summary)
    pr, g = _versus_no_random_effects(fn, pr, g, summary)
    pr = dataclasses.replace(pr, theta=np.where(np.abs(pr.theta) < 1e-14, 0.0, pr.theta))
    _check_convergence(fn, pr, g, summary)
    summary.theta, summary.criterion = pr.theta.tolist(), pr.criterion
    summary.evals, summary.grad_evals, summary.em_steps = fn.evals, fn.grad_evals, fn.em_steps
    summary.seconds = time.perf_counter() - t0
    return pr, summary


EM_START_STEPS = 6  # ML-EM steps from Λ = I before Newton, on a cold start


def _start(fn: _Counted, theta0) -> tuple[Profile | None, np.ndarray | None]:
    """The first θ where the criterion is defined: the warm start; else a few ML-EM steps
    from lme4's Λ = I (cheap passes that bring θ near the optimum, where Newton needs
    few iterations), or Λ = I itself if EM does not improve on it."""
    prob = fn.prob
    if theta0 is not None and np.shape(theta0) == prob.start().shape:
        pr, g = fn.fg(np.maximum(np.asarray(theta0, float), prob.lower()))
        if pr is not None:
            return pr, g
    pr = fn.f(prob.start())
    if pr is None:
        return None, None
    theta, beta, sigma2 = pr.theta, pr.beta, pr.sigma2
    for _ in range(EM_START_STEPS if prob.n_groups > 1 else 0):
        try:
            theta, beta, sigma2 = em_step(prob, theta, beta, sigma2)
        except np.linalg.LinAlgError:
            break
        fn.em_steps += 1
        if not (np.all(np.isfinite(theta)) and sigma2 > 0):
            break
    best = fn.fg(theta) if not np.array_equal(theta, pr.theta) else (None, None)
    if best[0] is not None and best[0].criterion < pr.criterion:
        return best
    return fn.g(pr)


# -- estimates in the user's columns ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Estimates:
    """A fit's results in the user's columns (lme4's ``mkMerMod``).

    ``fixef``/``fixef_se`` and the rows of ``vcov`` cover every fixed column, NaN for
    the dropped ones; ``b``/``condvar`` (the BLUPs, partial pooling) and ``b_np``/
    ``b_np_se`` (each group's own estimate at β̂, no pooling: :func:`group_estimates`)
    follow the statistics' row order.
    """

    fixef: np.ndarray
    vcov: np.ndarray
    theta: np.ndarray
    re_cov: np.ndarray
    sigma2: float
    criterion: float
    b: np.ndarray
    condvar: np.ndarray
    keep: np.ndarray
    b_np: np.ndarray
    b_np_se: np.ndarray

    @property
    def fixef_se(self) -> np.ndarray:
        return np.sqrt(np.diag(self.vcov))


def estimates_at(prob: Problem, pr: Profile, *, groups: bool = True) -> Estimates:
    """β, Var(β̂), θ, VarCorr, σ², the BLUPs and condVar, and each group's own estimate
    (:func:`group_estimates`) at ``pr`` (user's columns).

    With ``c`` the centre, ``β = T_x β̃ + c_y e₀`` and ``b = T_z b̃`` where
    ``T = I − e₀ c'`` moves the centre into the intercept; covariances map as ``T V T'``
    and Λ is re-triangularised (per block) so that ``ΛΛ' = T_z Λ̃Λ̃' T_z'``.
    """
    lam = prob.lam(pr.theta)
    Tx = prob.Tx()
    RXinv = np.linalg.inv(pr.RX)
    beta_k = Tx @ pr.beta
    if prob.c[-1]:
        beta_k[prob.xint] += prob.c[-1]
    vcov_k = Tx @ (pr.sigma2 * RXinv @ RXinv.T) @ Tx.T
    p_all = prob.keep.shape[0]
    fixef = np.full(p_all, np.nan)
    fixef[prob.keep] = beta_k
    vcov = np.full((p_all, p_all), np.nan)
    vcov[np.ix_(prob.keep, prob.keep)] = vcov_k
    lam_u = prob.to_user_lam(lam)
    G = prob.n_groups if groups else 0
    b, condvar = group_estimates(prob, pr, pool=True) if G else _no_groups(prob.q)
    b_np, cov_np = group_estimates(prob, pr, pool=False) if G else _no_groups(prob.q)
    return Estimates(
        fixef=fixef,
        vcov=vcov,
        theta=prob.theta(lam_u),
        re_cov=pr.sigma2 * lam_u @ lam_u.T,
        sigma2=pr.sigma2,
        criterion=pr.criterion,
        b=b,
        condvar=condvar,
        keep=prob.keep,
        b_np=b_np,
        b_np_se=np.sqrt(np.clip(np.diagonal(cov_np, axis1=1, axis2=2), 0.0, None)),
    )


def group_estimates(prob: Problem, pr: Profile, *, pool: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every group's effect at ``pr`` in the user's columns, from its own statistics.

    With ``pool``: the BLUPs ``b̂_g = Λu_g`` (partial pooling) and their conditional
    covariances ``σ²Λ(L_gL_g')⁻¹Λ'`` (lme4's ``ranef(condVar = TRUE)``). Without: each
    group's own least-squares estimate of its effect at the same fixed effects β̂ (no
    pooling), ``b_g = (Z_g'Z_g)⁻¹Z_g'(y_g − X_gβ̂)`` with covariance ``σ²(Z_g'Z_g)⁻¹``;
    for a random intercept alone ``ȳ_g − x̄_g'β̂`` with standard error ``σ/√n_g``, whose
    BLUP is the shrunk ``τ²/(τ² + σ²/n_g) · (ȳ_g − x̄_g'β̂)``; NaN where the group's own
    data do not identify it (a slope with no spread in the group). docs/math.md §4.
    Both come from each group's statistics row (:func:`kernels.group_effect`).
    """
    st = prob.stats
    B, K = kernels.blups(
        st.M,
        prob.n_groups,
        st.vpos,
        prob.c,
        prob.zi,
        prob.xi,
        st.k,
        st.P,
        prob.lam(pr.theta),
        pr.beta,
        pool=pool,
    )
    Tz = prob.Tz()
    return B @ Tz.T, pr.sigma2 * (Tz @ K @ Tz.T)


def _no_groups(q: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, q)), np.zeros((0, q, q))


def group_conditionals(
    F: np.ndarray,
    q: int,
    p: int,
    lam: np.ndarray,
    beta: np.ndarray,
    sigma2: float,
    Tz: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every group's conditional mean and covariance of ``b_g`` given (β, Λ, σ²), from
    its blocks (rows of ``F``): ``b_g = Λu_g`` and ``σ²Λ(L_gL_g')⁻¹Λ'`` (docs/math.md
    §4; lme4's ``ranef(condVar = TRUE)`` at the estimates). ``Tz`` maps the blocks'
    coordinates to the user's (``b = T_z b̃``, covariances ``T_z V T_z'``); ``None``:
    the blocks are around 0 already.

    From the blocks (:func:`kernels.group_conditional`); the fit's estimates, the
    scale-out lookups and the server take each group's effect from its statistics
    row instead (:func:`group_estimates`, :func:`kernels.group_effect`), which keeps
    its digits where the blocks lose them (a leverage point).

    Examples
    --------
    >>> F = np.array([[4.0, 8.0, 6.0]])  # one group, q = p = 1: ZZ = 4, ZX = 8, Zy = 6
    >>> b, V = group_conditionals(F, 1, 1, np.array([[1.0]]), np.array([0.5]), 2.0)
    >>> round(float(b[0, 0]), 6), round(float(V[0, 0, 0]), 6)  # (6 − 8·0.5)/(4 + 1), 2/5
    (0.4, 0.4)

    """
    B, K = kernels.block_conditionals(F, q, p, lam, beta)
    if Tz is not None and not np.array_equal(Tz, np.eye(q)):
        return B @ Tz.T, sigma2 * np.einsum("ij,gjk,lk->gil", Tz, K, Tz)
    return B, sigma2 * K


# -- the ML log-likelihood at given parameters, and EM ----------------------------------------
def loglik(prob: Problem, theta: np.ndarray, beta: np.ndarray, sigma2: float) -> float:
    """ML log-likelihood at (β, θ, σ²), not profiled (the problem's coordinates).

    ``−2 log L = Σ 2 log|L_g| + n log(2πσ²) + Q(β)/σ²`` with
    ``Q(β) = yy − 2β'Xy + β'XXβ − (Σ‖cu‖² − 2β'ΣRZX'cu + β'ΣRZX'RZX β)``.
    """
    s = kernels.pls_sums(prob.F, prob.q, prob.p, prob.lam(theta), prob.parallel, False, Fb=prob.Fb)
    Q = (
        prob.yy
        - 2 * beta @ prob.Xy
        + beta @ prob.XX @ beta
        - (s.cu2 - 2 * beta @ s.c + beta @ s.A @ beta)
    )
    return float(-0.5 * (2 * s.logdet + prob.n * (_LOG2PI + math.log(sigma2)) + Q / sigma2))


def ols_start(prob: Problem) -> tuple[np.ndarray, float]:
    """OLS β and σ² = RSS/n from the global sums: EM's usual starting point."""
    beta = np.linalg.lstsq(prob.XX, prob.Xy, rcond=None)[0]
    return beta, float(max(prob.yy - beta @ prob.Xy, 1e-300) / prob.n)


def em_step(
    prob: Problem, theta: np.ndarray, beta: np.ndarray, sigma2: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """One ML-EM step (docs/math.md §5) in the Λ form, so a singular D is fine.

    Returns the new ``(θ, β, σ²)``; ``D = σ²ΛΛ'``. Off-block entries of the update of
    D are dropped (the EM update of a block-diagonal D is block by block).
    """
    lam = prob.lam(theta)
    Sbb, SK, rss_b, trK, T = kernels.em_sums(prob.F, prob.q, prob.p, lam, beta, Fb=prob.Fb)
    D = (Sbb + sigma2 * SK) / prob.n_groups
    rss = (prob.yy - 2 * beta @ prob.Xy + beta @ prob.XX @ beta) + rss_b + sigma2 * trK
    sigma2_new = float(rss / prob.n)
    beta_new = np.linalg.solve(prob.XX, prob.Xy - T)
    lam_new = np.zeros_like(lam)
    for blk in prob.blocks:
        ix = np.ix_(blk, blk)
        lam_new[ix] = _chol_psd(D[ix] / sigma2_new)
    return prob.theta(lam_new), beta_new, sigma2_new


# -- the model builder (lme4's mkMerMod) -------------------------------------------------------
QUANTILES = (("min", 0.0), ("1Q", 0.25), ("median", 0.5), ("3Q", 0.75), ("max", 1.0))


def residual_quantiles(res, design, fixef, b, sigma: float) -> dict[str, float]:
    """Quantiles of the scaled residuals ``(y − x'β − z'b_g)/σ`` of a reservoir's events
    (each counted as often as it was seen), at ``fixef`` (every fixed column; NaN for a
    dropped one) and the groups' BLUPs ``b`` (rows of the statistics): R's type-7
    quantiles, as lme4's ``summary()`` computes them from every residual. ``events`` is
    how many events they cover and ``of`` how many the stream had."""
    from streamlmm.reservoir import weighted_quantiles

    _, resid, count = res.residuals(design.xi, design.zi, fixef, b)
    q = weighted_quantiles(resid / sigma, count, [p for _, p in QUANTILES])
    out = {name: float(v) for (name, _), v in zip(QUANTILES, q)}
    out.update(events=res.n_events, of=res.n_seen)
    return out


def _reindexed(good: dict[str, Any] | None, names) -> dict[str, Any] | None:
    """Last good estimates laid out for the fixed columns ``names`` (columns that
    appeared since get NaN)."""
    if good is None or tuple(good["names"]) == tuple(names):
        return good
    pos = {n: i for i, n in enumerate(good["names"])}
    ix = [pos.get(n, -1) for n in names]
    p = len(names)
    fixef, vcov, keep = np.full(p, np.nan), np.full((p, p), np.nan), np.zeros(p, dtype=bool)
    for i, j in enumerate(ix):
        if j >= 0:
            fixef[i], keep[i] = good["fixef"][j], good["keep"][j]
            for i2, j2 in enumerate(ix):
                if j2 >= 0:
                    vcov[i, i2] = good["vcov"][j, j2]
    return {**good, "names": tuple(names), "fixef": fixef, "vcov": vcov, "keep": keep}


@dataclasses.dataclass
class ModelParts:
    """What :func:`mk_snapshot` builds a snapshot from, besides the estimates."""

    formula: str
    method: str
    design: Any
    stats: GroupStats
    n_events: int
    reservoir: Any = None
    summary: OptSummary | None = None  # the last refit's, when the parameters are its
    converged: bool = False  # the parameters are a verified optimum of these data
    colinfo: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    state: dict | None = None


def mk_snapshot(
    parts: ModelParts,
    prob: Problem | None,
    theta: np.ndarray | None,
    last_good: dict[str, Any] | None,
    offsets=None,
    meta=None,
):
    """The snapshot at θ (lme4's ``mkMerMod``): β̂ and σ̂ profiled at θ from the current
    statistics, every group's BLUP, conditional covariance and own (no-pooling)
    estimate, lme4's checks as :class:`~streamlmm.checks.FitWarning` s, and the scaled
    residual quantiles from the reservoir. Where no finite estimates exist at θ (too few
    events), the last finite ones (``last_good``) are kept and the snapshot says it is
    not converged. Returns ``(snapshot, last_good)``, the latter updated.
    """
    from streamlmm import checks
    from streamlmm.snapshot import Snapshot

    st, f = parts.stats, parts.design
    G = st.n_groups
    est = None
    if prob is not None and theta is not None:
        pr = prob.profile(theta)
        if pr is not None:
            est = estimates_at(prob, pr)
            if not (np.all(np.isfinite(est.b)) and math.isfinite(est.sigma2)):
                est = None
    if est is not None:
        good = {
            "names": f.fixed,
            "fixef": est.fixef,
            "vcov": est.vcov,
            "theta": est.theta,
            "re_cov": est.re_cov,
            "sigma2": est.sigma2,
            "criterion": est.criterion,
            "keep": est.keep,
        }
        last_good = good
        b, condvar, b_np, b_np_se = est.b, est.condvar, est.b_np, est.b_np_se
    else:
        good = _reindexed(last_good, f.fixed)
        if good is None:
            nan = math.nan
            good = {
                "fixef": np.full(f.p, nan),
                "vcov": np.full((f.p, f.p), nan),
                "theta": np.full(len(theta_index(f.blocks, f.q)[0]), nan),
                "re_cov": np.full((f.q, f.q), nan),
                "sigma2": nan,
                "criterion": nan,
                "keep": np.ones(f.p, dtype=bool),
                "names": f.fixed,
            }
        b = np.zeros((G, f.q))
        condvar = np.broadcast_to(good["re_cov"], (G, f.q, f.q)).copy()
        b_np = b_np_se = np.full((G, f.q), math.nan)
    lam_u = np.zeros((f.q, f.q))
    lam_u[theta_index(f.blocks, f.q)] = good["theta"]
    singular = bool(np.any(np.diag(lam_u) < SINGULAR_TOL))
    dropped = tuple(name for name, k in zip(f.fixed, good["keep"]) if not k)
    warns = checks.fit_messages(
        group=f.formula.group,
        n_obs=st.n_obs,
        n_groups=G,
        q=f.q,
        re_names=f.random,
        dropped=dropped,
        singular=singular and est is not None,
        summary=parts.summary,
        fixed_sd=parts.colinfo.get("sd", {}),
    )
    if est is None and G:
        warns.append(
            "no finite estimates at the current data (too few observations, or the "
            "criterion is undefined): the snapshot keeps the last finite ones"
        )
    checks.warn_all(warns, stacklevel=4)  # the caller of the model's snapshot()
    identified = not any("refuses" in w for w in warns)
    res = parts.reservoir
    rq = {}
    if res is not None and res.size and est is not None:
        rq = residual_quantiles(res, f, est.fixef, est.b, math.sqrt(good["sigma2"]))
    snap = Snapshot(
        formula=parts.formula,
        method=parts.method,
        fixef=dict(zip(f.fixed, good["fixef"])),
        fixef_se=dict(zip(f.fixed, np.sqrt(np.diag(good["vcov"])))),
        fixef_vcov=good["vcov"],
        re_cov=good["re_cov"],
        sigma=math.sqrt(good["sigma2"]),
        theta=good["theta"],
        criterion=good["criterion"],
        n_obs=st.n_obs,
        singular=singular,
        converged=bool(est is not None and parts.converged and identified),
        n_events=parts.n_events,
        keys=st.keys,
        b=b,
        condvar=condvar,
        b_np=b_np,
        b_np_se=b_np_se,
        group_n=st.counts(),
        group_ybar=st.means()[:, -1].copy(),
        re_names=f.random,
        dropped=dropped,
        warnings=warns,
        optinfo=parts.summary.to_dict() if parts.summary is not None else {},
        history=parts.history,
        resid_quantiles=rq,
        offsets=offsets,
        meta={"created": time.time(), **(meta or {})},
        design=f.to_state(),
        state=parts.state,
    )
    return snap, last_good
