"""Exactly once on a real broker, through SIGKILLs: the final snapshot, dead letters and
published effects.

- A 3-partition topic with malformed messages among the events, an engine with a
  dead-letter topic and an effects topic, killed with SIGKILL at least 3 times mid-
  stream, then run ``--until-end``. The final snapshot equals the in-memory fit of the
  good events at lme4 tolerances; a ``read_committed`` reader of the dead-letter topic
  sees every malformed message exactly once; the effects topic's model records follow
  the snapshots without repeats, and its last record per group is the final snapshot's.
- The crash window between a transaction's commit and its snapshot: the newest
  snapshots are removed after a complete run (as if the engine died right after the
  commit). The restart re-reads that range for the statistics, but sends none of its
  dead letters again.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.keys import key_from_json
from streamlmm.simulate import simulate
from streamlmm.stream.sinks import MODEL_KEY, group_record_key

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.filterwarnings("ignore:(read_text|open_text) is deprecated:DeprecationWarning"),
]

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
N_GOOD, N_BAD = 60_000, 600
BAD_VALUES = [
    b'{"g": "a", "x1": ',
    b'{"g": "a", "x1": "1", "x2": 1, "y": 1}',
    b'{"x1": 1, "x2": 1, "y": 1}',
    b"[1, 2]",
    b'{"g": "a", "x1": 1, "x2": 1, "y": NaN}',
    b"\xff\xfe",
]


def make_stream(seed: int) -> tuple[list[dict], list[tuple[bytes, bytes]], set[int]]:
    """Good events (``g`` a string) and the messages with malformed ones mixed in."""
    rng = random.Random(seed)
    good = list(simulate(N_GOOD, 400, seed=seed))
    for e in good:
        del e["ts"]
    bad_at = set(rng.sample(range(N_GOOD + N_BAD), N_BAD))
    msgs, gi = [], 0
    for i in range(N_GOOD + N_BAD):
        if i in bad_at:
            g = rng.choice(good)["g"]
            msgs.append((str(g).encode(), BAD_VALUES[i % len(BAD_VALUES)] + b" #%d" % i))
        else:
            e = good[gi]
            gi += 1
            msgs.append((str(e["g"]).encode(), json.dumps(e, separators=(",", ":")).encode()))
    return good, msgs, bad_at


def in_memory_fit(good: list[dict]):
    m = MixedLM(FORMULA)
    df = pd.DataFrame(good)
    m.learn_many(df[["g", "x1", "x2"]], df["y"])
    return m.fit().snapshot()


def assert_lme4_close(snap, want) -> None:
    """lme4's tolerances: fixef/sigma 1e-5 rel, criterion 1e-6 rel, re_cov 1e-3 of max."""
    for k, v in want.fixef.items():
        assert snap.fixef[k] == pytest.approx(v, rel=1e-5), k
    assert snap.sigma == pytest.approx(want.sigma, rel=1e-5)
    assert snap.criterion == pytest.approx(want.criterion, rel=1e-6)
    atol = 1e-3 * np.abs(want.re_cov).max()
    np.testing.assert_allclose(snap.re_cov, want.re_cov, rtol=0, atol=atol)


def read_committed(kit, topic: str) -> list:
    return _read(kit, topic, isolation_level="read_committed")


def _read(kit, topic: str, **cfg) -> list:
    from kafka import TopicPartition

    consumer = kit.consumer(**cfg)
    try:
        parts = kit.wait_for(lambda: consumer.partitions_for_topic(topic), 30, "metadata")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)  # read_committed: the last stable offset
        got = []
        deadline = time.monotonic() + 120
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic}"
            for msgs in consumer.poll(timeout_ms=500, max_records=100_000).values():
                got.extend(msgs)
    finally:
        consumer.close()
    return got


def dead_letter_origins(kit, dlq: str) -> Counter:
    return Counter(
        (json.loads(r.value)["partition"], json.loads(r.value)["offset"])
        for r in read_committed(kit, dlq)
    )


