"""Reservoir: a bounded uniform sample of a stream's events, the same in any order.

The sufficient statistics cannot give what needs rows: lme4's residual quantiles at the
fitted parameters, residual pictures, brms's default priors (the median and MAD of the
response) or predictive checks. So the model also keeps a sample of its events: at
most ``capacity`` (10,000 by default) distinct events, with how many times each was
seen (its summed frequency weight).

Which events are kept depends only on their content, never on arrival order or on how
the stream was split. Every event gets a *priority*, a 64-bit hash of its content (the
group key, the response and the raw field values, read back from its union columns:
numeric fields from their columns, a factor's level from its dummy columns), and the
reservoir keeps the events with the ``capacity`` smallest priorities ("bottom-k").
Equal content has equal priority: a repeated event raises its count instead of taking
a second place. So:

- the sample is a uniform random sample of the distinct events (a good hash spreads
  priorities uniformly), and counts make its statistics those of the events;
- while the stream holds at most ``capacity`` distinct events, the sample *is* the
  stream, and everything computed from it is exact;
- ``learn_one`` loops, ``learn_many`` batches and any order of the same events keep the
  same sample, bit for bit;
- two reservoirs of disjoint shards merge exactly (:meth:`Reservoir.merge`): the
  bottom-k of a union is the bottom-k of the two bottom-k's.

Priorities are 53-bit integers held as float64 (exact), so they serialise with the
snapshot's other arrays. Formulas whose raw fields cannot be read back from the union
columns (a numeric field used only inside a transform or an interaction, a factor used
only in interactions) hash the union columns instead: still a uniform sample, but one
that depends on the order in which factor levels first appeared
(``Reservoir.order_free`` is then False).

Examples
--------
>>> import numpy as np
>>> from streamlmm.design import Design
>>> d = Design("y ~ x + (1 | g)")
>>> _ = d.encode_one({"x": 1.0}, np.empty(2), learn=True)
>>> r = Reservoir(capacity=10)
>>> r.sync_keys(["a", "b"])
>>> A = np.array([[1.0, 0.5], [1.0, 1.5], [1.0, 0.5], [1.0, 2.5], [1.0, 3.5]])
>>> rows = np.array([0, 1, 0, 1, 0])
>>> y = np.array([1.0, 2.0, 1.0, 3.0, 4.0])
>>> r.offer(rows, A, y, np.ones(5), d)
>>> r.size, r.n_seen, r.n_events, r.exact  # events 0 and 2 are one event seen twice
(4, 5.0, 5.0, True)

"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = [
    "Reservoir",
    "CAPACITY",
    "key_hash",
    "priority",
    "priority_one",
    "priorities",
    "weighted_quantiles",
]

CAPACITY = 10_000
_OPTS = {"cache": True, "nogil": True}
_NONE = math.inf  # the threshold of a reservoir that is not full: every priority enters


# -- hashing ---------------------------------------------------------------------------------
def _hash64(data: bytes) -> int:
    """A 64-bit hash of bytes (BLAKE2b), as a signed int64 value."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def key_hash(key: str | int) -> int:
    """The content word of a group key: str and int keys never collide with each other.

    >>> key_hash("17") != key_hash(17), key_hash("a") == key_hash("a")
    (True, True)

    """
    if isinstance(key, str):
        return _hash64(b"s" + key.encode("utf-8", "surrogatepass"))
    return _hash64(b"i" + int(key).to_bytes(16, "little", signed=True))


def _level_hash(field: str, level: str) -> int:
    return _hash64(b"f" + field.encode("utf-8", "surrogatepass") + b"\x00" + level.encode())


@intrinsic
def _bits(typingctx, x):  # pragma: no cover - compiled
    """The IEEE-754 bits of a float64, as an int64."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@njit(inline="always", **_OPTS)
def _fmix(h):  # pragma: no cover - numba
    """MurmurHash3's 64-bit finaliser (uint64 → uint64, a bijection that mixes well)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB93FE53A85B)
    h ^= h >> np.uint64(33)
    return h


