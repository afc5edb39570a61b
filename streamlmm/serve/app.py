"""The HTTP API (Starlette/ASGI) over a :class:`~streamlmm.serve.reader.SnapshotHolder`.

Every handler takes ``holder.current`` once and answers from that one snapshot, so a
response never mixes two versions. Every error is JSON ``{"error": ..., "status": ...}``
with 400, 404, 405, 413 or 503 (no snapshot yet); an unexpected exception is logged and
answered with a JSON 500 rather than crashing the server.

"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from streamlmm.keys import key_to_json
from streamlmm.serve.metrics import Metrics
from streamlmm.serve.openapi import openapi_document
from streamlmm.serve.paths import KeyError400, decode_segment, parse_key, parse_key_list
from streamlmm.serve.predict import predict_events
from streamlmm.serve.reader import Current, SnapshotHolder

__all__ = ["create_app", "Limits", "ApiError"]

log = logging.getLogger(__name__)
_GROUP_PREFIX = b"/v1/groups/"


class Limits:
    """Bounds on request sizes (all enforced before any work is done)."""

    max_body_bytes = 8 << 20
    max_query_bytes = 512 << 10
    max_keys = 1000
    max_events = 10_000
    max_top = 1000


class ApiError(Exception):
    """An HTTP error answered as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _json(content: Any, status: int = 200) -> Response:
    try:
        body = orjson.dumps(content)
    except orjson.JSONEncodeError:  # a lone surrogate in a key stored before they were refused
        body = _ascii_json(content)
    return Response(body, status, media_type="application/json")


def _ascii_json(content: Any) -> bytes:
    """JSON with ASCII escapes (a lone surrogate is written ``\\udXXX``, which JSON
    allows and orjson refuses), non-finite numbers as ``null`` as orjson writes them."""

    def finite(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(content), separators=(",", ":")).encode()


def _error(status: int, message: str) -> Response:
    return _json({"error": message, "status": status}, status)


# query parameters that may be repeated: their values are one list (keys=a&keys=b is
# keys=a,b); any other parameter given twice is a 400, never "the last one wins"
_REPEATABLE = {"keys": ","}


def _query(request: Request) -> dict[str, str]:
    qs: bytes = request.scope.get("query_string", b"")
    if len(qs) > Limits.max_query_bytes:
        raise ApiError(413, f"query string longer than {Limits.max_query_bytes} bytes")
    try:
        pairs = parse_qsl(
            qs.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="strict"
        )
    except UnicodeDecodeError as e:
        raise ApiError(400, "query string is not valid UTF-8 after percent-decoding") from e
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in out:
            out[name] = value
        elif name in _REPEATABLE:
            out[name] += _REPEATABLE[name] + value
        else:
            raise ApiError(400, f"{name}= is given more than once: give it once")
    return out


def _current(request: Request) -> Current:
    cur = request.app.state.holder.current
    if cur is None:
        raise ApiError(503, "no snapshot loaded yet")
    return cur


def group_entry(cur: Current, key, seen: bool) -> dict[str, Any]:
    """One group's effects as the API returns them, from one snapshot.

    The values are exactly :meth:`Snapshot.ranef`, ``ranef_cov``, ``n`` and
    ``shrinkage`` (tests check equality), read from the group's row directly.
    """
    s = cur.snapshot
    if not seen:
        return {
            "group": key,
            "found": False,
            "ranef": s.ranef(key, fallback="population"),
            "ranef_cov": s.ranef_cov(key, fallback="population").tolist(),
            "n": s.n(key, fallback="population"),
            "shrinkage": s.shrinkage(key, fallback="population"),
            "fallback": "population",
        }
    r = cur.index[key]
    cv = s.condvar[r].tolist()
    names = cur.re_names
    return {
        "group": key,
        "found": True,
        "ranef": dict(zip(names, cur.b[r].tolist())),
        "ranef_cov": cv,
        "n": float(s.group_n[r]),
        "shrinkage": {
            name: (1.0 - cv[i][i] / p if p > 0 else 0.0)
            for i, (name, p) in enumerate(zip(names, cur.prior))
        },
    }


# -- handlers ------------------------------------------------------------------------------
async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    cur = request.app.state.holder.current
    if cur is None:
        return _json({"ready": False, "error": "no snapshot loaded yet", "status": 503}, 503)
    return _json({"ready": True, "snapshot": cur.info})


async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


async def openapi(request: Request) -> Response:
    return _json(request.app.state.openapi)


async def model(request: Request) -> Response:
    cur = _current(request)
    s = cur.snapshot
    return _json(
        {
            "formula": s.formula,
            "method": s.method,
            "fixef": dict(s.fixef),
            "fixef_se": dict(s.fixef_se),
            "fixef_vcov": s.fixef_vcov.tolist(),
            "re_names": list(s.re_names),
            "re_cov": s.re_cov.tolist(),
            "sigma": s.sigma,
            "theta": s.theta.tolist(),
            "criterion": s.criterion,
            "n_obs": s.n_obs,
            "n_events": s.n_events,
            "n_groups": s.n_groups,
            "singular": s.singular,
            "converged": s.converged,
            "warnings": list(s.warnings),
            "dropped": list(s.dropped),
            "offsets": dict(s.offsets),
            "snapshot": cur.info,
        }
    )


