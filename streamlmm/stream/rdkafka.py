"""Whole polls from librdkafka, with no Python object per message.

confluent-kafka's ``consume()`` builds a ``Message`` object (and ``bytes`` for its
value and key) for every record, holding the GIL all the while, and the engine then
reads each one's value and partition back through Python calls. At a few hundred
nanoseconds a message that is most of the engine's budget, and it keeps the decoding
thread waiting for the GIL.

:class:`Fetcher` is a second librdkafka consumer handle, opened through ``ctypes`` on
the library confluent-kafka ships (or the system's), and used only to fetch: it is
assigned the source's partitions at the snapshot's offsets and drained with
``rd_kafka_consume_batch_queue``. One numba pass (no GIL) then copies the batch's
payloads end to end into one buffer, with their bounds, partitions, offsets,
timestamps, keys and error codes, and destroys the messages. Metadata, end offsets
and the consumer group's offsets stay with confluent-kafka's own consumer.

Only librdkafka's public, stable C ABI is used: the ``rd_kafka_message_t`` and
``rd_kafka_topic_partition_t`` layouts of ``rdkafka.h`` (unchanged since 0.9) on a
64-bit little-endian platform. :meth:`Fetcher.open` returns ``None`` anywhere else,
and the source falls back to ``consume()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["Fetcher", "Fetched", "FetchError", "library", "collect", "gather", "payload_sizes"]

log = logging.getLogger(__name__)

RD_KAFKA_CONSUMER = 1
OFFSET_BEGINNING = -2
ERR_FATAL = -150  # RD_KAFKA_RESP_ERR__FATAL
MIN_VERSION = 0x010900FF  # librdkafka 1.9

# rd_kafka_message_t (rdkafka.h), byte offsets of its fields on LP64 (each pointer's
# length is the size_t right after it)
_ERR, _PARTITION, _PAYLOAD, _LEN, _KEY, _KEY_LEN, _OFFSET = 0, 16, 24, 32, 40, 48, 56

_vp, _int, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
# the numba passes only read and write arrays they are given: compiled without NRT, they
# carry no reference counting (numba's increments and decrements of the arrays passed to
# inlined helpers cost more than the copying itself)
_PASS = {"cache": True, "nogil": True, "_nrt": False}


class _TopicPartition(ctypes.Structure):
    """``rd_kafka_topic_partition_t``."""

    _fields_ = [
        ("topic", ctypes.c_char_p),
        ("partition", ctypes.c_int32),
        ("offset", ctypes.c_int64),
        ("metadata", _vp),
        ("metadata_size", _size),
        ("opaque", _vp),
        ("err", _int),
        ("_private", _vp),
    ]


_SIGNATURES = {
    "rd_kafka_version": (_int, []),
    "rd_kafka_err2str": (ctypes.c_char_p, [_int]),
    "rd_kafka_conf_new": (_vp, []),
    "rd_kafka_conf_destroy": (None, [_vp]),
    "rd_kafka_conf_set": (_int, [_vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _size]),
    "rd_kafka_new": (_vp, [_int, _vp, ctypes.c_char_p, _size]),
    "rd_kafka_destroy": (None, [_vp]),
    "rd_kafka_consumer_close": (_int, [_vp]),
    "rd_kafka_queue_get_consumer": (_vp, [_vp]),
    "rd_kafka_queue_destroy": (None, [_vp]),
    "rd_kafka_topic_new": (_vp, [_vp, ctypes.c_char_p, _vp]),
    "rd_kafka_topic_destroy": (None, [_vp]),
    "rd_kafka_metadata": (_int, [_vp, _int, _vp, ctypes.POINTER(_vp), _int]),
    "rd_kafka_metadata_destroy": (None, [_vp]),
    "rd_kafka_topic_partition_list_new": (_vp, [_int]),
    "rd_kafka_topic_partition_list_add": (
        ctypes.POINTER(_TopicPartition),
        [_vp, ctypes.c_char_p, ctypes.c_int32],
    ),
    "rd_kafka_topic_partition_list_destroy": (None, [_vp]),
    "rd_kafka_assign": (_int, [_vp, _vp]),
    "rd_kafka_position": (_int, [_vp, _vp]),
    "rd_kafka_consume_batch_queue": (ctypes.c_ssize_t, [_vp, _int, _vp, _size]),
    "rd_kafka_message_destroy": (None, [_vp]),
    "rd_kafka_message_timestamp": (ctypes.c_int64, [_vp, _vp]),
}

_LIBRARY: list = []  # [the loaded library or None], once looked for


def _candidates() -> list[str]:
    """Where librdkafka may be: beside confluent-kafka (its wheels bundle it), then the
    system's."""
    out = []
    try:
        import confluent_kafka
    except ImportError:
        confluent_kafka = None
    if confluent_kafka is not None:
        pkg = os.path.dirname(confluent_kafka.__file__)
        for pattern in ("confluent_kafka.libs/librdkafka*", "confluent_kafka/.dylibs/librdkafka*"):
            out += sorted(glob.glob(os.path.join(os.path.dirname(pkg), pattern)))
    found = ctypes.util.find_library("rdkafka")
    if found:
        out.append(found)
    return out


