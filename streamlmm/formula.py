"""lme4 formulas → a term structure (response, fixed terms, random blocks, group).

``parse_formula("y ~ age * severity + (1 + age || hospital)")`` returns a frozen
:class:`Formula`: the response expression, R's fixed terms in ``terms()`` order, the
random-effects blocks after lme4's ``||`` expansion, and the grouping factor. Which
variables are factors (and so which columns exist) is only known from the data; the
stateful encoder from events to columns is :class:`streamlmm.design.Design`.

The parser is our own: a tokenizer and a precedence-climbing parser with R's operator
precedence, then R's term algebra (``+ - : * / ^``, ``0``/``1``/``-1``) on the tree.
Nothing is ever ``eval``'d: transforms (``I(x^2)``, ``log(x)``, …) compile once into
closures over ``math`` functions (per event) and numpy/``math`` maps (per column).

Why not ``formulaic``: it is a fine implementation of Wilkinson formulas, but it does
not parse lme4's ``(x | g)`` / ``(x || g)`` terms, it names columns its own way
(``I(x ^ 2)`` where R writes ``I(x^2)``), and it materialises transforms with Python's
``eval``. Its model-spec/materializer split assumes the factor levels are known when the
model matrix is built, whereas here a level may first appear mid-stream and must append
columns to an existing layout, and the per-event path must stay a few precompiled
steps, not a call into a general library per row. What we need from it (R's term
algebra and R's column naming) is a few hundred lines, so we keep our own parser.

Examples
--------
>>> f = parse_formula("log(y) ~ x1 * f + I(x1^2) + (1 + x1 || g)")
>>> f.response, f.group, f.fixed_intercept
('log(y)', 'g', True)
>>> [":".join(e.label for e in t) for t in f.fixed_terms]
['x1', 'f', 'I(x1^2)', 'x1:f']
>>> [(r.intercept, [":".join(e.label for e in t) for t in r.terms]) for r in f.random_terms]
[(True, []), (False, ['x1'])]
>>> f.variables
('y', 'x1', 'f')

"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Formula", "RandomTerm", "Expr", "parse_formula", "INTERCEPT", "FUNCTIONS"]

INTERCEPT = "(Intercept)"

# functions allowed in transforms: name -> (scalar function, vectorised function)
# log/exp/pow go through ``math`` element by element in both paths, so that one event and
# a column give bitwise the same value (numpy's SIMD log/exp may differ in the last ulp);
# sqrt and abs are exact (correctly rounded) in both.


def _mapped(fn: Callable[[float], float]) -> Callable[[np.ndarray], np.ndarray]:
    def safe(v: float) -> float:
        try:
            return fn(v)
        except (ValueError, OverflowError, ZeroDivisionError):
            return math.nan

    def vec(a: np.ndarray) -> np.ndarray:
        return np.fromiter(map(safe, a.tolist()), dtype=float, count=a.shape[0])

    return vec


FUNCTIONS: dict[str, tuple[Callable, Callable]] = {
    "log": (math.log, _mapped(math.log)),
    "log1p": (math.log1p, _mapped(math.log1p)),
    "log10": (math.log10, _mapped(math.log10)),
    "log2": (math.log2, _mapped(math.log2)),
    "exp": (math.exp, _mapped(math.exp)),
    "sqrt": (math.sqrt, np.sqrt),
    "abs": (abs, np.abs),
}
_TRANSFORMS = ("I", *FUNCTIONS)

# -- tokens ---------------------------------------------------------------------------------
_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9._]*|\.(?![0-9])[A-Za-z0-9._]*)"
    r"|(?P<bq>`[^`]+`)"
    r"|(?P<op>\|\||\*\*|[~+\-*/^:|(),]))"
)
_SYNTACTIC = re.compile(r"^(?:[A-Za-z][A-Za-z0-9._]*|\.(?![0-9])[A-Za-z0-9._]*)$")
_MAX_FORMULA = 10_000
# how deeply a formula may nest (parentheses, calls, signs, powers, products); a sum of
# terms at the top of the formula or of a bar is flat, however long. Deeper formulas would
# exhaust Python's recursion limit in the parser and in the functions that walk the tree.
MAX_DEPTH = 100
# terms of one part (fixed, or one bar's): a*b*c*... expands to every interaction, 2^n - 1
# terms, which no fit can use; the bound stops the expansion before it takes the machine
MAX_TERMS = 1000


def _error(text: str, pos: int, why: str) -> ValueError:
    return ValueError(f"{why} at position {pos} in formula:\n  {text}\n  {' ' * pos}^")


def _too_deep(text: str, pos: int | None = None) -> ValueError:
    why = (
        f"formula nests more than {MAX_DEPTH} levels deep (parentheses, function calls, "
        "signs, or a chain of operators such as a + b + ... inside I())"
    )
    if pos is None or len(text) > 200:  # no caret into a wall of text
        return ValueError(why + ("" if pos is None else f" at position {pos}"))
    return _error(text, pos, why)


def _check_depth(node, text: str) -> None:
    """``ValueError`` if ``node``'s tree is deeper than :data:`MAX_DEPTH` (measured
    without recursion, so that any tree can be)."""
    stack = [(node, 1)]
    while stack:
        n, d = stack.pop()
        if d > MAX_DEPTH:
            raise _too_deep(text)
        kind = n[0]
        if kind == "bin":
            stack += [(n[2], d + 1), (n[3], d + 1)]
        elif kind in ("paren", "neg", "pos", "call"):
            stack.append((n[-1], d + 1))


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    toks = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            p = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise _error(text, p, f"unexpected character {text[p]!r}")
        kind = m.lastgroup
        start = m.start(kind)
        val = m.group(kind)
        if kind == "bq":
            kind, val = "name", val[1:-1]
        elif kind == "op" and val == "**":
            val = "^"
        toks.append((kind, val, start))
        pos = m.end()
    toks.append(("end", "", len(text)))
    return toks


# -- parse tree: tuples ("num", value, text) ("name", s) ("call", f, arg) ("paren", x)
#    ("neg", x) ("pos", x) ("bin", op, l, r) -----------------------------------------------
_BINARY = {"~": 0, "|": 1, "||": 1, "+": 2, "-": 2, "*": 3, "/": 3, ":": 4, "^": 6}
_UNARY = 5


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0  # nesting of expr(): bounded, so a deep formula is a clear error

    def peek(self):
        return self.toks[self.i]

    def next(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, tok, why: str) -> ValueError:
        return _error(self.text, tok[2], why)

    def expect(self, val: str):
        t = self.next()
        if t[1] != val or t[0] == "name":
            what = "the end" if t[0] == "end" else repr(t[1])
            raise self.fail(t, f"expected {val!r}, found {what}")
        return t

    def expr(self, min_prec: int):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _too_deep(self.text, self.peek()[2])
        try:
            return self._expr(min_prec)
        finally:
            self.depth -= 1

    def _expr(self, min_prec: int):
        left = self.unary()
        while True:
            t = self.peek()
            if t[0] != "op" or t[1] not in _BINARY:
                return left
            prec = _BINARY[t[1]]
            if prec < min_prec:
                return left
            if t[1] == "~":
                raise self.fail(t, "a formula has one '~'")
            self.next()
            right = self.expr(prec if t[1] == "^" else prec + 1)  # ^ is right-associative
            left = ("bin", t[1], left, right)

    def unary(self):
        t = self.peek()
        if t[0] == "op" and t[1] in "+-":
            self.next()
            x = self.expr(_UNARY)
            return ("neg", x) if t[1] == "-" else ("pos", x)
        return self.primary()

    def primary(self):
        t = self.next()
        if t[0] == "num":
            return ("num", float(t[1]), t[1])
        if t[0] == "name":
            if self.peek()[1] == "(" and self.peek()[0] == "op":
                self.next()
                if self.peek()[1] == ")":
                    raise self.fail(self.peek(), f"{t[1]}() needs one argument")
                arg = self.expr(0)
                if self.peek()[1] == ",":
                    raise self.fail(self.peek(), f"{t[1]}() takes one argument")
                self.expect(")")
                if t[1] not in _TRANSFORMS:
                    raise self.fail(
                        t,
                        f"unknown function {t[1]!r} (supported: {', '.join(_TRANSFORMS)})",
                    )
                return ("call", t[1], arg)
            return ("name", t[1])
        if t[0] == "op" and t[1] == "(":
            if self.peek()[1] == ")":
                raise self.fail(self.peek(), "empty parentheses")
            x = self.expr(0)
            self.expect(")")
            return ("paren", x)
        what = "the end of the formula" if t[0] == "end" else repr(t[1])
        raise self.fail(t, f"expected a term, found {what}")


# -- deparse as R does -----------------------------------------------------------------------
def _num_text(v: float) -> str:
    """R's deparse of a number: 15 significant digits, fixed unless scientific is shorter."""
    if v == int(v) and abs(v) < 1e15:
        fixed = str(int(v))
    else:
        fixed = f"{v:.15g}"
        if "e" in fixed:
            fixed = f"{v:.15f}".rstrip("0").rstrip(".")
    sci = f"{v:.15e}"
    mant, exp = sci.split("e")
    mant = mant.rstrip("0").rstrip(".")
    e = int(exp)
    sci = f"{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    return fixed if len(fixed) <= len(sci) else sci


