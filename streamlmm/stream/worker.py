"""Scale-out worker: a member of a Kafka consumer group that keeps its partitions' groups.

``streamlmm run --source kafka://HOST:PORT/TOPIC --formula F --consumer-group ID
--state-topic STATE`` runs one. Start as many as the topic has partitions; Kafka's group
management decides who owns which partition (docs/scaleout.md).

Exactly once
------------
- **One transaction per batch.** After every poll the worker sends, with one
  transactional producer, each changed group's statistics row (``stream/state.py``) to
  the compacted state topic, a *marker* per partition with the next source offset, and
  the consumed offsets (``send_offsets_to_transaction`` with the consumer's group
  metadata, KIP-447: a member that lost its partitions cannot commit them any more).
  State and offsets therefore become visible together or not at all.
- **The state topic is co-partitioned** with the source: source partition ``p``'s groups
  live in state partition ``p`` (created with as many partitions, compacted).
- **On assignment** a partition is paused until it is restored: the worker reads its
  committed offset (``read_committed``, so a pending transactional commit is waited for),
  reads state partition ``p`` to its last stable offset, checks that the partition's
  marker says the same offset (otherwise reads again), and seeks there. A partition it
  owned until the rebalance and whose committed offset is still its own is kept without
  re-reading.
- **On revocation** nothing is pending (every batch is committed before the next poll),
  so the partitions' groups are dropped. A failed commit (fenced, rebalanced) aborts the
  transaction and restores every owned partition from the state topic again.
- **A killed worker's** open transaction is aborted by the broker after
  ``transaction_timeout_ms``; until then its partitions' committed offsets are
  "unstable" and their new owner waits, so nothing is lost or counted twice.

"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

from streamlmm.keys import key_to_json
from streamlmm.model import MixedLM
from streamlmm.predictor import coefficients, linear_predictor
from streamlmm.stats import GroupStats
from streamlmm.stream.broker import wait_for_broker
from streamlmm.stream.decode import MAX_MESSAGE_BYTES, Decoder, Polled, distinct_partitions
from streamlmm.stream.engine import parse_levels
from streamlmm.stream.sinks import (
    DeadLetterSink,
    Transaction,
    close_all,
    ensure_topic,
    log_dead_letter,
)
from streamlmm.stream.sources import RECONNECT_BACKOFF_MAX_MS, tp_name
from streamlmm.stream.state import (
    absorb_design,
    decode_record,
    encode_group,
    encode_marker,
    relayout,
)

__all__ = ["WorkerConfig", "Worker", "parse_kafka_spec", "ensure_state_topic", "read_state"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerConfig:
    """Settings of ``streamlmm run --state-topic`` (a scale-out worker)."""

    source: str
    formula: str
    state_topic: str
    consumer_group: str = "streamlmm"
    method: str = "REML"
    missing: str = "raise"
    levels: str | None = None  # JSON factor levels, reference first (engine --levels)
    params_topic: str | None = None  # the fitter's parameters: global estimates
    publish_topic: str | None = None  # changed groups' effects at those estimates
    dead_letter: str | None = None
    max_poll_records: int = 5_000
    max_message_bytes: int = MAX_MESSAGE_BYTES
    progress_seconds: float = 2.0
    session_timeout_ms: int = 10_000
    transaction_timeout_ms: int = 10_000
    kafka: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_kafka_spec(spec: str, bootstrap: str | None = None) -> tuple[str, str]:
    """``(bootstrap, topic)`` of ``kafka://HOST:PORT/TOPIC``, or of a bare ``TOPIC`` with
    ``bootstrap``.

    >>> parse_kafka_spec("kafka://h:9092/state"), parse_kafka_spec("state", "h:1")
    (('h:9092', 'state'), ('h:1', 'state'))

    """
    if spec.startswith("kafka://"):
        host, _, topic = spec[len("kafka://") :].partition("/")
        if not host or not topic:
            raise ValueError(f"expected kafka://HOST:PORT/TOPIC, got {spec!r}")
        return host, topic
    if not bootstrap:
        raise ValueError(f"topic {spec!r} needs --bootstrap HOST:PORT (or kafka://HOST:PORT/NAME)")
    if not spec or "/" in spec:
        raise ValueError(f"bad topic name {spec!r}")
    return bootstrap, spec


def ensure_state_topic(bootstrap: str, topic: str, partitions: int, client_config=None) -> int:
    """Create the compacted state topic with ``partitions`` partitions unless it exists;
    returns its partition count (``ValueError`` if it has fewer than ``partitions``)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    cfg = dict(client_config or {})
    wait_for_broker(bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **cfg)
    try:
        admin.create_topics(
            [NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    c = KafkaConsumer(bootstrap_servers=bootstrap, **cfg)
    try:
        deadline = time.monotonic() + 60
        while not (have := c.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"state topic {topic!r} has no metadata at {bootstrap}")
            time.sleep(0.05)
    finally:
        c.close()
    if len(have) < partitions:
        raise ValueError(
            f"state topic {topic!r} has {len(have)} partitions but the source has "
            f"{partitions}: the state topic must be co-partitioned with the source"
        )
    return len(have)


def read_state(consumer, tps, timeout_s: float = 120.0, on_bad=None):
    """Every record of ``tps`` (a ``read_committed`` consumer, assigned) from the start to
    the last stable offset: ``(records, ends)``, bad records passed to ``on_bad``."""
    consumer.assign(list(tps))
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(list(tps))
    out = []
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not read the state topic to its end in {timeout_s:.0f}s")
        for tp, msgs in consumer.poll(timeout_ms=200, max_records=50_000).items():
            for m in msgs:
                if m.offset >= ends[tp]:
                    continue
                try:
                    out.append(decode_record(m.key, m.value))
                except ValueError as e:
                    if on_bad is not None:
                        on_bad(m, e)
    return out, ends


@dataclasses.dataclass
class _Part:
    """One owned partition: its groups' statistics, event counts and next offset."""

    stats: GroupStats
    events: dict
    offset: int | None  # next source offset to read (None: from the beginning)
    changed: set = dataclasses.field(default_factory=set)


class _Listener(ConsumerRebalanceListener):
    """Rebalance callbacks run on kafka-python's IO thread: only queue them."""

    def __init__(self, queue: collections.deque):
        self.queue = queue

    def on_partitions_revoked(self, revoked):
        self.queue.append(("revoked", {tp.partition for tp in revoked}))

    def on_partitions_assigned(self, assigned):
        self.queue.append(("assigned", {tp.partition for tp in assigned}))

    def on_partitions_lost(self, lost):
        self.queue.append(("lost", {tp.partition for tp in lost}))


class Worker:
    """One scale-out worker (see the module docstring); :meth:`run` until SIGTERM."""

    def __init__(self, config: WorkerConfig):
        self.cfg = cfg = config
        self._TP = TopicPartition
        if cfg.method not in ("REML", "ML"):
            raise ValueError(f"--method must be REML or ML, got {cfg.method!r}")
        self.bootstrap, self.topic = parse_kafka_spec(cfg.source)
        wait_for_broker(self.bootstrap)
        self.model = MixedLM(
            cfg.formula, cfg.method, missing=cfg.missing, levels=parse_levels(cfg.levels)
        )
        self.design = self.model._design
        self.decoder = Decoder(self.model._reader, max_bytes=cfg.max_message_bytes)
        kafka = dict(cfg.kafka)
        common = {"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **kafka}
        self.consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=cfg.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=max(1000, cfg.session_timeout_ms // 4),
            max_partition_fetch_bytes=4 << 20,
            **common,
        )
        n_parts = None
        deadline = time.monotonic() + 60
        while not (n_parts := self.consumer.partitions_for_topic(self.topic)):
            if time.monotonic() > deadline:
                self.consumer.close(autocommit=False)
                raise RuntimeError(f"topic {self.topic!r} not found at {self.bootstrap}")
            time.sleep(0.05)
        ensure_state_topic(self.bootstrap, cfg.state_topic, len(n_parts), kafka)
        self.restorer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            **common,
        )
        self.txn_id = f"streamlmm-worker:{cfg.consumer_group}:{uuid.uuid4().hex}"
        self.txn = self._transaction()
        self.dead = DeadLetterSink(cfg.dead_letter, self.txn) if cfg.dead_letter else None
        if cfg.dead_letter and cfg.dead_letter.startswith("jsonl:"):
            raise ValueError("a scale-out worker's --dead-letter must be a Kafka topic")
        self.events_q: collections.deque = collections.deque()
        listener = _Listener(self.events_q)
        self.consumer.subscribe([self.topic], listener=listener)
        self.parts: dict[int, _Part] = {}
        self.cache: dict[int, _Part] = {}  # revoked by an eager rebalance, maybe back soon
        self.pending: set[int] = set()
        self.stop_requested = False
        self.n_events = 0
        self.n_dead = 0
        self.n_commits = 0
        self.n_restores = 0
        self.n_bad_state = 0
        self._lock = threading.Lock()
        self.params: dict | None = None  # the newest params record, parsed
        self.params_consumer = None
        if cfg.publish_topic and not cfg.params_topic:
            raise ValueError("--publish-topic on a scale-out worker needs --params-topic")
        if cfg.params_topic:
            _, self.params_topic = parse_kafka_spec(cfg.params_topic, self.bootstrap)
            self.params_consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
                **common,
            )
        if cfg.publish_topic:
            ensure_topic(self.bootstrap, cfg.publish_topic, kafka, **{"cleanup.policy": "compact"})

    def _transaction(self) -> Transaction:
        conf = {"transaction_timeout_ms": self.cfg.transaction_timeout_ms, **dict(self.cfg.kafka)}
        return Transaction(self.bootstrap, self.txn_id, conf)

    # -- rebalances ------------------------------------------------------------------------
    def _drain(self) -> None:
        """Apply the queued rebalance callbacks."""
        while self.events_q:
            what, ps = self.events_q.popleft()
            if what == "assigned":
                self.pending |= ps - set(self.parts)
            else:
                for p in ps:
                    part = self.parts.pop(p, None)
                    if part is not None and what == "revoked":
                        self.cache[p] = part
                    if what == "lost":
                        self.cache.pop(p, None)
                    self.pending.discard(p)
        if self.pending:
            owned = {tp.partition for tp in self.consumer.assignment()}
            self.pending &= owned

    def _committed(self, p: int) -> int | None:
        """Partition ``p``'s committed offset, waiting while a transaction holds it."""
        tp = self._TP(self.topic, p)
        wait = self.cfg.transaction_timeout_ms / 1000 + 60
        deadline = time.monotonic() + wait
        while True:
            try:
                return self.consumer.committed(tp, timeout_ms=int(wait * 1000))
            except Exception as e:  # noqa: BLE001 - unstable offsets, coordinator moving
                if time.monotonic() > deadline:
                    raise
                log.info("committed offset of partition %d not readable yet (%s)", p, e)
                time.sleep(0.2)

    def _restore(self) -> None:
        """Restore the pending partitions from the state topic, then seek and resume."""
        ps = sorted(self.pending)
        tps = [self._TP(self.topic, p) for p in ps]
        self.consumer.pause(*tps)
        t0 = time.perf_counter()
        committed = {p: self._committed(p) for p in ps}
        todo = []
        for p in ps:
            cached = self.cache.pop(p, None)
            if cached is not None and cached.offset == committed[p]:
                self.parts[p] = cached  # ours until the rebalance, and nobody moved it
            else:
                todo.append(p)
        for attempt in range(600):
            if not todo:
                break
            got = self._read_partitions(todo)
            late = [p for p in todo if got[p].offset != committed[p]]
            for p in todo:
                if p not in late:
                    self.parts[p] = got[p]
            if late:
                log.info("state of partitions %s is behind their committed offsets", late)
                time.sleep(0.1)
                if attempt % 20 == 19:  # something else moved: read the offsets again
                    committed.update({p: self._committed(p) for p in late})
            todo = late
        else:
            raise RuntimeError(f"state partitions {todo} never caught up with their offsets")
        for p, tp in zip(ps, tps):
            off = self.parts[p].offset
            if off is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, off)
        self.consumer.resume(*tps)
        self.pending.clear()
        self.n_restores += 1
        log.info(
            "restored partitions %s (%d groups) in %.2fs",
            ps,
            sum(self.parts[p].stats.n_groups for p in ps),
            time.perf_counter() - t0,
        )

    def _read_partitions(self, ps: list[int]) -> dict[int, _Part]:
        tps = [self._TP(self.cfg.state_topic, p) for p in ps]

        def bad(m, e):
            self.n_bad_state += 1
            log.error("state record %s:%d@%d skipped: %s", m.topic, m.partition, m.offset, e)

        records, _ = read_state(self.restorer, tps, on_bad=bad)
        latest: dict[int, dict] = {p: {} for p in ps}
        marker: dict[int, int | None] = dict.fromkeys(ps)
        for rec in records:
            if rec.formula != self.cfg.formula or rec.method != self.cfg.method:
                raise ValueError(
                    f"state topic {self.cfg.state_topic!r} holds records of "
                    f"{rec.formula!r} ({rec.method}), not {self.cfg.formula!r} "
                    f"({self.cfg.method}): use another --state-topic"
                )
            if rec.partition not in latest:
                continue
            if rec.is_marker:
                marker[rec.partition] = rec.offset
            else:
                latest[rec.partition][rec.key] = rec
        for recs in latest.values():
            for rec in recs.values():
                if absorb_design(self.design, rec.design):
                    self._widen()
        out = {}
        for p in ps:
            st = GroupStats(self.design)
            recs = list(latest[p].values())
            if recs:
                rows = st.rows([r.key for r in recs])
                for r, rec in zip(rows, recs):
                    st.M[r] = relayout(rec.row, rec.design, self.design)
            out[p] = _Part(st, {r.key: r.events for r in recs}, marker[p])
        return out

    def _widen(self) -> None:
        for part in (*self.parts.values(), *self.cache.values()):
            if part.stats.k != self.design.k:
                part.stats.widen(self.design)

    # -- one batch -------------------------------------------------------------------------
    def _poll(self) -> Polled | None:
        got = self.consumer.poll(timeout_ms=500, max_records=self.cfg.max_poll_records)
        self._drain()
        msgs = []
        for tp, recs in got.items():
            part = self.parts.get(tp.partition)
            if part is None or tp.partition in self.pending:
                continue  # not restored yet: it is sought back to its offset on restore
            lo = part.offset if part.offset is not None else -1
            msgs.extend(m for m in recs if m.offset >= lo)
        return Polled.from_records(msgs) if msgs else None

    def step(self, polled: Polled) -> int:
        """Learn one poll and commit its state, markers and offsets in one transaction."""
        batch = self.decoder.decode(polled)
        if len(batch):
            self._keep_home(batch)
        batch.refuse_overflows(self.decoder.design)
        self._widen()  # a level first seen in this poll
        if batch.dead:
            self.n_dead += len(batch.dead)
            if self.dead is not None:
                self.dead.send(batch.dead)
            else:
                for d in batch.dead[:5]:
                    log_dead_letter(d)
        if len(batch):
            parts = batch.parts
            for p in distinct_partitions(parts):
                sel = np.flatnonzero((parts == p) & (batch.w > 0))
                if not sel.shape[0]:
                    continue
                part = self.parts[p]
                keys = [batch.keys[i] for i in sel]
                A, y, w = batch.A[sel], batch.y[sel], batch.w[sel]
                st = part.stats
                rows = st.rows(keys)
                st.add(rows, A, y, w, np.zeros(sel.shape[0]))
                ev = part.events
                for k in keys:
                    ev[k] = ev.get(k, 0) + 1
                part.changed.update(keys)
                self.n_events += sel.shape[0]
        last = polled.last_offsets()
        for p, off in last.items():
            self.parts[p].offset = off
        self._commit(last)
        return len(polled)

    def _keep_home(self, batch) -> None:
        """Within this worker, a group lives on one partition; a known group arriving on
        another of its partitions is a dead letter (as in the single-process engine)."""
        parts = batch.parts
        bad = np.zeros(len(batch), dtype=bool)
        homes: dict = {}
        for i, (k, p) in enumerate(zip(batch.keys, parts.tolist())):
            h = homes.get(k)
            if h is None:
                h = p
                if k not in self.parts[p].stats.index:
                    for q, part in self.parts.items():
                        if q != p and k in part.stats.index:
                            h = q
                            break
                homes[k] = h
            bad[i] = h != p
        if bad.any():
            keys = batch.keys
            home = [homes[k] for k in keys]
            batch.drop(
                bad,
                lambda i: (
                    f"group {keys[i]!r} lives on partition {home[i]} but arrived on "
                    f"partition {parts[i]}: producers must key by group"
                ),
            )

    def _commit(self, last: Mapping[int, int]) -> None:
        cfg, txn, st_topic = self.cfg, self.txn, self.cfg.state_topic
        dstate = self.design.to_state()
        try:
            for p in last:
                part = self.parts[p]
                st = part.stats
                for key in part.changed:
                    r = st.index[key]
                    k, v = encode_group(
                        key,
                        p,
                        st.M[r],
                        events=part.events[key],
                        offset=part.offset,
                        formula=cfg.formula,
                        method=cfg.method,
                        design=dstate,
                    )
                    txn.send_to(st_topic, k, v, p)
                if cfg.publish_topic and self.params is not None:
                    for key in part.changed:
                        value = json.dumps(self._effects(key, st), separators=(",", ":"))
                        txn.send_to(
                            cfg.publish_topic, key_to_json(key).encode(), value.encode(), None
                        )
                k, v = encode_marker(p, part.offset, cfg.formula, cfg.method, self.topic)
                txn.send_to(st_topic, k, v, p)
            offsets = {tp_name(self.topic, p): off for p, off in last.items()}
            txn.commit(offsets, self.topic, self.consumer.group_metadata())
        except Exception as e:  # noqa: BLE001 - fenced, rebalanced, broker away
            log.warning("transaction failed (%s): restoring owned partitions from state", e)
            self._reset()
            return
        for p in last:
            self.parts[p].changed.clear()
        self.n_commits += 1

    def _reset(self) -> None:
        """After a failed transaction: abort it and rebuild every owned partition from
        the state topic (what is committed is the truth)."""
        try:
            self.txn.producer.abort_transaction()
            self.txn.open = False
        except Exception as e:  # noqa: BLE001 - a fatal producer error: start a new one
            log.warning("abort failed (%s): new transactional producer", e)
            try:
                self.txn.producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass
            self.txn = self._transaction()
            if self.dead is not None:
                self.dead.txn = self.txn
        self.parts.clear()
        self.cache.clear()
        self.pending = {tp.partition for tp in self.consumer.assignment()}

    # -- global estimates ------------------------------------------------------------------
    def _follow_params(self) -> None:
        """Take the newest record of the fitter's params topic (``read_committed``)."""
        c = self.params_consumer
        if c is None:
            return
        if not c.assignment():
            parts = c.partitions_for_topic(self.params_topic)
            if not parts:
                return  # the fitter has not created it yet
            c.assign([self._TP(self.params_topic, q) for q in parts])
            c.seek_to_beginning()
        for msgs in c.poll(timeout_ms=0).values():
            for m in msgs:
                try:
                    rec = json.loads(m.value)
                    version = int(rec["version"])
                    theta = np.asarray(rec["theta"], dtype=float)
                    fixef = {
                        k: float("nan") if v is None else float(v) for k, v in rec["fixef"].items()
                    }
                    sigma = float(rec["sigma"])
                except (ValueError, KeyError, TypeError) as e:
                    log.error("params record at offset %d skipped: %s", m.offset, e)
                    continue
                if self.params is None or version >= self.params["version"]:
                    self.params = {
                        "version": version,
                        "theta": theta,
                        "fixef": fixef,
                        "sigma": sigma,
                    }

    def _global_beta(self) -> np.ndarray:
        """β in this worker's fixed-column order (NaN for a column the fitter dropped or
        has not seen yet)."""
        fixef = self.params["fixef"]
        return np.array([fixef.get(c, float("nan")) for c in self.design.fixed])

    def _effects(self, key, st: GroupStats) -> dict:
        """A group's effects record at the global estimates, from its own row."""
        from streamlmm.stream.statequery import group_blup  # (it imports this module)

        p = self.params
        b, cv = group_blup(
            st.M[st.index[key]],
            None,
            self.design,
            p["theta"],
            self._global_beta(),
            p["sigma"] ** 2,
        )
        return {
            "group": key,
            "ranef": dict(zip(self.design.random, b.tolist())),
            "cond_cov": cv.tolist(),
            "n": float(st.M[st.index[key], 0]),
            "params_version": p["version"],
        }

    def predict_one(self, x: Mapping[str, Any]) -> float:
        """``x'β + z'b_g`` at the fitter's global estimates, with ``b_g`` from this worker's
        own row of the group (the fixed part alone for a group it does not own).

        ``LookupError`` before the first params record; ``ValueError`` for bad input.
        """
        if self.params is None:
            raise LookupError("no global estimates yet: the fitter has not published any")
        d = self.design
        a = d.encode_one(x, np.empty(max(d.k, 1)), learn=False)
        key = x.get(self.model._formula.group)
        b = None
        for part in self.parts.values():
            if key in part.stats.index:
                b = list(self._effects(key, part.stats)["ranef"].values())
                break
        return linear_predictor(a, coefficients(d.k, d.xi, self._global_beta(), d.zi, b))

    # -- loop ------------------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> int:
        """Consume until SIGTERM/SIGINT; returns the exit code."""
        if install_signals:

            def handler(signum, frame):
                self.stop_requested = True

            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        t_prog, n_prog = time.monotonic(), 0
        try:
            while not self.stop_requested:
                self._drain()
                if self.pending:
                    self._restore()
                self._follow_params()
                polled = self._poll()
                if self.pending:
                    continue  # a rebalance came with this poll: restore first
                if polled is not None:
                    self.step(polled)
                now = time.monotonic()
                if self.cfg.progress_seconds and now - t_prog >= self.cfg.progress_seconds:
                    rate = (self.n_events - n_prog) / (now - t_prog)
                    sys.stderr.write(
                        f"[streamlmm worker] {rate:,.0f} ev/s | events {self.n_events:,} | "
                        f"partitions {sorted(self.parts)} | groups "
                        f"{sum(p.stats.n_groups for p in self.parts.values()):,} | "
                        f"commits {self.n_commits:,} | dead letters {self.n_dead:,}\n"
                    )
                    t_prog, n_prog = now, self.n_events
        finally:
            self.close()
        return 0

    def close(self) -> None:
        close_all(
            lambda: self.consumer.close(autocommit=False), self.txn.close, self.restorer.close
        )
