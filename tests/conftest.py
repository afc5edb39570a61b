"""Shared fixtures for the core test suite.

The helpers are exposed as (session-scoped) fixtures rather than imported from this
module, so that the suite works under any pytest import mode and next to other
``conftest.py`` files (``tests/stream/``).

Reference data (lme4 1.1.31 fits, scripts/reference/README.md) is read from the repository's ``tests/data``
(see its README.md), or from ``$STREAMLMM_REFERENCE``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamlmm import estimate
from streamlmm.design import Design, numeric_design
from streamlmm.formula import INTERCEPT
from streamlmm.stats import GroupStats


def reference_dir() -> pathlib.Path:
    """Where the lme4 reference cases live (``$STREAMLMM_REFERENCE`` overrides)."""
    env = os.environ.get("STREAMLMM_REFERENCE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parent / "data"


# The cases the parametrized streamlmm-vs-lme4 tests run on: numeric columns x1, x2 and
# one random-effects term. The other cases in tests/data (factors, transforms, ``||``,
# rank deficiency, lme4 errors) exercise features that are checked separately; only
# tests/test_reference_data.py runs over all of them.
CORE_REFERENCE_NAMES = (
    "pub_freqweights_reml",
    "pub_slopes_ml",
    "pub_slopes_reml",
    "pub_tiny_intercept_reml",
    "sleepstudy_intercept_reml",
    "sleepstudy_slopes_ml",
    "sleepstudy_slopes_reml",
)
REFERENCE_NAMES = list(CORE_REFERENCE_NAMES)
ALL_REFERENCE_NAMES = sorted(p.stem for p in reference_dir().glob("*.json"))


# -- reference cases ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceCase:
    """One lme4 reference fit and its data, read with string group keys."""

    name: str
    ref: dict[str, Any]
    data: pd.DataFrame

    @property
    def formula(self) -> Design:
        return numeric_design(self.ref["formula"])

    @property
    def method(self) -> str:
        return self.ref["method"]

    @property
    def reml(self) -> bool:
        return self.method == "REML"

    @property
    def q(self) -> int:
        return self.formula.q

    @property
    def features(self) -> pd.DataFrame:
        """Feature columns (the group key included), without ``y`` and ``w``."""
        return self.data.drop(columns=[c for c in ("y", "w") if c in self.data.columns])

    @property
    def y(self) -> pd.Series:
        return self.data["y"]

    @property
    def w(self) -> pd.Series | None:
        return self.data["w"] if "w" in self.data.columns else None

    @property
    def theta(self) -> np.ndarray:
        return np.atleast_1d(np.asarray(self.ref["theta"], dtype=float))

    @property
    def fixef(self) -> dict[str, float]:
        return dict(self.ref["fixef"])

    @property
    def re_cov(self) -> np.ndarray:
        """lme4's VarCorr as a q×q matrix (the JSON is column-major, or a scalar)."""
        return np.asarray(self.ref["re_cov"], dtype=float).reshape((self.q, self.q), order="F")

    def ranef(self, key: str) -> np.ndarray:
        return np.atleast_1d(np.asarray(self.ref["ranef"][key], dtype=float))

    def condvar(self, key: str) -> np.ndarray:
        return np.asarray(self.ref["condvar"][key], dtype=float).reshape(
            (self.q, self.q), order="F"
        )

    @property
    def group_keys(self) -> list[str]:
        return list(self.ref["ranef"])

    def records(self) -> list[dict[str, Any]]:
        return self.features.to_dict("records")

    def stream_one(self, model) -> None:
        """``learn_one`` over every row, in file order (y and w passed separately)."""
        ys = self.y.to_numpy(dtype=float)
        ws = None if self.w is None else self.w.to_numpy(dtype=float)
        for i, x in enumerate(self.records()):
            if ws is None:
                model.learn_one(x, float(ys[i]))
            else:
                model.learn_one(x, float(ys[i]), w=float(ws[i]))

    def stream_many(self, model, chunk: int = 1000) -> None:
        """``learn_many`` over chunks of ``chunk`` rows, in file order."""
        X, y, w = self.features, self.y, self.w
        for start in range(0, len(y), chunk):
            sl = slice(start, start + chunk)
            model.learn_many(X.iloc[sl], y.iloc[sl], None if w is None else w.iloc[sl])

    def design(self) -> np.ndarray:
        """The union columns ``a`` of every row (intercept = 1), unshifted."""
        return union_matrix(self.formula, self.data)

    def stats(self) -> GroupStats:
        """The case's statistics, every row in file order."""
        f = self.formula
        st = GroupStats(f)
        n = len(self.data)
        w = np.ones(n) if self.w is None else self.w.to_numpy(dtype=float)
        st.add(st.rows(list(self.data["g"])), self.design(), self.y.to_numpy(float), w, np.zeros(n))
        return st

    def user_problem(self) -> estimate.Problem:
        """The fit's problem in the user's coordinates (centre 0), as lme4 sees the data."""
        f = self.formula
        prob, _ = estimate.make_problem(self.stats(), f, self.reml, center=np.zeros(f.k + 1))
        return prob

    def dense(self) -> DenseLMM:
        """The dense independent computation on this case's data (weights repeated)."""
        f = self.formula
        w = None if self.w is None else self.w.to_numpy()
        return DenseLMM.from_frame(f, self.data, w)


