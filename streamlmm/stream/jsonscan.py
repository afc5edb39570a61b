"""A numba scanner for the common case: flat JSON events with a string group key.

One call reads a whole poll, the messages laid end to end in one buffer, into columns:
the numeric fields as ``float64`` and the group key as a byte range. It accepts only a
strict subset of JSON, and every message outside it is *declined* (left to the slower
paths of :mod:`streamlmm.stream.decode`, which decide and give the reasons):

- one object, no nesting; fields in any order, each at most once;
- member names and string values plain ASCII (no escapes, no control characters);
- the group key a string of at most ``max_key`` bytes; every formula field a number;
  ``w`` a number or absent (then 1); other fields strings, numbers, ``true``, ``false``
  or ``null``;
- numbers in JSON's grammar with at most 19 significant digits, converted to the
  nearest double exactly as Python's ``float`` does (Clinger's fast path, else the
  Eisel-Lemire algorithm; the rare input neither decides is declined).

The keys' byte ranges go to :class:`~streamlmm.keytable.KeyTable`, which gives
them ids.

"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["scan", "scan_split", "field_table", "POW10_HI", "POW10_LO"]

_OPTS = {"cache": True, "nogil": True}
_INLINE = {**_OPTS, "inline": "always"}
# the scans only read and write arrays they are given: compiled without NRT they carry no
# reference counting, whose increments and decrements of the arrays passed to the inlined
# helpers cost more than the parsing (68 → 23 ns for a message holding only a key)
_SCAN = {**_OPTS, "_nrt": False}
_MIN_EXP10 = -348
_MAX_EXP10 = 347


def _pow10_table() -> tuple[np.ndarray, np.ndarray]:
    """128-bit truncated mantissas of ``10**e``, ``e`` in [-348, 347], top bit set."""
    hi = np.empty(_MAX_EXP10 - _MIN_EXP10 + 1, np.uint64)
    lo = np.empty_like(hi)
    mask = (1 << 64) - 1
    for i, e in enumerate(range(_MIN_EXP10, _MAX_EXP10 + 1)):
        if e >= 0:
            v = 10**e
            b = v.bit_length()
            m = v << (128 - b) if b <= 128 else v >> (b - 128)
        else:
            d = 10**-e
            s = 127 + d.bit_length()
            m = (1 << s) // d
            while m.bit_length() > 128:
                s -= 1
                m = (1 << s) // d
            while m.bit_length() < 128:
                s += 1
                m = (1 << s) // d
        hi[i], lo[i] = m >> 64, m & mask
    return hi, lo


POW10_HI, POW10_LO = _pow10_table()
_EXACT10 = np.array([10.0**i for i in range(23)])  # exactly representable powers of ten


def field_table(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The field names as one ASCII buffer and its ``len(names) + 1`` offsets."""
    raw = [n.encode("ascii") for n in names]
    off = np.zeros(len(raw) + 1, np.int64)
    off[1:] = np.cumsum([len(r) for r in raw])
    return np.frombuffer(b"".join(raw), np.uint8).copy(), off


# -- numbers -------------------------------------------------------------------------------
@intrinsic
def _mul64(typingctx, a, b):  # pragma: no cover - compiled
    """The 128-bit product of two uint64 as ``(hi, lo)`` (one widening multiply)."""

    def codegen(context, builder, signature, args):
        i64, i128 = ir.IntType(64), ir.IntType(128)
        p = builder.mul(builder.zext(args[0], i128), builder.zext(args[1], i128))
        hi = builder.trunc(builder.lshr(p, ir.Constant(i128, 64)), i64)
        return context.make_tuple(builder, signature.return_type, [hi, builder.trunc(p, i64)])

    return types.UniTuple(types.uint64, 2)(types.uint64, types.uint64), codegen


@intrinsic
def _clz(typingctx, x):  # pragma: no cover - compiled
    """Leading zero bits of a uint64 (64 for 0)."""

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.int64(types.uint64), codegen


