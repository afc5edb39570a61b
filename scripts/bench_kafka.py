#!/usr/bin/env python
"""End-to-end Kafka benchmark of the streaming engine, on the local broker.

1. Throughput. N simulated events in a 3-partition topic are drained twice per round,
   from client construction to the end: by a bare kafka-python consumer (no decode, no
   model) and by the :class:`~streamlmm.stream.engine.Engine` (in-process, ``until_end``,
   up to its final durable snapshot). Prints both rates and engine/bare (target >= 0.7).
2. Lag. A producer *process* writes events at a fixed rate for S seconds while the
   engine follows the topic. Each record's lag is measured from its Kafka timestamp
   (the producer's CreateTime) to the moment the engine has learned it, and to the
   moment a durable snapshot holds it. Prints p50/p99/max per rate.

Usage::

    .venv/bin/python scripts/bench_kafka.py            # full run (~2 min on 2 cores)
    .venv/bin/python scripts/bench_kafka.py --quick    # smoke run (~20 s)

The broker is ``127.0.0.1:$STREAMLMM_KAFKA_PORT`` (default 9092), started with
``scripts/kafka-local start`` if it is not running (and stopped again afterwards).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
MAX_POLL_RECORDS = 5_000  # EngineConfig's default, used by both consumers


# -- broker and topics --------------------------------------------------------------------------
def kafka_local(cmd: str) -> int:
    return subprocess.run(
        [str(REPO / "scripts" / "kafka-local"), cmd], capture_output=True, text=True
    ).returncode


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        spec = {"num_partitions": partitions, "replication_factor": 1}
        admin.create_topics({name: spec}, wait_for_metadata=True)
    finally:
        admin.close()


def delete_topics(bootstrap: str, names: list[str]) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics(names, raise_errors=False)
    finally:
        admin.close()


def encoded_events(n: int, groups: int, seed: int) -> list[tuple[bytes, bytes]]:
    from streamlmm.simulate import simulate

    return [
        (e["g"].encode(), json.dumps(e, separators=(",", ":")).encode())
        for e in simulate(n, groups, seed)
    ]


def produce_all(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    """Send everything as fast as kafka-python can; returns seconds."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=50, batch_size=1 << 20
    )
    t0 = time.perf_counter()
    for k, v in messages:
        producer.send(topic, key=k, value=v)
    producer.flush()
    dt = time.perf_counter() - t0
    producer.close()
    return dt


# -- 1. throughput ------------------------------------------------------------------------------
def drain_bare(bootstrap: str, topic: str, n: int, check_crcs: bool = True) -> float:
    """Seconds for a bare consumer (the engine's fetch settings) to read ``n`` records."""
    from kafka import KafkaConsumer, TopicPartition

    t0 = time.perf_counter()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
        reconnect_backoff_max_ms=1000,
        check_crcs=check_crcs,
    )
    parts = None
    while not parts:
        parts = consumer.partitions_for_topic(topic)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got = 0
    while got < n:
        for msgs in consumer.poll(timeout_ms=500, max_records=MAX_POLL_RECORDS).values():
            got += len(msgs)
    dt = time.perf_counter() - t0
    consumer.close(autocommit=False)
    return dt


def drain_bare_confluent(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for a bare confluent-kafka consumer (the engine's fetch settings) to read
    ``n`` records (no decode)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from streamlmm.stream.sources import FETCH_QUEUE_BACKOFF_MS

    t0 = time.perf_counter()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bare-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "max.partition.fetch.bytes": 4 << 20,
            # librdkafka's default (1 s) idles the consumer whenever its local queue fills
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        }
    )
    md = consumer.list_topics(topic, timeout=30).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions])
    got = 0
    while got < n:
        got += len(consumer.consume(MAX_POLL_RECORDS, 0.5))
    dt = time.perf_counter() - t0
    consumer.close()
    return dt


