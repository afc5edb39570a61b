"""Posterior: the immutable result of :meth:`streamlmm.MixedLM.sample`.

It holds the draws of the global parameters under brms's names (``b_Intercept``,
``b_std_age``, ``sd_county__Intercept``, ``cor_county__Intercept__std_age``,
``sigma``), the sampler's statistics, every group's effect summarised with
Rao-Blackwellised moments (O(groups) memory), and what is needed to compute a group's
effect exactly at every draw (its blocks of the statistics, Λ̃, β̃ and σ of each draw),
so that :meth:`Posterior.ranef` and :meth:`Posterior.posterior_predictive` work after a
reload too. It records the priors (as given and as resolved), the sampler settings,
the seed and the statistics it covers (events and source offsets).

Diagnostics (R-hat, ESS, MCSE) are ArviZ's (``arviz-stats``); :meth:`to_arviz` gives
ArviZ's ``DataTree``, so ``az.summary`` and ``az.plot_trace`` work on it. A check that
fails is a :class:`~streamlmm.SamplingWarning` that says what it means and what to try
(:func:`sampling_messages`).

A posterior saves and loads with the snapshot store's checksummed container (no
pickle): :meth:`Posterior.to_bytes`, :meth:`Posterior.save` (a ``posterior-…`` file in
a snapshot directory), :meth:`Posterior.load`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from streamlmm.bayes import groups as grp
from streamlmm.checks import SamplingWarning
from streamlmm.snapshot import SnapshotError, open_container, seal_container

__all__ = ["Posterior", "sampling_messages", "MAGIC", "FORMAT_VERSION", "RHAT_MAX", "ESS_MIN"]

MAGIC = b"SLMMPOST"
FORMAT_VERSION = 1
RHAT_MAX = 1.01
ESS_MIN = 100  # per chain
EBFMI_MIN = 0.3
SUMMARY_COLUMNS = (
    "mean",
    "sd",
    "q2.5",
    "q97.5",
    "mcse_mean",
    "mcse_sd",
    "ess_bulk",
    "ess_tail",
    "r_hat",
)
_STATS_ARVIZ = {  # our name -> ArviZ's sample_stats name
    "diverging": "diverging",
    "energy": "energy",
    "tree_depth": "tree_depth",
    "maxdepth_reached": "reached_max_treedepth",
    "step_size": "step_size",
    "lp": "lp",
    "n_steps": "n_steps",
    "acceptance": "acceptance_rate",
}


def _ro(a, dtype=float) -> np.ndarray:
    a = np.array(a, dtype=dtype)
    a.setflags(write=False)
    return a


class Posterior:
    """Draws of a mixed model's posterior and everything derived from them (immutable).

    Build one with :meth:`streamlmm.MixedLM.sample`. Attributes: ``names`` (brms's
    parameter names), ``chains``, ``n_draws``, ``group`` (the grouping factor),
    ``keys`` (the groups, in the order of their keys), ``re_names`` (the random-effect
    coefficients), ``priors`` (``given``/``resolved``/``source``), ``settings``,
    ``seed``, ``n_events``, ``offsets``, ``seconds`` (sampling time), ``warnings``
    (the :class:`~streamlmm.SamplingWarning` messages).
    """

    __slots__ = (
        "names",
        "formula",
        "group",
        "keys",
        "re_names",
        "priors",
        "settings",
        "seed",
        "n_events",
        "offsets",
        "seconds",
        "meta",
        "design_state",
        "warnings",
        "_draws",
        "_stats",
        "_x",
        "_step",
        "_rb_mean",
        "_rb_cov",
        "_F",
        "_lam",
        "_beta_t",
        "_sigma",
        "_Tz",
        "_perm",
        "_ranef_draws",
        "_cache",
        "_index",
        "_frozen",
    )

    def __init__(
        self,
        *,
        names,
        draws,
        stats: Mapping[str, np.ndarray],
        x,
        step_size,
        formula: str,
        group: str,
        keys,
        re_names,
        rb_mean,
        rb_cov,
        F,
        lam,
        beta_t,
        sigma,
        Tz,
        perm,
        priors: Mapping[str, Any],
        settings: Mapping[str, Any],
        seed: int,
        n_events: int,
        offsets: Mapping[str, int] | None = None,
        seconds: float = math.nan,
        meta: Mapping[str, Any] | None = None,
        design_state: Mapping[str, Any] | None = None,
        warnings: tuple[str, ...] | None = None,
        ranef_draws=None,
    ):
        put = object.__setattr__
        put(self, "_frozen", False)
        put(self, "names", tuple(names))
        put(self, "formula", str(formula))
        put(self, "group", str(group))
        put(self, "keys", tuple(keys))
        put(self, "re_names", tuple(re_names))
        put(self, "priors", MappingProxyType(dict(priors)))
        put(self, "settings", MappingProxyType(dict(settings)))
        put(self, "seed", int(seed))
        put(self, "n_events", int(n_events))
        put(self, "offsets", MappingProxyType({str(k): int(v) for k, v in (offsets or {}).items()}))
        put(self, "seconds", float(seconds))
        put(self, "meta", MappingProxyType(dict(meta or {})))
        put(self, "design_state", dict(design_state) if design_state is not None else None)
        put(self, "_draws", _ro(draws))
        put(self, "_stats", {k: _ro(v, np.asarray(v).dtype) for k, v in stats.items()})
        put(self, "_x", _ro(x))
        put(self, "_step", _ro(step_size))
        put(self, "_rb_mean", _ro(rb_mean))
        put(self, "_rb_cov", _ro(rb_cov))
        put(self, "_F", _ro(F))
        put(self, "_lam", _ro(lam))
        put(self, "_beta_t", _ro(beta_t))
        put(self, "_sigma", _ro(sigma))
        put(self, "_Tz", _ro(Tz))
        put(self, "_perm", _ro(perm, np.int64))
        put(self, "_ranef_draws", None if ranef_draws is None else _ro(ranef_draws))
        put(self, "_cache", {})
        put(self, "_index", None)
        if self._draws.ndim != 3 or self._draws.shape[2] != len(self.names):
            raise ValueError("draws must be (chains, draws, parameters)")
        msgs = sampling_messages(self) if warnings is None else tuple(warnings)
        put(self, "warnings", tuple(msgs))
        put(self, "_frozen", True)

    def __setattr__(self, name, value):
        raise AttributeError("a Posterior is immutable")

    def __delattr__(self, name):
        raise AttributeError("a Posterior is immutable")

    def __repr__(self) -> str:
        return (
            f"Posterior({self.formula!r}, chains={self.chains}, draws={self.n_draws}, "
            f"groups={len(self.keys)}, events={self.n_events})"
        )

    # -- shape ------------------------------------------------------------------------------
    @property
    def chains(self) -> int:
        return int(self._draws.shape[0])

    @property
    def n_draws(self) -> int:
        return int(self._draws.shape[1])

    @property
    def step_size(self) -> np.ndarray:
        """The adapted step size of each chain."""
        return self._step

    @property
    def unconstrained(self) -> np.ndarray:
        """The sampler's draws (chains, draws, dim), in its unconstrained coordinates."""
        return self._x

    # -- the draws --------------------------------------------------------------------------
    def draws(self) -> dict[str, np.ndarray]:
        """Parameter name → draws (chains, draws), read-only. With group effects kept
        (``sample(keep_ranef=True)``), also brms's ``r_<group>[<key>,<coef>]``."""
        out = {n: self._draws[:, :, i] for i, n in enumerate(self.names)}
        if self._ranef_draws is not None:
            C, D = self.chains, self.n_draws
            for gi, key in enumerate(self.keys):
                for a, coef in enumerate(self.re_names):
                    c = "Intercept" if coef == "(Intercept)" else coef
                    out[f"r_{self.group}[{key},{c}]"] = self._ranef_draws[:, gi, a].reshape(C, D)
        return out

    def to_arviz(self):
        """ArviZ's ``DataTree``: group ``posterior`` (one variable per parameter, dims
        chain × draw) and ``sample_stats`` (ArviZ's names: ``diverging``, ``energy``,
        ``tree_depth``, ``reached_max_treedepth``, ``step_size``, ``lp``, ``n_steps``,
        ``acceptance_rate``), so ``az.summary`` and ``az.plot_trace`` work."""
        got = self._cache.get("arviz")
        if got is not None:
            return got
        import arviz as az

        post = {n: np.asarray(self._draws[:, :, i]) for i, n in enumerate(self.names)}
        ss = {_STATS_ARVIZ[k]: np.asarray(v) for k, v in self._stats.items() if k in _STATS_ARVIZ}
        dt = az.from_dict({"posterior": post, "sample_stats": ss})
        self._cache["arviz"] = dt
        return dt

    # -- summaries --------------------------------------------------------------------------
    def summary(self):
        """One row per parameter (brms's names): ``mean, sd, q2.5, q97.5, mcse_mean,
        mcse_sd, ess_bulk, ess_tail, r_hat``, all from ArviZ (``az.summary`` with
        equal-tailed 95% intervals: the 2.5% and 97.5% quantiles)."""
        got = self._cache.get("summary")
        if got is None:
            import arviz as az

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                s = az.summary(self.to_arviz(), ci_prob=0.95, ci_kind="eti", round_to="none")
            s = s.rename(columns={"eti95_lb": "q2.5", "eti95_ub": "q97.5"})
            got = s.loc[list(self.names), list(SUMMARY_COLUMNS)].astype(float)
            self._cache["summary"] = got
        return got.copy()

    def quantiles(self, probs) -> Any:
        """Posterior quantiles of every parameter (rows) at ``probs`` (columns), from the
        pooled draws (ArviZ's ``quantile``)."""
        import pandas as pd
        from arviz_stats.base import array_stats

        probs = np.atleast_1d(np.asarray(probs, dtype=float))
        flat = self._draws.reshape(-1, len(self.names))
        q = np.asarray(array_stats.quantile(flat, probs, axis=0))  # (parameters, probs)
        return pd.DataFrame(q, index=list(self.names), columns=list(probs))

    @property
    def diagnostics(self) -> Mapping[str, np.ndarray]:
        """Per chain: ``divergences`` (count after warm-up), ``tree_depth`` (mean depth),
        ``max_tree_depth_hits`` (transitions that hit the maximum depth), ``step_size``
        (adapted), ``ebfmi`` (ArviZ's E-BFMI)."""
        got = self._cache.get("diagnostics")
        if got is None:
            st = self._stats
            got = MappingProxyType(
                {
                    "divergences": _ro(np.sum(st["diverging"], axis=1), np.int64),
                    "tree_depth": _ro(np.mean(st["tree_depth"], axis=1)),
                    "max_tree_depth_hits": _ro(np.sum(st["maxdepth_reached"], axis=1), np.int64),
                    "step_size": self._step,
                    "ebfmi": _ro(_ebfmi(st["energy"])),
                }
            )
            self._cache["diagnostics"] = got
        return got

    # -- group effects ----------------------------------------------------------------------
    def _row(self, key) -> int:
        idx = self._index
        if idx is None:
            idx = {k: i for i, k in enumerate(self.keys)}
            object.__setattr__(self, "_index", idx)
        r = idx.get(key)
        if r is None:
            raise KeyError(f"group {key!r} is not in the posterior (no events of it were learned)")
        return r

    def _user(self, a: np.ndarray, axis: int) -> np.ndarray:
        """Problem column order → the user's (``perm[a]`` is user position of column a)."""
        out = np.empty_like(a)
        idx = [slice(None)] * a.ndim
        for j, u in enumerate(self._perm):
            src = list(idx)
            src[axis] = j
            dst = list(idx)
            dst[axis] = int(u)
            out[tuple(dst)] = a[tuple(src)]
        return out

    def ranef(self, key=None):
        """A group's effect: DataFrame indexed by coefficient with ``mean, sd, q2.5,
        q97.5``.

        Mean and sd are Rao-Blackwellised over every draw (the mean of the conditional
        means; the mean conditional variance plus the variance of the conditional
        means). The quantiles are those of the group's exact posterior, the mixture of
        its Gaussian conditionals over the draws (computed for the one group asked).
        Without ``key``: every group (rows ``(key, coefficient)``), with quantiles from
        a normal approximation at the Rao-Blackwellised mean and sd.
        """
        import pandas as pd

        cols = ["mean", "sd", "q2.5", "q97.5"]
        if key is None:
            m = self._user(np.asarray(self._rb_mean), 1)
            sd = np.sqrt(np.clip(np.diagonal(self._rb_cov, axis1=1, axis2=2), 0.0, None))
            sd = self._user(sd, 1)
            z = 1.959963984540054
            idx = pd.MultiIndex.from_product([list(self.keys), list(self.re_names)])
            data = np.column_stack(
                [m.ravel(), sd.ravel(), (m - z * sd).ravel(), (m + z * sd).ravel()]
            )
            return pd.DataFrame(data, index=idx, columns=cols)
        r = self._row(key)
        q = len(self.re_names)
        p = self._beta_t.shape[1]
        mean, cov = grp.conditionals(
            self._F[r], q, p, self._lam, self._beta_t, self._sigma, self._Tz
        )
        rows = []
        mu = np.asarray(self._rb_mean[r])
        var = np.diagonal(self._rb_cov[r])
        for a in range(q):
            sd_d = np.sqrt(np.clip(cov[:, a, a], 0.0, None))
            lo, hi = grp.mixture_quantiles(mean[:, a], sd_d, [0.025, 0.975])
            rows.append([mu[a], math.sqrt(max(var[a], 0.0)), lo, hi])
        out = np.array(rows)[np.argsort(self._perm)]
        return pd.DataFrame(out, index=list(self.re_names), columns=cols)

    def ranef_cov(self, key) -> np.ndarray:
        """A group's posterior covariance of its effect (user column order)."""
        c = np.asarray(self._rb_cov[self._row(key)])
        inv = np.argsort(self._perm)
        return c[np.ix_(inv, inv)]

    # -- predictive ---------------------------------------------------------------------------
    def _design(self):
        from streamlmm.design import Design

        if self.design_state is None:
            raise ValueError("this posterior carries no design: it cannot encode rows")
        d = self._cache.get("design")
        if d is None:
            d = self._cache["design"] = Design.from_state(self.formula, self.design_state)
        return d

    def parameter_draws(self, draws: int | None = None) -> dict[str, np.ndarray]:
        """Draws of ``beta`` (lme4's fixed effects), ``sd``, ``cor`` (user column order) and
        ``sigma``, pooled over chains and thinned evenly to ``draws`` of them."""
        idx = _thin(self.chains * self.n_draws, draws)
        flat = self._draws.reshape(-1, len(self.names))[idx]
        d = self._design()
        p, q = len(d.fixed), len(self.re_names)
        out = {"beta": flat[:, :p], "sd": flat[:, p : p + q], "sigma": flat[:, -1]}
        cor = np.tile(np.eye(q), (flat.shape[0], 1, 1))
        j = p + q
        for blk in d.blocks:
            for i, a in enumerate(blk):
                for b in blk[i + 1 :]:
                    cor[:, a, b] = cor[:, b, a] = flat[:, j]
                    j += 1
        out["cor"] = cor
        out["index"] = idx
        return out

    def posterior_predictive(self, X, draws: int | None = 200, seed: int | None = None):
        """Responses simulated at the rows of ``X`` (a DataFrame with the formula's fields
        and the group column): an array (draws, rows). Each row's group effect is drawn
        exactly from its conditional at each draw (a group the posterior has not seen:
        from ``N(0, Σ)``); ``draws`` thins the posterior evenly (``None``: all)."""
        from streamlmm.bayes import predictive

        A, keys = predictive.design_rows(self._design(), X, self.group)
        return self.predictive_at(A, keys, draws=draws, seed=seed)

    def predictive_at(self, A: np.ndarray, keys, draws: int | None = 200, seed: int | None = None):
        """:meth:`posterior_predictive` at rows given as union columns ``A`` (the design's
        columns, e.g. the model's reservoir ``m._res.A``) and their group keys."""
        from streamlmm.bayes import predictive

        design = self._design()
        A = np.asarray(A, dtype=float)
        if A.ndim != 2 or A.shape[1] != len(design.columns) or len(keys) != A.shape[0]:
            raise ValueError(
                f"A must be (rows, {len(design.columns)}) union columns with one key per row"
            )
        par = self.parameter_draws(draws)
        idx = par["index"]
        rng = np.random.default_rng(self.seed if seed is None else seed)
        D, q = idx.shape[0], len(self.re_names)
        b = np.zeros((D, len(keys), q))
        seen = [i for i, k in enumerate(keys) if _has(self, k)]
        unseen = [i for i in range(len(keys)) if i not in set(seen)]
        if seen:
            uniq = sorted({self._row(keys[i]) for i in seen})
            pos = {r: j for j, r in enumerate(uniq)}
            bd = grp.draws(
                self._F,
                q,
                self._beta_t.shape[1],
                self._lam[idx],
                self._beta_t[idx],
                self._sigma[idx],
                self._Tz,
                np.array(uniq),
                rng,
            )
            bd = self._user(bd, 2)
            for i in seen:
                b[:, i] = bd[:, pos[self._row(keys[i])]]
        if unseen:
            codes = {}
            cc = np.array([codes.setdefault(keys[i], len(codes)) for i in unseen])
            b[:, unseen] = predictive.prior_effects(par, cc, rng)
        return predictive.simulate(A, design, par, b, rng)

    # -- persistence ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The checksummed container of the snapshot store (no pickle)."""
        header = {
            "names": list(self.names),
            "formula": self.formula,
            "group": self.group,
            "keys": list(self.keys),
            "re_names": list(self.re_names),
            "priors": _jsonable(dict(self.priors)),
            "settings": _jsonable(dict(self.settings)),
            "seed": self.seed,
            "n_events": self.n_events,
            "offsets": dict(self.offsets),
            "seconds": self.seconds,
            "meta": _jsonable(dict(self.meta)),
            "design": self.design_state,
            "warnings": list(self.warnings),
            "stats": {k: str(v.dtype) for k, v in self._stats.items()},
            "ranef_draws": self._ranef_draws is not None,
        }
        arrays = {
            "draws": self._draws,
            "x": self._x,
            "step": self._step,
            "rb_mean": self._rb_mean,
            "rb_cov": self._rb_cov,
            "F": self._F,
            "lam": self._lam,
            "beta_t": self._beta_t,
            "sigma": self._sigma,
            "Tz": self._Tz,
            "perm": self._perm.astype(float),
            **{f"stats.{k}": v.astype(float) for k, v in self._stats.items()},
        }
        if self._ranef_draws is not None:
            arrays["ranef_draws"] = self._ranef_draws
        return seal_container(MAGIC, FORMAT_VERSION, header, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> Posterior:
        """Parse and verify :meth:`to_bytes`; a ``SnapshotError`` says what is wrong."""
        h, a = open_container(data, MAGIC, FORMAT_VERSION, "posterior")
        try:
            stats = {k: a[f"stats.{k}"].astype(dt) for k, dt in h["stats"].items()}
            return cls(
                names=h["names"],
                draws=a["draws"],
                stats=stats,
                x=a["x"],
                step_size=a["step"],
                formula=h["formula"],
                group=h["group"],
                keys=h["keys"],
                re_names=h["re_names"],
                rb_mean=a["rb_mean"],
                rb_cov=a["rb_cov"],
                F=a["F"],
                lam=a["lam"],
                beta_t=a["beta_t"],
                sigma=a["sigma"],
                Tz=a["Tz"],
                perm=a["perm"].astype(np.int64),
                priors=h["priors"],
                settings=h["settings"],
                seed=h["seed"],
                n_events=h["n_events"],
                offsets=h["offsets"],
                seconds=h["seconds"],
                meta=h["meta"],
                design_state=h["design"],
                warnings=tuple(h["warnings"]),
                ranef_draws=a.get("ranef_draws") if h["ranef_draws"] else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"posterior header is malformed: {e}") from e

    def save(self, directory) -> str:
        """Write atomically into a snapshot directory as its newest ``posterior-…`` file
        (beside the snapshots); returns the path."""
        from streamlmm.store import LocalStore

        return str(LocalStore(directory, kind="posterior").write(self))

    @classmethod
    def load(cls, directory) -> Posterior:
        """The newest valid posterior in ``directory`` (a corrupt newest file falls back
        to the previous one); ``FileNotFoundError`` if there is none."""
        from streamlmm.store import LocalStore

        store = LocalStore(directory, kind="posterior", reader=cls.from_bytes)
        if not store.dir.exists():
            raise FileNotFoundError(f"snapshot directory {directory} does not exist")
        got = store.latest()
        if got is None:
            raise FileNotFoundError(f"no valid posterior in {directory}")
        return got


def _has(post: Posterior, key) -> bool:
    try:
        post._row(key)
    except KeyError:
        return False
    return True


def _thin(total: int, draws: int | None) -> np.ndarray:
    if draws is None or draws >= total:
        return np.arange(total)
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws must be a positive int or None, got {draws!r}")
    return np.unique(np.linspace(0, total - 1, draws).round().astype(np.int64))


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _ebfmi(energy: np.ndarray) -> np.ndarray:
    """ArviZ's E-BFMI per chain."""
    from arviz_stats.base import array_stats

    return np.asarray(array_stats.bfmi(np.asarray(energy, dtype=float)), dtype=float)


# -- checks --------------------------------------------------------------------------------
def sampling_messages(post: Posterior) -> tuple[str, ...]:
    """The sampler checks that fail, each saying what it means and what to try: R-hat >
    1.01, bulk or tail ESS < 100 per chain, any divergence, tree-depth saturation,
    E-BFMI < 0.3."""
    out = []
    s = post.summary()
    bad = s.index[s["r_hat"] > RHAT_MAX].tolist()
    if bad:
        out.append(
            f"R-hat above {RHAT_MAX} for {', '.join(bad)} (max {s['r_hat'].max():.3f}): the "
            "chains disagree, so they have not all converged to the posterior; run longer "
            "(more warmup and draws), or check the model and priors"
        )
    need = ESS_MIN * post.chains
    low = s.index[(s["ess_bulk"] < need) | (s["ess_tail"] < need)].tolist()
    if low:
        out.append(
            f"effective sample size below {ESS_MIN} per chain ({need} in all) for "
            f"{', '.join(low)} (min bulk {s['ess_bulk'].min():.0f}, min tail "
            f"{s['ess_tail'].min():.0f}): the summary's means and intervals are imprecise; "
            "draw more"
        )
    dg = post.diagnostics
    ndiv = int(np.sum(dg["divergences"]))
    if ndiv:
        out.append(
            f"{ndiv} divergent transition(s) after warm-up: the sampler met curvature it "
            "could not follow, so the draws may be biased; raise target_accept (e.g. 0.95) "
            "or give the SDs and sigma more informative priors"
        )
    hits = int(np.sum(dg["max_tree_depth_hits"]))
    if hits:
        out.append(
            f"{hits} transition(s) hit the maximum tree depth "
            f"({post.settings.get('max_depth', '?')}): the trajectories were cut short, so "
            "the chains explore slowly; raise max_depth, or look for a badly scaled or "
            "weakly identified parameter (more informative priors)"
        )
    eb = dg["ebfmi"]
    low_eb = [i for i, v in enumerate(eb) if v < EBFMI_MIN]
    if low_eb:
        out.append(
            f"E-BFMI below {EBFMI_MIN} in chain(s) {low_eb} "
            f"({', '.join(f'{eb[i]:.2f}' for i in low_eb)}): "
            "the sampler's energy changes too little between draws to explore the "
            "posterior's tails; use a longer warm-up or more informative priors"
        )
    return tuple(out)


def warn(post: Posterior) -> None:
    """Emit each of the posterior's failed checks as a :class:`~streamlmm.SamplingWarning`."""
    for m in post.warnings:
        warnings.warn(m, SamplingWarning, stacklevel=3)
