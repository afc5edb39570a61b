"""Pictures of a snapshot: shrinkage, caterpillar, pooling, residuals, trajectories.

Each picture has a ``*_data`` function that returns the arrays it draws, computed from
the snapshot's numbers alone (so they can be checked without looking at pixels), and a
``plot_*`` function that draws them into a PNG file. matplotlib is an optional extra
(``pip install "streamlmm[plot]"``), imported only when a picture is drawn, with the
non-interactive Agg backend.

>>> from streamlmm import MixedLM
>>> m = MixedLM("y ~ x + (1 | g)")
>>> for i in range(80):
...     m.learn_one({"g": i % 8, "x": float(i % 5)}, 0.5 * (i % 5) + (i % 8) + 0.7 * (i % 3))
>>> d = shrinkage_data(m.fit().snapshot())
>>> d["n"].tolist() == [10.0] * 8, bool(np.all((d["factor"] > 0) & (d["factor"] < 1)))
(True, True)

"""

from __future__ import annotations

import math
import os
import pathlib
import textwrap
from typing import Any

import numpy as np

from streamlmm.formula import parse_formula
from streamlmm.keys import key_label
from streamlmm.oserrors import doing
from streamlmm.snapshot import Snapshot

__all__ = [
    "PLOTS",
    "shrinkage_data",
    "caterpillar_data",
    "pooling_data",
    "pooling_distance_data",
    "residuals_data",
    "trajectory_data",
    "plot_shrinkage",
    "plot_caterpillar",
    "plot_pooling",
    "plot_residuals",
    "plot_trajectories",
    "plot_all",
    "plot_command",
]

Z95 = 1.959963984540054
BLUE, ORANGE, GREY, RED = "#1f5fa8", "#e07b1a", "#7a7a7a", "#b22222"


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            'plots need matplotlib: pip install "streamlmm[plot]" (scripts/setup installs it)'
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 110,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
        }
    )
    return plt


# -- data ---------------------------------------------------------------------------------
def shrinkage_data(snap: Snapshot, term: int = 0) -> dict[str, Any]:
    """Each group's shrinkage factor for random effect ``term`` against its size.

    ``factor`` is ``1 − condVar/τ²`` (:meth:`Snapshot.shrinkage`); ``curve_n`` and
    ``curve`` trace the random-intercept formula ``τ²/(τ² + σ²/n)`` with τ² the
    effect's variance and σ² the residual variance.
    """
    name = snap.re_names[term]
    n = np.asarray(snap.group_n, dtype=float)
    tau2 = float(snap.re_cov[term, term])
    cv = np.asarray(snap.condvar[:, term, term], dtype=float)
    factor = 1.0 - cv / tau2 if tau2 > 0 else np.zeros_like(n)
    pos = n[n > 0]
    lo = max(0.5, float(pos.min()) / 2) if len(pos) else 0.5
    hi = float(pos.max()) * 2 if len(pos) else 10.0
    curve_n = np.geomspace(lo, hi, 200)
    s2 = snap.sigma**2
    curve = tau2 / (tau2 + s2 / curve_n) if tau2 > 0 else np.zeros_like(curve_n)
    return {
        "name": name,
        "keys": list(snap.keys),
        "n": n,
        "factor": factor,
        "tau2": tau2,
        "sigma2": s2,
        "curve_n": curve_n,
        "curve": curve,
    }


def caterpillar_data(snap: Snapshot, term: int = 0) -> dict[str, Any]:
    """Group effects for ``term`` with 95% intervals ``b ± 1.96·√condVar``, sorted."""
    b = np.asarray(snap.b[:, term], dtype=float)
    sd = np.sqrt(np.clip(snap.condvar[:, term, term], 0.0, None))
    order = np.argsort(b, kind="stable")
    return {
        "name": snap.re_names[term],
        "keys": [snap.keys[i] for i in order],
        "b": b[order],
        "lo": (b - Z95 * sd)[order],
        "hi": (b + Z95 * sd)[order],
        "n": np.asarray(snap.group_n, dtype=float)[order],
    }


