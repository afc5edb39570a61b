"""The brms reference runs in tests/data/brms checked by themselves, without a sampler.

The runs (scripts/reference/brms/README.md) are what ``MixedLM.sample`` is compared
with, so they are checked here first:

- each case of the manifest (``scripts/reference/brms/cases.json``) is committed, with
  the manifest's formula, priors, chains, iterations, seed and ``adapt_delta``, and its
  data regenerate byte for byte from :mod:`streamlmm.simulate`;
- the runs converged and are long: no divergences, R-hat <= 1.01, every MCSE at most 2%
  of the posterior SD, and brms's parameter names;
- brms's default priors (``default_priors``, and ``priors`` of the no-prior case) follow
  the rule written in docs/brms-priors.md, computed here from the CSV with R's
  ``round``/``mad``;
- the random-intercept run agrees with the exact posterior, computed without MCMC by
  integrating the fixed effects out in closed form and (log sd, log sigma) on a grid:
  means and SDs of every global parameter and of every county's effect, and the 5% and
  95% quantiles.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "brms"
SCRIPTS = REPO / "scripts" / "reference" / "brms"
CASES = json.loads((SCRIPTS / "cases.json").read_text())
NAMES = [c["name"] for c in CASES]


def _module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# R's round() and mad(), as brms's defaults use them (also used by the peers' benchmark)
peers = _module(REPO / "scripts" / "bench_bayes_peers.py", "bench_bayes_peers")


@functools.cache
def case(name: str) -> dict:
    return next(c for c in CASES if c["name"] == name)


@functools.cache
def ref(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@functools.cache
def data(csv: str, group: str) -> pd.DataFrame:
    return pd.read_csv(DATA / csv, dtype={group: str})


def expected_names(formula: str, group: str) -> set[str]:
    f = peers.parse_formula(formula)
    names = {"b_Intercept", "Intercept", "sigma", *(f"b_{x}" for x in f.fixed)}
    names |= {f"sd_{group}__{c}" for c in f.re_names}
    re_names = f.re_names
    names |= {
        f"cor_{group}__{re_names[i]}__{re_names[j]}"
        for i in range(len(re_names))
        for j in range(i + 1, len(re_names))
    }
    return names


@pytest.mark.parametrize("name", NAMES)
def test_the_committed_run_is_the_manifests(name):
    c, r = case(name), ref(name)
    assert (r["data"], r["formula"], r["group"]) == (c["csv"], c["formula"], c["group"])
    assert r["priors_given"] == c["priors"]
    s = r["sampler"]
    for key in ("chains", "iter", "warmup", "seed", "adapt_delta", "max_treedepth"):
        assert s[key] == c[key], key
    assert s["draws_per_chain"] == c["iter"] - c["warmup"] >= 10_000
    assert r["versions"]["brms"] == "2.18.0"
    draws = json.loads((DATA / f"{name}.draws.json").read_text())
    assert draws["thin"] == c["thin_draws"]
    assert set(draws["draws"]) == set(r["parameters"])
    for v in draws["draws"].values():
        assert len(v) == c["chains"]
        assert all(len(chain) == draws["draws_per_chain"] for chain in v)


def test_the_data_regenerate_byte_for_byte(tmp_path):
    make_data = _module(SCRIPTS / "make_data.py", "brms_make_data")
    assert make_data.main([str(tmp_path)]) == 0
    for csv in sorted({c["csv"] for c in CASES}):
        assert (tmp_path / csv).read_bytes() == (DATA / csv).read_bytes(), csv


@pytest.mark.parametrize("name", NAMES)
def test_the_run_converged_and_is_long(name):
    r = ref(name)
    d = r["diagnostics"]
    assert sum(d["divergences"]) == 0
    assert sum(d["treedepth_saturated"]) == 0
    assert min(d["ebfmi"]) > 0.3
    assert set(r["parameters"]) == expected_names(r["formula"], r["group"])
    for p, s in r["parameters"].items():
        assert s["rhat"] <= 1.01, p
        assert s["mcse_mean"] <= 0.02 * s["sd"], p
        assert s["mcse_sd"] <= 0.02 * s["sd"], p
        assert min(s["ess_bulk"], s["ess_tail"]) >= 5_000, p
        assert s["q2.5"] < s["q5"] < s["q50"] < s["q95"] < s["q97.5"], p
    for lev, effects in r["ranef"][r["group"]].items():
        for coef, s in effects.items():
            assert s["rhat"] <= 1.01 and s["mcse_mean"] <= 0.02 * s["sd"], (lev, coef)


@pytest.mark.parametrize("name", NAMES)
def test_counts_and_levels_match_the_csv(name):
    r = ref(name)
    df = data(r["data"], r["group"])
    assert r["n"] == len(df)
    assert r["n_groups"] == df[r["group"]].nunique()
    assert sorted(r["ranef"][r["group"]]) == sorted(df[r["group"]].unique())
    f = peers.parse_formula(r["formula"])
    for effects in r["ranef"][r["group"]].values():
        assert list(effects) == list(f.re_names)
    for x, m in r["predictor_means"].items():
        assert m == pytest.approx(df[x].mean(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_the_thinned_draws_agree_with_the_summary(name):
    r = ref(name)
    draws = json.loads((DATA / f"{name}.draws.json").read_text())["draws"]
    for p, s in r["parameters"].items():
        x = np.asarray(draws[p], dtype=float).ravel()
        # every 50th draw is nearly independent: allow 5 standard errors of ~n/4 draws
        assert abs(x.mean() - s["mean"]) <= 5 * s["sd"] / math.sqrt(x.size / 4), p
        assert x.std() == pytest.approx(s["sd"], rel=0.15), p


def _row(rows: list[dict], cls: str, coef: str = "", group: str = "") -> dict:
    (row,) = [x for x in rows if (x["class"], x["coef"], x["group"]) == (cls, coef, group)]
    return row


def _as_get_prior(rows: list[dict]) -> list[dict]:
    """prior_summary(fit) shows the correlation prior as Stan gets it (class ``L``,
    ``lkj_corr_cholesky(eta)``); get_prior() as ``cor``, ``lkj(eta)``: the same prior."""
    out = []
    for x in rows:
        if x["class"] == "L":
            x = dict(
                x, **{"class": "cor", "prior": x["prior"].replace("lkj_corr_cholesky(", "lkj(")}
            )
        out.append(x)
    return sorted(out, key=lambda x: (x["class"], x["coef"], x["group"]))


@pytest.mark.parametrize("name", NAMES)
def test_default_priors_follow_the_rule(name):
    """get_prior()'s defaults from the CSV: R's round(median(y), 1), max(2.5, round(mad(y), 1))."""
    r = ref(name)
    y = data(r["data"], r["group"])["y"].to_numpy(float)
    assert r["response"]["median"] == pytest.approx(np.median(y), rel=1e-12)
    assert r["response"]["mad"] == pytest.approx(peers.r_mad(y), rel=1e-12)
    loc = peers.r_round(float(np.median(y)), 1)
    scale = max(2.5, peers.r_round(peers.r_mad(y), 1))
    rows = r["default_priors"]
    assert _row(rows, "Intercept")["prior"] == f"student_t(3, {loc:.15g}, {scale:.15g})"
    for cls in ("sd", "sigma"):
        row = _row(rows, cls)
        assert (row["prior"], row["lb"]) == (f"student_t(3, 0, {scale:.15g})", "0")
    assert _row(rows, "b")["prior"] == ""  # flat
    f = peers.parse_formula(r["formula"])
    cor = [x for x in rows if x["class"] == "cor" and x["group"] == ""]
    assert [x["prior"] for x in cor] == (["lkj(1)"] if f.random else [])
    # the rule as the peers' benchmark writes it
    d = peers.default_priors(y)
    assert d["Intercept"] == _row(rows, "Intercept")["prior"]
    assert d["sd"] == d["sigma"] == _row(rows, "sd")["prior"]


def test_the_no_prior_case_samples_brms_defaults():
    (name,) = [c["name"] for c in CASES if c["priors"] is None]
    r = ref(name)
    assert _as_get_prior(r["priors"]) == _as_get_prior(r["default_priors"])


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c["priors"]])
def test_given_priors_are_resolved_as_given(name):
    r = ref(name)
    resolved = _as_get_prior(r["priors"])
    for p in r["priors_given"]:
        row = _row(resolved, p["class"], p.get("coef", ""), p.get("group", ""))
        assert (row["prior"], row["source"]) == (p["prior"], "user")
        assert row["lb"] == ("0" if p["class"] in ("sd", "sigma") else "")


def test_r_round_is_rs_round():
    """Values whose R round(x, 1) differs from Python's round (checked in R 4.2.2)."""
    r_said = {0.45: 0.4, 1.05: 1.0, 0.15: 0.1, -0.05: -0.0, 2.675: 2.7, 17.25: 17.2, 17.35: 17.4}
    for x, want in r_said.items():
        assert peers.r_round(x, 1) == want, x
    assert round(0.45, 1) != peers.r_round(0.45, 1)


