"""The main demo (``scripts/run``): simulate, stream, fit, serve, plot, summarise.

1. simulate the ``hospital`` scenario (:mod:`streamlmm.simulate`), keeping the events
   and their truth in the output directory;
2. stream the events into ``streamlmm run`` (a JSON-lines pipe, or a Kafka topic with
   ``--kafka``), printing a progress line: events/s, groups and the current variance
   components;
3. while the engine runs, look up one large and one small hospital over HTTP
   (``run --serve``), side by side with their raw means; without the HTTP server, the
   same lookups come from the snapshot files;
4. write the pictures (:mod:`streamlmm.plot`) and the lme4-style summary next to the
   simulated truth (:mod:`streamlmm.summary`), and say where everything is;
5. stop every process it started (``--keep-serving`` leaves a query server up and
   prints its URL and process id).

Settings: ``--events`` (``STREAMLMM_DEMO_EVENTS``), ``--out`` (``STREAMLMM_DEMO_DIR``),
``--port`` (``STREAMLMM_DEMO_PORT``), ``--rate`` (``STREAMLMM_DEMO_RATE``),
``--seed``; with ``--kafka``, the broker at ``--bootstrap`` (default
``127.0.0.1:$STREAMLMM_KAFKA_PORT``).

"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm.simulate import Simulation, scenario

__all__ = ["main", "key_path", "Lookup", "HttpLookup", "SnapshotLookup", "choose_groups"]

PY = [sys.executable, "-m", "streamlmm.cli"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def key_path(key: str | int) -> str:
    """The URL path segment that names a group key in the HTTP API.

    Integers are written as digits; strings that look like integers (or start with a
    quote) are written as JSON strings; everything is percent-encoded.

    >>> key_path("H001"), key_path(17), key_path("17"), key_path("a/b")
    ('H001', '17', '%2217%22', 'a%2Fb')

    """
    if isinstance(key, int):
        text = str(key)
    else:
        s = key.lstrip("-")
        looks_int = s.isascii() and s.isdigit() and s != ""
        text = json.dumps(key) if looks_int or key.startswith('"') else key
    return urllib.parse.quote(text, safe="")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_groups(truth: Mapping[str, Any]) -> tuple[str, str]:
    """The largest group, and a small group with a raw mean far from the population."""
    groups = truth["groups"]
    by_n = sorted(groups, key=lambda k: (groups[k]["n"], k))
    large = by_n[-1]
    small_ones = by_n[: max(3, len(by_n) // 10)]
    small = max(small_ones, key=lambda k: (abs(groups[k]["(Intercept)"]), k))
    return large, small


# -- lookups --------------------------------------------------------------------------------
class Lookup:
    """Model-level numbers and one group's effects from the live engine."""

    source = ""

    def model(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def group(self, key) -> dict[str, Any] | None:
        raise NotImplementedError


class HttpLookup(Lookup):
    """``GET /v1/model`` and ``GET /v1/groups/{key}`` on the engine's query server."""

    def __init__(self, base: str, timeout: float = 2.0):
        self.base, self.timeout = base.rstrip("/"), timeout
        self.source = f"HTTP {self.base}"

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code in (404, 503):  # unknown group yet / no snapshot yet
                return None
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def ready(self) -> bool:
        return self._get("/healthz") is not None

    def model(self) -> dict[str, Any] | None:
        return self._get("/v1/model")

    def group(self, key) -> dict[str, Any] | None:
        return self._get("/v1/groups/" + key_path(key))


class SnapshotLookup(Lookup):
    """The same answers read from the newest snapshot file (no HTTP server)."""

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.source = f"snapshot files in {directory} (no HTTP server available)"
        self._snap = None

    def _latest(self):
        from streamlmm.snapshot import Snapshot

        if self.dir.is_dir():
            with contextlib.suppress(FileNotFoundError, ValueError):
                self._snap = Snapshot.load(self.dir)
        return self._snap

    def model(self) -> dict[str, Any] | None:
        s = self._latest()
        if s is None:
            return None
        return {
            "n_events": s.n_events,
            "n_groups": s.n_groups,
            "re_names": list(s.re_names),
            "re_cov": s.re_cov.tolist(),
            "sigma": s.sigma,
            "fixef": dict(s.fixef),
        }

    def group(self, key) -> dict[str, Any] | None:
        s = self._snap
        if s is None or key not in s:
            return None
        return {
            "group": key,
            "ranef": s.ranef(key),
            "ranef_cov": s.ranef_cov(key).tolist(),
            "n": s.n(key),
            "shrinkage": s.shrinkage(key),
            "raw_mean": float(s.group_ybar[s.keys.index(key)]),
        }


def serve_available() -> bool:
    """Whether ``streamlmm run --serve`` exists here (the serve extra is installed)."""
    from streamlmm.cli import _parser

    ns, _ = _parser().parse_known_args(["run", "--serve", "1"])
    deps = all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn"))
    return getattr(ns, "serve", None) == 1 and deps


# -- the event feed -----------------------------------------------------------------------
class Feed:
    """Writes a simulation's events to a sink, keeping the running sums of the
    watched groups' responses so that their raw mean over the first n events is known."""

    def __init__(self, sim: Simulation, watch: tuple[str, ...], events_path: pathlib.Path):
        self.sim, self.watch = sim, watch
        self.events_path = events_path
        self.cum: dict[str, list[float]] = {k: [] for k in watch}
        self.written = 0
        self.error: BaseException | None = None
        self.response = sim.truth["formula"].split("~")[0].strip()

    def _events(self, rate: float | None):
        t0 = time.monotonic()
        group, y = self.sim.group, self.response
        with open(self.events_path, "w", encoding="utf-8") as fh:
            for e in self.sim.events:
                k = e[group]
                if k in self.cum:
                    c = self.cum[k]
                    c.append((c[-1] if c else 0.0) + e[y])
                line = json.dumps(e)
                fh.write(line + "\n")
                yield k, line
                self.written += 1
                if rate:
                    ahead = self.written / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    def raw_mean(self, key: str, n: float) -> float:
        c, m = self.cum.get(key, []), int(round(n))
        return c[m - 1] / m if 0 < m <= len(c) else float("nan")

    def to_pipe(self, pipe, rate: float | None) -> threading.Thread:
        def run():
            try:
                for _, line in self._events(rate):
                    pipe.write((line + "\n").encode())
            except BrokenPipeError:
                pass
            except BaseException as e:  # reported by the main thread
                self.error = e
            finally:
                with contextlib.suppress(OSError):
                    pipe.close()

        t = threading.Thread(target=run, name="feed", daemon=True)
        t.start()
        return t

    def to_kafka(self, bootstrap: str, topic: str, partitions: int = 3) -> None:
        from kafka import KafkaProducer
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)])
        finally:
            admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
        try:
            for k, line in self._events(None):
                producer.send(topic, key=k.encode(), value=line.encode())
            producer.flush()
        finally:
            producer.close()


