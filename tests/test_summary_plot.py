"""``streamlmm summary`` and ``streamlmm plot``: content checked against the snapshot."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.plot import (
    caterpillar_data,
    plot_all,
    pooling_data,
    pooling_distance_data,
    residuals_data,
    shrinkage_data,
    trajectory_data,
)
from streamlmm.simulate import scenario
from streamlmm.snapshot import Snapshot
from streamlmm.summary import (
    abbreviate,
    compare_with_truth,
    fixef_correlation,
    format_summary,
    information_criteria,
    load_snapshot,
    summary_dict,
)

QUANTILES = {"min": -3.1, "1Q": -0.67, "median": 0.01, "3Q": 0.66, "max": 3.4}


def _fit(method: str = "REML", n: int = 6_000, seed: int = 9):
    sim = scenario("basic", n, seed=seed, n_groups=40)
    df = pd.DataFrame(list(sim.events))
    m = MixedLM(sim.formula, method=method, em_every=500, refit_every=2_000)
    for start in range(0, len(df), 500):  # in batches, so that the history has records
        part = df.iloc[start : start + 500]
        m.learn_many(part[["g", "x1", "x2"]], part["y"])
        m.predict_one({"g": "g0", "x1": 0.0, "x2": 0.0})
    s = m.fit().snapshot(offsets={"jsonl:0": n})
    fields = {k: getattr(s, k) for k in Snapshot.__slots__ if not k.startswith("_")}
    fields.pop("n_groups")
    fields["resid_quantiles"] = QUANTILES
    fields["warnings"] = ("an example warning",)
    return Snapshot(**fields), sim.truth


@pytest.fixture(scope="module")
def fitted():
    return _fit()


def test_text_summary_numbers(fitted):
    snap, _ = fitted
    text = format_summary(snap)
    lines = text.splitlines()
    assert lines[0] == "Linear mixed model fit by REML"
    assert lines[1] == f"Formula: {snap.formula}"
    assert f"REML criterion at convergence: {snap.criterion:.1f}" in text
    assert "AIC" not in text  # lme4 prints no AIC/BIC for REML fits
    assert "approximate" in text and "-0.6700" in text and "3.4000" in text
    assert f"Number of obs: {snap.n_obs:g}, groups:  g, {snap.n_groups}" in text
    assert "warning: an example warning" in text
    assert "offsets: jsonl:0=6000" in text
    row = next(line for line in lines if line.startswith(" x2 "))
    est, se, t = map(float, row.split()[1:])
    assert est == pytest.approx(snap.fixef["x2"], abs=1e-4)
    assert se == pytest.approx(snap.fixef_se["x2"], rel=1e-3)
    assert t == pytest.approx(snap.fixef["x2"] / snap.fixef_se["x2"], rel=1e-3)
    vc = next(line for line in lines if line.startswith(" g "))
    assert vc.split()[1] == "(Intercept)"
    assert float(vc.split()[2]) == pytest.approx(snap.re_cov[0, 0], rel=1e-3)
    assert float(vc.split()[3]) == pytest.approx(math.sqrt(snap.re_cov[0, 0]), rel=1e-3)
    slope = next(line for line in lines if line.strip().startswith("x1") and "." in line)
    corr = snap.re_cov[0, 1] / math.sqrt(snap.re_cov[0, 0] * snap.re_cov[1, 1])
    assert float(slope.split()[-1]) == pytest.approx(corr, abs=0.006)
    resid = next(line for line in lines if line.startswith(" Residual"))
    assert float(resid.split()[-1]) == pytest.approx(snap.sigma, rel=1e-3)
    assert "Correlation of Fixed Effects:" in text
    c = fixef_correlation(snap)
    x2row = [line for line in lines if line.startswith(" x2 ") and len(line.split()) == 3][0]
    assert [float(v) for v in x2row.split()[1:]] == pytest.approx(c[2, :2].tolist(), abs=6e-4)


def test_json_summary(fitted):
    snap, truth = fitted
    d = summary_dict(snap, groups=True, truth=truth)
    json.dumps(d)  # JSON-ready
    assert d["fixef"] == dict(snap.fixef) and d["group_factor"] == "g"
    assert d["information"]["logLik"] == pytest.approx(-snap.criterion / 2)
    assert d["information"]["AIC"] is None
    assert d["varcorr"][-1] == {
        "groups": "Residual",
        "name": "",
        "variance": snap.sigma**2,
        "sd": snap.sigma,
        "corr": [],
    }
    g = d["groups"][3]
    assert g["group"] == snap.keys[3] and g["ranef"] == snap.ranef(snap.keys[3])
    assert g["shrinkage"] == snap.shrinkage(snap.keys[3])
    assert g["raw_mean"] == pytest.approx(snap.group_ybar[3])
    assert d["resid_quantiles"] == QUANTILES and d["resid_quantiles_approximate"]


def test_ml_information_criteria():
    snap, _ = _fit("ML", n=3_000)
    info = information_criteria(snap)
    k = 3 + 3 + 1  # p + θ + σ, as lme4 counts
    assert info["AIC"] == pytest.approx(snap.criterion + 2 * k)
    assert info["BIC"] == pytest.approx(snap.criterion + k * math.log(snap.n_obs))
    assert info["df.resid"] == snap.n_obs - k
    text = format_summary(snap)
    assert "maximum likelihood" in text and f"{info['AIC']:.1f}" in text
    assert f"{info['logLik']:.1f}" in text


def test_vs_truth(fitted):
    snap, truth = fitted
    cmp = compare_with_truth(snap, truth)
    rows = {(r["kind"], r["name"]): r for r in cmp["rows"]}
    r = rows[("fixef", "x2")]
    assert r["truth"] == -1.2 and r["diff"] == pytest.approx(snap.fixef["x2"] + 1.2)
    assert r["z"] == pytest.approx(r["diff"] / snap.fixef_se["x2"])
    assert rows[("re_sd", "x1")]["truth"] == 0.5
    assert rows[("re_corr", "(Intercept),x1")]["truth"] == pytest.approx(0.3)
    assert rows[("sigma", "Residual")]["truth"] == 1.0
    assert abs(r["z"]) < 4 and abs(rows[("sigma", "Residual")]["diff"]) < 0.05
    assert cmp["groups"]["(Intercept)"]["corr"] > 0.95
    text = format_summary(snap, truth=truth, groups=True)
    assert "Compared with the simulated truth:" in text and "Group effects (BLUPs" in text


def test_cli_summary_and_plot(fitted, tmp_path):
    snap, truth = fitted
    d = tmp_path / "snaps"
    snap.save(d)
    tf = tmp_path / "truth.json"
    tf.write_text(json.dumps(truth))
    run = [sys.executable, "-m", "streamlmm.cli"]
    out = subprocess.run(
        run + ["summary", str(d), "--vs-truth", str(tf)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == format_summary(load_snapshot(d), truth=truth) + "\n"
    js = subprocess.run(run + ["summary", str(d), "--json", "--groups"], capture_output=True)
    assert json.loads(js.stdout)["n_groups"] == snap.n_groups
    missing = tmp_path / "nothing-here"
    bad = subprocess.run(run + ["summary", str(missing)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no snapshot directory" in bad.stderr
    assert not missing.exists()  # reading never creates anything
    bad = subprocess.run(run + ["plot", str(missing), "--out", str(tmp_path / "p")])
    assert bad.returncode == 2 and not missing.exists()
    pl = subprocess.run(run + ["plot", str(d), "--out", str(tmp_path / "p")], capture_output=True)
    assert pl.returncode == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "caterpillar.png",
        "pooling.png",
        "residuals.png",
        "shrinkage.png",
        "trajectories.png",
    ]


# -- plots -------------------------------------------------------------------------------------
def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pngs(fitted, tmp_path):
    snap, _ = fitted
    paths = plot_all(snap, tmp_path / "plots")
    assert set(paths) == {"shrinkage", "caterpillar", "pooling", "residuals", "trajectories"}
    for p in paths.values():
        w, h = _png_size(p)
        assert 400 <= w <= 2000 and 300 <= h <= 1500


def test_shrinkage_data(fitted):
    snap, _ = fitted
    d = shrinkage_data(snap)
    assert np.array_equal(d["n"], snap.group_n)
    want = [snap.shrinkage(k)["(Intercept)"] for k in snap.keys]
    assert d["factor"] == pytest.approx(want, abs=1e-12)
    tau2, s2 = snap.re_cov[0, 0], snap.sigma**2
    assert d["curve"] == pytest.approx(tau2 / (tau2 + s2 / d["curve_n"]))
    assert d["curve_n"].min() <= snap.group_n.min() and d["curve_n"].max() >= snap.group_n.max()


def test_caterpillar_data(fitted):
    snap, _ = fitted
    for t in range(2):
        d = caterpillar_data(snap, t)
        assert np.all(np.diff(d["b"]) >= 0)
        i = list(snap.keys).index(d["keys"][0])
        sd = math.sqrt(snap.condvar[i, t, t])
        assert d["b"][0] == snap.b[i, t]
        assert (d["lo"][0], d["hi"][0]) == pytest.approx(
            (snap.b[i, t] - 1.96 * sd, snap.b[i, t] + 1.96 * sd), rel=1e-4
        )


def _events(snap_formula="y ~ x1 + x2 + (1 | g)", n=3_000, seed=4):
    """A fitted model of the basic scenario's events, the events, and its snapshot."""
    sim = scenario("basic", n, seed=seed, n_groups=60)
    df = pd.DataFrame(list(sim.events))
    m = MixedLM(snap_formula)
    m.learn_many(df[["g", "x1", "x2"]], df["y"])
    return df, m.fit().snapshot()


