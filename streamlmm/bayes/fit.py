"""Sampling a model's posterior, its default priors and its prior predictive draws: what
:meth:`streamlmm.MixedLM.sample`, :meth:`~streamlmm.MixedLM.default_priors` and
:meth:`~streamlmm.MixedLM.prior_predictive` call.

:func:`sample` builds the log posterior from the model's statistics
(:class:`~streamlmm.bayes.density.LogPosterior`), runs nutpie's NUTS on it
(:mod:`streamlmm.bayes.sampler`), maps the draws to brms's parameters, summarises every
group's effect (:func:`streamlmm.bayes.groups.moments`) and returns an immutable
:class:`~streamlmm.bayes.posterior.Posterior`, emitting a
:class:`~streamlmm.SamplingWarning` for each failed check. Given the previous posterior
of the same model (``init``), it warm-starts: each chain starts at one of its draws with
its step size, and the default warm-up is shorter (:data:`WARM_WARMUP`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm.bayes import groups, predictive
from streamlmm.bayes import posterior as post_mod
from streamlmm.bayes.density import LogPosterior
from streamlmm.bayes.sampler import SamplerSettings, run

__all__ = ["sample", "default_priors", "prior_predictive", "COLD_WARMUP", "WARM_WARMUP"]

COLD_WARMUP = 1000
WARM_WARMUP = 300


def sample(
    model,
    priors: Mapping[str, str] | None = None,
    *,
    chains: int = 4,
    draws: int = 1000,
    warmup: int | None = None,
    seed: int | None = None,
    target_accept: float = 0.8,
    max_depth: int = 10,
    cores: int = 0,
    backend: str = "compiled",
    init: post_mod.Posterior | None = None,
    keep_ranef: bool = False,
    offsets: Mapping[str, int] | None = None,
    progress=None,
    warn: bool = True,
) -> post_mod.Posterior:
    """The posterior of ``model``'s global parameters by NUTS, and every group's effect
    (see the module's text). ``warmup`` defaults to :data:`COLD_WARMUP` iterations, or
    :data:`WARM_WARMUP` when warm-started from ``init``. ``seed`` ``None`` draws one
    (recorded in the posterior). ``keep_ranef`` keeps one exact draw of every group's
    effect per posterior draw (memory: groups × draws × q)."""
    t0 = time.perf_counter()
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(2))
    lp = LogPosterior.from_model(model, priors)
    warm = None
    if init is not None and _same_layout(init, lp):
        warm = (init.unconstrained.reshape(-1, lp.n_dim), init.step_size)
    if warmup is None:
        warmup = WARM_WARMUP if warm is not None else COLD_WARMUP
    settings = SamplerSettings(
        chains=chains,
        draws=draws,
        warmup=warmup,
        seed=seed,
        target_accept=float(target_accept),
        max_depth=max_depth,
        cores=cores,
        backend=backend,
        warm_start=warm is not None,
    )
    if not isinstance(keep_ranef, bool):
        raise ValueError(f"keep_ranef must be True or False, got {keep_ranef!r}")
    r = run(lp, settings, init=warm, progress=progress)
    X = r.x.reshape(-1, lp.n_dim)
    par = lp.constrain(X)
    flat = lp.flat(par).reshape(chains, draws, -1)
    threads = max(1, min(os.cpu_count() or 1, 8))
    F = lp.prob.F
    Tz = lp.prob.Tz()
    mean, cov = groups.moments(
        F, lp.q, lp.p, par["lam"], par["beta_t"], par["sigma"], Tz, threads=threads
    )
    ranef_draws = None
    if keep_ranef:
        rng = np.random.default_rng(seed)
        bd = groups.draws(
            F,
            lp.q,
            lp.p,
            par["lam"],
            par["beta_t"],
            par["sigma"],
            Tz,
            np.arange(F.shape[0]),
            rng,
            threads=threads,
        )
        inv = np.argsort(lp.perm)
        ranef_draws = bd[:, :, inv]
    post = post_mod.Posterior(
        names=lp.names,
        draws=flat,
        stats=r.stats,
        x=r.x,
        step_size=r.step_size,
        formula=model.formula,
        group=lp.group,
        keys=lp.keys,
        re_names=lp.re_names,
        rb_mean=mean,
        rb_cov=cov,
        F=F,
        lam=par["lam"],
        beta_t=par["beta_t"],
        sigma=par["sigma"],
        Tz=Tz,
        perm=lp.perm,
        priors=lp.priors.to_dict(),
        settings=settings.to_dict(),
        seed=seed,
        n_events=model.n_events,
        offsets=offsets,
        seconds=r.seconds,
        meta={
            "created": time.time(),
            "total_seconds": time.perf_counter() - t0,
            "gradients": r.n_grad,
            "n_groups": len(lp.keys),
            "n_obs": float(lp.prob.n),
        },
        design_state=model._design.to_state(),
        ranef_draws=ranef_draws,
    )
    if warn:
        post_mod.warn(post)
    return post


def _same_layout(prev: post_mod.Posterior, lp: LogPosterior) -> bool:
    """Whether a previous posterior's draws are points of ``lp``'s coordinates."""
    return tuple(prev.names) == tuple(lp.names) and prev.unconstrained.shape[-1] == lp.n_dim


def default_priors(model, priors: Mapping[str, str] | None = None):
    """The model's resolved priors as brms's ``get_prior()`` shows them (``priors`` the
    user's, if any; the rest brms's defaults from the reservoir's response)."""
    return LogPosterior.from_model(model, priors).priors.table()


def prior_predictive(
    model,
    X,
    priors: Mapping[str, str] | None = None,
    *,
    draws: int = 100,
    seed: int | None = None,
) -> np.ndarray:
    """Responses simulated from the priors at the rows of ``X`` (a DataFrame with the
    formula's fields and the group column): an array (draws, rows). Each draw takes its
    parameters from the priors and each group's effect from ``N(0, Σ)`` (a flat prior
    cannot be simulated: ``ValueError``)."""
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    lp = LogPosterior.from_model(model, priors)
    rng = np.random.default_rng(seed)
    par = predictive.prior_draws(lp, draws, rng)
    A, keys = predictive.design_rows(model._design, X, lp.group)
    codes: dict[Any, int] = {}
    cc = np.array([codes.setdefault(k, len(codes)) for k in keys], dtype=np.int64)
    b = predictive.prior_effects(par, cc, rng)
    return predictive.simulate(A, model._design, par, b, rng)