def pooling_data(snap: Snapshot, term: int = 0) -> dict[str, Any]:
    """What partial pooling does to each group's effect ``term``, on one scale.

    ``own`` is the group's own estimate of its effect from its data alone at the fitted
    fixed effects β̂ (no pooling; for a random intercept ``ȳ_g − x̄_g'β̂``), with its
    standard error ``own_se``; ``blup`` is its BLUP (partial pooling), the estimate the
    model uses; ``population`` is the effect of a typical group, 0. ``identified`` marks
    the groups whose own data estimate the effect (a slope needs spread in its column).
    For a random intercept alone ``blup = factor · own`` with the shrinkage factor
    ``factor = τ²/(τ² + σ²/n_g)`` in [0, 1]: every group moves from its own estimate
    toward the population value, small groups most (docs/math.md §4).
    """
    own = np.asarray(snap.b_np[:, term], dtype=float)
    return {
        "name": snap.re_names[term],
        "keys": list(snap.keys),
        "n": np.asarray(snap.group_n, dtype=float),
        "own": own,
        "own_se": np.asarray(snap.b_np_se[:, term], dtype=float),
        "blup": np.asarray(snap.b[:, term], dtype=float),
        "population": 0.0,
        "identified": np.isfinite(own),
    }


def pooling_distance_data(snap: Snapshot) -> dict[str, Any] | None:
    """Partial pooling of all of a group's effects together: each group's distance from
    the population in the prior's metric, ``√(b'D⁻¹b)`` with ``D = re_cov`` ("how many
    prior standard deviations from a typical group"), for its own estimate (``own``) and
    its BLUP (``blup``). The BLUP minimises ``‖y − Xβ̂ − Zb‖² + σ²b'D⁻¹b`` and the own
    estimate the first term alone, so the BLUP is never farther: every group moves toward
    the population, though with several correlated effects a single one of them may
    move away. ``None`` when ``D`` is singular (a boundary fit)."""
    D = np.asarray(snap.re_cov, dtype=float)
    try:
        L = np.linalg.cholesky(D)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(L)) or np.min(np.diag(L)) <= 1e-6 * np.max(np.diag(L)):
        return None

    def dist(b):
        return np.sqrt(np.sum(np.linalg.solve(L, np.asarray(b, dtype=float).T) ** 2, axis=0))

    own = dist(snap.b_np)
    return {
        "keys": list(snap.keys),
        "n": np.asarray(snap.group_n, dtype=float),
        "own": own,
        "blup": dist(snap.b),
        "population": 0.0,
        "identified": np.isfinite(own),
    }


def residuals_data(snap: Snapshot) -> dict[str, Any]:
    """Residuals against fitted values, and the group effects against normal quantiles.

    From the snapshot's reservoir (its state's ``res_*`` arrays: a sample of the stream's
    distinct events, the whole stream while it fits; :mod:`streamlmm.reservoir`):
    ``fitted = x'β̂ + z'b̂_g`` and the scaled residuals ``(y − fitted)/σ̂`` of each kept
    event, with how often it was seen (``count``), ``events`` of ``of``. Per random effect,
    ``qq`` holds the sorted BLUPs and the standard normal quantiles
    ``Φ⁻¹((i − ½)/G)`` they are plotted against, and ``line`` the line through their
    quartiles (R's ``qqline``).
    """
    from statistics import NormalDist

    from streamlmm.reservoir import Reservoir

    st = snap.state
    if st is None or not len(st.get("res_prio", ())):
        raise ValueError("the snapshot keeps no events (no state, or reservoir=0)")
    design = snap._encoder()
    res = Reservoir.from_state(st, design.k)
    fixef = [snap.fixef[c] for c in design.fixed]
    fitted, resid, count = res.residuals(design.xi, design.zi, fixef, np.asarray(snap.b))
    qq = []
    G = snap.n_groups
    normal = NormalDist()
    theo = np.array([normal.inv_cdf((i + 0.5) / G) for i in range(G)])
    for t, name in enumerate(snap.re_names):
        b = np.sort(np.asarray(snap.b[:, t], dtype=float))
        q1, q3 = np.quantile(b, [0.25, 0.75]) if G else (0.0, 0.0)
        z1, z3 = normal.inv_cdf(0.25), normal.inv_cdf(0.75)
        slope = (q3 - q1) / (z3 - z1)
        qq.append({"name": name, "normal": theo, "b": b, "line": (q1 - slope * z1, slope)})
    return {
        "fitted": fitted,
        "resid": resid / snap.sigma,
        "count": count,
        "events": res.n_events,
        "of": res.n_seen,
        "qq": qq,
    }


