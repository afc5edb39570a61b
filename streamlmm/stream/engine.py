"""The engine: consume → validate → update → refresh → snapshot → commit.

It is a loop around :class:`~streamlmm.model.MixedLM`; the statistics, estimates and
snapshots are the model's own. Exactly-once state: every snapshot records the offsets
its statistics include, Kafka offsets are committed only after that snapshot is durable,
and a restart resumes from the newest valid snapshot at its offsets.

"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm.formula import parse_formula
from streamlmm.model import MixedLM
from streamlmm.serve.reader import version_of
from streamlmm.snapshot import Snapshot
from streamlmm.store import LocalStore
from streamlmm.stream.decode import MAX_MESSAGE_BYTES, Decoder
from streamlmm.stream.sinks import DeadLetterSink, EffectsPublisher, make_producer
from streamlmm.stream.sources import KafkaSource, Source, open_source, tp_name

__all__ = ["EngineConfig", "Engine"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineConfig:
    """Everything ``streamlmm run`` takes; see ``streamlmm run --help``."""

    source: str
    formula: str
    snapshot_dir: str
    method: str = "REML"
    consumer_group: str = "streamlmm"
    partitions: str | None = None
    snapshot_every_events: int = 100_000
    snapshot_every_seconds: float = 10.0
    dead_letter: str | None = None
    publish_topic: str | None = None
    until_end: bool = False
    half_life: float | None = None
    time_key: str | None = None
    missing: str = "raise"
    em_every: int = 10_000
    refit_every: int = 200_000
    max_poll_records: int = 5_000
    max_message_bytes: int = MAX_MESSAGE_BYTES
    progress_seconds: float = 2.0
    keep_snapshots: int = 3
    serve: int | None = None
    serve_host: str = "127.0.0.1"
    kafka: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Engine:
    """Runs one stream into one model until stopped or (``until_end``) caught up.

    Parameters
    ----------
    config
        The engine's settings.
    source
        A ready source (tests inject one); by default opened from ``config.source``.

    """

    def __init__(self, config: EngineConfig, source: Source | None = None):
        self.cfg = config
        self.store = LocalStore(config.snapshot_dir, keep=config.keep_snapshots)
        self.formula = parse_formula(config.formula)
        self.decoder = Decoder(
            self.formula, config.time_key, config.missing, config.max_message_bytes
        )
        self.model, self.offsets, self.meta = self._restore()
        self.source = source or open_source(
            config.source, config.consumer_group, config.kafka, partitions=config.partitions
        )
        self.producer = None
        bootstrap = None
        if isinstance(self.source, KafkaSource) and (config.dead_letter or config.publish_topic):
            bootstrap = config.source[len("kafka://") :].partition("/")[0]
            self.producer = make_producer(bootstrap, config.kafka)
        self.dead = DeadLetterSink(config.dead_letter, self.producer)
        self.dead.count = int(self.meta.get("dead_letters", 0))
        self.publisher = None
        if config.publish_topic:
            if self.producer is None:
                raise ValueError("--publish-topic needs a kafka:// source")
            self.publisher = EffectsPublisher(
                config.publish_topic, self.producer, bootstrap, config.kafka
            )
        self.stop_requested = False
        self.last_snapshot: Snapshot | None = None
        self.server = None

    # -- state --------------------------------------------------------------------------
    def _restore(self) -> tuple[MixedLM, dict[str, int], dict[str, Any]]:
        cfg = self.cfg
        snap = self.store.latest()
        if snap is not None and snap.state is not None:
            if snap.formula != cfg.formula or snap.method != cfg.method:
                raise ValueError(
                    f"snapshot in {cfg.snapshot_dir} is for {snap.formula!r} ({snap.method}), "
                    f"not {cfg.formula!r} ({cfg.method}): use another --snapshot-dir"
                )
            log.info(
                "resuming from snapshot at %d events, offsets %s", snap.n_events, dict(snap.offsets)
            )
            return MixedLM.from_snapshot(snap), dict(snap.offsets), dict(snap.meta)
        model = MixedLM(
            cfg.formula,
            cfg.method,
            half_life=cfg.half_life,
            time_key=cfg.time_key,
            missing=cfg.missing,
            em_every=cfg.em_every,
            refit_every=cfg.refit_every,
        )
        return model, {}, {}

    def checkpoint(self) -> Snapshot:
        """Snapshot durably, then commit the offsets it holds, then publish."""
        self._retry("flush dead letters", self.dead.flush)
        snap = self.model.snapshot(
            offsets=self.offsets,
            source=self.cfg.source,
            dead_letters=self.dead.count,
            skipped=self.decoder.n_skipped + int(self.meta.get("skipped", 0)),
        )
        path = self.store.write(snap)
        if self.server is not None:  # answer HTTP queries from this snapshot from now on
            self.server.publish(snap, version_of(path))
        try:
            self.source.commit(self.offsets)
        except Exception as e:  # the snapshot, not Kafka, is the source of truth
            log.warning("offset commit failed (will retry at the next snapshot): %s", e)
        if self.publisher is not None:
            self._retry("publish effects", lambda: self.publisher.publish(snap))
        self.last_snapshot = snap
        return snap

    def _retry(self, what: str, fn, max_backoff_s: float = 10.0) -> None:
        delay = 0.5
        while True:
            try:
                return fn()
            except Exception as e:
                log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
                time.sleep(delay)
                delay = min(2 * delay, max_backoff_s)

    # -- loop ---------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def handler(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _keep_groups_home(self, batch) -> None:
        """Every group lives on one partition (producers key by group, DESIGN §6), so
        that state stays local to partitions; an event of a known group arriving on
        another partition is a dead letter, not a silent merge across partitions."""
        st = self.model._stats
        index, home = st.index, st.part
        first: dict = {}
        away = np.zeros(len(batch), dtype=bool)
        where = [0] * len(batch)
        for i, (key, part) in enumerate(zip(batch.keys, batch.parts)):
            r = index.get(key)
            h = home[r] if r is not None else first.setdefault(key, part)
            if h != part and h >= 0:
                away[i], where[i] = True, int(h)
        if away.any():
            batch.drop(
                away,
                lambda i: (
                    f"group {batch.keys[i]!r} lives on partition {where[i]} but arrived "
                    f"on partition {batch.records[i].partition}: producers must key by group"
                ),
            )

    def _caught_up(self, targets: Mapping[str, int]) -> bool:
        if hasattr(self.source, "exhausted"):  # a file: its end is where reading stops
            return self.source.exhausted
        return all(self.offsets.get(tp, 0) >= end for tp, end in targets.items())

    def _poll(self):
        try:
            return self.source.poll(self.cfg.max_poll_records, 0.5)
        except Exception as e:  # broker gone: back off and carry on
            log.warning("poll failed (%s); retrying", e)
            time.sleep(1.0)
            return []

    def run(self, install_signals: bool = True) -> int:
        """Consume until stopped (SIGTERM/SIGINT) or caught up; returns an exit code."""
        cfg = self.cfg
        if install_signals:
            self._install_signals()
        if cfg.serve is not None:
            from streamlmm.serve.server import start_server

            self.server = start_server(cfg.serve_host, cfg.serve)
        self.source.seek(self.offsets)
        targets: dict[str, int] = {}
        if cfg.until_end:
            self._retry("read end offsets", lambda: targets.update(self.source.end_offsets()))
        since_events, since_t = 0, time.monotonic()
        progress_t, progress_n = since_t, self.model.n_events
        try:
            while not self.stop_requested:
                records = self._poll()
                if records:
                    batch = self.decoder.decode(records)
                    self._keep_groups_home(batch)
                    if batch.dead:
                        self.dead.send(batch.dead)
                    if len(batch):
                        self.model.learn_batch(
                            batch.keys, batch.A, batch.y, batch.w, batch.t, batch.parts
                        )
                    last = {(r.topic, r.partition): r.offset for r in records}
                    for (topic, part), off in last.items():
                        name = tp_name(topic, part)
                        self.offsets[name] = max(self.offsets.get(name, 0), off + 1)
                    since_events += len(records)
                now = time.monotonic()
                if since_events and (
                    since_events >= cfg.snapshot_every_events
                    or now - since_t >= cfg.snapshot_every_seconds
                ):
                    self.checkpoint()
                    since_events, since_t = 0, time.monotonic()
                if cfg.progress_seconds and now - progress_t >= cfg.progress_seconds:
                    self._progress(now - progress_t, self.model.n_events - progress_n, targets)
                    progress_t, progress_n = now, self.model.n_events
                if cfg.until_end and self._caught_up(targets):
                    break
        finally:
            if since_events or self.last_snapshot is None:
                self.checkpoint()
            self.source.close()
            self.dead.close()
            if self.producer is not None:
                self.producer.close()
            if self.server is not None:
                self.server.stop()
        return 0

    def _progress(self, dt: float, dn: int, targets: Mapping[str, int]) -> None:
        try:
            ends = self.source.end_offsets()
        except Exception:  # broker away: report the lag against what we knew
            ends = targets
        lag = sum(max(0, end - self.offsets.get(tp, 0)) for tp, end in ends.items())
        refit = self.model.last_refit
        sys.stderr.write(
            f"[streamlmm] {dn / dt if dt else 0:,.0f} ev/s | events {self.model.n_events:,} | "
            f"lag {lag:,} | groups {self.model._stats.n_groups:,} | "
            f"last refit @{refit.get('n_events', '-')} ({refit.get('seconds', 0):.2f}s) | "
            f"dead letters {self.dead.count:,}\n"
        )
