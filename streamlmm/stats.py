"""GroupStats: per-group sufficient statistics in contiguous arrays.

One row per group holds ``n_g`` and the packed cross-product of ``v = [a − c, y − c_y]``
(docs/math.md §2), where ``c`` is a fixed reference shift chosen from the first events
(docs/math.md §6). With q = 2 and p = 3 a row is 11 floats. A dict maps each group key to its
row; no raw event is kept.

"""

from __future__ import annotations

import math
import sys

import numpy as np

from streamlmm import kernels
from streamlmm.formula import INTERCEPT, Formula
from streamlmm.keys import check_key

__all__ = ["GroupStats", "check_key"]


class GroupStats:
    """Sufficient statistics of a mixed model, grouped, shifted and (optionally) decayed.

    Parameters
    ----------
    formula
        The parsed formula; fixes the union columns and the blocks.
    half_life
        Forgetting half-life in event-time units, or ``None`` for no forgetting.
    capacity
        Initial number of group rows; the arrays grow by doubling.

    Examples
    --------
    >>> from streamlmm.formula import parse_formula
    >>> st = GroupStats(parse_formula("y ~ x + (1 | g)"))
    >>> A = np.array([[1.0, 2.0], [1.0, 4.0]]); y = np.array([1.0, 3.0])
    >>> st.add(st.rows(["a", "b"]), A, y, np.ones(2), np.zeros(2))
    >>> st.n_groups, st.n_obs, st.shift.tolist()
    (2, 2.0, [0.0, 2.0, 1.0])

    """

    def __init__(self, formula: Formula, half_life: float | None = None, capacity: int = 64):
        if half_life is not None and not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a positive finite number, got {half_life!r}")
        self.formula = formula
        self.half_life = half_life
        self.m = formula.k + 1
        self.P = kernels.packed_index(self.m)
        self._v = np.empty(self.m)  # learn_one scratch
        self.width = 1 + self.m * (self.m + 1) // 2
        self.S = np.zeros((capacity, self.width))
        self.tg = np.full(capacity, -np.inf) if half_life else np.zeros(0)
        self.part = np.full(capacity, -1, dtype=np.int32)  # home partition; -1: in-process
        self.index: dict[str | int, int] = {}
        self.keys: list[str | int] = []
        self.shift: np.ndarray | None = None
        self.now = -math.inf
        self.xi = formula.xi
        self.zi = formula.zi
        self.yi = formula.k

    # -- sizes ------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Number of groups seen."""
        return len(self.keys)

    @property
    def n_obs(self) -> float:
        """Total frequency weight Σ n_g (decayed to the latest update under forgetting)."""
        return float(self.S[: self.n_groups, 0].sum())

    @property
    def inv_half_life(self) -> float:
        """``1 / half_life``, or 0 without forgetting."""
        return 1.0 / self.half_life if self.half_life else 0.0

    # -- key index --------------------------------------------------------------------
    def row(self, key: str | int) -> int:
        """Row of ``key``, or -1 for an unseen group (no row is created)."""
        return self.index.get(key, -1)

    def rows(self, keys, parts=None) -> np.ndarray:
        """Rows of ``keys`` (already validated), creating rows for new groups.

        ``parts`` gives each event's source partition; a new group's row records it as
        the group's home partition (the engine keeps every group on one partition).
        """
        index = self.index
        out = np.empty(len(keys), dtype=np.int64)
        for e, key in enumerate(keys):
            r = index.get(key)
            if r is None:
                r = self._new_row(key)
                if parts is not None:
                    self.part[r] = parts[e]
            out[e] = r
        return out

    def _new_row(self, key: str | int) -> int:
        r = len(self.keys)
        if r == self.S.shape[0]:
            self._grow(max(2 * r, 64))
        self.index[key] = r
        self.keys.append(key)
        return r

    def _grow(self, capacity: int) -> None:
        S = np.zeros((capacity, self.width))
        S[: self.S.shape[0]] = self.S
        self.S = S
        part = np.full(capacity, -1, dtype=np.int32)
        part[: self.part.shape[0]] = self.part
        self.part = part
        if self.half_life:
            tg = np.full(capacity, -np.inf)
            tg[: self.tg.shape[0]] = self.tg
            self.tg = tg

    # -- updates ----------------------------------------------------------------------
    def choose_shift(self, A: np.ndarray, y: np.ndarray) -> None:
        """Fix the reference shift from the first event, once.

        The first event (rather than, say, the first batch's means) makes ``learn_many``
        accumulate exactly what a ``learn_one`` loop does, bit for bit.
        """
        if self.shift is not None or A.shape[0] == 0:
            return
        mask = self.formula.shiftable
        c = np.concatenate([A[0], y[:1]])
        self.shift = np.where(mask, c, 0.0)

    def add(self, rows: np.ndarray, A: np.ndarray, y: np.ndarray, w: np.ndarray, t: np.ndarray):
        """Accumulate validated events: union values ``A`` (N×k), targets, weights, times.

        Rows must come from :meth:`rows` on the same keys. The caller has validated
        every value, so this cannot fail half-way.
        """
        self.choose_shift(A, y)
        if self.half_life and t.shape[0]:
            self.now = max(self.now, float(t.max()))
        kernels.accumulate(
            self.S, self.tg, rows, A, y, self.shift, w, t, self.inv_half_life, self.P
        )

    def add_one(self, key: str | int, a: np.ndarray, y: float, w: float, t: float) -> None:
        """Accumulate one validated event (the ``learn_one`` path)."""
        if self.shift is None:
            self.choose_shift(a[None, :], np.array([y]))
        r = self.index.get(key)
        if r is None:
            r = self._new_row(key)
        if self.half_life and t > self.now:
            self.now = t
        kernels.accumulate_one(
            self.S, self.tg, r, a, y, self.shift, w, t, self.inv_half_life, self.P, self._v
        )

    def decay_to_now(self) -> None:
        """Bring every group to the latest event time (before a refit or a snapshot)."""
        if self.half_life and self.n_groups:
            kernels.decay_all(self.S, self.tg, self.n_groups, self.now, self.inv_half_life)

    # -- views ------------------------------------------------------------------------
    @property
    def active(self) -> np.ndarray:
        """The filled rows of ``S`` (a view)."""
        return self.S[: self.n_groups]

    def shifted(self, A: np.ndarray) -> np.ndarray:
        """Union values ``A`` minus the reference shift (zeros before the first event)."""
        if self.shift is None:
            return np.asarray(A, dtype=float)
        return A - self.shift[:-1]

    def copy(self) -> GroupStats:
        """An independent copy (for snapshots that carry the state)."""
        other = GroupStats.__new__(GroupStats)
        other.__dict__.update(self.__dict__)
        other.S = self.S[: self.n_groups].copy()
        other.tg = self.tg[: self.n_groups].copy() if self.half_life else self.tg
        other.part = self.part[: self.n_groups].copy()
        other.index = dict(self.index)
        other.keys = list(self.keys)
        other.shift = None if self.shift is None else self.shift.copy()
        return other

    def reshift(self, shift: np.ndarray) -> None:
        """Re-express every row around another reference shift, exactly.

        With ``δ = shift − c`` and ``v' = v − δ``, each row becomes
        ``Σwv'v'' = Σwvv' − δm₁' − m₁δ' + nδδ'`` where ``m₁ = Σwv`` is the row's
        intercept column (a shiftable column implies an intercept, docs/math.md §6).
        """
        shift = np.asarray(shift, dtype=float)
        if self.shift is None:
            self.shift = shift.copy()
            return
        d = shift - self.shift
        if not d.any():
            return
        G, P = self.n_groups, self.P
        M = self.S[:G][:, P]  # (G, m, m), symmetric
        m1 = M[:, self.formula.columns.index(INTERCEPT), :]
        n = self.S[:G, 0]
        M -= m1[:, :, None] * d[None, None, :] + d[None, :, None] * m1[:, None, :]
        M += n[:, None, None] * np.outer(d, d)[None]
        iu = np.triu_indices(self.m)
        self.S[:G, P[iu]] = M[:, iu[0], iu[1]]
        self.shift = shift.copy()

    @classmethod
    def merge(cls, shards: list[GroupStats]) -> GroupStats:
        """Combine shards' statistics exactly (docs/math.md §2: they are additive).

        Shards are re-centred to the first shard's shift and, under forgetting, decayed
        to the latest time; a group present in several shards gets the sum of its rows.
        """
        first = shards[0]
        out = first.copy()
        if first.half_life:
            out.now = max(s.now for s in shards)
            out.decay_to_now()
        for other in shards[1:]:
            if other.formula != first.formula or other.half_life != first.half_life:
                raise ValueError("only statistics of the same formula and half_life merge")
            o = other.copy()
            if o.shift is None:
                continue
            if out.shift is None:
                out.shift = o.shift.copy()
            o.reshift(out.shift)
            if first.half_life:
                o.now = out.now
                o.decay_to_now()
            rows = out.rows(o.keys, o.part)
            np.add.at(out.S, rows, o.S[: o.n_groups])
            if first.half_life:
                out.tg[rows] = out.now
        return out

    def nbytes(self) -> int:
        """Approximate memory held: arrays, key index and key objects."""
        total = self.S.nbytes + self.tg.nbytes + self.part.nbytes + sys.getsizeof(self.index)
        total += sys.getsizeof(self.keys)
        total += sum(sys.getsizeof(k) + sys.getsizeof(r) for k, r in self.index.items())
        return total
