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
- the runs with Gaussian priors on the fixed effects (random intercept; intercept +
  slope) agree with the exact posterior, computed without MCMC by integrating the fixed
  effects out in closed form and the covariance parameters on a grid: means and SDs of
  every global parameter and of every county's effect (and the 5%/95% quantiles of the
  random-intercept model).
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
        assert min(s["ess_bulk"], s["ess_tail"]) >= 2_500, p  # MCSE ~ SD / sqrt(ESS) <= 2% SD
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
        # the class row carries the bound (sd, sigma > 0); coefficient rows inherit it
        bounded = p["class"] in ("sd", "sigma") and not p.get("coef")
        assert row["lb"] == ("0" if bounded else "")


def test_r_round_is_rs_round():
    """Values whose R round(x, 1) differs from Python's round (checked in R 4.2.2)."""
    r_said = {0.45: 0.4, 1.05: 1.0, 0.15: 0.1, -0.05: -0.0, 2.675: 2.7, 17.25: 17.2, 17.35: 17.4}
    for x, want in r_said.items():
        assert peers.r_round(x, 1) == want, x
    assert round(0.45, 1) != peers.r_round(0.45, 1)


# -- the exact posterior, without MCMC --------------------------------------------------
def _log_prior(prior: str, x: np.ndarray) -> np.ndarray:
    """A Stan-style prior's log density at ``x``, up to a constant (half at 0 for x > 0)."""
    fam, a = peers.parse_prior(prior)
    if fam == "normal":
        return -0.5 * ((x - a[0]) / a[1]) ** 2
    if fam == "student_t":
        return -(a[0] + 1) / 2 * np.log1p(((x - a[1]) / a[2]) ** 2 / a[0])
    if fam == "exponential":
        return -a[0] * x
    raise ValueError(f"no exact reference for the prior {prior}")


