"""Group keys interned across polls: each distinct key gets a stable id once.

A decoder's :class:`KeyTable` maps a key's bytes to its id in a numba hash table, so a
poll's keys become ids in one call, and Python builds a key object only the first time
the key is seen. Consumers of the ids (the engine's home partitions, the model's rows)
can then keep per-id arrays and touch Python objects only for new keys.

Keys are stored as bytes: a ``str`` key as its UTF-8, an ``int`` key as ``\\x00#`` and its
digits. A ``str`` key that itself starts with ``\\x00`` is stored with one more ``\\x00``
in front, so that no ``str`` key is stored as an ``int`` key's bytes.

"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["KeyTable", "key_bytes"]

_OPTS = {"cache": True, "nogil": True}
_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)


def key_bytes(key: str | int) -> bytes:
    """The stored bytes of a key (an int and the str of its digits differ).

    >>> key_bytes("a"), key_bytes(7), key_bytes("\\x00#7")
    (b'a', b'\\x00#7', b'\\x00\\x00#7')

    """
    if type(key) is int:
        return b"\x00#" + str(key).encode()
    raw = key.encode("utf-8", "surrogatepass")
    return b"\x00" + raw if raw.startswith(b"\x00") else raw


@njit(**_OPTS)
def _hash(buf, s, e):  # pragma: no cover - numba
    h = _FNV_OFFSET
    for j in range(s, e):
        h = (h ^ np.uint64(buf[j])) * _FNV_PRIME
    return h


@njit(**_OPTS)
def _same(buf, s, e, store, a, b):  # pragma: no cover - numba
    if e - s != b - a:
        return False
    for j in range(e - s):
        if buf[s + j] != store[a + j]:
            return False
    return True


@njit(**_OPTS)
def _intern(buf, kpos, ok, slots, store, starts, n_keys, codes):  # pragma: no cover - numba
    """Ids of the byte strings ``buf[kpos[r, 0]:kpos[r, 1]]`` (rows with ``ok``; -1
    elsewhere) into ``codes``, new ones appended to ``store``/``starts`` (which have the
    room); returns the number of keys after."""
    mask = np.uint64(slots.shape[0] - 1)
    for r in range(kpos.shape[0]):
        if not ok[r]:
            codes[r] = -1
            continue
        s, e = kpos[r, 0], kpos[r, 1]
        slot = _hash(buf, s, e) & mask
        while True:
            u = slots[slot]
            if u < 0:
                a = starts[n_keys]
                store[a : a + e - s] = buf[s:e]
                starts[n_keys + 1] = a + e - s
                slots[slot] = n_keys
                codes[r] = n_keys
                n_keys += 1
                break
            if _same(buf, s, e, store, starts[u], starts[u + 1]):
                codes[r] = u
                break
            slot = (slot + np.uint64(1)) & mask
    return n_keys


@njit(**_OPTS)
def _rehash(store, starts, n_keys, slots):  # pragma: no cover - numba
    mask = np.uint64(slots.shape[0] - 1)
    for u in range(n_keys):
        slot = _hash(store, starts[u], starts[u + 1]) & mask
        while slots[slot] >= 0:
            slot = (slot + np.uint64(1)) & mask
        slots[slot] = u


class KeyTable:
    """Distinct group keys with stable ids, in order of first sight.

    Examples
    --------
    >>> kt = KeyTable()
    >>> kt.ids(["b", "a", "b", 1, "1"]).tolist(), kt.keys
    ([0, 1, 0, 2, 3], ['b', 'a', 1, '1'])
    >>> buf = b'"a""c"'
    >>> kt.ids_of_slices(buf, np.array([[1, 2], [4, 5]]), np.array([True, True])).tolist()
    [1, 4]
    >>> kt.keys[-1]
    'c'

    """

    def __init__(self) -> None:
        self.keys: list[str | int] = []
        self._slots = np.full(1024, -1, np.int64)
        self._store = np.empty(1 << 14, np.uint8)
        self._starts = np.zeros(513, np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def ids_of_slices(self, buf: bytes, kpos: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Ids of the ASCII ``str`` keys ``buf[kpos[r, 0]:kpos[r, 1]]`` (-1 where not
        ``ok``)."""
        return self._intern(buf, kpos, ok, lambda raw: raw.decode("ascii"))

    def ids(self, keys: list[str | int]) -> np.ndarray:
        """Ids of key objects."""
        raw = [key_bytes(k) for k in keys]
        ends = np.zeros(len(raw) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, raw), np.int64, len(raw)), out=ends[1:])
        kpos = np.stack([ends[:-1], ends[1:]], axis=1)
        key_of = dict(zip(raw, keys))
        return self._intern(b"".join(raw), kpos, np.ones(len(raw), np.bool_), key_of.__getitem__)

    def _intern(self, buf: bytes, kpos: np.ndarray, ok: np.ndarray, to_key) -> np.ndarray:
        n = kpos.shape[0]
        lens = (kpos[:, 1] - kpos[:, 0])[ok]
        self._reserve(int(lens.shape[0]), int(lens.sum()))
        codes = np.empty(n, np.int64)
        before = len(self.keys)
        view = np.frombuffer(buf, np.uint8)
        after = _intern(view, kpos, ok, self._slots, self._store, self._starts, before, codes)
        store, starts = self._store, self._starts
        for u in range(before, after):
            self.keys.append(to_key(store[starts[u] : starts[u + 1]].tobytes()))
        return codes

    def _reserve(self, keys: int, nbytes: int) -> None:
        """Room for ``keys`` more keys of ``nbytes`` bytes in all."""
        n = len(self.keys)
        if 2 * (n + keys) > self._slots.shape[0]:
            size = self._slots.shape[0]
            while 2 * (n + keys) > size:
                size *= 2
            self._slots = np.full(size, -1, np.int64)
            _rehash(self._store, self._starts, n, self._slots)
        if n + keys + 1 > self._starts.shape[0]:
            self._starts = _grown(self._starts, n + keys + 1)
        end = int(self._starts[n])
        if end + nbytes > self._store.shape[0]:
            self._store = _grown(self._store, end + nbytes)


def _grown(a: np.ndarray, need: int) -> np.ndarray:
    """``a`` copied into an array of at least ``need`` entries (doubling)."""
    size = a.shape[0]
    while size < need:
        size *= 2
    out = np.empty(size, a.dtype)
    out[: a.shape[0]] = a
    return out
