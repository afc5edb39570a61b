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
import logging
import threading
import time

from streamlmm.serve.reader import SnapshotHolder, SnapshotReader
from streamlmm.snapshot import Snapshot

__all__ = ["ServerHandle", "start_server", "add_serve_arguments", "serve_command", "DEFAULT_PORT"]

log = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _protocol():
    """uvicorn's httptools protocol, with its parser-level 400s (a request line that is
    not HTTP, a URL over the parser's ~64 KiB) answered as JSON like every other error."""
    import orjson
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class JsonErrorsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            body = orjson.dumps({"error": msg, "status": 400})
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
            self.transport.write(b"".join(head))
            self.transport.close()

    return JsonErrorsProtocol


def _config(app, host: str, port: int):
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=_protocol(),
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        limit_concurrency=1000,
        timeout_keep_alive=30,
    )


class ServerHandle:
    """A server running in a background thread of this process.

    Use :func:`start_server`; then :meth:`publish` each new snapshot and :meth:`stop`.
    """

    def __init__(self, holder: SnapshotHolder, host: str, port: int):
        import uvicorn

        from streamlmm.serve.app import create_app

        self.holder = holder
        self.host = host
        self._server = uvicorn.Server(_config(create_app(holder), host, port))
        self._thread = threading.Thread(target=self._run, name="streamlmm-serve", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve())
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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)


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
    p.add_argument("--snapshot-dir", required=True, help="directory the engine writes snapshots to")
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=0.5,
        help="how often to look for a newer snapshot (default %(default)s)",
    )
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """``streamlmm serve``: answer queries from the newest snapshot in a directory."""
    import uvicorn

    from streamlmm.serve.app import create_app

    reader = SnapshotReader(args.snapshot_dir, interval=args.poll_seconds)
    if reader.current is None:
        log.warning(
            "no valid snapshot in %s yet; /readyz is 503 until one appears", args.snapshot_dir
        )
    else:
        log.info("serving snapshot version %d", reader.current.version)
    server = uvicorn.Server(_config(create_app(reader), args.host, args.port))
    try:
        server.run()
    finally:
        reader.close()
    return 0