def trajectory_data(snap: Snapshot) -> dict[str, Any]:
    """Variance components over the stream, from the snapshot's history records.

    ``sd`` has one column per random effect (√ of ``re_cov``'s diagonal), ``corr`` one
    per pair below the diagonal, ``sigma`` is the residual SD; ``kind`` says whether
    the record came from an exact refit or an EM step.
    """
    hist = sorted(snap.history, key=lambda h: h["n_events"])
    q = len(snap.re_names)
    events = np.array([h["n_events"] for h in hist], dtype=float)
    sd = np.empty((len(hist), q))
    pairs = [(i, j) for i in range(q) for j in range(i)]
    corr = np.empty((len(hist), len(pairs)))
    for r, h in enumerate(hist):
        c = np.asarray(h["re_cov"], dtype=float).reshape(q, q)
        s = np.sqrt(np.clip(np.diag(c), 0.0, None))
        sd[r] = s
        for k, (i, j) in enumerate(pairs):
            corr[r, k] = c[i, j] / (s[i] * s[j]) if s[i] * s[j] > 0 else 0.0
    return {
        "names": list(snap.re_names),
        "pairs": [(snap.re_names[j], snap.re_names[i]) for i, j in pairs],
        "events": events,
        "sd": sd,
        "corr": corr,
        "sigma": np.array([h["sigma"] for h in hist], dtype=float),
        "kind": [h["kind"] for h in hist],
    }


# -- pictures -----------------------------------------------------------------------------
def _group_name(snap: Snapshot) -> str:
    return parse_formula(snap.formula).group


def _save(fig, path: str | os.PathLike, layout: bool = True) -> str:
    if layout:
        fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return os.fspath(path)


def plot_shrinkage(snap: Snapshot, path: str | os.PathLike, term: int = 0) -> str:
    """Shrinkage factor of each group against its size, with τ²/(τ²+σ²/n)."""
    plt = _pyplot()
    d = shrinkage_data(snap, term)
    g = _group_name(snap)
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    ax.plot(
        d["curve_n"],
        d["curve"],
        color=ORANGE,
        lw=2,
        label=r"$\tau^2/(\tau^2+\sigma^2/n)$"
        + f"   τ = {math.sqrt(d['tau2']):.3g}, σ = {math.sqrt(d['sigma2']):.3g}",
    )
    ax.scatter(
        d["n"], d["factor"], s=18, color=BLUE, alpha=0.75, lw=0, label=f"each {g} (from condVar)"
    )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel(f"events in the {g} (n, log scale)")
    ax.set_ylabel("shrinkage factor  1 − condVar/τ²\n(0: all prior, 1: all own data)")
    ax.set_title(f"How much each {g}'s own data counts: {d['name']}")
    ax.legend(loc="lower right", frameon=False)
    return _save(fig, path)


def plot_caterpillar(snap: Snapshot, path: str | os.PathLike) -> str:
    """Every random effect's BLUPs with 95% intervals, sorted (one panel per effect)."""
    plt = _pyplot()
    q = len(snap.re_names)
    g = _group_name(snap)
    fig, axes = plt.subplots(1, q, figsize=(4.2 * q + 1.0, 5.0), squeeze=False)
    for t, ax in enumerate(axes[0]):
        d = caterpillar_data(snap, t)
        y = np.arange(len(d["b"]))
        ax.hlines(y, d["lo"], d["hi"], color=BLUE, alpha=0.45, lw=1.0, label="95% interval")
        ax.plot(d["b"], y, "o", ms=2.6, color=BLUE, label="BLUP")
        ax.axvline(0.0, color=GREY, lw=1, ls="--")
        ax.set_xlabel(f"{d['name']} effect")
        ax.set_title(d["name"])
        ax.grid(axis="y", visible=False)
        if len(y) <= 30:
            ax.set_yticks(y, [key_label(k) for k in d["keys"]], fontsize=8)
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{len(y)} groups ({g}), sorted by effect")
        if t == 0:
            ax.legend(loc="lower right", frameon=False, fontsize=8.5)
    fig.suptitle(f"Group effects by {g}, with 95% intervals from condVar", fontweight="bold")
    return _save(fig, path)


def _arrows(ax, n, a, b, span) -> None:
    for xi, start, end in zip(n, a, b):
        if abs(start - end) > 0.01 * span:
            ax.annotate(
                "",
                xy=(xi, end),
                xytext=(xi, start),
                arrowprops={
                    "arrowstyle": "-|>,head_length=0.3,head_width=0.15",
                    "color": GREY,
                    "lw": 0.7,
                    "alpha": 0.7,
                    "shrinkA": 0,
                    "shrinkB": 0,
                },
            )


