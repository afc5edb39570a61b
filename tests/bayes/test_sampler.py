"""The nutpie adapter: the C functions equal the compiled density, settings are checked,
runs are reproducible, nothing compiles per model (about 10 s)."""

from __future__ import annotations

import ctypes
import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, compiling
from streamlmm.bayes import sampler
from streamlmm.bayes.density import LogPosterior

PRIORS = {"b": "normal(0, 5)", "sd": "normal(0, 2)", "sigma": "exponential(1)"}


def _model(formula, n=200, G=8, seed=1):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(
        {
            "g": rng.integers(0, G, n),
            "x": rng.normal(size=n),
            "z": rng.normal(size=n),
            "w": rng.normal(size=n),
        }
    )
    y = 1 + X["x"] + rng.normal(size=G)[X["g"]] + rng.normal(size=n)
    m = MixedLM(formula)
    m.learn_many(X, y)
    return m


@pytest.mark.parametrize(
    "formula",
    [
        "y ~ x + (1 | g)",
        "y ~ x + (1 + x | g)",
        "y ~ x + (1 + x + z | g)",
        "y ~ x + (1 + x + z + w | g)",
    ],
)
def test_c_function_equals_the_compiled_density(formula):
    lp = LogPosterior.from_model(_model(formula), PRIORS)
    Fb, fd, ix = lp.pack()
    n = lp.n_dim
    ud = np.array(
        [
            Fb.ctypes.data,
            Fb.shape[0],
            Fb.shape[1],
            fd.ctypes.data,
            fd.shape[0],
            ix.ctypes.data,
            ix.shape[0],
            n,
        ],
        dtype=np.int64,
    )
    f = sampler.c_logp(lp.q).ctypes
    x = np.random.default_rng(2).normal(size=n) * 0.3
    g = np.empty(n)
    out = np.empty(1)
    dp = ctypes.POINTER(ctypes.c_double)
    rc = f(
        n,
        x.ctypes.data_as(dp),
        g.ctypes.data_as(dp),
        out.ctypes.data_as(dp),
        ctypes.c_void_p(ud.ctypes.data),
    )
    v, gg = lp.logp_grad(x)
    assert rc == 0
    assert out[0] == v and np.array_equal(g, gg)
    bad = np.full(n, 800.0)  # exp(800) overflows: a non-finite density is code 4, not a crash
    rc = f(
        n,
        bad.ctypes.data_as(dp),
        g.ctypes.data_as(dp),
        out.ctypes.data_as(dp),
        ctypes.c_void_p(ud.ctypes.data),
    )
    assert rc in (3, 4)
    rc = f(
        n + 1,
        x.ctypes.data_as(dp),
        g.ctypes.data_as(dp),
        out.ctypes.data_as(dp),
        ctypes.c_void_p(ud.ctypes.data),
    )
    assert rc == -1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"chains": 0}, "chains must be a positive int"),
        ({"draws": 2.5}, "draws must be a positive int"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
        ({"seed": -3}, "seed must be an int"),
        ({"target_accept": 1.0}, "target_accept must be in"),
        ({"max_depth": 0}, "max_depth must be an int"),
        ({"backend": "stan"}, "backend must be one of"),
        ({"cores": -1}, "cores must be an int"),
    ],
)
def test_bad_settings_are_named_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        sampler.SamplerSettings(**kw)


def test_bad_settings_through_the_model():
    m = _model("y ~ x + (1 | g)")
    with pytest.raises(ValueError, match="chains must be a positive int"):
        m.sample(PRIORS, chains=0)
    with pytest.raises(ValueError, match="keep_ranef must be True or False"):
        m.sample(PRIORS, keep_ranef="yes")


def test_runs_are_reproducible_and_backends_agree():
    lp = LogPosterior.from_model(_model("y ~ x + (1 + x | g)"), PRIORS)
    st = sampler.SamplerSettings(chains=2, draws=150, warmup=150, seed=4)
    a = sampler.run(lp, st)
    b = sampler.run(lp, sampler.SamplerSettings(chains=2, draws=150, warmup=150, seed=4, cores=1))
    assert np.array_equal(a.x, b.x)
    c = sampler.run(lp, sampler.SamplerSettings(chains=2, draws=150, warmup=150, seed=5))
    assert not np.array_equal(a.x, c.x)
    # the Python-callback path calls the same density: the same chains, bit for bit
    d = sampler.run(
        lp, sampler.SamplerSettings(chains=2, draws=150, warmup=150, seed=4, backend="python")
    )
    assert np.array_equal(a.x, d.x)
    assert a.x.shape == (2, 150, lp.n_dim) and a.stats["diverging"].shape == (2, 150)


def test_a_new_model_compiles_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _model("y ~ x + (1 + x | g)").sample(PRIORS, chains=1, draws=20, warmup=20, seed=1)
        before = len(compiling.compiled())
        m = _model("y ~ x + z + w + (1 + z | g)", n=300, G=30, seed=3)  # other p, other data
        m.sample({**PRIORS, "cor": "lkj(3)"}, chains=2, draws=30, warmup=30, seed=2)
    assert len(compiling.compiled()) == before
