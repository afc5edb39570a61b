"""Prometheus metrics of the query server (one registry per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamlmm.serve.reader import SnapshotHolder

__all__ = ["Metrics", "route_label"]

_ROUTES = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/model", "/v1/groups", "/v1/predict"}
)
_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"})
_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def route_label(path: str) -> str:
    """A bounded label for a request path (the route template, or ``other``).

    >>> route_label("/v1/groups/4711"), route_label("/v1/model"), route_label("/x")
    ('/v1/groups/{key}', '/v1/model', 'other')

    """
    if path in _ROUTES:
        return path
    if path.startswith("/v1/groups/"):
        return "/v1/groups/{key}"
    return "other"


class Metrics:
    """Request counts, a latency histogram and the current snapshot's age and size."""

    def __init__(self, holder: SnapshotHolder):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "streamlmm_http_requests", "HTTP requests", ("route", "method", "status"), registry=r
        )
        self.latency = Histogram(
            "streamlmm_http_request_duration_seconds",
            "HTTP request latency (server side)",
            ("route",),
            buckets=_BUCKETS,
            registry=r,
        )

        def cur_attr(fn):
            def get() -> float:
                cur = holder.current
                return float(fn(cur)) if cur is not None else float("nan")

            return get

        for name, doc, fn in (
            (
                "streamlmm_snapshot_age_seconds",
                "seconds since the current snapshot was made",
                lambda c: time.time() - c.created,
            ),
            (
                "streamlmm_snapshot_groups",
                "groups in the current snapshot",
                lambda c: c.snapshot.n_groups,
            ),
            ("streamlmm_snapshot_version", "version of the current snapshot", lambda c: c.version),
            (
                "streamlmm_snapshot_events",
                "events in the current snapshot",
                lambda c: c.snapshot.n_events,
            ),
        ):
            Gauge(name, doc, registry=r).set_function(cur_attr(fn))
        Gauge("streamlmm_snapshot_loaded", "1 once a snapshot is loaded", registry=r).set_function(
            lambda: float(holder.current is not None)
        )

        self._children: dict = {}

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        route = route_label(path)
        key = (route, method, status)
        c = self._children.get(key)
        if c is None:
            if method not in _METHODS:
                key = (route, "other", status)
            c = (self.requests.labels(key[0], key[1], str(status)), self.latency.labels(route))
            if len(self._children) < 10_000:
                self._children[(route, method, status)] = c
        c[0].inc()
        c[1].observe(seconds)
