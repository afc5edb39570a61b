"""Profiled REML/ML, the bounded optimizer, the ML log-likelihood and ML-EM (docs/math.md §3, §5)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from streamlmm import estimate
from streamlmm.design import numeric_design
from streamlmm.stats import GroupStats

# formulas with q = 1..4 random columns (the intercept and the first q − 1 of x1..x3)
_Q_FORMULAS = {
    1: "y ~ x1 + x2 + x3 + (1 | g)",
    2: "y ~ x1 + x2 + x3 + (1 + x1 | g)",
    3: "y ~ x1 + x2 + x3 + (1 + x1 + x2 | g)",
    4: "y ~ x1 + x2 + x3 + (1 + x1 + x2 + x3 | g)",
}


def _random_stats(formula: str, n: int = 300, n_groups: int = 12, seed: int = 0):
    """Statistics of a random-slopes data set with offsets on x (so the centre matters)."""
    f = numeric_design(formula)
    rng = np.random.default_rng(seed)
    g = rng.integers(0, n_groups, n)
    X = np.column_stack([rng.normal(3.0, 1.5, n), rng.normal(-2.0, 1.0, n), rng.normal(5, 2, n)])
    b = rng.normal(0, [1.5, 0.6, 0.4, 0.3], (n_groups, 4))
    y = 10 + X @ [0.5, -1.0, 0.2] + b[g, 0] + (b[g, 1:] * X).sum(axis=1) + rng.normal(0, 1, n)
    cols = {"x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2]}
    A = np.column_stack([np.ones(n) if c == "(Intercept)" else cols[c] for c in f.columns])
    st = GroupStats(f)
    w = rng.integers(1, 3, n).astype(float)
    st.add(st.rows(g.tolist()), A, y, w, np.zeros(n))
    return f, st


def _q_problem(q: int, reml: bool = True, center=None):
    f, st = _random_stats(_Q_FORMULAS[q], seed=q)
    return estimate.make_problem(st, f, reml, center=center)[0]


# -- θ ↔ Λ --------------------------------------------------------------------------------------
def test_lam_uses_lme4_column_major_order():
    prob = _q_problem(3)
    lam = prob.lam(np.arange(1.0, 7.0))
    np.testing.assert_array_equal(lam, [[1, 0, 0], [2, 4, 0], [3, 5, 6]])
    np.testing.assert_array_equal(prob.theta(lam), np.arange(1.0, 7.0))
    rows, cols = estimate.theta_index([(0, 1, 2)], 3)
    np.testing.assert_array_equal(rows, [0, 1, 2, 1, 2, 2])
    np.testing.assert_array_equal(cols, [0, 0, 0, 1, 1, 2])
    # diagonal blocks (lme4's ``||``): one θ per 1×1 block, then the 2×2 block
    rows, cols = estimate.theta_index([(0,), (1, 2)], 3)
    np.testing.assert_array_equal(rows, [0, 1, 2, 2])
    np.testing.assert_array_equal(cols, [0, 1, 1, 2])


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_theta_bounds_and_start(q):
    prob = _q_problem(q)
    lower = prob.lower()
    start = prob.start()
    assert prob.q == q
    assert len(lower) == len(start) == q * (q + 1) // 2
    np.testing.assert_array_equal(prob.lam(start), np.eye(q))
    on_diag = np.diag(prob.lam(np.arange(1.0, len(lower) + 1)))
    assert set(np.flatnonzero(lower == 0) + 1) == set(on_diag.astype(int))
    assert np.all(np.isneginf(lower[lower != 0]))


# -- profiled criterion --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sleepstudy_slopes_reml", "pub_freqweights_reml"])
@pytest.mark.parametrize("reml", [True, False])
def test_profile_equals_dense_at_random_theta(reference, name, reml):
    case = reference(name)
    f = case.formula
    prob, _ = estimate.make_problem(case.stats(), f, reml, center=np.zeros(f.k + 1))
    dense = case.dense()
    rng = np.random.default_rng(5)
    for _ in range(3):
        theta = rng.uniform([0.05, -1.0, 0.05], [2.5, 1.0, 2.5])
        pr = prob.profile(theta)
        d = dense.at(theta, reml)
        assert pr.criterion == pytest.approx(d.criterion, rel=1e-11)
        np.testing.assert_allclose(pr.beta, d.beta, rtol=1e-9)
        assert pr.sigma2 == pytest.approx(d.sigma2, rel=1e-10)
        RXinv = np.linalg.inv(pr.RX)
        np.testing.assert_allclose(pr.sigma2 * RXinv @ RXinv.T, d.vcov_beta, rtol=1e-9)


def test_profile_criterion_is_invariant_to_the_centre(reference, helpers):
    """The same data around the fit's centre gives the user's criterion and fixef."""
    from streamlmm import MixedLM

    case = reference("pub_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_many(model)
    centred, _ = estimate.make_problem(model._stats, model._design, model.reml)
    assert np.any(centred.c != 0)
    prob = case.user_problem()
    for theta in ([1.0, 0.0, 1.0], [2.1, 0.14, 0.47], [0.3, -0.2, 0.0]):
        got = helpers.estimates_at(model, theta)
        pr = prob.profile(np.array(theta))
        assert got["criterion"] == pytest.approx(pr.criterion, rel=1e-12)
        np.testing.assert_allclose(got["fixef"], pr.beta, rtol=1e-8)


@pytest.mark.parametrize("reml", [True, False])
def test_profile_criterion_is_invariant_to_any_centre(reml):
    """Any centre near the data on the shiftable columns: same criterion at the mapped θ.
    (A centre far outside the data conditions Λ's map T_z badly: rounding grows with it.)"""
    f, st = _random_stats(_Q_FORMULAS[3], seed=7)
    user, _ = estimate.make_problem(st, f, reml, center=np.zeros(f.k + 1))
    rng = np.random.default_rng(8)
    for _ in range(3):
        c = np.where(f.shiftable, st.center() + rng.normal(0, 2, f.k + 1), 0.0)
        prob, _ = estimate.make_problem(st, f, reml, center=c)
        np.testing.assert_array_equal(prob.c, c)
        lam_u = np.tril(rng.uniform(-0.5, 1.5, (3, 3)))
        lam_u[np.diag_indices(3)] = np.abs(lam_u[np.diag_indices(3)]) + 0.05
        pu = user.profile(user.theta(lam_u))
        pc = prob.profile(prob.theta(prob.from_user_lam(lam_u)))
        assert pc.criterion == pytest.approx(pu.criterion, rel=1e-12)
        np.testing.assert_allclose(prob.to_user_lam(prob.from_user_lam(lam_u)), lam_u, rtol=1e-12)
        est_u = estimate.estimates_at(user, pu)
        est_c = estimate.estimates_at(prob, pc)
        np.testing.assert_allclose(est_c.fixef, est_u.fixef, rtol=1e-9)
        np.testing.assert_allclose(est_c.vcov, est_u.vcov, rtol=1e-8)
        np.testing.assert_allclose(est_c.re_cov, est_u.re_cov, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(est_c.b, est_u.b, rtol=1e-8, atol=1e-10)


def _tiny_stats(n: int, formula="y ~ x1 + x2 + (1 | g)", collinear=False):
    f = numeric_design(formula)
    st = GroupStats(f)
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=n)
    A = np.column_stack([np.ones(n), x1, 2 * x1 if collinear else rng.normal(size=n)])
    st.add(st.rows([i % 2 for i in range(n)]), A, rng.normal(size=n), np.ones(n), np.zeros(n))
    return f, st


def test_profile_is_undefined_with_too_few_events():
    f, st = _tiny_stats(3)  # n = p: no REML degrees of freedom
    prob, _ = estimate.make_problem(st, f, reml=True)
    assert prob.p == 3
    assert prob.profile(np.array([1.0])) is None
    pr, summary = estimate.fit_theta(prob)
    assert pr is None and not summary.converged


def test_collinear_fixed_column_is_dropped_not_undefined():
    """x2 = 2·x1: lme4 drops x2; the fit is the one without it."""
    f, st = _tiny_stats(40, collinear=True)
    prob, info = estimate.make_problem(st, f, reml=True)
    np.testing.assert_array_equal(prob.keep, [True, True, False])
    assert prob.p == 2 and prob.XX.shape == (2, 2) and prob.F.shape[1] == 1 + 2 + 1
    g = numeric_design("y ~ x1 + (1 | g)")  # same union columns minus x2
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=40)
    y = rng.normal(size=40)
    sub = GroupStats(g)
    sub.add(sub.rows([i % 2 for i in range(40)]), np.column_stack([np.ones(40), x1]), y,
            np.ones(40), np.zeros(40))  # fmt: skip
    ref, _ = estimate.make_problem(sub, g, reml=True, center=prob.c[[0, 1, 3]])
    for theta in (0.3, 1.0, 2.0):
        got, want = prob.profile(np.array([theta])), ref.profile(np.array([theta]))
        assert got.criterion == pytest.approx(want.criterion, rel=1e-12)
        np.testing.assert_allclose(got.beta, want.beta, rtol=1e-10)
    est = estimate.estimates_at(prob, prob.profile(np.array([1.0])))
    assert np.isnan(est.fixef[2]) and np.all(np.isfinite(est.fixef[:2]))