@njit(**_INLINE)
def _eisel_lemire(man, exp10, neg):  # pragma: no cover - numba
    """``±man · 10**exp10`` rounded to nearest, and whether it is decided (Go's
    ``strconv.eiselLemire64``: finite, normal results only)."""
    if man == np.uint64(0):
        return (-0.0 if neg else 0.0), True
    if exp10 < _MIN_EXP10 or exp10 > _MAX_EXP10:
        return 0.0, False
    clz = _clz(man)
    man = man << np.uint64(clz)
    ret_exp2 = np.int64(((217706 * exp10) >> 16) + 64 + 1023 - clz)
    i = exp10 - _MIN_EXP10
    x_hi, x_lo = _mul64(man, POW10_HI[i])
    one_ff = np.uint64(0x1FF)
    if (x_hi & one_ff) == one_ff and x_lo + man < man:
        y_hi, y_lo = _mul64(man, POW10_LO[i])
        m_hi, m_lo = x_hi, x_lo + y_hi
        if m_lo < x_lo:
            m_hi += np.uint64(1)
        if (m_hi & one_ff) == one_ff and m_lo + np.uint64(1) == np.uint64(0) and y_lo + man < man:
            return 0.0, False
        x_hi, x_lo = m_hi, m_lo
    msb = x_hi >> np.uint64(63)
    mant = x_hi >> (msb + np.uint64(9))
    ret_exp2 -= np.int64(np.uint64(1) ^ msb)
    if (
        x_lo == np.uint64(0)
        and (x_hi & one_ff) == np.uint64(0)
        and (mant & np.uint64(3)) == np.uint64(1)
    ):
        return 0.0, False
    mant += mant & np.uint64(1)
    mant = mant >> np.uint64(1)
    if mant >> np.uint64(53) > np.uint64(0):
        mant = mant >> np.uint64(1)
        ret_exp2 += 1
    if ret_exp2 <= 0 or ret_exp2 >= 0x7FF:
        return 0.0, False
    f = math.ldexp(np.float64(mant), ret_exp2 - 1075)  # mant < 2**53: both steps exact
    return (-f if neg else f), True


@njit(**_INLINE)
def _to_double(man, exp10, neg):  # pragma: no cover - numba
    """The double nearest ``±man · 10**exp10`` and whether it is decided."""
    if man <= np.uint64(1 << 53) and -22 <= exp10 <= 22:  # Clinger: one exact operation
        f = np.float64(man)
        f = f * _EXACT10[exp10] if exp10 >= 0 else f / _EXACT10[-exp10]
        return (-f if neg else f), True
    return _eisel_lemire(man, exp10, neg)


@njit(**_INLINE)
def _number(buf, i, end):  # pragma: no cover - numba
    """Parse a JSON number at ``buf[i]``: ``(value, next index)``, next -1 if declined."""
    neg = False
    if i < end and buf[i] == 45:  # '-'
        neg = True
        i += 1
    if i >= end or not 48 <= buf[i] <= 57:
        return 0.0, -1
    man = np.uint64(0)
    nd = 0  # significant digits in man
    exp10 = 0
    if buf[i] == 48:  # '0': no other digit may follow
        i += 1
    else:
        while i < end and 48 <= buf[i] <= 57:
            if nd < 19:
                man = man * np.uint64(10) + np.uint64(buf[i] - 48)
                nd += 1
            else:
                return 0.0, -1
            i += 1
    integer = not (i < end and buf[i] == 46)
    if not integer:  # '.'
        i += 1
        if i >= end or not 48 <= buf[i] <= 57:
            return 0.0, -1
        while i < end and 48 <= buf[i] <= 57:
            d = buf[i] - 48
            if nd == 0 and d == 0:
                exp10 -= 1  # a leading zero is not significant
            elif nd < 19:
                man = man * np.uint64(10) + np.uint64(d)
                nd += 1
                exp10 -= 1
            else:
                return 0.0, -1
            i += 1
    if i < end and (buf[i] == 101 or buf[i] == 69):  # 'e' | 'E'
        i += 1
        eneg = False
        if i < end and (buf[i] == 43 or buf[i] == 45):
            eneg = buf[i] == 45
            i += 1
        if i >= end or not 48 <= buf[i] <= 57:
            return 0.0, -1
        e = 0
        while i < end and 48 <= buf[i] <= 57:
            if e > 100_000:
                return 0.0, -1
            e = e * 10 + (buf[i] - 48)
            i += 1
        exp10 += -e if eneg else e
    elif integer and man == np.uint64(0):
        neg = False  # the integer -0 is the int 0: the float +0.0, as in Python
    f, ok = _to_double(man, exp10, neg)
    return f, (i if ok else -1)