def drain_engine(bootstrap: str, topic: str, n: int, client: str = "auto") -> float:
    """Seconds from Engine construction to its final durable snapshot (``until_end``),
    which follows a full refit."""
    from streamlmm.stream.engine import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as d:
        cfg = EngineConfig(
            source=f"kafka://{bootstrap}/{topic}",
            formula=FORMULA,
            snapshot_dir=d,
            consumer_group=f"bench-{uuid.uuid4().hex[:8]}",
            until_end=True,
            progress_seconds=0,
            max_poll_records=MAX_POLL_RECORDS,
            kafka_client=client,
        )
        t0 = time.perf_counter()
        engine = Engine(cfg)
        engine.run(install_signals=False)
        dt = time.perf_counter() - t0
        assert engine.last_snapshot is not None and engine.last_snapshot.n_events == n
    return dt


def engine_core(messages: list[tuple[bytes, bytes]], partitions: int = 3) -> float:
    """Seconds for the engine's own per-poll work on records already in memory: the
    poll's columns, decode, keep groups home, learn, track offsets; then the final fit
    and snapshot (no Kafka, no disk)."""
    from streamlmm.stream.decode import Polled, Record
    from streamlmm.stream.engine import Engine, EngineConfig
    from streamlmm.stream.sources import Source

    class Memory(Source):
        topic = "t"

        def seek(self, offsets) -> None:
            pass

    with tempfile.TemporaryDirectory() as d:
        engine = Engine(EngineConfig("memory", FORMULA, d), source=Memory())
        engine.check_home = True
        home: dict[bytes, int] = {}  # producers key by group: a group keeps its partition
        part = np.array([home.setdefault(k, len(home) % partitions) for k, _ in messages], np.int64)
        t0 = time.perf_counter()
        for start in range(0, len(messages), MAX_POLL_RECORDS):
            chunk = messages[start : start + MAX_POLL_RECORDS]
            n = len(chunk)
            parts = part[start : start + n]
            engine.step(
                Polled(
                    [v for _, v in chunk],
                    parts,
                    np.arange(start, start + n, dtype=np.int64),
                    lambda i, c=chunk, s=start, p=parts: Record("t", p[i], s + i, *c[i], 0),
                )
            )
        assert engine.model.n_events == len(messages)
        engine.model.fit()
        engine.model.snapshot(offsets=engine.offsets)
        return time.perf_counter() - t0


def warm_up() -> None:
    """Import and JIT-compile the model's and the decoder's kernels outside the timed
    region."""
    from streamlmm import MixedLM
    from streamlmm.stream.decode import Decoder, Record

    m = MixedLM(FORMULA)
    for i in range(50):
        m.learn_one({"g": f"g{i % 5}", "x1": i * 0.1, "x2": (i % 3) * 0.5}, float(i % 7))
    m.fit().snapshot()
    decoder = Decoder(FORMULA)
    for _ in range(2):  # the first poll teaches the design its kinds; the second is bulk
        decoder.decode(
            [Record("t", 0, i, k, v, 0) for i, (k, v) in enumerate(encoded_events(50, 5, 1))]
        )


# -- 2. lag -------------------------------------------------------------------------------------
def paced_producer(bootstrap: str, topic: str, rate: float, seconds: float, seed: int, out):
    """(Child process.) Produce ``rate`` events/s for ``seconds``; report the count."""
    from kafka import KafkaProducer

    messages = encoded_events(int(rate * seconds) + 1, 1_000, seed)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 << 10
    )
    sent = 0
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
        due = min(int(rate * elapsed), len(messages))
        while sent < due:
            k, v = messages[sent]
            producer.send(topic, key=k, value=v)  # Kafka timestamp = now (CreateTime)
            sent += 1
        time.sleep(0.002)
    producer.flush()
    out.put((sent, time.perf_counter() - t0))
    producer.close()


