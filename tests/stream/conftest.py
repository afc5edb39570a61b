"""Fixtures for the Kafka integration tests: a real broker, never a mock.

The broker is the single-node Apache Kafka 4.x (KRaft) that ``scripts/kafka-local``
runs on ``127.0.0.1:$STREAMLMM_KAFKA_PORT`` (default 9092). The session fixture
``kafka`` starts it if needed and *fails* (never skips) when it cannot: ``scripts/test``
always provides it, so a missing broker is a broken environment, not an optional test.

Tests get a :class:`KafkaKit` (fixture ``kit``) with small helpers: create a topic,
produce events keyed by group, read a topic back, look up end and committed offsets,
and run ``streamlmm run`` as a subprocess (:class:`EngineProcess`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `import tests.kafka_broker` under any invocation
    sys.path.insert(0, str(REPO))

from tests import kafka_broker  # noqa: E402

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"


# -- small utilities ----------------------------------------------------------------------------
def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def encode_event(event: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of an event: keyed by its group, the value compact JSON."""
    return str(event["g"]).encode(), json.dumps(event, separators=(",", ":")).encode()


def tp_key(topic: str, partition: int) -> str:
    """The engine's offsets key of a topic partition (``"TOPIC:P"``)."""
    return f"{topic}:{partition}"


def latest_snapshot(snapshot_dir: Path):
    """The newest valid snapshot in ``snapshot_dir``, or ``None``."""
    from streamlmm.store import LocalStore

    if not Path(snapshot_dir).is_dir():
        return None
    return LocalStore(snapshot_dir).latest()


# -- the engine as a subprocess -----------------------------------------------------------------
class EngineProcess:
    """``streamlmm run`` in a subprocess, its output in a log file."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        snapshot_dir: Path,
        env: Mapping[str, str] | None = None,
    ):
        self.args = list(args)
        self.log_path = log_path
        self.snapshot_dir = snapshot_dir
        # The engine reads STREAMLMM_* settings from the environment: keep the test's
        # own (port, reference dir, ...) out of it, so flags (and ``env``) configure it.
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMLMM_")},
            **(env or {}),
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlmm.cli", "run", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait(self, timeout_s: float) -> int:
        """Exit code; fails (after killing it) if the engine is still running."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"engine did not exit within {timeout_s:.0f}s; log tail:\n{self.log_tail()}"
            ) from None
        self._log.close()
        return code

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no handler, no final snapshot."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def snapshot(self):
        return latest_snapshot(self.snapshot_dir)