def deparse(node) -> str:
    """R's deparse of an expression tree: spaces around ``+ - *``, none around ``/ ^ :``."""
    kind = node[0]
    if kind == "num":
        return _num_text(node[1])
    if kind == "name":
        return node[1] if _SYNTACTIC.match(node[1]) else f"`{node[1]}`"
    if kind == "call":
        return f"{node[1]}({deparse(node[2])})"
    if kind == "paren":
        return f"({deparse(node[1])})"
    if kind == "neg":
        return f"-{deparse(node[1])}"
    if kind == "pos":
        return f"+{deparse(node[1])}"
    op = node[1]
    sep = op if op in ("/", "^", ":") else f" {op} "
    return f"{deparse(node[2])}{sep}{deparse(node[3])}"


# -- transform expressions ---------------------------------------------------------------------
def _names(node, out: list[str]) -> list[str]:
    kind = node[0]
    if kind == "name":
        if node[1] not in out:
            out.append(node[1])
    elif kind in ("call",):
        _names(node[2], out)
    elif kind in ("paren", "neg", "pos"):
        _names(node[1], out)
    elif kind == "bin":
        _names(node[2], out)
        _names(node[3], out)
    return out


def _check_arith(node, text: str, label: str) -> None:
    kind = node[0]
    if kind == "bin":
        if node[1] not in ("+", "-", "*", "/", "^"):
            raise ValueError(
                f"operator {node[1]!r} inside {label} in {text!r}: only + - * / ^ are "
                "supported in transforms"
            )
        _check_arith(node[2], text, label)
        _check_arith(node[3], text, label)
    elif kind in ("paren", "neg", "pos"):
        _check_arith(node[1], text, label)
    elif kind == "call":
        _check_arith(node[2], text, label)


