"""Prior and posterior predictive simulation at given design rows.

The sufficient statistics cannot simulate a data set: a predictive check needs rows to
simulate at (the model's reservoir of events, or any rows the user gives). For each
parameter draw ``(β, Σ = diag(s) R diag(s), σ)`` and each row ``e`` of group ``g``::

    y_rep = x_e'β + z_e'b_g + σ ε,   ε ~ N(0, 1)

with ``b_g`` drawn once per draw and group: from the prior ``N(0, Σ)`` (prior
predictive, and a group the posterior has not seen), or exactly from its conditional
given the draw (posterior predictive, :func:`streamlmm.bayes.groups.draws`).

Prior draws: ``sd`` and ``sigma`` from their priors truncated at 0 (inverse CDF), a
correlation matrix from LKJ(η) through its independent canonical partial correlations
(Beta(β_l, β_l) on (−1, 1), ``β_l = η + (K − 2 − l)/2``: :func:`lkj_draws`), the fixed
effects from their priors, with brms's ``Intercept`` (centred predictors) mapped to
``b_Intercept = Intercept − m'b``. A flat prior cannot be simulated: that is a
``ValueError`` naming the parameter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamlmm.bayes import priors as pri

__all__ = ["prior_draws", "lkj_draws", "design_rows", "simulate"]


def draw_dist(d: pri.Dist, size: int, rng: np.random.Generator, *, truncate: bool, name: str):
    """``size`` draws of prior ``d`` (truncated to > 0 with ``truncate``)."""
    if d.family == "flat":
        raise ValueError(
            f"the prior of {name} is flat (improper): it cannot be simulated; give it a "
            "proper prior for a prior predictive check"
        )
    dist = pri._scipy(d)
    lo = float(dist.cdf(0.0)) if truncate and d.family not in pri.POSITIVE else 0.0
    u = lo + (1.0 - lo) * rng.uniform(size=size)
    return np.asarray(dist.ppf(np.clip(u, 1e-300, 1.0 - 1e-16)), dtype=float)


def lkj_draws(K: int, eta: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` correlation matrices (size, K, K) from LKJ(η).

    >>> R = lkj_draws(3, 2.0, 500, np.random.default_rng(1))
    >>> bool(np.allclose(np.diagonal(R, axis1=1, axis2=2), 1.0))
    True

    """
    L = np.zeros((size, K, K))
    L[:, 0, 0] = 1.0
    for i in range(1, K):
        w2 = np.ones(size)
        for col in range(i):
            b = eta + (K - 2 - col) / 2.0
            z = 2.0 * rng.beta(b, b, size=size) - 1.0
            L[:, i, col] = z * np.sqrt(w2)
            w2 = w2 * (1.0 - z * z)
        L[:, i, i] = np.sqrt(w2)
    return np.einsum("dij,dkj->dik", L, L)


def prior_draws(lp, draws: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Parameter draws from the priors of ``lp`` (a
    :class:`~streamlmm.bayes.density.LogPosterior`): ``beta`` (lme4's, b_Intercept
    back-transformed), ``sd``, ``cor`` (user order) and ``sigma``."""
    by = lp.priors.by_name()
    p, q = lp.p, lp.q
    fixed = [pp for pp in lp.params if pp.cls in ("Intercept", "b")]
    tb = (
        np.column_stack(
            [draw_dist(by[pp.name], draws, rng, truncate=False, name=pp.name) for pp in fixed]
        )
        if p
        else np.zeros((draws, 0))
    )
    beta = tb.copy()
    if lp.has_intercept:
        k = lp.prob.xint
        for j in range(p):
            if j != k:
                beta[:, k] -= lp.means[j] * tb[:, j]
    sds = [pp for pp in lp.params if pp.cls == "sd"]
    sd = np.column_stack(
        [draw_dist(by[pp.name], draws, rng, truncate=True, name=pp.name) for pp in sds]
    )
    cor = np.tile(np.eye(q), (draws, 1, 1))
    cors = [pp for pp in lp.params if pp.cls == "cor"]
    ci = 0
    for blk in lp.design.blocks:
        if len(blk) > 1:
            eta = by[f"cor_{cors[ci].group}__{cors[ci].coef}"].args[0]
            ci += 1
            ix = np.ix_(np.arange(draws), blk, blk)
            cor[ix] = lkj_draws(len(blk), eta, draws, rng)
    sigma = draw_dist(by["sigma"], draws, rng, truncate=True, name="sigma")
    return {"beta": beta, "sd": sd, "cor": cor, "sigma": sigma}


def design_rows(design, X, group: str) -> tuple[np.ndarray, list]:
    """The union columns of the rows of ``X`` (a DataFrame with the formula's fields and
    the group column) and each row's group key; a missing field is a ``ValueError``
    naming it."""
    from streamlmm.rows import RowReader

    if not hasattr(X, "columns"):
        raise ValueError(f"X must be a pandas DataFrame of rows, got {type(X).__name__}")
    if group not in X.columns:
        raise ValueError(f"field {group!r}: missing (the group column)")
    n = len(X)
    cols = {c: X[c].to_numpy() for c in X.columns}
    A = RowReader(design, None, "raise").union_columns(cols, n)
    bad = np.flatnonzero(~np.isfinite(A).all(axis=1))
    if bad.shape[0]:
        raise ValueError(f"row {int(bad[0])}: a missing or non-finite feature")
    return A, list(X[group].to_numpy())


def simulate(
    A: np.ndarray,
    design,
    par: dict[str, np.ndarray],
    b_rows: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """``y_rep`` (draws, rows) at union columns ``A`` for parameter draws ``par``
    (``beta``, ``sigma``) and each row's group effect ``b_rows`` (draws, rows, q; user
    column order)."""
    X = A[:, np.asarray(design.xi)]
    Z = A[:, np.asarray(design.zi)]
    mu = par["beta"] @ X.T + np.einsum("rq,drq->dr", Z, b_rows)
    return mu + par["sigma"][:, None] * rng.standard_normal(mu.shape)


def prior_effects(par: dict[str, Any], codes: np.ndarray, rng: np.random.Generator):
    """Group effects (draws, rows, q) drawn from ``N(0, Σ)`` per draw and distinct group
    (``codes``: each row's group index)."""
    sd, R = par["sd"], par["cor"]
    D, q = sd.shape
    S = sd[:, :, None] * R * sd[:, None, :]
    w, U = np.linalg.eigh(S)  # Σ may be singular (a correlation of ±1)
    L = U * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
    n_groups = int(codes.max()) + 1 if codes.shape[0] else 0
    z = rng.standard_normal((D, n_groups, q))
    b = np.einsum("dij,dgj->dgi", L, z)
    return b[:, codes]
