"""Known-truth event generators for demos, tests and benchmarks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

__all__ = ["simulate", "TRUTH"]

TRUTH = {
    "beta": (5.0, 0.3, -1.2),
    "sd_intercept": 2.0,
    "sd_slope": 0.5,
    "corr": 0.3,
    "sigma": 1.0,
}


def simulate(
    n_events: int, n_groups: int, seed: int = 0, truth: dict | None = None
) -> Iterator[dict]:
    """Events of ``y ~ x1 + x2 + (1 + x1 | g)`` with known parameters.

    Group sizes are skewed (some groups are large, many small), as in real traffic.

    Examples
    --------
    >>> ev = list(simulate(3, 2, seed=1))
    >>> sorted(ev[0])
    ['g', 'ts', 'x1', 'x2', 'y']

    """
    t = dict(TRUTH, **(truth or {}))
    rng = np.random.default_rng(seed)
    s0, s1, rho = t["sd_intercept"], t["sd_slope"], t["corr"]
    cov = np.array([[s0**2, rho * s0 * s1], [rho * s0 * s1, s1**2]])
    b = rng.multivariate_normal(np.zeros(2), cov, size=n_groups)
    p = rng.pareto(1.5, size=n_groups) + 1.0
    p /= p.sum()
    b0, b1, b2 = t["beta"]
    chunk = 100_000
    for start in range(0, n_events, chunk):
        m = min(chunk, n_events - start)
        g = rng.choice(n_groups, size=m, p=p)
        x1 = rng.normal(size=m)
        x2 = rng.uniform(-1, 1, size=m)
        y = b0 + b1 * x1 + b2 * x2 + b[g, 0] + b[g, 1] * x1 + rng.normal(scale=t["sigma"], size=m)
        for i in range(m):
            yield {
                "g": f"g{g[i]}",
                "x1": float(x1[i]),
                "x2": float(x2[i]),
                "y": float(y[i]),
                "ts": float(start + i),
            }


def to_jsonl(events: Iterator[dict]) -> Iterator[str]:
    """One JSON line per event."""
    for e in events:
        yield json.dumps(e) + "\n"