def _pooling_panel(ax, d, g, label, se=None) -> None:
    """One panel of :func:`plot_pooling`: own estimates (clipped to the scale of most of
    them, drawn as triangles at the edge), arrows, BLUPs, the population line."""
    ok = d["identified"] & (d["n"] > 0)
    n, own, blup = d["n"][ok], d["own"][ok], d["blup"][ok]
    both = np.concatenate([own, blup])
    if len(n):
        lo, hi = np.quantile(own, [0.01, 0.99]) if len(n) >= 20 else (own.min(), own.max())
        lo, hi = min(lo, blup.min(), d["population"]), max(hi, blup.max(), d["population"])
        pad = 0.06 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = -1.0, 1.0
    shown = np.clip(own, lo, hi)
    off = shown != own
    ax.axhline(d["population"], color=GREY, ls="--", lw=1.2, label="population (0)")
    if se is not None:
        se = se[ok]
        ax.vlines(n, np.clip(own - se, lo, hi), np.clip(own + se, lo, hi), color=ORANGE,
                  alpha=0.25, lw=0.8, label="± 1 SE of the own estimate")  # fmt: skip
    _arrows(ax, n, shown, blup, float(np.ptp(both)) if len(n) else 0.0)
    ax.scatter(n[~off], own[~off], s=16, facecolors="none", edgecolors=ORANGE, lw=1.0,
               label="own data alone (no pooling)")  # fmt: skip
    for side, marker in ((own > hi, "^"), (own < lo, "v")):
        if side.any():
            ax.scatter(n[side], shown[side], s=24, marker=marker, facecolors="none",
                       edgecolors=ORANGE, lw=1.0, label="own estimate off the scale")  # fmt: skip
    ax.scatter(n, blup, s=16, color=BLUE, alpha=0.85, lw=0, label="BLUP (partial pooling)")
    ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_xlabel(f"events in the {g} (n, log scale)")
    ax.set_ylabel(label)
    left = int((~d["identified"]).sum())
    if left:
        ax.text(0.01, 0.01, f"{left} {g}s too small to estimate alone", fontsize=8,
                transform=ax.transAxes, color=GREY)  # fmt: skip


