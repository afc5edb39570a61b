#!/usr/bin/env python
"""Benchmark of the streamlmm core against peers measured in the same run.

Not a test: it prints the environment and a markdown table of measurements, ratios
against peers (river, statsmodels, lme4) and the targets, then the agreement of the
estimates. Run from the repository root::

    .venv/bin/python scripts/bench_core.py            # full sizes (1M events / 20k groups)
    .venv/bin/python scripts/bench_core.py --quick    # smoke test, under a minute

Sections:

1. ``learn_one`` / ``predict_one`` µs per event vs river ``LinearRegression``, and a
   progressive-validation loop (predict then learn, refits included).
2. ``learn_many`` throughput (events/s) with integer and string group keys.
3. ``fit()`` vs statsmodels ``MixedLM`` and lme4 ``lmer`` (REML) on the same simulated
   data, with the agreement of the estimates.
4. Memory per group with 1M groups, key index included.
5. river ``ChickWeights`` progressive validation (MAE) vs river baselines.

statsmodels runs in a child process (so it can be timed out; ``--sm-rows N`` measures it
and streamlmm on a smaller sample instead of the full data); lme4 runs through
``Rscript`` when it and lme4 are installed (nothing is installed by this script).
Timings are the best of a few repeats (the median is shown in brackets).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
BETA = np.array([5.0, 0.3, -1.2])
RE_SD = np.array([2.0, 0.5])
RE_CORR = 0.3
SIGMA = 1.0

ROWS: list[dict] = []  # the result table
NOTES: list[str] = []
AGREE: list[dict] = []  # agreement of estimates


# -- helpers ------------------------------------------------------------------------------
def simulate(n: int, G: int, seed: int) -> pd.DataFrame:
    """Events from the known model: y = Xβ + Zb_g + ε, groups uniform over 0..G-1."""
    rng = np.random.default_rng(seed)
    cov = np.diag(RE_SD) @ np.array([[1.0, RE_CORR], [RE_CORR, 1.0]]) @ np.diag(RE_SD)
    b = rng.multivariate_normal(np.zeros(2), cov, size=G)
    g = rng.permutation(
        np.concatenate([np.arange(G), rng.integers(0, G, n - G)])
    )  # every group seen
    x1 = rng.normal(0.0, 1.0, n)
    x2 = rng.normal(2.0, 1.5, n)
    y = BETA[0] + b[g, 0] + (BETA[1] + b[g, 1]) * x1 + BETA[2] * x2 + rng.normal(0.0, SIGMA, n)
    return pd.DataFrame({"g": g.astype(np.int64), "x1": x1, "x2": x2, "y": y})


def best_of(fn, repeats: int, setup=None):
    """(best, median) seconds of ``fn(setup())`` over ``repeats`` runs."""
    ts = []
    for _ in range(repeats):
        arg = setup() if setup else None
        gc.collect()
        t0 = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def paired(fn_a, setup_a, fn_b, setup_b, repeats: int):
    """Interleaved best-of timings of two workloads: ((best, median), (best, median))."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, setup, ts in ((fn_a, setup_a, ta), (fn_b, setup_b, tb)):
            arg = setup() if setup else None
            gc.collect()
            t0 = time.perf_counter()
            fn(arg)
            ts.append(time.perf_counter() - t0)
    return (min(ta), float(np.median(ta))), (min(tb), float(np.median(tb)))