class ExactPosterior:
    """The posterior of ``y ~ x... + (1 [+ x] | g)`` with Gaussian priors on the fixed
    effects, by quadrature: no MCMC.

    Given the covariance parameters (the SDs, the correlation, sigma) y is Gaussian
    with covariance sigma^2 I + Z_g Sigma Z_g' per group (Woodbury with M_g = sigma^2
    Sigma^-1 + Z_g'Z_g), and beta (Intercept of the centred predictors, b) is conjugate:
    it integrates out in closed form, and its conditional is N(A^-1 h, A^-1). The
    covariance parameters are integrated on a product grid in unconstrained coordinates
    (log sd, atanh rho, log sigma, with their Jacobians), placed by coarse passes and
    checked to hold the mass. A group's effect given everything else is
    N(M_g^-1 (Zy_g - ZX_g beta), sigma^2 M_g^-1): its moments mix over the grid.
    """

    def __init__(self, df: pd.DataFrame, formula: str, group: str, priors: dict[str, str]):
        f = peers.parse_formula(formula)
        self.f, self.q, self.group = f, len(f.re_names), group
        given = dict(priors)
        self.prior_sd = [given.get(f"sd_{group}__{c}", given["sd"]) for c in f.re_names]
        self.prior_sigma = given["sigma"]
        self.eta = peers.parse_prior(given.get("cor", "lkj(1)"))[1][0] if self.q > 1 else 1.0
        beta = [given["Intercept"], *(given.get(f"b_{x}", given["b"]) for x in f.fixed)]
        parsed = [peers.parse_prior(b) for b in beta]
        assert all(fam == "normal" for fam, _ in parsed), "conjugate (normal) priors on beta"
        self.m0 = np.array([a[0] for _, a in parsed])
        self.S0inv = np.diag([1 / a[1] ** 2 for _, a in parsed])
        y = df[f.response].to_numpy(float)
        X = df[list(f.fixed)].to_numpy(float)
        self.x_means = X.mean(axis=0)
        X = np.column_stack([np.ones(len(y)), X - self.x_means])
        Z = np.column_stack([np.ones(len(y)), *(df[c].to_numpy(float) for c in f.random)])
        codes, self.levels = pd.factorize(df[group], sort=True)
        G = len(self.levels)
        onehot = np.zeros((len(y), G))
        onehot[np.arange(len(y)), codes] = 1.0
        self.n = len(y)
        self.ZZ = np.einsum("ng,ni,nj->gij", onehot, Z, Z)
        self.ZX = np.einsum("ng,ni,nj->gij", onehot, Z, X)
        self.Zy = np.einsum("ng,ni,n->gi", onehot, Z, y)
        self.XX, self.Xy, self.yy = X.T @ X, X.T @ y, y @ y

    @property
    def dim(self) -> int:
        return self.q + (self.q * (self.q - 1)) // 2 + 1

    def evaluate(self, t: np.ndarray):
        """Log posterior (up to a constant) at unconstrained points ``t`` (P, dim), and
        beta's conditional mean and covariance, and M_g^-1, sigma^2 at each point."""
        q = self.q
        sd = np.exp(t[:, :q])
        sig2 = np.exp(2 * t[:, -1])
        R = np.broadcast_to(np.eye(q), (len(t), q, q)).copy()
        lp = np.zeros(len(t))
        if q == 2:
            rho = np.tanh(t[:, 2])
            R[:, 0, 1] = R[:, 1, 0] = rho
            lp += self.eta * np.log1p(-(rho**2))  # lkj (eta - 1) + the Jacobian of tanh
        elif q > 2:
            raise NotImplementedError("one correlation at most")
        Sigma = sd[:, :, None] * R * sd[:, None, :]
        M = sig2[:, None, None, None] * np.linalg.inv(Sigma)[:, None] + self.ZZ[None]
        Minv = np.linalg.inv(M)
        logdetV = self.n * np.log(sig2) + (
            np.linalg.slogdet(M)[1]
            + np.linalg.slogdet(Sigma)[1][:, None]
            - q * np.log(sig2)[:, None]
        ).sum(axis=1)
        MZX = np.einsum("pgij,gjk->pgik", Minv, self.ZX)
        MZy = np.einsum("pgij,gj->pgi", Minv, self.Zy)
        XVX = (self.XX - np.einsum("gji,pgjk->pik", self.ZX, MZX)) / sig2[:, None, None]
        XVy = (self.Xy - np.einsum("gji,pgj->pi", self.ZX, MZy)) / sig2[:, None]
        yVy = (self.yy - np.einsum("gi,pgi->p", self.Zy, MZy)) / sig2
        A = self.S0inv + XVX
        h = self.S0inv @ self.m0 + XVy
        Ainv = np.linalg.inv(A)
        mean = np.einsum("pij,pj->pi", Ainv, h)
        lp += -0.5 * (logdetV + np.linalg.slogdet(A)[1] + yVy - np.einsum("pi,pi->p", h, mean))
        for k in range(q):  # half priors on the SDs, with the Jacobian of log
            lp += _log_prior(self.prior_sd[k], sd[:, k]) + t[:, k]
        lp += _log_prior(self.prior_sigma, np.sqrt(sig2)) + t[:, -1]
        return lp, mean, Ainv, Minv, sig2

    def _axes(self, n: int, passes: int = 6) -> list[np.ndarray]:
        """Grid axes around the posterior mass: coarse passes, each +-8 SDs of the last.

        An SD near zero has a density that stays finite at 0, i.e. a tail ~ e^(log sd) on
        the log scale: the SD axes get 12 more points down to log sd = -30.
        """
        axes = [np.linspace(-8.0, 8.0, 13) for _ in range(self.dim)]
        for _ in range(passes):
            w, _ = self._weights(axes)
            new = []
            for k, a in enumerate(axes):
                marg = w.sum(axis=tuple(j for j in range(self.dim) if j != k))
                m = (marg * a).sum()
                s = max(math.sqrt((marg * (a - m) ** 2).sum()), 0.25 * (a[1] - a[0]))
                new.append(np.linspace(m - 8 * s, m + 8 * s, 13))
            axes = new
        axes = [np.linspace(a[0], a[-1], n) for a in axes]
        for k in range(self.q):
            axes[k] = np.concatenate([np.linspace(-30.0, axes[k][0], 13)[:-1], axes[k]])
        return axes

    @staticmethod
    def _volume(axes) -> np.ndarray:
        """Trapezoid weights of the product grid (the axes need not be uniform)."""
        dx = [np.gradient(a) for a in axes]  # (a[i+1] - a[i-1]) / 2, one-sided at the ends
        for d in dx:
            d[0], d[-1] = d[0] / 2, d[-1] / 2
        return functools.reduce(np.multiply.outer, dx).ravel()

    def _weights(self, axes):
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
        lp = self.evaluate(pts)[0]
        w = np.exp(lp - lp.max()) * self._volume(axes)
        return (w / w.sum()).reshape([len(a) for a in axes]), pts

    def moments(self, n: int):
        """Posterior mean, SD, 5% and 95% quantiles of the global parameters (brms's
        names), and the mean and SD of every group's effect."""
        f, q, g = self.f, self.q, self.group
        axes = self._axes(n)
        shape = [len(a) for a in axes]
        rest = np.stack(np.meshgrid(*axes[1:], indexing="ij"), axis=-1).reshape(-1, len(axes) - 1)
        lps, means, Ainvs, Ms, S2 = [], [], [], [], []
        for a0 in axes[0]:  # one slice of the first axis at a time
            pts = np.column_stack([np.full(len(rest), a0), rest])
            lp, mean, Ainv, Minv, sig2 = self.evaluate(pts)
            lps.append(lp)
            means.append(mean)
            Ainvs.append(Ainv)
            Ms.append(Minv)
            S2.append(sig2)
        lp = np.concatenate(lps)
        w = np.exp(lp - lp.max()) * self._volume(axes)
        w /= w.sum()
        W = w.reshape(shape)
        edge = max(float(np.take(W, [0, -1], axis=k).sum()) for k in range(len(axes)))
        assert edge < 1e-6, f"the grid misses posterior mass: {edge}"
        mean, Ainv = np.concatenate(means), np.concatenate(Ainvs)
        out = {}

        def on_grid(name, k, transform):
            marg = W.sum(axis=tuple(j for j in range(len(axes)) if j != k))
            v = transform(axes[k])
            m = (marg * v).sum()
            cdf = np.cumsum(marg) - marg / 2  # the quantiles in the unconstrained coordinate
            qs = [float(transform(np.interp(p, cdf, axes[k]))) for p in (0.05, 0.95)]
            out[name] = {"mean": m, "sd": math.sqrt((marg * (v - m) ** 2).sum())}
            out[name].update(q5=qs[0], q95=qs[1])

        for k, c in enumerate(f.re_names):
            on_grid(f"sd_{g}__{c}", k, np.exp)
        if q == 2:
            on_grid(f"cor_{g}__{f.re_names[0]}__{f.re_names[1]}", 2, np.tanh)
        on_grid("sigma", len(axes) - 1, np.exp)
        p = len(self.m0)
        T = {"Intercept": np.eye(p)[0], "b_Intercept": np.concatenate([[1.0], -self.x_means])}
        for k, x in enumerate(f.fixed, start=1):
            T[f"b_{x}"] = np.eye(p)[k]
        for name, t in T.items():
            m_k = mean @ t
            s_k = np.sqrt(np.einsum("i,kij,j->k", t, Ainv, t))
            m = (w * m_k).sum()
            sd = math.sqrt((w * (s_k**2 + m_k**2)).sum() - m**2)
            lo, hi = m - 10 * sd, m + 10 * sd
            out[name] = {
                "mean": m,
                "sd": sd,
                "q5": _mixture_quantile(0.05, w, m_k, s_k, lo, hi),
                "q95": _mixture_quantile(0.95, w, m_k, s_k, lo, hi),
            }
        # every group's effect: mean linear in beta; variance sigma^2 M^-1 + the beta part
        Minv, sig2 = np.concatenate(Ms), np.concatenate(S2)
        Eu = np.einsum("kgij,gj->kgi", Minv, self.Zy) - np.einsum(
            "kgij,gjl,kl->kgi", Minv, self.ZX, mean
        )
        B = np.einsum("kgij,gjl->kgil", Minv, self.ZX)
        Vu = sig2[:, None, None, None] * Minv + np.einsum("kgil,klm,kgjm->kgij", B, Ainv, B)
        m = np.einsum("k,kgi->gi", w, Eu)
        v = np.einsum("k,kgii->gi", w, Vu) + np.einsum("k,kgi->gi", w, Eu**2) - m**2
        ranef = {
            lev: {c: {"mean": m[i, j], "sd": math.sqrt(v[i, j])} for j, c in enumerate(f.re_names)}
            for i, lev in enumerate(self.levels)
        }
        return out, ranef