def _own_ols(df, snap, zcols):
    """Each group's own least-squares fit of its random-effect columns to y − x'β̂ (plain
    numpy on the raw events, independent of the statistics), its SE from σ̂²(Z'Z)⁻¹;
    NaN where Z'Z is singular."""
    beta = snap.fixef
    r = df["y"] - beta["(Intercept)"] - beta["x1"] * df["x1"] - beta["x2"] * df["x2"]
    out, se = {}, {}
    for key, part in df.groupby("g", sort=False):
        Z = np.column_stack([np.ones(len(part))] + [part[c].to_numpy() for c in zcols])
        if np.linalg.matrix_rank(Z) < Z.shape[1]:
            out[key] = se[key] = np.full(Z.shape[1], np.nan)
            continue
        out[key] = np.linalg.lstsq(Z, r[part.index].to_numpy(), rcond=None)[0]
        se[key] = snap.sigma * np.sqrt(np.diag(np.linalg.inv(Z.T @ Z)))
    return out, se


def test_pooling_data_random_intercept_shrinks_each_own_estimate_toward_the_population():
    """The picture's definition: each group's own estimate ȳ_g − x̄_g'β̂ (no pooling, an
    independent per-group OLS here) with SE σ̂/√n_g, and its BLUP; for a random intercept
    BLUP = f·own with f = τ²/(τ² + σ²/n_g) in [0, 1], so every arrow points from the own
    estimate toward the population value 0 and stops short of it."""
    df, snap = _events()
    d = pooling_data(snap)
    want, want_se = _own_ols(df, snap, [])
    own = np.array([want[k][0] for k in snap.keys])
    np.testing.assert_allclose(d["own"], own, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d["own_se"], [want_se[k][0] for k in snap.keys], rtol=1e-9)
    np.testing.assert_allclose(d["own_se"], snap.sigma / np.sqrt(snap.group_n), rtol=1e-12)
    assert d["population"] == 0.0 and d["identified"].all()
    tau2, s2 = snap.re_cov[0, 0], snap.sigma**2
    factor = d["blup"] / d["own"]
    assert np.all((factor >= 0) & (factor <= 1))
    np.testing.assert_allclose(factor, tau2 / (tau2 + s2 / snap.group_n), rtol=1e-9)


