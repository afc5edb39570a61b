"""Scale-out benchmark: workers' events/s, recovery after a SIGKILL, the fitter at 1M groups.

Run against a local broker (``STREAMLMM_KAFKA_PORT``, default 9092; ``scripts/kafka-local
start``)::

    PYTHONPATH=. .venv/bin/python scripts/bench_scaleout.py [--events 300000] [--groups 5000]
        [--fitter-groups 1000000] [--skip-kafka] [--skip-fitter]

1. **Throughput.** One 6-partition topic of simulated events; 1, 2 and 3 workers
   (``streamlmm run --state-topic``, one process each) read it from the start under a
   fresh consumer group. Events/s is events ÷ the time from the first committed offset
   to the group's committed offsets reaching the end (start-up and the first rebalance
   are reported separately).
2. **Recovery.** 3 workers; one is SIGKILLed a third of the way through; recovery is the
   time until every unfinished partition's committed offset moves again.
3. **Fitter.** Synthetic statistics of ``--fitter-groups`` groups (5 events each), laid
   into the fitter's :class:`GlobalState` row by row from encoded state records (timed
   on a sample and extrapolated), then one exact REML fit and the snapshot, with the
   process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"


def bootstrap() -> str:
    return f"127.0.0.1:{os.environ.get('STREAMLMM_KAFKA_PORT', '9092')}"


def produce(bs: str, topic: str, n: int, groups: int) -> dict[str, int]:
    from kafka import KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamlmm.simulate import simulate

    admin = KafkaAdminClient(bootstrap_servers=bs)
    admin.create_topics([NewTopic(topic, 6, 1)])
    admin.close()
    p = KafkaProducer(bootstrap_servers=bs, linger_ms=50, batch_size=1 << 20, acks=1)
    for e in simulate(n, groups, seed=1):
        e.pop("ts", None)
        p.send(topic, key=str(e["g"]).encode(), value=json.dumps(e).encode())
    p.flush()
    p.close()
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bs)
    tps = [TopicPartition(topic, i) for i in range(6)]
    ends = {tp.partition: o for tp, o in c.end_offsets(tps).items()}
    c.close()
    return ends


def committed(bs: str, group: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bs, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p), timeout_ms=10_000) or 0 for p in range(6)}
    finally:
        c.close(autocommit=False)


def start_workers(bs: str, topic: str, group: str, k: int, logdir: Path) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLMM_")}
    env["PYTHONPATH"] = str(REPO)
    procs = []
    for i in range(k):
        args = [
            sys.executable,
            "-m",
            "streamlmm.cli",
            "run",
            "--source",
            f"kafka://{bs}/{topic}",
            "--formula",
            FORMULA,
            "--consumer-group",
            group,
            "--state-topic",
            f"{topic}-{group}-state",
            "--session-timeout-ms",
            "6000",
            "--transaction-timeout-ms",
            "6000",
            "--progress-seconds",
            "0",
        ]
        log = open(logdir / f"{group}-{i}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def throughput(bs: str, topic: str, ends: dict, k: int, logdir: Path) -> dict:
    group = f"bench{k}-{uuid.uuid4().hex[:6]}"
    total = sum(ends.values())
    t0 = time.monotonic()
    procs = start_workers(bs, topic, group, k, logdir)
    first = None
    try:
        while True:
            c = committed(bs, group, topic)
            done = sum(c.values())
            now = time.monotonic()
            if first is None and done > 0:
                first, first_done = now, done
            if done >= total:
                break
            if now - t0 > 900:
                raise RuntimeError("throughput run did not finish in 15 minutes")
            time.sleep(0.25)
    finally:
        stop(procs)
    return {
        "workers": k,
        "events": total,
        "startup_s": round(first - t0, 2),
        "seconds": round(now - first, 2),
        "events_per_s": round((total - first_done) / (now - first)),
    }


def recovery(bs: str, topic: str, ends: dict, logdir: Path) -> dict:
    group = f"benchrec-{uuid.uuid4().hex[:6]}"
    total = sum(ends.values())
    procs = start_workers(bs, topic, group, 3, logdir)
    try:
        while sum(committed(bs, group, topic).values()) < total // 3:
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        at_kill = committed(bs, group, topic)
        while True:
            c = committed(bs, group, topic)
            if all(c[p] > at_kill[p] or c[p] >= ends[p] for p in range(6)):
                break
            time.sleep(0.1)
        t_rec = time.monotonic() - t_kill
        while sum(committed(bs, group, topic).values()) < total:
            time.sleep(0.25)
        t_done = time.monotonic() - t_kill
    finally:
        stop(procs)
    return {"recovery_s": round(t_rec, 2), "kill_to_end_s": round(t_done, 2)}


def fitter_bench(G: int) -> dict:
    from streamlmm import MixedLM
    from streamlmm.stats import GroupStats
    from streamlmm.stream.fitter import GlobalState
    from streamlmm.stream.state import decode_record, encode_group

    rng = np.random.default_rng(0)
    m = MixedLM(FORMULA)
    design = m._design
    from streamlmm.design import numeric_design

    design = numeric_design(FORMULA)
    st = GroupStats(design, capacity=G)
    per = 5
    n = G * per
    keys = [f"g{i}" for i in range(G)]
    rows = st.rows(keys)
    g = np.repeat(np.arange(G), per)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    b0, b1 = rng.normal(0, 1.5, G), rng.normal(0, 0.5, G)
    y = 2 + 0.5 * x1 - x2 + b0[g] + b1[g] * x1 + rng.normal(size=n)
    A = np.column_stack([np.ones(n), x1, x2])
    st.add(rows[g], A, y, np.ones(n), np.zeros(n))
    dstate = design.to_state()
    # replay cost: encode + decode + apply, on a sample
    sample = min(G, 100_000)
    gs = GlobalState()
    t0 = time.perf_counter()
    for i in range(sample):
        k, v = encode_group(
            keys[i], 0, st.M[i], events=per, offset=1, formula=FORMULA, method="REML", design=dstate
        )
        gs.apply(decode_record(k, v))
    per_record = (time.perf_counter() - t0) / sample
    rec_bytes = len(v) + len(k)
    # the whole state, laid in directly (what the replay would build)
    gs = GlobalState()
    gs.formula, gs.method, gs.design = FORMULA, "REML", design
    gs.stats = st
    gs.events = dict.fromkeys(keys, per)
    gs.n_events = n
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = MixedLM(FORMULA)
    t0 = time.perf_counter()
    model.load_statistics(gs.design, gs.stats, gs.n_events)
    model.fit()
    t_fit = time.perf_counter() - t0
    evals = model.opt_summary.evals
    t0 = time.perf_counter()
    snap = model.snapshot()
    t_snap = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        snap.save(d)
        t_save = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "groups": G,
        "stats_row_bytes": st.width * 8,
        "stats_mb": round(st.nbytes() / 2**20, 1),
        "state_record_bytes": rec_bytes,
        "replay_us_per_record": round(per_record * 1e6, 1),
        "replay_s_extrapolated": round(per_record * G, 1),
        "fit_s": round(t_fit, 2),
        "fit_evals": evals,
        "ms_per_eval": round(1000 * t_fit / max(evals, 1), 1),
        "snapshot_s": round(t_snap, 2),
        "save_s": round(t_save, 2),
        "peak_rss_mb": round(max(rss0, rss1) / 1024),
        "fixef": {k: round(v, 4) for k, v in snap.fixef.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--groups", type=int, default=5_000)
    ap.add_argument("--fitter-groups", type=int, default=1_000_000)
    ap.add_argument("--skip-kafka", action="store_true")
    ap.add_argument("--skip-fitter", action="store_true")
    args = ap.parse_args()
    out: dict = {"cpus": os.cpu_count()}
    if not args.skip_kafka:
        bs = bootstrap()
        topic = f"bench-scaleout-{uuid.uuid4().hex[:8]}"
        ends = produce(bs, topic, args.events, args.groups)
        logdir = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
        out["throughput"] = [throughput(bs, topic, ends, k, logdir) for k in (1, 2, 3)]
        for r in out["throughput"]:
            print(json.dumps(r), flush=True)
        out["recovery"] = recovery(bs, topic, ends, logdir)
        print(json.dumps(out["recovery"]), flush=True)
    if not args.skip_fitter:
        out["fitter"] = fitter_bench(args.fitter_groups)
        print(json.dumps(out["fitter"]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
