"""An lme4-style ``summary()`` of a snapshot, as text or as a JSON-ready dict.

The layout follows lme4's ``print(summary(fit))``: the formula and method, the REML
criterion (REML fits) or AIC, BIC, logLik, deviance and residual degrees of freedom (ML
fits), scaled residual quantiles, the random effects in ``VarCorr`` layout, the fixed
effects with standard errors and t values, the correlation of the fixed effects, the
counts, and the warnings. Below that come the snapshot's source offsets and, on request,
every group's effects and a comparison with a simulation's truth.

Reading never creates anything: a missing directory is an error.

>>> from streamlmm import MixedLM
>>> m = MixedLM("y ~ x + (1 | g)")
>>> for i in range(60):
...     m.learn_one({"g": i % 6, "x": float(i % 5)}, 1.0 + 0.5 * (i % 5) + (i % 6) + 0.3 * (i % 4))
>>> text = format_summary(m.fit().snapshot())
>>> print(text.splitlines()[0])
Linear mixed model fit by REML
>>> "Number of obs: 60, groups:  g, 6" in text
True

"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamlmm.formula import parse_formula
from streamlmm.keys import key_label
from streamlmm.snapshot import Snapshot
from streamlmm.values import count_text

__all__ = [
    "load_snapshot",
    "n_parameters",
    "information_criteria",
    "fixef_correlation",
    "varcorr_rows",
    "group_rows",
    "check_truth",
    "compare_with_truth",
    "summary_dict",
    "abbreviate",
    "format_summary",
    "summary_command",
]

QUANTILE_NAMES = ("min", "1Q", "median", "3Q", "max")
MAX_CORRELATION_P = 12  # lme4.summary.cor.max: larger correlation tables are not printed


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """The newest valid snapshot in a directory, or the one in a snapshot file, without
    creating anything.

    Raises ``FileNotFoundError`` for a missing path or a directory with no valid snapshot.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no snapshot directory {os.fspath(path)!r}")
    return Snapshot.load(path)


def n_parameters(snap: Snapshot) -> int:
    """Parameters as lme4 counts them for AIC/BIC: p fixed effects, every θ, and σ."""
    return len(snap.fixef) + len(snap.theta) + 1


def information_criteria(snap: Snapshot) -> dict[str, float | None]:
    """``logLik``, ``AIC``, ``BIC``, ``deviance``, ``df.resid`` as lme4 reports them.

    ``logLik`` is −criterion/2: the ML log-likelihood for ML fits, the REML one (lme4's
    ``logLik()`` of a REML fit) for REML fits. lme4's summary prints AIC and BIC only
    for ML fits; here they are ``None`` for REML fits.

    >>> from types import SimpleNamespace as NS
    >>> s = NS(method="ML", criterion=100.0, n_obs=50.0, fixef={"a": 1, "b": 2},
    ...        theta=np.ones(1))
    >>> information_criteria(s)["AIC"], information_criteria(s)["df.resid"]
    (108.0, 46.0)

    """
    k = n_parameters(snap)
    ll = -snap.criterion / 2.0
    out: dict[str, float | None] = {
        "logLik": ll,
        "npar": float(k),
        "df.resid": snap.n_obs - k,
        "AIC": None,
        "BIC": None,
        "deviance": None,
    }
    if snap.method == "ML":
        out.update(
            AIC=-2.0 * ll + 2.0 * k,
            BIC=-2.0 * ll + k * math.log(snap.n_obs) if snap.n_obs > 0 else math.nan,
            deviance=snap.criterion,
        )
    return out


def fixef_correlation(snap: Snapshot) -> np.ndarray:
    """Correlation matrix of the fixed effects, from ``fixef_vcov``."""
    v = np.asarray(snap.fixef_vcov, dtype=float)
    sd = np.sqrt(np.diag(v))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.outer(sd, sd) > 0, v / np.outer(sd, sd), np.nan)


def varcorr_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """lme4's ``VarCorr`` rows: grouping factor, name, variance, SD, correlations.

    One row per random effect, then ``Residual``. As lme4 prints it, each random-effects
    term is its own block: the group's name on its first row (``g``, ``g.1``, … for
    further terms on the same factor) and correlations only within the term.
    """
    group = parse_formula(snap.formula).group
    cov = np.asarray(snap.re_cov)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    blocks = snap._encoder().blocks or (tuple(range(len(snap.re_names))),)
    rows = []
    for t, block in enumerate(blocks):
        label = group if t == 0 else f"{group}.{t}"
        for pos, i in enumerate(block):
            corr = [
                float(cov[i, j] / (sd[i] * sd[j])) if sd[i] * sd[j] > 0 else 0.0
                for j in block[:pos]
            ]
            rows.append(
                {
                    "groups": label if pos == 0 else "",
                    "name": snap.re_names[i],
                    "variance": float(cov[i, i]),
                    "sd": float(sd[i]),
                    "corr": corr,
                }
            )
    rows.append(
        {
            "groups": "Residual",
            "name": "",
            "variance": snap.sigma**2,
            "sd": snap.sigma,
            "corr": [],
        }
    )
    return rows