class _Ops(NamedTuple):
    """How a compiled transform calls a function, raises to a power and combines two
    operands: with floats (one event) or with numpy arrays (a batch)."""

    call: Callable[[str, Callable], Callable]
    power: Callable[[Callable, Callable], Callable]
    binary: Callable[[str, Callable, Callable], Callable]


def _compile(node, index: dict[str, int], ops: _Ops) -> Callable:
    """A transform's expression tree as nested closures (compiled once, no ``eval``)."""
    kind = node[0]
    if kind == "num":
        c = node[1]
        return lambda v: c
    if kind == "name":
        return operator.itemgetter(index[node[1]])
    if kind in ("paren", "pos"):
        return _compile(node[1], index, ops)
    if kind == "neg":
        f = _compile(node[1], index, ops)
        return lambda v: -f(v)
    if kind == "call":
        f = _compile(node[2], index, ops)
        return f if node[1] == "I" else ops.call(node[1], f)
    a, b = _compile(node[2], index, ops), _compile(node[3], index, ops)
    return ops.power(a, b) if node[1] == "^" else ops.binary(node[1], a, b)


def _scalar_call(name: str, f: Callable) -> Callable:
    fn = FUNCTIONS[name][0]
    return lambda v: fn(f(v))


def _scalar_binary(op: str, a: Callable, b: Callable) -> Callable:
    if op == "+":
        return lambda v: a(v) + b(v)
    if op == "-":
        return lambda v: a(v) - b(v)
    if op == "*":
        return lambda v: a(v) * b(v)
    return lambda v: a(v) / b(v)


