"""RowReader: one validation path for dicts and columns, naming the offending field."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from streamlmm.design import numeric_design
from streamlmm.rows import RowReader, number

TEXT = "y ~ x1 + x2 + (1 + x1 | g)"


def _reader(**kw) -> RowReader:
    return RowReader(numeric_design(TEXT), **kw)


@pytest.mark.parametrize("v", [2, 2.5, np.float32(2.5), np.int64(-3), -0.0])
def test_number_accepts_finite_numbers(v):
    assert number("x", v) == float(v)


@pytest.mark.parametrize(
    "v, words",
    [
        (None, "missing"),
        (math.nan, "NaN"),
        (math.inf, "not finite"),
        (-math.inf, "not finite"),
        ("1.0", "expected a number, got str"),
        (True, "expected a number, got bool"),
        (np.bool_(True), "expected a number, got bool"),
        ([1.0], "expected a number, got list"),
        (1 + 2j, "expected a number, got complex"),
    ],
)
def test_number_rejects_naming_the_field(v, words):
    with pytest.raises(ValueError, match=words) as info:
        number("x1", v)
    assert "'x1'" in str(info.value)


def test_read_fills_the_union_vector_and_returns_the_key():
    rr = _reader()
    assert rr.read({"g": "k", "x1": 2, "x2": -1.5, "extra": "ignored"}, 4.0) == "k"
    np.testing.assert_array_equal(rr.a[:3], [1.0, 2.0, -1.5])
    assert rr.y == 4.0


@pytest.mark.parametrize(
    "x, y, field",
    [
        ({"g": "k", "x2": 1.0}, 1.0, "x1"),
        ({"g": "k", "x1": None, "x2": 1.0}, 1.0, "x1"),
        ({"g": "k", "x1": math.nan, "x2": 1.0}, 1.0, "x1"),
        ({"g": "k", "x1": 1.0, "x2": math.inf}, 1.0, "x2"),
        ({"g": "k", "x1": "1.0", "x2": 1.0}, 1.0, "x1"),
        ({"g": "k", "x1": 1.0, "x2": False}, 1.0, "x2"),
        ({"x1": 1.0, "x2": 1.0}, 1.0, "g"),
        ({"g": None, "x1": 1.0, "x2": 1.0}, 1.0, "g"),
        ({"g": 1.5, "x1": 1.0, "x2": 1.0}, 1.0, "g"),
        ({"g": [1], "x1": 1.0, "x2": 1.0}, 1.0, "g"),
        ({"g": "k", "x1": 1.0, "x2": 1.0}, None, "y"),
        ({"g": "k", "x1": 1.0, "x2": 1.0}, math.nan, "y"),
        ({"g": "k", "x1": 1.0, "x2": 1.0}, "3", "y"),
    ],
)
def test_read_rejects_bad_rows_naming_the_field(x, y, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        _reader().read(x, y)


def test_read_rejects_a_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        _reader().read([("g", 1)], 1.0)


@pytest.mark.parametrize(
    "x, y",
    [
        ({"g": "k", "x2": 1.0}, 1.0),
        ({"x1": 1.0, "x2": 1.0}, 1.0),
        ({"g": "k", "x1": 1, "x2": 1}, None),
    ],
)
def test_skip_policy_returns_none_for_missing_values(x, y):
    assert _reader(missing="skip").read(x, y) is None


def test_skip_policy_still_rejects_wrong_types():
    with pytest.raises(ValueError, match="'x1'"):
        _reader(missing="skip").read({"g": "k", "x1": "1", "x2": 1.0}, 1.0)
    with pytest.raises(ValueError, match="'g'"):
        _reader(missing="skip").read({"g": 2.5, "x1": 1, "x2": 1.0}, 1.0)


def test_missing_policy_is_validated():
    with pytest.raises(ValueError, match="missing"):
        _reader(missing="drop")


@pytest.mark.parametrize("w, expected", [(None, 1.0), (0, 0.0), (2, 2.0), (0.5, 0.5)])
def test_weight(w, expected):
    assert _reader().weight(w) == expected


@pytest.mark.parametrize("w", [-1.0, math.nan, math.inf, "2", True])
def test_bad_weight_names_w(w):
    with pytest.raises(ValueError, match="'w'"):
        _reader().weight(w)


def test_features_into_imputes_nan_only_when_asked():
    a = _reader().features({"x1": 1.0}, impute=True)
    assert a[0] == 1.0 and a[1] == 1.0 and math.isnan(a[2])
    with pytest.raises(ValueError, match="'x2'"):
        _reader().features({"x1": 1.0}, impute=False)


# -- columns --------------------------------------------------------------------------------------
def _cols(n=5):
    return {
        "g": np.array(["a", "b", "a", "c", "b"][:n], dtype=object),
        "x1": np.arange(n, dtype=float),
        "x2": np.linspace(-1, 1, n),
    }


def test_read_columns_matches_read_row_by_row():
    cols = _cols()
    y = np.arange(5.0) * 2
    codes, uniques, A, yk, wk, tk, kept = _reader().read_columns(cols, y, None)
    for e in range(5):
        rr = _reader()
        key = rr.read({k: v[e] for k, v in cols.items()}, y[e])
        assert uniques[codes[e]] == key
        np.testing.assert_array_equal(A[e], rr.a[:3])
    np.testing.assert_array_equal(yk, y)
    np.testing.assert_array_equal(wk, np.ones(5))
    np.testing.assert_array_equal(kept, np.arange(5))


@pytest.mark.parametrize(
    "column, value, field",
    [
        ("x1", math.nan, "x1"),
        ("x1", None, "x1"),
        ("x2", math.inf, "x2"),
        ("x1", "1.0", "x1"),
        ("x1", True, "x1"),
        ("g", None, "g"),
        ("g", 1.5, "g"),
        ("g", True, "g"),
        ("g", [1], "g"),
        ("g", {"k": 1}, "g"),
    ],
)
def test_read_columns_names_row_and_field(column, value, field):
    cols = _cols()
    col = cols[column].astype(object)
    col[3] = value
    cols[column] = col
    with pytest.raises(ValueError, match=f"row 3: field '{field}'"):
        _reader().read_columns(cols, np.ones(5), None)


def test_read_columns_skip_drops_rows_with_missing_values():
    cols = _cols()
    cols["x1"] = np.array([0.0, np.nan, 2.0, 3.0, 4.0])
    cols["g"] = np.array(["a", "b", None, "c", "b"], dtype=object)
    y = np.array([1.0, 2.0, 3.0, np.nan, 5.0])
    codes, uniques, A, yk, wk, tk, kept = _reader(missing="skip").read_columns(cols, y, None)
    np.testing.assert_array_equal(kept, [0, 4])
    assert [uniques[c] for c in codes] == ["a", "b"]
    np.testing.assert_array_equal(yk, [1.0, 5.0])


def test_read_columns_weights_and_time():
    rr = RowReader(numeric_design(TEXT), time_key="ts")
    cols = {**_cols(), "ts": np.array([5.0, 1.0, 3.0, 2.0, 4.0])}
    *_, wk, tk, _ = rr.read_columns(cols, np.ones(5), np.array([1, 2, 0, 1, 3]))
    assert _reader().read_columns(_cols(), np.ones(5), None)[5] is None  # no time_key
    np.testing.assert_array_equal(wk, [1, 2, 0, 1, 3])
    np.testing.assert_array_equal(tk, cols["ts"])
    with pytest.raises(ValueError, match="'w'.*row 2"):
        rr.read_columns(cols, np.ones(5), np.array([1, 2, -1, 1, 3]))
    with pytest.raises(ValueError, match="'ts'"):
        rr.read_columns(_cols(), np.ones(5), None)


def test_read_columns_rejects_wrong_lengths_and_dtypes():
    cols = _cols()
    with pytest.raises(ValueError, match="expected 4 values, got shape"):
        _reader().read_columns(cols, np.ones(4), None)
    with pytest.raises(ValueError, match="'x1'"):
        _reader().read_columns({**cols, "x1": np.array([True] * 5)}, np.ones(5), None)
    with pytest.raises(ValueError, match="'x2'.*no such column"):
        _reader().read_columns({"g": cols["g"], "x1": cols["x1"]}, np.ones(5), None)


def test_read_columns_accepts_categorical_keys():
    df = pd.DataFrame(_cols())
    df["g"] = df["g"].astype("category")
    cols = {c: df[c].to_numpy() for c in df}
    codes, uniques, *_ = _reader().read_columns(cols, np.ones(5), None)
    assert [uniques[c] for c in codes] == ["a", "b", "a", "c", "b"]
