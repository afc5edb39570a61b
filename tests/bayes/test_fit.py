"""MixedLM.sample end to end: the same posterior bits from learn_one, learn_many and any
order; warm starts; group effects; predictive draws; warnings (about 20 s)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, SamplingWarning, estimate
from streamlmm.bayes import Posterior

PRIORS = {
    "Intercept": "normal(5, 10)",
    "b": "normal(0, 5)",
    "sd": "normal(0, 3)",
    "sigma": "exponential(0.5)",
}


def _frame(n=240, G=10, seed=3):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    X = pd.DataFrame(
        {
            "g": [f"c{i}" for i in g],
            "x": rng.normal(size=n),
            "f": rng.choice(["lo", "mid", "hi"], n),
        }
    )
    u = rng.normal(size=(G, 2))
    y = pd.Series(5 + 0.8 * X["x"] + 1.5 * u[g, 0] + 0.5 * u[g, 1] * X["x"] + rng.normal(size=n))
    return X, y


def _post(m, **kw):
    kw = {"chains": 2, "draws": 300, "warmup": 300, "seed": 9, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplingWarning)
        extra = {"cor": "lkj(2)"} if "(1 + x" in m.formula else {}
        return m.sample({**PRIORS, **extra}, **kw)


def test_same_bits_from_learn_one_learn_many_and_any_order():
    X, y = _frame()
    a = MixedLM("y ~ x + f + (1 + x | g)", levels={"f": ["lo", "mid", "hi"]})
    a.learn_many(X, y)
    b = MixedLM("y ~ x + f + (1 + x | g)", levels={"f": ["lo", "mid", "hi"]})
    for r, v in zip(X.to_dict("records"), y):
        b.learn_one(r, v)
    o = np.random.default_rng(0).permutation(len(X))
    c = MixedLM("y ~ x + f + (1 + x | g)", levels={"f": ["lo", "mid", "hi"]})
    c.learn_many(X.iloc[o[:100]], y.iloc[o[:100]])
    for i in o[100:]:
        c.learn_one(X.iloc[i].to_dict(), float(y.iloc[i]))
    pa, pb, pc = _post(a), _post(b), _post(c)
    assert pa.names == (
        "b_Intercept",
        "b_x",
        "b_fmid",
        "b_fhi",
        "sd_g__Intercept",
        "sd_g__x",
        "cor_g__Intercept__x",
        "sigma",
    )
    for p in (pb, pc):
        for k, v in pa.draws().items():
            assert np.array_equal(v, p.draws()[k]), k
        assert p.keys == pa.keys
        assert np.array_equal(p.ranef().to_numpy(), pa.ranef().to_numpy())


def test_posterior_is_near_the_ml_fit_with_vague_priors():
    """With many events and vague priors the posterior means of β sit within their
    posterior SDs of lme4-style ML estimates (a consistency check, not a reference)."""
    X, y = _frame(n=2000, G=30, seed=5)
    m = MixedLM("y ~ x + (1 + x | g)", method="ML")
    m.learn_many(X, y)
    post = _post(m, draws=500)
    s = post.summary()
    snap = m.fit().snapshot()
    for name, coef in (("b_Intercept", "(Intercept)"), ("b_x", "x")):
        assert abs(s.loc[name, "mean"] - snap.fixef[coef]) < s.loc[name, "sd"]
    r = post.ranef("c3")
    for coef in ("(Intercept)", "x"):
        assert abs(r.loc[coef, "mean"] - snap.ranef("c3")[coef]) < 2 * r.loc[coef, "sd"]


def test_group_effects_are_the_cores_conditionals_averaged_over_draws():
    """The Rao-Blackwellised moments equal a plain average, over the posterior's draws,
    of the core's conditional mean and covariance (estimate.group_conditionals) in the
    user's coordinates."""
    X, y = _frame()
    m = MixedLM("y ~ x + (1 + x | g)")
    m.learn_many(X, y)
    post = _post(m, draws=60, warmup=100)
    par = post.parameter_draws()
    prob0, _ = estimate.make_problem(m._stats, m._design, False, center=np.zeros(m._stats.k + 1))
    order = [m._stats.keys.index(k) for k in post.keys]
    B, V = [], []
    for d in range(par["beta"].shape[0]):
        sd, R, sig = par["sd"][d], par["cor"][d], par["sigma"][d]
        lam = np.linalg.cholesky(np.diag(sd) @ R @ np.diag(sd)) / sig
        b, v = estimate.group_conditionals(prob0.F, 2, 2, lam, par["beta"][d], sig**2)
        B.append(b[order])
        V.append(v[order])
    B, V = np.array(B), np.array(V)
    mean = B.mean(0)
    cov = V.mean(0) + np.einsum("dgi,dgj->gij", B - mean, B - mean) / B.shape[0]
    got = post.ranef()
    np.testing.assert_allclose(got["mean"].to_numpy().reshape(-1, 2), mean, rtol=1e-6, atol=1e-7)
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    np.testing.assert_allclose(got["sd"].to_numpy().reshape(-1, 2), sd, rtol=1e-6)
    np.testing.assert_allclose(
        post.ranef_cov("c4"), cov[post.keys.index("c4")], rtol=1e-6, atol=1e-9
    )