def group_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """Per group: key, size n, raw mean response, BLUPs, conditional SDs, shrinkage."""
    out = []
    for i, key in enumerate(snap.keys):
        cv = np.sqrt(np.clip(np.diagonal(snap.condvar[i]), 0.0, None))
        out.append(
            {
                "group": key,
                "n": float(snap.group_n[i]),
                "raw_mean": float(snap.group_ybar[i]),
                "ranef": snap.ranef_row(i),
                "cond_sd": dict(zip(snap.re_names, map(float, cv))),
                "shrinkage": snap.shrinkage(key),
            }
        )
    return out


def check_truth(snap: Snapshot, truth: Any) -> None:
    """``ValueError`` unless ``truth`` can be the simulation behind ``snap``: the same
    response and grouping factor, no more events than it simulated, and groups in
    common. A fit of another formula on the same data (fewer terms, other slopes) may
    be compared; another scenario's or another simulation's truth may not.

    >>> from types import SimpleNamespace as NS
    >>> snap = NS(formula="y ~ x1 + (1 | g)", n_events=10, n_groups=1, keys=("g1",))
    >>> check_truth(snap, {"formula": "y ~ x1 + x2 + (1 + x1 | g)", "fixef": {},
    ...                    "groups": {"g1": {}}, "n_events": 10})
    >>> check_truth(snap, {"scenario": "web", "formula": "bounce ~ age + (1 | county)",
    ...                    "fixef": {}})
    Traceback (most recent call last):
    ...
    ValueError: the truth is of scenario 'web', bounce ~ age + (1 | county): response 'bounce' ...

    """
    if not isinstance(truth, Mapping) or not isinstance(truth.get("formula"), str):
        raise ValueError("not a simulation's truth (no formula): see `streamlmm simulate`")
    try:
        t = parse_formula(truth["formula"])
    except ValueError as e:
        raise ValueError(f"the truth's formula does not parse: {e}") from None
    f = parse_formula(snap.formula)
    what = f"the truth is of scenario {truth.get('scenario', '?')!r}, {truth['formula']}"
    if (t.response_field, t.group) != (f.response_field, f.group):
        raise ValueError(
            f"{what}: response {t.response_field!r} and groups {t.group!r}, not the "
            f"snapshot's {f.response_field!r} and {f.group!r} ({snap.formula})"
        )
    n = truth.get("n_events")
    if isinstance(n, (int, float)) and snap.n_events > n:
        raise ValueError(
            f"{what} of {n:,.0f} events, but the snapshot holds {snap.n_events:,}: it is "
            "another simulation's truth"
        )
    groups = truth.get("groups")
    if isinstance(groups, Mapping) and groups and snap.n_groups:
        if not any(str(k) in groups for k in snap.keys):
            raise ValueError(f"{what}: none of the snapshot's groups is in it")


