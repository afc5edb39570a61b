"""GroupStats: per-group sufficient statistics as weighted means and centred co-moments.

For each group ``g`` one row holds, for the vector ``v = [a_1 … a_{k'}, y]`` of the
non-constant union columns and the response (docs/math.md §2)::

    n_g = Σ w,    m_g = Σ w v / n_g,    C_g = Σ w (v − m_g)(v − m_g)'   (packed)

This is Welford's/West's update, so a row's numbers are accurate to rounding *of its
own spread*, whatever the values' magnitude or the order of arrival: an extreme first
event, a Unix timestamp or a 10⁶ offset cannot cancel away another group's digits.
The cross-products the likelihood needs are formed per fit, around a centre ``c`` the
fit chooses (:meth:`GroupStats.cross_products`)::

    Σ w (v − c)(v − c)' = C_g + n_g (m_g − c)(m_g − c)'

The intercept (a column of ones) is implicit: its moments are ``n_g`` and ``n_g m_g``.
A dict maps each group key to its row; no raw event is kept.

"""

from __future__ import annotations

import math
import sys
from itertools import repeat
from typing import Any

import numpy as np

from streamlmm import batch, kernels
from streamlmm.formula import INTERCEPT
from streamlmm.keys import check_key
from streamlmm.values import MAX_ABS

__all__ = ["GroupStats", "check_key", "MAX_ABS"]


def value_positions(columns) -> np.ndarray:
    """Positions of the union columns that enter ``v`` (all but the intercept).

    >>> value_positions(["(Intercept)", "x1", "x2"]).tolist()
    [1, 2]

    """
    return np.array([i for i, c in enumerate(columns) if c != INTERCEPT], dtype=np.int64)