def plot_pooling(snap: Snapshot, path: str | os.PathLike) -> str:
    """What partial pooling does: each group's own estimate of its effect (no pooling,
    ± 1 SE, at the same fixed effects) and its BLUP (partial pooling) against its size,
    an arrow from one to the other; one panel per random effect and, with several, one
    of all of them together (:func:`pooling_distance_data`)."""
    plt = _pyplot()
    q = len(snap.re_names)
    g = _group_name(snap)
    dist = pooling_distance_data(snap) if q > 1 else None
    panels = q + (dist is not None)
    fig, axes = plt.subplots(1, panels, figsize=(max(7.5, 5.4 * panels), 5.2), squeeze=False)
    for t in range(q):
        d = pooling_data(snap, t)
        ax = axes[0][t]
        _pooling_panel(ax, d, g, f"{d['name']} effect of each {g}", d["own_se"])
        ax.set_title(f"{d['name']}: toward 0" if q == 1 else d["name"])
    if dist is not None:
        ax = axes[0][q]
        _pooling_panel(ax, dist, g, "distance from the population (prior SDs)")
        ax.set_title("all effects together: never farther")
    legend = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=5 if panels > 1 else 2,
               frameon=False, fontsize=9)  # fmt: skip
    note = (
        f"each {g}'s estimate from its own data alone → its BLUP: pulled toward the "
        "population, the smallest most (at the same fixed effects)."
    )
    if q > 1:
        note += (
            " The effects are pulled jointly: a single one may move away from 0; their "
            "distance from the population in the prior's metric never grows (right)."
        )
    note = textwrap.fill(note, width=int(15 * fig.get_figwidth()))
    fig.suptitle(f"What partial pooling does to each {g}\n", fontweight="bold")
    fig.text(0.5, 0.915, note, ha="center", va="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if panels > 1 else 0.1, 1, 0.9))
    return _save(fig, path, layout=False)


def plot_residuals(snap: Snapshot, path: str | os.PathLike) -> str:
    """Scaled residuals against fitted values (from the reservoir), and a normal QQ plot
    of the group effects (one panel per random effect)."""
    plt = _pyplot()
    d = residuals_data(snap)
    g = _group_name(snap)
    q = len(d["qq"])
    fig, axes = plt.subplots(1, 1 + q, figsize=(5.2 * (1 + q), 4.6), squeeze=False)
    ax = axes[0][0]
    size = 6 + 10 * np.sqrt(d["count"] / max(float(d["count"].max()), 1.0))
    ax.scatter(d["fitted"], d["resid"], s=size, color=BLUE, alpha=0.35, lw=0)
    ax.axhline(0.0, color=GREY, lw=1.2)
    for v in (-2.0, 2.0):
        ax.axhline(v, color=GREY, lw=0.8, ls=":")
    ax.set_xlabel("fitted value  x'β̂ + z'b̂")
    ax.set_ylabel("scaled residual  (y − fitted)/σ̂")
    exact = d["events"] == d["of"]
    ax.set_title("Residuals against fitted values")
    ax.text(
        0.01, 0.99,
        f"{d['events']:,.0f} of {d['of']:,.0f} events"
        + ("" if exact else " (the reservoir's uniform sample)"),
        transform=ax.transAxes, fontsize=8.5, va="top", color=GREY,
    )  # fmt: skip
    for t, qq in enumerate(d["qq"]):
        ax = axes[0][1 + t]
        ax.scatter(qq["normal"], qq["b"], s=14, color=ORANGE, alpha=0.8, lw=0)
        a, b = qq["line"]
        lim = np.array([qq["normal"].min(), qq["normal"].max()]) if len(qq["b"]) else np.zeros(2)
        ax.plot(lim, a + b * lim, color=GREY, lw=1.2, label="line through the quartiles")
        ax.set_xlabel("standard normal quantile")
        ax.set_ylabel(f"{qq['name']} effect (BLUP)")
        ax.set_title(f"Normal QQ plot of the {g} effects: {qq['name']}", fontsize=10)
        ax.legend(loc="upper left", frameon=False, fontsize=8.5)
    return _save(fig, path)


def plot_trajectories(snap: Snapshot, path: str | os.PathLike) -> str:
    """Random-effect SDs, correlations and σ over the stream (from the history)."""
    plt = _pyplot()
    d = trajectory_data(snap)
    g = _group_name(snap)
    has_corr = d["corr"].shape[1] > 0
    fig, axes = plt.subplots(
        2 if has_corr else 1, 1, figsize=(9.0, 5.6 if has_corr else 4.0), sharex=True
    )
    axes = np.atleast_1d(axes)
    ax = axes[0]
    colors = [BLUE, ORANGE, "#2a9d55", "#8e44ad", "#c0392b"]
    refit = np.array([k == "refit" for k in d["kind"]], dtype=bool)
    for i, name in enumerate(d["names"]):
        c = colors[i % len(colors)]
        ax.plot(d["events"], d["sd"][:, i], ".-", color=c, lw=1.6, ms=4, label=f"SD {name} ({g})")
    ax.plot(d["events"], d["sigma"], ".-", color=GREY, lw=1.6, ms=4, label="SD residual (σ)")
    if refit.any():
        ax.plot(
            d["events"][refit],
            d["sigma"][refit],
            "k|",
            ms=8,
            label="exact refit (others: EM steps)",
        )
    ax.set_ylabel("standard deviation")
    ax.set_title("Variance components over the stream")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
    if has_corr:
        ax2 = axes[1]
        for k, (a, b) in enumerate(d["pairs"]):
            ax2.plot(
                d["events"],
                d["corr"][:, k],
                color=colors[(k + 2) % 5],
                lw=1.6,
                label=f"corr({a}, {b})",
            )
        ax2.set_ylim(-1.05, 1.05)
        ax2.set_ylabel("correlation")
        ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
    axes[-1].set_xlabel("events seen")
    axes[-1].xaxis.set_major_formatter(
        plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    )
    return _save(fig, path)


PLOTS = {
    "shrinkage": plot_shrinkage,
    "caterpillar": plot_caterpillar,
    "pooling": plot_pooling,
    "residuals": plot_residuals,
    "trajectories": plot_trajectories,
}


def plot_all(snap: Snapshot, out_dir: str | os.PathLike) -> dict[str, str]:
    """Every picture in :data:`PLOTS` that the snapshot supports, as ``NAME.png``."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"picture directory {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise doing(f"creating the picture directory {out}", e) from None
    paths = {}
    for name, fn in PLOTS.items():
        if name == "residuals" and (snap.state is None or not len(snap.state.get("res_prio", ()))):
            continue
        if name == "trajectories" and not snap.history:
            continue
        paths[name] = fn(snap, out / f"{name}.png")
    return paths


def plot_command(args) -> int:
    """``streamlmm plot DIR --out DIR``."""
    from streamlmm.summary import load_snapshot

    snap = load_snapshot(args.snapshot_dir)
    for name, path in plot_all(snap, args.out).items():
        print(f"{name:<13s} {path}")
    return 0
