"""Design: events → union columns, checked against R's model.matrix, mid-stream levels,
learn_one ≡ learn_many bitwise, transforms, refusals and state."""

from __future__ import annotations

import json
import math
import timeit

import numpy as np
import pytest

from streamlmm.design import MAX_LEVEL_CHARS, Design
from streamlmm.rows import Missing

# The data of the R model matrices below (factor levels in first-seen order).
DATA = {
    "x1": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    "x2": [0.5, 1.0, 2.0, 3.0, 1.5, 2.5],
    "f": ["b", "a", "b", "c", "a", "b"],
    "h": ["A", "B", "B", "A", "A", "B"],
}

# Produced offline with R 4.2 (CI has no R) by:
#   d <- data.frame(x1=c(1,2,3,4,5,6), x2=c(.5,1,2,3,1.5,2.5),
#                   f=c("b","a","b","c","a","b"), h=c("A","B","B","A","A","B"))
#   d$f <- factor(d$f, levels=unique(d$f)); d$h <- factor(d$h, levels=unique(d$h))
#   m <- model.matrix(as.formula(fm), d); colnames(m); sprintf("%.17g", m)
# for each right-hand side fm below.
R_MODEL_MATRICES = {
    "y ~ x1 * f + (1 | g)": (
        (
            "(Intercept)",
            "x1",
            "fa",
            "fc",
            "x1:fa",
            "x1:fc",
        ),
        [
            [1, 1, 0, 0, 0, 0],
            [1, 2, 1, 0, 2, 0],
            [1, 3, 0, 0, 0, 0],
            [1, 4, 0, 1, 0, 4],
            [1, 5, 1, 0, 5, 0],
            [1, 6, 0, 0, 0, 0],
        ],
    ),
    "y ~ f:h + (1 | g)": (
        (
            "(Intercept)",
            "fb:hA",
            "fa:hA",
            "fc:hA",
            "fb:hB",
            "fa:hB",
            "fc:hB",
        ),
        [
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 1, 0],
            [1, 0, 0, 0, 1, 0, 0],
            [1, 0, 0, 1, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 1, 0, 0],
        ],
    ),
    "y ~ f * h + (1 | g)": (
        (
            "(Intercept)",
            "fa",
            "fc",
            "hB",
            "fa:hB",
            "fc:hB",
        ),
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 0, 0, 1, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],
        ],
    ),
    "y ~ 0 + x1 + f + (1 | g)": (
        (
            "x1",
            "fb",
            "fa",
            "fc",
        ),
        [[1, 1, 0, 0], [2, 0, 1, 0], [3, 1, 0, 0], [4, 0, 0, 1], [5, 0, 1, 0], [6, 1, 0, 0]],
    ),
    "y ~ x1:f + (1 | g)": (
        (
            "(Intercept)",
            "x1:fb",
            "x1:fa",
            "x1:fc",
        ),
        [[1, 1, 0, 0], [1, 0, 2, 0], [1, 3, 0, 0], [1, 0, 0, 4], [1, 0, 5, 0], [1, 6, 0, 0]],
    ),
    "y ~ h + f:h + (1 | g)": (
        (
            "(Intercept)",
            "hB",
            "hA:fa",
            "hB:fa",
            "hA:fc",
            "hB:fc",
        ),
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
        ],
    ),
    "y ~ I(x1^2) + log(x2) + sqrt(x2) + I(x1/100) + I(-x1) + exp(x2) + I(2^x2) + (1 | g)": (
        (
            "(Intercept)",
            "I(x1^2)",
            "log(x2)",
            "sqrt(x2)",
            "I(x1/100)",
            "I(-x1)",
            "exp(x2)",
            "I(2^x2)",
        ),
        [
            [
                1,
                1,
                -0.69314718055994529,
                0.70710678118654757,
                0.01,
                -1,
                1.6487212707001282,
                1.4142135623730951,
            ],
            [1, 4, 0, 1, 0.02, -2, 2.7182818284590451, 2],
            [
                1,
                9,
                0.69314718055994529,
                1.4142135623730951,
                0.029999999999999999,
                -3,
                7.3890560989306504,
                4,
            ],
            [
                1,
                16,
                1.0986122886681098,
                1.7320508075688772,
                0.040000000000000001,
                -4,
                20.085536923187668,
                8,
            ],
            [
                1,
                25,
                0.40546510810816438,
                1.2247448713915889,
                0.050000000000000003,
                -5,
                4.4816890703380645,
                2.8284271247461903,
            ],
            [
                1,
                36,
                0.91629073187415511,
                1.5811388300841898,
                0.059999999999999998,
                -6,
                12.182493960703473,
                5.6568542494923806,
            ],
        ],
    ),
    "y ~ x1 * x2 * f + (1 | g)": (
        (
            "(Intercept)",
            "x1",
            "x2",
            "fa",
            "fc",
            "x1:x2",
            "x1:fa",
            "x1:fc",
            "x2:fa",
            "x2:fc",
            "x1:x2:fa",
            "x1:x2:fc",
        ),
        [
            [1, 1, 0.5, 0, 0, 0.5, 0, 0, 0, 0, 0, 0],
            [1, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2, 0],
            [1, 3, 2, 0, 0, 6, 0, 0, 0, 0, 0, 0],
            [1, 4, 3, 0, 1, 12, 0, 4, 0, 3, 0, 12],
            [1, 5, 1.5, 1, 0, 7.5, 5, 0, 1.5, 0, 7.5, 0],
            [1, 6, 2.5, 0, 0, 15, 0, 0, 0, 0, 0, 0],
        ],
    ),
    "y ~ 0 + f:x1 + h + (1 | g)": (
        (
            "hA",
            "hB",
            "fb:x1",
            "fa:x1",
            "fc:x1",
        ),
        [
            [1, 0, 1, 0, 0],
            [0, 1, 0, 2, 0],
            [0, 1, 3, 0, 0],
            [1, 0, 0, 0, 4],
            [1, 0, 0, 5, 0],
            [0, 1, 6, 0, 0],
        ],
    ),
}