# -- printing --------------------------------------------------------------------------------
def progress_line(model: Mapping[str, Any], rate: float) -> str:
    """``events, ev/s, groups, SDs, correlation, σ`` from a ``/v1/model`` answer.

    >>> progress_line({"n_events": 2000, "n_groups": 9, "re_names": ["(Intercept)"],
    ...                "re_cov": [[4.0]], "sigma": 1.5}, 1000.0)
    '[demo] events 2,000 | 1,000 ev/s | groups 9 | SD (Intercept) 2.000 | σ 1.500'

    """
    names = model["re_names"]
    cov = np.asarray(model["re_cov"], dtype=float)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    parts = [
        f"[demo] events {model['n_events']:,}",
        f"{rate:,.0f} ev/s",
        f"groups {model['n_groups']:,}",
    ]
    parts += [f"SD {n} {s:.3f}" for n, s in zip(names, sd)]
    if len(names) > 1 and sd[0] * sd[1] > 0:
        parts.append(f"corr {cov[0, 1] / (sd[0] * sd[1]):+.2f}")
    parts.append(f"σ {model['sigma']:.3f}")
    return " | ".join(parts)


def lookup_line(label: str, key: str, g: Mapping[str, Any] | None, raw: float, mu: float) -> str:
    """One looked-up group: n, raw mean, BLUP-based mean, shrinkage, 95% interval."""
    if g is None:
        return f"         {label:<6s} {key:<6s} not seen yet"
    b = g["ranef"]["(Intercept)"]
    sd = float(np.sqrt(max(g["ranef_cov"][0][0], 0.0)))
    return (
        f"         {label:<6s} {key:<6s} n {g['n']:>7,.0f} | raw mean {raw:7.3f} | "
        f"intercept effect {b:+7.3f} ± {1.96 * sd:5.3f} | shrinkage "
        f"{g['shrinkage']['(Intercept)']:.3f}"
    )


