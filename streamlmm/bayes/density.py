"""The log posterior of a mixed model and its gradient, from the sufficient statistics.

The group effects are integrated out in closed form (docs/bayes.md; DESIGN §10). For
fixed (β, Λ, σ), with the core's per-group factor ``L_gL_g' = Λ'ZZ_gΛ + I``::

    −2 log p(y | β, Λ, σ) = n log(2πσ²) + Σ_g 2 log|L_g| + Q(β)/σ²
    Q(β) = yy − 2β'Xy + β'XXβ − (Σ‖cu_g‖² − 2β'Σ RZX_g'cu_g + β'Σ RZX_g'RZX_g β)

exactly :func:`streamlmm.estimate.loglik`, from one pass over the groups
(:func:`streamlmm.kernels.pls_sums`' compiled chunk pass, with the gradient's sums and
without REML's). Its gradient in β is ``−[(XX − ΣRZX'RZX)β − (Xy − ΣRZX'cu)]/σ²``; in
each entry of Λ it is ``−½(∂Σlog|M_g| + ∂Q/σ²)`` with the two pieces of
:meth:`streamlmm.estimate.Problem.gradient_parts` (:func:`streamlmm.kernels.theta_parts`)
at the current β; in log σ it is ``−n + Q/σ²`` plus what comes through Λ.

**Parameters and coordinates.** The sampler moves on ``x = [θ_b (p) | log s (q) |
correlation coordinates (K(K−1)/2 per block) | log σ]``:

- ``θ_b`` are brms's fixed effects: the ``Intercept`` of the model whose fixed
  predictors are centred at their means, and the other coefficients ``b``;
- ``s`` the random-effect SDs and ``R`` (per block of Λ) the correlations, so that the
  covariance of ``b_g`` is ``Σ = diag(s) R diag(s)`` and the relative factor is
  ``Λ = diag(s) chol(R)/σ``, block by block (``||`` terms and several terms on one
  factor give a block-diagonal Λ);
- ``σ`` the residual SD. SDs and σ are ``exp`` of their coordinates, ``R`` is Stan's
  Cholesky factor through canonical partial correlations
  (:mod:`streamlmm.bayes.transforms`); the log posterior includes their log-Jacobians.

**The problem's coordinates (numerical care, docs/math.md §6).** The statistics are read
around a centre ``c``: the response and every shiftable column at its mean over the
events. Shifting a random-effect column changes Λ: the problem's factor is ``Λ̃ =
S Λ`` with ``S = T_z⁻¹ = I + e_int c_z'``, which stays lower triangular when the
intercept is the *last* column of its block, so the problem orders each block's
columns with the intercept last (the LKJ prior is exchangeable, so ordering changes no
posterior). Fixed effects map exactly: ``β̃ = A θ_b + a₀`` with ``A = I − e_int(m − c_x)'``
and ``a₀ = −c_y e_int`` (``m`` the columns' means, a Jacobian of 1), and ``b_Intercept``
(lme4's intercept) is ``Intercept − m'b``.

**The same bits from any order.** The statistics are taken with the groups in the order
of their keys and each per-group row rounded (:func:`canonical_stats`: counts and
co-moments to 2^-30 of their column's largest magnitude, means to 2^-36), so that
learning the same events in another order (Welford's updates then differ in their last
bits) gives the same log density, bit for bit, unless a value lies within that noise of
a rounding boundary: about 2^-14 odds per value on small data, more for groups of
millions of events. The rounded rows are those of an actual, slightly moved data set
(far below any posterior's width), so everything formed from them stays consistent.

Examples
--------
>>> import numpy as np
>>> from streamlmm import MixedLM
>>> m = MixedLM("y ~ x + (1 | g)")
>>> for i in range(60):
...     y = 1.0 + 0.5 * (i % 5) + (i % 6) * 0.3 + 0.1 * (i % 7)
...     m.learn_one({"g": i % 6, "x": float(i % 5)}, y)
>>> lp = LogPosterior.from_model(m, {"Intercept": "normal(2, 5)", "b": "normal(0, 5)",
...                                  "sd": "normal(0, 2)", "sigma": "exponential(1)"})
>>> lp.names
('b_Intercept', 'b_x', 'sd_g__Intercept', 'sigma')
>>> value, grad = lp.logp_grad(np.zeros(lp.n_dim))
>>> bool(np.isfinite(value)) and grad.shape == (4,)
True

"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from streamlmm import estimate, kernels
from streamlmm.bayes import priors as pri
from streamlmm.bayes.transforms import corr_cholesky, corr_cholesky_grad, n_corr
from streamlmm.formula import INTERCEPT

__all__ = ["LogPosterior", "canonical", "ROUND_BITS", "log_posterior", "constrain_draws"]

ROUND_BITS = 30  # counts and co-moments (relative to their column's largest)
MEAN_BITS = 36  # means (relative to their column's largest magnitude)
_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}
_SUMS = {**_OPTS, "fastmath": {"contract", "arcp", "reassoc"}}
_LOG2PI = math.log(2.0 * math.pi)

# -- the packed layout --------------------------------------------------------------------------
# ix (int64): a header of offsets, then the arrays it points to; fd (float64) likewise.
_H = 24  # header length of ix
# ix header slots
_P, _Q, _NTH, _NBLK, _NDIM, _G = 0, 1, 2, 3, 4, 5
_O_ROWS, _O_COLS, _O_BSTART, _O_BSIZE, _O_BCOR = 6, 7, 8, 9, 10
_O_XX, _O_XY, _O_YY, _O_A, _O_A0, _O_S, _O_PRI, _O_ETA, _O_LKJ = 11, 12, 13, 14, 15, 16, 17, 18, 19
_XINT = 20  # the intercept's position among the fixed columns (-1: none)


_PHI = 0.6180339887498949  # the grid's offset, in steps (see canonical)


def canonical(
    a: np.ndarray, bits: int | None = None, axis: int | None = 0, shift: bool = True
) -> np.ndarray:
    """``a`` rounded to the nearest point of a grid of step ``2^(e − bits)``, where
    ``2^e`` bounds the largest magnitude along ``axis`` (per column for ``axis=0``;
    ``None``: the whole array). With ``shift`` the grid is offset by an irrational
    fraction of a step (``(k + φ)·step``), so that the midpoints between grid points are
    never dyadic rationals: values that are exact fractions (means of indicator columns
    over 2^k events) never sit on a tie, where the last bits of an order-dependent sum
    would decide. Without it, 0 stays 0 (co-moments of a one-event group).

    >>> a = np.array([[1.0 + 2**-40, 3.0], [2.0, 3.0 - 2**-45]])
    >>> bool(np.array_equal(canonical(a), canonical(np.array([[1.0, 3.0], [2.0, 3.0]]))))
    True
    >>> float(np.max(np.abs(canonical(a) - a))) < 2.0**-29
    True

    """
    a = np.asarray(a, dtype=float)
    bits = ROUND_BITS if bits is None else bits
    if a.size == 0:
        return a.copy()
    big = np.max(np.abs(a), axis=axis, keepdims=axis is not None)
    _, e = np.frexp(np.where(big > 0, big, 1.0))
    step = np.ldexp(1.0, e - bits)
    if not shift:
        return np.round(a / step) * step
    return (np.round(a / step - _PHI) + _PHI) * step


# -- priors, compiled ---------------------------------------------------------------------------
_FLAT, _NORMAL, _STUDENT, _CAUCHY, _EXPON, _GAMMA, _LOGNORM, _UNIF = (
    pri.CODES[f]
    for f in (
        "flat",
        "normal",
        "student_t",
        "cauchy",
        "exponential",
        "gamma",
        "lognormal",
        "uniform",
    )
)


@njit(inline="always", **_OPTS)
def _prior(code, a, b, c, x):  # pragma: no cover - numba
    """The part of a prior's log density that depends on x, and its derivative."""
    if code == _NORMAL:
        z = (x - a) / b
        return -0.5 * z * z, -z / b
    if code == _STUDENT:
        r = x - b
        return -0.5 * (a + 1.0) * math.log1p(r * r / (a * c * c)), -(a + 1.0) * r / (
            a * c * c + r * r
        )
    if code == _CAUCHY:
        r = x - a
        return -math.log1p((r / b) * (r / b)), -2.0 * r / (b * b + r * r)
    if code == _EXPON:
        if x < 0.0:
            return -np.inf, 0.0
        return -a * x, -a
    if code == _GAMMA:
        if not x > 0.0:
            return -np.inf, 0.0
        return (a - 1.0) * math.log(x) - b * x, (a - 1.0) / x - b
    if code == _LOGNORM:
        if not x > 0.0:
            return -np.inf, 0.0
        lx = math.log(x)
        z = (lx - a) / b
        return -lx - 0.5 * z * z, -1.0 / x - z / (b * x)
    if code == _UNIF:
        if x < a or x > b:
            return -np.inf, 0.0
        return 0.0, 0.0
    return 0.0, 0.0