# -- the exact posterior of the random-intercept case --------------------------------------
def _exact_random_intercept(df: pd.DataFrame, priors: dict[str, tuple], grid: int = 500):
    """Posterior moments of y ~ x + (1 | g) without MCMC.

    Priors: Intercept (of the centred x) ~ N(m_i, s_i), b ~ N(0, s_b), sd ~ half-N(0, s_sd),
    sigma ~ Exponential(rate). Given (sd, sigma) the marginal of y is Gaussian with a
    compound-symmetric covariance per group, and beta = (Intercept, b) is conjugate: it
    integrates out in closed form. (log sd, log sigma) are integrated on a grid.
    """
    x = df["std_age"].to_numpy(float)
    y = df["y"].to_numpy(float)
    codes, levels = pd.factorize(df["county"], sort=True)
    xbar = x.mean()
    X = np.column_stack([np.ones_like(x), x - xbar])
    G = len(levels)
    n_g = np.bincount(codes, minlength=G).astype(float)
    sx = np.stack([np.bincount(codes, X[:, k], G) for k in range(2)], axis=1)  # (G, 2)
    sy = np.bincount(codes, y, G)
    XX = X.T @ X
    Xy = X.T @ y
    yy = y @ y
    m0 = np.array([priors["Intercept"][0], 0.0])
    S0inv = np.diag([1 / priors["Intercept"][1] ** 2, 1 / priors["b"][1] ** 2])

    # a coarse pass finds where the posterior lives, a fine grid covers +-10 SDs of it
    def evaluate(ls, lsig):
        sd, sig = np.exp(ls)[:, None], np.exp(lsig)[None, :]
        s2, v2 = sd**2, sig**2
        w = s2[..., None] / (v2[..., None] + n_g * s2[..., None])  # (a, b, G)
        A = S0inv + (XX - np.einsum("abg,gi,gj->abij", w, sx, sx)) / v2[..., None, None]
        h = S0inv @ m0 + (Xy - np.einsum("abg,gi,g->abi", w, sx, sy)) / v2[..., None]
        yVy = (yy - np.einsum("abg,g->ab", w, sy**2)) / v2
        logdetV = (len(y) - G) * np.log(v2) + np.log(v2[..., None] + n_g * s2[..., None]).sum(-1)
        Ainv = np.linalg.inv(A)
        mean = np.einsum("abij,abj->abi", Ainv, h)
        logml = -0.5 * (logdetV + np.linalg.slogdet(A)[1] + yVy - np.einsum("abi,abi->ab", h, mean))
        logprior = -0.5 * (sd / priors["sd"][1]) ** 2 - priors["sigma"][0] * sig
        logpost = logml + logprior + np.log(sd) + np.log(sig)  # + the Jacobian of the logs
        return logpost, mean, Ainv, w

    def span(v, pm, n):
        m = (pm * v).sum()
        s = max(math.sqrt((pm * (v - m) ** 2).sum()), 2 * (v[1] - v[0]))
        return np.linspace(m - 10 * s, m + 10 * s, n)

    ls = lsig = np.linspace(math.log(0.01), math.log(1000.0), 300)
    for n in (100, grid):  # coarse, then around the mass, then fine
        lp, mean, Ainv, w = evaluate(ls, lsig)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        ls, lsig = span(ls, p.sum(1), n), span(lsig, p.sum(0), n)
    lp, mean, Ainv, w = evaluate(ls, lsig)
    p = np.exp(lp - lp.max())
    p /= p.sum()
    edge = p[0].sum() + p[-1].sum() + p[:, 0].sum() + p[:, -1].sum()
    assert edge < 1e-10, edge

    out = {}
    sd, sig = np.exp(ls), np.exp(lsig)

    def moments_1d(v, pm):
        m = (pm * v).sum()
        cdf = np.cumsum(pm)
        q = lambda t: float(np.interp(t, cdf - pm / 2, v))  # noqa: E731
        return {
            "mean": m,
            "sd": math.sqrt((pm * (v - m) ** 2).sum()),
            "q5": q(0.05),
            "q95": q(0.95),
        }

    out["sd_county__Intercept"] = moments_1d(sd, p.sum(1))
    out["sigma"] = moments_1d(sig, p.sum(0))
    # beta: a mixture of Gaussians over the grid
    T = {
        "Intercept": np.array([1.0, 0.0]),
        "b_Intercept": np.array([1.0, -xbar]),
        "b_std_age": np.array([0.0, 1.0]),
    }
    for name, t in T.items():
        m_ab = mean @ t
        v_ab = np.einsum("i,abij,j->ab", t, Ainv, t)
        m = (p * m_ab).sum()
        var = (p * (v_ab + m_ab**2)).sum() - m**2
        lo, hi = m - 8 * math.sqrt(var), m + 8 * math.sqrt(var)
        out[name] = {
            "mean": m,
            "sd": math.sqrt(var),
            "q5": _mixture_quantile(0.05, p, m_ab, np.sqrt(v_ab), lo, hi),
            "q95": _mixture_quantile(0.95, p, m_ab, np.sqrt(v_ab), lo, hi),
        }
    # each county's effect: E[u_g | sd, sigma, beta] = w_g (sum_g y - sx_g' beta), linear in
    # beta, with variance w_g sigma^2 given beta
    ranef = {}
    for k, lev in enumerate(levels):
        wk = w[..., k]
        m_ab = wk * (sy[k] - mean @ sx[k])
        v_ab = wk * sig[None, :] ** 2 + wk**2 * np.einsum("i,abij,j->ab", sx[k], Ainv, sx[k])
        m = (p * m_ab).sum()
        ranef[lev] = {"mean": m, "sd": math.sqrt((p * (v_ab + m_ab**2)).sum() - m**2)}
    return out, ranef


