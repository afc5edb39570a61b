"""uvicorn's httptools protocol: parser-level 400s as JSON, a bounded request head, and
each response sent in one write.

A request that the HTTP parser rejects (a request line that is not HTTP, raw bytes that
are not allowed in a URL, a URL over the parser's ~64 KiB) never reaches the app;
uvicorn answers it with a plain-text 400. This subclass answers it with the same JSON
error body as every other error. Named by import string in the uvicorn config, so that
``--workers`` processes can load it.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["JsonErrorsProtocol", "PROTOCOL", "MAX_HEAD_BYTES"]

PROTOCOL = "streamlmm.serve.protocol:JsonErrorsProtocol"
MAX_HEAD_BYTES = 128 << 10


class _OneWrite:
    """Transport proxy that sends a response's head and body in one write.

    uvicorn writes the status line and headers, then the body, as two writes: two
    system calls and two packets, so the client often wakes up twice. The head is held
    until the body's write (or the end of the response, or a close) and sent with it.
    """

    __slots__ = ("_t", "_head")

    def __init__(self, transport):
        self._t = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif (
            data.endswith(b"\r\n\r\n")
            and data.startswith(b"HTTP/1.1 ")
            and not data.startswith(b"HTTP/1.1 1")  # 100 Continue must go out at once
        ):
            self._head = data
            return
        self._t.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._t.write(head)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def __getattr__(self, name):
        return getattr(self._t, name)


class JsonErrorsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` whose 400 for unparseable requests is JSON, and which
    bounds a request's head (request line and headers) to ``MAX_HEAD_BYTES``: httptools
    itself buffers header values of any size."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._in_head = True
        super().connection_made(_OneWrite(transport))

    def on_response_complete(self) -> None:
        self.transport.flush()  # a HEAD or empty response: its head alone
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._in_head = False
                self.send_400_response(f"request head larger than {MAX_HEAD_BYTES} bytes")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()

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