@functools.cache
def load_reference(name: str) -> ReferenceCase:
    """Load ``<name>.json`` and its CSV; ``g`` is read as strings, like the JSON keys."""
    ref = json.loads((reference_dir() / f"{name}.json").read_text())
    data = pd.read_csv(reference_dir() / ref["data"], dtype={"g": str})
    return ReferenceCase(name=name, ref=ref, data=data)


def union_matrix(f: Design, frame: pd.DataFrame) -> np.ndarray:
    """Union columns of a formula from a data frame (intercept column = 1)."""
    n = len(frame)
    return np.column_stack(
        [np.ones(n) if c == INTERCEPT else frame[c].to_numpy(dtype=float) for c in f.columns]
    )


# -- an independent dense implementation ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DenseFit:
    """Profiled quantities from :class:`DenseLMM` at one θ (user coordinates)."""

    criterion: float
    beta: np.ndarray
    sigma2: float
    vcov_beta: np.ndarray
    b: dict[Any, np.ndarray]
    condvar: dict[Any, np.ndarray]


class DenseLMM:
    """The marginal model written out densely, one group at a time.

    ``y_g ~ N(X_g β, σ² V_g)`` with ``V_g = I + Z_g ΛΛ' Z_g'``. Nothing here uses the
    sufficient statistics or the PLS formulation of docs/math.md §3, so it is an independent
    check of both. Integer frequency weights are handled by repeating rows.
    """

    def __init__(self, X, Z, y, groups: Iterable[Any], w=None):
        X, Z, y = np.asarray(X, float), np.asarray(Z, float), np.asarray(y, float)
        groups = list(groups)
        if w is not None:
            w = np.asarray(w)
            if not np.all(w == np.round(w)) or np.any(w < 0):
                raise ValueError("DenseLMM takes integer frequency weights only")
            rep = np.repeat(np.arange(len(y)), w.astype(int))
            X, Z, y = X[rep], Z[rep], y[rep]
            groups = [groups[i] for i in rep]
        self.X, self.Z, self.y = X, Z, y
        self.n, self.p = X.shape
        self.q = Z.shape[1]
        index: dict[Any, list[int]] = {}
        for i, g in enumerate(groups):
            index.setdefault(g, []).append(i)
        self.groups = {g: np.array(ix) for g, ix in index.items()}

    @classmethod
    def from_frame(cls, f: Design, frame: pd.DataFrame, w=None, y="y") -> DenseLMM:
        A = union_matrix(f, frame)
        return cls(A[:, f.xi], A[:, f.zi], frame[y].to_numpy(float), frame[f.formula.group], w)

    def _blocks(self, theta):
        lam = np.zeros((self.q, self.q))
        lam[tuple(estimate.theta_index([tuple(range(self.q))], self.q))] = np.asarray(theta, float)
        D = lam @ lam.T
        for g, ix in self.groups.items():
            Xg, Zg, yg = self.X[ix], self.Z[ix], self.y[ix]
            V = np.eye(len(ix)) + Zg @ D @ Zg.T
            yield g, Xg, Zg, yg, V, D

    def at(self, theta, reml: bool) -> DenseFit:
        """Profiled REML/ML criterion, β̂, σ̂², Var(β̂), BLUPs and condVar at θ."""
        logdet = 0.0
        XVX = np.zeros((self.p, self.p))
        XVy = np.zeros(self.p)
        yVy = 0.0
        parts = []
        for g, Xg, Zg, yg, V, D in self._blocks(theta):
            logdet += np.linalg.slogdet(V)[1]
            VX = np.linalg.solve(V, Xg)
            Vy = np.linalg.solve(V, yg)
            XVX += Xg.T @ VX
            XVy += Xg.T @ Vy
            yVy += yg @ Vy
            parts.append((g, Xg, Zg, yg, V, D))
        beta = np.linalg.solve(XVX, XVy)
        r2 = yVy - 2 * beta @ XVy + beta @ XVX @ beta
        dof = self.n - self.p if reml else self.n
        crit = logdet + dof * (1 + math.log(2 * math.pi * r2 / dof))
        if reml:
            crit += np.linalg.slogdet(XVX)[1]
        sigma2 = r2 / dof
        b, condvar = {}, {}
        for g, Xg, Zg, yg, V, D in parts:
            DZ = D @ Zg.T
            b[g] = DZ @ np.linalg.solve(V, yg - Xg @ beta)
            condvar[g] = sigma2 * (D - DZ @ np.linalg.solve(V, DZ.T))
        return DenseFit(
            criterion=float(crit),
            beta=beta,
            sigma2=float(sigma2),
            vcov_beta=sigma2 * np.linalg.inv(XVX),
            b=b,
            condvar=condvar,
        )

    def loglik(self, theta, beta, sigma2: float) -> float:
        """ML log-likelihood at (θ, β, σ²), not profiled."""
        total = self.n * math.log(2 * math.pi * sigma2)
        for _, Xg, _, yg, V, _ in self._blocks(theta):
            r = yg - Xg @ beta
            total += np.linalg.slogdet(V)[1] + r @ np.linalg.solve(V, r) / sigma2
        return -0.5 * total


