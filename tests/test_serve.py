"""The query service over real HTTP: a `streamlmm serve` process on loopback, and the
engine's `run --serve` while it consumes a JSON-lines stream."""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from streamlmm import MixedLM, Snapshot
from streamlmm.serve.predict import Z95
from streamlmm.serve.reader import SnapshotReader
from streamlmm.store import LocalStore

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
KEYS = [1, "1", 2, "a", "b/c", "café", "x,y", '"q"', -3, "12ab"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        ctype = r.getheader("content-type", "")
        return r.status, (json.loads(data) if "json" in ctype else data.decode())
    finally:
        conn.close()


def get(port, path):
    return request(port, "GET", path)


def post(port, path, obj=None, raw=None):
    body = raw if raw is not None else json.dumps(obj).encode()
    return request(port, "POST", path, body, {"Content-Type": "application/json"})


def wait_ready(port, proc=None, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            status, body = get(port, "/readyz")
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("server not ready")


def start_serve(directory, port):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlmm.cli",
            "serve",
            "--snapshot-dir",
            str(directory),
            "--port",
            str(port),
            "--poll-seconds",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_model(seed=0, n=600):
    rng = np.random.default_rng(seed)
    m = MixedLM(FORMULA)
    eff = {k: rng.normal(size=2) for k in KEYS}
    for i in range(n):
        k = KEYS[i % len(KEYS)] if i % 7 else KEYS[i % 3]
        x1, x2 = rng.normal(), rng.normal()
        y = 1 + 2 * x1 - x2 + eff[k][0] + eff[k][1] * x1 + 0.5 * rng.normal()
        m.learn_one({"g": k, "x1": x1, "x2": x2}, y)
    return m


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("snaps")
    snap = make_model().snapshot()
    LocalStore(d).write(snap)
    port = free_port()
    proc = start_serve(d, port)
    try:
        wait_ready(port, proc)
        yield port, Snapshot.load(d)
    finally:
        stop(proc)


def path_of(key) -> str:
    from urllib.parse import quote

    if isinstance(key, int):
        return str(key)
    return quote(json.dumps(key, ensure_ascii=False), safe="")


# -- endpoints ---------------------------------------------------------------------------
def test_health_ready_openapi(served):
    port, snap = served
    assert get(port, "/healthz") == (200, {"status": "ok"})
    status, body = get(port, "/readyz")
    assert status == 200 and body["ready"] and body["snapshot"]["version"] == 1
    assert body["snapshot"]["n_obs"] == snap.n_obs
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for method in ("HEAD", "GET", "HEAD", "GET"):  # keep-alive across bodiless responses
        conn.request(method, "/v1/groups/1")
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200 and len(data) == (
            0 if method == "HEAD" else int(r.getheader("content-length"))
        )
    conn.close()
    status, doc = get(port, "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for p in (
        "/v1/groups/{key}",
        "/v1/groups",
        "/v1/predict",
        "/v1/model",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in doc["paths"]


def test_model_equals_snapshot(served):
    port, snap = served
    status, m = get(port, "/v1/model")
    assert status == 200
    assert m["fixef"] == dict(snap.fixef) and m["fixef_se"] == dict(snap.fixef_se)
    assert m["re_cov"] == snap.re_cov.tolist() and m["sigma"] == snap.sigma
    assert m["theta"] == snap.theta.tolist() and m["criterion"] == snap.criterion
    assert m["n_groups"] == snap.n_groups == len(KEYS) and m["n_obs"] == snap.n_obs
    assert m["singular"] == snap.singular and m["warnings"] == list(snap.warnings)
    assert m["snapshot"]["version"] == 1 and m["fixef_vcov"] == snap.fixef_vcov.tolist()


@pytest.mark.parametrize("key", KEYS)
def test_group_equals_snapshot_methods(served, key):
    port, snap = served
    status, g = get(port, "/v1/groups/" + path_of(key))
    assert status == 200, g
    assert g["group"] == key and type(g["group"]) is type(key) and g["found"]
    assert g["ranef"] == snap.ranef(key)
    assert g["ranef_cov"] == snap.ranef_cov(key).tolist()
    assert g["n"] == snap.n(key) and g["shrinkage"] == snap.shrinkage(key)
    assert g["snapshot"]["version"] == 1


def test_int_and_string_keys_are_different_groups(served):
    port, snap = served
    _, as_int = get(port, "/v1/groups/1")
    _, as_str = get(port, "/v1/groups/%221%22")
    assert as_int["group"] == 1 and as_str["group"] == "1"
    assert as_int["ranef"] == snap.ranef(1) != snap.ranef("1") == as_str["ranef"]
    # plain text names a string; a percent-encoded slash stays in the key
    assert get(port, "/v1/groups/a")[1]["ranef"] == snap.ranef("a")
    assert get(port, "/v1/groups/b%2Fc")[1]["group"] == "b/c"
    assert get(port, "/v1/groups/caf%C3%A9")[1]["group"] == "café"
    assert get(port, "/v1/groups/12ab")[1]["group"] == "12ab"
    assert get(port, "/v1/groups/-3")[1]["group"] == -3
    # "2" as a string is unknown, 2 as an int is known
    assert get(port, "/v1/groups/%222%22")[0] == 404
    assert get(port, "/v1/groups/2")[0] == 200


def test_unknown_group_404_and_population_fallback(served):
    port, snap = served
    status, body = get(port, "/v1/groups/nope")
    assert status == 404 and "nope" in body["error"] and body["status"] == 404
    status, g = get(port, "/v1/groups/nope?fallback=population")
    assert status == 200 and not g["found"] and g["fallback"] == "population"
    assert (
        g["ranef"] == {"(Intercept)": 0.0, "x1": 0.0} == snap.ranef("nope", fallback="population")
    )
    assert g["ranef_cov"] == snap.re_cov.tolist() and g["n"] == 0.0
    assert g["shrinkage"] == {"(Intercept)": 0.0, "x1": 0.0}
    assert get(port, "/v1/groups/a?fallback=population")[1]["found"]
    assert get(port, "/v1/groups/a?fallback=zero")[0] == 400


def test_groups_by_keys(served):
    port, snap = served
    q = ",".join(path_of(k) for k in KEYS) + ",missing,%22x%2Cy%22"
    status, body = get(port, "/v1/groups?keys=" + q)
    assert status == 200
    got = body["groups"]
    assert [g["group"] for g in got] == [*KEYS, "missing", "x,y"]
    for k, g in zip(KEYS, got):
        assert g["found"] and g["ranef"] == snap.ranef(k) and g["n"] == snap.n(k)
    assert got[-2] == {"group": "missing", "found": False}
    _, fb = get(port, "/v1/groups?keys=missing&fallback=population")
    assert fb["groups"][0]["ranef_cov"] == snap.re_cov.tolist()
    assert get(port, "/v1/groups?keys=" + ",".join(map(str, range(1000))))[0] == 200


@pytest.mark.parametrize("by", ["abs", "shrinkage", "n"])
def test_groups_top(served, by):
    port, snap = served
    status, body = get(port, f"/v1/groups?top=4&by={by}")
    assert status == 200 and body["by"] == by and len(body["groups"]) == 4
    if by == "abs":
        score = {k: max(abs(v) for v in snap.ranef(k).values()) for k in snap.keys}
        expect = sorted(snap.keys, key=lambda k: -score[k])[:4]
    elif by == "n":
        expect = sorted(snap.keys, key=lambda k: -snap.n(k))[:4]
    else:
        expect = sorted(snap.keys, key=lambda k: min(snap.shrinkage(k).values()))[:4]
    assert [g["group"] for g in body["groups"]] == expect
    for g in body["groups"]:
        assert g["ranef"] == snap.ranef(g["group"])
    assert len(get(port, "/v1/groups?top=1000")[1]["groups"]) == len(KEYS)


def test_predict_values(served):
    port, snap = served
    events = [
        {"g": 1, "x1": 0.5, "x2": -1.0},
        {"g": "1", "x1": 0.5, "x2": -1.0},
        {"g": "unseen", "x1": 2.0, "x2": 0.25},
        {"x1": 1, "x2": 2},
    ]
    status, body = post(port, "/v1/predict", events)
    assert status == 200 and body["snapshot"]["version"] == 1
    V = snap.fixef_vcov
    for ev, p in zip(events, body["predictions"]):
        assert p["prediction"] == pytest.approx(snap.predict(ev), rel=0, abs=0)
        xr = np.array([1.0, ev["x1"], ev["x2"]])
        zr = np.array([1.0, ev["x1"]])
        C = snap.ranef_cov(ev.get("g"), fallback="population")
        se = math.sqrt(xr @ V @ xr + zr @ C @ zr + snap.sigma**2)
        assert p["se"] == pytest.approx(se, rel=1e-12)
        assert p["lower"] == pytest.approx(p["prediction"] - Z95 * se, rel=1e-12)
        assert p["upper"] == pytest.approx(p["prediction"] + Z95 * se, rel=1e-12)
    kinds = [p["interval_kind"] for p in body["predictions"]]
    assert kinds == ["conditional", "conditional", "population", "population"]
    assert body["predictions"][0]["prediction"] != body["predictions"][1]["prediction"]
    status, one = post(port, "/v1/predict", events[0])
    assert status == 200 and one["prediction"] == body["predictions"][0]["prediction"]
    status, many = post(port, "/v1/predict", [events[0]] * 10_000)
    assert status == 200 and len(many["predictions"]) == 10_000
    assert many["predictions"][-1] == body["predictions"][0]
    assert post(port, "/v1/predict", [])[1]["predictions"] == []
    status, err = post(port, "/v1/predict", [events[0], {"g": 1, "x1": "oops", "x2": 0}])
    assert status == 400 and err["error"].startswith("event 1: field 'x1'")


# -- bad input ---------------------------------------------------------------------------
BAD = [
    ("POST", "/v1/predict", b"{not json", 400),
    ("POST", "/v1/predict", b"\xff\xfe", 400),
    ("POST", "/v1/predict", b"", 400),
    ("POST", "/v1/predict", b"42", 400),
    ("POST", "/v1/predict", b'"text"', 400),
    ("POST", "/v1/predict", b"[1, 2]", 400),
    ("POST", "/v1/predict", b'{"g": 1, "x1": "a", "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": 1, "x1": true, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": 1, "x1": null, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": 1, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": [1], "x1": 1, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": 1.5, "x1": 1, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": true, "x1": 1, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": 1, "x1": 1e999, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": 1, "x1": NaN, "x2": 1}', 400),
    ("POST", "/v1/predict", b'{"g": "' + b"k" * 300 + b'", "x1": 1, "x2": 1}', 400),
    ("GET", "/v1/groups/%FF", None, 400),
    ("GET", "/v1/groups/%C3%28", None, 400),
    ("GET", "/v1/groups/%22unterminated", None, 400),
    ("GET", "/v1/groups/99999999999999999999999", None, 400),
    ("GET", "/v1/groups/" + "k" * 300, None, 400),
    ("GET", "/v1/groups/", None, 400),
    ("GET", "/v1/groups?keys=%FF", None, 400),
    ("GET", "/v1/groups?keys=%22a%22b", None, 400),
    ("GET", "/v1/groups?keys=a,,b", None, 400),
    ("GET", "/v1/groups", None, 400),
    ("GET", "/v1/groups?keys=a&top=3", None, 400),
    ("GET", "/v1/groups?top=abc", None, 400),
    ("GET", "/v1/groups?top=0", None, 400),
    ("GET", "/v1/groups?top=1001", None, 413),
    ("GET", "/v1/groups?top=5&by=size", None, 400),
    ("GET", "/v1/groups?keys=" + ",".join(map(str, range(1001))), None, 413),
    ("GET", "/v1/groups?keys=" + "a," * 20_000, None, 413),
    ("GET", "/v1/groups?keys=" + "a," * 300_000, None, 400),  # over the parser's URL limit
    ("GET", "/v2/nothing", None, 404),
    ("GET", "/", None, 404),
    ("GET", "/v1/predict", None, 405),
    ("POST", "/v1/model", b"{}", 405),
    ("DELETE", "/v1/groups/1", None, 405),
]


@pytest.mark.parametrize(
    "method,path,body,code", BAD, ids=[f"{m} {p[:40]} {b!r:.30}" for m, p, b, _ in BAD]
)
def test_bad_requests_are_json_errors(served, method, path, body, code):
    port, _ = served
    headers = {"Content-Type": "application/json"} if body is not None else {}
    status, err = request(port, method, path, body, headers)
    assert status == code, err
    assert isinstance(err, dict) and err["status"] == code and err["error"]


def test_oversized_and_too_many(served):
    port, _ = served
    ev = {"g": 1, "x1": 1.0, "x2": 2.0}
    status, err = post(port, "/v1/predict", [ev] * 10_001)
    assert status == 413 and "10000" in err["error"]
    big = b"[" + b" " * (9 << 20) + b"]"
    status, err = post(port, "/v1/predict", raw=big)
    assert status == 413
    # a lying/absent Content-Length: chunked body, cut off while streaming
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/predict",
            body=iter([b"[" + b" " * (1 << 20)] * 9),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["status"] == 413
    finally:
        conn.close()


def test_raw_non_utf8_request_line(served):
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1/groups/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400" and json.loads(body)["status"] == 400
    assert get(port, "/healthz")[0] == 200  # still serving


def test_oversized_headers(served):
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20))
        except OSError:
            pass  # the server may close while we are still sending
        data = s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400" and json.loads(body)["status"] == 400
    # keep-alive: a second request on the same connection is counted afresh
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/healthz", headers={"X-Pad": "p" * 100_000})
        r = conn.getresponse()
        assert r.status == 200 and r.read()
    conn.close()


def test_metrics(served):
    port, _ = served
    get(port, "/v1/groups/1")
    get(port, "/v1/groups/does-not-exist")
    status, text = get(port, "/metrics")
    assert status == 200
    assert (
        'streamlmm_http_requests_total{method="GET",route="/v1/groups/{key}",status="200"}' in text
    )
    assert 'route="/v1/groups/{key}",status="404"' in text
    assert "streamlmm_http_request_duration_seconds_bucket" in text
    assert f"streamlmm_snapshot_groups {float(len(KEYS))}" in text
    assert "streamlmm_snapshot_age_seconds" in text and "streamlmm_snapshot_version 1.0" in text


# -- hot swap ---------------------------------------------------------------------------
def versioned(v: int, n_groups: int = 50) -> Snapshot:
    """A snapshot whose every effect, covariance and count encodes its version."""
    G = n_groups
    return Snapshot(
        formula=FORMULA,
        method="REML",
        fixef={"(Intercept)": v, "x1": v, "x2": v},
        fixef_se={"(Intercept)": 1, "x1": 1, "x2": 1},
        re_cov=np.eye(2) * (v + 1),
        sigma=1.0,
        theta=[1, 0, 1],
        criterion=float(v),
        n_obs=100.0 * v,
        singular=False,
        converged=True,
        n_events=100 * v,
        keys=list(range(G)),
        b=np.full((G, 2), float(v)),
        condvar=np.tile(np.eye(2), (G, 1, 1)),
        group_n=np.full(G, float(v)),
        meta={"created": time.time()},
    )


def test_hot_swap_under_load_never_mixes_versions(tmp_path):
    store = LocalStore(tmp_path, keep=3)
    store.write(versioned(1))
    port = free_port()
    proc = start_serve(tmp_path, port)
    try:
        wait_ready(port, proc)
        stop_flag = threading.Event()
        errors: list[str] = []
        seen_versions: list[set] = []

        def hammer(i):
            try:
                run(i)
            except Exception as e:  # a dead server or a bad body fails the test
                errors.append(f"thread {i}: {e!r}")

        def run(i):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            versions, last = set(), 0
            paths = [
                "/v1/groups?keys=" + ",".join(map(str, range(50))),
                "/v1/groups/7",
                "/v1/model",
                "/v1/groups?top=20&by=abs",
            ]
            k = 0
            while not stop_flag.is_set():
                path = paths[(k + i) % len(paths)]
                k += 1
                conn.request("GET", path)
                r = conn.getresponse()
                body = json.loads(r.read())
                if r.status != 200:
                    errors.append(f"{path}: {r.status} {body}")
                    continue
                v = body["snapshot"]["version"]
                if v < last:
                    errors.append(f"version went back {last} -> {v}")
                last = v
                versions.add(v)
                if "groups" in body:
                    vals = {x for g in body["groups"] for x in g["ranef"].values()}
                    vals |= {g["n"] for g in body["groups"]}
                    if vals != {float(v)}:
                        errors.append(f"version {v} answered with values {sorted(vals)[:5]}")
                elif "fixef" in body:
                    if set(body["fixef"].values()) != {float(v)} or body["n_obs"] != 100.0 * v:
                        errors.append(f"model of version {v} mixes: {body['fixef']}")
                elif body["ranef"] != {"(Intercept)": float(v), "x1": float(v)}:
                    errors.append(f"group of version {v}: {body['ranef']}")
            conn.close()
            seen_versions.append(versions)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for v in range(2, 16):
            store.write(versioned(v))
            time.sleep(0.12)
        deadline = time.monotonic() + 20
        while get(port, "/readyz")[1]["snapshot"]["version"] != 15:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop_flag.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:5]
        union = set().union(*seen_versions)
        assert len(seen_versions) == 4
        assert len(union) >= 3 and max(union) <= 15
    finally:
        stop(proc)


