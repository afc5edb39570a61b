"""Local snapshot store: a directory of atomic, checksummed snapshot files.

Each write goes to a temporary file that is fsynced and then renamed into place, and
the directory is fsynced, so a crash leaves either the old set of files or the new one.
Readers take the newest file whose checksum verifies, so a corrupt or partial newest
file falls back to the previous one.

"""

from __future__ import annotations

import logging
import os
import pathlib
import re

from streamlmm.snapshot import Snapshot, SnapshotError

__all__ = ["LocalStore"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^snapshot-(\d{12})\.slmm$")


class LocalStore:
    """Snapshots in one directory, newest last, keeping the ``keep`` newest.

    Parameters
    ----------
    directory
        Created if missing.
    keep
        How many valid snapshots to retain (older ones are removed after each write).

    Examples
    --------
    >>> import tempfile
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(30):
    ...     m.learn_one({"g": i % 3, "x": float(i)}, float(i % 5))
    >>> d = tempfile.mkdtemp()
    >>> store = LocalStore(d)
    >>> path = store.write(m.snapshot())
    >>> store.latest().n_obs
    30.0

    """

    def __init__(self, directory, keep: int = 3):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, int(keep))

    def _files(self) -> list[tuple[int, pathlib.Path]]:
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def write(self, snapshot: Snapshot) -> pathlib.Path:
        """Write ``snapshot`` atomically as the newest file; returns its path."""
        files = self._files()
        seq = files[-1][0] + 1 if files else 1
        path = self.dir / f"snapshot-{seq:012d}.slmm"
        tmp = self.dir / f".{path.name}.tmp-{os.getpid()}"
        data = snapshot.to_bytes()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir()
        for _, old in files[: max(0, len(files) + 1 - self.keep)]:
            old.unlink(missing_ok=True)
        return path

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def latest(self) -> Snapshot | None:
        """The newest snapshot that verifies, or ``None`` if there is none."""
        for _, path in reversed(self._files()):
            try:
                return Snapshot.from_bytes(path.read_bytes())
            except (OSError, SnapshotError) as e:
                log.warning("skipping invalid snapshot %s: %s", path.name, e)
        return None
