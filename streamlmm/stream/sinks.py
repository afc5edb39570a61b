"""Where the engine writes: dead letters (Kafka topic or JSON-lines file) and the
compacted effects topic that other services follow.

Exactly once
------------
- **Kafka.** Dead letters and effects are sent by one transactional producer
  (:class:`Transaction`), in the same transaction as the consumed offsets it commits
  to the consumer group. Readers of those topics use ``isolation_level="read_committed"``:
  they see the records of a committed transaction once, and never those of an aborted
  one. The engine decides what to re-send after a crash (see ``stream/engine.py``).
- **A file.** The dead-letter file's length is recorded in every snapshot; on restart
  the file is truncated back to the length recorded in the restored snapshot (to 0
  when the engine starts from nothing: no snapshot, or every one corrupt), and the
  records after it are written again as the engine re-reads them.

The sinks read only public snapshot fields (keys, BLUPs, conditional covariances,
counts); group keys are written as their JSON literal (:func:`streamlmm.keys.key_to_json`).

"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Mapping
from itertools import repeat
from typing import Any

import numpy as np

from streamlmm.keys import key_to_json
from streamlmm.oserrors import describe, doing
from streamlmm.snapshot import Snapshot
from streamlmm.stream.broker import wait_for_broker
from streamlmm.stream.decode import DeadLetter
from streamlmm.stream.sources import RECONNECT_BACKOFF_MAX_MS, _own

__all__ = [
    "close_all",
    "log_dead_letter",
    "DeadLetterSink",
    "EffectsPublisher",
    "Transaction",
    "ensure_topic",
    "group_record_key",
    "changed_groups",
    "MODEL_KEY",
]

log = logging.getLogger(__name__)
MODEL_KEY = "__model__"
LOGGED_DEAD_LETTERS = 20  # without a destination, dead letters logged one by one


def close_all(*closers) -> None:
    """Call each of ``closers`` (``close`` methods), logging a failure instead of
    raising: closing on the way out must not stop the rest."""
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - closing on the way out
            log.warning("close failed: %s", e)


def log_dead_letter(d: DeadLetter) -> None:
    """A dead letter as a warning (where no dead-letter destination is configured)."""
    log.warning(
        "dead letter %s:%s@%s: %s", d.record.topic, d.record.partition, d.record.offset, d.reason
    )


class Transaction:
    """A kafka-python transactional producer: sends, then commits them with offsets.

    ``init_transactions`` fences any earlier producer with the same ``transactional_id``
    (a killed engine's) and aborts its open transaction, so its records never become
    visible to ``read_committed`` readers.

    Parameters
    ----------
    bootstrap
        ``HOST:PORT`` of the brokers.
    transactional_id
        Stable across restarts of one engine (consumer group, topic and partitions).
    client_config
        kafka-python security settings.

    """

    def __init__(self, bootstrap: str, transactional_id: str, client_config=None):
        from kafka import KafkaProducer

        wait_for_broker(bootstrap)
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            transactional_id=transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            batch_size=1 << 20,
            max_request_size=4 << 20,
            **{"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **dict(client_config or {})},
        )
        self.producer.init_transactions()
        self.open = False

    def send(self, topic: str, key: bytes | None, value: bytes, headers=None) -> None:
        """Send within the current transaction (begun on first use)."""
        self.send_to(topic, key, value, None, headers)

    def send_to(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None, headers=None
    ) -> None:
        """Send to one partition (``None``: the key's) within the current transaction."""
        if not self.open:
            self.producer.begin_transaction()
            self.open = True
        self.producer.send(topic, key=key, value=value, headers=headers, partition=partition)

    def commit(self, offsets: Mapping[str, int], topic: str, group_id: str) -> None:
        """Commit everything sent, with ``topic``'s consumed ``offsets`` for ``group_id``
        (a consumer group id, or a consumer's ``group_metadata()`` for KIP-447 fencing)."""
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if not self.open:
            self.producer.begin_transaction()
            self.open = True
        tps = {
            TopicPartition(topic, p): OffsetAndMetadata(off, "", -1)
            for p, off in _own(topic, offsets).items()
        }
        if tps:
            self.producer.send_offsets_to_transaction(tps, group_id)
        self.producer.commit_transaction()
        self.open = False

    def close(self) -> None:
        """Abort what is not committed, and close."""
        try:
            if self.open:
                self.producer.abort_transaction()
        except Exception as e:  # noqa: BLE001 - closing anyway; the broker aborts it too
            log.warning("abort on close failed: %s", e)
        finally:
            self.producer.close(timeout=10)


def ensure_topic(bootstrap: str, topic: str, client_config=None, **configs: str) -> None:
    """Create ``topic`` (1 partition, replication 1 unless it exists) with ``configs``."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wait_for_broker(bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **dict(client_config or {}))
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


class DeadLetterSink:
    """Dead letters to a Kafka topic (in the engine's transaction) or a JSON-lines file.

    ``spec`` is a file path (``jsonl:PATH`` forces one), or a topic name when a
    transaction is given. Kafka dead letters are keyed by the original key, carry the
    JSON envelope as value and the reason and origin in headers. Without a ``spec``
    dead letters are only logged (and counted).

    Examples
    --------
    >>> import tempfile, os
    >>> from streamlmm.stream.decode import Record
    >>> path = os.path.join(tempfile.mkdtemp(), "dead.jsonl")
    >>> sink = DeadLetterSink(path)
    >>> sink.send([DeadLetter(Record("t", 0, 5, None, b"{"), "invalid JSON")])
    >>> sink.flush(); n = sink.position(); n > 0
    True
    >>> sink.send([DeadLetter(Record("t", 0, 6, None, b"["), "invalid JSON")])
    >>> sink.flush(); sink.truncate(n); os.path.getsize(path) == n
    True

    """

    def __init__(self, spec: str | None, txn: Transaction | None = None):
        self.txn = txn if spec else None
        self._fh = None
        if spec and spec.startswith("jsonl:"):  # a file, whatever the source
            spec, self.txn = spec[len("jsonl:") :], None
        self.spec = spec
        self._logged = 0
        self._failed = False
        if spec and self.txn is None:
            if os.path.isdir(spec):
                raise ValueError(f"--dead-letter {spec!r} is a directory, not a file")
            try:
                self._fh = open(spec, "ab")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise doing(f"opening the dead-letter file {spec}", e) from None
            # fsync is for files: a device (/dev/null) or a pipe has nothing to sync
            self._sync = stat.S_ISREG(os.fstat(self._fh.fileno()).st_mode)
        self.count = 0

    def _log(self, d: DeadLetter) -> None:
        """Without a destination: the first :data:`LOGGED_DEAD_LETTERS` as warnings,
        then only counted (the progress line and the snapshot show how many)."""
        self._logged += 1
        if self._logged <= LOGGED_DEAD_LETTERS:
            log_dead_letter(d)
        if self._logged == LOGGED_DEAD_LETTERS:
            log.warning(
                "%d dead letters logged; further ones are only counted (give --dead-letter "
                "to keep them with their reasons)",
                LOGGED_DEAD_LETTERS,
            )

    @property
    def is_file(self) -> bool:
        return self._fh is not None

    def send(self, letters: list[DeadLetter]) -> None:
        for d in letters:
            self.count += 1
            if not self.spec:
                self._log(d)
                continue
            env = d.to_json()
            if self._fh is not None:
                try:
                    self._fh.write(env + b"\n")
                except OSError as e:
                    self._failed = True
                    raise doing(f"writing dead letters to {self.spec}", e) from None
            else:
                origin = f"{d.record.topic}:{d.record.partition}:{d.record.offset}".encode()
                self.txn.send(
                    self.spec,
                    key=d.record.key,
                    value=env,
                    headers=[("reason", d.reason.encode()[:1000]), ("origin", origin)],
                )

    def flush(self) -> None:
        """Make a file's dead letters durable (before the snapshot that skips them)."""
        if self._fh is not None:
            try:
                self._fh.flush()
                if self._sync:
                    os.fsync(self._fh.fileno())
            except OSError as e:
                self._failed = True
                raise doing(f"writing dead letters to {self.spec}", e) from None

    def position(self) -> int | None:
        """The file's length (after :meth:`flush`); ``None`` for other sinks."""
        if self._fh is None:
            return None
        return self._fh.tell()

    def truncate(self, length: int, why: str | None = None) -> None:
        """Cut the file back to ``length`` bytes (what the restored snapshot covers;
        ``why`` says why else, e.g. 0 when the engine starts from nothing)."""
        if self._fh is None:
            return
        self._fh.flush()
        size = os.fstat(self._fh.fileno()).st_size
        if size < length:
            log.warning(
                "dead-letter file %s has %d bytes, fewer than the %d the snapshot recorded",
                self.spec,
                size,
                length,
            )
            return
        if size > length:
            if why is None:
                log.info(
                    "dead-letter file %s: truncating %d bytes written after the snapshot",
                    self.spec,
                    size - length,
                )
            else:
                log.warning(
                    "dead-letter file %s: emptied (%d bytes) to hold exactly this stream's "
                    "dead letters: %s",
                    self.spec,
                    size,
                    why,
                )
            os.truncate(self.spec, length)
            self._fh.seek(0, os.SEEK_END)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as e:  # what did not fit was never covered by a snapshot
                if not self._failed:  # else the error that stopped the engine said it
                    log.warning("closing the dead-letter file %s: %s", self.spec, describe(e))


def changed_groups(snap: Snapshot, prev: Snapshot | None) -> np.ndarray:
    """Rows of ``snap`` whose group is new, or whose count or BLUP differs from ``prev``.

    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(40):
    ...     m.learn_one({"g": i % 4, "x": float(i)}, float(i % 5))
    >>> a = m.snapshot()
    >>> changed_groups(a, None).tolist(), changed_groups(a, a).tolist()
    ([0, 1, 2, 3], [])

    """
    n = len(snap.keys)
    if prev is None:
        return np.arange(n)
    if len(prev.keys) == 0:
        return np.arange(n)
    index = {k: i for i, k in enumerate(prev.keys)}
    rows = np.fromiter(map(index.get, snap.keys, repeat(-1)), np.int64, n)
    new = rows < 0
    r = np.where(new, 0, rows)
    same_n = prev.group_n[r] == snap.group_n
    same_b = (prev.b[r] == snap.b).all(axis=1)
    same_c = (prev.condvar[r] == snap.condvar).all(axis=(1, 2))
    return np.flatnonzero(new | ~(same_n & same_b & same_c))


class EffectsPublisher:
    """Snapshots' effects to a compacted topic keyed by group, plus ``__model__``.

    Each publish sends the model record and the groups that changed since the previous
    published snapshot (all of them the first time), inside the engine's transaction.
    """

    def __init__(self, topic: str, txn: Transaction, bootstrap: str, client_config=None):
        self.topic = topic
        self.txn = txn
        self.last: Snapshot | None = None
        ensure_topic(bootstrap, topic, client_config, **{"cleanup.policy": "compact"})

    def publish(self, snap: Snapshot) -> int:
        """Send ``snap``'s changed effects (not yet committed); returns how many groups."""
        seq = snap.n_events
        self.txn.send(self.topic, MODEL_KEY.encode(), _dumps(snap.to_dict()))
        rows = changed_groups(snap, self.last)
        for i in rows:
            key = snap.keys[i]
            rec = {
                "group": key,
                "ranef": snap.ranef_row(int(i)),
                "cond_cov": snap.condvar[i].tolist(),
                "n": float(snap.group_n[i]),
                "n_events": seq,
            }
            self.txn.send(self.topic, group_record_key(key), _dumps(rec))
        return len(rows)


def group_record_key(key: str | int) -> bytes:
    """The effects-topic key of a group: its JSON encoding, so that the int 3 (``3``),
    the string "3" (``"3"``) and the model record (bare ``__model__``) never collide.

    >>> group_record_key(3), group_record_key("3"), group_record_key("__model__")
    (b'3', b'"3"', b'"__model__"')

    """
    return key_to_json(key).encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
