"""Bayesian mixed models from the sufficient statistics: brms's priors, NUTS on the
global parameters with the group effects integrated out, the exact posterior of every
group's effect, ArviZ's diagnostics (docs/bayes.md).

The core never imports this package at module import time; ``MixedLM.sample`` and its
siblings import it when called. Modules: :mod:`~streamlmm.bayes.priors`,
:mod:`~streamlmm.bayes.transforms`, :mod:`~streamlmm.bayes.density`,
:mod:`~streamlmm.bayes.sampler`, :mod:`~streamlmm.bayes.groups`,
:mod:`~streamlmm.bayes.predictive`, :mod:`~streamlmm.bayes.posterior`,
:mod:`~streamlmm.bayes.fit`.
"""

from __future__ import annotations

from streamlmm.bayes.fit import default_priors, prior_predictive, sample
from streamlmm.bayes.posterior import Posterior

__all__ = ["Posterior", "sample", "default_priors", "prior_predictive"]