def library() -> ctypes.CDLL | None:
    """librdkafka with the functions :class:`Fetcher` calls typed, or ``None`` where it
    is missing, older than 1.9, or the platform is not 64-bit little-endian (or
    ``STREAMLMM_NATIVE_FETCH=0``).

    >>> lib = library()
    >>> lib is None or lib.rd_kafka_version() >= MIN_VERSION
    True

    """
    if _LIBRARY:
        return _LIBRARY[0]
    lib = None
    if (
        os.environ.get("STREAMLMM_NATIVE_FETCH", "1") != "0"
        and sys.byteorder == "little"
        and ctypes.sizeof(_vp) == 8
    ):
        for path in _candidates():
            try:
                cand = ctypes.CDLL(path)
                for name, (restype, argtypes) in _SIGNATURES.items():
                    fn = getattr(cand, name)
                    fn.restype, fn.argtypes = restype, argtypes
            except (OSError, AttributeError):
                continue
            if cand.rd_kafka_version() >= MIN_VERSION:
                lib = cand
                break
    _LIBRARY.append(lib)
    return lib


# -- reading the messages (numba) --------------------------------------------------------------
@intrinsic
def _load_i64(typingctx, address):  # pragma: no cover - compiled
    """The int64 at a raw ``address``."""

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))

    return types.int64(types.uint64), codegen


@intrinsic
def _copy_in(typingctx, dst, at, address, n):  # pragma: no cover - compiled
    """``dst[at:at + n] = `` the ``n`` bytes at a raw ``address`` (a memcpy)."""

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        d = builder.gep(arr.data, [args[1]])
        s = builder.inttoptr(args[2], ir.IntType(8).as_pointer())
        cgutils.raw_memcpy(builder, d, s, args[3], 1)
        return context.get_dummy_value()

    return types.void(
        types.Array(types.uint8, 1, "C"), types.int64, types.uint64, types.int64
    ), codegen


@intrinsic
def _call_1(typingctx, fn, a):  # pragma: no cover - compiled
    """``fn(a)`` for a C function ``void fn(void *)`` at address ``fn``."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1]])
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64), codegen


@intrinsic
def _call_2(typingctx, fn, a, b):  # pragma: no cover - compiled
    """``fn(a, b)`` for a C function ``int64_t fn(void *, void *)`` at address ``fn``."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1], args[2]])

    return types.int64(types.uint64, types.uint64, types.uint64), codegen


@njit(cache=True, nogil=True, inline="always")
def _low32(x):  # pragma: no cover - compiled
    v = x & 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


