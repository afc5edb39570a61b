"""The sampler against the exact posterior of a random-intercept model (no MCMC).

With Gaussian priors on brms's ``Intercept`` (the intercept of the mean-centred
predictors) and ``b``, the fixed effects integrate out analytically: for given (sd, σ),
``y ~ N(X_c m₀, Σ + X_c S₀ X_c')`` with ``Σ = σ²I + sd² ZZ'``. The posterior of
(log sd, log σ) is then a 2-d density, integrated here on a fine grid, and β's
posterior is the grid's mixture of Gaussians. Everything is computed from the raw rows
with dense per-group algebra (``Σ_g = σ²I + sd²11'``), independently of the statistics
and of the package's log density. The sampler's means must be within 4 MCSE, its SDs
within 10%, and its 5% and 95% quantiles within 4 MCSE (ArviZ's) of the exact ones.

Takes about 10 s (two models, 4 chains × 2,000 draws each, and the grids).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr

from streamlmm import MixedLM

PRIORS = {
    "Intercept": "normal(3, 4)",
    "b": "normal(0, 2)",
    "sd": "normal(0, 1.5)",
    "sigma": "exponential(1)",
}


def _data(seed: int, G: int, sizes, sd_true: float):
    rng = np.random.default_rng(seed)
    g = np.concatenate([np.full(n, i) for i, n in enumerate(sizes[:G])])
    x = rng.normal(1.0, 2.0, g.shape[0])
    u = rng.normal(0.0, sd_true, G)
    y = 2.0 + 0.4 * x + u[g] + rng.normal(0.0, 1.2, g.shape[0])
    return g, x, y


def _exact(g, x, y, n_sd: int = 480, n_sigma: int = 240):
    """Exact posterior moments and quantiles by grid integration over (log sd, log σ)."""
    xc = x - x.mean()
    X = np.column_stack([np.ones_like(x), xc])  # brms's centred design
    m0 = np.array([3.0, 0.0])
    S0inv = np.diag([1 / 4.0**2, 1 / 2.0**2])
    groups = np.unique(g)
    ng = np.array([np.sum(g == k) for k in groups], float)
    Sx = np.array([X[g == k].sum(0) for k in groups])  # (G, 2)
    r = y - X @ m0
    Sr = np.array([r[g == k].sum() for k in groups])
    XX = X.T @ X
    Xr = X.T @ r
    rr = r @ r
    n = y.shape[0]

    def logpost(ls, lsig):
        sd2, s2 = np.exp(2 * ls), np.exp(2 * lsig)
        w = sd2 / (s2 + ng * sd2)  # (G,) per grid point via broadcasting
        # Σ⁻¹ = (I − w 11')/σ² per group
        XSX = (XX - np.einsum("g,gi,gj->ij", w, Sx, Sx)) / s2
        XSr = (Xr - np.einsum("g,gi,g->i", w, Sx, Sr)) / s2
        rSr = (rr - np.sum(w * Sr * Sr)) / s2
        logdet_S = (n - len(groups)) * np.log(s2) + np.sum(np.log(s2 + ng * sd2))
        P = S0inv + XSX
        sol = np.linalg.solve(P, XSr)
        ll = -0.5 * (
            n * np.log(2 * np.pi)
            + logdet_S
            - np.log(np.linalg.det(S0inv))
            + np.log(np.linalg.det(P))
            + rSr
            - XSr @ sol
        )
        sd, sig = np.exp(ls), np.exp(lsig)
        lprior = (
            -0.5 * (sd / 1.5) ** 2 - sig
        )  # half-normal(1.5) and exponential(1), up to constants
        mean = m0 + sol
        cov = np.linalg.inv(P)
        return ll + lprior + ls + lsig, mean, cov  # + the Jacobian of the log coordinates

    # log sd reaches far down: near sd = 0 the density in log sd falls off only like sd
    ls_grid = np.linspace(np.log(1e-7), np.log(6.0), n_sd)
    lsig_grid = np.linspace(np.log(0.6), np.log(2.4), n_sigma)
    LP = np.empty((n_sd, n_sigma))
    M = np.empty((n_sd, n_sigma, 2))
    C = np.empty((n_sd, n_sigma, 2, 2))
    for i, a in enumerate(ls_grid):
        for j, b in enumerate(lsig_grid):
            LP[i, j], M[i, j], C[i, j] = logpost(a, b)
    W = np.exp(LP - LP.max())
    W /= W.sum()
    edge = max(W[0].sum(), W[-1].sum(), W[:, 0].sum(), W[:, -1].sum())
    assert edge < 1e-6, "the grid must hold the whole posterior"
    # b_Intercept = Intercept − x̄ b: a linear map of the Gaussian (Intercept, b)
    T = np.array([[1.0, -x.mean()], [0.0, 1.0]])
    Mu = M @ T.T
    Cu = np.einsum("ij,abjk,lk->abil", T, C, T)
    w = W.ravel()
    out = {}
    for k, name in enumerate(["b_Intercept", "b_x"]):
        mu = Mu[..., k].ravel()
        var = Cu[..., k, k].ravel()
        mean = np.sum(w * mu)
        sd = np.sqrt(np.sum(w * (var + mu**2)) - mean**2)
        qs = [_mixture_q(w, mu, np.sqrt(var), p) for p in (0.05, 0.95)]
        out[name] = (mean, sd, *qs)
    for name, grid, marg in (
        ("sd_g__Intercept", ls_grid, W.sum(1)),
        ("sigma", lsig_grid, W.sum(0)),
    ):
        v = np.exp(grid)
        mean = np.sum(marg * v)
        sd = np.sqrt(np.sum(marg * v * v) - mean**2)
        cdf = np.cumsum(marg) - marg / 2  # cell masses at the grid points
        qs = [float(np.exp(np.interp(p, cdf, grid))) for p in (0.05, 0.95)]
        out[name] = (mean, sd, *qs)
    return out


def _mixture_q(w, mu, sd, p):
    lo, hi = float(np.min(mu - 10 * sd)), float(np.max(mu + 10 * sd))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.sum(w * ndtr((mid - mu) / sd)) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize(
    ("seed", "G", "sd_true", "target_accept"),
    # an informative case, and one with few groups and sd near 0 (skewed; the intercept's
    # spread grows with sd there, which takes a smaller step: target_accept 0.9)
    [(11, 12, 0.8, 0.8), (5, 6, 0.3, 0.9)],
)
def test_sampler_matches_the_exact_posterior(seed, G, sd_true, target_accept):
    import arviz as az

    sizes = [3, 25, 8, 14, 5, 30, 9, 2, 17, 11, 6, 20]
    g, x, y = _data(seed, G, sizes, sd_true)
    m = MixedLM("y ~ x + (1 | g)")
    m.learn_many(pd.DataFrame({"g": g, "x": x}), pd.Series(y))
    post = m.sample(
        PRIORS, chains=4, draws=2000, warmup=1000, seed=seed, target_accept=target_accept
    )
    assert not post.warnings, post.warnings
    s = post.summary()
    exact = _exact(g, x, y)
    dt = post.to_arviz()
    for name, (mean, sd, q05, q95) in exact.items():
        got = s.loc[name]
        assert abs(got["mean"] - mean) < 4 * got["mcse_mean"], (name, got["mean"], mean)
        assert abs(got["sd"] / sd - 1) < 0.10, (name, got["sd"], sd)
        for p, want in ((0.05, q05), (0.95, q95)):
            draws = np.asarray(dt["posterior"][name].values)
            est = float(np.quantile(draws, p))
            mcse = float(az.mcse(dt, var_names=[name], method="quantile", prob=p)[name])
            assert abs(est - want) < 4 * mcse, (name, p, est, want, mcse)
