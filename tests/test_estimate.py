"""Profiled REML/ML, the bounded optimizer, the ML log-likelihood and ML-EM (docs/math.md §3 and §5)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from streamlmm import estimate, kernels
from streamlmm.formula import parse_formula
from streamlmm.stats import GroupStats


# -- θ ↔ Λ --------------------------------------------------------------------------------------
def test_lam_of_uses_lme4_column_major_order():
    lam = estimate.lam_of(np.arange(1.0, 7.0), 3)
    np.testing.assert_array_equal(lam, [[1, 0, 0], [2, 4, 0], [3, 5, 6]])
    np.testing.assert_array_equal(estimate.theta_of(lam), np.arange(1.0, 7.0))


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_theta_bounds_and_start(q):
    lower = estimate.theta_lower(q)
    start = estimate.theta_start(q)
    assert len(lower) == len(start) == q * (q + 1) // 2
    np.testing.assert_array_equal(estimate.lam_of(start, q), np.eye(q))
    on_diag = np.diag(estimate.lam_of(np.arange(1.0, len(lower) + 1), q))
    assert set(np.flatnonzero(lower == 0) + 1) == set(on_diag.astype(int))
    assert np.all(np.isneginf(lower[lower != 0]))


# -- profiled criterion --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sleepstudy_slopes_reml", "pub_freqweights_reml"])
@pytest.mark.parametrize("reml", [True, False])
def test_profile_equals_dense_at_random_theta(reference, name, reml):
    case = reference(name)
    st = case.unshifted_stats()
    dense = case.dense()
    rng = np.random.default_rng(5)
    for _ in range(3):
        theta = rng.uniform([0.05, -1.0, 0.05], [2.5, 1.0, 2.5])
        pr = estimate.profile(st, theta, reml)
        d = dense.at(theta, reml)
        assert pr.criterion == pytest.approx(d.criterion, rel=1e-11)
        np.testing.assert_allclose(pr.beta, d.beta, rtol=1e-9)
        assert pr.sigma2 == pytest.approx(d.sigma2, rel=1e-10)
        RXinv = np.linalg.inv(pr.RX)
        np.testing.assert_allclose(pr.sigma2 * RXinv @ RXinv.T, d.vcov_beta, rtol=1e-9)


def test_profile_criterion_is_invariant_to_the_shift(reference, helpers):
    """The same data in shifted coordinates (first event) gives the same criterion."""
    from streamlmm import MixedLM

    case = reference("pub_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_many(model)
    assert np.any(model._stats.shift != 0)
    st = case.unshifted_stats()
    for theta in ([1.0, 0.0, 1.0], [2.1, 0.14, 0.47], [0.3, -0.2, 0.0]):
        got = helpers.estimates_at(model, theta)
        pr = estimate.profile(st, np.array(theta), True)
        assert got["criterion"] == pytest.approx(pr.criterion, rel=1e-12)
        np.testing.assert_allclose(got["fixef"], pr.beta, rtol=1e-8)


def _tiny_stats(n: int, formula="y ~ x1 + x2 + (1 | g)", collinear=False):
    f = parse_formula(formula)
    st = GroupStats(f)
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=n)
    A = np.column_stack([np.ones(n), x1, 2 * x1 if collinear else rng.normal(size=n)])
    st.add(st.rows([i % 2 for i in range(n)]), A, rng.normal(size=n), np.ones(n), np.zeros(n))
    return st


def test_profile_is_undefined_with_too_few_events():
    st = _tiny_stats(3)  # n = p: no REML degrees of freedom
    assert estimate.profile(st, np.array([1.0]), reml=True) is None
    assert estimate.fit_theta(st, reml=True)[0] is None


def test_profile_is_undefined_for_collinear_fixed_columns():
    st = _tiny_stats(40, collinear=True)
    assert estimate.profile(st, np.array([1.0]), reml=True) is None


def test_profile_is_undefined_for_a_perfect_fit():
    f = parse_formula("y ~ x1 + (1 | g)")
    st = GroupStats(f)
    x = np.arange(10.0)
    st.add(
        st.rows([0] * 5 + [1] * 5),
        np.column_stack([np.ones(10), x]),
        2 * x + 1,
        np.ones(10),
        np.zeros(10),
    )
    assert estimate.profile(st, np.array([0.0]), reml=False) is None


def test_profile_at_huge_theta_is_undefined_not_an_error():
    """One-event groups with random slopes have an unbounded likelihood, so the optimizer
    may try θ ~ 1e7..1e8, where Λ'ZZΛ + I loses its positive definiteness to rounding
    (the numba Cholesky then divides by zero). That is "undefined", not an exception."""
    f = parse_formula("y ~ x1 + (1 + x1 | g)")
    theta = np.array([1.35e7, 1.36e8, 1.32e7])
    rng = np.random.default_rng(0)
    undefined = 0
    for _ in range(20):
        st = GroupStats(f)
        x = rng.uniform(35, 55, 12)
        st.add(
            st.rows(list(range(12))),
            np.column_stack([np.ones(12), x]),
            rng.normal(40, 5, 12),
            np.ones(12),
            np.zeros(12),
        )
        pr = estimate.profile(st, theta, reml=True)
        undefined += pr is None
        assert pr is None or math.isfinite(pr.criterion)
    assert undefined > 0  # the case is really exercised


# -- the optimizer ---------------------------------------------------------------------------------
def test_fit_theta_finds_a_local_minimum(reference):
    case = reference("sleepstudy_slopes_reml")
    st = case.unshifted_stats()
    pr, evals = estimate.fit_theta(st, reml=True)
    assert evals > 0
    rng = np.random.default_rng(1)
    for _ in range(20):
        nearby = pr.theta + rng.normal(scale=1e-3, size=3)
        nearby[[0, 2]] = np.abs(nearby[[0, 2]])
        assert pr.criterion <= estimate.profile(st, nearby, True).criterion
    # warm start from the optimum stays there
    again, _ = estimate.fit_theta(st, reml=True, theta0=pr.theta)
    assert again.criterion <= pr.criterion * (1 + 1e-12)


def test_fit_theta_lands_on_the_boundary_when_groups_do_not_differ():
    """y independent of the group: the optimum has a zero variance (singular fit)."""
    f = parse_formula("y ~ x1 + (1 | g)")
    st = GroupStats(f)
    rng = np.random.default_rng(2)
    n = 400
    g = rng.integers(0, 20, n)
    # remove every group-mean component of the noise so the between-group variance is 0
    e = rng.normal(size=n)
    e -= pd.Series(e).groupby(g).transform("mean").to_numpy()
    x = rng.normal(size=n)
    st.add(
        st.rows(g.tolist()), np.column_stack([np.ones(n), x]), 1 + x + e, np.ones(n), np.zeros(n)
    )
    for reml in (True, False):
        pr, _ = estimate.fit_theta(st, reml)
        # d depends on θ² when q = 1, so θ below ~1e-8 is indistinguishable from 0
        assert 0.0 <= pr.theta[0] < 1e-6 < estimate.SINGULAR_TOL
        assert pr.criterion <= estimate.profile(st, np.array([1e-3]), reml).criterion
        assert pr.criterion <= estimate.profile(st, np.array([0.0]), reml).criterion + 1e-9


# -- log-likelihood and EM -----------------------------------------------------------------------
def test_loglik_equals_dense_at_arbitrary_parameters(reference):
    case = reference("sleepstudy_slopes_ml")
    st = case.unshifted_stats()
    dense = case.dense()
    for theta, beta, sigma2 in [
        ([0.9, 0.02, 0.22], [251.0, 10.5], 650.0),
        ([0.2, -0.5, 0.0], [240.0, 12.0], 900.0),
        ([0.0, 0.0, 0.0], [250.0, 10.0], 2000.0),
    ]:
        got = estimate.loglik(st, np.array(theta), np.array(beta), sigma2)
        assert got == pytest.approx(dense.loglik(theta, np.array(beta), sigma2), rel=1e-12)


def test_loglik_at_ml_optimum_is_minus_half_the_deviance(reference):
    case = reference("sleepstudy_slopes_ml")
    st = case.unshifted_stats()
    pr = estimate.profile(st, case.theta, reml=False)
    assert estimate.loglik(st, pr.theta, pr.beta, pr.sigma2) == pytest.approx(
        case.ref["logLik"], rel=1e-12
    )


def test_ols_start_equals_least_squares(reference):
    case = reference("pub_slopes_ml")
    st = case.unshifted_stats()
    beta, sigma2 = estimate.ols_start(st)
    X = case.design()[:, case.formula.xi]
    want, rss, *_ = np.linalg.lstsq(X, case.y.to_numpy(), rcond=None)
    np.testing.assert_allclose(beta, want, rtol=1e-10)
    assert sigma2 == pytest.approx(rss[0] / len(case.y), rel=1e-10)


def test_em_step_equals_design_formulas_in_d_form(reference):
    """One step in the Λ form equals docs/math.md §5's D-form step, written out in numpy."""
    case = reference("pub_slopes_ml")
    st = case.unshifted_stats()
    f = case.formula
    theta, beta, sigma2 = np.array([1.5, 0.3, 0.6]), np.array([5.0, 0.3, -1.0]), 1.2
    lam = estimate.lam_of(theta, f.q)
    D = sigma2 * lam @ lam.T
    S = np.zeros((f.q, f.q))
    rss = 0.0
    T = np.zeros(f.p)
    for r in range(st.n_groups):
        M = st.active[r][st.P]
        ZZ, ZX = M[np.ix_(f.zi, f.zi)], M[np.ix_(f.zi, f.xi)]
        Zy, XX, Xy, yy = M[f.zi, st.yi], M[np.ix_(f.xi, f.xi)], M[f.xi, st.yi], M[st.yi, st.yi]
        C = np.linalg.inv(ZZ / sigma2 + np.linalg.inv(D))
        rg = Zy - ZX @ beta
        b = C @ rg / sigma2
        S += np.outer(b, b) + C
        rss += (yy - 2 * beta @ Xy + beta @ XX @ beta) - 2 * b @ rg
        rss += np.trace(ZZ @ (np.outer(b, b) + C))
        T += ZX.T @ b
    n = st.n_obs
    XXt, Xyt = (
        sum(st.active[r][st.P][np.ix_(f.xi, f.xi)] for r in range(st.n_groups)),
        sum(st.active[r][st.P][f.xi, st.yi] for r in range(st.n_groups)),
    )
    D_new, sigma2_new = S / st.n_groups, rss / n
    beta_new = np.linalg.solve(XXt, Xyt - T)
    got_theta, got_beta, got_sigma2 = estimate.em_step(st, theta, beta, sigma2)
    lam_new = estimate.lam_of(got_theta, f.q)
    np.testing.assert_allclose(got_sigma2 * lam_new @ lam_new.T, D_new, rtol=1e-10)
    np.testing.assert_allclose(got_beta, beta_new, rtol=1e-10)
    assert got_sigma2 == pytest.approx(sigma2_new, rel=1e-12)
    assert np.all(np.diag(lam_new) >= 0)