# -- estimates of a model at a given θ --------------------------------------------------------
def lower_factor(F: np.ndarray) -> np.ndarray:
    """Lower-triangular L with LL' = FF' and diag(L) ≥ 0 (F may be singular)."""
    _, R = np.linalg.qr(F.T)
    L = R.T
    return L * np.where(np.diag(L) < 0, -1.0, 1.0)


def estimates_at(model, theta_user) -> dict[str, Any]:
    """Profiled estimates of ``model``'s statistics at a θ in the user's coordinates.

    The fit works around a centre ``c``; there ``b̃ = T_z⁻¹ b``, so the user's Λ maps to
    a lower-triangular factor of ``T_z⁻¹ ΛΛ' T_z⁻ᵀ`` (``Problem.from_user_lam``).
    Returns the criterion and the estimates mapped back to the user's columns.
    """
    prob, _ = estimate.make_problem(model._stats, model._design, model.reml)
    lam_u = np.zeros((prob.q, prob.q))
    lam_u[prob.tindex] = np.asarray(theta_user, float)
    pr = prob.profile(prob.theta(prob.from_user_lam(lam_u)))
    assert pr is not None, "criterion undefined at this θ"
    est = estimate.estimates_at(prob, pr)
    st = model._stats
    return {
        "criterion": est.criterion,
        "fixef": est.fixef,
        "vcov": est.vcov,
        "sigma": math.sqrt(est.sigma2),
        "theta": est.theta,
        "b": {k: est.b[i] for i, k in enumerate(st.keys)},
        "condvar": {k: est.condvar[i] for i, k in enumerate(st.keys)},
    }


