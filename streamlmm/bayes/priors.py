"""Priors as brms writes them: parsing, brms's defaults, resolution, log densities.

A prior is a Stan-style distribution string (``"normal(0, 20)"``, ``"student_t(3, 0,
30)"``, ``"lkj(2)"``, ``"flat"``), keyed by a brms parameter class or by one parameter's
brms name:

- ``Intercept``: the intercept of the model whose fixed predictors are centred at their
  means (brms's parametrisation; ``b_Intercept`` is reported back-transformed);
- ``b``: every other fixed effect; ``b_<coef>`` one of them (``b_std_age``);
- ``sd``: every random-effect standard deviation; ``sd_<group>`` those of a grouping
  factor; ``sd_<group>__<coef>`` one of them (``sd_county__std_age``);
- ``sigma``: the residual standard deviation;
- ``cor``: every correlation matrix (LKJ); ``cor_<group>`` those of a grouping factor.

The most specific key wins (one parameter, then its group, then its class), and a class
with no prior gets brms's default (brms's ``R/priors.R``): ``b`` flat; ``Intercept``
``student_t(3, round(median(y), 1), s)``; ``sd`` and ``sigma`` ``student_t(3, 0, s)``;
``cor`` ``lkj(1)``, where ``s = max(2.5, round(mad(y), 1))`` (R's ``mad``, with its
1.4826). The median and MAD come from the model's reservoir of raw events, counting
each distinct event as often as it was seen: exact while the stream fits in it.

Priors on ``sd`` and ``sigma`` are truncated at 0, as in brms (a half-normal is
``normal(0, s)`` on ``sd``). Every log density here is the *normalised* one: its
constant, the truncation's ``−log P(X > 0)`` included, is part of it, so the log
posterior (:mod:`streamlmm.bayes.density`) is ``log p(y | θ) + log p(θ) + log|J|``
exactly, not up to a constant.

Examples
--------
>>> parse("student_t(3, 0, 30)")
Dist(family='student_t', args=(3.0, 0.0, 30.0))
>>> str(parse("normal(0,20)"))
'normal(0, 20)'
>>> parse("normal(0, -1)")
Traceback (most recent call last):
...
ValueError: normal(0, -1): the scale must be positive, got -1

"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "Dist",
    "Param",
    "ResolvedPriors",
    "parse",
    "resolve",
    "brms_defaults",
    "log_density",
    "lkj_log_norm",
    "CLASSES",
    "FAMILIES",
]

CLASSES = ("Intercept", "b", "sd", "sigma", "cor")

# family: (arity, names of the arguments) in Stan's order
FAMILIES: dict[str, tuple[str, ...]] = {
    "flat": (),
    "normal": ("mu", "sigma"),
    "student_t": ("nu", "mu", "sigma"),
    "cauchy": ("mu", "sigma"),
    "exponential": ("rate",),
    "gamma": ("alpha", "beta"),
    "lognormal": ("mu", "sigma"),
    "uniform": ("lower", "upper"),
    "lkj": ("eta",),
}
# family codes of the compiled densities (streamlmm.bayes.density)
CODES = {name: i for i, name in enumerate(FAMILIES)}
POSITIVE = ("exponential", "gamma", "lognormal")  # support (0, ∞)
_ALIASES = {"lkj_corr_cholesky": "lkj", "lkj_corr": "lkj", "(flat)": "flat", "": "flat"}
_CALL = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$")
MAD_CONSTANT = 1.4826  # R's mad()


@dataclasses.dataclass(frozen=True)
class Dist:
    """A parsed distribution: its family and its arguments (Stan's order)."""

    family: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.family == "flat":
            return "(flat)"
        return f"{self.family}({', '.join(_num(a) for a in self.args)})"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown distribution {self.family!r}")


def _num(x: float) -> str:
    """A number as R prints it in a prior string: ``200``, ``2.5``, ``0.02``."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def parse(text: str) -> Dist:
    """Parse one Stan-style distribution, checking its arguments (a ``ValueError`` says
    which one is wrong and why)."""
    if not isinstance(text, str):
        raise ValueError(f"a prior must be a string such as 'normal(0, 10)', got {text!r}")
    t = text.strip()
    if t in _ALIASES or t == "flat":
        return Dist("flat")
    m = _CALL.match(t)
    if not m:
        raise ValueError(f"{text!r} is not a distribution such as 'normal(0, 10)'")
    family = _ALIASES.get(m.group(1), m.group(1))
    if family not in FAMILIES:
        raise ValueError(
            f"{text}: unknown distribution {m.group(1)!r} (known: {', '.join(FAMILIES)})"
        )
    raw = [a.strip() for a in m.group(2).split(",")] if m.group(2).strip() else []
    want = FAMILIES[family]
    if len(raw) != len(want):
        raise ValueError(
            f"{text}: {family} takes {len(want)} argument(s) ({', '.join(want) or 'none'}), "
            f"got {len(raw)}"
        )
    args = []
    for name, a in zip(want, raw):
        try:
            v = float(a)
        except ValueError:
            raise ValueError(f"{text}: argument {name} = {a!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{text}: argument {name} must be finite, got {a}")
        args.append(v)
    d = Dist(family, tuple(args))
    _check_args(text, d)
    return d


def _check_args(text: str, d: Dist) -> None:
    f, a = d.family, d.args
    positive = {
        "normal": [("scale", a[1:2])],
        "student_t": [("degrees of freedom", a[0:1]), ("scale", a[2:3])],
        "cauchy": [("scale", a[1:2])],
        "exponential": [("rate", a[0:1])],
        "gamma": [("shape", a[0:1]), ("inverse scale", a[1:2])],
        "lognormal": [("scale", a[1:2])],
        "lkj": [("eta", a[0:1])],
    }.get(f, [])
    for what, vals in positive:
        for v in vals:
            if not v > 0:
                raise ValueError(f"{text}: the {what} must be positive, got {_num(v)}")
    if f == "uniform" and not a[0] < a[1]:
        raise ValueError(f"{text}: the lower bound must be below the upper bound")


# -- the model's parameters ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    """One sampled parameter (or, for ``cor``, one correlation block) in brms's terms."""

    name: str  # brms's name: b_x, sd_g__x, sigma, cor_g (a block: its first pair's name)
    cls: str  # Intercept, b, sd, sigma, cor
    coef: str = ""  # brms's coefficient name (b, sd), or the block's "c1__c2__…" (cor)
    group: str = ""


def brms_coef(name: str) -> str:
    """brms's name of an lme4 coefficient: ``(Intercept)`` is ``Intercept``."""
    return "Intercept" if name == "(Intercept)" else name


def model_params(fixed, random, blocks, group: str, has_intercept: bool) -> list[Param]:
    """The parameters of a model (brms's names), in the sampler's order: fixed effects,
    SDs (user order), correlation blocks (blocks of more than one coefficient), σ."""
    out = []
    for name in fixed:
        if name == "(Intercept)" and has_intercept:
            out.append(Param("b_Intercept", "Intercept"))
        else:
            out.append(Param(f"b_{brms_coef(name)}", "b", brms_coef(name)))
    for name in random:
        c = brms_coef(name)
        out.append(Param(f"sd_{group}__{c}", "sd", c, group))
    for blk in blocks:
        if len(blk) > 1:
            coefs = "__".join(brms_coef(random[i]) for i in blk)
            out.append(Param(f"cor_{group}", "cor", coefs, group))
    out.append(Param("sigma", "sigma"))
    return out


# -- resolution ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ResolvedPriors:
    """Every parameter's prior, where it came from, and what the user gave.

    ``dists[i]`` is the prior of ``params[i]``; ``source[i]`` is ``"user"`` (its own
    key), ``"user (class)"``/``"user (group)"`` (a broader key) or ``"default"``
    (brms's default); ``given`` the user's mapping as given; ``location``/``scale``
    the response's median and brms's scale ``s`` that the defaults used, and
    ``events``/``of`` how many events they came from out of the stream's.
    """

    params: tuple[Param, ...]
    dists: tuple[Dist, ...]
    source: tuple[str, ...]
    given: Mapping[str, str]
    defaults: Mapping[str, Dist] = dataclasses.field(default_factory=dict)
    location: float = math.nan
    scale: float = math.nan
    events: float = math.nan
    of: float = math.nan

    def by_name(self) -> dict[str, Dist]:
        """Prior by parameter name (a ``cor`` block under ``cor_<group>__<c1>__<c2>…``)."""
        return {_key(p): d for p, d in zip(self.params, self.dists)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (for a posterior's header)."""
        return {
            "given": dict(self.given),
            "resolved": {_key(p): str(d) for p, d in zip(self.params, self.dists)},
            "source": {_key(p): s for p, s in zip(self.params, self.source)},
            "location": self.location,
            "scale": self.scale,
            "events": self.events,
            "of": self.of,
        }

    def table(self):
        """The priors as brms's ``get_prior()`` shows them: a row per class, per group
        and per coefficient (columns ``prior, class, coef, group, lb, source``; ``lb``
        is 0 on ``sd`` and ``sigma``, the truncation). ``source`` is ``user`` for a key
        the user gave, ``default`` for brms's default, ``(vectorized)`` for a row that
        takes the prior of its group or class."""
        import pandas as pd

        rows = []
        done: set[tuple[str, str]] = set()
        for p, d, s in zip(self.params, self.dists, self.source):
            lb = "0" if p.cls in ("sd", "sigma") else ""
            if p.cls in ("b", "sd", "cor") and (p.cls, "") not in done:
                done.add((p.cls, ""))
                given = self.given.get(p.cls)
                top = str(parse(given)) if given else str(self.defaults[p.cls])
                rows.append(_row(top, p.cls, "", "", lb, "user" if given else "default"))
            if p.cls in ("sd", "cor") and (p.cls, p.group) not in done:
                done.add((p.cls, p.group))
                given = self.given.get(f"{p.cls}_{p.group}")
                above = self.given.get(p.cls)
                text = given or above
                prior = str(parse(text)) if text else str(self.defaults[p.cls])
                rows.append(_row(prior, p.cls, "", p.group, "", _own(given)))
            if p.cls == "cor":
                continue
            if p.cls in ("Intercept", "sigma"):
                rows.append(_row(str(d), p.cls, "", "", lb, "user" if s == "user" else s))
            else:
                rows.append(_row(str(d), p.cls, p.coef, p.group, "", _own(s == "user")))
        return pd.DataFrame(rows, columns=["prior", "class", "coef", "group", "lb", "source"])


def _own(given) -> str:
    return "user" if given else "(vectorized)"


def _row(prior, cls, coef, group, lb, source) -> dict[str, str]:
    return {"prior": prior, "class": cls, "coef": coef, "group": group, "lb": lb, "source": source}


def _key(p: Param) -> str:
    return f"cor_{p.group}__{p.coef}" if p.cls == "cor" else p.name


def brms_defaults(y: np.ndarray, count: np.ndarray) -> tuple[float, float]:
    """brms's default location and scale from a response sample (each value repeated
    ``count`` times): ``(round(median(y), 1), max(2.5, round(mad(y), 1)))``.

    >>> brms_defaults(np.array([1.0, 2.0, 3.0, 10.0]), np.ones(4))
    (2.5, 2.5)
    >>> brms_defaults(np.array([100.0, 200.0, 300.0]), np.array([1.0, 2.0, 1.0]))
    (200.0, 74.1)

    """
    from streamlmm.reservoir import weighted_quantiles

    y = np.asarray(y, dtype=float)
    count = np.asarray(count, dtype=float)
    med = float(weighted_quantiles(y, count, [0.5])[0])
    mad = MAD_CONSTANT * float(weighted_quantiles(np.abs(y - med), count, [0.5])[0])
    scale = round(mad, 1)
    return round(med, 1), max(2.5, scale) if math.isfinite(scale) else 2.5


def resolve(
    priors: Mapping[str, str] | None,
    params: list[Param],
    *,
    response: tuple[np.ndarray, np.ndarray, float] | None,
    n_groups: int,
) -> ResolvedPriors:
    """Each parameter's prior from the user's mapping and brms's defaults.

    ``response`` is ``(y, count, events seen)`` of the reservoir (for the defaults of
    ``Intercept``, ``sd`` and ``sigma``); ``n_groups`` is used to warn about priors
    that can leave the posterior improper. Raises ``ValueError`` naming the key and the
    reason for an unknown key, an unknown distribution, a bad argument, a distribution
    that does not fit its class (``lkj`` off ``cor``, anything but ``lkj`` on ``cor``,
    ``lkj`` on a one-coefficient term, a positive-only distribution on ``b`` or
    ``Intercept``, a ``uniform`` on ``sd``/``sigma`` that excludes every positive
    value).
    """
    if priors is not None and not isinstance(priors, Mapping):
        raise ValueError(f"priors must be a mapping of class or name to prior, got {priors!r}")
    given = dict(priors or {})
    keys = _valid_keys(params)
    parsed: dict[str, Dist] = {}
    has_cor = any(p.cls == "cor" for p in params)
    for key, text in given.items():
        if isinstance(key, str) and (key == "cor" or key.startswith("cor_")) and not has_cor:
            terms = ", ".join(sorted({p.group for p in params if p.cls == "sd"}))
            raise ValueError(
                f"prior {key!r}: lkj is a prior for the correlations of a term with several "
                f"coefficients, and every random-effect term on {terms} has one coefficient "
                "(no correlation)"
            )
        if not isinstance(key, str) or key not in keys:
            raise ValueError(_unknown_key(key, keys, params))
        try:
            d = parse(text)
        except ValueError as e:
            raise ValueError(f"prior {key!r}: {e}") from None
        _check_fit(key, keys[key], d, params)
        parsed[key] = d
    need_default = [p for p in params if _pick(p, parsed) is None]
    location = scale = events = of = math.nan
    if any(p.cls in ("Intercept", "sd", "sigma") for p in need_default):
        if response is None or len(response[0]) == 0:
            missing = sorted({p.cls for p in need_default if p.cls != "b"})
            raise ValueError(
                "brms's default priors for "
                + ", ".join(missing)
                + " need the response's median and MAD, and this model has no events in "
                "its reservoir (reservoir=0, or statistics loaded without events): give "
                "those priors explicitly"
            )
        location, scale = brms_defaults(response[0], response[1])
        events, of = float(np.sum(response[1])), float(response[2])
    defaults = {
        "b": Dist("flat"),
        "Intercept": Dist("student_t", (3.0, location, scale)),
        "sd": Dist("student_t", (3.0, 0.0, scale)),
        "sigma": Dist("student_t", (3.0, 0.0, scale)),
        "cor": Dist("lkj", (1.0,)),
    }
    dists, source = [], []
    for p in params:
        hit = _pick(p, parsed)
        if hit is not None:
            key, d = hit
            dists.append(d)
            source.append("user" if key in (_key(p), p.name) else f"user ({key})")
        else:
            dists.append(defaults[p.cls])
            source.append("default")
    out = ResolvedPriors(
        tuple(params),
        tuple(dists),
        tuple(source),
        given,
        defaults={k: v for k, v in defaults.items() if any(p.cls == k for p in params)},
        location=location,
        scale=scale,
        events=events,
        of=of,
    )
    _warn_improper(out, n_groups)
    return out


def _valid_keys(params: list[Param]) -> dict[str, str]:
    """Every key a user may give, with the class it targets."""
    keys = {c: c for c in CLASSES if any(p.cls == c for p in params)}
    for p in params:
        if p.cls in ("b", "sd", "sigma"):
            keys[p.name] = p.cls
        if p.cls in ("sd", "cor"):
            keys[f"{p.cls}_{p.group}"] = p.cls
        if p.cls == "cor":
            keys[_key(p)] = "cor"
    return keys


def _unknown_key(key, keys: Mapping[str, str], params: list[Param]) -> str:
    if key == "b_Intercept":
        return (
            "prior key 'b_Intercept': brms puts the intercept's prior on class "
            "'Intercept' (the intercept of the mean-centred predictors); use 'Intercept'"
        )
    if key in CLASSES:
        return f"prior key {key!r}: this model has no {key} parameter"
    return (
        f"prior key {key!r} is neither a brms class nor a parameter of this model "
        f"(known: {', '.join(sorted(keys))})"
    )


def _check_fit(key: str, cls: str, d: Dist, params: list[Param]) -> None:
    if cls == "cor":
        if d.family != "lkj":
            raise ValueError(f"prior {key!r}: correlations take lkj(eta), got {d}")
        return
    if d.family == "lkj":
        raise ValueError(f"prior {key!r}: lkj is a prior for correlations ('cor'), not {cls}")
    if cls in ("b", "Intercept") and d.family in POSITIVE:
        raise ValueError(
            f"prior {key!r}: {d} has support (0, inf), but {cls} is unbounded; "
            "bounds on fixed effects are not supported"
        )
    if cls in ("sd", "sigma") and d.family == "uniform" and not d.args[1] > 0:
        raise ValueError(f"prior {key!r}: {d} puts no mass on positive values, and {cls} > 0")


def _pick(p: Param, parsed: Mapping[str, Dist]) -> tuple[str, Dist] | None:
    """The most specific user prior for ``p``: its own name, its group, its class."""
    if p.cls == "cor":
        order = [_key(p), f"cor_{p.group}", "cor"]
    elif p.cls == "sd":
        order = [p.name, f"sd_{p.group}", "sd"]
    else:
        order = [p.name, p.cls]
    for k in order:
        if k in parsed:
            return k, parsed[k]
    return None


def _warn_improper(pr: ResolvedPriors, n_groups: int) -> None:
    """Warn where a flat (or heavy, unbounded) prior can leave the posterior improper."""
    for p, d in zip(pr.params, pr.dists):
        if p.cls == "sd" and d.family == "flat" and n_groups < 5:
            warnings.warn(
                f"prior of {p.name} is flat with only {n_groups} group(s): the likelihood "
                "of a random-effect SD does not vanish as it grows, so with few groups the "
                "posterior can be improper (no finite mass); give it a proper prior such as "
                "student_t(3, 0, s) or exponential(rate)",
                UserWarning,
                stacklevel=4,
            )
        if p.cls == "sigma" and d.family == "flat":
            warnings.warn(
                "prior of sigma is flat (improper): the posterior is proper only with "
                "enough events; consider student_t(3, 0, s) or exponential(rate)",
                UserWarning,
                stacklevel=4,
            )


# -- log densities ------------------------------------------------------------------------------
def log_density(d: Dist, x, *, truncate: bool = False) -> np.ndarray:
    """The normalised log density of ``d`` at ``x`` (numpy), truncated to x > 0 with
    ``truncate`` (``sd``, ``sigma``): ``−inf`` outside the support; ``flat`` is 0.

    >>> round(float(log_density(parse("normal(0, 1)"), 0.0)), 6)
    -0.918939
    >>> round(float(log_density(parse("normal(0, 1)"), 0.5, truncate=True)), 6)  # half-normal
    -0.350791

    """
    x = np.asarray(x, dtype=float)
    f = d.family
    if f == "flat":
        out = np.zeros_like(x)
    elif f == "lkj":
        raise ValueError("lkj is a density of correlation matrices: see lkj_log_norm")
    else:
        out = _scipy(d).logpdf(x)
    if truncate:
        out = np.where(x > 0, out - log_mass_above_zero(d), -np.inf)
    return out


def _scipy(d: Dist):
    from scipy import stats

    f, a = d.family, d.args
    if f == "normal":
        return stats.norm(a[0], a[1])
    if f == "student_t":
        return stats.t(a[0], a[1], a[2])
    if f == "cauchy":
        return stats.cauchy(a[0], a[1])
    if f == "exponential":
        return stats.expon(scale=1.0 / a[0])
    if f == "gamma":
        return stats.gamma(a[0], scale=1.0 / a[1])
    if f == "lognormal":
        return stats.lognorm(a[1], scale=math.exp(a[0]))
    if f == "uniform":
        return stats.uniform(a[0], a[1] - a[0])
    raise ValueError(f"no scipy distribution for {d}")


def log_mass_above_zero(d: Dist) -> float:
    """``log P(X > 0)`` under ``d`` (0 for distributions on the positive reals and for
    ``flat``): what truncating it at 0 divides by."""
    if d.family in ("flat", *POSITIVE):
        return 0.0
    return float(_scipy(d).logsf(0.0))


def log_norm(d: Dist, truncate: bool) -> float:
    """The constant part of ``log_density(d, x)`` (what does not depend on x), for the
    compiled densities, which compute only the part that does."""
    f, a = d.family, d.args
    c = 0.0
    if f == "normal":
        c = -math.log(a[1]) - 0.5 * math.log(2 * math.pi)
    elif f == "student_t":
        nu, s = a[0], a[2]
        c = (
            math.lgamma((nu + 1) / 2)
            - math.lgamma(nu / 2)
            - 0.5 * math.log(nu * math.pi)
            - math.log(s)
        )
    elif f == "cauchy":
        c = -math.log(math.pi * a[1])
    elif f == "exponential":
        c = math.log(a[0])
    elif f == "gamma":
        c = a[0] * math.log(a[1]) - math.lgamma(a[0])
    elif f == "lognormal":
        c = -math.log(a[1]) - 0.5 * math.log(2 * math.pi)
    elif f == "uniform":
        c = -math.log(a[1] - a[0])
    if truncate:
        c -= log_mass_above_zero(d)
    return c


def lkj_log_norm(K: int, eta: float) -> float:
    """The log normalising constant of the LKJ(η) density of a K×K correlation matrix's
    Cholesky factor (Stan's ``lkj_corr_cholesky``), from its factorisation into
    independent canonical partial correlations: the one at column ``l`` is Beta(β_l, β_l)
    on (−1, 1) with ``β_l = η + (K − 2 − l)/2``, in ``K − 1 − l`` rows.

    >>> import math
    >>> round(lkj_log_norm(2, 1.0), 12) == round(-math.log(2.0), 12)  # uniform on (−1, 1)
    True

    """
    total = 0.0
    for col in range(K - 1):
        b = eta + (K - 2 - col) / 2.0
        lbeta = 2 * math.lgamma(b) - math.lgamma(2 * b)
        total -= (K - 1 - col) * ((2 * b - 1) * math.log(2.0) + lbeta)
    return total
