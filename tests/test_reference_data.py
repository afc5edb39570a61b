"""The lme4 reference data in tests/data checked by itself, without streamlmm.

For every ``*.json``: its CSV exists and has ``n`` rows (the sum of the frequency
weights for the weighted case) and ``n_groups`` groups. For every case lme4 fitted, an
independent dense computation (the marginal model written out group by group, with X
and Z built here from the CSV by lme4's column names) reproduces lme4's criterion,
fixef, sigma, BLUPs and conditional variances at lme4's θ. That also checks how the
columns are named and coded (factor dummies against the first level seen, ``I()``,
``log``/``sqrt``, ``:``, dropped aliased columns, several terms on one factor).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re

import numpy as np
import pandas as pd
import pytest


def reference_dir() -> pathlib.Path:
    """tests/data, or ``$STREAMLMM_REFERENCE`` (as in conftest.py)."""
    env = os.environ.get("STREAMLMM_REFERENCE")
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parent / "data"


NAMES = sorted(p.stem for p in reference_dir().glob("*.json"))
if not NAMES:  # the data is required: fail at collection, never skip
    pytest.fail(f"no reference cases in {reference_dir()}", pytrace=False)

# lme4's messages and dropped columns, as the cases were designed to provoke them
EXPECTED = {
    "aliased_reml": (["x3"], "rank deficient so dropping 1 column"),
    "constant_col_reml": (["x2"], "rank deficient so dropping 1 column"),
    "proportional_ml": (["x2"], "rank deficient so dropping 1 column"),
    "timestamp_reml": ([], "very different scales"),
    "outlier_first_reml": ([], "very different scales"),
    "leverage_far_reml": ([], "very different scales"),
    "few_groups_singular_reml": ([], "boundary (singular) fit"),
    "single_level_error": (None, "grouping factors must have > 1 sampled level"),
    "one_obs_per_group_error": (None, "number of levels of each grouping factor must be <"),
}


@functools.cache
def _load(name: str) -> tuple[dict, pd.DataFrame]:
    ref = json.loads((reference_dir() / f"{name}.json").read_text())
    data = pd.read_csv(reference_dir() / ref["data"], dtype={"g": str})
    return ref, data


def _weights(ref: dict, data: pd.DataFrame) -> np.ndarray | None:
    """The frequency weights column named by ``weights`` ("w (frequency weights ...)")."""
    w = ref.get("weights")
    if isinstance(w, str) and w:
        return data[w.split()[0]].to_numpy()
    return None


def _factor_levels(data: pd.DataFrame) -> dict[str, list[str]]:
    """Non-numeric columns other than ``g``, with their levels in first-seen order."""
    return {
        c: list(pd.unique(data[c]))
        for c in data.columns
        if c != "g" and not pd.api.types.is_numeric_dtype(data[c])
    }


def _column(name: str, data: pd.DataFrame, factors: dict[str, list[str]]) -> np.ndarray:
    """One model-matrix column from lme4's name for it (products written ``a:b``)."""
    out = np.ones(len(data))
    if name == "(Intercept)":
        return out
    for part in name.split(":"):
        if part in data.columns and part not in factors:
            out = out * data[part].to_numpy(float)
            continue
        m = re.fullmatch(r"I\((\w+)\^(\d+)\)", part)
        if m:
            out = out * data[m[1]].to_numpy(float) ** int(m[2])
            continue
        m = re.fullmatch(r"(log|sqrt|exp)\((\w+)\)", part)
        if m:
            out = out * getattr(np, m[1])(data[m[2]].to_numpy(float))
            continue
        for col, levels in factors.items():
            if part.startswith(col) and part[len(col) :] in levels[1:]:
                out = out * (data[col].to_numpy() == part[len(col) :])
                break
        else:
            raise ValueError(f"cannot build column {part!r}")
    return out


def _response(formula: str, data: pd.DataFrame, factors) -> np.ndarray:
    return _column(formula.split("~")[0].strip(), data, factors)