@pytest.mark.parametrize(
    "name, keep",
    [
        ("aliased_reml", [True, True, True, False]),  # x3 = 2·x1 + 1
        ("constant_col_reml", [True, True, False]),  # x2 constant
        ("proportional_ml", [True, True, False]),  # x2 = 2·x1
        ("timestamp_reml", [True, True, True]),  # a Unix timestamp is kept
    ],
)
@pytest.mark.parametrize("user", [True, False])
def test_fixed_rank_drops_what_lme4_drops(reference, name, keep, user):
    case = reference(name)
    f = case.formula
    assert [c for c, k in zip(f.fixed, keep) if not k] == case.ref["dropped"]
    center = np.zeros(f.k + 1) if user else None
    prob, info = estimate.make_problem(case.stats(), f, case.reml, center=center)
    np.testing.assert_array_equal(prob.keep, keep)
    # the same from the plain numpy cross-product of X (user coordinates)
    X = case.design()[:, f.xi]
    XX = X.T @ X
    np.testing.assert_array_equal(estimate.fixed_rank(XX, np.diag(XX)), keep)
    np.testing.assert_allclose(info["raw_sq"], np.diag(XX), rtol=1e-9)


def test_fixed_rank_on_synthetic_designs():
    rng = np.random.default_rng(3)
    n = 200
    one, x1, x2 = np.ones(n), rng.normal(size=n), rng.normal(size=n)
    ts = 1.7e9 + np.sort(rng.uniform(0, 86400.0, n))  # one day of Unix timestamps
    cases = [
        (np.column_stack([one, x1, x2, 2 * x1 + 1]), [True, True, True, False]),
        (np.column_stack([one, x1, np.full(n, 3.0)]), [True, True, False]),
        (np.column_stack([one, x1, 2 * x1]), [True, True, False]),
        (np.column_stack([one, ts, x1]), [True, True, True]),
        (np.column_stack([one, ts, x1, ts + 1.0]), [True, True, True, False]),
        (np.column_stack([np.zeros(n), one, x1]), [False, True, True]),
    ]
    for X, keep in cases:
        XX = X.T @ X
        np.testing.assert_array_equal(estimate.fixed_rank(XX, np.diag(XX)), keep)
        # lme4's rule, directly on X: keep x_j when its least-squares residual on the
        # kept earlier columns exceeds 1e-7·‖x_j‖ (numpy's matrix_rank, relative to the
        # largest singular value, would call the timestamp design rank deficient)
        want = []
        for j in range(X.shape[1]):
            kept = X[:, [i for i in range(j) if want[i]]]
            res = X[:, j] - kept @ np.linalg.lstsq(kept, X[:, j], rcond=None)[0]
            want.append(bool(np.linalg.norm(res) > 1e-7 * np.linalg.norm(X[:, j])))
        assert want == keep