@njit(**_OPTS)
def _prior_kernel(code, a, b, c, x):  # pragma: no cover - numba
    return _prior(code, a, b, c, x)


def _prior_np(d: pri.Dist, x: float) -> tuple[float, float]:
    """The compiled prior's x-dependent log density and derivative (for tests)."""
    row = _code_row(d)
    return _prior_kernel(int(row[0]), row[1], row[2], row[3], float(x))


# -- the log posterior ------------------------------------------------------------------------
@njit(inline="always", **_OPTS)
def _forward(x, fd, ix, q, s, LR, lamp, lamt, beta_t):  # pragma: no cover - numba
    """Constrain ``x``: SDs ``s``, the correlations' factor ``LR`` (block diagonal), Λ
    (``lamp``, the problem's column order), the problem's ``Λ̃ = SΛ`` (``lamt``) and
    ``β̃``; returns ``(σ, Σ log-Jacobians of the correlations)``."""
    p = ix[_P]
    n_dim = ix[_NDIM]
    sig = math.exp(x[n_dim - 1])
    for a in range(q):
        s[a] = math.exp(x[p + a])
    for a in range(q):
        for b in range(q):
            LR[a, b] = 0.0
    lj = 0.0
    off = p + q
    nb = ix[_NBLK]
    for k in range(nb):
        st = ix[ix[_O_BSTART] + k]
        K = ix[ix[_O_BSIZE] + k]
        if ix[ix[_O_BCOR] + k] == 0:
            for a in range(K):
                LR[st + a, st + a] = 1.0
            continue
        lj += corr_cholesky(x, off, K, LR, st)
        off += K * (K - 1) // 2
    for a in range(q):
        for b in range(q):
            lamp[a, b] = s[a] * LR[a, b] / sig
    oS = ix[_O_S]
    for a in range(q):
        for b in range(q):
            t = 0.0
            for c in range(q):
                t += fd[oS + a * q + c] * lamp[c, b]
            lamt[a, b] = t
    oA = ix[_O_A]
    oa0 = ix[_O_A0]
    for i in range(p):
        t = fd[oa0 + i]
        for j in range(p):
            t += fd[oA + i * p + j] * x[j]
        beta_t[i] = t
    return sig, lj


