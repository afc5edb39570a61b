"""Pictures of a snapshot: shrinkage, caterpillar, raw vs BLUP, trajectories.

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
    "raw_vs_blup_data",
    "trajectory_data",
    "plot_shrinkage",
    "plot_caterpillar",
    "plot_raw_vs_blup",
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


def raw_vs_blup_data(snap: Snapshot) -> dict[str, Any]:
    """Raw group means against BLUP-based group means, on one scale.

    A group's raw mean is ``group_ybar``; its BLUP-based mean is the population mean
    ``mu`` plus its intercept BLUP. ``mu`` is the fixed part of a typical group: the
    average over groups of raw mean minus intercept BLUP (for a model with a random
    intercept alone and centred covariates, this is the fixed intercept). Shrinkage
    pulls each group from its raw mean towards ``mu``, small groups most.
    """
    if "(Intercept)" not in snap.re_names:
        raise ValueError("raw vs BLUP needs a random intercept")
    j = snap.re_names.index("(Intercept)")
    n = np.asarray(snap.group_n, dtype=float)
    raw = np.asarray(snap.group_ybar, dtype=float)
    ok = np.isfinite(raw) & (n > 0)
    b = np.asarray(snap.b[:, j], dtype=float)
    mu = float(np.mean(raw[ok] - b[ok])) if ok.any() else math.nan
    return {
        "keys": list(snap.keys),
        "n": n,
        "raw": raw,
        "blup": mu + b,
        "mu": mu,
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


def _save(fig, path: str | os.PathLike) -> str:
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


def plot_raw_vs_blup(snap: Snapshot, path: str | os.PathLike) -> str:
    """Raw group means and BLUP-based means against size, arrows towards the mean."""
    plt = _pyplot()
    d = raw_vs_blup_data(snap)
    g = _group_name(snap)
    ok = np.isfinite(d["raw"]) & (d["n"] > 0)
    n, raw, blup = d["n"][ok], d["raw"][ok], d["blup"][ok]
    size = 8 + 80 * np.sqrt(n / n.max()) if len(n) else n
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.axhline(d["mu"], color=GREY, ls="--", lw=1.2, label=f"population mean {d['mu']:.3g}")
    span = float(np.ptp(np.concatenate([raw, blup]))) if len(n) else 0.0
    for xi, a, b in zip(n, raw, blup):
        if abs(a - b) > 0.01 * span:
            ax.annotate(
                "",
                xy=(xi, b),
                xytext=(xi, a),
                arrowprops={
                    "arrowstyle": "-|>,head_length=0.3,head_width=0.15",
                    "color": GREY,
                    "lw": 0.7,
                    "alpha": 0.7,
                    "shrinkA": 0,
                    "shrinkB": 0,
                },
            )
    ax.scatter(n, raw, s=size, facecolors="none", edgecolors=ORANGE, lw=1.1, label="raw mean")
    ax.scatter(n, blup, s=size, color=BLUE, alpha=0.8, lw=0, label="BLUP-based mean")
    ax.set_xscale("log")
    ax.set_xlabel(f"events in the {g} (n, log scale; point size grows with n)")
    ax.set_ylabel("mean response")
    ax.set_title(f"Raw {g} means are pulled towards the population mean")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
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
    "raw_vs_blup": plot_raw_vs_blup,
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
        if name == "raw_vs_blup" and "(Intercept)" not in snap.re_names:
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