@njit(inline="always", **_OPTS)
def _mix(h, word):  # pragma: no cover - numba
    return _fmix(h ^ (np.uint64(word) + np.uint64(0x9E3779B97F4A7C15)))


@njit(inline="always", **_OPTS)
def _fword(x):  # pragma: no cover - numba
    """A float's content word (``-0.0`` and ``0.0`` are the same value)."""
    return _bits(x + 0.0)  # -0.0 + 0.0 == +0.0


@njit(inline="always", **_OPTS)
def priority(kh, a, y, plan):  # pragma: no cover - numba
    """The priority of one event: its group's key word ``kh``, response ``y`` and union
    values ``a`` read through ``plan`` (:meth:`Reservoir.plan_of`); a 53-bit integer as
    a float64.

    ``plan = [n_num, num positions…, n_fac, (n_levels, (position, word)…, reference
    word) per factor]``: a numeric field is the value at its position, a factor field
    the word of the level whose dummy is 1 (the reference level's when none is)."""
    h = _mix(np.uint64(kh), _fword(y))
    n = plan[0]
    for i in range(1, 1 + n):
        h = _mix(h, _fword(a[plan[i]]))
    at = 2 + n  # the first factor's level count
    for _ in range(plan[1 + n]):
        m = plan[at]
        word = plan[at + 1 + 2 * m]  # the reference level's
        for t in range(m):
            if a[plan[at + 1 + 2 * t]] == 1.0:
                word = plan[at + 2 + 2 * t]
                break
        h = _mix(h, word)
        at += 2 + 2 * m
    return float(_fmix(h) >> np.uint64(11))


@njit(**_OPTS)
def priority_one(kh, a, y, plan):  # pragma: no cover - numba
    """:func:`priority` of one event (``learn_one``'s general path)."""
    return priority(kh, a, y, plan)


@njit(**_OPTS)
def priorities(rows, A, y, khash, plan, out):  # pragma: no cover - numba
    """:func:`priority` of every event (row ``e`` of ``A`` in group row ``rows[e]``)."""
    for e in range(rows.shape[0]):
        out[e] = priority(khash[rows[e]], A[e], y[e], plan)


# -- the kept events' index: a max-heap of slots by priority, and a hash table from
# priority to slot (linear probing; -1 is an empty cell), both in arrays, so that one
# insertion is one compiled call
@njit(inline="always", **_OPTS)
def _sift_down(heap, n, i, P):  # pragma: no cover - numba
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and P[heap[c + 1]] > P[heap[c]]:
            c += 1
        if P[heap[c]] <= P[heap[i]]:
            return
        heap[i], heap[c] = heap[c], heap[i]
        i = c


@njit(inline="always", **_OPTS)
def _sift_up(heap, i, P):  # pragma: no cover - numba
    while i > 0:
        up = (i - 1) // 2
        if P[heap[up]] >= P[heap[i]]:
            return
        heap[i], heap[up] = heap[up], heap[i]
        i = up


@njit(inline="always", **_OPTS)
def _find(tkeys, tvals, key):  # pragma: no cover - numba
    """The slot of ``key`` and its cell, or ``(-1, the empty cell where it would go)``."""
    mask = tkeys.shape[0] - 1
    h = np.int64(_fmix(np.uint64(key)) & np.uint64(mask))
    while tkeys[h] != -1:
        if tkeys[h] == key:
            return tvals[h], h
        h = (h + 1) & mask
    return -1, h


@njit(inline="always", **_OPTS)
def _forget(tkeys, tvals, h):  # pragma: no cover - numba
    """Empty cell ``h`` by backward shifting (linear probing keeps no tombstones)."""
    mask = tkeys.shape[0] - 1
    i = h
    j = h
    while True:
        j = (j + 1) & mask
        if tkeys[j] == -1:
            break
        home = np.int64(_fmix(np.uint64(tkeys[j])) & np.uint64(mask))
        # move j back to i unless its home lies cyclically in (i, j]
        if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            tkeys[i] = tkeys[j]
            tvals[i] = tvals[j]
            i = j
    tkeys[i] = -1


