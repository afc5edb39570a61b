"""The numba key table's factorizations against pandas' (an independent computation),
and learn_many's group keys through them against a learn_one loop: str keys of every
kind (non-ASCII, surrogates, "", long ones, ones holding the separator), int keys of
every width, missing keys under both ``missing=`` modes, keys given as a list."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.keytable import KeyTable, factorize_ints, factorize_strs
from streamlmm.rows import RowReader, _factorize_fast, _factorize_pandas

SLOPES = "y ~ x1 + x2 + (1 + x1 | g)"
_PIECES = ["a", "b", "é", "\ud800", "😀", "", "xyzxyzxy", "\x01", "1", " ", "\udfff\ud800"]


def _random_strs(rng, n: int, distinct: int, longest: int) -> np.ndarray:
    pool = [
        "".join(rng.choice(_PIECES, size=int(rng.integers(0, longest + 1))))
        for _ in range(distinct)
    ]
    return np.array([pool[i] for i in rng.integers(0, distinct, n)], dtype=object)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 7, 1 << 15])
def test_factorize_strs_is_pandas_factorize(seed, chunk):
    rng = np.random.default_rng(seed)
    arr = _random_strs(rng, int(rng.integers(0, 3000)), int(rng.integers(1, 900)), 12)
    codes, first = factorize_strs(arr, chunk)
    pc, pu = pd.factorize(arr)
    np.testing.assert_array_equal(codes, pc)
    assert arr[first].tolist() == list(pu)
    assert all(arr[first][j] is arr[i] for j, i in enumerate(first.tolist()))  # the objects


def test_factorize_strs_long_keys_many_groups():
    # keys of 8 bytes and more are hashed, confirmed byte by byte; the table grows often
    rng = np.random.default_rng(3)
    base = [f"user-{i:07d}-{'x' * (i % 23)}" for i in range(30_000)]
    arr = np.array([base[i] for i in rng.integers(0, len(base), 100_000)], dtype=object)
    arr[::7] = "same-prefix-long-key-0"
    codes, first = factorize_strs(arr, 4096)
    pc, pu = pd.factorize(arr)
    np.testing.assert_array_equal(codes, pc)
    assert arr[first].tolist() == list(pu)


@pytest.mark.parametrize(
    "values",
    [
        [None, "a"],
        ["a", float("nan")],
        ["a", 1],
        ["a", b"a"],
        ["a", pd.NA],
        ["a\x00b", "a"],  # the separator inside a key
        ["\x00", ""],
    ],
)
def test_factorize_strs_declines_what_it_cannot_say_exactly(values):
    assert factorize_strs(np.array(values, dtype=object)) is None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint16, np.uint32])
def test_factorize_ints_is_pandas_factorize(seed, dtype):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    pool = rng.integers(info.min, info.max, int(rng.integers(1, 5000)), endpoint=True)
    pool = np.concatenate([pool, [info.min, info.max, 0]]).astype(dtype)
    arr = pool[rng.integers(0, pool.shape[0], int(rng.integers(0, 20_000)))]
    codes, uniques = _factorize_fast(arr)
    pc, pu = pd.factorize(arr)
    np.testing.assert_array_equal(codes, pc)
    np.testing.assert_array_equal(uniques, pu)
    c2, first = factorize_ints(arr.astype(np.int64))
    np.testing.assert_array_equal(c2, pc)


def test_fast_factorize_agrees_with_pandas_or_declines():
    rng = np.random.default_rng(11)
    cases = [
        _random_strs(rng, 500, 40, 6),
        np.array(["1", 1, "1", 1.0, np.int64(1)], dtype=object),
        np.array([np.str_("a"), "a", "b"], dtype=object),
        np.array(["b", "a", "b"]),  # a NumPy str array
        np.array([], dtype=object),
        np.array([True, False]),
        np.array([2**63, 1], dtype=np.uint64),
    ]
    for arr in cases:
        found = _factorize_fast(arr)
        pc, pu = _factorize_pandas(arr, "g")
        if found is None:
            continue
        np.testing.assert_array_equal(found[0], pc)
        assert list(found[1]) == list(pu)
        if arr.dtype == object:  # the very objects (a NumPy str array gives Python str)
            assert [type(u) for u in found[1]] == [type(u) for u in pu]


def test_key_table_interns_across_calls_and_grows():
    kt = KeyTable()
    keys = [f"k{i}" for i in range(5000)] + [i for i in range(3000)] + ["é" * 9, ""]
    first = kt.ids(keys)
    assert first.tolist() == list(range(len(keys))) and kt.keys == keys
    again = kt.ids(keys[::-1] + ["new"])
    assert again.tolist() == list(range(len(keys)))[::-1] + [len(keys)]
    assert len(kt) == len(keys) + 1


# -- learn_many against learn_one ---------------------------------------------------------
def _frame(keys, seed: int = 2) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    n = len(keys)
    X = pd.DataFrame({"x1": rng.normal(5.0, 2.0, n), "x2": rng.normal(size=n)})
    X.insert(0, "g", pd.Series(keys, dtype=object))
    return X, pd.Series(1.0 + X["x1"] - X["x2"] + rng.normal(size=n))


def _one_loop(X: pd.DataFrame, y: pd.Series, missing: str = "raise") -> MixedLM:
    m = MixedLM(SLOPES, missing=missing)
    for i, x in enumerate(X.to_dict("records")):
        if x["g"] is None or x["g"] != x["g"]:
            m._learner.n_skipped += 1  # learn_one refuses a missing key; learn_many skips it
            continue
        m.learn_one(x, float(y.iat[i]))
    return m


def _same(a: MixedLM, b: MixedLM) -> None:
    assert a._stats.keys == b._stats.keys
    assert [type(k) for k in a._stats.keys] == [type(k) for k in b._stats.keys]
    np.testing.assert_array_equal(a._stats.active, b._stats.active)
    assert a.n_events == b.n_events and a.n_skipped == b.n_skipped


# keys a model takes (a lone surrogate is refused at the input: test_learn_many_keys.py;
# the key table itself still interns one, as the tests above show)
_ODD = ["é", "", "😀", "a" * 256, "1", "k\x00", "x y", "k1", "\x01", " "]


@pytest.mark.parametrize("kind", ["object", "str", "string", "category", "list"])
def test_odd_str_keys_learn_many_is_bitwise_learn_one(kind):
    rng = np.random.default_rng(4)
    keys = [_ODD[i] for i in rng.integers(0, len(_ODD), 300)]
    X, y = _frame(keys)
    if kind == "list":
        many = MixedLM(SLOPES)
        cols = {"g": list(keys), "x1": X["x1"].to_numpy(), "x2": X["x2"].to_numpy()}
        codes, uniques, *_ = many._reader.read_columns(cols, y.to_numpy(), None)
        ref = pd.factorize(np.array(keys, dtype=object))
        np.testing.assert_array_equal(codes, ref[0])
        assert uniques == list(ref[1])
    else:
        if kind != "object":
            X["g"] = X["g"].astype(kind)
        many = MixedLM(SLOPES)
        many.learn_many(X.iloc[:150], y.iloc[:150])
        many.learn_many(X.iloc[150:], y.iloc[150:])  # known keys and new ones
        _same(many, _one_loop(X.astype({"g": object}), y))


@pytest.mark.parametrize("missing", ["raise", "skip"])
@pytest.mark.parametrize("hole", [None, float("nan")])
def test_missing_str_keys_keep_their_meaning(missing, hole):
    keys = [f"k{i % 13}" for i in range(200)]
    for r in (5, 77, 150):
        keys[r] = hole
    X, y = _frame(keys)
    m = MixedLM(SLOPES, missing=missing)
    if missing == "raise":
        with pytest.raises(ValueError, match="row 5: field 'g': group key is missing"):
            m.learn_many(X, y)
        assert m.n_events == 0 and m._stats.keys == []
        return
    m.learn_many(X, y)
    _same(m, _one_loop(X, y, missing))


def test_a_too_long_str_key_is_refused_naming_its_row():
    keys = [f"k{i % 5}" for i in range(100)]
    keys[61] = "é" * 257  # 257 characters, 514 bytes
    X, y = _frame(keys)
    m = MixedLM(SLOPES)
    with pytest.raises(ValueError, match="row 61: field 'g': group key longer than 256"):
        m.learn_many(X, y)
    assert m.n_events == 0


def test_int_and_str_keys_of_the_same_digits_stay_apart():
    keys = [1, "1", 2, "2"] * 20 + ["1"] * 5
    X, y = _frame(keys)
    many = MixedLM(SLOPES)
    many.learn_many(X, y)
    assert many._stats.keys == [1, "1", 2, "2"]
    _same(many, _one_loop(X, y))
    strs = X.assign(g=X["g"].astype(str))  # only str keys now: the fast path
    many2 = MixedLM(SLOPES)
    many2.learn_many(strs, y)
    assert many2._stats.keys == ["1", "2"]
    _same(many2, _one_loop(strs, y))


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8", "Int64"])
def test_int_keys_of_every_width_are_bitwise_learn_one(dtype):
    rng = np.random.default_rng(6)
    keys = rng.integers(0, 50, 400)
    X, y = _frame(list(keys))
    X["g"] = keys.astype(dtype) if dtype != "Int64" else pd.array(keys, dtype="Int64")
    many = MixedLM(SLOPES)
    many.learn_many(X.iloc[:200], y.iloc[:200])
    many.learn_many(X.iloc[200:], y.iloc[200:])
    _same(many, _one_loop(X.astype({"g": object}), y))


def test_a_reader_takes_a_list_of_keys():
    rr = RowReader(MixedLM(SLOPES)._design)
    cols = {"g": ["b", "a", "b"], "x1": [1.0, 2.0, 3.0], "x2": [0.0, 1.0, 0.0]}
    codes, uniques, *_ = rr.read_columns(cols, [1.0, 2.0, 3.0], None)
    assert codes.tolist() == [0, 1, 0] and uniques == ["b", "a"]