def _fallback(q: dict[str, str]) -> bool:
    fb = q.get("fallback")
    if fb is None or fb == "":
        return False
    if fb != "population":
        raise ApiError(400, "fallback must be 'population'")
    return True


async def group(request: Request) -> Response:
    raw = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    raw = raw.split(b"?", 1)[0]
    if not raw.startswith(_GROUP_PREFIX):  # pragma: no cover - the router guarantees it
        raise ApiError(404, "not found")
    try:
        key = parse_key(decode_segment(raw[len(_GROUP_PREFIX) :]))
    except KeyError400 as e:
        raise ApiError(400, str(e)) from e
    q = _query(request)
    fallback = _fallback(q)
    cur = _current(request)
    seen = key in cur.index
    if not seen and not fallback:
        raise ApiError(404, f"unknown group {key_to_json(key)}")
    return _json({**group_entry(cur, key, seen), "snapshot": cur.info})


async def groups(request: Request) -> Response:
    q = _query(request)
    fallback = _fallback(q)
    if ("keys" in q) == ("top" in q):
        raise ApiError(400, "give exactly one of keys= or top=")
    if "keys" in q:
        try:
            keys = parse_key_list(q["keys"], Limits.max_keys)
        except OverflowError as e:
            raise ApiError(413, f"at most {Limits.max_keys} keys per request") from e
        except KeyError400 as e:
            raise ApiError(400, str(e)) from e
        cur = _current(request)
        index = cur.index
        out = []
        for k in keys:
            seen = k in index
            if seen or fallback:
                out.append(group_entry(cur, k, seen))
            else:
                out.append({"group": k, "found": False})
        return _json({"groups": out, "snapshot": cur.info})
    try:
        top = int(q["top"])
    except ValueError as e:
        raise ApiError(400, "top must be an integer") from e
    if not 1 <= top <= Limits.max_top:
        raise ApiError(400 if top < 1 else 413, f"top must be between 1 and {Limits.max_top}")
    by = q.get("by", "abs")
    if by not in ("abs", "shrinkage", "n"):
        raise ApiError(400, "by must be one of abs, shrinkage, n")
    cur = _current(request)
    s = cur.snapshot
    order = cur.cached_order(by)
    if order is None:  # first ranking of this snapshot: O(G log G), off the event loop
        order = await run_in_threadpool(cur.order, by)
    rows = order[:top]
    out = [group_entry(cur, s.keys[r], True) for r in rows.tolist()]
    return _json({"by": by, "groups": out, "snapshot": cur.info})


async def _body(request: Request) -> bytes:
    limit = Limits.max_body_bytes
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise ApiError(413, f"request body larger than {limit} bytes")
        except ValueError as e:
            raise ApiError(400, "bad Content-Length") from e
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def predict(request: Request) -> Response:
    body = await _body(request)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from e
    single = isinstance(doc, dict)
    if single:
        events = [doc]
    elif isinstance(doc, list):
        events = doc
        if len(events) > Limits.max_events:
            raise ApiError(413, f"at most {Limits.max_events} events per request")
    else:
        raise ApiError(400, "body must be one event (a JSON object) or a list of them")
    cur = _current(request)
    try:
        if len(events) > 64:  # let the event loop serve other requests meanwhile
            out = await run_in_threadpool(predict_events, cur.snapshot, events)
        else:
            out = predict_events(cur.snapshot, events)
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    if single:
        return _json({**out[0], "snapshot": cur.info})
    return _json({"predictions": out, "snapshot": cur.info})


# -- app -----------------------------------------------------------------------------------
async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.message)
    assert isinstance(exc, HTTPException)
    msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, msg)


class _Guard:
    """Outermost ASGI layer: metrics for every request and a JSON 500 as a last resort."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_wrapped(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer
            status = 499  # nginx's "client closed request", for the metrics
            log.info(
                "client disconnected before the end of its request body: %s %s",
                scope.get("method"),
                scope.get("path"),
            )
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                body = orjson.dumps({"error": "internal error", "status": 500})
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            self.metrics.observe(
                scope.get("path", ""), scope.get("method", ""), status, time.perf_counter() - t0
            )


def create_app(holder: SnapshotHolder):
    """The ASGI app answering from ``holder`` (see :mod:`streamlmm.serve`)."""
    routes = [  # the hot route first: Starlette tries routes in order
        Route("/v1/groups/{key:path}", group, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/model", model, methods=["GET"]),
        Route("/v1/groups", groups, methods=["GET"]),
        Route("/v1/predict", predict, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, ApiError: _http_error},
    )
    app.state.holder = holder
    app.state.metrics = m = Metrics(holder)
    app.state.openapi = openapi_document()
    guarded = _Guard(app, m)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded
