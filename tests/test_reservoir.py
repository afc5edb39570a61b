"""The reservoir: a content-chosen sample that is the same in any order, merges exactly,
and gives lme4's scaled residual quantiles (exactly while the stream fits in it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, Snapshot
from streamlmm.reservoir import Reservoir, weighted_quantiles


def _data(n, G, seed, factor=False, dup=0.0):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    x = np.round(rng.normal(size=n), 1)  # coarse values: repeats happen
    y = np.round(1.0 + 0.5 * x + rng.normal(size=G)[g] + rng.normal(size=n), 1)
    X = pd.DataFrame({"g": [f"k{i}" for i in g], "x": x})
    if factor:
        X["f"] = rng.choice(["lo", "mid", "hi"], n)
        y = y + (X["f"] == "hi").to_numpy() * 2.0
    if dup:  # repeat some events exactly
        k = int(dup * n)
        X = pd.concat([X, X.iloc[:k]], ignore_index=True)
        y = np.concatenate([y, y[:k]])
    return X, pd.Series(y)


def _content(m: MixedLM):
    r = m._res
    n = r.size
    keys = [m._stats.keys[i] for i in r.row[:n]]
    out = sorted(zip(r.prio[:n].tolist(), keys, r.y[:n].tolist(), r.count[:n].tolist()))
    return out, r.n_seen


def test_exact_residual_quantiles_while_the_stream_fits():
    """With every event in the reservoir, the quantiles are R's type-7 quantiles of the
    residuals computed directly from the snapshot's estimates (lme4's definition)."""
    X, y = _data(3_000, 40, 1, factor=True, dup=0.1)
    m = MixedLM("y ~ x + f + (1 + x | g)")
    m.learn_many(X, y)
    s = m.fit().snapshot()
    rq = s.resid_quantiles
    assert rq["events"] == rq["of"] == len(X)
    fitted = np.array([s.predict(r) for r in X.to_dict("records")])
    r = (y.to_numpy() - fitted) / s.sigma
    want = np.quantile(r, [0, 0.25, 0.5, 0.75, 1.0])
    got = [rq[k] for k in ("min", "1Q", "median", "3Q", "max")]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("factor", [False, True])
def test_same_sample_in_any_order_and_either_path(factor):
    X, y = _data(6_000, 300, 2, factor=factor, dup=0.2)
    formula = "y ~ x + f + (1 | g)" if factor else "y ~ x + (1 | g)"
    many = MixedLM(formula, reservoir=700)
    many.learn_many(X, y)
    perm = np.random.default_rng(5).permutation(len(X))
    one = MixedLM(formula, reservoir=700)
    for i in perm:
        one.learn_one(X.iloc[i].to_dict(), float(y.iloc[i]))
    assert many._res.order_free and one._res.order_free
    assert many._res.size == 700 and many._res.n_seen == len(X)
    assert _content(many) == _content(one)


def test_shards_merge_into_the_sample_of_the_whole():
    X, y = _data(5_000, 200, 3, dup=0.1)
    whole = MixedLM("y ~ x + (1 | g)", reservoir=500)
    whole.learn_many(X, y)
    shards = []
    for part in (X.g.str[-1].isin(list("0123")), ~X.g.str[-1].isin(list("0123"))):
        m = MixedLM("y ~ x + (1 | g)", reservoir=500)
        m.learn_many(X[part], y[part])
        shards.append(m.snapshot(offsets={f"t:{len(shards)}": int(part.sum())}))
    merged = MixedLM.from_snapshots(shards)
    assert _content(merged) == _content(whole)


def _rows_by_name(m: MixedLM):
    """Each kept event's union values by column name, keyed by priority."""
    r, cols = m._res, m._design.columns
    return {
        p: dict(zip(cols, r.A[i, : len(cols)].tolist()))
        for i, p in enumerate(r.prio[: r.size].tolist())
    }