@njit(**_PASS)
def payload_sizes(msgs, n):  # pragma: no cover - compiled
    """Total payload and key bytes of the messages at the addresses ``msgs[:n]``."""
    total, keys = 0, 0
    for r in range(n):
        m = msgs[r]
        if _load_i64(m + np.uint64(_PAYLOAD)) != 0:
            total += _load_i64(m + np.uint64(_LEN))
        if _load_i64(m + np.uint64(_KEY)) != 0:
            keys += _load_i64(m + np.uint64(_KEY_LEN))
    return total, keys


NULL_VALUE, NULL_KEY = 1, 2  # gather's flags


@njit(cache=True, nogil=True, inline="always")
def _append(m, field, dst, pos):  # pragma: no cover - compiled
    """Copy the bytes a pointer field of message ``m`` points to (the pointer at byte
    ``field``, its length right after it) to ``dst[pos:]``: the new end, or -1 for a
    null pointer."""
    address = np.uint64(_load_i64(m + np.uint64(field)))
    if address == 0:
        return -1
    size = _load_i64(m + np.uint64(field + 8))
    _copy_in(dst, pos, address, size)
    return pos + size


@njit(**_PASS)
def gather(
    msgs,
    n,
    timestamp_fn,
    destroy_fn,
    buf,
    starts,
    keybuf,
    keystarts,
    parts,
    offsets,
    stamps,
    errs,
    flags,
):  # pragma: no cover - compiled
    """Copy the messages at the addresses ``msgs[:n]`` into columns, then destroy them
    (with the C functions at ``timestamp_fn`` and ``destroy_fn``).

    Message ``r``'s payload becomes ``buf[starts[r]:starts[r + 1]]`` (an error event's
    is librdkafka's text for it) and its key ``keybuf[keystarts[r]:keystarts[r + 1]]``;
    ``flags[r]`` has :data:`NULL_VALUE` for a null payload (a tombstone) and
    :data:`NULL_KEY` for a null key.
    """
    pos, kpos = 0, 0
    for r in range(n):
        m = msgs[r]
        starts[r] = pos
        keystarts[r] = kpos
        errs[r] = _low32(_load_i64(m + np.uint64(_ERR)))
        parts[r] = _low32(_load_i64(m + np.uint64(_PARTITION)))
        offsets[r] = _load_i64(m + np.uint64(_OFFSET))
        flags[r] = 0
        end = _append(m, _PAYLOAD, buf, pos)
        if end < 0:
            flags[r] |= NULL_VALUE
        else:
            pos = end
        end = _append(m, _KEY, keybuf, kpos)
        if end < 0:
            flags[r] |= NULL_KEY
        else:
            kpos = end
        stamps[r] = _call_2(timestamp_fn, m, np.uint64(0))
        _call_1(destroy_fn, m)
    starts[n] = pos
    keystarts[n] = kpos


def collect(msgs: np.ndarray, n: int, timestamp_fn: int, destroy_fn: int) -> Fetched:
    """The messages at the addresses ``msgs[:n]`` as :class:`Fetched` columns (they are
    destroyed); ``timestamp_fn`` and ``destroy_fn`` are the addresses of librdkafka's
    ``rd_kafka_message_timestamp`` and ``rd_kafka_message_destroy``."""
    total, keys = payload_sizes(msgs, n)
    got = Fetched(
        np.empty(total, np.uint8),
        np.empty(n + 1, np.int64),
        np.empty(keys, np.uint8),
        np.empty(n + 1, np.int64),
        np.empty(n, np.int64),
        np.empty(n, np.int64),
        np.empty(n, np.int64),
        np.empty(n, np.int32),
        np.empty(n, np.uint8),
    )
    gather(msgs, n, np.uint64(timestamp_fn), np.uint64(destroy_fn), *got)
    got.buf.flags.writeable = False  # as bytes are: one compiled scan for both
    return got