def _terms(ref: dict) -> list[tuple[list[str], int]]:
    """(column names, θ entries) per random-effects term, in θ order."""
    terms = ref.get("varcorr_terms") or [{"names": np.atleast_1d(ref["re_names"]).tolist()}]
    return [(list(np.atleast_1d(t["names"])), len(t["names"]) * (len(t["names"]) + 1) // 2)
            for t in terms]  # fmt: skip


def _lambda(ref: dict) -> np.ndarray:
    """lme4's relative covariance factor Λ (q×q, block lower-triangular per term)."""
    re_names = np.atleast_1d(ref["re_names"]).tolist()
    theta = np.atleast_1d(np.asarray(ref["theta"], float))
    lam = np.zeros((len(re_names), len(re_names)))
    start = 0
    for names, k in _terms(ref):
        m = len(names)
        block = np.zeros((m, m))
        block[np.triu_indices(m)] = theta[start : start + k]
        block = block.T  # θ fills the lower triangle column by column
        ix = [re_names.index(n) for n in names]
        lam[np.ix_(ix, ix)] = block
        start += k
    assert start == len(theta)
    return lam


@functools.cache
def _dense(name: str):
    """Criterion, β, σ², BLUPs and condVar at lme4's θ, written out densely."""
    ref, data = _load(name)
    w = _weights(ref, data)
    if w is not None:
        data = data.loc[np.repeat(np.arange(len(data)), w.astype(int))].reset_index(drop=True)
    factors = _factor_levels(data)
    X = np.column_stack([_column(c, data, factors) for c in ref["fixef"]])
    re_names = np.atleast_1d(ref["re_names"]).tolist()
    Z = np.column_stack([_column(c, data, factors) for c in re_names])
    y = _response(ref["formula"], data, factors)
    lam = _lambda(ref)
    D = lam @ lam.T
    reml = ref["method"] == "REML"
    n, p = X.shape
    groups = data.groupby("g", sort=False).indices
    logdet, XVX, XVy, yVy, parts = 0.0, np.zeros((p, p)), np.zeros(p), 0.0, {}
    for g, ix in groups.items():
        Xg, Zg, yg = X[ix], Z[ix], y[ix]
        V = np.eye(len(ix)) + Zg @ D @ Zg.T
        logdet += np.linalg.slogdet(V)[1]
        VX, Vy = np.linalg.solve(V, Xg), np.linalg.solve(V, yg)
        XVX += Xg.T @ VX
        XVy += Xg.T @ Vy
        yVy += yg @ Vy
        parts[g] = (Xg, Zg, yg, V)
    beta = np.linalg.solve(XVX, XVy)
    r2 = yVy - 2 * beta @ XVy + beta @ XVX @ beta
    dof = n - p if reml else n
    crit = logdet + dof * (1 + math.log(2 * math.pi * r2 / dof))
    if reml:
        crit += np.linalg.slogdet(XVX)[1]
    sigma2 = r2 / dof
    b, cv = {}, {}
    for g, (Xg, Zg, yg, V) in parts.items():
        DZ = D @ Zg.T
        b[g] = DZ @ np.linalg.solve(V, yg - Xg @ beta)
        cv[g] = sigma2 * (D - DZ @ np.linalg.solve(V, DZ.T))
    return crit, beta, sigma2, b, cv, lam


def _fitted(name: str) -> bool:
    """lme4 fitted it: no error, and estimates (leverage_far_reml's are all NaN)."""
    ref = _load(name)[0]
    return "error" not in ref and None not in ref["fixef"].values()


FITTED = [n for n in NAMES if _fitted(n)]


@pytest.mark.parametrize("name", NAMES)
def test_csv_rows_and_groups(name):
    ref, data = _load(name)
    assert (reference_dir() / ref["data"]).is_file()
    w = _weights(ref, data)
    assert (len(data) if w is None else int(w.sum())) == ref["n"]
    assert data["g"].nunique() == ref["n_groups"]
    assert pathlib.Path(reference_dir() / ref["data"]).stat().st_size < 300_000
    if "ranef" in ref:
        assert set(ref["ranef"]) == set(data["g"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lme4_messages_as_designed(name):
    ref, _ = _load(name)
    dropped, text = EXPECTED[name]
    if dropped is None:
        assert text in ref["error"]
        assert "fixef" not in ref and "theta" not in ref
    else:
        assert ref["dropped"] == dropped
        assert any(text in m for m in ref["messages"]), ref["messages"]
        assert not set(dropped) & set(ref["fixef"])
    assert ref["singular"] if name == "few_groups_singular_reml" else True


@pytest.mark.parametrize("name", FITTED)
def test_factor_dummies_against_first_level_seen(name):
    ref, data = _load(name)
    for col, levels in _factor_levels(data).items():
        dummies = [c for c in ref["fixef"] if c.startswith(col) and c[len(col) :] in levels]
        assert dummies == [col + lev for lev in levels[1:]], (col, levels)


@pytest.mark.parametrize("name", FITTED)
def test_re_cov_is_sigma2_lambda_lambda(name):
    ref, _ = _load(name)
    lam = _lambda(ref)
    q = lam.shape[0]
    re_cov = np.asarray(ref["re_cov"], float).reshape((q, q), order="F")
    np.testing.assert_allclose(re_cov, ref["sigma"] ** 2 * lam @ lam.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FITTED)
def test_dense_computation_at_lme4_theta(name):
    ref, _ = _load(name)
    crit, beta, sigma2, b, cv, lam = _dense(name)
    assert crit == pytest.approx(ref["criterion"], rel=1e-10)
    np.testing.assert_allclose(beta, list(ref["fixef"].values()), rtol=1e-7, atol=1e-12)
    assert math.sqrt(sigma2) == pytest.approx(ref["sigma"], rel=1e-8)
    q = lam.shape[0]
    for key in ref["ranef"]:
        np.testing.assert_allclose(
            b[key], np.atleast_1d(ref["ranef"][key]), rtol=1e-6, atol=1e-10, err_msg=key
        )
        want = np.asarray(ref["condvar"][key], float).reshape((q, q), order="F")
        known = ~np.isnan(want)  # entries between two terms are not given by lme4
        np.testing.assert_allclose(cv[key][known], want[known], rtol=1e-6, atol=1e-12)