def _row(r, data=DATA):
    return {k: v[r] for k, v in data.items()}


def _loop(design, data, n):
    """encode_one over the rows; earlier rows padded with the 0 of later columns."""
    rows = []
    for r in range(n):
        a = design.encode_one(_row(r, data), np.empty(design.k), learn=True)
        rows.append(a[: design.k].copy())
    return np.array([np.r_[r, np.zeros(design.k - len(r))] for r in rows])


@pytest.mark.parametrize("text", list(R_MODEL_MATRICES))
def test_names_and_values_match_r_model_matrix(text):
    names, expected = R_MODEL_MATRICES[text]
    d = Design(text)
    A = d.encode_columns(DATA, 6, learn=True)
    assert d.fixed == names
    np.testing.assert_allclose(A[:, d.xi], np.array(expected, dtype=float), rtol=1e-15)


@pytest.mark.parametrize("text", list(R_MODEL_MATRICES))
def test_encode_one_equals_encode_columns_bitwise(text):
    one, many = Design(text), Design(text)
    A1 = _loop(one, DATA, 6)
    A2 = many.encode_columns(DATA, 6, learn=True)
    assert one.columns == many.columns and one.fixed == many.fixed
    assert one.version == many.version
    assert one.to_state() == many.to_state()
    assert np.array_equal(A1.view(np.int64), A2.view(np.int64))


def test_level_discovery_order_is_row_order_across_factors():
    data = {"f": ["a", "a", "b", "c"], "h": ["A", "B", "A", "C"], "x": [1.0, 2.0, 3.0, 4.0]}
    text = "y ~ x + f * h + (1 | g)"
    one, many = Design(text), Design(text)
    A1 = _loop(one, data, 4)
    A2 = many.encode_columns(data, 4, learn=True)
    assert one.columns == many.columns == (
        "(Intercept)", "x", "hB", "fb", "fb:hB", "fc", "fc:hB", "hC", "fb:hC", "fc:hC",
    )  # fmt: skip
    assert one.fixed == (
        "(Intercept)", "x", "fb", "fc", "hB", "hC", "fb:hB", "fc:hB", "fb:hC", "fc:hC",
    )  # fmt: skip
    assert np.array_equal(A1, A2)


def test_mid_stream_level_widens_columns_and_version():
    d = Design("y ~ x1 * f + (1 + x1 | g)")
    a = d.encode_one({"x1": 1.0, "f": "a"}, np.empty(2), learn=True)
    assert (d.columns, d.version, d.k, d.p, d.q) == (("(Intercept)", "x1"), 1, 2, 2, 2)
    a = d.encode_one({"x1": 2.0, "f": "b"}, a, learn=True)
    assert d.version == 2 and d.fixed == ("(Intercept)", "x1", "fb", "x1:fb")
    v = d.version
    a = d.encode_one({"x1": 2.0, "f": "b"}, a, learn=True)
    assert d.version == v
    a = d.encode_one({"x1": 3.0, "f": "c"}, a, learn=True)
    assert d.columns == ("(Intercept)", "x1", "fb", "x1:fb", "fc", "x1:fc")
    assert d.fixed == ("(Intercept)", "x1", "fb", "fc", "x1:fb", "x1:fc")
    assert d.xi.tolist() == [0, 1, 2, 4, 3, 5]
    assert a[: d.k].tolist() == [1.0, 3.0, 0.0, 0.0, 1.0, 3.0]
    assert d.factors == {"f": ["a", "b", "c"]}


