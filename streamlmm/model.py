"""MixedLM: the river face of the streaming mixed-model core.

Learning only accumulates statistics (O(1) per event). Parameters are refreshed on a
schedule counted in events: a cheap ML-EM step every ``em_every`` events and a
warm-started exact REML/ML refit every ``refit_every`` events (geometrically more often
while the stream is young). The refresh runs lazily, when a prediction or snapshot
needs the parameters, so ``learn_many`` and a ``learn_one`` loop reach the same state.
A prediction always recomputes its group's BLUP from that group's current statistics,
so every event moves its group's prediction at once.

"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from river import base

from streamlmm import estimate, kernels
from streamlmm.formula import INTERCEPT, parse_formula
from streamlmm.rows import RowReader
from streamlmm.snapshot import Snapshot
from streamlmm.stats import GroupStats, check_key

__all__ = ["MixedLM"]

METHODS = ("REML", "ML")
SCHEDULED_REFIT_EVALS = 200
HISTORY_MAX = 256  # model-level records kept for trajectories


class MixedLM(base.MiniBatchRegressor):
    """Linear mixed-effects model learned from a stream, with lme4's estimates.

    Parameters
    ----------
    formula
        lme4 formula with one random-effects term, e.g. ``"y ~ x1 + x2 + (1 + x1 | g)"``.
        The response's name only labels the model (river passes ``y`` separately).
    method
        ``"REML"`` (lme4's default) or ``"ML"``.
    half_life
        Forgetting half-life in event-time units (docs/math.md §7); ``None`` keeps everything.
    time_key
        Feature holding the event time for ``half_life``; without it, the n-th event
        learned has time n.
    missing
        ``"raise"``: a missing feature, group or target is a ``ValueError``. ``"skip"``:
        such an event is dropped and counted (lme4's ``na.omit``), and a prediction
        with a missing feature uses the column's reference value instead.
    em_every
        Events between ML-EM steps on the variance components.
    refit_every
        Events between exact (warm-started) REML/ML refits.

    Examples
    --------
    >>> from streamlmm import MixedLM
    >>> model = MixedLM("y ~ x + (1 + x | g)")
    >>> for i in range(200):
    ...     g = i % 5
    ...     x = {"g": g, "x": float(i % 11)}
    ...     model.learn_one(x, 1.0 + g + (0.5 + 0.1 * g) * x["x"] + 0.01 * (i % 7))
    >>> s = model.fit().snapshot()
    >>> round(s.fixef["x"], 2), s.re_names
    (0.7, ('(Intercept)', 'x'))
    >>> round(model.predict_one({"g": 2, "x": 3.0}), 1)  # truth: 1 + 2 + (0.5 + 0.2) * 3
    5.1

    """

    def __init__(
        self,
        formula: str = "y ~ x + (1 | g)",
        method: str = "REML",
        half_life: float | None = None,
        time_key: str | None = None,
        missing: str = "raise",
        em_every: int = 1_000,
        refit_every: int = 50_000,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for name, v in (("em_every", em_every), ("refit_every", refit_every)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.formula = formula
        self.method = method
        self.half_life = half_life
        self.time_key = time_key
        self.missing = missing
        self.em_every = em_every
        self.refit_every = refit_every
        self._formula = parse_formula(formula)
        self._reader = RowReader(self._formula, time_key, missing)
        self._stats = GroupStats(self._formula, half_life)
        self._theta: np.ndarray | None = None  # shifted coordinates
        self._profile: estimate.Profile | None = None
        self._lam = np.zeros((self._formula.q, self._formula.q))
        self._beta = np.zeros(self._formula.p)
        self.n_events = 0
        self.n_skipped = 0
        self.n_refits = 0
        self.n_em_steps = 0
        self.last_refit: dict[str, Any] = {}
        self._history: list[dict[str, Any]] = []
        self._next_refit = 1
        self._next_em = math.inf
        self._refreshed_at = -1
        k = self._formula.k
        self._A1 = np.empty((1, k))  # no views between buffers: they must survive pickling

    @classmethod
    def _unit_test_params(cls):
        # river's check datasets (TrumpApproval) have no group column: an integer
        # feature serves as the group key, and missing="skip" lets the checks drop
        # features at random, as they do.
        yield {
            "formula": "y ~ gallup + ipsos + (1 + gallup | ordinal_date)",
            "missing": "skip",
            "em_every": 5,
            "refit_every": 20,
        }
        yield {
            "formula": "y ~ 0 + gallup + rasmussen + (1 + rasmussen | ordinal_date)",
            "method": "ML",
            "missing": "skip",
            "half_life": 50.0,
        }

    @property
    def _multiclass(self):
        return False

    # -- learning -------------------------------------------------------------------------
    def learn_one(self, x: Mapping[str, Any], y: float, w: float = 1.0) -> None:
        """Accumulate one event. Invalid input raises ``ValueError`` and changes nothing."""
        reader = self._reader
        key = reader.read(x, y, self._A1[0])
        wt = reader.weight(w)
        if key is None:
            self.n_skipped += 1
            return
        t = reader.time(x) if self.time_key is not None else float(self.n_events + 1)
        if wt == 0.0:
            return
        self._stats.add_one(key, self._A1[0], float(y), wt, t)
        self.n_events += 1

    def learn_many(self, X, y, w=None) -> None:
        """Accumulate a batch (pandas DataFrame and Series), exactly as a ``learn_one`` loop.

        With ``missing="raise"`` one bad row rejects the whole batch (``ValueError``
        naming the row and field) and nothing changes; with ``"skip"`` rows with a
        missing value are dropped and counted in ``n_skipped``.
        """
        cols = {c: X[c].to_numpy() for c in X.columns} if hasattr(X, "columns") else X
        yv = y.to_numpy() if hasattr(y, "to_numpy") else y
        wv = w.to_numpy() if hasattr(w, "to_numpy") else w
        n = len(yv)
        codes, uniques, A, yk, wk, tk, kept = self._reader.read_columns(cols, yv, wv)
        self.n_skipped += n - kept.shape[0]
        # new groups get rows in the order of their first kept event, as in a learn_one loop
        if kept.shape[0] == n and (wk > 0).all():
            idx = np.arange(len(uniques))  # factorize already orders by first appearance
        else:
            idx = pd.unique(codes[wk > 0])
        urows = np.full(len(uniques), -1, dtype=np.int64)
        urows[idx] = self._stats.rows([uniques[j] for j in idx])
        self._accumulate(urows[codes], A, yk, wk, tk)

    def learn_batch(self, keys, A, y, w, t=None, parts=None) -> None:
        """Accumulate a batch that is already validated (the stream engine's path).

        ``keys`` are checked group keys, ``A`` the union columns (``formula.columns``),
        ``t`` the event times (``None`` without ``time_key``), ``parts`` the source
        partition of each event (a new group's home partition).
        """
        keep = w > 0
        rows = np.full(len(keys), -1, dtype=np.int64)
        idx = np.flatnonzero(keep)
        rows[idx] = self._stats.rows(
            [keys[i] for i in idx], None if parts is None else [parts[i] for i in idx]
        )
        self._accumulate(rows, A, y, w, t)

    def _accumulate(self, rows, A, y, w, t) -> None:
        keep = w > 0
        if not keep.all():
            rows, A, y, w = rows[keep], A[keep], y[keep], w[keep]
            t = None if t is None else t[keep]
        n = rows.shape[0]
        if n == 0:
            return
        if t is None:  # time = event count (read only under forgetting)
            t = float(self.n_events) + 1.0 + np.arange(n if self.half_life else 0, dtype=float)
        self._stats.add(rows, A, y, w, t)
        self.n_events += n

    # -- parameters -----------------------------------------------------------------------
    @property
    def reml(self) -> bool:
        return self.method == "REML"

    def _set_theta(self, theta: np.ndarray, prof: estimate.Profile | None = None) -> bool:
        prof = prof or estimate.profile(self._stats, theta, self.reml)
        if prof is None:
            return False
        self._theta = prof.theta
        self._profile = prof
        self._lam = estimate.lam_of(prof.theta, self._formula.q)
        self._beta = prof.beta
        return True

    def fit(self, max_evals: int = 5000) -> MixedLM:
        """Exact REML/ML optimum from the current statistics (warm-started); returns self.

        ``max_evals`` bounds the criterion evaluations of one L-BFGS-B run; scheduled
        refits use a smaller budget, so that a young stream whose random effects are
        barely identified (n ≤ q·groups) cannot stall learning.
        """
        self._stats.decay_to_now()
        t0 = time.perf_counter()
        prof, evals = estimate.fit_theta(self._stats, self.reml, self._theta, max_evals=max_evals)
        ok = prof is not None and self._set_theta(prof.theta, prof)
        self.n_refits += 1
        self.last_refit = {
            "n_events": self.n_events,
            "evals": evals,
            "seconds": time.perf_counter() - t0,
            "ok": bool(ok),
        }
        n = self.n_events
        self._next_refit = min(2 * n, n + self.refit_every) if ok else n + 1
        self._next_em = n + self.em_every
        self._refreshed_at = n
        self._record_history("refit")
        return self

    def em_step(self) -> MixedLM:
        """One ML-EM step from the current parameters (docs/math.md §5); returns self."""
        if self._profile is None:
            return self.fit()
        self._stats.decay_to_now()
        prof = estimate.profile(self._stats, self._theta, self.reml) or self._profile
        theta, _, _ = estimate.em_step(self._stats, prof.theta, prof.beta, prof.sigma2)
        self._set_theta(theta)
        self.n_em_steps += 1
        self._next_em = self.n_events + self.em_every
        self._refreshed_at = self.n_events
        self._record_history("em")
        return self

    def refresh(self) -> bool:
        """Run whatever the schedule says is due (refit first, else EM); True if any ran."""
        n = self.n_events
        if n == self._refreshed_at or n == 0:
            return False
        if n >= self._next_refit:
            self.fit(max_evals=SCHEDULED_REFIT_EVALS)
        elif n >= self._next_em:
            self.em_step()
        else:
            return False
        return True

    # -- prediction -----------------------------------------------------------------------
    def _group_row(self, x: Mapping[str, Any]) -> int:
        key = x.get(self._formula.group)
        if key is None:
            return -1
        return self._stats.row(check_key(key, self._formula.group))

    def _decay_factors(self, rows: np.ndarray) -> np.ndarray:
        """Each group's forgetting factor to now (1 without forgetting or if unseen)."""
        st = self._stats
        fac = np.ones(rows.shape[0])
        if st.half_life:
            seen = rows >= 0
            dt = st.now - st.tg[rows[seen]]
            fac[seen] = 2.0 ** (-np.maximum(dt, 0.0) * st.inv_half_life)
        return fac

    def _fallback(self) -> float | None:
        """The prediction before any fit: 0 with no data, else the reference response."""
        self.refresh()
        st = self._stats
        if st.shift is None:
            return 0.0
        return float(st.shift[-1]) if self._profile is None else None

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """Fixed part plus the group's current BLUP (fixed part only for an unseen group).

        Under ``missing="skip"`` a missing feature takes its reference value.
        """
        a = self._A1[0]
        self._reader.features_into(x, a, impute=self._reader.skip)
        r = self._group_row(x)
        fallback = self._fallback()
        if fallback is not None:
            return fallback
        st = self._stats
        f = 1.0
        if st.half_life and r >= 0:
            f = 2.0 ** (-max(st.now - st.tg[r], 0.0) * st.inv_half_life)
        return kernels.predict_one(
            st.S, r, a, st.shift, f, st.P, st.zi, st.xi, st.yi, self._lam, self._beta
        )

    def predict_many(self, X):
        """Predictions for a DataFrame, equal to ``predict_one`` row by row."""
        f = self._formula
        n = len(X)
        A = self._reader.union_columns({c: X[c].to_numpy() for c in X.columns}, n)
        if not self._reader.skip and np.isnan(A).any():
            r, i = np.argwhere(np.isnan(A))[0]
            raise ValueError(f"row {r}: field {f.columns[i]!r}: missing")
        rows = np.full(n, -1, dtype=np.int64)
        if f.group in X.columns:
            for e, key in enumerate(X[f.group].to_numpy()):
                if key is not None and not (isinstance(key, float) and math.isnan(key)):
                    rows[e] = self._stats.row(check_key(key, f.group))
        out = np.empty(n)
        fallback = self._fallback()
        if fallback is not None:
            out[:] = fallback
        else:
            st = self._stats
            fac = self._decay_factors(rows)
            kernels.predict_rows(
                st.S, rows, A, st.shift, fac, st.P, st.zi, st.xi, st.yi, self._lam, self._beta, out
            )
        return pd.Series(out, index=X.index)

    # -- results --------------------------------------------------------------------------
    def snapshot(self, offsets: Mapping[str, int] | None = None, **meta) -> Snapshot:
        """Immutable estimates at the current statistics and parameters.

        β̂ and σ̂ are profiled at the current θ from the current statistics, and every
        group's BLUP and conditional covariance is recomputed. The snapshot also
        carries the exact state, so :meth:`from_snapshot` resumes from it.
        """
        self.refresh()
        st = self._stats
        st.decay_to_now()
        f = self._formula
        prof = None
        if self._theta is not None:
            prof = estimate.profile(st, self._theta, self.reml)
        G = st.n_groups
        if prof is None:
            nan = math.nan
            beta_u = np.full(f.p, nan)
            vcov = np.full((f.p, f.p), nan)
            theta_u = np.full(f.q * (f.q + 1) // 2, nan)
            b, condvar, sigma2, crit = np.zeros((G, f.q)), np.zeros((G, f.q, f.q)), nan, nan
        else:
            self._set_theta(prof.theta, prof)
            lam = self._lam
            B, K = kernels.blups(st.S, G, st.P, f.zi, f.xi, st.yi, lam, prof.beta)
            RXinv = np.linalg.inv(prof.RX)
            beta_u, vcov, theta_u, b, condvar = estimate.unshift(
                st, prof.beta, prof.sigma2 * RXinv @ RXinv.T, prof.theta, B, prof.sigma2 * K
            )
            sigma2, crit = prof.sigma2, prof.criterion
        lam_u = estimate.lam_of(theta_u, f.q)
        diag = np.diag(lam_u) if prof is not None else np.ones(f.q)
        return Snapshot(
            formula=self.formula,
            method=self.method,
            fixef=dict(zip(f.fixed, beta_u)),
            fixef_se=dict(zip(f.fixed, np.sqrt(np.diag(vcov)))),
            re_cov=sigma2 * lam_u @ lam_u.T,
            sigma=math.sqrt(sigma2),
            theta=theta_u,
            criterion=crit,
            n_obs=st.n_obs,
            singular=bool(np.any(diag < estimate.SINGULAR_TOL)),
            converged=prof is not None,
            n_events=self.n_events,
            keys=st.keys,
            b=b,
            condvar=condvar,
            group_n=st.S[:G, 0],
            group_ybar=self._group_ybar(),
            fixef_vcov=vcov,
            history=self._history,
            offsets=offsets,
            meta={"created": time.time(), **meta},
            state=self._state(),
        )

    def _group_ybar(self) -> np.ndarray:
        """Each group's raw (weighted, decayed) mean response, from the statistics."""
        st, f = self._stats, self._formula
        G = st.n_groups
        if INTERCEPT not in f.columns or st.shift is None:
            return np.full(G, np.nan)
        col = st.P[f.columns.index(INTERCEPT), st.yi]
        with np.errstate(divide="ignore", invalid="ignore"):
            return st.S[:G, col] / st.S[:G, 0] + st.shift[-1]

    def _record_history(self, kind: str) -> None:
        """Append a small model-level record (bounded: thinned by half when full)."""
        prof = self._profile
        if prof is None:
            return
        q = self._formula.q
        beta, _, theta, _, _ = estimate.unshift(
            self._stats,
            prof.beta,
            np.zeros((len(prof.beta),) * 2),
            prof.theta,
            np.zeros((0, q)),
            np.zeros((0, q, q)),
        )
        lam = estimate.lam_of(theta, q)
        self._history.append(
            {
                "kind": kind,
                "n_events": self.n_events,
                "time": time.time(),
                "sigma": math.sqrt(prof.sigma2),
                "re_cov": (prof.sigma2 * lam @ lam.T).tolist(),
                "fixef": dict(zip(self._formula.fixed, beta.tolist())),
            }
        )
        if len(self._history) > HISTORY_MAX:
            self._history = self._history[::2]

    def _state(self) -> dict[str, Any]:
        st = self._stats
        G = st.n_groups
        return {
            "S": st.S[:G].copy(),
            "tg": st.tg[:G].copy() if st.half_life else np.zeros(0),
            "part": st.part[:G].astype(float),
            "shift": st.shift.copy() if st.shift is not None else np.zeros(0),
            "theta_shifted": self._theta.copy() if self._theta is not None else np.zeros(0),
            "now": st.now if math.isfinite(st.now) else None,
            "half_life": self.half_life,
            "time_key": self.time_key,
            "missing": self.missing,
            "em_every": self.em_every,
            "refit_every": self.refit_every,
            "n_skipped": self.n_skipped,
            "n_refits": self.n_refits,
            "history": self._history,
        }

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> MixedLM:
        """A model that continues exactly where the snapshot's state left off."""
        return cls.from_snapshots([snap])

    @classmethod
    def from_snapshots(cls, snaps: list[Snapshot]) -> MixedLM:
        """One model from the states of several snapshots, e.g. of engines that each own
        some partitions of a topic: statistics are additive (docs/math.md §2), so the merged
        model fits exactly as one engine that read every partition would."""
        models = [cls._from_state(s) for s in snaps]
        m = models[0]
        if len(models) > 1:
            for other in models[1:]:
                if (other.formula, other.method) != (m.formula, m.method):
                    raise ValueError("only snapshots of the same formula and method merge")
            m._stats = GroupStats.merge([o._stats for o in models])
            m.n_events = sum(o.n_events for o in models)
            m.n_skipped = sum(o.n_skipped for o in models)
            m._theta, m._profile = None, None  # θ̃ is per shift: refit from Λ = I
        m._refreshed_at = m.n_events
        m._next_refit = m.n_events + m.refit_every if m._profile is not None else 1
        m._next_em = m.n_events + m.em_every
        return m

    @classmethod
    def _from_state(cls, snap: Snapshot) -> MixedLM:
        s = snap.state
        if s is None:
            raise ValueError("this snapshot carries no state to resume from")
        m = cls(
            snap.formula,
            snap.method,
            half_life=s["half_life"],
            time_key=s["time_key"],
            missing=s["missing"],
            em_every=s["em_every"],
            refit_every=s["refit_every"],
        )
        st = m._stats
        G = snap.n_groups
        st._grow(max(G, 64))
        st.S[:G] = s["S"]
        if st.half_life:
            st.tg[:G] = s["tg"]
        if "part" in s:
            st.part[:G] = s["part"]
        st.keys = list(snap.keys)
        st.index = {k: i for i, k in enumerate(st.keys)}
        st.shift = np.array(s["shift"]) if len(s["shift"]) else None
        st.now = s["now"] if s["now"] is not None else -math.inf
        m.n_events = snap.n_events
        m.n_skipped = s["n_skipped"]
        m.n_refits = s["n_refits"]
        m._history = [dict(h) for h in s.get("history", [])]
        if len(s["theta_shifted"]):
            m._set_theta(np.array(s["theta_shifted"]))
        return m
