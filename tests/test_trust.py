"""Real-data trust (issue 6): lme4's rank check, extreme values, honest convergence,
lme4's warnings, learn_many errors and unambiguous group keys.

The numbers come from lme4 1.1.31 fits committed in ``tests/data`` (made by
``scripts/reference/regenerate``).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.checks import FitWarning
from streamlmm.keys import key_from_json, key_to_json


def _case(reference, name):
    return reference(name)


def _fit(case, path="learn_many"):
    model = MixedLM(case.ref["formula"], case.method)
    if path == "learn_one":
        case.stream_one(model)
    else:
        case.stream_many(model, chunk=700)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snap = model.fit().snapshot()
    return model, snap, [str(w.message) for w in caught if issubclass(w.category, FitWarning)]


def _agree_with_lme4(snap, ref):
    for name, value in ref["fixef"].items():
        assert snap.fixef[name] == pytest.approx(value, rel=1e-5), name
    assert snap.sigma == pytest.approx(ref["sigma"], rel=1e-5)
    assert snap.criterion <= ref["criterion"] * (1 + 1e-6) + 1e-9
    assert snap.criterion >= ref["criterion"] * (1 - 1e-6) - 1e-9
    q = len(snap.re_names)
    want = np.asarray(ref["re_cov"], dtype=float).reshape((q, q), order="F")
    assert np.max(np.abs(snap.re_cov - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.mark.parametrize("path", ["learn_one", "learn_many"])
@pytest.mark.parametrize("name", ["aliased_reml", "constant_col_reml", "proportional_ml"])
def test_aliased_columns_are_dropped_as_lme4_does(reference, name, path):
    case = _case(reference, name)
    _, snap, warns = _fit(case, path)
    dropped = tuple(case.ref["dropped"])
    assert snap.dropped == dropped
    for d in dropped:
        assert math.isnan(snap.fixef[d]) and math.isnan(snap.fixef_se[d])
    _agree_with_lme4(snap, case.ref)
    assert any("rank deficient" in w and dropped[0] in w for w in warns)
    assert any("rank deficient" in w for w in snap.warnings)
    assert snap.converged


@pytest.mark.parametrize("name", ["timestamp_reml", "outlier_first_reml"])
def test_extreme_but_finite_values_match_lme4(reference, name):
    case = _case(reference, name)
    for path in ("learn_one", "learn_many"):
        _, snap, warns = _fit(case, path)
        _agree_with_lme4(snap, case.ref)
        assert snap.converged
        # lme4 says the predictors are on very different scales; so do we
        assert any("different scales" in w for w in warns)


def test_singular_fit_is_flagged(reference):
    case = _case(reference, "few_groups_singular_reml")
    _, snap, warns = _fit(case)
    assert snap.singular == case.ref["singular"] is True
    assert any("singular" in w for w in warns)
    assert snap.criterion <= case.ref["criterion"] * (1 + 1e-6)


@pytest.mark.parametrize("name", ["single_level_error", "one_obs_per_group_error"])
def test_fits_lme4_refuses_are_not_converged(reference, name):
    case = _case(reference, name)
    assert "error" in case.ref
    model, snap, warns = _fit(case)
    assert not snap.converged
    assert any("refuses" in w for w in warns)
    assert any("refuses" in w for w in snap.warnings)
    x = case.records()[0]
    assert math.isfinite(model.predict_one(x))


def test_evaluation_cap_is_not_converged(reference):
    case = _case(reference, "pub_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_many(model)
    model.fit(max_evals=3)
    assert model.opt_summary.return_code == "evaluation limit"
    assert model.opt_summary.messages.count("evaluation limit reached") == 1  # said once
    assert not model.converged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        assert not model.snapshot().converged
    model.fit()
    assert model.converged and model.opt_summary.scaled_grad < 2e-3


def test_optimizer_summary_is_recorded(reference):
    case = _case(reference, "sleepstudy_slopes_reml")
    _, snap, _ = _fit(case)
    info = snap.optinfo
    assert info["converged"] and info["return_code"] == "ok"
    assert info["evals"] > 0 and info["hessian_pd"]
    assert info["grad_norm"] < 1e-3 and info["method"]


def test_young_stream_is_finite_and_not_converged():
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    for i in range(3):
        m.learn_one({"g": i, "x1": float(i), "x2": 1.0}, float(i))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)
            s = m.snapshot()
        assert not s.converged and s.warnings
        assert math.isfinite(m.predict_one({"g": 0, "x1": 1.0, "x2": 1.0}))


# -- extreme values -------------------------------------------------------------------------------
def _stream(n=400, G=20, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, G, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = 1 + 0.5 * x1 - x2 + rng.normal(size=G)[g] + rng.normal(size=n)
    return [{"g": int(g[i]), "x1": float(x1[i]), "x2": float(x2[i])} for i in range(n)], y


@pytest.mark.parametrize(
    "field, value", [("x1", 1e300), ("x2", 1e160), ("y", 1e200), ("x1", -1e151)]
)
def test_overflowing_values_are_refused_and_change_nothing(field, value):
    events, y = _stream()
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    for x, yi in zip(events[:50], y[:50]):
        m.learn_one(x, yi)
    before = m._stats.active.copy()
    bad = dict(events[50], **({field: value} if field != "y" else {}))
    with pytest.raises(ValueError, match=repr(field)):
        m.learn_one(bad, value if field == "y" else 1.0)
    frame = pd.DataFrame([bad])
    with pytest.raises(ValueError, match=repr(field)):
        m.learn_many(frame, pd.Series([value if field == "y" else 1.0]))
    np.testing.assert_array_equal(m._stats.active, before)
    assert m.n_events == 50


def test_weight_times_square_overflow_is_refused():
    m = MixedLM("y ~ x1 + (1 | g)")
    m.learn_one({"g": 1, "x1": 1.0}, 1.0)
    before = m._stats.active.copy()
    with pytest.raises(ValueError, match="overflow"):
        m.learn_one({"g": 1, "x1": 1e149}, 1.0, w=1e10)
    np.testing.assert_array_equal(m._stats.active, before)


@pytest.mark.parametrize("first", [1e8, 1e12, -3e10])
def test_one_extreme_event_does_not_poison_the_rest(first):
    """An extreme first event (or one anywhere) leaves every other group's statistics and
    the fit on the rest finite; the model follows the data with it included, exactly."""
    events, y = _stream(seed=3)
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    m.learn_one({"g": 999, "x1": 0.0, "x2": first}, 0.0)  # x2 is a fixed effect only
    for x, yi in zip(events, y):
        m.learn_one(x, yi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        s = m.fit().snapshot()
    assert np.all(np.isfinite(m._stats.active))
    assert np.isfinite(s.sigma) and np.all(np.isfinite(s.b))
    ref = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    for x, yi in zip(events, y):
        ref.learn_one(x, yi)
    ref.learn_one({"g": 999, "x1": 0.0, "x2": first}, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        r = ref.fit().snapshot()
    assert s.sigma == pytest.approx(r.sigma, rel=1e-7)
    assert s.fixef["x1"] == pytest.approx(r.fixef["x1"], rel=1e-7)


# -- learn_many input errors ----------------------------------------------------------------------
def test_learn_many_errors_point_to_the_right_place():
    events, y = _stream(n=20)
    X = pd.DataFrame(events)
    ys = pd.Series(y)
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    with pytest.raises(ValueError, match="y must be a Series"):
        m.learn_many(X, pd.DataFrame({"y": y}))
    with pytest.raises(ValueError, match="^y has 5 values; expected 20"):
        m.learn_many(X, ys.iloc[:5].to_numpy())
    with pytest.raises(ValueError, match="y's index differs"):
        m.learn_many(X, ys.set_axis(range(100, 120)))
    with pytest.raises(ValueError, match="expects a pandas DataFrame"):
        m.learn_many(events, ys)
    assert m.n_events == 0 and m._stats.n_groups == 0


# -- keys -----------------------------------------------------------------------------------------
def test_int_and_str_keys_stay_apart_in_every_export():
    m = MixedLM("y ~ x + (1 | g)")
    for i in range(60):
        key = 1 if i % 2 else "1"
        m.learn_one({"g": key, "x": float(i % 7)}, (i % 7) + (3.0 if key == 1 else -3.0))
    s = m.fit().snapshot()
    assert set(s.keys) == {1, "1"}
    assert s.ranef(1) != s.ranef("1")
    d = json.loads(json.dumps(s.to_dict(groups=True)))
    assert {type(g["group"]) for g in d["groups"]} == {int, str}
    assert key_to_json(1) != key_to_json("1")
    assert key_from_json(key_to_json("1")) == "1" and key_from_json(key_to_json(1)) == 1


def test_overflow_in_a_new_levels_column_is_refused_before_widening():
    """A batch that brings a new factor level is checked over the widened columns: its
    interaction column x1·[f = b] overflows with the weight, and nothing changes."""
    m = MixedLM("y ~ x1:f + (1 | g)")  # x1 enters only through the levels' columns
    m.learn_many(
        pd.DataFrame({"g": [1, 2], "x1": [1.0, 2.0], "f": ["a", "a"]}), pd.Series([1.0, 2.0])
    )
    before, cols = m._stats.active.copy(), list(m._design.columns)
    frame = pd.DataFrame({"g": [1, 2], "x1": [1.0, 1e149], "f": ["a", "b"]})
    with pytest.raises(ValueError, match="row 1: field 'x1:fb'"):
        m.learn_many(frame, pd.Series([1.0, 1.0]), w=pd.Series([1.0, 1e10]))
    np.testing.assert_array_equal(m._stats.active, before)
    assert list(m._design.columns) == cols


def test_a_transformed_response_beyond_the_limit_is_refused_by_both_paths():
    """exp(400) is finite, but its square overflows the statistics: learn_one refuses it
    as learn_many does (and as a predictor's transform is refused), changing nothing."""
    m = MixedLM("exp(y) ~ x + (1 | g)")
    with pytest.raises(ValueError, match=r"field 'y': exp\(y\) is not finite"):
        m.learn_one({"g": 1, "x": 1.0}, 400.0)
    with pytest.raises(ValueError, match=r"row 0: field 'y': exp\(y\) is not finite"):
        m.learn_many(pd.DataFrame({"g": [1], "x": [1.0]}), pd.Series([400.0]))
    assert m.n_events == 0 and m._stats.n_groups == 0
