"""The peers of ``MixedLM.sample``: brms/PyMC's mixed models sampled by nutpie, PyMC, brms.

Runs in its own virtual environment (PyMC, nutpie and ArviZ are no dependency of
streamlmm, and nothing here imports streamlmm)::

    scripts/bench_bayes_peers.sh                 # creates /work/peers-venv (or $PEERS_VENV)
    PY=/work/peers-venv/bin/python

    # one data set, one formula: every peer, 4 chains x 1,000 draws after 1,000 warm-up
    $PY scripts/bench_bayes_peers.py tests/data/brms/brms_web.csv \\
        --formula "y ~ std_age + (1 | county)" --peers nutpie,pymc,brms

    # the cost of one log-density gradient only (no sampling): for the 50k/1M-event cases
    .venv/bin/streamlmm simulate --scenario basic --events 1000000 --groups 20000 \\
        --to jsonl:/tmp/basic1m.jsonl
    $PY scripts/bench_bayes_peers.py /tmp/basic1m.jsonl \\
        --formula "y ~ x1 + x2 + (1 + x1 | g)" --gradient-only

It prints one JSON object per peer, one line each as the peer finishes, with:
``compile_s`` (model build + compile), ``sampling_s`` (warm-up and draws, as the peer
reports it), ``wall_s``, ``min_ess_bulk``/``median_ess_bulk``/``min_ess_tail``/
``median_ess_tail`` over the global parameters (brms's names: ``b_*``, ``sd_*``,
``cor_*``, ``sigma``), ``min_ess_bulk_per_s`` (over ``sampling_s``), ``max_rhat``,
``divergences``, ``gradients`` (nutpie and PyMC report the leapfrog steps of each draw,
``n_steps``; brms ``n_leapfrog__``; warm-up included) and ``us_per_gradient``
(``sampling_s`` x parallel chains / ``gradients``: a wall-clock cost per gradient, noisy
on a shared machine). ``--gradient-only`` and every nutpie/PyMC run also time the
gradient directly: ``grad_us_nutpie`` is nutpie's compiled (numba) log density and
gradient called through its C entry point, as nutpie's Rust sampler calls it,
``grad_us_pymc`` PyMC's ``logp_dlogp_function`` called from Python, as PyMC's NUTS does.

The model is the one brms generates and PyMC users write: non-centred group effects
``r_g = diag(sd) L z_g`` with ``z_g ~ N(0, I)``, an LKJ prior on the correlation
(``pm.LKJCholeskyCov`` with the sd priors as ``sd_dist``), the intercept of the
mean-centred predictors (brms's ``Intercept`` class, ``b_Intercept`` derived), flat
priors where brms has them. Priors are brms's classes with Stan-style strings
(``--priors '{"Intercept": "normal(200, 50)", "sd": "student_t(3, 0, 30)"}'``); a
missing class gets brms 2.18's default (docs/brms-priors.md). brms runs through
``Rscript scripts/bench_bayes_brms.R`` (R with brms and rstan from Debian:
``apt-get install r-cran-brms r-cran-rstan``).

The peers: ``nutpie`` (``nutpie.compile_pymc_model(model, backend="numba")``, then
``nutpie.sample``), ``pymc`` (PyMC's own NUTS: ``pm.sample(nuts_sampler="pymc")``; PyMC
6's ``pm.sample`` would pick nutpie when it is installed, PyMC 5 its own NUTS) and
``brms``. All take ``--chains`` (4), ``--draws`` (1,000), ``--warmup`` (1,000),
``--seed``, ``--cores`` (2: chains in parallel) and ``--adapt-delta`` (0.8, every
peer's default target acceptance).

A pip-installed PyTensor finds no BLAS for its C backend (it warns); PyMC's own NUTS runs
on that backend, as a pip user gets it. At 1M events the time per gradient depends on
glibc's allocator: with its defaults the gradient's large temporaries (8 MB arrays) come
from fresh pages on every call (strace shows the heap grown and trimmed back with 12
``brk`` calls per gradient); raising ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` cut nutpie's gradient from 45 to 217
ms (three runs) to 18 ms on the 1M-event case on this machine. The numbers use the
default allocator, as users run it.

Timings are taken on whatever else the machine runs: compare peers measured in the same
run only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "Formula",
    "parse_formula",
    "parse_prior",
    "r_round",
    "r_mad",
    "default_priors",
    "load",
    "build_model",
    "run_nutpie",
    "run_pymc",
    "run_brms",
    "gradient_only",
    "main",
]

HERE = pathlib.Path(__file__).resolve().parent
BRMS_R = HERE / "bench_bayes_brms.R"


# -- formula ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Formula:
    """``response ~ fixed... + (1 [+ random...] | group)``: the cases of issue 19."""

    text: str
    response: str
    fixed: tuple[str, ...]  # non-intercept fixed-effect columns
    random: tuple[str, ...]  # non-intercept random-effect columns (after the intercept)
    group: str

    @property
    def re_names(self) -> tuple[str, ...]:
        return ("Intercept", *self.random)


def parse_formula(text: str) -> Formula:
    """Parse ``y ~ x1 + x2 + (1 + x1 | g)``: one random term with an intercept.

    >>> parse_formula("y ~ x + (1 + x | g)").random
    ('x',)
    """
    m = re.fullmatch(r"\s*(\w+)\s*~(.*)\(\s*1\s*((?:\+\s*\w+\s*)*)\|\s*(\w+)\s*\)\s*", text)
    if not m:
        raise ValueError(f"formula {text!r}: expected 'y ~ x1 + ... + (1 [+ x1 ...] | g)'")
    resp, fixed, random, group = m.groups()
    fixed_terms = [t.strip() for t in fixed.split("+") if t.strip()]
    if any(not re.fullmatch(r"\w+", t) for t in fixed_terms) or "1" in fixed_terms:
        raise ValueError(f"formula {text!r}: fixed effects must be column names")
    rand = tuple(t.strip() for t in random.split("+") if t.strip())
    return Formula(text, resp, tuple(fixed_terms), rand, group)


# -- priors: brms's classes, Stan-style strings ----------------------------------------
_DISTS = {
    "normal": 2,
    "student_t": 3,
    "cauchy": 2,
    "exponential": 1,
    "gamma": 2,
    "lognormal": 2,
    "lkj": 1,
}


def parse_prior(text: str) -> tuple[str, tuple[float, ...]] | None:
    """``"normal(0, 20)"`` -> ``("normal", (0.0, 20.0))``; ``"flat"``/``""`` -> None.

    >>> parse_prior("student_t(3, 46.2, 18.9)")
    ('student_t', (3.0, 46.2, 18.9))
    """
    t = text.strip()
    if t in ("", "flat", "(flat)"):
        return None
    m = re.fullmatch(r"(\w+)\s*\((.*)\)", t)
    if not m or m.group(1) not in _DISTS:
        raise ValueError(f"prior {text!r}: expected one of {', '.join(_DISTS)} or flat")
    args = tuple(float(a) for a in m.group(2).split(","))
    if len(args) != _DISTS[m.group(1)]:
        raise ValueError(f"prior {text!r}: {m.group(1)} takes {_DISTS[m.group(1)]} arguments")
    return m.group(1), args


def r_round(x: float, digits: int = 1) -> float:
    """R (>= 4.0.0)'s ``round(x, digits)``: the nearer decimal neighbour, ties to even.

    R does not round the decimal expansion of the binary number (Python's ``round``
    does): it takes the two candidates ``floor(x*10^d)/10^d`` and ``ceil(x*10^d)/10^d``
    and keeps the one nearer to ``x`` in double arithmetic, the even one on a tie.

    >>> r_round(0.45), round(0.45, 1), r_round(1.05), round(1.05, 1), r_round(-2.675, 2)
    (0.4, 0.5, 1.0, 1.1, -2.67)
    """
    if not math.isfinite(x) or x == 0.0:
        return x
    sign = -1.0 if x < 0 else 1.0
    x = abs(x)
    if math.log10(2.0) * (0.5 + (math.frexp(x)[1] - 1)) + digits > 15:
        return sign * x
    p10 = 10.0**digits
    x10 = x * p10
    i10 = math.floor(x10)
    xd, xu = i10 / p10, math.ceil(x10) / p10
    du, dd = xu - x, x - xd
    return sign * (xu if du < dd or (i10 % 2 == 1 and du == dd) else xd)


def r_mad(y: np.ndarray) -> float:
    """R's ``mad(y)``: 1.4826 x the median absolute deviation from the median."""
    y = np.asarray(y, dtype=float)
    return 1.4826 * float(np.median(np.abs(y - np.median(y))))