def test_profile_is_undefined_for_a_perfect_fit():
    f = numeric_design("y ~ x1 + (1 | g)")
    st = GroupStats(f)
    x = np.arange(10.0)
    st.add(
        st.rows([0] * 5 + [1] * 5),
        np.column_stack([np.ones(10), x]),
        2 * x + 1,
        np.ones(10),
        np.zeros(10),
    )
    for center in (np.zeros(f.k + 1), None):
        prob, _ = estimate.make_problem(st, f, reml=False, center=center)
        assert prob.profile(np.array([0.0])) is None


def test_profile_at_huge_theta_is_undefined_not_an_error():
    """One-event groups with random slopes have an unbounded likelihood, so the optimizer
    may try θ ~ 1e7..1e8, where Λ'ZZΛ + I loses its positive definiteness to rounding
    (the numba Cholesky then divides by zero). That is "undefined", not an exception."""
    f = numeric_design("y ~ x1 + (1 + x1 | g)")
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
        for center in (np.zeros(f.k + 1), None):
            prob, _ = estimate.make_problem(st, f, reml=True, center=center)
            pr = prob.profile(theta)
            undefined += pr is None
            assert pr is None or math.isfinite(pr.criterion)
    assert undefined > 0  # the case is really exercised


# -- the analytic gradient -------------------------------------------------------------------------
def _central_gradient(prob, theta):
    """Fourth-order central differences of the profiled criterion."""
    g = np.empty_like(theta)
    for i in range(theta.shape[0]):
        h = 1e-4 * max(abs(theta[i]), 1e-2)
        d = {}
        for s in (-2, -1, 1, 2):
            t = theta.copy()
            t[i] += s * h
            d[s] = prob.profile(t).criterion
        g[i] = (8 * (d[1] - d[-1]) - (d[2] - d[-2])) / (12 * h)
    return g


