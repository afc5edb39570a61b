"""``scripts/run`` with the engine's HTTP query server (``streamlmm run --serve`` and
``streamlmm serve``, from the serve work): live lookups over HTTP, ``--keep-serving``."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

from test_demo import processes_mentioning, run_demo


def test_lookups_over_http_and_keep_serving(tmp_path):
    out = tmp_path / "demo"
    r = run_demo(
        out,
        "--scenario",
        "basic",
        "--keep-serving",
        STREAMLMM_DEMO_EVENTS="20000",
        STREAMLMM_DEMO_RATE="4000",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "lookups from HTTP http://127.0.0.1:" in r.stdout
    assert "raw mean" in r.stdout
    line = next(x for x in r.stdout.splitlines() if "[demo] serving at" in x)
    url = line.split("serving at ")[1].split()[0]
    pid = int(line.split("(pid ")[1].split(";")[0])
    try:
        with urllib.request.urlopen(url + "/v1/model", timeout=5) as resp:
            model = json.loads(resp.read())
        assert model["n_events"] == 20000
        key = model.get("re_names") and "g0"
        with urllib.request.urlopen(f"{url}/v1/groups/{key}", timeout=5) as resp:
            g = json.loads(resp.read())
        assert set(g) >= {"group", "ranef", "ranef_cov", "n", "shrinkage", "snapshot"}
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not processes_mentioning(str(tmp_path)):
            break
        time.sleep(0.1)
    assert processes_mentioning(str(tmp_path)) == []
