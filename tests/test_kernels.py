"""numba kernels against plain numpy and the dense marginal model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamlmm import estimate, kernels
from streamlmm.design import numeric_design
from streamlmm.stats import GroupStats

FORMULA = numeric_design("y ~ x1 + x2 + (1 + x1 | g)")


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
    """The statistics of ``data``, every event in order."""
    st = GroupStats(FORMULA)
    A = helpers.union_matrix(FORMULA, data)
    st.add(st.rows(list(data.g)), A, data.y.to_numpy(), data.w.to_numpy(float), np.zeros(len(data)))
    return st


# centres of the cross-products: the user's coordinates, the fit's default, an arbitrary one
CENTRES = ["zero", "default", "other"]


def _centre(st, which):
    if which == "zero":
        return np.zeros(FORMULA.k + 1)
    if which == "default":
        return st.center()
    return np.array([0.0, 1.7, -0.4, 3.1])  # the intercept column is never shifted


@pytest.fixture(scope="module", params=CENTRES)
def blocks(request, stats):
    """``(c, Blocks)``: the fit's per-group blocks around each centre in turn."""
    c = _centre(stats, request.param)
    return c, stats.cross_products(c, FORMULA.zi, FORMULA.xi)


LAMBDAS = [
    np.array([[1.3, 0.0], [0.4, 0.6]]),
    np.array([[0.0, 0.0], [0.0, 0.9]]),  # singular Λ (boundary)
    np.array([[2.0, 0.0], [-1.0, 0.0]]),
]


def _naive(data, helpers, c):
    """Per-group ``ZZ, ZX, Zy`` and global ``XX, Xy, yy, n`` around ``c`` by plain numpy
    on the raw events, keyed by group."""
    f = FORMULA
    A = helpers.union_matrix(f, data) - c[: f.k]
    y = data.y.to_numpy() - c[f.k]
    w = data.w.to_numpy(float)
    X, Z = A[:, f.xi], A[:, f.zi]
    per = {}
    for key in dict.fromkeys(data.g):
        s = (data.g == key).to_numpy()
        Zw = Z[s].T * w[s]
        per[key] = (Zw @ Z[s], Zw @ X[s], Zw @ y[s])
    return per, ((X.T * w) @ X, (X.T * w) @ y, (w * y) @ y, w.sum())


def _group(F, r):
    q, p = FORMULA.q, FORMULA.p
    Fr = F[r]
    return (
        Fr[: q * q].reshape(q, q),
        Fr[q * q : q * q + q * p].reshape(q, p),
        Fr[q * q + q * p :],
    )


