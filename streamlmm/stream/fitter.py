"""Scale-out fitter: the whole model's statistics from the state topic, fitted exactly.

``streamlmm fit --state-topic STATE --params-topic PARAMS --snapshot-dir DIR`` follows
the compacted state topic that the workers write (``stream/worker.py``). The latest
record of a group *is* that group's full statistics row, so the fitter keeps one
:class:`~streamlmm.stats.GroupStats` whose rows are replaced as records arrive (re-laid
by column name, ``stream/state.py``). Everything global is a sum over those rows
(docs/math.md §2–§5), so a fit of them is the fit of every event the workers committed.

It fits through :meth:`MixedLM.load_statistics` and :meth:`MixedLM.fit` — the core's
one path — publishes θ, β, σ² (and the rest of the model-level estimates) to the
compacted params topic under the key ``"params"`` with a version and the state and
source offsets they cover, and writes full snapshots (``Snapshot.load(DIR)`` is the
whole model). A restart replays the compacted state topic: the latest row per group.

"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamlmm.design import Design
from streamlmm.model import MixedLM
from streamlmm.snapshot import Snapshot
from streamlmm.stats import GroupStats
from streamlmm.store import LocalStore
from streamlmm.stream.broker import wait_for_broker
from streamlmm.stream.sinks import close_all, ensure_topic
from streamlmm.stream.sources import RECONNECT_BACKOFF_MAX_MS, tp_name
from streamlmm.stream.state import StateRecord, absorb_design, decode_record, relayout
from streamlmm.stream.worker import parse_kafka_spec

__all__ = ["FitterConfig", "Fitter", "GlobalState", "PARAMS_KEY", "params_record"]

log = logging.getLogger(__name__)
PARAMS_KEY = b'"params"'


@dataclasses.dataclass
class FitterConfig:
    """Settings of ``streamlmm fit``."""

    state_topic: str
    snapshot_dir: str
    params_topic: str | None = None
    bootstrap: str | None = None
    method: str | None = None  # None: the workers' method
    every_seconds: float = 10.0
    until_caught_up: bool = False
    keep_snapshots: int = 3
    progress_seconds: float = 5.0
    kafka: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class GlobalState:
    """Every group's latest statistics row, from state records in any order of arrival
    per partition (a later record of a group replaces its row).

    Examples
    --------
    >>> import numpy as np
    >>> from streamlmm.design import numeric_design
    >>> from streamlmm.stream.state import encode_group
    >>> d = numeric_design("y ~ x + (1 | g)").to_state()
    >>> g = GlobalState()
    >>> for n, events in ((1.0, 1), (2.0, 2)):
    ...     row = np.array([n, 1.0, 2.0, 0.0, 0.0, 0.0])
    ...     _ = g.apply(decode_record(*encode_group("a", 0, row, events=events, offset=events,
    ...                 formula="y ~ x + (1 | g)", method="REML", design=d)))
    >>> g.stats.n_groups, g.n_events, g.events["a"]
    (1, 2, 2)

    """

    def __init__(self):
        self.formula: str | None = None
        self.method: str | None = None
        self.design: Design | None = None
        self.stats: GroupStats | None = None
        self.events: dict = {}
        self.home: dict = {}
        self.markers: dict[str, int] = {}  # source "topic:p" -> next offset covered
        self.n_events = 0
        self.n_records = 0
        self.n_conflicts = 0
        self.n_regressions = 0

    def apply(self, rec: StateRecord) -> bool:
        """Take one record; ``ValueError`` if it belongs to another model."""
        if self.formula is None:
            self.formula, self.method = rec.formula, rec.method
        elif rec.formula != self.formula:
            raise ValueError(
                f"state record of formula {rec.formula!r} among records of {self.formula!r}"
            )
        self.n_records += 1
        if rec.is_marker:
            name = tp_name(rec.topic or "source", rec.partition)
            self.markers[name] = max(self.markers.get(name, 0), rec.offset)
            return True
        if self.design is None:
            self.design = Design.from_state(self.formula, {"formula": self.formula, **rec.design})
            self.stats = GroupStats(self.design)
        elif absorb_design(self.design, rec.design):
            self.stats.widen(self.design)
        key = rec.key
        home = self.home.setdefault(key, rec.partition)
        if home != rec.partition:
            self.n_conflicts += 1
            log.error(
                "group %r has state on partitions %d and %d: producers must key by group; "
                "keeping partition %d's",
                key,
                home,
                rec.partition,
                home,
            )
            return False
        row = relayout(rec.row, rec.design, self.design)
        st = self.stats
        r = st.index.get(key)
        if r is None:
            r = st.rows([key])[0]
        st.M[r] = row
        before = self.events.get(key, 0)
        if rec.events < before:
            self.n_regressions += 1
            log.error("group %r: state count went back from %d to %d", key, before, rec.events)
        self.events[key] = rec.events
        self.n_events += rec.events - before
        return True


class Fitter:
    """The fitter (see the module docstring); :meth:`run`."""

    def __init__(self, config: FitterConfig):
        self.cfg = cfg = config
        if cfg.method not in (None, "REML", "ML"):
            raise ValueError(f"--method must be REML or ML, got {cfg.method!r}")
        self.bootstrap, self.state_topic = parse_kafka_spec(cfg.state_topic, cfg.bootstrap)
        self.params_topic = None
        if cfg.params_topic:
            _, self.params_topic = parse_kafka_spec(cfg.params_topic, self.bootstrap)
        self.kafka = dict(cfg.kafka)
        self.common = {"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **self.kafka}
        self.store = LocalStore(cfg.snapshot_dir, keep=cfg.keep_snapshots, create=True)
        self.lock = self.store.lock("streamlmm fit")
        try:
            self._connect(cfg)
        except BaseException:
            self.lock.close()
            raise

    def _connect(self, cfg: FitterConfig) -> None:
        wait_for_broker(self.bootstrap)
        self.consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
            **self.common,
        )
        deadline = time.monotonic() + 60
        while not (parts := self.consumer.partitions_for_topic(self.state_topic)):
            if time.monotonic() > deadline:
                self.consumer.close()
                raise RuntimeError(
                    f"state topic {self.state_topic!r} not found at {self.bootstrap}"
                )
            time.sleep(0.05)
        self.tps = [TopicPartition(self.state_topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.state = GlobalState()
        self.model: MixedLM | None = None
        self.version = 0
        self.producer = None
        if self.params_topic:
            ensure_topic(
                self.bootstrap, self.params_topic, self.kafka, **{"cleanup.policy": "compact"}
            )
            self.version = self._last_version()
            self.producer = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                max_request_size=16 << 20,
                **self.common,
            )
        self.n_bad = 0
        self.stop_requested = False
        self.last_snapshot: Snapshot | None = None
        self.last_fit: dict[str, Any] = {}

    def _last_version(self) -> int:
        """The newest version already in the params topic (versions keep increasing)."""
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, **self.common)
        try:
            parts = c.partitions_for_topic(self.params_topic) or {0}
            tps = [TopicPartition(self.params_topic, p) for p in parts]
            c.assign(tps)
            ends = c.end_offsets(tps)
            best = 0
            for tp in tps:
                if ends[tp] == 0:
                    continue
                c.seek(tp, ends[tp] - 1)
                deadline = time.monotonic() + 30
                while c.position(tp) < ends[tp] and time.monotonic() < deadline:
                    for msgs in c.poll(timeout_ms=200).values():
                        for m in msgs:
                            try:
                                best = max(best, int(json.loads(m.value)["version"]))
                            except (ValueError, KeyError, TypeError):
                                pass
            return best
        finally:
            c.close()

    # -- reading -------------------------------------------------------------------------
    def end_offsets(self) -> dict:
        return self.consumer.end_offsets(self.tps)

    def positions(self) -> dict[str, int]:
        return {tp_name(tp.topic, tp.partition): self.consumer.position(tp) for tp in self.tps}

    def poll(self, timeout_ms: int = 500) -> int:
        """Read what is there; returns the number of records applied."""
        n = 0
        for msgs in self.consumer.poll(timeout_ms=timeout_ms, max_records=100_000).values():
            for m in msgs:
                try:
                    rec = decode_record(m.key, m.value)
                    if self.state.apply(rec):
                        n += 1
                except ValueError as e:
                    self.n_bad += 1
                    log.error(
                        "state record %s:%d@%d skipped: %s", m.topic, m.partition, m.offset, e
                    )
        return n

    def caught_up(self, ends) -> bool:
        return all(self.consumer.position(tp) >= ends[tp] for tp in self.tps)

    # -- fitting -------------------------------------------------------------------------
    def fit(self) -> Snapshot | None:
        """Fit the current statistics exactly; publish the parameters; write a snapshot."""
        st = self.state
        if st.stats is None or st.stats.n_groups == 0:
            return None
        method = self.cfg.method or st.method
        if self.model is None or self.model.method != method:
            self.model = MixedLM(st.formula, method)
        t0 = time.perf_counter()
        self.model.load_statistics(st.design, st.stats, st.n_events)
        self.model.fit()
        t_fit = time.perf_counter() - t0
        self.version += 1
        state_offsets = self.positions()
        snap = self.model.snapshot(
            offsets=dict(st.markers),
            role="fitter",
            params_version=self.version,
            state_topic=self.state_topic,
            state_offsets=state_offsets,
            state_records=st.n_records,
            conflicts=st.n_conflicts,
        )
        t_snap = time.perf_counter() - t0 - t_fit
        if self.producer is not None:
            rec = params_record(snap, self.version, st.design.to_state(), state_offsets)
            self.producer.send(self.params_topic, key=PARAMS_KEY, value=rec)
            self.producer.flush(timeout=60)
        self.store.write(snap)
        self.last_snapshot = snap
        self.last_fit = {"fit_seconds": t_fit, "snapshot_seconds": t_snap, "groups": snap.n_groups}
        log.info(
            "fit v%d: %d groups, %d events, %.2fs fit + %.2fs snapshot, criterion %.6f",
            self.version,
            snap.n_groups,
            snap.n_events,
            t_fit,
            t_snap,
            snap.criterion,
        )
        return snap

    def run(self, install_signals: bool = True) -> int:
        """Follow the state topic, fitting every ``every_seconds`` when it changed; with
        ``until_caught_up``, fit once the topic is read to its current end and return."""
        cfg = self.cfg
        if install_signals:

            def handler(signum, frame):
                self.stop_requested = True

            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        try:
            if cfg.until_caught_up:
                ends = self.end_offsets()
                while not self.caught_up(ends) and not self.stop_requested:
                    self.poll()
                self.fit()
                return 0
            changed, last = 0, time.monotonic()
            while not self.stop_requested:
                changed += self.poll()
                now = time.monotonic()
                if changed and now - last >= cfg.every_seconds:
                    self.fit()
                    changed, last = 0, now
            if changed:
                self.fit()
            return 0
        finally:
            self.close()

    def close(self) -> None:
        close_all(*(w.close for w in (self.consumer, self.producer, self.lock) if w is not None))


def params_record(
    snap: Snapshot, version: int, design: Mapping[str, Any], state_offsets: Mapping[str, int]
) -> bytes:
    """The params-topic value: the snapshot's model-level estimates, the design they are
    laid out for, a version and the state (and source) offsets they cover."""
    d = snap.to_dict()
    d.pop("history", None)
    d["fixef_vcov"] = snap.fixef_vcov.tolist()
    d.update(
        version=int(version),
        design=dict(design),
        state_offsets=dict(state_offsets),
        source_offsets=dict(snap.offsets),
        sigma2=snap.sigma**2 if math.isfinite(snap.sigma) else None,
        time=time.time(),
    )
    return json.dumps(d, separators=(",", ":")).encode()


def main_fit(cfg: FitterConfig) -> int:
    """``streamlmm fit``."""
    fitter = Fitter(cfg)
    code = fitter.run()
    if fitter.last_snapshot is not None:
        sys.stderr.write(f"[streamlmm] fitter snapshot: {fitter.last_snapshot!r}\n")
    elif cfg.until_caught_up:
        sys.stderr.write("[streamlmm] the state topic holds no groups yet: nothing to fit\n")
    return code