def _fmt(v: float) -> str:
    return f"{v:.15g}"


def default_priors(y: np.ndarray) -> dict[str, str]:
    """brms 2.18's defaults for a Gaussian identity-link model of ``y`` (get_prior()).

    >>> default_priors(np.array([1.0, 2.0, 3.0, 10.0]))["Intercept"]
    'student_t(3, 2.5, 2.5)'
    """
    y = np.asarray(y, dtype=float)
    s = max(2.5, r_round(r_mad(y), 1))
    loc = r_round(float(np.median(y)), 1)
    return {
        "Intercept": f"student_t(3, {_fmt(loc)}, {_fmt(s)})",
        "b": "flat",
        "sd": f"student_t(3, 0, {_fmt(s)})",
        "sigma": f"student_t(3, 0, {_fmt(s)})",
        "cor": "lkj(1)",
    }


def resolve_priors(f: Formula, y: np.ndarray, given: dict[str, str]) -> dict[str, str]:
    """One prior string per parameter (brms's names) from classes, names and defaults."""
    d = default_priors(y)
    out = {"Intercept": given.get("Intercept", d["Intercept"])}
    for x in f.fixed:
        out[f"b_{x}"] = given.get(f"b_{x}", given.get("b", d["b"]))
    for c in f.re_names:
        name = f"sd_{f.group}__{c}"
        out[name] = given.get(name, given.get("sd", d["sd"]))
    if f.random:
        out[f"cor_{f.group}"] = given.get(f"cor_{f.group}", given.get("cor", d["cor"]))
    out["sigma"] = given.get("sigma", d["sigma"])
    known = set(out) | {"b", "sd", "cor"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"priors: unknown class or parameter {unknown}")
    return out