def _gradient_cases():
    """(q, θ in the problem's coordinates) including near-singular Λ (a 1e-3 diagonal)."""
    return [
        (1, [0.8]),
        (1, [1e-3]),
        (2, [1.2, 0.3, 0.7]),
        (2, [0.9, -0.4, 1e-3]),
        (2, [1e-3, 0.5, 0.8]),
        (3, [1.1, 0.2, -0.3, 0.8, 0.1, 0.6]),
        (3, [0.9, 0.3, -0.2, 1e-3, 0.1, 0.7]),
        (3, [0.7, -0.1, 0.2, 0.5, 0.3, 1e-3]),
    ]


@pytest.mark.parametrize("q, theta", _gradient_cases())
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("user", [True, False])
def test_gradient_equals_central_differences(q, theta, reml, user):
    f, st = _random_stats(_Q_FORMULAS[q], seed=10 + q)
    center = np.zeros(f.k + 1) if user else None
    prob, _ = estimate.make_problem(st, f, reml, center=center)
    assert user or np.any(prob.c != 0)
    theta = np.array(theta)
    g = prob.gradient(prob.profile(theta))
    fd = _central_gradient(prob, theta)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sleepstudy_slopes_reml", "pub_freqweights_reml"])
def test_gradient_equals_central_differences_on_reference_data(reference, name):
    case = reference(name)
    prob = case.user_problem()
    for theta in (case.theta * 1.3, np.array([0.9, -0.2, 1e-3]), np.array([1e-3, 0.1, 0.4])):
        g = prob.gradient(prob.profile(theta))
        np.testing.assert_allclose(g, _central_gradient(prob, theta), rtol=1e-5, atol=1e-7)
    # at lme4's optimum the gradient is (nearly) zero relative to the curvature scale
    g = prob.gradient(prob.profile(case.theta))
    assert np.max(np.abs(g)) < 1e-2


def test_gradient_with_diagonal_blocks():
    """Λ made of 1×1 blocks (lme4's ``||``): θ indexes only the diagonal."""
    prob = _q_problem(3, reml=True, center=None)
    diag = dataclasses.replace(prob, blocks=((0,), (1,), (2,)))
    for theta in ([0.9, 0.4, 0.6], [1e-3, 0.5, 0.8]):
        theta = np.array(theta)
        pr = diag.profile(theta)
        full = prob.profile(prob.theta(np.diag(theta)))
        assert pr.criterion == pytest.approx(full.criterion, rel=1e-14)
        g = diag.gradient(pr)
        np.testing.assert_allclose(g, _central_gradient(diag, theta), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g, prob.gradient(full)[[0, 3, 5]], rtol=1e-12)


