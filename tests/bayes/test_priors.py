"""Priors: parsing, brms's defaults, resolution, errors, log densities (about 3 s)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.bayes import priors as pri
from streamlmm.bayes.density import LogPosterior


def _model(formula="y ~ x + (1 + x | g)", n=120, G=8, seed=1, reservoir=10_000):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    y = 200 + 30 * x + 20 * rng.normal(size=G)[g] + 15 * rng.normal(size=n)
    m = MixedLM(formula, reservoir=reservoir)
    m.learn_many(pd.DataFrame({"g": g, "x": x}), pd.Series(y))
    return m, y


@pytest.mark.parametrize(
    ("text", "family", "args"),
    [
        ("normal(0, 20)", "normal", (0.0, 20.0)),
        ("student_t(3,0,30)", "student_t", (3.0, 0.0, 30.0)),
        (" cauchy( 0 , 2.5 ) ", "cauchy", (0.0, 2.5)),
        ("exponential(0.02)", "exponential", (0.02,)),
        ("gamma(2, 0.1)", "gamma", (2.0, 0.1)),
        ("lognormal(1, 0.5)", "lognormal", (1.0, 0.5)),
        ("uniform(-1, 3)", "uniform", (-1.0, 3.0)),
        ("lkj(2)", "lkj", (2.0,)),
        ("lkj_corr_cholesky(1.5)", "lkj", (1.5,)),
        ("flat", "flat", ()),
        ("", "flat", ()),
    ],
)
def test_parse(text, family, args):
    d = pri.parse(text)
    assert (d.family, d.args) == (family, args)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("normal(0)", "takes 2 argument"),
        ("normal(0, 0)", "scale must be positive"),
        ("student_t(-1, 0, 1)", "degrees of freedom must be positive"),
        ("beta(1, 1)", "unknown distribution 'beta'"),
        ("normal(a, 1)", "is not a number"),
        ("uniform(2, 1)", "lower bound must be below"),
        ("normal 0 1", "is not a distribution"),
        ("exponential(inf)", "must be finite"),
        ("lkj(0)", "eta must be positive"),
    ],
)
def test_parse_errors_say_why(text, match):
    with pytest.raises(ValueError, match=match):
        pri.parse(text)


def _r_round1(x):
    return round(x, 1)


def test_defaults_follow_brms_rules_from_the_raw_response():
    m, y = _model()
    t = m.default_priors()
    med = float(np.median(y))
    mad = 1.4826 * float(np.median(np.abs(y - med)))  # R's mad()
    s = max(2.5, _r_round1(mad))
    want_int = f"student_t(3, {pri._num(_r_round1(med))}, {pri._num(s)})"
    want_sd = f"student_t(3, 0, {pri._num(s)})"
    rows = {(r["class"], r["coef"], r["group"]): r for _, r in t.iterrows()}
    assert rows[("Intercept", "", "")]["prior"] == want_int
    assert rows[("sigma", "", "")]["prior"] == want_sd
    assert rows[("sd", "x", "g")]["prior"] == want_sd
    assert rows[("sd", "", "")]["source"] == "default"
    assert rows[("b", "", "")]["prior"] == "(flat)"
    assert rows[("cor", "", "")]["prior"] == "lkj(1)"
    assert rows[("sd", "", "")]["lb"] == "0" and rows[("b", "x", "")]["lb"] == ""
    assert list(t.columns) == ["prior", "class", "coef", "group", "lb", "source"]


def test_defaults_count_repeated_events_as_often_as_seen():
    # the reservoir keeps distinct events with counts: the median of (1, 1, 1, 10) is 1
    m = MixedLM("y ~ 1 + (1 | g)")
    for _k in range(3):
        m.learn_one({"g": "a"}, 1.0)
    m.learn_one({"g": "b"}, 10.0)
    t = m.default_priors()
    assert t.loc[t["class"] == "Intercept", "prior"].item() == "student_t(3, 1, 2.5)"


def test_user_priors_win_and_are_marked():
    m, _ = _model()
    t = m.default_priors({"b": "normal(0, 20)", "sd_g__x": "exponential(0.5)", "cor": "lkj(2)"})
    rows = {(r["class"], r["coef"], r["group"]): r for _, r in t.iterrows()}
    assert rows[("b", "", "")]["prior"] == "normal(0, 20)"
    assert rows[("b", "", "")]["source"] == "user"
    assert rows[("b", "x", "")]["prior"] == "normal(0, 20)"
    assert rows[("b", "x", "")]["source"] == "(vectorized)"
    assert rows[("sd", "x", "g")]["prior"] == "exponential(0.5)"
    assert rows[("sd", "x", "g")]["source"] == "user"
    assert rows[("sd", "Intercept", "g")]["source"] == "(vectorized)"
    assert rows[("cor", "", "g")]["prior"] == "lkj(2)"


def test_most_specific_key_wins():
    m, _ = _model()
    lp = LogPosterior.from_model(
        m, {"sd": "normal(0, 1)", "sd_g": "normal(0, 2)", "sd_g__x": "normal(0, 3)"}
    )
    by = lp.priors.by_name()
    assert str(by["sd_g__x"]) == "normal(0, 3)"
    assert str(by["sd_g__Intercept"]) == "normal(0, 2)"


@pytest.mark.parametrize(
    ("priors", "match"),
    [
        ({"bogus": "normal(0, 1)"}, "'bogus' is neither a brms class nor a parameter"),
        ({"b_nope": "normal(0, 1)"}, "'b_nope' is neither"),
        ({"b_Intercept": "normal(0, 1)"}, "use 'Intercept'"),
        ({"b": "weird(1)"}, "prior 'b': .*unknown distribution"),
        ({"sd": "normal(0, -2)"}, "prior 'sd': .*scale must be positive"),
        ({"cor": "normal(0, 1)"}, "correlations take lkj"),
        ({"b": "lkj(2)"}, "lkj is a prior for correlations"),
        ({"b": "gamma(2, 1)"}, "support \\(0, inf\\)"),
        ({"sigma": "uniform(-2, -1)"}, "no mass on positive values"),
    ],
)
def test_bad_priors_name_the_key_and_the_reason(priors, match):
    m, _ = _model()
    with pytest.raises(ValueError, match=match):
        m.default_priors(priors)


def test_lkj_on_a_one_coefficient_term_is_refused():
    for formula in ("y ~ x + (1 | g)", "y ~ x + (1 + x || g)"):
        m, _ = _model(formula)
        with pytest.raises(ValueError, match="prior 'cor': .*has one coefficient"):
            m.default_priors({"cor": "lkj(2)"})
        with pytest.raises(ValueError, match="prior 'cor_g': .*has one coefficient"):
            m.default_priors({"cor_g": "lkj(2)"})
        with pytest.raises(ValueError, match="lkj is a prior for correlations"):
            m.default_priors({"sd": "lkj(2)"})


def test_priors_must_be_a_mapping():
    m, _ = _model()
    with pytest.raises(ValueError, match="priors must be a mapping"):
        m.default_priors("normal(0, 1)")


def test_flat_sd_with_few_groups_warns_improper():
    m, _ = _model(G=3)
    with pytest.warns(UserWarning, match="improper"):
        m.default_priors({"sd": "flat"})


def test_defaults_need_the_reservoir():
    m, _ = _model(reservoir=0)
    with pytest.raises(ValueError, match="reservoir"):
        m.default_priors()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = m.default_priors(
            {"Intercept": "normal(0, 100)", "sd": "normal(0, 50)", "sigma": "exponential(0.1)"}
        )
    assert (t["source"] != "default").any()


@pytest.mark.parametrize(
    "text",
    [
        "normal(1, 2)",
        "student_t(4, 0.5, 2)",
        "cauchy(-1, 3)",
        "exponential(0.7)",
        "gamma(2.5, 1.5)",
        "lognormal(0.2, 0.8)",
        "uniform(-1, 4)",
    ],
)
@pytest.mark.parametrize("truncate", [False, True])
def test_log_norm_plus_kernel_is_the_normalised_density(text, truncate):
    """The compiled kernels' split (constant + x-dependent part) adds up to scipy's
    normalised log density, truncated at 0 when asked."""
    from streamlmm.bayes.density import _prior_np

    d = pri.parse(text)
    xs = np.array([0.3, 1.1, 2.7])
    want = pri.log_density(d, xs, truncate=truncate)
    dist = pri._scipy(d)
    ref = dist.logpdf(xs) - (np.log(dist.sf(0.0)) if truncate else 0.0)
    np.testing.assert_allclose(want, ref, rtol=1e-12)
    got = [pri.log_norm(d, truncate) + _prior_np(d, v)[0] for v in xs]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # and the density integrates to 1 over its (truncated) support
    lo = 0.0 if truncate or d.family in pri.POSITIVE else -np.inf
    if d.family == "uniform":
        lo = max(lo, d.args[0])
    from scipy.integrate import quad

    hi = d.args[1] if d.family == "uniform" else np.inf
    total = quad(lambda v: math.exp(pri.log_density(d, v, truncate=truncate)), lo, hi)[0]
    assert abs(total - 1) < 1e-6


@pytest.mark.parametrize(("K", "eta"), [(2, 1.0), (2, 2.5), (3, 1.0), (3, 2.0)])
def test_lkj_normalising_constant_integrates_to_one(K, eta):
    """∫ exp(log c + LKJ kernel + log-Jacobian) over the unconstrained coordinates = 1."""
    from streamlmm.bayes.transforms import corr_from_unconstrained

    n = K * (K - 1) // 2
    grid = np.linspace(-7, 7, 61 if n == 3 else 2001)
    h = grid[1] - grid[0]
    const = pri.lkj_log_norm(K, eta)
    mesh = np.stack(np.meshgrid(*[grid] * n, indexing="ij"), -1).reshape(-1, n)
    total = 0.0
    for y in mesh:
        L, lj = corr_from_unconstrained(y, K)
        ker = sum((K - i - 3 + 2 * eta) * math.log(L[i, i]) for i in range(1, K))
        total += math.exp(const + ker + lj)
    assert abs(total * h**n - 1) < 2e-3


def test_resolved_priors_record_where_the_defaults_came_from():
    m, y = _model()
    lp = LogPosterior.from_model(m, {"b": "normal(0, 5)"})
    rec = lp.priors.to_dict()
    assert rec["given"] == {"b": "normal(0, 5)"}
    assert rec["resolved"]["b_x"] == "normal(0, 5)"
    assert rec["events"] == rec["of"] == len(y)
