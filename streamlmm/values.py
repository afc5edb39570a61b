"""Scalar values of events: what counts as a number, and a missing value.

Every path that reads a field (``learn_one``, ``learn_many``, the stream decoder, the
design's transforms) uses :func:`number`, so all of them accept and reject the same
things with the same words.

"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["Missing", "number", "overflow_message", "count_text", "MAX_ABS"]

MAX_ABS = 1e150  # |value| at which w·v·v' could overflow: such an event is refused


def overflow_message(names, values, w: float) -> str:
    """Why an event's weighted products ``w·v·v'`` would overflow: the largest field.

    >>> overflow_message(["x", "y"], [3.0, -2e150], 2.0)
    "field 'y': weight 2 × value² would overflow the statistics"

    """
    field = names[int(np.argmax(np.abs(np.asarray(values, dtype=float))))]
    return f"field {field!r}: weight {w:g} × value² would overflow the statistics"


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


def count_text(v: float) -> str:
    """A count (events, observations, Σw) as text: an integer in full, never ``2e+06``;
    a fractional one (decayed weights) to 10 significant digits.

    >>> count_text(2e6), count_text(3.0), count_text(1234567.891234), count_text(float("nan"))
    ('2000000', '3', '1234567.891', 'nan')

    """
    v = float(v)
    if math.isfinite(v) and v.is_integer() and abs(v) < 2**63:
        return str(int(v))
    return f"{v:.10g}"
