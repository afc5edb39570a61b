"""Known-truth event generators for demos, tests and benchmarks.

Three scenarios, each a formula plus a generator of JSON-ready events and the truth
that generated them:

- ``hospital``: 200 hospitals of 5 to 5,000 patients (heavily skewed), patient ``age``
  (standardised) and ``severity`` (a factor: ``"mild"``, ``"moderate"``, ``"severe"``),
  a random intercept and age slope per hospital, and one hospital whose intercept
  jumps half-way through the stream (to show ``half_life``);
- ``web``: 8 counties of 7 to 150 visits, bounce time against standardised age, with
  Simpson's paradox: pooled, age looks harmful (longer bounce times); within every
  county it helps;
- ``basic``: ``y ~ x1 + x2 + (1 + x1 | g)`` with skewed group sizes (:func:`simulate`).

>>> sim = scenario("web", seed=1)
>>> sim.formula
'bounce ~ age + (1 | county)'
>>> len(sim.truth["groups"]), sim.n_events == sum(g["n"] for g in sim.truth["groups"].values())
(8, True)

"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from streamlmm.oserrors import doing

__all__ = [
    "simulate",
    "TRUTH",
    "SCENARIOS",
    "Simulation",
    "scenario",
    "to_jsonl",
    "write_events",
    "truth_path",
    "simulate_command",
    "pooled_and_within_slopes",
]

TRUTH = {
    "beta": (5.0, 0.3, -1.2),
    "sd_intercept": 2.0,
    "sd_slope": 0.5,
    "corr": 0.3,
    "sigma": 1.0,
}

SCENARIOS = ("hospital", "web", "basic")


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
    return _basic(n_events, n_groups, seed, truth)[0]


def _basic(
    n_events: int, n_groups: int, seed: int = 0, truth: dict | None = None
) -> tuple[Iterator[dict], dict[str, Any]]:
    t = dict(TRUTH, **(truth or {}))
    rng = np.random.default_rng(seed)
    s0, s1, rho = t["sd_intercept"], t["sd_slope"], t["corr"]
    cov = np.array([[s0**2, rho * s0 * s1], [rho * s0 * s1, s1**2]])
    b = rng.multivariate_normal(np.zeros(2), cov, size=n_groups)
    p = rng.pareto(1.5, size=n_groups) + 1.0
    p /= p.sum()
    b0, b1, b2 = t["beta"]
    described = _truth(
        "basic",
        "y ~ x1 + x2 + (1 + x1 | g)",
        "g",
        {"(Intercept)": b0, "x1": b1, "x2": b2},
        ("(Intercept)", "x1"),
        cov,
        t["sigma"],
        {  # group sizes are random here: n is the expected size
            f"g{i}": {"(Intercept)": b[i, 0], "x1": b[i, 1], "n": p[i] * n_events}
            for i in range(n_groups)
        },
    )
    described["n_events"] = n_events

    def gen() -> Iterator[dict]:
        chunk = 100_000
        for start in range(0, n_events, chunk):
            m = min(chunk, n_events - start)
            g = rng.choice(n_groups, size=m, p=p)
            x1 = rng.normal(size=m)
            x2 = rng.uniform(-1, 1, size=m)
            noise = rng.normal(scale=t["sigma"], size=m)
            y = b0 + b1 * x1 + b2 * x2 + b[g, 0] + b[g, 1] * x1 + noise
            for i in range(m):
                yield {
                    "g": f"g{g[i]}",
                    "x1": float(x1[i]),
                    "x2": float(x2[i]),
                    "y": float(y[i]),
                    "ts": float(start + i),
                }

    return gen(), described


def _truth(
    name: str,
    formula: str,
    group: str,
    fixef: dict[str, float],
    re_names: tuple[str, ...],
    re_cov: np.ndarray,
    sigma: float,
    groups: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The truth file's common fields, with lme4's names and VarCorr's SD/correlation."""
    re_cov = np.asarray(re_cov, dtype=float)
    sd = np.sqrt(np.diag(re_cov))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(np.outer(sd, sd) > 0, re_cov / np.outer(sd, sd), 0.0)
    return {
        "scenario": name,
        "formula": formula,
        "group": group,
        "fixef": {k: float(v) for k, v in fixef.items()},
        "re_names": list(re_names),
        "re_cov": re_cov.tolist(),
        "re_sd": dict(zip(re_names, sd.tolist())),
        "re_corr": corr.tolist(),
        "sigma": float(sigma),
        "groups": {k: {n: float(v) for n, v in g.items()} for k, g in groups.items()},
    }


