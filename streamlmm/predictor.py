"""The prediction path: the fixed part plus the group's effect, ŷ = x'β + z'b̂_g.

One formula, in every place that predicts: :func:`coefficients` turns the fixed effects
and a group's effect into one coefficient per union column, so that ``ŷ = coef · a``
for the event's union values ``a`` (:func:`linear_predictor`). ``Snapshot.predict``,
the HTTP service, the scale-out worker and :class:`Predictor` (a streaming model's
cache of each group's coefficients) all use it; the batch kernels
(``kernels.predict_event``, ``predict_rows``) compute the same sum in compiled code.

A streaming model predicts from its *current* statistics: a group's effect is recomputed
from its row (``kernels.group_effect``) at the parameters of the last refresh, in that
fit's coordinates (around its centre ``c``, docs/math.md §6). :class:`Predictor` keeps
those parameters and, for plain numeric formulas, each group's effective coefficients
``ŷ = K + Σ_f c_f x_f``, dropped when the group learns an event and all at once with
new parameters or a new design.

Examples
--------
>>> import numpy as np
>>> coef = coefficients(3, np.array([0, 1]), np.array([1.0, 2.0]), np.array([0]), np.array([0.5]))
>>> coef.tolist(), linear_predictor(np.array([1.0, 3.0, 7.0]), coef)
([1.5, 2.0, 0.0], 7.5)

"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from streamlmm import kernels
from streamlmm.keys import MAX_KEY_LEN, text_problem

__all__ = ["Params", "Predictor", "coefficients", "linear_predictor"]

# a group's cached coefficients: ``(K, ((field, c_f), …))`` with ŷ = K + Σ c_f x_f
Coefs = tuple[float, tuple[tuple[str, float], ...]]
UNSEEN = ("unseen",)  # the fixed part's cache key: a tuple, never a group key
_NO_COV = np.empty((0, 0))  # kernels.group_effect: the effect alone


def coefficients(k: int, xi, beta, zi, b=None) -> np.ndarray:
    """One coefficient per union column for ``ŷ = x'β + z'b``: ``β_j`` at fixed column
    ``xi[j]`` (a NaN β, a dropped column, contributes nothing) plus ``b_i`` at random
    column ``zi[i]`` (``b=None``: an unseen group, the fixed part alone)."""
    coef = np.zeros(k)
    np.add.at(coef, np.asarray(xi, dtype=np.int64), np.nan_to_num(np.asarray(beta, float)))
    if b is not None:
        np.add.at(coef, np.asarray(zi, dtype=np.int64), np.asarray(b, float))
    return coef


def linear_predictor(a: np.ndarray, coef: np.ndarray) -> float:
    """``ŷ = coef · a`` over the union columns (see :func:`coefficients`)."""
    return float(coef @ a[: coef.shape[0]])


class Params(NamedTuple):
    """What a prediction needs, in the coordinates of the fit that produced it."""

    c: np.ndarray
    xi: np.ndarray
    zi: np.ndarray
    lam: np.ndarray
    beta: np.ndarray
    sigma2: float


class Predictor:
    """The parameters of the last refresh and the per-group coefficient cache.

    Attributes
    ----------
    par
        :class:`Params`, or ``None`` before the first finite refresh.
    coefs
        Group key → cached coefficients (a :class:`~streamlmm.learner.Learner` drops a
        group's entry when its statistics change: it is the learner's ``forget``).
    fast
        What ``predict_one``'s fast path needs, or ``None`` (see :meth:`layout`).
    """

    def __init__(self):
        self.par: Params | None = None
        self.coefs: dict = {}
        self.fast: tuple | None = None
        self._blk = np.empty(0)  # scratch, sized by the parameters' q and p
        self._b1 = np.empty(0)

    def adopt(self, prob, prof) -> bool:
        """Take the parameters at profile ``prof`` of problem ``prob`` if they are finite
        (a failed step never replaces good parameters); True if taken."""
        lam = prob.lam(prof.theta)
        if not (np.all(np.isfinite(lam)) and np.all(np.isfinite(prof.beta))):
            return False
        if not (math.isfinite(prof.sigma2) and prof.sigma2 > 0):
            return False
        self.par = Params(prob.c, prob.xi, prob.zi, lam, prof.beta, prof.sigma2)
        q, p = prob.q, prob.p
        self._blk, self._b1 = np.empty(kernels.scratch_size(q, p)), np.empty(q)
        self.drop()  # new parameters: every cached coefficient is stale
        return True

    def drop(self) -> None:
        """Forget the fast path and every cached coefficient (new parameters, design or
        statistics)."""
        self.fast = None
        self.coefs.clear()

    def widened(self, k_old: int, k_new: int) -> None:
        """New union columns at the end: the fit's centre grows with zeros."""
        self.drop()
        if self.par is not None and k_new > k_old:
            c = self.par.c
            grown = np.concatenate([c[:k_old], np.zeros(k_new - k_old), c[k_old:]])
            self.par = self.par._replace(c=grown)

    def layout(self, design, stats, group: str, horizon: float, forgetting: bool):
        """Set (and return) the fast path's needs, or ``None`` when it does not apply (a
        plain numeric design, no forgetting, parameters): the group field, the event count
        at which a refresh is due, and the per-group coefficient cache."""
        ok = design.plain is not None and not forgetting and self.par is not None
        self.fast = (group, horizon, self.coefs) if ok and design.k == stats.k else None
        return self.fast

    # -- one group's coefficients ---------------------------------------------------------
    def cached(self, stats, design, key) -> Coefs | None:
        """The coefficients of group ``key`` (int or str), cached if the group is seen;
        ``None`` for a key the full path must reject (too long, not valid text)."""
        r = stats.index.get(key)
        if r is None:
            if type(key) is str and (
                len(key) > MAX_KEY_LEN or (not key.isascii() and text_problem(key))
            ):
                return None
            coef = self.coefs.get(UNSEEN)
            if coef is None:
                coef = self.coefs[UNSEEN] = self.group_coefficients(stats, design, -1)
            return coef
        coef = self.coefs[key] = self.group_coefficients(stats, design, r)
        return coef

    def group_coefficients(self, stats, design, r: int) -> Coefs:
        """``(K, ((field, c_f), …))`` with ``ŷ = K + Σ_f c_f x_f`` for group row ``r``
        (-1: unseen), from ``ŷ = c_y + coef · (a − c)`` (:func:`coefficients`), the
        intercept folded into K."""
        par = self.par
        b = None
        if r >= 0:
            self.effect(stats, r)
            b = self._b1
        coef = coefficients(stats.k, par.xi, par.beta, par.zi, b)
        K = float(par.c[stats.k] - coef @ par.c[: stats.k])
        K += float(coef[list(design.ones)].sum())
        return K, tuple((c, float(coef[i])) for i, c in design.plain)

    def effect(self, stats, r: int) -> np.ndarray:
        """Group row ``r``'s effect b̃ (this fit's coordinates) from its current row."""
        par = self.par
        kernels.group_effect(
            stats.M[r],
            stats.vpos,
            par.c,
            par.zi,
            par.xi,
            stats.k,
            stats.P,
            stats.decay_factor(r),
            par.lam,
            par.beta,
            True,
            self._b1,
            _NO_COV,
            self._blk,
        )
        return self._b1

    # -- events ---------------------------------------------------------------------------
    def union(self, stats, a: np.ndarray, r: int) -> float:
        """The prediction for union values ``a`` in group row ``r`` (-1: unseen)."""
        par = self.par
        return kernels.predict_event(
            stats.M,
            r,
            a,
            par.c,
            stats.decay_factor(r),
            stats.vpos,
            par.zi,
            par.xi,
            stats.k,
            stats.P,
            par.lam,
            par.beta,
            self._b1,
            self._blk,
        )

    def rows(self, stats, rows: np.ndarray, A: np.ndarray) -> np.ndarray:
        """Predictions for union values ``A`` in group rows ``rows`` (-1: unseen)."""
        par = self.par
        n = rows.shape[0]
        fac = np.array([stats.decay_factor(r) for r in rows]) if stats.half_life else np.ones(n)
        out = np.empty(n)
        kernels.predict_rows(
            stats.M,
            rows,
            A,
            par.c,
            fac,
            stats.vpos,
            par.zi,
            par.xi,
            stats.k,
            stats.P,
            par.lam,
            par.beta,
            out,
        )
        return out
