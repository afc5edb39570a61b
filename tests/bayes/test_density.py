"""The log posterior: gradient against finite differences, the likelihood against the
core's ``estimate.loglik`` and an independent dense computation, the coordinates'
maps (about 15 s, mostly loading kernels for four q)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, estimate
from streamlmm.bayes import priors as pri
from streamlmm.bayes.density import LogPosterior, canonical
from streamlmm.bayes.transforms import corr_from_unconstrained

FORMULAS = [
    "y ~ x + (1 | g)",
    "y ~ x + z + (1 + x | g)",
    "y ~ x + (1 + x || g)",
    "y ~ 0 + x + z + (1 + x | g)",
    "y ~ x + f + (1 + x + z | g)",
    "y ~ x + (1 + x + z + w | g)",
    "y ~ x + (1 | g) + (0 + z + w | g)",
    "y ~ x + (0 + x | g)",
]
PRIORS = {
    "b": "normal(0, 3)",
    "sd": "student_t(4, 0, 2)",
    "sigma": "lognormal(0, 1)",
}


def _frame(n=300, G=10, seed=1, shift=0.0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(
        {
            "g": [f"k{i}" for i in rng.integers(0, G, n)],
            "x": rng.normal(3.0 + shift, 2.0, n),
            "z": rng.normal(size=n),
            "w": rng.normal(-1.0, 0.5, n),
            "f": rng.choice(["a", "b", "c"], n),
        }
    )
    gi = X["g"].str[1:].astype(int).to_numpy()
    u = rng.normal(size=(G, 2))
    y = 5 + 0.5 * X["x"] + u[gi, 0] + 0.3 * u[gi, 1] * X["x"] + X["z"] + rng.normal(size=n)
    return X, y


def _lp(formula, priors=PRIORS, **kw):
    X, y = _frame(**kw)
    m = MixedLM(formula)
    m.learn_many(X, y)
    extra = {}
    if not formula.startswith("y ~ 0") and "Intercept" not in priors:
        extra = {"Intercept": "normal(5, 10)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogPosterior.from_model(m, {**priors, **extra}), m


@pytest.mark.parametrize("formula", FORMULAS)
def test_gradient_matches_finite_differences(formula):
    correlated = any(
        len(t.terms) + t.intercept > 1 for t in MixedLM(formula)._design.formula.random_terms
    )
    lp, _ = _lp(formula, {**PRIORS, "cor": "lkj(1.5)"} if correlated else PRIORS)
    rng = np.random.default_rng(7)
    for _ in range(3):
        x0 = rng.normal(size=lp.n_dim) * 0.4
        v, g = lp.logp_grad(x0)
        assert math.isfinite(v)
        h = 1e-5
        fd = np.array(
            [
                (lp.logp_grad(x0 + h * e)[0] - lp.logp_grad(x0 - h * e)[0]) / (2 * h)
                for e in np.eye(lp.n_dim)
            ]
        )
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5 * max(1.0, np.max(np.abs(g))))


@pytest.mark.parametrize(
    "sd_prior",
    ["normal(1, 2)", "cauchy(0, 1)", "exponential(2)", "gamma(2, 1)", "uniform(0, 50)", "flat"],
)
def test_gradient_for_every_prior_family(sd_prior):
    lp, _ = _lp("y ~ x + (1 + x | g)", {**PRIORS, "sd": sd_prior, "Intercept": "cauchy(5, 4)"})
    x0 = np.linspace(-0.5, 0.5, lp.n_dim)
    _, g = lp.logp_grad(x0)
    h = 1e-5
    fd = np.array(
        [
            (lp.logp_grad(x0 + h * e)[0] - lp.logp_grad(x0 - h * e)[0]) / (2 * h)
            for e in np.eye(lp.n_dim)
        ]
    )
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5)


def _flat_lp(formula):
    flat = {"b": "flat", "sd": "flat", "sigma": "flat"}
    if not formula.startswith("y ~ 0"):
        flat["Intercept"] = "flat"
    return _lp(formula, flat)


def _jacobian(lp, x):
    """Σ log-Jacobians of the coordinates and the LKJ(1) densities (flat priors)."""
    p, q = lp.p, lp.q
    total = float(np.sum(x[p : p + q])) + float(x[-1])
    o = p + q
    for b in lp.blocks:
        if len(b) > 1:
            k = len(b) * (len(b) - 1) // 2
            L, lj = corr_from_unconstrained(x[o : o + k], len(b))
            ker = sum((len(b) - i - 3 + 2.0) * math.log(L[i, i]) for i in range(1, len(b)))
            total += lj + ker + pri.lkj_log_norm(len(b), 1.0)
            o += k
    return total


@pytest.mark.parametrize("formula", FORMULAS)
def test_likelihood_is_the_cores_loglik(formula):
    """With flat priors the log posterior is the core's ML log-likelihood at the same
    (β̃, Λ̃, σ) plus the coordinates' log-Jacobians."""
    lp, _ = _flat_lp(formula)
    x0 = np.random.default_rng(3).normal(size=lp.n_dim) * 0.3
    v, _ = lp.logp_grad(x0)
    par = lp.constrain(x0)
    ll = estimate.loglik(
        lp.prob, lp.prob.theta(par["lam"][0]), par["beta_t"][0], float(par["sigma"][0]) ** 2
    )
    assert abs(v - _jacobian(lp, x0) - ll) < 1e-9 * abs(ll)