# -- the optimizer ---------------------------------------------------------------------------------
def test_fit_theta_finds_a_local_minimum(reference):
    case = reference("sleepstudy_slopes_reml")
    prob = case.user_problem()
    pr, summary = estimate.fit_theta(prob)
    assert summary.evals > 0 and summary.converged and summary.return_code == "ok"
    assert summary.criterion == pr.criterion
    rng = np.random.default_rng(1)
    for _ in range(20):
        nearby = pr.theta + rng.normal(scale=1e-3, size=3)
        nearby[[0, 2]] = np.abs(nearby[[0, 2]])
        assert pr.criterion <= prob.profile(nearby).criterion
    # warm start from the optimum stays there
    again, _ = estimate.fit_theta(prob, pr.theta)
    assert again.criterion <= pr.criterion * (1 + 1e-12)


def test_fit_theta_lands_on_the_boundary_when_groups_do_not_differ():
    """y independent of the group: the optimum has a zero variance (singular fit)."""
    f = numeric_design("y ~ x1 + (1 | g)")
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
        prob, _ = estimate.make_problem(st, f, reml)
        pr, _ = estimate.fit_theta(prob)
        # d depends on θ² when q = 1, so θ below ~1e-8 is indistinguishable from 0
        assert 0.0 <= pr.theta[0] < 1e-6 < estimate.SINGULAR_TOL
        assert pr.criterion <= prob.profile(np.array([1e-3])).criterion
        assert pr.criterion <= prob.profile(np.array([0.0])).criterion + 1e-9


# -- log-likelihood and EM -----------------------------------------------------------------------
def test_loglik_equals_dense_at_arbitrary_parameters(reference):
    case = reference("sleepstudy_slopes_ml")
    prob = case.user_problem()
    dense = case.dense()
    for theta, beta, sigma2 in [
        ([0.9, 0.02, 0.22], [251.0, 10.5], 650.0),
        ([0.2, -0.5, 0.0], [240.0, 12.0], 900.0),
        ([0.0, 0.0, 0.0], [250.0, 10.0], 2000.0),
    ]:
        got = estimate.loglik(prob, np.array(theta), np.array(beta), sigma2)
        assert got == pytest.approx(dense.loglik(theta, np.array(beta), sigma2), rel=1e-12)


def test_loglik_at_ml_optimum_is_minus_half_the_deviance(reference):
    case = reference("sleepstudy_slopes_ml")
    prob = case.user_problem()
    pr = prob.profile(case.theta)
    assert estimate.loglik(prob, pr.theta, pr.beta, pr.sigma2) == pytest.approx(
        case.ref["logLik"], rel=1e-12
    )


def test_ols_start_equals_least_squares(reference):
    case = reference("pub_slopes_ml")
    prob = case.user_problem()
    beta, sigma2 = estimate.ols_start(prob)
    X = case.design()[:, case.formula.xi]
    want, rss, *_ = np.linalg.lstsq(X, case.y.to_numpy(), rcond=None)
    np.testing.assert_allclose(beta, want, rtol=1e-10)
    assert sigma2 == pytest.approx(rss[0] / len(case.y), rel=1e-10)


