"""``scripts/run`` end to end with short settings (the ``basic`` scenario, which needs no
factor support): the summary recovers the simulated truth, and no process is left behind.

Tolerances: fixed effects within 4 standard errors of the truth, random-effect SDs and σ
within 15% of it, the BLUPs correlated above 0.9 with the true group effects.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from streamlmm.summary import compare_with_truth, load_snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. a temporary path)."""
    found = []
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{p.name}: {cmd}")
    return found


def run_demo(out: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, STREAMLMM_PYTHON=sys.executable, STREAMLMM_DEMO_DIR=str(out), **env)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "run"), *args],
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_recovery(
    out: pathlib.Path, stdout: str, sd_tol: float = 0.15, min_corr: dict | None = None
) -> None:
    """The summary recovers the simulated truth: fixed effects within 4 SE, SDs and σ
    within ``sd_tol`` relative, every random effect's BLUPs correlated with the true
    effects above ``min_corr[name]`` (default 0.9)."""
    import json

    snap = load_snapshot(out / "snapshots")
    truth = json.loads((out / "events.jsonl.truth.json").read_text())
    assert snap.n_events == truth["n_events"]
    cmp = compare_with_truth(snap, truth)
    for r in cmp["rows"]:
        if r["kind"] == "fixef":
            assert abs(r["z"]) < 4, r
        elif r["kind"] in ("re_sd", "sigma"):
            assert abs(r["diff"]) < sd_tol * r["truth"], r
    for name, g in cmp["groups"].items():
        assert g["corr"] > (min_corr or {}).get(name, 0.9), (name, g)
    assert "Compared with the simulated truth:" in stdout
    for name in ("shrinkage", "caterpillar", "pooling", "residuals", "trajectories"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000
    assert (out / "summary.txt").read_text().strip() in stdout


def test_scripts_run_basic(tmp_path):
    out = tmp_path / "demo"
    r = run_demo(out, "--scenario", "basic", STREAMLMM_DEMO_EVENTS="20000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[demo] events" in r.stdout and "large" in r.stdout and "small" in r.stdout
    assert "where everything is" in r.stdout
    check_recovery(out, r.stdout)
    assert processes_mentioning(str(tmp_path)) == []


def test_demo_flags_and_key_paths():
    from streamlmm.demo import _parse, choose_groups, key_path
    from streamlmm.simulate import scenario

    a = _parse(["--events", "100", "--kafka"])
    assert a.events == 100 and a.kafka and a.scenario == "hospital"
    large, small = choose_groups(scenario("hospital", seed=1).truth)
    t = scenario("hospital", seed=1).truth["groups"]
    assert t[large]["n"] == 5000 and t[small]["n"] < 20
    assert key_path(-3) == "-3" and key_path("-3") == "%22-3%22"


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_scripts_run_interrupted_leaves_nothing(tmp_path, sig):
    """A signal to scripts/run mid-stream stops the driver and the engine."""
    import signal
    import time

    out = tmp_path / "demo"
    e = dict(os.environ, STREAMLMM_PYTHON=sys.executable, STREAMLMM_DEMO_DIR=str(out))
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    e.update(STREAMLMM_DEMO_EVENTS="200000", STREAMLMM_DEMO_RATE="2000")
    p = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run"), "--scenario", "basic"],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not processes_mentioning(str(out / "snapshots")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(p.pid, getattr(signal, f"SIG{sig}"))
    p.wait(60)
    for _ in range(100):
        if not processes_mentioning(str(tmp_path)):
            break
        time.sleep(0.1)
    assert processes_mentioning(str(tmp_path)) == []
