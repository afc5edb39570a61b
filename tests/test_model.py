"""MixedLM: invariances of the stream, forgetting, currency of predictions, resuming,
bad input and numerical robustness."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, Snapshot

SLOPES = "y ~ x1 + x2 + (1 + x1 | g)"


def _model(case, **kw) -> MixedLM:
    return MixedLM(case.ref["formula"], case.method, **kw)


def _learn(model: MixedLM, frame: pd.DataFrame, w=None) -> MixedLM:
    X = frame.drop(columns=[c for c in ("y", "w") if c in frame.columns])
    model.learn_many(X, frame["y"], w)
    return model


def _close(a, b, rel: float) -> bool:
    """|a − b| ≤ rel·max|b|: relative to the largest entry of the vector."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return bool(np.max(np.abs(a - b)) <= rel * np.max(np.abs(b)))


def _assert_same_estimates(got: dict, want: dict, rel: float) -> None:
    """Criterion, β, σ and every group's BLUP and condVar (from ``estimates_at``)."""
    assert got["criterion"] == pytest.approx(want["criterion"], rel=rel)
    assert _close(got["fixef"], want["fixef"], rel)
    assert got["sigma"] == pytest.approx(want["sigma"], rel=rel)
    assert set(got["b"]) == set(want["b"])
    B = np.array([want["b"][k] for k in want["b"]])
    assert _close([got["b"][k] for k in want["b"]], B, rel)
    C = np.array([want["condvar"][k] for k in want["b"]])
    assert _close([got["condvar"][k] for k in want["b"]], C, rel)


def _snapshot_estimates(s: Snapshot) -> dict:
    return {
        "criterion": s.criterion,
        "fixef": np.array(list(s.fixef.values())),
        "sigma": s.sigma,
        "theta": s.theta,
        "re_cov": s.re_cov,
        "b": {k: s.b[i] for i, k in enumerate(s.keys)},
        "condvar": {k: s.condvar[i] for i, k in enumerate(s.keys)},
    }


def _assert_same_fit(got: Snapshot, want: Snapshot, rel: float) -> None:
    g, w = _snapshot_estimates(got), _snapshot_estimates(want)
    _assert_same_estimates(g, w, rel)
    assert _close(g["theta"], w["theta"], rel), (g["theta"], w["theta"])
    assert _close(g["re_cov"], w["re_cov"], rel)


# fit() ends with Newton steps on the analytic gradient, so equivalent statistics give
# fitted estimates equal to rounding (~1e-13 measured); the tolerance leaves a margin.
FIT_RTOL = 1e-9


# -- learn_many ≡ learn_one -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pub_freqweights_reml", "sleepstudy_slopes_reml"])
def test_learn_many_is_bitwise_learn_one(reference, name, helpers):
    case = reference(name)
    one, many = _model(case), _model(case)
    case.stream_one(one)
    case.stream_many(many, chunk=1000)
    S1, keys1, shift1 = helpers.active_stats(one)
    S2, keys2, shift2 = helpers.active_stats(many)
    assert keys1 == keys2
    np.testing.assert_array_equal(shift1, shift2)
    np.testing.assert_array_equal(S1, S2)
    assert one.n_events == many.n_events == len(case.data)
    s1, s2 = one.fit().snapshot(), many.fit().snapshot()
    _assert_same_fit(s1, s2, rel=0.0)


