#!/usr/bin/env python
"""Benchmark of the query service at a snapshot of 1M groups.

1. Builds a snapshot of G groups (q = 2 random effects, half int and half str keys)
   and writes it as a real snapshot file (``LocalStore``).
2. Load time: ``Snapshot.from_bytes`` of that file (best and median of 3), and the
   reader's first load.
3. In-process lookups: ``SnapshotReader.ranef(key)`` on random keys (µs per call),
   plus ``n(key)`` and ``snap._index`` (the bare dict lookup) for scale.
4. HTTP: ``streamlmm serve`` in its own process; a separate load-generating process
   sends ``GET /v1/groups/{key}`` (random known keys) at a FIXED RATE over 32 keep-alive
   loopback connections (asyncio protocols on uvloop, one request in flight per
   connection; a request due while all are busy waits, and that wait counts in its
   latency; the generator's own timer lateness, up to ~1 ms, is reported apart) (open loop: request i is scheduled at t0 + i/rate, and its
   latency is measured from that scheduled time, so a stalled server is not hidden by
   coordinated omission). Reports p50/p99/max latency, errors and the achieved rate.

Usage::

    .venv/bin/python scripts/bench_serve.py                     # 1M groups, 1,000 and 5,000 req/s, 20 s
    .venv/bin/python scripts/bench_serve.py --groups 100000 --seconds 5 --rates 1000  # quick
    .venv/bin/python scripts/bench_serve.py --server granian    # same app under granian
    .venv/bin/python scripts/bench_serve.py --workers 2         # two server processes

The machine's load average is printed with the results: on a shared 2-core machine
latencies are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streamlmm.snapshot import Snapshot  # noqa: E402
from streamlmm.store import LocalStore  # noqa: E402


def key_of(i: int):
    return i if i % 2 == 0 else f"store-{i}"


def path_of(key) -> str:
    return str(key) if isinstance(key, int) else key  # "store-…" is not all digits


def build_snapshot(G: int, seed: int = 0) -> Snapshot:
    rng = np.random.default_rng(seed)
    re_cov = np.array([[1.0, 0.2], [0.2, 0.5]])
    n = rng.integers(1, 6, G).astype(float)
    b = rng.normal(size=(G, 2)) * np.sqrt(np.diag(re_cov))
    shrink = 1.0 / (1.0 + 1.0 / n)
    condvar = np.einsum("g,ij->gij", 1 - shrink, re_cov)
    return Snapshot(
        formula="y ~ x1 + x2 + (1 + x1 | g)",
        method="REML",
        fixef={"(Intercept)": 1.0, "x1": 2.0, "x2": -1.0},
        fixef_se={"(Intercept)": 0.01, "x1": 0.01, "x2": 0.01},
        re_cov=re_cov,
        sigma=1.0,
        theta=[1.0, 0.2, 0.6],
        criterion=0.0,
        n_obs=float(n.sum()),
        singular=False,
        converged=True,
        n_events=int(n.sum()),
        keys=[key_of(i) for i in range(G)],
        b=b,
        condvar=condvar,
        group_n=n,
        meta={"created": time.time()},
    )


def model_snapshot(G: int, seed: int = 0) -> Snapshot:
    """A real engine-like snapshot (with its state): MixedLM.learn_many on 2.5 events per
    group, then snapshot() (the exact fit; ≈ 30 s at 1M groups)."""
    import pandas as pd

    from streamlmm import MixedLM

    rng = np.random.default_rng(seed)
    n = int(2.5 * G)
    g = rng.integers(0, G, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    u = rng.normal(size=(G, 2)) * [1.0, 0.5]
    y = 1 + 2 * x1 - x2 + u[g, 0] + u[g, 1] * x1 + rng.normal(size=n)
    m = MixedLM("y ~ x1 + x2 + (1 + x1 | g)")
    m.learn_many(pd.DataFrame({"g": g, "x1": x1, "x2": x2}), pd.Series(y))
    return m.snapshot()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- load generator (runs in its own process) ------------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive connection of the load generator: one request in flight at a time,
    responses parsed by Content-Length (the server always sends it)."""

    def __init__(self, gen: _Gen):
        self.gen = gen
        self.buf = b""
        self.req: tuple[int, float] | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, i: int, sched: float) -> None:
        self.req = (i, sched)
        self.transport.write(
            b"GET "
            + self.gen.paths[i % len(self.gen.paths)]
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end]
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length :]
        i, sched = self.req
        self.req = None
        self.gen.done(self, i, sched, int(head[9:12]))

    def connection_lost(self, exc) -> None:
        if self.req is not None:
            self.gen.failed(self, *self.req, "connection lost")