@dataclasses.dataclass
class Simulation:
    """A scenario's formula, its events (an iterator, consumed once) and its truth.

    ``truth`` is JSON-ready: ``fixef`` by lme4 name, ``re_names``, ``re_cov``,
    ``re_sd``, ``re_corr``, ``sigma``, ``groups`` (each group's true effects and size
    ``n``), the ``formula``, the grouping factor ``group`` and, for ``hospital``, the
    ``drift``.
    """

    name: str
    formula: str
    group: str
    n_events: int
    events: Iterator[dict]
    truth: dict[str, Any]


def scenario(
    name: str, n_events: int | None = None, seed: int = 0, n_groups: int = 1_000
) -> Simulation:
    """Build one of :data:`SCENARIOS`.

    Parameters
    ----------
    name
        ``"hospital"``, ``"web"`` or ``"basic"``.
    n_events
        Total events. ``None`` keeps the scenario's natural sizes (hospital: 5 to 5,000
        patients per hospital, about 145k in all; web: 7 to 150 visits per county,
        464 in all; basic: 200,000). Otherwise every group's size is scaled in
        proportion (each keeps at least 3 events).
    seed
        Everything, events and truth, is a function of the seed.
    n_groups
        Groups of ``basic`` (the others have fixed counts).

    Raises
    ------
    ValueError
        For an unknown scenario, fewer than 1 event or group, or a negative seed.

    """
    if n_events is not None and not (_is_int(n_events) and n_events >= 1):
        raise ValueError(f"the number of events must be a positive integer, got {n_events!r}")
    if not (_is_int(n_groups) and n_groups >= 1):
        raise ValueError(f"the number of groups must be a positive integer, got {n_groups!r}")
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"the seed must be an integer >= 0, got {seed!r}")
    if name == "hospital":
        return _hospital(n_events, seed)
    if name == "web":
        return _web(n_events, seed)
    if name == "basic":
        n = 200_000 if n_events is None else int(n_events)
        events, truth = _basic(n, n_groups, seed)
        truth["seed"] = seed
        return Simulation("basic", truth["formula"], "g", n, events, truth)
    raise ValueError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIOS)}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _scaled(sizes: np.ndarray, n_events: int | None, floor: int = 3) -> np.ndarray:
    """Integer sizes with the shape of ``sizes`` summing to about ``n_events``."""
    if n_events is None:
        return sizes.astype(np.int64)
    scaled = np.maximum(floor, np.round(sizes * (n_events / sizes.sum())))
    return scaled.astype(np.int64)


HOSPITAL = {
    "fixef": {"(Intercept)": 6.0, "age": 0.9, "severitymoderate": 1.5, "severitysevere": 4.0},
    "sd": (1.2, 0.35),
    "corr": 0.4,
    "sigma": 2.0,
    "drift": 3.0,
    "severity": (("mild", 0.6), ("moderate", 0.3), ("severe", 0.1)),
}


