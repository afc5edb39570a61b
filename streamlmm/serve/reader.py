"""Follow the newest snapshot: one immutable :class:`Current` swapped by one reference.

A :class:`SnapshotHolder` keeps the snapshot that lookups answer from. Publishing a new
one builds a new :class:`Current` and replaces the holder's single attribute, so a
reader that took ``holder.current`` once sees one snapshot, whole, for as long as it
keeps it. :class:`SnapshotReader` is a holder that follows a snapshot directory (the
:class:`~streamlmm.store.LocalStore` layout) from a background thread.

"""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import re
import threading
import time
from typing import Any

import numpy as np

from streamlmm.snapshot import Snapshot, SnapshotError

__all__ = [
    "Current",
    "SnapshotHolder",
    "SnapshotReader",
    "StateReader",
    "newest_file",
    "version_of",
]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^snapshot-(\d{12})\.slmm$")


class Current:
    """One snapshot with its version and the per-snapshot tables the server derives.

    Parameters
    ----------
    snapshot
        The snapshot.
    version
        Monotonic version: the store's file sequence number (``snapshot-000000000012``
        is version 12), or the publisher's counter for in-memory snapshots.

    """

    __slots__ = (
        "snapshot",
        "version",
        "loaded_at",
        "_orders",
        "_lock",
        "info",
        "index",
        "re_names",
        "b",
        "prior",
    )

    def __init__(self, snapshot: Snapshot, version: int):
        self.snapshot = snapshot
        self.index = snapshot._index
        self.re_names = snapshot.re_names
        self.b = snapshot.b
        self.prior = np.diagonal(snapshot.re_cov).tolist()
        self.version = int(version)
        self.loaded_at = time.time()
        self._orders: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        created = snapshot.meta.get("created")
        self.info: dict[str, Any] = {
            "version": self.version,
            "created_at": _iso(created) if isinstance(created, (int, float)) else None,
            "n_obs": snapshot.n_obs,
            "n_events": snapshot.n_events,
            "n_groups": snapshot.n_groups,
        }

    @property
    def created(self) -> float:
        """The snapshot's creation time (unix seconds), or its load time if unknown."""
        c = self.snapshot.meta.get("created")
        return float(c) if isinstance(c, (int, float)) else self.loaded_at

    def shrinkage_all(self) -> np.ndarray:
        """Every group's shrinkage factors, ``(G, q)``: ``1 − condVar_ii / re_cov_ii``."""
        s = self.snapshot
        prior = np.diagonal(s.re_cov)
        cv = np.diagonal(s.condvar, axis1=1, axis2=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(prior > 0, 1.0 - cv / prior, 0.0)

    def cached_order(self, by: str) -> np.ndarray | None:
        """:meth:`order` if it was computed already, else ``None``."""
        return self._orders.get(by)

    def order(self, by: str) -> np.ndarray:
        """Row indices ranked for ``top`` browsing (computed once per snapshot).

        ``abs``: largest ``max_j |b_gj|`` first. ``n``: largest Σw first.
        ``shrinkage``: most shrunk first, i.e. smallest ``min_j`` shrinkage factor.
        Ties keep row (arrival) order; NaN ranks last.
        """
        with self._lock:
            o = self._orders.get(by)
            if o is None:
                s = self.snapshot
                if by == "abs":
                    score = -np.abs(s.b).max(axis=1) if s.b.shape[1] else np.zeros(s.n_groups)
                elif by == "n":
                    score = -s.group_n
                elif by == "shrinkage":
                    f = self.shrinkage_all()
                    score = f.min(axis=1) if f.shape[1] else np.zeros(s.n_groups)
                else:
                    raise ValueError(f"unknown ranking {by!r}")
                score = np.where(np.isnan(score), np.inf, score)
                o = np.argsort(score, kind="stable")
                o.setflags(write=False)
                self._orders[by] = o
            return o


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()


class SnapshotHolder:
    """The current snapshot, replaced atomically by :meth:`publish`.

    Examples
    --------
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(30):
    ...     m.learn_one({"g": i % 3, "x": float(i)}, float(i % 5))
    >>> h = SnapshotHolder()
    >>> h.current is None
    True
    >>> h.publish(m.snapshot()).version, h.publish(m.snapshot()).version
    (1, 2)
    >>> h.ranef(0) == h.current.snapshot.ranef(0)
    True

    """

    def __init__(self) -> None:
        self.current: Current | None = None
        self._publish_lock = threading.Lock()

    def publish(self, snapshot: Snapshot, version: int | None = None) -> Current:
        """Make ``snapshot`` the current one (one reference assignment)."""
        with self._publish_lock:
            if version is None:
                version = (self.current.version + 1) if self.current is not None else 1
            cur = Current(snapshot, version)
            self.current = cur
            return cur

    @property
    def snapshot(self) -> Snapshot | None:
        """The current snapshot (``None`` before the first)."""
        cur = self.current
        return cur.snapshot if cur is not None else None

    def _snap(self) -> Snapshot:
        cur = self.current
        if cur is None:
            raise LookupError("no snapshot loaded yet")
        return cur.snapshot

    def ranef(self, key, *, fallback: str | None = None) -> dict[str, float]:
        """:meth:`Snapshot.ranef` on the current snapshot (same values, a faster path for
        a known ``int``/``str`` key); an unseen group is a ``KeyError`` unless
        ``fallback="population"``."""
        cur = self.current
        if cur is None:
            raise LookupError("no snapshot loaded yet")
        r = cur.index.get(key) if type(key) is int or type(key) is str else None
        if r is None:
            return cur.snapshot.ranef(key, fallback=fallback)
        return dict(zip(cur.re_names, cur.b[r].tolist()))

    def ranef_cov(self, key, *, fallback: str | None = None) -> np.ndarray:
        """:meth:`Snapshot.ranef_cov` on the current snapshot."""
        return self._snap().ranef_cov(key, fallback=fallback)

    def n(self, key, *, fallback: str | None = None) -> float:
        """:meth:`Snapshot.n` on the current snapshot."""
        return self._snap().n(key, fallback=fallback)

    def shrinkage(self, key, *, fallback: str | None = None) -> dict[str, float]:
        """:meth:`Snapshot.shrinkage` on the current snapshot."""
        return self._snap().shrinkage(key, fallback=fallback)

    def predict(self, x) -> float:
        """:meth:`Snapshot.predict` on the current snapshot."""
        return self._snap().predict(x)


def version_of(path: str | os.PathLike) -> int | None:
    """The version (sequence number) of a store file, ``None`` for another name.

    >>> version_of("/d/snapshot-000000000012.slmm"), version_of("x.slmm")
    (12, None)

    """
    m = _NAME.match(pathlib.Path(path).name)
    return int(m.group(1)) if m else None


def newest_file(directory: str | os.PathLike) -> tuple[int, pathlib.Path] | None:
    """The store's newest snapshot file name and its sequence number (no reading)."""
    best = None
    try:
        with os.scandir(directory) as it:
            for e in it:
                m = _NAME.match(e.name)
                if m and (best is None or int(m.group(1)) > best[0]):
                    best = (int(m.group(1)), pathlib.Path(e.path))
    except FileNotFoundError:
        return None
    return best


class SnapshotReader(SnapshotHolder):
    """In-process lookups on the newest valid snapshot in a directory.

    A daemon thread lists the directory every ``interval`` seconds (names only) and
    loads a newer file when one appears, then swaps it in with one assignment; lookups
    never wait for a load. A newer file that does not verify is skipped (and retried
    only when a yet newer one appears), and the older snapshot keeps answering.

    Parameters
    ----------
    directory
        A snapshot directory written by the engine (``LocalStore``).
    interval
        Seconds between directory checks.
    follow
        Start the background thread; with ``False`` call :meth:`refresh` yourself.
    freeze_gc
        ``gc.freeze()`` after each load (a server process): the collector then never
        walks the imported modules and the snapshot again. A full collection over
        them takes ≈ 50 ms, which otherwise shows up as the p99 of a busy server.

    Examples
    --------
    >>> import tempfile
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(30):
    ...     m.learn_one({"g": i % 3, "x": float(i)}, float(i % 5))
    >>> d = tempfile.mkdtemp()
    >>> path = m.snapshot().save(d)
    >>> with SnapshotReader(d) as r:
    ...     r.current.version, r.ranef(1) == m.snapshot().ranef(1)
    (1, True)

    """

    def __init__(
        self, directory, interval: float = 0.5, follow: bool = True, freeze_gc: bool = False
    ):
        super().__init__()
        self.freeze_gc = freeze_gc
        self.directory = pathlib.Path(directory)
        self.interval = float(interval)
        self._tried: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()
        if follow:
            self._thread = threading.Thread(
                target=self._follow, name="snapshot-reader", daemon=True
            )
            self._thread.start()

    def refresh(self) -> bool:
        """Load the newest snapshot if it is newer than the current one; True if swapped."""
        newest = newest_file(self.directory)
        if newest is None or newest[0] == self._tried:
            return False
        cur = self.current
        if cur is not None and newest[0] <= cur.version:
            return False
        self._tried = newest[0]
        for seq, path in self._candidates(newest[0], cur):
            try:
                snap = Snapshot.from_bytes(path.read_bytes())
            except (OSError, SnapshotError) as e:
                log.warning("skipping snapshot %s: %s", path.name, e)
                continue
            self.publish(snap, seq)
            if self.freeze_gc:
                gc.freeze()
            return True
        return False

    def _candidates(self, newest: int, cur: Current | None):
        """Files from the newest down to (not including) the current version."""
        floor = cur.version if cur is not None else -1
        out = []
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    m = _NAME.match(e.name)
                    if m and floor < int(m.group(1)) <= newest:
                        out.append((int(m.group(1)), pathlib.Path(e.path)))
        except FileNotFoundError:
            return []
        return sorted(out, reverse=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception as e:  # never let the follower die
                log.warning("snapshot refresh failed: %s", e)

    def close(self) -> None:
        """Stop following the directory."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StateReader(SnapshotHolder):
    """A holder that follows a scale-out model's state and params topics.

    A :class:`~streamlmm.stream.statequery.StateView` reads both topics
    (``read_committed``); every ``interval`` seconds, when either moved, the whole model
    is rebuilt from them (every group's BLUP from its state row at the fitter's
    parameters) and swapped in as one snapshot, versioned by the params record.
    """

    def __init__(
        self,
        state_topic: str,
        params_topic: str,
        bootstrap: str | None = None,
        client_config=None,
        interval: float = 1.0,
    ):
        from streamlmm.stream.statequery import StateView

        super().__init__()
        self.view = StateView(state_topic, params_topic, bootstrap, client_config)
        self.interval = interval
        self._seen: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="streamlmm-state", daemon=True)
        self._thread.start()

    def refresh(self) -> bool:
        """Rebuild from the topics if they moved; True if a new snapshot went live."""
        seen = self.view.changes()
        if seen == self._seen or seen[0] < 0:
            return False
        snap = self.view.to_snapshot()
        self.publish(snap, seen[0])
        self._seen = seen
        return True

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving the last good snapshot
                log.warning("state refresh failed: %s", e)
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        self.view.close()
