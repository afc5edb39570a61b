"""lme4 formula parsing: columns, index maps, shiftable columns and errors."""

from __future__ import annotations

import pytest

from streamlmm.formula import INTERCEPT, parse_formula


def test_slopes_formula_columns_and_maps():
    f = parse_formula("y ~ x1 + x2 + (1 + x1 | g)")
    assert (f.response, f.group) == ("y", "g")
    assert f.fixed == (INTERCEPT, "x1", "x2")
    assert f.random == (INTERCEPT, "x1")
    assert f.columns == (INTERCEPT, "x1", "x2")
    assert (f.p, f.q, f.k) == (3, 2, 3)
    assert [f.columns[i] for i in f.xi] == list(f.fixed)
    assert [f.columns[i] for i in f.zi] == list(f.random)
    assert f.features == ("x1", "x2")


@pytest.mark.parametrize(
    "text, fixed, random",
    [
        ("y ~ x1 + (1 | g)", (INTERCEPT, "x1"), (INTERCEPT,)),
        ("y ~ x1 + (x1 | g)", (INTERCEPT, "x1"), (INTERCEPT, "x1")),
        ("y ~ 0 + x1 + (1 | g)", ("x1",), (INTERCEPT,)),
        ("y ~ x1 - 1 + (1 | g)", ("x1",), (INTERCEPT,)),
        ("y ~ 1 + (0 + x1 | g)", (INTERCEPT,), ("x1",)),
        ("y~x1+x2+(1+x2|grp)", (INTERCEPT, "x1", "x2"), (INTERCEPT, "x2")),
        ("y ~ (1 | g)", (INTERCEPT,), (INTERCEPT,)),
    ],
)
def test_lme4_intercept_conventions(text, fixed, random):
    f = parse_formula(text)
    assert f.fixed == fixed
    assert f.random == random
    assert set(f.columns) == set(fixed) | set(random)
    assert len(f.columns) == len(set(f.columns))


def test_random_only_column_is_in_the_union():
    f = parse_formula("y ~ x1 + (1 + z | g)")
    assert f.columns == (INTERCEPT, "x1", "z")
    assert f.features == ("x1", "z")
    assert f.zi.tolist() == [0, 2]


@pytest.mark.parametrize(
    "text, mask",
    [
        # every non-intercept column shiftable, and y (fixed intercept)
        ("y ~ x1 + x2 + (1 + x1 | g)", [False, True, True, True]),
        # no fixed intercept: neither x1 nor y can be shifted
        ("y ~ 0 + x1 + (1 | g)", [False, False, False]),
        # x1 is a random slope without a random intercept to absorb a shift
        ("y ~ x1 + (0 + x1 | g)", [False, False, True]),
        # z only random, with a random intercept, but no fixed intercept... z is not fixed
        ("y ~ 0 + x1 + (1 + z | g)", [False, False, True, False]),
    ],
)
def test_shiftable_mask(text, mask):
    f = parse_formula(text)
    assert f.shiftable.tolist() == mask
    assert len(f.shiftable) == f.k + 1


@pytest.mark.parametrize(
    "text, words",
    [
        ("y ~ x1", "exactly one random-effects term"),
        ("y ~ x1 + (1 | g) + (1 | h)", "exactly one random-effects term"),
        ("y ~ x1 + (x1 || g)", "unsupported random-effects term"),
        ("y ~ x1 + (x1 | g / h)", "grouping factor"),
        ("y ~ log(x1) + (1 | g)", "exactly one random-effects term"),
        ("y ~ x1:x2 + (1 | g)", "unsupported term"),
        ("y ~ x1 + x1 + (1 | g)", "appears twice"),
        ("y ~ 0 + (1 | g)", "fixed part is empty"),
        ("y ~ x1 + (0 | g)", "random part is empty"),
        ("y ~ g + (1 | g)", "also the response or the grouping factor"),
        ("y ~ y + (1 | g)", "also the response or the grouping factor"),
        ("log(y) ~ x + (1 | g)", "plain column name"),
        ("y + x + (1 | g)", "must be a string"),
    ],
)
def test_unsupported_formulas_raise_with_reason(text, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_formula(text)


def test_formula_must_be_a_string():
    with pytest.raises(ValueError):
        parse_formula(None)  # type: ignore[arg-type]


def test_formula_is_frozen_and_hashable():
    f = parse_formula("y ~ x + (1 | g)")
    assert f == parse_formula("y ~ x + (1 | g)")
    assert hash(f) == hash(parse_formula("y ~ x + (1 | g)"))
    with pytest.raises(AttributeError):
        f.group = "h"  # type: ignore[misc]
