"""MixedLM: the river face of the streaming mixed-model core.

Learning only accumulates statistics (O(1) per event). Parameters are refreshed on a
schedule driven by cost: a warm-started exact REML/ML refit whenever its amortised cost
per event since the last one falls under ``refresh_budget`` microseconds (and whenever
the stream has doubled, so a young stream refits at 1, 2, 4, … events), and a cheap
ML-EM step in between under half that budget. Costs come from a deterministic model of
the work (passes over the groups), not the clock, so two identical streams refresh
identically. With few groups refits are cheap and frequent; with many, rare. Fixed
counts (``refit_every``, ``em_every``) override it. The refresh runs lazily, when a
prediction or snapshot needs the parameters, so ``learn_many`` and a ``learn_one`` loop
reach the same state.
A prediction always recomputes its group's BLUP from that group's current statistics,
so every event moves its group's prediction at once.

"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from river import base

from streamlmm import checks, estimate, kernels
from streamlmm.design import Design
from streamlmm.keys import MAX_KEY_LEN, text_problem
from streamlmm.reservoir import CAPACITY, Reservoir, priority_one, weighted_quantiles
from streamlmm.rows import RowReader
from streamlmm.snapshot import Snapshot
from streamlmm.stats import GroupStats, check_key
from streamlmm.values import MAX_ABS, overflow_message

__all__ = ["MixedLM"]

METHODS = ("REML", "ML")
# A scheduled refit (inside predict_one/snapshot) stops after this many passes and
# continues warm at the next one, so no single call stalls; fit() itself runs to the end.
SCHEDULED_REFIT_EVALS = 12
# The schedule's cost model, µs per pass over the groups: overhead + per group. Measured
# on the benchmark machine (scripts/bench_core.py); only the schedule depends on it.
PASS_COST_US = (150.0, 0.1)
EM_PASS_COST_US = (400.0, 0.25)  # a whole em_step(): set-up, two profiles, adopt
REFRESH_BUDGET_US = 100.0  # default refresh_budget: µs of refresh work per event, amortised
HISTORY_MAX = 256  # model-level records kept for trajectories
_LO = -MAX_ABS  # the fast paths' lower bound, without negating MAX_ABS per value


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
    refresh_budget
        Microseconds of refresh work per event, amortised: an exact refit runs when its
        estimated cost spread over the events since the last one fits this budget, an
        EM step when it fits half of it.
    em_every
        Events between ML-EM steps instead (``None``: the budget decides).
    refit_every
        Events between exact (warm-started) REML/ML refits instead (``None``: the
        budget decides).
    threads
        Threads for the sums over groups (``None``: ``$STREAMLMM_THREADS``, else every
        core); they run in parallel only with enough groups to pay
        (:data:`~streamlmm.estimate.PARALLEL_MIN_GROUPS`).
    levels
        Factor levels by field, reference first (``{"severity": ["mild", ...]}``); a
        string field not listed takes its levels in order of appearance.
    reservoir
        How many distinct events the model keeps as a sample of the stream (the same in
        any arrival order; :mod:`streamlmm.reservoir`): the residual quantiles of the
        summary, the residual pictures, brms's default priors and the predictive checks
        come from it, exactly while the stream fits in it. ``0`` keeps none.

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
        em_every: int | None = None,
        refit_every: int | None = None,
        threads: int | None = None,
        levels: Mapping[str, list[str]] | None = None,
        refresh_budget: float = REFRESH_BUDGET_US,
        reservoir: int = CAPACITY,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for name, v in (("em_every", em_every), ("refit_every", refit_every)):
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not (isinstance(refresh_budget, (int, float)) and refresh_budget > 0):
            raise ValueError(f"refresh_budget must be a positive number, got {refresh_budget!r}")
        if threads is None and os.environ.get("STREAMLMM_THREADS"):
            threads = int(os.environ["STREAMLMM_THREADS"])
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.formula = formula
        self.method = method
        self.half_life = half_life
        self.time_key = time_key
        self.missing = missing
        self.em_every = em_every
        self.refit_every = refit_every
        self.threads = threads
        self.refresh_budget = refresh_budget
        self.levels = levels
        if not (isinstance(reservoir, int) and reservoir >= 0):
            raise ValueError(f"reservoir must be an int >= 0, got {reservoir!r}")
        self.reservoir = reservoir
        self._design = Design(formula, levels)
        # once per process: no learn_one/predict_one below stalls on loading a kernel
        kernels.preload(sum(r.intercept + len(r.terms) for r in self._design.formula.random_terms))
        self._formula = self._design.formula
        self._reader = RowReader(self._design, time_key, missing)
        self._stats = GroupStats(self._design, half_life)
        self._par: _Params | None = None  # parameters in the last fit's coordinates
        self._lam_u: np.ndarray | None = None  # Λ in the user's coordinates (warm starts)
        self._param_source: tuple[str, int] = ("", -1)
        self._last_good: dict[str, Any] | None = None  # last finite snapshot estimates
        self._colinfo: dict[str, Any] = {}
        self.opt_summary: estimate.OptSummary | None = None
        self.n_events = 0
        self.n_skipped = 0
        self.n_refits = 0
        self.n_em_steps = 0
        self.last_refit: dict[str, Any] = {}
        self._history: list[dict[str, Any]] = []
        self._next_refit = 1
        self._next_em = math.inf
        self._refreshed_at = -1
        self._res = Reservoir(reservoir) if reservoir else None
        self._fast1 = None  # learn_one's fast path (see _fast_layout)
        self._fastp = None  # predict_one's fast path (see _predict_layout)
        self._coefs: dict[str | int, _Coefs] = {}  # predict_one's per-group cache
        self._blk = np.empty(0)  # predict_one scratch, sized by the parameters' q and p
        self._b1 = np.empty(0)

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
        fast = self._fast1
        if fast is not None and w == 1.0 and type(y) is float and _LO <= y <= MAX_ABS:
            # the common event of a plain numeric formula: the same rules as the general
            # path below (which handles everything else), without its calls
            group, direct, a, st, coefs, res, plan = fast
            key = x.get(group)
            if type(key) is int or (type(key) is str and len(key) <= MAX_KEY_LEN):
                for i, c in direct:
                    v = x.get(c)
                    if type(v) is float and _LO <= v <= MAX_ABS:
                        a[i] = v
                    else:
                        break
                else:
                    r = st.index.get(key)
                    if r is None:
                        if type(key) is str and not key.isascii() and text_problem(key):
                            return self._learn_one(x, y, w)  # refuses it, naming the field
                        r = st._new_row(key)
                        if res is not None:
                            res.new_key(r, key)
                    if res is None:
                        kernels.accumulate_unit(st.M, r, a, y, st.vi, st.P)
                    else:
                        prio = kernels.accumulate_unit_sampled(
                            st.M, r, a, y, st.vi, st.P, res.khash, plan
                        )
                        res.n_seen += 1.0
                        if prio <= res.threshold:
                            res._add(prio, r, a, y, 1.0)
                    coefs.pop(key, None)
                    self.n_events += 1
                    return
        self._learn_one(x, y, w)

    def _fast_layout(self):
        """What :meth:`learn_one`'s fast path needs, or ``None`` when it does not apply:
        plain numeric columns known, the response a plain field, no time key or forgetting."""
        d = self._design
        if (
            d.plain is None
            or not self._formula.response_expr.is_field
            or self.time_key is not None
            or self.half_life is not None
            or d.k != self._stats.k
        ):
            return None
        if self._reader.a.shape[0] < d.k:
            self._reader.a = np.empty(d.k)
        a = self._reader.a
        for i in d.ones:
            a[i] = 1.0
        res = self._res
        if res is not None:
            res.sync_keys(self._stats.keys)
            res.widen(d.k)
        plan = res.plan_of(d) if res is not None else None
        return self._formula.group, d.plain, a, self._stats, self._coefs, res, plan

    def _learn_one(self, x: Mapping[str, Any], y: float, w: float) -> None:
        reader = self._reader
        wt = reader.weight(w)
        t = reader.time(x) if self.time_key is not None else float(self.n_events + 1)
        if wt == 0.0:
            return
        design = self._design
        before = design.to_state() if wt > 1.0 else None
        key = reader.read(x, y)
        if key is None:
            self.n_skipped += 1
            return
        a = reader.a
        if wt > 1.0:  # |v| ≤ MAX_ABS, so only a weight above 1 can overflow w·v·v'
            try:
                self._check_products(a[None, : design.k], np.array([reader.y]), np.array([wt]))
            except ValueError:
                self._restore_design(before)
                raise
        if design.k != self._stats.k:
            self._widen()
        self._stats.add_one(key, a, reader.y, wt, t)
        self._coefs.pop(key, None)
        self.n_events += 1
        res = self._res
        if res is not None:
            st = self._stats
            res.sync_keys(st.keys)
            res.widen(design.k)
            r = st.index[key]
            prio = priority_one(res.khash[r], a, reader.y, res.plan_of(design))
            res.offer_one(prio, r, a[: design.k], reader.y, wt)
        if self._fast1 is None:
            self._fast1 = self._fast_layout()

    def _restore_design(self, before: dict[str, Any]) -> None:
        """Put the design back to ``before`` if a failed call taught it anything."""
        if self._design.to_state() != before:
            self._set_design(Design.from_state(self.formula, before))

    def _set_design(self, design: Design) -> None:
        """Adopt ``design`` (a restored one: a failed batch must leave no level behind)."""
        self._design = design
        self._formula = design.formula
        self._fast1 = None
        self._drop_predictions()
        self._reader.design = design
        self._stats.spec = design

    def _widen(self) -> None:
        """New union columns (a factor level seen for the first time): widen the
        statistics with exact zeros, and the fit's centre with zeros too."""
        k_old = self._stats.k
        self._stats.widen(self._design)
        if self._res is not None:
            self._res.widen(self._stats.k)
        self._fast1 = None
        self._drop_predictions()
        if self._par is not None:
            c = self._par.c
            grown = np.concatenate([c[:k_old], np.zeros(self._stats.k - k_old), c[k_old:]])
            self._par = self._par._replace(c=grown)

    def _check_products(self, A, y, w) -> None:
        """``ValueError`` naming the row and field whose weighted products would overflow."""
        e = self._stats.check(A, y, w, self._design.columns)
        if e < 0:
            return
        names = [*self._design.columns, self._formula.response_field]
        where = f"row {e}: " if A.shape[0] > 1 else ""
        raise ValueError(where + overflow_message(names, np.append(A[e], y[e]), w[e]))

    def learn_many(self, X, y, w=None) -> None:
        """Accumulate a batch (pandas DataFrame and Series), exactly as a ``learn_one`` loop.

        With ``missing="raise"`` one bad row rejects the whole batch (``ValueError``
        naming the row and field) and nothing changes; with ``"skip"`` rows with a
        missing value are dropped and counted in ``n_skipped``.
        """
        cols, yv, wv = _batch_columns(X, y, w, self._formula.group)
        n = len(yv)
        before = self._design.to_state()
        try:
            codes, uniques, A, yk, wk, tk, kept = self._reader.read_columns(cols, yv, wv)
            self._check_products(A, yk, wk)
        except ValueError:
            self._restore_design(before)
            raise
        if self._design.k != self._stats.k:
            self._widen()
        self.n_skipped += n - kept.shape[0]
        # new groups get rows in the order of their first kept event, as in a learn_one loop
        if kept.shape[0] == n and (wv is None or (wk > 0).all()):
            urows = self._stats.rows(uniques)  # factorize orders by first appearance
            touched = uniques
        else:
            idx = _first_order(codes[wk > 0])
            touched = [uniques[j] for j in idx.tolist()]
            urows = np.full(len(uniques), -1, dtype=np.int64)
            urows[idx] = self._stats.rows(touched)
        self._accumulate(urows[codes], A, yk, wk, tk, touched)

    def learn_batch(self, keys, A, y, w, t=None) -> None:
        """Accumulate a batch that is already validated (the stream engine's path).

        ``keys`` are checked group keys, ``A`` the union columns (``formula.columns``),
        ``t`` the event times (``None`` without ``time_key``).
        """
        self._check_products(A, y, w)
        if self._design.k != self._stats.k:
            self._widen()
        keep = w > 0
        rows = np.full(len(keys), -1, dtype=np.int64)
        idx = np.flatnonzero(keep)
        touched = [keys[i] for i in idx]
        rows[idx] = self._stats.rows(touched)
        self._accumulate(rows, A, y, w, t, touched)

    def _accumulate(self, rows, A, y, w, t, keys: list) -> None:
        """Add validated events into their group rows; ``keys`` are the groups whose
        statistics change (repeats allowed), whose cached predictions are dropped."""
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
        self._forget_groups(keys)
        self.n_events += n
        res = self._res
        if res is not None:
            res.sync_keys(self._stats.keys)
            res.offer(rows, A, y, w, self._design)

    def _forget_groups(self, keys: list) -> None:
        """Drop the cached prediction coefficients of groups ``keys`` (their statistics
        changed); all of them at once when that is cheaper."""
        coefs = self._coefs
        if len(keys) >= len(coefs):
            coefs.clear()
        else:
            for key in keys:
                coefs.pop(key, None)

    def _drop_predictions(self) -> None:
        """Forget predict_one's fast path and every cached coefficient (new parameters,
        design or statistics)."""
        self._fastp = None
        self._coefs.clear()

    def _predict_rows(self, rows: np.ndarray, A: np.ndarray) -> np.ndarray:
        """Predictions for union values ``A`` in group rows ``rows`` (-1: unseen)."""
        st, par = self._stats, self._par
        n = rows.shape[0]
        fac = np.array([st.decay_factor(r) for r in rows]) if st.half_life else np.ones(n)
        out = np.empty(n)
        kernels.predict_rows(
            st.M, rows, A, par.c, fac, st.vpos, par.zi, par.xi, st.k, st.P, par.lam, par.beta, out
        )
        return out

    # -- parameters -----------------------------------------------------------------------
    @property
    def reml(self) -> bool:
        return self.method == "REML"

    def _problem(self) -> estimate.Problem:
        prob, self._colinfo = estimate.make_problem(
            self._stats, self._design, self.reml, threads=self.threads
        )
        return prob

    def _warm_theta(self, prob: estimate.Problem) -> np.ndarray | None:
        if self._lam_u is None or self._lam_u.shape != (prob.q, prob.q):
            return None
        return prob.theta(prob.from_user_lam(self._lam_u))

    def _adopt(self, prob: estimate.Problem, prof: estimate.Profile, source: str) -> bool:
        """Take the parameters at ``prof`` if they are finite; a failed step never
        replaces good parameters."""
        lam = prob.lam(prof.theta)
        if not (np.all(np.isfinite(lam)) and np.all(np.isfinite(prof.beta))):
            return False
        if not (math.isfinite(prof.sigma2) and prof.sigma2 > 0):
            return False
        self._par = _Params(prob.c, prob.xi, prob.zi, lam, prof.beta, prof.sigma2)
        q, p = prob.q, prob.p
        self._blk, self._b1 = np.empty(q * q + q * p + q), np.empty(q)
        self._lam_u = prob.to_user_lam(lam)
        self._param_source = (source, self.n_events)
        self._drop_predictions()  # new parameters: every cached coefficient is stale
        return True

    def fit(self, max_evals: int = 500) -> MixedLM:
        """Exact REML/ML optimum from the current statistics (warm-started); returns self.

        The optimizer summary is :attr:`opt_summary`; lme4's checks of the result are
        emitted as :class:`~streamlmm.checks.FitWarning` when a snapshot is taken. If
        the fit fails, the previous parameters stay in place.
        """
        t0 = time.perf_counter()
        prob = self._problem()
        prof, summary = estimate.fit_theta(prob, self._warm_theta(prob), max_evals=max_evals)
        ok = prof is not None and self._adopt(prob, prof, "refit")
        if prof is not None and not ok:
            summary.converged = False
            summary.return_code = "non-finite estimates"
            summary.messages.append("the fit gave non-finite estimates; kept the previous ones")
        summary.n_events = self.n_events
        self.opt_summary = summary
        self.n_refits += 1
        self.last_refit = {
            "n_events": self.n_events,
            "evals": summary.evals,
            "seconds": time.perf_counter() - t0,
            "ok": bool(ok),
        }
        n = self.n_events
        passes = summary.evals + summary.em_steps
        gap = self._gap(passes, PASS_COST_US, 1.0, self.refit_every) if ok else 1
        if self.refit_every is None:  # and whenever the stream has doubled (a young one)
            gap = min(gap, max(n, 1))
        self._next_refit = n + gap
        self._next_em = n + self._gap(1, EM_PASS_COST_US, 0.5, self.em_every)
        self._refreshed_at = n
        self._fastp = None  # the schedule moved, and predict_one's horizon with it
        self._record_history("refit")
        return self

    def em_step(self) -> MixedLM:
        """One ML-EM step from the current parameters (docs/math.md §5); returns self."""
        if self._par is None:
            return self.fit()
        prob = self._problem()
        theta = self._warm_theta(prob)
        prof = prob.profile(theta) if theta is not None else None
        if prof is not None:
            theta_new, _, _ = estimate.em_step(prob, prof.theta, prof.beta, prof.sigma2)
            new = prob.profile(theta_new)
            if new is not None:
                self._adopt(prob, new, "em")
        self.n_em_steps += 1
        self._next_em = self.n_events + self._gap(1, EM_PASS_COST_US, 0.5, self.em_every)
        self._refreshed_at = self.n_events
        self._fastp = None  # the schedule moved, and predict_one's horizon with it
        self._record_history("em")
        return self

    def _gap(self, passes: int, cost: tuple[float, float], share: float, fixed) -> int:
        """Events until the next refresh of a kind: ``fixed`` if set, else until the
        estimated cost (µs) of this one, spread over them, fits ``share`` of the budget."""
        if fixed is not None:
            return fixed
        us = passes * (cost[0] + cost[1] * self._stats.n_groups)
        return max(1, math.ceil(us / (share * self.refresh_budget)))

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

    def _fallback(self) -> float | None:
        """The prediction before any fit: 0 with no data, else the first response seen."""
        self.refresh()
        if self._par is not None:
            return None
        st = self._stats
        if st.n_groups == 0:
            return 0.0
        w = st.counts()
        return float(np.average(st.means()[:, -1], weights=w)) if w.sum() > 0 else 0.0

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """Fixed part plus the group's current BLUP (fixed part only for an unseen group).

        Under ``missing="skip"`` a missing feature takes its reference value.
        """
        fast = self._fastp
        if fast is not None:
            # a plain numeric formula with parameters and no refresh due: the group's
            # cached ``ŷ = K + Σ b·x`` (dropped whenever its statistics change)
            group, until, coefs = fast
            key = x.get(group)
            if self.n_events < until and (type(key) is int or type(key) is str):
                coef = coefs.get(key) or self._cache_coefficients(key)
                if coef is not None:
                    yhat, terms = coef
                    for c, b in terms:
                        v = x.get(c)
                        if type(v) is not float or not _LO <= v <= MAX_ABS:
                            break
                        yhat += b * v
                    else:
                        return yhat
        return self._predict_one(x)

    def _predict_one(self, x: Mapping[str, Any]) -> float:
        """:meth:`predict_one` through the kernel: refreshes first if due, validates
        ``x`` (raising ``ValueError`` as ``learn_one`` does), imputes under "skip"."""
        r = self._group_row(x)  # a bad key is refused, with parameters or without
        fallback = self._fallback()
        if fallback is not None:
            return fallback
        a = self._reader.features(x, impute=self._reader.skip)
        fast = self._fastp
        if fast is None or self.n_events >= fast[1]:
            self._fastp = self._predict_layout()
        return self._predict_union(a, r)

    def _predict_layout(self) -> tuple[str, float, dict[str | int, _Coefs]] | None:
        """What :meth:`predict_one`'s fast path needs, or ``None`` when it does not apply
        (a plain numeric design, no forgetting, parameters): the group field, the event
        count at which a refresh is due, and the per-group coefficient cache."""
        d = self._design
        if d.plain is None or self.half_life is not None or self._par is None:
            return None
        if d.k != self._stats.k:
            return None
        return self._formula.group, min(self._next_refit, self._next_em), self._coefs

    def _cache_coefficients(self, key: str | int) -> _Coefs | None:
        """The coefficients of group ``key`` (int or str), cached if the group is seen;
        ``None`` for a key :meth:`_predict_one` must reject (too long)."""
        r = self._stats.index.get(key)
        if r is None:
            if type(key) is str and (
                len(key) > MAX_KEY_LEN or (not key.isascii() and text_problem(key))
            ):
                return None
            return self._unseen_coefficients()
        coef = self._coefs[key] = self._group_coefficients(r)
        return coef

    def _unseen_coefficients(self) -> _Coefs:
        """The fixed part's coefficients (an unseen group), cached under a key no group
        can have."""
        coef = self._coefs.get(_UNSEEN)
        if coef is None:
            coef = self._coefs[_UNSEEN] = self._group_coefficients(-1)
        return coef

    def _group_coefficients(self, r: int) -> _Coefs:
        """``(K, ((field, c_f), …))`` with ``ŷ = K + Σ_f c_f x_f`` for group row ``r``
        (-1: unseen), from ``ŷ = c_y + Σ (a_x − c_x)β̃ + Σ (a_z − c_z)b̃``, the intercept
        folded into K."""
        st, par = self._stats, self._par
        coef = np.zeros(st.k)
        coef[par.xi] += par.beta
        if r >= 0:
            blk = self._blk
            st.group_blocks(r, par.c, par.zi, par.xi, blk)
            kernels.predict_group(
                blk, par.zi.shape[0], par.xi.shape[0], par.lam, par.beta, self._b1
            )
            np.add.at(coef, par.zi, self._b1)
        K = float(par.c[st.k] - coef @ par.c[: st.k])
        ones = list(self._design.ones)
        K += float(coef[ones].sum())
        return K, tuple((c, float(coef[i])) for i, c in self._design.plain)

    def _predict_union(self, a: np.ndarray, r: int) -> float:
        """The prediction for union values ``a`` in group row ``r`` (-1: unseen)."""
        st, par = self._stats, self._par
        return kernels.predict_event(
            st.M,
            r,
            a,
            par.c,
            st.decay_factor(r),
            st.vpos,
            par.zi,
            par.xi,
            st.k,
            st.P,
            par.lam,
            par.beta,
            self._blk,
            self._b1,
        )

    def predict_many(self, X):
        """Predictions for a DataFrame, equal to ``predict_one`` row by row."""
        import pandas as pd

        f = self._formula
        n = len(X)
        cols = {c: X[c].to_numpy() for c in X.columns}
        A = self._reader.union_columns(cols, n)
        holes = np.flatnonzero(np.isnan(A).any(axis=1))
        if holes.shape[0] and not self._reader.skip:
            r = int(holes[0])
            try:
                self.predict_one({c: v[r] for c, v in cols.items()})
            except ValueError as e:
                raise ValueError(f"row {r}: {e}") from None
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
            out = self._predict_rows(rows, A)
        for r in holes:  # a missing feature (missing="skip") takes its centre value
            out[r] = self.predict_one({c: v[r] for c, v in cols.items()})
        return pd.Series(out, index=X.index)

    # -- results --------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Groups seen (every group with a row of statistics), refit or not."""
        return self._stats.n_groups

    @property
    def n_unseen_levels(self) -> int:
        """Predictions (rows) that met a factor level not learned yet, and so took that
        level's effect as 0, as an unseen group's is (e.g. river's ``predict_one`` before
        the level's first ``learn_one``)."""
        return self._design.unseen_level_rows

    @property
    def converged(self) -> bool:
        """True when the current parameters are a verified optimum of the current data:
        an exact refit (not an EM step) at this event count that passed lme4's checks."""
        s = self.opt_summary
        return (
            s is not None
            and s.converged
            and self._param_source == ("refit", self.n_events)
            and s.n_events == self.n_events
        )

    def snapshot(self, offsets: Mapping[str, int] | None = None, **meta) -> Snapshot:
        """Immutable estimates at the current statistics and parameters.

        β̂ and σ̂ are profiled at the current θ from the current statistics, and every
        group's BLUP and conditional covariance is recomputed. When that is not possible
        (too few events), the last finite estimates are kept and the snapshot says it is
        not converged. lme4's checks are emitted as :class:`~streamlmm.checks.FitWarning`
        and recorded in ``warnings``. The snapshot also carries the exact state, so
        :meth:`from_snapshot` resumes from it.
        """
        self.refresh()
        st, f = self._stats, self._design
        G = st.n_groups
        est = None
        prob = self._problem() if G else None
        if prob is not None and self._lam_u is not None:
            theta = self._warm_theta(prob)
            pr = prob.profile(theta) if theta is not None else None
            if pr is not None:
                est = estimate.estimates_at(prob, pr)
                if not (np.all(np.isfinite(est.b)) and math.isfinite(est.sigma2)):
                    est = None
        if est is not None:
            good = {
                "names": f.fixed,
                "fixef": est.fixef,
                "vcov": est.vcov,
                "theta": est.theta,
                "re_cov": est.re_cov,
                "sigma2": est.sigma2,
                "criterion": est.criterion,
                "keep": est.keep,
            }
            self._last_good = good
            b, condvar = est.b, est.condvar
        else:
            good = _reindexed(self._last_good, f.fixed)
            if good is None:
                nan = math.nan
                good = {
                    "fixef": np.full(f.p, nan),
                    "vcov": np.full((f.p, f.p), nan),
                    "theta": np.full(len(estimate.theta_index(f.blocks, f.q)[0]), nan),
                    "re_cov": np.full((f.q, f.q), nan),
                    "sigma2": nan,
                    "criterion": nan,
                    "keep": np.ones(f.p, dtype=bool),
                    "names": f.fixed,
                }
            b = np.zeros((G, f.q))
            condvar = np.broadcast_to(good["re_cov"], (G, f.q, f.q)).copy()
        lam_u = np.zeros((f.q, f.q))
        lam_u[estimate.theta_index(f.blocks, f.q)] = good["theta"]
        singular = bool(np.any(np.diag(lam_u) < estimate.SINGULAR_TOL))
        dropped = tuple(name for name, k in zip(f.fixed, good["keep"]) if not k)
        warns = checks.fit_messages(
            group=self._formula.group,
            n_obs=st.n_obs,
            n_groups=G,
            q=f.q,
            re_names=f.random,
            dropped=dropped,
            singular=singular and est is not None,
            summary=self.opt_summary if self._param_source[0] == "refit" else None,
            fixed_sd=self._colinfo.get("sd", {}),
        )
        if est is None and G:
            warns.append(
                "no finite estimates at the current data (too few observations, or the "
                "criterion is undefined): the snapshot keeps the last finite ones"
            )
        checks.warn_all(warns)
        identified = not any("refuses" in w for w in warns)
        return Snapshot(
            formula=self.formula,
            method=self.method,
            fixef=dict(zip(f.fixed, good["fixef"])),
            fixef_se=dict(zip(f.fixed, np.sqrt(np.diag(good["vcov"])))),
            fixef_vcov=good["vcov"],
            re_cov=good["re_cov"],
            sigma=math.sqrt(good["sigma2"]),
            theta=good["theta"],
            criterion=good["criterion"],
            n_obs=st.n_obs,
            singular=singular,
            converged=bool(est is not None and self.converged and identified),
            n_events=self.n_events,
            keys=st.keys,
            b=b,
            condvar=condvar,
            group_n=st.counts(),
            group_ybar=self._group_ybar(),
            re_names=f.random,
            dropped=dropped,
            warnings=warns,
            optinfo=self.opt_summary.to_dict() if self.opt_summary is not None else {},
            history=self._history,
            resid_quantiles=self._residual_quantiles(est, good),
            offsets=offsets,
            meta={"created": time.time(), **meta},
            design=f.to_state(),
            state=self._state(),
        )

    def _residual_quantiles(self, est, good) -> dict[str, float]:
        """lme4's "Scaled residuals": quantiles of ``(y − x'β̂ − z'b̂_g)/σ̂`` over the
        reservoir's events at these estimates (exact while the stream fits in it), with
        how many events they cover (``events``) out of the stream's (``of``)."""
        res = self._res
        if res is None or res.size == 0 or est is None:
            return {}
        return residual_quantiles(res, self._design, est.fixef, est.b, math.sqrt(good["sigma2"]))

    def _group_ybar(self) -> np.ndarray:
        """Each group's raw (weighted, decayed) mean response, from the statistics."""
        return self._stats.means()[:, -1].copy()

    def _record_history(self, kind: str) -> None:
        """Append a small model-level record (bounded: thinned by half when full)."""
        par = self._par
        if par is None or self._lam_u is None:
            return
        self._history.append(
            {
                "kind": kind,
                "n_events": self.n_events,
                "time": time.time(),
                "sigma": math.sqrt(par.sigma2),
                "re_cov": (par.sigma2 * self._lam_u @ self._lam_u.T).tolist(),
            }
        )
        if len(self._history) > HISTORY_MAX:
            self._history = self._history[::2]

    def _state(self) -> dict[str, Any]:
        st = self._stats.to_state()
        return {
            **st,
            "design": self._design.to_state(),
            "lam_user": self._lam_u.ravel().copy() if self._lam_u is not None else np.zeros(0),
            "time_key": self.time_key,
            "missing": self.missing,
            "levels": self.levels,
            "em_every": self.em_every,
            "refit_every": self.refit_every,
            "refresh_budget": self.refresh_budget,
            "n_skipped": self.n_skipped,
            "n_refits": self.n_refits,
            "history": self._history,
            **(self._res.to_state() if self._res is not None else {"res_capacity": 0}),
        }

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> MixedLM:
        """A model that continues exactly where the snapshot's state left off."""
        return cls.from_snapshots([snap])

    @classmethod
    def from_snapshots(cls, snaps: list[Snapshot]) -> MixedLM:
        """One model from the states of several snapshots, e.g. of engines that each own
        some partitions of a topic: statistics are additive (docs/design.md), so the
        merged model fits exactly as one engine that read every partition would."""
        models = [cls._from_state(s) for s in snaps]
        m = models[0]
        if len(models) > 1:
            for other in models[1:]:
                if (other.formula, other.method) != (m.formula, m.method):
                    raise ValueError("only snapshots of the same formula and method merge")
            m._stats = GroupStats.merge([o._stats for o in models])
            if m._res is not None:
                index = m._stats.index
                m._res = Reservoir.merge(
                    [
                        (o._res, np.array([index[key] for key in o._stats.keys], np.int64))
                        for o in models
                        if o._res is not None
                    ],
                    m._stats.k,
                )
            m.n_events = sum(o.n_events for o in models)
            m.n_skipped = sum(o.n_skipped for o in models)
        m._refreshed_at = m.n_events
        m._next_refit = m.n_events + (
            m._gap(20, PASS_COST_US, 1.0, m.refit_every) if m._lam_u is not None else 1
        )
        m._next_em = m.n_events + m._gap(1, EM_PASS_COST_US, 0.5, m.em_every)
        if m._lam_u is not None and m.n_events:
            m._restore_params()
        return m

    def load_statistics(self, design: Design, stats: GroupStats, n_events: int) -> MixedLM:
        """Replace the design and the statistics wholesale; returns self.

        The scale-out fitter (``stream/fitter.py``) keeps every group's latest row from
        the state topic and fits through this model, so there is one path through the
        core. The warm start (Λ) is kept; the next :meth:`fit` or :meth:`snapshot`
        works on the new statistics. ``stats`` must be laid out for ``design.columns``.
        """
        if tuple(stats.columns) != tuple(design.columns):
            raise ValueError("the statistics are not laid out for the design's columns")
        self._set_design(design)
        self._stats = stats
        stats.spec = design
        if self._res is not None:  # the statistics came without events
            self._res = Reservoir(self._res.capacity)
        self._par = None  # parameters of other statistics: refit or restore first
        self.n_events = int(n_events)
        return self

    def _restore_params(self) -> None:
        """Parameters at the restored Λ (profiled β, σ²) for predictions."""
        prob = self._problem()
        theta = self._warm_theta(prob)
        pr = prob.profile(theta) if theta is not None else None
        if pr is not None:
            self._adopt(prob, pr, "restored")

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
            levels=s.get("levels"),
            refresh_budget=s.get("refresh_budget", REFRESH_BUDGET_US),
            reservoir=int(s.get("res_capacity", CAPACITY)),
        )
        m._set_design(Design.from_state(snap.formula, s["design"]))
        m._stats = GroupStats.from_state(m._design, snap.keys, s)
        if m._res is not None:
            m._res = Reservoir.from_state(s, m._stats.k)
        m.n_events = snap.n_events
        m.n_skipped = s["n_skipped"]
        m.n_refits = s["n_refits"]
        m._history = [dict(h) for h in s.get("history", [])]
        lam = np.asarray(s["lam_user"], dtype=float)
        if lam.size:
            m._lam_u = lam.reshape(m._design.q, m._design.q)
        return m

    def learn_coded(self, uniques, codes, A, y, w, t=None) -> None:
        """Accumulate a validated batch whose group keys are coded (the stream engine's
        path): event ``i`` is in group ``uniques[codes[i]]``. ``uniques`` may be a list
        that only grows between calls (a decoder's key table): the row of each code is
        kept, so only keys new to the model are looked up. Otherwise as
        :meth:`learn_batch`: new groups get rows in the order of their first event of
        positive weight.
        """
        self._check_products(A, y, w)
        if self._design.k != self._stats.k:
            self._widen()
        rows = self._code_rows(uniques)
        pos = w > 0
        new = _first_order(codes[pos & (rows[codes] < 0)])
        if new.shape[0]:
            rows[new] = self._stats.rows([uniques[j] for j in new.tolist()])
        touched = [uniques[j] for j in np.unique(codes[pos]).tolist()] if self._coefs else []
        self._accumulate(rows[codes], A, y, w, t, touched)

    def _code_rows(self, uniques) -> np.ndarray:
        """The statistics row of each code of ``uniques`` (-1: not looked up yet), kept
        while ``uniques`` and the statistics are the same objects."""
        cache = getattr(self, "_coded", None)
        if cache is None or cache[0] is not uniques or cache[1] is not self._stats:
            cache = (uniques, self._stats, np.empty(0, dtype=np.int64))
        rows = cache[2]
        if rows.shape[0] < len(uniques):
            rows = np.full(max(len(uniques), 2 * rows.shape[0]), -1, dtype=np.int64)
            rows[: cache[2].shape[0]] = cache[2]
        self._coded = (uniques, self._stats, rows)
        return rows