def _mixture_quantile(prob, w, mean, sd, lo, hi) -> float:
    """The ``prob`` quantile of the Gaussian mixture sum_k w_k N(mean_k, sd_k^2)."""
    return brentq(lambda z: float((w * norm.cdf((z - mean) / sd)).sum()) - prob, lo, hi)


# the runs whose priors are conjugate on beta: (name, grid points per axis, quantiles?).
# On the 4-d grid of the slopes model (20 points a side, 0.8 posterior SD apart) means and
# SDs have converged (they move by < 0.1 MCSE from 20 to 26 points a side) but the 5%/95%
# quantiles, read off the gridded marginal CDF, have not: they are compared on the 2-d
# grid only.
EXACT = [("brms_web_intercept", 400, True), ("brms_web_slopes", 20, False)]


@pytest.mark.parametrize("name,n,quantiles", EXACT)
def test_the_run_matches_the_exact_posterior(name, n, quantiles):
    c, r = case(name), ref(name)
    assert all(set(p) == {"class", "prior"} for p in c["priors"])  # class-wide priors
    given = {p["class"]: p["prior"] for p in c["priors"]}
    ex = ExactPosterior(data(r["data"], r["group"]), r["formula"], r["group"], given)
    exact, ranef = ex.moments(n)
    assert set(exact) == set(r["parameters"])
    for p, e in exact.items():
        s = r["parameters"][p]
        assert abs(s["mean"] - e["mean"]) <= 4 * s["mcse_mean"], (p, s["mean"], e["mean"])
        assert abs(s["sd"] - e["sd"]) <= 4 * s["mcse_sd"], (p, s["sd"], e["sd"])
        for q in ("q5", "q95") if quantiles else ():
            assert abs(s[q] - e[q]) <= 0.05 * e["sd"], (p, q, s[q], e[q])
    for lev, effects in ranef.items():
        for coef, e in effects.items():
            s = r["ranef"][r["group"]][lev][coef]
            assert abs(s["mean"] - e["mean"]) <= 4 * s["mcse_mean"], (
                lev,
                coef,
                s["mean"],
                e["mean"],
            )
            assert abs(s["sd"] - e["sd"]) <= 4 * s["mcse_sd"], (lev, coef, s["sd"], e["sd"])
