"""The state-topic record codec and the fitter's global state, without a broker."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.stream.fitter import GlobalState
from streamlmm.stream.state import decode_record, encode_group, encode_marker, remap_rows

FORMULA = "y ~ x + f + (1 + x | g)"


def stream(seed: int, n: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 40, n)
    f = rng.choice(["a", "b", "c"], n)
    x = rng.normal(size=n)
    eff = {"a": 0.0, "b": 1.0, "c": -0.5}
    b0, b1 = rng.normal(0, 1.0, 40), rng.normal(0, 0.4, 40)
    y = 1 + (0.3 + b1[g]) * x + np.array([eff[v] for v in f]) + b0[g] + rng.normal(size=n)
    return pd.DataFrame({"g": g, "x": x, "f": f, "y": y})


def records(model: MixedLM, partition: int):
    st, d = model._stats, model._design.to_state()
    for i, k in enumerate(st.keys):
        yield decode_record(
            *encode_group(
                k,
                partition,
                st.M[i],
                events=int(st.M[i, 0]),
                offset=1,
                formula=model.formula,
                method="REML",
                design=d,
            )
        )


def test_workers_with_levels_in_different_orders_pool_exactly():
    df = stream(0)
    df = df.iloc[np.argsort(df["f"].ne("a").to_numpy(), kind="stable")]  # 'a' first: reference
    even = df[df["g"] % 2 == 0]
    odd = df[df["g"] % 2 == 1]
    odd = odd.iloc[np.argsort(odd["f"].map({"a": 0, "c": 1, "b": 2}).to_numpy(), kind="stable")]
    shards = []
    for part in (even, odd):
        m = MixedLM(FORMULA)
        m.learn_many(part[["g", "x", "f"]], part["y"])
        shards.append(m)
    assert shards[0]._design.columns != shards[1]._design.columns  # fb, fc vs fc, fb
    gs = GlobalState()
    for p, m in enumerate(shards):
        for rec in records(m, p):
            assert gs.apply(rec)
    fitted = MixedLM(FORMULA).load_statistics(gs.design, gs.stats, gs.n_events).fit().snapshot()
    whole = MixedLM(FORMULA)
    whole.learn_many(pd.concat([even, odd])[["g", "x", "f"]], pd.concat([even, odd])["y"])
    want = whole.fit().snapshot()
    assert fitted.criterion == pytest.approx(want.criterion, rel=1e-9)
    for k, v in want.fixef.items():
        assert fitted.fixef[k] == pytest.approx(v, rel=1e-6), k
    assert fitted.n_events == len(df)


def test_a_group_on_two_partitions_is_kept_on_its_first():
    m = MixedLM("y ~ x + (1 | g)")
    m.learn_many(pd.DataFrame({"g": [1, 1, 2], "x": [1.0, 2.0, 3.0]}), pd.Series([1.0, 2, 3]))
    gs = GlobalState()
    for rec in records(m, 0):
        gs.apply(rec)
    rec = next(records(m, 1))
    assert not gs.apply(rec) and gs.n_conflicts == 1


def test_counts_and_markers():
    m = MixedLM(FORMULA)
    m.learn_many(stream(1, 50)[["g", "x", "f"]], stream(1, 50)["y"])
    gs = GlobalState()
    gs.apply(decode_record(*encode_marker(3, 99, FORMULA, "REML", "events")))
    assert gs.markers == {"events:3": 99}
    with pytest.raises(ValueError, match="formula"):
        gs.apply(decode_record(*encode_marker(3, 99, "y ~ 1 + (1 | g)", "REML", "events")))


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda v: b"XXXX" + v[4:], "does not start with SLMS"),
        (lambda v: v[:4] + bytes([9]) + v[5:], "format version 9"),
        (lambda v: v[:6], "too short"),
        (lambda v: v[:-8], "row has"),
        (lambda v: v[:5] + struct.pack("<I", 1 << 30) + v[9:], "header length"),
        (lambda v: v[:9] + b"[" + v[10:], "header is malformed"),
        (lambda v: v[:-8] + struct.pack("<d", float("nan")), "non-finite"),
    ],
)
def test_bad_records_are_clear_errors(mangle, message):
    m = MixedLM("y ~ x + (1 | g)")
    m.learn_one({"g": "a", "x": 1.0}, 2.0)
    k, v = encode_group(
        "a",
        0,
        m._stats.M[0],
        events=1,
        offset=1,
        formula=m.formula,
        method="REML",
        design=m._design.to_state(),
    )
    assert decode_record(k, v).key == "a"
    with pytest.raises(ValueError, match=message):
        decode_record(k, mangle(v))
    with pytest.raises(ValueError, match="JSON string or integer"):
        decode_record(b"[1]", v)
    with pytest.raises(ValueError, match="tombstone"):
        decode_record(k, None)


def test_int_and_str_keys_stay_apart():
    m = MixedLM("y ~ x + (1 | g)")
    m.learn_one({"g": 1, "x": 1.0}, 2.0)
    m.learn_one({"g": "1", "x": 2.0}, 3.0)
    keys = [rec.key for rec in records(m, 0)]
    assert keys == [1, "1"]


def test_a_column_the_reader_lacks_is_refused_unless_zero():
    M = np.zeros((1, 10))  # v = [x, fb, y]: 1 + 3 + 6
    M[0, :4] = [2.0, 1.0, 0.5, 3.0]
    with pytest.raises(ValueError, match="reference levels"):
        remap_rows(M, ["(Intercept)", "x", "fb"], ["(Intercept)", "x"])
    M[0, 2] = 0.0
    assert remap_rows(M, ["(Intercept)", "x", "fb"], ["(Intercept)", "x"]).shape == (1, 6)


def test_rows_written_under_another_reference_level_relayout_exactly():
    """Two writers that saw different first levels of a factor (references "a" and "b")
    write rows in different columns; re-laid for the reader's design through
    ``[f = ref] = 1 − Σ others`` they equal the rows of one pass over the same events."""
    from streamlmm import MixedLM
    from streamlmm.stream.state import relayout

    formula = "y ~ x1 * f + (1 + x1 | g)"
    rng = np.random.default_rng(4)

    def events(first: str, groups: range) -> list[tuple[dict, float]]:
        out = []
        for i in range(600):
            f = first if i == 0 else str(rng.choice(["a", "b", "c"]))
            x = {"g": int(rng.choice(groups)), "x1": float(rng.normal()), "f": f}
            out.append((x, 1.0 + x["x1"] + {"a": 0.0, "b": 1.0, "c": -1.0}[f] + rng.normal()))
        return out

    ev_a, ev_b = events("a", range(0, 20)), events("b", range(20, 40))
    writer_b = MixedLM(formula)
    for x, y in ev_b:
        writer_b.learn_one(x, y)
    assert writer_b._design.factors["f"][0] == "b"
    one = MixedLM(formula, levels={"f": ["a", "b", "c"]})
    for x, y in ev_a + ev_b:
        one.learn_one(x, y)
    written = writer_b._design.to_state()
    st_b, st_one = writer_b._stats, one._stats
    for key in st_b.keys:
        got = relayout(st_b.M[st_b.row(key)], written, one._design)
        want = st_one.M[st_one.row(key)]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
