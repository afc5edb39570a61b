"""Event sources with offsets: Kafka topics and JSON-lines files (or stdin).

A source yields :class:`~streamlmm.stream.decode.Polled` batches and can be positioned
at the offsets a snapshot recorded. Offsets are "next offset to read" per
``topic:partition``, as Kafka commits them; a JSON-lines source has one partition,
``jsonl:0``, whose offset is the line number.

Source identity (JSON lines)
----------------------------
A snapshot records what a JSON-lines source had consumed: the path, its device and
inode, the byte offset, the line count and the sha256 of the consumed prefix
(:meth:`JsonlSource.identity`). On resume the source re-reads that prefix and checks
its length and hash before it reads on, so a restart never silently skips or re-counts
data:

- **a file** that is shorter than the consumed prefix, or whose prefix differs, is
  refused (:class:`SourceChanged`); a file that only grew is resumed after the prefix.
  A new inode or path with the same prefix (a rotated or copied file) is accepted, with
  a warning.
- **stdin** has no identity of its own: on resume it must replay the same stream from
  its start, e.g. ``cat events.jsonl | streamlmm run --source jsonl:-``. Its first bytes
  are checked against the consumed prefix (length and sha256) and skipped; what follows
  is new. A stream that differs, or ends inside the prefix, is refused.
- ``--new-source`` says that the source is new data: it is read from its start and
  learned on top of the snapshot's statistics, with no check.

"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from streamlmm.stream import rdkafka
from streamlmm.stream.broker import wait_for_broker
from streamlmm.stream.decode import Polled, Record

__all__ = [
    "Source",
    "JsonlSource",
    "KafkaSource",
    "ConfluentSource",
    "SourceChanged",
    "open_source",
    "tp_name",
    "confluent_available",
]

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20
# kafka-python's default cap on reconnect backoff is 30 s (the Java client's is 1 s): after
# a broker outage the engine would sit idle for up to 30 s once the broker is back.
RECONNECT_BACKOFF_MAX_MS = 1000
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which some editors put at a file's start
FETCH_QUEUE_BACKOFF_MS = 10


class SourceChanged(ValueError):
    """The source is not the one the snapshot consumed (a user error: exit 2)."""


def tp_name(topic: str, partition: int) -> str:
    """The offsets-dict key of a topic partition.

    >>> tp_name("events", 2)
    'events:2'

    """
    return f"{topic}:{partition}"


class Source:
    """What the engine needs from a source."""

    def resume(
        self, offsets: Mapping[str, int], identity: Mapping[str, Any] | None, new_source: bool
    ) -> dict[str, int]:
        """Position after what a snapshot holds; returns the offsets to continue from.

        ``identity`` is what :meth:`identity` returned when the snapshot was taken.
        """
        self.seek(offsets)
        return dict(offsets)

    def seek(self, offsets: Mapping[str, int]) -> None:
        """Resume after the events a snapshot already holds."""
        raise NotImplementedError

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        """Up to ``max_records`` records, waiting at most ``timeout_s``."""
        raise NotImplementedError

    def end_offsets(self) -> dict[str, int]:
        """The current end (next offset to be written) of every partition."""
        raise NotImplementedError

    def lag(self, offsets: Mapping[str, int]) -> str | None:
        """What is left to read, as text for the progress line, or ``None`` if unknown."""
        return None

    def identity(self) -> dict[str, Any] | None:
        """What identifies the consumed data (recorded in snapshots), if anything."""
        return None

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Record progress outside the snapshot (Kafka consumer group); optional."""

    def committed(self) -> dict[str, int | None]:
        """The consumer group's committed offsets (Kafka); ``{}`` for other sources."""
        return {}

    def close(self) -> None:
        """Release resources."""


