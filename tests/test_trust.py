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


# -- a leverage point ---------------------------------------------------------------------------
# One event of group g0 has x1 corrupted into 1e4 (leverage_reml) or 1.7e9 (leverage_far_reml,
# a Unix time) while every other x1 is a day 0..6. The truth is computed here in rationals
# (fractions) from the raw events, independently of the statistics and the kernels.
def _fr_solve(A, b):
    """Solve the small rational system ``A x = b`` (Gaussian elimination, exact)."""
    n = len(A)
    M = [list(row) + [v] for row, v in zip(A, b)]
    for j in range(n):
        piv = next(i for i in range(j, n) if M[i][j] != 0)
        M[j], M[piv] = M[piv], M[j]
        for i in range(n):
            if i != j and M[i][j] != 0:
                f = M[i][j] / M[j][j]
                M[i] = [a - f * c for a, c in zip(M[i], M[j])]
    return [M[i][n] / M[i][i] for i in range(n)]


def _fr_groups(data, cx=0, cy=0):
    """Per group ``(Z'Z, Z'y)`` of ``z = [1, x1 − cx]`` and ``y − cy`` in rationals."""
    from fractions import Fraction as Fr

    out = {}
    for g, x, y in zip(data.g, data.x1, data.y):
        ZZ, Zy = out.setdefault(g, ([[Fr(0)] * 2 for _ in range(2)], [Fr(0)] * 2))
        z = [Fr(1), Fr(float(x)) - cx]
        for i in range(2):
            Zy[i] += z[i] * (Fr(float(y)) - cy)
            for j in range(2):
                ZZ[i][j] += z[i] * z[j]
    return out