@pytest.mark.parametrize(
    ("formula", "shift"),
    [
        ("y ~ x + z + (1 + x | g)", 0.0),
        ("y ~ x + (1 | g) + (0 + z + w | g)", 0.0),
        ("y ~ x + z + (1 + x | g)", 1e3),  # a shifted random slope (the problem centres it)
    ],
)
def test_likelihood_in_the_users_terms_equals_a_dense_computation(formula, shift):
    """The likelihood at the user's (β, sd, R, σ) from the raw rows, y ~ N(Xβ, ZΣZ' +
    σ²I) per group, independently of the statistics (up to their rounding)."""
    X, y = _frame(n=120, G=6, shift=shift)
    m = MixedLM(formula)
    m.learn_many(X, y)
    flat = {"b": "flat", "sd": "flat", "sigma": "flat", "Intercept": "flat"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp = LogPosterior.from_model(m, flat)
    x0 = np.random.default_rng(5).normal(size=lp.n_dim) * 0.3
    v, _ = lp.logp_grad(x0)
    par = lp.constrain(x0)
    beta, sd, R, sig = par["beta"][0], par["sd"][0], par["cor"][0], float(par["sigma"][0])
    d = m._design
    A = d.encode_columns({c: X[c].to_numpy() for c in X.columns}, len(X), learn=False)
    Xf, Z = A[:, d.xi], A[:, d.zi]
    S = np.diag(sd) @ R @ np.diag(sd)
    ll = 0.0
    yv = y.to_numpy()
    for k in np.unique(X["g"]):
        r = (X["g"] == k).to_numpy()
        V = Z[r] @ S @ Z[r].T + sig**2 * np.eye(r.sum())
        e = yv[r] - Xf[r] @ beta
        ll += -0.5 * (
            r.sum() * math.log(2 * math.pi) + np.linalg.slogdet(V)[1] + e @ np.linalg.solve(V, e)
        )
    # (the statistics' rows are rounded, the same bits from any order: a data set moved
    # by ~1e-9 of each value, which moves the log density by far less than 1e-7)
    assert abs(v - _jacobian(lp, x0) - ll) < 1e-7 * abs(ll)


def test_brms_intercept_is_centred_and_maps_back():
    """θ_b's first coordinate is the intercept of the mean-centred predictors:
    b_Intercept = Intercept − Σ mean(x_j) b_j, whatever columns the problem shifted."""
    lp, m = _lp("y ~ x + z + (1 + x | g)")
    X, _ = _frame()
    x0 = np.zeros(lp.n_dim)
    x0[:3] = [4.0, 0.7, -0.2]
    par = lp.constrain(x0)
    want = 4.0 - X["x"].mean() * 0.7 - X["z"].mean() * (-0.2)
    assert abs(par["beta"][0, 0] - want) < 1e-8
    back = lp.unconstrain(par["beta"][0], par["sd"][0], par["cor"][0], par["sigma"][0])
    np.testing.assert_allclose(back, x0, atol=1e-7)


def test_intercept_last_within_its_block():
    lp, _ = _lp("y ~ x + (1 + x + z | g)")
    assert lp.re_names == ("(Intercept)", "x", "z")
    assert lp.perm.tolist() == [1, 2, 0]  # the problem orders x, z, then the intercept
    lam = lp.constrain(np.full(lp.n_dim, 0.2))["lam"][0]
    assert np.allclose(np.triu(lam, 1), 0.0)  # Λ̃ = SΛ stays lower triangular


def test_large_offsets_keep_their_digits():
    """x around 1e4 and y around 1e6 (fixed x): the centre keeps the likelihood exact —
    the same value as on the unshifted data at the same parameters, the centred
    Intercept moved by 1e6."""
    lp1, _ = _flat_lp("y ~ x + z + (1 | g)")
    X, y = _frame()
    m = MixedLM("y ~ x + z + (1 | g)")
    m.learn_many(X.assign(x=X["x"] + 1e4), y + 1e6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp2 = LogPosterior.from_model(
            m, {"b": "flat", "sd": "flat", "sigma": "flat", "Intercept": "flat"}
        )
    x1 = np.array([5.0, 0.5, 0.1, -0.6, 0.0])
    x2 = x1.copy()
    x2[0] += 1e6
    v1, g1 = lp1.logp_grad(x1)
    v2, g2 = lp2.logp_grad(x2)
    assert abs(v1 - v2) < 1e-7 * abs(v1)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-4)


def test_canonical_rounding():
    a = np.array([[1.0, 1e-20], [3.0, -2.0]])
    c = canonical(a, bits=10)
    assert np.max(np.abs(c - a)) <= 2.0 ** (2 - 10) / 2
    assert np.array_equal(canonical(c, bits=10), c)  # idempotent
    # exact dyadic values next to a midpoint of the unshifted grid round together
    step = 2.0**-28
    tie = -308700775.5 * step
    near = np.array([[tie * (1 + 2e-16), 2.55]]), np.array([[tie * (1 - 2e-16), 2.55]])
    assert np.array_equal(canonical(near[0]), canonical(near[1]))


def test_no_events_is_an_error():
    m = MixedLM("y ~ x + (1 | g)")
    with pytest.raises(ValueError, match="no events"):
        LogPosterior.from_model(m, {})


def test_rank_deficient_fixed_effects_are_an_error():
    X, y = _frame()
    m = MixedLM("y ~ x + x2 + (1 | g)")
    m.learn_many(X.assign(x2=2 * X["x"] + 1), y)
    with pytest.raises(ValueError, match="rank deficient .*x2"):
        LogPosterior.from_model(m, {})