def fmt(v, unit="", digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a != 0 and (a >= 1e6 or a < 1e-3):
        s = f"{v:.{digits}g}"
    elif a >= 100:
        s = f"{v:,.0f}"
    else:
        s = f"{v:.{digits}g}"
    return f"{s} {unit}".strip()


def row(section, what, ours, peer_name, peer, ratio, target, ok, note=""):
    ROWS.append(
        dict(
            section=section,
            what=what,
            ours=ours,
            peer_name=peer_name,
            peer=peer,
            ratio=ratio,
            target=target,
            ok=ok,
            note=note,
        )
    )


def status(ok):
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- environment --------------------------------------------------------------------------
def r_info():
    """(Rscript path, R version, lme4 version) or Nones when missing."""
    rs = shutil.which("Rscript")
    if not rs:
        return None, None, None
    code = 'cat(R.version.string, "\\n"); cat(as.character(packageVersion("lme4")), "\\n")'
    try:
        out = subprocess.run([rs, "-e", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return rs, None, None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    rver = lines[0] if lines else None
    lme4 = lines[1] if out.returncode == 0 and len(lines) > 1 else None
    return rs, rver, lme4


def environment(args, rinfo):
    import numba
    import river
    import scipy

    import streamlmm

    try:
        import statsmodels

        smv = statsmodels.__version__
    except ImportError:
        smv = None
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for ln in fh:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    print("## Environment\n")
    print(f"- mode: {'quick' if args.quick else 'full'}, seed {args.seed}, repeats {args.repeats}")
    print(
        f"- CPU: {cpu}; os.cpu_count() = {os.cpu_count()}; "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"- Python {platform.python_version()} ({platform.platform()})")
    print(
        f"- streamlmm {streamlmm.__version__}, numpy {np.__version__}, numba {numba.__version__}, "
        f"scipy {scipy.__version__}, pandas {pd.__version__}, river {river.__version__}, "
        f"statsmodels {smv or 'not installed'}"
    )
    rs, rver, lme4 = rinfo
    print(
        f"- R: {rver or 'not found'}; lme4 {lme4 or 'not installed'}"
        + ("" if rs else " (Rscript not on PATH: the lme4 column is skipped)")
    )
    print()


# -- 1. learn_one / predict_one -----------------------------------------------------------
def bench_one(args):
    from river import linear_model

    from streamlmm import MixedLM

    n, G = args.one_events, args.one_groups
    df = simulate(n, G, args.seed + 1)
    g = df["g"].tolist()
    x1 = df["x1"].tolist()
    x2 = df["x2"].tolist()
    y = df["y"].tolist()
    ev = [({"g": g[i], "x1": x1[i], "x2": x2[i]}, y[i]) for i in range(n)]
    evr = [({"x1": x1[i], "x2": x2[i]}, y[i]) for i in range(n)]

    # warm-up: JIT-compile (or load from cache) every kernel on the paths timed below
    w = MixedLM(FORMULA)
    for x, t in ev[:3000]:
        w.predict_one(x)
        w.learn_one(x, t)
    w.fit().em_step().predict_one(ev[0][0])
    r = linear_model.LinearRegression()
    for x, t in evr[:3000]:
        r.predict_one(x)
        r.learn_one(x, t)

    def learn_all(model, events):
        lo = model.learn_one
        for x, t in events:
            lo(x, t)

    def predict_all(model, events):
        po = model.predict_one
        for x, _ in events:
            po(x)

    def progressive(model, events):
        po, lo = model.predict_one, model.learn_one
        for x, t in events:
            po(x)
            lo(x, t)

    R = args.repeats
    # ours and the peer alternate repeat by repeat, so load on a shared machine hits both
    ours_l, peer_l = paired(
        lambda m: learn_all(m, ev),
        lambda: MixedLM(FORMULA),
        lambda m: learn_all(m, evr),
        linear_model.LinearRegression,
        R,
    )

    m = MixedLM(FORMULA)
    learn_all(m, ev)
    m.predict_one(ev[0][0])  # the lazy refresh (a refit) happens here, outside the timing
    rr = linear_model.LinearRegression()
    learn_all(rr, evr)
    ours_p, peer_p = paired(
        lambda _: predict_all(m, ev), None, lambda _: predict_all(rr, evr), None, R
    )

    holder = {}

    def mk():
        holder["m"] = MixedLM(FORMULA)
        return holder["m"]

    ours_pv, peer_pv = paired(
        lambda mm: progressive(mm, ev),
        mk,
        lambda mm: progressive(mm, evr),
        linear_model.LinearRegression,
        R,
    )
    pm = holder["m"]

    us = 1e6 / n
    sec = f"1. per event ({n:,} events, {G:,} groups)"
    for what, o, p, tgt in (
        ("learn_one", ours_l, peer_l, 1.5),
        ("predict_one (steady state)", ours_p, peer_p, 2.0),
        ("predict_one + learn_one (progressive val.)", ours_pv, peer_pv, None),
    ):
        ratio = o[0] / p[0]
        row(
            sec,
            what + " µs/event",
            f"{o[0] * us:.2f} [{o[1] * us:.2f}]",
            "river LinearRegression",
            f"{p[0] * us:.2f} [{p[1] * us:.2f}]",
            f"{ratio:.2f}× river",
            f"≤ {tgt}× river" if tgt else "—",
            (ratio <= tgt) if tgt else None,
        )
    refit_s = pm.last_refit.get("seconds", math.nan)
    NOTES.append(
        f"§1 progressive loop: MixedLM ran {pm.n_refits} exact refits and {pm.n_em_steps} "
        f"EM steps over {n:,} events (last refit {refit_s * 1e3:.1f} ms, "
        f"{pm.last_refit.get('evals')} criterion evaluations); they are included in its time: "
        f"progressive − predict_one − learn_one ≈ "
        f"{(ours_pv[0] - ours_p[0] - ours_l[0]) * us:.1f} µs/event of scheduled refreshes. "
        "river LinearRegression gets x1, x2 only (no group); MixedLM gets g, x1, x2."
    )


# -- 2. learn_many ------------------------------------------------------------------------
def bench_many(args):
    from river import linear_model

    from streamlmm import MixedLM

    n, G = args.events, args.groups
    df = simulate(n, G, args.seed + 2)
    X = df[["g", "x1", "x2"]]
    Y = df["y"]
    Xs = X.assign(g=("g" + df["g"].astype(str)).astype(object))
    w = MixedLM(FORMULA)
    w.learn_many(X.iloc[:1000], Y.iloc[:1000])
    w.learn_many(Xs.iloc[:1000], Y.iloc[:1000])
    R = args.repeats
    sec = f"2. learn_many ({n:,} events, {G:,} groups, q=2, p=3)"
    for label, XX in (("int keys", X), ('str keys ("g123")', Xs)):
        t = best_of(lambda m, XX=XX: m.learn_many(XX, Y), R, lambda: MixedLM(FORMULA))
        row(
            sec,
            f"learn_many events/s, {label}",
            fmt(n / t[0]) + f" [{fmt(n / t[1])}]",
            "—",
            "—",
            "—",
            "≥ 10M ev/s",
            n / t[0] >= 10e6,
        )
    # reference point: river's own mini-batch path on the same rows (no groups)
    Xr = df[["x1", "x2"]]
    lr = linear_model.LinearRegression()
    lr.learn_many(Xr.iloc[:1000], Y.iloc[:1000])
    t = best_of(lambda m: m.learn_many(Xr, Y), R, linear_model.LinearRegression)
    row(
        sec,
        "reference: river LinearRegression.learn_many events/s (one batch)",
        "—",
        "river LinearRegression",
        fmt(n / t[0]) + f" [{fmt(n / t[1])}]",
        "—",
        "—",
        None,
    )


# -- 3. fit() vs statsmodels and lme4 -----------------------------------------------------
def slmm_fit(df: pd.DataFrame, repeats: int):
    """Best-of timings of fit() and learn_many+fit(); the snapshot of the last fit."""
    from streamlmm import MixedLM

    X, Y = df[["g", "x1", "x2"]], df["y"]
    fit_ts, tot_ts = [], []
    for _ in range(repeats):
        gc.collect()
        m = MixedLM(FORMULA)
        t0 = time.perf_counter()
        m.learn_many(X, Y)
        t1 = time.perf_counter()
        m.fit()
        t2 = time.perf_counter()
        fit_ts.append(t2 - t1)
        tot_ts.append(t2 - t0)
    snap = m.snapshot()
    return {
        "fit": (min(fit_ts), float(np.median(fit_ts))),
        "total": (min(tot_ts), float(np.median(tot_ts))),
        "evals": m.last_refit.get("evals"),
        "snap": snap,
    }


def fit_one_blas_thread(df: pd.DataFrame, repeats: int):
    """fit() timings (cold start) with BLAS limited to one thread, or None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    from streamlmm import MixedLM

    ts = []
    for _ in range(repeats):
        m = MixedLM(FORMULA)
        m.learn_many(df[["g", "x1", "x2"]], df["y"])
        gc.collect()
        with threadpool_limits(1, user_api="blas"):
            t0 = time.perf_counter()
            m.fit()
            ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def sm_worker(path: str, out: str) -> None:
    """Child process: statsmodels MixedLM REML on the CSV, results as JSON."""
    import statsmodels
    import statsmodels.formula.api as smf

    df = pd.read_csv(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        model = smf.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1")
        t1 = time.perf_counter()
        res = model.fit(reml=True)
        t2 = time.perf_counter()
    json.dump(
        {
            "version": statsmodels.__version__,
            "build": t1 - t0,
            "fit": t2 - t1,
            "fixef": [float(v) for v in res.fe_params.to_numpy()],
            "scale": float(res.scale),
            "cov_re": np.asarray(res.cov_re, float).tolist(),
            "llf": float(res.llf),
            "converged": bool(res.converged),
            "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught}),
        },
        open(out, "w"),
    )


def run_statsmodels(df: pd.DataFrame, tmp: str, timeout: float):
    path = os.path.join(tmp, "sm.csv")
    df.to_csv(path, index=False, float_format="%.17g")
    out = os.path.join(tmp, "sm.json")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_sm-worker", path, out],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if p.returncode != 0 or not os.path.exists(out):
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    res = json.load(open(out))
    res["wall"] = time.perf_counter() - t0
    return res


R_SCRIPT = r"""
args <- commandArgs(trailingOnly = TRUE)
suppressPackageStartupMessages(library(lme4))
d <- read.csv(args[1], colClasses = c("integer", "numeric", "numeric", "numeric"))
d$g <- factor(d$g)
reps <- as.integer(args[2])
best <- Inf
for (i in seq_len(reps)) {
  gc()
  tm <- system.time(m <- lmer(y ~ x1 + x2 + (1 + x1 | g), data = d, REML = TRUE))
  best <- min(best, tm[["elapsed"]])
}
vc <- as.matrix(VarCorr(m)$g)
out <- function(k, v) cat(k, paste(sprintf("%.17g", v), collapse = " "), "\n")
out("elapsed", best)
out("fixef", fixef(m))
out("sigma", sigma(m))
out("theta", getME(m, "theta"))
out("remlcrit", REMLcrit(m))
out("re_cov", as.vector(vc))
out("feval", m@optinfo$feval)
out("singular", as.integer(isSingular(m)))
cat("optimizer", m@optinfo$optimizer, "\n")
cat("version", as.character(packageVersion("lme4")), "\n")
"""


def run_lme4(df: pd.DataFrame, tmp: str, rinfo, reps: int, timeout: float):
    rs, _, lme4v = rinfo
    if not rs or not lme4v:
        return {"missing": "Rscript not found" if not rs else "R package lme4 not installed"}
    csv = os.path.join(tmp, "lme4.csv")
    df.to_csv(csv, index=False, float_format="%.17g")
    script = os.path.join(tmp, "bench_lme4.R")
    with open(script, "w") as fh:
        fh.write(R_SCRIPT)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [rs, "--vanilla", script, csv, str(reps)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-3:]}
    res = {"wall": wall}
    for ln in p.stdout.splitlines():
        parts = ln.split()
        if not parts:
            continue
        k, vals = parts[0], parts[1:]
        if k in ("optimizer", "version"):
            res[k] = " ".join(vals)
        else:
            try:
                res[k] = [float(v) for v in vals]
            except ValueError:
                pass
    return res


def bench_fit(args, rinfo, tmp):
    n, G = args.events, args.groups
    df = simulate(n, G, args.seed + 3)
    log(f"§3 streamlmm fit on {n:,} events / {G:,} groups")
    ours = slmm_fit(df, args.fit_repeats)
    snap = ours["snap"]
    sec = f"3. REML fit ({n:,} events, {G:,} groups)"
    fe = np.array([snap.fixef[k] for k in ("(Intercept)", "x1", "x2")])
    row(
        sec,
        "streamlmm fit() s (learn_many + fit() s)",
        f"{ours['fit'][0]:.3f} ({ours['total'][0]:.3f})",
        "—",
        "—",
        "—",
        "—",
        None,
        f"{ours['evals']} criterion evals",
    )
    diag = fit_one_blas_thread(df, args.fit_repeats)
    if diag is not None:
        row(
            sec,
            "diagnostic: streamlmm fit() s with BLAS limited to 1 thread",
            f"{diag[0]:.3f} [{diag[1]:.3f}]",
            "—",
            "—",
            "—",
            "—",
            None,
            "threadpoolctl.threadpool_limits(1, 'blas') around fit(); not used in the ratios",
        )

    # lme4
    log("§3 lme4 (Rscript)")
    lm = run_lme4(df, tmp, rinfo, args.lme4_repeats, args.r_timeout)
    if "elapsed" in lm:
        t = lm["elapsed"][0]
        row(
            sec,
            "vs lme4 lmer(REML): s, ratio = lme4 / streamlmm fit()",
            f"{ours['fit'][0]:.3f}",
            f"lme4 {lm.get('version', '')} ({lm.get('optimizer', '')})",
            f"{t:.2f} (Rscript wall {lm['wall']:.1f})",
            f"{t / ours['fit'][0]:.1f}×",
            "≥ 40×",
            t / ours["fit"][0] >= 40,
            f"lmer {int(lm['feval'][0])} evals",
        )
        row(
            sec,
            "vs lme4 lmer(REML): ratio = lme4 / (streamlmm learn_many + fit())",
            f"{ours['total'][0]:.3f}",
            "lme4",
            f"{t:.2f}",
            f"{t / ours['total'][0]:.1f}×",
            "≥ 40×",
            t / ours["total"][0] >= 40,
        )
        AGREE.append(
            {
                "peer": "lme4",
                "data": f"{n:,} / {G:,}",
                "fixef": rel(fe, lm["fixef"]),
                "sigma": rel(snap.sigma, lm["sigma"][0]),
                "theta": rel(snap.theta, lm["theta"]),
                "re_cov": rel(snap.re_cov.ravel(order="F"), lm["re_cov"]),
                "crit": rel(snap.criterion, lm["remlcrit"][0]),
                "crit_diff": snap.criterion - lm["remlcrit"][0],
            }
        )
    else:
        why = lm.get("missing") or (
            f"timed out after {lm['timeout']:.0f} s"
            if "timeout" in lm
            else f"failed: {lm.get('error')}"
        )
        row(
            sec,
            "vs lme4 lmer(REML)",
            f"{ours['fit'][0]:.3f}",
            "lme4",
            "skipped",
            "n/a",
            "≥ 40×",
            None,
            why,
        )
        NOTES.append(f"§3 lme4 column skipped: {why}.")

    # statsmodels, on the same data or a subset of the same model
    if args.no_sm:
        NOTES.append("§3 statsmodels skipped (--no-sm).")
        return
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        row(
            sec,
            "vs statsmodels MixedLM",
            "—",
            "statsmodels",
            "skipped",
            "n/a",
            "≥ 100×",
            None,
            "statsmodels not installed",
        )
        return
    sm_n = args.sm_rows if args.sm_rows > 0 else n
    if sm_n >= n:
        sdf, sm_n, sm_G, sours = df, n, G, ours
    else:
        sm_G = max(1, round(G * sm_n / n))
        sdf = simulate(sm_n, sm_G, args.seed + 4)
        log(f"§3 streamlmm fit on the statsmodels subset {sm_n:,} / {sm_G:,}")
        sours = slmm_fit(sdf, args.fit_repeats)
    log(f"§3 statsmodels on {sm_n:,} events / {sm_G:,} groups (timeout {args.sm_timeout:.0f} s)")
    sm = run_statsmodels(sdf, tmp, args.sm_timeout)
    ssec = (
        sec if sm_n == n else f"3b. REML fit, statsmodels-sized ({sm_n:,} events, {sm_G:,} groups)"
    )
    if "fit" in sm:
        t = sm["build"] + sm["fit"]
        if sm_n != n:
            row(
                ssec,
                "streamlmm fit() s (learn_many + fit() s)",
                f"{sours['fit'][0]:.3f} ({sours['total'][0]:.3f})",
                "—",
                "—",
                "—",
                "—",
                None,
                f"{sours['evals']} criterion evals",
            )
        row(
            ssec,
            "vs statsmodels MixedLM(REML): s, ratio = sm / streamlmm fit()",
            f"{sours['fit'][0]:.3f}",
            f"statsmodels {sm['version']}",
            f"{t:.1f} (from_formula {sm['build']:.1f} + fit {sm['fit']:.1f})",
            f"{t / sours['fit'][0]:.0f}×",
            "≥ 100×",
            t / sours["fit"][0] >= 100,
            "" if sm["converged"] else "statsmodels: not converged",
        )
        row(
            ssec,
            "vs statsmodels: ratio = sm / (streamlmm learn_many + fit())",
            f"{sours['total'][0]:.3f}",
            "statsmodels",
            f"{t:.1f}",
            f"{t / sours['total'][0]:.0f}×",
            "≥ 100×",
            t / sours["total"][0] >= 100,
        )
        s2 = sours["snap"]
        fe2 = np.array([s2.fixef[k] for k in ("(Intercept)", "x1", "x2")])
        AGREE.append(
            {
                "peer": "statsmodels",
                "data": f"{sm_n:,} / {sm_G:,}",
                "fixef": rel(fe2, sm["fixef"]),
                "sigma": rel(s2.sigma**2, sm["scale"]),
                "re_cov": rel(s2.re_cov, sm["cov_re"]),
            }
        )
        for w in sm["warnings"]:
            NOTES.append(f"§3 statsmodels warning: {w}")
        if sm_n != n:
            NOTES.append(
                f"§3b statsmodels was measured on a separate {sm_n:,}-event / {sm_G:,}-group "
                "sample of the same model (--sm-rows; 0 = the full data), and streamlmm was "
                "re-measured on exactly that sample for the ratio."
            )
    else:
        why = (
            f"timed out after {sm['timeout']:.0f} s"
            if "timeout" in sm
            else f"failed: {sm.get('error')}"
        )
        row(
            ssec,
            "vs statsmodels MixedLM(REML)",
            f"{sours['fit'][0]:.3f}",
            "statsmodels",
            f"> {args.sm_timeout:.0f}" if "timeout" in sm else "error",
            f"> {args.sm_timeout / sours['fit'][0]:.0f}×" if "timeout" in sm else "n/a",
            "≥ 100×",
            True if "timeout" in sm and args.sm_timeout / sours["fit"][0] >= 100 else None,
            why,
        )


# -- 4. memory per group ------------------------------------------------------------------
def bench_memory(args):
    from streamlmm import MixedLM

    G = args.mem_groups
    sec = f"4. memory ({G:,} groups, 2 events each, q=2, p=3)"
    for label in ("int keys", 'str keys ("g123456")'):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        rng = np.random.default_rng(args.seed + 5)
        g = np.concatenate([np.arange(G), np.arange(G)])
        keys = g if label == "int keys" else np.array([f"g{k}" for k in g], dtype=object)
        X = pd.DataFrame({"g": keys, "x1": rng.normal(size=2 * G), "x2": rng.normal(size=2 * G)})
        Y = pd.Series(rng.normal(size=2 * G))
        m = MixedLM(FORMULA)
        m.learn_many(X, Y)
        del X, Y, keys, g
        gc.collect()
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        traced = (cur - base) / G
        acc = m._stats.nbytes() / G
        cap = m._stats.S.shape[0]  # capacity (rows), grown by doubling
        row(
            sec,
            f"bytes/group, {label} (tracemalloc; stats.nbytes())",
            f"{traced:.0f} ({acc:.0f})",
            "—",
            "—",
            "—",
            "≤ 400 B",
            traced <= 400,
            f"S: {cap:,} rows × {m._stats.S.shape[1]} floats = {m._stats.S.nbytes / G:.0f} B/group",
        )
        del m
    NOTES.append(
        "§4 tracemalloc counts everything allocated after the model was created and still "
        "alive after the input batch was deleted: the statistics arrays (grown by doubling), "
        "the key→row dict, the key list, and the key and row objects themselves."
    )


# -- 5. ChickWeights ----------------------------------------------------------------------
def bench_chick(args):
    from river import (
        compose,
        datasets,
        evaluate,
        feature_extraction,
        linear_model,
        metrics,
        preprocessing,
        stats,
    )

    from streamlmm import MixedLM

    first = next(iter(datasets.ChickWeights()))
    sec = f"5. ChickWeights progressive MAE (features {sorted(first[0])})"

    def agg():
        return feature_extraction.TargetAgg(by="chick", how=stats.Mean())

    def sel():
        return compose.Select("time")

    models = {
        'MixedLM("weight ~ time + (1 + time | chick)")': MixedLM(
            "weight ~ time + (1 + time | chick)"
        ),
        "LinearRegression() on time": sel() | linear_model.LinearRegression(),
        "StandardScaler | LinearRegression() on time": sel()
        | preprocessing.StandardScaler()
        | linear_model.LinearRegression(),
        "(time + TargetAgg(chick, Mean)) | LinearRegression()": (sel() + agg())
        | linear_model.LinearRegression(),
        "(time + TargetAgg(chick, Mean)) | StandardScaler | LinearRegression()": (sel() + agg())
        | preprocessing.StandardScaler()
        | linear_model.LinearRegression(),
        "LinearRegression() on all raw features (time, chick, diet)": (
            linear_model.LinearRegression()
        ),
    }
    res = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        mae = evaluate.progressive_val_score(datasets.ChickWeights(), model, metrics.MAE())
        res[name] = (mae.get(), time.perf_counter() - t0)
    ours_name = next(iter(models))
    ours = res[ours_name][0]
    row(
        sec,
        "MixedLM MAE",
        f"{ours:.3f}",
        "—",
        "—",
        "—",
        "—",
        None,
        f"{res[ours_name][1] * 1e3:.0f} ms",
    )
    for name, (mae, dt) in list(res.items())[1:]:
        row(
            sec,
            "MAE vs river baseline",
            f"{ours:.3f}",
            name,
            fmt(mae, digits=4),
            fmt(mae / ours) + "× MixedLM's error",
            "MixedLM better",
            ours < mae if math.isfinite(mae) else True,
            f"{dt * 1e3:.0f} ms",
        )


# -- output -------------------------------------------------------------------------------
def print_table():
    print("## Results\n")
    print("Times are best of the repeats, medians in [brackets]. ratio = as stated per row.\n")
    hdr = [
        "section",
        "measurement",
        "streamlmm",
        "peer",
        "peer value",
        "ratio",
        "target",
        "status",
        "note",
    ]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    last = None
    for r in ROWS:
        sec = r["section"] if r["section"] != last else ""
        last = r["section"]
        cells = [
            sec,
            r["what"],
            r["ours"],
            r["peer_name"],
            r["peer"],
            r["ratio"],
            r["target"],
            status(r["ok"]),
            r["note"],
        ]
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    print()
    if AGREE:
        print("## Agreement of the estimates (max relative difference, streamlmm vs peer)\n")
        print(
            "| peer | data (events / groups) | fixef | sigma (sm: scale σ²) | theta | "
            "re_cov | REML criterion | criterion diff (ours − peer) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for a in AGREE:
            cells = [
                a["peer"],
                a["data"],
                a["fixef"],
                a["sigma"],
                a.get("theta"),
                a["re_cov"],
                a.get("crit"),
                a.get("crit_diff"),
            ]
            print(
                "| "
                + " | ".join(
                    c if isinstance(c, str) else ("—" if c is None else f"{c:.2e}") for c in cells
                )
                + " |"
            )
        print()
    if NOTES:
        print("## Notes\n")
        for n in NOTES:
            print(f"- {n}")
        print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test under a minute")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5; quick 3)")
    ap.add_argument(
        "--sm-rows",
        type=int,
        default=0,
        help="rows for the statsmodels comparison (default 0 = the full data, "
        "~1-2 min at 1M rows); with a smaller value statsmodels and "
        "streamlmm are both measured on a separate sample of that size "
        "from the same model, groups scaled in proportion",
    )
    ap.add_argument(
        "--sm-timeout", type=float, default=900.0, help="seconds before statsmodels is abandoned"
    )
    ap.add_argument("--no-sm", action="store_true", help="skip statsmodels")
    ap.add_argument(
        "--r-timeout", type=float, default=1800.0, help="seconds before Rscript is abandoned"
    )
    ap.add_argument("--lme4-repeats", type=int, default=1, help="lmer timing repeats inside R")
    ap.add_argument("--only", default="12345", help="sections to run, e.g. 13")
    ap.add_argument("--_sm-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._sm_worker:
        sm_worker(*args._sm_worker)
        return
    q = args.quick
    args.repeats = args.repeats or (3 if q else 5)
    args.fit_repeats = 2 if q else 3
    args.one_events, args.one_groups = (20_000, 400) if q else (200_000, 4_000)
    args.events, args.groups = (100_000, 2_000) if q else (1_000_000, 20_000)
    args.mem_groups = 100_000 if q else 1_000_000
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    rinfo = r_info() if "3" in args.only else (None, None, None)
    environment(args, rinfo)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_core_") as tmp:
        steps = [
            ("1", bench_one, ()),
            ("2", bench_many, ()),
            ("3", bench_fit, (rinfo, tmp)),
            ("4", bench_memory, ()),
            ("5", bench_chick, ()),
        ]
        for key, fn, extra in steps:
            if key in args.only:
                log(f"section {key}: {fn.__name__}")
                fn(args, *extra)
    print_table()
    print(f"Total benchmark time {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