# -- the run ---------------------------------------------------------------------------------
def _env(name: str, default: str | None) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--kafka", action="store_true", help="stream through the local Kafka broker")
    p.add_argument("--keep-serving", action="store_true", help="leave a query server up")
    events = _env("STREAMLMM_DEMO_EVENTS", None)
    p.add_argument("--events", type=int, default=int(events) if events else None)
    p.add_argument("--seed", type=int, default=int(_env("STREAMLMM_DEMO_SEED", "2024")))
    rate = _env("STREAMLMM_DEMO_RATE", None)
    p.add_argument("--rate", type=float, default=float(rate) if rate else None)
    p.add_argument("--out", default=_env("STREAMLMM_DEMO_DIR", "demo-output"))
    port = _env("STREAMLMM_DEMO_PORT", None)
    p.add_argument("--port", type=int, default=int(port) if port else None)
    kport = _env("STREAMLMM_KAFKA_PORT", "9092")
    p.add_argument("--bootstrap", default=f"127.0.0.1:{kport}")
    p.add_argument(
        "--scenario",
        choices=("hospital", "web", "basic"),
        default=_env("STREAMLMM_DEMO_SCENARIO", "hospital"),
    )
    p.add_argument("--tick", type=float, default=1.5, help="seconds between progress lines")
    return p.parse_args(argv)


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns an exit code."""
    args = _parse(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    out = pathlib.Path(args.out).resolve()
    snapdir, plotdir = out / "snapshots", out / "plots"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(snapdir, ignore_errors=True)  # a fresh fit, not a resumed one
    events_path = out / "events.jsonl"
    truth_file = out / "events.jsonl.truth.json"

    sim = scenario(args.scenario, args.events, args.seed, n_groups=200)
    truth_file.write_text(json.dumps(sim.truth, indent=1) + "\n")
    large, small = choose_groups(sim.truth)
    feed = Feed(sim, (large, small), events_path)
    n = sim.n_events
    use_http = serve_available()
    port = args.port or free_port()
    say(
        f"[demo] {n:,} simulated {sim.name} events in {len(sim.truth['groups'])} groups "
        f"({sim.group}), formula {sim.formula}"
    )
    cmd = PY + [
        "run",
        "--formula",
        sim.formula,
        "--snapshot-dir",
        str(snapdir),
        "--until-end",
        "--snapshot-every-events",
        str(max(1_000, n // 40)),
        "--snapshot-every-seconds",
        "1",
        "--em-every",
        str(max(1_000, n // 40)),
        "--refit-every",
        str(max(5_000, n // 5)),
        "--progress-seconds",
        "5",
    ]
    if sim.truth.get("levels"):  # the scenario's factor levels, reference first
        cmd += ["--levels", json.dumps(sim.truth["levels"])]
    if use_http:
        cmd += ["--serve", str(port)]
    log_path = out / "engine.log"
    engine: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            if args.kafka:
                topic = f"streamlmm-demo-{int(time.time())}"
                say(f"[demo] producing to kafka://{args.bootstrap}/{topic} (keyed by hospital)")
                feed.to_kafka(args.bootstrap, topic)
                cmd += [
                    "--source",
                    f"kafka://{args.bootstrap}/{topic}",
                    "--consumer-group",
                    topic,
                ]
                engine = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                writer = None
            else:
                cmd += ["--source", "jsonl:-"]
                engine = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT
                )
                writer = feed.to_pipe(engine.stdin, args.rate)
            look: Lookup = (
                HttpLookup(f"http://127.0.0.1:{port}") if use_http else SnapshotLookup(snapdir)
            )
            say(f"[demo] engine pid {engine.pid}; lookups from {look.source}")
            _watch(engine, look, feed, (large, small), args.tick, snapdir)
            code = engine.wait()
            if writer is not None:
                writer.join(5)
        if feed.error is not None:
            raise RuntimeError(f"event feed failed: {feed.error}")
        if code != 0:
            say(f"[demo] the engine exited with {code}; its log ({log_path}):")
            say(log_path.read_text()[-3000:])
            return code
        wall = time.monotonic() - started
        say(f"[demo] streamed {n:,} events in {wall:.1f} s ({n / wall:,.0f} ev/s end to end)")
        _report(snapdir, plotdir, truth_file, out, events_path, log_path)
        if args.keep_serving:
            server = _keep_serving(snapdir, port, out)
            if server is None:
                return 1
            server = None  # left running on purpose
        return 0
    except KeyboardInterrupt:
        say("[demo] interrupted: stopping")
        return 130
    finally:
        _stop(engine)
        _stop(server)


def _watch(
    engine, look: Lookup, feed: Feed, keys: tuple[str, str], tick: float, snapdir=None
) -> None:
    """Progress and lookups every ``tick`` seconds while the engine runs, and once more
    from the final snapshot if the engine finished before anything was shown."""
    last_n, last_t = 0, time.monotonic()
    while True:
        done = engine.poll() is not None
        if done and last_n == 0 and snapdir is not None:
            look = SnapshotLookup(snapdir)  # a short stream: show the final snapshot
        elif not done:
            time.sleep(tick)
        m = look.model()
        now = time.monotonic()
        if m is not None and m["n_events"] != last_n:
            rate = (m["n_events"] - last_n) / (now - last_t) if now > last_t else 0.0
            last_n, last_t = m["n_events"], now
            say(progress_line(m, rate))
            for label, key in zip(("large", "small"), keys):
                g = look.group(key)
                raw = float("nan")
                if g is not None:
                    raw = g.get("raw_mean", feed.raw_mean(key, g["n"]))
                say(lookup_line(label, key, g, raw, m["fixef"]["(Intercept)"]))
        if done:
            return


def _report(snapdir, plotdir, truth_file, out, events_path, log_path) -> None:
    from streamlmm.summary import format_summary, load_snapshot

    snap = load_snapshot(snapdir)
    truth = json.loads(truth_file.read_text())
    plots: dict[str, str] = {}
    try:
        from streamlmm.plot import plot_all

        plots = plot_all(snap, plotdir)
    except ImportError as e:
        say(f"[demo] no pictures: {e}")
    text = format_summary(snap, truth=truth)
    (out / "summary.txt").write_text(text + "\n")
    say("")
    say(text)
    say("")
    say("[demo] where everything is:")
    rows = [
        ("events", events_path),
        ("truth", truth_file),
        ("snapshots", snapdir),
        ("engine log", log_path),
        ("summary", out / "summary.txt"),
    ] + [(f"plot {k}", v) for k, v in plots.items()]
    for name, path in rows:
        say(f"  {name:<18s} {path}")
    say(f"  again: streamlmm summary {snapdir} --vs-truth {truth_file}")


def _keep_serving(snapdir, port: int, out) -> subprocess.Popen | None:
    if not serve_available():
        say("[demo] --keep-serving needs `streamlmm serve` (the serve extra); not available")
        return None
    log = open(out / "serve.log", "wb")  # noqa: SIM115 - the server keeps it
    proc = subprocess.Popen(
        PY + ["serve", "--snapshot-dir", str(snapdir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    http = HttpLookup(f"http://127.0.0.1:{port}", timeout=1.0)
    for _ in range(100):
        if http.ready():
            url = f"http://127.0.0.1:{port}"
            say(f"[demo] serving at {url} (pid {proc.pid}; stop it with: kill {proc.pid})")
            say(f"  try: curl {url}/v1/model   curl {url}/v1/groups/H001")
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    say(f"[demo] the query server did not start; see {out / 'serve.log'}")
    _stop(proc)
    return None


if __name__ == "__main__":
    sys.exit(main())
