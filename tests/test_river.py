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