def compare_with_truth(snap: Snapshot, truth: Mapping[str, Any]) -> dict[str, Any]:
    """Estimates beside a simulation's truth (see :mod:`streamlmm.simulate`).

    Returns ``rows`` (parameter, estimate, truth, difference and, for fixed effects,
    the difference in standard errors ``z``) and ``groups``: how well the BLUPs recover
    the true group effects (correlation and RMSE per random effect, over groups in
    both), plus the drifting group's estimate when the truth has one. A truth that
    cannot be the snapshot's simulation is a ``ValueError`` (:func:`check_truth`).
    """
    check_truth(snap, truth)
    rows: list[dict[str, Any]] = []

    def row(kind: str, name: str, est: float, true: float | None, se: float | None = None):
        diff = None if true is None else est - true
        z = None if diff is None or not se else diff / se
        rows.append(
            {"kind": kind, "name": name, "estimate": est, "truth": true, "diff": diff, "z": z}
        )

    tf = truth.get("fixef", {})
    for k, v in snap.fixef.items():
        row("fixef", k, float(v), tf.get(k), snap.fixef_se.get(k))
    sd = np.sqrt(np.clip(np.diag(snap.re_cov), 0.0, None))
    tsd = truth.get("re_sd", {})
    tnames = truth.get("re_names", [])
    tcorr = np.asarray(truth.get("re_corr", [[1.0]]), dtype=float)
    for i, name in enumerate(snap.re_names):
        row("re_sd", name, float(sd[i]), tsd.get(name))
    for i in range(len(snap.re_names)):
        for j in range(i):
            a, b = snap.re_names[i], snap.re_names[j]
            est = float(snap.re_cov[i, j] / (sd[i] * sd[j])) if sd[i] * sd[j] > 0 else 0.0
            t = None
            if a in tnames and b in tnames:
                t = float(tcorr[tnames.index(a), tnames.index(b)])
            row("re_corr", f"{b},{a}", est, t)
    row("sigma", "Residual", snap.sigma, truth.get("sigma"))

    tg = truth.get("groups", {})
    recovery: dict[str, Any] = {}
    common = [(i, str(k)) for i, k in enumerate(snap.keys) if str(k) in tg]
    for j, name in enumerate(snap.re_names):
        pairs = [(snap.b[i, j], tg[k][name]) for i, k in common if name in tg[k]]
        if len(pairs) >= 3:
            est, true = np.array(pairs).T
            recovery[name] = {
                "groups": len(pairs),
                "corr": float(np.corrcoef(est, true)[0, 1]),
                "rmse": float(np.sqrt(np.mean((est - true) ** 2))),
            }
    out: dict[str, Any] = {"rows": rows, "groups": recovery}
    drift = truth.get("drift")
    if drift:
        est = math.nan  # the drifting group may not be in the snapshot (yet)
        if drift["group"] in snap:
            est = snap.ranef(drift["group"]).get(drift["term"], math.nan)
        out["drift"] = dict(drift, estimate=float(est))
    return out


def _approximate(rq: Mapping[str, float]) -> bool:
    """Whether residual quantiles come from a sample rather than every event."""
    return not (rq.get("events") is not None and rq.get("events") == rq.get("of"))


def _residual_source(rq: Mapping[str, float]) -> str:
    """What the "Scaled residuals" line is computed from.

    >>> _residual_source({"events": 10.0, "of": 10.0})
    " (every event, at this fit's estimates)"
    >>> _residual_source({"events": 10_000.0, "of": 2e6})
    " (a uniform sample of 10,000 of 2,000,000 events, at this fit's estimates)"

    """
    n, of = rq.get("events"), rq.get("of")
    if n is None or of is None:
        return " (approximate: from a sample of residuals)"
    if n == of:
        return " (every event, at this fit's estimates)"
    return f" (a uniform sample of {n:,.0f} of {of:,.0f} events, at this fit's estimates)"