@njit(inline="always", **_SUMS)
def log_posterior(x, g, Fb, fd, ix, q):  # pragma: no cover - numba
    """The log posterior at ``x`` (all constants included); its gradient into ``g``.

    ``Fb`` are the problem's blocks in the blocked layout (:func:`kernels.by_block`),
    ``fd``/``ix`` the packed model (:meth:`LogPosterior.pack`), ``q`` the number of
    random-effect columns (a compile-time constant in the compiled entry points).
    """
    p = ix[_P]
    n_dim = ix[_NDIM]
    s = np.empty(q)
    LR = np.empty((q, q))
    lamp = np.empty((q, q))
    lamt = np.empty((q, q))
    beta_t = np.empty(p)
    sig, lj = _forward(x, fd, ix, q, s, LR, lamp, lamt, beta_t)
    for i in range(n_dim):
        g[i] = 0.0
    lp = fd[ix[_O_LKJ]] + lj  # the priors' and LKJ's normalising constants
    # priors on θ_b, s (truncated at 0: their coordinate is log s), σ
    oP = ix[_O_PRI]
    for i in range(p + q):
        r = oP + 4 * i
        v = x[i] if i < p else s[i - p]
        val, d = _prior(int(fd[r]), fd[r + 1], fd[r + 2], fd[r + 3], v)
        if i < p:
            lp += val
            g[i] += d
        else:
            lp += val + x[i]
            g[i] += d * v + 1.0
    r = oP + 4 * (p + q)
    val, d = _prior(int(fd[r]), fd[r + 1], fd[r + 2], fd[r + 3], sig)
    lp += val + x[n_dim - 1]
    g[n_dim - 1] += d * sig + 1.0
    # LKJ on each correlation block: Σ_{i ≥ 1} (K − i − 3 + 2η) log L_ii
    gLR = np.zeros((q, q))
    nb = ix[_NBLK]
    for k in range(nb):
        if ix[ix[_O_BCOR] + k] == 0:
            continue
        st = ix[ix[_O_BSTART] + k]
        K = ix[ix[_O_BSIZE] + k]
        eta = fd[ix[_O_ETA] + k]
        for i in range(1, K):
            coef = K - i - 3.0 + 2.0 * eta
            lp += coef * math.log(LR[st + i, st + i])
            gLR[st + i, st + i] += coef / LR[st + i, st + i]
    if not math.isfinite(lp):
        return lp
    # the likelihood: one pass over the groups
    nblocks = Fb.shape[0]
    per = kernels.CHUNK // kernels.BLOCK
    nch = (nblocks + per - 1) // per
    size = 2 + p * p + p + q * q + 2 * (q * (p + 1)) ** 2
    parts = np.zeros((max(nch, 1), size))
    for ch in range(nch):
        kernels._eval_chunk(Fb, ch * per, min(nblocks, (ch + 1) * per), q, p, lamt, 1, parts[ch])
    logdet, cu2, Asum, csum, T, WY, _ = kernels._sums(parts, q, p, 1)
    oXX = ix[_O_XX]
    oXy = ix[_O_XY]
    oyy = ix[_O_YY]
    yy = fd[oyy]
    n = fd[oyy + 1]
    Q = yy - cu2
    for i in range(p):
        Q += 2.0 * beta_t[i] * (csum[i] - fd[oXy + i])
        for j in range(p):
            Q += beta_t[i] * (fd[oXX + i * p + j] - Asum[i, j]) * beta_t[j]
    sig2 = sig * sig
    lp += -0.5 * (n * (_LOG2PI + 2.0 * x[n_dim - 1]) + 2.0 * logdet + Q / sig2)
    # ∂/∂β̃, then θ_b = A'∂β̃
    gb = np.empty(p)
    for i in range(p):
        t = fd[oXy + i] - csum[i]
        for j in range(p):
            t -= (fd[oXX + i * p + j] - Asum[i, j]) * beta_t[j]
        gb[i] = t / sig2
    oA = ix[_O_A]
    for j in range(p):
        t = 0.0
        for i in range(p):
            t += fd[oA + i * p + j] * gb[i]
        g[j] += t
    # ∂/∂ log σ, explicit
    gsig = -n + Q / sig2
    # ∂/∂Λ̃ from the core's pieces at β̃: −½(∂Σlog|M| + ∂Q/σ²)
    nth = ix[_NTH]
    rows = ix[ix[_O_ROWS] : ix[_O_ROWS] + nth]
    cols = ix[ix[_O_COLS] : ix[_O_COLS] + nth]
    G3 = kernels.contract_g3(WY, beta_t, q)
    dM, _, dr2 = kernels.theta_parts(T, G3, G3, rows, cols)  # (the RX piece is unused)
    D = np.zeros((q, q))
    for t in range(nth):
        D[rows[t], cols[t]] = -0.5 * (dM[t] + dr2[t] / sig2)
    # Λ̃ = SΛ: ∂/∂Λ = S'D; Λ[a, b] = s_a LR[a, b]/σ
    oS = ix[_O_S]
    for t in range(nth):
        a = rows[t]
        b = cols[t]
        dp = 0.0
        for i in range(q):
            dp += fd[oS + i * q + a] * D[i, b]
        w = dp * lamp[a, b]
        g[p + a] += w
        gsig -= w
        gLR[a, b] += dp * s[a] / sig
    g[n_dim - 1] += gsig
    off = p + q
    for k in range(nb):
        if ix[ix[_O_BCOR] + k] == 0:
            continue
        st = ix[ix[_O_BSTART] + k]
        K = ix[ix[_O_BSIZE] + k]
        corr_cholesky_grad(x, off, K, gLR, st, g)
        off += K * (K - 1) // 2
    return lp


