"""The librdkafka fetcher: whole polls as columns, against a real broker and kafka-python.

Error events are fault injection: the columns are gathered from message structs built
in memory, because a broker cannot be made to send librdkafka's error events on demand.
"""

from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace

import numpy as np
import pytest

from streamlmm.stream import rdkafka
from streamlmm.stream.decode import Decoder
from streamlmm.stream.sources import ConfluentSource


def test_librdkafka_is_found_beside_confluent_kafka():
    """confluent-kafka (a dev dependency) ships librdkafka: the fast path is there."""
    import confluent_kafka

    lib = rdkafka.library()
    assert lib is not None, "librdkafka not found beside " + confluent_kafka.__file__
    assert lib.rd_kafka_version() == confluent_kafka.libversion()[1]


F = "y ~ x1 + x2 + (1 + x1 | g)"
_TS = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
_DESTROY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def fake_poll(messages: list[tuple[int, int, bytes | None, bytes | None, int]]):
    """``rd_kafka_message_t`` structs for (err, partition, payload, key, offset), gathered
    with stand-ins for librdkafka's timestamp and destroy; returns the columns and the
    addresses destroyed."""
    n = len(messages)
    structs = np.zeros((n, 9), np.int64)  # the struct's nine 8-byte slots
    alive = []
    for r, (err, part, payload, key, off) in enumerate(messages):
        structs[r, 0], structs[r, 2], structs[r, 7] = err, part, off
        for slot, data in ((3, payload), (5, key)):
            if data is not None:
                arr = np.frombuffer(data + b"\x00", np.uint8)  # never a null pointer
                alive.append(arr)
                structs[r, slot], structs[r, slot + 1] = arr.ctypes.data, len(data)
    base = structs.ctypes.data
    msgs = (base + 72 * np.arange(n)).astype(np.uint64)
    destroyed: list[int] = []
    ts = _TS(lambda m, _: 1_000 + (m - base) // 72)
    destroy = _DESTROY(destroyed.append)
    addr = ctypes.cast
    got = rdkafka.collect(
        msgs, n, addr(ts, ctypes.c_void_p).value, addr(destroy, ctypes.c_void_p).value
    )
    return got, [(d - base) // 72 for d in destroyed]


def test_gather_reads_every_field_and_destroys_every_message_once():
    msgs = [
        (0, 2, b'{"a": 1}', b"k1", 40),
        (0, 0, None, b"k2", 7),  # a tombstone
        (0, 1, b"", None, 8),  # an empty value, a null key
        (0, 2, b"\x00\xffbinary", b"", 41),
    ]
    got, destroyed = fake_poll(msgs)
    assert destroyed == [0, 1, 2, 3]
    assert [got.value(i) for i in range(4)] == [m[2] for m in msgs]
    assert [got.key(i) for i in range(4)] == [m[3] for m in msgs]
    assert got.parts.tolist() == [2, 0, 1, 2] and got.offsets.tolist() == [40, 7, 8, 41]
    assert got.stamps.tolist() == [1000, 1001, 1002, 1003]
    assert [got.error(i) for i in range(4)] == [None] * 4
    assert not got.buf.flags.writeable


def test_error_events_are_neither_learned_nor_dead_letters_and_never_move_an_offset():
    good = [
        json.dumps({"g": f"g{i % 3}", "x1": i, "x2": 1.0, "y": 0.5 * i}).encode() for i in range(40)
    ]
    msgs = [(0, i % 2, v, b"k", 100 + i) for i, v in enumerate(good)]
    msgs[39] = (-185, 1, b"Broker: Offset out of range", None, 500)  # the poll's last
    msgs[10] = (-195, 0, b"Local: Broker transport failure", None, -1001)
    got, _ = fake_poll(msgs)
    assert str(got.error(39)) == "librdkafka error -185: Broker: Offset out of range"
    polled = ConfluentSource._polled(SimpleNamespace(topic="t"), got)
    dec = Decoder(F)
    dec.decode(ConfluentSource._polled(SimpleNamespace(topic="t"), fake_poll(msgs[:5])[0]))
    batch = dec.decode(polled)
    assert batch.dead == [] and batch.idx.tolist() == [i for i in range(40) if i not in (10, 39)]
    assert polled.last_offsets() == {0: 100 + 38 + 1, 1: 100 + 37 + 1}


def test_a_fatal_error_event_stops_the_decode():
    ok = json.dumps({"g": "a", "x1": 1, "x2": 2, "y": 3}).encode()
    got, _ = fake_poll([(0, 0, ok, None, 1), (rdkafka.ERR_FATAL, 0, b"fenced", None, -1)])
    polled = ConfluentSource._polled(SimpleNamespace(topic="t"), got)
    with pytest.raises(RuntimeError, match="fatal|fenced"):
        Decoder(F).decode(polled)


# -- a real broker ------------------------------------------------------------------------------
def drain(src: ConfluentSource, n: int) -> list[tuple]:
    out = []
    for _ in range(200):
        polled = src.poll(1000, 0.5)
        out += [tuple(polled.record(i)) for i in range(len(polled))]
        if len(out) >= n:
            break
    return sorted(out, key=lambda r: (r[1], r[2]))


def test_the_fetcher_reads_exactly_what_kafka_python_reads(kit, topic):
    kit.create_topic(topic, partitions=3)
    msgs = [(f"k{i % 11}".encode(), json.dumps({"i": i}).encode()) for i in range(3_000)]
    msgs += [(b"k1", None), (None, b"no key"), (b"k2", b""), (b"k3", b"\x00 binary \xff")]
    kit.produce(topic, msgs)
    theirs = sorted(
        (
            (r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
            for r in kit.read_topic(topic)
        ),
        key=lambda r: (r[1], r[2]),
    )
    src = ConfluentSource(kit.bootstrap, topic, f"{topic}-g")
    try:
        assert src.fetcher is not None
        src.seek({})
        assert drain(src, len(msgs)) == theirs
    finally:
        src.close()
    # from a snapshot's offsets: only what follows them
    at = {f"{topic}:0": 5, f"{topic}:2": 100}
    src = ConfluentSource(kit.bootstrap, topic, f"{topic}-g")
    try:
        src.seek(at)
        want = [r for r in theirs if r[2] >= at.get(f"{topic}:{r[1]}", 0)]
        assert drain(src, len(want)) == want
    finally:
        src.close()


def test_fetcher_and_consume_give_the_same_polls(kit, topic):
    kit.create_topic(topic, partitions=3)
    kit.produce(topic, [(f"g{i % 7}".encode(), b'{"i": %d}' % i) for i in range(2_000)])
    seen = {}
    for native in (True, False):
        src = ConfluentSource(kit.bootstrap, topic, f"{topic}-g", native=native)
        try:
            assert (src.fetcher is not None) == native
            src.seek({})
            seen[native] = drain(src, 2_000)
        finally:
            src.close()
    assert seen[True] == seen[False] and len(seen[True]) == 2_000
