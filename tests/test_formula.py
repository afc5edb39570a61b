"""lme4 formula parsing: term structure, R's names and order, || expansion, refusals."""

from __future__ import annotations

import pytest

from streamlmm.formula import MAX_DEPTH, MAX_TERMS, parse_formula


def labels(terms):
    return [":".join(e.label for e in t) for t in terms]


def blocks(f):
    return [(r.intercept, labels(r.terms)) for r in f.random_terms]


def test_slopes_formula():
    f = parse_formula("y ~ x1 + x2 + (1 + x1 | g)")
    assert (f.response, f.group, f.fixed_intercept) == ("y", "g", True)
    assert labels(f.fixed_terms) == ["x1", "x2"]
    assert blocks(f) == [(True, ["x1"])]
    assert f.variables == ("y", "x1", "x2")


@pytest.mark.parametrize(
    "text, intercept, fixed, random",
    [
        ("y ~ x1 + (1 | g)", True, ["x1"], [(True, [])]),
        ("y ~ x1 + (x1 | g)", True, ["x1"], [(True, ["x1"])]),
        ("y ~ 0 + x1 + (1 | g)", False, ["x1"], [(True, [])]),
        ("y ~ x1 - 1 + (1 | g)", False, ["x1"], [(True, [])]),
        ("y ~ -1 + x1 + (1 | g)", False, ["x1"], [(True, [])]),
        ("y ~ x1 - 1 + 1 + (1 | g)", True, ["x1"], [(True, [])]),
        ("y ~ 1 + (0 + x1 | g)", True, [], [(False, ["x1"])]),
        ("y ~ 1 + (-1 + x1 | g)", True, [], [(False, ["x1"])]),
        ("y~x1+x2+(1+x2|grp)", True, ["x1", "x2"], [(True, ["x2"])]),
        ("y ~ (1 | g)", True, [], [(True, [])]),
        ("y ~ x1 + x2 - x1 + (1 | g)", True, ["x2"], [(True, [])]),
    ],
)
def test_lme4_intercept_conventions(text, intercept, fixed, random):
    f = parse_formula(text)
    assert f.fixed_intercept is intercept
    assert labels(f.fixed_terms) == fixed
    assert blocks(f) == random


@pytest.mark.parametrize(
    "text, fixed",
    [
        # R: attr(terms(y ~ ...), "term.labels")
        ("y ~ x1 * f + (1 | g)", ["x1", "f", "x1:f"]),
        ("y ~ x1:f + x2 + x1 + (1 | g)", ["x2", "x1", "x1:f"]),
        ("y ~ f:x1 + x1 + f + (1 | g)", ["x1", "f", "f:x1"]),
        ("y ~ h + f:h + (1 | g)", ["h", "h:f"]),
        ("y ~ a:b + c + a + (1 | g)", ["c", "a", "a:b"]),
        ("y ~ a * b * c + (1 | g)", ["a", "b", "c", "a:b", "a:c", "b:c", "a:b:c"]),
        ("y ~ (a + b)^2 + (1 | g)", ["a", "b", "a:b"]),
        ("y ~ a/b + (1 | g)", ["a", "a:b"]),
        ("y ~ (a + b)/c + (1 | g)", ["a", "b", "a:b:c"]),
        ("y ~ a * b - a + (1 | g)", ["b", "a:b"]),
        ("y ~ (a + b):c + (1 | g)", ["a:c", "b:c"]),
        ("y ~ x + x + x:x + (1 | g)", ["x"]),
        (
            "y ~ I(x1^2) + log(x1) + I(x1/100) + I(-x1) + I(x1 * 2) + I(x1-1) + I(2^x1)"
            " + I(1e5*x1) + I(0.5 * x1) + sqrt(x2) + I(1/3*x) + log1p(x) + exp(-x) + (1 | g)",
            [
                "I(x1^2)",
                "log(x1)",
                "I(x1/100)",
                "I(-x1)",
                "I(x1 * 2)",
                "I(x1 - 1)",
                "I(2^x1)",
                "I(1e+05 * x1)",
                "I(0.5 * x1)",
                "sqrt(x2)",
                "I(1/3 * x)",
                "log1p(x)",
                "exp(-x)",
            ],
        ),  # fmt: skip
        ("y ~ log(x + 1):z + (1 | g)", ["log(x + 1):z"]),
        ("y ~ I((x + 1)^2) + I(x**2) + (1 | g)", ["I((x + 1)^2)", "I(x^2)"]),
    ],
)
def test_r_term_order_and_labels(text, fixed):
    assert labels(parse_formula(text).fixed_terms) == fixed