class GroupStats:
    """Sufficient statistics of a mixed model, grouped and (optionally) decayed.

    Parameters
    ----------
    spec
        The column specification (a parsed formula or design): ``columns`` (union
        column names, ``(Intercept)`` for the column of ones), ``k = len(columns)``.
    half_life
        Forgetting half-life in event-time units, or ``None`` for no forgetting.
    capacity
        Initial number of group rows; the arrays grow by doubling.

    Examples
    --------
    >>> from streamlmm.design import numeric_design
    >>> st = GroupStats(numeric_design("y ~ x + (1 | g)"))
    >>> A = np.array([[1.0, 2.0], [1.0, 4.0], [1.0, 6.0]]); y = np.array([1.0, 3.0, 4.0])
    >>> st.add(st.rows(["a", "b", "a"]), A, y, np.ones(3), np.zeros(3))
    >>> st.n_groups, st.n_obs
    (2, 3.0)
    >>> st.means()[st.row("a")].tolist()  # [mean x, mean y] of group "a"
    [4.0, 2.5]

    """

    def __init__(self, spec, half_life: float | None = None, capacity: int = 64):
        if half_life is not None and not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a positive finite number, got {half_life!r}")
        self.spec = spec
        self.half_life = half_life
        self._layout(spec)
        self.M = np.zeros((capacity, self.width))
        self.tg = np.full(capacity, -np.inf) if half_life else np.zeros(0)
        self.index: dict[str | int, int] = {}
        self.keys: list[str | int] = []
        self.now = -math.inf

    def _layout(self, spec) -> None:
        cols = tuple(spec.columns)
        self.columns = cols  # the design may grow in place: keep what the rows hold
        self.k = len(cols)
        self.vi = value_positions(cols)
        self.m = self.vi.shape[0] + 1  # the response is v's last entry
        vpos = np.full(self.k + 1, -1, dtype=np.int64)
        vpos[self.vi] = np.arange(self.m - 1)
        vpos[self.k] = self.m - 1
        self.vpos = vpos  # union position (k = response) -> index in v, -1: intercept
        self.P = kernels.packed_index(self.m)
        self.width = 1 + self.m + self.m * (self.m + 1) // 2
        self._v = np.empty(self.m)  # learn_one scratch

    # -- sizes ------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Number of groups seen."""
        return len(self.keys)

    @property
    def n_obs(self) -> float:
        """Total frequency weight Σ n_g (decayed to the latest update under forgetting)."""
        return float(self.M[: self.n_groups, 0].sum())

    @property
    def inv_half_life(self) -> float:
        """``1 / half_life``, or 0 without forgetting."""
        return 1.0 / self.half_life if self.half_life else 0.0

    @property
    def active(self) -> np.ndarray:
        """The filled rows (a view): ``[n, m (m entries), C packed]`` per group."""
        return self.M[: self.n_groups]

    def counts(self) -> np.ndarray:
        """Each group's ``n_g`` (a view)."""
        return self.M[: self.n_groups, 0]

    def means(self) -> np.ndarray:
        """Each group's weighted means of ``v`` (non-constant union columns, then y)."""
        return self.M[: self.n_groups, 1 : 1 + self.m]

    # -- key index --------------------------------------------------------------------
    def row(self, key: str | int) -> int:
        """Row of ``key``, or -1 for an unseen group (no row is created)."""
        return self.index.get(key, -1)

    def rows(self, keys: list) -> np.ndarray:
        """Rows of ``keys`` (already validated), creating rows for new groups in order
        of first appearance."""
        get = self.index.get
        out = np.fromiter(map(get, keys, repeat(-1)), np.int64, len(keys))
        unseen = np.flatnonzero(out < 0)
        if unseen.shape[0] == 0:
            return out
        new = list(dict.fromkeys([keys[i] for i in unseen.tolist()]))
        r0 = len(self.keys)
        if r0 + len(new) > self.M.shape[0]:
            self._grow(max(2 * self.M.shape[0], r0 + len(new), 64))
        self.index.update(zip(new, range(r0, r0 + len(new))))
        self.keys.extend(new)
        if len(new) == unseen.shape[0]:  # no repeats among them: rows in that order
            out[unseen] = np.arange(r0, r0 + len(new))
        else:
            out[unseen] = [get(keys[i]) for i in unseen.tolist()]
        return out

    def _new_row(self, key: str | int) -> int:
        r = len(self.keys)
        if r == self.M.shape[0]:
            self._grow(max(2 * r, 64))
        self.index[key] = r
        self.keys.append(key)
        return r

    def _grow(self, capacity: int) -> None:
        M = np.zeros((capacity, self.width))
        M[: self.M.shape[0]] = self.M
        self.M = M
        if self.half_life:
            tg = np.full(capacity, -np.inf)
            tg[: self.tg.shape[0]] = self.tg
            self.tg = tg

    # -- updates ----------------------------------------------------------------------
    def check(self, A: np.ndarray, y: np.ndarray, w: np.ndarray, columns=None) -> int:
        """First event whose products ``w·v·v'`` could overflow, or -1 (changes nothing).

        ``columns``: the union columns of ``A`` when they extend the statistics' own (a
        batch that brings new factor levels is checked before the statistics widen).
        """
        vi = self.vi if columns is None else value_positions(columns)
        return kernels.first_overflow(A, y, w, vi, MAX_ABS * MAX_ABS)

    def add(self, rows: np.ndarray, A: np.ndarray, y: np.ndarray, w: np.ndarray, t: np.ndarray):
        """Accumulate validated events: union values ``A`` (N×k), targets, weights, times.

        Rows must come from :meth:`rows` on the same keys, and :meth:`check` must have
        passed, so this cannot fail half-way.
        """
        if not self.half_life:
            batch.accumulate_rows(self.M, rows, A, y, w, self.vi)
            return
        if t.shape[0]:
            self.now = max(self.now, float(t.max()))
        kernels.accumulate(self.M, self.tg, rows, A, y, w, t, self.vi, self.inv_half_life, self.P)

    def add_one(self, key: str | int, a: np.ndarray, y: float, w: float, t: float) -> None:
        """Accumulate one validated event (the ``learn_one`` path)."""
        r = self.index.get(key)
        if r is None:
            r = self._new_row(key)
        if self.half_life and t > self.now:
            self.now = t
        kernels.accumulate_one(
            self.M, self.tg, r, a, y, w, t, self.vi, self.inv_half_life, self.P, self._v
        )

    def decay_to_now(self) -> None:
        """Bring every group to the latest event time (before a refit or a snapshot)."""
        if self.half_life and self.n_groups:
            kernels.decay_all(self.M, self.tg, self.n_groups, self.m, self.now, self.inv_half_life)

    def decay_factor(self, r: int) -> float:
        """Row ``r``'s forgetting factor from its last update to now (1 if none)."""
        if not self.half_life or r < 0:
            return 1.0
        return 2.0 ** (-max(self.now - self.tg[r], 0.0) * self.inv_half_life)

    # -- cross-products for a fit -----------------------------------------------------
    def center(self) -> np.ndarray:
        """A centre ``c`` (k + 1 entries, the response last) for the fit's cross-products.

        The median of the group means on the columns in ``spec.shiftable`` (the
        likelihood is invariant to shifting them, docs/math.md §6), 0 elsewhere. A
        median, not a mean, so that one extreme event cannot drag the centre away from
        every other group.
        """
        c = np.zeros(self.k + 1)
        if self.n_groups == 0:
            return c
        mask = np.asarray(self.spec.shiftable, dtype=bool)
        if mask.shape[0] != self.k + 1:
            raise ValueError("the statistics are behind their design: widen them first")
        means = self.means()
        for i in np.flatnonzero(mask):
            c[i] = float(np.median(means[:, self.vpos[i]]))
        return c

    def cross_products(self, c: np.ndarray, zi: np.ndarray, xi: np.ndarray):
        """Per-group blocks ``F = [ZZ_g (q×q), ZX_g (q×p), Zy_g (q)]`` around ``c`` and
        the global ``XX, Xy, yy, n`` (docs/math.md §2), for fixed columns ``xi``."""
        return kernels.Blocks(
            *kernels.cross_products(self.M, self.n_groups, self.vpos, c, zi, xi, self.k, self.P)
        )

    def group_blocks(self, r: int, c: np.ndarray, zi: np.ndarray, xi: np.ndarray, out):
        """Row ``r``'s ``[ZZ, ZX, Zy]`` around ``c`` into ``out``, decayed to now."""
        kernels.group_row(self.M[r], self.vpos, c, zi, xi, self.k, self.P, out)
        f = self.decay_factor(r)
        if f != 1.0:
            out *= f

    # -- structure --------------------------------------------------------------------
    def copy(self) -> GroupStats:
        """An independent copy."""
        other = GroupStats.__new__(GroupStats)
        other.__dict__.update(self.__dict__)
        other.M = self.M[: self.n_groups].copy()
        other.tg = self.tg[: self.n_groups].copy() if self.half_life else self.tg
        other.index = dict(self.index)
        other.keys = list(self.keys)
        other._v = np.empty(self.m)
        return other

    def widen(self, spec) -> None:
        """Adopt ``spec`` whose union columns extend this one's (a factor level seen
        for the first time). Earlier events had 0 in the new columns, so their means
        and co-moments there are exactly 0: widening loses nothing."""
        old_cols = self.columns
        new_cols = tuple(spec.columns)
        if new_cols[: len(old_cols)] != old_cols:
            raise ValueError("columns may only be appended")
        old = (self.m, self.P, self.M)
        self.spec = spec
        self._layout(spec)
        m0, P0, M0 = old
        M = np.zeros((M0.shape[0], self.width))
        M[:, 0] = M0[:, 0]
        # v = [old non-intercept columns, new ones, y]: old index i -> new index
        remap = np.arange(m0)
        remap[m0 - 1] = self.m - 1
        M[:, 1 + remap] = M0[:, 1 : 1 + m0]
        for i in range(m0):
            for j in range(i, m0):
                M[:, 1 + self.m + self.P[remap[i], remap[j]]] = M0[:, 1 + m0 + P0[i, j]]
        self.M = M

    def realigned(self, spec, T: np.ndarray, chunk: int = 1 << 15) -> GroupStats:
        """These statistics in the columns of ``spec``, where ``a_new = T a`` for every
        event learned (:func:`streamlmm.design.align`: another shard's column order,
        levels and reference levels). The map is affine on ``v`` (the intercept column
        gives the constant), so each row's means map as ``m' = V m + t`` and its
        co-moments as ``C' = V C V'``: exact in exact arithmetic, and in floating point
        whenever ``T`` only moves columns."""
        out = GroupStats(spec, self.half_life, capacity=max(self.n_groups, 64))
        G = self.n_groups
        vi_new, vi_old = out.vpos[: out.k], self.vpos[: self.k]
        V = np.zeros((out.m, self.m))
        t = np.zeros(out.m)
        for i in range(out.k):
            if vi_new[i] < 0:
                continue  # the intercept column stays implicit
            for j in range(self.k):
                if T[i, j] != 0.0:
                    if vi_old[j] < 0:
                        t[vi_new[i]] += T[i, j]
                    else:
                        V[vi_new[i], vi_old[j]] += T[i, j]
        V[-1, -1] = 1.0  # the response
        iu = np.triu_indices(out.m)
        for lo in range(0, G, chunk):
            rows = self.M[lo : min(lo + chunk, G)]
            means = rows[:, 1 : 1 + self.m]
            C = rows[:, 1 + self.m + self.P]  # (g, m, m)
            new = out.M[lo : lo + rows.shape[0]]
            new[:, 0] = rows[:, 0]
            new[:, 1 : 1 + out.m] = means @ V.T + t
            new[:, 1 + out.m + out.P[iu]] = (V @ C @ V.T)[:, iu[0], iu[1]]
        if self.half_life:
            out.tg[:G] = self.tg[:G]
        out.keys = list(self.keys)
        out.index = dict(self.index)
        out.now = self.now
        return out

    @classmethod
    def merge(cls, shards: list[GroupStats]) -> GroupStats:
        """Combine shards' statistics exactly (they are additive, docs/design.md).

        Under forgetting every shard is decayed to the latest time first; a group
        present in several shards gets the pooled row (Chan's parallel update).
        """
        first = shards[0]
        out = first.copy()
        if first.half_life:
            out.now = max(s.now for s in shards)
            out.decay_to_now()
        for other in shards[1:]:
            if other.columns != first.columns or (other.half_life != first.half_life):
                raise ValueError("only statistics of the same columns and half_life merge")
            o = other.copy()
            if first.half_life:
                o.now = out.now
                o.decay_to_now()
            rows = out.rows(o.keys)
            kernels.merge_rows(out.M, rows, o.M[: o.n_groups], out.P)
            if first.half_life:
                out.tg[rows] = out.now
        return out

    # -- serialisation ----------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Arrays and JSON-ready values that :meth:`from_state` restores exactly."""
        G = self.n_groups
        return {
            "M": self.M[:G].copy(),
            "tg": self.tg[:G].copy() if self.half_life else np.zeros(0),
            "now": self.now if math.isfinite(self.now) else None,
            "half_life": self.half_life,
        }

    @classmethod
    def from_state(cls, spec, keys, state) -> GroupStats:
        """Statistics for ``keys`` (row order) from :meth:`to_state`'s output."""
        st = cls(spec, state["half_life"], capacity=max(len(keys), 64))
        M = np.asarray(state["M"], dtype=float)
        if M.shape != (len(keys), st.width):
            raise ValueError(f"state of shape {M.shape} does not fit {len(keys)} groups")
        st.M[: len(keys)] = M
        if st.half_life:
            st.tg[: len(keys)] = state["tg"]
        st.keys = list(keys)
        st.index = {k: i for i, k in enumerate(st.keys)}
        if len(st.index) != len(st.keys):
            raise ValueError("duplicate group keys in the state")
        st.now = state["now"] if state["now"] is not None else -math.inf
        return st

    def nbytes(self) -> int:
        """Approximate memory held: arrays, key index and key objects."""
        total = self.M.nbytes + self.tg.nbytes + sys.getsizeof(self.index)
        total += sys.getsizeof(self.keys)
        total += sum(sys.getsizeof(k) + sys.getsizeof(r) for k, r in self.index.items())
        return total