# -- state comparison -------------------------------------------------------------------------
# A model's statistical state: its own fields, and its parts' (the learner's statistics,
# design and counts; the schedule; the predictor's parameters), without per-call scratch
# and caches. The reservoir is compared by its content (sorted by priority), not by the
# slots its events happen to occupy.
_PARTS = {"_learner", "_pred", "_schedule"}


def model_state(model) -> bytes:
    """Pickled bytes of everything a model holds except its per-call scratch buffers."""
    state = {k: v for k, v in vars(model).items() if k not in _PARTS}
    lr = model._learner
    st = lr.stats
    state["_learner"] = {
        "design": lr.design.to_state(),
        "M": st.active.tobytes(),
        "keys": list(st.keys),
        "tg": st.tg[: st.n_groups].tobytes(),
        "now": st.now,
        "n_events": lr.n_events,
        "n_skipped": lr.n_skipped,
    }
    state["_schedule"] = dict(vars(model._schedule))
    state["_par"] = model._pred.par
    res = model._res
    if res is not None:
        o = np.argsort(res.prio[: res.size], kind="stable")
        state["_res"] = [
            res.n_seen,
            res.prio[o].tobytes(),
            res.count[o].tobytes(),
            res.y[o].tobytes(),
            res.A[o].tobytes(),
            [model._stats.keys[r] for r in res.row[o]],
        ]
    return pickle.dumps(state)


def active_stats(model) -> tuple[np.ndarray, list, np.ndarray | None]:
    """The filled statistics rows, the keys in row order and the forgetting clock."""
    st = model._stats
    return st.active.copy(), list(st.keys), st.now


def stats_by_key(model) -> dict[Any, np.ndarray]:
    st = model._stats
    return {k: st.active[i] for i, k in enumerate(st.keys)}


def with_lone_surrogate(snap, key: str):
    """``snap`` with group ``key`` (6 characters) renamed to ``"\\ud800"``: a snapshot
    written before keys that are not valid Unicode text were refused at the input (the
    bytes are edited, and the checksum made anew)."""
    import hashlib

    from streamlmm import Snapshot

    assert len(key) == 6 and key.isascii()
    body = snap.to_bytes()[:-32]
    old, new = json.dumps(key).encode(), b'"\\ud800"'
    assert len(old) == len(new) and body.count(old) == 1
    body = body.replace(old, new)
    out = Snapshot.from_bytes(body + hashlib.sha256(body).digest())
    assert "\ud800" in out.keys
    return out


def rel_err(a, b) -> float:
    """Largest relative difference |a − b| / |b| (b nonzero)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# -- fixtures -----------------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "reference_name" in metafunc.fixturenames:
        # the lme4 fits are the point of these tests: a missing case fails collection
        missing = [n for n in REFERENCE_NAMES if not (reference_dir() / f"{n}.json").is_file()]
        if not REFERENCE_NAMES or missing:
            pytest.fail(
                f"reference cases {missing or '(none)'} missing from {reference_dir()}",
                pytrace=False,
            )
        metafunc.parametrize("reference_name", REFERENCE_NAMES)


@pytest.fixture(scope="session")
def reference() -> Callable[[str], ReferenceCase]:
    """Loader of a reference case by name (e.g. ``"sleepstudy_slopes_reml"``)."""
    if not REFERENCE_NAMES:  # the lme4 fits are the point of these tests: fail, never skip
        pytest.fail(f"no reference cases in {reference_dir()} (set STREAMLMM_REFERENCE)")
    return load_reference


@pytest.fixture
def case(reference, reference_name) -> ReferenceCase:
    """Each reference case in turn (parametrized over every ``*.json``)."""
    return reference(reference_name)


@pytest.fixture(scope="session")
def dense_lmm() -> type[DenseLMM]:
    return DenseLMM


@pytest.fixture(scope="session")
def helpers():
    """Small helper functions shared by the test modules."""
    import types

    return types.SimpleNamespace(
        estimates_at=estimates_at,
        lower_factor=lower_factor,
        model_state=model_state,
        active_stats=active_stats,
        stats_by_key=stats_by_key,
        rel_err=rel_err,
        union_matrix=union_matrix,
        with_lone_surrogate=with_lone_surrogate,
    )
