"""Scale-out on a real broker: workers in a consumer group, a state topic, one fitter.

- **Exact under failures.** 3 workers on a 6-partition topic; one is SIGKILLed mid-
  stream, more events arrive, a fourth joins. Once the group's committed offsets reach
  the end, ``streamlmm fit --until-caught-up`` writes a snapshot equal to the
  single-process in-memory fit and to lme4's reference (core tolerances), with exactly
  the right ``n`` per group.
- **No duplicates.** A ``read_committed`` reader of the state topic sees, per group,
  strictly increasing counts whose last is the group's true count.
- **Fitter restart.** A second fitter, with a fresh snapshot directory, rebuilds the same
  model from the state topic alone; a following fitter publishes parameters that the
  query view (``StateView``) combines with the state rows into every group's BLUP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.keys import key_from_json
from streamlmm.stream.state import decode_record

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.filterwarnings("ignore:(read_text|open_text) is deprecated:DeprecationWarning"),
]

DATA = REPO / "tests" / "data"
FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"


def load_case():
    df = pd.read_csv(DATA / "pub_slopes.csv", dtype={"g": str})
    ref = json.loads((DATA / "pub_slopes_reml.json").read_text())
    return df, ref


def in_memory(df: pd.DataFrame, method: str = "REML"):
    m = MixedLM(FORMULA, method)
    m.learn_many(df[["g", "x1", "x2"]], df["y"])
    return m.fit().snapshot()


def assert_close(snap, want_fixef, want_sigma, want_crit, want_re_cov) -> None:
    """Core tolerances: fixef/sigma 1e-5 rel, criterion 1e-6 rel, re_cov 1e-3 of max."""
    for k, v in want_fixef.items():
        assert snap.fixef[k] == pytest.approx(v, rel=1e-5), k
    assert snap.sigma == pytest.approx(want_sigma, rel=1e-5)
    assert snap.criterion == pytest.approx(want_crit, rel=1e-6)
    want_re_cov = np.asarray(want_re_cov, dtype=float).reshape(snap.re_cov.shape)
    atol = 1e-3 * np.abs(want_re_cov).max()
    np.testing.assert_allclose(snap.re_cov, want_re_cov, rtol=0, atol=atol)


def start_worker(kit, topic, state, group, i, *extra: str):
    args = [
        "--source",
        f"kafka://{kit.bootstrap}/{topic}",
        "--formula",
        FORMULA,
        "--consumer-group",
        group,
        "--state-topic",
        state,
        "--max-poll-records",
        "25",
        "--session-timeout-ms",
        "6000",
        "--transaction-timeout-ms",
        "6000",
        "--progress-seconds",
        "1",
        *extra,
    ]
    EngineProcess = sys.modules[type(kit).__module__].EngineProcess  # the conftest's
    eng = EngineProcess(args, kit.tmp_path / f"worker-{i}.log", kit.tmp_path)
    kit._engines.append(eng)
    return eng


def run_fitter(kit, state, snap_dir: Path, *extra: str, timeout_s: float = 120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLMM_")}
    args = [
        sys.executable,
        "-m",
        "streamlmm.cli",
        "fit",
        "--state-topic",
        f"kafka://{kit.bootstrap}/{state}",
        "--snapshot-dir",
        str(snap_dir),
        "--until-caught-up",
        *extra,
    ]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return kit.latest_snapshot(snap_dir)


def committed_total(kit, group, topic) -> int:
    return sum(v or 0 for v in kit.committed(group, topic).values())


def test_workers_killed_and_added_give_the_exact_fit(kit, topic, tmp_path):
    df, ref = load_case()
    events = df.to_dict("records")
    half = len(events) // 2
    kit.create_topic(topic, partitions=6)
    state, group = f"{topic}-state", f"{topic}-workers"
    kit.produce_events(topic, events[:half])
    workers = [start_worker(kit, topic, state, group, i) for i in range(3)]
    # mid-stream: some but not all of the first half is committed
    kit.wait_for(lambda: committed_total(kit, group, topic) > half // 5, 120, "progress")
    assert committed_total(kit, group, topic) < half, "the stream went too fast to kill mid-way"
    workers[0].kill()
    kit.produce_events(topic, events[half:])
    time.sleep(3)
    workers.append(start_worker(kit, topic, state, group, 3))
    ends = kit.end_offsets(topic)
    kit.wait_for(
        lambda: kit.committed(group, topic) == ends,
        180,
        "the group's committed offsets to reach the end",
        interval_s=0.5,
    )
    snap = run_fitter(kit, state, tmp_path / "fit1")
    for w in workers[1:]:
        assert w.alive(), w.log_tail()

    # n per group exactly, and the offsets the snapshot covers
    want_n = Counter(df["g"])
    got_n = dict(zip(snap.keys, snap.group_n.tolist()))
    assert got_n == {k: float(v) for k, v in want_n.items()}
    assert snap.n_events == len(events)
    assert dict(snap.offsets) == ends
    mem = in_memory(df)
    assert_close(snap, mem.fixef, mem.sigma, mem.criterion, mem.re_cov)
    assert_close(snap, ref["fixef"], ref["sigma"], ref["criterion"], ref["re_cov"])
    np.testing.assert_allclose(
        snap.b, mem.b[[mem.keys.index(k) for k in snap.keys]], rtol=1e-4, atol=1e-6
    )

    # no duplicates: per group, strictly increasing counts ending at the true count
    from kafka import TopicPartition

    consumer = kit.consumer(isolation_level="read_committed")
    try:
        parts = sorted(consumer.partitions_for_topic(state))
        tps = [TopicPartition(state, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        lso = consumer.end_offsets(tps)
        recs = []
        while any(consumer.position(tp) < lso[tp] for tp in tps):
            for msgs in consumer.poll(timeout_ms=500, max_records=100_000).values():
                recs.extend(msgs)
    finally:
        consumer.close()
    counts: dict = {}
    for m in sorted(recs, key=lambda m: (m.partition, m.offset)):
        rec = decode_record(m.key, m.value)
        if rec.is_marker:
            continue
        assert key_from_json(m.key) == rec.key
        seq = counts.setdefault(rec.key, [])
        assert not seq or rec.events > seq[-1], (rec.key, seq, rec.events)
        seq.append(rec.events)
    assert {k: v[-1] for k, v in counts.items()} == dict(want_n)

    # fitter restart: a new fitter rebuilds the same model from the state topic alone
    params = f"{topic}-params"
    again = run_fitter(kit, state, tmp_path / "fit2", "--method", "REML", "--params-topic", params)
    assert again.n_events == snap.n_events and set(again.keys) == set(snap.keys)
    assert again.criterion == pytest.approx(snap.criterion, rel=1e-9)
    for k, v in snap.fixef.items():
        assert again.fixef[k] == pytest.approx(v, rel=1e-7)
    ml = run_fitter(kit, state, tmp_path / "fit3", "--method", "ML")
    mem_ml = in_memory(df, "ML")
    assert_close(ml, mem_ml.fixef, mem_ml.sigma, mem_ml.criterion, mem_ml.re_cov)

    # queries: every group's BLUP from its state row and the published parameters
    from streamlmm.stream.statequery import StateView

    view = StateView(state, params, bootstrap=kit.bootstrap)
    try:
        assert view.sync(60), view.error
        assert view.version >= 1 and view.n_events == len(events)
        assert view.fixef == pytest.approx(again.fixef, rel=1e-12)
        for k in again.keys:
            assert view.n(k) == again.n(k)
            assert view.events(k) == want_n[k]
            want_b = np.array(list(again.ranef(k).values()))
            np.testing.assert_allclose(list(view.ranef(k).values()), want_b, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(view.ranef_cov(k), again.ranef_cov(k), rtol=1e-6, atol=1e-12)
        with pytest.raises(KeyError, match="unknown group 'nope'"):
            view.ranef("nope")
        with pytest.raises(KeyError, match="unknown group 'nope'"):
            view.n("nope")
        assert view.n("nope", fallback="population") == 0
        assert view.ranef("nope", fallback="population") == {"(Intercept)": 0.0, "x1": 0.0}
        whole = view.to_snapshot()  # the model the query service swaps in
        assert sorted(whole.keys) == sorted(again.keys)
        for k in again.keys[:50]:
            np.testing.assert_allclose(
                whole.b[whole._index[k]], again.b[again._index[k]], rtol=1e-6
            )
    finally:
        view.close()

    # the query service over the topics: a real `streamlmm serve` process, real HTTP
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlmm",
            "serve",
            "--state-topic",
            state,
            "--params-topic",
            params,
            "--bootstrap",
            kit.bootstrap,
            "--port",
            str(port),
            "--poll-seconds",
            "0.2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        key = again.keys[0]
        url = f"http://127.0.0.1:{port}/v1/groups/%22{key}%22"
        got = None
        deadline = time.monotonic() + 90
        while got is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    got = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert got is not None, "serve --state-topic never answered"
        want_b = again.ranef(key)
        for name, v in got["ranef"].items():
            assert v == pytest.approx(want_b[name], rel=1e-6, abs=1e-9)
        assert got["n"] == again.n(key)
    finally:
        serve.terminate()
        serve.wait(30)

    for w in workers[1:]:
        w.signal(15)
    for w in workers[1:]:
        assert w.wait(60) == 0, w.log_tail()


def test_workers_publish_effects_at_the_fitters_estimates(kit, topic, tmp_path):
    """A worker following the params topic publishes each changed group's effects at the
    fitter's global estimates, in its transactions: each effect equals the dense BLUP
    ``D Z'(Z D Z' + σ²I)⁻¹(y − Xβ)`` of the group's events so far at those θ, β, σ."""
    from kafka import TopicPartition

    from streamlmm.keys import key_from_json

    df, _ = load_case()
    events = df.to_dict("records")
    half = len(events) // 2
    kit.create_topic(topic, partitions=2)
    state, group = f"{topic}-state", f"{topic}-workers"
    params, effects = f"{topic}-params", f"{topic}-effects"
    kit.produce_events(topic, events[:half])
    w = start_worker(
        kit, topic, state, group, 0, "--params-topic", params, "--publish-topic", effects
    )
    ends = kit.end_offsets(topic)
    kit.wait_for(lambda: kit.committed(group, topic) == ends, 120, "the first half")
    fit = run_fitter(kit, state, tmp_path / "fit", "--params-topic", params)
    time.sleep(3)  # the worker polls the params topic between its batches
    kit.produce_events(topic, events[half:])
    ends = kit.end_offsets(topic)
    kit.wait_for(lambda: kit.committed(group, topic) == ends, 120, "the second half")
    assert w.alive(), w.log_tail()

    consumer = kit.consumer(isolation_level="read_committed")
    try:
        parts = kit.wait_for(lambda: consumer.partitions_for_topic(effects), 30, "effects")
        tps = [TopicPartition(effects, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        last: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=1000)
            if not got and last:
                break
            for msgs in got.values():
                for m in msgs:
                    last[key_from_json(m.key)] = json.loads(m.value)
    finally:
        consumer.close()
    assert last, "no effects were published"
    second = set(df["g"].iloc[half:])
    assert set(last) == second  # published for the groups the second half changed
    theta = np.asarray(fit.theta)
    lam = np.array([[theta[0], 0.0], [theta[1], theta[2]]])
    D = fit.sigma**2 * lam @ lam.T
    beta = np.array([fit.fixef[c] for c in ("(Intercept)", "x1", "x2")])
    for key in list(second)[:40]:
        rec = last[key]
        assert rec["params_version"] >= 1
        g = df[df["g"] == key]
        X = np.column_stack([np.ones(len(g)), g["x1"], g["x2"]])
        Z = X[:, :2]
        V = Z @ D @ Z.T + fit.sigma**2 * np.eye(len(g))
        want = D @ Z.T @ np.linalg.solve(V, g["y"].to_numpy() - X @ beta)
        got = np.array([rec["ranef"]["(Intercept)"], rec["ranef"]["x1"]])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        assert rec["n"] == len(g)
