"""lme4's checks of a fit, as :class:`FitWarning` messages that say what was found and
what it means.

lme4 refuses some of these fits outright (a single level, no more observations than
random effects); a stream cannot refuse its own young state, so streamlmm reports them
and marks the snapshot not converged instead.

"""

from __future__ import annotations

import math
import warnings

import numpy as np

from streamlmm.values import count_text

__all__ = ["FitWarning", "SamplingWarning", "fit_messages", "warn_all", "SCALE_TOL"]

SCALE_TOL = 1e3  # lme4's check.scaleX: column SDs, or their ratios, beyond this


class FitWarning(UserWarning):
    """A fit or snapshot found something lme4 would warn about (or refuse)."""


class SamplingWarning(UserWarning):
    """A Bayesian posterior's sampler diagnostics fail a check (R-hat, effective sample
    size, divergences, tree depth, E-BFMI): the message says what it means and what to
    try (:mod:`streamlmm.bayes.posterior`)."""


def fit_messages(
    *,
    group: str,
    n_obs: float,
    n_groups: int,
    q: int,
    re_names,
    dropped,
    singular: bool,
    summary,
    fixed_sd: dict[str, float],
) -> list[str]:
    """Every lme4 check that fails, as messages (empty when the fit is clean).

    ``summary`` is the optimizer's :class:`~streamlmm.estimate.OptSummary` (or ``None``
    before any fit); ``fixed_sd`` the continuous fixed columns' standard deviations.
    """
    out: list[str] = []
    terms = f"({' + '.join(re_names)} | {group})"
    if n_groups < 2:
        out.append(
            f"grouping factor {group!r} has {n_groups} level(s): random effects need > 1 "
            "sampled level, so the variance components are not identified (lme4 refuses "
            "this fit)"
        )
    elif n_groups >= n_obs:
        out.append(
            f"number of levels of grouping factor {group!r} (={n_groups}) is not < the "
            f"number of observations (={count_text(n_obs)}): the random effects and the residual "
            "variance cannot be told apart (lme4 refuses this fit)"
        )
    elif n_obs <= q * n_groups:
        out.append(
            f"number of observations (={count_text(n_obs)}) <= number of random effects "
            f"(={q * n_groups}) for term {terms}: the random-effects parameters and the "
            "residual variance are probably unidentifiable (lme4 refuses this fit)"
        )
    if dropped:
        out.append(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
            f"column(s) / coefficient(s): {', '.join(dropped)} (aliased with earlier "
            "columns; their estimates are NaN)"
        )
    if singular:
        out.append(
            "boundary (singular) fit: a variance component is estimated as 0 or a "
            "correlation as ±1; the random-effects structure may be too complex for "
            "these data"
        )
    if summary is not None and not summary.converged:
        why = "; ".join(summary.messages) or summary.return_code
        out.append(
            f"model failed to converge ({summary.return_code}): {why}; the estimates "
            "are the best found, not a verified optimum"
        )
    sds = {k: v for k, v in fixed_sd.items() if math.isfinite(v) and v > 0}
    if sds:
        logs = np.log(np.array(list(sds.values())))
        spread = float(logs.max() - logs.min())
        if spread > math.log(SCALE_TOL) or np.max(np.abs(logs)) > math.log(SCALE_TOL):
            out.append(
                "some predictor variables are on very different scales (SDs "
                + ", ".join(f"{k}={v:.3g}" for k, v in sds.items())
                + "): the fit is ill-conditioned; consider rescaling"
            )
    return out


def warn_all(messages, stacklevel: int = 3) -> None:
    """Emit each message as a :class:`FitWarning`."""
    for msg in messages:
        warnings.warn(msg, FitWarning, stacklevel=stacklevel)