# -- the handle --------------------------------------------------------------------------------
class FetchError:
    """An error event of a poll (librdkafka delivers its errors as messages).

    >>> e = FetchError(ERR_FATAL, "fenced")
    >>> e.fatal(), str(e)
    (True, 'librdkafka error -150: fenced')

    """

    def __init__(self, code: int, text: str):
        self.code, self.text = code, text

    def fatal(self) -> bool:
        """Whether the consumer cannot go on (``RD_KAFKA_RESP_ERR__FATAL``)."""
        return self.code == ERR_FATAL

    def __str__(self) -> str:
        return f"librdkafka error {self.code}: {self.text}"


class Fetched(NamedTuple):
    """One poll's messages as columns (see :func:`gather`).

    >>> f = Fetched(
    ...     np.frombuffer(b"abxyz", np.uint8), np.array([0, 2, 2, 5]),
    ...     np.frombuffer(b"k", np.uint8), np.array([0, 1, 1, 1]),
    ...     np.array([0, 0, 1]), np.array([7, 8, 3]), np.zeros(3, np.int64),
    ...     np.zeros(3, np.int32), np.array([0, NULL_VALUE | NULL_KEY, NULL_KEY], np.uint8))
    >>> [f.value(i) for i in range(3)], [f.key(i) for i in range(3)], f.error(0)
    ([b'ab', None, b'xyz'], [b'k', None, None], None)

    """

    buf: np.ndarray
    starts: np.ndarray
    keybuf: np.ndarray
    keystarts: np.ndarray
    parts: np.ndarray
    offsets: np.ndarray
    stamps: np.ndarray
    errs: np.ndarray
    flags: np.ndarray

    def value(self, i: int) -> bytes | None:
        """The ``i``-th payload; ``None`` for a tombstone."""
        if self.flags[i] & NULL_VALUE:
            return None
        return self.buf[self.starts[i] : self.starts[i + 1]].tobytes()

    def key(self, i: int) -> bytes | None:
        """The ``i``-th key; ``None`` for a null key."""
        if self.flags[i] & NULL_KEY:
            return None
        return self.keybuf[self.keystarts[i] : self.keystarts[i + 1]].tobytes()

    def error(self, i: int) -> FetchError | None:
        """The ``i``-th message's error, if it is an error event."""
        code = int(self.errs[i])
        if code == 0:
            return None
        return FetchError(code, (self.value(i) or b"").decode("utf-8", "replace"))


def _text(v: Any) -> str:
    """A librdkafka property value."""
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