# -- data ------------------------------------------------------------------------------
def load(path: str, f: Formula) -> pd.DataFrame:
    """A CSV or JSON-lines file (``streamlmm simulate`` writes the latter)."""
    cols = [f.response, *f.fixed, *f.random, f.group]
    if path.endswith((".jsonl", ".json")):
        df = pd.read_json(path, lines=True, dtype={f.group: str})
    else:
        df = pd.read_csv(path, dtype={f.group: str})
    missing = [c for c in dict.fromkeys(cols) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing}")
    df = df[list(dict.fromkeys(cols))]
    if df.isna().any().any():
        raise ValueError(f"{path}: missing values in {list(df.columns[df.isna().any()])}")
    return df


# -- the PyMC model, as brms generates it ----------------------------------------------
def _dist(pm, name: str, prior: str, positive: bool, shape=None, dist: bool = False):
    """A PyMC distribution for a prior string; ``positive``: truncated at 0, as brms."""
    p = parse_prior(prior)
    kw = {} if shape is None else {"shape": shape}
    make = (
        (lambda cls, **a: cls.dist(**a, **kw)) if dist else (lambda cls, **a: cls(name, **a, **kw))
    )
    if p is None:
        if dist:
            raise ValueError(f"{name}: a flat prior cannot be an sd_dist")
        return make(pm.HalfFlat) if positive else make(pm.Flat)
    fam, a = p
    if positive and fam in ("normal", "student_t", "cauchy"):
        loc = a[1] if fam == "student_t" else a[0]
        if loc != 0:
            raise ValueError(
                f"{name}: {prior}: only location 0 is supported on a positive parameter"
            )
        if fam == "normal":
            return make(pm.HalfNormal, sigma=a[1])
        if fam == "student_t":
            return make(pm.HalfStudentT, nu=a[0], sigma=a[2])
        return make(pm.HalfCauchy, beta=a[1])
    if fam == "normal":
        return make(pm.Normal, mu=a[0], sigma=a[1])
    if fam == "student_t":
        return make(pm.StudentT, nu=a[0], mu=a[1], sigma=a[2])
    if fam == "cauchy":
        return make(pm.Cauchy, alpha=a[0], beta=a[1])
    if fam == "exponential":
        return make(pm.Exponential, lam=a[0])
    if fam == "gamma":
        return make(pm.Gamma, alpha=a[0], beta=a[1])
    if fam == "lognormal":
        return make(pm.LogNormal, mu=a[0], sigma=a[1])
    raise ValueError(f"{name}: {prior} is not a prior for this parameter")


