"""Write the data sets of the brms reference runs into tests/data/brms (deterministic).

Usage: python make_data.py [OUT_DIR]

The data come from :mod:`streamlmm.simulate` with fixed seeds, in stream order:

- ``brms_web.csv``: the ``web`` scenario (seed 0, its natural sizes: 8 counties of 7 to
  150 visits, 464 in all), renamed to brms-friendly names: ``county``, ``std_age`` (the
  standardised age), ``y`` (the bounce time, s).
- ``brms_basic2k.csv``: the ``basic`` scenario ``y ~ x1 + x2 + (1 + x1 | g)`` with 2,000
  events in 40 groups (seed 0): columns ``g``, ``x1``, ``x2``, ``y``, rounded to 6
  decimals. It is also the benchmark's "2k events, 40 groups, random slopes" case.

A rerun writes byte-identical files (``regenerate --check-data`` checks that).
"""

from __future__ import annotations

import pathlib
import sys

import pandas as pd

from streamlmm.simulate import scenario

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parents[2] / "tests" / "data" / "brms"


def web() -> pd.DataFrame:
    """The ``web`` scenario (seed 0) as ``county, std_age, y``."""
    sim = scenario("web", seed=0)
    df = pd.DataFrame(list(sim.events))
    df = df.rename(columns={"age": "std_age", "bounce": "y"})
    return df[["county", "std_age", "y"]]


def basic2k() -> pd.DataFrame:
    """The ``basic`` scenario with 2,000 events in 40 groups (seed 0) as ``g, x1, x2, y``."""
    sim = scenario("basic", n_events=2_000, n_groups=40, seed=0)
    df = pd.DataFrame(list(sim.events))[["g", "x1", "x2", "y"]]
    for c in ("x1", "x2", "y"):
        df[c] = df[c].round(6)
    return df


DATASETS = {"brms_web.csv": web, "brms_basic2k.csv": basic2k}


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[0]) if argv else DATA
    out.mkdir(parents=True, exist_ok=True)
    for name, make in DATASETS.items():
        df = make()
        df.to_csv(out / name, index=False, lineterminator="\n")
        groups = df.iloc[:, 0].nunique()
        print(f"{out / name}: {len(df)} rows, {groups} groups")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
