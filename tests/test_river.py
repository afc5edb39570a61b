"""MixedLM as a river estimator: river's own checks, pipelines and progressive validation."""

from __future__ import annotations

import random
import warnings

import pytest
from river import checks, compose, datasets, evaluate, linear_model, metrics, preprocessing

from streamlmm import MixedLM

CHICKS = "weight ~ time + (1 + time | chick)"


def _river_checks():
    """(params, check) pairs, skipping what the model asks river to skip."""
    for i, params in enumerate(MixedLM._unit_test_params()):
        model = MixedLM(**params)
        for check in checks.yield_checks(model):
            if check.__name__ in model._unit_test_skips():
                continue
            yield pytest.param(params, check, id=f"params{i}-{check.__name__}")


def test_unit_test_params_include_random_slopes():
    forms = [p["formula"] for p in MixedLM._unit_test_params()]
    assert any("(1 + " in f for f in forms)
    assert len({p.get("method", "REML") for p in MixedLM._unit_test_params()}) == 2


@pytest.mark.parametrize("params, check", list(_river_checks()))
def test_river_check_estimator(params, check):
    model = MixedLM(**params)
    random.seed(0)  # river's feature-dropping checks draw from the global random module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy line searches near bounds
        check(model.clone())


# -- pipelines ------------------------------------------------------------------------------------
def add_time_squared(x: dict) -> dict:
    return {**x, "time2": float(x["time"]) ** 2}


@pytest.mark.parametrize(
    "pre, formula",
    [
        (compose.FuncTransformer(add_time_squared), "weight ~ time + time2 + (1 + time | chick)"),
        (compose.Select("time", "chick"), CHICKS),
    ],
    ids=["FuncTransformer", "Select"],
)
def test_pipeline_equals_the_bare_model_on_transformed_input(pre, formula):
    pipeline = pre | MixedLM(formula, refit_every=100)
    bare = MixedLM(formula, refit_every=100)
    transformer = pre.clone()
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # early refits on a handful of events
        for x, y in datasets.ChickWeights():
            xt = transformer.transform_one(x)
            assert pipeline.predict_one(x) == bare.predict_one(xt)
            pipeline.learn_one(x, y)
            bare.learn_one(xt, y)
            n += 1
    assert n == 578
    final = pipeline[list(pipeline.steps)[-1]]
    assert final.n_events == bare.n_events == n and final.n_refits >= 2


# -- progressive validation -----------------------------------------------------------------------
def _mae(model) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return evaluate.progressive_val_score(datasets.ChickWeights(), model, metrics.MAE()).get()


def test_progressive_mae_beats_linear_regression():
    """The product claim: per-chick growth curves predict better than one pooled line."""
    mixed = _mae(MixedLM(CHICKS))
    baselines = {
        "raw": _mae(linear_model.LinearRegression()),
        "scaled": _mae(preprocessing.StandardScaler() | linear_model.LinearRegression()),
        "scaled+onehot": _mae(
            (compose.Select("time") | preprocessing.StandardScaler())
            + (compose.Select("diet", "chick") | preprocessing.OneHotEncoder())
            | linear_model.LinearRegression()
        ),
    }
    assert mixed < min(baselines.values()), (mixed, baselines)
    assert mixed < 0.6 * min(baselines.values()), (mixed, baselines)


def test_progressive_validation_with_a_factor_level_that_appears_mid_stream():
    """river predicts each event before learning it: the first event of a new level is
    predicted with that level's effect at 0 (counted), not rejected."""
    rng = random.Random(4)
    rows = []
    for i in range(600):
        level = "a" if i < 200 else rng.choice("abc")  # "b" and "c" appear mid-stream
        x = {"g": f"g{i % 12}", "x": rng.gauss(0, 1), "f": level}
        y = 1.0 + x["x"] + {"a": 0.0, "b": 2.0, "c": -1.0}[level] + 0.3 * (i % 12) + rng.gauss(0, 1)
        rows.append((x, y))
    model = MixedLM("y ~ x + f + (1 | g)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = evaluate.progressive_val_score(rows, model, metrics.MAE())
    assert model.n_unseen_levels == 2  # the first "b" and the first "c"
    assert sorted(model._design.factors["f"]) == ["a", "b", "c"]
    assert score.get() < 1.2  # near the noise's MAE (0.8), far from a broken model's
