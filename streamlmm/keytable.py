"""Distinct keys by a numba hash table: each key gets an id, in order of first sight.

Two users share the table. The stream decoder's :class:`KeyTable` interns group keys
across polls, so a poll's keys become ids in one call and a Python key object is built
only the first time a key is seen. ``learn_many`` factorizes a batch's group column
with it: :func:`factorize_strs` for ``str`` keys (joined into one UTF-8 buffer per chunk,
so that no key object is hashed in Python) and :func:`factorize_ints` for integers.

Keys are byte strings: a ``str`` key as its UTF-8 (``surrogatepass``: a lone surrogate
is a key too, and distinct strings stay distinct), an ``int`` key interned by
:meth:`KeyTable.ids` as ``\\x00#`` and its digits. A ``str`` key that itself starts
with ``\\x00`` is stored with one more ``\\x00`` in front there, so that no ``str`` key
is stored as an ``int`` key's bytes.

The table is open addressing with linear probing, kept at most a quarter full (each
extra probe is a mispredicted branch, which costs more than the memory). A slot holds
a 64-bit tag and the key's id. A key shorter than 8 bytes is its own tag (its bytes,
and its length + 1 in the top byte), so equal tags are equal keys; a longer key's tag
is ``0xFF`` in the top byte and 56 bits of a hash of its bytes, confirmed against the
key's bytes, which the table keeps.

"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["KeyTable", "key_bytes", "factorize_strs", "factorize_ints"]

_OPTS = {"cache": True, "nogil": True}
# the passes only read and write arrays they are given: compiled without NRT they carry
# no reference counting of the arrays passed to their inlined helpers
_PASS = {**_OPTS, "_nrt": False}
_GOLD = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: Fibonacci hashing
_LONG = np.uint64(0xFF) << np.uint64(56)  # top byte of a long key's tag
_LOAD = 3  # the table is grown beyond 1/_LOAD full
_CHUNK = 1 << 15  # keys joined per str buffer (its key objects stay in the cache)


def key_bytes(key: str | int) -> bytes:
    """The stored bytes of a key (an int and the str of its digits differ).

    >>> key_bytes("a"), key_bytes(7), key_bytes("\\x00#7")
    (b'a', b'\\x00#7', b'\\x00\\x00#7')

    """
    if type(key) is int:
        return b"\x00#" + str(key).encode()
    raw = key.encode("utf-8", "surrogatepass")
    return b"\x00" + raw if raw.startswith(b"\x00") else raw


# -- kernels ------------------------------------------------------------------------------
@njit(inline="always", **_OPTS)
def _word(buf, s):  # pragma: no cover - numba
    """The 8 bytes ``buf[s:s + 8]`` as a little-endian word (one unaligned load)."""
    w = np.uint64(0)
    for i in range(8):
        w |= np.uint64(buf[s + i]) << np.uint64(8 * i)
    return w


@njit(inline="always", **_OPTS)
def _short_tag(buf, s, e):  # pragma: no cover - numba
    """The tag of a key ``buf[s:e]`` of fewer than 8 bytes: the key and its length."""
    n = e - s
    if s + 8 <= buf.shape[0]:
        w = _word(buf, s) & ((np.uint64(1) << np.uint64(8 * n)) - np.uint64(1))
    else:
        w = np.uint64(0)
        for i in range(n):
            w |= np.uint64(buf[s + i]) << np.uint64(8 * i)
    return w | (np.uint64(n + 1) << np.uint64(56))


@njit(**_OPTS)
def _long_tag(buf, s, e):  # pragma: no cover - numba
    """The tag of a key ``buf[s:e]`` of 8 bytes or more: 56 bits of a hash of it."""
    h = np.uint64(e - s) * _GOLD
    j = s
    while j + 8 <= e:
        h = (h ^ _word(buf, j)) * _GOLD
        h ^= h >> np.uint64(29)
        j += 8
    w = np.uint64(0)
    for i in range(e - j):
        w |= np.uint64(buf[j + i]) << np.uint64(8 * i)
    h = (h ^ w) * _GOLD
    h ^= h >> np.uint64(32)
    return (h >> np.uint64(8)) | _LONG


@njit(inline="always", **_OPTS)
def _tag(buf, s, e):  # pragma: no cover - numba
    """The tag of the key ``buf[s:e]``."""
    return _short_tag(buf, s, e) if e - s < 8 else _long_tag(buf, s, e)


@njit(inline="always", **_OPTS)
def _same(buf, s, e, store, a, b):  # pragma: no cover - numba
    if e - s != b - a:
        return False
    for j in range(e - s):
        if buf[s + j] != store[a + j]:
            return False
    return True


@njit(inline="always", **_OPTS)
def _shift(cap):  # pragma: no cover - numba
    """``64 - log2(cap)``: a Fibonacci hash shifted by it is a slot."""
    s = 64
    while cap > 1:
        cap >>= 1
        s -= 1
    return np.uint64(s)


@njit(inline="always", **_OPTS)
def _claim(slot, r, n_keys, ids, first, codes):  # pragma: no cover - numba
    """Give the key of row ``r`` the next id, ``n_keys``, in table slot ``slot``; the
    number of keys after it."""
    ids[slot] = n_keys
    first[n_keys] = r
    codes[r] = n_keys
    return n_keys + 1


@njit(**_PASS)
def _tags_of(buf, lo, hi, ok, tags):  # pragma: no cover - numba
    """The tag of each key ``buf[lo[r]:hi[r]]`` (0 where not ``ok``): a pass of its own,
    free of the probes' mispredicted branches."""
    L = buf.shape[0]
    for r in range(lo.shape[0]):
        s, e = lo[r], hi[r]
        n = e - s
        if not ok[r]:  # its slice may be anything
            tags[r] = 0
        elif n < 8 and s + 8 <= L:  # most keys: branch-free
            tags[r] = (_word(buf, s) & ((np.uint64(1) << np.uint64(8 * n)) - np.uint64(1))) | (
                np.uint64(n + 1) << np.uint64(56)
            )
        else:
            tags[r] = _tag(buf, s, e)


