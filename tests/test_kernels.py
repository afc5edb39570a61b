"""numba kernels against plain numpy and the dense marginal model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamlmm import estimate, kernels
from streamlmm.formula import parse_formula
from streamlmm.stats import GroupStats

FORMULA = parse_formula("y ~ x1 + x2 + (1 + x1 | g)")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    n, G = 240, 13
    g = rng.integers(0, G, n)
    x1 = rng.normal(0, 1.5, n)
    x2 = rng.normal(0, 1, n)
    b = rng.normal(0, [2.0, 0.7], (G, 2))
    y = 1 + 0.5 * x1 - x2 + b[g, 0] + b[g, 1] * x1 + rng.normal(0, 1, n)
    w = rng.integers(1, 4, n)
    return pd.DataFrame({"g": [f"k{i}" for i in g], "x1": x1, "x2": x2, "y": y, "w": w})


@pytest.fixture(scope="module")
def stats(data, helpers):
    """Statistics in the user's coordinates (shift zero)."""
    st = GroupStats(FORMULA)
    st.shift = np.zeros(FORMULA.k + 1)
    A = helpers.union_matrix(FORMULA, data)
    st.add(st.rows(list(data.g)), A, data.y.to_numpy(), data.w.to_numpy(float), np.zeros(len(data)))
    return st


LAMBDAS = [
    np.array([[1.3, 0.0], [0.4, 0.6]]),
    np.array([[0.0, 0.0], [0.0, 0.9]]),  # singular Λ (boundary)
    np.array([[2.0, 0.0], [-1.0, 0.0]]),
]


def _blocks(st, r):
    f = st.formula
    M = st.active[r][st.P]
    return (
        M[np.ix_(f.zi, f.zi)],
        M[np.ix_(f.zi, f.xi)],
        M[f.zi, st.yi],
        M[np.ix_(f.xi, f.xi)],
        M[f.xi, st.yi],
        M[st.yi, st.yi],
    )


