"""Learner: events in, sufficient statistics out (the learning side of a model).

A :class:`Learner` validates events (:class:`~streamlmm.rows.RowReader`), encodes them
into union columns (:class:`~streamlmm.design.Design`, which learns factor levels and
widens), adds them to their groups' rows (:class:`~streamlmm.stats.GroupStats`, O(1)
per event) and offers them to the model's sample of events
(:class:`~streamlmm.reservoir.Reservoir`). Every way in — one event, a DataFrame, a
validated batch, the stream engine's coded batch — ends in the same rows, bit for bit.

It knows nothing of parameters: :class:`~streamlmm.model.MixedLM`,
:class:`~streamlmm.mixed.MixedEffects` and the scale-out worker learn through it, and
a prediction path (:mod:`streamlmm.predictor`) reads the statistics it keeps. Two
hooks connect them: ``forget`` (a mapping from group key to a cached prediction, whose
entry is dropped when the group's statistics change) and ``on_layout`` (called when the
union columns change).

Examples
--------
>>> lr = Learner("y ~ x + (1 | g)")
>>> for i in range(6):
...     lr.learn_one({"g": f"g{i % 2}", "x": float(i)}, 2.0 * i)
>>> lr.n_events, lr.stats.n_groups, lr.stats.means()[lr.stats.row("g1")].tolist()
(6, 2, [3.0, 6.0])

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import numpy as np

from streamlmm import kernels
from streamlmm.design import Design
from streamlmm.keys import MAX_KEY_LEN, text_problem
from streamlmm.reservoir import CAPACITY, Reservoir, priority_one
from streamlmm.rows import RowReader
from streamlmm.stats import GroupStats
from streamlmm.values import MAX_ABS, overflow_message

__all__ = ["Learner", "batch_columns"]

_LO = -MAX_ABS  # the fast paths' lower bound, without negating MAX_ABS per value
_NO_PLAN = np.empty(0, dtype=np.int64)  # kernels.accumulate_coded: no reservoir
_NO_KEYS = np.empty(0, dtype=np.int64)


class Learner:
    """The statistics of a mixed model and every way of adding events to them.

    Parameters
    ----------
    formula
        The lme4 formula (its response names the field the batch paths read).
    levels, half_life, time_key, missing, reservoir
        As :class:`~streamlmm.model.MixedLM`'s.
    forget
        A mapping whose entry for a group is removed when that group's statistics change
        (the prediction path's per-group cache).
    on_layout
        Called with the old union width when the union columns change (a factor level seen
        for the first time, a restored or adopted design).

    Attributes
    ----------
    design, reader, stats, res
        The design, the row validator, the statistics and the sample of events.
    n_events, n_skipped
        Events learned, and events skipped for a missing value (``missing="skip"``).
    """

    def __init__(
        self,
        formula: str,
        levels: Mapping[str, list[str]] | None = None,
        half_life: float | None = None,
        time_key: str | None = None,
        missing: str = "raise",
        reservoir: int = CAPACITY,
        forget: MutableMapping | None = None,
        on_layout: Callable[[int], None] | None = None,
    ):
        if not (isinstance(reservoir, int) and reservoir >= 0):
            raise ValueError(f"reservoir must be an int >= 0, got {reservoir!r}")
        self.formula_text = formula
        self.half_life = half_life
        self.time_key = time_key
        self.missing = missing
        self.design = Design(formula, levels)
        self.formula = self.design.formula
        self.reader = RowReader(self.design, time_key, missing)
        self.stats = GroupStats(self.design, half_life)
        self.res = Reservoir(reservoir) if reservoir else None
        self.forget: MutableMapping = forget if forget is not None else {}
        self.on_layout = on_layout
        self.n_events = 0
        self.n_skipped = 0
        self._fast1: tuple = ()  # learn_one's fast path (see _fast_layout); () when none
        self._fastc = None  # learn_one's fast path for formulas with factors (_learn_coded)
        self._laid_out = False
        self._coded: tuple | None = None  # learn_coded's rows by code (see _code_rows)

    # -- one event ------------------------------------------------------------------------
    def learn_one(self, x: Mapping[str, Any], y: float, w: float = 1.0) -> None:
        """Accumulate one event. Invalid input raises ``ValueError`` and changes nothing."""
        fast = self._fast1
        if fast and w == 1.0 and type(y) is float and _LO <= y <= MAX_ABS:
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
        elif self._fastc is not None and w == 1.0 and type(y) is float:
            if _LO <= y <= MAX_ABS and self._learn_coded(x, y):
                return
        self._learn_one(x, y, w)

    def _learn_coded(self, x: Mapping[str, Any], y: float) -> bool:
        """:meth:`learn_one`'s fast path for formulas with factors (see
        :meth:`_fast_layout`): True if it learned the event, False if the general path
        must (a new level, a missing or mistyped value, a long key)."""
        group, nums, facs, vals, codes, recipe, a, st, coefs, res, plan, khash = self._fastc
        key = x.get(group)
        if not (type(key) is int or (type(key) is str and len(key) <= MAX_KEY_LEN)):
            return False
        j = 0
        for c in nums:
            v = x.get(c)
            if type(v) is not float or not _LO <= v <= MAX_ABS:
                return False
            vals[j] = v
            j += 1
        j = 0
        for c, table in facs:
            v = x.get(c)
            code = table.get(v) if type(v) is str else None
            if code is None:
                return False
            codes[j] = code
            j += 1
        r = st.index.get(key)
        if r is None:
            if type(key) is str and not key.isascii() and text_problem(key):
                return False  # the general path refuses it, naming the field
            r = st._new_row(key)
            if res is not None:
                res.new_key(r, key)
        if res is None:
            kernels.accumulate_coded(st.M, r, vals, codes, recipe, a, y, st.vi, st.P, khash, plan)
        else:
            prio = kernels.accumulate_coded(
                st.M, r, vals, codes, recipe, a, y, st.vi, st.P, res.khash, plan
            )
            res.n_seen += 1.0
            if prio <= res.threshold:
                res._add(prio, r, a, y, 1.0)
        coefs.pop(key, None)
        self.n_events += 1
        return True

    def _fast_layout(self) -> tuple:
        """What :meth:`learn_one`'s fast paths need (and sets ``_fastc``, the path for
        formulas with factors), or ``()`` when the plain one does not apply: plain
        numeric columns known, the response a plain field, no time key or forgetting.
        The path for factors (:meth:`_learn_coded`) needs the same, and columns that
        :meth:`Design.coded_recipe` can fill."""
        d = self.design
        self._fastc = None
        if (
            not self.formula.response_expr.is_field
            or self.time_key is not None
            or self.half_life is not None
            or d.k != self.stats.k
        ):
            return ()
        coded = d.coded_recipe() if d.plain is None else None
        if d.plain is None and coded is None:
            return ()
        if self.reader.a.shape[0] < d.k:
            self.reader.a = np.empty(d.k)
        a = self.reader.a
        for i in d.ones:
            a[i] = 1.0
        res = self.res
        if res is not None:
            res.sync_keys(self.stats.keys)
            res.widen(d.k)
        plan = res.plan_of(d) if res is not None else None
        if coded is not None:
            nums, facs, recipe = coded
            self._fastc = (
                self.formula.group,
                nums,
                facs,
                np.empty(max(len(nums), 1)),
                np.empty(max(len(facs), 1), dtype=np.int64),
                recipe,
                a,
                self.stats,
                self.forget,
                res,
                plan if plan is not None else _NO_PLAN,
                _NO_KEYS,
            )
            return ()
        return self.formula.group, d.plain, a, self.stats, self.forget, res, plan

    def _learn_one(self, x: Mapping[str, Any], y: float, w: float) -> None:
        reader = self.reader
        wt = reader.weight(w)
        t = reader.time(x) if self.time_key is not None else float(self.n_events + 1)
        if wt == 0.0:
            return
        design = self.design
        before = design.to_state() if wt > 1.0 else None
        key = reader.read(x, y)
        if key is None:
            self.n_skipped += 1
            return
        a = reader.a
        if wt > 1.0:  # |v| ≤ MAX_ABS, so only a weight above 1 can overflow w·v·v'
            try:
                self.check_products(a[None, : design.k], np.array([reader.y]), np.array([wt]))
            except ValueError:
                self.restore_design(before)
                raise
        if design.k != self.stats.k:
            self.widen()
        self.stats.add_one(key, a, reader.y, wt, t)
        self.forget.pop(key, None)
        self.n_events += 1
        res = self.res
        if res is not None:
            st = self.stats
            res.sync_keys(st.keys)
            res.widen(design.k)
            r = st.index[key]
            prio = priority_one(res.khash[r], a, reader.y, res.plan_of(design))
            res.offer_one(prio, r, a[: design.k], reader.y, wt)
        if not self._laid_out:
            self._fast1 = self._fast_layout()
            self._laid_out = True

    # -- the layout -------------------------------------------------------------------------
    def restore_design(self, before: dict[str, Any]) -> None:
        """Put the design back to ``before`` if a failed call taught it anything."""
        if self.design.to_state() != before:
            self.set_design(Design.from_state(self.formula_text, before))

    def set_design(self, design: Design) -> None:
        """Adopt ``design`` (a restored one: a failed batch must leave no level behind)."""
        self.design = design
        self.formula = design.formula
        self.reader.design = design
        self.stats.spec = design
        self._relaid(self.stats.k)

    def set_stats(self, stats: GroupStats, res: Reservoir | None, n_events: int) -> None:
        """Adopt statistics (and their sample of events) built elsewhere: a snapshot's
        state, merged shards, the scale-out fitter's rows."""
        self.stats = stats
        stats.spec = self.design
        self.res = res
        self.n_events = int(n_events)
        self._coded = None
        self._relaid(stats.k)

    def widen(self) -> None:
        """New union columns (a factor level seen for the first time): widen the
        statistics and the sample with exact zeros."""
        k_old = self.stats.k
        self.stats.widen(self.design)
        if self.res is not None:
            self.res.widen(self.stats.k)
        self._relaid(k_old)

    def _relaid(self, k_old: int) -> None:
        """The union columns or the statistics changed: rebuild the fast paths, tell
        whoever predicts."""
        self._fast1, self._fastc, self._laid_out = (), None, False
        if self.on_layout is not None:
            self.on_layout(k_old)

    def check_products(self, A, y, w) -> None:
        """``ValueError`` naming the row and field whose weighted products would overflow."""
        e = self.stats.check(A, y, w, self.design.columns)
        if e < 0:
            return
        names = [*self.design.columns, self.formula.response_field]
        where = f"row {e}: " if A.shape[0] > 1 else ""
        raise ValueError(where + overflow_message(names, np.append(A[e], y[e]), w[e]))

    # -- batches --------------------------------------------------------------------------
    def learn_many(self, X, y, w=None) -> None:
        """Accumulate a batch (pandas DataFrame; ``y`` and ``w`` one value per row),
        exactly as a :meth:`learn_one` loop.

        With ``missing="raise"`` one bad row rejects the whole batch (``ValueError``
        naming the row and field) and nothing changes; with ``"skip"`` rows with a
        missing value are dropped and counted in ``n_skipped``.
        """
        cols, yv, wv = batch_columns(X, y, w, self.formula.group)
        n = len(yv)
        before = self.design.to_state()
        try:
            codes, uniques, A, yk, wk, tk, kept = self.reader.read_columns(cols, yv, wv)
            self.check_products(A, yk, wk)
        except ValueError:
            self.restore_design(before)
            raise
        if self.design.k != self.stats.k:
            self.widen()
        self.n_skipped += n - kept.shape[0]
        # new groups get rows in the order of their first kept event, as in a learn_one loop
        if kept.shape[0] == n and (wv is None or (wk > 0).all()):
            urows = self.stats.rows(uniques)  # factorize orders by first appearance
            touched = uniques
        else:
            idx = _first_order(codes[wk > 0])
            touched = [uniques[j] for j in idx.tolist()]
            urows = np.full(len(uniques), -1, dtype=np.int64)
            urows[idx] = self.stats.rows(touched)
        self._accumulate(urows[codes], A, yk, wk, tk, touched)

    def learn_batch(self, keys, A, y, w, t=None) -> None:
        """Accumulate a batch that is already validated: ``keys`` are checked group keys,
        ``A`` the union columns, ``t`` the event times (``None`` without ``time_key``)."""
        self.check_products(A, y, w)
        if self.design.k != self.stats.k:
            self.widen()
        keep = w > 0
        rows = np.full(len(keys), -1, dtype=np.int64)
        idx = np.flatnonzero(keep)
        touched = [keys[i] for i in idx]
        rows[idx] = self.stats.rows(touched)
        self._accumulate(rows, A, y, w, t, touched)

    def learn_coded(self, uniques, codes, A, y, w, t=None) -> None:
        """Accumulate a validated batch whose group keys are coded (the stream engine's
        path): event ``i`` is in group ``uniques[codes[i]]``. ``uniques`` may be a list
        that only grows between calls (a decoder's key table): the row of each code is
        kept, so only keys new to the statistics are looked up. Otherwise as
        :meth:`learn_batch`: new groups get rows in the order of their first event of
        positive weight.
        """
        self.check_products(A, y, w)
        if self.design.k != self.stats.k:
            self.widen()
        rows = self._code_rows(uniques)
        pos = w > 0
        new = _first_order(codes[pos & (rows[codes] < 0)])
        if new.shape[0]:
            rows[new] = self.stats.rows([uniques[j] for j in new.tolist()])
        touched = [uniques[j] for j in np.unique(codes[pos]).tolist()] if self.forget else []
        self._accumulate(rows[codes], A, y, w, t, touched)

    def _code_rows(self, uniques) -> np.ndarray:
        """The statistics row of each code of ``uniques`` (-1: not looked up yet), kept
        while ``uniques`` and the statistics are the same objects."""
        cache = self._coded
        if cache is None or cache[0] is not uniques or cache[1] is not self.stats:
            cache = (uniques, self.stats, np.empty(0, dtype=np.int64))
        rows = cache[2]
        if rows.shape[0] < len(uniques):
            rows = np.full(max(len(uniques), 2 * rows.shape[0]), -1, dtype=np.int64)
            rows[: cache[2].shape[0]] = cache[2]
        self._coded = (uniques, self.stats, rows)
        return rows

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
        self.stats.add(rows, A, y, w, t)
        self._forget_groups(keys)
        self.n_events += n
        res = self.res
        if res is not None:
            res.sync_keys(self.stats.keys)
            res.offer(rows, A, y, w, self.design)

    def _forget_groups(self, keys: list) -> None:
        """Drop the cached predictions of groups ``keys`` (their statistics changed); all
        of them at once when that is cheaper."""
        cache = self.forget
        if len(keys) >= len(cache):
            cache.clear()
        else:
            for key in keys:
                cache.pop(key, None)

    # -- state ----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """The statistics, design and sample of events, as a snapshot's state holds them."""
        return {
            **self.stats.to_state(),
            "design": self.design.to_state(),
            "time_key": self.time_key,
            "missing": self.missing,
            "n_skipped": self.n_skipped,
            **(self.res.to_state() if self.res is not None else {"res_capacity": 0}),
        }

    def load_state(self, state: Mapping[str, Any], keys, n_events: int) -> None:
        """Take the statistics, design and sample from a snapshot's state."""
        self.set_design(Design.from_state(self.formula_text, state["design"]))
        stats = GroupStats.from_state(self.design, keys, state)
        res = Reservoir.from_state(state, stats.k) if self.res is not None else None
        self.set_stats(stats, res, n_events)
        self.n_skipped = int(state["n_skipped"])


def _first_order(codes: np.ndarray) -> np.ndarray:
    """The distinct codes in the order of their first appearance (new groups get rows
    in the order of their first event, as in a ``learn_one`` loop).

    >>> _first_order(np.array([3, 1, 3, 0, 1])).tolist()
    [3, 1, 0]

    """
    seen, first = np.unique(codes, return_index=True)
    return seen[np.argsort(first)]


def batch_columns(X, y, w, group: str | None = None):
    """Columns of ``X`` and the arrays of ``y`` and ``w``, with errors that name what is
    wrong: ``X`` must be a DataFrame; ``y`` and ``w`` one value per row (a Series, an
    array or a list), aligned with ``X``'s index when they have one (never matched by
    position silently).

    >>> import pandas as pd
    >>> cols, y, w = batch_columns(pd.DataFrame({"g": ["a", "b"]}), [1.0, 2.0], None, "g")
    >>> y.tolist(), w
    ([1.0, 2.0], None)

    """
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