@njit(**_PASS)
def _intern(
    buf, lo, hi, keytags, r0, codes, tags, ids, store, starts, first, n_keys
):  # pragma: no cover
    """Ids of the keys ``buf[lo[r]:hi[r]]`` of tags ``keytags`` (from
    :func:`_tags_of`) into ``codes`` (-1 for a tag 0), from row ``r0`` on. A new key gets
    the next id, its bytes appended to ``store`` (key ``u`` is
    ``store[starts[u]:starts[u + 1]]``) and its row to ``first``. Stops when the table
    needs room: returns ``(row reached, keys)``."""
    cap = tags.shape[0]
    mask = np.uint64(cap - 1)
    shift = _shift(cap)
    full = min(cap // _LOAD, starts.shape[0] - 1)
    for r in range(r0, lo.shape[0]):
        tag = keytags[r]
        if tag == 0:
            codes[r] = -1
            continue
        slot = (tag * _GOLD) >> shift
        while True:
            t = tags[slot]
            if t == tag:
                u = ids[slot]
                if tag < _LONG or _same(buf, lo[r], hi[r], store, starts[u], starts[u + 1]):
                    codes[r] = u
                    break
            elif t == 0:
                s, e = lo[r], hi[r]
                a = starts[n_keys]
                if n_keys >= full or a + e - s > store.shape[0]:
                    return r, n_keys
                for j in range(e - s):
                    store[a + j] = buf[s + j]
                starts[n_keys + 1] = a + e - s
                tags[slot] = tag
                n_keys = _claim(slot, r, n_keys, ids, first, codes)
                break
            slot = (slot + np.uint64(1)) & mask
    return lo.shape[0], n_keys


@njit(**_PASS)
def _rehash(store, starts, n_keys, tags, ids):  # pragma: no cover - numba
    mask = np.uint64(tags.shape[0] - 1)
    shift = _shift(tags.shape[0])
    for u in range(n_keys):
        tag = _tag(store, starts[u], starts[u + 1])
        slot = (tag * _GOLD) >> shift
        while tags[slot] != 0:
            slot = (slot + np.uint64(1)) & mask
        tags[slot] = tag
        ids[slot] = u


@njit(**_PASS)
def _split(buf, ends):  # pragma: no cover - numba
    """The positions of the ``\\x00`` separators of ``buf`` into ``ends[1:]``, and
    ``len(buf)`` after them (``ends[0]`` is -1): returns the number of keys, or -1 if
    there are more than ``len(ends) - 1``."""
    m = ends.shape[0] - 1
    ends[0] = -1
    c = 1
    for j in range(buf.shape[0]):
        ends[c] = j  # branch-free: the last write before a separator's ``c += 1`` stays
        c += buf[j] == 0
        if c > m:
            return -1
    ends[c] = buf.shape[0]
    return c


@njit(**_PASS)
def _intern_ints(values, r0, codes, slots, ids, first, n_keys):  # pragma: no cover - numba
    """:func:`_intern` for int64 keys (``slots`` hold the keys; -1 in ``ids``: empty)."""
    cap = slots.shape[0]
    mask = np.uint64(cap - 1)
    shift = _shift(cap)
    full = cap // 4
    for r in range(r0, values.shape[0]):
        v = values[r]
        slot = (np.uint64(v) * _GOLD) >> shift
        while True:
            u = ids[slot]
            if u < 0:
                if n_keys >= full:
                    return r, n_keys
                slots[slot] = v
                n_keys = _claim(slot, r, n_keys, ids, first, codes)
                break
            if slots[slot] == v:
                codes[r] = u
                break
            slot = (slot + np.uint64(1)) & mask
    return values.shape[0], n_keys


# -- the table ----------------------------------------------------------------------------
class KeyTable:
    """Distinct byte-string keys with stable ids, in order of first sight.

    :meth:`intern` gives the ids of byte slices; :meth:`ids` and :meth:`ids_of_slices`
    also keep the key objects in :attr:`keys` (the stream decoder's use).

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
        self.n = 0  # distinct keys interned
        self._tags = np.zeros(1024, np.uint64)
        self._ids = np.empty(1024, np.int32)
        self._store = np.empty(1 << 14, np.uint8)
        self._starts = np.zeros(257, np.int64)
        self._first = np.empty(256, np.int64)

    def __len__(self) -> int:
        return self.n

    def intern(self, buf: np.ndarray, lo, hi, ok: np.ndarray, codes: np.ndarray) -> None:
        """Ids of the keys ``buf[lo[r]:hi[r]]`` into ``codes`` (-1 where not ``ok``);
        :attr:`n` grows by the new keys, and key ``u`` added by this call was first seen
        in row ``first_rows(n_before)[u - n_before]``.

        >>> kt, codes = KeyTable(), np.empty(3, np.int64)
        >>> buf = np.frombuffer(b"abab", np.uint8)
        >>> kt.intern(buf, np.arange(3), np.arange(1, 4), np.ones(3, bool), codes)
        >>> codes.tolist(), kt.n, kt.first_rows(0).tolist()
        ([0, 1, 0], 2, [0, 1])

        """
        r, m = 0, lo.shape[0]
        keytags = np.empty(m, np.uint64)
        _tags_of(buf, lo, hi, ok, keytags)
        while True:
            r, self.n = _intern(
                buf,
                lo,
                hi,
                keytags,
                r,
                codes,
                self._tags,
                self._ids,
                self._store,
                self._starts,
                self._first,
                self.n,
            )
            if r == m:
                return
            self._make_room(int(hi[r] - lo[r]))

    def first_rows(self, since: int) -> np.ndarray:
        """Rows (of the call that added them) where keys ``since`` … ``n - 1`` were first
        seen."""
        return self._first[since : self.n]

    def key_bytes_of(self, u: int) -> bytes:
        """The stored bytes of key ``u``."""
        return self._store[self._starts[u] : self._starts[u + 1]].tobytes()

    def ids_of_slices(self, buf: bytes, kpos: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Ids of the ASCII ``str`` keys ``buf[kpos[r, 0]:kpos[r, 1]]`` (-1 where not
        ``ok``)."""
        return self._objects(buf, kpos, ok, lambda raw: raw.decode("ascii"))

    def ids(self, keys: list[str | int]) -> np.ndarray:
        """Ids of key objects."""
        raw = [key_bytes(k) for k in keys]
        ends = np.zeros(len(raw) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, raw), np.int64, len(raw)), out=ends[1:])
        kpos = np.stack([ends[:-1], ends[1:]], axis=1)
        key_of = dict(zip(raw, keys))
        return self._objects(b"".join(raw), kpos, np.ones(len(raw), np.bool_), key_of.__getitem__)

    def _objects(self, buf: bytes, kpos: np.ndarray, ok: np.ndarray, to_key) -> np.ndarray:
        codes = np.empty(kpos.shape[0], np.int64)
        before = self.n
        self.intern(np.frombuffer(buf, np.uint8), kpos[:, 0], kpos[:, 1], ok, codes)
        self.keys.extend(to_key(self.key_bytes_of(u)) for u in range(before, self.n))
        return codes

    def _make_room(self, nbytes: int) -> None:
        """Room for one more key of ``nbytes`` bytes (sizes grow 4×: few rehashes)."""
        n = self.n
        if n + 1 > self._tags.shape[0] // _LOAD:
            size = 2 * self._tags.shape[0]
            self._tags = np.zeros(size, np.uint64)
            self._ids = np.empty(size, np.int32)
            _rehash(self._store, self._starts, n, self._tags, self._ids)
        if n + 2 > self._starts.shape[0]:
            self._starts = _grown(self._starts, 4 * self._starts.shape[0])
            self._first = _grown(self._first, self._starts.shape[0] - 1)
        end = int(self._starts[n])
        if end + nbytes > self._store.shape[0]:
            self._store = _grown(self._store, max(end + nbytes, 4 * self._store.shape[0]))


