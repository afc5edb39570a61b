"""Posterior: immutability, ArviZ's view, diagnostics, warnings, save/load (about 8 s)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, SamplingWarning, SnapshotError
from streamlmm.bayes import Posterior

PRIORS = {"b": "normal(0, 5)", "sd": "normal(0, 3)", "sigma": "exponential(0.5)"}


@pytest.fixture(scope="module")
def post():
    rng = np.random.default_rng(2)
    n, G = 300, 12
    g = rng.integers(0, G, n)
    X = pd.DataFrame({"g": g, "x": rng.normal(size=n)})
    y = pd.Series(2 + X["x"] + rng.normal(size=G)[g] + rng.normal(size=n))
    m = MixedLM("y ~ x + (1 + x | g)")
    m.learn_many(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplingWarning)
        return m.sample(PRIORS, chains=3, draws=400, warmup=300, seed=5, offsets={"t:0": n})


def test_summary_has_brms_names_and_columns(post):
    s = post.summary()
    assert list(s.index) == list(post.names)
    for col in ("mean", "sd", "q2.5", "q97.5", "mcse_mean", "ess_bulk", "ess_tail", "r_hat"):
        assert col in s.columns
    d = post.draws()
    assert set(d) == set(post.names)
    assert d["sigma"].shape == (3, 400)
    # q2.5/q97.5 are the pooled draws' quantiles (ArviZ's equal-tailed interval)
    flat = d["b_x"].ravel()
    assert abs(s.loc["b_x", "q2.5"] - np.quantile(flat, 0.025)) < 1e-9 * (1 + abs(flat).max())
    q = post.quantiles([0.05, 0.95])
    assert abs(q.loc["b_x", 0.05] - np.quantile(flat, 0.05)) < 1e-9


def test_to_arviz_works_with_arviz(post):
    import arviz as az

    dt = post.to_arviz()
    s = az.summary(dt, round_to="none")
    assert set(post.names) <= set(s.index)
    assert "diverging" in dt["sample_stats"] and "energy" in dt["sample_stats"]
    assert float(az.rhat(dt)["sigma"]) < 1.05


def test_diagnostics_per_chain(post):
    dg = post.diagnostics
    for k in ("divergences", "tree_depth", "step_size", "ebfmi", "max_tree_depth_hits"):
        assert np.asarray(dg[k]).shape == (3,)
    assert np.all(dg["ebfmi"] > 0.3)


def test_immutable(post):
    with pytest.raises(AttributeError, match="immutable"):
        post.seed = 3
    with pytest.raises(ValueError):
        post.draws()["sigma"][0, 0] = 1.0
    with pytest.raises(TypeError):
        post.priors["given"] = {}


def test_save_load_round_trip_and_corruption(post, tmp_path):
    b = post.to_bytes()
    back = Posterior.from_bytes(b)
    assert back.to_bytes() == b
    pd.testing.assert_frame_equal(back.summary(), post.summary())
    pd.testing.assert_frame_equal(back.ranef(3), post.ranef(3))
    assert dict(back.offsets) == {"t:0": 300} and back.seed == 5
    assert back.priors == post.priors and back.settings == post.settings
    assert back.warnings == post.warnings
    bad = bytearray(b)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(SnapshotError, match="checksum"):
        Posterior.from_bytes(bytes(bad))
    with pytest.raises(SnapshotError, match="truncated"):
        Posterior.from_bytes(b[:20])
    # in a snapshot directory: the newest valid file wins, a corrupt newest falls back
    first = post.save(tmp_path)
    second = back.save(tmp_path)
    assert os.path.basename(second).startswith("posterior-")
    with open(second, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    got = Posterior.load(tmp_path)
    assert got.to_bytes() == open(first, "rb").read()
    with pytest.raises(FileNotFoundError):
        Posterior.load(tmp_path / "nope")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_snapshot_is_not_a_posterior(tmp_path):
    m = MixedLM("y ~ x + (1 | g)")
    for i in range(20):
        m.learn_one({"g": i % 3, "x": float(i)}, float(i % 4))
    with pytest.raises(SnapshotError, match="not a streamlmm posterior"):
        Posterior.from_bytes(m.snapshot().to_bytes())


def _synthetic(post, **changes):
    """A Posterior built from post's arrays with some of them changed."""
    kw = dict(
        names=post.names,
        draws=np.array(post._draws),
        stats=dict(post._stats),
        x=post._x,
        step_size=post._step,
        formula=post.formula,
        group=post.group,
        keys=post.keys,
        re_names=post.re_names,
        rb_mean=post._rb_mean,
        rb_cov=post._rb_cov,
        F=post._F,
        lam=post._lam,
        beta_t=post._beta_t,
        sigma=post._sigma,
        Tz=post._Tz,
        perm=post._perm,
        priors=post.priors,
        settings=post.settings,
        seed=post.seed,
        n_events=post.n_events,
    )
    kw.update(changes)
    return Posterior(**kw)


def test_each_check_says_what_it_means(post):
    assert not post.warnings
    d = np.array(post._draws)
    d[0, :, 1] += 5.0  # one chain elsewhere: R-hat
    stats = {k: np.array(v) for k, v in post._stats.items()}
    stats["diverging"][1, :3] = True
    stats["maxdepth_reached"][2, :2] = True
    stats["energy"] = np.cumsum(
        np.random.default_rng(0).normal(size=(3, 400)), axis=1
    )  # low E-BFMI
    p = _synthetic(post, draws=d, stats=stats)
    text = " | ".join(p.warnings)
    assert "R-hat above 1.01 for b_x" in text and "chains disagree" in text
    assert "3 divergent transition(s)" in text and "target_accept" in text
    assert "2 transition(s) hit the maximum tree depth" in text and "max_depth" in text
    assert "E-BFMI below 0.3" in text
    tiny = _synthetic(
        post,
        draws=np.array(post._draws)[:, :20],
        stats={k: np.array(v)[:, :20] for k, v in post._stats.items()},
    )
    assert any("effective sample size below 100 per chain" in w for w in tiny.warnings)
    from streamlmm.bayes.posterior import warn

    with pytest.warns(SamplingWarning, match="divergent"):
        warn(p)
