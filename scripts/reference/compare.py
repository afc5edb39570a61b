"""Compare re-run lme4 fits with the committed ones in tests/data.

Usage: python compare.py RERUN_DIR [DATA_DIR] [--rtol 1e-8] [CASE ...]

For every case in RERUN_DIR (or the named ones), the scalar estimates (fixef, sigma,
criterion, logLik, theta, re_cov) must agree with DATA_DIR's to ``rtol`` relative (of
the largest entry, for vectors), ranef and condvar to ``100 * rtol``; the ``error`` of a
refused case must be the same text. Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parents[1] / "tests" / "data"


def _arr(x) -> np.ndarray:
    return np.atleast_1d(np.asarray(x, dtype=float))


def _close(a, b, rtol: float) -> float:
    """Largest |a − b| relative to the largest |b| (nan entries must match)."""
    a, b = _arr(a), _arr(b)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return np.inf
    ok = ~np.isnan(b)
    scale = max(float(np.max(np.abs(b[ok]), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a[ok] - b[ok]), initial=0.0)) / scale


def compare(new: dict, old: dict, rtol: float) -> list[str]:
    problems = []
    for key in ("data", "formula", "method", "n", "n_groups"):
        if new.get(key) != old.get(key):
            problems.append(f"{key}: {new.get(key)!r} != {old.get(key)!r}")
    if "error" in old or "error" in new:
        if new.get("error") != old.get("error"):
            problems.append(f"error: {new.get('error')!r} != {old.get('error')!r}")
        return problems
    if list(new["fixef"]) != list(old["fixef"]):
        problems.append(f"fixef names {list(new['fixef'])} != {list(old['fixef'])}")
        return problems
    if np.atleast_1d(new["re_names"]).tolist() != np.atleast_1d(old["re_names"]).tolist():
        problems.append("re_names differ")
    if new["singular"] != old["singular"]:
        problems.append("singular differs")
    pairs = {
        "fixef": (list(new["fixef"].values()), list(old["fixef"].values()), rtol),
        "sigma": (new["sigma"], old["sigma"], rtol),
        "criterion": (new["criterion"], old["criterion"], rtol),
        "logLik": (new["logLik"], old["logLik"], rtol),
        "theta": (new["theta"], old["theta"], 100 * rtol),
        "re_cov": (new["re_cov"], old["re_cov"], 100 * rtol),
    }
    if set(new["ranef"]) != set(old["ranef"]):
        problems.append("group keys differ")
    else:
        keys = list(old["ranef"])
        pairs["ranef"] = (
            [new["ranef"][k] for k in keys],
            [old["ranef"][k] for k in keys],
            100 * rtol,
        )
        pairs["condvar"] = (
            [new["condvar"][k] for k in keys],
            [old["condvar"][k] for k in keys],
            100 * rtol,
        )
    for key, (a, b, tol) in pairs.items():
        err = _close(np.asarray(a, dtype=float), np.asarray(b, dtype=float), tol)
        if not err <= tol:
            problems.append(f"{key}: relative difference {err:.3g} > {tol:g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rerun", type=pathlib.Path)
    ap.add_argument("data", type=pathlib.Path, nargs="?", default=DATA)
    ap.add_argument("--rtol", type=float, default=1e-8)
    ap.add_argument("--case", action="append", default=[])
    args = ap.parse_args(argv)
    names = args.case or sorted(p.stem for p in args.rerun.glob("*.json"))
    failed = 0
    for name in names:
        new = json.loads((args.rerun / f"{name}.json").read_text())
        old_path = args.data / f"{name}.json"
        if not old_path.is_file():
            print(f"{name:28s} NEW (no committed JSON)")
            continue
        old = json.loads(old_path.read_text())
        problems = compare(new, old, args.rtol)
        if problems:
            failed += 1
            print(f"{name:28s} DIFFERS: " + "; ".join(problems))
        else:
            print(f"{name:28s} ok (rtol {args.rtol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