_SCALAR = _Ops(
    call=_scalar_call,
    power=lambda a, b: lambda v: math.pow(a(v), b(v)),
    binary=_scalar_binary,
)


def _pow_vec(a, b):
    n = max(np.size(a), np.size(b))
    a = np.broadcast_to(np.asarray(a, dtype=float), (n,))
    b = np.broadcast_to(np.asarray(b, dtype=float), (n,))
    out = np.empty(n)
    for r, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        try:
            out[r] = math.pow(x, y)
        except (ValueError, OverflowError, ZeroDivisionError):
            out[r] = math.nan
    return out


def _vector_call(name: str, f: Callable) -> Callable:
    fn, vec = FUNCTIONS[name]

    def call(v):
        x = f(v)
        if isinstance(x, float):
            try:
                return float(fn(x))
            except (ValueError, OverflowError):
                return math.nan
        with np.errstate(all="ignore"):
            return vec(x)

    return call


def _vector_power(a: Callable, b: Callable) -> Callable:
    def power(v):
        x, y = a(v), b(v)
        if isinstance(x, float) and isinstance(y, float):
            try:
                return math.pow(x, y)
            except (ValueError, OverflowError, ZeroDivisionError):
                return math.nan
        return _pow_vec(x, y)

    return power


def _vector_binary(op: str, a: Callable, b: Callable) -> Callable:
    ufunc = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}[op]

    def binary(v):
        with np.errstate(all="ignore"):
            return ufunc(a(v), b(v))

    return binary


_VECTOR = _Ops(call=_vector_call, power=_vector_power, binary=_vector_binary)


def _scalar(node, index: dict[str, int]) -> Callable[[Sequence[float]], float]:
    """One event's value of a transform (floats; errors raise)."""
    return _compile(node, index, _SCALAR)


def _vector(node, index: dict[str, int]) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """A batch's values of a transform (numpy; non-finite results are NaN or ±inf)."""
    return _compile(node, index, _VECTOR)


def _diagnose(node, v: Sequence[float], index: dict[str, int]) -> tuple[float, str | None]:
    """Evaluate step by step and say why the result is not finite."""
    kind = node[0]
    if kind == "num":
        return node[1], None
    if kind == "name":
        return v[index[node[1]]], None
    if kind in ("paren", "pos", "neg"):
        x, why = _diagnose(node[1], v, index)
        return (-x if kind == "neg" else x), why
    if kind == "call":
        x, why = _diagnose(node[2], v, index)
        if why or node[1] == "I":
            return x, why
        fn = node[1]
        if fn.startswith("log"):
            low = -1.0 if fn == "log1p" else 0.0
            if x == low:
                return math.nan, f"{fn} of {_num_text(low)}"
            if x < low:
                return math.nan, f"{fn} of {_num_text(x)}"
        if fn == "sqrt" and x < 0:
            return math.nan, f"square root of {_num_text(x)}"
        try:
            r = FUNCTIONS[fn][0](x)
        except (ValueError, OverflowError):
            return math.nan, f"{fn} overflows"
        return r, (None if math.isfinite(r) else f"{fn} overflows")
    x, why = _diagnose(node[2], v, index)
    if why:
        return x, why
    y, why = _diagnose(node[3], v, index)
    if why:
        return y, why
    op = node[1]
    if op == "/" and y == 0:
        return math.nan, "division by 0"
    if op == "^":
        if x == 0 and y < 0:
            return math.nan, "0 to a negative power"
        if x < 0 and y != int(y):
            return math.nan, "a negative number to a fractional power"
        try:
            r = math.pow(x, y)
        except (ValueError, OverflowError):
            return math.nan, "overflow"
    else:
        r = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else math.nan}[op]
    return r, (None if math.isfinite(r) else "overflow")