def build_model(df: pd.DataFrame, f: Formula, priors: dict[str, str]):
    """The non-centred PyMC model brms generates for ``f``; returns (model, globals)."""
    import pymc as pm
    import pytensor.tensor as pt

    y = df[f.response].to_numpy(float)
    codes, levels = pd.factorize(df[f.group], sort=True)
    G, q = len(levels), len(f.re_names)
    X = df[list(f.fixed)].to_numpy(float)
    means = X.mean(axis=0)
    Xc = X - means
    Z = [df[c].to_numpy(float) for c in f.random]
    names = []
    with pm.Model() as model:
        icpt = _dist(pm, "Intercept", priors["Intercept"], False)
        b = [_dist(pm, f"b_{x}", priors[f"b_{x}"], False) for x in f.fixed]
        mu = icpt + sum((Xc[:, k] * b[k] for k in range(len(b))), start=pt.zeros(()))
        pm.Deterministic(
            "b_Intercept", icpt - sum((means[k] * b[k] for k in range(len(b))), start=pt.zeros(()))
        )
        names += ["b_Intercept", *(f"b_{x}" for x in f.fixed)]
        sd_names = [f"sd_{f.group}__{c}" for c in f.re_names]
        if q == 1:
            sd = _dist(pm, sd_names[0], priors[sd_names[0]], True)
            z = pm.Normal(f"z_{f.group}", 0.0, 1.0, shape=G)
            mu = mu + (sd * z)[codes]
        else:
            fams = {parse_prior(priors[n])[0] for n in sd_names}
            if len(fams) != 1:
                raise ValueError(
                    "the sd priors of one term must share a family (pm.LKJCholeskyCov)"
                )
            args = np.array([parse_prior(priors[n])[1] for n in sd_names])
            fam = fams.pop()
            # one argument vector per position, a scalar where every coefficient agrees
            cols = [
                args[:, k] if len(set(args[:, k])) > 1 else args[0, k] for k in range(args.shape[1])
            ]
            sd_dist = _vector_dist(pm, fam, cols, q)
            lkj = parse_prior(priors[f"cor_{f.group}"])
            eta = 1.0 if lkj is None else lkj[1][0]
            chol, corr, sds = pm.LKJCholeskyCov(
                f"L_{f.group}", n=q, eta=eta, sd_dist=sd_dist, compute_corr=True
            )
            z = pm.Normal(f"z_{f.group}", 0.0, 1.0, shape=(G, q))
            r = z @ chol.T  # (G, q): row g is diag(sd) L z_g
            mu = mu + r[codes, 0]
            for j, zc in enumerate(Z, start=1):
                mu = mu + r[codes, j] * zc
            for j, n in enumerate(sd_names):
                pm.Deterministic(n, sds[j])
            for i in range(q):
                for j in range(i + 1, q):
                    n = f"cor_{f.group}__{f.re_names[i]}__{f.re_names[j]}"
                    pm.Deterministic(n, corr[i, j])
                    names.append(n)
        names += sd_names
        sigma = _dist(pm, "sigma", priors["sigma"], True)
        names.append("sigma")
        pm.Normal(f.response, mu, sigma, observed=y)
    return model, names


def _vector_dist(pm, fam: str, a: list, q: int):
    """The sd priors of a q-coefficient term as one ``sd_dist`` (half at 0, as brms)."""
    loc = {"normal": 0, "student_t": 1, "cauchy": 0}.get(fam)
    if loc is not None and np.any(np.asarray(a[loc]) != 0):
        raise ValueError(f"sd: {fam} priors must have location 0 here")
    if fam == "normal":
        return pm.HalfNormal.dist(sigma=a[1], shape=q)
    if fam == "student_t":
        return pm.HalfStudentT.dist(nu=a[0], sigma=a[2], shape=q)
    if fam == "cauchy":
        return pm.HalfCauchy.dist(beta=a[1], shape=q)
    if fam == "exponential":
        return pm.Exponential.dist(lam=a[0], shape=q)
    if fam == "gamma":
        return pm.Gamma.dist(alpha=a[0], beta=a[1], shape=q)
    if fam == "lognormal":
        return pm.LogNormal.dist(mu=a[0], sigma=a[1], shape=q)
    raise ValueError(f"sd prior family {fam!r} is not supported here")


# -- diagnostics -----------------------------------------------------------------------
def _diagnostics(posterior, names: list[str]) -> dict[str, float]:
    """min/median bulk and tail ESS and max R-hat over ``names`` (ArviZ)."""
    import arviz as az

    s = az.summary(posterior, var_names=names, kind="diagnostics", round_to="none")
    ess_b = s["ess_bulk"].to_numpy(float)
    ess_t = s["ess_tail"].to_numpy(float)
    rhat = s["r_hat"].to_numpy(float)
    return {
        "min_ess_bulk": float(ess_b.min()),
        "median_ess_bulk": float(np.median(ess_b)),
        "min_ess_tail": float(ess_t.min()),
        "median_ess_tail": float(np.median(ess_t)),
        "max_rhat": float(rhat.max()),
        "worst": str(s.index[int(np.argmin(ess_b))]),
    }


