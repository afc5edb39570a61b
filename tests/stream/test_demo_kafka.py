"""``scripts/run --kafka``: the main job through the local Kafka broker, end to end.

The suite's broker is already running (``scripts/test`` starts it), so the demo uses it
and leaves it up; the demo's own processes must all be gone afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from test_demo import check_recovery, processes_mentioning, run_demo  # noqa: E402


def test_scripts_run_kafka(kafka, tmp_path):
    out = tmp_path / "demo"
    port = kafka.rpartition(":")[2]
    r = run_demo(out, "--kafka", STREAMLMM_DEMO_EVENTS="20000", STREAMLMM_KAFKA_PORT=port)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kafka" in r.stdout.lower()
    check_recovery(out, r.stdout, sd_tol=0.35, min_corr={"(Intercept)": 0.85, "age": 0.5})
    assert processes_mentioning(str(tmp_path)) == []
    status = subprocess.run(
        ["bash", str(REPO / "scripts" / "kafka-local"), "status"],
        env=dict(os.environ, STREAMLMM_KAFKA_PORT=port),
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, "the demo stopped a broker it had not started"