QUANTILES = (("min", 0.0), ("1Q", 0.25), ("median", 0.5), ("3Q", 0.75), ("max", 1.0))


def residual_quantiles(res: Reservoir, design: Design, fixef, b, sigma: float) -> dict[str, float]:
    """Quantiles of the scaled residuals ``(y − x'β − z'b_g)/σ`` of a reservoir's events
    (each counted as often as it was seen), at ``fixef`` (every fixed column; NaN for a
    dropped one) and the groups' BLUPs ``b`` (rows of the statistics): R's type-7
    quantiles, as lme4's ``summary()`` computes them from every residual. ``events`` is
    how many events they cover and ``of`` how many the stream had."""
    n = res.size
    A, y, rows = res.A[:n], res.y[:n], res.row[:n]
    beta = np.nan_to_num(np.asarray(fixef, dtype=float))
    fitted = A[:, design.xi] @ beta
    ok = rows < b.shape[0]
    fitted[ok] += np.einsum("ij,ij->i", A[ok][:, design.zi], b[rows[ok]])
    r = (y - fitted) / sigma
    q = weighted_quantiles(r, res.count[:n], [p for _, p in QUANTILES])
    out = {name: float(v) for (name, _), v in zip(QUANTILES, q)}
    out.update(events=res.n_events, of=res.n_seen)
    return out


