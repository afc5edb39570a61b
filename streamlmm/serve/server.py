"""Run the query API: ``streamlmm serve`` and the engine's ``run --serve``.

``streamlmm serve --snapshot-dir DIR`` follows the newest snapshot in ``DIR`` with a
:class:`~streamlmm.serve.reader.SnapshotReader`. Inside the engine,
:func:`start_server` runs the same app in a background thread of the engine's own
process, and the engine calls ``server.publish(snapshot)`` after each checkpoint, so
requests are answered from its in-memory snapshots.

The server is uvicorn (httptools parser, uvloop event loop) running the Starlette app;
see ``docs/serve.md`` for why.

"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import threading
import time

from streamlmm.oserrors import doing
from streamlmm.serve.reader import SnapshotHolder, SnapshotReader
from streamlmm.snapshot import Snapshot

__all__ = [
    "ServerHandle",
    "start_server",
    "listen_socket",
    "add_serve_arguments",
    "serve_command",
    "DEFAULT_PORT",
]

log = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _require() -> None:
    """A clear error when the ``serve`` extra is not installed."""
    try:
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"the query server needs the 'serve' extra ({e.name} is missing): "
            "pip install 'streamlmm[serve]'"
        ) from e


def _options(host: str, port: int) -> dict:
    from streamlmm.serve.protocol import PROTOCOL

    return dict(
        host=host,
        port=port,
        loop="uvloop",
        http=PROTOCOL,
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        limit_concurrency=1000,
        timeout_keep_alive=30,
    )


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server to listen on, or an error that
    says so in one line (an address in use, a host that does not resolve, a port out of
    range), before anything else starts.

    >>> s = listen_socket("127.0.0.1", 0); s.listen()
    >>> listen_socket("127.0.0.1", s.getsockname()[1])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    OSError: [Errno 98] listening on 127.0.0.1:...: Address already in use
    >>> s.close()

    """
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise ValueError(f"port must be between 0 and 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"host {host!r} does not resolve: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise doing(f"listening on {host}:{port}", e) from None
    return sock


def _config(app, host: str, port: int):
    import uvicorn

    return uvicorn.Config(app, **_options(host, port))


def app_from_env():
    """App factory for ``--workers`` processes: each follows the directory itself."""
    from streamlmm.serve.app import create_app

    return create_app(
        SnapshotReader(
            os.environ["STREAMLMM_SERVE_SNAPSHOT_DIR"],
            interval=float(os.environ.get("STREAMLMM_SERVE_POLL_SECONDS", "0.5")),
            freeze_gc=True,
        )
    )


class ServerHandle:
    """A server running in a background thread of this process.

    Use :func:`start_server`; then :meth:`publish` each new snapshot and :meth:`stop`.
    """

    def __init__(self, holder: SnapshotHolder, host: str, port: int):
        _require()
        import uvicorn

        from streamlmm.serve.app import create_app

        self.holder = holder
        self.host = host
        self._sock = listen_socket(host, port)  # an address in use is an error here
        self._server = uvicorn.Server(_config(create_app(holder), host, port))
        self._thread = threading.Thread(target=self._run, name="streamlmm-serve", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by start()
            self._error = e

    def start(self, timeout: float = 30.0) -> ServerHandle:
        """Start serving; returns once the socket listens (``RuntimeError`` if it fails)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start on {self.host}: {self._error}")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    def publish(self, snapshot: Snapshot, version: int | None = None) -> None:
        """Answer from ``snapshot`` from now on (an atomic swap)."""
        self.holder.publish(snapshot, version)

    def close(self) -> None:
        """:meth:`stop` (the engine closes its resources alike)."""
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()


def start_server(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, snapshot: Snapshot | None = None
) -> ServerHandle:
    """Serve the API from a background thread; ``publish`` snapshots to it.

    Examples
    --------
    >>> import json, urllib.request
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(30):
    ...     m.learn_one({"g": i % 3, "x": float(i)}, float(i % 5))
    >>> server = start_server(port=0)
    >>> server.publish(m.snapshot())
    >>> url = f"http://127.0.0.1:{server.port}/v1/groups/1"
    >>> body = json.load(urllib.request.urlopen(url))
    >>> body["group"], body["snapshot"]["version"]
    (1, 1)
    >>> server.stop()

    """
    holder = SnapshotHolder()
    if snapshot is not None:
        holder.publish(snapshot)
    return ServerHandle(holder, host, port).start()


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``streamlmm serve`` flags."""
    p.description = (
        "Answer HTTP queries (group effects, predictions, the model; OpenAPI at "
        "/openapi.json) from the newest snapshot in --snapshot-dir, swapping in new "
        "snapshots as the engine writes them."
    )
    p.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="directory the engine writes snapshots to; it must exist (an empty one is "
        "served with /readyz 503 until the first snapshot) [required unless --state-topic]",
    )
    p.add_argument(
        "--state-topic",
        metavar="TOPIC",
        help="scale-out: answer for the whole model from the workers' state topic "
        "(kafka://HOST:PORT/NAME or NAME with --bootstrap) and the fitter's --params-topic",
    )
    p.add_argument("--params-topic", metavar="TOPIC", help="the fitter's params topic")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap for bare topic names")
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default %(default)s)")
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port, 0 for any free one (default %(default)s)",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=0.5,
        help="how often to look for a newer snapshot (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port, each with its own copy of the snapshot "
        "(default %(default)s)",
    )
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """``streamlmm serve``: answer queries from the newest snapshot in a directory."""
    _require()
    import uvicorn

    from streamlmm.serve.app import create_app

    if not args.workers >= 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not args.poll_seconds > 0:
        raise ValueError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
    if args.state_topic or args.params_topic:
        if not (args.state_topic and args.params_topic):
            raise ValueError("--state-topic and --params-topic go together")
        if args.workers > 1:
            raise ValueError("--workers applies to --snapshot-dir, not to --state-topic")
    elif not args.snapshot_dir:
        raise ValueError("--snapshot-dir is required (or --state-topic with --params-topic)")
    if args.snapshot_dir and not (args.state_topic or args.params_topic):
        if not os.path.exists(args.snapshot_dir):
            raise FileNotFoundError(
                f"snapshot directory {args.snapshot_dir} does not exist (give the directory "
                "an engine writes: `streamlmm run --snapshot-dir`)"
            )
        if not os.path.isdir(args.snapshot_dir):
            raise NotADirectoryError(f"--snapshot-dir {args.snapshot_dir} is not a directory")
    sock = listen_socket(args.host, args.port)  # an address in use: one line, exit 2
    if args.workers > 1:  # uvicorn's supervisor; each worker loads and follows the directory
        sock.close()  # uvicorn binds its own, shared by the workers
        os.environ["STREAMLMM_SERVE_SNAPSHOT_DIR"] = str(args.snapshot_dir)
        os.environ["STREAMLMM_SERVE_POLL_SECONDS"] = str(args.poll_seconds)
        uvicorn.run(
            "streamlmm.serve.server:app_from_env",
            factory=True,
            workers=args.workers,
            **_options(args.host, args.port),
        )
        return 0
    try:
        if args.state_topic:
            from streamlmm.serve.reader import StateReader
            from streamlmm.stream.config import load_kafka_settings

            reader = StateReader(
                args.state_topic,
                args.params_topic,
                args.bootstrap,
                load_kafka_settings(),
                interval=max(args.poll_seconds, 0.1),
            )
        else:
            reader = SnapshotReader(args.snapshot_dir, interval=args.poll_seconds, freeze_gc=True)
    except BaseException:
        sock.close()
        raise
    gc.freeze()  # also when no snapshot is there yet: the imported modules
    if reader.current is None:
        log.warning(
            "no snapshot from %s yet; /readyz is 503 until one appears",
            args.snapshot_dir or args.state_topic,
        )
    else:
        log.info("serving snapshot version %d", reader.current.version)
    server = uvicorn.Server(_config(create_app(reader), args.host, args.port))
    try:
        server.run(sockets=[sock])
    finally:
        reader.close()
        sock.close()
    return 0
