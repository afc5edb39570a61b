"""Validation of input rows: dicts (one event) and columns (a batch).

Every path into the statistics, ``learn_one``, ``learn_many`` and the stream decoder,
goes through :class:`RowReader`, so all of them accept and reject the same things and
name the offending field the same way. The union columns themselves (factors,
interactions, transforms) come from the formula's :class:`~streamlmm.design.Design`.

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm import kernels, keytable
from streamlmm.design import Design
from streamlmm.keys import MAX_KEY_LEN, check_key
from streamlmm.values import MAX_ABS, Missing, number

__all__ = ["RowReader", "MISSING_POLICIES", "MAX_BATCH", "Missing", "number"]

MISSING_POLICIES = ("raise", "skip")
MAX_BATCH = 50_000_000  # rows per learn_many call


class RowReader:
    """Reads validated events of a design into union vectors.

    Parameters
    ----------
    design
        The formula's encoder (it learns factor levels as events arrive).
    time_key
        Field holding the event time, or ``None`` (time is then the event count).
    missing
        ``"raise"``: a missing field is a ``ValueError``; ``"skip"``: the row is dropped
        (lme4's ``na.omit``) and :meth:`read` returns ``None``.

    Examples
    --------
    >>> rr = RowReader(Design("y ~ x + (1 | g)"))
    >>> rr.read({"g": "a", "x": 2.5}, 1.0), rr.a.tolist(), rr.y
    ('a', [1.0, 2.5], 1.0)
    >>> rr.read({"g": "a"}, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: field 'x': missing

    """

    def __init__(self, design: Design, time_key: str | None = None, missing: str = "raise"):
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
        self.design = design
        self.group = design.formula.group
        self.response = design.formula.response_field
        self.time_key = time_key
        self.skip = missing == "skip"
        self.a = np.empty(max(design.k, 1))  # the last event's union values
        self.y = math.nan  # the last event's response (transformed)

    def __getstate__(self) -> dict:
        """Everything but the per-event scratch (:attr:`a`, :attr:`y`)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("a", "y")}

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)
        self.a = np.empty(max(self.design.k, 1))
        self.y = math.nan

    # -- one event ----------------------------------------------------------------------
    def read(self, x: Mapping[str, Any], y: Any):
        """Validate one event into :attr:`a` and :attr:`y`; returns the group key
        (``None``: the row is skipped). Learns new factor levels."""
        if type(x) is not dict and not isinstance(x, Mapping):
            raise ValueError(f"features must be a mapping, got {type(x).__name__}")
        try:
            key = x.get(self.group)
            if key is None:
                raise Missing(f"field {self.group!r}: group key is missing")
            key = check_key(key, self.group)
            yv = self.design.response_one(y)
            if self.a.shape[0] < self.design.k:  # a restored or replaced design
                self.a = np.empty(self.design.k)
            self.a = self.design.encode_one(x, self.a, learn=True)
        except Missing as e:
            if self.skip:
                return None
            raise ValueError(str(e)) from None
        self.y = yv
        return key

    def features(self, x: Mapping[str, Any], *, impute: bool) -> np.ndarray:
        """Union values of ``x`` for a prediction (no level is learned). With ``impute``,
        columns that depend on a missing field are NaN (the caller takes the centre)."""
        d = self.design
        if self.a.shape[0] < d.k:
            self.a = np.empty(d.k)
        try:
            self.a = d.encode_one(x, self.a, learn=False)
            return self.a
        except Missing as e:
            if not impute:
                raise ValueError(str(e)) from None
        # encode twice with different stand-ins for the missing fields: the columns that
        # change are the ones that depend on them
        gone = [f for f in d.fields if x.get(f) is None or _is_nan(x.get(f))]
        subs = []
        for stand_in in (1.0, 2.0):
            xs = dict(x)
            for f in gone:
                levels = d.factors.get(f)
                xs[f] = (levels[min(int(stand_in) - 1, len(levels) - 1)]) if levels else stand_in
            subs.append(d.encode_one(xs, np.empty(d.k), learn=False).copy())
        out = subs[0]
        out[subs[0] != subs[1]] = math.nan
        self.a = out
        return out

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
        """Validate a batch given as columns; learns its new factor levels, in row order.

        Returns ``(codes, uniques, A, y, w, t, kept)`` for the kept rows: each kept row's
        group is ``uniques[codes[e]]`` and ``kept`` is its index in the batch. Raises
        ``ValueError`` naming the first bad row and field, and then nothing is learned;
        with ``missing="skip"`` rows with a missing value are dropped.
        """
        d = self.design
        yv = np.asarray(y)
        n = yv.shape[0] if yv.ndim == 1 else -1
        if n > MAX_BATCH:
            raise ValueError(f"batch of {n} rows exceeds the limit of {MAX_BATCH}")
        wv = np.ones(max(n, 0)) if w is None else self._weights(w, n)
        t = None
        if self.time_key is not None:
            if self.time_key not in cols:
                raise ValueError(f"field {self.time_key!r}: missing (no such column)")
            t = self.column(self.time_key, cols[self.time_key], n)
        if self.group in cols:
            codes, uniques = self._keys(cols[self.group], n)
        elif self.skip:
            codes, uniques = np.full(n, -1, dtype=np.int64), []
        else:
            raise ValueError(f"field {self.group!r}: missing (no such column)")
        if not self.skip:
            for f in d.fields:
                if f not in cols:
                    raise ValueError(f"field {f!r}: missing (no such column)")
        yk = d.response_columns(yv)
        miss = codes < 0
        miss |= np.isnan(yk)
        if t is not None:
            miss |= np.isnan(t)
        # rows the batch drops anyway teach no level: mask them before encoding
        learn_cols = cols
        if miss.any():
            if not self.skip:
                r = int(np.argmax(miss))
                raise ValueError(f"row {r}: {self._why_missing(r, cols, yk, t, codes)}")
            learn_cols = _masked(cols, d.fields, miss)
        A = d.encode_columns(learn_cols, n, learn=True)
        if kernels.nan_rows(A, yk, miss):
            if not self.skip:
                r = int(np.argmax(miss))
                raise ValueError(f"row {r}: {self._why_missing(r, cols, yk, t, codes)}")
            kept = np.flatnonzero(~miss)
        else:
            kept = np.arange(n)
        if kept.shape[0] < n:
            codes = codes[kept]
            A, yk, wv = A[kept], yk[kept], wv[kept]
            t = None if t is None else t[kept]
        return codes, uniques, A, yk, wv, t, kept

    def _weights(self, w, n: int) -> np.ndarray:
        """The weight column: finite numbers ≥ 0, else a ``ValueError`` naming the row."""
        wv = self.column("w", w, n)
        if np.isnan(wv).any():
            raise ValueError(f"field 'w': NaN in row {int(np.argmax(np.isnan(wv)))}")
        if (wv < 0).any():
            raise ValueError(f"field 'w': negative weight in row {int(np.argmax(wv < 0))}")
        return wv

    def union_columns(self, cols: Mapping[str, Any], n: int) -> np.ndarray:
        """Union values of a batch for predictions (no level is learned); a missing value
        makes its row's columns NaN."""
        if not self.skip:
            for f in self.design.fields:
                if f not in cols:
                    raise ValueError(f"field {f!r}: missing (no such column)")
        return self.design.encode_columns(cols, n, learn=False)

    def _why_missing(self, r, cols, y, t, codes) -> str:
        if codes[r] < 0:
            return f"field {self.group!r}: group key is missing"
        if np.isnan(y[r]):
            return f"field {self.response!r}: missing or NaN"
        for f in self.design.fields:
            v = np.asarray(cols[f])[r] if f in cols else None
            if v is None or _is_nan(v):
                return f"field {f!r}: missing or NaN"
        return f"field {self.time_key!r}: missing or NaN"

    @staticmethod
    def column(name: str, col, n: int | None = None, out: np.ndarray | None = None):
        """A float column (into ``out`` if given): ±inf, a value beyond ±1e150 or a
        non-number is a ``ValueError`` naming the row; a missing value is NaN."""
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
        name = self.group
        arr = _factorizable(col)
        if arr.shape != (n,):
            raise ValueError(f"field {name!r}: expected {n} values, got shape {arr.shape}")
        found = _factorize_fast(arr)
        if found is not None:
            codes, uniques = found
        else:
            codes, uniques = _factorize_pandas(arr, name)
        if getattr(uniques, "dtype", None) is not None and uniques.dtype.kind in "iu":
            return codes, uniques.tolist()  # integers (never bool): valid keys as they are
        keys = list(uniques)
        if (
            set(map(type, keys)) == {str}
            and max(map(len, keys)) <= MAX_KEY_LEN
            and all(map(str.isascii, keys))
        ):
            return codes, keys  # ASCII strings short enough: valid keys as they are
        checked = []
        for j, u in enumerate(keys):
            if type(u) is str and len(u) <= MAX_KEY_LEN and u.isascii():
                checked.append(u)
                continue
            try:
                checked.append(check_key(u, name))
            except ValueError as e:
                bad = int(np.argmax(codes == j))
                raise ValueError(f"row {bad}: {e}") from None
        return codes, checked