def summary_dict(
    snap: Snapshot, *, groups: bool = False, truth: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Everything :func:`format_summary` prints, JSON-ready."""
    d = snap.to_dict()
    d.update(
        group_factor=parse_formula(snap.formula).group,
        information=information_criteria(snap),
        varcorr=varcorr_rows(snap),
        fixef_corr=fixef_correlation(snap).tolist(),
        resid_quantiles_approximate=_approximate(snap.resid_quantiles),
    )
    if groups:
        d["groups"] = group_rows(snap)
    if truth is not None:
        d["vs_truth"] = compare_with_truth(snap, truth)
    return d


# -- text ---------------------------------------------------------------------------------
def _decimals(values: Sequence[float], digits: int = 5) -> int:
    """Decimals that show about ``digits`` significant digits of the largest value."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    if not finite:
        return 3
    return int(min(6, max(0, digits - 1 - math.floor(math.log10(max(finite))))))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns right-aligned (the first ``left`` left-aligned), one space apart."""
    rows = [list(r) + [""] * (len(header) - len(r)) for r in rows]
    cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
    widths = [max(len(c) for c in col) for col in cols]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))]
        lines.append(" " + " ".join(cells).rstrip())
    return lines


def abbreviate(names: Sequence[str], minlength: int) -> list[str]:
    """R's ``abbreviate(names, minlength)``, as lme4 labels the correlation of the
    fixed effects: each name shortened to about ``minlength`` characters by dropping,
    from the right, lower-case vowels at the end of a word, then other lower-case
    vowels, then lower-case letters, then any letter but a word's first; names that
    would coincide are redone with ``minlength`` one longer, until all differ.

    >>> abbreviate(["(Intercept)", "severitymoderate", "severitysevere"], 6)
    ['(Intr)', 'svrtym', 'svrtys']
    >>> abbreviate(["age:severitymoderate", "age:severitysevere"], 6)
    ['ag:svrtym', 'ag:svrtys']

    """
    names = [n.strip(" ") for n in names]
    uniq = list(dict.fromkeys(names))
    out = list(uniq)
    todo = list(range(len(uniq)))
    m = minlength
    while todo:
        for i in todo:
            out[i] = _strip_chars(uniq[i], m)
        seen: dict[str, int] = {}
        for a in out:
            seen[a] = seen.get(a, 0) + 1
        todo = [i for i, a in enumerate(out) if seen[a] > 1]
        m += 1
    short = dict(zip(uniq, out))
    return [short[n] for n in names]


def _strip_chars(name: str, minlen: int) -> str:
    """One name through R's ``stripchars`` (``src/main/character.c``), ``use.classes``."""
    b = list(name)
    while len(b) > 1 and b[0].isspace():
        del b[0]
    nspace = 0

    def short() -> bool:
        return len(b) - nspace <= minlen

    def first(i: int) -> bool:  # the first character of a word (not of the name)
        return b[i - 1].isspace()

    def last(i: int) -> bool:  # the last character of a word
        return not b[i - 1].isspace() and (i + 1 >= len(b) or b[i + 1].isspace())

    def vowel(i: int) -> bool:
        return b[i] in "aeiou"

    def lower(i: int) -> bool:
        return b[i].islower()

    def sweep(drop) -> bool:
        for i in range(len(b) - 1, 0, -1):
            if i < len(b) and drop(i):
                del b[i]
            if short():
                return True
        return False

    if len(b) >= minlen:
        trailing = True
        for i in range(len(b) - 1, 0, -1):
            if b[i].isspace():
                if trailing:
                    del b[i:]
                else:
                    nspace += 1
            else:
                trailing = False
            if short():
                break
        else:
            _ = (
                sweep(lambda i: vowel(i) and last(i))
                or sweep(lambda i: vowel(i) and not first(i))
                or sweep(lambda i: lower(i) and last(i))
                or sweep(lambda i: lower(i) and not first(i))
                or sweep(lambda i: not first(i) and not b[i].isspace())
            )
    if len(b) > minlen:
        b = [b[0]] + [c for c in b[1:] if not c.isspace()]
    return "".join(b)


def _num(v: float | None, dec: int) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return "NaN"
    return f"{v:.{dec}f}"


def format_summary(
    snap: Snapshot, *, groups: bool = False, truth: Mapping[str, Any] | None = None
) -> str:
    """lme4-style text of :func:`summary_dict`'s content."""
    out: list[str] = []
    method = "REML" if snap.method == "REML" else "maximum likelihood"
    out.append(f"Linear mixed model fit by {method}")
    out.append(f"Formula: {snap.formula}")
    out.append("")
    info = information_criteria(snap)
    if snap.method == "REML":
        out.append(f"REML criterion at convergence: {snap.criterion:.1f}")
    else:
        keys = ("AIC", "BIC", "logLik", "deviance", "df.resid")
        vals = [f"{info[k]:.1f}" if k != "df.resid" else count_text(info[k]) for k in keys]
        out += _table(keys, [vals], left=0)
    out.append("")
    rq = snap.resid_quantiles
    if rq:
        out.append("Scaled residuals" + _residual_source(rq) + ":")
        names = ("Min", "1Q", "Median", "3Q", "Max")
        vals = [_num(rq.get(k), 4) for k in QUANTILE_NAMES]
        out += _table(names, [vals], left=0)
    else:
        out.append("Scaled residuals: not recorded in this snapshot")
    out.append("")

    out.append("Random effects:")
    vc = varcorr_rows(snap)
    dec = _decimals([r["variance"] for r in vc])
    sdec = _decimals([r["sd"] for r in vc])
    q = max((len(r["corr"]) for r in vc), default=0) + 1
    head = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] if q > 1 else [])
    body = []
    for r in vc:
        cells = [r["groups"], r["name"], _num(r["variance"], dec), _num(r["sd"], sdec)]
        if q > 1:
            cells.append(" ".join(f"{c:5.2f}" for c in r["corr"]))
        body.append(cells)
    out += _table(head, body, left=2)
    group = parse_formula(snap.formula).group
    out.append(f"Number of obs: {count_text(snap.n_obs)}, groups:  {group}, {snap.n_groups}")
    out.append("")

    out.append("Fixed effects:")
    names = list(snap.fixef)
    est = [snap.fixef[k] for k in names]
    se = [snap.fixef_se[k] for k in names]
    tv = [e / s if s > 0 else math.nan for e, s in zip(est, se)]
    de, ds, dt = _decimals(est), _decimals(se), _decimals(tv, 4)
    body = [[k, _num(e, de), _num(s, ds), _num(t, dt)] for k, e, s, t in zip(names, est, se, tv)]
    out += _table(["", "Estimate", "Std. Error", "t value"], body)
    if 1 < len(names) <= MAX_CORRELATION_P:
        out.append("")
        out.append("Correlation of Fixed Effects:")
        corr = fixef_correlation(snap)
        rows, cols = abbreviate(names, 11), abbreviate(names, 6)  # as lme4 labels them
        body = [[rows[i]] + [f"{corr[i, j]:.3f}" for j in range(i)] for i in range(1, len(names))]
        out += _table([""] + cols[:-1], body)
    elif len(names) > MAX_CORRELATION_P:
        out.append("")
        out.append(
            f"Correlation matrix not shown by default, as p = {len(names)} > "
            f"{MAX_CORRELATION_P}. Use summary_dict(snap)['fixef_corr'] or --json if you "
            "need it"
        )
    notes = []
    if snap.dropped:
        notes.append(
            f"fixed-effect model matrix is rank deficient so dropping {len(snap.dropped)} "
            f"column(s): {', '.join(snap.dropped)}"
        )
    if snap.singular:
        notes.append("boundary (singular) fit: a variance component is at (or near) zero")
    if not snap.converged:
        notes.append("not converged: the parameters are not an exact optimum yet")
    notes += list(snap.warnings)
    if notes:
        out.append("")
        out += [f"warning: {n}" for n in notes]
    out.append("")
    offsets = ", ".join(f"{k}={v}" for k, v in snap.offsets.items()) or "none"
    out.append(f"Events: {snap.n_events:,}   offsets: {offsets}")

    if groups:
        out.append("")
        out += _format_groups(snap)
    if truth is not None:
        out.append("")
        out += _format_truth(compare_with_truth(snap, truth))
    return "\n".join(out)


