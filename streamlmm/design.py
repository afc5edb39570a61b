"""The stateful encoder from raw events to the union vector ``a``.

A :class:`Design` turns events into the union columns of a formula's fixed and random
designs, as lme4's ``model.matrix`` names and orders them. It learns from the stream:

- a field's *kind* is fixed by its first value: a ``str`` makes it a factor (as R treats
  character columns), a number makes it numeric; ``levels=`` declares factors upfront;
- factors use treatment contrasts; the reference level is the first of ``levels[f]`` when
  given, else the first level seen;
- a level first seen with ``learn=True`` *appends* its columns to :attr:`Design.columns`
  (earlier rows had 0 there, so widening the statistics with zeros is exact), inserts
  them in lme4 order into :attr:`Design.fixed`, and bumps :attr:`Design.version`;
- nothing is committed from an event that fails (a missing or bad value), so a skipped
  row leaves no trace.

Before the first event the columns of terms whose kinds are unknown do not exist yet
(only the intercept, and columns whose fields are known to be numeric); they are appended
when the first valid event is learned.

Examples
--------
>>> d = Design("y ~ x1 * f + (1 + x1 | g)")
>>> a = d.encode_one({"x1": 2.0, "f": "a"}, np.empty(8), learn=True)
>>> d.columns, d.fixed, d.random
(('(Intercept)', 'x1'), ('(Intercept)', 'x1'), ('(Intercept)', 'x1'))
>>> a = d.encode_one({"x1": 3.0, "f": "b"}, a, learn=True)
>>> d.fixed, a[: d.k].tolist(), d.version
(('(Intercept)', 'x1', 'fb', 'x1:fb'), [1.0, 3.0, 1.0, 3.0], 2)
>>> d.encode_one({"x1": 3.0, "f": "c"}, a, learn=False)[: d.k].tolist()  # a new level: effect 0
[1.0, 3.0, 0.0, 0.0]
>>> d.unseen_level_rows
1

"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamlmm import kernels
from streamlmm.formula import INTERCEPT, Expr, Formula, parse_formula
from streamlmm.keys import key_label, text_problem
from streamlmm.values import MAX_ABS, Missing, number

__all__ = ["Design", "numeric_design", "align", "MAX_LEVEL_CHARS", "MAX_LEVELS"]

MAX_LEVEL_CHARS = 256
MAX_LEVELS = 10_000
NUM, FAC = "numeric", "factor"
_ONE: frozenset = frozenset()


def _is_nan(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and v != v


def _check_level(name: str, v: str) -> None:
    if len(v) > MAX_LEVEL_CHARS:
        raise ValueError(
            f"field {name!r}: factor level of {len(v)} characters exceeds the limit of "
            f"{MAX_LEVEL_CHARS}"
        )
    if not v.isascii():
        why = text_problem(v)
        if why is not None:
            raise ValueError(f"field {name!r}: factor level {key_label(v)!r} is refused: {why}")


class Design:
    """Encoder of events into the union columns of ``formula`` (see the module docstring).

    Parameters
    ----------
    formula
        A :class:`~streamlmm.formula.Formula` or its text.
    levels
        Declares factors and their first levels: ``{"f": ["a", "b"]}`` makes ``f`` a
        factor with reference level ``"a"``; levels not listed are appended when seen.

    Attributes
    ----------
    columns, fixed, random, blocks, xi, zi, k, p, q, shiftable, factors, version, fields
        See the properties; ``columns`` only ever grows at its end.
    """

    unseen_level_rows = 0  # predictions that met a factor level not learned yet (effect 0)

    def __init__(self, formula: Formula | str, levels: Mapping[str, Sequence[str]] | None = None):
        f = parse_formula(formula) if isinstance(formula, str) else formula
        if not isinstance(f, Formula):
            raise ValueError(f"formula must be a Formula or a string, got {type(f).__name__}")
        self.formula = f
        self.fields: tuple[str, ...] = f.variables[1:]
        self._fpos = {fld: i for i, fld in enumerate(self.fields)}
        # fields that must be numeric, and why
        self._numeric_only: dict[str, str] = {}
        for r in f.random_terms:
            for t in r.terms:
                for e in t:
                    for fld in e.fields:
                        self._numeric_only.setdefault(
                            fld,
                            f"it is in a random-effects term on {f.group!r}, and factors "
                            "inside random-effects terms are not supported",
                        )
        self._transforms: list[Expr] = []
        for t in f.fixed_terms:
            for e in t:
                if not e.is_field:
                    self._transforms.append(e)
                    for fld in e.fields:
                        self._numeric_only.setdefault(fld, f"it is used in {e.label}")
        for r in f.random_terms:
            for t in r.terms:
                for e in t:
                    if not e.is_field and e not in self._transforms:
                        self._transforms.append(e)
        self._kind: dict[str, str | None] = {
            fld: (NUM if fld in self._numeric_only else None) for fld in self.fields
        }
        self._levels: dict[str, list[str]] = {}
        self._codes: dict[str, dict[str, int]] = {}
        for fld, levs in (levels or {}).items():
            if fld not in self._kind:
                raise ValueError(f"levels given for {fld!r}, which the formula does not read")
            if fld in self._numeric_only:
                raise ValueError(
                    f"field {fld!r} is declared a factor, but {self._numeric_only[fld]}"
                )
            levs = list(levs) if not isinstance(levs, str) else [levs]
            for v in levs:
                if not isinstance(v, str):
                    raise ValueError(f"levels of {fld!r} must be strings, got {type(v).__name__}")
                _check_level(fld, v)
            if len(set(levs)) != len(levs):
                raise ValueError(f"levels of {fld!r} repeat a level")
            if len(levs) > MAX_LEVELS:
                raise ValueError(f"field {fld!r}: more than {MAX_LEVELS} levels")
            self._kind[fld] = FAC
            self._levels[fld] = levs
            self._codes[fld] = {v: i for i, v in enumerate(levs)}
        self._names: list[str] = []
        self._keys: list[frozenset] = []
        self._keyidx: dict[frozenset, int] = {}
        if f.fixed_intercept or any(r.intercept for r in f.random_terms):
            self._append([(INTERCEPT, _ONE)])
        self.version = 0
        self._coding: dict | None = None
        if None not in self._kind.values():
            self._kinds_known()
        self._rebuild()

    # -- layout ---------------------------------------------------------------------------
    def _append(self, cols) -> bool:
        grew = False
        for name, key in cols:
            if key not in self._keyidx:
                self._keyidx[key] = len(self._keys)
                self._keys.append(key)
                self._names.append(name)
                grew = True
        return grew

    def _is_factor(self, e: Expr) -> bool:
        return e.is_field and self._kind[e.fields[0]] == FAC

    def _kinds_known(self) -> bool:
        """All kinds are known: fix R's contrast coding and lay out the columns."""
        f = self.formula
        for fld, why in self._numeric_only.items():
            if self._kind[fld] != NUM:
                raise ValueError(f"field {fld!r} has str values (a factor), but {why}")
        sets = [frozenset(e.label for e in t) for t in f.fixed_terms]
        coding = {}
        for j, t in enumerate(f.fixed_terms):  # R's TermCode: 1 contrasts, 2 indicators
            for pos, e in enumerate(t):
                margin = sets[j] - {e.label}
                ok = not margin or any(margin <= sets[i] for i in range(j))
                coding[j, pos] = 1 if ok else 2
        if not f.fixed_intercept:  # R: the first factor is coded by indicators
            first = next(
                (
                    (j, pos)
                    for j, t in enumerate(f.fixed_terms)
                    for pos, e in enumerate(t)
                    if self._is_factor(e)
                ),
                None,
            )
            if first is not None:
                coding[first] = 2
        self._coding = coding
        return self._append(self._fixed_layout() + [c for b in self._random_layout() for c in b])

    def _term_columns(self, j: int, t, only: tuple[int, str] | None = None):
        """lme4's columns of fixed term ``j`` (first factor varying fastest); with
        ``only=(pos, level)``, just those with that level at that position."""
        lists = []
        for pos, e in enumerate(t):
            if self._is_factor(e):
                levs = self._levels.get(e.label, [])
                use = levs if self._coding[j, pos] == 2 else levs[1:]
                if only is not None and only[0] == pos:
                    use = [only[1]] if only[1] in use else []
                lists.append([(e.label + v, (e.label, v)) for v in use])
            else:
                lists.append([(e.label, (e.label, None))])
        out = []
        for combo in itertools.product(*reversed(lists)):
            combo = combo[::-1]
            out.append((":".join(c[0] for c in combo), frozenset(c[1] for c in combo)))
        return out

    def _fixed_layout(self):
        f = self.formula
        cols = [(INTERCEPT, _ONE)] if f.fixed_intercept else []
        for j, t in enumerate(f.fixed_terms):
            cols.extend(self._term_columns(j, t))
        return cols

    def _random_layout(self):
        blocks = []
        for r in self.formula.random_terms:
            cols = [(INTERCEPT, _ONE)] if r.intercept else []
            for t in r.terms:
                cols.append((":".join(e.label for e in t), frozenset((e.label, None) for e in t)))
            blocks.append(cols)
        return blocks

    def _add_level(self, fld: str, v: str) -> bool:
        levs = self._levels.setdefault(fld, [])
        if len(levs) >= MAX_LEVELS:
            raise ValueError(f"field {fld!r}: more than {MAX_LEVELS} levels (at {v!r})")
        self._codes.setdefault(fld, {})[v] = len(levs)
        levs.append(v)
        if self._coding is None:
            return False
        new = []
        for j, t in enumerate(self.formula.fixed_terms):
            for pos, e in enumerate(t):
                if e.is_field and e.label == fld:
                    new.extend(self._term_columns(j, t, only=(pos, v)))
        return self._append(new)

    def _rebuild(self) -> None:
        """Derived maps and per-column recipes after the columns changed."""
        f = self.formula
        known = self._coding is not None
        fixed = self._fixed_layout() if known else ([(INTERCEPT, _ONE)] * f.fixed_intercept)
        rblocks = (
            self._random_layout()
            if known
            else [[(INTERCEPT, _ONE)] if r.intercept else [] for r in f.random_terms]
        )
        self.fixed = tuple(n for n, _ in fixed)
        self.xi = np.array([self._keyidx[k] for _, k in fixed], dtype=np.int64)
        rand = [c for b in rblocks for c in b]
        self.random = tuple(n for n, _ in rand)
        self.zi = np.array([self._keyidx[k] for _, k in rand], dtype=np.int64)
        blocks, i = [], 0
        for b in rblocks:
            blocks.append(tuple(range(i, i + len(b))))
            i += len(b)
        self.blocks = tuple(blocks)
        self.columns = tuple(self._names)
        # shiftable: per union column, then the response
        fixed_keys = {k for _, k in fixed}
        rblock_int = {}
        for r, b in zip(f.random_terms, rblocks):
            for _, k in b:
                rblock_int[k] = r.intercept
        mask = [
            k != _ONE
            and (k not in fixed_keys or f.fixed_intercept)
            and (k not in rblock_int or rblock_int[k])
            for k in self._keys
        ]
        self.shiftable = np.array(mask + [f.fixed_intercept], dtype=bool)
        # recipes
        self._ones = [i for i, k in enumerate(self._keys) if k == _ONE]
        self._direct: list[tuple[int, str]] = []
        self._dpos: list[tuple[int, int]] = []
        general = []
        slots: dict[str, int] = {}
        self._slots: list[tuple[Expr, Any]] = []
        exprs = {e.label: e for t in f.fixed_terms for e in t}
        exprs.update({e.label: e for r in f.random_terms for t in r.terms for e in t})
        for i, k in enumerate(self._keys):
            if k == _ONE:
                continue
            if len(k) == 1:
                ((lab, lev),) = k
                e = exprs[lab]
                if lev is None and e.is_field:
                    self._direct.append((i, lab))
                    self._dpos.append((i, self._fpos[lab]))
                    continue
            sl, fc = [], []
            for lab, lev in sorted(k, key=lambda p: self._order(p[0])):
                if lev is None:
                    if lab not in slots:
                        slots[lab] = len(self._slots)
                        self._slots.append((exprs[lab], exprs[lab].scalar(self._fpos)))
                    sl.append(slots[lab])
                else:
                    fc.append((self._fpos[lab], self._codes[lab][lev]))
            general.append((i, tuple(sl), tuple(fc)))
        self._general = general
        self._tf = [(e, e.scalar(self._fpos)) for e in self._transforms]
        self._fast = (
            known
            and not general
            and not self._tf
            and {c for _, c in self._direct} == set(self.fields)
        )
        self._vals = [0.0] * len(self.fields)

    def field_columns(self):
        """Where an event's raw fields can be read back from its union values: the union
        position of each numeric field, and per factor field its pure dummy columns with
        their levels and the level that has none (the reference, or ``None``); in field
        order. ``None`` when a field cannot be read back (a numeric field only inside a
        transform or an interaction, a factor only in interactions) or the kinds are not
        known yet. The reservoir's content hash reads events through it.

        >>> d = Design("y ~ x + f + (1 | g)")
        >>> for ev in ({"x": 1.0, "f": "a"}, {"x": 2.0, "f": "b"}):
        ...     _ = d.encode_one(ev, np.empty(3), learn=True)
        >>> d.field_columns()
        ([1], [('f', [(2, 'b')], 'a')])

        """
        if not self.ready:
            return None
        direct = {j: i for i, j in self._dpos}
        dummies: dict[int, list[tuple[int, str]]] = {}
        for i, sl, fc in self._general:
            if not sl and len(fc) == 1:
                j, c = fc[0]
                dummies.setdefault(j, []).append((i, self._levels[self.fields[j]][c]))
        num, facs = [], []
        for j, fld in enumerate(self.fields):
            if self._kind[fld] == FAC:
                levels = self._levels.get(fld, [])
                got = sorted(dummies.get(j, []))
                missing = [v for v in levels if v not in {lev for _, lev in got}]
                if len(missing) > 1:
                    return None
                facs.append((fld, got, missing[0] if missing else None))
            elif j in direct:
                num.append(direct[j])
            else:
                return None
        return num, facs

    def _order(self, label: str) -> int:
        return self._label_order.setdefault(label, len(self._label_order))

    @property
    def _label_order(self) -> dict:
        d = self.__dict__.get("_lo")
        if d is None:
            d = self.__dict__["_lo"] = {}
            for t in self.formula.fixed_terms:
                for e in t:
                    d.setdefault(e.label, len(d))
            for r in self.formula.random_terms:
                for t in r.terms:
                    for e in t:
                        d.setdefault(e.label, len(d))
        return d

    # -- public sizes -----------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of union columns (without the response)."""
        return len(self._names)

    @property
    def p(self) -> int:
        """Number of fixed-effect columns."""
        return len(self.fixed)

    @property
    def q(self) -> int:
        """Number of random-effect columns."""
        return len(self.random)

    @property
    def factors(self) -> dict[str, list[str]]:
        """Factor → levels, reference level first."""
        return {
            fld: list(self._levels.get(fld, [])) for fld in self.fields if self._kind[fld] == FAC
        }

    @property
    def plain(self) -> tuple[tuple[int, str], ...] | None:
        """For a formula of plain numeric columns whose kinds are known, the pairs
        ``(column, field)`` that copy a field into a column (the intercept columns are
        :attr:`ones`); ``None`` otherwise. Bulk decoders use it."""
        return tuple(self._direct) if self._fast else None

    def coded_recipe(self):
        """How ``learn_one``'s fast path for factors fills the union columns, or ``None``
        when it does not apply: ``(numeric fields, factor fields with their level codes,
        recipe)``. ``recipe`` is an int64 array for :func:`streamlmm.kernels.
        accumulate_coded`: ``[n, (column, numeric index) × n, m, (column, numeric index
        or -1, n_f, (factor index, code) × n_f) × m]`` — a column is a field's value, or
        a field's value (or 1) where the event's factors have the given levels, else 0,
        exactly as :meth:`encode_one` fills it. It applies to formulas whose columns are
        fields, factor dummies and their products with at most one numeric field (no
        transform, no product of two numbers, which could overflow), kinds known.

        >>> d = Design("y ~ x * f + (1 | g)")
        >>> _ = d.encode_one({"x": 1.0, "f": "a"}, np.empty(4), learn=True)
        >>> _ = d.encode_one({"x": 1.0, "f": "b"}, np.empty(4), learn=True)
        >>> nums, facs, recipe = d.coded_recipe()
        >>> nums, facs, d.columns
        (('x',), (('f', {'a': 0, 'b': 1}),), ('(Intercept)', 'x', 'fb', 'x:fb'))
        >>> recipe.tolist()  # x → 1; fb = 1 where f = b; x:fb = x where f = b
        [1, 1, 0, 2, 2, -1, 1, 0, 1, 3, 0, 1, 0, 1]

        """
        if not self.ready or self._tf:
            return None
        num = [fld for fld in self.fields if self._kind[fld] == NUM]
        fac = [fld for fld in self.fields if self._kind[fld] == FAC]
        nix = {self._fpos[fld]: j for j, fld in enumerate(num)}
        fix = {self._fpos[fld]: j for j, fld in enumerate(fac)}
        recipe = [len(self._dpos)]
        for i, fp in self._dpos:
            if fp not in nix:
                return None
            recipe += [i, nix[fp]]
        recipe.append(len(self._general))
        for i, sl, fc in self._general:
            if len(sl) > 1:
                return None
            slot = -1
            if sl:
                e = self._slots[sl[0]][0]
                if not e.is_field or self._fpos[e.label] not in nix:
                    return None
                slot = nix[self._fpos[e.label]]
            recipe += [i, slot, len(fc)]
            for fp, code in fc:
                recipe += [fix[fp], code]
        tables = tuple((fld, self._codes.setdefault(fld, {})) for fld in fac)
        return tuple(num), tables, np.array(recipe, dtype=np.int64)

    @property
    def ones(self) -> tuple[int, ...]:
        """Positions of the intercept column(s)."""
        return tuple(self._ones)

    @property
    def ready(self) -> bool:
        """Whether every field's kind is known (after the first learned event)."""
        return self._coding is not None

    # -- one event ------------------------------------------------------------------------
    def encode_one(self, x: Mapping[str, Any], a: np.ndarray, *, learn: bool) -> np.ndarray:
        """Fill ``a[:k]`` with the union values of event ``x`` and return the array.

        ``a`` is returned, unless this event added columns beyond ``len(a)``: then a new
        array of length :attr:`k` is returned (``version`` changed). A missing value raises
        :class:`~streamlmm.values.Missing`, a bad one ``ValueError``, both naming the field;
        nothing is learned from such an event. With ``learn=False`` (a prediction) a level
        not learned yet has all its dummy columns 0, so its effect is 0 (the reference
        level's), as for an unseen group; such rows are counted in ``unseen_level_rows``.

        >>> d = Design("y ~ x + (1 | g)", )
        >>> d.encode_one({"x": 2.5}, np.empty(2), learn=True).tolist()
        [1.0, 2.5]
        >>> d.encode_one({"x": None}, np.empty(2), learn=True)
        Traceback (most recent call last):
        ...
        streamlmm.values.Missing: field 'x': missing
        """
        if self._fast:
            try:
                for i in self._ones:
                    a[i] = 1.0
                for i, c in self._direct:
                    v = x.get(c)
                    if type(v) is float and -MAX_ABS <= v <= MAX_ABS:
                        a[i] = v
                    else:
                        a[i] = number(c, v)
                return a
            except ValueError:
                pass  # re-read: a bad value is reported before a missing one, with why
        return self._encode(x, a, learn)

    def _read(self, x: Mapping[str, Any], vals: list):
        """Raw values into ``vals`` (floats; factor codes, -1 for a new level); returns the
        new kinds and levels. A bad value is reported before a missing one."""
        missing = None
        new_kinds: dict[str, str] = {}
        new_levels: list[tuple[str, str]] = []
        for j, fld in enumerate(self.fields):
            v = x.get(fld)
            kind = self._kind[fld]
            if kind is None:
                if isinstance(v, str):
                    kind = new_kinds[fld] = FAC
                elif v is None or _is_nan(v):
                    missing = missing or Missing(f"field {fld!r}: missing")
                    continue
                else:
                    kind = new_kinds[fld] = NUM
            if kind == NUM:
                if type(v) is float and -MAX_ABS <= v <= MAX_ABS:
                    vals[j] = v
                    continue
                if isinstance(v, str):
                    raise ValueError(self._not_number(fld, "str"))
                try:
                    vals[j] = number(fld, v)
                except Missing as e:
                    missing = missing or e
            else:
                if isinstance(v, str):
                    c = self._codes.get(fld, {}).get(v)
                    if c is None:
                        _check_level(fld, v)
                        if (fld, v) not in new_levels:
                            new_levels.append((fld, v))
                        c = -1
                    vals[j] = c
                elif v is None or _is_nan(v):
                    missing = missing or Missing(f"field {fld!r}: missing")
                else:
                    raise ValueError(
                        f"field {fld!r}: expected a string (the field is a factor), got "
                        f"{type(v).__name__}"
                    )
        if missing is not None:
            raise missing
        for fld, why in self._numeric_only.items():
            if new_kinds.get(fld) == FAC:
                raise ValueError(f"field {fld!r} has str values (a factor), but {why}")
        return new_kinds, new_levels

    def _encode(self, x: Mapping[str, Any], a: np.ndarray, learn: bool) -> np.ndarray:
        vals = self._vals
        new_kinds, new_levels = self._read(x, vals)
        for e, fn in self._tf:  # every transform, before anything is committed
            try:
                r = fn(vals)
            except (ValueError, OverflowError, ZeroDivisionError):
                r = math.nan
            if not -MAX_ABS <= r <= MAX_ABS:
                raise ValueError(e.why(vals, self._fpos))
        if not learn and new_levels and not new_kinds:
            # a prediction for a level not learned yet: its dummy columns are 0, so the
            # level's effect is 0 (the reference level's prediction), as for an unseen group
            self.unseen_level_rows += 1
            return self._fill(vals, a)
        if new_kinds or new_levels:
            if not learn:
                raise ValueError(f"field {next(iter(new_kinds))!r}: nothing has been learned yet")
            before = self.to_state()
            self._commit(new_kinds, new_levels)
            self._rebuild()
            vals = self._vals
            self._read(x, vals)
            try:
                return self._fill(vals, a)
            except ValueError:  # nothing is learned from an event that fails
                self.__dict__.update(Design.from_state(self.formula.text, before).__dict__)
                raise
        return self._fill(vals, a)

    def _commit(self, new_kinds: dict, new_levels: list) -> None:
        """Learn one event's kinds and levels (in field order); the version counts rows
        that added columns."""
        counts: dict[str, int] = {}
        for fld, _ in new_levels:
            counts[fld] = counts.get(fld, 0) + 1
        for fld, c in counts.items():
            if len(self._levels.get(fld, [])) + c > MAX_LEVELS:
                raise ValueError(f"field {fld!r}: more than {MAX_LEVELS} levels")
        grew = False
        for fld, kind in new_kinds.items():
            self._kind[fld] = kind
        if new_kinds and None not in self._kind.values():
            grew = self._kinds_known()
        for fld, v in new_levels:
            grew = self._add_level(fld, v) or grew
        if grew:
            self.version += 1

    def _fill(self, vals: list, a: np.ndarray) -> np.ndarray:
        if a.shape[0] < len(self._names):
            a = np.empty(len(self._names))
        for i in self._ones:
            a[i] = 1.0
        for i, j in self._dpos:
            a[i] = vals[j]
        sv = [fn(vals) for _, fn in self._slots]
        for i, sl, fc in self._general:
            for j, c in fc:
                if vals[j] != c:
                    a[i] = 0.0
                    break
            else:
                if sl:
                    v = sv[sl[0]]
                    for s in sl[1:]:
                        v *= sv[s]
                    if not -MAX_ABS <= v <= MAX_ABS:
                        raise ValueError(
                            f"column {self._names[i]!r}: {v:g} is beyond ±{MAX_ABS:g}, where "
                            "its products would overflow"
                        )
                    a[i] = v
                else:
                    a[i] = 1.0
        return a

    def response_one(self, y: Any) -> float:
        """The response value (the formula's transform applied), or ``Missing`` /
        ``ValueError`` naming the response field.

        >>> Design("log(y) ~ x + (1 | g)").response_one(0)
        Traceback (most recent call last):
        ...
        ValueError: field 'y': log(y) is not finite (log of 0)
        """
        e = self.formula.response_expr
        v = number(e.fields[0], y)
        if e.is_field:
            return v
        r = e.evaluate([v])
        if not -MAX_ABS <= r <= MAX_ABS:  # as for a predictor's transform
            raise ValueError(e.why([v]))
        return r

    # -- columns --------------------------------------------------------------------------
    def _not_number(self, fld: str, got: str) -> str:
        why = self._numeric_only.get(fld)
        return f"field {fld!r}: expected a number, got {got}" + (
            f" ({why})" if why and got == "str" else ""
        )

    def _num_column(self, fld: str, arr: np.ndarray, n: int) -> np.ndarray:
        if arr.dtype.kind in "iuf":
            out = np.empty(arr.shape[0])
            r = kernels.copy_checked(out, arr)  # ±inf included; NaN is a missing value
            if r >= 0:
                raise ValueError(
                    f"row {r}: field {fld!r}: {out[r]:g} is not finite or beyond ±{MAX_ABS:g}"
                )
            return out
        if arr.dtype.kind != "O":
            got = (
                "bool"
                if arr.dtype.kind == "b"
                else ("str" if arr.dtype.kind in "US" else arr.dtype)
            )
            raise ValueError(self._not_number(fld, str(got)))
        out = np.empty(n)
        for r, v in enumerate(arr.tolist()):
            if type(v) is float and -MAX_ABS <= v <= MAX_ABS:
                out[r] = v
                continue
            if isinstance(v, str):
                raise ValueError(f"row {r}: {self._not_number(fld, 'str')}")
            try:
                out[r] = number(fld, v)
            except Missing:
                out[r] = math.nan
            except ValueError as e:
                raise ValueError(f"row {r}: {e}") from None
        return out

    @staticmethod
    def _infer(fld: str, arr: np.ndarray) -> str | None:
        k = arr.dtype.kind
        if k in "iuf":
            return NUM
        if k == "U":
            return FAC
        if k != "O":
            return NUM  # reported by _num_column
        for v in arr.tolist():
            if v is None or _is_nan(v):
                continue
            return FAC if isinstance(v, str) else NUM
        return None

    def encode_columns(self, cols: Mapping[str, Any], n: int, *, learn: bool) -> np.ndarray:
        """The union matrix ``A`` (n×k) of a batch given as columns.

        A row with a missing value (None, NaN, or an absent column) has NaN in ``A`` (in
        every column, except on the plain-numeric path, where only in the missing
        value's); it is neither an error here nor learned from. A bad value is a ``ValueError``
        naming the row and the field, and then nothing is learned from the batch. New
        kinds and levels are learned (``learn=True``) row by row in row order, exactly as
        a loop of :meth:`encode_one` would, so both give the same columns bitwise.

        >>> d = Design("y ~ x1 * f + (1 | g)")
        >>> A = d.encode_columns({"x1": [1.0, 2.0, 3.0], "f": ["a", "b", None]}, 3, learn=True)
        >>> d.columns, A[1].tolist(), bool(np.isnan(A[2]).all())
        (('(Intercept)', 'x1', 'fb', 'x1:fb'), [1.0, 2.0, 1.0, 2.0], True)
        """
        if self._fast:
            A = self._plain_columns(cols, n)
            if A is not None:
                return A
        m = len(self.fields)
        num: list[Any] = [None] * m
        fac: dict[int, tuple[np.ndarray, list]] = {}
        miss = np.zeros(n, dtype=bool)
        kinds: dict[str, str] = {}
        for j, fld in enumerate(self.fields):
            if fld not in cols:
                miss[:] = True
                num[j] = np.full(n, math.nan)
                continue
            arr = np.asarray(cols[fld])
            if arr.dtype.kind in "US" and not isinstance(cols[fld], np.ndarray):
                arr = np.asarray(cols[fld], dtype=object)  # a list mixing str and numbers
            if arr.shape != (n,):
                raise ValueError(f"field {fld!r}: expected {n} values, got shape {arr.shape}")
            kind = self._kind[fld] or self._infer(fld, arr)
            if kind is None:  # all missing
                miss[:] = True
                num[j] = np.full(n, math.nan)
                continue
            if self._kind[fld] is None:
                kinds[fld] = kind
            if kind == NUM:
                num[j] = self._num_column(fld, arr, n)
                miss |= np.isnan(num[j])
            else:
                fac[j] = self._factor_column(fld, arr, n)
                miss |= fac[j][0] < 0
                num[j] = np.zeros(n)
        for fld, why in self._numeric_only.items():
            if kinds.get(fld) == FAC:
                raise ValueError(f"field {fld!r} has str values (a factor), but {why}")
        ok = ~miss
        for e in self._transforms:
            r = np.broadcast_to(np.asarray(e.vector(self._fpos)(num), dtype=float), (n,))
            bad = ok & ~(np.abs(r) <= MAX_ABS)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"row {i}: {e.why([float(c[i]) for c in num], self._fpos)}")
        # new kinds and levels, by first row among the complete rows
        events: list[tuple[int, int, str]] = []
        for j, (codes, uniques) in fac.items():
            fld = self.fields[j]
            known = self._codes.get(fld, {})
            new = [u for u, s in enumerate(uniques) if s not in known]
            if new:
                c_ok = codes[ok]
                rows_ok = np.flatnonzero(ok)
                for u in new:
                    hit = np.flatnonzero(c_ok == u)
                    if hit.shape[0]:
                        events.append((int(rows_ok[hit[0]]), j, uniques[u]))
        events.sort()
        if not learn and events and not (kinds and ok.any()):
            # predictions for levels not learned yet: their effect is 0 (see _encode)
            unseen = np.zeros(n, dtype=bool)
            for j, (codes, uniques) in fac.items():
                known = self._codes.get(self.fields[j], {})
                new = np.array([s not in known for s in uniques] + [False])
                unseen |= new[codes]
            self.unseen_level_rows += int(np.count_nonzero(unseen & ok))
            events = []
        if (kinds and ok.any()) or events:
            if not learn:
                raise ValueError(f"field {next(iter(kinds))!r}: nothing has been learned yet")
            by_row: dict[int, list[tuple[str, str]]] = {}
            if kinds and ok.any():
                by_row[int(np.argmax(ok))] = []  # the first complete row fixes the kinds
            for r, j, v in events:
                by_row.setdefault(r, []).append((self.fields[j], v))
            for i, r in enumerate(sorted(by_row)):
                self._commit(kinds if i == 0 and kinds else {}, by_row[r])
            self._rebuild()
        return self._fill_columns(num, fac, miss, n)

    def _plain_columns(self, cols: Mapping[str, Any], n: int) -> np.ndarray | None:
        """:meth:`encode_columns` for plain numeric columns in one numba pass per column
        (``None``: a column is not a numeric array, so the general path decides)."""
        arrs = []
        for _, fld in self._direct:
            arr = cols.get(fld)
            arr = None if arr is None else np.asarray(arr)
            if arr is None or arr.shape != (n,) or arr.dtype.kind not in "iuf":
                return None
            arrs.append(arr)
        A = np.empty((n, len(self._names)))
        for i in self._ones:
            A[:, i] = 1.0
        for (i, fld), arr in zip(self._direct, arrs):
            r = kernels.copy_checked(A[:, i], arr)
            if r >= 0:
                raise ValueError(
                    f"row {r}: field {fld!r}: {A[r, i]:g} is not finite or beyond ±{MAX_ABS:g}"
                )
        return A

    def _factor_column(self, fld: str, arr: np.ndarray, n: int):
        import pandas as pd

        codes, uniques = pd.factorize(arr, use_na_sentinel=True)
        out = []
        for u, s in enumerate(uniques.tolist()):
            if not isinstance(s, str):
                r = int(np.argmax(codes == u))
                raise ValueError(
                    f"row {r}: field {fld!r}: expected a string (the field is a factor), "
                    f"got {type(s).__name__}"
                )
            if len(s) > MAX_LEVEL_CHARS or not s.isascii():
                r = int(np.argmax(codes == u))
                try:
                    _check_level(fld, s)
                except ValueError as e:
                    raise ValueError(f"row {r}: {e}") from None
            out.append(s)
        return np.asarray(codes, dtype=np.int64), out

    def _fill_columns(self, num, fac, miss, n) -> np.ndarray:
        A = np.empty((n, len(self._names)))
        codes = {}
        for j, (c, uniques) in fac.items():
            table = self._codes.get(self.fields[j], {})
            g = np.array([table.get(s, -2) for s in uniques] + [-1], dtype=np.int64)
            codes[j] = g[c]  # -1 (missing) indexes the trailing -1
        for i in self._ones:
            A[:, i] = 1.0
        for i, j in self._dpos:
            A[:, i] = num[j]
        sv = []
        for e, _ in self._slots:
            if e.is_field:
                sv.append(num[self._fpos[e.label]])
            else:
                sv.append(np.broadcast_to(np.asarray(e.vector(self._fpos)(num), float), (n,)))
        for i, sl, fc in self._general:
            if sl:
                v = sv[sl[0]]
                for s in sl[1:]:
                    v = v * sv[s]
            else:
                v = 1.0
            mask = np.ones(n, dtype=bool)
            for j, c in fc:
                mask &= codes[j] == c
            A[:, i] = np.where(mask, v, 0.0)
            bad = ~miss & ~(np.abs(A[:, i]) <= MAX_ABS)
            if bad.any():
                r = int(np.argmax(bad))
                raise ValueError(
                    f"row {r}: column {self._names[i]!r}: {A[r, i]:g} is beyond "
                    f"±{MAX_ABS:g}, where its products would overflow"
                )
        A[miss] = math.nan
        return A

    def response_columns(self, y) -> np.ndarray:
        """The response column (transform applied); a missing value is NaN, a bad one or a
        non-finite transform a ``ValueError`` naming the row."""
        e = self.formula.response_expr
        arr = np.asarray(y)
        if arr.ndim != 1:
            raise ValueError(f"field {e.fields[0]!r}: expected one value per row")
        if arr.dtype.kind in "iuf":
            v = np.empty(arr.shape[0])
            r = kernels.copy_checked(v, arr)
            if r >= 0:
                raise ValueError(
                    f"row {r}: field {e.fields[0]!r}: {v[r]:g} is not finite or beyond ±{MAX_ABS:g}"
                )
        else:
            v = self._num_column(e.fields[0], arr, arr.shape[0])
        if e.is_field:
            return v
        r = np.asarray(e.vector()([v]), dtype=float)
        bad = ~np.isnan(v) & ~(np.abs(r) <= MAX_ABS)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"row {i}: {e.why([float(v[i])])}")
        return r

    def __getstate__(self) -> dict:
        """Pickle through :meth:`to_state` (compiled transforms are closures)."""
        return {"formula": self.formula.text, "state": self.to_state()}

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(Design.from_state(st["formula"], st["state"]).__dict__)

    # -- state ----------------------------------------------------------------------------
    def to_state(self) -> dict:
        """JSON-serialisable state: kinds, levels, and the union columns in order.

        >>> d = Design("y ~ f + (1 | g)"); _ = d.encode_one({"f": "b"}, np.empty(1), learn=True)
        >>> Design.from_state("y ~ f + (1 | g)", d.to_state()).factors
        {'f': ['b']}
        """
        return {
            "formula": self.formula.text,
            "kinds": {f: k for f, k in self._kind.items() if k is not None},
            "levels": {f: list(v) for f, v in self._levels.items()},
            "columns": list(self._names),
            "keys": [sorted([lab, lev] for lab, lev in k) for k in self._keys],
            "version": self.version,
        }

    @classmethod
    def from_state(cls, formula_text: str, state: Mapping[str, Any]) -> Design:
        """The design :meth:`to_state` saved; ``ValueError`` if it does not fit the formula."""
        try:
            kinds = dict(state["kinds"])
            levels = {f: list(v) for f, v in state["levels"].items()}
            names = [str(c) for c in state["columns"]]
            keys = [frozenset((lab, lev) for lab, lev in k) for k in state["keys"]]
            version = int(state["version"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"design state is malformed: {e}") from None
        try:
            d = cls(formula_text, levels={f: v for f, v in levels.items() if kinds.get(f) == FAC})
        except ValueError as e:
            raise ValueError(f"design state does not fit the formula: {e}") from None
        for f, k in kinds.items():
            if (
                f not in d._kind
                or k not in (NUM, FAC)
                or (d._kind[f] is not None and d._kind[f] != k)
            ):
                raise ValueError(f"design state does not fit the formula (field {f!r})")
            d._kind[f] = k
        if None not in d._kind.values() and d._coding is None:
            d._kinds_known()
        expected = {k for _, k in d._fixed_layout()} if d._coding is not None else set()
        if d._coding is not None:
            expected |= {k for b in d._random_layout() for _, k in b}
        if (
            len(names) != len(keys)
            or set(keys) - {_ONE} != expected - {_ONE}
            or (d._keys and d._keys[0] == _ONE and (not keys or keys[0] != _ONE))
        ):
            raise ValueError("design state does not fit the formula (columns)")
        d._names, d._keys = names, keys
        d._keyidx = {k: i for i, k in enumerate(keys)}
        d.version = version
        d._rebuild()
        return d


def numeric_design(formula: Formula | str) -> Design:
    """A :class:`Design` whose every field is numeric, ready before any event.

    >>> numeric_design("y ~ x1 + x2 + (1 + x1 | g)").columns
    ('(Intercept)', 'x1', 'x2')

    """
    d = Design(formula)
    if not d.ready:
        d.encode_one(dict.fromkeys(d.fields, 1.0), np.empty(len(d.fields) + 1), learn=True)
    return d


def align(designs: Sequence[Design]) -> tuple[Design, list[np.ndarray | None]]:
    """One design for the union of several designs of one formula, and for each design
    the map ``T`` (``k_merged × k``) with ``a_merged = T a`` for every event it encoded
    (``None``: its columns are the merged ones, in the same order).

    Shards of a stream meet a factor's levels in different orders, so their union
    columns differ in order, in which levels they hold, and in the reference level
    (the first level seen). The merged design takes the first design's levels (so its
    reference levels) and appends the levels only the others saw. A column of the same
    dummies is the same function of an event in every design, so it is matched by what
    it is, not by position. A dummy of a level that another design has as reference is
    an exact linear combination of that design's columns, since every event has exactly
    one level: ``1[f = l] = 1 − Σ_{l' ≠ l} 1[f = l']`` (times the term's other factors
    and numbers), which needs the column without ``f`` (the term's margin), itself
    perhaps a sum over another factor's levels; R's coding rules, which code a factor by
    contrasts only where the margin is in the model, provide it. When a column cannot be
    written so, ``ValueError`` says which and what to do.

    >>> a, b = Design("y ~ x + f + (1 | g)"), Design("y ~ x + f + (1 | g)")
    >>> for ev in ({"x": 1.0, "f": "lo"}, {"x": 2.0, "f": "mid"}, {"x": 3.0, "f": "hi"}):
    ...     _ = a.encode_one(ev, np.empty(4), learn=True)
    >>> for ev in ({"x": 1.0, "f": "mid"}, {"x": 2.0, "f": "lo"}):  # "mid" is b's reference
    ...     _ = b.encode_one(ev, np.empty(4), learn=True)
    >>> merged, (ta, tb) = align([a, b])
    >>> merged.columns, ta is None
    (('(Intercept)', 'x', 'fmid', 'fhi'), True)
    >>> b.columns
    ('(Intercept)', 'x', 'flo')
    >>> tb.tolist()  # fmid = 1 − flo on b's events (b saw only "lo" and "mid"), fhi = 0
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]

    """
    first = designs[0]
    text = first.formula.text
    for d in designs[1:]:
        if d.formula.text != text:
            raise ValueError("only designs of the same formula align")
    kinds: dict[str, str] = {}
    for i, d in enumerate(designs):
        for fld, kind in d._kind.items():
            if kind is None:
                continue
            if kinds.setdefault(fld, kind) != kind:
                raise ValueError(
                    f"field {fld!r} is {kinds[fld]} in one snapshot and {kind} in snapshot "
                    f"{i}: the streams do not have the same fields"
                )
    levels: dict[str, list[str]] = {}
    for d in designs:
        for fld, levs in d._levels.items():
            have = levels.setdefault(fld, [])
            have.extend(v for v in levs if v not in have)
    if len(kinds) == len(first._kind):  # every kind known: lay out the union's columns
        full = Design(text, levels={f: v for f, v in levels.items() if kinds.get(f) == FAC})
        for fld, kind in kinds.items():
            full._kind[fld] = kind
        if full._coding is None:
            full._kinds_known()
        base = first if first.ready else full
        keys = list(base._keys) + [k for k in full._keys if k not in base._keyidx]
        names = {k: n for n, k in zip(full._names, full._keys)}
        merged = Design.from_state(
            text,
            {
                "kinds": kinds,
                "levels": levels,
                "columns": [names[k] for k in keys],
                "keys": [sorted([lab, lev] for lab, lev in k) for k in keys],
                "version": max(d.version for d in designs) + 1,
            },
        )
    else:  # no design has learned an event
        merged = Design.from_state(text, first.to_state())
    maps: list[np.ndarray | None] = []
    for i, d in enumerate(designs):
        if d._keys == merged._keys:
            maps.append(None)
            continue
        T = np.zeros((merged.k, d.k))
        if d.ready:
            for r, key in enumerate(merged._keys):
                expr = _express(key, d, frozenset(), {})
                if expr is None:
                    raise ValueError(_unaligned(merged, r, d, i))
                for j, c in expr.items():
                    T[r, j] = c
        maps.append(T)
    return merged, maps


def _express(key: frozenset, d: Design, done: frozenset, memo: dict) -> dict[int, float] | None:
    """The column ``key`` as ``{column of d: coefficient}`` on ``d``'s events, or ``None``.

    A column of a level that ``d`` never saw is 0 on its events; a dummy that ``d`` does
    not have is rewritten as its margin minus the dummies of ``d``'s other levels, and a
    margin that ``d`` does not have (no intercept) as the sum of the dummies of all of a
    factor's levels (each factor at most once, so the rewriting ends)."""
    got = memo.get((key, done))
    if got is not None or (key, done) in memo:
        return got
    out: dict[int, float] | None = None
    j = d._keyidx.get(key)
    facs = sorted((lab, lev) for lab, lev in key if lev is not None)
    if j is not None:
        out = {j: 1.0}
    elif any(lev not in d._codes.get(lab, {}) for lab, lev in facs):
        out = {}
    else:
        for lab, lev in facs:
            if lab in done:
                continue
            base = key - {(lab, lev)}
            out = _express(base, d, done | {lab}, memo)
            if out is None:
                continue
            out = dict(out)
            for other in d._levels[lab]:
                if other == lev:
                    continue
                e = _express(base | {(lab, other)}, d, done | {lab}, memo)
                if e is None:
                    out = None
                    break
                for c, v in e.items():
                    out[c] = out.get(c, 0.0) - v
            if out is not None:
                out = {c: v for c, v in out.items() if v != 0.0}
                break
        if out is None:  # a column d lacks as a margin is the sum over a factor's levels
            present = {lab for lab, _ in key}
            for fld in d.fields:
                if d._kind[fld] != FAC or fld in present or fld in done or not d._levels.get(fld):
                    continue
                out = {}
                for lev in d._levels[fld]:
                    e = _express(key | {(fld, lev)}, d, done | {fld}, memo)
                    if e is None:
                        out = None
                        break
                    for c, v in e.items():
                        out[c] = out.get(c, 0.0) + v
                if out is not None:
                    out = {c: v for c, v in out.items() if v != 0.0}
                    break
    memo[(key, done)] = out
    return out


def _unaligned(merged: Design, r: int, d: Design, i: int) -> str:
    refs = {
        fld: (levs[0], d._levels[fld][0])
        for fld, levs in merged._levels.items()
        if levs and d._levels.get(fld) and d._levels[fld][0] != levs[0]
    }
    why = "; ".join(
        f"factor {fld!r} has reference level {a!r} in the first snapshot and {b!r} in snapshot {i}"
        for fld, (a, b) in refs.items()
    )
    decl = ", ".join(f"{fld!r}: {merged._levels[fld]!r}" for fld in refs) or "..."
    return (
        f"cannot merge: column {merged.columns[r]!r} is not a linear combination of the "
        f"columns of snapshot {i} ({', '.join(d.columns)})"
        + (f" ({why}, and the term has no margin column to rewrite its dummies)" if why else "")
        + ". Give every engine the same reference levels (levels={"
        + decl
        + "} in MixedLM, --levels on the command line) and learn again"
    )