class _Gen:
    """Open-loop scheduler: request i is due at t0 + i/rate whatever the server does."""

    def __init__(self, paths: list[bytes], n: int):
        self.paths = paths
        self.lat = np.full(n, np.nan)
        self.free: collections.deque = collections.deque()
        self.pending: collections.deque = collections.deque()
        self.errors: dict[str, int] = {}
        self.finished = 0
        self.late_sum = self.late_max = 0.0

    def submit(self, i: int, sched: float) -> None:
        start = time.perf_counter()  # the timer fires up to ~1 ms after sched: the load
        late = start - sched  # generator's lateness, reported, not charged to the server
        self.late_sum += late
        self.late_max = max(self.late_max, late)
        sched = start
        if self.free:
            self.free.popleft().send(i, sched)
        else:
            self.pending.append((i, sched))

    def done(self, conn: _Conn, i: int, sched: float, status: int) -> None:
        self.lat[i] = time.perf_counter() - sched
        if status != 200:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1
        self._next(conn)

    def failed(self, conn: _Conn, i: int, sched: float, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1
        self.finished += 1

    def _next(self, conn: _Conn) -> None:
        self.finished += 1
        if self.pending:
            conn.send(*self.pending.popleft())
        else:
            self.free.append(conn)


async def _load(port: int, rate: float, seconds: float, paths: list[bytes], conns: int):
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    gen = _Gen(paths, n)
    for _ in range(conns):
        _, conn = await loop.create_connection(lambda: _Conn(gen), "127.0.0.1", port)
        gen.free.append(conn)
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution
    t0 = time.perf_counter() + 0.05
    i = 0
    while i < n:
        now = time.perf_counter()
        while i < n and t0 + i / rate <= now:  # everything due is sent now
            gen.submit(i, t0 + i / rate)
            i += 1
        if i < n:  # the event loop's timers have 1 ms resolution: never spin below it
            await asyncio.sleep(max(0.001, t0 + i / rate - time.perf_counter()))
    deadline = time.perf_counter() + 30
    while gen.finished < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    lost = n - gen.finished
    if lost:
        gen.errors["no answer in 30 s"] = lost
    errors = sum(gen.errors.values())
    ok = gen.lat[~np.isnan(gen.lat)] * 1e3
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": n,
        "errors": errors,
        "error_kinds": gen.errors,
        "achieved_rps": n / elapsed,
        "p50_ms": float(np.percentile(ok, 50)) if len(ok) else None,
        "p99_ms": float(np.percentile(ok, 99)) if len(ok) else None,
        "p999_ms": float(np.percentile(ok, 99.9)) if len(ok) else None,
        "max_ms": float(ok.max()) if len(ok) else None,
        "send_late_mean_ms": gen.late_sum / n * 1e3,
        "send_late_max_ms": gen.late_max * 1e3,
    }


def loadgen_main(args) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import gc

    paths = [p.encode() for p in json.loads(Path(args.paths_file).read_text())]
    gc.freeze()
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(_load(args.port, args.rate, args.seconds, paths, args.conns))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime - ru0.ru_utime + ru.ru_stime - ru0.ru_stime
    out["loadgen_cpu_us_per_req"] = cpu / out["sent"] * 1e6
    print(json.dumps(out))


# -- orchestration ----------------------------------------------------------------------------
def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> float:
    import http.client

    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return time.monotonic() - t
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("server not ready")


