"""Agreement with lme4 1.1.31 on every core case in ``tests/data`` (format: scripts/reference/README.md).

Each case is streamed in file order through ``learn_one`` and, separately, through
``learn_many`` in chunks of 1,000 rows; then ``fit()`` and ``snapshot()``. The
tolerances are the issue's:

- fixef and sigma within 1e-5 relative;
- the criterion never above lme4's by more than 1e-6 relative;
- re_cov within 1e-3 of its largest entry;
- every group's ranef and condvar: ``np.isclose(rtol=1e-3, atol=1e-6)``.

A second group of tests evaluates the statistics at lme4's own θ, which proves the
formulas independently of either optimizer.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from streamlmm import MixedLM, estimate

PATHS = ("learn_one", "learn_many")


@functools.cache
def _fitted(case, path: str):
    model = MixedLM(case.ref["formula"], case.method)
    if path == "learn_one":
        case.stream_one(model)
    else:
        case.stream_many(model, chunk=1000)
    return model, model.fit().snapshot()


@pytest.fixture(params=PATHS)
def fit(request, case):
    """``(case, model, snapshot)`` for each reference case and each learning path."""
    model, snap = _fitted(case, request.param)
    return case, model, snap


@functools.cache
def _at_lme4_theta(case):
    """Profile, BLUPs and condVar from the (unshifted) statistics at lme4's θ."""
    st = case.stats()
    prob = case.user_problem()
    pr = prob.profile(case.theta)
    est = estimate.estimates_at(prob, pr)
    b = {k: est.b[i] for i, k in enumerate(st.keys)}
    cv = {k: est.condvar[i] for i, k in enumerate(st.keys)}
    return pr, b, cv


# -- the fitted model against lme4 ------------------------------------------------------------
def test_counts(fit):
    case, model, s = fit
    assert s.n_obs == case.ref["n"]
    assert s.n_groups == case.ref["n_groups"]
    assert sorted(s.keys) == sorted(case.group_keys)
    assert s.converged


def test_fixef_within_1e5(fit):
    case, _, s = fit
    assert list(s.fixef) == list(case.fixef)
    for name, value in case.fixef.items():
        assert s.fixef[name] == pytest.approx(value, rel=1e-5), name


def test_sigma_within_1e5(fit):
    case, _, s = fit
    assert s.sigma == pytest.approx(case.ref["sigma"], rel=1e-5)


def test_criterion_not_above_lme4(fit):
    case, _, s = fit
    ref = case.ref["criterion"]
    assert s.criterion <= ref * (1 + 1e-6)
    # and not absurdly below it either: the reported criterion is the true one
    assert s.criterion >= ref * (1 - 1e-6)


def test_re_cov_within_1e3_of_largest_entry(fit):
    case, _, s = fit
    ref = case.re_cov
    assert s.re_names == tuple(np.atleast_1d(case.ref["re_names"]))
    assert np.max(np.abs(s.re_cov - ref)) <= 1e-3 * np.max(np.abs(ref))


def test_singular_flag_matches_lme4(fit):
    case, _, s = fit
    assert s.singular == case.ref["singular"]


def test_ranef_and_condvar_every_group(fit):
    """Every group's BLUP and condVar is close to lme4's, or lme4 is the unconverged one.

    A group failing ``isclose`` is accepted only if (a) our criterion is strictly below
    lme4's and (b) the BLUPs (and condVar) we compute at lme4's θ match lme4 for that
    group to 1e-6 relative, i.e. the gap is θ-convergence on lme4's side; at most 1% of
    the groups may be accepted that way (known: g280 in ``pub_slopes_ml``).
    """
    case, _, s = fit
    failing = []
    for key in case.group_keys:
        ok_b = np.allclose(
            np.array(list(s.ranef(key).values())), case.ranef(key), rtol=1e-3, atol=1e-6
        )
        ok_v = np.allclose(s.ranef_cov(key), case.condvar(key), rtol=1e-3, atol=1e-6)
        if not (ok_b and ok_v):
            failing.append(key)
    if not failing:
        return
    assert s.criterion < case.ref["criterion"], f"groups {failing} differ from lme4"
    _, b_at, cv_at = _at_lme4_theta(case)
    for key in failing:
        np.testing.assert_allclose(b_at[key], case.ranef(key), rtol=1e-6, atol=0, err_msg=key)
        np.testing.assert_allclose(cv_at[key], case.condvar(key), rtol=1e-6, atol=0, err_msg=key)
    assert len(failing) <= 0.01 * len(case.group_keys), failing