@njit(**_OPTS)
def _insert(P, R, Y, C, A, heap, tkeys, tvals, meta, prio, r, a, y, w):  # pragma: no cover
    """Keep one event (priority ``prio``, group row ``r``, union values ``a``, response
    ``y``, weight ``w``): the same event again adds its weight; a new one takes a free
    slot, or the slot of the largest priority when all ``capacity`` are taken. Returns
    the new threshold (the largest kept priority when full, else inf), or -1 when the
    arrays must grow first (nothing was changed)."""
    key = np.int64(prio)
    s, h = _find(tkeys, tvals, key)
    if s >= 0:
        C[s] += w
        return P[heap[0]] if meta[0] == meta[1] else np.inf
    n, cap = meta[0], meta[1]
    if n < cap:
        if n >= P.shape[0] or 2 * (n + 1) > tkeys.shape[0]:
            return -1.0
        s = n
        meta[0] = n + 1
        heap[n] = s
    else:
        s = heap[0]
        _, old = _find(tkeys, tvals, np.int64(P[s]))
        _forget(tkeys, tvals, old)
        _, h = _find(tkeys, tvals, key)  # the cell may have moved back
    P[s] = prio
    R[s] = r
    Y[s] = y
    C[s] = w
    k = min(A.shape[1], a.shape[0])
    for j in range(k):
        A[s, j] = a[j]
    for j in range(k, A.shape[1]):
        A[s, j] = 0.0
    tkeys[h] = key
    tvals[h] = s
    if n < cap:
        _sift_up(heap, n, P)
    else:
        _sift_down(heap, cap, 0, P)
    return P[heap[0]] if meta[0] == cap else np.inf