def _hospital_events(n=4_000, seed=2):
    """Events of ``y ~ age * severity + (1 + age | hospital)`` with int hospital keys; the
    level "critical" first appears after 60% of the stream, and every 50th age is an int
    (learn_one's general path takes those)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        levels = ["mild", "moderate", "severe"] + (["critical"] if i > 0.6 * n else [])
        sev = str(rng.choice(levels))
        age = float(np.round(rng.normal(50, 12), 1))
        if i % 50 == 0:
            age = int(age)
        h = int(rng.integers(0, 150))
        y = 2 + 0.03 * age + levels.index(sev) * 0.8 + 0.2 * (h % 9) + rng.normal()
        rows.append(({"hospital": h, "age": age, "severity": sev}, float(y)))
    return rows


def test_learn_one_with_factors_is_bitwise_learn_many(helpers):
    """learn_one's fast path for factors (a new level, int ages and weights go the
    general way) gives the statistics, design, reservoir and fit of learn_many, bit for
    bit."""
    formula = "y ~ age * severity + (1 + age | hospital)"
    events = _hospital_events()
    one, many = MixedLM(formula, reservoir=500), MixedLM(formula, reservoir=500)
    for x, y in events:
        one.learn_one(x, y)
    assert one._learner._fastc is not None  # the fast path for factors was in use
    X = pd.DataFrame([x for x, _ in events]).astype({"age": float})
    yy = pd.Series([y for _, y in events])
    for start in range(0, len(X), 700):
        many.learn_many(X.iloc[start : start + 700], yy.iloc[start : start + 700])
    S1, keys1, _ = helpers.active_stats(one)
    S2, keys2, _ = helpers.active_stats(many)
    assert keys1 == keys2 and one.n_events == many.n_events == len(events)
    np.testing.assert_array_equal(S1, S2)
    assert one._design.to_state() == many._design.to_state()
    assert one._design.columns[-2:] == ("severitycritical", "age:severitycritical")
    r1, r2 = one._res, many._res
    o1, o2 = np.argsort(r1.prio[: r1.size]), np.argsort(r2.prio[: r2.size])
    for name in ("prio", "count", "y", "A", "row"):
        np.testing.assert_array_equal(getattr(r1, name)[o1], getattr(r2, name)[o2])
    assert r1.n_seen == r2.n_seen
    _assert_same_fit(one.fit().snapshot(), many.fit().snapshot(), rel=0.0)


@pytest.mark.parametrize("chunk", [1, 7, 333, 10_000])
def test_learn_many_chunking_does_not_matter(reference, chunk, helpers):
    case = reference("pub_tiny_intercept_reml")
    a, b = _model(case), _model(case)
    case.stream_many(a, chunk=chunk)
    case.stream_many(b, chunk=len(case.data))
    np.testing.assert_array_equal(helpers.active_stats(a)[0], helpers.active_stats(b)[0])


@pytest.mark.parametrize("time_key", [None, "ts"])
def test_learn_many_is_bitwise_learn_one_with_forgetting(reference, time_key, helpers):
    case = reference("sleepstudy_slopes_reml")
    frame = case.data.assign(ts=np.random.default_rng(0).uniform(0, 50, len(case.data)))
    one = _model(case, half_life=20.0, time_key=time_key)
    many = _model(case, half_life=20.0, time_key=time_key)
    X = frame.drop(columns=["y"])
    for i, x in enumerate(X.to_dict("records")):
        one.learn_one(x, frame.y.iat[i])
    for start in range(0, len(frame), 64):
        many.learn_many(X.iloc[start : start + 64], frame.y.iloc[start : start + 64])
    np.testing.assert_array_equal(one._stats.active, many._stats.active)
    np.testing.assert_array_equal(one._stats.tg[:18], many._stats.tg[:18])
    assert one._stats.now == many._stats.now


# -- order ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shuffled_fits(reference):
    """pub_slopes (REML) in file order and in three shuffled orders, each fitted."""
    case = reference("pub_slopes_reml")
    fits = []
    for seed in (None, 0, 1, 2):
        frame = case.data if seed is None else case.data.sample(frac=1, random_state=seed)
        m = _learn(_model(case), frame)
        fits.append((m, m.fit().snapshot()))
    return case, fits


def test_shuffled_stream_same_estimates_at_common_theta(shuffled_fits, helpers):
    """The statistics of any order give the same criterion and estimates at any θ."""
    case, fits = shuffled_fits
    (m0, s0), rest = fits[0], fits[1:]
    for theta in (s0.theta, case.theta, np.array([1.0, 0.0, 1.0])):
        want = helpers.estimates_at(m0, theta)
        for m, _ in rest:
            _assert_same_estimates(helpers.estimates_at(m, theta), want, rel=1e-8)


def test_shuffled_stream_same_optimum_criterion(shuffled_fits):
    _, fits = shuffled_fits
    s0 = fits[0][1]
    for _, s in fits[1:]:
        assert s.criterion == pytest.approx(s0.criterion, rel=1e-8)


def test_shuffled_stream_same_fitted_estimates(shuffled_fits):
    _, fits = shuffled_fits
    s0 = fits[0][1]
    for _, s in fits[1:]:
        _assert_same_fit(s, s0, rel=FIT_RTOL)


# -- frequency weights ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weighted_and_repeated(reference):
    case = reference("pub_freqweights_reml")
    weighted = _learn(_model(case), case.data, case.w)
    expanded = case.data.loc[case.data.index.repeat(case.data.w)].reset_index(drop=True)
    repeated = _learn(_model(case), expanded)
    return case, weighted, repeated


def test_frequency_weights_equal_repeated_rows_statistics(weighted_and_repeated, helpers):
    _, weighted, repeated = weighted_and_repeated
    a, b = helpers.stats_by_key(weighted), helpers.stats_by_key(repeated)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-12 * np.abs(a[key]).max())
    assert weighted._stats.n_obs == repeated._stats.n_obs == 5005


def test_frequency_weights_equal_repeated_rows_at_common_theta(weighted_and_repeated, helpers):
    case, weighted, repeated = weighted_and_repeated
    for theta in (case.theta, np.array([0.5, -0.3, 1.2])):
        _assert_same_estimates(
            helpers.estimates_at(weighted, theta), helpers.estimates_at(repeated, theta), 1e-8
        )


def test_frequency_weights_equal_repeated_rows_fitted(weighted_and_repeated):
    _, weighted, repeated = weighted_and_repeated
    _assert_same_fit(weighted.fit().snapshot(), repeated.fit().snapshot(), rel=FIT_RTOL)


def test_zero_weight_changes_nothing(reference, helpers):
    case = reference("sleepstudy_slopes_reml")
    m = _learn(_model(case), case.data)
    before = helpers.model_state(m)
    m.learn_one({"g": "new", "x1": 1.0}, 3.0, w=0.0)
    m.learn_many(case.features.iloc[:3], case.y.iloc[:3], pd.Series([0.0, 0.0, 0.0]))
    assert helpers.model_state(m) == before


# -- forgetting -------------------------------------------------------------------------------------
def _forgetting_pair(case, ts, h):
    """A forgetting model fed times ``ts``; an unforgetting one fed w·2^(−(T−ts)/h)."""
    frame = case.data.assign(ts=ts)
    forgetting = _learn(_model(case, half_life=h, time_key="ts"), frame)
    weights = pd.Series(2.0 ** (-(np.max(ts) - ts) / h))
    explicit = _learn(_model(case), case.data, weights)
    return forgetting, explicit


@pytest.mark.parametrize("ordered", [True, False], ids=["in-order", "out-of-order"])
def test_half_life_equals_explicit_decayed_weights(reference, helpers, ordered):
    case = reference("pub_slopes_reml")
    rng = np.random.default_rng(7)
    ts = rng.uniform(0, 2000, len(case.data))
    ts = np.sort(ts) if ordered else ts
    forgetting, explicit = _forgetting_pair(case, ts, h=400.0)
    forgetting._stats.decay_to_now()
    a, b = helpers.stats_by_key(forgetting), helpers.stats_by_key(explicit)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-12 * np.abs(b[key]).max())
    theta = explicit.fit().snapshot().theta
    _assert_same_estimates(
        helpers.estimates_at(forgetting, theta), helpers.estimates_at(explicit, theta), 1e-8
    )
    s_f, s_e = forgetting.fit().snapshot(), explicit.fit().snapshot()
    assert s_f.n_obs == pytest.approx(s_e.n_obs, rel=1e-12)
    assert s_f.criterion == pytest.approx(s_e.criterion, rel=1e-8)


@pytest.mark.parametrize("ordered", [True, False], ids=["in-order", "out-of-order"])
def test_half_life_equals_explicit_decayed_weights_fitted(reference, ordered):
    case = reference("pub_slopes_reml")
    ts = np.random.default_rng(7).uniform(0, 2000, len(case.data))
    ts = np.sort(ts) if ordered else ts
    forgetting, explicit = _forgetting_pair(case, ts, h=400.0)
    _assert_same_fit(forgetting.fit().snapshot(), explicit.fit().snapshot(), rel=FIT_RTOL)


def test_half_life_default_time_is_the_event_count(reference, helpers):
    case = reference("sleepstudy_slopes_reml")
    h = 30.0
    forgetting = _model(case, half_life=h)
    case.stream_one(forgetting)
    n = len(case.data)
    weights = pd.Series(2.0 ** (-(n - np.arange(1, n + 1)) / h))
    explicit = _learn(_model(case), case.data, weights)
    forgetting._stats.decay_to_now()
    a, b = helpers.stats_by_key(forgetting), helpers.stats_by_key(explicit)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-12 * np.abs(b[key]).max())


def test_forgetting_prediction_uses_decayed_statistics(reference):
    """predict_one decays the group to "now" before its BLUP, without a refit: the BLUP of
    the weighted marginal model V = diag(1/w) + ZDZ' with w = 2^(−(now − ts)/h)."""
    case = reference("sleepstudy_slopes_reml")
    h = 200.0
    frame = case.data.assign(ts=np.arange(len(case.data), dtype=float))
    forgetting = _learn(_model(case, half_life=h, time_key="ts"), frame)
    s = forgetting.fit().snapshot()
    beta = np.array(list(s.fixef.values()))
    D = s.re_cov / s.sigma**2
    rows = frame[frame.g == "308"]
    Z = np.column_stack([np.ones(len(rows)), rows.x1])
    z = np.array([1.0, 4.0])

    def expected(now: float) -> float:
        V = np.diag(2.0 ** ((now - rows.ts.to_numpy()) / h)) + Z @ D @ Z.T
        b = D @ Z.T @ np.linalg.solve(V, rows.y.to_numpy() - Z @ beta)
        return float(z @ beta + z @ b)

    x = {"g": "308", "x1": 4.0, "ts": 0.0}
    before = forgetting.predict_one(x)
    assert before == pytest.approx(expected(frame.ts.max()), rel=1e-10)
    # a later event in another group moves "now": group 308 is decayed further
    forgetting.learn_one({"g": "309", "x1": 1.0, "ts": 300.0}, 250.0)
    after = forgetting.predict_one(x)
    assert forgetting.n_refits == 1 and forgetting.n_em_steps == 0
    assert after != before
    assert after == pytest.approx(expected(300.0), rel=1e-10)