def test_pooling_data_random_slopes_are_each_groups_own_fit():
    """With (1 + x1 | g): each group's own least-squares fit of z = (1, x1) to y − x'β̂,
    NaN where one group's x1 has no spread; the distance from the population in the
    prior's metric never grows from the own estimate to the BLUP."""
    df, snap = _events("y ~ x1 + x2 + (1 + x1 | g)")
    df.loc[len(df)] = {"g": "lone", "x1": 0.5, "x2": 0.0, "y": 1.0}  # one event: no slope
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    m.learn_many(df[["g", "x1", "x2"]], df["y"])
    snap = m.fit().snapshot()
    want, want_se = _own_ols(df, snap, ["x1"])
    for t in range(2):
        d = pooling_data(snap, t)
        own = np.array([want[k][t] for k in snap.keys])
        np.testing.assert_allclose(d["own"], own, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(d["own_se"], [want_se[k][t] for k in snap.keys], rtol=1e-8)
        assert list(d["identified"]) == [k != "lone" for k in snap.keys]
    dist = pooling_distance_data(snap)
    ok = dist["identified"]
    assert np.all(dist["blup"][ok] <= dist["own"][ok] * (1 + 1e-12))


def test_residuals_data_are_the_snapshots_residuals_of_every_event():
    """While the stream fits in the reservoir, the picture's points are every event's
    (y − x'β̂ − z'b̂_g)/σ̂ against x'β̂ + z'b̂_g, computed here from the raw events."""
    df, snap = _events("y ~ x1 + x2 + (1 + x1 | g)")
    d = residuals_data(snap)
    assert d["events"] == d["of"] == len(df) == d["count"].sum()
    fitted = np.array([snap.predict(r) for r in df[["g", "x1", "x2"]].to_dict("records")])
    want = sorted(zip(np.round(fitted, 9), np.round((df["y"] - fitted) / snap.sigma, 9)))
    got = sorted(zip(np.round(d["fitted"], 9), np.round(d["resid"], 9)))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-7, atol=1e-7)
    for t, qq in enumerate(d["qq"]):
        assert np.array_equal(qq["b"], np.sort(snap.b[:, t]))
        G = snap.n_groups
        assert qq["normal"][0] == pytest.approx(-qq["normal"][-1])
        assert qq["normal"][G // 2] == pytest.approx(0.0, abs=0.05)


def test_trajectory_data(fitted):
    snap, _ = fitted
    d = trajectory_data(snap)
    assert len(d["events"]) == len(snap.history) >= 3
    last = snap.history[-1]  # the newest record (several may share an event count)
    cov = np.array(last["re_cov"])
    assert d["sd"][-1] == pytest.approx(np.sqrt(np.diag(cov)))
    assert d["corr"][-1, 0] == pytest.approx(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))
    assert d["sigma"][-1] == pytest.approx(last["sigma"], rel=1e-12)
    assert set(d["kind"]) <= {"refit", "em"}