def _mixture_quantile(prob, w, mean, sd, lo, hi) -> float:
    """The ``prob`` quantile of the Gaussian mixture sum_k w_k N(mean_k, sd_k^2)."""
    return brentq(lambda z: float((w * norm.cdf((z - mean) / sd)).sum()) - prob, lo, hi)


def _dist_args(prior: str) -> tuple:
    return peers.parse_prior(prior)[1]


def test_the_random_intercept_run_matches_the_exact_posterior():
    (c,) = [c for c in CASES if c["formula"] == "y ~ std_age + (1 | county)" and c["priors"]]
    r = ref(c["name"])
    given = {p["class"]: p["prior"] for p in c["priors"]}
    assert peers.parse_prior(given["Intercept"])[0] == "normal"
    assert peers.parse_prior(given["b"])[0] == "normal"
    assert peers.parse_prior(given["sd"]) == ("normal", (0.0, _dist_args(given["sd"])[1]))
    assert peers.parse_prior(given["sigma"])[0] == "exponential"
    priors = {k: _dist_args(v) for k, v in given.items()}
    exact, ranef = _exact_random_intercept(data(r["data"], r["group"]), priors)
    for p, e in exact.items():
        s = r["parameters"][p]
        assert abs(s["mean"] - e["mean"]) <= 4 * s["mcse_mean"], (p, s["mean"], e["mean"])
        assert abs(s["sd"] - e["sd"]) <= 4 * s["mcse_sd"], (p, s["sd"], e["sd"])
        for q in ("q5", "q95"):
            assert abs(s[q] - e[q]) <= 0.05 * e["sd"], (p, q, s[q], e[q])
    for lev, e in ranef.items():
        s = r["ranef"]["county"][lev]["Intercept"]
        assert abs(s["mean"] - e["mean"]) <= 4 * s["mcse_mean"], (lev, s["mean"], e["mean"])
        assert abs(s["sd"] - e["sd"]) <= 4 * s["mcse_sd"], (lev, s["sd"], e["sd"])