# -- predictions are always current ------------------------------------------------------------------
def test_predict_one_moves_with_each_event_by_the_recomputed_blup(reference, dense_lmm):
    case = reference("sleepstudy_slopes_reml")
    m = _learn(_model(case), case.data)
    s = m.fit().snapshot()
    refits, ems = m.n_refits, m.n_em_steps
    x = {"g": "308", "x1": 5.0}
    p0 = m.predict_one(x)
    m.learn_one({"g": "308", "x1": 3.0}, 400.0)
    p1 = m.predict_one(x)
    assert (m.n_refits, m.n_em_steps) == (refits, ems)  # no refit, no EM step
    assert p1 != p0
    # independent: the dense BLUP of the group's raw rows at the unchanged parameters
    f = case.formula
    rows = case.data[case.data.g == "308"]
    rows = pd.concat([rows, pd.DataFrame({"g": ["308"], "x1": [3.0], "x2": [0.0], "y": [400.0]})])
    dense = dense_lmm.from_frame(f, rows)
    beta = np.array(list(s.fixef.values()))
    D = np.asarray(s.re_cov) / s.sigma**2
    for data, pred in ((rows.iloc[:-1], p0), (rows, p1)):
        Xg = np.column_stack([np.ones(len(data)), data.x1])
        V = np.eye(len(data)) + Xg @ D @ Xg.T
        b = D @ Xg.T @ np.linalg.solve(V, data.y.to_numpy() - Xg @ beta)
        assert pred == pytest.approx(beta @ [1, 5.0] + b @ [1, 5.0], rel=1e-10)
    assert dense.n == len(rows)