def test_declared_levels_set_the_reference_and_columns_upfront():
    d = Design("y ~ x1 + f + (1 | g)", levels={"f": ["c", "a"]})
    assert d.factors == {"f": ["c", "a"]}
    d.encode_one({"x1": 1.0, "f": "b"}, np.empty(4), learn=True)
    assert d.fixed == ("(Intercept)", "x1", "fa", "fb")
    with pytest.raises(ValueError, match="not read"):
        Design("y ~ x1 + (1 | g)", levels={"z": ["a"]})
    with pytest.raises(ValueError, match="random-effects term"):
        Design("y ~ x1 + (1 + x1 | g)", levels={"x1": ["a"]})


def test_unseen_level_with_learn_false_has_effect_zero_and_is_counted():
    d = Design("y ~ f + (1 | g)")
    d.encode_one({"f": "a"}, np.empty(1), learn=True)
    d.encode_one({"f": "b"}, np.empty(2), learn=True)
    assert d.encode_one({"f": "zz"}, np.empty(2), learn=False).tolist() == [1.0, 0.0]
    assert d.unseen_level_rows == 1
    A = d.encode_columns({"f": ["a", "zz", "b", "yy", None]}, 5, learn=False)
    assert A[:4].tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]
    assert d.unseen_level_rows == 3  # the missing row is not counted
    assert d.factors == {"f": ["a", "b"]} and d.version == 1  # nothing learned


def test_failed_event_commits_nothing():
    d = Design("y ~ x + f + (1 | g)")
    with pytest.raises(Missing):
        d.encode_one({"f": "a", "x": None}, np.empty(3), learn=True)
    assert not d.ready and d.columns == ("(Intercept)",) and d.version == 0
    d.encode_one({"f": "a", "x": 1.0}, np.empty(3), learn=True)
    with pytest.raises(Missing, match="field 'x'"):
        d.encode_one({"f": "b", "x": math.nan}, np.empty(3), learn=True)
    assert d.factors == {"f": ["a"]}
    # a bad value is reported before a missing one
    with pytest.raises(ValueError, match="field 'f': expected a string") as e:
        d.encode_one({"f": 3, "x": None}, np.empty(3), learn=True)
    assert not isinstance(e.value, Missing)
    # columns: missing rows are NaN and teach no level
    A = d.encode_columns({"f": ["b", "c"], "x": [None, 1.0]}, 2, learn=True)
    assert np.isnan(A[0]).all() and d.factors == {"f": ["a", "c"]}


def test_kind_errors_name_the_field():
    d = Design("y ~ x + f + (1 | g)")
    d.encode_one({"f": "a", "x": 1.0}, np.empty(3), learn=True)
    with pytest.raises(ValueError, match="field 'x': expected a number, got str"):
        d.encode_one({"f": "a", "x": "1"}, np.empty(3), learn=True)
    with pytest.raises(ValueError, match="row 1: field 'x': expected a number, got str"):
        d.encode_columns({"f": ["a", "a"], "x": [1.0, "1"]}, 2, learn=True)
    with pytest.raises(ValueError, match="row 0: field 'f': expected a string"):
        d.encode_columns({"f": [1, "a"], "x": [1.0, 1.0]}, 2, learn=True)
    with pytest.raises(ValueError, match="field 'x': expected a number, got bool"):
        d.encode_one({"f": "a", "x": True}, np.empty(3), learn=True)
    with pytest.raises(ValueError, match="characters exceeds"):
        d.encode_one({"f": "a" * (MAX_LEVEL_CHARS + 1), "x": 1.0}, np.empty(3), learn=True)
    with pytest.raises(ValueError, match="not finite"):
        d.encode_one({"f": "a", "x": math.inf}, np.empty(3), learn=True)


def test_factor_inside_a_random_term_is_refused_when_known():
    d = Design("y ~ z + (1 + z | g)")
    with pytest.raises(ValueError, match="field 'z': expected a number, got str .*random-effects"):
        d.encode_one({"z": "a"}, np.empty(2), learn=True)
    d = Design("y ~ z:w + (0 + z:w | g)")
    with pytest.raises(ValueError, match="random-effects term"):
        d.encode_columns({"z": [1.0], "w": ["a"]}, 1, learn=True)