# -- the kit ------------------------------------------------------------------------------------
class KafkaKit:
    """Helpers bound to one broker; every call opens and closes its own client."""

    wait_for = staticmethod(wait_for)
    encode_event = staticmethod(encode_event)
    latest_snapshot = staticmethod(latest_snapshot)
    tp_key = staticmethod(tp_key)

    def __init__(self, bootstrap: str, tmp_path: Path):
        self.bootstrap = bootstrap
        self.tmp_path = tmp_path
        self._engines: list[EngineProcess] = []

    # -- topics ---------------------------------------------------------------------------
    def admin(self):
        from kafka.admin import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=30_000)

    def create_topic(self, name: str, partitions: int = 3, **configs: str) -> str:
        """Create ``name`` with ``partitions`` partitions and wait until it has leaders."""
        admin = self.admin()
        try:
            spec: dict[str, Any] = {"num_partitions": partitions, "replication_factor": 1}
            if configs:
                spec["configs"] = dict(configs)
            admin.create_topics({name: spec}, timeout_ms=30_000, wait_for_metadata=True)
        finally:
            admin.close()
        return name

    def topic_config(self, name: str) -> dict[str, str]:
        from kafka.admin import ConfigResource, ConfigResourceType

        admin = self.admin()
        try:
            res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        finally:
            admin.close()
        entries = res["topic"][name]  # {"topic": {name: {config: {"value": ...}}}}
        return {k: v["value"] for k, v in entries.items()}

    # -- producing ------------------------------------------------------------------------
    def producer(self, **overrides: Any):
        from kafka import KafkaProducer

        cfg: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 50,
            "batch_size": 1 << 20,
            "max_request_size": 4 << 20,
            "compression_type": None,
            "reconnect_backoff_max_ms": 1000,  # kafka-python's 30 s default: slow after outages
        }
        cfg.update(overrides)
        return KafkaProducer(**cfg)

    def produce(
        self, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]
    ) -> list[tuple[int, int]]:
        """Send (key, value) messages; returns each one's confirmed (partition, offset)."""
        producer = self.producer()
        try:
            futures = [producer.send(topic, key=k, value=v) for k, v in messages]
            producer.flush(timeout=120)
            metas = [f.get(timeout=60) for f in futures]
        finally:
            producer.close(timeout=30)
        return [(m.partition, m.offset) for m in metas]

    def produce_events(self, topic: str, events: Iterable[Mapping[str, Any]]):
        """Events as JSON, keyed by ``str(g)``; returns (partition, offset) per event."""
        return self.produce(topic, (encode_event(e) for e in events))

    # -- reading --------------------------------------------------------------------------
    def consumer(self, **overrides: Any):
        from kafka import KafkaConsumer

        cfg: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_partition_fetch_bytes": 4 << 20,
            "fetch_max_bytes": 64 << 20,
            "reconnect_backoff_max_ms": 1000,
        }
        cfg.update(overrides)
        return KafkaConsumer(**cfg)

    def end_offsets(self, topic: str) -> dict[str, int]:
        """The next offset to be written, per ``"TOPIC:P"``."""
        from kafka import TopicPartition

        consumer = self.consumer()
        try:
            parts = wait_for(lambda: consumer.partitions_for_topic(topic), 30, f"{topic} metadata")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            ends = consumer.end_offsets(tps)
        finally:
            consumer.close()
        return {tp_key(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def read_topic(self, topic: str, timeout_s: float = 120.0) -> list:
        """Every record of ``topic`` up to its current end, partition by partition."""
        from kafka import TopicPartition

        consumer = self.consumer()
        try:
            parts = wait_for(lambda: consumer.partitions_for_topic(topic), 30, f"{topic} metadata")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            got: dict[int, list] = {tp.partition: [] for tp in tps}
            deadline = time.monotonic() + timeout_s

            def done() -> bool:
                return all(consumer.position(tp) >= ends[tp] for tp in tps)

            while not done():
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not read {topic} to its end in {timeout_s}s")
                for tp, msgs in consumer.poll(timeout_ms=500, max_records=100_000).items():
                    got[tp.partition].extend(m for m in msgs if m.offset < ends[tp])
        finally:
            consumer.close()
        return [m for p in sorted(got) for m in got[p]]

    def committed(self, group: str, topic: str) -> dict[str, int | None]:
        """The consumer group's committed offsets, per ``"TOPIC:P"``."""
        from kafka import TopicPartition

        consumer = self.consumer(group_id=group)
        try:
            parts = wait_for(lambda: consumer.partitions_for_topic(topic), 30, f"{topic} metadata")
            out = {}
            for p in sorted(parts):
                out[tp_key(topic, p)] = consumer.committed(
                    TopicPartition(topic, p), timeout_ms=30_000
                )
        finally:
            consumer.close(autocommit=False)
        return out

    # -- the engine -----------------------------------------------------------------------
    def engine_args(
        self,
        topic: str,
        snapshot_dir: Path,
        *extra: str,
        formula: str = FORMULA,
        group: str | None = None,
        until_end: bool = True,
    ) -> list[str]:
        args = [
            "--source",
            f"kafka://{self.bootstrap}/{topic}",
            "--formula",
            formula,
            "--snapshot-dir",
            str(snapshot_dir),
            "--consumer-group",
            group or f"{topic}-engine",
            "--progress-seconds",
            "1",
            *extra,
        ]
        if until_end:
            args.append("--until-end")
        return args

    def start_engine(
        self,
        topic: str,
        snapshot_dir: Path,
        *extra: str,
        env: Mapping[str, str] | None = None,
        **kw,
    ) -> EngineProcess:
        """Start ``streamlmm run`` (``until_end`` defaults to True) in the background."""
        args = self.engine_args(topic, snapshot_dir, *extra, **kw)
        n = len(self._engines)
        eng = EngineProcess(args, self.tmp_path / f"engine-{n}.log", Path(snapshot_dir), env)
        self._engines.append(eng)
        return eng

    def run_engine(
        self, topic: str, snapshot_dir: Path, *extra: str, timeout_s: float = 180.0, **kw
    ) -> EngineProcess:
        """Run ``streamlmm run --until-end`` to completion; fails unless it exits 0."""
        eng = self.start_engine(topic, snapshot_dir, *extra, until_end=True, **kw)
        code = eng.wait(timeout_s)
        assert code == 0, f"engine exited with {code}; log tail:\n{eng.log_tail()}"
        return eng

    def close(self) -> None:
        for eng in self._engines:
            if eng.alive():
                eng.kill()


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kafka() -> str:
    """Bootstrap string of the local broker, started if needed; fails if it can't be."""
    try:
        return kafka_broker.ensure_running()
    except Exception as e:  # fail loudly: CI always has a broker (scripts/test starts it)
        pytest.fail(f"the local Kafka broker could not be started: {e}", pytrace=False)


@pytest.fixture
def kit(kafka: str, tmp_path: Path):
    """A :class:`KafkaKit` for this test; engines it started are killed at teardown."""
    k = KafkaKit(kafka, tmp_path)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def topic(request) -> str:
    """A topic name unique to this test (not created: see ``kit.create_topic``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-")
    return f"slmm-{name}-{uuid.uuid4().hex[:10]}"
