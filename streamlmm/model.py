"""MixedLM: the river face of the streaming mixed-model core.

A :class:`MixedLM` is three parts and a builder, each in a module of its own:

- a :class:`~streamlmm.learner.Learner`: events in, sufficient statistics out (O(1) per
  event; the design, its factor levels, the sample of events);
- a :class:`~streamlmm.schedule.Schedule`: when the parameters are refreshed, by a
  deterministic cost model (a warm-started exact REML/ML refit when its cost fits
  ``refresh_budget`` per event, an ML-EM step in between);
- a :class:`~streamlmm.predictor.Predictor`: the fixed part plus the group's effect,
  from the group's current statistics at the last refresh's parameters;
- :func:`streamlmm.estimate.mk_snapshot`: the estimates at θ as an immutable
  :class:`~streamlmm.snapshot.Snapshot` (lme4's ``mkMerMod``).

The refresh runs lazily, when a prediction or snapshot needs the parameters, so
``learn_many`` and a ``learn_one`` loop reach the same state. A prediction always
recomputes its group's BLUP from that group's current statistics, so every event moves
its group's prediction at once.

"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from river import base

from streamlmm import estimate, kernels
from streamlmm.coverage import check_disjoint
from streamlmm.design import Design, align
from streamlmm.learner import Learner
from streamlmm.predictor import Predictor
from streamlmm.reservoir import CAPACITY, Reservoir
from streamlmm.rows import RowReader
from streamlmm.schedule import REFRESH_BUDGET_US, Schedule
from streamlmm.snapshot import Snapshot
from streamlmm.stats import GroupStats, check_key
from streamlmm.values import MAX_ABS

__all__ = ["MixedLM"]

METHODS = ("REML", "ML")
HISTORY_MAX = 256  # model-level records kept for trajectories
_LO = -MAX_ABS  # the fast path's lower bound, without negating MAX_ABS per value


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
        self.reservoir = reservoir
        self._schedule = Schedule(refresh_budget, em_every, refit_every)
        self._pred = Predictor()
        self._learner = Learner(
            formula,
            levels,
            half_life,
            time_key,
            missing,
            reservoir,
            forget=self._pred.coefs,
            on_layout=self._relaid,
        )
        # once per process: no learn_one/predict_one below stalls on loading a kernel
        kernels.preload(sum(r.intercept + len(r.terms) for r in self._formula.random_terms))
        self._lam_u: np.ndarray | None = None  # Λ in the user's coordinates (warm starts)
        self._param_source: tuple[str, int] = ("", -1)
        self._last_good: dict[str, Any] | None = None  # last finite snapshot estimates
        self._colinfo: dict[str, Any] = {}
        self.opt_summary: estimate.OptSummary | None = None
        self.n_refits = 0
        self.n_em_steps = 0
        self.last_refit: dict[str, Any] = {}
        self._history: list[dict[str, Any]] = []

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

    # -- the parts --------------------------------------------------------------------------
    @property
    def _design(self) -> Design:
        return self._learner.design

    @property
    def _formula(self):
        return self._learner.formula

    @property
    def _stats(self) -> GroupStats:
        return self._learner.stats

    @property
    def _res(self) -> Reservoir | None:
        return self._learner.res

    @property
    def _reader(self) -> RowReader:
        return self._learner.reader

    @property
    def _par(self):
        return self._pred.par

    @property
    def n_events(self) -> int:
        """Events learned (of positive weight)."""
        return self._learner.n_events

    @property
    def n_groups(self) -> int:
        """Groups seen (every group with a row of statistics), refit or not."""
        return self._stats.n_groups

    @property
    def n_skipped(self) -> int:
        """Events skipped for a missing value (``missing="skip"``)."""
        return self._learner.n_skipped

    def _relaid(self, k_old: int) -> None:
        """The learner's union columns (or statistics) changed: predictions follow."""
        self._pred.widened(k_old, self._learner.stats.k)

    # -- learning -------------------------------------------------------------------------
    def learn_one(self, x: Mapping[str, Any], y: float, w: float = 1.0) -> None:
        """Accumulate one event. Invalid input raises ``ValueError`` and changes nothing."""
        self._learner.learn_one(x, y, w)

    def learn_many(self, X, y, w=None) -> None:
        """Accumulate a batch (pandas DataFrame; ``y`` and ``w`` a Series, array or list of
        one value per row), exactly as a ``learn_one`` loop.

        With ``missing="raise"`` one bad row rejects the whole batch (``ValueError``
        naming the row and field) and nothing changes; with ``"skip"`` rows with a
        missing value are dropped and counted in ``n_skipped``.
        """
        self._learner.learn_many(X, y, w)

    def learn_batch(self, keys, A, y, w, t=None) -> None:
        """Accumulate a batch that is already validated (the stream engine's path).

        ``keys`` are checked group keys, ``A`` the union columns (``formula.columns``),
        ``t`` the event times (``None`` without ``time_key``).
        """
        self._learner.learn_batch(keys, A, y, w, t)

    def learn_coded(self, uniques, codes, A, y, w, t=None) -> None:
        """Accumulate a validated batch whose group keys are coded (the stream engine's
        path): event ``i`` is in group ``uniques[codes[i]]`` (see
        :meth:`Learner.learn_coded <streamlmm.learner.Learner.learn_coded>`)."""
        self._learner.learn_coded(uniques, codes, A, y, w, t)

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
        if not self._pred.adopt(prob, prof):
            return False
        self._lam_u = prob.to_user_lam(self._pred.par.lam)
        self._param_source = (source, self.n_events)
        return True

    def _shape(self) -> tuple[int, int, int]:
        """``(groups, q, p)``: what the schedule's cost model reads."""
        d = self._design
        return self._stats.n_groups, d.q, d.p

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
        passes = summary.evals + summary.em_steps
        self._schedule.refitted(self.n_events, passes, bool(ok), *self._shape())
        self._pred.fast = None  # the schedule moved, and predict_one's horizon with it
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
        self._schedule.em_stepped(self.n_events, *self._shape())
        self._pred.fast = None  # the schedule moved, and predict_one's horizon with it
        self._record_history("em")
        return self

    def refresh(self) -> bool:
        """Run whatever the schedule says is due (refit first, else EM); True if any ran."""
        due = self._schedule.due(self.n_events)
        if due == "refit":
            G, q, p = self._shape()
            n_theta = len(estimate.theta_index(self._design.blocks, q)[0])
            self.fit(max_evals=self._schedule.scheduled_evals(G, q, p, n_theta))
        elif due == "em":
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
        fast = self._pred.fast
        if fast is not None:
            # a plain numeric formula with parameters and no refresh due: the group's
            # cached ``ŷ = K + Σ b·x`` (dropped whenever its statistics change)
            group, until, coefs = fast
            key = x.get(group)
            if self._learner.n_events < until and (type(key) is int or type(key) is str):
                coef = coefs.get(key) or self._pred.cached(self._stats, self._design, key)
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
        pred = self._pred
        if pred.fast is None or self.n_events >= pred.fast[1]:
            pred.layout(
                self._design,
                self._stats,
                self._formula.group,
                self._schedule.horizon,
                self.half_life is not None,
            )
        return pred.union(self._stats, a, r)

    def _predict_union(self, a: np.ndarray, r: int) -> float:
        """The prediction for union values ``a`` in group row ``r`` (-1: unseen)."""
        return self._pred.union(self._stats, a, r)

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
            out = self._pred.rows(self._stats, rows, A)
        for r in holes:  # a missing feature (missing="skip") takes its centre value
            out[r] = self.predict_one({c: v[r] for c, v in cols.items()})
        return pd.Series(out, index=X.index)

    # -- Bayesian posterior (streamlmm.bayes, imported when called) -----------------------
    def sample(
        self,
        priors: Mapping[str, str] | None = None,
        chains: int = 4,
        draws: int = 1000,
        warmup: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        """The Bayesian posterior at the current statistics (:mod:`streamlmm.bayes`).

        ``priors`` maps brms classes (``Intercept``, ``b``, ``sd``, ``sigma``, ``cor``)
        or one parameter's brms name (``b_x``, ``sd_g__x``) to a Stan-style prior
        (``"normal(0, 20)"``); a missing class gets brms's default. NUTS samples the
        global parameters with the group effects integrated out; every group's effect
        is summarised exactly. Called again after more events, it warm-starts from the
        previous posterior (``warm_start=False`` to start cold); ``warmup`` defaults to
        1000, or 300 warm. Other keywords go to :func:`streamlmm.bayes.sample`
        (``target_accept``, ``max_depth``, ``cores``, ``keep_ranef``, ``offsets``, …).
        Returns an immutable :class:`~streamlmm.bayes.Posterior`; failed sampler checks
        are :class:`~streamlmm.SamplingWarning` s.
        """
        from streamlmm.bayes import fit

        warm = kwargs.pop("warm_start", True)
        init = getattr(self, "_posterior", None) if warm else None
        if init is not None and init.formula != self.formula:
            init = None
        post = fit.sample(
            self, priors, chains=chains, draws=draws, warmup=warmup, seed=seed, init=init, **kwargs
        )
        self._posterior = post
        return post

    def default_priors(self, priors: Mapping[str, str] | None = None):
        """The resolved priors as brms's ``get_prior()`` shows them (a DataFrame: prior,
        class, coef, group, lb, source), brms's defaults from the reservoir's response
        (its median and MAD, exact while the stream fits in it)."""
        from streamlmm.bayes import fit

        return fit.default_priors(self, priors)

    def prior_predictive(
        self, X, priors: Mapping[str, str] | None = None, draws: int = 100, seed=None
    ):
        """Responses simulated from the priors at the rows of ``X`` (draws × rows)."""
        from streamlmm.bayes import fit

        return fit.prior_predictive(self, X, priors, draws=draws, seed=seed)

    # -- results --------------------------------------------------------------------------
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
        prob = self._problem() if self._stats.n_groups else None
        theta = self._warm_theta(prob) if prob is not None else None
        parts = estimate.ModelParts(
            formula=self.formula,
            method=self.method,
            design=self._design,
            stats=self._stats,
            n_events=self.n_events,
            reservoir=self._res,
            summary=self.opt_summary if self._param_source[0] == "refit" else None,
            converged=self.converged,
            colinfo=self._colinfo,
            history=self._history,
            state=self._state(),
        )
        snap, self._last_good = estimate.mk_snapshot(
            parts, prob, theta, self._last_good, offsets=offsets, meta=meta
        )
        return snap

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
        return {
            **self._learner.to_state(),
            **self._schedule.to_state(),
            "lam_user": self._lam_u.ravel().copy() if self._lam_u is not None else np.zeros(0),
            "levels": self.levels,
            "n_refits": self.n_refits,
            "history": self._history,
        }

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> MixedLM:
        """A model that continues exactly where the snapshot's state left off."""
        return cls.from_snapshots([snap])

    @classmethod
    def from_snapshots(cls, snaps: list[Snapshot], *, disjoint: bool = False) -> MixedLM:
        """One model from the states of several snapshots, e.g. of engines that each own
        some partitions of a topic: statistics are additive (docs/design.md §6), so the
        merged model fits exactly as one engine that read every partition would.

        The snapshots must hold disjoint events. Their source offsets say which events
        they hold (:mod:`streamlmm.coverage`): two snapshots of one partition or one
        file overlap, and are refused with a ``ValueError`` naming it. A snapshot without
        offsets (taken in Python) cannot be checked: pass ``disjoint=True`` to say that
        the snapshots hold disjoint events (it also overrides the offsets' check, e.g.
        for two Kafka clusters with the same topic names).

        Shards that met factor levels in different orders have different union columns
        (order, levels, reference level): they are aligned exactly to the first
        snapshot's levels (:func:`streamlmm.design.align`), or refused with the reason.
        """
        check_disjoint(snaps, disjoint)
        models = [cls._from_state(s) for s in snaps]
        m = models[0]
        if len(models) > 1:
            for other in models[1:]:
                if (other.formula, other.method) != (m.formula, m.method):
                    raise ValueError("only snapshots of the same formula and method merge")
                if other.half_life != m.half_life:
                    raise ValueError(
                        f"only snapshots of the same half_life merge ({m.half_life} and "
                        f"{other.half_life})"
                    )
            design, maps = align([o._design for o in models])
            stats = [
                o._stats if T is None else o._stats.realigned(design, T)
                for o, T in zip(models, maps)
            ]
            merged = GroupStats.merge(stats)
            res = None
            if m._res is not None:
                index = merged.index
                res = Reservoir.merge(
                    [
                        (o._res, np.array([index[key] for key in o._stats.keys], np.int64), T)
                        for o, T in zip(models, maps)
                        if o._res is not None
                    ],
                    merged.k,
                    keys=merged.keys,
                    design=design,
                )
            lr = m._learner
            lr.set_design(design)
            lr.set_stats(merged, res, sum(o.n_events for o in models))
            lr.n_skipped = sum(o.n_skipped for o in models)
        G, q, p = m._shape()
        m._schedule.resumed(m.n_events, m._lam_u is not None, G, q, p)
        if m._lam_u is not None and m.n_events:
            m._restore_params()
        return m

    def load_statistics(self, design: Design, stats: GroupStats, n_events: int) -> MixedLM:
        """Replace the design and the statistics wholesale; returns self.

        The scale-out fitter (``stream/fitter.py``) keeps every group's latest row from
        the state topic and fits through this model, so there is one path through the
        core. The warm start (Λ) is kept; the next :meth:`fit` or :meth:`snapshot`
        works on the new statistics. ``stats`` must be laid out for ``design.columns``.
        The sample of events is emptied: the statistics came without their events.
        """
        if tuple(stats.columns) != tuple(design.columns):
            raise ValueError("the statistics are not laid out for the design's columns")
        lr = self._learner
        lr.set_design(design)
        res = Reservoir(lr.res.capacity) if lr.res is not None else None
        lr.set_stats(stats, res, n_events)
        self._pred.par = None  # parameters of other statistics: refit or restore first
        self._pred.drop()
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
        m._learner.load_state(s, snap.keys, snap.n_events)
        m.n_refits = s["n_refits"]
        m._history = [dict(h) for h in s.get("history", [])]
        lam = np.asarray(s["lam_user"], dtype=float)
        if lam.size:
            m._lam_u = lam.reshape(m._design.q, m._design.q)
        return m