def _fr_blup(ZZ, Zy, lam, beta):
    """``b = D(Z'Z D + I)⁻¹ Z'(y − Zβ)`` with ``D = ΛΛ'`` (here X = Z = [1, x1])."""
    D = [[sum(lam[i][k] * lam[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
    Zr = [Zy[i] - sum(ZZ[i][j] * beta[j] for j in range(2)) for i in range(2)]
    A = [[sum(ZZ[i][k] * D[k][j] for k in range(2)) + (i == j) for j in range(2)] for i in range(2)]
    v = _fr_solve(A, Zr)
    return [sum(D[i][k] * v[k] for k in range(2)) for i in range(2)]


def _exact_reml(data, theta) -> float:
    """lme4's REML criterion of ``y ~ x1 + (1 + x1 | g)`` at θ, from rationals (only the
    final logs in floating point): β profiled through the groups' blocks."""
    from fractions import Fraction as Fr

    t = [Fr(float(v)) for v in theta]
    lam = [[t[0], Fr(0)], [t[1], t[2]]]
    D = [[sum(lam[i][k] * lam[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
    XX = [[Fr(0)] * 2 for _ in range(2)]
    Xy = [Fr(0)] * 2
    yy = sum(Fr(float(y)) ** 2 for y in data.y)
    logdet, cu2 = 0.0, Fr(0)
    for ZZ, Zy in _fr_groups(data).values():
        M = [[sum(lam[k][i] * ZZ[k][m] * lam[m][j] for k in range(2) for m in range(2))
              + (i == j) for j in range(2)] for i in range(2)]  # fmt: skip
        logdet += math.log(M[0][0] * M[1][1] - M[0][1] * M[1][0])
        # the group's share of X'V⁻¹X: Z'Z − Z'Z A Z'Z with A = ΛM⁻¹Λ' = (DZ'Z + I)⁻¹D
        N = [[sum(D[i][k] * ZZ[k][j] for k in range(2)) + (i == j) for j in range(2)]
             for i in range(2)]  # fmt: skip
        A = [_fr_solve(N, [D[0][r], D[1][r]]) for r in range(2)]  # columns; A is symmetric
        ZAZ = [[sum(ZZ[i][k] * A[k][m] * ZZ[m][j] for k in range(2) for m in range(2))
                for j in range(2)] for i in range(2)]  # fmt: skip
        ZAy = [
            sum(ZZ[i][k] * A[k][m] * Zy[m] for k in range(2) for m in range(2)) for i in range(2)
        ]
        cu2 += sum(Zy[k] * A[k][m] * Zy[m] for k in range(2) for m in range(2))
        for i in range(2):
            Xy[i] += Zy[i] - ZAy[i]
            for j in range(2):
                XX[i][j] += ZZ[i][j] - ZAZ[i][j]
    beta = _fr_solve(XX, Xy)
    r2 = yy - cu2 - sum(beta[i] * Xy[i] for i in range(2))
    dof = len(data) - 2
    detRX = XX[0][0] * XX[1][1] - XX[0][1] * XX[1][0]
    return logdet + math.log(detRX) + dof * (1 + math.log(2 * math.pi * float(r2) / dof))


def test_a_leverage_point_fits_as_lme4_or_better(reference):
    """x1 = 1e4 among days 0..6: lme4 fits it, and so do we, at an optimum whose exact
    REML criterion is no higher than lme4's."""
    case = _case(reference, "leverage_reml")
    for path in ("learn_one", "learn_many"):
        _, snap, _ = _fit(case, path)
        assert snap.converged
        for name, value in case.ref["fixef"].items():
            assert snap.fixef[name] == pytest.approx(value, rel=1e-5), name
        np.testing.assert_allclose(snap.theta, case.ref["theta"], rtol=1e-4)
        want = np.array(case.ref["ranef"]["g0"])
        np.testing.assert_allclose(list(snap.ranef("g0").values()), want, rtol=1e-5)
    ours, lme4 = _exact_reml(case.data, snap.theta), _exact_reml(case.data, case.ref["theta"])
    assert ours <= lme4 + 1e-12 * abs(lme4)


def test_a_far_leverage_point_is_refused_as_lme4_does(reference):
    """x1 = 1.7e9: lme4 returns no estimates (NaN, after "very different scales"); the fit
    here gives no finite estimates either, says so, and is not converged."""
    case = _case(reference, "leverage_far_reml")
    assert all(v is None for v in case.ref["fixef"].values())
    _, snap, warns = _fit(case)
    assert not snap.converged and all(math.isnan(v) for v in snap.fixef.values())
    assert any("different scales" in w for w in warns)
    assert any("no finite estimates" in w for w in warns)


@pytest.mark.parametrize("far", [None, 1e12])
def test_predictions_after_a_leverage_point_are_the_exact_blup(reference, far):
    """The model fits the ordinary events; then one event lands at x1 = 1.7e9 (or 1e12)
    in group g0. predict_one, predict_many and the BLUP kernel of snapshots recompute the
    group's effect at the same parameters: they equal the BLUP computed in rationals
    from the raw events, to the rounding of β̃·(x1 − c) in double precision (the old
    normal-equations factor of Λ'Z'ZΛ + I gave 2.7 for 3.5 and cancelled to garbage)."""
    from fractions import Fraction as Fr

    from streamlmm import kernels

    data = reference("leverage_far_reml").data.copy()
    if far is not None:
        data.loc[len(data) - 1, "x1"] = far
    m = MixedLM("y ~ x1 + (1 + x1 | g)", refit_every=10**9, em_every=10**9)
    X = data[["g", "x1"]]
    m.learn_many(X.iloc[:-1], data.y.iloc[:-1])
    m.fit()
    m.learn_one(X.iloc[-1].to_dict(), float(data.y.iloc[-1]))
    par = m._par
    c = [Fr(float(v)) for v in par.c]  # (Intercept), x1, y
    lam = [[Fr(float(v)) for v in row] for row in par.lam]
    beta = [Fr(float(v)) for v in par.beta]
    ZZ, Zy = _fr_groups(data, cx=c[1], cy=c[2])["g0"]
    b = _fr_blup(ZZ, Zy, lam, beta)
    x_far = float(data.x1.iloc[-1])
    tol = 16 * 2.0**-52 * abs(x_far - float(c[1])) * abs(float(beta[1]))
    for x1 in (0.0, 3.0, 6.0):
        d = Fr(x1) - c[1]
        want = float(c[2] + beta[0] + beta[1] * d + b[0] + b[1] * d)
        got = m.predict_one({"g": "g0", "x1": x1})
        assert got == pytest.approx(want, abs=tol), (x1, got, want)
        many = m.predict_many(pd.DataFrame({"g": ["g0"], "x1": [x1]}))
        assert many.iloc[0] == pytest.approx(want, abs=tol)
    st = m._stats
    B, _ = kernels.blups(st.M, st.n_groups, st.vpos, par.c, par.zi, par.xi, st.k, st.P,
                         par.lam, par.beta)  # fmt: skip
    got_b = B[st.index["g0"]]
    assert got_b[1] == pytest.approx(float(b[1]), abs=tol / 1e3)
    assert got_b[0] + got_b[1] * 3.0 == pytest.approx(float(b[0] + b[1] * (3 - c[1])) + float(
        b[1]) * float(c[1]), abs=tol)  # fmt: skip