def _first_order(codes: np.ndarray) -> np.ndarray:
    """The distinct codes in the order of their first appearance (new groups get rows
    in the order of their first event, as in a ``learn_one`` loop).

    >>> _first_order(np.array([3, 1, 3, 0, 1])).tolist()
    [3, 1, 0]

    """
    seen, first = np.unique(codes, return_index=True)
    return seen[np.argsort(first)]


def _batch_columns(X, y, w, group: str | None = None):
    """Columns of ``X`` and the arrays of ``y`` and ``w``, with errors that name what is
    wrong: ``X`` must be a DataFrame; ``y`` and ``w`` one value per row, aligned with
    ``X``'s index when they have one (never matched by position silently)."""
    import pandas as pd

    if not hasattr(X, "columns"):
        raise ValueError(
            f"learn_many expects a pandas DataFrame for X, got {type(X).__name__}"
            + (
                " (use learn_one for dicts, or pandas.DataFrame(rows))"
                if isinstance(X, list)
                else ""
            )
        )
    out = []
    for name, v in (("y", y), ("w", w)):
        if v is None:
            out.append(None)
            continue
        if hasattr(v, "columns"):
            raise ValueError(f"{name} must be a Series or a 1-d array, got a DataFrame")
        index = getattr(v, "index", None)
        if isinstance(index, pd.Index) and not index.equals(X.index):  # a Series
            raise ValueError(
                f"{name}'s index differs from X's: align them (e.g. {name}.loc[X.index]) — "
                "rows are never matched by position"
            )
        if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__len__"):
            raise ValueError(
                f"{name} must be a Series, a 1-d array or a list with one value per row of "
                f"X, got {type(v).__name__}"
            )
        try:
            arr = v.to_numpy() if hasattr(v, "to_numpy") else np.asarray(v)
        except ValueError as e:  # a ragged list
            raise ValueError(f"{name} is not a 1-d sequence of values: {e}") from None
        if arr.ndim != 1 or arr.shape[0] != len(X):
            what = f"{arr.shape[0]} values" if arr.ndim == 1 else f"shape {arr.shape}"
            raise ValueError(
                f"{name} has {what}; expected {len(X)}, one per row of X ({name} must be 1-d)"
            )
        out.append(arr)
    # the group column stays a Series: pandas factorizes its own string arrays fastest
    return {c: X[c] if c == group else X[c].to_numpy() for c in X.columns}, out[0], out[1]


