"""predict_one's per-group coefficient cache: every change of a group's statistics, of
the parameters, of the design or of the refresh schedule must drop what it cached.

Each test predicts (filling the cache), changes something, and compares the next
prediction bitwise with a *fresh* one: a copy of the model whose cache is emptied
first, so it recomputes every coefficient from the current statistics.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM

SLOPES = "y ~ x1 + x2 + (1 + x1 | g)"


def _events(n: int, groups: int, seed: int = 3) -> list[tuple[dict, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = int(rng.integers(0, groups))
        x = {"g": g, "x1": float(rng.normal()), "x2": float(rng.normal())}
        y = 1.0 + 0.1 * g + x["x1"] * (0.5 + 0.01 * g) - x["x2"] + float(rng.normal())
        out.append((x, y))
    return out


def _trained(**kw) -> MixedLM:
    """A fitted model of the plain numeric formula (predict_one's fast path applies),
    with no refresh due for a while."""
    m = MixedLM(SLOPES, refit_every=10**9, em_every=10**9, **kw)
    for x, y in _events(3_000, 40):
        m.learn_one(x, y)
    return m.fit()


def _fresh(m: MixedLM, x: dict) -> float:
    """``x``'s prediction by a copy of ``m`` that recomputes its coefficients."""
    c = copy.deepcopy(m)
    c._pred.drop()
    c.predict_one(x)  # the kernel, and the fast path's layout
    return c.predict_one(x)  # the coefficients, computed afresh


def _kernel(m: MixedLM, x: dict) -> float:
    a = m._reader.features(x, impute=False).copy()
    return m._predict_union(a, m._group_row(x))


X5 = {"g": 5, "x1": 0.7, "x2": -0.4}


def _current(m: MixedLM, x: dict = X5) -> float:
    """``x``'s prediction, checked against the kernel and (bitwise, once the fast path
    is rebuilt) against a fresh copy's coefficients."""
    p = m.predict_one(x)
    assert p == pytest.approx(_kernel(m, x), rel=1e-12)
    assert m.predict_one(x) == _fresh(m, x)
    return p


def _cached(m: MixedLM, x: dict = X5) -> float:
    """Predict ``x`` twice, so its group's coefficients are cached; check the cache."""
    m.predict_one(x)
    p = m.predict_one(x)
    assert m._pred.fast is not None and x["g"] in m._pred.coefs
    assert p == pytest.approx(_kernel(m, x), rel=1e-12, abs=1e-12)
    return p


@pytest.mark.parametrize(
    "learn",
    [
        pytest.param(lambda m: m.learn_one({"g": 5, "x1": 2.0, "x2": 0.0}, 9.0), id="learn_one"),
        pytest.param(
            lambda m: m.learn_one({"g": 5, "x1": 2.0, "x2": 0.0}, 9.0, w=2.0),
            id="learn_one-weighted",
        ),
        pytest.param(lambda m: m.learn_one({"g": 5, "x1": 2, "x2": 0}, 9), id="learn_one-ints"),
        pytest.param(
            lambda m: m.learn_many(
                pd.DataFrame({"g": [7, 5], "x1": [1.0, 2.0], "x2": [0.0, 0.5]}),
                pd.Series([3.0, 9.0]),
            ),
            id="learn_many",
        ),
        pytest.param(
            lambda m: m.learn_batch(
                [5], np.array([[1.0, 2.0, 0.0]]), np.array([9.0]), np.array([1.0])
            ),
            id="learn_batch",
        ),
        pytest.param(
            lambda m: m.learn_coded(
                [7, 5],
                np.array([0, 1]),
                np.array([[1.0, 1.0, 0.0], [1.0, 2.0, 0.5]]),
                np.array([3.0, 9.0]),
                np.array([1.0, 1.0]),
            ),  # fmt: skip
            id="learn_coded",
        ),
    ],
)
def test_learning_an_event_drops_the_groups_coefficients(learn):
    m = _trained()
    other = {"g": 6, "x1": 0.1, "x2": 0.2}
    before, before_other = _cached(m), _cached(m, other)
    learn(m)
    assert _current(m) != before
    assert m.predict_one(other) == before_other == _fresh(m, other)


def test_learn_many_with_many_groups_drops_every_touched_group():
    """A batch touching more groups than are cached clears the whole cache."""
    m = _trained()
    xs = [{"g": g, "x1": 0.3, "x2": 0.1} for g in range(3)]
    for x in xs:
        _cached(m, x)
    X = pd.DataFrame({"g": np.arange(40), "x1": np.ones(40), "x2": np.zeros(40)})
    m.learn_many(X, pd.Series(np.full(40, 50.0)))
    for x in xs:
        _current(m, x)


@pytest.mark.parametrize("step", ["fit", "em_step"])
def test_new_parameters_drop_every_coefficient(step):
    m = _trained()
    before = _cached(m)
    m.learn_one({"g": 9, "x1": 1.0, "x2": 1.0}, 30.0)  # another group: new data to fit
    getattr(m, step)()
    assert _current(m) != before
    unseen = {"g": "never", "x1": 0.7, "x2": -0.4}
    assert m.predict_one(unseen) == pytest.approx(_kernel(m, unseen), rel=1e-12)


def test_a_scheduled_refresh_runs_before_the_cache_is_used():
    """With a refit due, predict_one refreshes (as without a cache) and the cached
    coefficients of the old parameters are not used."""
    m = MixedLM(SLOPES, refit_every=10, em_every=10**9)
    events = _events(3_000, 40)
    for x, y in events:
        m.learn_one(x, y)
    m.fit()
    before = _cached(m)
    refits = m.n_refits
    for x, y in _events(10, 40, seed=4):  # other groups' events: group 5 may be untouched
        if x["g"] != 5:
            m.learn_one(x, y)
    while m.n_events < m._schedule.next_refit:
        m.learn_one({"g": 6, "x1": 0.0, "x2": 0.0}, 1.0)
    assert _current(m) != before
    assert m.n_refits == refits + 1


def test_a_failed_refit_moves_the_horizon(monkeypatch):
    """A refit whose result is not adopted keeps the parameters but is retried at the
    next event: the fast path must stop there, not where it was built to stop."""
    m = _trained()
    _cached(m)
    monkeypatch.setattr(m, "_adopt", lambda *a: False)
    m.fit()
    assert m._schedule.next_refit == m.n_events + 1
    _cached(m)
    monkeypatch.undo()
    m.learn_one({"g": 6, "x1": 0.0, "x2": 0.0}, 1.0)
    refits = m.n_refits
    m.predict_one(X5)
    assert m.n_refits == refits + 1


def test_forgetting_moves_every_groups_prediction():
    """Under a half-life each event moves "now", so every group's BLUP decays: an event
    of another group changes this one's prediction (no cache may hide that)."""
    m = _trained(half_life=500.0)
    before = m.predict_one(X5)
    assert m.predict_one(X5) == before
    m.learn_one({"g": 6, "x1": 0.0, "x2": 0.0}, 1.0)
    after = m.predict_one(X5)
    assert after != before
    assert after == _kernel(m, X5)


def test_a_new_factor_level_widens_and_drops_the_cache():
    m = MixedLM("y ~ x1 + f + (1 + x1 | g)", refit_every=10**9, em_every=10**9)
    rng = np.random.default_rng(5)
    for i in range(2_000):
        x = {"g": i % 30, "x1": float(rng.normal()), "f": "ab"[i % 2]}
        m.learn_one(x, float(rng.normal()) + (i % 30) * 0.1 + (x["f"] == "b"))
    m.fit()
    x = {"g": 4, "x1": 0.5, "f": "a"}
    before = m.predict_one(x)
    assert m.predict_one(x) == before
    m.learn_one({"g": 4, "x1": 0.5, "f": "c"}, 40.0)  # a new level: the design widens
    after = m.predict_one(x)
    assert after != before
    assert after == _kernel(m, x)


def test_loading_other_statistics_drops_the_cache():
    m = _trained()
    before = _cached(m)
    other = MixedLM(SLOPES)
    for x, y in _events(2_000, 40, seed=8):
        other.learn_one(x, 3.0 * y)
    m.load_statistics(other._design, other._stats, other.n_events)
    m.fit()
    assert _current(m) != before


def test_merged_snapshots_predict_from_the_merged_statistics():
    a, b = _trained(), MixedLM(SLOPES)
    _cached(a)
    for x, y in _events(500, 40, seed=9):
        b.learn_one(x, y + 5.0)
    b.fit()
    m = MixedLM.from_snapshots([a.snapshot(), b.snapshot()], disjoint=True)
    _current(m)


@pytest.mark.parametrize("key", [np.int64(5), 5.0, np.float64(5.0)])
def test_integer_valued_keys_name_the_same_group_with_the_cache(key):
    m = _trained()
    want = _cached(m)
    assert m.predict_one({**X5, "g": key}) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("key", [True, np.True_, 1.5, "k" * 300, [5]])
def test_mistyped_keys_raise_with_the_cache(key):
    m = _trained()
    _cached(m, {**X5, "g": 1})
    with pytest.raises(ValueError, match="'g'"):
        m.predict_one({**X5, "g": key})


@pytest.mark.parametrize(
    "value, error",
    [(None, "missing"), (float("nan"), "NaN"), (float("inf"), "not finite"), ("a", "str")],
)
def test_bad_features_take_the_checked_path_with_the_cache(value, error):
    m = _trained()
    _cached(m)
    with pytest.raises(ValueError, match=error):
        m.predict_one({**X5, "x1": value})
    assert m.predict_one({**X5, "x1": 1}) == pytest.approx(
        m.predict_one({**X5, "x1": 1.0}), rel=1e-12
    )