def _factorize_fast(arr: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Codes and uniques (in order of first appearance) of an array of ``str`` or of
    integers by :mod:`streamlmm.keytable`, or ``None`` when it cannot say exactly (a
    missing or non-``str`` key in an object array, a key holding ``"\\x00"``, another
    dtype): pandas then decides.

    >>> codes, uniques = _factorize_fast(np.array(["b", "a", "b"], dtype=object))
    >>> codes.tolist(), uniques.tolist()
    ([0, 1, 0], ['b', 'a'])
    >>> _factorize_fast(np.array(["b", None], dtype=object)) is None
    True
    """
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        return None
    kind = arr.dtype.kind
    if kind == "i" or (kind == "u" and arr.dtype.itemsize < 8):
        values = arr.astype(np.int64, copy=False)
        codes, first = keytable.factorize_ints(values)
        return codes, values[first]
    if kind in "OU":
        found = keytable.factorize_strs(arr)
        if found is not None:
            codes, first = found
            return codes, arr[first].astype(object, copy=False)  # Python str
    return None


def _factorize_pandas(arr: Any, name: str) -> tuple[np.ndarray, Any]:
    """Codes and uniques by ``pandas.factorize`` (missing keys: code -1); an unhashable
    key is a ``ValueError`` naming its row."""
    import pandas as pd

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
    return codes, getattr(uniques, "to_numpy", lambda: uniques)()


def _factorizable(col: Any) -> Any:
    """The group column in the form pandas factorizes fastest: the NumPy array behind a
    Series of a NumPy dtype or of Python-stored strings (pandas' ``str`` and ``string``
    dtypes without pyarrow, whose own factorize first builds a mask of the missing
    values: a third of the time), else the column itself (Arrow strings, categoricals
    and nullable integers factorize fastest as they are)."""
    dtype = getattr(col, "dtype", None)
    if dtype is None or not hasattr(col, "shape"):
        arr = np.asarray(col)
        # a list of str: the str objects themselves (a NumPy str array drops trailing NULs)
        return np.array(col, dtype=object) if arr.dtype.kind == "U" else arr
    if isinstance(dtype, np.dtype) or getattr(dtype, "storage", None) == "python":
        return np.asarray(col)  # no copy
    return col


def _is_nan(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and v != v


def _masked(cols: Mapping[str, Any], fields, miss: np.ndarray) -> dict[str, Any]:
    """``cols`` with the design's fields set to missing on the rows in ``miss``."""
    out = dict(cols)
    for f in fields:
        if f in cols:
            arr = np.array(cols[f], dtype=object)
            arr[miss] = None
            out[f] = arr
    return out
