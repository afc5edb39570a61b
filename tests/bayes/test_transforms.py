"""Stan's correlation-matrix coordinates: round trip, log-Jacobian, gradient (< 1 s)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from streamlmm.bayes.transforms import (
    corr_cholesky,
    corr_cholesky_grad,
    corr_from_unconstrained,
    n_corr,
    unconstrained_from_corr,
)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_round_trip_and_unit_diagonal(K):
    rng = np.random.default_rng(K)
    for _ in range(5):
        y = rng.normal(size=n_corr(K))
        L, _ = corr_from_unconstrained(y, K)
        R = L @ L.T
        assert np.allclose(np.diag(R), 1.0)
        assert np.all(np.linalg.eigvalsh(R) > 0)
        np.testing.assert_allclose(unconstrained_from_corr(R), y, atol=1e-9)


def _free(L):
    K = L.shape[0]
    return np.array([L[i, j] for i in range(1, K) for j in range(i)])


@pytest.mark.parametrize("K", [2, 3, 4])
def test_log_jacobian_is_that_of_the_map_to_the_free_entries(K):
    """log|det ∂(L's strictly lower entries)/∂y| by finite differences."""
    rng = np.random.default_rng(10 + K)
    y = rng.normal(size=n_corr(K)) * 0.7
    _, lj = corr_from_unconstrained(y, K)
    h = 1e-6
    J = np.column_stack(
        [
            (
                _free(corr_from_unconstrained(y + h * e, K)[0])
                - _free(corr_from_unconstrained(y - h * e, K)[0])
            )
            / (2 * h)
            for e in np.eye(n_corr(K))
        ]
    )
    assert abs(np.linalg.slogdet(J)[1] - lj) < 1e-6


@njit
def _f_and_grad(y, K, W):
    """f(L) = Σ W∘L, plus the log-Jacobian; and its gradient in y."""
    L = np.zeros((K, K))
    lj = corr_cholesky(y, 0, K, L, 0)
    f = lj
    for i in range(K):
        for j in range(K):
            f += W[i, j] * L[i, j]
    g = np.zeros(y.shape[0])
    corr_cholesky_grad(y, 0, K, W, 0, g)
    return f, g


@pytest.mark.parametrize("K", [2, 3, 4])
def test_gradient_matches_finite_differences(K):
    rng = np.random.default_rng(20 + K)
    W = np.tril(rng.normal(size=(K, K)))
    y = rng.normal(size=n_corr(K))
    _, g = _f_and_grad(y, K, W)
    h = 1e-6
    fd = np.array(
        [
            (_f_and_grad(y + h * e, K, W)[0] - _f_and_grad(y - h * e, K, W)[0]) / (2 * h)
            for e in np.eye(n_corr(K))
        ]
    )
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


def test_extreme_coordinates_stay_finite():
    L, lj = corr_from_unconstrained(np.array([40.0, -40.0, 40.0]), 3)
    assert np.all(np.isfinite(L)) and math.isfinite(lj)
    with pytest.raises(ValueError, match="needs 3 coordinates"):
        corr_from_unconstrained(np.zeros(2), 3)
