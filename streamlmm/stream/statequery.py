"""Group lookups for the whole scale-out model, from the state and params topics.

:class:`StateView` follows the compacted state topic (every group's latest statistics
row, written by the workers) and the params topic (θ, β, σ² and the design, published by
the fitter) in a background thread, both ``read_committed``. A lookup computes the
group's BLUP and conditional covariance from its own row and the current parameters in
O(q³) (docs/math.md §4), so any machine can answer for every group without the fitter's
snapshot. The lookups mirror :class:`~streamlmm.snapshot.Snapshot`'s (``ranef``,
``ranef_cov``, ``n``, and the model-level fields), for the HTTP service to serve.

The BLUP is the core's (``kernels.blups``, one group's ``kernels.group_effect``) in the
user's coordinates: from a square root of the group's means and co-moments around 0,
``u`` minimising ``‖r_g − Z_gΛu‖² + ‖u‖²``, ``b = Λu`` and
``Var(b | y) = σ² Λ (L L')⁻¹ Λ'`` (docs/math.md §4).

"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm import kernels
from streamlmm.design import Design
from streamlmm.estimate import theta_index
from streamlmm.keys import check_fallback, check_key, unknown_group
from streamlmm.snapshot import Snapshot
from streamlmm.stats import GroupStats
from streamlmm.stream.broker import wait_for_broker
from streamlmm.stream.state import decode_record, relayout
from streamlmm.stream.worker import parse_kafka_spec

__all__ = ["StateView", "group_blup"]

log = logging.getLogger(__name__)


def group_blup(
    row: np.ndarray,
    written: Mapping[str, Any] | None,
    design: Design,
    theta: np.ndarray,
    beta: np.ndarray,
    sigma2: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(b, condvar)`` of one group from its statistics row (written under the design
    state ``written``, ``None``: ``design`` itself; re-laid here for ``design``) at θ, β
    (``design.fixed`` order; NaN = dropped)
    and σ².

    Examples
    --------
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 + x | g)")
    >>> for i in range(300):
    ...     m.learn_one({"g": i % 6, "x": float(i % 7)}, (i % 6) * (1 + 0.1 * (i % 7)) + (i % 5))
    >>> s = m.fit().snapshot()
    >>> d = m._design
    >>> b, v = group_blup(m._stats.M[2], None, d, s.theta,
    ...                   np.array([s.fixef[c] for c in d.fixed]), s.sigma ** 2)
    >>> bool(np.allclose(b, s.b[2], atol=1e-8) and np.allclose(v, s.condvar[2], atol=1e-8))
    True

    """
    M = relayout(row, written, design)
    st = GroupStats(design)  # the core's layout and kernels, one row
    zi, xi = np.asarray(design.zi), np.asarray(design.xi)
    kept = np.isfinite(beta)  # a dropped (aliased) column contributes nothing
    q = zi.shape[0]
    lam = np.zeros((q, q))
    lam[theta_index(design.blocks, q)] = theta
    B, K = kernels.blups(
        M[None, :],
        1,
        st.vpos,
        np.zeros(st.k + 1),
        zi,
        xi[kept],
        st.k,
        st.P,
        lam,
        np.asarray(beta, dtype=float)[kept],
    )
    return B[0], sigma2 * K[0]