def test_double_bar_and_several_terms_on_one_factor():
    f = parse_formula("y ~ x + (1 + x + z || g)")
    assert blocks(f) == [(True, []), (False, ["x"]), (False, ["z"])]
    f = parse_formula("y ~ x + (0 + x + x:z || g)")
    assert blocks(f) == [(False, ["x"]), (False, ["x:z"])]
    f = parse_formula("y ~ x1 + (1 + x1 | g) + (0 + x2 | g)")
    assert blocks(f) == [(True, ["x1"]), (False, ["x2"])]
    assert f.variables == ("y", "x1", "x2")


def test_response_transforms():
    f = parse_formula("log(y) ~ x + (1 | g)")
    assert (f.response, f.response_field) == ("log(y)", "y")
    assert f.response_expr.evaluate([1.0]) == 0.0
    assert parse_formula("I(y/100) ~ x + (1 | g)").response_expr.evaluate([50.0]) == 0.5
    assert parse_formula("sqrt(y) ~ x + (1 | g)").response == "sqrt(y)"


def test_transform_expressions_compile_without_eval():
    e = parse_formula("y ~ I(-x^2 + 3*z/2 - abs(z)) + (1 | g)").fixed_terms[0][0]
    assert e.fields == ("x", "z")
    assert e.evaluate([2.0, -4.0]) == -(2.0**2) + 3 * -4.0 / 2 - 4.0
    with pytest.raises(ValueError, match=r"fields 'x', 'z': .* \(division by 0\)"):
        parse_formula("y ~ I(x/z) + (1 | g)").fixed_terms[0][0].evaluate([1.0, 0.0])
    with pytest.raises(ValueError, match="fractional power"):
        parse_formula("y ~ I(x^0.5) + (1 | g)").fixed_terms[0][0].evaluate([-1.0])


@pytest.mark.parametrize(
    "text, words",
    [
        ("y ~ x1", "no random-effects term"),
        ("y ~ x1 + (1 | g) + (1 | h)", "couple groups, so the statistics are no longer per group"),
        ("y ~ x1 + (x1 | g / h)", "nested grouping factors"),
        ("y ~ x1 + (x1 | g:h)", "nested grouping factors"),
        ("y ~ x1 + (1 | log(g))", "one field"),
        ("y ~ x1 + (1 | g) + (1 | g)", "in two terms"),
        ("y ~ x1 + (1 + x1 | g) + (0 + x1 | g)", "'x1' is in two terms"),
        ("y ~ 0 + (1 | g)", "fixed part of .* is empty"),
        ("y ~ x1 + (0 | g)", "is empty"),
        ("y ~ g + (1 | g)", "grouping factor 'g' is also a predictor"),
        ("g ~ x + (1 | g)", "grouping factor 'g' is also the response"),
        ("y ~ x + (1 + g | g)", "grouping factor 'g' is also a predictor"),
        ("y ~ y + (1 | g)", "also a predictor"),
        ("y ~ poly(x) + (1 | g)", "unknown function 'poly'"),
        ("y ~ __import__('os') + (1 | g)", "unknown function|unexpected character"),
        ("y ~ x + (1 | g) + exec(x)", "unknown function 'exec'"),
        ("y ~ log(x, 2) + (1 | g)", "takes one argument"),
        ("y ~ 2 + x + (1 | g)", "only 0, 1 and -1"),
        ("y ~ x + ", "right-hand side|expected a term"),
        ("y ~ x + (1 | g", "expected '\\)'"),
        ("y ~ x +* z + (1 | g)", r"position 7"),
        ("y ~ x ~ z + (1 | g)", "unexpected '~'"),
        ("y ~ x + 1 | g", "in parentheses|own term"),
        ("y ~ x:(1 | g)", "nested inside|own term"),
        ("log(y) + x ~ x + (1 | g)", "transform of one"),
        ("I(y - x) ~ z + (1 | g)", "exactly one field"),
        ("y + x + (1 | g)", "must be a string"),
        ("y ~ I(x:z) + (1 | g)", "only \\+ - \\* / \\^"),
        ("y ~ x + () + (1 | g)", "empty parentheses"),
        ("y ~ x^1.5 + (1 | g)", "positive integer"),
    ],
)
def test_refusals_say_what_and_why(text, words):
    with pytest.raises(ValueError, match=words):
        parse_formula(text)


