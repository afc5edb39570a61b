"""Property tests (hypothesis): random groupings, group sizes 1..n, integer weights.

Invariances are checked on the statistics and at random θ, where they are exact up to
rounding; agreement with the dense marginal likelihood checks the values themselves.
Edge cases (one-event groups, constant-x groups, boundary fits) must never raise.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlmm import MixedLM, estimate
from streamlmm.design import numeric_design

FORMULAS = ["y ~ x1 + (1 | g)", "y ~ x1 + x2 + (1 + x1 | g)", "y ~ 0 + x1 + (1 + x1 | g)"]

SETTINGS = settings(
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def lmm_data(draw, formula: str | None = None, max_groups: int = 8, max_size: int = 10):
    """A small grouped data set: sizes 1..max_size, weights 1..3, some constant-x groups,
    str/int/mixed keys and a random-effect scale that may be zero (a boundary fit)."""
    formula = formula or draw(st.sampled_from(FORMULAS))
    sizes = draw(st.lists(st.integers(1, max_size), min_size=2, max_size=max_groups))
    constant = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    key_style = draw(st.sampled_from(["str", "int", "mixed"]))
    re_scale = draw(st.sampled_from([0.0, 0.3, 2.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    keys = {
        "str": [f"k{i}" for i in range(len(sizes))],
        "int": [int(i * 7 - 3) for i in range(len(sizes))],
        "mixed": [i if i % 2 else f"s{i}" for i in range(len(sizes))],
    }[key_style]
    rows = []
    for key, size, const in zip(keys, sizes, constant):
        b0, b1 = rng.normal(0, re_scale, 2)
        x1 = np.full(size, rng.normal(2, 1)) if const else rng.normal(2, 1, size)
        x2 = rng.normal(0, 1, size)
        y = 1 + 0.5 * x1 - x2 + b0 + b1 * x1 + rng.normal(0, 1, size)
        for i in range(size):
            rows.append((key, x1[i], x2[i], y[i]))
    frame = pd.DataFrame(rows, columns=["g", "x1", "x2", "y"])
    if key_style == "mixed":
        frame["g"] = frame["g"].astype(object)
    frame["w"] = draw(st.lists(st.integers(1, 3), min_size=len(frame), max_size=len(frame)))
    return formula, frame


def _features(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["g", "x1", "x2"]]


def _random_theta(rng, q: int) -> np.ndarray:
    lam = np.tril(rng.normal(0, 1, (q, q)))
    np.fill_diagonal(lam, rng.uniform(0.05, 2.0, q))
    return lam[estimate.theta_index([tuple(range(q))], q)]


def _enough(formula: str, frame: pd.DataFrame) -> bool:
    p = len(numeric_design(formula).fixed)
    return len(frame) >= p + 2


def _assert_estimates_equal(a: dict, b: dict, rtol: float) -> None:
    assert a["criterion"] == pytest.approx(b["criterion"], rel=rtol)
    np.testing.assert_allclose(a["fixef"], b["fixef"], rtol=rtol, atol=rtol)
    assert a["sigma"] == pytest.approx(b["sigma"], rel=rtol)
    assert set(a["b"]) == set(b["b"])
    for k in a["b"]:
        np.testing.assert_allclose(a["b"][k], b["b"][k], rtol=rtol, atol=rtol)
        np.testing.assert_allclose(a["condvar"][k], b["condvar"][k], rtol=rtol, atol=rtol)


@SETTINGS
@given(data=lmm_data(), chunks=st.integers(1, 9), order_seed=st.integers(0, 1000))
def test_learn_many_bitwise_learn_one_and_order_invariance(helpers, data, chunks, order_seed):
    formula, frame = data
    one = MixedLM(formula)
    for i, x in enumerate(_features(frame).to_dict("records")):
        one.learn_one(x, frame.y.iat[i], w=frame.w.iat[i])
    many = MixedLM(formula)
    for part in np.array_split(np.arange(len(frame)), chunks):
        sub = frame.iloc[part]
        many.learn_many(_features(sub), sub.y, sub.w)
    S1, k1, c1 = helpers.active_stats(one)
    S2, k2, c2 = helpers.active_stats(many)
    assert k1 == k2
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(S1, S2)

    shuffled = frame.sample(frac=1, random_state=order_seed)
    other = MixedLM(formula)
    other.learn_many(_features(shuffled), shuffled.y, shuffled.w)
    assert set(helpers.active_stats(other)[1]) == set(k1)
    if not _enough(formula, frame):
        return
    theta = _random_theta(np.random.default_rng(order_seed), one._design.q)
    _assert_estimates_equal(
        helpers.estimates_at(other, theta), helpers.estimates_at(one, theta), rtol=1e-8
    )


@SETTINGS
@given(data=lmm_data())
def test_integer_weights_equal_repeated_events(helpers, data):
    formula, frame = data
    weighted = MixedLM(formula)
    weighted.learn_many(_features(frame), frame.y, frame.w)
    expanded = frame.loc[frame.index.repeat(frame.w)]
    repeated = MixedLM(formula)
    repeated.learn_many(_features(expanded), expanded.y)
    a, b = helpers.stats_by_key(weighted), helpers.stats_by_key(repeated)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12 * np.abs(b[k]).max())
    if not _enough(formula, frame):
        return
    theta = _random_theta(np.random.default_rng(len(frame)), weighted._design.q)
    _assert_estimates_equal(
        helpers.estimates_at(weighted, theta), helpers.estimates_at(repeated, theta), rtol=1e-8
    )


@SETTINGS
@given(data=lmm_data(), theta_seed=st.integers(0, 1000), reml=st.booleans())
def test_criterion_and_blups_equal_dense_at_random_theta(
    helpers, dense_lmm, data, theta_seed, reml
):
    formula, frame = data
    if not _enough(formula, frame):
        return
    model = MixedLM(formula, "REML" if reml else "ML")
    model.learn_many(_features(frame), frame.y, frame.w)
    f = model._design
    theta = _random_theta(np.random.default_rng(theta_seed), f.q)
    got = helpers.estimates_at(model, theta)
    want = dense_lmm.from_frame(f, frame, frame.w.to_numpy()).at(theta, reml)
    assert got["criterion"] == pytest.approx(want.criterion, rel=1e-9)
    scale = max(1.0, np.abs(want.beta).max())
    np.testing.assert_allclose(got["fixef"], want.beta, rtol=1e-7, atol=1e-7 * scale)
    assert got["sigma"] ** 2 == pytest.approx(want.sigma2, rel=1e-7)
    for k, b in want.b.items():
        np.testing.assert_allclose(got["b"][k], b, rtol=1e-6, atol=1e-7 * scale)
        np.testing.assert_allclose(
            got["condvar"][k], want.condvar[k], rtol=1e-6, atol=1e-9 * want.sigma2
        )


@settings(SETTINGS, max_examples=25)
@given(data=lmm_data(max_groups=6, max_size=4), method=st.sampled_from(["REML", "ML"]))
def test_edge_cases_fit_without_raising(dense_lmm, data, method):
    """Singleton groups, constant-x groups and boundary optima are normal cases."""
    formula, frame = data
    model = MixedLM(formula, method)
    model.learn_many(_features(frame), frame.y, frame.w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = model.fit().snapshot()
        x = frame.iloc[0][["g", "x1", "x2"]].to_dict()
        model.predict_one(x)
    assert s.n_groups == frame.g.nunique()
    assert s.n_obs == frame.w.sum()
    if not s.converged:
        return
    assert math.isfinite(s.criterion) and s.sigma > 0
    assert np.all(np.isfinite(s.b)) and np.all(np.isfinite(s.condvar))
    assert isinstance(s.singular, bool)
    f = model._design
    if len(frame) <= f.p + s.n_groups * f.q:
        return  # the groups' effects can fit every event: d(θ) → −∞ as θ → ∞
    # the reported criterion is the criterion at the reported θ ...
    dense = dense_lmm.from_frame(model._design, frame, frame.w.to_numpy())
    assert s.criterion == pytest.approx(dense.at(s.theta, method == "REML").criterion, rel=1e-8)
    # ... and no worse than lme4's start (Λ = I) or the boundary Λ = 0
    q = f.q
    rows, cols = estimate.theta_index([tuple(range(q))], q)
    for start in ((rows == cols).astype(float), np.zeros(q * (q + 1) // 2)):
        d = dense.at(start, method == "REML").criterion
        if math.isfinite(d):
            assert s.criterion <= d + 1e-7 * abs(d)