def test_ranef_unseen_group_and_keys_are_strings(fit):
    case, _, s = fit
    assert all(isinstance(k, str) for k in s.keys)
    with pytest.raises(KeyError, match="unknown group 'no-such-group'"):
        s.ranef("no-such-group")
    assert s.ranef("no-such-group", fallback="population") == dict.fromkeys(s.re_names, 0.0)


# -- the formulas at lme4's θ -----------------------------------------------------------------
def test_criterion_at_lme4_theta_equals_lme4(case):
    pr, _, _ = _at_lme4_theta(case)
    assert pr.criterion == pytest.approx(case.ref["criterion"], rel=1e-10)


def test_fixef_sigma_at_lme4_theta_equal_lme4(case):
    pr, _, _ = _at_lme4_theta(case)
    np.testing.assert_allclose(pr.beta, list(case.fixef.values()), rtol=1e-9)
    assert np.sqrt(pr.sigma2) == pytest.approx(case.ref["sigma"], rel=1e-9)


def test_blups_and_condvar_at_lme4_theta_equal_lme4(case):
    _, b, cv = _at_lme4_theta(case)
    assert set(b) == set(case.group_keys)
    for key in case.group_keys:
        np.testing.assert_allclose(b[key], case.ranef(key), rtol=1e-6, atol=0, err_msg=key)
        np.testing.assert_allclose(cv[key], case.condvar(key), rtol=1e-6, atol=0, err_msg=key)


def test_dense_computation_at_lme4_theta_equals_lme4(case):
    """The independent dense marginal likelihood reproduces lme4 too (checks the checker)."""
    d = case.dense().at(case.theta, case.reml)
    assert d.criterion == pytest.approx(case.ref["criterion"], rel=1e-10)
    key = case.group_keys[0]
    np.testing.assert_allclose(d.b[key], case.ranef(key), rtol=1e-6)
    np.testing.assert_allclose(d.condvar[key], case.condvar(key), rtol=1e-6)


# -- statsmodels as a further peer ------------------------------------------------------------
@pytest.mark.parametrize("name", ["sleepstudy_slopes_reml", "sleepstudy_slopes_ml"])
def test_statsmodels_peer(reference, name):
    """statsmodels' MixedLM: its likelihood at our estimates is our criterion, and our
    optimum is at least as good as its own."""
    import statsmodels.formula.api as smf  # a dev dependency: installed by scripts/setup
    from statsmodels.regression.mixed_linear_model import MixedLMParams

    case = reference(name)
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_many(model)
    s = model.fit().snapshot()
    data = case.data
    md = smf.mixedlm("y ~ x1", data, groups=data["g"], re_formula="~x1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = md.fit(reml=case.reml, method=["lbfgs"])
    params = MixedLMParams.from_components(
        fe_params=np.array(list(s.fixef.values())), cov_re=s.re_cov / s.sigma**2
    )
    assert -2 * md.loglike(params, profile_fe=False) == pytest.approx(s.criterion, rel=1e-10)
    assert s.criterion <= -2 * peer.llf * (1 + 1e-10)
    np.testing.assert_allclose(list(s.fixef.values()), peer.fe_params.to_numpy(), rtol=1e-6)
    cov = peer.cov_re.to_numpy()
    assert np.max(np.abs(s.re_cov - cov)) <= 1e-3 * np.max(np.abs(cov))