@njit(**_OPTS)
def _index(P, n, heap, tkeys, tvals):  # pragma: no cover - numba
    """Rebuild the heap and the table of the first ``n`` slots."""
    tkeys[:] = -1
    for s in range(n):
        heap[s] = s
        _, h = _find(tkeys, tvals, np.int64(P[s]))
        tkeys[h] = np.int64(P[s])
        tvals[h] = s
    for i in range(n // 2 - 1, -1, -1):
        _sift_down(heap, n, i, P)


# -- quantiles -------------------------------------------------------------------------------
def weighted_quantiles(x: np.ndarray, w: np.ndarray, probs) -> np.ndarray:
    """R's type-7 quantiles (``quantile()``'s default) of ``x`` with each value repeated
    ``w`` times (``w`` integer counts; a fractional count is rounded up to a whole
    repeat when the order statistic falls inside it).

    >>> weighted_quantiles(np.array([3.0, 1.0, 2.0]), np.array([1.0, 2.0, 1.0]), [0, 0.5, 1])
    array([1. , 1.5, 3. ])
    >>> np.quantile([1.0, 1.0, 2.0, 3.0], [0, 0.5, 1])
    array([1. , 1.5, 3. ])

    """
    o = np.argsort(x, kind="stable")
    xs, cw = x[o], np.cumsum(w[o])
    N = cw[-1]
    out = []
    for p in np.atleast_1d(probs):
        h = (N - 1.0) * float(p)  # 0-based position in the repeated sequence
        lo = math.floor(h)
        i = min(int(np.searchsorted(cw, lo, side="right")), xs.shape[0] - 1)
        j = min(int(np.searchsorted(cw, lo + 1, side="right")), xs.shape[0] - 1)
        out.append(xs[i] + (h - lo) * (xs[j] - xs[i]))
    return np.array(out)


# -- the reservoir ---------------------------------------------------------------------------
class Reservoir:
    """At most ``capacity`` distinct events with their counts, chosen by content (see the
    module's text).

    Attributes
    ----------
    A, y, count, prio, row
        The kept events (the first ``size`` rows): union values, response, summed
        frequency weight, priority and group row in the statistics.
    n_seen
        Summed frequency weight of every event offered.
    order_free
        Whether priorities come from the raw fields (False: from the union columns).
    """

    def __init__(self, capacity: int = CAPACITY):
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError(f"reservoir capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.k = 0
        self.n_seen = 0.0
        self.A = np.zeros((0, 0))
        self.y = np.zeros(0)
        self.count = np.zeros(0)
        self.prio = np.zeros(0)
        self.row = np.zeros(0, dtype=np.int64)
        self.threshold = _NONE
        self._meta = np.array([0, capacity], dtype=np.int64)  # [size, capacity]
        self._heap = np.zeros(0, dtype=np.int64)
        self._tkeys = np.full(4, -1, dtype=np.int64)
        self._tvals = np.zeros(4, dtype=np.int64)
        self.khash = np.zeros(64, dtype=np.int64)
        self.n_keys = 0
        self.plan = np.zeros(2, dtype=np.int64)
        self.order_free = True
        self._plan_of: tuple[int, int] | None = None  # (id(design), version) of the plan

    # -- keys and the plan ------------------------------------------------------------------
    def sync_keys(self, keys) -> None:
        """Hash the group keys the statistics gained since the last call (rows in order)."""
        n = len(keys)
        if n <= self.n_keys:
            return
        if n > self.khash.shape[0]:
            grown = np.zeros(max(n, 2 * self.khash.shape[0]), dtype=np.int64)
            grown[: self.n_keys] = self.khash[: self.n_keys]
            self.khash = grown
        for r in range(self.n_keys, n):
            self.khash[r] = key_hash(keys[r])
        self.n_keys = n

    def new_key(self, r: int, key) -> None:
        """Row ``r`` was just made for ``key`` (``learn_one``'s fast path)."""
        if r >= self.khash.shape[0]:
            grown = np.zeros(2 * self.khash.shape[0], dtype=np.int64)
            grown[: self.n_keys] = self.khash[: self.n_keys]
            self.khash = grown
        self.khash[r] = key_hash(key)
        self.n_keys = r + 1

    def plan_of(self, design) -> np.ndarray:
        """The design's content plan (see :func:`priority`), rebuilt when it changed."""
        tag = (id(design), design.version, design.k)
        if self._plan_of != tag:
            self.plan, self.order_free = _build_plan(design)
            self._plan_of = tag
        return self.plan

    # -- offering events --------------------------------------------------------------------
    def widen(self, k: int) -> None:
        """New union columns at the end (a factor level seen first): zeros, as in the
        statistics."""
        if k > self.k:
            A = np.zeros((self.A.shape[0], k))
            A[:, : self.A.shape[1]] = self.A
            self.A, self.k = A, k

    def offer(self, rows, A, y, w, design, prio: np.ndarray | None = None) -> None:
        """Offer a batch of validated events of positive weight."""
        n = rows.shape[0]
        if n == 0:
            return
        self.n_seen += float(w.sum())
        self.widen(A.shape[1])
        if prio is None:
            prio = np.empty(n)
            priorities(rows, A, y, self.khash, self.plan_of(design), prio)
        take = np.flatnonzero(prio <= self.threshold)
        if take.shape[0] == 0:
            return
        if take.shape[0] <= 32:
            for e in take.tolist():
                self._add(float(prio[e]), int(rows[e]), A[e], float(y[e]), float(w[e]))
            return
        self._merge_arrays(prio[take], rows[take], A[take], y[take], w[take])

    def offer_one(self, prio: float, r: int, a: np.ndarray, y: float, w: float) -> None:
        """Offer one event whose priority is known (``learn_one``)."""
        self.n_seen += w
        if prio <= self.threshold:
            self._add(prio, r, a, y, w)

    @property
    def size(self) -> int:
        """How many distinct events are kept."""
        return int(self._meta[0])

    def _add(self, prio: float, r: int, a: np.ndarray, y: float, w: float) -> None:
        """Keep one event (:func:`_insert`, one compiled call), growing the arrays first
        when they are full."""
        while True:
            t = _insert(
                self.prio,
                self.row,
                self.y,
                self.count,
                self.A,
                self._heap,
                self._tkeys,
                self._tvals,
                self._meta,
                prio,
                r,
                a,
                y,
                w,
            )
            if t >= 0.0:
                self.threshold = t
                return
            self._grow(self.size + 1)

    def _grow(self, n: int) -> None:
        """Room for ``n`` kept events (arrays double, up to the capacity), and a table
        at most half full."""
        rows = self.prio.shape[0]
        if n > rows:
            rows = min(self.capacity, max(n, 2 * rows, 64))
            size = self.size
            for name in ("y", "count", "prio"):
                old = getattr(self, name)
                new = np.zeros(rows)
                new[:size] = old[:size]
                setattr(self, name, new)
            row = np.zeros(rows, dtype=np.int64)
            row[:size] = self.row[:size]
            self.row = row
            A = np.zeros((rows, self.k))
            A[:size, : self.A.shape[1]] = self.A[:size]
            self.A = A
            heap = np.zeros(rows, dtype=np.int64)
            heap[:size] = self._heap[:size]
            self._heap = heap
        cells = 4
        while cells < 2 * rows:
            cells *= 2
        if cells != self._tkeys.shape[0]:
            self._tkeys = np.full(cells, -1, dtype=np.int64)
            self._tvals = np.zeros(cells, dtype=np.int64)
            _index(self.prio, self.size, self._heap, self._tkeys, self._tvals)

    def _merge_arrays(self, prio, rows, A, y, w) -> None:
        """Merge a batch into the kept events: equal priorities pool their counts (the
        first content is kept), then the ``capacity`` smallest priorities stay."""
        n0 = self.size
        P = np.concatenate([self.prio[:n0], prio])
        R = np.concatenate([self.row[:n0], rows])
        AA = np.concatenate([self.A[:n0], _width(A, self.k)])
        Y = np.concatenate([self.y[:n0], y])
        C = np.concatenate([self.count[:n0], w])
        order = np.argsort(P, kind="stable")
        P = P[order]
        first = np.flatnonzero(np.r_[True, P[1:] != P[:-1]])
        C = np.add.reduceat(C[order], first)
        keep = order[first][: self.capacity]
        self._set(P[first][: self.capacity], R[keep], AA[keep], Y[keep], C[: self.capacity])

    def _set(self, prio, row, A, y, count) -> None:
        """Keep exactly these events (sorted by priority), and index them."""
        m = prio.shape[0]
        self._meta[0] = 0
        self._grow(m)
        self.prio[:m], self.row[:m], self.y[:m], self.count[:m] = prio, row, y, count
        self.A[:m] = A
        self._meta[0] = m
        _index(self.prio, m, self._heap, self._tkeys, self._tvals)
        self.threshold = float(prio[-1]) if m == self.capacity else _NONE

    @classmethod
    def merge(cls, parts: list[tuple], k: int, *, keys=None, design=None) -> Reservoir:
        """One reservoir from those of disjoint shards; ``parts`` are triples of a
        reservoir, the map from its group rows to the merged statistics' rows, and the
        map ``T`` of its union columns to the merged ones (``a_merged = T a``,
        :func:`streamlmm.design.align`; ``None``: the same columns); ``k`` is the merged
        width. Kept rows are carried into the merged columns as the statistics are.
        Their priorities stay: they read the raw fields, the same in any design, unless
        a part hashes its union columns (``order_free`` False) and its columns moved:
        then its rows get the priorities of the merged ``design`` (group ``keys`` of the
        merged statistics), still a uniform sample, but not the one a single model
        over every event would keep."""
        parts = [tuple(part) if len(part) == 3 else (*part, None) for part in parts]
        out = cls(max(p.capacity for p, _, _ in parts))
        out.widen(k)
        out.n_seen = sum(p.n_seen for p, _, _ in parts)
        out.order_free = all(p.order_free for p, _, _ in parts)
        cat = [(p, m, T) for p, m, T in parts if p.size]
        if not cat:
            return out
        prio, rows, A = [], [], []
        for p, m, T in cat:
            n = p.size
            r = m[p.row[:n]]
            a = _width(p.A[:n], k) if T is None else _width(p.A[:n], T.shape[1]) @ T.T
            pr = p.prio[:n]
            if T is not None and not p.order_free:
                out.sync_keys(keys)
                pr = np.empty(n)
                priorities(r, a, p.y[:n], out.khash, out.plan_of(design), pr)
            prio.append(pr)
            rows.append(r)
            A.append(a)
        out._merge_arrays(
            np.concatenate(prio),
            np.concatenate(rows),
            np.concatenate(A),
            np.concatenate([p.y[: p.size] for p, _, _ in cat]),
            np.concatenate([p.count[: p.size] for p, _, _ in cat]),
        )
        return out

    # -- what it gives ----------------------------------------------------------------------
    @property
    def n_events(self) -> float:
        """Summed count of the kept events (= :attr:`n_seen` while the sample is the stream)."""
        return float(self.count[: self.size].sum())

    @property
    def exact(self) -> bool:
        """Whether the sample holds every event offered."""
        return self.n_events == self.n_seen

    def residuals(self, xi, zi, fixef, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(fitted, residual, count)`` of the kept events at the fixed effects ``fixef``
        (one per fixed column at union positions ``xi``; NaN for a dropped one) and the
        groups' effects ``b`` (rows of the statistics; columns at ``zi``):
        ``ŷ = x'β̂ + z'b̂_g``, as lme4's ``fitted()``. An event of a group past ``b``'s
        rows gets the fixed part alone."""
        n = self.size
        A, rows = self.A[:n], self.row[:n]
        fitted = A[:, np.asarray(xi)] @ np.nan_to_num(np.asarray(fixef, dtype=float))
        ok = rows < b.shape[0]
        fitted[ok] += np.einsum("ij,ij->i", A[ok][:, np.asarray(zi)], b[rows[ok]])
        return fitted, self.y[:n] - fitted, self.count[:n].copy()

    def to_state(self) -> dict[str, Any]:
        s = self.size
        return {
            "res_capacity": self.capacity,
            "res_seen": self.n_seen,
            "res_order_free": self.order_free,
            "res_A": self.A[:s].copy(),
            "res_y": self.y[:s].copy(),
            "res_count": self.count[:s].copy(),
            "res_prio": self.prio[:s].copy(),
            "res_row": self.row[:s].astype(float),
        }

    @classmethod
    def from_state(cls, state, k: int) -> Reservoir:
        r = cls(int(state.get("res_capacity", CAPACITY)))
        r.widen(k)
        r.n_seen = float(state.get("res_seen", 0.0))
        r.order_free = bool(state.get("res_order_free", True))
        if "res_prio" in state and len(state["res_prio"]):
            r._set(
                np.array(state["res_prio"], dtype=float),
                np.array(state["res_row"], dtype=float).astype(np.int64),
                _width(np.asarray(state["res_A"], dtype=float).reshape(-1, k), k),
                np.array(state["res_y"], dtype=float),
                np.array(state["res_count"], dtype=float),
            )
        return r


def _width(A: np.ndarray, k: int) -> np.ndarray:
    """``A`` with zero columns up to ``k`` (rows kept before a widening)."""
    if A.shape[1] >= k:
        return A[:, :k]
    out = np.zeros((A.shape[0], k))
    out[:, : A.shape[1]] = A
    return out


def _build_plan(design) -> tuple[np.ndarray, bool]:
    """The content plan of :func:`priority` for ``design``, and whether it reads the raw
    fields back (order-free) or falls back to every union column."""
    info = design.field_columns()
    plan: list[int] = []
    complete = info is not None
    if complete:
        num, facs = info
        plan.append(len(num))
        plan.extend(num)
        plan.append(len(facs))
        for fld, dummies, ref in facs:
            plan.append(len(dummies))
            for pos, level in dummies:
                plan += [pos, _level_hash(fld, level)]
            plan.append(_level_hash(fld, ref) if ref is not None else 0)
    else:
        plan = [design.k, *range(design.k), 0]
    return np.array(plan, dtype=np.int64), complete