@dataclasses.dataclass(frozen=True)
class Expr:
    """One R "variable" of a term: a raw field (``x1``) or a transform (``log(x3)``).

    ``label`` is R's deparse (``I(x^2)``), ``fields`` the raw fields read, in order.

    >>> e = parse_formula("log(y) ~ I(x^2 / 10) + (1 | g)").fixed_terms[0][0]
    >>> e.label, e.fields, e.evaluate([3.0])
    ('I(x^2/10)', ('x',), 0.9)
    >>> e.evaluate_columns([np.array([1.0, 2.0])]).tolist()
    [0.1, 0.4]
    >>> parse_formula("log(y) ~ x + (1 | g)").response_expr.evaluate([0.0])
    Traceback (most recent call last):
    ...
    ValueError: field 'y': log(y) is not finite (log of 0)

    """

    label: str
    fields: tuple[str, ...]
    node: tuple = dataclasses.field(repr=False)

    @property
    def is_field(self) -> bool:
        """True for a bare field (numeric or factor), False for a transform."""
        return self.node[0] == "name"

    def scalar(self, index: dict[str, int] | None = None) -> Callable[[Sequence[float]], float]:
        """A closure ``values -> float`` (``values[index[field]]``; no finiteness check)."""
        return _scalar(self.node, index or {f: i for i, f in enumerate(self.fields)})

    def vector(self, index: dict[str, int] | None = None) -> Callable:
        """A closure ``columns -> array`` (non-finite entries are NaN or ±inf, no error)."""
        return _vector(self.node, index or {f: i for i, f in enumerate(self.fields)})

    def why(self, values: Sequence[float], index: dict[str, int] | None = None) -> str:
        """The ``ValueError`` message for values that give a non-finite result."""
        index = index or {f: i for i, f in enumerate(self.fields)}
        _, why = _diagnose(self.node, values, index)
        names = ", ".join(repr(f) for f in self.fields)
        s = "s" if len(self.fields) > 1 else ""
        return f"field{s} {names}: {self.label} is not finite ({why or 'overflow'})"

    def evaluate(self, values: Sequence[float]) -> float:
        """The value for one event (``values`` in ``fields`` order); ``ValueError`` if not
        finite."""
        try:
            r = _scalar(self.node, {f: i for i, f in enumerate(self.fields)})(values)
        except (ValueError, OverflowError, ZeroDivisionError):
            r = math.nan
        if r - r != 0.0:
            raise ValueError(self.why(values))
        return float(r)

    def evaluate_columns(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """The values for columns (in ``fields`` order); ``ValueError`` naming the first
        row that is not finite."""
        n = np.shape(columns[0])[0] if columns else 1
        r = np.broadcast_to(np.asarray(self.vector()(columns), dtype=float), (n,)).copy()
        bad = ~np.isfinite(r)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"row {i}: {self.why([float(c[i]) for c in columns])}")
        return r


@dataclasses.dataclass(frozen=True)
class RandomTerm:
    """One random-effects block ``(terms | group)``: an intercept flag and numeric terms."""

    intercept: bool
    terms: tuple[tuple[Expr, ...], ...]


@dataclasses.dataclass(frozen=True)
class Formula:
    """A parsed lme4 formula (see the module docstring).

    Attributes
    ----------
    text : the formula as written.
    response : the response as R names it (``"log(y)"``); ``response_expr`` compiles it and
        ``response_field`` is the raw field it reads.
    group : the grouping factor.
    fixed_intercept : whether the fixed part has an intercept.
    fixed_terms : R's ``terms()`` order (by degree, then appearance); a term is a tuple of
        :class:`Expr` in the fixed part's variable order (R's term label order).
    random_terms : one :class:`RandomTerm` per block of Λ, after ``||`` expansion.
    variables : the raw fields read besides the group (the response field first).
    """

    text: str
    response: str
    response_expr: Expr
    group: str
    fixed_intercept: bool
    fixed_terms: tuple[tuple[Expr, ...], ...]
    random_terms: tuple[RandomTerm, ...]
    variables: tuple[str, ...]

    @property
    def response_field(self) -> str:
        """The raw field of the response."""
        return self.response_expr.fields[0]


