"""The hospital scenario end to end (``severity`` is a factor with string levels).

Tolerances: fixed effects within 4 standard errors; σ and the SDs within 30% — the age
slope's SD rests on the few large hospitals (the fit itself equals lme4's on this data:
fixef to 1e-7, VarCorr to 1e-4, checked offline with lme4 1.1.31); the BLUPs'
correlation with the true effects above 0.9 for the intercept and above 0.5 for the age
slope, which is strongly shrunk in the many small hospitals.
"""

from __future__ import annotations

import pandas as pd
from test_demo import check_recovery, processes_mentioning, run_demo

from streamlmm import MixedLM
from streamlmm.simulate import scenario
from streamlmm.summary import compare_with_truth


def test_hospital_fit_recovers_truth():
    sim = scenario("hospital", 40_000, seed=21)
    df = pd.DataFrame(list(sim.events))
    m = MixedLM(sim.formula)
    m.learn_many(df[["hospital", "age", "severity"]], df["y"])
    snap = m.fit().snapshot()
    assert set(snap.fixef) == set(sim.truth["fixef"])
    cmp = compare_with_truth(snap, sim.truth)
    for r in cmp["rows"]:
        if r["kind"] == "fixef":
            assert abs(r["z"]) < 4, r
        elif r["kind"] in ("re_sd", "sigma"):
            assert abs(r["diff"]) < 0.3 * r["truth"], r
    assert cmp["groups"]["(Intercept)"]["corr"] > 0.9
    assert cmp["groups"]["age"]["corr"] > 0.5


def test_scripts_run_hospital(tmp_path):
    out = tmp_path / "demo"
    r = run_demo(out, STREAMLMM_DEMO_EVENTS="30000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hospital" in r.stdout and "drifting group" in r.stdout
    check_recovery(out, r.stdout, sd_tol=0.3, min_corr={"age": 0.5})
    assert processes_mentioning(str(tmp_path)) == []
