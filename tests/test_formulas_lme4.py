"""lme4 formulas (issue 8) against lme4 1.1.31: factors (one level first seen after 60% of
the stream), numeric×factor and factor×factor interactions, transforms on predictors and
on the response, ``||`` and two terms on one grouping factor.

Each case is streamed in file order (the stream order) through ``learn_one`` and through
``learn_many`` in chunks, then fitted. Tolerances: fixef, σ and the criterion 1e-5
relative; VarCorr 1e-4 of its largest entry; BLUPs and the blocks of condVar that lme4
reports, ``isclose(rtol=1e-3, atol=1e-6)``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.checks import FitWarning

CASES = (
    "factor_midstream_reml",
    "num_by_factor_reml",
    "factor_by_factor_ml",
    "transforms_reml",
    "log_response_reml",
    "uncorrelated_reml",
    "two_terms_ml",
    "interaction_in_random_reml",
)
PATHS = ("learn_one", "learn_many")


@functools.cache
def _fitted(case, path):
    model = MixedLM(case.ref["formula"], case.method)
    if path == "learn_one":
        case.stream_one(model)
    else:
        case.stream_many(model, chunk=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)  # a clean lme4 fit is clean here too
        snap = model.fit().snapshot()
    return model, snap


@pytest.fixture(params=[(c, p) for c in CASES for p in PATHS], ids=lambda cp: "-".join(cp))
def fit(request, reference):
    name, path = request.param
    case = reference(name)
    model, snap = _fitted(case, path)
    return case, model, snap


def test_names_are_lme4s(fit):
    case, _, s = fit
    assert list(s.fixef) == list(case.ref["fixef"])
    assert list(s.re_names) == list(np.atleast_1d(case.ref["re_names"]))
    assert s.dropped == ()


def test_fixef_sigma_criterion_within_1e5(fit):
    case, _, s = fit
    for name, value in case.ref["fixef"].items():
        assert s.fixef[name] == pytest.approx(value, rel=1e-5), name
    assert s.sigma == pytest.approx(case.ref["sigma"], rel=1e-5)
    assert s.criterion == pytest.approx(case.ref["criterion"], rel=1e-5)
    assert s.criterion <= case.ref["criterion"] * (1 + 1e-8)
    assert s.converged


def test_varcorr_within_1e4_of_largest_entry(fit):
    case, _, s = fit
    q = len(s.re_names)
    want = np.asarray(case.ref["re_cov"], dtype=float).reshape((q, q), order="F")
    assert np.max(np.abs(s.re_cov - want)) <= 1e-4 * np.max(np.abs(want))
    np.testing.assert_allclose(s.theta, np.atleast_1d(case.ref["theta"]), rtol=1e-3, atol=1e-5)


def test_blocks_are_exactly_zero_off_the_diagonal_blocks(fit):
    case, model, s = fit
    blocks = model._design.blocks
    inside = np.zeros((len(s.re_names),) * 2, dtype=bool)
    for b in blocks:
        inside[np.ix_(b, b)] = True
    assert np.all(s.re_cov[~inside] == 0.0)
    assert len(s.theta) == sum(len(b) * (len(b) + 1) // 2 for b in blocks)


def test_blups_and_condvar_blocks(fit):
    """BLUPs to 1e-3 relative, or 1e-3 of their random effect's SD for BLUPs near 0
    (a slope BLUP of 1e-3 moves by 1e-6 with θ's last digits)."""
    case, _, s = fit
    q = len(s.re_names)
    scale = np.sqrt(np.diag(s.re_cov))
    for key in case.group_keys:
        got, want_b = np.array(list(s.ranef(key).values())), case.ranef(key)
        assert np.all(np.abs(got - want_b) <= np.maximum(1e-3 * np.abs(want_b), 1e-3 * scale)), key
        want = np.array(
            [np.nan if v is None else v for v in np.ravel(case.ref["condvar"][key])], dtype=float
        ).reshape((q, q), order="F")
        known = ~np.isnan(want)
        np.testing.assert_allclose(
            s.ranef_cov(key)[known], want[known], rtol=1e-3, atol=1e-6, err_msg=key
        )


@pytest.mark.parametrize("name", CASES)
def test_learn_one_and_learn_many_are_bitwise_equal(reference, name):
    case = reference(name)
    one, _ = _fitted(case, "learn_one")
    many, _ = _fitted(case, "learn_many")
    assert one._design.columns == many._design.columns
    np.testing.assert_array_equal(one._stats.active, many._stats.active)


def test_a_level_seen_mid_stream_widens_exactly(reference):
    """The third level appears after 60% of the stream: the model before it has no
    ``fc`` column, and after it the fit equals lme4 on the whole data."""
    case = reference("factor_midstream_reml")
    data = case.data
    first_c = int(np.argmax((data["f"] == "c").to_numpy()))
    assert first_c >= 0.599 * len(data)
    m = MixedLM(case.ref["formula"], case.method)
    X, y = case.features, case.y
    m.learn_many(X.iloc[:first_c], y.iloc[:first_c])
    assert "fc" not in m._design.fixed
    before = m._stats.active.copy()
    m.learn_many(X.iloc[first_c : first_c + 1], y.iloc[first_c : first_c + 1])
    assert m._design.fixed == ("(Intercept)", "x1", "fb", "fc")
    # old rows keep their numbers; the new column is exactly zero for groups not touched
    col = m._stats.vpos[m._design.columns.index("fc")]
    touched = m._stats.row(data["g"].iat[first_c])
    untouched = [r for r in range(before.shape[0]) if r != touched]
    assert np.all(m._stats.means()[untouched, col] == 0.0)
    m.learn_many(X.iloc[first_c + 1 :], y.iloc[first_c + 1 :])
    s = m.fit().snapshot()
    for name, value in case.ref["fixef"].items():
        assert s.fixef[name] == pytest.approx(value, rel=1e-5), name


def test_shuffled_order_with_the_same_level_order(reference):
    """Order invariance with mid-stream levels, compared at the same level order."""
    case = reference("num_by_factor_reml")
    _, s0 = _fitted(case, "learn_many")
    shuffled = case.data.sample(frac=1, random_state=5)
    m = MixedLM(case.ref["formula"], case.method, levels={"f": ["a", "b", "c"]})
    X = shuffled.drop(columns=["y"])
    m.learn_many(X, shuffled["y"])
    s = m.fit().snapshot()
    assert list(s.fixef) == list(s0.fixef)
    for k, v in s0.fixef.items():
        assert s.fixef[k] == pytest.approx(v, rel=1e-8)
    assert s.criterion == pytest.approx(s0.criterion, rel=1e-10)


def test_predictions_with_factors_and_unseen_levels(reference):
    case = reference("num_by_factor_reml")
    model, s = _fitted(case, "learn_many")
    x = case.records()[0]
    assert model.predict_one(x) == pytest.approx(s.predict(x), rel=1e-9)
    # a level never learned has effect 0: the reference level's prediction, counted
    ref = model._design.factors["f"][0]
    before = model.n_unseen_levels
    assert model.predict_one({**x, "f": "zz"}) == model.predict_one({**x, "f": ref})
    assert model.n_unseen_levels == before + 1
    assert s.predict({**x, "f": "zz"}) == pytest.approx(s.predict({**x, "f": ref}), rel=1e-12)
    X = case.features.iloc[:50]
    np.testing.assert_allclose(
        model.predict_many(X).to_numpy(), [model.predict_one(r) for r in X.to_dict("records")]
    )


def test_a_non_finite_transform_is_bad_input_naming_the_field():
    m = MixedLM("y ~ log(x) + (1 | g)")
    m.learn_one({"g": 1, "x": 2.0}, 1.0)
    before = m._stats.active.copy()
    with pytest.raises(ValueError, match="field 'x': log\\(x\\)"):
        m.learn_one({"g": 1, "x": 0.0}, 1.0)
    with pytest.raises(ValueError, match="row 1: field 'x': log\\(x\\)"):
        m.learn_many(pd.DataFrame({"g": [1, 2], "x": [1.0, -1.0]}), pd.Series([1.0, 2.0]))
    np.testing.assert_array_equal(m._stats.active, before)


def test_a_failed_batch_learns_no_level():
    m = MixedLM("y ~ x + f + (1 | g)")
    m.learn_one({"g": 1, "x": 1.0, "f": "a"}, 1.0)
    X = pd.DataFrame({"g": [1, 2], "x": [1.0, "bad"], "f": ["b", "c"]})
    with pytest.raises(ValueError, match="row 1: field 'x'"):
        m.learn_many(X, pd.Series([1.0, 2.0]))
    assert m._design.factors == {"f": ["a"]}
    assert m._stats.n_groups == 1


@pytest.mark.parametrize(
    "formula, words",
    [
        ("y ~ x + (1 | a) + (1 | b)", "couple groups"),
        ("y ~ x + (1 | a/b)", "nested"),
        ("y ~ x + (1 | g) + g", "grouping factor"),
        ("y ~ x", "random-effects term"),
    ],
)
def test_out_of_scope_formulas_are_refused_with_a_reason(formula, words):
    with pytest.raises(ValueError, match=words):
        MixedLM(formula)


def test_summary_prints_varcorr_per_term_as_lme4(reference):
    """lme4's VarCorr for ``(1 + x1 | g) + (0 + x2 | g)``: the second term is ``g.1``,
    with no correlation across terms."""
    from streamlmm.summary import format_summary, varcorr_rows

    case = reference("two_terms_ml")
    _, s = _fitted(case, "learn_many")
    rows = varcorr_rows(s)
    assert [(r["groups"], r["name"]) for r in rows] == [
        ("g", "(Intercept)"),
        ("", "x1"),
        ("g.1", "x2"),
        ("Residual", ""),
    ]
    assert rows[1]["corr"] and rows[2]["corr"] == []
    want = np.asarray(case.ref["re_cov"], dtype=float).reshape((3, 3), order="F")
    assert rows[2]["variance"] == pytest.approx(want[2, 2], rel=1e-4)
    assert " g.1      x2" in format_summary(s)