# -- R's term algebra ---------------------------------------------------------------------------
class _Part:
    """Builds the terms of one part (fixed, or the left of one bar) as R's terms() does."""

    def __init__(self, text: str, where: str):
        self.text = text
        self.where = where
        self.order: list[str] = []  # variable order: first appearance
        self.exprs: dict[str, Expr] = {}
        self.final: tuple = ()

    def atom(self, node) -> Expr:
        label = deparse(node)
        if label not in self.exprs:
            if node[0] == "call":
                _check_arith(node[2], self.text, label)
            fields = tuple(_names(node, []))
            if not fields:
                raise ValueError(f"{label} in {self.text!r} reads no field")
            self.exprs[label] = Expr(label, fields, node)
            self.order.append(label)
        return self.exprs[label]

    def terms(self, node) -> tuple[list[frozenset], bool | None]:
        """``(terms, intercept)`` where a term is a frozenset of labels and intercept is
        True/False when ``1``/``0`` is given, else None."""
        kind = node[0]
        if kind in ("name", "call"):
            return [frozenset([self.atom(node).label])], None
        if kind == "num":
            if node[1] == 1:
                return [], True
            if node[1] == 0:
                return [], False
            raise ValueError(
                f"number {node[2]} in the {self.where} part of {self.text!r}: only 0, 1 and "
                "-1 are terms (use I() for arithmetic)"
            )
        if kind == "paren":
            if node[1][0] == "bin" and node[1][1] in ("|", "||"):
                raise ValueError(
                    f"a random-effects term {deparse(node)} can not be nested inside "
                    f"another term in {self.text!r}"
                )
            return self.terms(node[1])
        if kind == "pos":
            return self.terms(node[1])
        if kind == "neg" or (kind == "bin" and node[1] in "+-"):
            return self.sum(node)
        op = node[1]
        if op in ("|", "||"):
            raise ValueError(
                f"a random-effects term must be in parentheses, (terms {op} group), in "
                f"{self.text!r}"
            )
        left, li = self.terms(node[2])
        if op == "^":
            if node[3][0] != "num" or node[3][1] != int(node[3][1]) or node[3][1] < 1:
                raise ValueError(
                    f"{deparse(node)} in {self.text!r}: the power of a term must be a "
                    "positive integer (use I() for arithmetic)"
                )
            out = list(left)
            for _ in range(int(node[3][1]) - 1):
                out = self.bounded(_unique(out + [a | b for a in out for b in left]))
            return out, li
        right, ri = self.terms(node[3])
        if li is not None or ri is not None:
            raise ValueError(
                f"0 or 1 inside {deparse(node)} in {self.text!r}: an intercept can only be "
                "added or removed with + and -"
            )
        if op == ":":
            return self.bounded(_unique([a | b for a in left for b in right])), None
        if op == "*":
            return self.bounded(_unique(left + right + [a | b for a in left for b in right])), None
        # a / b = a + (all of a):b
        whole = frozenset().union(*left) if left else frozenset()
        return self.bounded(_unique(left + [whole | b for b in right])), None

    def bounded(self, terms):
        """``terms``, or ``ValueError`` past :data:`MAX_TERMS`."""
        if len(terms) > MAX_TERMS:
            raise ValueError(
                f"the {self.where} part of the formula has more than {MAX_TERMS} terms "
                "(a*b*c*... expands to every interaction of its factors; write the terms "
                "you mean, e.g. (a + b + c)^2 for the pairs)"
            )
        return terms

    def sum(self, node) -> tuple[list[frozenset], bool | None]:
        items: list[tuple[int, object]] = []
        _flatten(node, 1, items)
        return self.signed(items)

    def signed(self, items) -> tuple[list[frozenset], bool | None]:
        """The terms and intercept of ``+``/``-`` items (``(sign, node)`` pairs)."""
        out: dict[frozenset, None] = {}  # an ordered set
        intercept = None
        for sign, item in items:
            ts, ic = self.terms(item)
            if sign > 0:
                out.update(dict.fromkeys(ts))
                self.bounded(out)
                if ic is not None:
                    intercept = ic
            else:
                for t in ts:
                    out.pop(t, None)
                if ic is not None:
                    intercept = not ic
        return list(out), intercept

    def ordered(self, terms: list[frozenset]) -> tuple[tuple[Expr, ...], ...]:
        """R's order: by degree (stable), each term's variables in variable order."""
        rank = {lab: i for i, lab in enumerate(self.order)}
        terms = sorted(terms, key=len)  # stable
        return tuple(tuple(self.exprs[lab] for lab in sorted(t, key=rank.get)) for t in terms)