def test_new_group_starts_at_the_fixed_part_then_moves(reference):
    case = reference("sleepstudy_slopes_reml")
    m = _learn(_model(case), case.data)
    s = m.fit().snapshot()
    x = {"g": "new", "x1": 2.0}
    fixed = s.fixef["(Intercept)"] + 2.0 * s.fixef["x1"]
    assert m.predict_one(x) == pytest.approx(fixed, rel=1e-12)
    m.learn_one({"g": "new", "x1": 2.0}, fixed + 100.0)
    assert m.predict_one(x) > fixed + 1.0


def test_predict_many_equals_predict_one(reference):
    case = reference("sleepstudy_slopes_reml")
    m = _learn(_model(case), case.data)
    m.fit()
    X = pd.DataFrame({"g": ["308", "309", "zzz", "372"], "x1": [0.0, 3.5, 1.0, 9.0]})
    many = m.predict_many(X)
    assert list(many.index) == list(X.index)
    for i, x in enumerate(X.to_dict("records")):
        assert many.iloc[i] == pytest.approx(m.predict_one(x), rel=1e-12)


def test_predict_before_learning_is_zero():
    assert MixedLM(SLOPES).predict_one({"g": "a", "x1": 1.0, "x2": 2.0}) == 0.0


# -- resuming from a snapshot -----------------------------------------------------------------------
@pytest.mark.parametrize("through_bytes", [False, True])
@pytest.mark.parametrize("half_life", [None, 500.0])
def test_from_snapshot_continues_exactly(reference, helpers, through_bytes, half_life):
    case = reference("pub_slopes_reml")
    frame = case.data.assign(ts=np.arange(len(case.data), dtype=float))
    kw = {"half_life": half_life, "time_key": "ts" if half_life else None}
    first, rest = frame.iloc[:2000], frame.iloc[2000:]
    part = _learn(_model(case, **kw), first)
    snap = part.fit().snapshot()
    if through_bytes:
        snap = Snapshot.from_bytes(snap.to_bytes())
    resumed = MixedLM.from_snapshot(snap)
    x = {"g": "g1", "x1": 0.3, "x2": -1.0, "ts": 1999.0}
    assert resumed.predict_one(x) == pytest.approx(part.predict_one(x), rel=1e-12)
    _learn(resumed, rest)
    whole = _learn(_model(case, **kw), frame)
    Sa, keys_a, shift_a = helpers.active_stats(resumed)
    Sb, keys_b, shift_b = helpers.active_stats(whole)
    assert keys_a == keys_b and resumed.n_events == whole.n_events
    np.testing.assert_array_equal(shift_a, shift_b)
    np.testing.assert_allclose(Sa, Sb, rtol=1e-12, atol=1e-12)
    if half_life:
        np.testing.assert_array_equal(
            resumed._stats.tg[: len(keys_a)], whole._stats.tg[: len(keys_b)]
        )
        assert resumed._stats.now == whole._stats.now


