"""Scenarios: shapes, the truth file, determinism by seed, Simpson's paradox in ``web``."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

from streamlmm.formula import parse_formula
from streamlmm.simulate import (
    SCENARIOS,
    pooled_and_within_slopes,
    scenario,
    simulate,
    truth_path,
    write_events,
)


def test_hospital_shape_and_truth():
    sim = scenario("hospital", seed=3)
    events = list(sim.events)
    assert len(events) == sim.n_events == sim.truth["n_events"]
    sizes = collections.Counter(e["hospital"] for e in events)
    assert len(sizes) == 200
    assert min(sizes.values()) == 5 and max(sizes.values()) == 5000
    assert {k: g["n"] for k, g in sim.truth["groups"].items()} == dict(sizes)
    assert set(events[0]) == {"hospital", "age", "severity", "y", "ts"}
    assert {e["severity"] for e in events} == {"mild", "moderate", "severe"}
    assert events[0]["severity"] == "mild"  # lme4's reference level comes first
    assert [e["ts"] for e in events[:3]] == [0.0, 1.0, 2.0]
    f = parse_formula(sim.formula)
    assert (f.group, f.response) == ("hospital", "y")
    t = sim.truth
    assert set(t["fixef"]) == {"(Intercept)", "age", "severitymoderate", "severitysevere"}
    assert t["re_names"] == ["(Intercept)", "age"]
    cov = np.array(t["re_cov"])
    assert np.allclose(np.sqrt(np.diag(cov)), [t["re_sd"]["(Intercept)"], t["re_sd"]["age"]])
    assert np.isclose(t["re_corr"][0][1], cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))
    d = t["drift"]
    assert d["group"] in sizes and d["after"] - d["before"] == pytest.approx(3.0)
    assert t["groups"][d["group"]]["(Intercept)"] == pytest.approx(d["after"])


def test_hospital_drift_shows_in_the_data():
    sim = scenario("hospital", seed=5)
    d = sim.truth["drift"]
    ys = [(e["ts"] >= d["from_ts"], e["y"]) for e in sim.events if e["hospital"] == d["group"]]
    before = np.mean([y for late, y in ys if not late])
    after = np.mean([y for late, y in ys if late])
    assert after - before == pytest.approx(3.0, abs=0.5)


def test_scaled_sizes():
    sim = scenario("hospital", 20_000, seed=1)
    assert abs(sim.n_events - 20_000) < 300
    assert min(g["n"] for g in sim.truth["groups"].values()) >= 3


@pytest.mark.parametrize("name", SCENARIOS)
def test_deterministic_by_seed(name):
    a = scenario(name, 3_000, seed=11)
    b = scenario(name, 3_000, seed=11)
    c = scenario(name, 3_000, seed=12)
    ea, eb, ec = list(a.events), list(b.events), list(c.events)
    assert ea == eb and a.truth == b.truth
    assert ea != ec


@pytest.mark.parametrize("seed", range(8))
def test_web_simpson(seed):
    sim = scenario("web", seed=seed)
    ev = list(sim.events)
    sizes = collections.Counter(e["county"] for e in ev)
    assert len(sizes) == 8 and min(sizes.values()) == 7 and max(sizes.values()) == 150
    x = np.array([e["age"] for e in ev])
    y = np.array([e["bounce"] for e in ev])
    g = np.array([e["county"] for e in ev])
    assert abs(x.mean()) < 1e-6 and x.std() == pytest.approx(1.0, abs=1e-5)  # standardised
    pooled, within = pooled_and_within_slopes(x, y, g)
    assert pooled > 0 > within  # pooled: age harmful; within counties: age helps
    assert sim.truth["fixef"]["age"] < 0 < sim.truth["pooled_slope"]


def test_basic_matches_simulate():
    sim = scenario("basic", 500, seed=4, n_groups=30)
    assert list(sim.events) == list(simulate(500, 30, seed=4))
    assert sim.formula == "y ~ x1 + x2 + (1 + x1 | g)"
    assert sim.truth["fixef"] == {"(Intercept)": 5.0, "x1": 0.3, "x2": -1.2}


def test_unknown_scenario():
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario("nope")


def test_write_events_with_truth_beside(tmp_path):
    path = tmp_path / "web.jsonl"
    n = write_events(scenario("web", seed=2), f"jsonl:{path}")
    lines = path.read_text().splitlines()
    assert n == len(lines) == 464
    truth = json.loads((tmp_path / "web.jsonl.truth.json").read_text())
    assert truth_path(str(path)) == str(tmp_path / "web.jsonl.truth.json")
    assert truth["formula"] == "bounce ~ age + (1 | county)" and truth["group"] == "county"
    assert json.loads(lines[0])["county"] in truth["groups"]


def test_cli_simulate_to_stdout_and_file(tmp_path):
    cmd = [sys.executable, "-m", "streamlmm.cli", "simulate", "--scenario", "web", "--seed", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 464
    path = tmp_path / "e.jsonl"
    subprocess.run(cmd + ["--to", f"jsonl:{path}", "--rate", "100000"], check=True)
    assert path.read_text() == out
    assert (tmp_path / "e.jsonl.truth.json").exists()
    # the old interface keeps working: basic events with --groups
    basic = subprocess.run(
        [sys.executable, "-m", "streamlmm.cli", "simulate", "--events", "5", "--groups", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [json.loads(line) for line in basic.splitlines()] == list(simulate(5, 3, seed=0))