def test_em_step_equals_design_formulas_in_d_form(reference):
    """One step in the Λ form equals docs/math.md §5's D-form step, written out in numpy from
    the raw data (no sufficient statistics)."""
    case = reference("pub_slopes_ml")
    prob = case.user_problem()
    f = case.formula
    A = case.design()
    X, Z, yv = A[:, f.xi], A[:, f.zi], case.y.to_numpy(float)
    wv = np.ones(len(yv)) if case.w is None else case.w.to_numpy(float)
    groups = case.data["g"].to_numpy()
    theta, beta, sigma2 = np.array([1.5, 0.3, 0.6]), np.array([5.0, 0.3, -1.0]), 1.2
    lam = prob.lam(theta)
    D = sigma2 * lam @ lam.T
    S = np.zeros((f.q, f.q))
    rss = 0.0
    T = np.zeros(f.p)
    XXt, Xyt = np.zeros((f.p, f.p)), np.zeros(f.p)
    keys = list(dict.fromkeys(groups))
    for key in keys:
        sel = groups == key
        Xg, Zg, yg, wg = X[sel], Z[sel], yv[sel], wv[sel]
        ZZ, ZX, Zy = (Zg.T * wg) @ Zg, (Zg.T * wg) @ Xg, (Zg.T * wg) @ yg
        XX, Xy, yy = (Xg.T * wg) @ Xg, (Xg.T * wg) @ yg, (wg * yg) @ yg
        C = np.linalg.inv(ZZ / sigma2 + np.linalg.inv(D))
        rg = Zy - ZX @ beta
        b = C @ rg / sigma2
        S += np.outer(b, b) + C
        rss += (yy - 2 * beta @ Xy + beta @ XX @ beta) - 2 * b @ rg
        rss += np.trace(ZZ @ (np.outer(b, b) + C))
        T += ZX.T @ b
        XXt += XX
        Xyt += Xy
    n = wv.sum()
    D_new, sigma2_new = S / len(keys), rss / n
    beta_new = np.linalg.solve(XXt, Xyt - T)
    got_theta, got_beta, got_sigma2 = estimate.em_step(prob, theta, beta, sigma2)
    lam_new = prob.lam(got_theta)
    np.testing.assert_allclose(got_sigma2 * lam_new @ lam_new.T, D_new, rtol=1e-10)
    np.testing.assert_allclose(got_beta, beta_new, rtol=1e-10)
    assert got_sigma2 == pytest.approx(sigma2_new, rel=1e-12)
    assert np.all(np.diag(lam_new) >= 0)


@pytest.fixture(scope="module")
def em_path(reference):
    """ML-EM on pub_slopes from OLS with D = 0.3σ²I (Λ = √0.3·I), user coordinates."""
    case = reference("pub_slopes_ml")
    prob = case.user_problem()
    beta, sigma2 = estimate.ols_start(prob)
    theta = prob.theta(math.sqrt(0.3) * np.eye(2))
    path = []
    for _ in range(400):
        theta, beta, sigma2 = estimate.em_step(prob, theta, beta, sigma2)
        path.append((theta, beta, sigma2, estimate.loglik(prob, theta, beta, sigma2)))
    return case, prob, path


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
    case, prob, path = em_path
    theta, beta, sigma2, ll = path[-1]
    pr, _ = estimate.fit_theta(prob)
    assert ll == pytest.approx(-pr.criterion / 2, abs=1e-6)
    assert ll >= case.ref["logLik"] - 1e-6  # lme4's optimum
    np.testing.assert_allclose(theta, pr.theta, rtol=1e-4)
    np.testing.assert_allclose(beta, pr.beta, rtol=1e-5)
    assert sigma2 == pytest.approx(pr.sigma2, rel=1e-6)


def test_em_step_handles_a_singular_d():
    """A zero variance (Λ singular) must not break the Λ-form step."""
    f = numeric_design("y ~ x1 + (1 + x1 | g)")
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
    prob, _ = estimate.make_problem(st, f, reml=False)
    theta = np.array([1.0, 0.5, 0.0])
    new_theta, new_beta, new_sigma2 = estimate.em_step(prob, theta, np.zeros(2), 1.0)
    assert np.all(np.isfinite(new_theta)) and np.all(np.isfinite(new_beta))
    assert new_sigma2 > 0
    before = estimate.loglik(prob, theta, np.zeros(2), 1.0)
    assert estimate.loglik(prob, new_theta, new_beta, new_sigma2) >= before