def test_packed_index_is_a_symmetric_bijection():
    for m in range(1, 6):
        P = kernels.packed_index(m)
        np.testing.assert_array_equal(P, P.T)
        assert sorted(P[np.triu_indices(m)].tolist()) == list(range(1, 1 + m * (m + 1) // 2))


@pytest.mark.parametrize("lam", LAMBDAS)
def test_pls_sums_equal_numpy(stats, lam):
    st, f = stats, stats.formula
    logdet, A, c, s, XX, Xy, yy, n = kernels.pls_sums(
        st.S, st.n_groups, st.P, f.zi, f.xi, st.yi, lam
    )
    want = dict(logdet=0.0, A=0, c=0, s=0.0, XX=0, Xy=0, yy=0.0, n=0.0)
    for r in range(st.n_groups):
        ZZ, ZX, Zy, XXg, Xyg, yyg = _blocks(st, r)
        L = np.linalg.cholesky(lam.T @ ZZ @ lam + np.eye(f.q))
        RZX = np.linalg.solve(L, lam.T @ ZX)
        cu = np.linalg.solve(L, lam.T @ Zy)
        want["logdet"] += np.log(np.diag(L)).sum()
        want["A"] = want["A"] + RZX.T @ RZX
        want["c"] = want["c"] + RZX.T @ cu
        want["s"] += cu @ cu
        want["XX"] = want["XX"] + XXg
        want["Xy"] = want["Xy"] + Xyg
        want["yy"] += yyg
        want["n"] += st.active[r, 0]
    for name, got in zip(want, (logdet, A, c, s, XX, Xy, yy, n)):
        np.testing.assert_allclose(got, want[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("lam", LAMBDAS)
def test_blups_and_condcov_equal_dense(stats, data, dense_lmm, lam):
    """b_g = ΛΛ'Z'V⁻¹(y − Xβ) for any β, and K_g = Λ(L_gL_g')⁻¹Λ' = D − DZ'V⁻¹ZD."""
    st, f = stats, stats.formula
    beta = np.array([0.7, 0.3, -1.2])
    B, K = kernels.blups(st.S, st.n_groups, st.P, f.zi, f.xi, st.yi, lam, beta)
    dense = dense_lmm.from_frame(f, data, data.w.to_numpy())
    D = lam @ lam.T
    for key, ix in dense.groups.items():
        r = st.row(key)
        Xg, Zg, yg = dense.X[ix], dense.Z[ix], dense.y[ix]
        V = np.eye(len(ix)) + Zg @ D @ Zg.T
        b = D @ Zg.T @ np.linalg.solve(V, yg - Xg @ beta)
        C = D - D @ Zg.T @ np.linalg.solve(V, Zg @ D)
        np.testing.assert_allclose(B[r], b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(K[r], C, rtol=1e-10, atol=1e-12)


def test_em_sums_equal_numpy(stats):
    st, f = stats, stats.formula
    lam = LAMBDAS[0]
    beta = np.array([0.7, 0.3, -1.2])
    Sbb, SK, rss, trK, T = kernels.em_sums(st.S, st.n_groups, st.P, f.zi, f.xi, st.yi, lam, beta)
    B, K = kernels.blups(st.S, st.n_groups, st.P, f.zi, f.xi, st.yi, lam, beta)
    want_rss = want_trK = 0.0
    want_T = np.zeros(f.p)
    for r in range(st.n_groups):
        ZZ, ZX, Zy, *_ = _blocks(st, r)
        b = B[r]
        want_rss += b @ ZZ @ b - 2 * b @ (Zy - ZX @ beta)
        want_trK += np.trace(ZZ @ K[r])
        want_T += ZX.T @ b
    np.testing.assert_allclose(Sbb, B.T @ B, rtol=1e-12)
    np.testing.assert_allclose(SK, K.sum(axis=0), rtol=1e-12)
    assert rss == pytest.approx(want_rss, rel=1e-10)
    assert trK == pytest.approx(want_trK, rel=1e-12)
    np.testing.assert_allclose(T, want_T, rtol=1e-10)


def test_predict_rows_fixed_part_plus_blup(stats):
    st, f = stats, stats.formula
    lam, beta = LAMBDAS[0], np.array([0.7, 0.3, -1.2])
    B, _ = kernels.blups(st.S, st.n_groups, st.P, f.zi, f.xi, st.yi, lam, beta)
    A = np.array([[1.0, 2.0, -1.0], [1.0, -0.5, 0.25]])
    shift = np.array([0.0, 0.0, 0.0, 10.0])  # only the response is shifted here
    rows = np.array([3, -1])
    out = np.empty(2)
    kernels.predict_rows(st.S, rows, A, shift, np.ones(2), st.P, f.zi, f.xi, st.yi, lam, beta, out)
    assert out[0] == pytest.approx(10.0 + A[0] @ beta + A[0, f.zi] @ B[3], rel=1e-13)
    assert out[1] == pytest.approx(10.0 + A[1] @ beta, rel=1e-13)


def test_predict_rows_scales_a_group_by_its_forgetting_factor(stats):
    st, f = stats, stats.formula
    lam, beta = LAMBDAS[0], np.array([0.7, 0.3, -1.2])
    half = st.S * 0.5
    B_half, _ = kernels.blups(half, st.n_groups, st.P, f.zi, f.xi, st.yi, lam, beta)
    A = np.array([[1.0, 2.0, -1.0]])
    shift = np.zeros(4)
    out = np.empty(1)
    kernels.predict_rows(
        st.S, np.array([3]), A, shift, np.array([0.5]), st.P, f.zi, f.xi, st.yi, lam, beta, out
    )
    assert out[0] == pytest.approx(A[0] @ beta + A[0, f.zi] @ B_half[3], rel=1e-13)


def test_profile_equals_dense_at_several_theta(stats, data, dense_lmm):
    dense = dense_lmm.from_frame(FORMULA, data, data.w.to_numpy())
    for lam in LAMBDAS[:1] + [np.array([[0.3, 0.0], [0.1, 2.0]])]:
        theta = estimate.theta_of(lam)
        for reml in (True, False):
            pr = estimate.profile(stats, theta, reml)
            d = dense.at(theta, reml)
            assert pr.criterion == pytest.approx(d.criterion, rel=1e-11)
            np.testing.assert_allclose(pr.beta, d.beta, rtol=1e-9)
            assert pr.sigma2 == pytest.approx(d.sigma2, rel=1e-10)
