"""Where the engine writes: dead letters (Kafka topic or JSON-lines file) and the
compacted effects topic that other services follow.

"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from streamlmm.keys import key_to_json
from streamlmm.snapshot import Snapshot
from streamlmm.stream.decode import DeadLetter
from streamlmm.stream.sources import RECONNECT_BACKOFF_MAX_MS

__all__ = ["DeadLetterSink", "EffectsPublisher", "make_producer", "group_record_key", "MODEL_KEY"]

log = logging.getLogger(__name__)
MODEL_KEY = "__model__"


def make_producer(bootstrap: str, client_config: Mapping[str, Any] | None = None):
    """A kafka-python producer that waits for the broker's acknowledgement."""
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        retries=2**31 - 1,
        max_in_flight_requests_per_connection=1,
        linger_ms=5,
        **{"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **dict(client_config or {})},
    )


def ensure_topic(bootstrap: str, topic: str, client_config=None, **configs: str) -> None:
    """Create ``topic`` (1 partition, replication 1 unless it exists) with ``configs``."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **dict(client_config or {}))
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


class DeadLetterSink:
    """Dead letters to ``kafka-topic`` (with a Kafka source) or to a JSON-lines file.

    ``spec`` is a file path (``jsonl:PATH`` forces one), or a topic name when a
    producer is given. Kafka dead
    letters are keyed by the original key, carry the JSON envelope as value and the
    reason and origin in headers.
    """

    def __init__(self, spec: str | None, producer=None):
        self.producer = producer if spec else None
        self._fh = None
        if spec and spec.startswith("jsonl:"):  # a file, whatever the source
            spec, self.producer = spec[len("jsonl:") :], None
        self.spec = spec
        if spec and self.producer is None:
            self._fh = open(spec, "ab")  # noqa: SIM115
        self.count = 0

    def send(self, letters: list[DeadLetter]) -> None:
        for d in letters:
            self.count += 1
            if not self.spec:
                log.warning(
                    "dead letter %s:%s@%s: %s",
                    d.record.topic,
                    d.record.partition,
                    d.record.offset,
                    d.reason,
                )
                continue
            env = d.to_json()
            if self._fh is not None:
                self._fh.write(env + b"\n")
            else:
                origin = f"{d.record.topic}:{d.record.partition}:{d.record.offset}".encode()
                self.producer.send(
                    self.spec,
                    key=d.record.key,
                    value=env,
                    headers=[("reason", d.reason.encode()[:1000]), ("origin", origin)],
                )

    def flush(self, timeout_s: float = 30.0) -> None:
        """Make every dead letter durable (before the snapshot that skips them)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        elif self.producer is not None:
            self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class EffectsPublisher:
    """Each snapshot's effects to a compacted topic keyed by group, plus ``__model__``."""

    def __init__(self, topic: str, producer, bootstrap: str, client_config=None):
        self.topic = topic
        self.producer = producer
        ensure_topic(bootstrap, topic, client_config, **{"cleanup.policy": "compact"})

    def publish(self, snap: Snapshot, timeout_s: float = 30.0) -> None:
        seq = snap.n_events
        model = snap.to_dict()
        self.producer.send(self.topic, key=MODEL_KEY.encode(), value=_dumps(model))
        for i, key in enumerate(snap.keys):
            rec = {
                "group": key,
                "ranef": snap.ranef_row(i),
                "cond_cov": snap.condvar[i].tolist(),
                "n": float(snap.group_n[i]),
                "n_events": seq,
            }
            self.producer.send(self.topic, key=group_record_key(key), value=_dumps(rec))
        self.producer.flush(timeout=timeout_s)


def group_record_key(key: str | int) -> bytes:
    """The effects-topic key of a group: its JSON encoding, so that the int 3 (``3``),
    the string "3" (``"3"``) and the model record (bare ``__model__``) never collide.

    >>> group_record_key(3), group_record_key("3"), group_record_key("__model__")
    (b'3', b'"3"', b'"__model__"')

    """
    return key_to_json(key).encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