def _group(dt, name: str):
    try:
        return dt[name]
    except KeyError:
        return None


def _grad_us_nutpie(compiled, reps: int = 200) -> float:
    """Median µs of one log density + gradient through nutpie's compiled C entry point."""
    f = compiled.compiled_logp_func.ctypes
    n = compiled.n_dim
    x = np.zeros(n)
    out = np.empty(n)
    lp = np.empty(())
    ud = compiled.user_data
    P = ctypes.POINTER(ctypes.c_double)
    args = (
        n,
        x.ctypes.data_as(P),
        out.ctypes.data_as(P),
        lp.ctypes.data_as(P),
        ctypes.c_void_p(ud.ctypes.data),
    )
    rc = f(*args)
    if rc != 0:
        raise RuntimeError(f"nutpie's logp returned {rc} at the origin")
    return _timeit(lambda: f(*args), reps)


def _grad_us_pymc(model, reps: int = 200) -> float:
    """Median µs of PyMC's ``logp_dlogp_function`` (its default backend) from Python."""
    vg = model.logp_dlogp_function(ravel_inputs=True)
    vg.set_extra_values({})
    x = np.zeros(sum(v.size for v in model.initial_point().values()))
    vg(x)
    return _timeit(lambda: vg(x), reps)


def _timeit(fn, reps: int) -> float:
    times = []
    budget = time.perf_counter() + 20.0
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() > budget and len(times) >= 5:
            break
    return 1e6 * float(np.median(times))


# -- the peers -------------------------------------------------------------------------
def run_nutpie(df, f, priors, chains, draws, warmup, seed, cores, target_accept):
    """nutpie (numba backend) on the PyMC model."""
    import nutpie

    t0 = time.perf_counter()
    model, names = build_model(df, f, priors)
    compiled = nutpie.compile_pymc_model(model, backend="numba")
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    dt = nutpie.sample(
        compiled,
        draws=draws,
        tune=warmup,
        chains=chains,
        cores=cores,
        seed=seed,
        progress_bar=False,
        target_accept=target_accept,
    )
    sampling_s = time.perf_counter() - t1
    st = dt["sample_stats"]
    wst = _group(dt, "warmup_sample_stats")
    grads = int(st["n_steps"].sum()) + (int(wst["n_steps"].sum()) if wst is not None else 0)
    out = {
        "peer": "nutpie",
        "backend": f"nutpie {nutpie.__version__}, numba",
        "compile_s": compile_s,
        "sampling_s": sampling_s,
        "wall_s": compile_s + sampling_s,
        "divergences": int(st["diverging"].sum()),
        "gradients": grads,
        "gradients_per_draw": grads / (chains * (draws + warmup)),
        "us_per_gradient": 1e6 * sampling_s * min(chains, cores) / grads,
        "grad_us_nutpie": _grad_us_nutpie(compiled),
        "step_size": [float(v) for v in st["step_size"].isel(draw=-1).values],
    }
    out.update(_diagnostics(dt["posterior"], names))
    return out


def run_pymc(df, f, priors, chains, draws, warmup, seed, cores, target_accept):
    """PyMC's own NUTS (``pm.sample(nuts_sampler="pymc")``).

    PyMC 6's ``pm.sample`` runs nutpie when it is installed: ``nuts_sampler="pymc"``
    asks for PyMC's own (Python) NUTS, its default until then and without nutpie.
    """
    import pymc as pm

    t0 = time.perf_counter()
    model, names = build_model(df, f, priors)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with model:
        dt = pm.sample(
            draws=draws,
            tune=warmup,
            chains=chains,
            cores=cores,
            random_seed=seed,
            nuts_sampler="pymc",
            progressbar=False,
            compute_convergence_checks=False,
            discard_tuned_samples=False,
            target_accept=target_accept,
        )
    wall = time.perf_counter() - t1
    post = dt["posterior"]
    sampling_s = float(post.attrs.get("sampling_time", wall))
    st = dt["sample_stats"]
    wst = _group(dt, "warmup_sample_stats")
    grads = int(st["n_steps"].sum()) + (int(wst["n_steps"].sum()) if wst is not None else 0)
    out = {
        "peer": "pymc",
        "backend": f"PyMC {pm.__version__} NUTS, pytensor's default mode",
        # pm.sample compiles inside: its wall minus its own sampling time is compile + init
        "compile_s": build_s + max(0.0, wall - sampling_s),
        "sampling_s": sampling_s,
        "wall_s": build_s + wall,
        "divergences": int(st["diverging"].sum()),
        "gradients": grads,
        "gradients_per_draw": grads / (chains * (draws + warmup)),
        "us_per_gradient": 1e6 * sampling_s * min(chains, cores) / grads,
        "grad_us_pymc": _grad_us_pymc(model),
    }
    out.update(_diagnostics(post, names))
    return out