@njit(**_SUMS)
def logp_q1(x, g, Fb, fd, ix):  # pragma: no cover - numba
    """:func:`log_posterior` for q = 1."""
    return log_posterior(x, g, Fb, fd, ix, 1)


@njit(**_SUMS)
def logp_q2(x, g, Fb, fd, ix):  # pragma: no cover - numba
    """:func:`log_posterior` for q = 2."""
    return log_posterior(x, g, Fb, fd, ix, 2)


@njit(**_SUMS)
def logp_q3(x, g, Fb, fd, ix):  # pragma: no cover - numba
    """:func:`log_posterior` for q = 3."""
    return log_posterior(x, g, Fb, fd, ix, 3)


@njit(**_SUMS)
def logp_qn(x, g, Fb, fd, ix):  # pragma: no cover - numba
    """:func:`log_posterior` for any q (read from ``ix``)."""
    return log_posterior(x, g, Fb, fd, ix, ix[_Q])


LOGP = {1: logp_q1, 2: logp_q2, 3: logp_q3}


def logp_kernel(q: int):
    """The compiled log posterior for ``q`` random-effect columns."""
    return LOGP.get(int(q), logp_qn)


@njit(**_OPTS)
def constrain_draws(X, fd, ix):  # pragma: no cover - numba
    """For every row of ``X`` (unconstrained draws): ``(θ_b, s, LR, σ, Λ̃, β̃)``."""
    D = X.shape[0]
    p = ix[_P]
    q = ix[_Q]
    S = np.empty((D, q))
    LRs = np.empty((D, q, q))
    sig = np.empty(D)
    lamt = np.empty((D, q, q))
    bt = np.empty((D, p))
    lamp = np.empty((q, q))
    for d in range(D):
        sig[d], _ = _forward(X[d], fd, ix, q, S[d], LRs[d], lamp, lamt[d], bt[d])
    return X[:, :p].copy(), S, LRs, sig, lamt, bt