# -- objects -------------------------------------------------------------------------------
@njit(**_INLINE)
def _ws(buf, i, end):  # pragma: no cover - numba
    while i < end and (buf[i] == 32 or buf[i] == 10 or buf[i] == 13 or buf[i] == 9):
        i += 1
    return i


@njit(**_INLINE)
def _string(buf, i, end):  # pragma: no cover - numba
    """End (the closing quote) of a plain ASCII string whose opening quote is at
    ``i - 1``; -1 if the string is not plain."""
    while i < end:
        c = buf[i]
        if c == 34:
            return i
        if c == 92 or c < 32 or c >= 128:
            return -1
        i += 1
    return -1


@njit(**_INLINE)
def _literal(buf, i, end):  # pragma: no cover - numba
    """Index after ``true``, ``false`` or ``null`` at ``i``; -1 otherwise."""
    for word in ((116, 114, 117, 101), (110, 117, 108, 108)):
        if i + 4 <= end and buf[i] == word[0] and buf[i + 1] == word[1]:
            if buf[i + 2] == word[2] and buf[i + 3] == word[3]:
                return i + 4
    if i + 5 <= end and buf[i] == 102 and buf[i + 1] == 97 and buf[i + 2] == 108:
        if buf[i + 3] == 115 and buf[i + 4] == 101:
            return i + 5
    return -1


@njit(**_INLINE)
def _field(buf, s, e, names, name_off):  # pragma: no cover - numba
    """Index of the member name ``buf[s:e]`` in the field table, or -1."""
    n = e - s
    for f in range(name_off.shape[0] - 1):
        a = name_off[f]
        if name_off[f + 1] - a != n:
            continue
        same = True
        for j in range(n):
            if buf[s + j] != names[a + j]:
                same = False
                break
        if same:
            return f
    return -1


@njit(**_INLINE)
def _value(buf, i, end, f, row, num, kpos, max_key):  # pragma: no cover
    """Read the value of field ``f`` (-1: not a formula field) at ``i``; the index after
    it, or -1 to decline the message."""
    if f == 0:  # the group key: a plain string
        if i >= end or buf[i] != 34:
            return -1
        j = _string(buf, i + 1, end)
        if j < 0 or j - i - 1 > max_key:
            return -1
        kpos[row, 0], kpos[row, 1] = i + 1, j
        return j + 1
    if f > 0:
        v, j = _number(buf, i, end)
        if j >= 0:
            num[row, f - 1] = v
        return j
    if i >= end:
        return -1
    c = buf[i]
    if c == 34:
        j = _string(buf, i + 1, end)
        return j + 1 if j >= 0 else -1
    if c == 45 or 48 <= c <= 57:
        return _number(buf, i, end)[1]
    return _literal(buf, i, end)