def _format_groups(snap: Snapshot) -> list[str]:
    rows = group_rows(snap)
    names = list(snap.re_names)
    allv = [r["ranef"][n] for r in rows for n in names] + [r["raw_mean"] for r in rows]
    dec = _decimals(allv)
    head = ["group", "n", "raw mean"]
    for n in names:
        head += [n, "cond.SD"]
    head.append("shrinkage")
    body = []
    for r in rows:
        cells = [key_label(r["group"]), count_text(r["n"]), _num(r["raw_mean"], dec)]
        for n in names:
            cells += [_num(r["ranef"][n], dec), _num(r["cond_sd"][n], dec)]
        cells.append(f"{r['shrinkage'][names[0]]:.3f}")
        body.append(cells)
    return [f"Group effects (BLUPs; shrinkage of {names[0]}):"] + _table(head, body)


def _format_truth(cmp: Mapping[str, Any]) -> list[str]:
    labels = {"fixef": "", "re_sd": "SD ", "re_corr": "Corr ", "sigma": "SD "}
    vals = [r["estimate"] for r in cmp["rows"]] + [r["truth"] or 0.0 for r in cmp["rows"]]
    dec = _decimals(vals)
    body = []
    for r in cmp["rows"]:
        body.append(
            [
                labels[r["kind"]] + r["name"],
                _num(r["estimate"], dec),
                _num(r["truth"], dec),
                _num(r["diff"], dec),
                "" if r["z"] is None else f"{r['z']:.2f}",
            ]
        )
    out = ["Compared with the simulated truth:"]
    out += _table(["parameter", "estimate", "truth", "difference", "diff/SE"], body)
    for name, g in cmp["groups"].items():
        out.append(
            f" group effects {name}: correlation with the truth {g['corr']:.3f}, "
            f"RMSE {g['rmse']:.4g} over {g['groups']} groups"
        )
    d = cmp.get("drift")
    if d:
        out.append(
            f" drifting group {d['group']}: {d['term']} moved from {d['before']:.3f} to "
            f"{d['after']:.3f} at ts {d['from_ts']:g}; its BLUP now {d['estimate']:.3f}"
        )
    return out


def summary_command(args) -> int:
    """``streamlmm summary DIR [--groups] [--json] [--vs-truth FILE]``."""
    snap = load_snapshot(args.snapshot_dir)
    truth = None
    if args.vs_truth:
        with open(args.vs_truth, encoding="utf-8") as fh:
            try:
                truth = json.load(fh)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(
                    f"--vs-truth {args.vs_truth}: not a truth file (JSON): {e}"
                ) from None
        try:
            check_truth(snap, truth)
        except ValueError as e:
            raise ValueError(f"--vs-truth {args.vs_truth}: {e}") from None
    if args.json:
        print(json.dumps(summary_dict(snap, groups=args.groups, truth=truth), indent=2))
    else:
        print(format_summary(snap, groups=args.groups, truth=truth))
    return 0