@pytest.fixture(scope="module")
def em_path(reference):
    """ML-EM on pub_slopes from OLS with D = 0.3σ²I (Λ = √0.3·I), user coordinates."""
    case = reference("pub_slopes_ml")
    st = case.unshifted_stats()
    beta, sigma2 = estimate.ols_start(st)
    theta = estimate.theta_of(math.sqrt(0.3) * np.eye(2))
    path = []
    for _ in range(400):
        theta, beta, sigma2 = estimate.em_step(st, theta, beta, sigma2)
        path.append((theta, beta, sigma2, estimate.loglik(st, theta, beta, sigma2)))
    return case, st, path


def test_em_reproduces_design_loglik_sequence(em_path):
    """docs/math.md §5 documents the first six steps' ML log-likelihoods on pub_slopes.csv."""
    _, _, path = em_path
    documented = [-7437.5, -7191.9, -7182.2, -7181.5, -7181.4, -7181.34]
    for (_, _, _, ll), want in zip(path, documented):
        decimals = len(str(want).split(".")[1])
        assert abs(ll - want) <= 0.5 * 10.0**-decimals, (ll, want)


def test_em_is_monotone_in_the_ml_loglik(em_path):
    _, _, path = em_path
    ll = np.array([p[3] for p in path])
    assert np.all(np.diff(ll[:100]) > 0)
    assert np.all(np.diff(ll) >= -1e-9)  # later steps: only rounding may tie