def _reindexed(good: dict[str, Any] | None, names) -> dict[str, Any] | None:
    """Last good estimates laid out for the fixed columns ``names`` (columns that
    appeared since get NaN)."""
    if good is None or tuple(good["names"]) == tuple(names):
        return good
    pos = {n: i for i, n in enumerate(good["names"])}
    ix = [pos.get(n, -1) for n in names]
    p = len(names)
    fixef, vcov, keep = np.full(p, np.nan), np.full((p, p), np.nan), np.zeros(p, dtype=bool)
    for i, j in enumerate(ix):
        if j >= 0:
            fixef[i], keep[i] = good["fixef"][j], good["keep"][j]
            for i2, j2 in enumerate(ix):
                if j2 >= 0:
                    vcov[i, i2] = good["vcov"][j, j2]
    return {**good, "names": tuple(names), "fixef": fixef, "vcov": vcov, "keep": keep}


# predict_one's cached coefficients of a group: ``(K, ((field, c_f), …))``
_Coefs = tuple[float, tuple[tuple[str, float], ...]]
_UNSEEN = ("unseen",)  # the fixed part's cache key: a tuple, never a group key


class _Params(NamedTuple):
    """What a prediction needs, in the coordinates of the fit that produced it."""

    c: np.ndarray
    xi: np.ndarray
    zi: np.ndarray
    lam: np.ndarray
    beta: np.ndarray
    sigma2: float