# -- the model's log posterior -------------------------------------------------------------------
class LogPosterior:
    """The log posterior of a model's global parameters at its current statistics.

    Build it with :meth:`from_model`. ``names`` are brms's names of the parameters
    (``b_Intercept`` for the Intercept coordinate, reported back-transformed);
    ``n_dim`` the sampler's dimension; :meth:`logp_grad` the density and gradient
    (compiled, one pass over the groups); :meth:`pack` the arrays the compiled entry
    points read; :meth:`constrain` the parameters of draws in the user's terms.
    """

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_model(
        cls, model, priors: Mapping[str, str] | None = None, *, resolved=None
    ) -> LogPosterior:
        """The log posterior of ``model`` (a :class:`~streamlmm.MixedLM`) with ``priors``
        (brms keys → Stan strings; missing classes get brms's defaults)."""
        design, stats = model._design, model._stats
        stats.decay_to_now()
        G = stats.n_groups
        if G == 0 or not stats.n_obs > 0:
            raise ValueError("the model has learned no events yet: nothing to sample")
        f = design.formula
        stats = canonical_stats(stats)
        c, means = _centre(stats, design)
        perm = _intercept_last(design)
        spec = types.SimpleNamespace(
            xi=np.asarray(design.xi),
            zi=np.asarray(design.zi)[perm],
            columns=design.columns,
            blocks=design.blocks,
        )
        prob, _ = estimate.make_problem(stats, spec, False, center=c)
        if not prob.keep.all():
            dropped = [n for n, k in zip(design.fixed, prob.keep) if not k]
            raise ValueError(
                "the fixed effects are rank deficient (aliased: "
                + ", ".join(dropped)
                + "): drop them from the formula before sampling"
            )
        prob = dataclasses.replace(prob, parallel=False)
        has_int = bool(f.fixed_intercept) and prob.xint >= 0
        params = pri.model_params(design.fixed, design.random, design.blocks, f.group, has_int)
        if resolved is None:
            res = model._res
            response = None
            if res is not None and res.size:
                response = (res.y[: res.size], res.count[: res.size], res.n_seen)
            resolved = pri.resolve(priors, params, response=response, n_groups=G)
        p, q = prob.p, prob.q
        cx = c[prob.xi]
        mx = means[prob.xi]
        A = np.eye(p)
        a0 = np.zeros(p)
        if has_int:
            d = mx - cx
            d[prob.xint] = 0.0
            A[prob.xint] -= d
            a0[prob.xint] = -c[-1]
        S = 2.0 * np.eye(q) - prob.Tz()  # T_z⁻¹ = I + e_int c_z' (c_z[int] = 0)
        return cls(
            model_formula=model.formula,
            design=design,
            group=f.group,
            keys=list(stats.keys),
            prob=prob,
            perm=perm,
            centre=c,
            means=mx,
            A=A,
            a0=a0,
            S=S,
            has_intercept=has_int,
            params=params,
            priors=resolved,
            n_events=model.n_events,
        )

    # -- structure --------------------------------------------------------------------------
    @property
    def p(self) -> int:
        return self.prob.p

    @property
    def q(self) -> int:
        return self.prob.q

    @property
    def blocks(self) -> tuple:
        """Λ's blocks, as positions in the problem's column order."""
        return self.prob.blocks

    @property
    def n_cor(self) -> int:
        return sum(n_corr(len(b)) for b in self.blocks)

    @property
    def n_dim(self) -> int:
        return self.p + self.q + self.n_cor + 1

    @property
    def names(self) -> tuple[str, ...]:
        """brms's names of the scalar parameters: fixed effects, SDs, correlations, σ."""
        return tuple(self.fixed_names + self.sd_names + self.cor_names + ["sigma"])

    @property
    def fixed_names(self) -> list[str]:
        return [p.name for p in self.params if p.cls in ("Intercept", "b")]

    @property
    def sd_names(self) -> list[str]:
        return [p.name for p in self.params if p.cls == "sd"]

    @property
    def cor_names(self) -> list[str]:
        """``cor_<group>__<c1>__<c2>`` for each pair within a correlated block (the
        user's column order)."""
        out = []
        for blk in self.design.blocks:
            for j, a in enumerate(blk):
                for b in blk[j + 1 :]:
                    ca = pri.brms_coef(self.design.random[a])
                    cb = pri.brms_coef(self.design.random[b])
                    out.append(f"cor_{self.group}__{ca}__{cb}")
        return out

    @property
    def re_names(self) -> tuple[str, ...]:
        """The random-effect coefficients in the user's order (lme4's names)."""
        return tuple(self.design.random)

    # -- packing --------------------------------------------------------------------------
    def pack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Fb, fd, ix)``: the blocks in the blocked layout, and the packed floats and
        ints that the compiled density reads (offsets in ``ix``'s header)."""
        cache = self.__dict__.get("_packed")
        if cache is not None:
            return cache
        prob, p, q = self.prob, self.p, self.q
        rows, cols = prob.tindex
        starts = [b[0] for b in self.blocks]
        sizes = [len(b) for b in self.blocks]
        cor = [int(len(b) > 1) for b in self.blocks]
        by_name = self.priors.by_name()
        # one prior row per coordinate of θ_b and s (problem order), then σ
        prow = []
        const = 0.0
        fixed = [pp for pp in self.params if pp.cls in ("Intercept", "b")]
        sds = [pp for pp in self.params if pp.cls == "sd"]
        for pp in fixed:
            d = by_name[pp.name]
            prow.append(_code_row(d))
            const += pri.log_norm(d, False) if d.family != "flat" else 0.0
        for a in range(q):
            d = by_name[sds[self.perm[a]].name]
            prow.append(_code_row(d))
            const += pri.log_norm(d, True) if d.family != "flat" else 0.0
        d = by_name["sigma"]
        prow.append(_code_row(d))
        const += pri.log_norm(d, True) if d.family != "flat" else 0.0
        etas = []
        cors = [pp for pp in self.params if pp.cls == "cor"]
        ci = 0
        for b in self.blocks:
            if len(b) > 1:
                eta = by_name[f"cor_{cors[ci].group}__{cors[ci].coef}"].args[0]
                ci += 1
                const += pri.lkj_log_norm(len(b), eta)
                etas.append(eta)
            else:
                etas.append(1.0)
        fl: list[np.ndarray] = []
        off = {"n": 0}

        def put(a) -> int:
            a = np.ravel(np.asarray(a, dtype=float))
            o = off["n"]
            fl.append(a)
            off["n"] += a.shape[0]
            return o

        oXX = put(prob.XX)
        oXy = put(prob.Xy)
        oyy = put([prob.yy, prob.n])
        oA = put(self.A)
        oa0 = put(self.a0)
        oS = put(self.S)
        oP = put(np.array(prow))
        oC = put([const])
        oE = put(etas)
        fd = np.ascontiguousarray(np.concatenate(fl))
        il = [np.zeros(_H, dtype=np.int64)]
        ioff = {"n": _H}

        def iput(a) -> int:
            a = np.asarray(a, dtype=np.int64).ravel()
            o = ioff["n"]
            il.append(a)
            ioff["n"] += a.shape[0]
            return o

        h = il[0]
        h[_P], h[_Q], h[_NTH], h[_NBLK], h[_NDIM] = p, q, rows.shape[0], len(starts), self.n_dim
        h[_G] = prob.n_groups
        h[_O_ROWS] = iput(rows)
        h[_O_COLS] = iput(cols)
        h[_O_BSTART] = iput(starts)
        h[_O_BSIZE] = iput(sizes)
        h[_O_BCOR] = iput(cor)
        h[_O_XX], h[_O_XY], h[_O_YY], h[_O_A], h[_O_A0], h[_O_S] = oXX, oXy, oyy, oA, oa0, oS
        h[_O_PRI], h[_O_ETA], h[_O_LKJ] = oP, oE, oC
        h[_XINT] = prob.xint if self.has_intercept else -1
        ix = np.ascontiguousarray(np.concatenate(il))
        Fb = prob.Fb
        self.__dict__["_packed"] = (Fb, fd, ix)
        return Fb, fd, ix

    # -- evaluation -------------------------------------------------------------------------
    def logp_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """The log posterior at ``x`` and its gradient (compiled; one pass over the groups)."""
        Fb, fd, ix = self.pack()
        x = np.ascontiguousarray(x, dtype=float)
        if x.shape != (self.n_dim,):
            raise ValueError(f"x must have {self.n_dim} entries, got shape {x.shape}")
        g = np.empty(self.n_dim)
        lp = logp_kernel(self.q)(x, g, Fb, fd, ix)
        return float(lp), g

    def constrain(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """The parameters of unconstrained draws ``X`` (rows), in the user's terms:
        ``beta`` (lme4's fixed effects, ``b_Intercept`` back-transformed), ``theta_b``
        (brms's coordinates: the centred ``Intercept``), ``sd`` and ``cor`` (R, the
        user's column order), ``sigma``; and, for the group effects, the problem's
        ``lam`` (Λ̃) and ``beta_t`` (β̃)."""
        Fb, fd, ix = self.pack()
        X = np.ascontiguousarray(np.atleast_2d(X), dtype=float)
        theta_b, s, LR, sig, lamt, bt = constrain_draws(X, fd, ix)
        inv = np.argsort(self.perm)  # user position → problem position
        sd = s[:, inv]
        R = np.einsum("dij,dkj->dik", LR, LR)[:, inv][:, :, inv]
        beta = bt @ self.prob.Tx().T
        if self.has_intercept:
            beta[:, self.prob.xint] += self.centre[-1]
        return {
            "beta": beta,
            "theta_b": theta_b,
            "sd": sd,
            "cor": R,
            "sigma": sig,
            "lam": lamt,
            "beta_t": bt,
        }

    def flat(self, par: Mapping[str, np.ndarray]) -> np.ndarray:
        """The named scalar parameters (:attr:`names`) of :meth:`constrain`'s output, as
        columns: fixed effects (lme4's, b_Intercept back-transformed), SDs, correlations
        (pairs within blocks, user order), σ."""
        cols = [par["beta"], par["sd"]]
        for blk in self.design.blocks:
            for j, a in enumerate(blk):
                for b in blk[j + 1 :]:
                    cols.append(par["cor"][:, a, b][:, None])
        cols.append(par["sigma"][:, None])
        return np.concatenate(cols, axis=1)

    def unconstrain(
        self, beta: np.ndarray, sd: np.ndarray, cor: np.ndarray, sigma: float
    ) -> np.ndarray:
        """The sampler's coordinates of one point given in the user's terms (lme4's β,
        SDs and correlation matrix in the user's column order, σ); SDs and correlations
        on their boundary are moved just inside."""
        from streamlmm.bayes.transforms import unconstrained_from_corr

        beta = np.asarray(beta, dtype=float)
        x = np.empty(self.n_dim)
        p, q = self.p, self.q
        # θ_b: Intercept = β₀ + m'b
        tb = beta.copy()
        if self.has_intercept:
            k = self.prob.xint
            tb[k] = beta[k] + sum(self.means[j] * beta[j] for j in range(p) if j != k)
        x[:p] = tb
        sdp = np.maximum(np.asarray(sd, dtype=float)[self.perm], 1e-8)
        x[p : p + q] = np.log(sdp)
        Rp = np.asarray(cor, dtype=float)[np.ix_(self.perm, self.perm)]
        o = p + q
        for b in self.blocks:
            if len(b) > 1:
                ix = np.ix_(b, b)
                w, U = np.linalg.eigh(Rp[ix])
                Rb = (U * np.clip(w, 1e-6, None)) @ U.T
                dd = np.sqrt(np.diag(Rb))
                x[o : o + n_corr(len(b))] = unconstrained_from_corr(Rb / np.outer(dd, dd))
                o += n_corr(len(b))
        x[-1] = math.log(max(float(sigma), 1e-8))
        return x


def _code_row(d: pri.Dist) -> list[float]:
    a = list(d.args) + [0.0] * (3 - len(d.args))
    return [float(pri.CODES[d.family]), *a[:3]]


def _key_order(key) -> tuple:
    """A total order on group keys: ints before strings, each by value."""
    return (1, key) if isinstance(key, str) else (0, key)


def canonical_stats(stats):
    """A copy of the statistics with the groups in the order of their keys and every
    row rounded (:func:`canonical`): counts and centred co-moments to ``2^-ROUND_BITS``
    of their column's largest magnitude (0 stays 0), means to ``2^-MEAN_BITS`` of
    theirs. Learning the same events in another order changes only the last bits of
    the rows (Welford's updates round differently), which this removes, unless a value
    lies within that noise of a rounding boundary (about ``2^-14`` odds per value on
    small data, more for very large groups); the change to the data is far below any
    posterior's width, and the rounded rows are those of an actual (slightly moved)
    data set, so every quantity formed from them stays consistent."""
    st = stats.copy()
    st.decay_to_now()
    G = st.n_groups
    order = sorted(range(G), key=lambda r: _key_order(st.keys[r]))
    M = st.M[:G][order]
    m = st.m
    M[:, :1] = canonical(M[:, :1], shift=False)
    M[:, 1 : 1 + m] = canonical(M[:, 1 : 1 + m], bits=MEAN_BITS)
    M[:, 1 + m :] = canonical(M[:, 1 + m :], shift=False)
    st.M = np.ascontiguousarray(M)
    if st.half_life:
        st.tg = st.tg[order].copy()
    st.keys = [st.keys[r] for r in order]
    st.index = {k: i for i, k in enumerate(st.keys)}
    return st


def _centre(stats, design) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``c`` (each shiftable column and the response at its mean over the
    events, 0 elsewhere) and every union column's mean (the intercept's is 1)."""
    k = stats.k
    n = stats.counts()
    mu = stats.means()
    tot = float(np.sum(n))
    col = np.ones(k + 1)  # the intercept's mean is 1
    for i in range(k + 1):
        v = stats.vpos[i]
        if v >= 0:
            col[i] = float(np.sum(n * mu[:, v]) / tot)
    mask = np.asarray(design.shiftable, dtype=bool)
    c = np.where(mask & (stats.vpos >= 0), col, 0.0)
    return c, col[:k]


def _intercept_last(design) -> np.ndarray:
    """The problem's order of the random columns: each block's columns with the
    intercept moved last (``perm[a]`` is the user position of problem column ``a``)."""
    perm = []
    for blk in design.blocks:
        cols = list(blk)
        ints = [a for a in cols if design.random[a] == INTERCEPT]
        perm.extend([a for a in cols if a not in ints] + ints)
    return np.array(perm, dtype=np.int64)