def _grown(a: np.ndarray, need: int) -> np.ndarray:
    """``a`` copied into an array of at least ``need`` entries (doubling)."""
    size = a.shape[0]
    while size < need:
        size *= 2
    out = np.empty(size, a.dtype)
    out[: a.shape[0]] = a
    return out


# -- factorizing a column -----------------------------------------------------------------
def factorize_strs(arr: np.ndarray, chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray] | None:
    """Codes of a 1-d array of ``str`` and the rows of first sight of each distinct
    value (``uniques = arr[first]``, in order of first appearance), or ``None`` when an
    element is not a ``str`` (``None``, NaN, an int…) or contains ``"\\x00"``.

    The strings are joined with ``"\\x00"`` a chunk at a time, encoded once, and the
    chunk's keys interned in one numba pass: two strings get the same code exactly
    when they are equal.

    >>> arr = np.array(["b", "é", "b", "", "\\ud800", "é"], dtype=object)
    >>> codes, first = factorize_strs(arr)
    >>> codes.tolist(), arr[first].tolist()
    ([0, 1, 0, 2, 3, 1], ['b', 'é', '', '\\ud800'])
    >>> factorize_strs(np.array(["a", None], dtype=object)) is None
    True
    >>> factorize_strs(np.array(["a\\x00b", "a"], dtype=object)) is None
    True

    """
    n = arr.shape[0]
    codes = np.empty(n, np.int64)
    first = np.empty(0, np.int64)
    kt = KeyTable()
    ends = np.empty(min(chunk, n) + 1, np.int64)
    ok = np.ones(min(chunk, n), np.bool_)
    for i in range(0, n, chunk):
        part = arr[i : i + chunk]
        try:
            text = "\x00".join(part.tolist())
        except TypeError:  # not a str
            return None
        m = part.shape[0]
        buf = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        if _split(buf, ends[: m + 1]) != m:  # a key holds the separator
            return None
        before = kt.n
        kt.intern(buf, ends[:m] + 1, ends[1 : m + 1], ok[:m], codes[i : i + m])
        if kt.n > before:
            first = np.concatenate([first, kt.first_rows(before) + i])
    return codes, first


