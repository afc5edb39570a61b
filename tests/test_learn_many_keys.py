"""learn_many's group keys in every form a DataFrame holds them (int64, Python str
objects, pandas' ``str`` and ``string`` dtypes, what ``read_csv`` returns, categoricals,
mixed objects): the same groups, in the same order, with the same bits as a
``learn_one`` loop; bad keys rejected naming the row, and nothing learned."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.stats import GroupStats

SLOPES = "y ~ x1 + x2 + (1 + x1 | g)"


def _frame(n: int = 400, groups: int = 23, seed: int = 2) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    X = pd.DataFrame({"g": g, "x1": rng.normal(5.0, 2.0, n), "x2": rng.normal(size=n)})
    return X, pd.Series(1.0 + 0.3 * g + X["x1"] - X["x2"] + rng.normal(size=n))


def _one_loop(X: pd.DataFrame, y: pd.Series, w=None) -> MixedLM:
    m = MixedLM(SLOPES)
    for i, x in enumerate(X.to_dict("records")):
        m.learn_one(x, float(y.iat[i]), 1.0 if w is None else float(w[i]))
    return m


def _assert_same_statistics(a: MixedLM, b: MixedLM) -> None:
    assert a._stats.keys == b._stats.keys
    assert [type(k) for k in a._stats.keys] == [type(k) for k in b._stats.keys]
    np.testing.assert_array_equal(a._stats.active, b._stats.active)
    assert a.n_events == b.n_events


def _as(kind: str, X: pd.DataFrame, tmp_path) -> pd.DataFrame:
    keys = "k" + X["g"].astype(str)
    if kind == "int64":
        return X
    if kind == "object":
        return X.assign(g=keys.astype(object))
    if kind == "categorical":
        return X.assign(g=keys.astype("category"))
    if kind == "read_csv":
        path = tmp_path / "batch.csv"
        X.assign(g=keys).to_csv(path, index=False)
        return pd.read_csv(path)
    return X.assign(g=keys.astype(kind))  # "str", "string"


@pytest.mark.parametrize("kind", ["int64", "object", "str", "string", "categorical", "read_csv"])
@pytest.mark.parametrize("weighted", [False, True])
def test_learn_many_is_bitwise_learn_one_for_every_key_dtype(kind, weighted, tmp_path):
    X, y = _frame()
    X = _as(kind, X, tmp_path)
    w = np.random.default_rng(1).integers(1, 4, len(X)).astype(float) if weighted else None
    many = MixedLM(SLOPES)
    half = len(X) // 2  # the second batch meets known groups and new ones
    many.learn_many(X.iloc[:half], y.iloc[:half], None if w is None else w[:half])
    many.learn_many(X.iloc[half:], y.iloc[half:], None if w is None else w[half:])
    _assert_same_statistics(many, _one_loop(X, y, w))


def test_int_and_str_keys_never_merge_and_integer_values_do():
    X, y = _frame(8)
    X["g"] = pd.Series([1, "1", np.int64(1), 1.0, "a", 2, "2", np.int64(2)], dtype=object)
    many = MixedLM(SLOPES)
    many.learn_many(X, y)
    assert many._stats.keys == [1, "1", "a", 2, "2"]
    _assert_same_statistics(many, _one_loop(X, y))


_BAD_KEYS = [
    (None, "missing"),
    ("k" * 300, "longer than"),
    ("k\ud800", "not valid Unicode text"),
    ("\udfffk", "not valid Unicode text"),
]
_BAD_OBJECTS = [(True, "bool"), (2.5, "float"), (b"k1", "bytes")]  # only an object column


@pytest.mark.parametrize(
    "dtype, bad, words",
    [(d, b, w) for d in (object, "str", "string") for b, w in _BAD_KEYS]
    + [(object, b, w) for b, w in _BAD_OBJECTS],
)
def test_a_bad_key_rejects_the_batch_naming_its_row(helpers, dtype, bad, words):
    X, y = _frame(50)
    keys = ("k" + X["g"].astype(str)).astype(object)
    keys.iat[17] = bad
    try:
        X["g"] = keys.astype(dtype)
    except UnicodeEncodeError:  # pyarrow-backed strings (pandas 3 with pyarrow) cannot
        assert dtype is not object  # hold a lone surrogate: no such key can reach learn_many
        return
    m = MixedLM(SLOPES)
    m.learn_many(X.iloc[:10], y.iloc[:10])
    before = helpers.model_state(m)
    with pytest.raises(ValueError, match=words) as info:
        m.learn_many(X, y)
    assert "row 17" in str(info.value) and "'g'" in str(info.value)
    assert helpers.model_state(m) == before


@pytest.mark.parametrize("dtype", [object, "str", "string"])
def test_missing_keys_are_skipped_under_skip(dtype):
    X, y = _frame(60)
    keys = ("k" + X["g"].astype(str)).astype(object)
    keys.iloc[[0, 9, 33]] = None
    X["g"] = keys.astype(dtype)
    m = MixedLM(SLOPES, missing="skip")
    m.learn_many(X, y)
    kept = [i for i in range(60) if i not in (0, 9, 33)]
    clean = MixedLM(SLOPES)
    clean.learn_many(X.iloc[kept].astype({"g": object}), y.iloc[kept])
    assert m.n_skipped == 3
    _assert_same_statistics(m, clean)


def test_rows_creates_new_groups_once_in_order_of_first_appearance():
    from streamlmm.design import numeric_design

    st = GroupStats(numeric_design(SLOPES), capacity=2)
    first = st.rows(["b", "a", "b", 7, "a"])
    assert first.tolist() == [0, 1, 0, 2, 1]
    again = st.rows(["c", 7, "c", "b", "d"])
    assert again.tolist() == [3, 2, 3, 0, 4]
    assert st.keys == ["b", "a", 7, "c", "d"]
    assert st.index == {"b": 0, "a": 1, 7: 2, "c": 3, "d": 4}
    assert st.M.shape[0] >= 5 and st.rows([]).shape == (0,)


LONE = "\ud800"  # what json.loads('"\\ud800"') gives: a str no UTF-8 writer accepts


@pytest.mark.parametrize("key", [LONE, "a" + LONE, "\udc00"])
def test_learn_one_refuses_a_key_that_is_not_valid_unicode_text(helpers, key):
    m = MixedLM(SLOPES)
    X, y = _frame(30)
    for i in range(30):
        m.learn_one({"g": int(X["g"].iat[i]), "x1": X["x1"].iat[i], "x2": X["x2"].iat[i]}, y.iat[i])
    before = helpers.model_state(m)
    with pytest.raises(ValueError, match="field 'g': group key .* not valid Unicode text"):
        m.learn_one({"g": key, "x1": 0.5, "x2": 1.0}, 1.0)
    with pytest.raises(ValueError, match="field 'g': group key .* not valid Unicode text"):
        m.predict_one({"g": key, "x1": 0.5, "x2": 1.0})
    assert helpers.model_state(m) == before
    # a character beyond the BMP (a surrogate pair in JSON) is a key like any other
    m.learn_one({"g": "\U0001f600", "x1": 0.5, "x2": 1.0}, 1.0)
    assert "\U0001f600" in m._stats.keys


@pytest.mark.parametrize("how", ["learn_one", "learn_many", "levels"])
def test_a_factor_level_must_be_valid_unicode_text(helpers, how):
    formula = "y ~ x1 + f + (1 | g)"
    m = MixedLM(formula)
    m.learn_many(pd.DataFrame({"g": [1, 2], "x1": [0.5, 1.5], "f": ["a", "b"]}), [1.0, 2.0])
    before = helpers.model_state(m)
    with pytest.raises(ValueError, match="field 'f': factor level .* not valid Unicode text"):
        if how == "learn_one":
            m.learn_one({"g": 1, "x1": 0.5, "f": "c" + LONE}, 1.0)
        elif how == "learn_many":
            f = pd.Series(["a", LONE, "b"], dtype=object)  # pyarrow strings cannot hold it
            X = pd.DataFrame({"g": [1, 2, 3], "x1": [0.5, 1.5, 2.5], "f": f})
            m.learn_many(X, [1.0, 2.0, 3.0])
        else:
            MixedLM(formula, levels={"f": ["a", LONE]})
    assert helpers.model_state(m) == before