def test_em_converges_to_the_ml_optimum_of_fit(em_path):
    case, st, path = em_path
    theta, beta, sigma2, ll = path[-1]
    pr, _ = estimate.fit_theta(st, reml=False)
    assert ll == pytest.approx(-pr.criterion / 2, abs=1e-6)
    assert ll >= case.ref["logLik"] - 1e-6  # lme4's optimum
    np.testing.assert_allclose(theta, pr.theta, rtol=1e-4)
    np.testing.assert_allclose(beta, pr.beta, rtol=1e-5)
    assert sigma2 == pytest.approx(pr.sigma2, rel=1e-6)


def test_em_step_handles_a_singular_d():
    """A zero variance (Λ singular) must not break the Λ-form step."""
    f = parse_formula("y ~ x1 + (1 + x1 | g)")
    st = GroupStats(f)
    rng = np.random.default_rng(4)
    n = 200
    x = rng.normal(size=n)
    st.add(
        st.rows((np.arange(n) % 10).tolist()),
        np.column_stack([np.ones(n), x]),
        rng.normal(size=n),
        np.ones(n),
        np.zeros(n),
    )
    theta = np.array([1.0, 0.5, 0.0])
    new_theta, new_beta, new_sigma2 = estimate.em_step(st, theta, np.zeros(2), 1.0)
    assert np.all(np.isfinite(new_theta)) and np.all(np.isfinite(new_beta))
    assert new_sigma2 > 0
    before = estimate.loglik(st, theta, np.zeros(2), 1.0)
    assert estimate.loglik(st, new_theta, new_beta, new_sigma2) >= before