@pytest.mark.parametrize(
    "x, msg",
    [
        ({"x3": 0.0, "x": 1.0}, "field 'x3': log(x3) is not finite (log of 0)"),
        ({"x3": -2.0, "x": 1.0}, "field 'x3': log(x3) is not finite (log of -2)"),
        ({"x3": 1.0, "x": -1.0}, "field 'x': sqrt(x) is not finite (square root of -1)"),
        ({"x3": 1.0, "x": 1e100}, "field 'x': I(x^2) is not finite (overflow)"),
    ],
)
def test_non_finite_transform_names_the_field(x, msg):
    d = Design("y ~ log(x3) + sqrt(x) + I(x^2) + (1 | g)")
    with pytest.raises(ValueError) as e:
        d.encode_one(x, np.empty(4), learn=True)
    assert str(e.value) == msg
    cols = {k: [1.0, 1.0, v] for k, v in x.items()}
    with pytest.raises(ValueError) as e:
        d.encode_columns(cols, 3, learn=True)
    assert str(e.value) == f"row 2: {msg}"
    assert d.version == 0


def test_transforms_and_interactions_in_random_terms():
    text = "log(y) ~ x1 + I(x1^2) + x1:x2 + (1 + x1 + I(x1^2) || g) + (0 + x1:x2 | g)"
    d = Design(text)
    assert d.random == ("(Intercept)", "x1", "I(x1^2)", "x1:x2")
    assert d.blocks == ((0,), (1,), (2,), (3,))
    data = {"x1": [1.5, -2.0, 3.0], "x2": [2.0, 0.25, -1.0]}
    A1 = _loop(d, data, 3)
    A2 = Design(text).encode_columns(data, 3, learn=True)
    assert np.array_equal(A1, A2)
    np.testing.assert_array_equal(A2[:, d.zi[2]], np.array(data["x1"]) ** 2)
    assert d.response_one(math.e) == 1.0
    assert d.response_columns([1.0, None]).tolist()[0] == 0.0
    with pytest.raises(ValueError, match="row 1: field 'y': log"):
        d.response_columns([1.0, -1.0])


@pytest.mark.parametrize(
    "text, mask",
    [
        ("y ~ x1 + x2 + (1 + x1 | g)", [False, True, True, True]),
        ("y ~ 0 + x1 + (1 | g)", [False, False, False]),
        ("y ~ x1 + (0 + x1 | g)", [False, False, True]),
        ("y ~ 0 + x1 + (1 + z | g)", [False, False, True, False]),
        # uncorrelated: x1's block has no intercept, so x1 may not be shifted
        ("y ~ x1 + (1 + x1 || g)", [False, False, True]),
        ("y ~ x1 + x2 + (1 + x1 | g) + (0 + x2 | g)", [False, True, False, True]),
    ],
)
def test_shiftable_mask(text, mask):
    d = Design(text)
    d.encode_columns({"x1": [1.0], "x2": [2.0], "z": [3.0]}, 1, learn=True)
    assert d.shiftable.tolist() == mask


def test_intercept_first_in_columns():
    d = Design("y ~ 0 + x + (1 | g)")
    d.encode_one({"x": 1.0}, np.empty(2), learn=True)
    assert d.columns == ("(Intercept)", "x") and d.fixed == ("x",)
    assert d.xi.tolist() == [1] and d.zi.tolist() == [0]


def test_state_round_trip_is_json():
    text = "y ~ x1 * f + h + (1 + x1 | g)"
    d = Design(text)
    d.encode_columns(
        {"x1": [1.0, 2.0, 3.0], "f": ["b", "a", "c"], "h": ["Q", "P", "Q"]}, 3, learn=True
    )
    state = json.loads(json.dumps(d.to_state()))
    e = Design.from_state(text, state)
    assert (e.columns, e.fixed, e.random, e.factors, e.version) == (
        d.columns, d.fixed, d.random, d.factors, d.version,
    )  # fmt: skip
    assert np.array_equal(e.xi, d.xi) and np.array_equal(e.shiftable, d.shiftable)
    x = {"x1": 2.0, "f": "c", "h": "P"}
    assert np.array_equal(
        e.encode_one(x, np.empty(e.k), learn=False), d.encode_one(x, np.empty(d.k), learn=False)
    )
    with pytest.raises(ValueError, match="does not fit"):
        Design.from_state("y ~ x1 + (1 | g)", state)


def test_encode_one_timing_is_reported():
    """Not an assertion on speed (shared CI cores): prints µs per call."""
    for text, x in [
        ("y ~ x1 + x2 + (1 + x1 | g)", {"x1": 1.5, "x2": 2.5, "g": "a"}),
        ("y ~ age * severity + (1 + age || hospital)", {"age": 40.0, "severity": "high"}),
    ]:
        d = Design(text)
        d.encode_one({**x, "severity": "low"} if "severity" in x else x, np.empty(8), learn=True)
        a = d.encode_one(x, np.empty(8), learn=True)
        n = 20000
        t = timeit.timeit(lambda d=d, x=x, a=a: d.encode_one(x, a, learn=True), number=n)
        t = t / n * 1e6
        print(f"{text}: {t:.2f} µs")