def measure_lag(bootstrap: str, rate: float, seconds: float, snapshot_every_s: float) -> dict:
    from streamlmm.stream.engine import Engine, EngineConfig
    from streamlmm.stream.sources import KafkaSource

    class TimedSource(KafkaSource):
        """Notes when each polled record is learned (the engine's next poll or checkpoint)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.last: list[int] = []
            self.learn_lags: list[float] = []
            self.unsnapped: list[int] = []
            self.polls = 0

        def settle(self) -> None:
            now = time.time() * 1000.0
            self.learn_lags.extend(now - ts for ts in self.last)
            self.unsnapped.extend(self.last)
            self.last = []

        def poll(self, max_records, timeout_s):
            self.settle()
            recs = super().poll(max_records, timeout_s)
            self.last = [r.timestamp for r in recs]
            self.polls += 1
            return recs

    class TimedEngine(Engine):
        snapshot_lags: list[float] = []

        def checkpoint(self, final=False):
            self.source.settle()
            snap = super().checkpoint(final)
            now = time.time() * 1000.0
            self.snapshot_lags.extend(now - ts for ts in self.source.unsnapped)
            self.source.unsnapped.clear()
            return snap

    topic = f"bench-lag-{uuid.uuid4().hex[:10]}"
    create_topic(bootstrap, topic, 3)
    with tempfile.TemporaryDirectory() as d:
        group = f"bench-{uuid.uuid4().hex[:8]}"
        cfg = EngineConfig(
            source=f"kafka://{bootstrap}/{topic}",
            formula=FORMULA,
            snapshot_dir=d,
            consumer_group=group,
            snapshot_every_seconds=snapshot_every_s,
            progress_seconds=0,
        )
        source = TimedSource(bootstrap, topic, group)
        engine = TimedEngine(cfg, source=source)
        engine.snapshot_lags = []
        runner = threading.Thread(target=engine.run, kwargs={"install_signals": False})
        runner.start()
        while source.polls < 2:  # positioned and polling before the clock starts
            time.sleep(0.05)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(
            target=paced_producer, args=(bootstrap, topic, rate, seconds, 11, out), daemon=True
        )
        proc.start()
        sent, took = out.get(timeout=seconds + 300)
        proc.join(timeout=60)
        deadline = time.monotonic() + 300
        while engine.model.n_events < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.stop_requested = True
        runner.join(timeout=120)
        learned = engine.model.n_events
    delete_topics(bootstrap, [topic])
    q = [50, 99, 100]
    learn = np.percentile(source.learn_lags, q) if source.learn_lags else [np.nan] * 3
    snap = np.percentile(engine.snapshot_lags, q) if engine.snapshot_lags else [np.nan] * 3
    return {
        "rate": rate,
        "sent": sent,
        "achieved": sent / took,
        "learned": learned,
        "learn": learn,
        "snap": snap,
    }


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--events", type=int, help="throughput events [200000; quick 30000]")
    p.add_argument("--groups", type=int, default=1_000)
    p.add_argument("--partitions", type=int, default=3, help="throughput topic partitions [3]")
    p.add_argument("--rounds", type=int, help="throughput rounds, best kept [2; quick 1]")
    p.add_argument("--rates", help="lag phase rates, ev/s, comma-separated [5000,20000]")
    p.add_argument("--seconds", type=float, help="lag phase seconds per rate [20; quick 5]")
    p.add_argument("--snapshot-every-seconds", type=float, default=1.0)
    p.add_argument("--no-lag", action="store_true", help="skip the lag phase")
    p.add_argument(
        "--hog", action="store_true", help="run beside a CPU-bound process (while True: pass)"
    )
    args = p.parse_args(argv)
    n = args.events or (30_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 2)
    rates = [float(r) for r in (args.rates or ("5000" if args.quick else "5000,20000")).split(",")]
    seconds = args.seconds or (5.0 if args.quick else 20.0)

    port = os.environ.get("STREAMLMM_KAFKA_PORT", "9092")
    bootstrap = f"127.0.0.1:{port}"
    started = False
    if kafka_local("status") != 0:
        if kafka_local("start") != 0:
            sys.exit(f"could not start the local broker on {bootstrap} (scripts/kafka-local)")
        started = True
    hog = None
    if args.hog:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import confluent_kafka
        import kafka
        from kafka.record import util as record_util

        crc = "native crc32c" if record_util.crc32c_c is not None else "pure-Python crc32c"
        warm_up()
        topic = f"bench-tput-{uuid.uuid4().hex[:10]}"
        create_topic(bootstrap, topic, args.partitions)
        msgs = encoded_events(n, args.groups, 7)
        prod_s = produce_all(bootstrap, topic, msgs)
        gc.collect()
        gc.freeze()  # the benchmark's own objects (msgs) are no consumer's garbage to scan
        bare, bare_ck, eng, eng_kp, core = [], [], [], [], []
        for _ in range(rounds):
            bare.append(drain_bare(bootstrap, topic, n))
            bare_ck.append(drain_bare_confluent(bootstrap, topic, n))
            eng.append(drain_engine(bootstrap, topic, n, "confluent-kafka"))
            eng_kp.append(drain_engine(bootstrap, topic, n, "kafka-python"))
            core.append(engine_core(msgs, args.partitions))
        delete_topics(bootstrap, [topic])
        lags = []
        if not args.no_lag:
            lags = [measure_lag(bootstrap, r, seconds, args.snapshot_every_seconds) for r in rates]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        if started:
            kafka_local("stop")

    b, bc, e, ek = min(bare), min(bare_ck), min(eng), min(eng_kp)
    fastest = min(b, bc)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nstreamlmm Kafka benchmark: {n:,} events, {args.partitions} partition(s), "
        f"{args.groups:,} groups, "
        f"{FORMULA!r}\nkafka-python {kafka.__version__} ({crc}), {os.cpu_count()} cores "
        f"(load average {load}), broker {bootstrap}; best of {rounds} round(s)\n"
    )
    from streamlmm.stream import rdkafka

    fetch = "librdkafka fetcher" if rdkafka.library() is not None else "consume()"
    print(
        f"confluent-kafka {confluent_kafka.version()[0]} (the engine fetches through its "
        f"{fetch})" + (", beside a CPU hog" if hog else "")
    )
    print("| throughput (topic -> end)                 | events/s | seconds | / fastest bare |")
    print("|-------------------------------------------|---------:|--------:|---------------:|")
    rows = [
        ("producer (kafka-python, acks=all)", prod_s),
        ("bare kafka-python consumer", b),
        ("bare confluent-kafka consumer", bc),
        ("Engine, confluent-kafka -> final snapshot", e),
        ("Engine, kafka-python -> final snapshot", ek),
        ("(engine work alone, no Kafka)", min(core)),
    ]
    for name, dt in rows:
        print(f"| {name:<41s} | {n / dt:8,.0f} | {dt:7.2f} | {fastest / dt:14.2f} |")
    print(
        f"\nengine (confluent) / bare confluent-kafka = {bc / e:.2f}; "
        f"engine (kafka-python) / bare kafka-python = {b / ek:.2f}; "
        f"engine / fastest bare = {fastest / e:.2f} "
        f"({'meets' if fastest / e >= 0.7 else 'BELOW'} the 0.7 target)"
    )
    paired = sorted(min(x, y) / z for x, y, z in zip(bare, bare_ck, eng))
    print(
        "each round, engine / fastest bare of that round: "
        + ", ".join(f"{r:.2f}" for r in paired)
        + f" (median {float(np.median(paired)):.2f}, worst {paired[0]:.2f})\n"
    )
    if not lags:
        return 0
    print(
        f"| lag at a fixed rate ({seconds:g} s each, snapshot every "
        f"{args.snapshot_every_seconds:g} s) | produced | achieved ev/s | learned "
        "| learn p50 / p99 / max (ms) | durable p50 / p99 / max (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in lags:
        lp = " / ".join(f"{v:,.0f}" for v in r["learn"])
        sp = " / ".join(f"{v:,.0f}" for v in r["snap"])
        print(
            f"| {r['rate']:,.0f} ev/s | {r['sent']:,} | {r['achieved']:,.0f} | "
            f"{r['learned']:,} | {lp} | {sp} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
