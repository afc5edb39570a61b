"""uvicorn's httptools protocol with its parser-level 400s answered as JSON.

A request that the HTTP parser rejects (a request line that is not HTTP, raw bytes that
are not allowed in a URL, a URL over the parser's ~64 KiB) never reaches the app;
uvicorn answers it with a plain-text 400. This subclass answers it with the same JSON
error body as every other error. Named by import string in the uvicorn config, so that
``--workers`` processes can load it.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["JsonErrorsProtocol", "PROTOCOL"]

PROTOCOL = "streamlmm.serve.protocol:JsonErrorsProtocol"


class JsonErrorsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` whose 400 for unparseable requests is JSON."""

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
