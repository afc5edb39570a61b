"""Event sources with offsets: Kafka topics and JSON-lines files (or stdin).

A source yields :class:`~streamlmm.stream.decode.Record` batches and can be positioned
at the offsets a snapshot recorded. Offsets are "next offset to read" per
``topic:partition``, as Kafka commits them.

"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

from streamlmm.stream.decode import Record

__all__ = ["Source", "JsonlSource", "KafkaSource", "open_source", "tp_name"]

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20
# kafka-python's default cap on reconnect backoff is 30 s (the Java client's is 1 s): after
# a broker outage the engine would sit idle for up to 30 s once the broker is back.
RECONNECT_BACKOFF_MAX_MS = 1000


def tp_name(topic: str, partition: int) -> str:
    """The offsets-dict key of a topic partition.

    >>> tp_name("events", 2)
    'events:2'

    """
    return f"{topic}:{partition}"


class Source:
    """What the engine needs from a source."""

    def seek(self, offsets: Mapping[str, int]) -> None:
        """Resume after the events a snapshot already holds."""
        raise NotImplementedError

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_s``."""
        raise NotImplementedError

    def end_offsets(self) -> dict[str, int]:
        """The current end (next offset to be written) of every partition."""
        raise NotImplementedError

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Record progress outside the snapshot (Kafka consumer group); optional."""

    def close(self) -> None:
        """Release resources."""


class JsonlSource(Source):
    """One JSON object per line from a file or ``-`` (stdin); offset = line number.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "e.jsonl")
    >>> _ = open(p, "w").write('{"a": 1}\\n{"a": 2}\\n{"a": 3}\\n')
    >>> src = JsonlSource(p)
    >>> src.seek({"jsonl:0": 1})
    >>> [(r.offset, r.value) for r in src.poll(10, 0)]
    [(1, b'{"a": 2}'), (2, b'{"a": 3}')]
    >>> src.end_offsets(), src.exhausted
    ({'jsonl:0': 3}, True)

    """

    topic = "jsonl"

    def __init__(self, path: str):
        self.path = path
        self._fh: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
        self.offset = 0
        self.exhausted = False

    def seek(self, offsets: Mapping[str, int]) -> None:
        target = int(offsets.get(tp_name(self.topic, 0), 0))
        while self.offset < target:
            if not self._fh.readline(MAX_LINE_BYTES + 1):
                break
            self.offset += 1

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        out = []
        while len(out) < max_records:
            line = self._fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                self.exhausted = True
                break
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while True:  # drop the rest of an over-long line; it is one bad record
                    rest = self._fh.readline(MAX_LINE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
            out.append(Record(self.topic, 0, self.offset, None, line.rstrip(b"\r\n")))
            self.offset += 1
        return out

    def end_offsets(self) -> dict[str, int]:
        return {tp_name(self.topic, 0): self.offset + (0 if self.exhausted else 1)}

    def close(self) -> None:
        if self._fh is not sys.stdin.buffer:
            self._fh.close()


class KafkaSource(Source):
    """All partitions of one topic, assigned to this consumer, offsets from snapshots.

    The engine, not Kafka, owns the position: it seeks to the snapshot's offsets on
    start and commits to the consumer group only offsets that a durable snapshot holds.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        client_config: Mapping[str, Any] | None = None,
        *,
        partitions: list[int] | None = None,
        max_partition_fetch_bytes: int = 4 << 20,
        metadata_timeout_s: float = 60.0,
    ):
        from kafka import KafkaConsumer, TopicPartition

        self._TP = TopicPartition
        self.topic = topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            **{"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **dict(client_config or {})},
        )
        deadline = time.monotonic() + metadata_timeout_s
        parts = None
        while not parts:
            parts = self.consumer.partitions_for_topic(topic)
            if parts:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} not found at {bootstrap}")
            time.sleep(0.05)
        if partitions is not None:
            missing = set(partitions) - set(parts)
            if missing:
                raise ValueError(f"topic {topic!r} has no partitions {sorted(missing)}")
            parts = partitions
        self.tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)

    def seek(self, offsets: Mapping[str, int]) -> None:
        committed = {}
        for tp in self.tps:
            name = tp_name(tp.topic, tp.partition)
            if name in offsets:
                self.consumer.seek(tp, int(offsets[name]))
            else:
                committed[tp] = None
        if committed:  # no snapshot for these: start from the beginning
            self.consumer.seek_to_beginning(*committed)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list = []
        for msgs in polled.values():
            out.extend(msgs)  # ConsumerRecords: the fields of Record
        return out

    def end_offsets(self) -> dict[str, int]:
        ends = self.consumer.end_offsets(self.tps)
        return {tp_name(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def commit(self, offsets: Mapping[str, int]) -> None:
        from kafka.structs import OffsetAndMetadata

        topic_offsets = {}
        for name, off in offsets.items():
            topic, _, part = name.rpartition(":")
            if topic == self.topic:
                topic_offsets[self._TP(topic, int(part))] = OffsetAndMetadata(int(off), "", -1)
        if topic_offsets:
            self.consumer.commit(topic_offsets, timeout_ms=5000)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def open_source(
    spec: str,
    group_id: str,
    client_config: Mapping[str, Any] | None = None,
    partitions: str | None = None,
):
    """``kafka://HOST:PORT/TOPIC``, ``jsonl:PATH`` or ``jsonl:-``.

    ``partitions`` ("0,2") limits a Kafka source to those partitions: several engines,
    each with its own partitions and snapshot directory, share the work (docs/design.md §6).
    """
    wanted = None
    if partitions:
        try:
            wanted = sorted({int(p) for p in str(partitions).split(",") if p.strip()})
        except ValueError:
            raise ValueError(f"partitions must be like 0,2 — got {partitions!r}") from None
    if spec.startswith("kafka://"):
        rest = spec[len("kafka://") :]
        bootstrap, _, topic = rest.partition("/")
        if not bootstrap or not topic:
            raise ValueError(f"kafka source must be kafka://HOST:PORT/TOPIC, got {spec!r}")
        return KafkaSource(bootstrap, topic, group_id, client_config, partitions=wanted)
    if wanted is not None:
        raise ValueError("--partitions applies to a kafka:// source only")
    if spec.startswith("jsonl:"):
        return JsonlSource(spec[len("jsonl:") :])
    raise ValueError(f"unknown source {spec!r}: use kafka://HOST:PORT/TOPIC or jsonl:PATH|-")
