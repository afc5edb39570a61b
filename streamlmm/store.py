"""Local snapshot store: a directory of atomic, checksummed snapshot files.

Each write goes to a temporary file that is fsynced and then renamed into place, and
the directory is fsynced, so a crash leaves either the old set of files or the new one.
Readers take the newest file whose checksum verifies, so a corrupt or partial newest
file falls back to the previous one.

Reading never creates anything: :func:`load_snapshot` of a missing directory is a
clear ``FileNotFoundError``, and a path that is a file is a ``NotADirectoryError``.
Only a writer's store (``create=True``, or :meth:`LocalStore.write`) makes the directory.

:func:`save_snapshot` and :func:`load_snapshot` are the file functions behind
``Snapshot.save``/``Snapshot.load``. This module imports ``snapshot``; ``snapshot``
imports this module only inside those two thin wrappers, so there is no import cycle
at module level.

"""

from __future__ import annotations

import logging
import os
import pathlib
import re

from streamlmm.oserrors import doing
from streamlmm.snapshot import Snapshot, SnapshotError

__all__ = ["LocalStore", "DirectoryLock", "DirectoryInUse", "save_snapshot", "load_snapshot"]

log = logging.getLogger(__name__)


class DirectoryInUse(RuntimeError):
    """Another process writes snapshots to this directory (a user error: exit 2)."""


class DirectoryLock:
    """An exclusive, advisory lock of a snapshot directory for its one writer.

    ``fcntl.flock`` on ``DIR/.lock``: the operating system releases it when the process
    ends, however it ends (a crash, SIGKILL), so a stale lock never blocks a restart.
    The file keeps the holder's pid and what it is, for the message the next writer
    gets. Readers (``serve``, ``summary``, ``Snapshot.load``) take no lock.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> lock = DirectoryLock(d, "a test")
    >>> DirectoryLock(d, "another")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streamlmm.store.DirectoryInUse: snapshot directory ... is in use by pid ... (a test, since ...
    >>> lock.close(); DirectoryLock(d, "another").close()

    """

    NAME = ".lock"

    def __init__(self, directory, what: str):
        import datetime
        import fcntl

        self.path = pathlib.Path(directory) / self.NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DirectoryInUse(
                f"snapshot directory {directory} is in use by {holder}: one writer per "
                "directory (stop it, or give this one another --snapshot-dir)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}, since {now})\n".encode(), 0)
        self._fd: int | None = fd

    def close(self) -> None:
        """Release the lock (also released when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalStore:
    """Snapshots in one directory, newest last, keeping the ``keep`` newest.

    Parameters
    ----------
    directory
        The snapshot directory.
    keep
        How many valid snapshots to retain (older ones are removed after each write).
    create
        Make the directory if it is missing (a writer's store). Without it, a missing
        directory is an error when read and is made only by :meth:`write`.
    kind, reader
        The files' name (``{kind}-NNNNNNNNNNNN.slmm``) and how to read one
        (``reader(bytes)``, raising :class:`SnapshotError` if invalid): snapshots by
        default; posteriors (:class:`streamlmm.bayes.Posterior`) live beside them as
        ``posterior-…`` files.

    Examples
    --------
    >>> import tempfile, os
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(30):
    ...     m.learn_one({"g": i % 3, "x": float(i)}, float(i % 5))
    >>> d = tempfile.mkdtemp()
    >>> store = LocalStore(d)
    >>> path = store.write(m.snapshot())
    >>> store.latest().n_obs
    30.0
    >>> LocalStore(os.path.join(d, "nope")).latest() is None
    True
    >>> load_snapshot(os.path.join(d, "nope"))
    Traceback (most recent call last):
    ...
    FileNotFoundError: snapshot directory .../nope does not exist
    >>> os.path.exists(os.path.join(d, "nope"))
    False

    """

    def __init__(
        self, directory, keep: int = 3, create: bool = False, kind: str = "snapshot", reader=None
    ):
        self.dir = pathlib.Path(directory)
        self.keep = max(1, int(keep))
        self.kind = kind
        self._name = re.compile(rf"^{re.escape(kind)}-(\d{{12}})\.slmm$")
        self._reader = reader or Snapshot.from_bytes
        if self.dir.exists() and not self.dir.is_dir():
            raise NotADirectoryError(f"snapshot directory {self.dir} is a file, not a directory")
        if create:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # a file somewhere on the path
                raise NotADirectoryError(
                    f"cannot create snapshot directory {self.dir}: a file is in the way"
                ) from None

    def lock(self, what: str) -> DirectoryLock:
        """Take the directory for one writer (:class:`DirectoryLock`), or raise
        :class:`DirectoryInUse` naming the holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return DirectoryLock(self.dir, what)

    def _files(self) -> list[tuple[int, pathlib.Path]]:
        if not self.dir.is_dir():
            if self.dir.exists():
                raise NotADirectoryError(f"snapshot directory {self.dir} is not a directory")
            raise FileNotFoundError(f"snapshot directory {self.dir} does not exist")
        out = []
        for p in self.dir.iterdir():
            m = self._name.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def write(self, snapshot) -> pathlib.Path:
        """Write ``snapshot`` (anything with ``to_bytes()``) atomically as the newest
        file; returns its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        files = self._files()
        seq = files[-1][0] + 1 if files else 1
        path = self.dir / f"{self.kind}-{seq:012d}.slmm"
        tmp = self.dir / f".{path.name}.tmp-{os.getpid()}"
        data = snapshot.to_bytes()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise doing(f"writing a snapshot to {self.dir}", e) from None
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

    def latest(self):
        """The newest snapshot that verifies, or ``None`` if there is none (also when
        the directory does not exist: nothing is created)."""
        if not self.dir.exists():
            return None
        for _, path in reversed(self._files()):
            try:
                return self._reader(path.read_bytes())
            except (OSError, SnapshotError) as e:
                log.warning("skipping invalid %s %s: %s", self.kind, path.name, e)
        return None


def save_snapshot(snapshot: Snapshot, directory) -> str:
    """Write ``snapshot`` atomically into ``directory`` (created if missing); its path."""
    return str(LocalStore(directory).write(snapshot))


def load_snapshot(directory) -> Snapshot:
    """The newest valid snapshot in ``directory``; never creates anything.

    ``FileNotFoundError`` if the directory is missing or holds no valid snapshot.
    """
    store = LocalStore(directory)
    if not store.dir.exists():
        raise FileNotFoundError(f"snapshot directory {directory} does not exist")
    snap = store.latest()
    if snap is None:
        raise FileNotFoundError(f"no valid snapshot in {directory}")
    return snap
