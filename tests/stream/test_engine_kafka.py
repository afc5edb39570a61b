"""``streamlmm run`` against a real Kafka broker (``scripts/kafka-local``), no mocks.

- lme4's estimates from a 3-partition topic (plain and frequency-weighted data);
- exactly-once state across SIGKILLs at random moments of a 200k-event stream;
- 1,000 malformed messages of every kind go to the dead-letter topic, and the
  estimates equal the clean stream's;
- a 20 s broker outage mid-stream loses and duplicates nothing;
- SIGTERM exits 0 with a final snapshot whose offsets are committed to the group;
- the compacted effects topic holds the model and every group's BLUPs.

"Equal to one uninterrupted in-memory pass" is checked three ways: every group's count
exactly; every group's statistics row bit for bit (an in-memory model given the
engine's reference shift accumulates each group's events in the same order); and the
profiled estimates of both at one common θ to 1e-9 relative.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM
from streamlmm.simulate import simulate
from streamlmm.stream.decode import MAX_MESSAGE_BYTES
from streamlmm.stream.sinks import group_record_key
from tests import kafka_broker

pytestmark = [
    pytest.mark.kafka,
    # kafka-python 3.0 loads its protocol schemas with deprecated importlib.resources calls
    pytest.mark.filterwarnings("ignore:(read_text|open_text) is deprecated:DeprecationWarning"),
]

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
# lme4's reference cases live in the repository (tests/data); STREAMLMM_REFERENCE overrides
REFERENCE = Path(
    os.environ.get("STREAMLMM_REFERENCE") or Path(__file__).resolve().parents[1] / "data"
)
REL = 1e-9  # "the same statistics": estimates at a common θ, and refits


# -- reference data and in-memory passes --------------------------------------------------------
def reference_case(name: str) -> tuple[dict, list[dict]]:
    """lme4's fit ``<name>.json`` and its CSV rows as events (``g`` a string)."""
    path = REFERENCE / f"{name}.json"
    if not path.is_file():  # required data: fail, never skip
        pytest.fail(f"reference case {path} not found (set STREAMLMM_REFERENCE)", pytrace=False)
    ref = json.loads(path.read_text())
    events = []
    with open(REFERENCE / ref["data"], newline="") as fh:
        for row in csv.DictReader(fh):
            ev: dict[str, Any] = {"g": row.pop("g")}
            for k, v in row.items():
                f = float(v)
                ev[k] = int(f) if k == "w" and f.is_integer() else f
            events.append(ev)
    return ref, events


def in_memory(events: list[dict]) -> MixedLM:
    """One uninterrupted pass over ``events`` in order."""
    m = MixedLM(FORMULA)
    df = pd.DataFrame(events)
    m.learn_many(df[["g", "x1", "x2"]], df["y"], df["w"] if "w" in df.columns else None)
    return m


def rows_by_key(keys, S) -> dict:
    return {k: np.asarray(S[i]) for i, k in enumerate(keys)}


def assert_estimates_equal(a: dict, b: dict, rel: float = REL) -> None:
    """Two ``estimates_at`` results agree to ``rel`` (BLUPs relative to their scale)."""
    assert a["criterion"] == pytest.approx(b["criterion"], rel=rel)
    np.testing.assert_allclose(a["fixef"], b["fixef"], rtol=rel)
    assert a["sigma"] == pytest.approx(b["sigma"], rel=rel)
    assert a["b"].keys() == b["b"].keys()
    ba = np.array([a["b"][k] for k in b["b"]])
    bb = np.array([b["b"][k] for k in b["b"]])
    np.testing.assert_allclose(ba, bb, rtol=0, atol=rel * np.abs(bb).max())


