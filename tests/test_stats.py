"""GroupStats: weighted means and co-moments, cross-products, keys, widening, merging,
state, growth and decay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamlmm import kernels
from streamlmm.design import numeric_design
from streamlmm.stats import GroupStats, check_key

FORMULA = numeric_design("y ~ x1 + x2 + (1 + x1 | g)")


def _events(n: int, n_groups: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = [f"g{i}" for i in rng.integers(0, n_groups, n)]
    A = np.column_stack([np.ones(n), rng.normal(3.0, 2.0, n), rng.normal(-1.0, 1.0, n)])
    y = rng.normal(10.0, 3.0, n)
    w = rng.integers(1, 4, n).astype(float)
    return keys, A, y, w


def _v(A, y):
    """``v = [non-constant union columns, y]`` (FORMULA's intercept is column 0)."""
    return np.column_stack([A[:, 1:], y])


def _naive_row(A, y, w):
    """n_g, the weighted means m_g and Σ w (v − m_g)(v − m_g)' for v = [a, y], by numpy."""
    V = _v(A, y)
    n = w.sum()
    m = (w @ V) / n
    D = V - m
    return n, m, (D * w[:, None]).T @ D


def _row_parts(st, r):
    row = st.active[r]
    return row[0], row[1 : 1 + st.m], row[1 + st.m :][st.P]


def test_statistics_equal_naive_weighted_means_and_comoments():
    keys, A, y, w = _events(500, 17)
    st = GroupStats(FORMULA)
    st.add(st.rows(keys), A, y, w, np.zeros(len(y)))
    assert st.m == 3 and st.width == 1 + 3 + 6
    for key in set(keys):
        sel = np.array([k == key for k in keys])
        n_g, m_g, C_g = _naive_row(A[sel], y[sel], w[sel])
        got_n, got_m, got_C = _row_parts(st, st.row(key))
        assert got_n == pytest.approx(n_g, rel=1e-15)
        np.testing.assert_allclose(got_m, m_g, rtol=1e-13)
        np.testing.assert_allclose(got_C, C_g, rtol=1e-12, atol=1e-12 * np.abs(C_g).max())
        np.testing.assert_array_equal(st.means()[st.row(key)], got_m)
    assert st.n_obs == pytest.approx(w.sum(), rel=1e-15)
    assert st.n_groups == len(set(keys))
    np.testing.assert_array_equal(st.counts(), st.active[:, 0])


@pytest.mark.parametrize("offset", [0.0, 1e6, 1.7e9])
def test_comoments_keep_their_digits_under_a_large_offset(offset):
    """Welford/West: a 10⁶ offset or a Unix timestamp does not cancel the spread."""
    keys, A, y, w = _events(400, 7, seed=5)
    A[:, 1] = np.round(A[:, 1] * 1000)  # integers (seconds), exact under the offset
    st = GroupStats(FORMULA)
    st.add(st.rows(keys), A + [0.0, offset, 0.0], y, w, np.zeros(len(y)))
    for key in set(keys):
        sel = np.array([k == key for k in keys])
        n_g, m_g, C_g = _naive_row(A[sel], y[sel], w[sel])  # computed without the offset
        got_n, got_m, got_C = _row_parts(st, st.row(key))
        np.testing.assert_allclose(got_m - [offset, 0, 0], m_g, rtol=1e-12, atol=1e-6)
        np.testing.assert_allclose(got_C, C_g, rtol=1e-10, atol=1e-10 * np.abs(C_g).max())


def test_cross_products_around_any_centre_equal_naive_sums():
    """Σ w (v − c)(v − c)' = C_g + n_g (m_g − c)(m_g − c)', per group and in total."""
    keys, A, y, w = _events(300, 9, seed=6)
    st = GroupStats(FORMULA)
    st.add(st.rows(keys), A, y, w, np.zeros(len(y)))
    f = FORMULA
    for c in (np.zeros(4), st.center(), np.array([0.0, -7.0, 2.5, 100.0])):
        b = st.cross_products(c, f.zi, f.xi)
        U = np.column_stack([A - c[:3], y - c[3]])  # [a − c, y − c_y]
        q, p = f.q, f.p
        out = np.empty(b.F.shape[1])
        for key in set(keys):
            sel = np.array([k == key for k in keys])
            S = (U[sel] * w[sel, None]).T @ U[sel]
            want = np.concatenate(
                [S[np.ix_(f.zi, f.zi)].ravel(), S[np.ix_(f.zi, f.xi)].ravel(), S[f.zi, 3]]
            )
            r = st.row(key)
            np.testing.assert_allclose(b.F[r], want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
            st.group_blocks(r, c, f.zi, f.xi, out)
            np.testing.assert_array_equal(out, b.F[r])
        S = (U * w[:, None]).T @ U
        np.testing.assert_allclose(b.XX, S[np.ix_(f.xi, f.xi)], rtol=1e-12)
        np.testing.assert_allclose(b.Xy, S[f.xi, 3], rtol=1e-12, atol=1e-12 * abs(S).max())
        assert b.yy == pytest.approx(S[3, 3], rel=1e-12)
        assert b.n == pytest.approx(w.sum(), rel=1e-15)
        assert b.F.shape == (st.n_groups, q * q + q * p + q)


def test_center_is_the_median_of_group_means_on_shiftable_columns():
    keys, A, y, w = _events(200, 9)
    st = GroupStats(FORMULA)
    np.testing.assert_array_equal(st.center(), np.zeros(4))  # no groups yet
    st.add(st.rows(keys), A, y, w, np.zeros(200))
    means = st.means()
    np.testing.assert_array_equal(
        st.center(),
        [0.0, np.median(means[:, 0]), np.median(means[:, 1]), np.median(means[:, 2])],
    )


def test_no_fixed_intercept_means_no_centre():
    f = numeric_design("y ~ 0 + x1 + (1 | g)")
    st = GroupStats(f)
    st.add_one("a", np.array([7.0, 1.0]), 3.0, 1.0, 0.0)
    st.add_one("b", np.array([9.0, 1.0]), 5.0, 1.0, 0.0)
    np.testing.assert_array_equal(st.center(), np.zeros(3))


def test_an_extreme_first_event_changes_no_other_group():
    """Per-group means: an outlier opening the stream touches only its own row, and the
    centre (a median) is not dragged to it."""
    keys, A, y, w = _events(300, 11, seed=7)
    clean = GroupStats(FORMULA)
    clean.add(clean.rows(keys), A, y, w, np.zeros(300))
    dirty = GroupStats(FORMULA)
    dirty.add_one("outlier", np.array([1.0, 1e12, -3e11]), 1e13, 1.0, 0.0)
    dirty.add(dirty.rows(keys), A, y, w, np.zeros(300))
    for key in clean.keys:
        np.testing.assert_array_equal(dirty.active[dirty.row(key)], clean.active[clean.row(key)])
    np.testing.assert_array_equal(dirty.means()[dirty.row("outlier")], [1e12, -3e11, 1e13])
    assert np.all(dirty.active[dirty.row("outlier"), 1 + dirty.m :] == 0.0)
    spread = np.ptp(clean.means(), axis=0)
    assert np.all(np.abs(dirty.center()[1:] - clean.center()[1:]) <= spread)


def test_widen_keeps_old_entries_and_zeros_the_new_column():
    """A new column (a factor level seen for the first time): earlier events had 0 in
    it, so widening then adding equals one pass with those zeros, bit for bit."""
    wide_f = numeric_design("y ~ x1 + x2 + x3 + (1 + x1 | g)")
    keys, A, y, w = _events(200, 8, seed=8)
    st = GroupStats(FORMULA)
    st.add(st.rows(keys[:120]), A[:120], y[:120], w[:120], np.zeros(120))
    before = st.active.copy()
    st.widen(wide_f)
    assert st.m == 4 and st.width == 1 + 4 + 10
    old = [0, 1, 3]  # old v = [x1, x2, y] -> new positions in [x1, x2, x3, y]
    np.testing.assert_array_equal(st.active[:, 0], before[:, 0])
    np.testing.assert_array_equal(st.active[:, 1 + np.array(old)], before[:, 1:4])
    np.testing.assert_array_equal(st.active[:, 1 + 2], 0.0)
    P0 = kernels.packed_index(3)
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(
                st.active[:, 5 + st.P[old[i], old[j]]], before[:, 4 + P0[i, j]]
            )
    np.testing.assert_array_equal(st.active[:, 5 + st.P[2]], 0.0)  # C's new row/column
    # carry on with the new column
    rng = np.random.default_rng(9)
    A4 = np.column_stack([A, np.zeros(200)])
    A4[120:, 3] = rng.normal(size=80)
    st.add(st.rows(keys[120:]), A4[120:], y[120:], w[120:], np.zeros(80))
    once = GroupStats(wide_f)
    once.add(once.rows(keys), A4, y, w, np.zeros(200))
    assert st.keys == once.keys
    np.testing.assert_array_equal(st.active, once.active)


def test_widen_refuses_reordered_columns():
    st = GroupStats(FORMULA)
    with pytest.raises(ValueError, match="appended"):
        st.widen(numeric_design("y ~ x2 + x1 + (1 | g)"))


@pytest.mark.parametrize("half_life", [None, 13.0])
def test_merge_of_shards_equals_one_pass(half_life):
    keys, A, y, w = _events(600, 15, seed=10)
    t = np.sort(np.random.default_rng(11).uniform(0, 50, 600))
    one = GroupStats(FORMULA, half_life=half_life)
    one.add(one.rows(keys), A, y, w, t)
    one.decay_to_now()
    shards = []
    parts = np.random.default_rng(12).integers(0, 3, 600)
    for s in range(3):
        sel = parts == s
        sh = GroupStats(FORMULA, half_life=half_life)
        sh.add(sh.rows([k for k, x in zip(keys, sel) if x]), A[sel], y[sel], w[sel], t[sel])
        shards.append(sh)
    saved = [sh.active.copy() for sh in shards]
    merged = GroupStats.merge(shards)
    assert sorted(merged.keys) == sorted(one.keys)
    if half_life:
        assert merged.now == one.now
    for key in one.keys:
        want = one.active[one.row(key)]
        got = merged.active[merged.row(key)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    for sh, was in zip(shards, saved):  # the shards are not changed
        np.testing.assert_array_equal(sh.active, was)


def test_merge_refuses_different_columns():
    a, b = GroupStats(FORMULA), GroupStats(numeric_design("y ~ x1 + (1 | g)"))
    with pytest.raises(ValueError, match="same columns"):
        GroupStats.merge([a, b])


@pytest.mark.parametrize("half_life", [None, 9.0])
def test_state_round_trip_is_exact(half_life):
    keys, A, y, w = _events(300, 10, seed=13)
    t = np.random.default_rng(14).uniform(0, 30, 300)
    st = GroupStats(FORMULA, half_life=half_life)
    st.add(st.rows(keys[:200]), A[:200], y[:200], w[:200], t[:200])
    back = GroupStats.from_state(FORMULA, list(st.keys), st.to_state())
    assert back.keys == st.keys and back.index == st.index
    assert back.now == st.now and back.half_life == st.half_life
    np.testing.assert_array_equal(back.active, st.active)
    if half_life:
        np.testing.assert_array_equal(back.tg[: back.n_groups], st.tg[: st.n_groups])
    for s in (st, back):  # both carry on identically
        s.add(s.rows(keys[200:]), A[200:], y[200:], w[200:], t[200:])
        s.decay_to_now()
    np.testing.assert_array_equal(back.active, st.active)
    with pytest.raises(ValueError, match="does not fit"):
        GroupStats.from_state(FORMULA, list(st.keys)[:-1], st.to_state())


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
    assert small.M.shape[0] >= 200
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
