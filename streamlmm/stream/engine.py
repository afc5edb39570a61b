"""The engine: consume → validate → update → refresh → snapshot → commit.

It is a loop around :class:`~streamlmm.model.MixedLM`; the statistics, estimates and
snapshots are the model's own.

Exactly once
------------
- **State.** Every snapshot records the offsets its statistics include; a restart
  resumes from the newest valid snapshot at its offsets. A JSON-lines source is also
  checked to be the one the snapshot consumed (``stream/sources.py``).
- **Exact at the end.** ``--until-end``, SIGTERM/SIGINT and every final checkpoint run
  a full REML/ML fit before the last snapshot, so it equals the in-memory fit of the
  same events however often the engine was killed on the way.
- **Dead letters and effects on Kafka.** They are sent by one transactional producer,
  in the transaction that also commits the consumed offsets to the consumer group. A
  checkpoint builds the snapshot, sends the effects, commits the transaction with the
  snapshot's offsets, and then writes the snapshot. A crash before the commit aborts
  the transaction: the restart re-reads from the previous snapshot and sends those
  records again. A crash between the commit and the snapshot leaves the group's
  committed offsets ahead of the snapshot: the restart re-reads that range for the
  statistics but does not send its dead letters again (they are committed), and
  publishes effects again only once past it. The snapshot also records the offsets
  committed with it, in case the group's offsets are lost.
- **Dead letters in a file.** The file's length is in every snapshot; a restart
  truncates the file back to it, and a start from nothing (no valid snapshot) empties
  it, so that the file always holds exactly the dead letters of the events before the
  offsets the engine resumes from, even after a crash before the first checkpoint.
- **Partitions.** Producers key messages by group, so every group lives on one
  partition. The engine keeps the map group → home partition (in the snapshot's
  ``meta["home"]`` as ``[key, partition]`` pairs); an event of a known group arriving on
  another partition is a dead letter, never a silent merge across partitions.

"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any

import numpy as np

from streamlmm import compiling
from streamlmm.checks import FitWarning
from streamlmm.model import MixedLM
from streamlmm.serve.reader import version_of
from streamlmm.snapshot import Snapshot
from streamlmm.store import LocalStore
from streamlmm.stream.decode import MAX_MESSAGE_BYTES, Batch, Decoder, Polled
from streamlmm.stream.sinks import DeadLetterSink, EffectsPublisher, Transaction, close_all
from streamlmm.stream.sources import Source, _KafkaBase, open_source, tp_name

__all__ = ["EngineConfig", "Engine", "DeadLettersOnly", "parse_levels"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineConfig:
    """Everything ``streamlmm run`` takes; see ``streamlmm run --help``.

    ``em_every`` and ``refit_every`` are ``None`` by default: the model's own schedule
    (:class:`~streamlmm.model.MixedLM`) applies, so each default lives in one place.
    """

    source: str
    formula: str
    snapshot_dir: str
    method: str = "REML"
    consumer_group: str = "streamlmm"
    partitions: str | None = None
    # a snapshot every 1M events or 10 s, whichever comes first: at full speed 1M events
    # are about a second of work, which is all a crash can make the restart replay, and
    # a checkpoint (refit, write, fsync, commit: about 10 ms) stays about 1% of it
    snapshot_every_events: int = 1_000_000
    snapshot_every_seconds: float = 10.0
    dead_letter: str | None = None
    publish_topic: str | None = None
    until_end: bool = False
    new_source: bool = False
    half_life: float | None = None
    time_key: str | None = None
    missing: str = "raise"
    levels: str | None = None  # JSON: {"field": ["reference", "level", ...]}
    em_every: int | None = None
    refit_every: int | None = None
    # exit 2 when the first this many events a run reads are all dead letters (or
    # skipped): a misconfiguration (a misspelled --time-key, a formula naming fields the
    # events do not have) rather than bad data; 0 never stops
    stop_after_dead_letters: int = 1_000
    max_poll_records: int = 5_000
    max_message_bytes: int = MAX_MESSAGE_BYTES
    progress_seconds: float = 2.0
    keep_snapshots: int = 3
    kafka_client: str = "auto"
    serve: int | None = None
    serve_host: str = "127.0.0.1"
    kafka: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_levels(text: str | None) -> dict[str, list[str]] | None:
    """``--levels``: a JSON object of factor levels, reference first.

    >>> parse_levels('{"severity": ["mild", "moderate", "severe"]}')
    {'severity': ['mild', 'moderate', 'severe']}
    >>> parse_levels('["mild"]')
    Traceback (most recent call last):
    ...
    ValueError: --levels must be a JSON object of lists of strings, e.g. {"f": ["a", "b"]}

    """
    if not text:
        return None
    try:
        levels = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--levels is not valid JSON: {e}") from None
    if not isinstance(levels, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in levels.values()
    ):
        raise ValueError(
            '--levels must be a JSON object of lists of strings, e.g. {"f": ["a", "b"]}'
        )
    return levels


class DeadLettersOnly(ValueError):
    """Every event a run read was a dead letter (a user error: exit 2, no snapshot)."""


class _Probation:
    """Until a run learns its first event: how many it read, and why none was learned.

    A stream whose first events are all dead letters (or skipped) is almost always a
    misconfiguration: ``--half-life`` without a ``ts`` field, a misspelled
    ``--time-key``, a formula naming fields the events do not have. The engine stops
    (exit 2) with the commonest reason instead of writing every event to the dead
    letters and a snapshot that says it consumed them, which would make a rerun with
    the right settings skip them.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.passed = self.limit <= 0
        self.dead = 0
        self.skipped = 0
        self.reasons: collections.Counter[str] = collections.Counter()

    def observe(self, learned: int, dead: list, skipped: int) -> None:
        """One poll's outcome; raises :class:`DeadLettersOnly` at the limit."""
        if self.passed:
            return
        if learned:
            self.passed = True
            return
        self.dead += len(dead)
        self.skipped += skipped
        self.reasons.update(d.reason for d in dead)
        if self.dead + self.skipped >= self.limit:
            raise DeadLettersOnly(self.message(first=True))

    @property
    def pending(self) -> bool:
        """Events read, none learned yet (checkpoints wait: they would skip them)."""
        return not self.passed and self.dead + self.skipped > 0

    def message(self, first: bool) -> str:
        parts = []
        if self.reasons:
            (reason, n), *others = self.reasons.most_common()
            parts.append(f"{n:,} dead letters: {reason}")
            if others:
                more = sum(c for _, c in others)
                parts.append(f"{more:,} more for {len(others):,} other reasons")
        if self.skipped:
            parts.append(f"{self.skipped:,} skipped for a missing field (--missing skip)")
        what = "dead letters" if not self.skipped else "dead letters or skipped"
        if not self.dead:
            what = "skipped"
        n = self.dead + self.skipped
        which = f"the first {n:,} events read were all" if first else f"all {n:,} events read were"
        return (
            f"{which} {what}, none learned ({'; '.join(parts)}): "
            "check --formula, --time-key, --half-life and the events' fields; none of them "
            "is in a snapshot, so a rerun with the right settings reads them again "
            "(--stop-after-dead-letters 0 never stops)"
        )