def assert_same_as_in_memory(snap, events: list[dict], helpers) -> None:
    """The snapshot holds exactly ``events``: counts, statistics and estimates."""
    n = len(events)
    assert snap.n_events == n
    assert snap.n_obs == n
    counts = Counter(e["g"] for e in events)
    assert dict(zip(snap.keys, snap.group_n)) == dict(counts), "per-group counts"

    # Every group's statistics row, bit for bit: a row depends only on its own group's
    # events, in their order, which a partition keeps.
    ours = rows_by_key(snap.keys, snap.state["M"])
    theirs = helpers.stats_by_key(in_memory(events))
    assert ours.keys() == theirs.keys()
    bad = [k for k in ours if not np.array_equal(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} groups' statistics differ, e.g. {bad[:3]}"

    # Estimates: at the in-memory optimum's θ, and after refitting the engine's state.
    mem = in_memory(events)
    best = mem.fit().snapshot()
    engine_model = MixedLM.from_snapshot(snap)
    assert_estimates_equal(
        helpers.estimates_at(engine_model, best.theta), helpers.estimates_at(mem, best.theta)
    )
    # Two independent optimisations (warm vs cold start) agree to the optimiser's tolerance.
    refit = engine_model.fit().snapshot()
    assert refit.criterion == pytest.approx(best.criterion, rel=1e-10)
    for k, v in best.fixef.items():
        assert refit.fixef[k] == pytest.approx(v, rel=1e-7, abs=1e-9)
    assert refit.sigma == pytest.approx(best.sigma, rel=1e-7)


# -- 1. lme4's estimates ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fetch"),
    [
        ("pub_slopes_reml", "librdkafka"),
        ("pub_freqweights_reml", "librdkafka"),
        ("pub_slopes_reml", "consume"),  # confluent-kafka's consume(), where it is missing
    ],
)
def test_three_partition_topic_reproduces_lme4(kit, topic, tmp_path, name, fetch):
    ref, events = reference_case(name)
    kit.create_topic(topic, partitions=3)
    kit.produce_events(topic, events)
    ends = kit.end_offsets(topic)
    assert sum(ends.values()) == len(events) and min(ends.values()) > 0

    snap_dir = tmp_path / "snap"
    env = {"STREAMLMM_NATIVE_FETCH": "0"} if fetch == "consume" else None
    eng = kit.run_engine(
        topic, snap_dir, "--method", ref["method"], formula=ref["formula"], env=env
    )
    snap = kit.latest_snapshot(snap_dir)
    assert ("librdkafka" in eng.log_tail(200)) == (fetch == "librdkafka")

    assert snap.n_obs == ref["n"]  # Σw for the weighted case: lme4 repeated the rows
    assert snap.n_events == len(events)
    assert snap.n_groups == ref["n_groups"]
    assert dict(snap.offsets) == ends
    for k, v in ref["fixef"].items():
        assert snap.fixef[k] == pytest.approx(v, rel=1e-5), k
    assert snap.sigma == pytest.approx(ref["sigma"], rel=1e-5)
    assert snap.criterion <= ref["criterion"] * (1 + 1e-6)
    q = len(ref["re_names"])
    ref_cov = np.asarray(ref["re_cov"], dtype=float).reshape((q, q), order="F")
    np.testing.assert_allclose(snap.re_cov, ref_cov, rtol=0, atol=1e-3 * np.abs(ref_cov).max())


# -- 2. SIGKILL at random moments -----------------------------------------------------------------
N_CRASH = 200_000
N_KILLS = 6