def start_server(kind: str, directory: str, port: int, workers: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if kind == "uvicorn":
        cmd = [
            sys.executable,
            "-m",
            "streamlmm.cli",
            "serve",
            "--snapshot-dir",
            directory,
            "--port",
            str(port),
        ]
    elif kind == "granian":
        env["BENCH_SNAPSHOT_DIR"] = directory
        cmd = [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--no-ws",
            "--log-level",
            "warning",
            "--factory",
            "bench_serve:granian_app",
        ]
        env["PYTHONPATH"] = str(REPO / "scripts") + os.pathsep + env["PYTHONPATH"]
    else:
        raise ValueError(kind)
    return subprocess.Popen(cmd, env=env)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def server_side_share(port: int, le: str = "0.001") -> tuple[float, float]:
    """From /metrics: (requests to /v1/groups/{key} so far, share answered in ≤ le s
    inside the app)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    total = under = 0.0
    for line in text.splitlines():
        if line.startswith("streamlmm_http_request_duration_seconds_bucket") and (
            'route="/v1/groups/{key}"' in line
        ):
            if f'le="{le}"' in line:
                under = float(line.rsplit(" ", 1)[1])
            if 'le="+Inf"' in line:
                total = float(line.rsplit(" ", 1)[1])
    return total, under


def granian_app():
    """The same Starlette app for granian (``--server granian``)."""
    from streamlmm.serve.app import create_app
    from streamlmm.serve.reader import SnapshotReader

    return create_app(SnapshotReader(os.environ["BENCH_SNAPSHOT_DIR"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", type=int, default=1_000_000)
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--conns", type=int, default=32, help="keep-alive connections")
    ap.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    ap.add_argument("--workers", type=int, default=1, help="server processes")
    ap.add_argument(
        "--from-model",
        action="store_true",
        help="build the snapshot with MixedLM.learn_many + snapshot() (int keys, with the "
        "engine's state arrays) instead of directly",
    )
    ap.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--paths-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loadgen:
        return loadgen_main(args)

    print(f"load before: {os.getloadavg()}  cores: {os.cpu_count()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        snap = model_snapshot(args.groups) if args.from_model else build_snapshot(args.groups)
        path = LocalStore(d).write(snap)
        print(
            f"built and wrote {snap.n_groups:,} groups in {time.perf_counter() - t:.1f}s "
            f"({path.stat().st_size / 1e6:.0f} MB)"
        )
        key_pool = list(snap.keys)
        del snap
        data = path.read_bytes()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            s = Snapshot.from_bytes(data)
            times.append(time.perf_counter() - t)
            del s
        del data
        print(
            f"load: Snapshot.from_bytes of {args.groups:,} groups: best {min(times):.3f}s, "
            f"median {sorted(times)[1]:.3f}s"
        )

        from streamlmm.serve.reader import SnapshotReader

        t = time.perf_counter()
        reader = SnapshotReader(d, follow=False)
        print(
            f"load: SnapshotReader first load (read file + parse): {time.perf_counter() - t:.3f}s"
        )
        rng = random.Random(1)
        keys = [rng.choice(key_pool) for _ in range(200_000)]
        for name, fn in (
            ("reader.ranef(key)", reader.ranef),
            ("reader.n(key)", reader.n),
            ("snap._index.get(key)", reader.current.snapshot._index.get),
        ):
            best = []
            for _ in range(3):
                t = time.perf_counter()
                for k in keys:
                    fn(k)
                best.append((time.perf_counter() - t) / len(keys) * 1e6)
            print(f"in-process: {name:<22s} {min(best):.2f} µs/lookup (best of 3 x {len(keys):,})")
        del reader

        paths = [f"/v1/groups/{path_of(rng.choice(key_pool))}" for _ in range(50_000)]
        pf = Path(d) / "paths.json"
        pf.write_text(json.dumps(paths))
        port = free_port()
        proc = start_server(args.server, d, port, args.workers)
        try:
            print(f"server ({args.server}) ready after {wait_ready(port, proc):.2f}s")
            # warm up
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--loadgen",
                    "--port",
                    str(port),
                    "--rate",
                    "500",
                    "--seconds",
                    "2",
                    "--paths-file",
                    str(pf),
                    "--conns",
                    str(args.conns),
                ],
                check=True,
                capture_output=True,
            )
            for rate in [float(r) for r in args.rates.split(",")]:
                cpu0 = tree_cpu_seconds(proc.pid)
                m0 = server_side_share(port)
                r = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--loadgen",
                        "--port",
                        str(port),
                        "--rate",
                        str(rate),
                        "--seconds",
                        str(args.seconds),
                        "--paths-file",
                        str(pf),
                        "--conns",
                        str(args.conns),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                res = json.loads(r.stdout)
                cpu_us = (tree_cpu_seconds(proc.pid) - cpu0) / res["sent"] * 1e6
                m1 = server_side_share(port)
                inside = (m1[1] - m0[1]) / max(1.0, m1[0] - m0[0])
                print(
                    f"HTTP GET /v1/groups/{{key}} at {rate:,.0f} req/s for {args.seconds:g}s "
                    f"({args.server}): p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                    f"p99.9 {res['p999_ms']:.3f} ms  max {res['max_ms']:.3f} ms  "
                    f"errors {res['errors']} {res['error_kinds'] or ''} of {res['sent']:,}  "
                    f"achieved {res['achieved_rps']:,.0f} req/s  server CPU {cpu_us:.0f} µs/req  "
                    f"loadgen CPU {res['loadgen_cpu_us_per_req']:.0f} µs/req, sent late by "
                    f"{res['send_late_mean_ms']:.2f} ms mean / {res['send_late_max_ms']:.1f} max  "
                    f"in-app ≤1 ms {inside:.2%}  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