# -- back to user coordinates ----------------------------------------------------------------
def test_estimates_at_maps_centred_estimates_to_the_users_columns(reference, helpers):
    """Estimates from the statistics around the fit's centre equal those at centre 0."""
    from streamlmm import MixedLM

    case = reference("sleepstudy_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_one(model)
    centred, _ = estimate.make_problem(model._stats, model._design, model.reml)
    assert np.any(centred.c != 0)
    got = helpers.estimates_at(model, case.theta)
    prob = case.user_problem()
    pr = prob.profile(case.theta)
    B, K = estimate.group_estimates(prob, pr, pool=True)
    RXinv = np.linalg.inv(pr.RX)
    np.testing.assert_allclose(got["fixef"], pr.beta, rtol=1e-10)
    np.testing.assert_allclose(got["vcov"], pr.sigma2 * RXinv @ RXinv.T, rtol=1e-9)
    np.testing.assert_allclose(got["theta"], case.theta, rtol=1e-10)
    st = case.stats()
    for i, key in enumerate(st.keys):
        np.testing.assert_allclose(got["b"][key], B[i], rtol=1e-9)
        np.testing.assert_allclose(got["condvar"][key], K[i], rtol=1e-9)


def test_a_small_slope_variance_is_not_mistaken_for_a_boundary_fit():
    """d(θ) is even in a diagonal entry of Λ whose column is otherwise empty, so the face
    where it is 0 is stationary and Newton started there stays there. The optimum just
    inside (a slope SD of 0.005 under an intercept SD of 6, θ₃ ≈ 0.014) must still be
    found: started on the face, the fit ends inside, and no θ₃ beats it."""
    rng = np.random.default_rng(7)
    n, G = 300_000, 3_000
    g = rng.integers(0, G, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    b0, b1 = rng.normal(scale=6.0, size=G), rng.normal(scale=0.005, size=G)
    y = 1 + 0.5 * x1 - x2 + b0[g] + b1[g] * x1 + rng.normal(size=n)
    st = GroupStats(numeric_design("y ~ x1 + x2 + (1 + x1 | g)"))
    A = np.column_stack([np.ones(n), x1, x2])
    st.add(st.rows(g.tolist()), A, y, np.ones(n), np.zeros(n))
    prob, _ = estimate.make_problem(st, st.spec, True)
    start = np.array([6.0, 0.0, 0.0])  # on the face θ₃ = 0
    pr, summary = estimate.fit_theta(prob, start)
    assert pr.theta[2] > 1e-3, (pr.theta, summary.messages)
    for t3 in (1e-4, 1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 1e-1):
        probe = pr.theta.copy()
        probe[2] = t3
        other = prob.profile(probe)
        assert other is None or other.criterion >= pr.criterion - 1e-9 * abs(pr.criterion), t3


def test_a_local_minimum_above_no_random_effects_is_left(dense_lmm):
    """A data set (found by Hypothesis) whose ML profile has a local minimum at θ ≈ 1.89
    (d = 52.696) that the descent from the EM start reaches, and its global minimum at
    the boundary θ = 0 (d = 51.590): the fit must end at the lower one."""
    import warnings

    from streamlmm import MixedLM

    df = pd.DataFrame(
        {
            "g": ["k0"] * 3 + ["k1"] * 4 + ["k2"] * 4,
            "x1": [0.4513481, 0.4513481, 0.4513481, 2.4705994, 2.4146597, 2.8844996,
                   3.2593938, 2.1433597, 2.3762508, 2.8608477, 3.3882089],
            "y": [0.5014969, -0.1153528, -0.6968890, 3.0491858, 2.2437034, 1.7249376,
                  1.8750402, 3.3849726, 0.5076137, 4.2642083, 0.7944643],
            "w": [1, 1, 1, 1, 1, 1, 1, 3, 1, 1, 3],
        }
    )  # fmt: skip
    m = MixedLM("y ~ x1 + (1 | g)", "ML")
    m.learn_many(df[["g", "x1"]], df.y, df.w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = m.fit().snapshot()
    dense = dense_lmm.from_frame(m._design, df, df.w.to_numpy())
    at = {t: dense.at(np.array([t]), False).criterion for t in (0.0, 1.0, 1.8932)}
    assert at[1.8932] < at[1.0] and at[0.0] < at[1.8932] - 1.0  # two minima, 0 lower
    assert s.theta.tolist() == [0.0] and s.converged
    assert s.criterion == pytest.approx(at[0.0], rel=1e-10)