def test_sigkill_at_random_moments_neither_loses_nor_double_counts(kit, topic, tmp_path, helpers):
    events = list(simulate(N_CRASH, 1_000, seed=20260))
    for e in events:
        del e["ts"]
    kit.create_topic(topic, partitions=3)
    # the stream keeps arriving between kills, so every kill is mid-stream however fast
    # the engine is: chunk i+1 is produced after the i-th kill, the last after the last
    bounds = np.linspace(0, N_CRASH, N_KILLS + 2).astype(int)
    chunks = [events[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    where = list(kit.produce_events(topic, chunks[0]))

    def assert_holds_exactly_its_offsets(snap) -> None:
        """Each group's count is that of the events before the snapshot's offsets."""
        upto = {int(tp.rpartition(":")[2]): off for tp, off in snap.offsets.items()}
        want = Counter(e["g"] for e, (p, o) in zip(events, where) if o < upto.get(p, 0))
        assert snap.n_events == sum(upto.values()) == want.total()
        assert dict(zip(snap.keys, snap.group_n)) == dict(want)

    snap_dir, group = tmp_path / "snap", f"{topic}-engine"
    often = ("--snapshot-every-events", "5000", "--snapshot-every-seconds", "0.5")
    rng = random.Random(7)
    at_kill: list[int] = []
    for i in range(N_KILLS):
        before = kit.latest_snapshot(snap_dir)
        before_n = before.n_events if before is not None else -1
        eng = kit.start_engine(topic, snap_dir, *often, group=group, until_end=False)
        if i == 1:  # once: anywhere from start-up to the first polls
            time.sleep(rng.uniform(0.0, 2.5))
        else:  # a random moment after this run has made durable progress

            def progressed(eng=eng, before_n=before_n):
                s = eng.snapshot()
                return not eng.alive() or (s is not None and s.n_events > before_n)

            kit.wait_for(progressed, 120, "the engine to write a new snapshot")
            time.sleep(rng.uniform(0.0, 1.0))
        assert eng.alive(), f"engine exited on its own:\n{eng.log_tail()}"
        eng.kill()
        snap = kit.latest_snapshot(snap_dir)
        if snap is not None:
            assert_holds_exactly_its_offsets(snap)
        at_kill.append(snap.n_events if snap is not None else 0)
        where += kit.produce_events(topic, chunks[i + 1])
    ends = kit.end_offsets(topic)
    assert sum(ends.values()) == N_CRASH and len(where) == N_CRASH
    mid_stream = [n for n in at_kill if 0 < n < N_CRASH]
    assert len(mid_stream) >= 3, f"kills were not mid-stream: snapshots at {at_kill}"

    kit.run_engine(topic, snap_dir, *often, group=group)
    snap = kit.latest_snapshot(snap_dir)
    assert dict(snap.offsets) == ends
    assert_holds_exactly_its_offsets(snap)
    assert_same_as_in_memory(snap, events, helpers)


# -- 3. dead letters ----------------------------------------------------------------------------
def _event_bytes(e: dict) -> bytes:
    return json.dumps(e, separators=(",", ":")).encode()


def _malformed(kind: str, e: dict, rng: random.Random) -> bytes | None:
    """One malformed message of ``kind``, derived from a valid event ``e``."""
    e = dict(e)
    good = _event_bytes(e)
    if kind == "bad_json":
        return good.replace(b",", b",,", 1)
    if kind == "truncated_json":
        return good[: rng.randrange(1, len(good) - 1)]
    if kind.startswith("missing_"):
        del e[kind[len("missing_") :]]
        return _event_bytes(e)
    if kind == "null_feature":
        e["x2"] = None
        return _event_bytes(e)
    if kind in ("nan_feature", "nan_response", "infinite_feature"):
        field = {"nan_feature": "x1", "nan_response": "y", "infinite_feature": "x2"}[kind]
        e[field] = float("inf") if kind == "infinite_feature" else float("nan")
        return json.dumps(e).encode()  # the NaN / Infinity literals
    if kind == "string_number":
        e["x1"] = str(e["x1"])
        return _event_bytes(e)
    if kind == "bool_number":
        e["y"] = True
        return _event_bytes(e)
    if kind == "huge_int_feature":  # a valid JSON number no float can hold
        return good.replace(b'"x1":', b'"x1":1' + b"0" * 400 + b',"_x1":', 1)
    if kind == "huge_payload":  # > the 64 KiB limit, < the broker's 1 MB
        e["pad"] = "a" * rng.randrange(MAX_MESSAGE_BYTES + 1, 600_000)
        return _event_bytes(e)
    if kind == "deep_nesting":  # under the size limit, over the parser's recursion limit
        return b'{"g":"g1","x1":' + b"[" * 32_000 + b"]" * 32_000 + b"}"
    if kind.startswith("group_"):
        e["g"] = {
            "group_list": ["g1", "g2"],
            "group_float": 1.5,
            "group_bool": True,
            "group_object": {"id": "g1"},
            "group_null": None,
            "group_too_long": "g" * 1000,
        }[kind]
        return _event_bytes(e)
    if kind == "negative_weight":
        e["w"] = -1
        return _event_bytes(e)
    if kind == "string_weight":
        e["w"] = "2"
        return _event_bytes(e)
    if kind == "non_object":
        return rng.choice([b"[1, 2, 3]", b'"a string"', b"42", b"null", b"true", b"[{}]"])
    if kind == "empty_value":
        return b""
    if kind == "tombstone":
        return None
    if kind == "invalid_utf8":
        return good.replace(b'"g":"', b'"g":"\xc3\x28\xff', 1)
    if kind == "latin1":
        return good.replace(b'"g":"', '"g":"café'.encode("latin-1"), 1)
    if kind == "utf16":  # valid JSON, but not UTF-8 (RFC 8259 §8.1)
        return good.decode().encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    if kind == "binary":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\xff"
    raise AssertionError(kind)


MALFORMED_KINDS = [
    "bad_json",
    "truncated_json",
    "missing_g",
    "missing_x1",
    "missing_x2",
    "missing_y",
    "null_feature",
    "nan_feature",
    "nan_response",
    "infinite_feature",
    "string_number",
    "bool_number",
    "huge_int_feature",
    "huge_payload",
    "deep_nesting",
    "group_list",
    "group_float",
    "group_bool",
    "group_object",
    "group_null",
    "group_too_long",
    "negative_weight",
    "string_weight",
    "non_object",
    "empty_value",
    "tombstone",
    "invalid_utf8",
    "latin1",
    "utf16",
    "binary",
]
REASON_NAMES = {  # the reason names the offending field
    "missing_g": "'g'",
    "missing_x1": "'x1'",
    "missing_x2": "'x2'",
    "missing_y": "'y'",
    "nan_response": "'y'",
    "string_number": "'x1'",
    "group_list": "'g'",
    "group_object": "'g'",
    "negative_weight": "'w'",
    "string_weight": "'w'",
}
N_CLEAN, N_BAD = 20_000, 1_000


def test_malformed_messages_go_to_the_dead_letter_topic(kit, topic, tmp_path, helpers):
    rng = random.Random(99)
    clean = list(simulate(N_CLEAN, 300, seed=4))
    for e in clean:
        del e["ts"]
    bad = []
    for i in range(N_BAD):
        kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
        base = rng.choice(clean)
        key = rng.choice([str(base["g"]).encode(), None, b"\xff\x00 odd key"])
        value = _malformed(kind, base, rng)
        if value is None and key is None:  # Kafka has no message without key and value
            key = str(base["g"]).encode()
        bad.append((kind, key, value))
    # Interleave: the clean events keep their order; bad ones land anywhere in between.
    slots = sorted(rng.sample(range(N_CLEAN + N_BAD), N_BAD))
    stream: list[tuple[str | None, bytes | None, bytes | None]] = []
    bi = ci = 0
    for pos in range(N_CLEAN + N_BAD):
        if bi < N_BAD and slots[bi] == pos:
            stream.append(bad[bi])
            bi += 1
        else:
            stream.append((None, *kit.encode_event(clean[ci])))
            ci += 1

    dirty, clean_topic, dlq = topic, f"{topic}-clean", f"{topic}-dlq"
    kit.create_topic(dirty, partitions=3)
    kit.create_topic(clean_topic, partitions=3)
    where = kit.produce(dirty, ((k, v) for _, k, v in stream))
    kit.produce_events(clean_topic, clean)

    often = ("--snapshot-every-events", "5000")
    kit.run_engine(dirty, tmp_path / "dirty", *often, "--dead-letter", dlq)
    kit.run_engine(clean_topic, tmp_path / "clean", *often)
    snap = kit.latest_snapshot(tmp_path / "dirty")
    snap_clean = kit.latest_snapshot(tmp_path / "clean")

    # Every malformed message, and nothing else, is in the dead-letter topic.
    expected = {where[i]: (kind, k, v) for i, (kind, k, v) in enumerate(stream) if kind is not None}
    letters = kit.read_topic(dlq)
    assert len(letters) == N_BAD
    seen = {}
    for rec in letters:
        env = json.loads(rec.value)
        origin = (env["partition"], env["offset"])
        assert env["topic"] == dirty and origin in expected and origin not in seen
        kind, key, value = expected[origin]
        value = value or b""
        assert isinstance(env["reason"], str) and env["reason"].strip(), (kind, env)
        assert dict(rec.headers)["reason"] == env["reason"].encode()[:1000]
        assert base64.b64decode(env["value_b64"]) == value[:MAX_MESSAGE_BYTES], kind
        assert env["value_len"] == len(value)
        assert env["value_sha256"] == hashlib.sha256(value).hexdigest()
        assert env["truncated"] == (len(value) > MAX_MESSAGE_BYTES)
        assert env["key_b64"] == (base64.b64encode(key).decode() if key else None)
        assert rec.key == key
        if kind in REASON_NAMES:
            assert REASON_NAMES[kind] in env["reason"], (kind, env["reason"])
        seen[origin] = (kind, env["reason"])
    assert seen.keys() == expected.keys()
    assert {k for k, _ in seen.values()} == set(MALFORMED_KINDS)

    assert snap.meta["dead_letters"] == N_BAD
    assert snap_clean.meta["dead_letters"] == 0
    assert dict(snap.offsets) == kit.end_offsets(dirty)
    assert dict(snap_clean.offsets) == kit.end_offsets(clean_topic)

    # The same events, so the same statistics and estimates as the clean stream's.
    assert snap.n_obs == snap_clean.n_obs == N_CLEAN
    n_dirty = dict(zip(snap.keys, snap.group_n))
    assert n_dirty == dict(zip(snap_clean.keys, snap_clean.group_n))
    assert_same_as_in_memory(snap, clean, helpers)
    assert_same_as_in_memory(snap_clean, clean, helpers)
    theta = snap_clean.theta
    assert_estimates_equal(
        helpers.estimates_at(MixedLM.from_snapshot(snap), theta),
        helpers.estimates_at(MixedLM.from_snapshot(snap_clean), theta),
    )


# -- 4. broker outage ---------------------------------------------------------------------------
N_OUTAGE = 60_000
OUTAGE_S = 20.0


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_a_restart_from_nothing_sends_no_dead_letter_twice(kit, topic, tmp_path, client):
    """Every snapshot corrupt: the engine re-reads the topic from offset 0, and the
    dead-letter topic (transactional, read_committed) still holds each dead letter
    once, as the file sink does: the consumer group's committed offsets say which
    dead letters are already committed."""
    clean = list(simulate(2000, 40, seed=6))
    for e in clean:
        del e["ts"]
    stream = [kit.encode_event(e) for e in clean]
    for i in range(0, len(stream), 100):  # 20 bad messages among them
        stream[i] = (stream[i][0], b'{"g": "a", "x1": "bad"}')
    dlq = f"{topic}-dlq"
    kit.create_topic(topic, partitions=2)
    kit.produce(topic, stream)
    args = ("--dead-letter", dlq, "--kafka-client", client, "--snapshot-every-events", "500")
    kit.run_engine(topic, tmp_path / "s", *args)
    assert len(kit.read_topic(dlq)) == 20
    for f in (tmp_path / "s").glob("snapshot-*.slmm"):
        f.write_bytes(b"garbage")
    kit.run_engine(topic, tmp_path / "s", *args)
    letters = kit.read_topic(dlq)
    origins = [(json.loads(r.value)["partition"], json.loads(r.value)["offset"]) for r in letters]
    assert len(origins) == len(set(origins)) == 20
    snap = kit.latest_snapshot(tmp_path / "s")
    assert snap.meta["dead_letters"] == 20 and snap.n_obs == 2000 - 20


class PacedProducer(threading.Thread):
    """Produces events in chunks at a modest pace; counts only confirmed sends.

    An event whose send fails is sent again until the broker confirms it (with the
    idempotent producer and a long delivery timeout that should never be needed).
    """

    def __init__(self, kit, topic: str, events: list[dict], chunk: int = 1_000):
        super().__init__(daemon=True)
        self.kit, self.topic, self.events, self.chunk = kit, topic, events, chunk
        self.confirmed = 0
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = self.kit.producer(
                enable_idempotence=True,
                max_in_flight_requests_per_connection=1,
                retries=2**31 - 1,
                delivery_timeout_ms=600_000,
                request_timeout_ms=20_000,
                max_block_ms=600_000,
                linger_ms=20,
            )
            try:
                for start in range(0, len(self.events), self.chunk):
                    chunk = map(self.kit.encode_event, self.events[start : start + self.chunk])
                    pending = [
                        (kv, producer.send(self.topic, key=kv[0], value=kv[1])) for kv in chunk
                    ]
                    for kv, fut in pending:
                        while True:
                            try:
                                fut.get(timeout=600)
                                break
                            except Exception:
                                self.resent += 1
                                fut = producer.send(self.topic, key=kv[0], value=kv[1])
                        self.confirmed += 1
                    time.sleep(0.1)
            finally:
                producer.close(timeout=30)
        except BaseException as e:  # reported by the test
            self.error = e


def test_broker_outage_mid_stream_loses_and_duplicates_nothing(kit, topic, tmp_path, helpers):
    events = list(simulate(N_OUTAGE, 500, seed=31))
    for e in events:
        del e["ts"]
    kit.create_topic(topic, partitions=3)
    snap_dir = tmp_path / "snap"
    eng = kit.start_engine(topic, snap_dir, "--snapshot-every-seconds", "0.5", until_end=False)
    producer = PacedProducer(kit, topic, events)
    producer.start()
    kit.wait_for(
        lambda: producer.confirmed >= N_OUTAGE // 4 and (s := eng.snapshot()) and s.n_events > 0,
        120,
        "a quarter of the stream produced and learned",
    )
    down_at = producer.confirmed
    kafka_broker.stop_broker()
    try:
        time.sleep(OUTAGE_S)  # the outage itself
        assert eng.alive(), f"engine died while the broker was down:\n{eng.log_tail()}"
    finally:
        kafka_broker.start_broker()
    producer.join(timeout=300)
    assert not producer.is_alive() and producer.error is None, producer.error
    assert producer.confirmed == N_OUTAGE and down_at < N_OUTAGE

    kit.wait_for(
        lambda: (s := eng.snapshot()) and s.n_events >= N_OUTAGE,
        180,
        f"the engine to catch up with {N_OUTAGE} events",
        interval_s=0.25,
    )
    eng.signal(signal.SIGTERM)
    assert eng.wait(60) == 0, eng.log_tail()

    snap = eng.snapshot()
    ends = kit.end_offsets(topic)
    stored = [json.loads(r.value) for r in kit.read_topic(topic)]
    if producer.resent == 0:  # else the topic may legitimately hold a re-sent event twice
        assert sum(ends.values()) == N_OUTAGE
        key = lambda e: json.dumps(e, sort_keys=True)  # noqa: E731
        assert Counter(map(key, stored)) == Counter(map(key, events))
    assert dict(snap.offsets) == ends
    assert_same_as_in_memory(snap, stored, helpers)


# -- 5. SIGTERM ---------------------------------------------------------------------------------
def test_sigterm_exits_zero_and_commits_the_final_snapshots_offsets(kit, topic, tmp_path, helpers):
    events = list(simulate(100_000, 400, seed=5))
    for e in events:
        del e["ts"]
    kit.create_topic(topic, partitions=3)
    kit.produce_events(topic, events)
    ends = kit.end_offsets(topic)
    snap_dir, group = tmp_path / "snap", f"{topic}-engine"
    often = ("--snapshot-every-events", "10000")

    eng = kit.start_engine(topic, snap_dir, *often, group=group, until_end=False)
    kit.wait_for(lambda: (s := eng.snapshot()) and s.n_events > 0, 120, "a first snapshot")
    eng.signal(signal.SIGTERM)
    assert eng.wait(60) == 0, eng.log_tail()
    assert "final snapshot" in eng.log_tail(5)
    snap = eng.snapshot()
    assert 0 < snap.n_events < len(events), "SIGTERM did not land mid-stream"
    committed = kit.committed(group, topic)
    assert committed == {tp: snap.offsets.get(tp) for tp in ends}, (committed, snap.offsets)

    # A restart resumes there; caught up, the committed offsets are the topic's ends.
    kit.run_engine(topic, snap_dir, *often, group=group)
    snap = kit.latest_snapshot(snap_dir)
    assert dict(snap.offsets) == ends
    assert kit.committed(group, topic) == ends
    assert_same_as_in_memory(snap, events, helpers)


# -- 6. the effects topic -----------------------------------------------------------------------
def test_publish_topic_holds_the_model_and_every_groups_effects(kit, topic, tmp_path):
    events = list(simulate(30_000, 300, seed=8))
    kit.create_topic(topic, partitions=3)
    kit.produce_events(topic, events)
    effects = f"{topic}-effects"
    snap_dir = tmp_path / "snap"
    kit.run_engine(topic, snap_dir, "--publish-topic", effects, "--snapshot-every-events", "10000")
    snap = kit.latest_snapshot(snap_dir)
    assert snap.n_events == len(events)

    assert kit.topic_config(effects)["cleanup.policy"] == "compact"
    records = kit.read_topic(effects)
    newest: dict[bytes, dict] = {}
    for r in records:  # one partition, in offset order: the last record per key wins
        newest[r.key] = json.loads(r.value)
    n_models = sum(r.key == b"__model__" for r in records)
    assert n_models >= 2  # every snapshot is published, not only the last

    model = newest.pop(b"__model__")
    assert model == json.loads(json.dumps(snap.to_dict()))
    assert set(newest) == {group_record_key(k) for k in snap.keys}
    n_g = dict(zip(snap.keys, snap.group_n))
    for i, key in enumerate(snap.keys):
        rec = newest[group_record_key(key)]
        assert rec["group"] == key
        assert rec["ranef"] == snap.ranef(key)
        assert rec["cond_cov"] == snap.condvar[i].tolist()
        assert rec["n"] == n_g[key]
        assert rec["n_events"] == snap.n_events


# -- 7. state scoped per partition --------------------------------------------------------------
def test_engines_on_disjoint_partitions_merge_into_the_one_engine_fit(kit, topic, tmp_path):
    """Scale-out: two engines each own some partitions (own snapshot dir); their
    snapshots merge exactly into what one engine over every partition fits (lme4's)."""
    ref, events = reference_case("pub_slopes_reml")
    kit.create_topic(topic, partitions=3)
    kit.produce_events(topic, events)
    ends = kit.end_offsets(topic)
    kw = {"formula": ref["formula"], "group": f"{topic}-scaleout"}
    kit.run_engine(topic, tmp_path / "a", "--partitions", "0,1", **kw)
    kit.run_engine(topic, tmp_path / "b", "--partitions", "2", **kw)
    kit.run_engine(topic, tmp_path / "all", **kw)
    a, b = kit.latest_snapshot(tmp_path / "a"), kit.latest_snapshot(tmp_path / "b")
    one = kit.latest_snapshot(tmp_path / "all")
    assert set(a.offsets) == {f"{topic}:0", f"{topic}:1"} and set(b.offsets) == {f"{topic}:2"}
    assert {**a.offsets, **b.offsets} == dict(one.offsets) == ends
    assert not set(a.keys) & set(b.keys)  # every group lives on one partition
    assert a.n_obs + b.n_obs == one.n_obs == ref["n"]

    merged = MixedLM.from_snapshots([a, b]).fit().snapshot()
    whole = MixedLM.from_snapshot(one).fit().snapshot()
    assert merged.n_obs == whole.n_obs and merged.n_groups == whole.n_groups
    for k, v in whole.fixef.items():
        assert merged.fixef[k] == pytest.approx(v, rel=1e-9)
        assert merged.fixef[k] == pytest.approx(ref["fixef"][k], rel=1e-5)
    assert merged.sigma == pytest.approx(whole.sigma, rel=1e-9)
    assert merged.criterion == pytest.approx(whole.criterion, rel=1e-12)
    for key in whole.keys:
        np.testing.assert_allclose(
            list(merged.ranef(key).values()), list(whole.ranef(key).values()), rtol=1e-8, atol=1e-12
        )


def test_a_group_arriving_on_a_second_partition_is_a_dead_letter(kit, topic, tmp_path):
    """State stays local to partitions: an event whose group already lives on another
    partition (a producer not keying by group) is dead-lettered with the reason."""
    kit.create_topic(topic, partitions=2)
    home = [{"g": "h", "x1": float(i), "x2": 0.5, "y": 1.0 + i} for i in range(20)]
    other = [{"g": f"o{i}", "x1": 1.0, "x2": float(i), "y": 2.0} for i in range(20)]
    dlq = tmp_path / "dead.jsonl"
    producer = kit.producer()
    try:
        for e in home:
            producer.send(topic, value=json.dumps(e).encode(), partition=0)
        producer.flush(timeout=60)
        # the engine learns group h on partition 0 first (polls interleave partitions in
        # no fixed order, so the stray comes only after h has a home)
        kit.run_engine(topic, tmp_path / "s", "--dead-letter", f"jsonl:{dlq}")
        stray = producer.send(topic, value=json.dumps(home[0]).encode(), partition=1)
        for e in other:
            producer.send(topic, value=json.dumps(e).encode(), partition=1)
        producer.flush(timeout=60)
        stray_offset = stray.get(timeout=60).offset
    finally:
        producer.close(timeout=30)
    kit.run_engine(topic, tmp_path / "s", "--dead-letter", f"jsonl:{dlq}")
    snap = kit.latest_snapshot(tmp_path / "s")
    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert len(letters) == 1 == snap.meta["dead_letters"]
    assert (letters[0]["partition"], letters[0]["offset"]) == (1, stray_offset)
    assert "lives on partition 0" in letters[0]["reason"]
    assert snap.n_obs == len(home) + len(other)


@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_a_transactional_topic_is_read_to_its_end_and_aborted_events_are_not(
    kit, topic, tmp_path, client
):
    """A transactional producer's topic ends with a commit marker, which no consumer is
    given: ``--until-end`` must still end (at the consumer's position past the marker),
    and an aborted transaction's events are never learned."""
    kit.create_topic(topic, partitions=2)
    events = list(simulate(3_000, 40, seed=5))
    aborted = list(simulate(500, 40, seed=6))
    producer = kit.producer(transactional_id=f"{topic}-tx")
    try:
        producer.init_transactions()
        for chunk in (events[:1000], aborted, events[1000:2200], events[2200:]):
            producer.begin_transaction()
            for e in chunk:
                key, value = kit.encode_event(e)
                producer.send(topic, key=key, value=value)
            if chunk is aborted:
                producer.flush()  # in the log, then aborted
                producer.abort_transaction()
            else:
                producer.commit_transaction()
    finally:
        producer.close()
    ends = kit.end_offsets(topic)
    assert sum(ends.values()) > len(events) + len(aborted)  # the markers take offsets

    snap_dir = tmp_path / "snap"
    kit.run_engine(topic, snap_dir, "--kafka-client", client, timeout_s=120)
    snap = kit.latest_snapshot(snap_dir)
    assert snap.n_events == len(events) and dict(snap.offsets) == ends
    assert dict(zip(snap.keys, snap.group_n)) == dict(Counter(e["g"] for e in events))