def test_sigkills_leave_exact_fit_and_exactly_once_dead_letters_and_effects(kit, topic, tmp_path):
    good, msgs, bad_at = make_stream(31)
    kit.create_topic(topic, partitions=3)
    # the stream keeps arriving between kills (chunk i+1 after the i-th), so the kills
    # are mid-stream however fast the engine is
    bounds = [len(msgs) * i // 6 for i in range(7)]
    chunks = [msgs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    where = list(kit.produce(topic, chunks[0]))
    produced = 1
    dlq, effects = f"{topic}-dlq", f"{topic}-effects"
    kit.create_topic(dlq, partitions=1)
    snap_dir, group = tmp_path / "snap", f"{topic}-engine"
    args = (
        "--snapshot-every-events", "4000", "--snapshot-every-seconds", "0.3",
        "--dead-letter", dlq, "--publish-topic", effects, "--kafka-client", "kafka-python",
    )  # fmt: skip

    rng = random.Random(5)
    mid = []
    for _ in range(8):
        before = kit.latest_snapshot(snap_dir)
        before_n = before.n_events if before is not None else -1
        eng = kit.start_engine(topic, snap_dir, *args, group=group, until_end=False)

        def progressed(eng=eng, before_n=before_n):
            s = eng.snapshot()
            return not eng.alive() or (s is not None and s.n_events > before_n)

        kit.wait_for(progressed, 120, "a new snapshot")
        time.sleep(rng.uniform(0.0, 0.6))
        assert eng.alive(), eng.log_tail()
        eng.kill()
        n = kit.latest_snapshot(snap_dir).n_events
        if n < N_GOOD:
            mid.append(n)
        if produced < len(chunks):
            where += kit.produce(topic, chunks[produced])
            produced += 1
        if len(mid) >= 3:
            break
    for chunk in chunks[produced:]:
        where += kit.produce(topic, chunk)
    bad_origins = Counter(where[i] for i in bad_at)
    assert len(mid) >= 3, f"kills were not mid-stream: {mid}"

    kit.run_engine(topic, snap_dir, *args, group=group)
    snap = kit.latest_snapshot(snap_dir)
    assert dict(snap.offsets) == kit.end_offsets(topic)
    assert snap.n_events == N_GOOD and snap.meta["final"]
    assert_lme4_close(snap, in_memory_fit(good))

    # Every malformed message exactly once, and nothing else, for a read_committed reader.
    assert dead_letter_origins(kit, dlq) == bad_origins
    assert snap.meta["dead_letters"] == N_BAD

    # Effects: model records follow the snapshots (never back: an aborted transaction's
    # records never show; the final refit may republish at the last checkpoint's count),
    # and the last record of every group is the final snapshot's.
    recs = read_committed(kit, effects)
    seq = [json.loads(r.value)["n_events"] for r in recs if r.key == MODEL_KEY.encode()]
    assert seq == sorted(seq) and seq[-1] == N_GOOD
    assert len(seq) - len(set(seq)) <= 1  # at most the final refit's republication
    last = {}
    for r in recs:
        if r.key != MODEL_KEY.encode():
            last[key_from_json(r.key)] = json.loads(r.value)
    assert set(last) == set(snap.keys)
    for i, k in enumerate(snap.keys):
        assert last[k]["n"] == snap.group_n[i] and last[k]["n_events"] == N_GOOD
        np.testing.assert_array_equal(list(last[k]["ranef"].values()), snap.b[i])
    assert group_record_key(snap.keys[0]) == json.dumps(snap.keys[0]).encode()


def test_a_crash_between_commit_and_snapshot_sends_no_dead_letter_twice(kit, topic, tmp_path):
    good, msgs, bad_at = make_stream(32)
    kit.create_topic(topic, partitions=3)
    where = kit.produce(topic, msgs)
    dlq = f"{topic}-dlq"
    kit.create_topic(dlq, partitions=1)
    snap_dir, group = tmp_path / "snap", f"{topic}-engine"
    args = ("--snapshot-every-events", "10000", "--dead-letter", dlq)
    kit.run_engine(topic, snap_dir, *args, "--progress-seconds", "0", group=group)
    files = sorted(snap_dir.glob("snapshot-*.slmm"))
    for f in files[1:]:  # the transactions committed, their snapshots "never written"
        f.unlink()
    older = kit.latest_snapshot(snap_dir)
    assert older.n_events < N_GOOD

    kit.run_engine(topic, snap_dir, *args, group=group)
    snap = kit.latest_snapshot(snap_dir)
    assert snap.n_events == N_GOOD and snap.meta["dead_letters"] == N_BAD
    assert_lme4_close(snap, in_memory_fit(good))
    assert dead_letter_origins(kit, dlq) == Counter(where[i] for i in bad_at)
