"""Validation of input rows: dicts (one event) and columns (a batch).

Every path into the statistics, ``learn_one``, ``learn_many`` and the stream decoder,
goes through :class:`RowReader`, so all of them accept and reject the same things and
name the offending field the same way.

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm import kernels
from streamlmm.formula import INTERCEPT, Formula
from streamlmm.keys import check_key
from streamlmm.stats import MAX_ABS

__all__ = ["RowReader", "MISSING_POLICIES", "MAX_BATCH"]

MISSING_POLICIES = ("raise", "skip")
MAX_BATCH = 50_000_000  # rows per learn_many call


class Missing(ValueError):
    """A field is absent, None or NaN (``missing="skip"`` drops such rows)."""


def number(name: str, v: Any) -> float:
    """A finite float from ``v``, or ``ValueError`` naming the field.

    >>> number("x", 2)
    2.0
    >>> number("x", "2")
    Traceback (most recent call last):
    ...
    ValueError: field 'x': expected a number, got str

    """
    if type(v) is float and -MAX_ABS <= v <= MAX_ABS:  # fast path (NaN fails both)
        return v
    if v is None:
        raise Missing(f"field {name!r}: missing")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        raise ValueError(f"field {name!r}: expected a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"field {name!r}: not finite (integer out of range)") from None
    if not math.isfinite(f):
        if math.isnan(f):
            raise Missing(f"field {name!r}: NaN")
        raise ValueError(f"field {name!r}: not finite ({f})")
    if not -MAX_ABS <= f <= MAX_ABS:
        raise ValueError(
            f"field {name!r}: {f:g} is beyond ±{MAX_ABS:g}, where its products would overflow"
        )
    return f


class RowReader:
    """Reads validated events for a formula into preallocated buffers.

    Parameters
    ----------
    formula
        The parsed formula.
    time_key
        Field holding the event time, or ``None`` (time is then the event count).
    missing
        ``"raise"``: a missing field is a ``ValueError``; ``"skip"``: the row is dropped
        (lme4's ``na.omit``) and :meth:`read` returns ``None``.

    Examples
    --------
    >>> from streamlmm.formula import parse_formula
    >>> rr = RowReader(parse_formula("y ~ x + (1 | g)"))
    >>> a = np.empty(2)
    >>> rr.read({"g": "a", "x": 2.5}, 1.0, a), a.tolist()
    ('a', [1.0, 2.5])
    >>> rr.read({"g": "a"}, 1.0, a)
    Traceback (most recent call last):
    ...
    ValueError: field 'x': missing

    """

    def __init__(self, formula: Formula, time_key: str | None = None, missing: str = "raise"):
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
        self.formula = formula
        self.time_key = time_key
        self.skip = missing == "skip"
        self.features = [(i, c) for i, c in enumerate(formula.columns) if c != INTERCEPT]
        self.ones = [i for i, c in enumerate(formula.columns) if c == INTERCEPT]

    # -- one event ----------------------------------------------------------------------
    def features_into(self, x: Mapping[str, Any], a: np.ndarray, *, impute: bool) -> None:
        """Fill union values ``a`` from ``x``; with ``impute``, a missing feature is NaN."""
        try:
            self._features(x, a, impute)
        except Missing as e:
            raise ValueError(str(e)) from None

    def _features(self, x: Mapping[str, Any], a: np.ndarray, impute: bool) -> None:
        for i in self.ones:
            a[i] = 1.0
        for i, c in self.features:
            v = x.get(c)
            if type(v) is float and -MAX_ABS <= v <= MAX_ABS:
                a[i] = v
                continue
            try:
                a[i] = number(c, v)
            except Missing:
                if not impute:
                    raise
                a[i] = math.nan

    def read(self, x: Mapping[str, Any], y: Any, a: np.ndarray):
        """Validate one event into ``a``; returns the group key (``None``: row skipped)."""
        if type(x) is not dict and not isinstance(x, Mapping):
            raise ValueError(f"features must be a mapping, got {type(x).__name__}")
        try:
            key = x.get(self.formula.group)
            if key is None:
                raise Missing(f"field {self.formula.group!r}: group key is missing")
            key = check_key(key, self.formula.group)
            self._features(x, a, impute=False)
            number(self.formula.response, y)
        except Missing as e:
            if self.skip:
                return None
            raise ValueError(str(e)) from None
        return key

    def weight(self, w: Any) -> float:
        """A frequency weight: a finite number ≥ 0 (``None`` means 1)."""
        if w is None:
            return 1.0
        f = number("w", w)
        if f < 0:
            raise ValueError(f"field 'w': weight must be >= 0, got {f}")
        return f

    def time(self, x: Mapping[str, Any]) -> float:
        """The event time from ``x[time_key]``."""
        return number(self.time_key, x.get(self.time_key))

    # -- a batch ------------------------------------------------------------------------
    def read_columns(self, cols: Mapping[str, Any], y, w):
        """Validate a batch given as columns; nothing is changed anywhere.

        Returns ``(codes, uniques, A, y, w, t, kept)`` for the kept rows: each kept row's
        group is ``uniques[codes[e]]`` and ``kept`` is its index in the batch. Raises
        ``ValueError`` naming the first bad row and field; with ``missing="skip"`` rows
        with a missing value are dropped.
        """
        y = self._column(self.formula.response, y)
        n = y.shape[0]
        if n > MAX_BATCH:
            raise ValueError(f"batch of {n} rows exceeds the limit of {MAX_BATCH}")
        f = self.formula
        A = self.union_columns(cols, n)
        miss = np.zeros(n, dtype=bool)
        kernels.nan_rows(A, y, miss)
        wv = np.ones(n) if w is None else self._column("w", w, n)
        if np.isnan(wv).any():
            raise ValueError(f"field 'w': NaN in row {int(np.argmax(np.isnan(wv)))}")
        if (wv < 0).any():
            raise ValueError(f"field 'w': negative weight in row {int(np.argmax(wv < 0))}")
        if self.time_key is not None:
            if self.time_key not in cols:
                raise ValueError(f"field {self.time_key!r}: missing (no such column)")
            t = self._column(self.time_key, cols[self.time_key], n)
            miss |= np.isnan(t)
        else:
            t = None
        if f.group in cols:
            codes, uniques = self._keys(cols[f.group], n)
        elif self.skip:
            codes, uniques = np.full(n, -1, dtype=np.int64), []
        else:
            raise ValueError(f"field {f.group!r}: missing (no such column)")
        key_miss = codes < 0
        miss |= key_miss
        if miss.any():
            if not self.skip:
                r = int(np.argmax(miss))
                raise ValueError(f"row {r}: {self._why_missing(r, A, y, t, key_miss)}")
            kept = np.flatnonzero(~miss)
        else:
            kept = np.arange(n)
        if kept.shape[0] < n:
            codes = codes[kept]
            A, y, wv = A[kept], y[kept], wv[kept]
            t = None if t is None else t[kept]
        return codes, uniques, A, y, wv, t, kept

    def union_columns(self, cols: Mapping[str, Any], n: int) -> np.ndarray:
        """The union matrix ``A`` (n×k) from columns; a missing value is NaN, and a
        missing column is an error unless ``missing="skip"`` (then all NaN)."""
        A = np.empty((n, self.formula.k))
        for i in self.ones:
            A[:, i] = 1.0
        for i, c in self.features:
            if c not in cols:
                if not self.skip:
                    raise ValueError(f"field {c!r}: missing (no such column)")
                A[:, i] = math.nan
            else:
                self._column(c, cols[c], n, out=A[:, i])
        return A

    def _why_missing(self, r, A, y, t, key_miss) -> str:
        if key_miss[r]:
            return f"field {self.formula.group!r}: group key is missing"
        if np.isnan(y[r]):
            return f"field {self.formula.response!r}: missing or NaN"
        for i, c in self.features:
            if np.isnan(A[r, i]):
                return f"field {c!r}: missing or NaN"
        return f"field {self.time_key!r}: missing or NaN"

    @staticmethod
    def _column(name: str, col, n: int | None = None, out: np.ndarray | None = None):
        """A float column (into ``out`` if given): ±inf or a non-number is a
        ``ValueError`` naming the row; a missing value is NaN."""
        arr = np.asarray(col)
        if n is not None and arr.shape != (n,):
            raise ValueError(f"field {name!r}: expected {n} values, got shape {arr.shape}")
        if out is None:
            out = np.empty(arr.shape[0])
        if arr.dtype.kind in "iuf":
            r = kernels.copy_checked(out, arr)
            if r >= 0:
                raise ValueError(
                    f"row {r}: field {name!r}: {out[r]:g} is not finite or beyond ±{MAX_ABS:g}"
                )
            return out
        if arr.dtype.kind != "O":
            raise ValueError(f"field {name!r}: expected numbers, got dtype {arr.dtype}")
        for r, v in enumerate(arr):
            try:
                out[r] = number(name, v)  # a ValueError for ±inf and non-numbers
            except Missing:
                out[r] = math.nan
            except ValueError as e:
                raise ValueError(f"row {r}: {e}") from None
        return out

    def _keys(self, col, n: int) -> tuple[np.ndarray, list]:
        """Factorize, then validate each distinct key once; code -1 marks a missing key."""
        import pandas as pd

        name = self.formula.group
        arr = np.asarray(col)
        if arr.shape != (n,):
            raise ValueError(f"field {name!r}: expected {n} values, got shape {arr.shape}")
        try:
            codes, uniques = pd.factorize(arr, use_na_sentinel=True)
        except TypeError:  # an unhashable key (list, dict): name its row, as for any bad key
            for r, v in enumerate(arr):
                try:
                    hash(v)
                except TypeError:
                    try:
                        check_key(v, name)
                    except ValueError as e:
                        raise ValueError(f"row {r}: {e}") from None
            raise
        checked = []
        for j, u in enumerate(uniques):
            try:
                checked.append(check_key(u, name))
            except ValueError as e:
                bad = int(np.argmax(codes == j))
                raise ValueError(f"row {bad}: {e}") from None
        return codes, checked