def test_packed_index_is_a_symmetric_bijection():
    for m in range(1, 6):
        P = kernels.packed_index(m)
        np.testing.assert_array_equal(P, P.T)
        assert sorted(P[np.triu_indices(m)].tolist()) == list(range(m * (m + 1) // 2))


def test_cross_products_equal_numpy(stats, blocks, data, helpers):
    """``F[g] = [ZZ, ZX, Zy]`` and ``XX, Xy, yy, n`` around c equal the raw sums."""
    c, b = blocks
    per, (XX, Xy, yy, n) = _naive(data, helpers, c)
    assert b.F.shape == (stats.n_groups, FORMULA.q * (FORMULA.q + FORMULA.p + 1))
    assert b.F.flags.c_contiguous
    for key, want in per.items():
        got = _group(b.F, stats.row(key))
        for name, g, w in zip(("ZZ", "ZX", "Zy"), got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * np.abs(w).max(), err_msg=name)
    np.testing.assert_allclose(b.XX, XX, rtol=1e-12, atol=1e-12 * np.abs(XX).max())
    np.testing.assert_allclose(b.Xy, Xy, rtol=1e-12, atol=1e-12 * np.abs(Xy).max())
    assert b.yy == pytest.approx(yy, rel=1e-12)
    assert b.n == n


@pytest.mark.parametrize("lam", LAMBDAS)
def test_pls_sums_equal_numpy(blocks, lam):
    _, bl = blocks
    F, q, p = bl.F, FORMULA.q, FORMULA.p
    got = kernels.pls_sums(F, q, p, lam, parallel=False)
    want = dict(logdet=0.0, cu2=0.0, A=0, c=0)
    for r in range(F.shape[0]):
        ZZ, ZX, Zy = _group(F, r)
        L = np.linalg.cholesky(lam.T @ ZZ @ lam + np.eye(q))
        RZX = np.linalg.solve(L, lam.T @ ZX)
        cu = np.linalg.solve(L, lam.T @ Zy)
        want["logdet"] += np.log(np.diag(L)).sum()
        want["A"] = want["A"] + RZX.T @ RZX
        want["c"] = want["c"] + RZX.T @ cu
        want["cu2"] += cu @ cu
    for name in want:
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-12, err_msg=name)
    # the parallel kernel sums the same chunks in the same order
    par = kernels.pls_sums(F, q, p, lam, parallel=True)
    for name in want:
        np.testing.assert_array_equal(getattr(par, name), getattr(got, name), err_msg=name)


@pytest.mark.parametrize("lam", LAMBDAS)
def test_gradient_terms_equal_numpy(blocks, lam):
    """The one-pass gradient sums, contracted at β and C⁻¹, equal the per-group formulas
    ``Σ M⁻¹Λ'ZZ``, ``Σ Λ'B C⁻¹B'`` and ``Σ (Z'res) u'`` computed directly."""
    _, bl = blocks
    F, q, p = bl.F, FORMULA.q, FORMULA.p
    beta = np.array([0.7, 0.3, -1.2])
    Cinv = np.array([[2.0, 0.3, -0.1], [0.3, 1.0, 0.2], [-0.1, 0.2, 0.5]])
    s = kernels.pls_sums(F, q, p, lam, parallel=False, grad=True)
    got = kernels.gradient_terms(s, q, p, lam, beta, Cinv)
    want = [np.zeros((q, q)) for _ in range(3)]
    for r in range(F.shape[0]):
        ZZ, ZX, Zy = _group(F, r)
        M = lam.T @ ZZ @ lam + np.eye(q)
        u = np.linalg.solve(M, lam.T @ (Zy - ZX @ beta))
        B = ZX - ZZ @ lam @ np.linalg.solve(M, lam.T @ ZX)
        res = Zy - ZX @ beta - ZZ @ lam @ u
        want[0] += np.linalg.solve(M, lam.T @ ZZ)
        want[1] += lam.T @ B @ Cinv @ B.T
        want[2] += np.outer(res, u)
    for name, g, w in zip(("G1", "G2", "G3"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * np.abs(w).max(), err_msg=name)
    # the same pass without the gradient gives the same criterion sums, bitwise
    plain = kernels.pls_sums(F, q, p, lam, parallel=False)
    for name in ("logdet", "cu2", "A", "c"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(s, name), err_msg=name)


def test_pls_sums_do_not_depend_on_the_number_of_chunks():
    """More groups than one chunk: serial and parallel give bitwise the same sums."""
    rng = np.random.default_rng(0)
    G, q, p = 2 * kernels.CHUNK + 17, 2, 3
    Z = rng.normal(size=(G, 6, q))
    X = rng.normal(size=(G, 6, p))
    y = rng.normal(size=(G, 6))
    F = np.concatenate(
        [
            np.einsum("gia,gib->gab", Z, Z).reshape(G, -1),
            np.einsum("gia,gij->gaj", Z, X).reshape(G, -1),
            np.einsum("gia,gi->ga", Z, y),
        ],
        axis=1,
    )
    lam = LAMBDAS[0]
    a = kernels.pls_sums(F, q, p, lam, parallel=False, grad=True)
    b = kernels.pls_sums(F, q, p, lam, parallel=True, grad=True)
    for name in ("logdet", "cu2", "A", "c", "T", "WY", "WW"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _blups(st, c, lam, beta, pool=True):
    f = FORMULA
    return kernels.blups(st.M, st.n_groups, st.vpos, c, f.zi, f.xi, f.k, st.P, lam, beta, pool=pool)


@pytest.mark.parametrize("which", CENTRES)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_blups_and_condcov_equal_dense(stats, data, dense_lmm, lam, which):
    """b_g = ΛΛ'Z'V⁻¹(y − Xβ) for any β, and K_g = Λ(L_gL_g')⁻¹Λ' = D − DZ'V⁻¹ZD, from
    the statistics around any centre (b = T_z b̃ moves the centre into the intercept)."""
    f = FORMULA
    c = _centre(stats, which)
    Tz = np.eye(f.q)
    Tz[0] -= c[f.zi]
    Tx = np.eye(f.p)
    Tx[0] -= c[f.xi]
    beta_u = np.array([0.7, 0.3, -1.2])  # the user's β; the centred one maps onto it
    beta = np.linalg.solve(Tx, beta_u - c[-1] * np.eye(f.p)[0])
    lam_c = np.linalg.solve(Tz, lam)  # Λ̃ with T_zΛ̃ = Λ (not triangular in general)
    lam_c = estimate._blockwise_lower(lam_c, f.blocks)
    B, K = _blups(stats, c, lam_c, beta)
    B, K = B @ Tz.T, np.einsum("ij,gjk,lk->gil", Tz, K, Tz)
    beta = beta_u
    dense = dense_lmm.from_frame(f, data, data.w.to_numpy())
    D = lam @ lam.T
    for key, ix in dense.groups.items():
        r = stats.row(key)
        Xg, Zg, yg = dense.X[ix], dense.Z[ix], dense.y[ix]
        V = np.eye(len(ix)) + Zg @ D @ Zg.T
        b = D @ Zg.T @ np.linalg.solve(V, yg - Xg @ beta)
        C = D - D @ Zg.T @ np.linalg.solve(V, Zg @ D)
        np.testing.assert_allclose(B[r], b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(K[r], C, rtol=1e-10, atol=1e-12)


def test_em_sums_equal_numpy(blocks, stats):
    c, bl = blocks
    F, q, p = bl.F, FORMULA.q, FORMULA.p
    lam = LAMBDAS[0]
    beta = np.array([0.7, 0.3, -1.2])
    Sbb, SK, rss, trK, T = kernels.em_sums(F, q, p, lam, beta)
    B, K = _blups(stats, c, lam, beta)
    want_rss = want_trK = 0.0
    want_T = np.zeros(p)
    for r in range(F.shape[0]):
        ZZ, ZX, Zy = _group(F, r)
        b = B[r]
        want_rss += b @ ZZ @ b - 2 * b @ (Zy - ZX @ beta)
        want_trK += np.trace(ZZ @ K[r])
        want_T += ZX.T @ b
    np.testing.assert_allclose(Sbb, B.T @ B, rtol=1e-12)
    np.testing.assert_allclose(SK, K.sum(axis=0), rtol=1e-12)
    assert rss == pytest.approx(want_rss, rel=1e-10)
    assert trK == pytest.approx(want_trK, rel=1e-12)
    np.testing.assert_allclose(T, want_T, rtol=1e-10)


def _predict(st, rows, A, c, fac, lam, beta):
    f = FORMULA
    out = np.empty(len(rows))
    kernels.predict_rows(
        st.M, np.asarray(rows), A, c, np.asarray(fac, float), st.vpos, f.zi, f.xi, f.k, st.P,
        lam, beta, out,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("which", CENTRES)
def test_predict_rows_fixed_part_plus_blup(stats, which):
    """ŷ = c_y + (x − c_x)'β̃ + (z − c_z)'b̃_g with b̃ the BLUP of the blocks around c."""
    st, f = stats, FORMULA
    c = _centre(st, which)
    lam, beta = LAMBDAS[0], np.array([0.7, 0.3, -1.2])
    B, _ = _blups(st, c, lam, beta)
    A = np.array([[1.0, 2.0, -1.0], [1.0, -0.5, 0.25]])
    out = _predict(st, [3, -1], A, c, [1.0, 1.0], lam, beta)
    Ac = A - c[: f.k]
    assert out[0] == pytest.approx(c[-1] + Ac[0, f.xi] @ beta + Ac[0, f.zi] @ B[3], rel=1e-13)
    assert out[1] == pytest.approx(c[-1] + Ac[1, f.xi] @ beta, rel=1e-13)
    # one event at a time gives the same
    work = np.empty(kernels.scratch_size(f.q, f.p))
    b = np.empty(f.q)
    one = kernels.predict_event(
        st.M, 3, A[0], c, 1.0, st.vpos, f.zi, f.xi, f.k, st.P, lam, beta, b, work
    )
    assert one == out[0]
    np.testing.assert_allclose(b, B[3], rtol=1e-13)


def test_predict_rows_takes_the_centre_for_a_missing_feature(stats):
    st = stats
    c = _centre(st, "other")
    lam, beta = LAMBDAS[0], np.array([0.7, 0.3, -1.2])
    A = np.array([[1.0, np.nan, -1.0], [1.0, c[1], -1.0]])
    out = _predict(st, [3, 3], A, c, [1.0, 1.0], lam, beta)
    assert out[0] == out[1]


def test_predict_rows_scales_a_group_by_its_forgetting_factor(stats):
    st, f = stats, FORMULA
    lam, beta = LAMBDAS[0], np.array([0.7, 0.3, -1.2])
    c = np.zeros(f.k + 1)
    half = st.copy()
    half.M[:, 0] *= 0.5  # n and the co-moments halve, the means stay
    half.M[:, 1 + half.m :] *= 0.5
    B_half, _ = _blups(half, c, lam, beta)
    A = np.array([[1.0, 2.0, -1.0]])
    out = _predict(st, [3], A, c, [0.5], lam, beta)
    assert out[0] == pytest.approx(A[0] @ beta + A[0, f.zi] @ B_half[3], rel=1e-13)


def test_profile_equals_dense_at_several_theta(stats, data, dense_lmm):
    f = FORMULA
    dense = dense_lmm.from_frame(f, data, data.w.to_numpy())
    for lam in LAMBDAS[:1] + [np.array([[0.3, 0.0], [0.1, 2.0]])]:
        for reml in (True, False):
            prob, _ = estimate.make_problem(stats, f, reml, center=np.zeros(f.k + 1))
            theta = prob.theta(lam)
            pr = prob.profile(theta)
            d = dense.at(theta, reml)
            assert pr.criterion == pytest.approx(d.criterion, rel=1e-11)
            np.testing.assert_allclose(pr.beta, d.beta, rtol=1e-9)
            assert pr.sigma2 == pytest.approx(d.sigma2, rel=1e-10)


# -- the blocked (structure-of-arrays) pass for any (q, p) ------------------------------------
def _random_blocks(rng, G, q, p, empty=(), least=1):
    """``F`` of ``G`` groups with ``n_g`` ~ least..8 events (0 for the groups in ``empty``)."""
    F = np.zeros((G, q * q + q * p + q))
    for g in range(G):
        n = 0 if g in empty else int(rng.integers(least, 9))
        Z = np.c_[np.ones(n), rng.normal(size=(n, q - 1))]
        X = np.c_[np.ones(n), rng.normal(size=(n, p - 1))]
        y = rng.normal(size=n)
        F[g] = np.r_[(Z.T @ Z).ravel(), (Z.T @ X).ravel(), Z.T @ y]
    return F


def _numpy_sums(F, q, p, lam):
    """Every sum of :class:`kernels.PlsSums` group by group, with numpy's Cholesky."""
    k, m = p + 1, q * (p + 1)
    out = dict(logdet=0.0, cu2=0.0, A=np.zeros((p, p)), c=np.zeros(p), T=np.zeros((q, q)))
    out.update(WY=np.zeros((m, m)), WW=np.zeros((m, m)))
    for Fr in F:
        ZZ = Fr[: q * q].reshape(q, q)
        ZX = Fr[q * q : q * q + q * p].reshape(q, p)
        Zy = Fr[q * q + q * p :]
        M = lam.T @ ZZ @ lam + np.eye(q)
        L = np.linalg.cholesky(M)
        RZX = np.linalg.solve(L, lam.T @ ZX)
        cu = np.linalg.solve(L, lam.T @ Zy)
        out["logdet"] += np.log(np.diag(L)).sum()
        out["cu2"] += cu @ cu
        out["A"] += RZX.T @ RZX
        out["c"] += RZX.T @ cu
        Y = np.linalg.solve(L.T, np.c_[RZX, cu])
        W = np.c_[ZX, Zy] - ZZ @ lam @ Y
        out["T"] += np.linalg.solve(M, lam.T @ ZZ)
        out["WY"] += np.outer(W.ravel(), Y.ravel())
        out["WW"] += np.outer(W.ravel(), W.ravel())
    assert k * q == m
    return out


def _lower(rng, q, zero_diag=False):
    lam = np.tril(rng.normal(size=(q, q)))
    lam[np.diag_indices(q)] = np.abs(np.diag(lam)) + 0.2
    if zero_diag:
        lam[0, 0] = 0.0  # singular Λ: a boundary fit
    return lam


B = kernels.BLOCK
SIZES = [1, B - 1, B + 1, kernels.CHUNK + 3]


@pytest.mark.parametrize("q, p", [(1, 1), (1, 4), (2, 2), (2, 3), (3, 1), (3, 4)])
@pytest.mark.parametrize("G", SIZES)
def test_blocked_sums_equal_numpy(q, p, G):
    """The blocked pass equals a group-by-group numpy computation, for group counts that
    are not multiples of the block, with empty groups and a singular Λ; serial and
    parallel give the same bits."""
    rng = np.random.default_rng(100 * q + 10 * p + G)
    F = _random_blocks(rng, G, q, p, empty={0, G // 2})
    for lam in (_lower(rng, q), _lower(rng, q, zero_diag=True)):
        got = kernels.pls_sums(F, q, p, lam, parallel=False, grad=True)
        want = _numpy_sums(F, q, p, lam)
        for name, w in want.items():
            g = getattr(got, name)
            scale = np.abs(w).max() if np.ndim(w) else abs(w)
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * scale, err_msg=name)
        par = kernels.pls_sums(F, q, p, lam, parallel=True, grad=True)
        plain = kernels.pls_sums(F, q, p, lam, parallel=False, Fb=kernels.by_block(F))
        for name in want:
            np.testing.assert_array_equal(getattr(par, name), getattr(got, name), err_msg=name)
        for name in ("logdet", "cu2", "A", "c"):
            np.testing.assert_array_equal(getattr(plain, name), getattr(got, name), err_msg=name)


def test_blocked_logdet_of_huge_determinants():
    """Σ log|L_g| stays finite and exact when the products of pivots would overflow."""
    rng = np.random.default_rng(5)
    q, p, G = 2, 2, kernels.CHUNK + 3
    F = _random_blocks(rng, G, q, p, least=4) * 1e40  # pivots ~1e20: a few overflow
    lam = _lower(rng, q)
    got = kernels.pls_sums(F, q, p, lam, parallel=False)
    want = _numpy_sums(F, q, p, lam)
    assert np.isfinite(got.logdet)
    assert got.logdet == pytest.approx(want["logdet"], rel=1e-12)


def test_blocked_pivot_not_positive_is_nan():
    """A group whose Λ'ZZΛ + I is not positive definite (a non-positive pivot) makes
    Σ log|L_g| NaN, wherever it is in its block, as :func:`kernels._chol` does."""
    rng = np.random.default_rng(6)
    q, p = 2, 3
    for G, bad in ((1, 0), (B + 1, B), (kernels.CHUNK + 3, 7)):
        F = _random_blocks(rng, G, q, p)
        F[bad, 0] = -50.0  # ZZ[0, 0] < 0: not a cross-product
        for parallel in (False, True):
            s = kernels.pls_sums(F, q, p, np.eye(q), parallel=parallel, grad=True)
            assert np.isnan(s.logdet)
        assert np.isfinite(kernels.pls_sums(F[bad + 1 :], q, p, np.eye(q), False).logdet)


@pytest.mark.parametrize("q, p", [(1, 1), (2, 3), (3, 4)])
@pytest.mark.parametrize("G", SIZES)
def test_blocked_em_sums_equal_numpy(q, p, G):
    """The blocked EM sums equal ``Σ bb', Σ K, Σ(b'ZZb − 2b'r), Σ tr(ZZ K), Σ ZX'b`` with
    ``K = Λ(Λ'ZZΛ + I)⁻¹Λ'`` and ``b = K r`` by numpy; an empty group adds ``K = ΛΛ'``,
    the padding of the last block nothing."""
    rng = np.random.default_rng(7 * q + p + G)
    F = _random_blocks(rng, G, q, p, empty={0, G // 2})
    beta = rng.normal(size=p)
    for lam in (_lower(rng, q), _lower(rng, q, zero_diag=True)):
        want = [np.zeros((q, q)), np.zeros((q, q)), 0.0, 0.0, np.zeros(p)]
        for Fr in F:
            ZZ = Fr[: q * q].reshape(q, q)
            ZX = Fr[q * q : q * q + q * p].reshape(q, p)
            r = Fr[q * q + q * p :] - ZX @ beta
            K = lam @ np.linalg.solve(lam.T @ ZZ @ lam + np.eye(q), lam.T)
            b = K @ r
            want[0] += np.outer(b, b)
            want[1] += K
            want[2] += b @ ZZ @ b - 2 * b @ r
            want[3] += np.trace(ZZ @ K)
            want[4] += ZX.T @ b
        got = kernels.em_sums(F, q, p, lam, beta)
        for name, g, w in zip(("Sbb", "SK", "rss", "trK", "T"), got, want):
            scale = np.abs(w).max()
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * scale, err_msg=name)