# -- back to user coordinates ----------------------------------------------------------------
def test_unshift_maps_shifted_estimates_to_the_users_columns(reference, helpers):
    """Estimates from first-event-shifted statistics equal those from unshifted ones."""
    from streamlmm import MixedLM

    case = reference("sleepstudy_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_one(model)
    assert np.any(model._stats.shift != 0)
    got = helpers.estimates_at(model, case.theta)
    st = case.unshifted_stats()
    f = case.formula
    pr = estimate.profile(st, case.theta, True)
    B, K = kernels.blups(
        st.S, st.n_groups, st.P, f.zi, f.xi, st.yi, estimate.lam_of(case.theta, f.q), pr.beta
    )
    RXinv = np.linalg.inv(pr.RX)
    np.testing.assert_allclose(got["fixef"], pr.beta, rtol=1e-10)
    np.testing.assert_allclose(got["vcov"], pr.sigma2 * RXinv @ RXinv.T, rtol=1e-9)
    np.testing.assert_allclose(got["theta"], case.theta, rtol=1e-10)
    for i, key in enumerate(st.keys):
        np.testing.assert_allclose(got["b"][key], B[i], rtol=1e-9)
        np.testing.assert_allclose(got["condvar"][key], pr.sigma2 * K[i], rtol=1e-9)
