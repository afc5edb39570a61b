"""Engine steps on polls of an in-memory Kafka-like source: the groups' partition homes,
and dead letters the model would refuse."""

from __future__ import annotations

import json

import numpy as np

from streamlmm.stream.decode import Polled, Record
from streamlmm.stream.engine import Engine, EngineConfig
from streamlmm.stream.sources import _KafkaBase

FORMULA = "y ~ x1 + (1 | g)"


class MemorySource(_KafkaBase):
    """Partitions 0 and 1 of topic ``t``; polls are handed to :meth:`Engine.step`."""

    topic, group_id, partitions = "t", "test", [0, 1]

    def seek(self, offsets) -> None:
        pass


def poll(events: list[tuple[int, int, str, float]]) -> Polled:
    """``(partition, offset, group, weight)`` events as one poll."""
    records = [
        Record("t", p, o, g.encode(), json.dumps({"g": g, "x1": 1.0, "y": 2.0, "w": w}).encode())
        for p, o, g, w in events
    ]
    return Polled.from_records(records)


def test_groups_stay_home_from_their_first_weighted_event(tmp_path):
    dead = tmp_path / "dead.jsonl"
    cfg = EngineConfig("memory", FORMULA, str(tmp_path / "snap"), dead_letter=f"jsonl:{dead}")
    engine = Engine(cfg, source=MemorySource())
    engine.step(poll([(0, 0, "warm", 1.0)]))  # the design learns its kinds
    engine.step(
        poll(
            [
                (1, 1, "a", 0.0),  # before a's first weighted event: not away
                (0, 1, "a", 1.0),  # a's home is 0
                (1, 2, "a", 1.0),  # away
                (1, 3, "a", 0.0),  # away, even unweighted
                (1, 4, "b", 1.0),  # b's home is 1
                (0, 2, "c", 0.0),  # c has no weighted event: no home, nothing away
                (1, 5, "c", 0.0),
            ]
        )
    )
    engine.step(poll([(0, 3, "b", 1.0), (0, 4, "a", 1.0), (1, 6, "b", 1.0)]))
    engine.dead.flush()
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted((d["partition"], d["offset"]) for d in letters) == [(0, 3), (1, 2), (1, 3)]
    assert all("producers must key by group" in d["reason"] for d in letters)
    assert engine.home == {"warm": 0, "a": 0, "b": 1}
    assert engine.model.n_events == 5  # warm, a (0, 1), b (1, 4), a (0, 4), b (1, 6)
    assert engine.offsets == {"t:0": 5, "t:1": 7}
    np.testing.assert_array_equal(engine._code_homes(engine.decoder.keys.keys)[:4], [0, 0, 1, -1])


def test_an_event_whose_products_would_overflow_is_a_dead_letter(tmp_path):
    dead = tmp_path / "dead.jsonl"
    cfg = EngineConfig("memory", FORMULA, str(tmp_path / "snap"), dead_letter=f"jsonl:{dead}")
    engine = Engine(cfg, source=MemorySource())
    engine.step(poll([(0, 0, "a", 1.0)]))
    big = Record("t", 0, 1, b"a", b'{"g": "a", "x1": 1e149, "y": 2, "w": 1e149}')
    engine.step(
        Polled.from_records([big, Record("t", 0, 2, b"a", big.value.replace(b"1e149,", b"1,"))])
    )
    engine.dead.flush()
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["offset"] == 1 and "'x1'" in letter["reason"] and "overflow" in letter["reason"]
    assert engine.model.n_events == 2 and engine.offsets == {"t:0": 3}