class Fetcher:
    """A librdkafka consumer handle that only fetches: assigned partitions, whole polls.

    Parameters
    ----------
    lib
        :func:`library`.
    conf
        librdkafka properties (values are turned into text: ``True`` is ``"true"``).

    """

    def __init__(self, lib: ctypes.CDLL, conf: Mapping[str, Any]):
        self.lib = lib
        errstr = ctypes.create_string_buffer(512)
        c = lib.rd_kafka_conf_new()
        for k, v in conf.items():
            if lib.rd_kafka_conf_set(c, k.encode(), _text(v).encode(), errstr, 512) != 0:
                lib.rd_kafka_conf_destroy(c)
                raise ValueError(f"librdkafka property {k}: {errstr.value.decode()}")
        rk = lib.rd_kafka_new(RD_KAFKA_CONSUMER, c, errstr, 512)
        if not rk:  # rd_kafka_new keeps the configuration only when it succeeds
            lib.rd_kafka_conf_destroy(c)
            raise ValueError(f"librdkafka consumer: {errstr.value.decode()}")
        self.rk = rk
        self.queue = lib.rd_kafka_queue_get_consumer(rk)
        self._fns = (
            ctypes.cast(lib.rd_kafka_message_timestamp, _vp).value,
            ctypes.cast(lib.rd_kafka_message_destroy, _vp).value,
        )
        self._msgs = np.empty(0, np.uint64)
        self._lock = threading.Lock()  # close() against a poll on another thread

    @classmethod
    def open(cls, conf: Mapping[str, Any]) -> Fetcher | None:
        """A fetcher, or ``None`` where :func:`library` is not available or the
        handle cannot be made (then the caller consumes through confluent-kafka)."""
        lib = library()
        if lib is None:
            return None
        try:
            return cls(lib, conf)
        except ValueError as e:
            log.warning("consuming through confluent-kafka's consume(): %s", e)
            return None

    def connect(self, topic: str, timeout_s: float) -> bool:
        """Ask for ``topic``'s metadata: the handle connects and learns the partitions'
        leaders now, so that fetching starts as soon as partitions are assigned."""
        lib = self.lib
        rkt = lib.rd_kafka_topic_new(self.rk, topic.encode(), None)
        md = _vp()
        try:
            err = lib.rd_kafka_metadata(self.rk, 0, rkt, ctypes.byref(md), int(timeout_s * 1000))
        finally:
            if md:
                lib.rd_kafka_metadata_destroy(md)
            lib.rd_kafka_topic_destroy(rkt)
        return err == 0

    def assign(self, topic: str, offsets: Mapping[int, int | None]) -> None:
        """Fetch these partitions from these offsets (``None``: the beginning)."""
        lib = self.lib
        tl = lib.rd_kafka_topic_partition_list_new(len(offsets))
        try:
            for p, off in offsets.items():
                tp = lib.rd_kafka_topic_partition_list_add(tl, topic.encode(), int(p))
                tp.contents.offset = OFFSET_BEGINNING if off is None else int(off)
            err = lib.rd_kafka_assign(self.rk, tl)
        finally:
            lib.rd_kafka_topic_partition_list_destroy(tl)
        if err:
            raise RuntimeError(f"librdkafka assign: {lib.rd_kafka_err2str(err).decode()}")

    def positions(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """The consumer's position in each partition (the offset after the last message
        delivered, and after the transaction markers that follow it); partitions with
        none yet are left out."""
        lib = self.lib
        tl = lib.rd_kafka_topic_partition_list_new(len(partitions))
        try:
            elems = [
                lib.rd_kafka_topic_partition_list_add(tl, topic.encode(), p) for p in partitions
            ]
            with self._lock:
                err = 0 if self.rk is None else lib.rd_kafka_position(self.rk, tl)
            got = {p: int(e.contents.offset) for p, e in zip(partitions, elems)}
        finally:
            lib.rd_kafka_topic_partition_list_destroy(tl)
        return {} if err else {p: off for p, off in got.items() if off >= 0}

    def poll(self, max_records: int, timeout_s: float) -> Fetched:
        """Up to ``max_records`` messages: as soon as some are there, or after ``timeout_s``."""
        if self._msgs.shape[0] < max_records:
            self._msgs = np.empty(max_records, np.uint64)
        msgs = self._msgs
        wait_ms, n = int(timeout_s * 1000), 0
        with self._lock:
            if self.rk is None:
                raise RuntimeError("the fetcher is closed")
            while True:  # librdkafka waits for a full batch: ask in short slices
                step = min(wait_ms, 10)
                n = self.lib.rd_kafka_consume_batch_queue(
                    self.queue, step, msgs.ctypes.data, max_records
                )
                wait_ms -= step
                if n != 0 or wait_ms <= 0:
                    break
            if n < 0:
                raise RuntimeError("librdkafka consume_batch_queue failed")
            return collect(msgs, n, *self._fns)

    def close(self) -> None:
        """Leave the partitions and free the handle (idempotent)."""
        with self._lock:
            if self.rk is None:
                return
            self.lib.rd_kafka_queue_destroy(self.queue)
            self.lib.rd_kafka_consumer_close(self.rk)
            self.lib.rd_kafka_destroy(self.rk)
            self.rk = self.queue = None