def _unique(terms: list[frozenset]) -> list[frozenset]:
    return list(dict.fromkeys(terms))


def _flatten(node, sign: int, out: list) -> None:
    """A chain of binary/unary + and - into signed items, left to right (without
    recursion: a sum of thousands of terms is a left-deep tree that deep)."""
    stack = [(node, sign)]
    while stack:
        node, sign = stack.pop()
        if node[0] == "bin" and node[1] in "+-":
            stack.append((node[3], sign if node[1] == "+" else -sign))
            stack.append((node[2], sign))
        elif node[0] == "neg":
            stack.append((node[1], -sign))
        elif node[0] == "pos":
            stack.append((node[1], sign))
        else:
            out.append((sign, node))


def _is_bar(node) -> bool:
    return node[0] == "paren" and node[1][0] == "bin" and node[1][1] in ("|", "||")


def _has_bar(node) -> bool:
    if node[0] == "bin":
        return node[1] in ("|", "||") or _has_bar(node[2]) or _has_bar(node[3])
    if node[0] in ("paren", "neg", "pos", "call"):
        return _has_bar(node[-1])
    return False


def _label(t) -> str:
    return ":".join(e.label for e in t)


def parse_formula(text: str) -> Formula:
    """Parse an lme4 formula ``response ~ fixed + (random | group)``.

    Raises
    ------
    ValueError
        For bad syntax (pointing at the position) and for what streamlmm does not fit:
        the message says what and why.

    Examples
    --------
    >>> f = parse_formula("y ~ x1 + (1 | g) + (0 + x1 | g)")
    >>> [(r.intercept, [_label(t) for t in r.terms]) for r in f.random_terms]
    [(True, []), (False, ['x1'])]
    >>> parse_formula("y ~ x + (1 | a) + (1 | b)")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: two grouping factors, 'a' and 'b', ...: ... couple groups, so the statistics ...
    >>> parse_formula("y ~ x +* z + (1 | g)")
    Traceback (most recent call last):
    ...
    ValueError: expected a term, found '*' at position 7 in formula:
      y ~ x +* z + (1 | g)
             ^

    """
    if not isinstance(text, str) or "~" not in text:
        raise ValueError(f"formula must be a string 'y ~ ...', got {text!r}")
    if len(text) > _MAX_FORMULA:
        raise ValueError(f"formula is longer than {_MAX_FORMULA} characters")
    p = _Parser(text)
    if p.peek()[1] == "~":
        raise p.fail(p.peek(), "the formula has no response (lhs ~ rhs)")
    lhs = p.expr(1)
    p.expect("~")
    if p.peek()[0] == "end":
        raise p.fail(p.peek(), "the right-hand side is empty")
    rhs = p.expr(1)
    t = p.peek()
    if t[0] != "end":
        raise p.fail(t, f"unexpected {t[1]!r}")

    # the response
    _check_depth(lhs, text)
    while lhs[0] == "paren":
        lhs = lhs[1]
    if lhs[0] not in ("name", "call"):
        raise ValueError(
            f"response {deparse(lhs)!r} in {text!r}: give a field or a transform of one "
            "(log(y), I(y/100))"
        )
    if lhs[0] == "call":
        _check_arith(lhs[2], text, deparse(lhs))
    yfields = tuple(_names(lhs, []))
    if len(yfields) != 1:
        raise ValueError(
            f"response {deparse(lhs)!r} in {text!r} must read exactly one field, not {len(yfields)}"
        )
    response = Expr(deparse(lhs), yfields, lhs)

    # split bars from the fixed part
    items: list[tuple[int, object]] = []
    _flatten(rhs, 1, items)
    bars, fixed_items = [], []
    for sign, item in items:
        if _is_bar(item):  # its terms are a flat sum too: each of them is measured
            bar = item[1]
            _check_depth(bar[3], text)
            terms: list[tuple[int, object]] = []
            _flatten(bar[2], 1, terms)
            for _, t in terms:
                _check_depth(t, text)
        else:
            _check_depth(item, text)
        if _is_bar(item):
            if sign < 0:
                raise ValueError(f"a random-effects term can not be removed in {text!r}")
            bars.append(item[1])
        elif _has_bar(item):
            raise ValueError(
                f"random-effects term in {deparse(item)!r} must be its own term, "
                f"(terms | group), in {text!r}"
            )
        else:
            fixed_items.append((sign, item))
    if not bars:
        raise ValueError(
            f"formula {text!r} has no random-effects term (terms | group): streamlmm fits "
            "linear mixed models with one grouping factor"
        )

    fixed = _Part(text, "fixed")
    fterms, fint = fixed.signed(fixed_items)
    fixed_intercept = True if fint is None else fint
    fixed_terms = fixed.final = fixed.ordered(fterms)
    if not fixed_intercept and not fixed_terms:
        raise ValueError(
            f"the fixed part of {text!r} is empty: give at least an intercept or one term"
        )

    group = None
    randoms: list[RandomTerm] = []
    parts: list[_Part] = []
    for bar in bars:
        op, left, right = bar[1], bar[2], bar[3]
        g = right[1] if right[0] == "name" else None
        if g is None:
            kind = {"/": "nested", ":": "nested"}.get(right[1] if right[0] == "bin" else "")
            why = (
                f"{kind} grouping factors ({deparse(right)}) couple groups, so the "
                "statistics are no longer per group"
                if kind
                else "the grouping factor must be one field"
            )
            raise ValueError(f"unsupported random-effects term ({deparse(bar)}) in {text!r}: {why}")
        if group is not None and g != group:
            raise ValueError(
                f"two grouping factors, {group!r} and {g!r}, in {text!r}: crossed or nested "
                "random effects couple groups, so the statistics are no longer per group; "
                "streamlmm fits one grouping factor"
            )
        group = g
        part = _Part(text, "random")
        ts, ic = part.terms(left)
        intercept = True if ic is None else ic
        terms = part.final = part.ordered(ts)
        parts.append(part)
        if op == "||":
            blocks = ([RandomTerm(True, ())] if intercept else []) + [
                RandomTerm(False, (t,)) for t in terms
            ]
        else:
            blocks = [RandomTerm(intercept, terms)]
        if not blocks or not (blocks[0].intercept or blocks[0].terms):
            raise ValueError(f"the random-effects term ({deparse(bar)}) in {text!r} is empty")
        randoms.extend(blocks)
    assert group is not None

    seen: dict = {}
    for r in randoms:
        keys = ([frozenset()] if r.intercept else []) + [
            frozenset(e.label for e in t) for t in r.terms
        ]
        for k, name in zip(
            keys, ([INTERCEPT] if r.intercept else []) + [_label(t) for t in r.terms]
        ):
            if k in seen:
                raise ValueError(
                    f"random-effects column {name!r} is in two terms on {group!r} in "
                    f"{text!r}: each column may be in one block only"
                )
            seen[k] = True

    variables: list[str] = list(yfields)
    for part in [fixed, *parts]:
        used = {e.label for t in part.final for e in t}
        for lab in part.order:
            if lab in used:
                variables.extend(f for f in part.exprs[lab].fields if f not in variables)
    if group in variables:
        role = "the response" if group in yfields else "a predictor"
        raise ValueError(
            f"grouping factor {group!r} is also {role} in {text!r}: a group's effect "
            "would be confounded with it"
        )
    preds = {fld for part in [fixed, *parts] for t in part.final for e in t for fld in e.fields}
    if yfields[0] in preds:
        raise ValueError(f"response field {yfields[0]!r} is also a predictor in {text!r}")
    return Formula(
        text=text,
        response=response.label,
        response_expr=response,
        group=group,
        fixed_intercept=fixed_intercept,
        fixed_terms=fixed_terms,
        random_terms=tuple(randoms),
        variables=tuple(variables),
    )