def test_a_stored_key_that_is_not_valid_unicode_is_printed_and_drawn(tmp_path, helpers):
    """A snapshot written before keys with a lone surrogate were refused: ``summary
    --groups`` (text and JSON) and ``plot`` show the key escaped, and work."""
    m = MixedLM("y ~ x + (1 | g)")
    for i in range(120):
        m.learn_one({"g": ["a", "b", "zzzzzz"][i % 3], "x": float(i % 5)}, float(i % 3 + i % 4))
    snap = helpers.with_lone_surrogate(m.fit().snapshot(), "zzzzzz")
    d = tmp_path / "snaps"
    snap.save(d)
    run = [sys.executable, "-m", "streamlmm.cli"]
    out = subprocess.run(run + ["summary", str(d), "--groups"], capture_output=True)
    assert out.returncode == 0, out.stderr
    row = next(r for r in out.stdout.decode("utf-8").splitlines() if r.startswith(" \\ud800"))
    assert row.split()[1] == "40"  # its own n: the key's row was found, not the prior's
    js = subprocess.run(run + ["summary", str(d), "--groups", "--json"], capture_output=True)
    assert js.returncode == 0, js.stderr
    groups = json.loads(js.stdout)["groups"]
    assert [g["group"] for g in groups] == ["a", "b", "\ud800"]
    assert groups[2]["shrinkage"] == snap.shrinkage("\ud800") and groups[2]["shrinkage"] != {
        "(Intercept)": 0.0
    }
    pl = subprocess.run(run + ["plot", str(d), "--out", str(tmp_path / "p")], capture_output=True)
    assert pl.returncode == 0, pl.stderr
    assert len(list((tmp_path / "p").glob("*.png"))) == 5