def test_reader_follows_directory(tmp_path):
    store = LocalStore(tmp_path)
    with SnapshotReader(tmp_path, interval=0.02) as r:
        assert r.current is None
        store.write(versioned(1))
        deadline = time.monotonic() + 10
        while r.current is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r.ranef(3) == {"(Intercept)": 1.0, "x1": 1.0} and r.current.version == 1
        store.write(versioned(2))
        (tmp_path / "snapshot-000000000003.slmm").write_bytes(b"corrupt")  # newest, invalid
        while r.current.version != 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r.n(3) == 2.0 and r.shrinkage(3) == r.current.snapshot.shrinkage(3)
        assert r.predict({"g": 3, "x1": 1.0, "x2": 1.0}) == 2.0 + 2.0 + 2.0 + 2.0 + 2.0


def test_not_ready_until_a_snapshot_appears(tmp_path):
    port = free_port()
    proc = start_serve(tmp_path, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = get(port, "/readyz")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert status == 503 and body["ready"] is False
        assert get(port, "/v1/groups/1")[0] == 503
        assert get(port, "/healthz")[0] == 200
        LocalStore(tmp_path).write(versioned(4))
        assert wait_ready(port, proc)["snapshot"]["version"] == 1
        assert get(port, "/v1/groups/1")[1]["ranef"]["x1"] == 4.0
    finally:
        stop(proc)


def test_a_stored_key_that_is_not_valid_unicode_is_answered_never_a_500(helpers):
    """A snapshot written before keys with a lone surrogate were refused at the input:
    every endpoint answers with JSON (the key in ASCII escapes), none with a 500."""
    from streamlmm.serve.server import start_server

    m = MixedLM("y ~ x1 + (1 | g)")
    for i in range(80):
        m.learn_one({"g": ["a", "b", "zzzzzz", 7][i % 4], "x1": float(i % 5)}, float(i % 3 + i % 4))
    snap = helpers.with_lone_surrogate(m.fit().snapshot(), "zzzzzz")
    server = start_server(port=0, snapshot=snap)
    try:
        port = server.port
        status, body = get(port, "/v1/groups?top=50")
        assert status == 200, body
        assert {g["group"] for g in body["groups"]} == set(snap.keys) == {"a", "b", "\ud800", 7}
        mine = next(g for g in body["groups"] if g["group"] == "\ud800")
        assert mine["ranef"] == snap.ranef("\ud800") and mine["found"]
        status, g = get(port, "/v1/groups/%22%5Cud800%22")  # the key's own URL: "\ud800"
        assert status == 200 and g["group"] == "\ud800" and g["n"] == 20.0
        status, g = get(port, "/v1/groups?keys=a,%22%5Cud800%22")
        assert status == 200 and [x["group"] for x in g["groups"]] == ["a", "\ud800"]
        status, g = get(port, "/v1/groups/%22%5Cudfff%22")  # another one, not stored
        assert status == 404 and "\\udfff" in g["error"]
        assert get(port, "/v1/model")[0] == 200
        status, p = post(port, "/v1/predict", {"g": "\ud800", "x1": 1.0})
        assert status == 400 and "surrogate" in p["error"]  # refused by the JSON parser
    finally:
        server.stop()


def test_repeated_keys_are_one_list_and_other_repeats_are_refused(served):
    port, snap = served
    status, body = get(port, "/v1/groups?keys=1&keys=a,%22x,y%22&keys=-3")
    assert status == 200
    assert [g["group"] for g in body["groups"]] == [1, "a", "x,y", -3]
    assert body == get(port, "/v1/groups?keys=1,a,%22x,y%22,-3")[1]
    for query in (
        "top=2&top=3",
        "keys=1&fallback=population&fallback=population",
        "top=2&by=n&by=abs",
    ):
        status, err = get(port, "/v1/groups?" + query)
        assert status == 400 and "is given more than once" in err["error"], (query, err)
    doc = get(port, "/openapi.json")[1]
    (keys,) = [p for p in doc["paths"]["/v1/groups"]["get"]["parameters"] if p["name"] == "keys"]
    assert "keys=a&keys=b being keys=a,b" in keys["description"]


def test_a_client_gone_mid_body_is_one_info_line_not_an_error(caplog):
    from streamlmm.serve.server import start_server

    m = make_model(n=200)
    server = start_server(port=0, snapshot=m.snapshot())
    caplog.set_level(logging.DEBUG)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n" + b'[{"g": 1, "x1": 0.5, ' * 3
            )
        deadline = time.monotonic() + 30
        while not any("client disconnected" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        assert get(server.port, "/v1/groups/1")[0] == 200  # still serving
    finally:
        server.stop()
    mine = [r for r in caplog.records if r.name.startswith("streamlmm")]
    assert [r for r in mine if r.levelno >= logging.WARNING] == []
    assert all(r.exc_info is None for r in mine)
    (gone,) = [r for r in mine if "client disconnected" in r.getMessage()]
    assert gone.levelno == logging.INFO and "POST /v1/predict" in gone.getMessage()


def test_binds_loopback_by_default():
    from streamlmm.cli import _parser

    args = _parser().parse_args(["serve", "--snapshot-dir", "d"])
    assert args.host == "127.0.0.1" and args.port == 8000


# -- run --serve -------------------------------------------------------------------------
def test_run_serve_answers_while_the_engine_consumes(tmp_path):
    from streamlmm.simulate import simulate, to_jsonl

    lines = list(to_jsonl(simulate(600, 20, 3)))
    port = free_port()
    d = tmp_path / "snaps"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlmm.cli",
            "run",
            "--source",
            "jsonl:-",
            "--formula",
            FORMULA,
            "--snapshot-dir",
            str(d),
            "--snapshot-every-events",
            "200",
            "--max-poll-records",
            "200",
            "--progress-seconds",
            "0",
            "--until-end",
            "--serve",
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:  # the server is up before the first event, not ready yet
            try:
                status, _ = get(port, "/readyz")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
        assert status == 503
        for chunk in range(3):
            proc.stdin.write("".join(lines[chunk * 200 : (chunk + 1) * 200]).encode())
            proc.stdin.flush()
            while True:  # the engine is blocked reading stdin; the server answers
                status, m = get(port, "/v1/model")
                if status == 200 and m["n_events"] == 200 * (chunk + 1):
                    break
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            disk = Snapshot.load(d)
            assert disk.n_events == m["n_events"] and m["fixef"] == dict(disk.fixef)
            assert m["snapshot"]["version"] == chunk + 1
            key = disk.keys[0]
            status, g = get(port, "/v1/groups/" + path_of(key))
            assert status == 200 and g["ranef"] == disk.ranef(key)
            status, p = post(port, "/v1/predict", {"g": key, "x1": 1.0, "x2": 0.5})
            assert p["prediction"] == disk.predict({"g": key, "x1": 1.0, "x2": 0.5})
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_serve_the_same_snapshot(tmp_path):
    snap = versioned(3)
    LocalStore(tmp_path).write(snap)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlmm.cli",
            "serve",
            "--snapshot-dir",
            str(tmp_path),
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(port, proc)
        for _ in range(10):
            status, g = get(port, "/v1/groups/5")
            assert status == 200 and g["ranef"] == snap.ranef(5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"NOT HTTP\r\n\r\n")
            data = s.recv(65536)
        assert b" 400 " in data.split(b"\r\n", 1)[0] and b'"status":400' in data
    finally:
        stop(proc)