class JsonlSource(Source):
    """One JSON object per line from a file or ``-`` (stdin); offset = line number.

    A UTF-8 byte order mark at the start of the file (or of stdin) is not part of the
    first event: it is skipped (it stays in the consumed bytes and their hash).

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "e.jsonl")
    >>> _ = open(p, "w").write('{"a": 1}\\n{"a": 2}\\n{"a": 3}\\n')
    >>> src = JsonlSource(p)
    >>> got = src.poll(1, 0)
    >>> ident = src.identity()
    >>> ident["lines"], ident["bytes"]
    (1, 9)
    >>> src2 = JsonlSource(p)
    >>> src2.resume({"jsonl:0": 1}, ident, new_source=False)
    {'jsonl:0': 1}
    >>> p2 = src2.poll(10, 0)
    >>> p2.offsets.tolist(), p2.values
    ([1, 2], [b'{"a": 2}', b'{"a": 3}'])
    >>> src2.end_offsets(), src2.exhausted, src2.lag({})
    ({'jsonl:0': 3}, True, '0 B')

    """

    topic = "jsonl"

    def __init__(self, path: str):
        self.path = path
        self.stdin = path == "-"
        if self.stdin:
            self._fh: BinaryIO = sys.stdin.buffer
        else:
            if os.path.isdir(path):
                raise ValueError(f"source {path!r} is a directory, not a JSON-lines file")
            self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.offset = 0  # lines
        self.pos = 0  # bytes
        self._sha = hashlib.sha256()
        self.exhausted = False

    # -- identity -----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "stdin" if self.stdin else "file",
            "lines": self.offset,
            "bytes": self.pos,
            "sha256": self._sha.hexdigest(),
        }
        if not self.stdin:
            st = os.fstat(self._fh.fileno())
            out.update(path=os.path.abspath(self.path), dev=st.st_dev, ino=st.st_ino)
        return out

    def _what(self) -> str:
        return "stdin" if self.stdin else f"jsonl:{self.path}"

    def resume(self, offsets, identity, new_source):
        lines = int(offsets.get(tp_name(self.topic, 0), 0))
        if new_source:
            if lines:
                log.info("--new-source: reading %s from its start as new data", self._what())
            return {}
        if not identity:
            if lines:  # a snapshot without an identity (older format): skip lines
                log.warning("snapshot has no source identity; skipping %d lines unchecked", lines)
                self.seek(offsets)
            return dict(offsets)
        want, digest = int(identity["bytes"]), str(identity["sha256"])
        was = "stdin" if identity.get("kind") == "stdin" else f"jsonl:{identity.get('path')}"
        hint = (
            "pass --new-source to learn it as new data on top of the snapshot, "
            "or use another --snapshot-dir"
        )
        while self.pos < want:
            chunk = self._fh.read(min(_CHUNK, want - self.pos))
            if not chunk:
                raise SourceChanged(
                    f"{self._what()} has {self.pos:,} bytes but the snapshot already holds "
                    f"{want:,} bytes ({int(identity['lines']):,} lines) of {was}: the source "
                    f"is shorter than what was consumed; {hint}"
                )
            self._sha.update(chunk)
            self.pos += len(chunk)
        if self._sha.hexdigest() != digest:
            raise SourceChanged(
                f"the first {want:,} bytes of {self._what()} differ from the "
                f"{int(identity['lines']):,} lines of {was} that the snapshot holds "
                f"(sha256 mismatch): it is another source; {hint}"
            )
        self.offset = int(identity["lines"])
        if not self.stdin and identity.get("kind") == "file":
            st = os.fstat(self._fh.fileno())
            if (st.st_dev, st.st_ino) != (identity.get("dev"), identity.get("ino")):
                log.warning(
                    "%s is a different file (device/inode) from %s, but its first %d bytes "
                    "are the ones consumed: resuming after them",
                    self._what(),
                    was,
                    want,
                )
        return {tp_name(self.topic, 0): self.offset}

    def seek(self, offsets: Mapping[str, int]) -> None:
        target = int(offsets.get(tp_name(self.topic, 0), 0))
        while self.offset < target:
            if not self._line():
                break

    # -- reading ------------------------------------------------------------------------
    def _line(self) -> bytes | None:
        """The next line without its end (consumed, hashed, counted), or ``None`` at EOF."""
        line = self._fh.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None
        self._sha.update(line)
        self.pos += len(line)
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:  # drop the rest of an over-long line; it is one bad record
                rest = self._fh.readline(MAX_LINE_BYTES)
                self._sha.update(rest)
                self.pos += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
        self.offset += 1
        if self.offset == 1 and line.startswith(_BOM):  # an editor's mark, not the event's
            line = line[len(_BOM) :]
        return line.rstrip(b"\r\n")

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        vals: list[bytes | None] = []
        first = self.offset
        while len(vals) < max_records:
            line = self._line()
            if line is None:
                self.exhausted = True
                break
            vals.append(line)
        n = len(vals)
        topic = self.topic
        return Polled(
            vals,
            np.zeros(n, dtype=np.int64),
            np.arange(first, first + n, dtype=np.int64),
            lambda i: Record(topic, 0, first + i, None, vals[i]),
        )

    def end_offsets(self) -> dict[str, int]:
        return {tp_name(self.topic, 0): self.offset + (0 if self.exhausted else 1)}

    def lag(self, offsets: Mapping[str, int]) -> str | None:
        if self.stdin:
            return None
        try:
            left = os.fstat(self._fh.fileno()).st_size - self.pos
        except OSError:
            return None
        return _bytes(max(0, left))

    def close(self) -> None:
        if self._fh is not sys.stdin.buffer:
            self._fh.close()