# -- merging snapshots --------------------------------------------------------------------------
def _factor_shards(seed=3):
    """Two shards of a stream with a factor: shard A meets "moderate" first (its reference
    level), shard B "severe" first, and only B has "critical"; the groups are disjoint."""
    rng = np.random.default_rng(seed)
    effect = {"mild": 0.0, "moderate": 1.0, "severe": 2.5, "critical": 4.0}
    shards = []
    for lo, first, levels in (
        (0, "moderate", ["mild", "moderate", "severe"]),
        (20, "severe", ["mild", "moderate", "severe", "critical"]),
    ):
        rows = []
        for i in range(1500):
            g = lo + int(rng.integers(0, 20))
            sev = first if i == 0 else str(rng.choice(levels))
            x1 = float(rng.normal(50, 10))
            y = 3 + 0.1 * x1 + effect[sev] * (1 + 0.01 * x1) + 0.3 * (g % 7) + rng.normal()
            rows.append(({"g": f"h{g}", "x1": x1, "severity": sev}, float(y)))
        shards.append(rows)
    return shards


MERGE_FORMULA = "y ~ x1 * severity + (1 + x1 | g)"


def _merged_and_whole(formula=MERGE_FORMULA, **kw):
    shards = _factor_shards()
    parts = []
    for i, rows in enumerate(shards):
        m = MixedLM(formula, **kw)
        for x, y in rows:
            m.learn_one(x, y)
        parts.append(m.snapshot(offsets={f"events:{i}": len(rows)}))
    whole = MixedLM(formula, **kw)  # one model over both shards: A's levels come first
    for x, y in shards[0] + shards[1]:
        whole.learn_one(x, y)
    return parts, MixedLM.from_snapshots(parts), whole


def test_snapshots_of_shards_with_other_reference_levels_merge_exactly(helpers):
    """Shards met the factor's levels in other orders, so their union columns differ in
    order, in the levels they hold and in the reference level; the merged statistics are
    those of one model over every event (the first shard's reference level)."""
    parts, merged, whole = _merged_and_whole()
    assert parts[0].state["design"]["levels"]["severity"][0] == "moderate"
    assert parts[1].state["design"]["levels"]["severity"][0] == "severe"
    assert merged._design.fixed == whole._design.fixed
    assert merged._design.factors == whole._design.factors
    assert merged.n_events == whole.n_events == 3000
    theta = np.array([1.5, 0.01, 0.02])
    want = helpers.estimates_at(whole, theta)
    _assert_same_estimates(helpers.estimates_at(merged, theta), want, rel=1e-9)
    got, ref = merged.fit().snapshot(), whole.fit().snapshot()
    assert list(got.fixef) == list(ref.fixef)
    _assert_same_fit(got, ref, rel=FIT_RTOL)
    # and the merged model keeps learning in the merged columns
    x = {"g": "h3", "x1": 47.0, "severity": "critical"}
    merged.learn_one(x, 9.0)
    whole.learn_one(x, 9.0)
    _assert_same_estimates(
        helpers.estimates_at(merged, theta), helpers.estimates_at(whole, theta), rel=1e-9
    )


def test_merge_refuses_fields_of_other_kinds():
    a, b = MixedLM("y ~ f + (1 | g)"), MixedLM("y ~ f + (1 | g)")
    a.learn_one({"g": "a", "f": "lo"}, 1.0)
    b.learn_one({"g": "b", "f": 2.0}, 1.0)
    snaps = [a.snapshot(offsets={"t:0": 1}), b.snapshot(offsets={"t:1": 1})]
    with pytest.raises(ValueError, match="field 'f' is factor in one snapshot and numeric"):
        MixedLM.from_snapshots(snaps)


def test_the_same_snapshot_twice_is_refused_not_counted_twice():
    parts, _, _ = _merged_and_whole("y ~ x1 + (1 | g)")
    with pytest.raises(
        ValueError, match="snapshots 0 and 1 both hold events of Kafka partition 'events:0'"
    ):
        MixedLM.from_snapshots([parts[0], parts[0]])
    # the caller's word overrides the offsets (e.g. two clusters with one topic name)
    doubled = MixedLM.from_snapshots([parts[0], parts[0]], disjoint=True)
    assert doubled.n_events == 2 * parts[0].n_events


def test_snapshots_without_offsets_merge_only_when_said_disjoint():
    a, b = MixedLM("y ~ x1 + (1 | g)"), MixedLM("y ~ x1 + (1 | g)")
    a.learn_one({"g": "a", "x1": 1.0}, 1.0)
    b.learn_one({"g": "b", "x1": 2.0}, 3.0)
    with pytest.raises(ValueError, match="snapshot 0 records no source offsets.*disjoint=True"):
        MixedLM.from_snapshots([a.snapshot(), b.snapshot()])
    assert MixedLM.from_snapshots([a.snapshot(), b.snapshot()], disjoint=True).n_events == 2


def test_from_snapshot_without_state_raises(reference):
    case = reference("sleepstudy_slopes_reml")
    s = _learn(_model(case), case.data).fit().snapshot()
    stateless = Snapshot(**{**_snapshot_kwargs(s), "state": None})
    with pytest.raises(ValueError, match="state"):
        MixedLM.from_snapshot(stateless)