def run_brms(path, f, priors, chains, draws, warmup, seed, cores, adapt_delta):
    """brms through ``Rscript scripts/bench_bayes_brms.R`` (it prints one JSON line)."""
    csv = path
    tmp = None
    if path.endswith((".jsonl", ".json")):
        tmp = f"/tmp/bench_bayes_peers_{os.getpid()}.csv"
        load(path, f).to_csv(tmp, index=False)
        csv = tmp
    try:
        cmd = [
            "Rscript",
            "--vanilla",
            str(BRMS_R),
            csv,
            f.text,
            f.group,
            json.dumps(priors),
            str(chains),
            str(draws),
            str(warmup),
            str(seed),
            str(cores),
            str(adapt_delta),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        if tmp:
            os.unlink(tmp)
    if r.returncode != 0:
        raise RuntimeError(f"brms failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gradient_only(df, f, priors, reps: int = 50) -> dict:
    """Compile the model and time one gradient (nutpie's numba and PyMC's default)."""
    import nutpie

    t0 = time.perf_counter()
    model, _ = build_model(df, f, priors)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    compiled = nutpie.compile_pymc_model(model, backend="numba")
    compile_s = time.perf_counter() - t1
    g_nutpie = _grad_us_nutpie(compiled, reps)
    t2 = time.perf_counter()
    g_pymc = _grad_us_pymc(model, reps)
    pymc_s = time.perf_counter() - t2
    return {
        "peer": "gradient-only",
        "build_s": build_s,
        "nutpie_compile_s": compile_s,
        "grad_us_nutpie": g_nutpie,
        "pymc_compile_and_time_s": pymc_s,
        "grad_us_pymc": g_pymc,
        "n_dim": int(compiled.n_dim),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="CSV or JSON lines (streamlmm simulate --to jsonl:PATH)")
    ap.add_argument("--formula", required=True)
    ap.add_argument("--priors", default="{}", help="JSON: brms class or parameter -> prior")
    ap.add_argument("--peers", default="nutpie,pymc,brms")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--adapt-delta", type=float, default=0.8, help="target acceptance (all peers)")
    ap.add_argument("--gradient-only", action="store_true", help="time one gradient, no sampling")
    ap.add_argument("--reps", type=int, default=50, help="gradient timings (--gradient-only)")
    a = ap.parse_args(argv)
    try:
        f = parse_formula(a.formula)
        given = json.loads(a.priors)
        df = load(a.data, f)
        priors = resolve_priors(f, df[f.response].to_numpy(float), given)
    except (ValueError, OSError) as e:
        print(f"bench_bayes_peers: {e}", file=sys.stderr)
        return 2
    base = {
        "data": a.data,
        "n": len(df),
        "groups": int(df[f.group].nunique()),
        "formula": a.formula,
        "priors": priors,
        "chains": a.chains,
        "draws": a.draws,
        "warmup": a.warmup,
        "seed": a.seed,
        "cores": a.cores,
        "adapt_delta": a.adapt_delta,
    }

    def emit(r: dict) -> None:
        rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        print(json.dumps(rounded), flush=True)

    if a.gradient_only:
        emit(dict(base, **gradient_only(df, f, priors, a.reps)))
    else:
        run = {"nutpie": run_nutpie, "pymc": run_pymc}
        for peer in a.peers.split(","):
            args = (f, priors, a.chains, a.draws, a.warmup, a.seed, a.cores, a.adapt_delta)
            if peer == "brms":
                r = run_brms(a.data, *args)
            elif peer in run:
                r = run[peer](df, *args)
            else:
                print(f"bench_bayes_peers: unknown peer {peer!r}", file=sys.stderr)
                return 2
            r["min_ess_bulk_per_s"] = r["min_ess_bulk"] / r["sampling_s"]
            emit(dict(base, **r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