def _bytes(n: int) -> str:
    """
    >>> _bytes(0), _bytes(2048), _bytes(5 * 2**30)
    ('0 B', '2.0 KiB', '5.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


class _KafkaBase(Source):
    topic: str
    partitions: list[int]

    def lag(self, offsets: Mapping[str, int]) -> str | None:
        try:
            ends = self.end_offsets()
        except Exception:  # noqa: BLE001 - broker away: no lag to report
            return None
        n = sum(max(0, end - int(offsets.get(tp, 0))) for tp, end in ends.items())
        return f"{n:,}"

    def spec(self) -> str:
        return f"{self.topic}:{','.join(map(str, self.partitions))}"


class KafkaSource(_KafkaBase):
    """Partitions of one topic through kafka-python, assigned to this consumer.

    The engine, not Kafka, owns the position: it seeks to the snapshot's offsets on
    start and commits to the consumer group only offsets that a durable snapshot holds.
    """

    client = "kafka-python"

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

        wait_for_broker(bootstrap)  # else kafka-python retries for half a minute
        self._TP = TopicPartition
        self.topic = topic
        self.group_id = group_id
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # aborted transactions are not events (librdkafka's default already)
            isolation_level="read_committed",
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            **{"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **dict(client_config or {})},
        )
        deadline = time.monotonic() + metadata_timeout_s
        parts = None
        said = False
        while not parts:
            parts = self.consumer.partitions_for_topic(topic)
            if parts:
                break
            if time.monotonic() > deadline:
                self.consumer.close(autocommit=False)
                raise RuntimeError(
                    f"topic {topic!r} not found at {bootstrap} (waited {metadata_timeout_s:g} s)"
                )
            said = said or _waiting_for(topic, bootstrap, metadata_timeout_s)
            time.sleep(0.05)
        self.partitions = _check_partitions(topic, parts, partitions)
        self.tps = [TopicPartition(topic, p) for p in self.partitions]
        self.consumer.assign(self.tps)

    def seek(self, offsets: Mapping[str, int]) -> None:
        fresh = []
        for tp in self.tps:
            name = tp_name(tp.topic, tp.partition)
            if name in offsets:
                self.consumer.seek(tp, int(offsets[name]))
            else:
                fresh.append(tp)
        if fresh:  # no snapshot for these: start from the beginning
            self.consumer.seek_to_beginning(*fresh)

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list = []
        for msgs in polled.values():
            out.extend(msgs)  # ConsumerRecords: the fields of Record
        got = Polled.from_records(out)
        got.positions = self._positions()
        return got

    def _positions(self) -> dict[int, int]:
        return {tp.partition: self.consumer.position(tp) for tp in self.tps}

    def end_offsets(self) -> dict[str, int]:
        ends = self.consumer.end_offsets(self.tps)
        return {tp_name(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def commit(self, offsets: Mapping[str, int]) -> None:
        from kafka.structs import OffsetAndMetadata

        topic_offsets = {
            self._TP(self.topic, p): OffsetAndMetadata(int(off), "", -1)
            for p, off in _own(self.topic, offsets).items()
        }
        if topic_offsets:
            self.consumer.commit(topic_offsets, timeout_ms=5000)

    def committed(self) -> dict[str, int | None]:
        return {
            tp_name(tp.topic, tp.partition): self.consumer.committed(tp, timeout_ms=30_000)
            for tp in self.tps
        }

    def close(self) -> None:
        self.consumer.close(autocommit=False)


# kafka-python setting -> librdkafka property, for the settings config.py allows
_RDKAFKA = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "client_id": "client.id",
    "request_timeout_ms": "socket.timeout.ms",
}


def rdkafka_config(client_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """librdkafka properties for kafka-python settings; ``None`` if one has no match.

    >>> rdkafka_config({"security_protocol": "SSL", "ssl_check_hostname": False})
    {'security.protocol': 'SSL', 'ssl.endpoint.identification.algorithm': 'none'}
    >>> rdkafka_config({"api_version_auto_timeout_ms": 5}) is None
    True

    """
    out: dict[str, Any] = {}
    for k, v in (client_config or {}).items():
        if k == "ssl_check_hostname":
            out["ssl.endpoint.identification.algorithm"] = "https" if v else "none"
        elif k in _RDKAFKA:
            out[_RDKAFKA[k]] = v
        else:
            return None
    return out


def confluent_available() -> bool:
    """Whether the optional confluent-kafka client is installed."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