def test_ranef_quantiles_are_the_mixtures():
    """ranef(key)'s quantiles (the exact mixture of the group's conditionals) against
    the kept exact draws of the same group: within 4 of their MCSEs (ArviZ's)."""
    from arviz_stats.base import array_stats

    X, y = _frame()
    m = MixedLM("y ~ x + (1 | g)")
    m.learn_many(X, y)
    post = _post(m, keep_ranef=True, draws=1000)
    r = post.ranef("c2").loc["(Intercept)"]
    kept = post.draws()["r_g[c2,Intercept]"]  # (chains, draws)
    for p, col in ((0.025, "q2.5"), (0.975, "q97.5")):
        est = np.quantile(kept, p)
        mcse = float(array_stats.mcse(kept, method="quantile", prob=p))
        assert abs(est - r[col]) < 4 * mcse, (p, est, r[col], mcse)
    mcse = float(array_stats.mcse(kept, method="mean"))
    assert abs(kept.mean() - r["mean"]) < 4 * mcse
    with pytest.raises(KeyError, match="not in the posterior"):
        post.ranef("nope")


def test_warm_start_after_more_events():
    X, y = _frame(n=400)
    m = MixedLM("y ~ x + (1 + x | g)")
    m.learn_many(X.iloc[:300], y.iloc[:300])
    p1 = _post(m)
    assert not p1.settings["warm_start"] and p1.settings["warmup"] == 300
    m.learn_many(X.iloc[300:], y.iloc[300:])
    p2 = _post(m, warmup=None)
    assert p2.settings["warm_start"] and p2.settings["warmup"] == 150 * 2
    assert p2.n_events == 400 and p1.n_events == 300
    p3 = _post(m, warm_start=False, warmup=None)
    assert not p3.settings["warm_start"] and p3.settings["warmup"] == 1000


def test_predictive_draws():
    X, y = _frame()
    m = MixedLM("y ~ x + (1 + x | g)")
    m.learn_many(X, y)
    post = _post(m)
    rows = pd.DataFrame({"g": ["c1", "c1", "new"], "x": [0.0, 2.0, 0.0]})
    pp = post.posterior_predictive(rows, draws=200, seed=1)
    assert pp.shape == (200, 3)
    # a seen group's draws centre on its fitted mean; an unseen one is wider
    mu = post.summary().loc["b_Intercept", "mean"] + post.ranef("c1").loc["(Intercept)", "mean"]
    assert abs(pp[:, 0].mean() - mu) < 0.4
    assert pp[:, 2].std() > pp[:, 0].std()
    prior = m.prior_predictive(rows, PRIORS, draws=50, seed=2)
    assert prior.shape == (50, 3) and np.all(np.isfinite(prior))
    with pytest.raises(ValueError, match="flat"):
        m.prior_predictive(rows, {**PRIORS, "b": "flat"})
    with pytest.raises(ValueError, match="field 'g'"):
        post.posterior_predictive(rows.drop(columns="g"))
    with pytest.raises(ValueError, match="field 'x'"):
        post.posterior_predictive(rows.drop(columns="x"))
    # at the reservoir's rows (union columns and keys), as the pictures will use
    res = m._res
    keys = [m._stats.keys[r] for r in res.row[: res.size]]
    at = post.predictive_at(res.A[: res.size], keys, draws=50)
    assert at.shape == (50, res.size)
    with pytest.raises(ValueError, match="union columns"):
        post.predictive_at(res.A[: res.size, :1], keys)


def test_sampling_warnings_fire_on_a_bad_run():
    X, y = _frame(n=60, G=3)
    m = MixedLM("y ~ x + (1 + x | g)")
    m.learn_many(X, y)
    with pytest.warns(SamplingWarning, match="effective sample size below 100 per chain"):
        post = m.sample(PRIORS, chains=2, draws=30, warmup=30, seed=1)
    assert any("effective sample size" in w for w in post.warnings)
    assert isinstance(post, Posterior)


def test_offsets_priors_and_settings_are_recorded():
    X, y = _frame()
    m = MixedLM("y ~ x + (1 | g)")
    m.learn_many(X, y)
    post = _post(m, offsets={"topic:0": 240})
    assert dict(post.offsets) == {"topic:0": 240}
    assert post.priors["given"]["b"] == "normal(0, 5)"
    assert post.priors["resolved"]["sd_g__Intercept"] == "normal(0, 3)"
    assert post.settings["seed"] == 9 and post.seed == 9
    assert post.n_events == 240


def test_the_core_does_not_import_the_bayesian_layer():
    import subprocess
    import sys

    code = (
        "import sys, streamlmm\n"
        "from streamlmm import MixedLM\n"
        "m = MixedLM('y ~ x + (1 | g)')\n"
        "for i in range(30): m.learn_one({'g': i % 3, 'x': float(i)}, float(i % 5))\n"
        "m.fit().snapshot()\n"
        "assert not [k for k in sys.modules if k.startswith(('streamlmm.bayes', 'nutpie', 'arviz'))]\n"
        "assert streamlmm.Posterior.__name__ == 'Posterior'\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


@pytest.mark.parametrize("kw", [{}, {"half_life": 50.0, "time_key": "t"}, {"method": "ML"}])
def test_sample_at_any_point_of_a_stream(kw):
    """From the first events on (one group, three events), with forgetting, either method:
    a proper posterior whose every group has a summary."""
    m = MixedLM("y ~ x + (1 | g)", **kw)
    rng = np.random.default_rng(1)
    posts = []
    for i in range(60):
        m.learn_one(
            {"g": f"k{i % 4}" if i >= 3 else "k0", "x": float(i % 5), "t": float(i)},
            float(rng.normal(2.0)),
        )
        if i in (2, 59):
            posts.append(_post(m, draws=100, warmup=100))
    first, last = posts
    assert first.keys == ("k0",) and last.keys == ("k0", "k1", "k2", "k3")
    for p in posts:
        assert np.all(np.isfinite(p.summary()["mean"]))
        assert np.all(np.isfinite(p.ranef()["sd"]))