def _hospital(n_events: int | None, seed: int) -> Simulation:
    """200 hospitals: length of stay (days) ~ age + severity + (1 + age | hospital)."""
    rng = np.random.default_rng(seed)
    H = 200
    # log-uniform sizes from 5 to 5,000: a few very large hospitals, many small ones
    sizes = np.round(5.0 * 1000.0 ** (np.arange(H) / (H - 1)))
    sizes = _scaled(rng.permutation(sizes), n_events)
    t = HOSPITAL
    s0, s1 = t["sd"]
    cov = np.array([[s0**2, t["corr"] * s0 * s1], [t["corr"] * s0 * s1, s1**2]])
    b = rng.multivariate_normal(np.zeros(2), cov, size=H)
    keys = [f"H{i + 1:03d}" for i in range(H)]
    # the drifting hospital: a large one (the 10th largest), its intercept jumps mid-stream
    drifter = int(np.argsort(-sizes, kind="stable")[9])
    N = int(sizes.sum())
    g = np.repeat(np.arange(H), sizes)
    g = g[rng.permutation(N)]  # arrival order: hospitals interleaved
    # each hospital has its own case mix: age mean and share of severe cases
    age_mean = rng.normal(0.0, 0.3, size=H)
    age = rng.normal(age_mean[g], 0.95)
    levels = [lv for lv, _ in t["severity"]]
    base = np.array([pr for _, pr in t["severity"]])
    tilt = rng.normal(0.0, 0.5, size=H)
    logits = np.log(base)[None, :] + np.outer(tilt, [0.0, 0.5, 1.0])
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    u = rng.uniform(size=N)
    sev = (u[:, None] > np.cumsum(probs[g], axis=1)).sum(axis=1)
    sev[0] = 0  # the first patient is "mild", the reference level in lme4's order
    ts = np.arange(N, dtype=float)
    half = N // 2
    fx = t["fixef"]
    level_fx = np.array([0.0, fx["severitymoderate"], fx["severitysevere"]])
    b0 = b[g, 0] + np.where((g == drifter) & (ts >= half), t["drift"], 0.0)
    y = fx["(Intercept)"] + fx["age"] * age + level_fx[sev] + b0 + b[g, 1] * age
    y = y + rng.normal(scale=t["sigma"], size=N)
    effects = {
        k: {"(Intercept)": b[i, 0], "age": b[i, 1], "n": sizes[i]} for i, k in enumerate(keys)
    }
    effects[keys[drifter]]["(Intercept)"] += t["drift"]  # its effect at the end of the stream
    truth = _truth(
        "hospital",
        "y ~ age + severity + (1 + age | hospital)",
        "hospital",
        fx,
        ("(Intercept)", "age"),
        cov,
        t["sigma"],
        effects,
    )
    truth.update(
        seed=seed,
        n_events=N,
        response="length of stay (days)",
        levels={"severity": levels},
        drift={
            "group": keys[drifter],
            "from_ts": float(half),
            "term": "(Intercept)",
            "before": float(b[drifter, 0]),
            "after": float(b[drifter, 0] + t["drift"]),
        },
    )

    def gen() -> Iterator[dict]:
        for i in range(N):
            yield {
                "hospital": keys[g[i]],
                "age": round(float(age[i]), 6),
                "severity": levels[sev[i]],
                "y": round(float(y[i]), 6),
                "ts": float(ts[i]),
            }

    return Simulation("hospital", truth["formula"], "hospital", N, gen(), truth)


WEB = {"intercept": 45.0, "age": -6.0, "county_sd": 14.0, "sigma": 8.0}


def _web(n_events: int | None, seed: int) -> Simulation:
    """8 counties: bounce time (s) ~ age + (1 | county), Simpson's paradox.

    Older counties have longer bounce times (their intercepts grow with their mean age),
    so the pooled slope is positive, while within each county older visitors bounce
    sooner (negative slope).
    """
    rng = np.random.default_rng(seed)
    names = ("Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Hazel", "Juniper")
    sizes = _scaled(np.array([7, 12, 20, 35, 50, 80, 110, 150]), n_events)
    C = len(names)
    mean_age = np.linspace(-1.3, 1.3, C)[rng.permutation(C)]
    # county effects track the county's mean age (plus a little noise): the confounder
    u = WEB["county_sd"] * (mean_age / mean_age.std()) * 0.95 + rng.normal(0, 2.0, C)
    g = np.repeat(np.arange(C), sizes)
    N = int(sizes.sum())
    g = g[rng.permutation(N)]
    raw_age = rng.normal(mean_age[g], 0.45)
    age = (raw_age - raw_age.mean()) / raw_age.std()  # standardised over all visits
    y = WEB["intercept"] + WEB["age"] * age + u[g] + rng.normal(0, WEB["sigma"], N)
    keys = [f"{n}" for n in names]
    effects = {k: {"(Intercept)": u[i], "n": sizes[i]} for i, k in enumerate(keys)}
    truth = _truth(
        "web",
        "bounce ~ age + (1 | county)",
        "county",
        {"(Intercept)": WEB["intercept"], "age": WEB["age"]},
        ("(Intercept)",),
        np.array([[float(np.var(u))]]),
        WEB["sigma"],
        effects,
    )
    truth.update(
        seed=seed,
        n_events=N,
        response="bounce time (s)",
        pooled_slope=float(np.polyfit(age, y, 1)[0]),
    )

    def gen() -> Iterator[dict]:
        for i in range(N):
            yield {
                "county": keys[g[i]],
                "age": round(float(age[i]), 6),
                "bounce": round(float(y[i]), 4),
                "ts": float(i),
            }

    return Simulation("web", truth["formula"], "county", N, gen(), truth)


# -- output ------------------------------------------------------------------------------
def to_jsonl(events: Iterable[dict]) -> Iterator[str]:
    """One JSON line per event."""
    for e in events:
        yield json.dumps(e) + "\n"