def test_formula_must_be_a_string():
    with pytest.raises(ValueError):
        parse_formula(None)  # type: ignore[arg-type]


def test_formula_is_frozen_and_hashable():
    f = parse_formula("y ~ x + log(z) + (1 | g)")
    assert f == parse_formula("y ~ x + log(z) + (1 | g)")
    assert hash(f) == hash(parse_formula("y ~ x + log(z) + (1 | g)"))
    with pytest.raises(AttributeError):
        f.group = "h"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "y ~ " + "I(" * 2000 + "x" + ")" * 2000 + " + (1 | g)",  # 8 kB, under the length limit
        "y ~ " + "(" * 150 + "x" + ")" * 150 + " + (1 | g)",
        "y ~ " + "-" * 500 + "x + (1 | g)",
        "y ~ I(" + "+".join(["x"] * 2000) + ") + (1 | g)",
        "y ~ I(" + "^".join(["x"] * 500) + ") + (1 | g)",
        "y ~ " + ":".join(f"x{i}" for i in range(200)) + " + (1 | g)",
        "I(" * 200 + "y" + ")" * 200 + " ~ x + (1 | g)",
        "y ~ x + (" + "I(" * 200 + "x" + ")" * 200 + " | g)",
    ],
)
def test_deep_nesting_is_a_clear_error_not_a_recursion_error(text):
    assert len(text) <= 10_000
    with pytest.raises(ValueError, match=f"nests more than {MAX_DEPTH} levels deep"):
        parse_formula(text)


def test_nesting_up_to_the_bound_parses():
    inner = MAX_DEPTH - 2  # the right-hand side and its sum take two levels
    f = parse_formula("y ~ " + "I(" * inner + "x" + ")" * inner + " + (1 | g)")
    assert f.fixed_terms[0][0].evaluate([3.0]) == 3.0


def test_a_long_sum_of_terms_is_flat_not_deep():
    # a sum of terms is a left-deep tree as deep as it is long: walked without recursion
    names = [f"x{i}" for i in range(MAX_TERMS)]
    f = parse_formula("y ~ " + " + ".join(names) + " + (1 + " + " + ".join(names[:300]) + " | g)")
    assert [t[0].label for t in f.fixed_terms] == names
    assert len(f.random_terms[0].terms) == 300


def test_term_expansion_is_bounded():
    # a*b*...*t would expand to 2^20 - 1 terms: refused before the expansion runs away
    with pytest.raises(ValueError, match=f"more than {MAX_TERMS} terms"):
        parse_formula("y ~ " + "*".join(f"x{i}" for i in range(20)) + " + (1 | g)")
    with pytest.raises(ValueError, match=f"more than {MAX_TERMS} terms"):
        parse_formula("y ~ " + " + ".join(f"x{i}" for i in range(MAX_TERMS + 1)) + " + (1 | g)")
    assert len(parse_formula("y ~ a*b*c*d + (1 | g)").fixed_terms) == 15
