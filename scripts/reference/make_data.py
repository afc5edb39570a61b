"""Write the CSVs of the generated lme4 reference cases into tests/data (deterministic).

Usage: python make_data.py [OUT_DIR] [--case CSV_STEM ...]

Every case draws from its own seeded ``numpy.random.default_rng`` so that changing one
case never changes another. The rows are written in stream order: groups of varying
sizes, interleaved at random (a stream does not arrive sorted by group). Values are
rounded to 6 decimals (y to 6 as well), so the files are small and the same numbers
reach R and Python. The 7 core cases' CSVs (sleepstudy, pub_*) are not generated here:
they are committed as they were.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable

import numpy as np
import pandas as pd

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parents[1] / "tests" / "data"


def _groups(rng: np.random.Generator, n_groups: int, lo: int, hi: int) -> np.ndarray:
    """Group labels ``g0..`` of varying sizes (lo..hi, skewed small), stream-shuffled."""
    sizes = np.minimum(lo + rng.geometric(1.0 / (1 + (hi - lo) / 3), n_groups) - 1, hi)
    g = np.repeat(np.arange(n_groups), sizes)
    return g[rng.permutation(len(g))]


def _labels(g: np.ndarray) -> np.ndarray:
    return np.array([f"g{i}" for i in g], dtype=object)


def _re(rng: np.random.Generator, n_groups: int, sd: list[float], corr: float = 0.0):
    """Correlated random effects, one row per group (first two columns correlated)."""
    q = len(sd)
    C = np.eye(q)
    if q > 1:
        C[0, 1] = C[1, 0] = corr
    cov = np.outer(sd, sd) * C
    return rng.multivariate_normal(np.zeros(q), cov, size=n_groups, method="cholesky")


def _round(df: pd.DataFrame) -> pd.DataFrame:
    for c in df.columns:
        if df[c].dtype.kind == "f":
            df[c] = df[c].round(6)
    return df


def _base(seed: int, n_groups: int = 120, lo: int = 2, hi: int = 40):
    rng = np.random.default_rng(seed)
    g = _groups(rng, n_groups, lo, hi)
    n = len(g)
    x1 = rng.normal(0.0, 1.0, n)
    x2 = rng.normal(1.0, 2.0, n)
    b = _re(rng, n_groups, [1.5, 0.6], corr=0.3)
    eps = rng.normal(0.0, 1.0, n)
    return rng, g, n, x1, x2, b, eps


# -- issue "trust on real data" --------------------------------------------------------------
def aliased() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(101)
    y = 5.0 + 0.4 * x1 - 0.7 * x2 + b[g, 0] + b[g, 1] * x1 + eps
    df = pd.DataFrame({"g": _labels(g), "x1": x1, "x2": x2, "y": y})
    df = _round(df)
    df.insert(3, "x3", (2 * df["x1"] + 1).round(6))  # exactly 2*x1 + 1 in decimal
    return df


def constant_col() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(102)
    y = 3.0 + 0.8 * x1 + b[g, 0] + b[g, 1] * x1 + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "x2": np.full(n, 3.0), "y": y}))


def proportional() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(103)
    y = -1.0 + 1.2 * x1 + b[g, 0] + b[g, 1] * x1 + eps
    df = _round(pd.DataFrame({"g": _labels(g), "x1": x1, "y": y}))
    df.insert(2, "x2", (2 * df["x1"]).round(6))
    return df


def timestamp() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(104)
    year = 365 * 24 * 3600
    ts = np.sort(rng.integers(1_700_000_000 - year // 2, 1_700_000_000 + year // 2, n))
    # stream order = time order: the rows arrive sorted by timestamp
    y = 2.0 + 1e-7 * (ts - 1_700_000_000) + 0.5 * x1 + b[g, 0] + b[g, 1] * x1 + eps
    df = pd.DataFrame({"g": _labels(g), "ts": ts.astype(np.int64), "x1": x1, "y": y})
    return _round(df)


def outlier_first() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(105)
    y = 1.0 + 0.5 * x1 + 0.3 * x2 + b[g, 0] + b[g, 1] * x1 + eps
    df = _round(pd.DataFrame({"g": _labels(g), "x1": x1, "x2": x2, "y": y}))
    df.loc[0, "x2"] = 1e7  # a corrupted feature value: y was drawn with the ordinary x2
    return df


def _leverage(seed: int, far: float) -> pd.DataFrame:
    """Days 0..6 per group, then one event whose x1 was corrupted into ``far`` (a Unix
    time, say) in group g0, last in the stream; its y is an ordinary one."""
    rng = np.random.default_rng(seed)
    n_groups = 30
    b = _re(rng, n_groups, [1.0, 0.3], corr=0.4)
    g = np.repeat(np.arange(n_groups), 7)
    x1 = np.tile(np.arange(7.0), n_groups)
    order = rng.permutation(len(g))
    g, x1 = g[order], x1[order]
    y = 2.0 + 0.5 * x1 + b[g, 0] + b[g, 1] * x1 + rng.normal(0.0, 0.5, len(g))
    df = _round(pd.DataFrame({"g": _labels(g), "x1": x1, "y": y}))
    last = pd.DataFrame({"g": ["g0"], "x1": [far], "y": [round(float(df.y.mean()), 6)]})
    return pd.concat([df, last], ignore_index=True)


def leverage() -> pd.DataFrame:
    return _leverage(108, 1e4)


def leverage_far() -> pd.DataFrame:
    return _leverage(109, 1.7e9)


def single_level() -> pd.DataFrame:
    rng = np.random.default_rng(106)
    n = 200
    x1 = rng.normal(0.0, 1.0, n)
    y = 4.0 + 0.5 * x1 + rng.normal(0.0, 1.0, n)
    return _round(pd.DataFrame({"g": np.full(n, "g0", dtype=object), "x1": x1, "y": y}))


def one_obs_per_group() -> pd.DataFrame:
    rng = np.random.default_rng(107)
    n = 300
    g = rng.permutation(n)
    x1 = rng.normal(0.0, 1.0, n)
    y = 4.0 + 0.5 * x1 + rng.normal(0.0, 1.5, n) + rng.normal(0.0, 1.0, n)
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "y": y}))


def few_groups() -> pd.DataFrame:
    rng = np.random.default_rng(108)
    g = _groups(rng, 4, 30, 80)
    n = len(g)
    x1 = rng.normal(0.0, 1.0, n)
    b0 = rng.normal(0.0, 1.0, 4)
    b1 = rng.normal(0.0, 0.01, 4)  # a slope variance far below what 4 groups can see
    y = 2.0 + 0.5 * x1 + b0[g] + b1[g] * x1 + rng.normal(0.0, 1.0, n)
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "y": y}))


# -- issue "lme4 formulas" ---------------------------------------------------------------------
def _factor_midstream(rng: np.random.Generator, n: int) -> np.ndarray:
    """Levels "a" and "b" from the start (first row "a"), "c" only after 60% of the rows."""
    cut = int(0.6 * n)
    f = np.empty(n, dtype=object)
    f[:cut] = rng.choice(["a", "b"], cut)
    f[cut:] = rng.choice(["a", "b", "c"], n - cut)
    f[0], f[1] = "a", "b"
    return f


def factor_midstream() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(201)
    f = _factor_midstream(rng, n)
    eff = {"a": 0.0, "b": 0.8, "c": -1.5}
    y = 1.0 + 0.5 * x1 + np.array([eff[v] for v in f]) + b[g, 0] + b[g, 1] * x1 + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "f": f, "y": y}))


def num_by_factor() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(202)
    f = _factor_midstream(rng, n)
    eff = {"a": 0.0, "b": 0.8, "c": -1.5}
    slope = {"a": 0.5, "b": -0.3, "c": 1.1}
    fe = np.array([eff[v] for v in f])
    sl = np.array([slope[v] for v in f])
    y = 1.0 + sl * x1 + fe + b[g, 0] + b[g, 1] * x1 + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "f": f, "y": y}))


def factor_by_factor() -> pd.DataFrame:
    rng = np.random.default_rng(203)
    n_groups = 150
    g = _groups(rng, n_groups, 2, 30)
    n = len(g)
    x1 = rng.normal(0.0, 1.0, n)
    # first-seen orders differ from the alphabetical ones: f lo, mid, hi; h on, off
    f = rng.choice(["lo", "mid", "hi"], n, p=[0.5, 0.3, 0.2]).astype(object)
    h = rng.choice(["on", "off"], n).astype(object)
    f[0], f[1], f[2], h[0], h[1] = "lo", "mid", "hi", "on", "off"
    ef = {"lo": 0.0, "mid": 0.7, "hi": 1.6}
    eh = {"on": 0.0, "off": -0.9}
    efh = {("mid", "off"): 0.6, ("hi", "off"): -0.4}
    fix = np.array([ef[a] + eh[c] + efh.get((a, c), 0.0) for a, c in zip(f, h)])
    b0 = rng.normal(0.0, 1.2, n_groups)
    y = 3.0 + 0.4 * x1 + fix + b0[g] + rng.normal(0.0, 1.0, n)
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "f": f, "h": h, "y": y}))


def transforms() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(204)
    x3 = rng.lognormal(0.5, 0.8, n)
    y = 1.0 + 0.5 * x1 - 0.3 * x1**2 + 0.9 * np.log(x3) + b[g, 0] + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "x3": x3, "y": y}))


def log_response() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(205)
    x3 = rng.uniform(0.1, 9.0, n)
    b = b * 0.3
    eta = 1.5 + 0.2 * x1 + 0.25 * np.sqrt(x3) + b[g, 0] + b[g, 1] * x1 + 0.3 * eps
    df = _round(pd.DataFrame({"g": _labels(g), "x1": x1, "x3": x3, "y": np.exp(eta)}))
    assert (df["y"] > 0).all() and (df["x3"] > 0).all()
    return df


def uncorrelated() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(206)
    y = 2.0 + 0.7 * x1 + b[g, 0] + b[g, 1] * x1 + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "y": y}))


def two_terms() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(207)
    b2 = rng.normal(0.0, 0.4, len(b))
    y = 2.0 + 0.7 * x1 - 0.2 * x2 + b[g, 0] + b[g, 1] * x1 + b2[g] * x2 + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "x2": x2, "y": y}))


def interaction_in_random() -> pd.DataFrame:
    rng, g, n, x1, x2, b, eps = _base(208)
    y = 2.0 + 0.7 * x1 - 0.2 * x2 + 0.3 * x1 * x2 + b[g, 0] + b[g, 1] * x1 * x2 + eps
    return _round(pd.DataFrame({"g": _labels(g), "x1": x1, "x2": x2, "y": y}))


CSVS: dict[str, Callable[[], pd.DataFrame]] = {
    "aliased": aliased,
    "constant_col": constant_col,
    "proportional": proportional,
    "timestamp": timestamp,
    "outlier_first": outlier_first,
    "leverage": leverage,
    "leverage_far": leverage_far,
    "single_level": single_level,
    "one_obs_per_group": one_obs_per_group,
    "few_groups": few_groups,
    "factor_midstream": factor_midstream,
    "num_by_factor": num_by_factor,
    "factor_by_factor": factor_by_factor,
    "transforms": transforms,
    "log_response": log_response,
    "uncorrelated": uncorrelated,
    "two_terms": two_terms,
    "interaction_in_random": interaction_in_random,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path, nargs="?", default=DATA)
    ap.add_argument("--case", action="append", default=[], choices=sorted(CSVS))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stem in args.case or CSVS:
        df = CSVS[stem]()
        path = args.out / f"{stem}.csv"
        df.to_csv(path, index=False, float_format="%.15g", lineterminator="\n")
        size = path.stat().st_size
        assert size < 250_000, f"{path} is {size} bytes"
        print(f"{path.name:28s} {len(df):5d} rows {df['g'].nunique():4d} groups {size:7d} B")


if __name__ == "__main__":
    main()