@njit(**_INLINE)
def _object(buf, i, end, row, names, name_off, num, kpos, max_key):  # pragma: no cover
    """Scan one object starting at ``buf[i]`` (bounded by ``end``): the bit set of the
    formula fields it held (-1 to decline it) and the index after the object and the
    whitespace that follows it."""
    i = _ws(buf, i, end)
    if i >= end or buf[i] != 123:  # '{'
        return -1, i
    i = _ws(buf, i + 1, end)
    seen = 0
    if i < end and buf[i] == 125:  # '{}'
        return seen, _ws(buf, i + 1, end)
    while True:
        if i >= end or buf[i] != 34:
            return -1, i
        j = _string(buf, i + 1, end)
        if j < 0:
            return -1, i
        f = _field(buf, i + 1, j, names, name_off)
        if f >= 0:
            if seen & (1 << f):
                return -1, i  # a repeated field: the reference path decides
            seen |= 1 << f
        i = _ws(buf, j + 1, end)
        if i >= end or buf[i] != 58:  # ':'
            return -1, i
        i = _ws(buf, i + 1, end)
        i = _value(buf, i, end, f, row, num, kpos, max_key)
        if i < 0:
            return -1, i
        i = _ws(buf, i, end)
        if i < end and buf[i] == 44:  # ','
            i = _ws(buf, i + 1, end)
            continue
        if i < end and buf[i] == 125:  # '}'
            return seen, _ws(buf, i + 1, end)
        return -1, i


@njit(**_INLINE)
def _event(buf, i, end, r, names, name_off, required, defaults, max_key, max_abs, w_at, num, kpos):
    """Message ``r`` at ``buf[i]`` into row ``r`` of ``num``/``kpos``: whether it is
    accepted (with every required field, numbers within ``±max_abs``, a weight ``>= 0``)
    and the index after it."""
    nf = num.shape[1]
    for c in range(nf):
        num[r, c] = defaults[c]
    seen, j = _object(buf, i, end, r, names, name_off, num, kpos, max_key)
    good = seen >= 0 and (seen & required) == required and num[r, w_at] >= 0.0
    for c in range(nf):
        good &= abs(num[r, c]) <= max_abs
    return good, j


@njit(**_SCAN)
def scan(
    buf, starts, names, name_off, required, defaults, max_key, max_abs, w_at, num, kpos, ok
):  # pragma: no cover
    """Scan messages ``buf[starts[r]:starts[r + 1]]`` into ``num`` (fields 1.. of the
    table, in order) and ``kpos`` (the key's byte range); ``ok[r]`` when message ``r``
    is accepted. Fields absent from a message take ``defaults`` (NaN: required, so the
    message is declined unless ``required`` says otherwise). A message is also declined
    when a number is beyond ``±max_abs`` or the weight (column ``w_at``) is negative,
    which the slower paths refuse with a reason."""
    for r in range(starts.shape[0] - 1):
        end = starts[r + 1]
        good, j = _event(
            buf, starts[r], end, r, names, name_off, required, defaults, max_key, max_abs,
            w_at, num, kpos,
        )  # fmt: skip
        ok[r] = good and j == end


@njit(**_SCAN)
def scan_split(
    buf, sep, starts, names, name_off, required, defaults, max_key, max_abs, w_at, num, kpos, ok
):  # pragma: no cover
    """:func:`scan` of ``n = len(ok)`` messages laid end to end with a ``sep`` byte
    (NUL: never in JSON) between each two, finding where they start in the same pass:
    message ``r`` is ``buf[starts[r]:starts[r + 1] - 1]`` (``starts[n] = len(buf) + 1``).
    Returns the number of messages found; not ``n`` when one held a ``sep`` of its own
    (then nothing is decided)."""
    size = buf.shape[0]
    n = ok.shape[0]
    i = 0
    for r in range(n):
        if i > size:
            return r
        starts[r] = i
        good, j = _event(
            buf, i, size, r, names, name_off, required, defaults, max_key, max_abs,
            w_at, num, kpos,
        )  # fmt: skip
        if not (good and (j == size or buf[j] == sep)):
            good = False
            j = i
            while j < size and buf[j] != sep:  # a declined message: skip to its end
                j += 1
        ok[r] = good
        i = j + 1
    starts[n] = i
    return n if i == size + 1 else n + 1