def factorize_ints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of an int64 array and the rows of first sight of each distinct value
    (``uniques = values[first]``, in order of first appearance).

    >>> codes, first = factorize_ints(np.array([7, -1, 7, 2**62, -1]))
    >>> codes.tolist(), first.tolist()
    ([0, 1, 0, 2, 1], [0, 1, 3])

    """
    n = values.shape[0]
    codes = np.empty(n, np.int64)
    size = 1024
    first = np.empty(size // 4, np.int64)
    slots = np.empty(size, np.int64)
    ids = np.full(size, -1, np.int64)
    r = n_keys = 0
    while True:
        r, n_keys = _intern_ints(values, r, codes, slots, ids, first, n_keys)
        if r == n:
            return codes, first[:n_keys]
        size *= 4
        slots, ids = np.empty(size, np.int64), np.full(size, -1, np.int64)
        first = _grown(first, size // 4)
        _rehash_ints(values, first, n_keys, slots, ids)


@njit(**_OPTS)
def _rehash_ints(values, first, n_keys, slots, ids):  # pragma: no cover - numba
    mask = np.uint64(slots.shape[0] - 1)
    shift = _shift(slots.shape[0])
    for u in range(n_keys):
        v = values[first[u]]
        slot = (np.uint64(v) * _GOLD) >> shift
        while ids[slot] >= 0:
            slot = (slot + np.uint64(1)) & mask
        slots[slot] = v
        ids[slot] = u
