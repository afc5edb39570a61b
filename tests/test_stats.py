"""GroupStats: exact weighted sufficient statistics, keys, shift, growth and decay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamlmm.formula import parse_formula
from streamlmm.stats import GroupStats, check_key

FORMULA = parse_formula("y ~ x1 + x2 + (1 + x1 | g)")


def _events(n: int, n_groups: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = [f"g{i}" for i in rng.integers(0, n_groups, n)]
    A = np.column_stack([np.ones(n), rng.normal(3.0, 2.0, n), rng.normal(-1.0, 1.0, n)])
    y = rng.normal(10.0, 3.0, n)
    w = rng.integers(1, 4, n).astype(float)
    return keys, A, y, w


def _naive_row(A, y, w, shift):
    """n_g and Σ w v v' for v = [a, y] − shift, by plain numpy."""
    V = np.column_stack([A, y]) - shift
    return w.sum(), (V * w[:, None]).T @ V


def test_statistics_equal_naive_weighted_sums():
    keys, A, y, w = _events(500, 17)
    st = GroupStats(FORMULA)
    st.add(st.rows(keys), A, y, w, np.zeros(len(y)))
    P = st.P
    for key in set(keys):
        sel = np.array([k == key for k in keys])
        n_g, M = _naive_row(A[sel], y[sel], w[sel], st.shift)
        row = st.active[st.row(key)]
        assert row[0] == pytest.approx(n_g, rel=1e-15)
        np.testing.assert_allclose(row[P], M, rtol=1e-12, atol=1e-12 * np.abs(M).max())
    assert st.n_obs == pytest.approx(w.sum(), rel=1e-15)
    assert st.n_groups == len(set(keys))


def test_shift_is_the_first_event_on_shiftable_columns():
    keys, A, y, w = _events(10, 3)
    st = GroupStats(FORMULA)
    assert st.shift is None
    st.add(st.rows(keys), A, y, w, np.zeros(10))
    np.testing.assert_array_equal(st.shift, [0.0, A[0, 1], A[0, 2], y[0]])
    # later events never move it
    st.add(st.rows(keys), A + 5, y + 5, w, np.zeros(10))
    np.testing.assert_array_equal(st.shift, [0.0, A[0, 1], A[0, 2], y[0]])


def test_no_fixed_intercept_means_no_shift():
    f = parse_formula("y ~ 0 + x1 + (1 | g)")
    st = GroupStats(f)
    st.add_one("a", np.array([7.0, 1.0]), 3.0, 1.0, 0.0)
    np.testing.assert_array_equal(st.shift, np.zeros(3))


def test_batch_add_is_bitwise_equal_to_one_at_a_time():
    keys, A, y, w = _events(300, 11, seed=1)
    batch = GroupStats(FORMULA)
    batch.add(batch.rows(keys), A, y, w, np.zeros(len(y)))
    single = GroupStats(FORMULA)
    for e, key in enumerate(keys):
        single.add_one(key, A[e], y[e], w[e], 0.0)
    assert single.keys == batch.keys
    np.testing.assert_array_equal(single.active, batch.active)


def test_arrays_grow_past_capacity_without_losing_rows():
    keys = [f"k{i}" for i in range(200)]
    A = np.column_stack([np.ones(200), np.arange(200.0), np.arange(200.0) ** 0.5])
    y = np.arange(200.0)
    small = GroupStats(FORMULA, capacity=2)
    for e, key in enumerate(keys):
        small.add_one(key, A[e], y[e], 1.0, 0.0)
    big = GroupStats(FORMULA, capacity=1024)
    big.add(big.rows(keys), A, y, np.ones(200), np.zeros(200))
    assert small.S.shape[0] >= 200
    np.testing.assert_array_equal(small.active, big.active)
    assert small.index == {k: i for i, k in enumerate(keys)}


def test_unseen_row_is_minus_one_and_not_created():
    st = GroupStats(FORMULA)
    assert st.row("nope") == -1
    assert st.n_groups == 0


def test_integer_valued_keys_name_the_same_group_but_strings_differ():
    st = GroupStats(FORMULA)
    a = np.array([1.0, 2.0, 3.0])
    for key in (3, 3.0, np.int64(3), np.float64(3.0)):
        st.add_one(check_key(key), a, 1.0, 1.0, 0.0)
    st.add_one(check_key("3"), a, 1.0, 1.0, 0.0)
    assert st.keys == [3, "3"]
    assert st.active[0, 0] == 4.0


@pytest.mark.parametrize(
    "key, words",
    [
        (None, "missing"),
        (True, "got bool"),
        (np.bool_(False), "got bool"),
        (1.5, "got float"),
        (math.nan, "got float"),
        (math.inf, "got float"),
        ([1], "got list"),
        ({"a": 1}, "got dict"),
        ((1, 2), "got tuple"),
        (b"a", "got bytes"),
        ("x" * 257, "longer than"),
    ],
)
def test_check_key_rejects_with_field_name(key, words):
    with pytest.raises(ValueError, match=words) as info:
        check_key(key, "grp")
    assert "'grp'" in str(info.value)


def test_check_key_accepts_str_and_int():
    assert check_key("a") == "a"
    assert check_key(np.str_("a")) == "a"
    assert check_key(-7) == -7
    assert type(check_key(np.int32(5))) is int
    assert check_key("x" * 256) == "x" * 256


def test_copy_is_independent():
    keys, A, y, w = _events(50, 5)
    st = GroupStats(FORMULA)
    st.add(st.rows(keys), A, y, w, np.zeros(50))
    cp = st.copy()
    before = cp.active.copy()
    st.add(st.rows(["new"] + keys[:3]), A[:4], y[:4], w[:4], np.zeros(4))
    np.testing.assert_array_equal(cp.active, before)
    assert "new" not in cp.index and cp.n_groups == 5


@pytest.mark.parametrize("half_life", [0.0, -1.0, math.inf, math.nan])
def test_half_life_must_be_positive_finite(half_life):
    with pytest.raises(ValueError, match="half_life"):
        GroupStats(FORMULA, half_life=half_life)


@pytest.mark.parametrize("shuffle_times", [False, True])
def test_lazy_decay_equals_explicit_decayed_weights(shuffle_times):
    """Decaying each group when touched (and all at the end) equals weighting each event
    by w·2^(−(T−t)/h), T the latest time, also when events arrive out of time order."""
    keys, A, y, w = _events(400, 9, seed=2)
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 100, len(y)))
    if shuffle_times:
        t = rng.permutation(t)
    h = 17.0
    lazy = GroupStats(FORMULA, half_life=h)
    lazy.add(lazy.rows(keys), A, y, w, t)
    lazy.decay_to_now()
    assert lazy.now == t.max()
    explicit = GroupStats(FORMULA)
    explicit.shift = lazy.shift.copy()
    explicit.add(explicit.rows(keys), A, y, w * 2.0 ** (-(t.max() - t) / h), np.zeros(len(y)))
    np.testing.assert_allclose(lazy.active, explicit.active, rtol=1e-12, atol=1e-12)


def test_nbytes_grows_with_groups():
    st = GroupStats(FORMULA)
    small = st.nbytes()
    st.add(
        st.rows([f"g{i}" for i in range(1000)]),
        np.ones((1000, 3)),
        np.ones(1000),
        np.ones(1000),
        np.zeros(1000),
    )
    assert st.nbytes() > small + 1000 * st.width * 8