# R 4's abbreviate(NAMES, 6) and abbreviate(NAMES, 11) of this one vector (Rscript), the
# functions lme4's print of a summary labels the correlation of the fixed effects with
R_NAMES = [
    "(Intercept)", "age", "severitymoderate", "severitysevere", "age:severitymoderate",
    "age:severitysevere", "x1", "x2", "I(x^2)", "log(dose)", "log1p(dose)", "treatmentB",
    "treatmentC", "treatmentD", "sexmale", "aaaaaaaa", "aaaaaaab", "abc def ghi", "ABCDEFGHIJ",
    "xAbCdEfGhI", "income_per_capita", "income_per_person", "a.b.c.d.e.f.g", "severity_score",
    "severity_scale", "Days", "Reaction",
]  # fmt: skip
R_ABBREVIATE_6 = [
    "(Intr)", "age", "svrtym", "svrtys", "ag:svrtym", "ag:svrtys", "x1", "x2", "I(x^2)",
    "lg(ds)", "lg1p()", "trtmnB", "trtmnC", "trtmnD", "sexmal", "aaaaaa", "aaaaab", "abcdfg",
    "ABCDEF", "xACEGI", "incm_pr_c", "incm_pr_p", "a.....", "svrty_scr", "svrty_scl", "Days",
    "Reactn",
]  # fmt: skip
R_ABBREVIATE_11 = [
    "(Intercept)", "age", "severtymdrt", "severitysvr", "ag:svrtymdr", "ag:svrtysvr", "x1",
    "x2", "I(x^2)", "log(dose)", "log1p(dose)", "treatmentB", "treatmentC", "treatmentD",
    "sexmale", "aaaaaaaa", "aaaaaaab", "abc def ghi", "ABCDEFGHIJ", "xAbCdEfGhI",
    "incm_pr_cpt", "incm_pr_prs", "a.b.c.d..f.", "severty_scr", "severty_scl", "Days",
    "Reaction",
]  # fmt: skip


def test_abbreviate_is_r_s():
    assert abbreviate(R_NAMES, 6) == R_ABBREVIATE_6
    assert abbreviate(R_NAMES, 11) == R_ABBREVIATE_11


def test_correlation_labels_are_lme4_s_and_distinct():
    sim = scenario("hospital", 3000, seed=2)
    df = pd.DataFrame(list(sim.events))
    m = MixedLM(
        "y ~ age * severity + (1 + age | hospital)",
        levels={"severity": ["mild", "moderate", "severe"]},
    )
    m.learn_many(df[["hospital", "age", "severity"]], df["y"])
    text = format_summary(m.fit().snapshot())
    block = text[text.index("Correlation of Fixed Effects:") :].splitlines()[1:7]
    # lme4: columns abbreviate(names, 6), rows abbreviate(names, 11), as R gives them
    assert block[0].split() == ["(Intr)", "age", "svrtym", "svrtys", "ag:svrtym"]
    assert [r.split()[0] for r in block[1:]] == [
        "age", "severtymdrt", "severitysvr", "ag:svrtymdr", "ag:svrtysvr",
    ]  # fmt: skip


def test_counts_are_printed_in_full(fitted):
    snap, _ = fitted
    fields = {k: getattr(snap, k) for k in Snapshot.__slots__ if not k.startswith("_")}
    fields.pop("n_groups")
    big = Snapshot(**{**fields, "n_obs": 2_000_000.0, "n_events": 2_000_000, "method": "ML"})
    assert "n_obs=2000000," in repr(big)
    text = format_summary(big)
    assert "Number of obs: 2000000, groups:" in text and "e+06" not in text
    assert " 1999993" in text  # df.resid: 2,000,000 − (3 fixed effects + 3 θ + σ)


def test_a_wide_correlation_matrix_is_not_printed_as_lme4_does():
    rng = np.random.default_rng(1)
    n, p = 400, 14
    X = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"x{i}" for i in range(p)])
    X["g"] = rng.integers(0, 20, n)
    m = MixedLM("y ~ " + " + ".join(f"x{i}" for i in range(p)) + " + (1 | g)")
    m.learn_many(X, pd.Series(rng.normal(size=n)))
    text = format_summary(m.fit().snapshot())
    assert "Correlation of Fixed Effects" not in text
    assert "Correlation matrix not shown by default, as p = 15 > 12." in text