def _snapshot_kwargs(s: Snapshot) -> dict:
    return dict(
        formula=s.formula,
        method=s.method,
        fixef=s.fixef,
        fixef_se=s.fixef_se,
        re_cov=s.re_cov,
        sigma=s.sigma,
        theta=s.theta,
        criterion=s.criterion,
        n_obs=s.n_obs,
        singular=s.singular,
        converged=s.converged,
        n_events=s.n_events,
        keys=s.keys,
        b=s.b,
        condvar=s.condvar,
        offsets=s.offsets,
        meta=s.meta,
        state=s.state,
    )


# -- bad input ------------------------------------------------------------------------------------------
@pytest.fixture
def trained():
    m = MixedLM(SLOPES)
    rng = np.random.default_rng(3)
    for i in range(60):
        m.learn_one({"g": f"k{i % 6}", "x1": rng.normal(), "x2": rng.normal()}, rng.normal())
    m.fit()
    return m


GOOD = {"g": "k1", "x1": 0.5, "x2": -0.25}
BAD_ONE = [
    ("missing target", GOOD, None, 1.0, "y"),
    ("NaN target", GOOD, math.nan, 1.0, "y"),
    ("inf target", GOOD, math.inf, 1.0, "y"),
    ("missing feature", {"g": "k1", "x1": 0.5}, 1.0, 1.0, "x2"),
    ("NaN feature", {**GOOD, "x1": math.nan}, 1.0, 1.0, "x1"),
    ("inf feature", {**GOOD, "x2": -math.inf}, 1.0, 1.0, "x2"),
    ("string feature", {**GOOD, "x1": "1.0"}, 1.0, 1.0, "x1"),
    ("bool feature", {**GOOD, "x2": True}, 1.0, 1.0, "x2"),
    ("missing group", {"x1": 0.5, "x2": 1.0}, 1.0, 1.0, "g"),
    ("None group", {**GOOD, "g": None}, 1.0, 1.0, "g"),
    ("float group", {**GOOD, "g": 1.5}, 1.0, 1.0, "g"),
    ("list group", {**GOOD, "g": ["k1"]}, 1.0, 1.0, "g"),
    ("dict group", {**GOOD, "g": {"k": 1}}, 1.0, 1.0, "g"),
    ("bool group", {**GOOD, "g": True}, 1.0, 1.0, "g"),
    ("negative weight", GOOD, 1.0, -1.0, "w"),
    ("NaN weight", GOOD, 1.0, math.nan, "w"),
]


@pytest.mark.parametrize("label, x, y, w, field", BAD_ONE, ids=[b[0] for b in BAD_ONE])
def test_learn_one_rejects_bad_input_and_changes_nothing(trained, helpers, label, x, y, w, field):
    before = helpers.model_state(trained)
    with pytest.raises(ValueError, match=f"'{field}'"):
        trained.learn_one(x, y, w=w)
    assert helpers.model_state(trained) == before


BAD_MANY = [
    ("x1", math.nan),
    ("x1", None),
    ("x2", math.inf),
    ("x1", "1.0"),
    ("x2", True),
    ("g", None),
    ("g", 1.5),
    ("g", ["a"]),
    ("g", {"a": 1}),
    ("y", math.nan),
    ("y", None),
    ("w", -2.0),
]


def _batch(n=20, seed=4):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(
        {"g": [f"k{i % 7}" for i in range(n)], "x1": rng.normal(size=n), "x2": rng.normal(size=n)}
    )
    return X, pd.Series(rng.normal(size=n)), pd.Series(np.ones(n))


@pytest.mark.parametrize("field, value", BAD_MANY, ids=[f"{f}={v!r}" for f, v in BAD_MANY])
def test_learn_many_rejects_a_bad_row_and_changes_nothing(trained, helpers, field, value):
    X, y, w = _batch()
    col = {"y": y, "w": w}.get(field, X.get(field))
    col = col.astype(object)
    col.iat[13] = value
    if field in X:
        X[field] = col
    elif field == "y":
        y = col
    else:
        w = col
    before = helpers.model_state(trained)
    with pytest.raises(ValueError, match=f"'{field}'") as info:
        trained.learn_many(X, y, w)
    assert "row 13" in str(info.value)
    assert helpers.model_state(trained) == before


def test_learn_many_takes_y_and_w_as_lists_tuples_or_arrays():
    X, y, w = _batch()
    ref = MixedLM(SLOPES)
    ref.learn_many(X, y, w * 2.0)
    for yy, ww in [
        (y.tolist(), (w * 2.0).tolist()),
        (tuple(y), tuple(w * 2.0)),
        (y.to_numpy(), (w * 2.0).to_numpy()),
    ]:
        m = MixedLM(SLOPES)
        m.learn_many(X, yy, ww)
        assert m.n_events == ref.n_events
        np.testing.assert_array_equal(m._stats.M, ref._stats.M)