@contextlib.contextmanager
def _young_objects_die_young(poll_records: int) -> Iterator[None]:
    """Collect the youngest generation only after several polls' worth of objects.

    A poll allocates a message object per record, and they all die with the poll. At
    Python's default threshold (700) a collection runs several times within each poll,
    promotes the live messages, and every so often a full collection walks the whole
    heap (about 0.1 s in a large process): more time than the engine's own work. With
    the threshold above a poll's allocations, collections almost never run in the loop.
    The previous thresholds are restored on exit.
    """
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], 4 * poll_records), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


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
        # a numba compile (a cache that lacks a kernel) is said in the progress output too
        self._unhook = compiling.on_compile(_say_compile)
        self.store = LocalStore(config.snapshot_dir, keep=config.keep_snapshots, create=True)
        # one engine per directory, until this process ends (readers need no lock)
        self.lock = self.store.lock("streamlmm run")
        self.source = source
        self.txn: Transaction | None = None
        self.dead: DeadLetterSink | None = None
        self.server = None  # the HTTP query server of --serve, started by run()
        try:
            restored = self.store.latest()
            self.model, offsets, self.meta = self._restore(restored)
            # the model's own reader: factor levels learned while decoding are the model's
            self.decoder = Decoder(self.model._reader, max_bytes=config.max_message_bytes)
            self.source = source or open_source(
                config.source,
                config.consumer_group,
                config.kafka,
                partitions=config.partitions,
                client=config.kafka_client,
            )
            self._open_sinks(restored)
            self.offsets = self.source.resume(
                offsets, self.meta.get("source_identity"), config.new_source
            )
            self._resumed_at = dict(self.offsets)
            self.floor = self._sink_floor() if self.txn is not None else {}
        except BaseException:
            self._close()
            raise
        self.home: dict = {}
        if not config.new_source:
            self.home = {k: int(p) for k, p in self.meta.get("home", ())}
        self.check_home = isinstance(self.source, _KafkaBase)
        self._homes = np.empty(0, np.int64)  # self.home by the decoder's key codes
        self.stop_requested = False
        self.last_snapshot: Snapshot | None = None
        self._final_at: int | None = None
        self.skipped0 = int(self.meta.get("skipped", 0))
        self.probation = _Probation(config.stop_after_dead_letters)
        self._skipped_seen = 0

    # -- state --------------------------------------------------------------------------
    def _restore(self, snap: Snapshot | None) -> tuple[MixedLM, dict[str, int], dict[str, Any]]:
        cfg = self.cfg
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
        schedule = {
            k: v
            for k, v in (("em_every", cfg.em_every), ("refit_every", cfg.refit_every))
            if v is not None
        }
        model = MixedLM(
            cfg.formula,
            cfg.method,
            half_life=cfg.half_life,
            time_key=cfg.time_key,
            missing=cfg.missing,
            levels=parse_levels(cfg.levels),
            **schedule,
        )
        return model, {}, {}

    def _open_sinks(self, restored: Snapshot | None) -> None:
        cfg, src = self.cfg, self.source
        dead_topic = bool(cfg.dead_letter) and not cfg.dead_letter.startswith("jsonl:")
        kafka = isinstance(src, _KafkaBase)
        if cfg.publish_topic and not kafka:
            raise ValueError("--publish-topic needs a kafka:// source")
        bootstrap = cfg.source[len("kafka://") :].partition("/")[0] if kafka else None
        if kafka and (dead_topic or cfg.publish_topic):
            tid = f"streamlmm:{cfg.consumer_group}:{src.spec()}"
            self.txn = Transaction(bootstrap, tid, cfg.kafka)
        self.dead = DeadLetterSink(cfg.dead_letter, self.txn)
        self.dead.count = int(self.meta.get("dead_letters", 0))
        if self.dead.is_file:
            # the file holds exactly the dead letters of the events the restored snapshot
            # holds: none when the engine starts from nothing (no valid snapshot, every
            # one corrupt, or --new-source on a snapshot without a file), whatever a
            # crashed run wrote after its last snapshot
            length = self.meta.get("dead_letter_bytes")
            if length is not None:
                self.dead.truncate(int(length))
            elif not self.model.n_events:
                self.dead.truncate(0, why=f"no snapshot in {cfg.snapshot_dir} holds any event")
            else:
                log.warning(
                    "the snapshot records no dead-letter file (its run had none): dead letters "
                    "of the events it holds are not in %s; new ones are appended",
                    self.dead.spec,
                )
        self.publisher = None
        if cfg.publish_topic:
            self.publisher = EffectsPublisher(cfg.publish_topic, self.txn, bootstrap, cfg.kafka)

    def _sink_floor(self) -> dict[str, int]:
        """Per partition, the offset below which dead letters and effects are already
        committed to Kafka (a crash came between a commit and its snapshot)."""
        if self.cfg.new_source:
            return {}
        committed: dict[str, int | None] = {}
        for attempt in range(30):
            try:
                committed = self.source.committed()
                break
            except Exception as e:  # noqa: BLE001 - broker not ready yet
                log.warning("reading committed offsets failed (%s); retrying", e)
                time.sleep(min(1.0, 0.1 * 2**attempt))
        else:
            raise RuntimeError("could not read the consumer group's committed offsets")
        recorded = dict(self.meta.get("committed", {}))
        floor = {}
        for name in set(committed) | set(recorded):
            f = max(int(committed.get(name) or 0), int(recorded.get(name) or 0))
            if f > self.offsets.get(name, 0):
                floor[name] = f
        if floor:
            log.info(
                "committed offsets %s are ahead of the snapshot's %s: re-reading that range "
                "for the statistics only",
                floor,
                {k: self.offsets.get(k, 0) for k in floor},
            )
        return floor

    def _past_floor(self) -> bool:
        return all(self.offsets.get(k, 0) >= f for k, f in self.floor.items())

    def checkpoint(self, final: bool = False) -> Snapshot:
        """Snapshot durably with the sinks' records; ``final`` refits to the optimum first."""
        empty = self.model.n_events == 0  # e.g. every event so far a dead letter
        if final and not empty:
            t0 = time.perf_counter()
            self.model.fit()
            log.info("final fit in %.2fs", time.perf_counter() - t0)
        self.dead.flush()
        commit = dict(self.offsets)
        for k, f in self.floor.items():
            commit[k] = max(commit.get(k, 0), f)
        meta: dict[str, Any] = {
            "source": self.cfg.source,
            "dead_letters": self.dead.count,
            "skipped": self.decoder.n_skipped + self.skipped0,
            "source_identity": self.source.identity(),
            "final": final,
        }
        if self.dead.is_file:
            meta["dead_letter_bytes"] = self.dead.position()
        if self.check_home:
            meta["home"] = [[k, p] for k, p in self.home.items()]
        if self.txn is not None:
            meta["committed"] = commit
        with warnings.catch_warnings():
            if empty:  # a snapshot of offsets only: "0 levels" says nothing new
                warnings.simplefilter("ignore", FitWarning)
            snap = self.model.snapshot(offsets=self.offsets, **meta)
        if self.txn is not None:
            published = False
            if self.publisher is not None and self._past_floor():
                self.publisher.publish(snap)
                published = True
            self.txn.commit(commit, self.source.topic, self.source.group_id)
            if published:
                self.publisher.last = snap
            path = self.store.write(snap)
        else:
            path = self.store.write(snap)
            try:
                self.source.commit(self.offsets)
            except Exception as e:  # the snapshot, not Kafka, is the source of truth
                log.warning("offset commit failed (will retry at the next snapshot): %s", e)
        self.floor = {k: f for k, f in self.floor.items() if self.offsets.get(k, 0) < f}
        if self.server is not None:  # answer HTTP queries from this snapshot from now on
            self.server.publish(snap, version_of(path))
        self.last_snapshot = snap
        self._final_at = self.model.n_events if final else None
        return snap

    # -- loop ---------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def handler(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _keep_groups_home(self, batch: Batch) -> None:
        """An event of a known group arriving on another partition is a dead letter; a
        new group's home is the partition of its first (weighted) event."""
        if not len(batch):
            return
        parts, codes, uniques = batch.parts, batch.codes, batch.uniques
        homes = self._code_homes(uniques)
        h = homes[codes]
        new = h < 0
        if new.any():
            h[new] = self._settle_new_groups(batch, new, homes)
        away = h != parts
        if away.any():
            batch.drop(
                away,
                lambda i: (
                    f"group {uniques[codes[i]]!r} lives on partition {h[i]} but arrived "
                    f"on partition {parts[i]}: producers must key by group"
                ),
            )

    def _code_homes(self, uniques: list) -> np.ndarray:
        """The home partition of each code of the decoder's keys (-1: none yet), kept
        in step with :attr:`home` as the key table grows."""
        homes = self._homes
        if homes.shape[0] < len(uniques):
            have = homes.shape[0]
            grown = np.full(max(len(uniques), 2 * have), -1, np.int64)
            grown[:have] = homes
            grown[have : len(uniques)] = np.fromiter(
                map(self.home.get, uniques[have:], repeat(-1)), np.int64, len(uniques) - have
            )
            self._homes = homes = grown
        return homes

    def _settle_new_groups(self, batch: Batch, new: np.ndarray, homes: np.ndarray) -> np.ndarray:
        """Homes of this poll's new groups (at their first weighted event, in poll
        order); the partition each of the events ``new`` is held to: its group's home
        from that event on, its own before."""
        parts, codes = batch.parts, batch.codes
        weighted = np.flatnonzero(new & (batch.w > 0))
        seen, at = np.unique(codes[weighted], return_index=True)
        firsts = weighted[at]
        for c, i in sorted(zip(seen.tolist(), firsts.tolist()), key=lambda ci: ci[1]):
            self.home[batch.uniques[c]] = int(parts[i])
        homes[seen] = parts[firsts]
        since = np.full(homes.shape[0], len(batch))
        since[seen] = firsts
        ev = np.flatnonzero(new)
        c = codes[ev]
        return np.where(ev >= since[c], homes[c], parts[ev])

    def _caught_up(self, targets: Mapping[str, int], pending: Polled | None = None) -> bool:
        """Whether the events learned, and the poll ``pending`` once learned, reach the
        end (``targets``; a file's end)."""
        if hasattr(self.source, "exhausted"):  # a file: its end is where reading stops
            return self.source.exhausted
        offsets = self.offsets
        if pending is not None:
            offsets = self._advance(dict(offsets), pending)
        return all(offsets.get(tp, 0) >= end for tp, end in targets.items())

    def _advance(self, offsets: dict[str, int], polled: Polled) -> dict[str, int]:
        """``offsets`` moved past the poll ``polled`` (never back), in place: past its
        messages, and to the consumer's position after it, which also passes the
        transaction markers that follow them (a transactional topic's last offset is a
        marker, never delivered: without it ``--until-end`` would never reach the end)."""
        topic = self.source.topic
        for ends in (polled.last_offsets(), polled.positions or {}):
            for p, off in ends.items():
                name = tp_name(topic, p)
                if off > offsets.get(name, 0):
                    offsets[name] = off
        return offsets

    def _poll(self):
        try:
            return self.source.poll(self.cfg.max_poll_records, 0.5)
        except Exception as e:  # noqa: BLE001 - broker gone: back off and carry on
            log.warning("poll failed (%s); retrying", e)
            time.sleep(1.0)
            return None

    def _retry(self, what: str, fn, max_backoff_s: float = 10.0):
        delay = 0.5
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001
                log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
                time.sleep(delay)
                delay = min(2 * delay, max_backoff_s)

    def step(self, polled) -> int:
        """Learn one poll: decode, keep groups home, dead letters, statistics, offsets."""
        return self._learn(polled, self.decoder.decode(polled))

    def _learn(self, polled, batch: Batch) -> int:
        """Learn a decoded poll (:meth:`step` after the decode)."""
        if self.check_home:
            self._keep_groups_home(batch)
        batch.refuse_overflows(self.decoder.design)
        skipped = self.decoder.n_skipped - self._skipped_seen
        self._skipped_seen = self.decoder.n_skipped
        self.probation.observe(len(batch), batch.dead, skipped)
        if batch.dead:
            dead = batch.dead
            if self.floor:  # already committed before a crash: count, don't send again
                topic = self.source.topic
                fl = self.floor
                send = [
                    d
                    for d in dead
                    if d.record.offset >= fl.get(tp_name(topic, d.record.partition), 0)
                ]
                self.dead.count += len(dead) - len(send)
                dead = send
            self.dead.send(dead)
        if len(batch):
            self.model.learn_coded(batch.uniques, batch.codes, batch.A, batch.y, batch.w, batch.t)
        self._advance(self.offsets, polled)
        return len(polled)

    def run(self, install_signals: bool = True) -> int:
        """Consume until stopped (SIGTERM/SIGINT) or caught up; returns an exit code.

        The last snapshot is always taken after a full refit (``final``).
        """
        cfg = self.cfg
        if install_signals:
            self._install_signals()
        if cfg.serve is not None:
            from streamlmm.serve.server import start_server

            self.server = start_server(cfg.serve_host, cfg.serve)
        try:
            with _young_objects_die_young(cfg.max_poll_records):
                self._loop()
        finally:
            self._close()
        return 0

    def _loop(self) -> None:
        """Poll, learn and checkpoint until stopped or caught up; then the final one.

        Each poll is decoded on a second thread while the next one is consumed: the
        decoder's numba scan and the librdkafka fetcher's copy both release the GIL.
        Everything else (learning, offsets, checkpoints) stays on this thread, between
        decodes, so that the model, the decoder and the offsets are never touched by
        both threads at once. A checkpoint first learns the poll in flight, so that
        what the snapshot records as consumed (offsets, a file's identity) is exactly
        what it has learned; a poll taken but not learned when the process dies is
        read again by the next run.
        """
        cfg = self.cfg
        targets: dict[str, int] = {}
        if cfg.until_end:
            self._retry("read end offsets", lambda: targets.update(self.source.end_offsets()))
        since_events, since_t = 0, time.monotonic()
        progress_t, progress_n = since_t, self.model.n_events
        decoding = None  # (poll, its decode in flight)
        with ThreadPoolExecutor(1, thread_name_prefix="streamlmm-decode") as pool:
            while True:
                polled = None
                if not self.stop_requested and not (
                    cfg.until_end and decoding and self._caught_up(targets, decoding[0])
                ):
                    polled = self._poll()
                if decoding is not None:
                    since_events += self._learn(decoding[0], decoding[1].result())
                    decoding = None
                if polled is not None and len(polled):
                    decoding = (polled, pool.submit(self.decoder.decode, polled))
                elif polled is not None:  # nothing in flight: past markers, if any
                    self._advance(self.offsets, polled)
                polled = None  # the poll's records die with its batch
                now = time.monotonic()
                taken = since_events + (len(decoding[0]) if decoding else 0)
                every_s = cfg.snapshot_every_seconds
                due = taken and (taken >= cfg.snapshot_every_events or now - since_t >= every_s)
                if due and cfg.until_end:  # the final checkpoint follows at the end
                    due = not self._caught_up(targets, decoding[0] if decoding else None)
                if due:
                    if decoding is not None:  # what the snapshot records as read, it holds
                        self._learn(decoding[0], decoding[1].result())
                        decoding = None
                    if not self.probation.pending:  # else it would skip unlearned events
                        self.checkpoint()
                        since_events, since_t = 0, time.monotonic()
                if cfg.progress_seconds and now - progress_t >= cfg.progress_seconds:
                    self._progress(now - progress_t, self.model.n_events - progress_n)
                    progress_t, progress_n = now, self.model.n_events
                if decoding is None and (
                    self.stop_requested or (cfg.until_end and self._caught_up(targets))
                ):
                    break
        if self.probation.pending and not self.model.n_events:
            raise DeadLettersOnly(self.probation.message(first=False))
        if not self.model.n_events and self.offsets == self._resumed_at and not self.dead.count:
            log.info("no events in %s: no snapshot written", self.cfg.source)
            return
        if self._final_at != self.model.n_events or since_events:
            self.checkpoint(final=True)

    def _close(self) -> None:
        self._unhook()
        close_all(
            *(
                w.close
                for w in (self.source, self.dead, self.txn, self.server, self.lock)
                if w is not None
            )
        )

    def _n_groups(self) -> int:
        """The groups in the statistics (the progress line's count, refit or not)."""
        return self.model.n_groups

    def _progress(self, dt: float, dn: int) -> None:
        """One progress line on stderr."""
        lag = self.source.lag(self.offsets)
        refit = self.model.last_refit
        sys.stderr.write(
            f"[streamlmm] {dn / dt if dt else 0:,.0f} ev/s | events {self.model.n_events:,} | "
            + (f"lag {lag} | " if lag is not None else "")
            + f"groups {self._n_groups():,} | "
            f"last refit @{refit.get('n_events', '-')} ({refit.get('seconds', 0):.2f}s) | "
            f"dead letters {self.dead.count:,}\n"
        )


def _say_compile(line: str) -> None:
    """A compile, in the progress output's format (:mod:`streamlmm.compiling`)."""
    sys.stderr.write(f"[streamlmm] {line}\n")