def test_shards_with_other_reference_levels_merge_into_the_sample_of_the_whole():
    """Shard B meets the factor's levels in another order (another reference level and
    column order): its kept events are carried into the merged columns, as its
    statistics are, and the merged sample is the whole stream's."""
    X, y = _data(5_000, 200, 4, factor=True, dup=0.1)
    first = X.g.str[-1].isin(list("01234"))
    parts = []
    for part, lead in ((X[first], "lo"), (X[~first], "hi")):  # the first level seen
        top = part.index[part.f == lead][:1]
        parts.append(pd.concat([part.loc[top], part.drop(top)]))
    formula = "y ~ x * f + (1 | g)"
    shards = []
    for i, part in enumerate(parts):
        m = MixedLM(formula, reservoir=600)
        m.learn_many(part, y.loc[part.index])
        shards.append(m.snapshot(offsets={f"t:{i}": len(part)}))
    assert shards[0].state["design"]["columns"] != shards[1].state["design"]["columns"]
    merged = MixedLM.from_snapshots(shards)
    whole = MixedLM(formula, reservoir=600)
    both = pd.concat(parts)
    whole.learn_many(both, y.loc[both.index])
    assert _content(merged) == _content(whole)
    assert _rows_by_name(merged) == _rows_by_name(whole)
    assert merged.fit().snapshot().resid_quantiles == pytest.approx(
        whole.fit().snapshot().resid_quantiles, rel=1e-9
    )


def test_repeats_and_weights_are_counted_and_snapshots_keep_the_sample():
    m = MixedLM("y ~ x + (1 | g)")
    for _ in range(3):
        m.learn_one({"g": "a", "x": 1.0}, 2.0)
    m.learn_one({"g": "a", "x": 1.0}, 2.0, w=2.5)
    m.learn_one({"g": "b", "x": -0.0}, 1.0)
    m.learn_one({"g": "b", "x": 0.0}, 1.0)  # -0.0 and 0.0 are one value
    m.learn_one({"g": "a", "x": 2.0}, 3.0)
    assert m._res.size == 3 and sorted(m._res.count[:3].tolist()) == [1.0, 2.0, 5.5]
    back = MixedLM.from_snapshot(Snapshot.from_bytes(m.snapshot().to_bytes()))
    assert _content(back) == _content(m)


def test_widening_pads_kept_rows_and_level_order_does_not_matter():
    rows = [({"g": "a", "x": 1.0, "f": "u"}, 1.0), ({"g": "b", "x": 2.0, "f": "v"}, 2.0)]
    rows += [({"g": "c", "x": 3.0, "f": "w"}, 4.0), ({"g": "a", "x": 0.5, "f": "v"}, 0.0)]
    a, b = MixedLM("y ~ x + f + (1 | g)"), MixedLM("y ~ x + f + (1 | g)")
    for x, t in rows:
        a.learn_one(x, t)
    for x, t in reversed(rows):  # "v"/"w" first: other reference level, other columns
        b.learn_one(x, t)
    assert a._res.A.shape[1] == a._stats.k == 4
    assert sorted(a._res.prio[:4].tolist()) == sorted(b._res.prio[:4].tolist())


def test_weighted_quantiles_equal_numpy_on_repeated_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    w = rng.integers(1, 5, 50).astype(float)
    p = [0, 0.1, 0.25, 0.5, 0.9, 1]
    np.testing.assert_allclose(
        weighted_quantiles(x, w, p), np.quantile(np.repeat(x, w.astype(int)), p)
    )


def test_capacity_is_validated():
    with pytest.raises(ValueError, match="reservoir"):
        MixedLM("y ~ x + (1 | g)", reservoir=-1)
    with pytest.raises(ValueError, match="capacity"):
        Reservoir(0)
    assert MixedLM("y ~ x + (1 | g)", reservoir=0).fit().snapshot().resid_quantiles == {}


def test_insertions_keep_the_bottom_k_of_distinct_priorities():
    """One event at a time (the compiled heap and hash table), against the definition:
    the ``capacity`` smallest distinct priorities, each with its summed weight."""
    rng = np.random.default_rng(7)
    for cap in (1, 3, 64, 200):
        r = Reservoir(cap)
        r.widen(2)
        seen: dict[float, float] = {}
        pool = rng.integers(0, 2**53, 300).astype(float)  # repeats: the same events again
        for prio in rng.choice(pool, 3_000):
            w = float(rng.integers(1, 4))
            seen[prio] = seen.get(prio, 0.0) + w
            r.offer_one(prio, 0, np.array([1.0, prio]), prio, w)
        want = sorted(seen.items())[:cap]
        got = sorted(zip(r.prio[: r.size].tolist(), r.count[: r.size].tolist()))
        assert got == want and r.n_seen == sum(seen.values())
        assert all(r.A[s, 1] == r.prio[s] for s in range(r.size))  # content moved with it