class ConfluentSource(_KafkaBase):
    """Partitions of one topic through confluent-kafka (librdkafka), when installed.

    The same contract as :class:`KafkaSource`. Polls come from a
    :class:`~streamlmm.stream.rdkafka.Fetcher` where librdkafka can be loaded (as
    columns, the values end to end in one buffer: no Python object per message), else
    from ``consume()``, whose values, partitions and offsets are read into columns by
    C-level maps. Either way a full record is built only for a dead letter, and
    librdkafka's error events (delivered as messages of the poll) are told apart only
    where it matters (see :meth:`Polled.error`). ``native=False`` (or the environment
    variable ``STREAMLMM_NATIVE_FETCH=0``) always uses ``consume()``.
    """

    client = "confluent-kafka"

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        client_config: Mapping[str, Any] | None = None,
        *,
        partitions: list[int] | None = None,
        metadata_timeout_s: float = 60.0,
        native: bool = True,
    ):
        from confluent_kafka import Consumer, Message, TopicPartition

        conf = rdkafka_config(client_config)
        if conf is None:
            raise ValueError("these kafka settings have no confluent-kafka equivalent")
        wait_for_broker(bootstrap)  # else "topic not found" after the metadata wait
        self._TP, self._M = TopicPartition, Message
        self.topic = topic
        self.group_id = group_id
        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
            "max.partition.fetch.bytes": 4 << 20,
            # librdkafka waits this long to fetch again once a partition's local queue
            # is over its threshold (default 1 s): a consumer that decodes between
            # polls would sit idle for a second at a time
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            **conf,
        }
        # fetching goes through a second handle that reads whole polls into columns
        # (stream/rdkafka.py); it connects while the consumer below reads the metadata
        self.fetcher = rdkafka.Fetcher.open(conf) if native else None
        self._connecting = None
        if self.fetcher is not None:
            self._connecting = threading.Thread(
                target=self.fetcher.connect, args=(topic, 10.0), daemon=True
            )
            self._connecting.start()
        try:
            self.consumer = Consumer(conf)
        except BaseException:
            self._close_fetcher()
            raise
        deadline = time.monotonic() + metadata_timeout_s
        said = False
        while True:
            try:
                md = self.consumer.list_topics(topic, timeout=5).topics.get(topic)
            except Exception:  # noqa: BLE001 - broker not there yet
                md = None
            if md is not None and md.error is None and md.partitions:
                parts = set(md.partitions)
                break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(
                    f"topic {topic!r} not found at {bootstrap} (waited {metadata_timeout_s:g} s)"
                )
            said = said or _waiting_for(topic, bootstrap, metadata_timeout_s)
            time.sleep(0.05)
        if self._connecting is not None:
            self._connecting.join()
        log.info(
            "kafka source %s: %s",
            topic,
            "fetching whole polls through librdkafka (stream/rdkafka.py)"
            if self.fetcher is not None
            else "fetching through confluent-kafka's consume()",
        )
        try:
            self.partitions = _check_partitions(topic, parts, partitions)
        except ValueError:
            self.close()
            raise

    def seek(self, offsets: Mapping[str, int]) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        at = {p: offsets.get(tp_name(self.topic, p)) for p in self.partitions}
        if self.fetcher is not None:
            self.fetcher.assign(self.topic, at)
            return
        begin = OFFSET_BEGINNING
        self.consumer.assign(
            [self._TP(self.topic, p, begin if off is None else int(off)) for p, off in at.items()]
        )

    def poll(self, max_records: int, timeout_s: float) -> Polled:
        if self.fetcher is not None:
            got = self._polled(self.fetcher.poll(max_records, timeout_s))
            got.positions = self.fetcher.positions(self.topic, self.partitions)
            return got
        got = self._consumed(self.consumer.consume(max_records, timeout_s))
        tps = [self._TP(self.topic, p) for p in self.partitions]
        got.positions = {tp.partition: tp.offset for tp in self.consumer.position(tps)}
        return got

    def _consumed(self, msgs: list) -> Polled:
        """A poll of confluent-kafka's messages, as columns."""
        M = self._M
        n = len(msgs)
        topic = self.topic

        def record(i: int) -> Record:
            m = msgs[i]
            return Record(topic, m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1])

        if len(self.partitions) == 1:  # every message is from the one partition
            parts = np.full(n, self.partitions[0], np.int64)
        else:
            parts = np.fromiter(map(M.partition, msgs), np.int64, n)
        return Polled(
            list(map(M.value, msgs)),
            parts,
            lambda: np.fromiter(map(M.offset, msgs), np.int64, n),  # librdkafka: in order
            record,
            lambda i: msgs[i].error(),  # error events are asked about only when declined
        )

    def end_offsets(self) -> dict[str, int]:
        """Every partition's end in one request (Kafka's ListOffsets "latest": the high
        watermark, or the last stable offset while a transaction is open, the end a
        ``read_committed`` consumer reaches); per partition where that fails."""
        from confluent_kafka import OFFSET_END

        tps = [self._TP(self.topic, p, OFFSET_END) for p in self.partitions]
        out = {}
        for tp in self.consumer.offsets_for_times(tps, timeout=10):
            if tp.error is None and tp.offset >= 0:
                out[tp_name(self.topic, tp.partition)] = int(tp.offset)
        for p in self.partitions:
            name = tp_name(self.topic, p)
            if name not in out:
                tp = self._TP(self.topic, p)
                out[name] = int(self.consumer.get_watermark_offsets(tp, 10, cached=False)[1])
        return out

    def commit(self, offsets: Mapping[str, int]) -> None:
        tps = [self._TP(self.topic, p, int(o)) for p, o in _own(self.topic, offsets).items()]
        if tps:
            self.consumer.commit(offsets=tps, asynchronous=False)

    def committed(self) -> dict[str, int | None]:
        got = self.consumer.committed([self._TP(self.topic, p) for p in self.partitions], 30)
        return {
            tp_name(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in got
        }

    def _polled(self, got: rdkafka.Fetched) -> Polled:
        """A poll of the fetcher's columns; values and records only when asked for."""
        topic = self.topic

        def record(i: int) -> Record:
            ts = int(got.stamps[i])
            return Record(
                topic, int(got.parts[i]), int(got.offsets[i]), got.key(i), got.value(i), ts
            )

        errors = got.errs != 0
        return Polled(
            got.value,
            got.parts,
            got.offsets,
            record,
            got.error if errors.any() else None,
            packed=(got.buf, got.starts),
            errors=errors,
        )

    def _close_fetcher(self) -> None:
        if self.fetcher is not None:
            if self._connecting is not None:
                self._connecting.join()  # its metadata request uses the handle
            self.fetcher.close()

    def close(self) -> None:
        try:
            self._close_fetcher()
        finally:
            self.consumer.close()


def _waiting_for(topic: str, bootstrap: str, timeout_s: float) -> bool:
    """Say once that the broker answers but has no such topic (yet)."""
    log.warning(
        "topic %r not found at %s (yet); waiting up to %g s for it to be created",
        topic,
        bootstrap,
        timeout_s,
    )
    return True


def _own(topic: str, offsets: Mapping[str, int]) -> dict[int, int]:
    """The partitions of ``topic`` in an offsets dict."""
    out = {}
    for name, off in offsets.items():
        t, _, part = name.rpartition(":")
        if t == topic:
            out[int(part)] = int(off)
    return out


def _check_partitions(topic: str, have, wanted: list[int] | None) -> list[int]:
    if wanted is None:
        return sorted(have)
    missing = set(wanted) - set(have)
    if missing:
        raise ValueError(f"topic {topic!r} has no partitions {sorted(missing)}")
    return sorted(wanted)


CLIENTS = ("auto", "kafka-python", "confluent-kafka")


def open_source(
    spec: str,
    group_id: str,
    client_config: Mapping[str, Any] | None = None,
    partitions: str | None = None,
    client: str = "auto",
) -> Source:
    """``kafka://HOST:PORT/TOPIC``, ``jsonl:PATH`` or ``jsonl:-``.

    ``partitions`` ("0,2") limits a Kafka source to those partitions: several engines,
    each with its own partitions and snapshot directory, share the work (docs/design.md §6).
    ``client`` picks the Kafka client: ``auto`` is confluent-kafka when it is installed
    (and the settings translate), else kafka-python.
    """
    if client not in CLIENTS:
        raise ValueError(f"kafka client must be one of {', '.join(CLIENTS)}, got {client!r}")
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
        use_confluent = client == "confluent-kafka" or (
            client == "auto" and confluent_available() and rdkafka_config(client_config) is not None
        )
        if client == "confluent-kafka" and not confluent_available():
            raise ValueError("--kafka-client confluent-kafka: pip install 'streamlmm[confluent]'")
        cls = ConfluentSource if use_confluent else KafkaSource
        return cls(bootstrap, topic, group_id, client_config, partitions=wanted)
    if wanted is not None:
        raise ValueError("--partitions applies to a kafka:// source only")
    if spec.startswith("jsonl:"):
        path = spec[len("jsonl:") :]
        if not path:
            raise ValueError("jsonl source needs a path: jsonl:PATH or jsonl:-")
        return JsonlSource(path)
    raise ValueError(f"unknown source {spec!r}: use kafka://HOST:PORT/TOPIC or jsonl:PATH|-")
