"""Query service: group effects and predictions over HTTP, and in-process lookups.

* :class:`SnapshotReader` follows the newest snapshot in a directory (in-process);
* :func:`start_server` serves the HTTP API from a background thread (``run --serve``);
* ``streamlmm serve --snapshot-dir DIR`` serves it from a directory.

See ``docs/serve.md`` for the endpoints, key naming and the interval definitions.
"""

from __future__ import annotations

from streamlmm.serve.reader import Current, SnapshotHolder, SnapshotReader

__all__ = ["SnapshotReader", "SnapshotHolder", "Current", "start_server"]


def start_server(*args, **kwargs):
    """See :func:`streamlmm.serve.server.start_server` (imports the HTTP stack lazily)."""
    from streamlmm.serve.server import start_server as _start

    return _start(*args, **kwargs)
