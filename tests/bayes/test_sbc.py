"""Simulation-based calibration (Talts et al. 2018): draw the parameters from the
priors, simulate a data set, sample its posterior; the rank of the true value among
(thinned) posterior draws is uniform when the sampler and the density are right. 200
replications each of a random-intercept and a random-slope model on small data; a χ²
test on 10 bins per parameter must give p > 0.01. Seeds are fixed, so the test is
deterministic. Takes about 90 s."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from streamlmm import MixedLM
from streamlmm.bayes import predictive
from streamlmm.bayes import priors as pri
from streamlmm.bayes.density import LogPosterior
from streamlmm.bayes.sampler import SamplerSettings, run

REPS = 200
THIN = 4
L = 99  # thinned draws per replication: ranks 0..99, 10 bins of 10


def _one(formula, priors, G, n_g, rng, seed):
    slopes = "(1 + x" in formula
    n = G * n_g
    g = np.repeat(np.arange(G), n_g)
    x = rng.normal(size=n)
    d = {k: pri.parse(v) for k, v in priors.items()}
    icpt = predictive.draw_dist(d["Intercept"], 1, rng, truncate=False, name="Intercept")[0]
    b = predictive.draw_dist(d["b"], 1, rng, truncate=False, name="b")[0]
    q = 2 if slopes else 1
    sd = predictive.draw_dist(d["sd"], q, rng, truncate=True, name="sd")
    R = predictive.lkj_draws(2, d["cor"].args[0], 1, rng)[0] if slopes else np.eye(1)
    sigma = predictive.draw_dist(d["sigma"], 1, rng, truncate=True, name="sigma")[0]
    S = np.diag(sd) @ R @ np.diag(sd)
    u = rng.multivariate_normal(np.zeros(q), S, size=G)
    z = np.column_stack([np.ones(n), x])[:, :q]
    y = (icpt - x.mean() * b) + b * x + np.einsum("ij,ij->i", z, u[g]) + sigma * rng.normal(size=n)
    m = MixedLM(formula)
    m.learn_many(pd.DataFrame({"g": g, "x": x}), pd.Series(y))
    lp = LogPosterior.from_model(m, priors)
    r = run(lp, SamplerSettings(chains=2, draws=200, warmup=200, seed=seed))
    par = lp.constrain(r.x.reshape(-1, lp.n_dim))
    cols = {"Intercept": par["theta_b"][:, 0], "b_x": par["theta_b"][:, 1]}
    truth = {"Intercept": icpt, "b_x": b}
    for a in range(q):
        cols[f"sd{a}"] = par["sd"][:, a]
        truth[f"sd{a}"] = sd[a]
    if slopes:
        cols["cor"] = par["cor"][:, 0, 1]
        truth["cor"] = R[0, 1]
    cols["sigma"] = par["sigma"]
    truth["sigma"] = sigma
    # thin each chain, then pool: 2 × 200 draws → every 4th → 100 → the first 99
    ranks = {}
    for k, v in cols.items():
        t = v.reshape(2, 200)[:, ::THIN].ravel()[:L]
        ranks[k] = int(np.sum(t < truth[k]))
    return ranks


@pytest.mark.parametrize(
    ("formula", "G", "n_g"),
    [("y ~ x + (1 | g)", 8, 6), ("y ~ x + (1 + x | g)", 8, 8)],
)
def test_ranks_are_uniform(formula, G, n_g):
    priors = {
        "Intercept": "normal(0, 2)",
        "b": "normal(0, 1)",
        "sd": "normal(0, 1)",
        "sigma": "exponential(1)",
        "cor": "lkj(2)",
    }
    if "(1 + x" not in formula:
        del priors["cor"]
    rng = np.random.default_rng(2018)
    all_ranks: dict[str, list[int]] = {}
    for rep in range(REPS):
        r = (
            _one(formula, priors, G, n_g, rng, seed=1000 + rep)
            if "cor" in priors
            else _one(formula, priors, G, n_g, rng, seed=1000 + rep)
        )
        for k, v in r.items():
            all_ranks.setdefault(k, []).append(v)
    for k, ranks in all_ranks.items():
        counts = np.bincount(np.asarray(ranks) // 10, minlength=10)
        p = stats.chisquare(counts).pvalue
        assert p > 0.01, (k, counts.tolist(), p)
