"""lme4 formula → column specification.

A formula names a response, fixed-effect columns and one random-effects term over one
grouping factor, as in lme4: ``y ~ x1 + x2 + (1 + x1 | g)``. The fixed columns ``x`` and
the random columns ``z`` are both read from one *union* vector ``a`` of distinct columns
(the intercept is the column of ones), so that one packed cross-product of ``[a, y]``
per group holds every block the math needs: ``ZZ``, ``ZX``, ``Zy``, ``XX``, ``Xy``,
``yy``.

"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

__all__ = ["Formula", "parse_formula", "INTERCEPT"]

INTERCEPT = "(Intercept)"

_NAME = r"[A-Za-z_][A-Za-z0-9_.]*"
_TERM = re.compile(rf"^(?:{_NAME}|0|1|-1)$")


@dataclasses.dataclass(frozen=True)
class Formula:
    """A parsed lme4 formula with the index maps into the union column vector.

    Parameters
    ----------
    text
        The formula as written.
    response
        Name of the target ``y``.
    group
        Name of the grouping factor ``g``.
    fixed
        lme4 names of the fixed-effect columns, ``(Intercept)`` first when present.
    random
        lme4 names of the random-effect columns.
    columns
        The union of ``fixed`` and ``random``: the columns ``a`` that are accumulated.

    Examples
    --------
    >>> f = parse_formula("y ~ x1 + x2 + (1 + x1 | g)")
    >>> f.fixed, f.random, f.group
    (('(Intercept)', 'x1', 'x2'), ('(Intercept)', 'x1'), 'g')
    >>> f.p, f.q, f.xi.tolist(), f.zi.tolist()
    (3, 2, [0, 1, 2], [0, 1])
    >>> parse_formula("y ~ 0 + x + (1 | g)").columns
    ('x', '(Intercept)')

    """

    text: str
    response: str
    group: str
    fixed: tuple[str, ...]
    random: tuple[str, ...]
    columns: tuple[str, ...]

    @property
    def p(self) -> int:
        """Number of fixed-effect columns."""
        return len(self.fixed)

    @property
    def q(self) -> int:
        """Number of random-effect columns."""
        return len(self.random)

    @property
    def k(self) -> int:
        """Number of union columns (without the response)."""
        return len(self.columns)

    @functools.cached_property
    def xi(self) -> np.ndarray:
        """Positions of the fixed columns in the union vector."""
        return np.array([self.columns.index(c) for c in self.fixed], dtype=np.int64)

    @functools.cached_property
    def zi(self) -> np.ndarray:
        """Positions of the random columns in the union vector."""
        return np.array([self.columns.index(c) for c in self.random], dtype=np.int64)

    @property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        """Indices into ``random`` of each random term: one unstructured block."""
        return (tuple(range(self.q)),)

    @functools.cached_property
    def features(self) -> tuple[str, ...]:
        """Names of the input features, the union columns without the intercept."""
        return tuple(c for c in self.columns if c != INTERCEPT)

    @functools.cached_property
    def shiftable(self) -> np.ndarray:
        """Which union columns may be centred without changing the model (docs/math.md §6).

        A column may be shifted when every part it belongs to (fixed, random) has an
        intercept that absorbs the shift. The response is shiftable when the fixed part
        has an intercept. The returned mask has ``k + 1`` entries, the last for the response.
        """
        fixed_int = INTERCEPT in self.fixed
        random_int = INTERCEPT in self.random
        mask = []
        for c in self.columns:
            mask.append(
                c != INTERCEPT
                and (c not in self.fixed or fixed_int)
                and (c not in self.random or random_int)
            )
        mask.append(fixed_int)
        return np.array(mask, dtype=bool)


def _split_terms(rhs: str) -> list[str]:
    # "x - 1" splits into "x" and "- 1": drop the space after the sign so it reads "-1"
    terms = (t.strip() for t in rhs.replace("-", "+-").split("+"))
    return [re.sub(r"^-\s+", "-", t) for t in terms if t]


def _columns(terms: list[str], where: str) -> list[str]:
    """Turn ``['0', 'x1']`` into lme4 column names, intercept first when implied."""
    intercept = True
    names: list[str] = []
    for t in terms:
        if not _TERM.match(t):
            raise ValueError(
                f"unsupported term {t!r} in the {where} part: streamlmm takes plain column "
                "names, 0, 1 and -1 (no interactions, transforms or factors)"
            )
        if t in ("0", "-1"):
            intercept = False
        elif t == "1":
            intercept = True
        elif t in names:
            raise ValueError(f"column {t!r} appears twice in the {where} part")
        else:
            names.append(t)
    return ([INTERCEPT] if intercept else []) + names


def parse_formula(text: str) -> Formula:
    """Parse ``y ~ fixed + (random | g)``.

    Raises
    ------
    ValueError
        If the formula is not of the supported shape; the message says why.

    Examples
    --------
    >>> parse_formula("y ~ x + (1 | g)").random
    ('(Intercept)',)
    >>> parse_formula("y ~ x1 + (x1 | g)").random
    ('(Intercept)', 'x1')
    >>> parse_formula("y ~ x1 + (x1 || g)")
    Traceback (most recent call last):
    ...
    ValueError: unsupported random-effects term '(x1 || g)': use one term (terms | group)

    """
    if not isinstance(text, str) or "~" not in text:
        raise ValueError(f"formula must be a string 'y ~ ...', got {text!r}")
    lhs, rhs = (s.strip() for s in text.split("~", 1))
    if not re.fullmatch(_NAME, lhs):
        raise ValueError(f"response {lhs!r} must be a plain column name")
    bars = re.findall(r"\(([^()]*)\)", rhs)
    if len(bars) != 1:
        raise ValueError(
            f"formula {text!r} must have exactly one random-effects term (terms | group)"
        )
    inner = bars[0]
    if inner.count("|") != 1 or "||" in inner:
        raise ValueError(
            f"unsupported random-effects term '({inner})': use one term (terms | group)"
        )
    re_rhs, group = (s.strip() for s in inner.split("|"))
    if not re.fullmatch(_NAME, group):
        raise ValueError(f"grouping factor {group!r} must be a plain column name")
    fixed_rhs = rhs.replace(f"({inner})", "")
    fixed = _columns(_split_terms(fixed_rhs), "fixed")
    random = _columns(_split_terms(re_rhs), "random")
    if not fixed:
        raise ValueError("the fixed part is empty: give at least an intercept or one column")
    if not random:
        raise ValueError("the random part is empty")
    names = {lhs, group}
    for c in fixed + random:
        if c in names:
            raise ValueError(f"column {c!r} is also the response or the grouping factor")
    columns = list(fixed) + [c for c in random if c not in fixed]
    return Formula(
        text=text,
        response=lhs,
        group=group,
        fixed=tuple(fixed),
        random=tuple(random),
        columns=tuple(columns),
    )