@pytest.mark.parametrize(
    "y, words",
    [
        ([1.0, 2.0], "y has 2 values; expected 20, one per row of X"),
        ([[1.0]] * 20, r"y has shape \(20, 1\); expected 20"),
        ("12345678901234567890", "y must be a Series, a 1-d array or a list .* got str"),
        ({"a": 1.0}, "y must be a Series, a 1-d array or a list .* got dict"),
        (3.0, "y must be a Series, a 1-d array or a list .* got float"),
        ([[1.0, 2.0], [3.0]] * 10, "y is not a 1-d sequence of values"),
    ],
)
def test_learn_many_refuses_a_y_of_the_wrong_shape_clearly(trained, helpers, y, words):
    X, _, _ = _batch()
    before = helpers.model_state(trained)
    with pytest.raises(ValueError, match=words):
        trained.learn_many(X, y)
    with pytest.raises(ValueError, match=words.replace("y ", "w ", 1).replace("^y", "^w")):
        trained.learn_many(X, np.ones(20), y)
    assert helpers.model_state(trained) == before


def test_learn_many_missing_column_changes_nothing(trained, helpers):
    X, y, _ = _batch()
    before = helpers.model_state(trained)
    with pytest.raises(ValueError, match="'x2'"):
        trained.learn_many(X.drop(columns=["x2"]), y)
    assert helpers.model_state(trained) == before


def test_skip_policy_drops_and_counts_missing_rows(helpers):
    X, y, _ = _batch(30)
    X = X.astype({"x1": object, "g": object})
    y = y.copy()
    X.loc[3, "x1"] = None  # the first event of group k3
    X.loc[5, "x2"] = math.nan
    X.loc[8, "g"] = None
    y.iloc[11] = math.nan
    skipping = MixedLM(SLOPES, missing="skip")
    skipping.learn_many(X, y)
    assert skipping.n_skipped == 4
    skipping.learn_one({"g": "k1", "x1": 1.0}, 2.0)  # x2 missing
    skipping.learn_one({"g": "k1", "x1": 1.0, "x2": 1.0}, None)  # y missing
    assert skipping.n_skipped == 6
    good = [i for i in range(30) if i not in (3, 5, 8, 11)]
    clean = MixedLM(SLOPES)
    clean.learn_many(X.iloc[good].astype({"x1": float}), y.iloc[good])
    S_skip, keys_skip, _ = helpers.active_stats(skipping)
    S_clean, keys_clean, _ = helpers.active_stats(clean)
    assert keys_skip == keys_clean  # rows in the order of the first kept event
    np.testing.assert_array_equal(S_skip, S_clean)
    assert skipping.n_events == clean.n_events == len(good)


def test_learn_many_equals_learn_one_with_skipped_and_zero_weight_rows(helpers):
    """Rows dropped by missing="skip" or carrying w = 0 create no group and shift nothing."""
    X, y, w = _batch(40, seed=9)
    X = X.astype({"x1": object})
    X.loc[0, "x1"] = None  # the very first event is skipped
    w.iloc[[1, 2, 17]] = 0.0  # zero weights, two of them first events of their group
    w.iloc[5] = 3.0
    many = MixedLM(SLOPES, missing="skip")
    many.learn_many(X, y, w)
    one = MixedLM(SLOPES, missing="skip")
    for i, x in enumerate(X.to_dict("records")):
        one.learn_one(x, y.iat[i], w=w.iat[i])
    assert helpers.active_stats(one)[1] == helpers.active_stats(many)[1]
    np.testing.assert_array_equal(helpers.active_stats(one)[2], helpers.active_stats(many)[2])
    np.testing.assert_array_equal(helpers.active_stats(one)[0], helpers.active_stats(many)[0])
    assert (one.n_events, one.n_skipped) == (many.n_events, many.n_skipped) == (36, 1)


def test_skip_policy_still_rejects_wrong_types(helpers):
    m = MixedLM(SLOPES, missing="skip")
    with pytest.raises(ValueError, match="'x1'"):
        m.learn_one({"g": "a", "x1": "1", "x2": 0.0}, 1.0)
    with pytest.raises(ValueError, match="'g'"):
        m.learn_one({"g": 2.5, "x1": 1.0, "x2": 0.0}, 1.0)
    assert m.n_skipped == 0 and m.n_events == 0


def test_predict_one_with_missing_feature_raises(trained):
    with pytest.raises(ValueError, match="'x2'"):
        trained.predict_one({"g": "k1", "x1": 0.5})
    with pytest.raises(ValueError, match="'x1'"):
        trained.predict_one({"g": "k1", "x1": math.nan, "x2": 0.0})