def truth_path(events_path: str) -> str:
    """Where the truth of events written to ``events_path`` goes: ``PATH.truth.json``."""
    return f"{events_path}.truth.json"


def _throttle(events: Iterable[dict], rate: float | None) -> Iterator[dict]:
    """Yield at most ``rate`` events per second (all at once when ``rate`` is None)."""
    if not rate:
        yield from events
        return
    t0 = time.monotonic()
    for i, e in enumerate(events):
        ahead = i / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
        yield e


def write_events(
    sim: Simulation, to: str = "-", rate: float | None = None, truth: str | None = None
) -> int:
    """Write a simulation's events to ``to`` and its truth beside them; returns the count.

    Parameters
    ----------
    to
        ``-`` (stdout), ``jsonl:PATH`` (or a bare path) or ``kafka://HOST:PORT/TOPIC``
        (messages keyed by group, through kafka-python).
    rate
        Events per second at most (``None``: as fast as possible).
    truth
        Path of the truth file; by default ``PATH.truth.json`` beside a JSON-lines file,
        and none for stdout or Kafka.

    """
    if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
        raise ValueError(f"--rate must be > 0 events per second, got {rate!r}")
    events = _throttle(sim.events, rate)
    path = None
    if not to.startswith("kafka://"):
        path = to[len("jsonl:") :] if to.startswith("jsonl:") else to
        if not path:
            raise ValueError("--to jsonl: needs a path: jsonl:PATH")
        if path != "-":
            truth = truth or truth_path(path)
    if truth:  # first: a truth that cannot be written stops before any event is
        try:
            with open(truth, "w", encoding="utf-8") as fh:
                json.dump(sim.truth, fh, indent=1)
                fh.write("\n")
        except OSError as e:
            raise doing(f"writing the truth to {truth}", e) from None
    if path is None:
        return _to_kafka(to, events, sim.group)
    if path == "-":
        return _to_file(sys.stdout, events, flush=bool(rate))
    try:
        with open(path, "w", encoding="utf-8") as fh:
            return _to_file(fh, events, flush=bool(rate))
    except OSError as e:
        raise doing(f"writing events to {path}", e) from None


def _to_file(fh, events: Iterable[dict], flush: bool) -> int:
    n = 0
    for line in to_jsonl(events):
        fh.write(line)
        n += 1
        if flush:
            fh.flush()
    fh.flush()
    return n


def _to_kafka(url: str, events: Iterable[dict], group: str) -> int:
    from kafka import KafkaProducer

    from streamlmm.stream.broker import wait_for_broker

    bootstrap, _, topic = url[len("kafka://") :].partition("/")
    if not topic:
        raise ValueError(f"{url!r}: expected kafka://HOST:PORT/TOPIC")
    wait_for_broker(bootstrap)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    n = 0
    try:
        for e in events:
            producer.send(topic, key=str(e[group]).encode(), value=json.dumps(e).encode())
            n += 1
        producer.flush()
    finally:
        producer.close()
    return n


def simulate_command(args) -> int:
    """``streamlmm simulate``: arguments ``scenario``, ``events``, ``groups``, ``seed``,
    ``rate``, ``to`` and ``truth`` (see :func:`write_events`)."""
    sim = scenario(args.scenario, args.events, args.seed, n_groups=args.groups)
    try:
        n = write_events(sim, args.to, args.rate, args.truth)
    except BrokenPipeError:
        return 0
    if args.to != "-":
        sys.stderr.write(f"[streamlmm] simulated {n:,} {sim.name} events → {args.to}\n")
    return 0


def pooled_and_within_slopes(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """The pooled OLS slope of ``y`` on ``x``, and the within-group (fixed-effects) slope.

    >>> x = np.array([0.0, 1.0, 2.0, 3.0]); g = np.array([0, 0, 1, 1])
    >>> [round(v, 6) for v in pooled_and_within_slopes(x, np.array([1.0, 0.0, 5.0, 4.0]), g)]
    [1.4, -1.0]

    """
    pooled = float(np.polyfit(x, y, 1)[0])
    xd, yd = x.astype(float).copy(), y.astype(float).copy()
    for k in np.unique(g):
        m = g == k
        xd[m] -= xd[m].mean()
        yd[m] -= yd[m].mean()
    within = float(xd @ yd / (xd @ xd)) if xd @ xd > 0 else math.nan
    return pooled, within