class StateView:
    """The whole model's group lookups from the state and params topics (see above).

    Parameters
    ----------
    state_topic, params_topic
        ``kafka://HOST:PORT/NAME`` or ``NAME`` with ``bootstrap``.
    bootstrap
        ``HOST:PORT`` for bare topic names.
    client_config
        kafka-python security settings (``stream/config.py``'s ``[kafka]`` table).
    start
        Start following the topics at once (else call :meth:`start`).
    """

    def __init__(
        self,
        state_topic: str,
        params_topic: str,
        bootstrap: str | None = None,
        client_config: Mapping[str, Any] | None = None,
        start: bool = True,
    ):
        self.bootstrap, self.state_topic = parse_kafka_spec(state_topic, bootstrap)
        _, self.params_topic = parse_kafka_spec(params_topic, self.bootstrap)
        wait_for_broker(self.bootstrap)  # an error now, not a follower that never syncs
        self.client_config = dict(client_config or {})
        self._lock = threading.Lock()
        self._rows: dict = {}  # key -> (row, the writer's design state, events)
        self._taken = 0  # state records taken so far
        self._written: dict[str, dict] = {}  # interned writers' design states
        self._params: dict[str, Any] | None = None
        self._design: Design | None = None
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._want_sync = threading.Event()
        self._want_sync.set()
        self._thread: threading.Thread | None = None
        self.n_bad = 0
        self.error: BaseException | None = None
        if start:
            self.start()

    # -- following the topics ---------------------------------------------------------
    def start(self) -> None:
        """Follow both topics in a daemon thread."""
        self._thread = threading.Thread(
            target=self._follow, name="streamlmm-stateview", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def sync(self, timeout_s: float = 60.0) -> bool:
        """Wait until both topics are read up to their ends as of now; True if so."""
        self._synced.clear()
        self._want_sync.set()
        return self._synced.wait(timeout_s)

    def _follow(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        try:
            c = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
                max_partition_fetch_bytes=8 << 20,
                **self.client_config,
            )
        except BaseException as e:  # noqa: BLE001 - reported through .error
            self.error = e
            return
        try:
            tps = []
            for topic in (self.state_topic, self.params_topic):
                deadline = time.monotonic() + 60
                while not (parts := c.partitions_for_topic(topic)):
                    if time.monotonic() > deadline or self._stop.is_set():
                        raise RuntimeError(f"topic {topic!r} not found at {self.bootstrap}")
                    time.sleep(0.1)
                tps += [TopicPartition(topic, p) for p in sorted(parts)]
            c.assign(tps)
            c.seek_to_beginning(*tps)
            ends = None
            while not self._stop.is_set():
                if self._want_sync.is_set():
                    self._want_sync.clear()
                    ends = c.end_offsets(tps)
                for tp, msgs in c.poll(timeout_ms=200, max_records=50_000).items():
                    if tp.topic == self.params_topic:
                        for m in msgs:
                            self._take_params(m)
                    else:
                        self._take_state(msgs)
                if ends is not None and all(c.position(tp) >= ends[tp] for tp in tps):
                    ends = None
                    self._synced.set()
        except BaseException as e:  # noqa: BLE001 - reported through .error
            log.error("state view stopped: %s", e)
            self.error = e
        finally:
            c.close()

    def _take_state(self, msgs) -> None:
        got = []
        for m in msgs:
            try:
                rec = decode_record(m.key, m.value)
            except ValueError as e:
                self.n_bad += 1
                log.error("state record %s:%d@%d skipped: %s", m.topic, m.partition, m.offset, e)
                continue
            if rec.is_marker:
                continue
            text = json.dumps(rec.design, sort_keys=True)
            cols = self._written.setdefault(text, rec.design)
            got.append((rec.key, (rec.row, cols, rec.events)))
        with self._lock:
            self._rows.update(got)
            self._taken += len(got)

    def _take_params(self, m) -> None:
        try:
            p = json.loads(m.value)
            version = int(p["version"])
            design = Design.from_state(p["formula"], {"formula": p["formula"], **p["design"]})
        except (ValueError, KeyError, TypeError) as e:
            self.n_bad += 1
            log.error("params record at offset %d skipped: %s", m.offset, e)
            return
        with self._lock:
            if self._params is None or version >= int(self._params["version"]):
                self._params, self._design = p, design

    # -- lookups ----------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any] | None:
        """The newest params record (``None`` before the fitter's first)."""
        return self._params

    def _need(self) -> dict[str, Any]:
        if self._params is None:
            raise LookupError("no parameters yet: the fitter has not published any")
        return self._params

    def __getattr__(self, name: str) -> Any:
        if name in _MODEL_FIELDS:
            v = self._need()[name]
            return np.asarray(v, dtype=float) if name in ("re_cov", "theta") else v
        raise AttributeError(name)

    @property
    def version(self) -> int:
        return int(self._need()["version"])

    @property
    def re_names(self) -> tuple[str, ...]:
        return tuple(self._need()["re_names"])

    @property
    def keys(self) -> list:
        """Every group with a state row."""
        with self._lock:
            return list(self._rows)

    def _entry(self, key, fallback: str | None = None):
        """The state row of ``key``; an unseen group is an
        :class:`~streamlmm.keys.UnknownGroupError` unless ``fallback="population"``
        (then ``None``), as :meth:`Snapshot.ranef <streamlmm.snapshot.Snapshot.ranef>`."""
        population = check_fallback(fallback)
        try:
            k = check_key(key)
        except ValueError:
            k = None
        with self._lock:
            e = self._rows.get(k) if k is not None else None
            if e is None and not population:
                raise unknown_group(key, self._rows, len(self._rows))
        return e

    def n(self, key, *, fallback: str | None = None) -> float:
        """The group's Σw (0 for an unseen group with ``fallback="population"``)."""
        e = self._entry(key, fallback)
        return float(e[0][0]) if e is not None else 0.0

    def events(self, key, *, fallback: str | None = None) -> int:
        """The number of the group's events in its state row (0 for an unseen group with
        ``fallback="population"``)."""
        e = self._entry(key, fallback)
        return int(e[2]) if e is not None else 0

    def _blup(self, key, fallback: str | None) -> tuple[np.ndarray, np.ndarray]:
        p = self._need()
        with self._lock:
            design = self._design
        e = self._entry(key, fallback)
        q = len(p["re_names"])
        re_cov = np.asarray(p["re_cov"], dtype=float).reshape(q, q)
        if e is None:
            return np.zeros(q), re_cov
        beta = np.array([_num(p["fixef"][c]) for c in design.fixed])
        sigma2 = _num(p["sigma"]) ** 2
        return group_blup(e[0], e[1], design, np.asarray(p["theta"], float), beta, sigma2)

    def ranef(self, key, *, fallback: str | None = None) -> dict[str, float]:
        """The group's BLUP by random-effect name; an unseen group is a ``KeyError``
        unless ``fallback="population"`` (zeros)."""
        b, _ = self._blup(key, fallback)
        return dict(zip(self.re_names, map(float, b)))

    def ranef_cov(self, key, *, fallback: str | None = None) -> np.ndarray:
        """The group's conditional covariance; an unseen group is a ``KeyError`` unless
        ``fallback="population"`` (``re_cov``)."""
        return self._blup(key, fallback)[1]

    def changes(self) -> tuple[int, int]:
        """``(params version, rows taken)``: changes when either topic moved."""
        with self._lock:
            v = -1 if self._params is None else int(self._params["version"])
            return v, self._taken

    def to_snapshot(self) -> Snapshot:
        """A whole :class:`~streamlmm.snapshot.Snapshot` of the model: the fitter's
        model-level estimates and every group's BLUP and conditional covariance from its
        current state row (the core's kernels, one pass over the groups)."""
        p = self._need()
        with self._lock:
            design, rows = self._design, dict(self._rows)
        keys = list(rows)
        st = GroupStats(design, capacity=max(len(keys), 1))
        for key, (row, written, _) in rows.items():
            st.M[st._new_row(key)] = relayout(row, written, design)
        fixef = {c: _num(p["fixef"][c]) for c in design.fixed}
        beta = np.array(list(fixef.values()))
        kept = np.isfinite(beta)
        zi, xi = np.asarray(design.zi), np.asarray(design.xi)[kept]
        q = zi.shape[0]
        lam = np.zeros((q, q))
        lam[theta_index(design.blocks, q)] = np.asarray(p["theta"], dtype=float)
        B, K = kernels.blups(
            st.M, st.n_groups, st.vpos, np.zeros(st.k + 1), zi, xi, st.k, st.P, lam, beta[kept]
        )
        sigma = _num(p["sigma"])
        return Snapshot(
            formula=p["formula"],
            method=p["method"],
            fixef=fixef,
            fixef_se={c: _num(p["fixef_se"][c]) for c in design.fixed},
            fixef_vcov=np.asarray(p.get("fixef_vcov", np.diag([np.nan] * len(beta))), float),
            re_cov=np.asarray(p["re_cov"], dtype=float),
            sigma=sigma,
            theta=np.asarray(p["theta"], dtype=float),
            criterion=_num(p["criterion"]),
            n_obs=st.n_obs,
            singular=bool(p["singular"]),
            converged=bool(p["converged"]),
            n_events=sum(int(e) for _, _, e in rows.values()),
            keys=keys,
            b=B,
            condvar=sigma**2 * K,
            group_n=st.counts(),
            group_ybar=st.means()[:, -1],
            re_names=design.random,
            dropped=tuple(p.get("dropped", ())),
            warnings=tuple(p.get("warnings", ())),
            offsets=p.get("source_offsets", {}),
            meta={"created": time.time(), "params_version": int(p["version"])},
            design=design.to_state(),
        )


_MODEL_FIELDS = frozenset(
    {
        "formula",
        "method",
        "fixef",
        "fixef_se",
        "re_cov",
        "sigma",
        "theta",
        "criterion",
        "n_obs",
        "n_groups",
        "n_events",
        "singular",
        "converged",
        "dropped",
        "warnings",
        "state_offsets",
        "source_offsets",
    }
)


def _num(v) -> float:
    return float("nan") if v is None else float(v)