def test_predict_one_with_missing_feature_under_skip_uses_reference_value():
    m = MixedLM("y ~ x1 + (1 | g)", missing="skip")
    for i in range(30):
        m.learn_one({"g": i % 3, "x1": float(i)}, 2.0 * i + i % 3)
    m.fit()
    centre_x1 = m._par.c[1]  # the fit's centre: the median of the group means of x1
    assert centre_x1 == pytest.approx(np.median([13.5, 14.5, 15.5]))
    assert m.predict_one({"g": 1}) == pytest.approx(m.predict_one({"g": 1, "x1": centre_x1}))


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"method": "OLS"}, "method"),
        ({"missing": "ignore"}, "missing"),
        ({"em_every": 0}, "em_every"),
        ({"refit_every": 1.5}, "refit_every"),
        ({"half_life": -1.0}, "half_life"),
        ({"formula": "y ~ x"}, "random-effects"),
    ],
)
def test_invalid_parameters_raise(kw, words):
    with pytest.raises(ValueError, match=words):
        MixedLM(**{"formula": SLOPES, **kw})


# -- numerics ----------------------------------------------------------------------------------------
def test_large_offsets_do_not_change_the_fit(reference):
    """x1 + 1e4 and y + 1e6: same σ, slope variance and criterion (docs/math.md §6)."""
    case = reference("pub_slopes_reml")
    plain = _learn(_model(case), case.data).fit().snapshot()
    shifted_data = case.data.assign(x1=case.data.x1 + 1e4, y=case.data.y + 1e6)
    shifted = _learn(_model(case), shifted_data).fit().snapshot()
    assert shifted.sigma == pytest.approx(plain.sigma, rel=1e-6)
    assert shifted.re_cov[1, 1] == pytest.approx(plain.re_cov[1, 1], rel=1e-6)
    assert shifted.criterion == pytest.approx(plain.criterion, rel=1e-6)
    assert shifted.fixef["x1"] == pytest.approx(plain.fixef["x1"], rel=1e-6)
    assert not shifted.singular


# -- the refresh schedule ---------------------------------------------------------------------------
def test_refresh_schedule_runs_refits_and_em_steps(reference):
    case = reference("sleepstudy_slopes_reml")
    m = _model(case, em_every=10, refit_every=50)
    x = {"g": "308", "x1": 1.0}
    for i, row in enumerate(case.records()):
        m.learn_one(row, case.y.iat[i])
        m.predict_one(x)
    assert m.n_refits >= 3 and m.n_em_steps >= 3
    assert m.last_refit["ok"] and m.last_refit["n_events"] <= m.n_events


def test_scaled_residual_quantiles_are_close_to_normal():
    """On data drawn from the model, the reservoir's quartiles of (y − ŷ)/σ are near the
    standard normal's ±0.674 and its median near 0 (both learning paths)."""
    rng = np.random.default_rng(11)
    n, G = 40_000, 200
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=G)[g] + rng.normal(size=n)
    X = pd.DataFrame({"g": g, "x": x})
    many = MixedLM("y ~ x + (1 | g)")
    one = MixedLM("y ~ x + (1 | g)")
    ys = pd.Series(y)
    for start in range(0, n, 2_000):
        many.learn_many(X.iloc[start : start + 2_000], ys.iloc[start : start + 2_000])
        if start == 0:
            many.fit()  # residuals are sampled once there are parameters
    for i, row in enumerate(X.iloc[:20_000].to_dict("records")):
        one.learn_one(row, y[i])
        if i == 2_000:
            one.fit()
    for m in (many, one):
        q = m.fit().snapshot().resid_quantiles
        assert set(q) == {"min", "1Q", "median", "3Q", "max", "events", "of"}
        assert q["events"] == 10_000 and q["of"] == m.n_events  # a 10,000-event sample
        assert q["min"] < q["1Q"] < q["median"] < q["3Q"] < q["max"]
        assert abs(q["median"]) < 0.1
        assert q["1Q"] == pytest.approx(-0.674, abs=0.1)
        assert q["3Q"] == pytest.approx(0.674, abs=0.1)


def test_predict_one_fast_path_equals_the_kernel():
    """The cached per-group coefficients give the kernel's prediction, also right after
    the group learns (its entry dropped) and after new parameters (cache dropped)."""
    rng = np.random.default_rng(3)
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    for _ in range(3_000):
        g = int(rng.integers(0, 40))
        x = {"g": g, "x1": float(rng.normal()), "x2": float(rng.normal())}
        m.learn_one(x, 1.0 + 0.1 * g + x["x1"] * (0.5 + 0.01 * g) - x["x2"] + float(rng.normal()))
    m.fit()

    def kernel(x):
        a = m._reader.features(x, impute=False).copy()
        return m._predict_union(a, m._group_row(x))

    for trial in range(3):
        for g in [0, 5, 39, 1000, "new"]:
            x = {"g": g, "x1": 0.3 * trial - 0.2, "x2": 1.5}
            got = m.predict_one(x)
            assert m._pred.fast is not None
            assert got == pytest.approx(kernel(x), rel=1e-12, abs=1e-12)
        m.learn_one({"g": 5, "x1": 2.0, "x2": 0.0}, 9.0)  # group 5 changes
        if trial == 1:
            m.fit()  # new parameters
