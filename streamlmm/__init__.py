"""streamlmm: exact linear mixed-effects models (lme4's REML/ML) on event streams."""

from __future__ import annotations

import os

# the sums over groups run on Python threads that block when idle (kernels.pls_sums);
# should numba's OpenMP layer start for a user's own kernels, its threads must sleep,
# not spin, when idle: a spinning pool steals the CPU from every other thread and
# process (set before numba starts a threading layer; a user's own setting wins)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")
os.environ.setdefault("KMP_BLOCKTIME", "0")

from streamlmm.checks import FitWarning, SamplingWarning
from streamlmm.design import Design
from streamlmm.formula import Formula, parse_formula
from streamlmm.keys import UnknownGroupError
from streamlmm.model import MixedLM
from streamlmm.snapshot import Snapshot, SnapshotError
from streamlmm.store import LocalStore

__all__ = [
    "MixedLM",
    "Snapshot",
    "SnapshotError",
    "UnknownGroupError",
    "LocalStore",
    "Formula",
    "Design",
    "FitWarning",
    "SamplingWarning",
    "Posterior",
    "parse_formula",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the Bayesian layer sits above the core and loads only when asked for
    if name == "Posterior":
        from streamlmm.bayes.posterior import Posterior

        return Posterior
    raise AttributeError(f"module 'streamlmm' has no attribute {name!r}")
