"""Bayesian mixed models from the sufficient statistics (brms's priors, NUTS, the exact
posterior with the group effects integrated out). See docs/bayes.md."""

from __future__ import annotations

__all__: list[str] = []
